/*
 * popload: a low-overhead POP3 load client for loadtest.bench (like wrk or h2load for HTTP).
 *
 * The benchmark's Python client shares the machine's cores with the servers it measures,
 * so its own CPU and its scheduling of thousands of greenlets end up in the figures.
 * This client does the same work in one thread on one epoll set with non-blocking
 * sockets, and checks every answer just as strictly. loadtest/popload.py compiles it on
 * demand (cc -O2 -Wall -Werror), writes the manifest and reads the JSON lines it prints.
 *
 *   popload sessions --port P --manifest FILE [--clients 50] [--duration 10] [--max-sessions 0]
 *   popload held --port P --manifest FILE [--held N] [--login-concurrency 200]
 *                [--establish-timeout 300] [--rounds 3] [--inflight 2000] [--wait-timeout 900]
 *   common: [--host 127.0.0.1] [--timeout 30]  (loopback addresses only)
 *
 * sessions: --clients connections, connection i for the manifest's user i, each running
 *   login, STAT, LIST, UIDL, RETR of every message, QUIT (and waiting for the server to
 *   close) again and again for --duration seconds. STAT must give the expected count and
 *   size, LIST every message's size, UIDL exactly the expected set, every RETR body (after
 *   dot-unstuffing) the expected bytes. An -ERR carrying [IN-USE] (the previous session's
 *   lock not yet released) is retried after 1 ms, as bench.py does; any other failure is
 *   an error, and after the first error no new session starts. One JSON line at the end.
 * held: logs in --held users with at most --login-concurrency logins in flight, prints
 *   {"event":"held",...} and waits for a line on stdin (the caller samples server memory);
 *   then --rounds rounds of NOOP over every held session with at most --inflight in
 *   flight, each NOOP timed (CLOCK_MONOTONIC) from the return of its write to its +OK line
 *   complete, a {"event":"round",...} line and a wait for stdin after each round; then
 *   {"event":"done",...} with p50/p99 and the median round time.
 *
 * Manifest (written by loadtest/popload.py), one record a line, no spaces inside fields:
 *   blob PATH                      the expected message bytes (CRLF ends, not dot-stuffed)
 *   user NAME PASSWORD COUNT       then COUNT lines:
 *   msg UIDL OFFSET LENGTH         the message's bytes are PATH[OFFSET, OFFSET+LENGTH)
 *
 * Everything is bounded: the duration, a session count, per-answer socket timeouts, the
 * stdin waits. Exit status 0 when the run was carried out (its errors are in the JSON),
 * 2 with one line on stderr for bad arguments or a run that could not start, 3 when stdin
 * closed or stayed silent while held sessions waited.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE 8192          /* a status line longer than this is not POP3 */
#define MAX_BODY (64u << 20)   /* nor is a body past 64 MiB, here */
#define SCAN_INTERVAL 0.05     /* seconds between checks of timeouts and retry timers */
#define MAX_EVENTS 128        /* a small batch: an answer waits at most one batch for its read */

enum State { S_FREE, S_GREET, S_USER, S_PASS, S_STAT, S_LIST, S_UIDL, S_RETR, S_QUIT, S_CLOSING, S_RETRY,
             S_HELD, S_NOOP };
static const char *STATE_NAMES[] = {"closed", "greeting", "USER", "PASS", "STAT", "LIST", "UIDL", "RETR",
                                    "QUIT", "close after QUIT", "retry", "held", "NOOP"};

typedef struct { char *uidl; size_t off, len; } Msg;
typedef struct { char *name, *password; int count; size_t total; Msg *msgs; } User;

typedef struct {
    int fd, state, user, body, retr;
    char *buf;                  /* unread input is buf[start, len) */
    size_t start, len, cap, scan;
    double deadline, wake, sent_at;
    long *sizes;                /* LIST: message number -> octets */
    int *uid_of;                /* UIDL: message number -> index in the user's msgs */
    char out[640];
    size_t outlen, outoff;
} Conn;

static struct {
    const char *mode, *host, *manifest;
    int port, clients, held, login_concurrency, rounds, inflight;
    long max_sessions;
    double duration, timeout, establish_timeout, wait_timeout;
} opt = {NULL, "127.0.0.1", NULL, 0, 50, -1, 200, 3, 2000, 0, 10.0, 30.0, 300.0, 900.0};

static char *blob;
static size_t blob_len;
static User *users;
static int nusers;
static struct sockaddr_storage addr;
static socklen_t addr_len;
static int ep;
static Conn *conns;
static int nconns;
static size_t read_chunk = 65536;

/* counters */
static long sessions, started, errors, in_use_retries, failed_logins, active, inflight;
static int stop_new;
static char first_error[512];
static double next_scan, next_wake = INFINITY;
static double *latencies;
static size_t nlat, cap_lat;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("popload: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static double mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static double cpu_seconds(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) + (double)(r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1e-6;
}

static void *xalloc(size_t n) {
    void *p = calloc(1, n ? n : 1);
    if (!p) die("out of memory");
    return p;
}

static char *xstrdup(const char *s) {
    char *p = strdup(s);
    if (!p) die("out of memory");
    return p;
}

/* -- manifest -------------------------------------------------------------------- */

static void load_blob(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    blob = xalloc((size_t)size + 1);
    if (size > 0 && fread(blob, 1, (size_t)size, f) != (size_t)size) die("cannot read %s", path);
    blob_len = (size_t)size;
    fclose(f);
}

static void load_manifest(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die("cannot open the manifest %s: %s", path, strerror(errno));
    char line[4096];
    int lineno = 0, cap = 0, pending = 0;
    User *u = NULL;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *save = NULL, *kind = strtok_r(line, " \r\n", &save);
        char *a = strtok_r(NULL, " \r\n", &save), *b = strtok_r(NULL, " \r\n", &save);
        char *c = strtok_r(NULL, " \r\n", &save);
        if (!kind) continue;
        if (!strcmp(kind, "blob") && a) {
            load_blob(a);
        } else if (!strcmp(kind, "user") && c && pending == 0) {
            if (nusers == cap) {
                cap = cap ? cap * 2 : 1024;
                users = realloc(users, (size_t)cap * sizeof *users);
                if (!users) die("out of memory");
            }
            u = &users[nusers++];
            memset(u, 0, sizeof *u);
            u->name = xstrdup(a);
            u->password = xstrdup(b);
            u->count = pending = atoi(c);
            if (u->count < 0 || u->count > 1000000) die("%s:%d: bad message count", path, lineno);
            u->msgs = xalloc((size_t)u->count * sizeof *u->msgs);
        } else if (!strcmp(kind, "msg") && c && pending > 0) {
            Msg *m = &u->msgs[u->count - pending--];
            m->uidl = xstrdup(a);
            m->off = strtoull(b, NULL, 10);
            m->len = strtoull(c, NULL, 10);
            if (m->off + m->len > blob_len || m->off + m->len < m->off)
                die("%s:%d: message outside the blob (is the blob line first?)", path, lineno);
            u->total += m->len;
        } else {
            die("%s:%d: not a manifest line", path, lineno);
        }
    }
    fclose(f);
    if (pending) die("%s: the last user lacks %d msg lines", path, pending);
}

/* -- errors and JSON ------------------------------------------------------------------ */

static void json_string(const char *s) {
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') printf("\\%c", *p);
        else if (*p < 0x20 || *p >= 0x7f) printf("\\u%04x", *p);
        else putchar(*p);
    }
    putchar('"');
}

static void conn_close(Conn *c) {
    if (c->fd >= 0) close(c->fd);  /* close() also takes it out of the epoll set */
    c->fd = -1;
    c->start = c->len = c->scan = 0;
    c->body = 0;
    c->deadline = 0;
    c->outlen = c->outoff = 0;
}

static void after_failure(Conn *c, int was);

/* Record a failure of connection c (first message kept), drop the connection. */
static void fail(Conn *c, const char *fmt, ...) {
    if (!first_error[0]) {
        int n = snprintf(first_error, sizeof first_error, "%s: ", users[c->user].name);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(first_error + n, sizeof first_error - (size_t)n, fmt, ap);
        va_end(ap);
    }
    int was = c->state;
    conn_close(c);
    c->state = S_FREE;
    after_failure(c, was);
}

/* -- connections ------------------------------------------------------------------ */

static void set_events(Conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) fail(c, "epoll_ctl: %s", strerror(errno));
}

/* Connect (non-blocking) and wait for the greeting: a refused connect shows as EPOLLERR. */
static void conn_open(Conn *c, double now) {
    c->start = c->len = c->scan = 0;
    c->body = 0;
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        c->state = S_GREET;
        fail(c, "socket: %s", strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = S_GREET;
    c->deadline = now + opt.timeout;
    if (connect(c->fd, (struct sockaddr *)&addr, addr_len) < 0 && errno != EINPROGRESS) {
        fail(c, "connect: %s", strerror(errno));
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) fail(c, "epoll_ctl: %s", strerror(errno));
}

static void flush(Conn *c) {
    while (c->outoff < c->outlen) {
        ssize_t n = send(c->fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
        if (n > 0) {
            c->outoff += (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            set_events(c, EPOLLIN | EPOLLOUT);
            return;
        } else if (n < 0 && errno != EINTR) {
            fail(c, "%s: send: %s", STATE_NAMES[c->state], strerror(errno));
            return;
        }
    }
    c->sent_at = mono();  /* a NOOP's time starts when its bytes are written */
}

/* Send one command line and wait for its answer (state `next`) within the timeout. */
static void command(Conn *c, int next, double now, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(c->out, sizeof c->out - 2, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof c->out - 2) {
        fail(c, "command too long");
        return;
    }
    memcpy(c->out + n, "\r\n", 2);
    c->outlen = (size_t)n + 2;
    c->outoff = 0;
    c->state = next;
    c->deadline = now + opt.timeout;
    flush(c);
}

/* -- checks of the answers (sessions mode) ---------------------------------------- */

/* Is the dot-stuffed body b[0, n) the message want[0, wn)? Unstuffs as pop3_client.unstuff does. */
static int body_equals(const char *b, size_t n, const char *want, size_t wn) {
    size_t i = 0, w = 0;
    while (i < n) {
        if (b[i] == '.' && i + 1 < n && b[i + 1] == '.') i++;
        const char *nl = memchr(b + i, '\n', n - i);
        size_t end = nl ? (size_t)(nl - b) + 1 : n, seg = end - i;
        if (w + seg > wn || memcmp(b + i, want + w, seg) != 0) return 0;
        w += seg;
        i = end;
    }
    return w == wn;
}

/* The lines "a b" of a LIST or UIDL body; calls fn(c, number, b, blen) for each. 0 if all ok. */
static int each_pair(Conn *c, const char *body, size_t n, int (*fn)(Conn *, long, const char *, size_t)) {
    const char *p = body, *end = body + n;
    while (p < end) {
        const char *eol = memchr(p, '\r', (size_t)(end - p));
        if (!eol) eol = end;
        char *after;
        long number = strtol(p, &after, 10);
        if (after == p || after >= eol || *after != ' ') {
            fail(c, "%s: bad line %.40s", STATE_NAMES[c->state], p);
            return -1;
        }
        const char *second = after + 1, *stop = second;
        while (stop < eol && *stop != ' ') stop++;
        if (fn(c, number, second, (size_t)(stop - second))) return -1;
        p = eol + 2;
    }
    return 0;
}

static int list_entry(Conn *c, long number, const char *value, size_t len) {
    User *u = &users[c->user];
    if (number < 1 || number > u->count) {
        fail(c, "LIST names message %ld of %d", number, u->count);
        return -1;
    }
    c->sizes[number] = strtol(value, NULL, 10);
    (void)len;
    return 0;
}

static int uidl_entry(Conn *c, long number, const char *value, size_t len) {
    User *u = &users[c->user];
    if (number < 1 || number > u->count || c->uid_of[number] >= 0) {
        fail(c, "UIDL names message %ld twice or out of 1..%d", number, u->count);
        return -1;
    }
    for (int i = 0; i < u->count; i++) {
        if (strlen(u->msgs[i].uidl) == len && memcmp(u->msgs[i].uidl, value, len) == 0) {
            for (int k = 1; k <= u->count; k++)
                if (c->uid_of[k] == i) {
                    fail(c, "UIDL does not match the delivered files (uid twice)");
                    return -1;
                }
            c->uid_of[number] = i;
            return 0;
        }
    }
    fail(c, "UIDL does not match the delivered files (unknown uid %.*s)", (int)(len > 80 ? 80 : len), value);
    return -1;
}

static void next_retr_or_quit(Conn *c, double now) {
    if (c->retr < users[c->user].count) {
        c->retr++;
        command(c, S_RETR, now, "RETR %d", c->retr);
    } else {
        command(c, S_QUIT, now, "QUIT");
    }
}

/* A multi-line answer's body (dot-stuffed, ends in CRLF or empty) in the current state. 0: go on. */
static int on_body(Conn *c, const char *b, size_t n, double now) {
    User *u = &users[c->user];
    switch (c->state) {
    case S_LIST:
        for (int k = 0; k <= u->count; k++) c->sizes[k] = -1;
        if (each_pair(c, b, n, list_entry)) return -1;
        command(c, S_UIDL, now, "UIDL");
        return 0;
    case S_UIDL:
        for (int k = 0; k <= u->count; k++) c->uid_of[k] = -1;
        if (each_pair(c, b, n, uidl_entry)) return -1;
        for (int k = 1; k <= u->count; k++)
            if (c->uid_of[k] < 0) {
                fail(c, "UIDL does not match the delivered files (message %d missing)", k);
                return -1;
            }
        c->retr = 0;
        next_retr_or_quit(c, now);
        return 0;
    case S_RETR: {
        Msg *m = &u->msgs[c->uid_of[c->retr]];
        if (!body_equals(b, n, blob + m->off, m->len) || c->sizes[c->retr] != (long)m->len) {
            fail(c, "RETR %d differs from the delivered file", c->retr);
            return -1;
        }
        next_retr_or_quit(c, now);
        return 0;
    }
    default:
        fail(c, "body in state %s", STATE_NAMES[c->state]);
        return -1;
    }
}

static void after_login(Conn *c, double now);
static void noop_done(Conn *c, double now);

/* An +OK status line (line[0, n), no CRLF) in the current state. 0: go on reading. */
static int on_ok(Conn *c, const char *line, size_t n, double now) {
    User *u = &users[c->user];
    switch (c->state) {
    case S_GREET:
        command(c, S_USER, now, "USER %s", u->name);
        return 0;
    case S_USER:
        command(c, S_PASS, now, "PASS %s", u->password);
        return 0;
    case S_PASS:
        after_login(c, now);
        return 0;
    case S_STAT: {
        char tmp[64];
        long count = -1, size = -1;
        snprintf(tmp, sizeof tmp, "%.*s", (int)(n < 63 ? n : 63), line);
        if (sscanf(tmp, "+OK %ld %ld", &count, &size) != 2 || count != u->count || size != (long)u->total) {
            fail(c, "STAT %s, expected %d %zu", tmp, u->count, u->total);
            return -1;
        }
        command(c, S_LIST, now, "LIST");
        return 0;
    }
    case S_LIST:
    case S_UIDL:
    case S_RETR:
        c->body = 1;
        c->scan = 0;
        return 0;
    case S_QUIT:
        c->state = S_CLOSING;
        c->deadline = now + opt.timeout;
        return 0;
    case S_NOOP:
        noop_done(c, now);
        return 0;
    default:
        fail(c, "unexpected answer in state %s: %.60s", STATE_NAMES[c->state], line);
        return -1;
    }
}

static void retry_in_use(Conn *c, double now);

/* Parse what has arrived: status lines and bodies, one answer after the other. */
static void advance(Conn *c, double now) {
    while (c->fd >= 0 && c->start < c->len) {
        char *p = c->buf + c->start;
        size_t avail = c->len - c->start;
        if (c->state == S_CLOSING || c->state == S_HELD) {
            fail(c, "unexpected data in state %s: %.60s", STATE_NAMES[c->state], p);
            return;
        }
        if (c->body) {
            size_t used;
            if (avail >= 3 && memcmp(p, ".\r\n", 3) == 0) {
                c->body = 0;
                used = 3;
                if (on_body(c, p, 0, now) || c->fd < 0) return;
            } else {
                char *end = memmem(p + c->scan, avail - c->scan, "\r\n.\r\n", 5);
                if (!end) {
                    c->scan = avail >= 4 ? avail - 4 : 0;
                    if (avail > MAX_BODY) fail(c, "%s: body over %u octets", STATE_NAMES[c->state], MAX_BODY);
                    return;
                }
                c->body = 0;
                used = (size_t)(end - p) + 5;
                if (on_body(c, p, (size_t)(end - p) + 2, now) || c->fd < 0) return;
            }
            c->start += used;
            continue;
        }
        char *eol = memmem(p, avail, "\r\n", 2);
        if (!eol) {
            if (avail > MAX_LINE) fail(c, "%s: status line too long", STATE_NAMES[c->state]);
            return;
        }
        size_t n = (size_t)(eol - p);
        if (n >= 3 && memcmp(p, "+OK", 3) == 0) {
            if (on_ok(c, p, n, now)) return;
        } else if (n >= 4 && memcmp(p, "-ERR", 4) == 0) {
            if (memmem(p, n, "IN-USE", 6) && !strcmp(opt.mode, "sessions")) retry_in_use(c, now);
            else fail(c, "%s: %.*s", STATE_NAMES[c->state], (int)(n > 200 ? 200 : n), p);
            return;
        } else {
            fail(c, "%s: not a POP3 answer: %.*s", STATE_NAMES[c->state], (int)(n > 60 ? 60 : n), p);
            return;
        }
        if (c->fd < 0) return;
        c->start += n + 2;
    }
    if (c->fd >= 0 && c->start == c->len) c->start = c->len = 0;
}

static void session_done(Conn *c, double now);

static void on_readable(Conn *c, double now) {
    if (c->start == c->len) c->start = c->len = 0;
    if (c->cap - c->len < read_chunk) {
        if (c->start > 0) {
            memmove(c->buf, c->buf + c->start, c->len - c->start);
            c->len -= c->start;
            c->start = 0;
        }
        if (c->cap - c->len < read_chunk) {
            size_t cap = c->cap ? c->cap : read_chunk;
            while (cap - c->len < read_chunk) cap *= 2;
            char *buf = realloc(c->buf, cap);
            if (!buf) die("out of memory");
            c->buf = buf;
            c->cap = cap;
        }
    }
    ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (n > 0) {
        c->len += (size_t)n;
        advance(c, mono());
    } else if (n == 0) {
        if (c->state == S_CLOSING && c->start == c->len) session_done(c, now);
        else fail(c, "%s: connection closed by the server", STATE_NAMES[c->state]);
    } else if (errno != EAGAIN && errno != EINTR) {
        fail(c, "%s: %s", STATE_NAMES[c->state], strerror(errno));
    }
}

/* -- the loop ------------------------------------------------------------------------ */

static void on_timer(Conn *c, double now);

static void scan(double now) {
    next_scan = now + SCAN_INTERVAL;
    next_wake = INFINITY;
    for (int i = 0; i < nconns; i++) {
        Conn *c = &conns[i];
        if (c->state == S_RETRY) {
            if (c->wake <= now) on_timer(c, now);
            else if (c->wake < next_wake) next_wake = c->wake;
        } else if (c->fd >= 0 && c->deadline > 0 && now > c->deadline) {
            fail(c, "%s: no answer within %g s", STATE_NAMES[c->state], opt.timeout);
        }
    }
}

/* One epoll_wait (at most until `limit`), its events, and the timers that are due. */
static void pump(double limit) {
    static struct epoll_event events[MAX_EVENTS];
    double now = mono(), until = limit;
    if (next_scan < until) until = next_scan;
    if (next_wake < until) until = next_wake;
    int ms = until > now ? (int)ceil((until - now) * 1000) : 0;
    int n = epoll_wait(ep, events, MAX_EVENTS, ms);
    if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
    now = mono();
    for (int i = 0; i < n; i++) {
        Conn *c = events[i].data.ptr;
        if (c->fd < 0) continue;
        if ((events[i].events & EPOLLOUT) && c->outoff < c->outlen) {
            flush(c);
            if (c->fd >= 0 && c->outoff == c->outlen) set_events(c, EPOLLIN);
            if (c->fd < 0) continue;
        }
        if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c, now);
    }
    if (now >= next_scan || now >= next_wake) scan(now);
}

/* -- sessions mode ------------------------------------------------------------------ */

static void start_session(Conn *c, double now) {
    if (stop_new || (opt.max_sessions > 0 && started >= opt.max_sessions)) {
        c->state = S_FREE;
        active--;
        return;
    }
    started++;
    conn_open(c, now);
}

static void retry_in_use(Conn *c, double now) {
    in_use_retries++;
    conn_close(c);
    c->state = S_RETRY;
    c->wake = now + 0.001;
    if (c->wake < next_wake) next_wake = c->wake;
}

static void on_timer(Conn *c, double now) {
    if (stop_new) {
        c->state = S_FREE;
        active--;
    } else {
        conn_open(c, now);  /* the same session again: not a new start */
    }
}

static void session_done(Conn *c, double now) {
    conn_close(c);
    sessions++;
    start_session(c, now);
}

static void after_login(Conn *c, double now) {
    if (!strcmp(opt.mode, "sessions")) {
        command(c, S_STAT, now, "STAT");
    } else {
        c->state = S_HELD;
        c->deadline = 0;
        inflight--;
    }
}

static void after_failure(Conn *c, int was) {
    if (!strcmp(opt.mode, "sessions")) {
        errors++;
        stop_new = 1;  /* as bench.py: after the first error no new session starts */
        active--;
    } else if (was == S_HELD) {
        errors++;  /* a held session lost between rounds */
    } else if (was == S_NOOP) {
        errors++;
        inflight--;
    } else {
        failed_logins++;
        inflight--;
    }
}

static int run_sessions(void) {
    if (opt.clients < 1 || opt.clients > nusers) die("--clients must be 1..%d (the manifest's users)", nusers);
    nconns = opt.clients;
    conns = xalloc((size_t)nconns * sizeof *conns);
    double cpu0 = cpu_seconds(), t0 = mono(), end = t0 + opt.duration;
    double hard_end = end + opt.timeout + 5;
    next_scan = t0 + SCAN_INTERVAL;
    for (int i = 0; i < nconns; i++) {
        Conn *c = &conns[i];
        c->fd = -1;
        c->user = i;
        c->sizes = xalloc(((size_t)users[i].count + 1) * sizeof *c->sizes);
        c->uid_of = xalloc(((size_t)users[i].count + 1) * sizeof *c->uid_of);
    }
    active = nconns;
    for (int i = 0; i < nconns; i++) start_session(&conns[i], t0);
    while (active > 0) {
        double now = mono();
        if (now >= end) stop_new = 1;
        if (now >= hard_end) {
            for (int i = 0; i < nconns; i++)
                if (conns[i].state != S_FREE) fail(&conns[i], "%s: session not finished at the end",
                                                   STATE_NAMES[conns[i].state]);
            break;
        }
        pump(stop_new ? hard_end : end);
    }
    double elapsed = mono() - t0, cpu = cpu_seconds() - cpu0;
    printf("{\"mode\":\"sessions\",\"clients\":%d,\"sessions\":%ld,\"errors\":%ld,\"in_use_retries\":%ld,"
           "\"elapsed\":%.6f,\"sessions_per_s\":%.3f,\"client_cpu_s\":%.6f,\"client_cpu_ms_per_session\":%.4f,"
           "\"first_error\":",
           nconns, sessions, errors, in_use_retries, elapsed, sessions / elapsed, cpu,
           1000 * cpu / (sessions ? sessions : 1));
    json_string(first_error);
    printf("}\n");
    fflush(stdout);
    return 0;
}

/* -- held mode ------------------------------------------------------------------------ */

static void noop_done(Conn *c, double now) {
    if (nlat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 65536;
        latencies = realloc(latencies, cap_lat * sizeof *latencies);
        if (!latencies) die("out of memory");
    }
    latencies[nlat++] = now - c->sent_at;
    c->state = S_HELD;
    c->deadline = 0;
    inflight--;
}

/* Block until the caller writes a line on stdin (it samples server memory meanwhile). */
static void wait_stdin(void) {
    struct pollfd p = {.fd = 0, .events = POLLIN};
    double deadline = mono() + opt.wait_timeout;
    for (;;) {
        int ms = (int)ceil((deadline - mono()) * 1000);
        if (ms <= 0) {
            fprintf(stderr, "popload: no line on stdin within %g s\n", opt.wait_timeout);
            exit(3);
        }
        int r = poll(&p, 1, ms);
        if (r < 0 && errno == EINTR) continue;
        char ch;
        ssize_t n = r > 0 ? read(0, &ch, 1) : 0;
        if (r > 0 && n == 1 && ch == '\n') return;
        if (r > 0 && n <= 0) {
            fprintf(stderr, "popload: stdin closed while sessions were held\n");
            exit(3);
        }
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double fraction) {
    if (!nlat) return 0;
    size_t i = (size_t)(fraction * (double)nlat);
    return latencies[i < nlat ? i : nlat - 1];
}

static int run_held(void) {
    int n = opt.held < 0 ? nusers : opt.held;
    if (n < 1 || n > nusers) die("--held must be 1..%d (the manifest's users)", nusers);
    struct rlimit lim;
    getrlimit(RLIMIT_NOFILE, &lim);
    if (lim.rlim_cur < lim.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    if (lim.rlim_cur != RLIM_INFINITY && lim.rlim_cur < (rlim_t)n + 32)
        die("%d held sessions need %d descriptors, the limit is %llu (ulimit -Hn)", n, n + 32,
            (unsigned long long)lim.rlim_cur);
    read_chunk = 1024;
    nconns = n;
    conns = xalloc((size_t)n * sizeof *conns);
    for (int i = 0; i < n; i++) {
        conns[i].fd = -1;
        conns[i].user = i;
    }
    double cpu0 = cpu_seconds(), t0 = mono(), establish_end = t0 + opt.establish_timeout;
    next_scan = t0 + SCAN_INTERVAL;
    int next = 0;
    for (;;) {
        double now = mono();
        while (inflight < opt.login_concurrency && next < n && now < establish_end) {
            inflight++;
            conn_open(&conns[next++], now);
        }
        if (inflight == 0 && (next >= n || now >= establish_end)) break;
        pump(now + 1);
    }
    double established = mono() - t0, establish_cpu = cpu_seconds() - cpu0;
    int *held = xalloc((size_t)n * sizeof *held), nheld = 0;
    for (int i = 0; i < n; i++)
        if (conns[i].state == S_HELD) held[nheld++] = i;
    printf("{\"event\":\"held\",\"sessions\":%d,\"failed_logins\":%ld,\"establish_s\":%.6f,"
           "\"establish_cpu_s\":%.6f,\"first_error\":", nheld, failed_logins, established, establish_cpu);
    json_string(first_error);
    printf("}\n");
    fflush(stdout);
    wait_stdin();

    double *round_s = xalloc((size_t)(opt.rounds > 0 ? opt.rounds : 1) * sizeof *round_s), rounds_cpu = 0;
    for (int r = 0; r < opt.rounds; r++) {
        double c0 = cpu_seconds(), begin = mono();
        int i = 0;
        for (;;) {
            double now = mono();
            while (inflight < opt.inflight && i < nheld) {
                Conn *c = &conns[held[i++]];
                if (c->state != S_HELD) continue;  /* lost earlier: already counted */
                inflight++;
                command(c, S_NOOP, now, "NOOP");
            }
            if (inflight == 0 && i >= nheld) break;
            pump(now + 1);
        }
        round_s[r] = mono() - begin;
        rounds_cpu += cpu_seconds() - c0;
        printf("{\"event\":\"round\",\"round\":%d,\"round_s\":%.6f,\"errors\":%ld,\"first_error\":", r + 1,
               round_s[r], errors);
        json_string(first_error);
        printf("}\n");
        fflush(stdout);
        wait_stdin();
    }
    qsort(latencies, nlat, sizeof *latencies, cmp_double);
    qsort(round_s, (size_t)opt.rounds, sizeof *round_s, cmp_double);
    double median_round = 0;
    if (opt.rounds > 0)
        median_round = opt.rounds % 2 ? round_s[opt.rounds / 2]
                                      : (round_s[opt.rounds / 2 - 1] + round_s[opt.rounds / 2]) / 2;
    printf("{\"event\":\"done\",\"mode\":\"held\",\"sessions\":%d,\"failed_logins\":%ld,\"noops\":%zu,"
           "\"errors\":%ld,\"noop_p50_ms\":%.4f,\"noop_p99_ms\":%.4f,\"noop_max_ms\":%.4f,\"noop_round_s\":%.6f,"
           "\"establish_s\":%.6f,\"establish_cpu_s\":%.6f,\"rounds_cpu_s\":%.6f,\"first_error\":",
           nheld, failed_logins, nlat, errors, 1000 * percentile(0.50), 1000 * percentile(0.99),
           nlat ? 1000 * latencies[nlat - 1] : 0.0, median_round, established, establish_cpu, rounds_cpu);
    json_string(first_error);
    printf("}\n");
    fflush(stdout);
    for (int i = 0; i < n; i++) conn_close(&conns[i]);
    return 0;
}

/* -- command line ------------------------------------------------------------------ */

static double number_arg(const char *name, const char *value, double low, double high) {
    char *end;
    double v = strtod(value, &end);
    if (end == value || *end || !(v >= low && v <= high)) die("%s must be a number in %g..%g", name, low, high);
    return v;
}

static void parse_args(int argc, char **argv) {
    if (argc < 2 || (strcmp(argv[1], "sessions") && strcmp(argv[1], "held")))
        die("usage: popload sessions|held --port P --manifest FILE [options] (see loadtest/popload.c)");
    opt.mode = argv[1];
    for (int i = 2; i < argc; i += 2) {
        const char *name = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!value) die("%s needs a value", name);
        if (!strcmp(name, "--host")) opt.host = value;
        else if (!strcmp(name, "--port")) opt.port = (int)number_arg(name, value, 1, 65535);
        else if (!strcmp(name, "--manifest")) opt.manifest = value;
        else if (!strcmp(name, "--clients")) opt.clients = (int)number_arg(name, value, 1, 100000);
        else if (!strcmp(name, "--duration")) opt.duration = number_arg(name, value, 0.001, 86400);
        else if (!strcmp(name, "--max-sessions")) opt.max_sessions = (long)number_arg(name, value, 0, 1e12);
        else if (!strcmp(name, "--timeout")) opt.timeout = number_arg(name, value, 0.001, 3600);
        else if (!strcmp(name, "--held")) opt.held = (int)number_arg(name, value, 1, 1000000);
        else if (!strcmp(name, "--login-concurrency"))
            opt.login_concurrency = (int)number_arg(name, value, 1, 1000000);
        else if (!strcmp(name, "--establish-timeout")) opt.establish_timeout = number_arg(name, value, 0.001, 86400);
        else if (!strcmp(name, "--rounds")) opt.rounds = (int)number_arg(name, value, 0, 1000);
        else if (!strcmp(name, "--inflight")) opt.inflight = (int)number_arg(name, value, 1, 1000000);
        else if (!strcmp(name, "--wait-timeout")) opt.wait_timeout = number_arg(name, value, 0.001, 86400);
        else die("unknown option %s", name);
    }
    if (!opt.port || !opt.manifest) die("--port and --manifest are required");
    struct sockaddr_in *v4 = (struct sockaddr_in *)&addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&addr;
    if (inet_pton(AF_INET, opt.host, &v4->sin_addr) == 1) {
        if ((ntohl(v4->sin_addr.s_addr) >> 24) != 127) die("--host must be a loopback address");
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)opt.port);
        addr_len = sizeof *v4;
    } else if (inet_pton(AF_INET6, opt.host, &v6->sin6_addr) == 1) {
        if (!IN6_IS_ADDR_LOOPBACK(&v6->sin6_addr)) die("--host must be a loopback address");
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)opt.port);
        addr_len = sizeof *v6;
    } else {
        die("--host must be a numeric loopback address, not %s", opt.host);
    }
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    load_manifest(opt.manifest);
    if (nusers == 0) die("%s names no user", opt.manifest);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1: %s", strerror(errno));
    return !strcmp(opt.mode, "sessions") ? run_sessions() : run_held();
}
