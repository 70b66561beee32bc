# Declarations of ext/core/codec.h: only what the Cython modules call.
from libc.stdint cimport uint64_t

cdef extern from "codec.h" nogil:
    enum:
        VMR_CODEC_NONE
        VMR_CODEC_LZ4
        VMR_CODEC_ZSTD
    size_t vmr_compress_bound(int codec, size_t n)
    size_t vmr_compress(int codec, int level, const void *src, size_t n, void *dst, size_t cap)
    int vmr_decompress(int codec, const void *src, size_t n, void *dst, size_t raw_len)
    void vmr_xxh3_128(const void *buf, size_t n, uint64_t *lo, uint64_t *hi)
    void vmr_xxh3_128_portable(const void *buf, size_t n, uint64_t *lo, uint64_t *hi)
    int vmr_is_zero(const void *buf, size_t n)
