/* vmrestore core: thread-safe log functions for VixDiskLib_InitEx.
 *
 * VMware: do not pass NULL log functions to InitEx when the library is used
 * from several threads (its defaults are not thread-safe); pass your own,
 * thread-safe ones. These three format the message into a bounded ring
 * (mutex-protected, no allocation, no Python, no GIL) from whatever thread
 * the library calls them on; Python drains the ring into the `logging`
 * module (vmrestore.vddk) after each session call and while a restore runs.
 * The panic function records, writes the message to stderr and aborts: the
 * library calls it on a fatal condition and it must not return.
 */
#ifndef VMR_VDDK_LOG_H
#define VMR_VDDK_LOG_H

#include <stdarg.h>
#include <stdint.h>

#define VMR_VDDK_LOG_MSG 480
#define VMR_VDDK_LOG_RING 256

enum { VMR_VDDK_LOG_INFO = 0, VMR_VDDK_LOG_WARN = 1, VMR_VDDK_LOG_PANIC = 2 };

struct vmr_vddk_log_entry {
    int level;
    char msg[VMR_VDDK_LOG_MSG];
};

void vmr_vddk_log(const char *fmt, va_list args);
void vmr_vddk_warn(const char *fmt, va_list args);
void vmr_vddk_panic(const char *fmt, va_list args);

/* The three addresses, in that order (for Python, which cannot name va_list). */
void vmr_vddk_log_functions(uintptr_t out[3]);

/* Move up to max entries, oldest first, into out; returns how many. *dropped
 * gets the number of messages lost to a full ring since the last drain. */
int vmr_vddk_log_drain(struct vmr_vddk_log_entry *out, int max, uint64_t *dropped);

#endif
