/* vmrestore core: the writer interface (targets) and the source interface (backup data).
 *
 * WHY THIS SHAPE
 * The pipeline (pipeline.c) moves verified blocks from a *source* (stored,
 * compressed extents) to a *writer* (the restore target). Every target --
 * a local file or block device (HotAdd), an NBD export through libnbd, a raw
 * LUN at the physical extents of a disk (SAN), VixDiskLib (writer_vddk.c) --
 * plugs in through the same small table of function pointers, modelled on
 * nbdkit-plugin.h:
 *
 *   - capability checks (can_zero, can_fast_zero, can_flush, can_multi_conn)
 *     so the pipeline, not each writer, decides how to zero and flush;
 *   - the same (handle, buf, count, offset, flags) shape on every data call;
 *   - an optional asynchronous path (submit_pwrite / submit_zero + poll with a
 *     completion callback) for writers that keep many requests in flight
 *     (libnbd aio_*, VixDiskLib_WriteAsync + Wait);
 *   - VERSIONED: `abi_version` + `struct_size` open each table. New members
 *     are only ever APPENDED; the pipeline checks struct_size before touching
 *     a member, so a writer built against an older header keeps working.
 *
 * OBJECTS AND THREADS
 *   writer   one per restore of one disk (`void *w` below): opened by the
 *            writer's own constructor (e.g. vmr_file_writer_open), which also
 *            checks the target (size, existence) before anything is written.
 *   lane     one per writer thread of the pipeline (`void *lane`): a
 *            connection (NBD), a handle (VDDK) or a dup'ed fd (file). A lane
 *            is used by exactly ONE thread at a time, so lane calls need no
 *            locking. The pipeline opens `lanes` of them (1 unless the writer
 *            says can_multi_conn, or is a local file).
 *
 * Every call returns 0 on success, -1 on failure after filling *err (see
 * struct vmr_error): the message names what failed and where (offset).
 * Buffers passed to pwrite/submit_pwrite are VMR_ALIGN aligned and `count`
 * is a multiple of 512 except possibly the last block of a disk.
 *
 * ASYNCHRONOUS PATH (optional: all three of submit_pwrite, submit_zero and
 * poll are set, or none). The lane thread calls submit_* up to the pipeline's
 * queue depth, then poll(); the writer calls `cb->fn(cb->data, err)` exactly
 * once per submitted request, FROM INSIDE poll() (or from inside submit_*
 * when it fails synchronously -- then submit_* still returns 0), on the lane
 * thread, with err == NULL on success. After a completion callback has run,
 * the buffer belongs to the pipeline again. A writer that retries (NBD on a
 * fresh connection) does so internally and reports only the final outcome.
 * poll(lane, timeout_ms) returns the number of requests still in flight on
 * the lane, or -1 when the lane itself is broken beyond repair -- and then
 * it has already completed every request it held, with an error.
 *
 * SOURCES (struct vmr_source_ops) are the mirror image for reading: one
 * `pread`-like call per stored extent, (handle, buf, count, offset, flags)
 * plus the index of the chain file. The local implementation preads file
 * descriptors (pipeline.c, vmr_fd_source_*); the repository agent's is
 * source_repo.c. Called from the reader threads, one handle per reader
 * thread (open_reader), in plan order; a source with `lookahead` gets
 * hint()s for a reader's upcoming extents, in the order it will read them.
 */
#ifndef VMR_WRITER_H
#define VMR_WRITER_H

#include <stddef.h>
#include <stdint.h>

#define VMR_WRITER_ABI_VERSION 1
#define VMR_SOURCE_ABI_VERSION 1
#define VMR_ALIGN 4096

/* Error codes of struct vmr_error; Python maps them to vmrestore.errors. */
enum vmr_errcode {
    VMR_OK = 0,
    VMR_E_CHECKSUM = 1,    /* stored data does not decompress / verify    -> ChecksumError */
    VMR_E_SOURCE = 2,      /* a backup file cannot be read                -> SourceError   */
    VMR_E_TARGET = 3,      /* the target refused (too small, EIO, ENOSPC) -> TargetError   */
    VMR_E_TRANSPORT = 4,   /* connection lost / retries exhausted         -> TransportError*/
    VMR_E_INTERRUPTED = 5, /* vmr_pipeline_cancel() was called            -> Interrupted   */
    VMR_E_INTERNAL = 6,    /* bad arguments, out of memory                -> VmrError      */
};

/* An error with where it happened. plan_index / offset are -1 / UINT64_MAX
 * when unknown; the pipeline fills them in for the entry being written when
 * a writer leaves them unset. `code` is the error's class (which side failed);
 * `vendor_code` is the code of a vendor library that failed (VixDiskLib's
 * VixError, low 16 bits), 0 when none did: Python turns a non-zero one into
 * VddkError whatever the class (docs/errors.md). */

struct vmr_error {
    int code;             /* enum vmr_errcode */
    int sys_errno;        /* errno when a system call failed, else 0 */
    int64_t plan_index;   /* index of the plan entry, -1 if none */
    uint64_t offset;      /* disk byte offset, UINT64_MAX if none */
    uint32_t vendor_code; /* vendor library's error code (VixError & 0xFFFF), 0 if none */
    char msg[512];
};

/* Set *err (if err is not NULL and no error is set yet); printf-style. */
void vmr_error_set(struct vmr_error *err, int code, int sys_errno, uint64_t offset,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* Flags of data calls (same bits as NBD's command flags where they overlap). */
#define VMR_F_FUA       0x01u  /* write: durable before completing */
#define VMR_F_MAY_TRIM  0x02u  /* zero: the writer may deallocate (punch a hole) */
#define VMR_F_FAST_ZERO 0x04u  /* zero: fail fast instead of writing zeros slowly */

/* Completion of an asynchronous request: err is NULL on success. */
struct vmr_completion {
    void (*fn)(void *data, const struct vmr_error *err);
    void *data;
};

struct vmr_writer_ops {
    uint32_t abi_version;   /* VMR_WRITER_ABI_VERSION the writer was built against */
    uint32_t struct_size;   /* sizeof(struct vmr_writer_ops) the writer was built with */
    const char *name;       /* "file", "nbd", "san", "vddk", ... */

    /* --- whole target (called from the controlling thread) --- */
    uint64_t (*get_size)(void *w);
    int (*can_zero)(void *w);        /* efficient zeroing (fallocate/BLKZEROOUT/NBD_CMD_WRITE_ZEROES) */
    int (*can_fast_zero)(void *w);   /* zero requests can carry VMR_F_FAST_ZERO */
    int (*can_trim)(void *w);        /* zero requests can carry VMR_F_MAY_TRIM */
    int (*can_flush)(void *w);
    int (*can_multi_conn)(void *w);  /* lanes may be used in parallel; a flush on one covers all */
    void (*close)(void *w);          /* after all lanes are closed; frees w */

    /* --- lanes (one thread each) --- */
    void *(*open_lane)(void *w, int lane_index, struct vmr_error *err);
    int (*close_lane)(void *lane, struct vmr_error *err);   /* always frees the lane */

    /* --- synchronous data calls (required) --- */
    int (*pwrite)(void *lane, const void *buf, uint32_t count, uint64_t offset, uint32_t flags,
                  struct vmr_error *err);
    int (*zero)(void *lane, uint32_t count, uint64_t offset, uint32_t flags, struct vmr_error *err);
    int (*flush)(void *lane, uint32_t flags, struct vmr_error *err);

    /* --- asynchronous data calls (optional: all NULL or all set) --- */
    int (*submit_pwrite)(void *lane, const void *buf, uint32_t count, uint64_t offset,
                         uint32_t flags, struct vmr_completion cb, struct vmr_error *err);
    int (*submit_zero)(void *lane, uint32_t count, uint64_t offset, uint32_t flags,
                       struct vmr_completion cb, struct vmr_error *err);
    int (*poll)(void *lane, int timeout_ms, struct vmr_error *err);

    /* --- appended in later versions go below; check struct_size first --- */
    /* Optional (may be NULL): the job stops (error or cancel). Requests still
     * waiting for a target that does not answer fail soon after instead of at
     * their deadline; any thread, at most once per job, the writer stays valid. */
    void (*cancel)(void *w);

    /* The read side (compare stage of a quick rollback, compare.c): optional,
     * open_read/pread/close_read all NULL or all set. One read handle per
     * pipeline reader thread, used by that thread only; it reads what the
     * target holds now. known_zero (optional, may be NULL): 1 when
     * [offset, offset+count) is known to read as zeros without reading it
     * (a hole: NBD block status, SEEK_DATA), 0 when not known. */
    void *(*open_read)(void *w, int index, struct vmr_error *err);
    int (*pread)(void *rh, void *buf, uint32_t count, uint64_t offset, struct vmr_error *err);
    int (*known_zero)(void *rh, uint64_t offset, uint64_t count);
    void (*close_read)(void *rh);
};

/* 1 when the writer offers the read side (built with a header that has it, and set). */
#define VMR_WRITER_CAN_READ(ops)                                                              \
    ((ops)->struct_size >= offsetof(struct vmr_writer_ops, close_read) + sizeof(void *) &&   \
     (ops)->open_read != NULL && (ops)->pread != NULL && (ops)->close_read != NULL)

/* A writer instance: what constructors return and the pipeline consumes. */
struct vmr_writer {
    const struct vmr_writer_ops *ops;
    void *w;
    /* Largest count the writer accepts in one call (0 = 64 MiB default);
     * the pipeline splits larger zero runs. */
    uint32_t max_request;
    /* 1 when the target is known to read as zeros where not written (a new
     * sparse file, a new thin disk): zero entries are then skipped. */
    int target_zeroed;
    /* Human-readable notes from the constructor (e.g. why O_DIRECT fell
     * back to buffered I/O); Python logs them. Empty when nothing to say. */
    char note[256];
    /* Set by a constructor that created the target (a new regular file, O_EXCL):
     * the identity of what it created, so a failed run removes that file and
     * never one another run put at the same path (src/vmrestore/ownership.py). */
    int created;
    uint64_t created_dev, created_ino;
};

/* ---------------------------------------------------------------------------
 * Sources: where the stored (compressed) extents come from.
 */
struct vmr_source_ops {
    uint32_t abi_version;   /* VMR_SOURCE_ABI_VERSION */
    uint32_t struct_size;
    const char *name;       /* "fd", "repo", ... */
    /* One reader handle per reader thread. */
    void *(*open_reader)(void *s, int reader_index, struct vmr_error *err);
    void (*close_reader)(void *reader);
    /* Read exactly count bytes of chain file `src` at `offset` into buf. */
    int (*pread)(void *reader, void *buf, uint32_t count, uint64_t offset, uint16_t src,
                 uint32_t flags, struct vmr_error *err);
    /* Optional (may be NULL): the reader will soon want [offset, offset+count)
     * of file src (readahead / request pipelining). */
    void (*hint)(void *reader, uint16_t src, uint64_t offset, uint64_t count);
    void (*close)(void *s);
    /* --- appended in later versions go below --- */
    /* Optional (may be NULL): the job stops (error or cancel). Wake readers
     * blocked in pread (e.g. shut their sockets down); they then fail. Any
     * thread, called at most once per job, the source stays valid. */
    void (*cancel)(void *s);
};

struct vmr_source {
    const struct vmr_source_ops *ops;
    void *s;
    /* Bytes of stored extents each reader announces with hint() before it
     * reads them (0: no hints; then readers take one entry at a time).
     * A network source sets this to what it wants in flight. */
    uint64_t lookahead;
};

/* ---------------------------------------------------------------------------
 * Constructors of the built-in writers and sources (see the .c files).
 * Each checks its target before returning; on failure returns -1 with *err.
 */

/* file / block device (HotAdd). flags: VMR_FILE_* below. */
#define VMR_FILE_TARGET_ZEROED 0x1u   /* skip zero entries (target known zero) */
#define VMR_FILE_NO_DIRECT     0x2u   /* do not try O_DIRECT */
#define VMR_FILE_CREATE        0x4u   /* create a new regular file of `size` (sparse) */
#define VMR_FILE_FORCE         0x8u   /* allow overwriting an existing regular file */
int vmr_file_writer_open(const char *path, uint64_t size, uint32_t flags, struct vmr_writer *out,
                         struct vmr_error *err);

/* NBD through libnbd: uri is an NBD URI (nbd://, nbds://, nbd+unix://, ...).
 * psk_file / cert_dir / tls_username may be NULL. */
struct vmr_nbd_options {
    const char *uri;
    uint32_t retries;       /* attempts per request on a fresh connection */
    uint32_t retry_delay_ms;
    uint32_t flags;         /* VMR_FILE_TARGET_ZEROED honoured */
    const char *psk_file;
    const char *tls_username;
    const char *cert_dir;
    int tls_verify_peer;    /* -1 = libnbd default */
    uint64_t flush_every;   /* early writeback: an unwaited flush every this many bytes
                             * written on all lanes (0 = only the final flush); writer_nbd.c */
    uint32_t timeout_ms;    /* deadline of one request, flush or connection (0 = 30 s) */
    /* Optional: asked while vmr_nbd_writer_open waits for the server; non-zero
     * gives up (VMR_E_INTERRUPTED), so Ctrl-C stops a connection nobody answers. */
    int (*interrupted)(void);
    uint32_t max_write;     /* larger writes go out as several requests of at most this
                             * many bytes (0 = one request per write); writer_nbd.c */
};
int vmr_nbd_writer_open(const struct vmr_nbd_options *opt, uint64_t size, struct vmr_writer *out,
                        struct vmr_error *err);

/* SAN: a raw LUN (file or block device) plus an extent map of the disk:
 * n records of (virtual offset, length, LUN offset), sorted by virtual
 * offset, which must cover [0, size) with no gap (checked). */
struct vmr_extent {
    uint64_t voff;
    uint64_t len;
    uint64_t loff;
};
int vmr_san_writer_open(const char *lun_path, const struct vmr_extent *map, size_t n,
                        uint64_t size, uint32_t flags, struct vmr_writer *out,
                        struct vmr_error *err);

/* Local chain files by file descriptor (the pipeline does not close them). */
int vmr_fd_source_open(const int *fds, size_t n, struct vmr_source *out, struct vmr_error *err);

/* Repository agent (source_repo.c, docs/protocol.md): stored extents pulled
 * with pipelined EXTENTS requests over sockets that Python has already
 * connected and authenticated (plain TCP; TLS stays in Python). The source
 * takes ownership of the fds on success (closes them in close()); on
 * failure the caller still owns them. */
struct vmr_repo_options {
    const int *fds;           /* readers x per-reader connections, reader r owns fds[r*k..r*k+k) */
    size_t nfds;
    uint32_t readers;         /* reader threads of the pipeline (nfds % readers == 0) */
    const uint32_t *handles;  /* nfds x nfiles: handles[c*nfiles+f] = handle of chain file f on c */
    size_t nfiles;
    uint32_t max_ranges;      /* from HELLO_OK (0: 4096) */
    uint32_t max_bulk;        /* bulk bytes per EXTENTS answer, from HELLO_OK (0: 64 MiB) */
    uint32_t batch_bytes;     /* stored bytes per EXTENTS request (0: 4 MiB) */
    uint32_t depth;           /* requests in flight per connection (0: 4) */
    uint32_t io_timeout_ms;   /* a connection silent this long is lost (0: 60 s) */
};
struct vmr_repo_stats {
    uint64_t wire_bytes;      /* every byte received: frames + stored extents */
    uint64_t bulk_bytes;      /* stored extent bytes received */
    uint64_t requests;        /* EXTENTS requests sent */
};
int vmr_repo_source_open(const struct vmr_repo_options *o, struct vmr_source *out,
                         struct vmr_error *err);
void vmr_repo_source_stats(const struct vmr_source *src, struct vmr_repo_stats *out);

#endif
