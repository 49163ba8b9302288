/* A retry loop for the call-stack tests: connects to 127.0.0.1:PORT again
 * and again for SECONDS (at most MAX times, 2,000,000 by default), from a
 * function with a name no library has. Built by tests/tests/stacks.rs with
 * and without frame pointers. Usage: stack_client PORT SECONDS [MAX] */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) long storm_retry_connect_loop(int port, int seconds, long max)
{
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(0x7f000001);
    time_t end = time(NULL) + seconds;
    long n = 0;
    while (time(NULL) < end && n < max) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            break;
        connect(fd, (struct sockaddr *)&a, sizeof a); /* THE CONNECT */
        close(fd);
        n++;
    }
    return n;
}

int main(int argc, char **argv)
{
    if (argc != 3 && argc != 4)
        return 2;
    long max = argc == 4 ? atol(argv[3]) : 2000000;
    printf("%ld\n", storm_retry_connect_loop(atoi(argv[1]), atoi(argv[2]), max));
    return 0;
}
