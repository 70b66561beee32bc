/* vmrestore core: the VixDiskLib (VDDK) writer's constructor.
 *
 * The library is loaded and driven by Python (vmrestore.vddk, cffi ABI mode):
 * it connects, opens the disk and passes here the disk handle and the
 * addresses of the few calls the writer makes (Disk.writer_args()). The core
 * never dlopens VixDiskLib itself, so it always talks to the very library and
 * handle Python opened; Python closes the handle after the pipeline ends.
 */
#ifndef VMR_WRITER_VDDK_H
#define VMR_WRITER_VDDK_H

#include <stdint.h>

#include "writer.h"

/* Addresses of VixDiskLib calls (uintptr_t so Cython/Python can pass ints). */
struct vmr_vddk_functions {
    uintptr_t write_async;      /* VixDiskLib_WriteAsync */
    uintptr_t write;            /* VixDiskLib_Write */
    uintptr_t wait;             /* VixDiskLib_Wait */
    uintptr_t flush;            /* VixDiskLib_Flush */
    uintptr_t get_error_text;   /* VixDiskLib_GetErrorText */
    uintptr_t free_error_text;  /* VixDiskLib_FreeErrorText */
    uintptr_t read;             /* VixDiskLib_Read: the read side (quick rollback) */
};

struct vmr_vddk_options {
    uintptr_t handle;                 /* VixDiskLibHandle, open for writing */
    struct vmr_vddk_functions fn;
    uint64_t size;                    /* disk capacity in bytes (sectors * 512) */
    uint32_t max_request;             /* bytes per VixDiskLib call (0 = 1 MiB) */
    uint32_t flags;                   /* VMR_FILE_TARGET_ZEROED: a new disk, skip zeros */
    const char *disk;                 /* name for messages, e.g. "[ds1] vm/vm.vmdk" */
    uint64_t max_inflight;            /* bytes WriteAsync may hold at once (0 = 8 MiB) */
};

/* Default bytes per WriteAsync and in flight per disk handle: an NFC message is
 * the data + 24 bytes, allocated from the host's small NFC buffer pool, and
 * "Failed to allocate the requested 2097176 bytes" is what a 2 MiB request
 * meets there. docs/vddk.md ("NFC buffers") has the reasoning and numbers. */
#define VMR_VDDK_DEFAULT_MAX_REQUEST (1u << 20)
#define VMR_VDDK_DEFAULT_MAX_INFLIGHT (8ull << 20)

int vmr_vddk_writer_open(const struct vmr_vddk_options *opt, struct vmr_writer *out,
                         struct vmr_error *err);

#endif
