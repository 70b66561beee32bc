/* vmrestore core: block codecs, checksums and zero detection.
 *
 * Plain C over liblz4, libzstd and libxxhash; no global state, no allocation
 * except where a function says so. Every function is safe to call without
 * the Python GIL. */
#ifndef VMR_CODEC_H
#define VMR_CODEC_H

#include <stddef.h>
#include <stdint.h>

/* Codec ids as stored in the backup format (docs/format.md). */
enum vmr_codec {
    VMR_CODEC_NONE = 0,
    VMR_CODEC_LZ4 = 1,
    VMR_CODEC_ZSTD = 2,
};

/* Upper bound of the compressed size of n raw bytes; 0 for an unknown codec. */
size_t vmr_compress_bound(int codec, size_t n);

/* Compress src into dst (capacity cap). Returns the compressed length,
 * or 0 on failure (unknown codec, dst too small). */
size_t vmr_compress(int codec, int level, const void *src, size_t n, void *dst, size_t cap);

/* Decompress exactly raw_len bytes into dst. Returns 0 on success,
 * -1 if the data is corrupt or does not decompress to exactly raw_len. */
int vmr_decompress(int codec, const void *src, size_t n, void *dst, size_t raw_len);

/* A reusable decompression context (one per thread): avoids allocating a
 * zstd context per block on the restore hot path. NULL on out of memory. */
void *vmr_dctx_new(void);
void vmr_dctx_free(void *dctx);
/* As vmr_decompress, using dctx (from vmr_dctx_new) for zstd. */
int vmr_decompress_dctx(void *dctx, int codec, const void *src, size_t n, void *dst,
                        size_t raw_len);

/* XXH3 128-bit hash of buf: with AVX2 when the CPU has it (hash_avx2.c), else libxxhash. */
void vmr_xxh3_128(const void *buf, size_t n, uint64_t *lo, uint64_t *hi);
/* The same through libxxhash only (tests compare the two). */
void vmr_xxh3_128_portable(const void *buf, size_t n, uint64_t *lo, uint64_t *hi);

#if defined(__x86_64__) && defined(__GNUC__)
#define VMR_XXH3_AVX2 1
void vmr_xxh3_128_avx2(const void *buf, size_t n, uint64_t *lo, uint64_t *hi);
#else
#define VMR_XXH3_AVX2 0
#endif

/* 1 if all n bytes are zero, else 0. */
int vmr_is_zero(const void *buf, size_t n);

#endif
