/* Hostile frames from inside the Tapestry test guest, through its own kernel and NIC (busybox
 * has no raw-frame sender): `tapestry-raw-send IFNAME KIND COUNT [SERVER]` writes COUNT frames
 * on an AF_PACKET socket, from the interface's own MAC and IPv4 address, as fast as it can:
 *   vlan     IPv4/UDP to 10.0.0.1:5353 behind one 802.1Q tag (VID 7), every other frame behind
 *            an 802.1ad one instead;
 *   release  DHCP RELEASE of the interface's address (68 -> SERVER:67, SERVER the lease's server
 *            identifier, given as the fourth argument).
 * Prints "TAPESTRY-SENT kind=.. frames=.. ms=..". Built statically by scripts/build-guest.sh. */
#include <arpa/inet.h>
#include <netpacket/packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint16_t csum(const uint8_t *p, int len) {
    uint32_t s = 0;
    for (int i = 0; i + 1 < len; i += 2) s += (uint32_t)p[i] << 8 | p[i + 1];
    if (len & 1) s += (uint32_t)p[len - 1] << 8;
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

/* IPv4 (20 bytes, no options) + UDP headers at `p` for `payload` bytes of UDP payload. */
static int ipv4_udp(uint8_t *p, uint32_t src, uint32_t dst, int sport, int dport, int payload) {
    int len = 20 + 8 + payload;
    memset(p, 0, 28);
    p[0] = 0x45;
    p[2] = len >> 8;
    p[3] = len & 0xff;
    p[8] = 64;
    p[9] = 17;
    memcpy(p + 12, &src, 4);
    memcpy(p + 16, &dst, 4);
    uint16_t c = csum(p, 20);
    p[10] = c >> 8;
    p[11] = c & 0xff;
    p[20] = sport >> 8;
    p[21] = sport & 0xff;
    p[22] = dport >> 8;
    p[23] = dport & 0xff;
    p[24] = (8 + payload) >> 8;
    p[25] = (8 + payload) & 0xff;
    /* UDP checksum 0: none. */
    return len;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s IFNAME vlan|release COUNT [SERVER]\n", argv[0]);
        return 2;
    }
    const char *ifname = argv[1], *kind = argv[2];
    long count = atol(argv[3]);
    int release = strcmp(kind, "release") == 0;
    if (!release && strcmp(kind, "vlan") != 0) {
        fprintf(stderr, "unknown kind %s\n", kind);
        return 2;
    }
    uint32_t server = 0;
    if (release && (argc < 5 || inet_pton(AF_INET, argv[4], &server) != 1)) {
        fprintf(stderr, "release needs the server's address\n");
        return 2;
    }
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0) { perror("socket"); return 1; }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) { perror("SIOCGIFHWADDR"); return 1; }
    uint8_t mac[6];
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    if (ioctl(fd, SIOCGIFADDR, &ifr) < 0) { perror("SIOCGIFADDR"); return 1; }
    uint32_t ip = ((struct sockaddr_in *)&ifr.ifr_addr)->sin_addr.s_addr;
    if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0) { perror("SIOCGIFINDEX"); return 1; }
    struct sockaddr_ll to;
    memset(&to, 0, sizeof to);
    to.sll_family = AF_PACKET;
    to.sll_ifindex = ifr.ifr_ifindex;
    to.sll_halen = 6;
    memset(to.sll_addr, 0xff, 6);

    uint8_t f[2][600];
    int len[2];
    for (int v = 0; v < 2; v++) {
        uint8_t *p = f[v];
        memset(p, 0, sizeof f[v]);
        memset(p, 0xff, 6);
        memcpy(p + 6, mac, 6);
        if (release) {
            /* Ethernet, IPv4/UDP 68 -> 67, BOOTP with the options. */
            p[12] = 0x08;
            p[13] = 0x00;
            uint8_t *b = p + 14 + 28;
            b[0] = 1; /* BOOTREQUEST */
            b[1] = 1; /* Ethernet */
            b[2] = 6;
            b[4] = 0x7a; /* xid */
            b[5] = 0x11;
            b[6] = 0xd0;
            b[7] = (uint8_t)v;
            memcpy(b + 12, &ip, 4); /* ciaddr */
            memcpy(b + 28, mac, 6); /* chaddr */
            uint8_t *o = b + 236;
            const uint8_t cookie[4] = {99, 130, 83, 99};
            memcpy(o, cookie, 4);
            o += 4;
            *o++ = 53; *o++ = 1; *o++ = 7; /* RELEASE */
            *o++ = 54; *o++ = 4;
            memcpy(o, &server, 4);
            o += 4;
            *o++ = 61; *o++ = 7; *o++ = 1; /* client identifier: the hardware address */
            memcpy(o, mac, 6);
            o += 6;
            *o++ = 255;
            int bootp = (int)(o - b);
            if (bootp < 300) bootp = 300;
            len[v] = 14 + ipv4_udp(p + 14, ip, server, 68, 67, bootp);
        } else {
            /* One tag, 802.1Q (0x8100) or 802.1ad (0x88a8), VID 7, then IPv4/UDP. */
            p[12] = v ? 0x88 : 0x81;
            p[13] = v ? 0xa8 : 0x00;
            p[14] = 0x00;
            p[15] = 0x07;
            p[16] = 0x08;
            p[17] = 0x00;
            uint32_t dst = htonl(0x0a000001);
            memcpy(p + 18 + 28, "tagged\n", 7);
            len[v] = 18 + ipv4_udp(p + 18, ip, dst, 40000, 5353, 7);
        }
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long sent = 0, refused = 0;
    while (sent < count) {
        int v = (int)(sent & 1);
        if (sendto(fd, f[v], len[v], 0, (struct sockaddr *)&to, sizeof to) == len[v]) {
            sent++;
            refused = 0;
        } else if (++refused < 10000) {
            /* The NIC's queue is full: wait for it rather than lose the frame. */
            usleep(100);
        } else {
            perror("sendto");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    printf("TAPESTRY-SENT kind=%s frames=%ld ms=%ld\n", kind, sent, ms);
    return 0;
}
