/* Test driver: runs ext/core's pipeline from C (no Python) so AddressSanitizer
 * and LeakSanitizer see only our allocations. Built and run by
 * tests/test_faults_core.py::test_pipeline_under_asan.
 *
 * usage: core_asan_driver PLAN.bin SOURCE TARGET SIZE [cancel_after_ms] [nbd-uri]
 * PLAN.bin holds struct vmr_plan_entry records (PLAN_DTYPE bytes).
 * VMR_ASAN_COMPARE=1 in the environment: quick rollback (compare mode) into an
 * existing target, which is then opened without creating it. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline.h"

int main(int argc, char **argv)
{
    if (argc < 5)
        return 2;
    FILE *f = fopen(argv[1], "rb");
    if (!f)
        return 2;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    size_t n = (size_t)len / sizeof(struct vmr_plan_entry);
    struct vmr_plan_entry *plan = malloc(len ? (size_t)len : 1);
    if (fread(plan, 1, (size_t)len, f) != (size_t)len)
        return 2;
    fclose(f);
    int fd = open(argv[2], O_RDONLY);
    uint64_t size = strtoull(argv[4], NULL, 10);
    int cancel_ms = argc > 5 ? atoi(argv[5]) : -1;
    const char *cmp_env = getenv("VMR_ASAN_COMPARE");
    int compare = cmp_env != NULL && strcmp(cmp_env, "1") == 0;
    struct vmr_error err;
    memset(&err, 0, sizeof err);
    err.plan_index = -1;
    err.offset = UINT64_MAX;
    struct vmr_writer wr;
    int rc;
    if (argc > 6) {
        /* flush_every 1 MiB and max_write 64 KiB: early-writeback flushes and split
         * writes (64 KiB parts) run under ASan too */
        struct vmr_nbd_options o = {.uri = argv[6], .retries = 2, .retry_delay_ms = 50,
                                    .tls_verify_peer = -1, .flush_every = 1u << 20,
                                    .max_write = 64u << 10};
        rc = vmr_nbd_writer_open(&o, size, &wr, &err);
    } else {
        rc = vmr_file_writer_open(argv[3], size, (compare ? 0 : VMR_FILE_CREATE) | VMR_FILE_FORCE,
                                  &wr, &err);
    }
    if (rc != 0) {
        fprintf(stderr, "open: %s\n", err.msg);
        return 3;
    }
    struct vmr_source src;
    vmr_fd_source_open(&fd, 1, &src, &err);
    struct vmr_pipeline_config cfg = {.readers = 2, .threads = 3, .lanes = 2,
                                      .queue_depth = 4, .buffers = 5,
                                      .compare = (uint32_t)compare};
    struct vmr_pipeline *p = vmr_pipeline_create(plan, n, &src, &wr, &cfg, &err);
    if (!p) {
        fprintf(stderr, "create: %s\n", err.msg);
        return 3;
    }
    if (vmr_pipeline_start(p, &err) != 0) {
        fprintf(stderr, "start: %s\n", err.msg);
        vmr_pipeline_destroy(p);
        return 3;
    }
    if (cancel_ms >= 0) {
        vmr_pipeline_wait(p, cancel_ms);
        vmr_pipeline_flush(p, 1000, &err);
        vmr_pipeline_cancel(p);
    }
    while (!vmr_pipeline_wait(p, 100))
        vmr_pipeline_flush(p, 1000, NULL);
    struct vmr_counters c;
    vmr_pipeline_counters(p, &c);
    int code = vmr_pipeline_error(p, &err);
    printf("code=%d prefix=%llu written=%llu zeroed=%llu skipped=%llu compared=%llu "
           "differ=%llu same=%llu msg=%s\n", code,
           (unsigned long long)c.completed_prefix, (unsigned long long)c.bytes_written,
           (unsigned long long)c.bytes_zeroed, (unsigned long long)c.bytes_skipped,
           (unsigned long long)c.cmp_entries, (unsigned long long)c.cmp_differ,
           (unsigned long long)c.bytes_same, err.msg);
    vmr_pipeline_destroy(p);
    src.ops->close(src.s);
    wr.ops->close(wr.w);
    close(fd);
    free(plan);
    return code;
}
