/* The compare stage of a quick rollback: see compare.h. */
#include "compare.h"

#include <errno.h>

#include "codec.h"

static int has_known_zero(const struct vmr_writer_ops *ops)
{
    return ops->struct_size >= offsetof(struct vmr_writer_ops, known_zero) + sizeof(void *) &&
           ops->known_zero != NULL;
}

int vmr_compare_entry(const struct vmr_writer_ops *ops, void *rh,
                      const struct vmr_plan_entry *pe, unsigned char *buf, size_t cap,
                      struct vmr_cmp_cost *cost, struct vmr_error *err)
{
    if (pe->kind == VMR_KIND_DATA) {
        if (pe->length > cap || pe->length > UINT32_MAX) {
            vmr_error_set(err, VMR_E_INTERNAL, 0, pe->dst_off,
                          "compare: block of %llu bytes at disk offset %llu exceeds the %zu-byte "
                          "buffer", (unsigned long long)pe->length,
                          (unsigned long long)pe->dst_off, cap);
            return -1;
        }
        if (ops->pread(rh, buf, (uint32_t)pe->length, pe->dst_off, err) != 0)
            return -1;
        cost->bytes_read += pe->length;
        uint64_t lo, hi;
        vmr_xxh3_128(buf, pe->length, &lo, &hi);
        return lo == pe->xxh_lo && hi == pe->xxh_hi ? VMR_CMP_SAME : VMR_CMP_DIFFERS;
    }
    /* a zero run: a known hole, or every chunk reads as zeros */
    if (has_known_zero(ops) && ops->known_zero(rh, pe->dst_off, pe->length) == 1) {
        cost->bytes_known_zero += pe->length;
        return VMR_CMP_SAME;
    }
    size_t chunk = cap > UINT32_MAX ? UINT32_MAX & ~(size_t)4095 : cap;
    if (chunk == 0) {
        vmr_error_set(err, VMR_E_INTERNAL, 0, pe->dst_off, "compare: no buffer");
        return -1;
    }
    for (uint64_t done = 0; done < pe->length;) {
        uint64_t k = pe->length - done < chunk ? pe->length - done : chunk;
        if (ops->pread(rh, buf, (uint32_t)k, pe->dst_off + done, err) != 0)
            return -1;
        cost->bytes_read += k;
        if (!vmr_is_zero(buf, k))
            return VMR_CMP_DIFFERS;
        done += k;
    }
    return VMR_CMP_SAME;
}
