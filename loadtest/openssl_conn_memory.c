/*
 * What one idle server-side TLS connection allocates inside OpenSSL, by allocation site
 * (issue 10: memory per held TLS session). Configured as Python's ssl module and
 * geventpop3.net.tls.build_context configure a server context (options, cipher string,
 * SSL_MODE_RELEASE_BUFFERS | SSL_MODE_AUTO_RETRY, TLS 1.2 or newer), N connections
 * over BIO pairs each do a full handshake with an in-process client, one line each way
 * and a last read that finds nothing (as a session's before parking); the client is
 * freed, the server side kept. Counted through CRYPTO_set_mem_functions: live bytes
 * asked and heap bytes (malloc_usable_size + the 8-byte chunk header) of the server
 * side, for connections 2..N (the first also fills OpenSSL's one-time caches). The
 * BIO pair's two 17 KiB buffers (bss_bio.c) are this harness's: a real connection has
 * a socket BIO (bio_lib.c, 144 bytes).
 *
 *   gcc -O1 -o /tmp/openssl_conn_memory loadtest/openssl_conn_memory.c -lssl -lcrypto
 *   /tmp/openssl_conn_memory cert.pem key.pem ca.pem [N [SESS_CACHE_MODE [MAX_VERSION]]]
 */
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <malloc.h>

#define MAXA 2000000
typedef struct { void *p; size_t n; const char *file; int line; int side; int phase; } A;
static A tab[MAXA]; static int ntab;
static int side = 0, phase = 0;
static void add(void *p, size_t n, const char *f, int l) { if (ntab < MAXA) tab[ntab++] = (A){p, n, f, l, side, phase}; }
static void del(void *p) { for (int i = ntab - 1; i >= 0; i--) if (tab[i].p == p) { tab[i] = tab[--ntab]; return; } }
static void *m(size_t n, const char *f, int l) { void *p = malloc(n); if (p) add(p, n, f, l); return p; }
static void *r(void *o, size_t n, const char *f, int l) { if (o) del(o); void *p = realloc(o, n); if (p) add(p, n, f, l); return p; }
static void fr(void *p, const char *f, int l) { if (p) del(p); free(p); }

static void report(const char *title, int want_side, int want_phase_min) {
    // aggregate by file:line
    typedef struct { const char *f; int l; size_t bytes, heap; int count; } G;
    static G g[4096]; int ng = 0; size_t tot = 0, heap = 0; int cnt = 0;
    for (int i = 0; i < ntab; i++) {
        A *a = &tab[i];
        if (a->side != want_side || a->phase < want_phase_min) continue;
        size_t h = malloc_usable_size(a->p) + 8;
        tot += a->n; heap += h; cnt++;
        int j; for (j = 0; j < ng; j++) if (g[j].f == a->file && g[j].l == a->line) break;
        if (j == ng) { g[ng++] = (G){a->file, a->line, 0, 0, 0}; }
        g[j].bytes += a->n; g[j].heap += h; g[j].count++;
    }
    printf("== %s: %d allocations, %zu bytes asked, %zu heap bytes\n", title, cnt, tot, heap);
    for (int k = 0; k < ng; k++) for (int j = k + 1; j < ng; j++) if (g[j].heap > g[k].heap) { G t = g[k]; g[k] = g[j]; g[j] = t; }
    for (int k = 0; k < ng && k < 45; k++) printf("%7zu %7zu %3d %s:%d\n", g[k].heap, g[k].bytes, g[k].count, g[k].f, g[k].l);
}

int main(int argc, char **argv) {
    const char *cert = argv[1], *key = argv[2], *ca = argv[3];
    int nconn = argc > 4 ? atoi(argv[4]) : 1;
    int cachemode = argc > 5 ? atoi(argv[5]) : -1;
    int maxver = argc > 6 ? atoi(argv[6]) : 0;
    if (!CRYPTO_set_mem_functions(m, r, fr)) { fprintf(stderr, "mem functions\n"); return 1; }
    OPENSSL_init_ssl(0, NULL);
    side = 1; phase = 0;
    SSL_CTX *sctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX_set_options(sctx, 0xc2520050UL);
    SSL_CTX_set_mode(sctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_AUTO_RETRY);
    SSL_CTX_set_min_proto_version(sctx, TLS1_2_VERSION);
    if (maxver) SSL_CTX_set_max_proto_version(sctx, maxver);
    SSL_CTX_set_cipher_list(sctx, "@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM");
    if (cachemode >= 0) SSL_CTX_set_session_cache_mode(sctx, cachemode);
    if (SSL_CTX_use_certificate_chain_file(sctx, cert) != 1 || SSL_CTX_use_PrivateKey_file(sctx, key, SSL_FILETYPE_PEM) != 1) { ERR_print_errors_fp(stderr); return 1; }
    side = 2;
    SSL_CTX *cctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_load_verify_locations(cctx, ca, NULL);
    SSL_CTX_set_verify(cctx, SSL_VERIFY_PEER, NULL);
    for (int c = 0; c < nconn; c++) {
        side = 1; phase = c == 0 ? 1 : 3;
        SSL *s = SSL_new(sctx);
        BIO *sb, *cb; BIO_new_bio_pair(&sb, 0, &cb, 0);
        SSL_set_bio(s, sb, sb);
        SSL_set_accept_state(s);
        if (c == 0) report("server after SSL_new + bio pair", 1, 1);
        side = 2;
        SSL *cl = SSL_new(cctx); SSL_set_bio(cl, cb, cb); SSL_set_connect_state(cl);
        SSL_set1_host(cl, "localhost");
        for (int i = 0; i < 50; i++) {
            side = 2; int rc = SSL_do_handshake(cl);
            side = 1; int rs = SSL_do_handshake(s);
            if (rc == 1 && rs == 1) break;
        }
        side = 1; SSL_write(s, "+OK hello\r\n", 11);
        side = 2; char buf[100]; SSL_read(cl, buf, sizeof buf); SSL_write(cl, "NOOP\r\n", 6);
        side = 1; SSL_read(s, buf, sizeof buf); SSL_write(s, "+OK\r\n", 5);
        side = 2; SSL_read(cl, buf, sizeof buf);
        side = 1; // a second read that finds nothing (as the server's read before parking)
        int n = SSL_read(s, buf, sizeof buf); (void)n; ERR_clear_error();
        /* the server side `s` is kept (never freed): an idle connection */
        side = 2; SSL_free(cl);
        if (c == 0) {
            printf("version %s cipher %s\n", SSL_get_version(s), SSL_get_cipher(s));
            report("server after handshake and exchange (all server-side live allocations since SSL_new)", 1, 1);
        }
    }
    side = 1;
    printf("cache entries: %ld\n", SSL_CTX_sess_number(sctx));
    report("server, connections 2..N (divide by N-1)", 1, 3);
    return 0;
}
