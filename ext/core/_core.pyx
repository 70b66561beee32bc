# cython: language_level=3
"""Codecs, checksums and zero detection for whole blocks, with the GIL released.

Used by the backup writer, verify, and tests; the restore pipeline calls the
same C functions (codec.h) from its own threads.
"""
from libc.stdint cimport uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

cimport codec

CODEC_NONE = codec.VMR_CODEC_NONE
CODEC_LZ4 = codec.VMR_CODEC_LZ4
CODEC_ZSTD = codec.VMR_CODEC_ZSTD


class CodecError(ValueError):
    """Compressed data that does not decode to the expected length."""


def compress(const unsigned char[::1] src not None, int codec_id, int level=0) -> bytes:
    """Compress one block; returns the compressed bytes."""
    cdef size_t n = src.shape[0]
    cdef size_t cap = codec.vmr_compress_bound(codec_id, n)
    cdef size_t out_len
    cdef const unsigned char *sp = &src[0] if n else NULL
    if cap == 0 and n != 0:
        raise ValueError(f"unknown codec id {codec_id} or block too large")
    out = PyBytes_FromStringAndSize(NULL, cap if cap else 1)
    cdef char *dp = PyBytes_AS_STRING(out)
    with nogil:
        out_len = codec.vmr_compress(codec_id, level, sp, n, dp, cap)
    if out_len == 0 and n != 0:
        raise ValueError(f"compression failed (codec {codec_id})")
    return out[:out_len]


def decompress_into(const unsigned char[::1] src not None, unsigned char[::1] dst not None,
                    int codec_id) -> None:
    """Decompress src into all of dst; raises CodecError unless it fills dst exactly."""
    cdef int rc
    cdef size_t n = src.shape[0]
    cdef size_t raw = dst.shape[0]
    cdef const unsigned char *sp = &src[0] if n else NULL
    cdef unsigned char *dp = &dst[0] if raw else NULL
    with nogil:
        rc = codec.vmr_decompress(codec_id, sp, n, dp, raw)
    if rc != 0:
        raise CodecError(f"corrupt data: codec {codec_id}, {n} bytes do not decode to {raw}")


def decompress(const unsigned char[::1] src not None, int codec_id, size_t raw_len) -> bytes:
    """Decompress to a new bytes object of exactly raw_len bytes."""
    out = bytearray(raw_len)
    decompress_into(src, out, codec_id)
    return bytes(out)


def xxh3_128(const unsigned char[::1] buf not None, bint portable=False) -> tuple[int, int]:
    """XXH3-128 of buf as (low64, high64); portable=True: libxxhash's own code only
    (the default uses the AVX2 build when the CPU has it; both give the same value)."""
    cdef uint64_t lo = 0, hi = 0
    cdef size_t n = buf.shape[0]
    cdef const unsigned char *p = &buf[0] if n else NULL
    with nogil:
        if portable:
            codec.vmr_xxh3_128_portable(p, n, &lo, &hi)
        else:
            codec.vmr_xxh3_128(p, n, &lo, &hi)
    return lo, hi


def is_zero(const unsigned char[::1] buf not None) -> bool:
    """True when every byte of buf is zero."""
    cdef size_t n = buf.shape[0]
    cdef int r
    if n == 0:
        return True
    with nogil:
        r = codec.vmr_is_zero(&buf[0], n)
    return r != 0
