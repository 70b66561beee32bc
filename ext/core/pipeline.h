/* vmrestore core: the block pipeline (reader -> decompress+verify -> writer).
 *
 * One job restores one disk: it walks a plan (struct vmr_plan_entry[], built
 * in Python, see src/vmrestore/plan.py) with pthreads and no Python:
 *
 *   reader threads     take entries in plan order, pread the stored extent
 *                      into a slot's compressed buffer (codec none: straight
 *                      into the slot's aligned block buffer)
 *   decompress threads decompress into the slot's aligned block buffer and
 *                      check XXH3-128 before anything is written
 *   writer lanes       one thread per writer lane (file fd, NBD connection,
 *                      VDDK handle): write or zero, synchronously or with up
 *                      to queue_depth asynchronous requests in flight
 *
 * Memory is one pool of `buffers` slots allocated at create time (an aligned
 * block buffer + a compressed buffer each): independent of disk size. The
 * buffer a block is decompressed into is the one the writer sends.
 *
 * Counters are read while it runs (relaxed atomics). completed_prefix is the
 * number of leading plan entries that are fully written: after
 * vmr_pipeline_flush() returns, they are durable, so a resume may run
 * plan[prefix:].
 */
#ifndef VMR_PIPELINE_H
#define VMR_PIPELINE_H

#include <stddef.h>
#include <stdint.h>

#include "writer.h"

#define VMR_PLAN_VERSION 1
#define VMR_KIND_ZERO 0
#define VMR_KIND_DATA 1

/* Mirrors vmrestore.plan.PLAN_DTYPE (56 bytes, little-endian, packed by layout). */
struct vmr_plan_entry {
    uint64_t dst_off;
    uint64_t length;
    uint64_t src_off;
    uint64_t xxh_lo;
    uint64_t xxh_hi;
    uint64_t block;
    uint32_t stored_len;
    uint16_t src;
    uint8_t codec;
    uint8_t kind;
};
_Static_assert(sizeof(struct vmr_plan_entry) == 56, "plan entry must match PLAN_DTYPE");

struct vmr_pipeline_config {
    uint32_t readers;      /* reader threads (default 1) */
    uint32_t threads;      /* decompress+verify threads (default 2) */
    uint32_t lanes;        /* writer lanes/threads (default 1; capped by the writer) */
    uint32_t queue_depth;  /* async requests in flight per lane (default 16) */
    uint32_t buffers;      /* slots in the pool (0 = auto from the above) */
    uint32_t disk;         /* disk index, for messages only */
    uint32_t compare;      /* 1: quick rollback, write only entries the target does not
                            * already hold (compare.h; the writer needs its read side) */
    uint64_t max_rate;     /* data bytes per second the readers let through (0 = no limit);
                            * zero ranges are not counted: the target does not move them */
};

struct vmr_counters {
    uint64_t bytes_read;          /* stored bytes read from the source */
    uint64_t bytes_decompressed;  /* raw bytes produced and verified */
    uint64_t bytes_written;       /* data bytes the target acknowledged */
    uint64_t bytes_zeroed;        /* zero-range bytes the target acknowledged */
    uint64_t bytes_skipped;       /* zero-range bytes skipped (target known zero) */
    uint64_t read_ns;             /* busy time of the reader stage (sum over threads) */
    uint64_t decompress_ns;       /* busy time of decompress+verify */
    uint64_t write_ns;            /* time lanes spent in writer calls (submit/poll/write) */
    uint64_t entries_done;
    uint64_t completed_prefix;
    uint64_t entries_total;
    uint64_t elapsed_ns;          /* since start (until finish when done) */
    uint32_t readers, threads, lanes, queue_depth, buffers, running;
    /* compare mode (quick rollback) */
    uint64_t cmp_entries;         /* plan entries compared with the target */
    uint64_t cmp_differ;          /* of those, entries the target did not hold */
    uint64_t cmp_bytes_read;      /* bytes read from the target to compare */
    uint64_t cmp_known_zero;      /* zero-run bytes the target reported as holes (not read) */
    uint64_t bytes_same;          /* bytes the target already held (not written) */
    uint64_t compare_ns;          /* busy time of the compare (target read + hash), summed */
    uint64_t throttle_ns;         /* time readers waited for the rate limit (max_rate), summed */
};

struct vmr_pipeline;

/* Create a job: copies nothing of plan (it must outlive the pipeline),
 * allocates the pool. Does not start threads. NULL + *err on failure. */
struct vmr_pipeline *vmr_pipeline_create(const struct vmr_plan_entry *plan, size_t n,
                                         struct vmr_source *src, struct vmr_writer *wr,
                                         const struct vmr_pipeline_config *cfg,
                                         struct vmr_error *err);
/* Start the threads; -1 + *err on failure (then destroy). */
int vmr_pipeline_start(struct vmr_pipeline *p, struct vmr_error *err);
/* Wait up to timeout_ms (<0: forever) for the job to end; 1 = ended, 0 = running. */
int vmr_pipeline_wait(struct vmr_pipeline *p, int timeout_ms);
/* Ask the job to stop (thread-safe, async-signal-unsafe); it ends with VMR_E_INTERRUPTED. */
void vmr_pipeline_cancel(struct vmr_pipeline *p);
/* Make every write completed before this call durable (each lane drains and
 * flushes). Safe from any thread while running; returns at once when ended. */
int vmr_pipeline_flush(struct vmr_pipeline *p, int timeout_ms, struct vmr_error *err);
void vmr_pipeline_counters(struct vmr_pipeline *p, struct vmr_counters *out);
/* The first error (code VMR_OK if none). */
int vmr_pipeline_error(struct vmr_pipeline *p, struct vmr_error *out);
/* Join threads (cancelling first if still running) and free everything the
 * pipeline allocated. Does not close the writer or the source. */
void vmr_pipeline_destroy(struct vmr_pipeline *p);

#endif
