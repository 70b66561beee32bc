/* vmrestore core: the repository-agent source (docs/protocol.md, "Requests").
 *
 * WHY THIS SHAPE
 * The proxy restores from a repository agent in another process or host. The
 * handshake (version, HMAC mutual authentication, file OPENs, footer checks)
 * stays in Python (vmrestore.mover.repo_source): it is rare, and it is where
 * policy lives. Python then hands the authenticated plain TCP sockets to this
 * source, which only does the hot part: EXTENTS requests out, EXTENT_DATA
 * answers in, the stored (compressed) bytes received straight into the
 * pipeline's read buffers -- no copy, no Python, GIL released.
 *
 * Each reader thread owns `per` connections. The pipeline announces a
 * reader's next extents with hint() (struct vmr_source.lookahead bytes
 * ahead); hints are grouped into batches (one EXTENTS request: one chain
 * file, <= batch_bytes, <= max_ranges), batches go round-robin to the
 * reader's connections with at most `depth` unanswered per connection. The
 * agent answers one connection's requests in order, so pread() -- called in
 * the order of the hints -- always wants the oldest range of the oldest
 * batch: it reads that batch's frame (records) the first time, then exactly
 * the range's bytes into the caller's buffer.
 *
 * Errors: a lost or silent connection, a bad frame (magic, CRC, type, id,
 * records not matching the request) is VMR_E_TRANSPORT: Python reconnects
 * and resumes from the completed prefix. An ERROR answer (the agent cannot
 * serve the range) is VMR_E_SOURCE. The bytes themselves are verified
 * downstream (decompress + XXH3-128 of the plan).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "writer.h"

#define HDR 16
#define T_ERROR 3
#define T_EXTENTS 22
#define T_EXTENT_DATA 23
#define REC 40
#define RANGE 16
#define PROTO_MAX_RANGES 4096u
#define PROTO_MAX_BULK (64u << 20)
#define MAX_ERROR_TEXT 1000

struct repo_source {
    int *fds;
    size_t nfds;
    uint32_t readers, per;
    uint32_t *handles;        /* nfds x nfiles */
    size_t nfiles;
    uint32_t max_ranges, max_bulk, batch_bytes, depth, timeout_ms;
    uint32_t crc_table[256];
    int cancelled;
    uint64_t wire_bytes, bulk_bytes, requests;   /* atomics */
};

struct rng {
    uint64_t off;
    uint32_t len;
    uint16_t src;
};

struct batch {
    size_t first;             /* sequence number of its first range */
    uint32_t count;
    uint32_t done;            /* ranges already handed to pread */
    uint64_t bytes;
    uint16_t src;
    uint32_t conn;            /* index among the reader's connections */
    uint32_t req_id;
    int closed, sent, have_frame;
};

struct conn {
    int fd;
    uint32_t next_id;
    uint32_t inflight;        /* sent batches not fully read */
};

struct repo_reader {
    struct repo_source *s;
    int index;
    struct conn *conns;
    uint32_t rr;              /* next connection for a closed batch */
    /* FIFO of hinted ranges: seq numbers [rhead, rhead + rcount) */
    struct rng *rq;
    size_t rcap, rhead, rcount, rseq;   /* rseq = seq of rq[rhead] */
    /* FIFO of batches */
    struct batch *bq;
    size_t bcap, bhead, bcount;
    unsigned char *frame;     /* request / answer payload buffer */
    size_t frame_cap;
    uint64_t wire;            /* bytes received, flushed to the source's counter */
};

static void crc_init(uint32_t *t)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        t[i] = c;
    }
}

static uint32_t crc_update(const uint32_t *t, uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    for (size_t i = 0; i < n; i++)
        crc = t[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
    return ~crc;
}

static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const unsigned char *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* ------------------------------------------------------------------ I/O */

static int conn_lost(struct repo_reader *r, uint32_t c, int sys_errno, const char *what,
                     struct vmr_error *err)
{
    if (__atomic_load_n(&r->s->cancelled, __ATOMIC_RELAXED)) {
        vmr_error_set(err, VMR_E_INTERRUPTED, 0, UINT64_MAX, "repository source cancelled");
        return -1;
    }
    vmr_error_set(err, VMR_E_TRANSPORT, sys_errno, UINT64_MAX,
                  "connection %u of reader %d to the repository agent: %s%s%s",
                  c, r->index, what, sys_errno ? ": " : "", sys_errno ? strerror(sys_errno) : "");
    return -1;
}

static int recv_exact(struct repo_reader *r, uint32_t c, void *buf, size_t n,
                      struct vmr_error *err)
{
    int fd = r->conns[c].fd;
    size_t got = 0;
    while (got < n) {
        ssize_t k = recv(fd, (char *)buf + got, n - got, MSG_WAITALL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return conn_lost(r, c, 0, "no data from the agent within the I/O timeout", err);
            return conn_lost(r, c, errno, "receive failed", err);
        }
        if (k == 0)
            return conn_lost(r, c, 0, "closed by the agent", err);
        got += (size_t)k;
        r->wire += (uint64_t)k;
    }
    return 0;
}

static int send_all(struct repo_reader *r, uint32_t c, const void *buf, size_t n,
                    struct vmr_error *err)
{
    int fd = r->conns[c].fd;
    size_t done = 0;
    while (done < n) {
        ssize_t k = send(fd, (const char *)buf + done, n - done, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return conn_lost(r, c, 0, "the agent reads no requests within the I/O timeout",
                                 err);
            return conn_lost(r, c, errno, "send failed", err);
        }
        done += (size_t)k;
    }
    return 0;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    void *q = realloc(*p, n * elem);
    if (q == NULL)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

/* Room for one more item in a ring holding `count`; growing re-lays the
 * items out from index 0. */
static int ring_reserve(void **ring, size_t *cap, size_t *head, size_t count, size_t elem)
{
    if (count + 1 <= *cap)
        return 0;
    size_t ncap = *cap ? *cap * 2 : 256;
    unsigned char *q = malloc(ncap * elem);
    if (q == NULL)
        return -1;
    for (size_t i = 0; i < count; i++)
        memcpy(q + i * elem, (unsigned char *)*ring + ((*head + i) % *cap) * elem, elem);
    free(*ring);
    *ring = q;
    *cap = ncap;
    *head = 0;
    return 0;
}

#define RQ(r, i) (&(r)->rq[((r)->rhead + (i)) % (r)->rcap])
#define BQ(r, i) (&(r)->bq[((r)->bhead + (i)) % (r)->bcap])

/* ------------------------------------------------------------- requests */

/* Send batch b as one EXTENTS request on its connection. */
static int send_batch(struct repo_reader *r, struct batch *b, struct vmr_error *err)
{
    struct repo_source *s = r->s;
    struct conn *c = &r->conns[b->conn];
    size_t len = 8 + (size_t)b->count * RANGE;
    if (grow((void **)&r->frame, &r->frame_cap, HDR + len, 1) != 0) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return -1;
    }
    unsigned char *f = r->frame;
    b->req_id = c->next_id++;
    f[0] = 'V';
    f[1] = 'M';
    f[2] = T_EXTENTS;
    f[3] = 0;
    put32(f + 4, b->req_id);
    put32(f + 8, (uint32_t)len);
    unsigned char *pl = f + HDR;
    put32(pl, s->handles[(size_t)(r->index * s->per + b->conn) * s->nfiles + b->src]);
    put32(pl + 4, b->count);
    for (uint32_t k = 0; k < b->count; k++) {
        const struct rng *g = RQ(r, b->first - r->rseq + k);
        put64(pl + 8 + (size_t)k * RANGE, g->off);
        put32(pl + 8 + (size_t)k * RANGE + 8, g->len);
        put32(pl + 8 + (size_t)k * RANGE + 12, 0);
    }
    uint32_t crc = crc_update(s->crc_table, 0, f, 12);
    crc = crc_update(s->crc_table, crc, pl, len);
    put32(f + 12, crc);
    if (send_all(r, b->conn, f, HDR + len, err) != 0)
        return -1;
    b->sent = 1;
    c->inflight++;
    __atomic_fetch_add(&s->requests, 1, __ATOMIC_RELAXED);
    return 0;
}

/* Send closed batches, oldest first, while their connection has room. */
static int pump(struct repo_reader *r, struct vmr_error *err)
{
    for (size_t i = 0; i < r->bcount; i++) {
        struct batch *b = BQ(r, i);
        if (!b->closed)
            break;
        if (b->sent)
            continue;
        if (r->conns[b->conn].inflight >= r->s->depth)
            break;   /* keep the order: later batches wait too */
        if (send_batch(r, b, err) != 0)
            return -1;
    }
    return 0;
}

static void close_batch(struct repo_reader *r, struct batch *b)
{
    b->closed = 1;
    b->conn = r->rr;
    r->rr = (r->rr + 1) % r->s->per;
}

static int add_range(struct repo_reader *r, uint16_t src, uint64_t off, uint32_t len,
                     struct vmr_error *err)
{
    struct repo_source *s = r->s;
    if (ring_reserve((void **)&r->rq, &r->rcap, &r->rhead, r->rcount, sizeof *r->rq) != 0 ||
        ring_reserve((void **)&r->bq, &r->bcap, &r->bhead, r->bcount, sizeof *r->bq) != 0) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return -1;
    }
    size_t seq = r->rseq + r->rcount;
    *RQ(r, r->rcount) = (struct rng){off, len, src};
    r->rcount++;
    struct batch *b = r->bcount ? BQ(r, r->bcount - 1) : NULL;
    if (b != NULL && !b->closed &&
        (b->src != src || b->count >= s->max_ranges || b->bytes + len > s->batch_bytes)) {
        close_batch(r, b);
        b = NULL;
    }
    if (b == NULL || b->closed) {
        b = BQ(r, r->bcount);
        memset(b, 0, sizeof *b);
        b->first = seq;
        b->src = src;
        r->bcount++;
    }
    b->count++;
    b->bytes += len;
    if (b->bytes >= s->batch_bytes || b->count >= s->max_ranges)
        close_batch(r, b);
    return pump(r, err);
}

/* Read the EXTENT_DATA frame of batch b (the oldest): header, records. */
static int read_answer(struct repo_reader *r, struct batch *b, struct vmr_error *err)
{
    struct repo_source *s = r->s;
    unsigned char h[HDR];
    if (recv_exact(r, b->conn, h, HDR, err) != 0)
        return -1;
    uint32_t type = h[2], id = get32(h + 4), len = get32(h + 8), crc = get32(h + 12);
    size_t want = 8 + (size_t)b->count * REC;
    if (h[0] != 'V' || h[1] != 'M' || h[3] != 0)
        return conn_lost(r, b->conn, 0, "bad frame header (magic/flags): stream corrupted", err);
    if (type == T_ERROR ? (len < 4 || len > 4 + MAX_ERROR_TEXT)
                        : (type != T_EXTENT_DATA || len != want)) {
        char why[128];
        snprintf(why, sizeof why, "unexpected answer (type %u, %u bytes) to EXTENTS", type, len);
        return conn_lost(r, b->conn, 0, why, err);
    }
    if (grow((void **)&r->frame, &r->frame_cap, len + 1, 1) != 0) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return -1;
    }
    if (recv_exact(r, b->conn, r->frame, len, err) != 0)
        return -1;
    uint32_t got = crc_update(s->crc_table, crc_update(s->crc_table, 0, h, 12), r->frame, len);
    if (got != crc)
        return conn_lost(r, b->conn, 0, "bad CRC on an answer frame: stream corrupted", err);
    if (id != b->req_id) {
        char why[128];
        snprintf(why, sizeof why, "answer to request %u while waiting for %u", id, b->req_id);
        return conn_lost(r, b->conn, 0, why, err);
    }
    if (type == T_ERROR) {
        r->frame[len] = 0;
        const struct rng *g = RQ(r, b->first - r->rseq);
        vmr_error_set(err, VMR_E_SOURCE, 0, UINT64_MAX,
                      "chain file %u: the repository agent refused the extents from offset "
                      "%llu (error %u): %s", (unsigned)b->src, (unsigned long long)g->off,
                      get32(r->frame), (const char *)r->frame + 4);
        return -1;
    }
    if (get32(r->frame) != b->count)
        return conn_lost(r, b->conn, 0, "EXTENT_DATA record count differs from the request", err);
    for (uint32_t k = 0; k < b->count; k++) {
        const unsigned char *rec = r->frame + 8 + (size_t)k * REC;
        const struct rng *g = RQ(r, b->first - r->rseq + k);
        if (get64(rec) != g->off || get32(rec + 8) != g->len)
            return conn_lost(r, b->conn, 0, "EXTENT_DATA records do not match the ranges asked",
                             err);
    }
    b->have_frame = 1;
    return 0;
}

/* ------------------------------------------------------------ the table */

static void flush_wire(struct repo_reader *r)
{
    if (r->wire) {
        __atomic_fetch_add(&r->s->wire_bytes, r->wire, __ATOMIC_RELAXED);
        r->wire = 0;
    }
}

static void *repo_open_reader(void *sv, int idx, struct vmr_error *err)
{
    struct repo_source *s = sv;
    if (idx < 0 || (uint32_t)idx >= s->readers) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, UINT64_MAX,
                      "reader %d but the repository source has connections for %u readers", idx,
                      s->readers);
        return NULL;
    }
    struct repo_reader *r = calloc(1, sizeof *r);
    if (r)
        r->conns = calloc(s->per, sizeof *r->conns);
    if (r == NULL || r->conns == NULL) {
        free(r);
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return NULL;
    }
    r->s = s;
    r->index = idx;
    for (uint32_t c = 0; c < s->per; c++) {
        r->conns[c].fd = s->fds[(size_t)idx * s->per + c];
        r->conns[c].next_id = 0x10000000u + c;   /* apart from Python's ids, for debugging */
    }
    return r;
}

static void repo_close_reader(void *reader)
{
    struct repo_reader *r = reader;
    flush_wire(r);
    free(r->rq);
    free(r->bq);
    free(r->frame);
    free(r->conns);
    free(r);
}

static void repo_hint(void *reader, uint16_t src, uint64_t offset, uint64_t count)
{
    struct repo_reader *r = reader;
    struct vmr_error e;
    memset(&e, 0, sizeof e);
    /* A failure here (send) shows again at the pread of the range: nothing to do now. */
    if (count > 0 && count <= UINT32_MAX)
        (void)add_range(r, src, offset, (uint32_t)count, &e);
}

static int repo_pread(void *reader, void *buf, uint32_t count, uint64_t offset, uint16_t src,
                      uint32_t flags, struct vmr_error *err)
{
    struct repo_reader *r = reader;
    struct repo_source *s = r->s;
    (void)flags;
    if (src >= s->nfiles) {
        vmr_error_set(err, VMR_E_SOURCE, 0, UINT64_MAX,
                      "plan names chain file %u but the job has %zu", (unsigned)src, s->nfiles);
        return -1;
    }
    if (count > s->max_bulk) {
        vmr_error_set(err, VMR_E_SOURCE, 0, UINT64_MAX,
                      "chain file %u: extent of %u bytes at offset %llu exceeds the agent's "
                      "%u bytes per request", (unsigned)src, count, (unsigned long long)offset,
                      s->max_bulk);
        return -1;
    }
    if (r->rcount == 0 && add_range(r, src, offset, count, err) != 0)   /* not hinted */
        return -1;
    struct rng *g = RQ(r, 0);
    if (g->src != src || g->off != offset || g->len != count) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, UINT64_MAX,
                      "repository source: read of chain file %u at %llu, but %u at %llu was "
                      "announced first", (unsigned)src, (unsigned long long)offset,
                      (unsigned)g->src, (unsigned long long)g->off);
        return -1;
    }
    struct batch *b = BQ(r, 0);
    if (!b->closed)
        close_batch(r, b);
    if (pump(r, err) != 0)
        return -1;
    if (!b->sent && send_batch(r, b, err) != 0)   /* the oldest always has room */
        return -1;
    if (!b->have_frame && read_answer(r, b, err) != 0)
        return -1;
    if (recv_exact(r, b->conn, buf, count, err) != 0)
        return -1;
    __atomic_fetch_add(&s->bulk_bytes, count, __ATOMIC_RELAXED);
    r->rhead = (r->rhead + 1) % r->rcap;
    r->rcount--;
    r->rseq++;
    if (++b->done == b->count) {
        r->conns[b->conn].inflight--;
        r->bhead = (r->bhead + 1) % r->bcap;
        r->bcount--;
        if (pump(r, err) != 0)
            return -1;
    }
    if (r->wire >= (1u << 20))
        flush_wire(r);
    return 0;
}

static void repo_cancel(void *sv)
{
    struct repo_source *s = sv;
    __atomic_store_n(&s->cancelled, 1, __ATOMIC_RELAXED);
    for (size_t i = 0; i < s->nfds; i++)
        shutdown(s->fds[i], SHUT_RDWR);
}

static void repo_close(void *sv)
{
    struct repo_source *s = sv;
    for (size_t i = 0; i < s->nfds; i++)
        close(s->fds[i]);
    free(s->fds);
    free(s->handles);
    free(s);
}

static const struct vmr_source_ops repo_source_ops = {
    .abi_version = VMR_SOURCE_ABI_VERSION,
    .struct_size = sizeof(struct vmr_source_ops),
    .name = "repo",
    .open_reader = repo_open_reader,
    .close_reader = repo_close_reader,
    .pread = repo_pread,
    .hint = repo_hint,
    .close = repo_close,
    .cancel = repo_cancel,
};

static uint32_t pick(uint32_t v, uint32_t dflt, uint32_t hi)
{
    if (v == 0)
        v = dflt;
    return v > hi ? hi : v;
}

int vmr_repo_source_open(const struct vmr_repo_options *o, struct vmr_source *out,
                         struct vmr_error *err)
{
    if (o == NULL || o->fds == NULL || o->nfds == 0 || o->readers == 0 ||
        o->nfds % o->readers != 0 || o->handles == NULL || o->nfiles == 0 ||
        o->nfiles > 65536) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, UINT64_MAX,
                      "repository source: need readers x connections sockets and a handle per "
                      "chain file and connection");
        return -1;
    }
    struct repo_source *s = calloc(1, sizeof *s);
    if (s) {
        s->fds = calloc(o->nfds, sizeof *s->fds);
        s->handles = calloc(o->nfds * o->nfiles, sizeof *s->handles);
    }
    if (s == NULL || s->fds == NULL || s->handles == NULL) {
        if (s) {
            free(s->fds);
            free(s->handles);
        }
        free(s);
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return -1;
    }
    memcpy(s->fds, o->fds, o->nfds * sizeof *s->fds);
    memcpy(s->handles, o->handles, o->nfds * o->nfiles * sizeof *s->handles);
    s->nfds = o->nfds;
    s->nfiles = o->nfiles;
    s->readers = o->readers;
    s->per = (uint32_t)(o->nfds / o->readers);
    /* 1024 ranges = 16 KiB per request: `depth` requests fit the agent's receive
     * buffer even while it is busy sending, so sending never waits on receiving */
    s->max_ranges = pick(o->max_ranges, 1024, PROTO_MAX_RANGES);
    s->max_bulk = pick(o->max_bulk, PROTO_MAX_BULK, PROTO_MAX_BULK);
    s->batch_bytes = pick(o->batch_bytes, 4u << 20, s->max_bulk);
    s->depth = pick(o->depth, 4, 64);
    s->timeout_ms = pick(o->io_timeout_ms, 60000, 3600000);
    crc_init(s->crc_table);
    struct timeval tv = {(time_t)(s->timeout_ms / 1000), (suseconds_t)(s->timeout_ms % 1000) * 1000};
    for (size_t i = 0; i < s->nfds; i++) {
        setsockopt(s->fds[i], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(s->fds[i], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    out->ops = &repo_source_ops;
    out->s = s;
    /* enough announced to keep `depth` batches in flight on every connection */
    out->lookahead = (uint64_t)s->per * s->depth * s->batch_bytes;
    return 0;
}

void vmr_repo_source_stats(const struct vmr_source *src, struct vmr_repo_stats *out)
{
    memset(out, 0, sizeof *out);
    if (src == NULL || src->ops != &repo_source_ops)
        return;
    const struct repo_source *s = src->s;
    out->wire_bytes = __atomic_load_n(&s->wire_bytes, __ATOMIC_RELAXED);
    out->bulk_bytes = __atomic_load_n(&s->bulk_bytes, __ATOMIC_RELAXED);
    out->requests = __atomic_load_n(&s->requests, __ATOMIC_RELAXED);
}
