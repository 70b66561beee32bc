/* NBD writer through libnbd's C API (nbd://, nbds://, nbd+unix://, nbds+unix://).
 *
 * Each lane is one NBD connection driven by one pipeline thread: requests go
 * out with nbd_aio_pwrite / nbd_aio_zero and complete inside nbd_poll. The
 * libnbd completion callback only records the result (no libnbd call from a
 * callback); poll() then hands results to the pipeline, or retries a failed
 * request, at most `retries` times, before failing with an error naming the
 * offset. Two kinds of failure stay apart, in the retry and in the error:
 *
 * - the server answered with an error (EIO, ENOSPC, ...): the connection is
 *   fine, so the request is resubmitted on the same connection after a
 *   backoff; when the attempts are used up it is a TARGET error;
 * - the connection is gone (ENOTCONN; ESHUTDOWN from a server going away):
 *   reconnect and resubmit; a connection that cannot be made, or requests
 *   that keep failing this way, are a TRANSPORT error.
 *
 * A connection is never dropped while the server still owes replies: a live
 * connection is drained (bounded) and shut down cleanly first. Besides being
 * polite, this matters: nbdkit 1.32 aborts (connections.c raw_send_socket:
 * assertion `sock >= 0') when a client closes its socket while several worker
 * threads still send replies, which turned an EIO test into "connection
 * refused" on the reconnect.
 *
 * Early writeback (flush_every): a server that writes into its page cache
 * (nbdkit file, qemu-nbd with a cache) otherwise keeps every written byte
 * dirty until our final flush, which then waits for all of it at once (0.6 s
 * of a 1.5 s restore of 2 GiB measured, docs/core.md). So after every
 * flush_every bytes of acknowledged writes, counted over all lanes (so the
 * rate does not change with the number of connections), the lane whose write
 * crossed the mark sends one NBD_CMD_FLUSH without waiting for it (at most
 * one in flight per lane): the server's disk
 * writes back while we keep decompressing. Such a flush is a hint, not a
 * promise: its result is ignored, durability still comes from the final
 * flush (and a checkpoint's), which fails loudly.
 *
 * Bounded waits (timeout_ms, default 30 s): a server that stops answering
 * (SIGSTOP, a hung host, a dead link without RST) must not hang a restore.
 * Connecting (TCP + handshake + TLS) runs through nbd_aio_connect_uri and
 * nbd_poll against that deadline; every request carries its own deadline, and
 * one passing counts as a lost connection (ETIMEDOUT: reconnect, retry, then a
 * TRANSPORT error saying how long nothing came); a flush waits the same way.
 * A connection that timed out is closed without waiting for what it owes.
 *
 * Request size (max_write, URI request-size=KiB): a block larger than
 * max_write goes out as several NBD writes, and the pipeline's completion runs
 * once, after the last of them, with the first error. For servers with a
 * smaller preferred or maximum request than the backup's block size, and for
 * tuning (nbdcopy sends 256 KiB; docs/benchmarks.md, "Request size").
 * cancel() (the pipeline stops: Ctrl-C or another lane's error) leaves a
 * grace of CANCEL_GRACE_MS for answers still owed, then fails what is left,
 * with no retry or reconnect. */
#define _GNU_SOURCE
#include <errno.h>
#include <libnbd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "writer.h"

enum { R_INFLIGHT = 1, R_OK = 2, R_FAILED = 3, R_RESUBMIT = 4 };
enum { DRAIN_MS = 5000 }; /* how long a closing connection may take to answer what it owes */
enum { DEFAULT_TIMEOUT_MS = 30000, CANCEL_GRACE_MS = 1000 };

struct nbd_writer {
    char *uri, *psk_file, *tls_username, *cert_dir;
    int tls_verify_peer;
    uint32_t retries, retry_delay_ms;
    uint64_t size;
    uint64_t flush_every;   /* bytes written between early-writeback flushes, 0 = never */
    uint64_t unflushed;     /* bytes acknowledged on all lanes since the last one (atomic) */
    uint32_t max_write;     /* split writes larger than this (0 = never) */
    int can_zero, can_fast_zero, can_trim, can_flush, can_multi_conn;
    uint32_t timeout_ms;    /* deadline of one request / flush / connection */
    int (*interrupted)(void);   /* only while opening (the caller's thread) */
    uint64_t cancel_ns;     /* set once by cancel(): waits end CANCEL_GRACE_MS after it */
};

struct nreq {
    struct nreq *next;
    struct nbd_lane *L;
    const void *buf;
    uint64_t offset;
    uint32_t count;
    uint32_t flags;
    int zero;
    int state;
    int err;
    uint32_t attempts;
    uint64_t deadline_ns;     /* the server must have answered by then */
    struct vmr_completion cb;
};

struct nbd_lane {
    struct nbd_writer *w;
    struct nbd_handle *h;
    int index;
    struct nreq *active;      /* submitted and not yet reported to the pipeline */
    int nactive;
    int bg_flush;             /* an early-writeback flush is in flight */
    int stalled;              /* the server let a deadline pass: close without draining */
    int flush_done, flush_err;  /* the waited flush of nw_flush (lane-owned: outlives a timeout) */
};

static uint64_t mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int cancelled(struct nbd_writer *w)
{
    return __atomic_load_n(&w->cancel_ns, __ATOMIC_ACQUIRE) != 0;
}

/* When a wait that started now must end: its timeout, or the cancel grace. */
static uint64_t wait_end(struct nbd_writer *w, uint64_t deadline_ns)
{
    uint64_t c = __atomic_load_n(&w->cancel_ns, __ATOMIC_ACQUIRE);
    if (c && c + CANCEL_GRACE_MS * 1000000ull < deadline_ns)
        return c + CANCEL_GRACE_MS * 1000000ull;
    return deadline_ns;
}

/* Milliseconds to poll before `end` (at most cap); 0 when it has passed. */
static int ms_left(uint64_t end, int cap)
{
    uint64_t now = mono_ns();
    if (now >= end)
        return 0;
    uint64_t ms = (end - now + 999999) / 1000000;
    return ms < (uint64_t)cap ? (int)ms : cap;
}

static void nbd_err(struct vmr_error *err, int code, uint64_t off, const char *what,
                    const char *uri)
{
    int e = nbd_get_errno();
    const char *m = nbd_get_error();
    vmr_error_set(err, code, e, off, "%s: %s: %s", uri, what, m ? m : strerror(e ? e : EIO));
}

/* alloc: also ask for the base:allocation context (block status, read side) */
static struct nbd_handle *connect_ctx(struct nbd_writer *w, int alloc, struct vmr_error *err)
{
    struct nbd_handle *h = nbd_create();
    if (h == NULL) {
        nbd_err(err, VMR_E_TRANSPORT, UINT64_MAX, "nbd_create", w->uri);
        return NULL;
    }
    int bad = nbd_set_uri_allow_local_file(h, true) == -1 ||
              (alloc && nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1) ||
              (w->psk_file && nbd_set_tls_psk_file(h, w->psk_file) == -1) ||
              (w->tls_username && nbd_set_tls_username(h, w->tls_username) == -1) ||
              (w->cert_dir && nbd_set_tls_certificates(h, w->cert_dir) == -1) ||
              (w->tls_verify_peer >= 0 && nbd_set_tls_verify_peer(h, w->tls_verify_peer) == -1);
    if (bad || nbd_aio_connect_uri(h, w->uri) == -1) {
        nbd_err(err, VMR_E_TRANSPORT, UINT64_MAX, "cannot connect", w->uri);
        nbd_close(h);
        return NULL;
    }
    /* TCP/unix connect, handshake and TLS, each step against one deadline */
    uint64_t end = mono_ns() + (uint64_t)w->timeout_ms * 1000000ull;
    while (nbd_aio_is_connecting(h)) {
        int ms = ms_left(wait_end(w, end), 200);
        if (ms == 0 || cancelled(w) || (w->interrupted && w->interrupted())) {
            if (ms == 0 && !cancelled(w))
                vmr_error_set(err, VMR_E_TRANSPORT, ETIMEDOUT, UINT64_MAX,
                              "%s: cannot connect: the server did not answer in %u s", w->uri,
                              (w->timeout_ms + 999) / 1000);
            else
                vmr_error_set(err, VMR_E_INTERRUPTED, EINTR, UINT64_MAX,
                              "%s: connecting: interrupted", w->uri);
            nbd_close(h);
            return NULL;
        }
        if (nbd_poll(h, ms) == -1)
            break;
    }
    if (!nbd_aio_is_ready(h)) {
        nbd_err(err, VMR_E_TRANSPORT, UINT64_MAX, "cannot connect", w->uri);
        nbd_close(h);
        return NULL;
    }
    return h;
}

static struct nbd_handle *connect_one(struct nbd_writer *w, struct vmr_error *err)
{
    return connect_ctx(w, 0, err);
}

static void sleep_ms(uint32_t ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static int on_complete(void *user_data, int *error)
{
    struct nreq *r = user_data;
    if (r->state == R_INFLIGHT) {
        r->err = *error;
        r->state = *error ? R_FAILED : R_OK;
    }
    return 1; /* retire the command */
}

static int on_bg_flush(void *user_data, int *error)
{
    struct nbd_lane *L = user_data;
    (void)error; /* a hint only: the final flush reports what matters */
    L->bg_flush = 0;
    return 1;
}

/* Count an acknowledged write; start an early-writeback flush every flush_every
 * bytes written on all lanes together. Lanes run on their own threads: the
 * lane that resets the shared count (compare-and-swap) sends the flush. */
static void wrote(struct nbd_lane *L, uint32_t count)
{
    struct nbd_writer *w = L->w;
    if (w->flush_every == 0 || !w->can_flush)
        return;
    uint64_t total = __atomic_add_fetch(&w->unflushed, count, __ATOMIC_RELAXED);
    if (total < w->flush_every || L->bg_flush || L->h == NULL ||
        (!nbd_aio_is_ready(L->h) && !nbd_aio_is_processing(L->h)))
        return;
    if (!__atomic_compare_exchange_n(&w->unflushed, &total, 0, 0, __ATOMIC_RELAXED,
                                     __ATOMIC_RELAXED))
        return; /* another lane added (or claimed) meanwhile: a later write decides */
    nbd_completion_callback cb = {.callback = on_bg_flush, .user_data = L, .free = NULL};
    if (nbd_aio_flush(L->h, cb, 0) != -1)
        L->bg_flush = 1;
}

static void submit(struct nbd_lane *L, struct nreq *r)
{
    struct nbd_writer *w = L->w;
    nbd_completion_callback cb = {.callback = on_complete, .user_data = r, .free = NULL};
    uint32_t f = (r->flags & VMR_F_FUA) && w->can_flush ? LIBNBD_CMD_FLAG_FUA : 0;
    int64_t c;
    r->state = R_INFLIGHT;
    r->deadline_ns = mono_ns() + (uint64_t)w->timeout_ms * 1000000ull;
    if (L->h == NULL) {
        r->state = R_FAILED;
        r->err = ENOTCONN;
        return;
    }
    if (r->zero) {
        if ((r->flags & VMR_F_FAST_ZERO) && w->can_fast_zero)
            f |= LIBNBD_CMD_FLAG_FAST_ZERO;
        if (!(r->flags & VMR_F_MAY_TRIM) || !w->can_trim)
            f |= LIBNBD_CMD_FLAG_NO_HOLE;
        c = nbd_aio_zero(L->h, r->count, r->offset, cb, f);
    } else {
        c = nbd_aio_pwrite(L->h, r->buf, r->count, r->offset, cb, f);
    }
    if (c == -1 && r->state == R_INFLIGHT) {
        r->state = R_FAILED;
        r->err = nbd_aio_is_dead(L->h) || nbd_aio_is_closed(L->h) ? ENOTCONN
                 : nbd_get_errno() ? nbd_get_errno() : EIO;
    }
}

/* The connection is gone (or going): reconnecting may help, and giving up is a
 * transport error. Anything else came from a server that answered. */
static int connection_lost(int e)
{
    return e == ENOTCONN || e == ESHUTDOWN || e == ETIMEDOUT;
}

/* Let the server answer what it still owes on a live connection (bounded), so
 * that a close never races its reply threads. Completion callbacks run here and
 * only record results. A cancel that comes meanwhile shortens the wait to its
 * grace (wait_end), so Ctrl-C is never held up by a long drain. */
static void drain(struct nbd_writer *w, struct nbd_handle *h, int timeout_ms)
{
    uint64_t end = mono_ns() + (uint64_t)timeout_ms * 1000000ull;
    int ms;
    while (!nbd_aio_is_dead(h) && !nbd_aio_is_closed(h) && nbd_aio_in_flight(h) > 0 &&
           (ms = ms_left(wait_end(w, end), 100)) > 0)
        if (nbd_poll(h, ms) == -1)
            break;
}

/* Drain, then disconnect cleanly when the connection is still usable; close.
 * Every wait is bounded by timeout_ms and by a cancel's grace (nbd_shutdown
 * would wait without one). */
static int close_handle(struct nbd_writer *w, struct nbd_handle *h, int timeout_ms)
{
    int rc = 0;
    drain(w, h, timeout_ms);
    if (nbd_aio_is_ready(h)) {
        if (nbd_aio_disconnect(h, 0) == -1) {
            rc = -1;
        } else {
            uint64_t end = mono_ns() + (uint64_t)timeout_ms * 1000000ull;
            int ms;
            while (!nbd_aio_is_closed(h) && !nbd_aio_is_dead(h) &&
                   (ms = ms_left(wait_end(w, end), 100)) > 0)
                if (nbd_poll(h, ms) == -1)
                    break;
        }
    }
    nbd_close(h);
    return rc;
}

/* How long a closing lane waits for what its server owes. */
static int drain_ms(struct nbd_lane *L)
{
    if (L->stalled)
        return 0;
    return cancelled(L->w) ? CANCEL_GRACE_MS : DRAIN_MS;
}

/* Replace the lane's connection: requests still in flight are resubmitted. */
static int reconnect(struct nbd_lane *L, struct vmr_error *err)
{
    struct nbd_writer *w = L->w;
    if (L->h)
        drain(w, L->h, drain_ms(L)); /* answered requests keep their result */
    for (struct nreq *r = L->active; r; r = r->next)
        if (r->state == R_INFLIGHT)
            r->state = R_RESUBMIT;
    if (L->h)
        close_handle(w, L->h, 0);
    L->h = NULL;
    L->bg_flush = 0;
    L->stalled = 0;
    for (uint32_t attempt = 0; attempt < (w->retries ? w->retries : 1); attempt++) {
        if (cancelled(w))
            break;
        sleep_ms(w->retry_delay_ms * (attempt + 1));
        struct vmr_error e = {0};
        e.plan_index = -1;
        L->h = connect_one(w, &e);
        if (L->h != NULL)
            return 0;
        if (attempt + 1 == (w->retries ? w->retries : 1))
            *err = e;
    }
    return -1;
}

static void report(struct nbd_lane *L, struct nreq *r, const struct vmr_error *e)
{
    struct vmr_completion cb = r->cb;
    free(r);
    L->nactive--;
    cb.fn(cb.data, e);
}

static void fail_all(struct nbd_lane *L, const struct vmr_error *why)
{
    while (L->active) {
        struct nreq *r = L->active;
        L->active = r->next;
        struct vmr_error e = *why;
        e.offset = r->offset;
        snprintf(e.msg, sizeof e.msg, "%s %u bytes at disk offset %llu failed: %.*s",
                 r->zero ? "NBD zero of" : "NBD write of", r->count,
                 (unsigned long long)r->offset, 400, why->msg);
        report(L, r, &e);
    }
}

static int nw_poll(void *lane, int timeout_ms, struct vmr_error *err)
{
    struct nbd_lane *L = lane;
    struct nbd_writer *w = L->w;
    if (L->nactive == 0)
        return 0;
    int waiting = 0;
    for (struct nreq *r = L->active; r; r = r->next)
        if (r->state == R_INFLIGHT)
            waiting = 1;
    int broken = L->h == NULL;
    if (waiting && !broken) {
        int rc = nbd_poll(L->h, timeout_ms);
        if (rc == -1 || nbd_aio_is_dead(L->h) || nbd_aio_is_closed(L->h))
            broken = 1;
    }
    int why = ENOTCONN;
    if (!broken) {
        /* a request whose deadline passed: the server stopped answering */
        uint64_t now = mono_ns();
        for (struct nreq *r = L->active; r; r = r->next)
            if (r->state == R_INFLIGHT && now >= wait_end(w, r->deadline_ns))
                broken = 1;
        if (broken) {
            why = ETIMEDOUT;
            L->stalled = 1;
        }
    }
    if (broken) {
        for (struct nreq *r = L->active; r; r = r->next)
            if (r->state == R_INFLIGHT) {
                r->state = R_FAILED;
                r->err = why;
            }
    }
    /* hand back finished requests; collect failures */
    int retry = 0, lost = 0;
    uint32_t backoff = 0;
    struct nreq **pp = &L->active;
    while (*pp) {
        struct nreq *r = *pp;
        if (r->state == R_OK) {
            *pp = r->next;
            if (!r->zero)
                wrote(L, r->count);
            report(L, r, NULL);
            continue;
        }
        if (r->state == R_FAILED) {
            if (r->zero && (r->flags & VMR_F_FAST_ZERO) && r->err == ENOTSUP) {
                /* the server cannot zero fast: let it zero the slow way, no retry counted */
                r->flags &= ~VMR_F_FAST_ZERO;
                submit(L, r);
                pp = &r->next;
                continue;
            }
            r->attempts++;
            if (r->attempts > w->retries || cancelled(w)) {
                *pp = r->next;
                struct vmr_error e = {0};
                e.plan_index = -1;
                char why_s[96];
                if (r->err == ETIMEDOUT)
                    snprintf(why_s, sizeof why_s, "the server did not answer in %u s",
                             (w->timeout_ms + 999) / 1000);
                else
                    snprintf(why_s, sizeof why_s, "%s", strerror(r->err));
                vmr_error_set(&e, cancelled(w) ? VMR_E_INTERRUPTED
                                  : connection_lost(r->err) ? VMR_E_TRANSPORT : VMR_E_TARGET,
                              r->err,
                              r->offset,
                              "%s: %s %u bytes at disk offset %llu failed after %u attempts: %s",
                              w->uri, r->zero ? "zero of" : "write of", r->count,
                              (unsigned long long)r->offset, r->attempts, why_s);
                report(L, r, &e);
                continue;
            }
            r->state = R_RESUBMIT;
            retry = 1;
            if (connection_lost(r->err))
                lost = 1;
            if (r->attempts > backoff)
                backoff = r->attempts;
        }
        pp = &r->next;
    }
    if (retry && !lost && L->h != NULL && !nbd_aio_is_dead(L->h) && !nbd_aio_is_closed(L->h)) {
        /* the server answered with an error: same connection, after a backoff */
        sleep_ms(w->retry_delay_ms * backoff);
        for (struct nreq *r = L->active; r; r = r->next)
            if (r->state == R_RESUBMIT)
                submit(L, r);
        return L->nactive;
    }
    if (retry) {
        struct vmr_error e = {0};
        e.plan_index = -1;
        if (reconnect(L, &e) != 0) {
            if (e.code == VMR_OK)
                vmr_error_set(&e, VMR_E_TRANSPORT, ENOTCONN, UINT64_MAX, "%s: cannot reconnect",
                              w->uri);
            e.code = VMR_E_TRANSPORT;
            fail_all(L, &e);
            *err = e;
            err->offset = UINT64_MAX;
            return -1;
        }
        for (struct nreq *r = L->active; r; r = r->next)
            if (r->state == R_RESUBMIT)
                submit(L, r);
    }
    return L->nactive;
}

static struct nreq *new_req(struct nbd_lane *L, const void *buf, uint32_t count, uint64_t off,
                            uint32_t flags, int zero, struct vmr_completion cb,
                            struct vmr_error *err)
{
    struct nreq *r = calloc(1, sizeof *r);
    if (r == NULL) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, off, "out of memory");
        return NULL;
    }
    r->L = L;
    r->buf = buf;
    r->count = count;
    r->offset = off;
    r->flags = flags;
    r->zero = zero;
    r->cb = cb;
    return r;
}

static void push(struct nbd_lane *L, struct nreq *r)
{
    r->next = L->active;
    L->active = r;
    L->nactive++;
    submit(L, r);
}

static int enqueue(struct nbd_lane *L, const void *buf, uint32_t count, uint64_t off,
                   uint32_t flags, int zero, struct vmr_completion cb, struct vmr_error *err)
{
    struct nreq *r = new_req(L, buf, count, off, flags, zero, cb, err);
    if (r == NULL)
        return -1;
    push(L, r);
    return 0;
}

/* One pipeline write sent as several NBD requests: completes once, after the last. */
struct split {
    struct vmr_completion cb;   /* the pipeline's */
    uint32_t left;
    int failed;
    struct vmr_error e;         /* the first part's error */
};

static void split_done(void *data, const struct vmr_error *e)
{
    struct split *s = data;
    if (e != NULL && !s->failed) {
        s->failed = 1;
        s->e = *e;
    }
    if (--s->left > 0)
        return;
    struct vmr_completion cb = s->cb;
    struct vmr_error first = s->e;
    int failed = s->failed;
    free(s);
    cb.fn(cb.data, failed ? &first : NULL);
}

static int nw_submit_pwrite(void *lane, const void *buf, uint32_t count, uint64_t off,
                            uint32_t flags, struct vmr_completion cb, struct vmr_error *err)
{
    struct nbd_lane *L = lane;
    uint32_t part = L->w->max_write;
    if (part == 0 || count <= part)
        return enqueue(L, buf, count, off, flags, 0, cb, err);
    uint32_t n = (uint32_t)(((uint64_t)count + part - 1) / part);
    struct split *s = calloc(1, sizeof *s);
    struct nreq **parts = calloc(n, sizeof *parts);
    if (s == NULL || parts == NULL) {
        free(s);
        free(parts);
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, off, "out of memory");
        return -1;
    }
    s->cb = cb;
    s->left = n;
    struct vmr_completion sub = {split_done, s};
    /* allocate every part before sending any: a failure then leaves nothing in flight */
    for (uint32_t i = 0; i < n; i++) {
        uint64_t at = (uint64_t)i * part;
        uint32_t len = count - at < part ? (uint32_t)(count - at) : part;
        parts[i] = new_req(L, (const char *)buf + at, len, off + at, flags, 0, sub, err);
        if (parts[i] == NULL) {
            for (uint32_t j = 0; j < i; j++)
                free(parts[j]);
            free(parts);
            free(s);
            return -1;
        }
    }
    for (uint32_t i = 0; i < n; i++)
        push(L, parts[i]);
    free(parts);
    return 0;
}

static int nw_submit_zero(void *lane, uint32_t count, uint64_t off, uint32_t flags,
                          struct vmr_completion cb, struct vmr_error *err)
{
    return enqueue(lane, NULL, count, off, flags, 1, cb, err);
}

/* Synchronous calls: submit, then poll until that request is reported. */
struct sync_wait {
    int done;
    struct vmr_error e;
};

static void sync_cb(void *data, const struct vmr_error *e)
{
    struct sync_wait *s = data;
    s->done = 1;
    if (e)
        s->e = *e;
}

static int run_sync(struct nbd_lane *L, const void *buf, uint32_t count, uint64_t off,
                    uint32_t flags, int zero, struct vmr_error *err)
{
    struct sync_wait s = {0};
    struct vmr_completion cb = {sync_cb, &s};
    if (enqueue(L, buf, count, off, flags, zero, cb, err) != 0)
        return -1;
    while (!s.done)
        if (nw_poll(L, 1000, err) < 0 && !s.done)
            return -1;
    if (s.e.code != VMR_OK) {
        *err = s.e;
        return -1;
    }
    return 0;
}

static int nw_pwrite(void *lane, const void *buf, uint32_t count, uint64_t off, uint32_t flags,
                     struct vmr_error *err)
{
    return run_sync(lane, buf, count, off, flags, 0, err);
}

static int nw_zero(void *lane, uint32_t count, uint64_t off, uint32_t flags,
                   struct vmr_error *err)
{
    return run_sync(lane, NULL, count, off, flags, 1, err);
}

static int on_flush(void *user_data, int *error)
{
    struct nbd_lane *L = user_data;
    L->flush_err = *error;
    L->flush_done = 1;
    return 1;
}

/* A waited flush, bounded like a request. The server answering with an error is
 * a TARGET error (its disk failed), a connection lost or silent a TRANSPORT one. */
static int nw_flush(void *lane, uint32_t flags, struct vmr_error *err)
{
    struct nbd_lane *L = lane;
    struct nbd_writer *w = L->w;
    (void)flags;
    if (!w->can_flush)
        return 0;
    if (L->h == NULL) {
        vmr_error_set(err, VMR_E_TRANSPORT, ENOTCONN, UINT64_MAX, "%s: flush: not connected",
                      w->uri);
        return -1;
    }
    L->flush_done = 0;
    L->flush_err = 0;
    nbd_completion_callback cb = {.callback = on_flush, .user_data = L, .free = NULL};
    if (nbd_aio_flush(L->h, cb, 0) == -1) {
        nbd_err(err, VMR_E_TRANSPORT, UINT64_MAX, "flush failed", w->uri);
        return -1;
    }
    uint64_t end = mono_ns() + (uint64_t)w->timeout_ms * 1000000ull;
    while (!L->flush_done) {
        int ms = ms_left(wait_end(w, end), 1000);
        if (ms == 0) {
            L->stalled = 1;
            vmr_error_set(err, cancelled(w) ? VMR_E_INTERRUPTED : VMR_E_TRANSPORT, ETIMEDOUT,
                          UINT64_MAX, "%s: flush: the server did not answer in %u s", w->uri,
                          (w->timeout_ms + 999) / 1000);
            return -1;
        }
        if (nbd_poll(L->h, ms) == -1 || nbd_aio_is_dead(L->h) || nbd_aio_is_closed(L->h)) {
            if (L->flush_done)
                break;
            nbd_err(err, VMR_E_TRANSPORT, UINT64_MAX, "flush failed: connection lost", w->uri);
            return -1;
        }
    }
    if (L->flush_err) {
        vmr_error_set(err, connection_lost(L->flush_err) ? VMR_E_TRANSPORT : VMR_E_TARGET,
                      L->flush_err, UINT64_MAX, "%s: flush failed: %s", w->uri,
                      strerror(L->flush_err));
        return -1;
    }
    return 0;
}

static void *nw_open_lane(void *wp, int index, struct vmr_error *err)
{
    struct nbd_writer *w = wp;
    if (index > 0 && !w->can_multi_conn) {
        vmr_error_set(err, VMR_E_TARGET, 0, UINT64_MAX,
                      "%s: the server does not offer multi-conn: only one connection allowed",
                      w->uri);
        return NULL;
    }
    struct nbd_lane *L = calloc(1, sizeof *L);
    if (L == NULL) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return NULL;
    }
    L->w = w;
    L->index = index;
    L->h = connect_one(w, err);
    if (L->h == NULL) {
        free(L);
        return NULL;
    }
    return L;
}

static int nw_close_lane(void *lane, struct vmr_error *err)
{
    struct nbd_lane *L = lane;
    int rc = 0;
    /* close first (draining what the server owes), then report what is left: the
     * completion callbacks must never see a freed request */
    if (L->h && close_handle(L->w, L->h, drain_ms(L)) != 0) {
        nbd_err(err, VMR_E_TRANSPORT, UINT64_MAX, "shutdown", L->w->uri);
        rc = -1;
    }
    L->h = NULL;
    if (L->nactive) {
        struct vmr_error e = {0};
        vmr_error_set(&e, VMR_E_INTERRUPTED, 0, UINT64_MAX, "connection closed");
        fail_all(L, &e);
    }
    free(L);
    return rc;
}

static uint64_t nw_get_size(void *w) { return ((struct nbd_writer *)w)->size; }
static int nw_can_zero(void *w) { return ((struct nbd_writer *)w)->can_zero; }
static int nw_can_fast_zero(void *w) { return ((struct nbd_writer *)w)->can_fast_zero; }
static int nw_can_trim(void *w) { return ((struct nbd_writer *)w)->can_trim; }
static int nw_can_flush(void *w) { return ((struct nbd_writer *)w)->can_flush; }
static int nw_can_multi_conn(void *w) { return ((struct nbd_writer *)w)->can_multi_conn; }

static void nw_cancel(void *wp)
{
    struct nbd_writer *w = wp;
    uint64_t zero = 0;
    __atomic_compare_exchange_n(&w->cancel_ns, &zero, mono_ns(), 0, __ATOMIC_ACQ_REL,
                                __ATOMIC_ACQUIRE);
}

static void nw_close(void *wp)
{
    struct nbd_writer *w = wp;
    free(w->uri);
    free(w->psk_file);
    free(w->tls_username);
    free(w->cert_dir);
    free(w);
}

/* Read side (compare stage, compare.c): one connection of its own per reader
 * thread, one request at a time (the readers are the parallelism). It only
 * reads, and reads each block before the pipeline writes it, so it needs no
 * multi-conn from the server. Every wait is bounded like the writer's
 * (timeout_ms, cancel grace); a lost or silent connection is replaced and the
 * read repeated, up to `retries` attempts. */
struct nbd_reader {
    struct nbd_writer *w;
    struct nbd_handle *h;
    int alloc;               /* the server answers base:allocation block status */
};

struct rd_cmd {
    int done, err;
};

static int rd_complete(void *data, int *error)
{
    struct rd_cmd *c = data;
    c->done = 1;
    c->err = *error;
    return 1;
}

/* Wait for c; 0 = answered (c->err: the server's errno), -1 = the connection is
 * lost or silent past the deadline (then *why is ENOTCONN or ETIMEDOUT). */
static int rd_wait(struct nbd_reader *r, struct rd_cmd *c, int *why)
{
    uint64_t end = mono_ns() + (uint64_t)r->w->timeout_ms * 1000000ull;
    while (!c->done) {
        int ms = ms_left(wait_end(r->w, end), 200);
        if (ms == 0) {
            *why = ETIMEDOUT;
            return -1;
        }
        if (nbd_poll(r->h, ms) == -1 || nbd_aio_is_dead(r->h) || nbd_aio_is_closed(r->h)) {
            if (c->done)
                break;
            *why = ENOTCONN;
            return -1;
        }
    }
    return 0;
}

static void *nw_open_read(void *wp, int index, struct vmr_error *err)
{
    struct nbd_reader *r = calloc(1, sizeof *r);
    if (r == NULL) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return NULL;
    }
    r->w = wp;
    r->h = connect_ctx(r->w, 1, err);
    if (r->h == NULL) {
        free(r);
        return NULL;
    }
    r->alloc = nbd_can_meta_context(r->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
    return r;
}

static void rd_drop(struct nbd_reader *r)
{
    if (r->h)
        nbd_close(r->h);   /* lost or silent: nothing is owed that we still wait for */
    r->h = NULL;
}

static void nw_close_read(void *rh)
{
    struct nbd_reader *r = rh;
    if (r->h)
        close_handle(r->w, r->h, DRAIN_MS);
    free(r);
}

static int nw_read(void *rh, void *buf, uint32_t count, uint64_t off, struct vmr_error *err)
{
    struct nbd_reader *r = rh;
    uint32_t tries = r->w->retries ? r->w->retries : 1;
    int e = ENOTCONN;
    for (uint32_t attempt = 1;; attempt++) {
        if (r->h == NULL) {
            struct vmr_error ce = {0};
            r->h = connect_ctx(r->w, 1, &ce);
        }
        if (r->h != NULL) {
            struct rd_cmd c = {0, 0};
            nbd_completion_callback cb = {.callback = rd_complete, .user_data = &c, .free = NULL};
            if (nbd_aio_pread(r->h, buf, count, off, cb, 0) == -1) {
                e = nbd_get_errno() ? nbd_get_errno() : EIO;
                if (nbd_aio_is_dead(r->h) || nbd_aio_is_closed(r->h))
                    e = ENOTCONN;
            } else if (rd_wait(r, &c, &e) == 0) {
                if (c.err == 0)
                    return 0;
                e = c.err;
            }
            if (connection_lost(e) || e == ETIMEDOUT)
                rd_drop(r);
        }
        if (attempt >= tries || cancelled(r->w)) {
            int lost = connection_lost(e) || e == ETIMEDOUT;
            vmr_error_set(err, lost ? VMR_E_TRANSPORT : VMR_E_TARGET, e, off,
                          "%s: read of %u bytes at disk offset %llu failed after %u attempts: %s",
                          r->w->uri, count, (unsigned long long)off, attempt, strerror(e));
            return -1;
        }
        sleep_ms(r->w->retry_delay_ms * attempt);
    }
}

struct zero_scan {
    uint64_t next;           /* first offset not yet known to be zero */
    int not_zero;
};

static int on_extent(void *data, const char *ctx, uint64_t off, uint32_t *entries, size_t n,
                     int *error)
{
    struct zero_scan *z = data;
    if (strcmp(ctx, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
        return 0;
    for (size_t i = 0; i + 1 < n && !z->not_zero; i += 2) {
        if (!(entries[i + 1] & LIBNBD_STATE_ZERO))
            z->not_zero = 1;
        else
            z->next = off + entries[i];
        off += entries[i];
    }
    return 0;
}

/* 1 when block status says the range reads as zeros; 0 when not, or not known
 * (no answer: the range is then read, which decides). */
static int nw_known_zero(void *rh, uint64_t off, uint64_t count)
{
    struct nbd_reader *r = rh;
    if (!r->alloc || r->h == NULL)
        return 0;
    struct zero_scan z = {off, 0};
    while (!z.not_zero && z.next < off + count) {
        uint64_t at = z.next;
        uint64_t len = off + count - at > (1u << 30) ? (1u << 30) : off + count - at;
        struct rd_cmd c = {0, 0};
        int why = 0;
        nbd_extent_callback ecb = {.callback = on_extent, .user_data = &z, .free = NULL};
        nbd_completion_callback cb = {.callback = rd_complete, .user_data = &c, .free = NULL};
        if (nbd_aio_block_status(r->h, len, at, ecb, cb, 0) == -1)
            return 0;
        if (rd_wait(r, &c, &why) != 0) {
            rd_drop(r);   /* the next read reconnects */
            return 0;
        }
        if (c.err != 0 || z.next <= at)
            return 0;     /* an error, or no progress: not known */
    }
    return !z.not_zero;
}

static const struct vmr_writer_ops nbd_ops = {
    .abi_version = VMR_WRITER_ABI_VERSION,
    .struct_size = sizeof(struct vmr_writer_ops),
    .name = "nbd",
    .get_size = nw_get_size,
    .can_zero = nw_can_zero,
    .can_fast_zero = nw_can_fast_zero,
    .can_trim = nw_can_trim,
    .can_flush = nw_can_flush,
    .can_multi_conn = nw_can_multi_conn,
    .close = nw_close,
    .open_lane = nw_open_lane,
    .close_lane = nw_close_lane,
    .pwrite = nw_pwrite,
    .zero = nw_zero,
    .flush = nw_flush,
    .submit_pwrite = nw_submit_pwrite,
    .submit_zero = nw_submit_zero,
    .poll = nw_poll,
    .cancel = nw_cancel,
    .open_read = nw_open_read,
    .pread = nw_read,
    .known_zero = nw_known_zero,
    .close_read = nw_close_read,
};

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

int vmr_nbd_writer_open(const struct vmr_nbd_options *opt, uint64_t size, struct vmr_writer *out,
                        struct vmr_error *err)
{
    memset(out, 0, sizeof *out);
    struct nbd_writer *w = calloc(1, sizeof *w);
    if (w == NULL || (w->uri = strdup(opt->uri)) == NULL) {
        free(w);
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return -1;
    }
    w->psk_file = dup_or_null(opt->psk_file);
    w->tls_username = dup_or_null(opt->tls_username);
    w->cert_dir = dup_or_null(opt->cert_dir);
    w->tls_verify_peer = opt->tls_verify_peer;
    w->retries = opt->retries;
    w->retry_delay_ms = opt->retry_delay_ms;
    w->flush_every = opt->flush_every;
    w->max_write = opt->max_write;
    w->timeout_ms = opt->timeout_ms ? opt->timeout_ms : DEFAULT_TIMEOUT_MS;
    w->interrupted = opt->interrupted;
    /* a probe connection learns the export's size and what the server offers */
    struct nbd_handle *h = connect_one(w, err);
    if (h == NULL) {
        nw_close(w);
        return -1;
    }
    int64_t sz = nbd_get_size(h);
    w->can_zero = nbd_can_zero(h) == 1;
    w->can_fast_zero = nbd_can_fast_zero(h) == 1;
    w->can_trim = nbd_can_trim(h) == 1;
    w->can_flush = nbd_can_flush(h) == 1;
    w->can_multi_conn = nbd_can_multi_conn(h) == 1;
    int ro = nbd_is_read_only(h) == 1;
    close_handle(w, h, (int)w->timeout_ms);
    w->interrupted = NULL; /* lanes connect from other threads */
    if (sz < 0) {
        vmr_error_set(err, VMR_E_TRANSPORT, 0, UINT64_MAX, "%s: cannot read the export size",
                      w->uri);
        nw_close(w);
        return -1;
    }
    if (ro) {
        vmr_error_set(err, VMR_E_TARGET, EROFS, UINT64_MAX, "%s: the export is read-only",
                      w->uri);
        nw_close(w);
        return -1;
    }
    w->size = (uint64_t)sz;
    if (w->size < size) {
        vmr_error_set(err, VMR_E_TARGET, 0, UINT64_MAX,
                      "%s: the export holds %llu bytes, smaller than the disk (%llu bytes): "
                      "refused",
                      w->uri, (unsigned long long)w->size, (unsigned long long)size);
        nw_close(w);
        return -1;
    }
    out->ops = &nbd_ops;
    out->w = w;
    out->max_request = 1u << 30;
    out->target_zeroed = (opt->flags & VMR_FILE_TARGET_ZEROED) != 0;
    snprintf(out->note, sizeof out->note,
             "%s: %llu bytes, zero=%d fast_zero=%d trim=%d flush=%d multi_conn=%d", w->uri,
             (unsigned long long)w->size, w->can_zero, w->can_fast_zero, w->can_trim,
             w->can_flush, w->can_multi_conn);
    return 0;
}
