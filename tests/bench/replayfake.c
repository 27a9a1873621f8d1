/* replayfake: an upstream for the benchmarks that costs next to nothing per request.
 *
 *   replayfake --pieces FILE [--port P] [--unix PATH] [--interval S --events N] [--threads T]
 *
 * Cases (a) and (b) measure the gateway against a fast fake llama-server called directly, and
 * the issue asks that the fake not be the bottleneck. The Python fake (tests/fakes/fake_llama.py)
 * costs about 55 us of CPU per request, as much as a proxy hop, so the direct side measured the
 * fake. This server answers from bytes recorded from that fake: the harness asks the Python fake
 * once, splits the answer into the writes llama-server makes (the head and body of a JSON reply
 * in one write; for a stream the head, then one write per chunk, then the terminating chunk) and
 * stores them as [u32 little-endian length][bytes] records in FILE. Every POST (any target) is
 * answered with those writes, in order, one send() each; every GET with {"status":"ok"} (the
 * harness's /health checks). HTTP/1.1 keep-alive, Content-Length request bodies, pipelining;
 * `Connection: close` closes after the answer. Anything it cannot parse closes the connection:
 * it is a benchmark tool behind a trusted harness, not a server for the world.
 *
 * Paced streams (case c): with --interval S --events N the writes follow the Python fake's
 * schedule for a stream of N content events S seconds apart: the head and the first event at
 * once, event i (write i + 1) at start + i * S, everything after the last event right after it.
 * The schedule is absolute, so a late wake-up delays one event, never every later one. Waiting
 * streams sit in a min-heap by due time; epoll_wait sleeps until the first is due. On schedule
 * every write is its own send(), as llama-server's; a stream whose write is COALESCE_LATE_S
 * late or more (the fake behind: at 10,000 streams one send per event over TCP loopback costs
 * more than a core) has everything then due go out in one sendmsg(), so that being behind costs
 * it fewer system calls, as a proxy behind reads several events at once.
 *
 * T threads (default 1), each its own level-triggered epoll loop and heap, serving the
 * connections it accepted: one thread sending an event per TCP write runs out of its core before
 * the machine does, with 64 fast streams (case b) or 10,000 paced ones (case c) called directly.
 * Each thread has its own TCP listener on the port (SO_REUSEPORT: the kernel spreads the
 * connections); the Unix listener is shared (EPOLLEXCLUSIVE, one accept per wake-up, so that a
 * burst is not all taken by one thread). Listens on 127.0.0.1:P (TCP_NODELAY on accepted
 * sockets, as cpp-httplib sets) and/or a Unix socket.
 * Runs until SIGTERM or SIGINT (taken by the main thread; the process ends with it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* A request head and body must fit here (the benchmark's requests are under 1 KiB). */
#define IN_CAP (64 * 1024)
/* Listen backlog: case (b) opens 64 streams at once, nginx and the gateway pool more. */
#define BACKLOG 4096
/* Events taken per epoll_wait. */
#define MAX_EVENTS 256
/* Recorded writes at most (a stream of 200 events is about 205). */
#define MAX_PIECES 100000
/* Paced streams waiting at once at most (case c opens 10,000). */
#define MAX_WAITING 65536
/* A paced write this late (seconds) goes out with every later write already due, in one
 * sendmsg(); on schedule (a 50 ms interval) a write is late by well under this. */
#define COALESCE_LATE_S 0.005
/* Writes joined in one sendmsg() at most (a stream of 40 events has 44). */
#define COALESCE_MAX 64
/* --threads at most. */
#define MAX_THREADS 64

struct piece { char *p; uint32_t n; };
static struct piece *pieces;
static int npieces;

static const char HEALTH[] =
    "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    "Content-Length: 15\r\nKeep-Alive: timeout=5, max=100\r\n\r\n{\"status\":\"ok\"}";

struct conn {
    int fd;
    int listener;          /* 1 for a listening socket, 2 for one shared by threads (then
                              only fd is used) */
    int sending;           /* an answer is being written */
    int health;            /* the answer is HEALTH, not the pieces */
    int close_after;       /* the request asked Connection: close */
    uint32_t interest;     /* epoll events registered: EPOLLIN, EPOLLOUT (a write met a full
                              socket) or none (waiting for a paced write's time) */
    int waiting;           /* in the heap until its next write is due (paced streams) */
    int dead;              /* dropped while waiting: freed when the heap lets it go */
    double start;          /* when the answer began (paced streams) */
    int piece;
    size_t off;
    size_t inlen;
    char in[IN_CAP];
};

static volatile sig_atomic_t stop;
static double interval;    /* --interval: seconds between paced events, 0 = no pacing */
static int paced_events;   /* --events: content events of a paced stream */
static int tcp_listeners[MAX_THREADS], unix_listener = -1, nthreads = 1;
/* Each thread's own: */
static __thread int ep;
static __thread struct conn **heap; /* waiting streams, a min-heap by due() */
static __thread int nheap;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* When write number `piece` of c's answer is due: the head (0) and the first event (1) at the
 * start, event i (piece i + 1) i intervals after it, what follows the last event with it. */
static double due_at(const struct conn *c, int piece) {
    int p = piece < paced_events ? piece : paced_events;
    return c->start + (p > 1 ? (p - 1) * interval : 0);
}

static double due(const struct conn *c) { return due_at(c, c->piece); }

static void heap_push(struct conn *c) {
    int i = nheap++;
    while (i > 0 && due(heap[(i - 1) / 2]) > due(c)) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = c;
    c->waiting = 1;
}

static struct conn *heap_pop(void) {
    struct conn *top = heap[0], *last = heap[--nheap];
    int i = 0;
    for (;;) {
        int k = 2 * i + 1;
        if (k >= nheap) break;
        if (k + 1 < nheap && due(heap[k + 1]) < due(heap[k])) k++;
        if (due(last) <= due(heap[k])) break;
        heap[i] = heap[k];
        i = k;
    }
    if (nheap) heap[i] = last;
    top->waiting = 0;
    return top;
}

static void on_signal(int sig) { (void)sig; stop = 1; }

static void die(const char *what) { perror(what); exit(1); }

static void load_pieces(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    pieces = calloc(MAX_PIECES, sizeof *pieces);
    if (!pieces) die("calloc");
    unsigned char len[4];
    while (fread(len, 1, 4, f) == 4) {
        if (npieces == MAX_PIECES) { fprintf(stderr, "too many pieces\n"); exit(1); }
        uint32_t n = len[0] | len[1] << 8 | len[2] << 16 | (uint32_t)len[3] << 24;
        char *p = malloc(n ? n : 1);
        if (!p || fread(p, 1, n, f) != n) { fprintf(stderr, "%s: short piece\n", path); exit(1); }
        pieces[npieces].p = p;
        pieces[npieces].n = n;
        npieces++;
    }
    fclose(f);
    if (npieces == 0) { fprintf(stderr, "%s: no pieces\n", path); exit(1); }
}

static void watch(struct conn *c, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, op, c->fd, &ev) < 0) die("epoll_ctl");
    c->interest = events;
}

static void want(struct conn *c, uint32_t events) {
    if (c->interest != events) watch(c, EPOLL_CTL_MOD, events);
}

static void drop(struct conn *c) {
    if (c->dead) return;
    close(c->fd);   /* closing removes it from the epoll set */
    if (c->waiting) c->dead = 1;   /* the heap still points at it */
    else free(c);
}

/* A paced stream behind its schedule: every write due by t, from the next one, in one
 * sendmsg(). 1 when it sent something (c->piece and c->off moved on), 0 when the socket was
 * full, -1 when the peer is gone. */
static int send_due(struct conn *c, double t) {
    struct iovec iov[COALESCE_MAX];
    int k = 0;
    for (int i = c->piece; i < npieces && k < COALESCE_MAX; i++) {
        if (due_at(c, i) > t) break;
        iov[k].iov_base = pieces[i].p;
        iov[k].iov_len = pieces[i].n;
        k++;
    }
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)k};
    ssize_t w;
    do w = sendmsg(c->fd, &msg, MSG_NOSIGNAL); while (w < 0 && errno == EINTR);
    if (w < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
    while (c->piece < npieces && (size_t)w >= pieces[c->piece].n) {
        w -= (ssize_t)pieces[c->piece].n;
        c->piece++;
    }
    c->off = (size_t)w;   /* a partial write: the rest of this piece next */
    return 1;
}

/* Write what is left of the answer that is due; 0 when done or waiting for room or for the
 * next write's time, -1 when the peer is gone. */
static int send_more(struct conn *c) {
    for (;;) {
        const char *p;
        size_t n;
        if (!c->health && interval > 0 && c->off == 0) {
            double t = now(), d = due(c);
            if (d > t) {
                if (nheap == MAX_WAITING) return -1;
                want(c, 0);   /* nothing to read or write until then (errors still wake it) */
                heap_push(c);
                return 0;
            }
            if (t - d >= COALESCE_LATE_S) {
                int r = send_due(c, t);
                if (r < 0) return -1;
                if (r == 0) { want(c, EPOLLOUT); return 0; }
                if (c->piece == npieces) break;
                continue;
            }
        }
        if (c->health) { p = HEALTH; n = sizeof HEALTH - 1; }
        else { p = pieces[c->piece].p; n = pieces[c->piece].n; }
        while (c->off < n) {
            ssize_t w = send(c->fd, p + c->off, n - c->off, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    want(c, EPOLLOUT);
                    return 0;
                }
                return -1;
            }
            c->off += (size_t)w;
        }
        c->off = 0;
        if (c->health || ++c->piece == npieces) break;
    }
    c->sending = 0;
    want(c, EPOLLIN);
    return c->close_after ? -1 : 0;
}

/* Content-Length of a head (NUL-terminated copy not needed: bounded search), -1 if malformed. */
static long content_length(const char *head, size_t n) {
    static const char name[] = "\r\ncontent-length:";
    size_t k = sizeof name - 1;
    for (size_t i = 0; i + k <= n; i++) {
        if (strncasecmp(head + i, name, k) == 0) {
            size_t j = i + k;
            while (j < n && head[j] == ' ') j++;
            long v = 0;
            size_t digits = 0;
            while (j < n && head[j] >= '0' && head[j] <= '9' && digits < 10) {
                v = v * 10 + (head[j] - '0');
                j++;
                digits++;
            }
            return digits ? v : -1;
        }
    }
    return 0;
}

static int has_header(const char *head, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (strncasecmp(head + i, needle, k) == 0) return 1;
    return 0;
}

/* Answer every complete request in the buffer; -1 to close the connection. */
static int serve(struct conn *c) {
    while (!c->sending) {
        char *end = memmem(c->in, c->inlen, "\r\n\r\n", 4);
        if (!end) return c->inlen == IN_CAP ? -1 : 0;
        size_t head = (size_t)(end - c->in) + 4;
        if (has_header(c->in, head, "\r\ntransfer-encoding:")) return -1;
        long cl = content_length(c->in, head);
        if (cl < 0 || head + (size_t)cl > IN_CAP) return -1;
        if (c->inlen < head + (size_t)cl) return 0;
        c->health = c->inlen >= 4 && memcmp(c->in, "GET ", 4) == 0;
        c->close_after = has_header(c->in, head, "\r\nconnection: close");
        size_t used = head + (size_t)cl;
        memmove(c->in, c->in + used, c->inlen - used);
        c->inlen -= used;
        c->sending = 1;
        c->piece = 0;
        c->off = 0;
        if (interval > 0) c->start = now();
        if (send_more(c) < 0) return -1;
    }
    return 0;
}

/* Go on with an answer (room to write, or its next write is due); once it is done, answer the
 * next request already read. */
static void resume(struct conn *c) {
    if (send_more(c) < 0 || (!c->sending && serve(c) < 0)) drop(c);
}

static void on_readable(struct conn *c) {
    if (c->inlen == IN_CAP) { drop(c); return; }
    ssize_t r = recv(c->fd, c->in + c->inlen, IN_CAP - c->inlen, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        drop(c);
        return;
    }
    if (r == 0) { drop(c); return; }
    c->inlen += (size_t)r;
    if (serve(c) < 0) drop(c);
}

static void on_accept(struct conn *l) {
    int batch = l->listener == 2 ? 1 : 64;   /* a listener shared by threads: one at a time */
    for (int i = 0; i < batch; i++) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
                perror("accept4");
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);   /* fails on Unix: fine */
        struct conn *c = calloc(1, sizeof *c);
        if (!c) { close(fd); return; }
        c->fd = fd;
        watch(c, EPOLL_CTL_ADD, EPOLLIN);
    }
}

static void add_listener(int fd, int shared) {
    struct conn *l = calloc(1, sizeof *l);
    if (!l) die("calloc");
    l->fd = fd;
    l->listener = shared ? 2 : 1;
    watch(l, EPOLL_CTL_ADD, EPOLLIN | (shared ? EPOLLEXCLUSIVE : 0));
}

/* One thread's loop: its epoll set, its heap, the connections it accepts. */
static void *worker(void *arg) {
    long index = (long)arg;
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    heap = calloc(MAX_WAITING, sizeof *heap);
    if (!heap) die("calloc");
    if (tcp_listeners[index] >= 0) add_listener(tcp_listeners[index], 0);
    if (unix_listener >= 0) add_listener(unix_listener, nthreads > 1);
    struct epoll_event evs[MAX_EVENTS];
    while (!stop) {
        int wait_ms = -1;
        if (nheap) {
            double left = due(heap[0]) - now();
            wait_ms = left <= 0 ? 0 : (int)(left * 1000) + 1;   /* never wake before it is due */
        }
        int n = epoll_wait(ep, evs, MAX_EVENTS, wait_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        /* The events first: a connection dropped here while it waits in the heap is only
         * marked dead, and the heap frees it below; the other way round, the heap could free
         * a connection that this batch of events still points at. */
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->listener) on_accept(c);
            else if (!c->sending) on_readable(c);
            else if (evs[i].events & (EPOLLERR | EPOLLHUP)) drop(c);
            else resume(c);
        }
        while (nheap && due(heap[0]) <= now()) {   /* paced writes that are due */
            struct conn *c = heap_pop();
            if (c->dead) free(c);
            else resume(c);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    const char *path = NULL, *unix_path = NULL;
    int port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--pieces") == 0) path = argv[i + 1];
        else if (strcmp(argv[i], "--port") == 0) port = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--unix") == 0) unix_path = argv[i + 1];
        else if (strcmp(argv[i], "--interval") == 0) interval = atof(argv[i + 1]);
        else if (strcmp(argv[i], "--events") == 0) paced_events = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--threads") == 0) nthreads = atoi(argv[i + 1]);
        else { fprintf(stderr, "unknown argument %s\n", argv[i]); return 2; }
    }
    if (!path || (!port && !unix_path) || interval < 0 || (interval > 0 && paced_events < 1) ||
        nthreads < 1 || nthreads > MAX_THREADS) {
        fprintf(stderr, "usage: replayfake --pieces FILE [--port P] [--unix PATH] "
                        "[--interval S --events N] [--threads T]\n");
        return 2;
    }
    load_pieces(path);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    for (int i = 0; i < nthreads; i++) {
        tcp_listeners[i] = -1;
        if (!port) continue;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (nthreads > 1) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind tcp");
        if (listen(fd, BACKLOG) < 0) die("listen");
        tcp_listeners[i] = fd;
    }
    if (unix_path) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        if (strlen(unix_path) >= sizeof a.sun_path) { fprintf(stderr, "socket path too long\n"); return 2; }
        strcpy(a.sun_path, unix_path);
        unlink(unix_path);
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind unix");
        if (listen(fd, BACKLOG) < 0) die("listen");
        unix_listener = fd;
    }
    /* The other threads block the signals: SIGTERM interrupts the main thread's wait, and the
     * process ends when main returns. */
    sigset_t sigs, old;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, &old);
    for (int i = 1; i < nthreads; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)(long)i) != 0) die("pthread_create");
        pthread_detach(t);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    printf("replayfake: %d pieces, %d thread%s, listening\n", npieces, nthreads,
           nthreads > 1 ? "s" : "");
    fflush(stdout);
    worker((void *)0L);
    if (unix_path) unlink(unix_path);
    return 0;
}
