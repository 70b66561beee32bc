# cython: language_level=3
"""The block pipeline and the native writers (pipeline.h, writer.h), GIL released.

Thin by design: Python objects own the C objects (a Writer owns a
struct vmr_writer, a Pipeline owns a struct vmr_pipeline and keeps the plan
array and the writer alive); every blocking C call runs under `with nogil`.
The typed face is vmrestore.pipeline.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from posix.unistd cimport usleep


cdef extern from "writer.h" nogil:
    enum:
        VMR_OK
        VMR_E_CHECKSUM
        VMR_E_SOURCE
        VMR_E_TARGET
        VMR_E_TRANSPORT
        VMR_E_INTERRUPTED
        VMR_E_INTERNAL
        VMR_FILE_TARGET_ZEROED
        VMR_FILE_NO_DIRECT
        VMR_FILE_CREATE
        VMR_FILE_FORCE
        VMR_WRITER_ABI_VERSION
    struct vmr_error:
        int code
        int sys_errno
        int64_t plan_index
        uint64_t offset
        uint32_t vendor_code
        char msg[512]
    struct vmr_writer_ops:
        const char *name
        uint64_t (*get_size)(void *w)
        int (*can_zero)(void *w)
        int (*can_fast_zero)(void *w)
        int (*can_trim)(void *w)
        int (*can_flush)(void *w)
        int (*can_multi_conn)(void *w)
        void (*close)(void *w)
        void *poll
        uint32_t struct_size
        void *open_read
        void *close_read
    struct vmr_writer:
        const vmr_writer_ops *ops
        void *w
        uint32_t max_request
        int target_zeroed
        char note[256]
        int created
        uint64_t created_dev
        uint64_t created_ino
    struct vmr_source_ops:
        void (*close)(void *s)
    struct vmr_source:
        const vmr_source_ops *ops
        void *s
    struct vmr_nbd_options:
        const char *uri
        uint32_t retries
        uint32_t retry_delay_ms
        uint32_t flags
        const char *psk_file
        const char *tls_username
        const char *cert_dir
        int tls_verify_peer
        uint64_t flush_every
        uint32_t timeout_ms
        int (*interrupted)() noexcept
        uint32_t max_write
    struct vmr_extent:
        uint64_t voff
        uint64_t len
        uint64_t loff
    int vmr_file_writer_open(const char *path, uint64_t size, uint32_t flags, vmr_writer *out,
                             vmr_error *err)
    int vmr_nbd_writer_open(const vmr_nbd_options *opt, uint64_t size, vmr_writer *out,
                            vmr_error *err)
    int vmr_san_writer_open(const char *lun_path, const vmr_extent *map, size_t n,
                            uint64_t size, uint32_t flags, vmr_writer *out, vmr_error *err)
    int vmr_fd_source_open(const int *fds, size_t n, vmr_source *out, vmr_error *err)
    struct vmr_repo_options:
        const int *fds
        size_t nfds
        uint32_t readers
        const uint32_t *handles
        size_t nfiles
        uint32_t max_ranges
        uint32_t max_bulk
        uint32_t batch_bytes
        uint32_t depth
        uint32_t io_timeout_ms
    struct vmr_repo_stats:
        uint64_t wire_bytes
        uint64_t bulk_bytes
        uint64_t requests
    int vmr_repo_source_open(const vmr_repo_options *o, vmr_source *out, vmr_error *err)
    void vmr_repo_source_stats(const vmr_source *src, vmr_repo_stats *out)


cdef extern from "pipeline.h" nogil:
    enum:
        VMR_PLAN_VERSION
    struct vmr_plan_entry:
        pass
    struct vmr_pipeline_config:
        uint32_t readers
        uint32_t threads
        uint32_t lanes
        uint32_t queue_depth
        uint32_t buffers
        uint32_t disk
        uint32_t compare
        uint64_t max_rate
    struct vmr_counters:
        uint64_t bytes_read
        uint64_t bytes_decompressed
        uint64_t bytes_written
        uint64_t bytes_zeroed
        uint64_t bytes_skipped
        uint64_t read_ns
        uint64_t decompress_ns
        uint64_t write_ns
        uint64_t entries_done
        uint64_t completed_prefix
        uint64_t entries_total
        uint64_t elapsed_ns
        uint32_t readers, threads, lanes, queue_depth, buffers, running
        uint64_t cmp_entries
        uint64_t cmp_differ
        uint64_t cmp_bytes_read
        uint64_t cmp_known_zero
        uint64_t bytes_same
        uint64_t compare_ns
        uint64_t throttle_ns
    struct vmr_pipeline:
        pass
    vmr_pipeline *vmr_pipeline_create(const vmr_plan_entry *plan, size_t n, vmr_source *src,
                                      vmr_writer *wr, const vmr_pipeline_config *cfg,
                                      vmr_error *err)
    int vmr_pipeline_start(vmr_pipeline *p, vmr_error *err)
    int vmr_pipeline_wait(vmr_pipeline *p, int timeout_ms)
    void vmr_pipeline_cancel(vmr_pipeline *p)
    int vmr_pipeline_flush(vmr_pipeline *p, int timeout_ms, vmr_error *err)
    void vmr_pipeline_counters(vmr_pipeline *p, vmr_counters *out)
    int vmr_pipeline_error(vmr_pipeline *p, vmr_error *out)
    void vmr_pipeline_destroy(vmr_pipeline *p)


PLAN_VERSION = VMR_PLAN_VERSION
WRITER_ABI_VERSION = VMR_WRITER_ABI_VERSION
E_CHECKSUM = VMR_E_CHECKSUM
E_SOURCE = VMR_E_SOURCE
E_TARGET = VMR_E_TARGET
E_TRANSPORT = VMR_E_TRANSPORT
E_INTERRUPTED = VMR_E_INTERRUPTED
E_INTERNAL = VMR_E_INTERNAL
F_TARGET_ZEROED = VMR_FILE_TARGET_ZEROED
F_NO_DIRECT = VMR_FILE_NO_DIRECT
F_CREATE = VMR_FILE_CREATE
F_FORCE = VMR_FILE_FORCE


class CoreError(Exception):
    """An error from the C core: (class code, message, plan index, disk offset, errno, vendor code).

    ``code`` is the class (E_SOURCE, E_TARGET, ...); ``vendor_code`` the failed
    vendor library's own code (VixError), 0 when none. vmrestore.errors.from_core
    is the one place that turns it into a typed error.
    """

    def __init__(self, code, message, plan_index=None, offset=None, sys_errno=0, vendor_code=0):
        super().__init__(message)
        self.code = code
        self.message = message
        self.plan_index = plan_index
        self.offset = offset
        self.sys_errno = sys_errno
        self.vendor_code = vendor_code


cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1


# A signal handler's exception (Ctrl-C: KeyboardInterrupt) caught while a C call
# waited; the caller re-raises it once the call returned.
cdef object _pending_signal = None


cdef int _interrupted() noexcept nogil:
    """Run Python's signal handlers from inside a blocking C wait (main thread only)."""
    global _pending_signal
    with gil:
        try:
            PyErr_CheckSignals()
        except BaseException as exc:
            _pending_signal = exc
            return 1
    return 0


cdef _raise_pending_signal():
    global _pending_signal
    exc, _pending_signal = _pending_signal, None
    if exc is not None:
        raise exc


cdef object _core_error(vmr_error *e):
    msg = e.msg.decode("utf-8", "replace")
    idx = None if e.plan_index < 0 else e.plan_index
    off = None if e.offset == <uint64_t>-1 else e.offset
    return CoreError(e.code or VMR_E_INTERNAL, msg or "unknown core error", idx, off, e.sys_errno,
                     e.vendor_code)


cdef void _error_init(vmr_error *e) noexcept nogil:
    memset(e, 0, sizeof(vmr_error))
    e.plan_index = -1
    e.offset = <uint64_t>-1


cdef class Writer:
    """One open restore target; the pipeline borrows it. close() when done."""

    cdef vmr_writer wr
    cdef bint opened
    # lanes the target asked for (an NBD URI's connections=N); 0: the pipeline's default
    cdef public unsigned int preferred_lanes

    def __dealloc__(self):
        self._close()

    cdef _close(self):
        if self.opened:
            self.opened = False
            self.wr.ops.close(self.wr.w)

    def close(self):
        self._close()

    @staticmethod
    def open_file(str path, uint64_t size, uint32_t flags=0):
        cdef Writer w = Writer.__new__(Writer)
        cdef vmr_error e
        cdef bytes bpath = path.encode()
        cdef const char *cp = bpath
        cdef int rc
        _error_init(&e)
        with nogil:
            rc = vmr_file_writer_open(cp, size, flags, &w.wr, &e)
        if rc != 0:
            raise _core_error(&e)
        w.opened = True
        return w

    @staticmethod
    def open_nbd(str uri, uint64_t size, uint32_t retries=3, uint32_t retry_delay_ms=200,
                 uint32_t flags=0, psk_file=None, tls_username=None, cert_dir=None,
                 int tls_verify_peer=-1, uint64_t flush_every=0, uint32_t timeout_ms=0,
                 uint32_t max_write=0):
        cdef Writer w = Writer.__new__(Writer)
        cdef vmr_error e
        cdef vmr_nbd_options o
        cdef bytes buri = uri.encode()
        cdef bytes bpsk = psk_file.encode() if psk_file else b""
        cdef bytes buser = tls_username.encode() if tls_username else b""
        cdef bytes bcert = cert_dir.encode() if cert_dir else b""
        cdef int rc
        memset(&o, 0, sizeof(o))
        o.uri = buri
        o.retries = retries
        o.retry_delay_ms = retry_delay_ms
        o.flags = flags
        o.psk_file = <const char *>bpsk if psk_file else NULL
        o.tls_username = <const char *>buser if tls_username else NULL
        o.cert_dir = <const char *>bcert if cert_dir else NULL
        o.tls_verify_peer = tls_verify_peer
        o.flush_every = flush_every
        o.timeout_ms = timeout_ms
        o.interrupted = _interrupted
        o.max_write = max_write
        _error_init(&e)
        with nogil:
            rc = vmr_nbd_writer_open(&o, size, &w.wr, &e)
        _raise_pending_signal()
        if rc != 0:
            raise _core_error(&e)
        w.opened = True
        return w

    @staticmethod
    def open_san(str lun, const uint64_t[::1] extents not None, uint64_t size,
                 uint32_t flags=0):
        """extents: flat uint64 array of (virtual offset, length, LUN offset) triples."""
        if extents.shape[0] % 3:
            raise ValueError("extent map must be (offset, length, LUN offset) triples")
        cdef Writer w = Writer.__new__(Writer)
        cdef vmr_error e
        cdef bytes blun = lun.encode()
        cdef const char *cp = blun
        cdef size_t n = extents.shape[0] // 3
        cdef const vmr_extent *m = <const vmr_extent *>&extents[0] if n else NULL
        cdef int rc
        _error_init(&e)
        with nogil:
            rc = vmr_san_writer_open(cp, m, n, size, flags, &w.wr, &e)
        if rc != 0:
            raise _core_error(&e)
        w.opened = True
        return w

    cdef _check(self):
        if not self.opened:
            raise ValueError("writer is closed")

    @property
    def name(self):
        self._check()
        return self.wr.ops.name.decode()

    @property
    def size(self):
        self._check()
        return self.wr.ops.get_size(self.wr.w)

    @property
    def note(self):
        return self.wr.note.decode("utf-8", "replace")

    @property
    def created(self):
        """(st_dev, st_ino) of the file this writer created (O_EXCL), or None."""
        if not self.wr.created:
            return None
        return (self.wr.created_dev, self.wr.created_ino)

    @property
    def target_zeroed(self):
        return bool(self.wr.target_zeroed)

    @target_zeroed.setter
    def target_zeroed(self, value):
        self.wr.target_zeroed = 1 if value else 0

    def capabilities(self):
        self._check()
        return {
            "zero": bool(self.wr.ops.can_zero(self.wr.w)),
            "fast_zero": bool(self.wr.ops.can_fast_zero(self.wr.w)),
            "trim": bool(self.wr.ops.can_trim(self.wr.w)),
            "flush": bool(self.wr.ops.can_flush(self.wr.w)),
            "multi_conn": bool(self.wr.ops.can_multi_conn(self.wr.w)),
            "async": self.wr.ops.poll != NULL,
            "read": self.can_read(),
        }

    cdef bint can_read(self):
        # mirrors VMR_WRITER_CAN_READ (writer.h): the read side was appended to the table
        return (self.wr.ops.struct_size >= sizeof(vmr_writer_ops) and
                self.wr.ops.open_read != NULL and self.wr.ops.close_read != NULL)


cdef int _open_repo_source(dict repo, vmr_source *out, vmr_error *e) except -2:
    """vmr_repo_source_open from a dict (vmrestore.mover.repo_source builds it).

    The sockets belong to the source from here on: closed by it, or here when
    opening fails.
    """
    import os
    fds = list(repo["fds"])
    handles = list(repo["handles"])
    cdef size_t nfd = len(fds)
    cdef size_t nh = len(handles)
    cdef int *cfds = <int *>malloc((nfd if nfd else 1) * sizeof(int))
    cdef uint32_t *ch = <uint32_t *>malloc((nh if nh else 1) * sizeof(uint32_t))
    cdef vmr_repo_options o
    cdef size_t i
    cdef int rc
    if cfds == NULL or ch == NULL:
        free(cfds)
        free(ch)
        for fd in fds:
            os.close(fd)
        raise MemoryError()
    for i in range(nfd):
        cfds[i] = int(fds[i])
    for i in range(nh):
        ch[i] = int(handles[i])
    memset(&o, 0, sizeof(o))
    o.fds = cfds
    o.nfds = nfd
    o.readers = int(repo["readers"])
    o.handles = ch
    o.nfiles = nh // nfd if nfd else 0
    o.max_ranges = int(repo.get("max_ranges", 0))
    o.max_bulk = int(repo.get("max_bulk", 0))
    o.batch_bytes = int(repo.get("batch_bytes", 0))
    o.depth = int(repo.get("depth", 0))
    o.io_timeout_ms = int(repo.get("io_timeout_ms", 0))
    if nfd == 0 or nh % nfd:
        o.nfiles = 0   # refused below with a message
    rc = vmr_repo_source_open(&o, out, e)
    free(cfds)
    free(ch)
    if rc != 0:
        for fd in fds:
            os.close(fd)
    return rc


cdef class Pipeline:
    """One job: a plan, a source (chain file descriptors, or repository-agent sockets), a writer.

    start(), wait(), counters(). ``repo`` (a dict: fds, handles, readers, ...)
    selects the repository-agent source (ext/core/source_repo.c) instead of fds.

    Thread-safe against close(): flush() may run in another thread (checkpoints)
    while the owner closes; close() cancels, waits for those calls to leave the
    C object, then frees it. The count of calls inside lives here, in compiled
    code, because a Ctrl-C (a Python exception raised between two bytecodes)
    cannot land between its increment and its decrement; a count kept in Python
    could leak and leave close() waiting forever. After close(), counters() and
    error() give the final ones and flush() returns (or raises the job's error).
    """

    cdef vmr_pipeline *p
    cdef int users            # calls of other threads inside the C object (GIL-held count)
    cdef bint closing         # close() is cancelling and waiting for them
    cdef object final_counters
    cdef object final_error
    cdef vmr_source src
    cdef bint have_src
    cdef bint is_repo
    cdef object final_stats
    cdef object plan_bytes
    cdef Writer writer

    def __cinit__(self, plan, fds, Writer writer not None, uint32_t readers=0,
                  uint32_t threads=0, uint32_t lanes=0, uint32_t queue_depth=0,
                  uint32_t buffers=0, uint32_t disk=0, dict repo=None, bint compare=False,
                  uint64_t max_rate=0):
        cdef vmr_error e
        cdef vmr_pipeline_config cfg
        cdef size_t nf = len(fds)
        cdef int *cfds
        cdef size_t i
        cdef int rc
        cdef const unsigned char[::1] view
        cdef size_t n
        cdef const vmr_plan_entry *pp
        writer._check()
        self.writer = writer
        self.plan_bytes = plan
        view = memoryview(plan).cast("B")
        if view.shape[0] % 56:
            raise ValueError("plan is not an array of 56-byte entries")
        _error_init(&e)
        if repo is not None:
            rc = _open_repo_source(repo, &self.src, &e)
            self.is_repo = True
            readers = int(repo["readers"])
        else:
            cfds = <int *>malloc((nf if nf else 1) * sizeof(int))
            if cfds == NULL:
                raise MemoryError()
            for i in range(nf):
                cfds[i] = int(fds[i])
            rc = vmr_fd_source_open(cfds, nf, &self.src, &e)
            free(cfds)
        if rc != 0:
            raise _core_error(&e)
        self.have_src = True
        cfg.readers = readers
        cfg.threads = threads
        cfg.lanes = lanes
        cfg.queue_depth = queue_depth
        cfg.buffers = buffers
        cfg.disk = disk
        cfg.compare = 1 if compare else 0
        cfg.max_rate = max_rate
        n = view.shape[0] // 56
        pp = <const vmr_plan_entry *>&view[0] if n else NULL
        _error_init(&e)
        with nogil:
            self.p = vmr_pipeline_create(pp, n, &self.src, &writer.wr, &cfg, &e)
        if self.p == NULL:
            raise _core_error(&e)

    def __dealloc__(self):
        self._destroy(False)

    cdef _destroy(self, bint keep=True):
        """keep: record the final counters and error (not from __dealloc__, where the
        object's Python attributes may already be gone)."""
        cdef vmr_pipeline *p = self.p
        if p != NULL and not self.closing:
            if vmr_pipeline_wait(p, 0) == 0:
                vmr_pipeline_cancel(p)   # before closing is seen: a flush then sees the error
            self.closing = True          # no new flush enters the C object from here on
            with nogil:
                vmr_pipeline_wait(p, -1)
            while self.users > 0:  # another thread's flush: it returns now that the job ended
                with nogil:
                    usleep(1000)
            # no GIL release from the last check of users to here: nobody entered
            self.p = NULL
            if keep:
                self.final_counters = self._read_counters(p)
                self.final_error = self._read_error(p)
            with nogil:
                vmr_pipeline_destroy(p)
        if self.have_src:
            if self.is_repo and keep:
                self.final_stats = self.source_stats()
            self.have_src = False
            self.src.ops.close(self.src.s)

    def close(self):
        """Join the threads (cancelling if still running) and free the pool; idempotent."""
        self._destroy()

    cdef _live(self):
        if self.p == NULL:
            raise ValueError("pipeline is closed")

    def start(self):
        self._live()
        cdef vmr_error e
        cdef int rc
        _error_init(&e)
        with nogil:
            rc = vmr_pipeline_start(self.p, &e)
        if rc != 0:
            raise _core_error(&e)

    def wait(self, timeout=None):
        """Wait for the end (True) or until timeout seconds passed (False)."""
        self._live()
        cdef int ms = -1 if timeout is None else max(0, int(timeout * 1000))
        cdef int r
        self.users += 1
        try:
            with nogil:
                r = vmr_pipeline_wait(self.p, ms)
        finally:
            self.users -= 1
        return r == 1

    def cancel(self):
        if self.p != NULL:
            vmr_pipeline_cancel(self.p)

    def flush(self, timeout=None):
        """Make every completed write durable; safe while running, from any thread.

        After close(): returns if the job ended well (its lanes flushed at the
        end), else raises the job's error.
        """
        if self.p == NULL or self.closing:
            err = self.final_error if self.p == NULL else self._read_error(self.p)
            if err is not None:
                raise err
            return
        cdef vmr_error e
        cdef int ms = -1 if timeout is None else max(0, int(timeout * 1000))
        cdef int rc
        _error_init(&e)
        self.users += 1
        try:
            with nogil:
                rc = vmr_pipeline_flush(self.p, ms, &e)
        finally:
            self.users -= 1
        if rc != 0:
            raise _core_error(&e)

    def counters(self):
        """The live counters; after close(), the final ones."""
        if self.p == NULL:
            if self.final_counters is None:
                raise ValueError("pipeline is closed")
            return dict(self.final_counters)
        return self._read_counters(self.p)

    cdef dict _read_counters(self, vmr_pipeline *p):
        cdef vmr_counters c
        vmr_pipeline_counters(p, &c)
        return {
            "bytes_read": c.bytes_read,
            "bytes_decompressed": c.bytes_decompressed,
            "bytes_written": c.bytes_written,
            "bytes_zeroed": c.bytes_zeroed,
            "bytes_skipped": c.bytes_skipped,
            "read_ns": c.read_ns,
            "decompress_ns": c.decompress_ns,
            "write_ns": c.write_ns,
            "entries_done": c.entries_done,
            "completed_prefix": c.completed_prefix,
            "entries_total": c.entries_total,
            "elapsed_ns": c.elapsed_ns,
            "readers": c.readers,
            "threads": c.threads,
            "lanes": c.lanes,
            "queue_depth": c.queue_depth,
            "buffers": c.buffers,
            "running": bool(c.running),
            "cmp_entries": c.cmp_entries,
            "cmp_differ": c.cmp_differ,
            "cmp_bytes_read": c.cmp_bytes_read,
            "cmp_known_zero": c.cmp_known_zero,
            "bytes_same": c.bytes_same,
            "compare_ns": c.compare_ns,
            "throttle_ns": c.throttle_ns,
        }

    def source_stats(self):
        """Repository source: bytes received (wire, stored extents) and requests sent."""
        cdef vmr_repo_stats st
        if not self.have_src or not self.is_repo:
            return dict(self.final_stats or {"wire_bytes": 0, "bulk_bytes": 0, "requests": 0})
        vmr_repo_source_stats(&self.src, &st)
        return {"wire_bytes": st.wire_bytes, "bulk_bytes": st.bulk_bytes,
                "requests": st.requests}

    def error(self):
        """The first error as a CoreError, or None (after close(): the final one)."""
        if self.p == NULL:
            return self.final_error
        return self._read_error(self.p)

    cdef object _read_error(self, vmr_pipeline *p):
        cdef vmr_error e
        _error_init(&e)
        if vmr_pipeline_error(p, &e) == VMR_OK:
            return None
        return _core_error(&e)


# The VDDK writer (ext/core/writer_vddk.*): open_vddk_writer(...).
include "writer_vddk.pxi"
