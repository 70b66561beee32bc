/* The block pipeline: see pipeline.h for the design. */
#define _GNU_SOURCE
#include "pipeline.h"

#include <errno.h>
#include <stddef.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>
#include <time.h>

#include "codec.h"
#include "compare.h"

#define MAX_THREADS 64
#define MAX_BLOCK (64u << 20)
#define ZERO_BUF_SIZE (1u << 20)
#define DEFAULT_MAX_REQUEST (64u << 20)

/* ------------------------------------------------------------------ errors */

void vmr_error_set(struct vmr_error *err, int code, int sys_errno, uint64_t offset,
                   const char *fmt, ...)
{
    if (err == NULL || err->code != VMR_OK)
        return;
    err->code = code;
    err->sys_errno = sys_errno;
    err->offset = offset;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
}

static void error_init(struct vmr_error *e)
{
    memset(e, 0, sizeof *e);
    e->plan_index = -1;
    e->offset = UINT64_MAX;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#define ADD(field, v) __atomic_fetch_add(&(field), (uint64_t)(v), __ATOMIC_RELAXED)
#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)

/* ------------------------------------------------------------------ slots */

struct slot {
    struct slot *next;       /* free list */
    unsigned char *buf;      /* aligned block buffer (the one the writer sends) */
    unsigned char *cbuf;     /* compressed bytes, borrowed from the cbuf pool */
    size_t idx;              /* plan index */
    uint64_t pos;            /* lane: bytes of the entry already issued */
    int pending;             /* lane: requests in flight */
    int issuing;             /* lane: still issuing chunks */
    int failed;
};

struct pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    void **free;             /* stack of free items */
    size_t nfree, cap;
};

struct queue {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct slot **ring;
    size_t cap, head, count;
    int closed;
};

struct request {
    struct lane *lane;
    struct slot *slot;
    uint64_t offset;
    uint32_t count;
    int zero;
    struct request *next;
};

struct lane {
    struct vmr_pipeline *p;
    int index;
    void *h;                 /* writer lane handle */
    pthread_t thread;
    int started;
    uint64_t flush_ack;
    struct request *reqs, *free_req;
    int inflight;
};

struct vmr_pipeline {
    const struct vmr_plan_entry *plan;
    size_t n;
    struct vmr_source *src;
    struct vmr_writer *wr;
    struct vmr_pipeline_config cfg;
    int async;
    int can_zero, can_trim, can_fast_zero, can_flush;
    uint32_t max_request;
    size_t blk_cap, cbuf_cap;

    struct slot *slots;
    unsigned char *mem;      /* all block buffers, one aligned allocation */
    unsigned char *cmem;     /* all compressed buffers */
    unsigned char *zero_buf; /* ZERO_BUF_SIZE of zeros, aligned */
    size_t nslots, ncbufs;
    struct pool slot_pool, cbuf_pool;
    struct queue dq, wq;     /* to decompress, to write */

    pthread_t readers[MAX_THREADS], workers[MAX_THREADS];
    int nreaders_started, nworkers_started;
    struct lane *lanes;
    int nlanes;
    size_t next_entry;       /* atomic: next plan index for readers */
    uint64_t rate_bytes;     /* atomic: data bytes let through so far (max_rate) */
    int reader_seq;
    int readers_left, workers_left;

    /* completion tracking */
    pthread_mutex_t done_mu;
    uint8_t *done;
    size_t prefix;

    /* lifetime */
    pthread_mutex_t mu;
    pthread_cond_t cv;       /* ended, flush acks */
    int threads_alive;
    int started, ended, stop;
    uint64_t flush_req;
    struct vmr_error flush_err;
    struct vmr_error err;
    uint64_t t_start, t_end;
    struct vmr_counters c;
};

static void fail(struct vmr_pipeline *p, const struct vmr_error *e, int64_t index, uint64_t off);

static int pool_init(struct pool *pl, size_t cap)
{
    pthread_mutex_init(&pl->mu, NULL);
    pthread_cond_init(&pl->cv, NULL);
    pl->free = calloc(cap ? cap : 1, sizeof(void *));
    pl->cap = cap;
    pl->nfree = 0;
    return pl->free ? 0 : -1;
}

static void pool_destroy(struct pool *pl)
{
    free(pl->free);
    pthread_mutex_destroy(&pl->mu);
    pthread_cond_destroy(&pl->cv);
}

static void pool_put(struct pool *pl, void *item)
{
    pthread_mutex_lock(&pl->mu);
    pl->free[pl->nfree++] = item;
    pthread_cond_signal(&pl->cv);
    pthread_mutex_unlock(&pl->mu);
}

/* Blocks until an item is free; NULL when the job stops. */
static void *pool_get(struct vmr_pipeline *p, struct pool *pl)
{
    void *item = NULL;
    pthread_mutex_lock(&pl->mu);
    while (pl->nfree == 0 && !LOAD(p->stop))
        pthread_cond_wait(&pl->cv, &pl->mu);
    if (pl->nfree > 0 && !LOAD(p->stop))
        item = pl->free[--pl->nfree];
    pthread_mutex_unlock(&pl->mu);
    return item;
}

static int queue_init(struct queue *q, size_t cap)
{
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    q->ring = calloc(cap ? cap : 1, sizeof(struct slot *));
    q->cap = cap ? cap : 1;
    q->head = q->count = 0;
    q->closed = 0;
    return q->ring ? 0 : -1;
}

static void queue_destroy(struct queue *q)
{
    free(q->ring);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
}

/* The ring holds every slot at once, so a push never waits. */
static void queue_push(struct queue *q, struct slot *s)
{
    pthread_mutex_lock(&q->mu);
    q->ring[(q->head + q->count) % q->cap] = s;
    q->count++;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

static void queue_close(struct queue *q)
{
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

static void queue_wake(struct queue *q)
{
    pthread_mutex_lock(&q->mu);
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

/* Pop one slot. timeout_ms < 0: wait until an item or close; 0: don't wait.
 * *finished is set when the queue is closed and empty. */
static struct slot *queue_pop(struct queue *q, int timeout_ms, int *finished)
{
    struct slot *s = NULL;
    *finished = 0;
    pthread_mutex_lock(&q->mu);
    if (q->count == 0 && !q->closed && timeout_ms != 0) {
        if (timeout_ms < 0) {
            while (q->count == 0 && !q->closed)
                pthread_cond_wait(&q->cv, &q->mu);
        } else {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += (long)timeout_ms * 1000000L;
            ts.tv_sec += ts.tv_nsec / 1000000000L;
            ts.tv_nsec %= 1000000000L;
            pthread_cond_timedwait(&q->cv, &q->mu, &ts);
        }
    }
    if (q->count > 0) {
        s = q->ring[q->head];
        q->head = (q->head + 1) % q->cap;
        q->count--;
    } else if (q->closed) {
        *finished = 1;
    }
    pthread_mutex_unlock(&q->mu);
    return s;
}

/* ------------------------------------------------------------- bookkeeping */

static void mark_done(struct vmr_pipeline *p, size_t idx)
{
    pthread_mutex_lock(&p->done_mu);
    p->done[idx] = 1;
    size_t k = p->prefix;
    while (k < p->n && p->done[k])
        k++;
    p->prefix = k;
    __atomic_store_n(&p->c.completed_prefix, (uint64_t)k, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&p->done_mu);
    ADD(p->c.entries_done, 1);
}

static void do_stop(struct vmr_pipeline *p)
{
    if (__atomic_exchange_n(&p->stop, 1, __ATOMIC_ACQ_REL) == 0) {
        if (p->src->ops->struct_size >= offsetof(struct vmr_source_ops, cancel) + sizeof(void *) &&
            p->src->ops->cancel != NULL)
            p->src->ops->cancel(p->src->s);   /* wake readers blocked on the network */
        if (p->wr->ops->struct_size >= offsetof(struct vmr_writer_ops, cancel) + sizeof(void *) &&
            p->wr->ops->cancel != NULL)
            p->wr->ops->cancel(p->wr->w);     /* and lanes waiting for a silent target */
    }
    /* wake everyone who might wait */
    pthread_mutex_lock(&p->slot_pool.mu);
    pthread_cond_broadcast(&p->slot_pool.cv);
    pthread_mutex_unlock(&p->slot_pool.mu);
    pthread_mutex_lock(&p->cbuf_pool.mu);
    pthread_cond_broadcast(&p->cbuf_pool.cv);
    pthread_mutex_unlock(&p->cbuf_pool.mu);
    queue_wake(&p->dq);
    queue_wake(&p->wq);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

/* Record the first error (filling in index/offset when the reporter did not) and stop. */
static void fail(struct vmr_pipeline *p, const struct vmr_error *e, int64_t index, uint64_t off)
{
    pthread_mutex_lock(&p->mu);
    if (p->err.code == VMR_OK) {
        p->err = *e;
        if (p->err.code == VMR_OK)
            p->err.code = VMR_E_INTERNAL;
        if (p->err.plan_index < 0)
            p->err.plan_index = index;
        if (p->err.offset == UINT64_MAX)
            p->err.offset = off;
    }
    pthread_mutex_unlock(&p->mu);
    do_stop(p);
}

static void failf(struct vmr_pipeline *p, int code, int64_t index, uint64_t off,
                  const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void failf(struct vmr_pipeline *p, int code, int64_t index, uint64_t off,
                  const char *fmt, ...)
{
    struct vmr_error e;
    error_init(&e);
    e.code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.msg, sizeof e.msg, fmt, ap);
    va_end(ap);
    fail(p, &e, index, off);
}

static void thread_exit(struct vmr_pipeline *p)
{
    pthread_mutex_lock(&p->mu);
    if (--p->threads_alive == 0) {
        p->ended = 1;
        p->t_end = now_ns();
        pthread_cond_broadcast(&p->cv);
    }
    pthread_mutex_unlock(&p->mu);
}

/* ------------------------------------------------------------------ reader */

/* The rate limit: the bytes let through before this entry are due at
 * t_start + before / max_rate; wait until then in short sleeps, so a cancel
 * is seen within 20 ms. Readers share one count, so the limit is per job. */
#define THROTTLE_SLICE_NS 20000000ull

static void throttle(struct vmr_pipeline *p, uint64_t length)
{
    uint64_t before = __atomic_fetch_add(&p->rate_bytes, length, __ATOMIC_RELAXED);
    uint64_t due = p->t_start +
        (uint64_t)((unsigned __int128)before * 1000000000u / p->cfg.max_rate);
    uint64_t t0 = now_ns(), t = t0;
    while (t < due && !LOAD(p->stop)) {
        uint64_t ns = due - t < THROTTLE_SLICE_NS ? due - t : THROTTLE_SLICE_NS;
        struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
        nanosleep(&ts, NULL);
        t = now_ns();
    }
    if (t > t0)
        ADD(p->c.throttle_ns, t - t0);
}

/* Read one plan entry into a slot and queue it. 0 = go on, -1 = stop reading. */
static int read_entry(struct vmr_pipeline *p, void *rh, size_t i)
{
    const struct vmr_plan_entry *pe = &p->plan[i];
    if (pe->kind == VMR_KIND_ZERO && p->wr->target_zeroed) {
        ADD(p->c.bytes_skipped, pe->length);
        mark_done(p, i);
        return 0;
    }
    struct slot *s = pool_get(p, &p->slot_pool);
    if (s == NULL)
        return -1;
    s->idx = i;
    s->cbuf = NULL;
    s->failed = 0;
    if (pe->kind == VMR_KIND_ZERO) {
        queue_push(&p->wq, s);
        return 0;
    }
    if (p->cfg.max_rate)
        throttle(p, pe->length);
    unsigned char *dst = s->buf;
    if (pe->codec != VMR_CODEC_NONE) {
        s->cbuf = pool_get(p, &p->cbuf_pool);
        if (s->cbuf == NULL) {
            pool_put(&p->slot_pool, s);
            return -1;
        }
        dst = s->cbuf;
    }
    struct vmr_error e;
    error_init(&e);
    uint64_t t0 = now_ns();
    int rc = p->src->ops->pread(rh, dst, pe->stored_len, pe->src_off, pe->src, 0, &e);
    ADD(p->c.read_ns, now_ns() - t0);
    if (rc != 0) {
        if (e.code == VMR_OK)
            e.code = VMR_E_SOURCE;
        fail(p, &e, (int64_t)i, pe->dst_off);
        if (s->cbuf)
            pool_put(&p->cbuf_pool, s->cbuf);
        pool_put(&p->slot_pool, s);
        return -1;
    }
    ADD(p->c.bytes_read, pe->stored_len);
    queue_push(&p->dq, s);
    return 0;
}

/* A source with lookahead (a network source) is told what comes next: the
 * reader claims CLAIM entries at a time and hints the data entries of every
 * claimed chunk while the hinted-but-unread bytes stay under lookahead, so
 * the source can keep requests in flight. Chunks are claimed in plan order
 * by all readers together; each reader reads its chunks in the order hinted. */
#define CLAIM 32
#define MAX_CHUNKS 256

static void reader_hinted(struct vmr_pipeline *p, void *rh)
{
    size_t ring[MAX_CHUNKS];
    size_t head = 0, count = 0, i = 0, end = 0;
    uint64_t hinted = 0, consumed = 0;
    int exhausted = 0;
    while (!LOAD(p->stop)) {
        /* keep `lookahead` bytes announced beyond what was read */
        while (!exhausted && count < MAX_CHUNKS && hinted - consumed < p->src->lookahead) {
            size_t a = __atomic_fetch_add(&p->next_entry, CLAIM, __ATOMIC_RELAXED);
            if (a >= p->n) {
                exhausted = 1;
                break;
            }
            size_t b = a + CLAIM < p->n ? a + CLAIM : p->n;
            for (size_t k = a; k < b; k++) {
                const struct vmr_plan_entry *pe = &p->plan[k];
                if (pe->kind == VMR_KIND_DATA) {
                    p->src->ops->hint(rh, pe->src, pe->src_off, pe->stored_len);
                    hinted += pe->stored_len;
                }
            }
            ring[(head + count) % MAX_CHUNKS] = a;
            count++;
        }
        if (i == end) {
            if (count == 0)   /* all read, hinted == consumed: the plan is exhausted */
                break;
            i = ring[head];
            end = i + CLAIM < p->n ? i + CLAIM : p->n;
            head = (head + 1) % MAX_CHUNKS;
            count--;
        }
        if (read_entry(p, rh, i) != 0)
            return;
        if (p->plan[i].kind == VMR_KIND_DATA)
            consumed += p->plan[i].stored_len;
        i++;
    }
}

#define CMP_CLAIM 16

/* Compare mode: does the target already hold entry i (compare.h)? The target
 * is read into a slot's aligned buffer and hashed there. 1 = it does (the
 * entry is done), 0 = restore it, -1 = stop. */
static int compare_first(struct vmr_pipeline *p, void *ch, size_t i)
{
    const struct vmr_plan_entry *pe = &p->plan[i];
    struct slot *s = pool_get(p, &p->slot_pool);
    if (s == NULL)
        return -1;
    struct vmr_error e;
    error_init(&e);
    struct vmr_cmp_cost cost = {0, 0};
    uint64_t t0 = now_ns();
    int rc = vmr_compare_entry(p->wr->ops, ch, pe, s->buf, p->blk_cap, &cost, &e);
    ADD(p->c.compare_ns, now_ns() - t0);
    pool_put(&p->slot_pool, s);
    ADD(p->c.cmp_bytes_read, cost.bytes_read);
    ADD(p->c.cmp_known_zero, cost.bytes_known_zero);
    if (rc < 0) {
        if (e.code == VMR_OK)
            e.code = VMR_E_TARGET;
        fail(p, &e, (int64_t)i, pe->dst_off);
        return -1;
    }
    ADD(p->c.cmp_entries, 1);
    if (rc == VMR_CMP_SAME) {
        ADD(p->c.bytes_same, pe->length);
        mark_done(p, i);
        return 1;
    }
    ADD(p->c.cmp_differ, 1);
    return 0;
}

static void *reader_main(void *arg)
{
    struct vmr_pipeline *p = arg;
    int ri = __atomic_fetch_add(&p->reader_seq, 1, __ATOMIC_RELAXED);
    struct vmr_error e;
    error_init(&e);
    void *rh = p->src->ops->open_reader(p->src->s, ri, &e);
    void *ch = NULL;   /* compare mode: this reader's read handle on the target */
    if (rh != NULL && p->cfg.compare &&
        (ch = p->wr->ops->open_read(p->wr->w, ri, &e)) == NULL) {
        if (e.code == VMR_OK)
            e.code = VMR_E_TARGET;
        fail(p, &e, -1, UINT64_MAX);
    } else if (rh == NULL) {
        fail(p, &e, -1, UINT64_MAX);
    } else if (p->src->lookahead > 0 && p->src->ops->hint != NULL && !p->cfg.compare) {
        reader_hinted(p, rh);
    } else {
        /* compare mode: a reader takes CMP_CLAIM consecutive entries at a time, so each
         * reads a sequential run of the target (readahead is not split between readers) */
        size_t claim = ch != NULL ? CMP_CLAIM : 1, i = 0, end = 0;
        while (!LOAD(p->stop)) {
            if (i == end) {
                i = __atomic_fetch_add(&p->next_entry, claim, __ATOMIC_RELAXED);
                if (i >= p->n)
                    break;
                end = i + claim < p->n ? i + claim : p->n;
            }
            int same = ch != NULL ? compare_first(p, ch, i) : 0;
            if (same < 0 || (same == 0 && read_entry(p, rh, i) != 0))
                break;
            i++;
        }
    }
    if (ch != NULL)
        p->wr->ops->close_read(ch);
    if (rh != NULL)
        p->src->ops->close_reader(rh);
    if (__atomic_sub_fetch(&p->readers_left, 1, __ATOMIC_ACQ_REL) == 0)
        queue_close(&p->dq);
    thread_exit(p);
    return NULL;
}

/* ------------------------------------------------------ decompress + verify */

static void release_slot(struct vmr_pipeline *p, struct slot *s)
{
    if (s->cbuf) {
        pool_put(&p->cbuf_pool, s->cbuf);
        s->cbuf = NULL;
    }
    pool_put(&p->slot_pool, s);
}

static void *worker_main(void *arg)
{
    struct vmr_pipeline *p = arg;
    void *dctx = vmr_dctx_new();
    int finished = 0;
    for (;;) {
        struct slot *s = queue_pop(&p->dq, -1, &finished);
        if (s == NULL)
            break;
        if (LOAD(p->stop)) {
            release_slot(p, s);
            continue;
        }
        const struct vmr_plan_entry *pe = &p->plan[s->idx];
        uint64_t t0 = now_ns();
        int bad = 0;
        if (pe->codec != VMR_CODEC_NONE) {
            int rc = vmr_decompress_dctx(dctx, pe->codec, s->cbuf, pe->stored_len, s->buf,
                                         pe->length);
            pool_put(&p->cbuf_pool, s->cbuf);
            s->cbuf = NULL;
            if (rc != 0) {
                failf(p, VMR_E_CHECKSUM, (int64_t)s->idx, pe->dst_off,
                      "disk %u block %llu (disk offset %llu): stored extent at offset %llu of "
                      "chain file %u does not decompress (codec %u, %u bytes)",
                      p->cfg.disk, (unsigned long long)pe->block,
                      (unsigned long long)pe->dst_off, (unsigned long long)pe->src_off,
                      (unsigned)pe->src, (unsigned)pe->codec, (unsigned)pe->stored_len);
                bad = 1;
            }
        }
        if (!bad) {
            uint64_t lo, hi;
            vmr_xxh3_128(s->buf, pe->length, &lo, &hi);
            if (lo != pe->xxh_lo || hi != pe->xxh_hi) {
                failf(p, VMR_E_CHECKSUM, (int64_t)s->idx, pe->dst_off,
                      "disk %u block %llu (disk offset %llu): checksum mismatch in the extent "
                      "at offset %llu of chain file %u",
                      p->cfg.disk, (unsigned long long)pe->block,
                      (unsigned long long)pe->dst_off, (unsigned long long)pe->src_off,
                      (unsigned)pe->src);
                bad = 1;
            }
        }
        ADD(p->c.decompress_ns, now_ns() - t0);
        if (bad) {
            release_slot(p, s);
            continue;
        }
        ADD(p->c.bytes_decompressed, pe->length);
        queue_push(&p->wq, s);
    }
    vmr_dctx_free(dctx);
    if (__atomic_sub_fetch(&p->workers_left, 1, __ATOMIC_ACQ_REL) == 0)
        queue_close(&p->wq);
    thread_exit(p);
    return NULL;
}

/* ------------------------------------------------------------------ lanes */

static void slot_finish(struct vmr_pipeline *p, struct slot *s)
{
    if (!s->failed && !LOAD(p->stop))
        mark_done(p, s->idx);
    release_slot(p, s);
}

static void request_done(struct lane *L, struct slot *s, uint64_t off, uint32_t count, int zero,
                         const struct vmr_error *e)
{
    struct vmr_pipeline *p = L->p;
    if (e != NULL && e->code != VMR_OK) {
        s->failed = 1;
        struct vmr_error ee = *e;
        if (ee.code == VMR_OK)
            ee.code = VMR_E_TARGET;
        fail(p, &ee, (int64_t)s->idx, off);
    } else if (e != NULL) {
        /* a writer that reports failure with an empty error */
        s->failed = 1;
        failf(p, VMR_E_TARGET, (int64_t)s->idx, off,
              "disk %u: %s writer failed at disk offset %llu", p->cfg.disk,
              p->wr->ops->name, (unsigned long long)off);
    } else if (zero) {
        ADD(p->c.bytes_zeroed, count);
    } else {
        ADD(p->c.bytes_written, count);
    }
    if (--s->pending == 0 && !s->issuing)
        slot_finish(p, s);
}

static void async_cb(void *data, const struct vmr_error *err)
{
    struct request *r = data;
    struct lane *L = r->lane;
    struct slot *s = r->slot;
    uint64_t off = r->offset;
    uint32_t count = r->count;
    int zero = r->zero;
    r->next = L->free_req;
    L->free_req = r;
    L->inflight--;
    request_done(L, s, off, count, zero, err);
}

/* Issue the next chunk of s; returns 1 when s is completely issued. */
static int issue(struct lane *L, struct slot *s)
{
    struct vmr_pipeline *p = L->p;
    const struct vmr_writer_ops *ops = p->wr->ops;
    const struct vmr_plan_entry *pe = &p->plan[s->idx];
    uint64_t off = pe->dst_off + s->pos;
    uint64_t left = pe->length - s->pos;
    const void *buf;
    uint32_t count;
    int zero_req = 0;
    uint32_t flags = 0;
    if (pe->kind == VMR_KIND_DATA) {
        buf = s->buf;
        count = (uint32_t)pe->length;
    } else if (p->can_zero) {
        zero_req = 1;
        buf = NULL;
        count = left > p->max_request ? p->max_request : (uint32_t)left;
        if (p->can_trim)
            flags |= VMR_F_MAY_TRIM;
        if (p->can_fast_zero)
            flags |= VMR_F_FAST_ZERO;
    } else {
        buf = p->zero_buf;
        count = left > ZERO_BUF_SIZE ? ZERO_BUF_SIZE : (uint32_t)left;
    }
    s->pos += count;
    s->pending++;
    struct vmr_error e;
    error_init(&e);
    int rc;
    uint64_t t0 = now_ns();
    if (p->async) {
        struct request *r = L->free_req;
        L->free_req = r->next;
        r->lane = L;
        r->slot = s;
        r->offset = off;
        r->count = count;
        r->zero = zero_req;
        L->inflight++;
        struct vmr_completion cb = {async_cb, r};
        if (zero_req)
            rc = ops->submit_zero(L->h, count, off, flags, cb, &e);
        else
            rc = ops->submit_pwrite(L->h, buf, count, off, flags, cb, &e);
        ADD(p->c.write_ns, now_ns() - t0);
        if (rc != 0) {
            /* not submitted: no callback will come */
            r->next = L->free_req;
            L->free_req = r;
            L->inflight--;
            request_done(L, s, off, count, zero_req, &e);
        }
    } else {
        if (zero_req)
            rc = ops->zero(L->h, count, off, flags, &e);
        else
            rc = ops->pwrite(L->h, buf, count, off, flags, &e);
        ADD(p->c.write_ns, now_ns() - t0);
        request_done(L, s, off, count, zero_req, rc ? &e : NULL);
    }
    return s->pos >= pe->length;
}

static int lane_poll(struct lane *L, int timeout_ms)
{
    struct vmr_pipeline *p = L->p;
    struct vmr_error e;
    error_init(&e);
    uint64_t t0 = now_ns();
    int rc = p->wr->ops->poll(L->h, timeout_ms, &e);
    ADD(p->c.write_ns, now_ns() - t0);
    if (rc < 0) {
        if (e.code == VMR_OK)
            e.code = VMR_E_TRANSPORT;
        fail(p, &e, -1, UINT64_MAX);
        return -1;
    }
    return 0;
}

/* Wait for every request of this lane; -1 if the lane broke. */
static int lane_drain(struct lane *L)
{
    while (L->inflight > 0)
        if (lane_poll(L, 1000) < 0)
            return -1;
    return 0;
}

static void lane_flush(struct lane *L, uint64_t gen)
{
    struct vmr_pipeline *p = L->p;
    struct vmr_error e;
    error_init(&e);
    int rc = 0;
    if (p->async && lane_drain(L) < 0)
        rc = -1;
    if (rc == 0 && p->can_flush) {
        uint64_t t0 = now_ns();
        rc = p->wr->ops->flush(L->h, 0, &e);
        ADD(p->c.write_ns, now_ns() - t0);
        if (rc != 0 && e.code == VMR_OK)
            vmr_error_set(&e, VMR_E_TARGET, 0, UINT64_MAX, "flush failed");
    }
    pthread_mutex_lock(&p->mu);
    if (rc != 0 && p->flush_err.code == VMR_OK)
        p->flush_err = e;
    L->flush_ack = gen;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    if (rc != 0)
        fail(p, &e, -1, UINT64_MAX);
}

static void *lane_main(void *arg)
{
    struct lane *L = arg;
    struct vmr_pipeline *p = L->p;
    int qd = p->async ? (int)p->cfg.queue_depth : 1;
    struct slot *cur = NULL;
    int finished = 0;
    for (;;) {
        uint64_t req = __atomic_load_n(&p->flush_req, __ATOMIC_ACQUIRE);
        if (req > L->flush_ack)
            lane_flush(L, req);
        if (LOAD(p->stop) && cur != NULL) {
            cur->failed = 1;
            cur->issuing = 0;
            if (cur->pending == 0)
                slot_finish(p, cur);
            cur = NULL;
        }
        if (cur == NULL && L->inflight < qd && !finished) {
            cur = queue_pop(&p->wq, L->inflight ? 0 : 50, &finished);
            if (cur != NULL) {
                cur->pos = 0;
                cur->pending = 0;
                cur->issuing = 1;
                if (LOAD(p->stop)) {
                    cur->issuing = 0;
                    slot_finish(p, cur);
                    cur = NULL;
                }
            }
        }
        if (cur != NULL && L->inflight < qd) {
            struct slot *s = cur;
            if (issue(L, s)) {
                cur = NULL;
                s->issuing = 0;
                if (s->pending == 0)
                    slot_finish(p, s);
            }
            continue;
        }
        if (L->inflight > 0) {
            if (lane_poll(L, 50) < 0)
                break;
            continue;
        }
        if (finished && cur == NULL)
            break;
    }
    if (cur != NULL) {
        cur->failed = 1;
        cur->issuing = 0;
        if (cur->pending == 0)
            slot_finish(p, cur);
    }
    if (L->inflight > 0)
        lane_drain(L);
    /* final flush: everything this lane wrote is durable before the job ends */
    if (!LOAD(p->stop))
        lane_flush(L, UINT64_MAX);
    struct vmr_error e;
    error_init(&e);
    if (p->wr->ops->close_lane(L->h, &e) != 0 && !LOAD(p->stop))
        fail(p, &e, -1, UINT64_MAX);
    L->h = NULL;
    pthread_mutex_lock(&p->mu);
    L->flush_ack = UINT64_MAX;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    thread_exit(p);
    return NULL;
}

/* ------------------------------------------------------------------ public */

static uint32_t clampu(uint32_t v, uint32_t lo, uint32_t hi, uint32_t dflt)
{
    if (v == 0)
        v = dflt;
    return v < lo ? lo : (v > hi ? hi : v);
}

/* The block buffers, on 2 MiB pages where the kernel has them (THP "madvise" mode).
 *
 * Why: every block passes through these buffers four times (pread or
 * decompress into, hash, send out of), 1.2 GiB per 2 GiB restore; on 4 KiB
 * pages that is ~300 000 TLB misses per pass, each a two-dimensional page walk
 * inside a VM. Memory the kernel cannot give as huge pages stays 4 KiB pages. */
static unsigned char *pool_alloc(size_t n)
{
    const size_t huge = (size_t)2 << 20;
    void *m = NULL;
    if (n >= huge) {
        if (posix_memalign(&m, huge, n) != 0)
            return NULL;
#ifdef MADV_HUGEPAGE
        (void)madvise(m, n, MADV_HUGEPAGE);
#endif
        return m;
    }
    return posix_memalign(&m, VMR_ALIGN, n) == 0 ? m : NULL;
}

struct vmr_pipeline *vmr_pipeline_create(const struct vmr_plan_entry *plan, size_t n,
                                         struct vmr_source *src, struct vmr_writer *wr,
                                         const struct vmr_pipeline_config *cfg,
                                         struct vmr_error *err)
{
    if (wr == NULL || wr->ops == NULL || src == NULL || src->ops == NULL) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, UINT64_MAX, "pipeline: no writer or source");
        return NULL;
    }
    if (wr->ops->abi_version != VMR_WRITER_ABI_VERSION ||
        wr->ops->struct_size < offsetof(struct vmr_writer_ops, poll) + sizeof(void *)) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, UINT64_MAX,
                      "writer '%s' has ABI %u, this core speaks %u", wr->ops->name,
                      wr->ops->abi_version, VMR_WRITER_ABI_VERSION);
        return NULL;
    }
    if (cfg->compare && (!VMR_WRITER_CAN_READ(wr->ops) || wr->target_zeroed)) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, UINT64_MAX,
                      "disk %u: quick rollback needs a target it can read (writer '%s' %s)",
                      cfg->disk, wr->ops->name,
                      wr->target_zeroed ? "is marked as reading zeros" : "has no read side");
        return NULL;
    }
    uint64_t tsize = wr->ops->get_size(wr->w);
    size_t blk = 4096, cb = 0;
    int any_compressed = 0;
    for (size_t i = 0; i < n; i++) {
        const struct vmr_plan_entry *pe = &plan[i];
        if (pe->kind != VMR_KIND_ZERO && pe->kind != VMR_KIND_DATA) {
            vmr_error_set(err, VMR_E_INTERNAL, 0, pe->dst_off, "plan entry %zu: unknown kind %u",
                          i, (unsigned)pe->kind);
            return NULL;
        }
        if (pe->length == 0 || pe->dst_off + pe->length < pe->dst_off ||
            pe->dst_off + pe->length > tsize) {
            vmr_error_set(err, VMR_E_TARGET, 0, pe->dst_off,
                          "disk %u: the plan writes [%llu, %llu) but the target holds %llu bytes",
                          cfg->disk, (unsigned long long)pe->dst_off,
                          (unsigned long long)(pe->dst_off + pe->length),
                          (unsigned long long)tsize);
            return NULL;
        }
        if (pe->kind == VMR_KIND_DATA) {
            if (pe->length > MAX_BLOCK || pe->stored_len > MAX_BLOCK + (MAX_BLOCK >> 4) ||
                (pe->codec == VMR_CODEC_NONE && pe->stored_len != pe->length)) {
                vmr_error_set(err, VMR_E_CHECKSUM, 0, pe->dst_off,
                              "disk %u block %llu: bad extent sizes (stored %u, raw %llu)",
                              cfg->disk, (unsigned long long)pe->block,
                              (unsigned)pe->stored_len, (unsigned long long)pe->length);
                return NULL;
            }
            if (pe->length > blk)
                blk = pe->length;
            if (pe->codec != VMR_CODEC_NONE) {
                any_compressed = 1;
                if (pe->stored_len > cb)
                    cb = pe->stored_len;
            }
        }
    }
    struct vmr_pipeline *p = calloc(1, sizeof *p);
    if (p == NULL) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&p->done_mu, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->plan = plan;
    p->n = n;
    p->src = src;
    p->wr = wr;
    p->cfg = *cfg;
    p->async = wr->ops->submit_pwrite && wr->ops->submit_zero && wr->ops->poll;
    p->can_zero = wr->ops->can_zero(wr->w);
    p->can_trim = wr->ops->can_trim(wr->w);
    p->can_fast_zero = wr->ops->can_fast_zero(wr->w);
    p->can_flush = wr->ops->can_flush(wr->w);
    p->max_request = wr->max_request ? wr->max_request : DEFAULT_MAX_REQUEST;
    p->max_request &= ~(uint32_t)4095;
    if (p->max_request == 0)
        p->max_request = 4096;
    p->cfg.readers = clampu(cfg->readers, 1, MAX_THREADS, 1);
    p->cfg.threads = clampu(cfg->threads, 1, MAX_THREADS, 2);
    p->cfg.lanes = clampu(cfg->lanes, 1, MAX_THREADS, 1);
    p->cfg.queue_depth = clampu(cfg->queue_depth, 1, 1024, 16);
    uint32_t per_lane = p->async ? p->cfg.queue_depth : 1;
    uint32_t auto_bufs = p->cfg.lanes * per_lane + 2 * p->cfg.threads + 2 * p->cfg.readers + 2;
    p->cfg.buffers = clampu(cfg->buffers, 2, 4096, auto_bufs);
    p->blk_cap = (blk + VMR_ALIGN - 1) & ~(size_t)(VMR_ALIGN - 1);
    p->cbuf_cap = (cb + VMR_ALIGN - 1) & ~(size_t)(VMR_ALIGN - 1);
    p->nslots = p->cfg.buffers;
    p->ncbufs = any_compressed ? p->cfg.threads + p->cfg.readers + 1 : 0;
    if (p->ncbufs > p->nslots)
        p->ncbufs = p->nslots;

    int ok = pool_init(&p->slot_pool, p->nslots) == 0 &&
             pool_init(&p->cbuf_pool, p->ncbufs) == 0 && queue_init(&p->dq, p->nslots) == 0 &&
             queue_init(&p->wq, p->nslots) == 0;
    p->slots = calloc(p->nslots, sizeof *p->slots);
    p->done = calloc(n ? n : 1, 1);
    if (!ok || p->slots == NULL || p->done == NULL ||
        (p->mem = pool_alloc(p->nslots * p->blk_cap)) == NULL ||
        posix_memalign((void **)&p->zero_buf, VMR_ALIGN, ZERO_BUF_SIZE) != 0 ||
        (p->ncbufs &&
         (p->cmem = pool_alloc(p->ncbufs * p->cbuf_cap)) == NULL)) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX,
                      "out of memory for %zu buffers of %zu bytes", p->nslots, p->blk_cap);
        vmr_pipeline_destroy(p);
        return NULL;
    }
    memset(p->zero_buf, 0, ZERO_BUF_SIZE);
    for (size_t i = 0; i < p->nslots; i++) {
        p->slots[i].buf = p->mem + i * p->blk_cap;
        pool_put(&p->slot_pool, &p->slots[i]);
    }
    for (size_t i = 0; i < p->ncbufs; i++)
        pool_put(&p->cbuf_pool, p->cmem + i * p->cbuf_cap);
    error_init(&p->err);
    error_init(&p->flush_err);
    p->c.entries_total = n;
    return p;
}

int vmr_pipeline_start(struct vmr_pipeline *p, struct vmr_error *err)
{
    if (p->started) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, UINT64_MAX, "pipeline already started");
        return -1;
    }
    p->started = 1;
    p->t_start = now_ns();
    /* Open the lanes here, so a target that refuses us fails before any thread runs. */
    p->lanes = calloc(p->cfg.lanes, sizeof *p->lanes);
    if (p->lanes == NULL) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        goto fail_early;
    }
    for (uint32_t i = 0; i < p->cfg.lanes; i++) {
        struct lane *L = &p->lanes[i];
        L->p = p;
        L->index = (int)i;
        L->h = p->wr->ops->open_lane(p->wr->w, (int)i, err);
        if (L->h == NULL) {
            if (err && err->code == VMR_OK)
                vmr_error_set(err, VMR_E_TARGET, 0, UINT64_MAX, "cannot open writer lane %u", i);
            goto fail_early;
        }
        p->nlanes = (int)i + 1;
        if (p->async) {
            L->reqs = calloc(p->cfg.queue_depth + 1, sizeof *L->reqs);
            if (L->reqs == NULL) {
                vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
                goto fail_early;
            }
            for (uint32_t k = 0; k <= p->cfg.queue_depth; k++) {
                L->reqs[k].next = L->free_req;
                L->free_req = &L->reqs[k];
            }
        }
    }
    p->readers_left = (int)p->cfg.readers;
    p->workers_left = (int)p->cfg.threads;
    p->threads_alive = (int)(p->cfg.readers + p->cfg.threads + p->cfg.lanes);
    /* Threads that fail to start are accounted as exited. */
    for (uint32_t i = 0; i < p->cfg.lanes; i++) {
        if (pthread_create(&p->lanes[i].thread, NULL, lane_main, &p->lanes[i]) == 0) {
            p->lanes[i].started = 1;
        } else {
            failf(p, VMR_E_INTERNAL, -1, UINT64_MAX, "cannot start writer thread");
            struct vmr_error e;
            error_init(&e);
            p->wr->ops->close_lane(p->lanes[i].h, &e);
            p->lanes[i].h = NULL;
            p->lanes[i].flush_ack = UINT64_MAX;
            thread_exit(p);
        }
    }
    for (uint32_t i = 0; i < p->cfg.threads; i++) {
        if (pthread_create(&p->workers[i], NULL, worker_main, p) == 0) {
            p->nworkers_started++;
        } else {
            failf(p, VMR_E_INTERNAL, -1, UINT64_MAX, "cannot start decompress thread");
            if (__atomic_sub_fetch(&p->workers_left, 1, __ATOMIC_ACQ_REL) == 0)
                queue_close(&p->wq);
            thread_exit(p);
        }
    }
    for (uint32_t i = 0; i < p->cfg.readers; i++) {
        if (pthread_create(&p->readers[i], NULL, reader_main, p) == 0) {
            __atomic_fetch_add(&p->nreaders_started, 1, __ATOMIC_RELAXED);
        } else {
            failf(p, VMR_E_INTERNAL, -1, UINT64_MAX, "cannot start reader thread");
            if (__atomic_sub_fetch(&p->readers_left, 1, __ATOMIC_ACQ_REL) == 0)
                queue_close(&p->dq);
            thread_exit(p);
        }
    }
    return 0;

fail_early:
    for (int i = 0; i < p->nlanes; i++) {
        struct vmr_error e;
        error_init(&e);
        if (p->lanes[i].h)
            p->wr->ops->close_lane(p->lanes[i].h, &e);
        p->lanes[i].h = NULL;
    }
    p->nlanes = 0;
    p->ended = 1;
    p->t_end = now_ns();
    return -1;
}

int vmr_pipeline_wait(struct vmr_pipeline *p, int timeout_ms)
{
    int ended;
    pthread_mutex_lock(&p->mu);
    if (!p->started) {
        pthread_mutex_unlock(&p->mu);
        return 1;
    }
    if (timeout_ms < 0) {
        while (!p->ended)
            pthread_cond_wait(&p->cv, &p->mu);
    } else if (!p->ended && timeout_ms > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += timeout_ms / 1000;
        ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        while (!p->ended) {
            if (pthread_cond_timedwait(&p->cv, &p->mu, &ts) == ETIMEDOUT)
                break;
        }
    }
    ended = p->ended;
    pthread_mutex_unlock(&p->mu);
    return ended;
}

void vmr_pipeline_cancel(struct vmr_pipeline *p)
{
    failf(p, VMR_E_INTERRUPTED, -1, UINT64_MAX, "disk %u: interrupted", p->cfg.disk);
}

int vmr_pipeline_flush(struct vmr_pipeline *p, int timeout_ms, struct vmr_error *err)
{
    pthread_mutex_lock(&p->mu);
    if (!p->started || p->ended) {
        /* an ended job flushed every lane at its end, unless it failed (then it did not) */
        int rc = 0;
        if (p->started && p->err.code != VMR_OK) {
            if (err)
                *err = p->err;
            rc = -1;
        }
        pthread_mutex_unlock(&p->mu);
        return rc;
    }
    uint64_t gen = __atomic_add_fetch(&p->flush_req, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&p->mu);
    queue_wake(&p->wq);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (timeout_ms < 0)
        timeout_ms = 3600 * 1000;
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    ts.tv_sec += ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        int all = 1;
        for (int i = 0; i < p->nlanes; i++)
            if (p->lanes[i].flush_ack < gen)
                all = 0;
        if (all)
            break;
        if (p->ended || p->stop) {
            break;
        }
        if (pthread_cond_timedwait(&p->cv, &p->mu, &ts) == ETIMEDOUT) {
            vmr_error_set(err, VMR_E_TRANSPORT, 0, UINT64_MAX,
                          "disk %u: flush did not complete in %d ms", p->cfg.disk, timeout_ms);
            rc = -1;
            break;
        }
    }
    if (rc == 0 && p->flush_err.code != VMR_OK) {
        if (err)
            *err = p->flush_err;
        rc = -1;
    }
    if (rc == 0 && p->err.code != VMR_OK) {
        if (err)
            *err = p->err;
        rc = -1;
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

void vmr_pipeline_counters(struct vmr_pipeline *p, struct vmr_counters *out)
{
    out->bytes_read = LOAD(p->c.bytes_read);
    out->bytes_decompressed = LOAD(p->c.bytes_decompressed);
    out->bytes_written = LOAD(p->c.bytes_written);
    out->bytes_zeroed = LOAD(p->c.bytes_zeroed);
    out->bytes_skipped = LOAD(p->c.bytes_skipped);
    out->read_ns = LOAD(p->c.read_ns);
    out->decompress_ns = LOAD(p->c.decompress_ns);
    out->write_ns = LOAD(p->c.write_ns);
    out->entries_done = LOAD(p->c.entries_done);
    out->completed_prefix = LOAD(p->c.completed_prefix);
    out->entries_total = p->n;
    pthread_mutex_lock(&p->mu);
    uint64_t end = p->ended ? p->t_end : now_ns();
    out->running = p->started && !p->ended;
    out->elapsed_ns = p->started ? end - p->t_start : 0;
    pthread_mutex_unlock(&p->mu);
    out->readers = p->cfg.readers;
    out->threads = p->cfg.threads;
    out->lanes = p->cfg.lanes;
    out->queue_depth = p->cfg.queue_depth;
    out->buffers = (uint32_t)p->nslots;
    out->cmp_entries = LOAD(p->c.cmp_entries);
    out->cmp_differ = LOAD(p->c.cmp_differ);
    out->cmp_bytes_read = LOAD(p->c.cmp_bytes_read);
    out->cmp_known_zero = LOAD(p->c.cmp_known_zero);
    out->bytes_same = LOAD(p->c.bytes_same);
    out->compare_ns = LOAD(p->c.compare_ns);
    out->throttle_ns = LOAD(p->c.throttle_ns);
}

int vmr_pipeline_error(struct vmr_pipeline *p, struct vmr_error *out)
{
    pthread_mutex_lock(&p->mu);
    if (out)
        *out = p->err;
    int code = p->err.code;
    pthread_mutex_unlock(&p->mu);
    return code;
}

void vmr_pipeline_destroy(struct vmr_pipeline *p)
{
    if (p == NULL)
        return;
    if (p->started && !p->ended) {
        vmr_pipeline_cancel(p);
        vmr_pipeline_wait(p, -1);
    }
    if (p->started) {
        for (int i = 0; i < p->nlanes; i++)
            if (p->lanes[i].started)
                pthread_join(p->lanes[i].thread, NULL);
        for (int i = 0; i < p->nworkers_started; i++)
            pthread_join(p->workers[i], NULL);
        for (int i = 0; i < p->nreaders_started; i++)
            pthread_join(p->readers[i], NULL);
    }
    pthread_mutex_destroy(&p->done_mu);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    if (p->lanes) {
        for (uint32_t i = 0; i < p->cfg.lanes; i++)
            free(p->lanes[i].reqs);
        free(p->lanes);
    }
    if (p->slot_pool.free)
        pool_destroy(&p->slot_pool);
    if (p->cbuf_pool.free)
        pool_destroy(&p->cbuf_pool);
    if (p->dq.ring)
        queue_destroy(&p->dq);
    if (p->wq.ring)
        queue_destroy(&p->wq);
    free(p->slots);
    free(p->done);
    free(p->mem);
    free(p->cmem);
    free(p->zero_buf);
    free(p);
}

/* ------------------------------------------------------ local fd source */

struct fd_source {
    int *fds;
    size_t n;
};

struct fd_reader {
    struct fd_source *s;
    uint64_t *ahead;         /* per file: end of the last WILLNEED hint */
};

#define READAHEAD (8ull << 20)

static void *fd_open_reader(void *s, int idx, struct vmr_error *err)
{
    struct fd_source *fs = s;
    struct fd_reader *r = calloc(1, sizeof *r);
    if (r)
        r->ahead = calloc(fs->n ? fs->n : 1, sizeof(uint64_t));
    if (r == NULL || r->ahead == NULL) {
        free(r);
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return NULL;
    }
    r->s = fs;
    return r;
}

static void fd_close_reader(void *reader)
{
    struct fd_reader *r = reader;
    free(r->ahead);
    free(r);
}

#include <fcntl.h>
#include <unistd.h>

static int fd_pread(void *reader, void *buf, uint32_t count, uint64_t offset, uint16_t src,
                    uint32_t flags, struct vmr_error *err)
{
    struct fd_reader *r = reader;
    if (src >= r->s->n) {
        vmr_error_set(err, VMR_E_SOURCE, 0, UINT64_MAX,
                      "plan names chain file %u but the job has %zu", (unsigned)src, r->s->n);
        return -1;
    }
    int fd = r->s->fds[src];
    if (offset + count > r->ahead[src] || offset + 2 * READAHEAD < r->ahead[src]) {
        /* ask the kernel for the next window while we decompress this one */
        posix_fadvise(fd, (off_t)offset, (off_t)READAHEAD, POSIX_FADV_WILLNEED);
        r->ahead[src] = offset + READAHEAD;
    }
    size_t done = 0;
    while (done < count) {
        ssize_t k = pread(fd, (char *)buf + done, count - done, (off_t)(offset + done));
        if (k < 0) {
            if (errno == EINTR)
                continue;
            vmr_error_set(err, VMR_E_SOURCE, errno, UINT64_MAX,
                          "chain file %u: read of %u bytes at offset %llu failed: %s",
                          (unsigned)src, count, (unsigned long long)offset, strerror(errno));
            return -1;
        }
        if (k == 0) {
            vmr_error_set(err, VMR_E_SOURCE, 0, UINT64_MAX,
                          "chain file %u: unexpected end of file at offset %llu",
                          (unsigned)src, (unsigned long long)(offset + done));
            return -1;
        }
        done += (size_t)k;
    }
    return 0;
}

static void fd_close(void *s)
{
    struct fd_source *fs = s;
    free(fs->fds);
    free(fs);
}

static const struct vmr_source_ops fd_source_ops = {
    .abi_version = VMR_SOURCE_ABI_VERSION,
    .struct_size = sizeof(struct vmr_source_ops),
    .name = "fd",
    .open_reader = fd_open_reader,
    .close_reader = fd_close_reader,
    .pread = fd_pread,
    .hint = NULL,
    .close = fd_close,
    .cancel = NULL,
};

int vmr_fd_source_open(const int *fds, size_t n, struct vmr_source *out, struct vmr_error *err)
{
    struct fd_source *fs = calloc(1, sizeof *fs);
    if (fs)
        fs->fds = calloc(n ? n : 1, sizeof(int));
    if (fs == NULL || fs->fds == NULL) {
        free(fs);
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return -1;
    }
    memcpy(fs->fds, fds, n * sizeof(int));
    fs->n = n;
    out->lookahead = 0;
    for (size_t i = 0; i < n; i++)
        posix_fadvise(fds[i], 0, 0, POSIX_FADV_SEQUENTIAL);
    out->ops = &fd_source_ops;
    out->s = fs;
    return 0;
}
