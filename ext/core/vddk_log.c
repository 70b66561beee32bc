/* Thread-safe VixDiskLib log functions: a bounded ring drained by Python.
 * See vddk_log.h for why; docs/vddk.md ("Log functions"). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vddk_log.h"

static pthread_mutex_t ring_mu = PTHREAD_MUTEX_INITIALIZER;
static struct vmr_vddk_log_entry ring[VMR_VDDK_LOG_RING];
static unsigned ring_head, ring_count;  /* oldest entry; entries held */
static uint64_t ring_dropped;

static void record(int level, const char *fmt, va_list args, char *copy, size_t cap)
{
    struct vmr_vddk_log_entry *e;
    char msg[VMR_VDDK_LOG_MSG];
    size_t n;

    vsnprintf(msg, sizeof msg, fmt, args);
    n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    if (copy)
        snprintf(copy, cap, "%s", msg);
    pthread_mutex_lock(&ring_mu);
    if (ring_count == VMR_VDDK_LOG_RING) {  /* full: the oldest goes */
        ring_head = (ring_head + 1) % VMR_VDDK_LOG_RING;
        ring_count--;
        ring_dropped++;
    }
    e = &ring[(ring_head + ring_count) % VMR_VDDK_LOG_RING];
    e->level = level;
    memcpy(e->msg, msg, n + 1);
    ring_count++;
    pthread_mutex_unlock(&ring_mu);
}

void vmr_vddk_log(const char *fmt, va_list args)
{
    record(VMR_VDDK_LOG_INFO, fmt, args, NULL, 0);
}

void vmr_vddk_warn(const char *fmt, va_list args)
{
    record(VMR_VDDK_LOG_WARN, fmt, args, NULL, 0);
}

void vmr_vddk_panic(const char *fmt, va_list args)
{
    char msg[VMR_VDDK_LOG_MSG];
    record(VMR_VDDK_LOG_PANIC, fmt, args, msg, sizeof msg);
    fprintf(stderr, "VixDiskLib panic: %s\n", msg);
    fflush(stderr);
    abort();
}

int vmr_vddk_log_drain(struct vmr_vddk_log_entry *out, int max, uint64_t *dropped)
{
    int n = 0;
    pthread_mutex_lock(&ring_mu);
    while (n < max && ring_count > 0) {
        out[n++] = ring[ring_head];
        ring_head = (ring_head + 1) % VMR_VDDK_LOG_RING;
        ring_count--;
    }
    if (dropped) {
        *dropped = ring_dropped;
        ring_dropped = 0;
    }
    pthread_mutex_unlock(&ring_mu);
    return n;
}

void vmr_vddk_log_functions(uintptr_t out[3])
{
    out[0] = (uintptr_t)vmr_vddk_log;
    out[1] = (uintptr_t)vmr_vddk_warn;
    out[2] = (uintptr_t)vmr_vddk_panic;
}
