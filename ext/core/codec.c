/* Block codecs, checksums and zero detection; see codec.h. */
#include "codec.h"

#include <lz4.h>
#include <lz4hc.h>
#include <string.h>
#include <xxhash.h>
#include <zstd.h>

size_t vmr_compress_bound(int codec, size_t n)
{
    switch (codec) {
    case VMR_CODEC_NONE:
        return n;
    case VMR_CODEC_LZ4:
        if (n > (size_t)LZ4_MAX_INPUT_SIZE)
            return 0;
        return (size_t)LZ4_compressBound((int)n);
    case VMR_CODEC_ZSTD:
        return ZSTD_compressBound(n);
    default:
        return 0;
    }
}

size_t vmr_compress(int codec, int level, const void *src, size_t n, void *dst, size_t cap)
{
    switch (codec) {
    case VMR_CODEC_NONE:
        if (cap < n)
            return 0;
        memcpy(dst, src, n);
        return n;
    case VMR_CODEC_LZ4: {
        if (n > (size_t)LZ4_MAX_INPUT_SIZE || cap > (size_t)INT32_MAX)
            return 0;
        int r = level > 1 ? LZ4_compress_HC(src, dst, (int)n, (int)cap, level)
                          : LZ4_compress_default(src, dst, (int)n, (int)cap);
        return r > 0 ? (size_t)r : 0;
    }
    case VMR_CODEC_ZSTD: {
        size_t r = ZSTD_compress(dst, cap, src, n, level);
        return ZSTD_isError(r) ? 0 : r;
    }
    default:
        return 0;
    }
}

int vmr_decompress(int codec, const void *src, size_t n, void *dst, size_t raw_len)
{
    switch (codec) {
    case VMR_CODEC_NONE:
        if (n != raw_len)
            return -1;
        memcpy(dst, src, n);
        return 0;
    case VMR_CODEC_LZ4: {
        if (n > (size_t)INT32_MAX || raw_len > (size_t)INT32_MAX)
            return -1;
        int r = LZ4_decompress_safe(src, dst, (int)n, (int)raw_len);
        return (r >= 0 && (size_t)r == raw_len) ? 0 : -1;
    }
    case VMR_CODEC_ZSTD: {
        size_t r = ZSTD_decompress(dst, raw_len, src, n);
        return (!ZSTD_isError(r) && r == raw_len) ? 0 : -1;
    }
    default:
        return -1;
    }
}

void *vmr_dctx_new(void)
{
    return ZSTD_createDCtx();
}

void vmr_dctx_free(void *dctx)
{
    ZSTD_freeDCtx(dctx);
}

int vmr_decompress_dctx(void *dctx, int codec, const void *src, size_t n, void *dst,
                        size_t raw_len)
{
    if (codec != VMR_CODEC_ZSTD || dctx == NULL)
        return vmr_decompress(codec, src, n, dst, raw_len);
    size_t r = ZSTD_decompressDCtx(dctx, dst, raw_len, src, n);
    return (!ZSTD_isError(r) && r == raw_len) ? 0 : -1;
}

void vmr_xxh3_128_portable(const void *buf, size_t n, uint64_t *lo, uint64_t *hi)
{
    XXH128_hash_t h = XXH3_128bits(buf, n);
    *lo = h.low64;
    *hi = h.high64;
}

void vmr_xxh3_128(const void *buf, size_t n, uint64_t *lo, uint64_t *hi)
{
#if VMR_XXH3_AVX2
    /* short inputs take XXH3's scalar paths either way */
    if (n > 240 && __builtin_cpu_supports("avx2")) {
        vmr_xxh3_128_avx2(buf, n, lo, hi);
        return;
    }
#endif
    vmr_xxh3_128_portable(buf, n, lo, hi);
}

int vmr_is_zero(const void *buf, size_t n)
{
    const unsigned char *p = buf;
    /* Check a short head byte by byte, then compare the buffer with itself
     * shifted by 16 bytes: memcmp is vectorised, so this runs at memory speed. */
    size_t head = n < 16 ? n : 16;
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return 0;
    if (n <= 16)
        return 1;
    return memcmp(p, p + 16, n - 16) == 0;
}
