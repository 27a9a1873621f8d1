/* sseload: the SSE load client of benchmark cases (b) and (c), in C so that it is not the
 * bottleneck.
 *
 *   sseload (--port P | --unix PATH) --request FILE --connections N
 *           [--duration S] [--requests-per-conn K] [--start-at EPOCH] [--timeout S]
 *           [--connect-parallel M]
 *
 * The same measurement as tests/bench/loadclient.py in mode "count", which at 64 streams read
 * per event spent a whole core direct (case b), and at 10,000 slow streams 1.2 cores in four
 * processes (case c): N keep-alive connections each send the raw request in
 * FILE again and again until K responses are done or S seconds have passed (the response in
 * progress is finished). Per response it records [sent (s since start), first byte (s after
 * sent), first `data: ` (s after sent, or null), end (s after sent), status, `data: ` count].
 * A chunked body ends at its last-chunk marker, any other at Content-Length. A server closing
 * an idle keep-alive connection before any answer byte is a reconnect (the request is sent
 * again); any other close mid-way, a bad head or a response without framing fails the
 * connection. Prints one JSON object like loadclient.py's: wall_start, wall, records,
 * connect_times, failed, reconnects, errors, error_count, cpu_s, maxrss_kb.
 *
 * TCP connections are opened without blocking, at most M (default 64) in progress at once, the
 * rest as those complete, so that a burst of thousands does not overflow the server's listen
 * backlog (a dropped SYN costs a 1 s retry) and streams already open are read meanwhile. A
 * connection's connect time runs from socket() to writable. Unix-socket connections (a
 * server's backlog there refuses at once rather than dropping) are opened blocking.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* A response head larger than this is an error (llama-server's are under 300 bytes); it is
 * also the per-connection buffer, so 10,000 connections hold 80 MB at most. */
#define HEAD_CAP 8192
/* Bytes read per recv. */
#define READ_CAP 65536
/* Connections at most (case b uses 64, case c up to 10,000). */
#define MAX_CONNS 16384
/* TCP connects in progress at once, unless --connect-parallel says otherwise: loadclient.py's
 * default, under the listen backlogs of the gateway (2048) and the fakes. */
#define DEFAULT_CONNECT_PARALLEL 64
/* Server closes before an answer that are taken as an idle keep-alive close and retried, per
 * connection: bounds a server that closes every connection at once. */
#define MAX_RECONNECTS 100000
/* Distinct error messages kept (the rest are only counted). */
#define MAX_ERRORS 5

struct rec { double sent, first, event, end; int status, events; };

struct conn {
    int fd;
    int connecting;       /* a non-blocking connect in progress */
    double t_connect;
    int done_reqs;
    int reconnects;
    int head_done, status, chunked;
    long length, got;
    int events;
    int match;            /* bytes of "data: " matched so far */
    char tail[7];         /* last bytes of the body, for the last-chunk marker */
    int tail_len;
    size_t headlen;
    double t_sent, t_first, t_event;
    char head[HEAD_CAP];
};

static const char *unix_path;
static int port;
static char *request;
static size_t request_len;
static int nconns;
static double duration, timeout_s = 300, start_at;
static long per_conn;
static double t0, deadline;
static int ep, active, connect_parallel = DEFAULT_CONNECT_PARALLEL, connecting;

static struct rec *recs;
static size_t nrecs, caprecs;
static double *connect_times;
static size_t nconnect, capconnect;
static long failed, reconnects, error_count;
static char *err_msg[MAX_ERRORS];
static long err_n[MAX_ERRORS];
static int nerr;

static const char EVENT[] = "data: ";
static const char TERM[] = "\r\n0\r\n\r\n";

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void error(const char *msg) {
    error_count++;
    for (int i = 0; i < nerr; i++)
        if (strcmp(err_msg[i], msg) == 0) { err_n[i]++; return; }
    if (nerr < MAX_ERRORS) { err_msg[nerr] = strdup(msg); err_n[nerr++] = 1; }
}

static void *grow(void *p, size_t *cap, size_t need, size_t size) {
    if (need <= *cap) return p;
    *cap = *cap ? *cap * 2 : 1024;
    if (*cap < need) *cap = need;
    p = realloc(p, *cap * size);
    if (!p) { perror("realloc"); exit(1); }
    return p;
}

static void connect_failed(int err) {
    char msg[160];
    snprintf(msg, sizeof msg, "connect: %s", strerror(err));
    error(msg);
}

static void watch(struct conn *c, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, op, c->fd, &ev) < 0) { perror("epoll_ctl"); exit(1); }
}

static void connected(struct conn *c) {
    connect_times = grow(connect_times, &capconnect, nconnect + 1, sizeof *connect_times);
    connect_times[nconnect++] = now() - c->t_connect;
}

/* Starts a connection: 0 when it is connected (Unix) or connecting (TCP, c->connecting set),
 * -1 when it failed at once (the error is recorded). */
static int open_conn(struct conn *c) {
    c->t_connect = now();
    int fd, err;
    if (unix_path) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strncpy(a.sun_path, unix_path, sizeof a.sun_path - 1);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) goto fail;
        int fl = 1;      /* connected while blocking; non-blocking from here on */
        if (ioctl(fd, FIONBIO, &fl) < 0) goto fail;
        c->fd = fd;
        connected(c);
        watch(c, EPOLL_CTL_ADD, EPOLLIN);
        return 0;
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) goto fail;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) goto fail;
    c->fd = fd;
    c->connecting = 1;
    connecting++;
    watch(c, EPOLL_CTL_ADD, EPOLLOUT);
    return 0;
fail:
    err = errno;
    connect_failed(err);
    if (fd >= 0) close(fd);
    return -1;
}

/* Sends the request; `t` is its sent time (now(), or the time `more` decided on). */
static int send_request(struct conn *c, double t) {
    c->head_done = c->status = c->chunked = 0;
    c->length = -1;
    c->got = 0;
    c->events = c->match = c->tail_len = 0;
    c->headlen = 0;
    c->t_sent = t;
    c->t_first = c->t_event = -1;
    size_t off = 0;
    while (off < request_len) {   /* the request is far smaller than a socket buffer */
        ssize_t w = send(c->fd, request + off, request_len - off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { usleep(100); continue; }
            return -1;
        }
        off += (size_t)w;
    }
    return 0;
}

static void finish_conn(struct conn *c) {
    if (c->connecting) { c->connecting = 0; connecting--; }
    close(c->fd);
    c->fd = -1;
    active--;
}

static void fail_conn(struct conn *c, const char *msg) {
    error(msg);
    failed++;
    finish_conn(c);
}

static int more(struct conn *c, double t) {
    return (per_conn <= 0 || c->done_reqs < per_conn) && (deadline <= 0 || t < deadline);
}

/* Body bytes: count events, watch for the end. Returns 1 when the response is complete. */
static int body(struct conn *c, const char *p, size_t n, double t) {
    c->got += (long)n;
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == EVENT[c->match]) {
            if (++c->match == (int)sizeof EVENT - 1) {
                c->events++;
                c->match = 0;
                if (c->t_event < 0) c->t_event = t;
            }
        } else {
            c->match = ch == EVENT[0] ? 1 : 0;
        }
    }
    if (c->chunked) {
        /* the last 7 bytes seen: a chunk ends "<data>\r\n" and SSE data "\n\n", so there they
         * can only be the last-chunk marker */
        if (n >= 7) { memcpy(c->tail, p + n - 7, 7); c->tail_len = 7; }
        else {
            int keep = c->tail_len + (int)n > 7 ? 7 - (int)n : c->tail_len;
            memmove(c->tail, c->tail + c->tail_len - keep, (size_t)keep);
            memcpy(c->tail + keep, p, n);
            c->tail_len = keep + (int)n;
        }
        if (c->tail_len == 7 && memcmp(c->tail, TERM, 7) == 0) return 1;
        if (c->got == 5 && c->tail_len == 5 && memcmp(c->tail, TERM + 2, 5) == 0) return 1;
        return 0;
    }
    return c->got >= c->length;
}

static void complete(struct conn *c, double t) {
    recs = grow(recs, &caprecs, nrecs + 1, sizeof *recs);
    recs[nrecs++] = (struct rec){c->t_sent - t0, c->t_first - c->t_sent,
                                 c->t_event >= 0 ? c->t_event - c->t_sent : -1,
                                 t - c->t_sent, c->status, c->events};
    if (c->status != 200) {
        char msg[32];
        snprintf(msg, sizeof msg, "HTTP %d", c->status);
        error(msg);
    }
    c->done_reqs++;
    /* Decided and stamped at one time: a request recorded as sent is one started before the
     * deadline (t, the read's time, can be well before the decision on a loaded machine). */
    double s = now();
    if (more(c, s)) {
        if (send_request(c, s) < 0) fail_conn(c, "send failed");
    } else {
        finish_conn(c);
    }
}

static int parse_head(struct conn *c, size_t end) {
    c->head[end] = 0;
    char *sp = memchr(c->head, ' ', end);
    if (!sp || sscanf(sp + 1, "%d", &c->status) != 1) return -1;
    char *line = strstr(c->head, "\r\n");
    while (line && line < c->head + end) {
        line += 2;
        if (strncasecmp(line, "content-length:", 15) == 0) c->length = strtol(line + 15, NULL, 10);
        else if (strncasecmp(line, "transfer-encoding:", 18) == 0 &&
                 strcasestr(line, "chunked") && strcasestr(line, "chunked") < strstr(line, "\r\n"))
            c->chunked = 1;
        line = strstr(line, "\r\n");
    }
    return c->chunked || c->length >= 0 ? 0 : -1;
}

/* A TCP connect finished: send the request, or count the connection failed. */
static void on_connected(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    c->connecting = 0;
    connecting--;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err) {
        connect_failed(err);
        failed++;
        close(c->fd);
        c->fd = -1;
        active--;
        return;
    }
    connected(c);
    watch(c, EPOLL_CTL_MOD, EPOLLIN);
    if (send_request(c, now()) < 0) fail_conn(c, "send failed");
}

static void on_readable(struct conn *c) {
    static char buf[READ_CAP];
    ssize_t r = recv(c->fd, buf, sizeof buf, 0);
    double t = now();
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
    }
    if (r <= 0) {
        if (c->t_first < 0 && c->done_reqs > 0 && c->reconnects < MAX_RECONNECTS) {
            /* an idle keep-alive connection closed as the next request went out */
            close(c->fd);
            c->reconnects++;
            reconnects++;
            if (open_conn(c) < 0) { failed++; c->fd = -1; active--; return; }
            if (!c->connecting && send_request(c, now()) < 0) fail_conn(c, "send failed");
            return;
        }
        fail_conn(c, c->t_first >= 0 ? "connection lost mid-response"
                                     : "connection closed before a response");
        return;
    }
    if (c->t_first < 0) c->t_first = t;
    const char *p = buf;
    size_t n = (size_t)r;
    if (!c->head_done) {
        size_t take = n;
        if (c->headlen + take >= HEAD_CAP) take = HEAD_CAP - 1 - c->headlen;
        memcpy(c->head + c->headlen, p, take);
        size_t old = c->headlen;
        c->headlen += take;
        char *e = memmem(c->head, c->headlen, "\r\n\r\n", 4);
        if (!e) {
            if (c->headlen >= HEAD_CAP - 1) fail_conn(c, "response head too large");
            return;
        }
        size_t end = (size_t)(e - c->head);
        size_t used = end + 4 - old;       /* bytes of this read that belong to the head */
        if (parse_head(c, end) < 0) { fail_conn(c, "bad response head"); return; }
        c->head_done = 1;
        p += used;
        n -= used;
        if (n == 0 && !(c->length == 0 && !c->chunked)) return;
    }
    if (body(c, p, n, t)) complete(c, t);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)n + 1);
    if (!p || fread(p, 1, (size_t)n, f) != (size_t)n) { perror(path); exit(2); }
    fclose(f);
    *len = (size_t)n;
    return p;
}

static void json_str(const char *s) {
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20) printf("\\u%04x", *s);
        else putchar(*s);
    }
    putchar('"');
}

static void num(double v) { if (v < 0) printf("null"); else printf("%.6f", v); }

int main(int argc, char **argv) {
    const char *req_path = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--port")) port = atoi(v);
        else if (!strcmp(k, "--unix")) unix_path = v;
        else if (!strcmp(k, "--request")) req_path = v;
        else if (!strcmp(k, "--connections")) nconns = atoi(v);
        else if (!strcmp(k, "--duration")) duration = atof(v);
        else if (!strcmp(k, "--requests-per-conn")) per_conn = atol(v);
        else if (!strcmp(k, "--start-at")) start_at = atof(v);
        else if (!strcmp(k, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(k, "--connect-parallel")) connect_parallel = atoi(v);
        else { fprintf(stderr, "unknown argument %s\n", k); return 2; }
    }
    if (!req_path || (!port && !unix_path) || nconns <= 0 || nconns > MAX_CONNS ||
        (per_conn <= 0 && duration <= 0) || connect_parallel <= 0) {
        fprintf(stderr, "usage: sseload (--port P | --unix PATH) --request FILE --connections N "
                        "(--duration S | --requests-per-conn K) [--start-at EPOCH] [--timeout S] "
                        "[--connect-parallel M]\n");
        return 2;
    }
    request = read_file(req_path, &request_len);
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    double delay = start_at - (wall.tv_sec + wall.tv_nsec / 1e9);
    if (delay > 0) usleep((useconds_t)(delay * 1e6));
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    if (ep < 0 || !conns) { perror("setup"); return 1; }
    clock_gettime(CLOCK_REALTIME, &wall);
    double wall0 = wall.tv_sec + wall.tv_nsec / 1e9;
    t0 = now();
    if (duration > 0) deadline = t0 + duration;
    double hard = t0 + timeout_s;
    int next = 0;            /* the next connection to open */
    struct epoll_event evs[256];
    while (active > 0 || next < nconns) {
        while (next < nconns && connecting < connect_parallel) {
            struct conn *c = &conns[next++];
            if (open_conn(c) < 0) { failed++; c->fd = -1; continue; }
            active++;
            if (!c->connecting && send_request(c, now()) < 0) fail_conn(c, "send failed");
        }
        double left = hard - now();
        if (left <= 0) break;
        int n = epoll_wait(ep, evs, 256, (int)(left * 1000) + 1);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->fd < 0) continue;
            if (c->connecting) on_connected(c);
            else on_readable(c);
        }
    }
    if (active > 0 || next < nconns) {
        int left = active + (nconns - next);
        char msg[96];
        snprintf(msg, sizeof msg, "timeout: %d connection(s) unfinished after %.0f s", left,
                 timeout_s);
        error(msg);
        failed += left;
    }
    double wall_s = now() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"wall_start\":%.6f,\"wall\":%.6f,\"records\":[", wall0, wall_s);
    for (size_t i = 0; i < nrecs; i++) {
        struct rec *r = &recs[i];
        printf(i ? ",[" : "[");
        num(r->sent); putchar(','); num(r->first); putchar(','); num(r->event); putchar(',');
        num(r->end);
        printf(",%d,%d]", r->status, r->events);
    }
    printf("],\"connect_times\":[");
    for (size_t i = 0; i < nconnect; i++) printf(i ? ",%.6f" : "%.6f", connect_times[i]);
    printf("],\"failed\":%ld,\"reconnects\":%ld,\"errors\":{", failed, reconnects);
    for (int i = 0; i < nerr; i++) {
        if (i) putchar(',');
        json_str(err_msg[i]);
        printf(":%ld", err_n[i]);
    }
    printf("},\"error_count\":%ld,\"cpu_s\":%.6f,\"maxrss_kb\":%ld}", error_count,
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
               ru.ru_stime.tv_usec / 1e6,
           ru.ru_maxrss);
    return 0;
}
