/* weft-shim: the `weft` executable that containerd runs for every pod.
 *
 * It does no CNI work. It hands the invocation as it got it (the environment, the config
 * on stdin, the pod's netns as an open descriptor) to the warm weftd, and relays weftd's
 * answer byte for byte: stdout, stderr, exit status. The wire format is weftd's
 * (weftlib/cni/handoff.py): weftd greets with "WEFT" + protocol version; the request is
 * two big-endian u32 lengths, the NUL-separated environment and the config; the reply is
 * an i32 status, two u32 lengths, stdout and stderr.
 *
 * weftd's socket is the config's top-level "daemonSocket" (an absolute path, without
 * escapes), or DEFAULT_SOCKET when the key is absent. When weftd is not there to take the
 * request (no socket, refused, no greeting, another protocol version, or the request
 * could not be sent in full), this execs the Python plugin, `weft-py` beside this binary,
 * with the same environment and stdin: a node without weftd works as it always has.
 *
 * Never run the same ADD twice: once the whole request is sent, weftd may act on it, so a
 * missing reply (weftd died or stayed silent for WEFT_HANDOFF_TIMEOUT seconds) is not
 * retried here but answered with CNI error 11, "try again later". The runtime then tears
 * the sandbox down (DEL) and tries again, which is safe whatever weftd did.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL 1
#define DEFAULT_SOCKET "/run/weft/cni.sock"
#define LOCAL_PLUGIN "weft-py"
#define MAX_CONFIG (1 << 20)        /* the plugin reads one byte more, to refuse larger configs */
#define MAX_ENV (1 << 20)
#define MAX_REPLY (16 << 20)
#define GREET_MS 5000               /* connect, greeting and sending the request */
#define REPLY_SECONDS 60            /* weftd's work; WEFT_HANDOFF_TIMEOUT overrides */

extern char **environ;
static char config[MAX_CONFIG + 1];
static size_t config_len;
static char version[8] = "1.1.0";   /* the config's cniVersion, if supported: for our own error */

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

/* Waits until fd is ready for `events`; 0, or -1 with errno ETIMEDOUT. */
static int wait_fd(int fd, short events, long long deadline) {
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        long long left = deadline - now_ms();
        int n = left > 0 ? poll(&p, 1, (int)(left > INT_MAX ? INT_MAX : left)) : 0;
        if (n > 0) return 0;
        if (n == 0) { errno = ETIMEDOUT; return -1; }
        if (errno != EINTR) return -1;
    }
}

/* Reads exactly n bytes; -1 on error, timeout or end of stream (errno EPIPE). */
static int read_exact(int fd, void *buf, size_t n, long long deadline) {
    for (size_t got = 0; got < n;) {
        if (wait_fd(fd, POLLIN, deadline) < 0) return -1;
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r == 0) { errno = EPIPE; return -1; }
        if (r < 0 && errno != EINTR && errno != EAGAIN) return -1;
        if (r > 0) got += (size_t)r;
    }
    return 0;
}

static void write_all(int fd, const char *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        buf += w, n -= (size_t)w;
    }
}

/* CNI error JSON on stdout, exit 1. `details` is ours (no quotes or backslashes). */
static void fail(int code, const char *msg, const char *details, const char *why) {
    char out[512];
    int n = snprintf(out, sizeof out, "{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"%s\",\"details\":\"%s%s%s\"}\n",
                     version, code, msg, details, why ? ": " : "", why ? why : "");
    write_all(1, out, n > 0 && (size_t)n < sizeof out ? (size_t)n : 0);
    dprintf(2, "weft: %s: %s%s%s\n", msg, details, why ? ": " : "", why ? why : "");
    exit(1);
}

/* The Python plugin, with this process's environment and the stdin already read. */
static void run_local(char **argv, const char *self) {
    char path[PATH_MAX];
    const char *slash = strrchr(self, '/');
    int len = slash ? (int)(slash - self) : 1;
    if (snprintf(path, sizeof path, "%.*s/%s", len, slash ? self : ".", LOCAL_PLUGIN) >= (int)sizeof path)
        fail(999, "internal error", "path of the local plugin too long", NULL);
    int fd = memfd_create("weft-stdin", MFD_CLOEXEC);
    if (fd < 0 || (write_all(fd, config, config_len), lseek(fd, 0, SEEK_SET)) != 0 || dup2(fd, 0) < 0)
        fail(999, "internal error", "cannot pass stdin to the local plugin", strerror(errno));
    argv[0] = path;
    execv(path, argv);
    fail(999, "internal error", "cannot run " LOCAL_PLUGIN, strerror(errno));
}

/* JSON, just enough: the string values of two top-level keys. Nothing is validated here; the
 * plugin (in weftd or local) parses the config in full and reports what is wrong with it. */
static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && is_ws(*p)) p++;
    return p;
}

static const char *skip_string(const char *p, const char *end) {  /* p at the opening quote */
    for (p++; p < end; p++) {
        if (*p == '\\') p++;
        else if (*p == '"') return p + 1;
    }
    return NULL;
}

static const char *skip_value(const char *p, const char *end) {  /* iterative: no depth limit */
    int depth = 0;
    while (p < end) {
        char c = *p;
        if (c == '"') {
            if (!(p = skip_string(p, end))) return NULL;
        } else if (c == '{' || c == '[') {
            depth++, p++;
            continue;
        } else if (c == '}' || c == ']') {
            if (depth-- == 0) return p;  /* the end of the enclosing object */
            p++;
        } else if (depth == 0 && (c == ',' || is_ws(c))) {
            return p;
        } else {
            p++;
            continue;
        }
        if (depth == 0) return p;
    }
    return depth == 0 ? p : NULL;
}

/* The last top-level string value of each key: found[i] is 1 if copied into vals[i], -1 if the
 * key is there with some other value (or escapes, or too long), 0 if absent. -1 if not an object. */
static int scan_config(const char *const keys[2], char vals[2][108], int found[2]) {
    const char *end = config + config_len, *p = skip_ws(config, end);
    if (p >= end || *p++ != '{') return -1;
    for (p = skip_ws(p, end); p < end && *p != '}'; p = skip_ws(p, end)) {
        const char *key = p, *kend = *p == '"' ? skip_string(p, end) : NULL;
        if (!kend || (p = skip_ws(kend, end)) >= end || *p++ != ':') return -1;
        const char *val = skip_ws(p, end), *vend = skip_value(val, end);
        if (!vend) return -1;
        for (int i = 0; i < 2; i++) {
            size_t klen = strlen(keys[i]), n = (size_t)(vend - val);
            if ((size_t)(kend - key) != klen + 2 || memcmp(key + 1, keys[i], klen) != 0) continue;
            found[i] = *val == '"' && n >= 2 && n - 2 < 108 && !memchr(val, '\\', n) && !memchr(val, 0, n) ? 1 : -1;
            if (found[i] == 1) memcpy(vals[i], val + 1, n - 2), vals[i][n - 2] = 0;
        }
        if ((p = skip_ws(vend, end)) < end && *p == ',') p++;
    }
    return 0;
}

int main(int argc, char **argv) {
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) self[n] = 0;
    else if (!realpath(argv[0], self)) snprintf(self, sizeof self, "%s", argv[0]);
    /* A runtime passes no arguments: these are a person asking, and the plugin prints its usage. */
    if (argc > 1 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "--version")))
        run_local(argv, self);
    while (config_len < sizeof config && (n = read(0, config + config_len, sizeof config - config_len)) != 0) {
        if (n < 0 && errno != EINTR) break;
        if (n > 0) config_len += (size_t)n;
    }

    static const char *const keys[2] = {"daemonSocket", "cniVersion"};
    static const char *const supported[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
    char vals[2][108], *sock_path = vals[0];
    int found[2] = {0, 0};
    if (scan_config(keys, vals, found) < 0) run_local(argv, self);  /* the plugin says what is wrong */
    for (size_t i = 0; found[1] == 1 && i < sizeof supported / sizeof *supported; i++)
        if (strcmp(vals[1], supported[i]) == 0) strcpy(version, vals[1]);
    if (found[0] < 0 || (found[0] == 1 && sock_path[0] != '/')) run_local(argv, self);  /* unusable */
    if (found[0] == 0) strcpy(sock_path, DEFAULT_SOCKET);

    const char *command = getenv("CNI_COMMAND"), *netns = getenv("CNI_NETNS");
    int ns_fd = netns && *netns ? open(netns, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY) : -1;
    int needs_ns = command && (!strcmp(command, "ADD") || !strcmp(command, "CHECK"));
    if (ns_fd < 0 && needs_ns) run_local(argv, self);  /* which reports what is wrong with CNI_NETNS */

    /* The request: lengths, environment (entries with '=' only, as weftd expects), config. */
    size_t env_len = 0;
    for (char **e = environ; *e; e++) if (strchr(*e, '=')) env_len += strlen(*e) + 1;
    char *req = env_len <= MAX_ENV ? malloc(8 + env_len + config_len) : NULL;
    if (!req) run_local(argv, self);
    uint32_t lens[2] = {htonl((uint32_t)env_len), htonl((uint32_t)config_len)};
    memcpy(req, lens, 8);
    size_t off = 8;
    for (char **e = environ; *e; e++)
        if (strchr(*e, '=')) { size_t l = strlen(*e) + 1; memcpy(req + off, *e, l); off += l; }
    memcpy(req + off, config, config_len), off += config_len;

    /* Connect and read the greeting. Any failure so far: weftd has nothing, run locally. */
    long long deadline = now_ms() + GREET_MS;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct timeval tv = {GREET_MS / 1000, 0};
    memcpy(addr.sun_path, sock_path, strlen(sock_path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    char hello[8];
    uint32_t proto = 0;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0 ||
        connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || fcntl(fd, F_SETFL, O_NONBLOCK) < 0 ||
        read_exact(fd, hello, 8, deadline) < 0 || memcmp(hello, "WEFT", 4) != 0 ||
        (memcpy(&proto, hello + 4, 4), ntohl(proto)) != PROTOCOL) {
        if (fd >= 0) close(fd);
        run_local(argv, self);
    }

    /* Send; the netns travels with the first bytes. A request not sent in full is never acted on. */
    char cbuf[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec iov = {.iov_base = req, .iov_len = off};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (ns_fd >= 0) {
        msg.msg_control = cbuf, msg.msg_controllen = sizeof cbuf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS, c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &ns_fd, sizeof(int));
    }
    for (size_t sent = 0; sent < off;) {
        iov.iov_base = req + sent, iov.iov_len = off - sent;
        ssize_t w = wait_fd(fd, POLLOUT, deadline) < 0 ? -1 : sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (w < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (w < 0) { close(fd); run_local(argv, self); }
        sent += (size_t)w;
        msg.msg_control = NULL, msg.msg_controllen = 0;
    }
    shutdown(fd, SHUT_WR);

    /* weftd has the request: from here on, no reply means error 11, never a second run. */
    const char *t = getenv("WEFT_HANDOFF_TIMEOUT");
    long secs = t && atol(t) > 0 ? atol(t) : REPLY_SECONDS;
    deadline = now_ms() + secs * 1000LL;
    uint32_t head[3];
    char *out = NULL;
    if (read_exact(fd, head, sizeof head, deadline) == 0) {
        uint32_t out_len = ntohl(head[1]), err_len = ntohl(head[2]);
        if (out_len > MAX_REPLY || err_len > MAX_REPLY) errno = EPROTO;
        else if ((out = malloc((size_t)out_len + err_len + 1)) != NULL &&
                 read_exact(fd, out, (size_t)out_len + err_len, deadline) == 0) {
            write_all(1, out, out_len);
            write_all(2, out + out_len, err_len);
            return (int)ntohl(head[0]) & 0xff;
        }
    }
    fail(11, "try again later", "weftd took the request but did not answer",
         errno == ETIMEDOUT ? "timed out" : errno == EPIPE ? "connection closed" : strerror(errno));
    return 1;
}
