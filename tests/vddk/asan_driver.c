/* Drives the core's VDDK writer (ext/core/writer_vddk.c) over vddk_sim, linked
 * together with -fsanitize=address,undefined by tests/vddk/test_asan.py: the
 * async path (WriteAsync from worker threads, completions handed to poll),
 * request splitting, zero requests, an injected write error (GetErrorText /
 * FreeErrorText), Wait + Flush, and every close; and the writer's read side
 * (VixDiskLib_Read on the same handle) from a second thread while the lane
 * writes, as the compare readers of a quick rollback do. Exit 0 when the data reads
 * back identical and ASan/LSan found nothing.
 *
 * It passes the core's thread-safe log functions (ext/core/vddk_log.c) to
 * InitEx and zeroed connect params to ConnectEx; the completion mode comes
 * from VMRESTORE_VDDK_SIM_CALLBACKS (thread / inline / wait). With a third
 * argument "null-loggers" it passes NULL loggers instead: the strict sim must
 * then abort when its default logger is used from a second thread.
 *
 * usage: asan_driver FLAT_FILE SIZE_BYTES [null-loggers] */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vddk_log.h"
#include "vixdisklib.h"
#include "writer.h"
#include "writer_vddk.h"

#define PROTO(ret, name, params) ret name params;
VMR_VIXDISKLIB_FUNCTIONS(PROTO, PROTO)

/* pipeline.c's helper, which the writer calls */
void vmr_error_set(struct vmr_error *err, int code, int sys_errno, uint64_t offset,
                   const char *fmt, ...)
{
    va_list ap;
    if (err == NULL || err->code != VMR_OK)
        return;
    err->code = code;
    err->sys_errno = sys_errno;
    err->offset = offset;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
}

static int completed, failed;
static char last_error[512];

static void on_done(void *data, const struct vmr_error *err)
{
    (void)data;
    completed++;
    if (err) {
        failed++;
        snprintf(last_error, sizeof last_error, "%s", err->msg);
    }
}

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, __VA_ARGS__); exit(1); } } while (0)

/* The read side from another thread, over and over until told to stop. */
struct reader {
    struct vmr_writer *wr;
    uint64_t size;
    int stop, reads, failed;
    char msg[512];
};

static void *read_side(void *arg)
{
    struct reader *r = arg;
    const uint32_t n = 256 * 1024;
    unsigned char *buf;
    struct vmr_error err;
    void *rh;

    memset(&err, 0, sizeof err);
    if (posix_memalign((void **)&buf, 4096, n) != 0 ||
        (rh = r->wr->ops->open_read(r->wr->w, 0, &err)) == NULL) {
        r->failed = 1;
        return NULL;
    }
    for (uint64_t off = 0;; off = (off + n) % r->size) {  /* at least one read */
        if (r->wr->ops->pread(rh, buf, n, off, &err) != 0) {
            r->failed++;
            snprintf(r->msg, sizeof r->msg, "%s", err.msg);
            break;
        }
        r->reads++;
        if (__atomic_load_n(&r->stop, __ATOMIC_SEQ_CST))
            break;
    }
    /* past the end and not whole sectors: refused, nothing read */
    memset(&err, 0, sizeof err);
    if (r->wr->ops->pread(rh, buf, n, r->size - 4096, &err) == 0 ||
        r->wr->ops->pread(rh, buf, 100, 0, &err) == 0)
        r->failed++;
    r->wr->ops->close_read(rh);
    free(buf);
    return NULL;
}

static int run(const char *path, uint64_t size, uint32_t max_request, int queue_depth,
               int expect_failure)
{
    VixDiskLibConnection conn;
    VixDiskLibHandle h;
    struct vmr_writer wr;
    struct vmr_error err;
    struct vmr_vddk_options o;
    const uint32_t chunk = 1u << 20;
    unsigned char *data, *back;
    void *lane;

    VixDiskLibConnectParams params;
    memset(&params, 0, sizeof params);
    params.specType = VIXDISKLIB_SPEC_VMX;
    CHECK(VixDiskLib_ConnectEx(&params, 0, NULL, NULL, &conn) == VIX_OK, "connect\n");
    CHECK(VixDiskLib_Open(conn, path, 0, &h) == VIX_OK, "open %s\n", path);
    memset(&o, 0, sizeof o);
    o.handle = (uintptr_t)h;
    o.fn.write_async = (uintptr_t)VixDiskLib_WriteAsync;
    o.fn.write = (uintptr_t)VixDiskLib_Write;
    o.fn.wait = (uintptr_t)VixDiskLib_Wait;
    o.fn.flush = (uintptr_t)VixDiskLib_Flush;
    o.fn.get_error_text = (uintptr_t)VixDiskLib_GetErrorText;
    o.fn.free_error_text = (uintptr_t)VixDiskLib_FreeErrorText;
    o.fn.read = (uintptr_t)VixDiskLib_Read;
    o.size = size;
    o.max_request = max_request;
    o.disk = "asan-disk";
    memset(&err, 0, sizeof err);
    CHECK(vmr_vddk_writer_open(&o, &wr, &err) == 0, "writer: %s\n", err.msg);
    lane = wr.ops->open_lane(wr.w, 0, &err);
    CHECK(lane != NULL, "lane: %s\n", err.msg);

    CHECK(posix_memalign((void **)&data, 4096, size) == 0, "oom\n");
    for (uint64_t i = 0; i < size; i++)
        data[i] = (unsigned char)(i * 2654435761u >> 13);
    memset(data + chunk, 0, chunk);  /* chunk 1 goes as a zero request */

    struct reader rd = { &wr, size, 0, 0, 0, "" };
    pthread_t rt;
    if (!expect_failure)
        CHECK(pthread_create(&rt, NULL, read_side, &rd) == 0, "reader thread\n");

    completed = failed = 0;
    int submitted = 0, inflight;
    for (uint64_t off = 0; off < size; off += chunk) {
        struct vmr_completion cb = { on_done, NULL };
        memset(&err, 0, sizeof err);
        int rc = off == chunk ? wr.ops->submit_zero(lane, chunk, off, 0, cb, &err)
                              : wr.ops->submit_pwrite(lane, data + off, chunk, off, 0, cb, &err);
        CHECK(rc == 0, "submit: %s\n", err.msg);
        submitted++;
        while ((inflight = wr.ops->poll(lane, 0, &err)) >= queue_depth)
            wr.ops->poll(lane, 100, &err);
    }
    while (wr.ops->poll(lane, 100, &err) > 0) { }
    CHECK(completed == submitted, "completed %d of %d\n", completed, submitted);
    if (!expect_failure) {
        __atomic_store_n(&rd.stop, 1, __ATOMIC_SEQ_CST);
        pthread_join(rt, NULL);
        CHECK(rd.failed == 0 && rd.reads > 0, "read side during writes: %d reads, %s\n",
              rd.reads, rd.msg);
    }
    memset(&err, 0, sizeof err);
    CHECK(wr.ops->flush(lane, 0, &err) == 0, "flush: %s\n", err.msg);
    CHECK(wr.ops->close_lane(lane, &err) == 0, "close lane\n");
    wr.ops->close(wr.w);

    if (expect_failure) {
        CHECK(failed > 0 && strstr(last_error, "VixError 8") && strstr(last_error, "asan-disk"),
              "expected an injected failure, got %d: %s\n", failed, last_error);
    } else {
        CHECK(failed == 0, "unexpected failure: %s\n", last_error);
        CHECK(posix_memalign((void **)&back, 4096, size) == 0, "oom\n");
        CHECK(VixDiskLib_Read(h, 0, size / 512, back) == VIX_OK, "read back\n");
        CHECK(memcmp(back, data, size) == 0, "data differs\n");
        free(back);
    }
    free(data);
    CHECK(VixDiskLib_Close(h) == VIX_OK, "close\n");
    CHECK(VixDiskLib_Disconnect(conn) == VIX_OK, "disconnect\n");
    return 0;
}

int main(int argc, char **argv)
{
    CHECK(argc == 3 || argc == 4, "usage: %s FLAT SIZE [null-loggers]\n", argv[0]);
    uint64_t size = strtoull(argv[2], NULL, 10);
    if (argc == 4) {
        CHECK(VixDiskLib_InitEx(6, 0, NULL, NULL, NULL, NULL, NULL) == VIX_OK, "init\n");
        run(argv[1], size, 0, 8, 0);  /* the strict sim aborts in here */
        puts("not aborted");
        return 0;
    }
    CHECK(VixDiskLib_InitEx(6, 0, vmr_vddk_log, vmr_vddk_warn, vmr_vddk_panic, NULL, NULL)
          == VIX_OK, "init\n");
    run(argv[1], size, 0, 8, 0);            /* 1 MiB requests, 8 in flight */
    run(argv[1], size, 128 * 1024, 32, 0);  /* each split in 8 WriteAsync calls */
    setenv("VMRESTORE_VDDK_SIM_FAIL", "write:5+:8", 1);
    run(argv[1], size, 256 * 1024, 4, 1);   /* errors from the 5th call on */
    VixDiskLib_Exit();
    {
        struct vmr_vddk_log_entry e[8];
        uint64_t dropped;
        CHECK(vmr_vddk_log_drain(e, 8, &dropped) > 0, "nothing logged\n");
    }
    puts("ok");
    return 0;
}
