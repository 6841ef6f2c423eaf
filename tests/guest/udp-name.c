/* UDP name server of the Tapestry test guest (busybox has no UDP server applet):
 * `tapestry-udp-name PORT NAME` answers every datagram on 0.0.0.0:PORT with "NAME\n".
 * Built statically by scripts/build-guest.sh. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PORT NAME\n", argv[0]);
        return 2;
    }
    char reply[256];
    int len = snprintf(reply, sizeof reply, "%s\n", argv[2]);
    if (len < 0 || len >= (int)sizeof reply) return 2;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(argv[1]));
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    for (;;) {
        char buf[2048];
        struct sockaddr_in peer;
        socklen_t plen = sizeof peer;
        if (recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &plen) < 0) continue;
        sendto(fd, reply, (size_t)len, 0, (struct sockaddr *)&peer, plen);
    }
}
