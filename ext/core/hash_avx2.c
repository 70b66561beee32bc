/* XXH3-128 compiled for AVX2, used when the CPU has it.
 *
 * Distributions build libxxhash for baseline x86-64 (SSE2). Hashing every
 * restored block is 7-10 % of a restore's CPU (docs/benchmarks.md, "Where the
 * time goes"), and AVX2 does XXH3's inner loop in half the instructions. This
 * file compiles xxhash.h's own inline code (XXH_INLINE_ALL: static functions,
 * no symbol clash with the library) for AVX2 through a target pragma; codec.c
 * calls it only when the CPU reports AVX2. The value of XXH3 does not depend
 * on the vector width: tests/test_codecs.py checks both paths agree. */
#include "codec.h"

#if VMR_XXH3_AVX2
#pragma GCC target("avx2")
#define XXH_INLINE_ALL
#define XXH_VECTOR 2 /* XXH_AVX2 */
#include <xxhash.h>

void vmr_xxh3_128_avx2(const void *buf, size_t n, uint64_t *lo, uint64_t *hi)
{
    XXH128_hash_t h = XXH3_128bits(buf, n);
    *lo = h.low64;
    *hi = h.high64;
}
#else
typedef int vmr_hash_avx2_unused; /* ISO C: a translation unit is never empty */
#endif
