/* The VixDiskLib (VDDK) writer: the pipeline's writer interface (writer.h)
 * over VixDiskLib_WriteAsync, straight from the pipeline's aligned buffers.
 *
 * One lane (a VDDK disk handle is not shared between writers: can_multi_conn
 * is 0) with up to the pipeline's queue depth of requests in flight. A
 * request larger than max_request is split into several WriteAsync calls
 * ("parts", each knowing its own offset) and completes when the last one
 * does. The bytes the library holds are bounded by max_inflight: NFC buffers
 * on a host are small (docs/vddk.md), so a submit waits for completions
 * rather than exceed it.
 *
 * VixDiskLib may call a completion inside WriteAsync, later from its own
 * threads, or only inside Wait: we only queue the finished request there and
 * deliver it to the pipeline from poll(), on the lane thread, as writer.h
 * requires. Until a completion has come from a library thread, a poll or
 * submit that must wait calls Wait after a short time instead of sleeping on
 * callbacks that may never come by themselves.
 *
 * There is no write-zeroes in VixDiskLib: can_zero is 0, so the pipeline
 * writes zero runs from its zero buffer -- or skips them when the target is a
 * new disk (VMR_FILE_TARGET_ZEROED -> target_zeroed). flush = Wait + Flush.
 * Errors carry VixDiskLib's own text (GetErrorText/FreeErrorText), the disk
 * name and the byte offset.
 *
 * The read side (compare stage of a quick rollback) reads through the SAME
 * disk handle with the synchronous VixDiskLib_Read: a handle takes I/O from
 * one thread at a time and a synchronous call while asynchronous ones are
 * pending is refused (VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED). So every library
 * call on the handle (WriteAsync, Write, Read, Wait, Flush) runs under the
 * writer's io_mu, and a read first Waits for the writes in flight. Lock
 * order: io_mu, then the lane's mu (a completion may run inside a call made
 * under io_mu); nobody takes io_mu while holding the lane's mu.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../vixdisklib/vixdisklib.h"
#include "writer.h"
#include "writer_vddk.h"

#define SECTOR VIXDISKLIB_SECTOR_SIZE

/* Function-pointer types from the one VixDiskLib table. */
#define VDDK_FN_TYPE(ret, name, params) typedef ret(*name##_fn) params;
VMR_VIXDISKLIB_FUNCTIONS(VDDK_FN_TYPE, VDDK_FN_TYPE)

struct vddk_fns {
    VixDiskLib_WriteAsync_fn write_async;
    VixDiskLib_Write_fn write;
    VixDiskLib_Wait_fn wait;
    VixDiskLib_Flush_fn flush;
    VixDiskLib_Read_fn read;
    VixDiskLib_GetErrorText_fn get_error_text;
    VixDiskLib_FreeErrorText_fn free_error_text;
};

#define WAIT_FALLBACK_MS 20      /* no library thread seen yet: Wait after this */

struct vddk_lane;
struct vddk_req;

struct vddk_part {               /* one WriteAsync call: its cbData */
    struct vddk_req *req;
    uint64_t offset;
    uint32_t count;
};

struct vddk_req {
    struct vddk_req *next;       /* in the lane's done list */
    struct vddk_lane *lane;
    struct vmr_completion cb;
    uint64_t offset;
    uint32_t count;
    int parts_left;              /* WriteAsync calls not yet completed */
    VixError result;             /* first failure, VIX_OK if none */
    uint64_t fail_offset;        /* where the first failed part starts */
    uint32_t fail_count;         /* and its length */
    struct vddk_part parts[];
};

struct vddk_lane {
    struct vddk_writer *w;
    pthread_mutex_t mu;
    pthread_cond_t cv;           /* a part completed */
    struct vddk_req *done_head, *done_tail;
    int inflight;                /* submitted, not yet delivered by poll */
    uint64_t lib_bytes;          /* bytes of parts the library has not completed */
    uint32_t want;               /* the part submit waits to issue */
    pthread_t thread;            /* the lane thread (open_lane's caller) */
    int lib_threads;             /* a completion came from another thread */
};

struct vddk_writer {
    VixDiskLibHandle h;
    pthread_mutex_t io_mu;       /* held around every library call on h */
    struct vddk_fns fn;
    uint64_t size;
    uint32_t max_request;
    uint64_t max_inflight;       /* bytes the library may hold at once */
    int lane_open;
    struct vddk_lane lane;
    unsigned char *zeros;        /* max_request zeros, for submit_zero / zero */
    char disk[256];
};

/* Set while this thread is inside a Wait or Flush we called: a completion
 * running there says nothing about the library having threads of its own. */
static __thread int in_our_wait;

/* ---- errors --------------------------------------------------------------- */

static int is_transport_error(VixError e)
{
    uint64_t c = e & 0xFFFF;
    return c == VIX_E_HOST_NOT_CONNECTED || c == VIX_E_HOST_CONNECTION_LOST || c == 34 ||
           (c >= 14006 && c <= 14013) || (c >= 30000 && c < 31000);
}

static void vddk_error(struct vddk_writer *w, struct vmr_error *err, VixError e,
                       const char *call, uint64_t offset, uint32_t count)
{
    char *text = w->fn.get_error_text ? w->fn.get_error_text(e, NULL) : NULL;
    int code = is_transport_error(e) ? VMR_E_TRANSPORT : VMR_E_TARGET;
    int fresh = err != NULL && err->code == VMR_OK;
    if (count)
        vmr_error_set(err, code, 0, offset,
                      "disk %s: %s of %u bytes at offset %llu failed: %s (VixError %llu)",
                      w->disk, call, count, (unsigned long long)offset,
                      text ? text : "unknown error", (unsigned long long)(e & 0xFFFF));
    else
        vmr_error_set(err, code, 0, offset, "disk %s: %s failed: %s (VixError %llu)", w->disk,
                      call, text ? text : "unknown error", (unsigned long long)(e & 0xFFFF));
    if (fresh)
        err->vendor_code = (uint32_t)(e & 0xFFFF);
    if (text && w->fn.free_error_text)
        w->fn.free_error_text(text);
}

static int check_range(struct vddk_writer *w, const char *what, uint32_t count,
                       uint64_t offset, struct vmr_error *err)
{
    if (offset % SECTOR || count % SECTOR) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, offset,
                      "disk %s: VixDiskLib %ss whole sectors; got %u bytes at offset %llu",
                      w->disk, what, count, (unsigned long long)offset);
        return -1;
    }
    if (offset > w->size || count > w->size - offset) {
        vmr_error_set(err, VMR_E_TARGET, 0, offset,
                      "disk %s: %s of %u bytes at offset %llu is past its end (%llu bytes)",
                      w->disk, what, count, (unsigned long long)offset,
                      (unsigned long long)w->size);
        return -1;
    }
    return 0;
}

/* ---- async completion (VixDiskLib's threads) --------------------------------- */

/* A part is over (completed, or never issued: held = 0 bytes to give back). */
static void part_done(struct vddk_part *p, VixError result, uint32_t held)
{
    struct vddk_req *r = p->req;
    struct vddk_lane *L = r->lane;
    pthread_mutex_lock(&L->mu);
    if (!in_our_wait && !pthread_equal(pthread_self(), L->thread))
        L->lib_threads = 1;
    L->lib_bytes -= held;
    if (result != VIX_OK && r->result == VIX_OK) {
        r->result = result;
        r->fail_offset = p->offset;
        r->fail_count = p->count;
    }
    if (--r->parts_left == 0) {
        r->next = NULL;
        if (L->done_tail)
            L->done_tail->next = r;
        else
            L->done_head = r;
        L->done_tail = r;
    }
    pthread_cond_broadcast(&L->cv);
    pthread_mutex_unlock(&L->mu);
}

static void vddk_completion(void *cb_data, VixError result)
{
    struct vddk_part *p = cb_data;
    part_done(p, result, p->count);
}

/* VixDiskLib_Wait (flush = 1: then Flush) under io_mu; not with a lane's mu held. */
static VixError lib_wait(struct vddk_writer *w, int flush, const char **call)
{
    VixError e;
    pthread_mutex_lock(&w->io_mu);
    in_our_wait = 1;
    *call = "VixDiskLib_Wait";
    e = w->fn.wait(w->h);
    if (e == VIX_OK && flush) {
        *call = "VixDiskLib_Flush";
        e = w->fn.flush(w->h);
    }
    in_our_wait = 0;
    pthread_mutex_unlock(&w->io_mu);
    return e;
}

/* Wait (L->mu held) until ready(L) or timeout_ms (< 0: no limit). When no
 * completion has ever come from a library thread, the library may call back only
 * inside Wait: after WAIT_FALLBACK_MS we call it ourselves. Returns ready(L). */
static int lane_wait(struct vddk_lane *L, int timeout_ms, int (*ready)(struct vddk_lane *))
{
    struct timespec ts;
    int slice;
    while (!ready(L) && timeout_ms != 0) {
        slice = L->lib_threads ? timeout_ms : WAIT_FALLBACK_MS;
        if (timeout_ms > 0 && slice > timeout_ms)
            slice = timeout_ms;
        if (slice < 0) {
            pthread_cond_wait(&L->cv, &L->mu);
            continue;
        }
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += slice / 1000;
        ts.tv_nsec += (long)(slice % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        while (!ready(L))
            if (pthread_cond_timedwait(&L->cv, &L->mu, &ts) == ETIMEDOUT)
                break;
        if (ready(L))
            break;
        if (!L->lib_threads) {
            const char *call;
            pthread_mutex_unlock(&L->mu);
            lib_wait(L->w, 0, &call);  /* completions come inside it */
            pthread_mutex_lock(&L->mu);
        }
        if (timeout_ms > 0 && (timeout_ms -= slice) <= 0)
            break;
    }
    return ready(L);
}

static int has_done(struct vddk_lane *L) { return L->done_head != NULL; }

static int has_room(struct vddk_lane *L)
{
    return L->lib_bytes == 0 || L->lib_bytes + L->want <= L->w->max_inflight;
}

/* ---- writer ops ----------------------------------------------------------------- */

static uint64_t w_get_size(void *wp) { return ((struct vddk_writer *)wp)->size; }
static int w_no(void *wp) { (void)wp; return 0; }
static int w_yes(void *wp) { (void)wp; return 1; }

static void w_close(void *wp)
{
    struct vddk_writer *w = wp;
    pthread_mutex_destroy(&w->io_mu);
    pthread_mutex_destroy(&w->lane.mu);
    pthread_cond_destroy(&w->lane.cv);
    free(w->zeros);
    free(w);
}

static void *w_open_lane(void *wp, int lane_index, struct vmr_error *err)
{
    struct vddk_writer *w = wp;
    if (lane_index != 0 || w->lane_open) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, UINT64_MAX,
                      "disk %s: a VixDiskLib handle takes one writer lane", w->disk);
        return NULL;
    }
    w->lane_open = 1;
    w->lane.thread = pthread_self();
    return &w->lane;
}

static int w_close_lane(void *lp, struct vmr_error *err)
{
    struct vddk_lane *L = lp;
    struct vddk_writer *w = L->w;
    struct vddk_req *r;
    const char *call;
    (void)err;
    if (L->inflight > 0) {
        /* Only after a broken run: make sure VixDiskLib holds no buffer of ours. */
        lib_wait(w, 0, &call);
        pthread_mutex_lock(&L->mu);
        while ((r = L->done_head) != NULL) {
            L->done_head = r->next;
            free(r);
        }
        L->done_tail = NULL;
        L->inflight = 0;
        L->lib_bytes = 0;
        pthread_mutex_unlock(&L->mu);
    }
    w->lane_open = 0;
    return 0;
}

static int w_pwrite(void *lp, const void *buf, uint32_t count, uint64_t offset, uint32_t flags,
                    struct vmr_error *err)
{
    struct vddk_lane *L = lp;
    struct vddk_writer *w = L->w;
    const unsigned char *p = buf;
    (void)flags;
    if (check_range(w, "write", count, offset, err) != 0)
        return -1;
    for (uint32_t done = 0; done < count;) {
        uint32_t n = count - done > w->max_request ? w->max_request : count - done;
        VixError e;
        pthread_mutex_lock(&w->io_mu);
        e = w->fn.write(w->h, (offset + done) / SECTOR, n / SECTOR, p + done);
        pthread_mutex_unlock(&w->io_mu);
        if (e != VIX_OK) {
            vddk_error(w, err, e, "VixDiskLib_Write", offset + done, n);
            return -1;
        }
        done += n;
    }
    return 0;
}

static int w_zero(void *lp, uint32_t count, uint64_t offset, uint32_t flags,
                  struct vmr_error *err)
{
    struct vddk_lane *L = lp;
    struct vddk_writer *w = L->w;
    for (uint32_t done = 0; done < count;) {
        uint32_t n = count - done > w->max_request ? w->max_request : count - done;
        if (w_pwrite(lp, w->zeros, n, offset + done, flags, err) != 0)
            return -1;
        done += n;
    }
    return 0;
}

static int w_flush(void *lp, uint32_t flags, struct vmr_error *err)
{
    struct vddk_lane *L = lp;
    struct vddk_writer *w = L->w;
    const char *call;
    VixError e;
    (void)flags;
    if ((e = lib_wait(w, 1, &call)) != VIX_OK) {
        vddk_error(w, err, e, call, UINT64_MAX, 0);
        return -1;
    }
    return 0;
}

/* Submit buf (several WriteAsync calls if larger than max_request); every
 * outcome is delivered from poll(). `stride` 0 repeats the same buffer (zeros).
 * Before each call, the bytes the library holds stay within max_inflight. */
static int submit(struct vddk_lane *L, const unsigned char *buf, size_t stride, uint32_t count,
                  uint64_t offset, struct vmr_completion cb, struct vmr_error *err)
{
    struct vddk_writer *w = L->w;
    struct vddk_req *r;
    uint32_t parts, i;

    if (check_range(w, "write", count, offset, err) != 0)
        return -1;
    parts = count == 0 ? 1 : (count + w->max_request - 1) / w->max_request;
    if ((r = calloc(1, sizeof *r + parts * sizeof(struct vddk_part))) == NULL) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, offset, "disk %s: out of memory", w->disk);
        return -1;
    }
    r->lane = L;
    r->cb = cb;
    r->offset = offset;
    r->count = count;
    r->parts_left = (int)parts;
    for (i = 0; i < parts; i++) {
        uint32_t done = i * w->max_request;
        r->parts[i].req = r;
        r->parts[i].offset = offset + done;
        r->parts[i].count = count - done > w->max_request ? w->max_request : count - done;
    }
    L->inflight++;
    if (count == 0) {
        part_done(&r->parts[0], VIX_OK, 0);
        return 0;
    }
    for (i = 0; i < parts; i++) {
        struct vddk_part *p = &r->parts[i];
        const unsigned char *data = stride ? buf + (p->offset - offset) : buf;
        VixError e;
        pthread_mutex_lock(&L->mu);
        L->want = p->count;
        lane_wait(L, -1, has_room);
        L->lib_bytes += p->count;
        pthread_mutex_unlock(&L->mu);
        pthread_mutex_lock(&w->io_mu);
        e = w->fn.write_async(w->h, p->offset / SECTOR, p->count / SECTOR, data,
                              vddk_completion, p);
        pthread_mutex_unlock(&w->io_mu);
        if (e == VIX_ASYNC)
            continue;
        /* Completed (or refused) synchronously: no callback will come for it,
         * nor for the parts we now do not issue. */
        part_done(p, e, p->count);
        if (e != VIX_OK) {
            for (i++; i < parts; i++)
                part_done(&r->parts[i], e, 0);
            break;
        }
    }
    return 0;
}

static int w_submit_pwrite(void *lp, const void *buf, uint32_t count, uint64_t offset,
                           uint32_t flags, struct vmr_completion cb, struct vmr_error *err)
{
    (void)flags;
    return submit(lp, buf, 1, count, offset, cb, err);
}

static int w_submit_zero(void *lp, uint32_t count, uint64_t offset, uint32_t flags,
                         struct vmr_completion cb, struct vmr_error *err)
{
    struct vddk_lane *L = lp;
    (void)flags;
    return submit(L, L->w->zeros, 0, count, offset, cb, err);
}

static int w_poll(void *lp, int timeout_ms, struct vmr_error *err)
{
    struct vddk_lane *L = lp;
    struct vddk_writer *w = L->w;
    struct vddk_req *list, *r;
    (void)err;

    pthread_mutex_lock(&L->mu);
    if (L->inflight > 0)
        lane_wait(L, timeout_ms, has_done);
    list = L->done_head;
    L->done_head = L->done_tail = NULL;
    pthread_mutex_unlock(&L->mu);

    while ((r = list) != NULL) {
        struct vmr_error e;
        list = r->next;
        L->inflight--;
        if (r->result != VIX_OK) {
            memset(&e, 0, sizeof e);
            e.plan_index = -1;
            e.offset = UINT64_MAX;
            vddk_error(w, &e, r->result, "VixDiskLib_WriteAsync", r->fail_offset,
                       r->fail_count);
            r->cb.fn(r->cb.data, &e);
        } else {
            r->cb.fn(r->cb.data, NULL);
        }
        free(r);
    }
    return L->inflight;
}

/* ---- the read side (compare readers; any thread, serialized by io_mu) --------- */

static void *w_open_read(void *wp, int index, struct vmr_error *err)
{
    (void)index;
    (void)err;
    return wp;  /* every reader shares the one handle: nothing to open */
}

static int w_pread(void *rh, void *buf, uint32_t count, uint64_t offset, struct vmr_error *err)
{
    struct vddk_writer *w = rh;
    unsigned char *p = buf;
    VixError e = VIX_OK;
    const char *call = "VixDiskLib_Read";
    uint32_t done = 0, n = 0;

    if (check_range(w, "read", count, offset, err) != 0)
        return -1;
    pthread_mutex_lock(&w->io_mu);
    in_our_wait = 1;
    e = w->fn.wait(w->h);  /* no synchronous call while writes are in flight */
    in_our_wait = 0;
    if (e != VIX_OK)
        call = "VixDiskLib_Wait";
    while (e == VIX_OK && done < count) {
        n = count - done > w->max_request ? w->max_request : count - done;
        if ((e = w->fn.read(w->h, (offset + done) / SECTOR, n / SECTOR, p + done)) == VIX_OK)
            done += n;
    }
    pthread_mutex_unlock(&w->io_mu);
    if (e != VIX_OK) {
        vddk_error(w, err, e, call, offset + done, n);
        return -1;
    }
    return 0;
}

static void w_close_read(void *rh) { (void)rh; }

static const struct vmr_writer_ops vddk_ops = {
    .abi_version = VMR_WRITER_ABI_VERSION,
    .struct_size = sizeof(struct vmr_writer_ops),
    .name = "vddk",
    .get_size = w_get_size,
    .can_zero = w_no,
    .can_fast_zero = w_no,
    .can_trim = w_no,
    .can_flush = w_yes,
    .can_multi_conn = w_no,
    .close = w_close,
    .open_lane = w_open_lane,
    .close_lane = w_close_lane,
    .pwrite = w_pwrite,
    .zero = w_zero,
    .flush = w_flush,
    .submit_pwrite = w_submit_pwrite,
    .submit_zero = w_submit_zero,
    .poll = w_poll,
    .open_read = w_open_read,
    .pread = w_pread,
    .known_zero = NULL,
    .close_read = w_close_read,
};

int vmr_vddk_writer_open(const struct vmr_vddk_options *opt, struct vmr_writer *out,
                         struct vmr_error *err)
{
    struct vddk_writer *w;
    const struct vmr_vddk_functions *f = &opt->fn;

    memset(out, 0, sizeof *out);
    if (opt->handle == 0 || !f->write_async || !f->write || !f->wait || !f->flush ||
        !f->get_error_text || !f->free_error_text || !f->read) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, UINT64_MAX,
                      "VDDK writer: a disk handle and the addresses of WriteAsync, Write, "
                      "Wait, Flush, GetErrorText, FreeErrorText and Read are required");
        return -1;
    }
    if (opt->size == 0 || opt->size % SECTOR) {
        vmr_error_set(err, VMR_E_TARGET, 0, UINT64_MAX,
                      "VDDK writer: disk %s has a size of %llu bytes, not whole sectors",
                      opt->disk ? opt->disk : "?", (unsigned long long)opt->size);
        return -1;
    }
    if ((w = calloc(1, sizeof *w)) == NULL) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "VDDK writer: out of memory");
        return -1;
    }
    w->h = (VixDiskLibHandle)opt->handle;
    w->fn.write_async = (VixDiskLib_WriteAsync_fn)f->write_async;
    w->fn.write = (VixDiskLib_Write_fn)f->write;
    w->fn.wait = (VixDiskLib_Wait_fn)f->wait;
    w->fn.flush = (VixDiskLib_Flush_fn)f->flush;
    w->fn.get_error_text = (VixDiskLib_GetErrorText_fn)f->get_error_text;
    w->fn.free_error_text = (VixDiskLib_FreeErrorText_fn)f->free_error_text;
    w->fn.read = (VixDiskLib_Read_fn)f->read;
    w->size = opt->size;
    w->max_request = opt->max_request ? opt->max_request : VMR_VDDK_DEFAULT_MAX_REQUEST;
    w->max_request -= w->max_request % 4096;
    if (w->max_request == 0)
        w->max_request = 4096;
    w->max_inflight = opt->max_inflight ? opt->max_inflight : VMR_VDDK_DEFAULT_MAX_INFLIGHT;
    if (w->max_inflight < w->max_request)
        w->max_inflight = w->max_request;
    snprintf(w->disk, sizeof w->disk, "%s", opt->disk ? opt->disk : "(vddk)");
    if (posix_memalign((void **)&w->zeros, VMR_ALIGN, w->max_request) != 0) {
        free(w);
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "VDDK writer: out of memory");
        return -1;
    }
    memset(w->zeros, 0, w->max_request);
    w->lane.w = w;
    pthread_mutex_init(&w->io_mu, NULL);
    pthread_mutex_init(&w->lane.mu, NULL);
    pthread_cond_init(&w->lane.cv, NULL);

    out->ops = &vddk_ops;
    out->w = w;
    out->max_request = w->max_request;
    out->target_zeroed = (opt->flags & VMR_FILE_TARGET_ZEROED) != 0;
    return 0;
}
