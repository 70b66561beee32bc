# The VDDK writer's constructor for _pipeline.pyx (included at its end; owner: H5).
# vmrestore.vddk.Disk.writer_args() supplies the handle and call addresses.
from libc.stdint cimport uintptr_t


cdef extern from "writer_vddk.h" nogil:
    struct vmr_vddk_functions:
        uintptr_t write_async
        uintptr_t write
        uintptr_t wait
        uintptr_t flush
        uintptr_t get_error_text
        uintptr_t free_error_text
        uintptr_t read
    struct vmr_vddk_options:
        uintptr_t handle
        vmr_vddk_functions fn
        uint64_t size
        uint32_t max_request
        uint32_t flags
        const char *disk
        uint64_t max_inflight
    int vmr_vddk_writer_open(const vmr_vddk_options *opt, vmr_writer *out, vmr_error *err)


cdef extern from "vddk_log.h" nogil:
    int VMR_VDDK_LOG_MSG
    struct vmr_vddk_log_entry:
        int level
        char msg[480]
    void vmr_vddk_log_functions(uintptr_t out[3])
    int vmr_vddk_log_drain(vmr_vddk_log_entry *out, int max, uint64_t *dropped)


def vddk_log_functions():
    """Addresses of the thread-safe log, warn and panic functions for VixDiskLib_InitEx."""
    cdef uintptr_t f[3]
    vmr_vddk_log_functions(f)
    return {"log": f[0], "warn": f[1], "panic": f[2]}


def vddk_log_drain():
    """(entries, dropped): the messages VixDiskLib logged since the last drain, oldest first.

    entries are (level, text) with level 0 log, 1 warning, 2 panic."""
    cdef vmr_vddk_log_entry buf[32]
    cdef uint64_t dropped = 0, d = 0
    cdef int n, i
    out = []
    while True:
        with nogil:
            n = vmr_vddk_log_drain(buf, 32, &d)
        dropped += d
        for i in range(n):
            out.append((buf[i].level, buf[i].msg.decode("utf-8", "replace")))
        if n < 32:
            return out, dropped


def open_vddk_writer(dict args not None, uint64_t size, str disk, uint32_t max_request=0,
                     uint32_t flags=0, cls=Writer, uint64_t max_inflight=0):
    """A Writer over an open VixDiskLib disk handle (args: Disk.writer_args()).

    cls may be a Python subclass of Writer (vmrestore.vddk uses one whose
    close() also closes the VDDK disk, connection and access bracket)."""
    if not issubclass(cls, Writer):
        raise TypeError("cls must be a subclass of Writer")
    cdef Writer w = <Writer>cls.__new__(cls)
    cdef vmr_error e
    cdef vmr_vddk_options o
    cdef bytes bdisk = disk.encode()
    cdef int rc
    memset(&o, 0, sizeof(o))
    o.handle = <uintptr_t>args["handle"]
    o.fn.write_async = <uintptr_t>args["WriteAsync"]
    o.fn.write = <uintptr_t>args["Write"]
    o.fn.wait = <uintptr_t>args["Wait"]
    o.fn.flush = <uintptr_t>args["Flush"]
    o.fn.get_error_text = <uintptr_t>args["GetErrorText"]
    o.fn.free_error_text = <uintptr_t>args["FreeErrorText"]
    o.fn.read = <uintptr_t>args["Read"]
    o.size = size
    o.max_request = max_request
    o.max_inflight = max_inflight
    o.flags = flags
    o.disk = bdisk
    _error_init(&e)
    with nogil:
        rc = vmr_vddk_writer_open(&o, &w.wr, &e)
    if rc != 0:
        raise _core_error(&e)
    w.opened = True
    return w
