/* The pause container of the test node (tests/src/node.rs): PID 1 of every pod sandbox. It holds
 * the pod's namespaces open, reaps children that get re-parented to it, and exits on SIGTERM or
 * SIGINT. Built with `gcc -static` into a FROM scratch image (no registry on the test node). */
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction stop = {.sa_handler = on_stop};
    struct sigaction child = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    if (getpid() != 1) {
        fprintf(stderr, "pause: not PID 1; running anyway\n");
    }
    if (sigaction(SIGINT, &stop, NULL) || sigaction(SIGTERM, &stop, NULL) ||
        sigaction(SIGCHLD, &child, NULL)) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) {
        pause();
    }
}
