"""The compiled codecs, checksums and zero detection."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmrestore import core


@pytest.mark.parametrize("codec", sorted(core.CODECS.values()))
@given(data=st.binary(max_size=70_000))
def test_round_trip(codec: int, data: bytes) -> None:
    packed = core.compress(data, codec, 3 if codec == core.CODEC_ZSTD else 0)
    assert core.decompress(packed, codec, len(data)) == data


@pytest.mark.parametrize("codec", [core.CODEC_LZ4, core.CODEC_ZSTD])
def test_corrupt_input_raises(codec: int) -> None:
    data = b"abcd" * 10_000
    packed = bytearray(core.compress(data, codec, 1))
    packed[len(packed) // 2] ^= 0xFF
    packed = bytes(packed[: len(packed) - 3])
    with pytest.raises(core.CodecError):
        core.decompress(packed, codec, len(data))


def test_wrong_length_raises() -> None:
    packed = core.compress(b"x" * 1000, core.CODEC_ZSTD, 1)
    with pytest.raises(core.CodecError):
        core.decompress(packed, core.CODEC_ZSTD, 999)


def test_xxh3_distinguishes_and_repeats() -> None:
    a = os.urandom(4096)
    b = bytearray(a)
    b[100] ^= 1
    assert core.xxh3_128(a) == core.xxh3_128(bytes(a))
    assert core.xxh3_128(a) != core.xxh3_128(bytes(b))
    lo, hi = core.xxh3_128(b"")
    assert isinstance(lo, int) and isinstance(hi, int)


# XXH3's known answers (xxhash's own test vectors, input of length 0) and lengths
# around its internal boundaries: the AVX2 build (hash_avx2.c, used when the CPU has
# AVX2) and libxxhash's code must give every stored checksum the same value.
@pytest.mark.parametrize("n", [0, 1, 16, 17, 128, 129, 240, 241, 1024, 1025, 65536,
                               (1 << 20) + 13])
def test_xxh3_avx2_build_equals_the_library(n: int) -> None:
    buf = os.urandom(n)
    assert core.xxh3_128(buf) == core.xxh3_128(buf, portable=True)


def test_xxh3_known_answer_of_empty_input() -> None:
    assert core.xxh3_128(b"") == (0x6001C324468D497F, 0x99AA06D3014798D8)


@given(n=st.integers(0, 5000), pos=st.integers(0, 4999))
def test_is_zero(n: int, pos: int) -> None:
    buf = bytearray(n)
    assert core.is_zero(buf)
    if pos < n:
        buf[pos] = 1
        assert not core.is_zero(buf)
