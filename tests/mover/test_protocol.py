"""The wire format: round trips, rejection of malformed input, and a parser fuzz."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmrestore.errors import ProtocolError
from vmrestore.mover import protocol as P
from vmrestore.mover.protocol import T


def roundtrip(mtype: T, payload: bytes) -> object:
    frames, rest = P.split_frames(P.frame(mtype, 42, payload))
    assert rest == b"" and len(frames) == 1 and frames[0].req_id == 42
    return P.decode(frames[0])


def test_messages_round_trip() -> None:
    assert roundtrip(T.HELLO, P.Hello(1, 3, 1).encode()) == P.Hello(1, 3, 1)
    assert roundtrip(T.HELLO_OK, P.HelloOk(1, 1, 4096, 1 << 26).encode()) == P.HelloOk(
        1, 1, 4096, 1 << 26)
    assert roundtrip(T.AUTH, P.Auth(b"n" * 32, "proxy-ü").encode()) == P.Auth(b"n" * 32,
                                                                              "proxy-ü")
    o = P.Opened(3, 1 << 30, 1 << 29, b"s" * 16)
    assert roundtrip(T.OPENED, o.encode()) == o
    ex = P.Extents(3, ((4096, 100), (4196, 7)))
    assert roundtrip(T.EXTENTS, ex.encode()) == ex
    recs = [P.Record(4096, 100, 1 << 20, 2, 1, 5, 6), P.Record(4196, 7)]
    assert roundtrip(T.EXTENT_DATA, P.encode_extent_data(recs)) == recs
    assert roundtrip(T.LISTING, P.encode_listing(["a.vmrb", "b.vmrb"])) == ["a.vmrb", "b.vmrb"]
    assert roundtrip(T.OPEN, P.encode_path("vm1/x.vmrb")) == "vm1/x.vmrb"
    assert roundtrip(T.READY, b"") is None


def test_corrupted_frames_are_refused() -> None:
    good = P.frame(T.OPEN, 1, b"vm1/x.vmrb")
    for i in range(len(good)):  # any single flipped byte is caught (CRC, magic, length)
        bad = bytearray(good)
        bad[i] ^= 0x40
        with pytest.raises(ProtocolError):
            frames, _ = P.split_frames(bytes(bad))
            if not frames:  # a longer announced length: the frame is incomplete, not accepted
                raise ProtocolError("incomplete")


def test_limits() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        P.parse_header(struct.pack("<2sBBIII", b"VM", T.READ, 0, 1, P.MAX_PAYLOAD + 1, 0))
    with pytest.raises(ProtocolError, match="ranges"):
        P.Extents.decode(struct.pack("<II", 1, P.MAX_RANGES + 1))
    with pytest.raises(ProtocolError, match="unknown message type"):
        P.parse_header(struct.pack("<2sBBIII", b"VM", 99, 0, 1, 0, 0))
    with pytest.raises(ProtocolError):
        P.Hello.decode(P.HELLO_MAGIC + struct.pack("<HHI", 3, 1, 0))  # empty version range
    with pytest.raises(ProtocolError):
        P.decode_path(b"a\x00b", "OPEN")


def test_token_file_forms() -> None:
    assert P.load_tokens("# job token\n" + "t" * 20 + "\n") == {None: b"t" * 20}
    assert P.load_tokens("proxy1 " + "a" * 16 + "\nproxy2 " + "b" * 16) == {
        "proxy1": b"a" * 16, "proxy2": b"b" * 16}
    with pytest.raises(ValueError, match="shorter"):
        P.load_tokens("short")
    with pytest.raises(ValueError, match="empty"):
        P.load_tokens("\n# nothing\n")


def test_proofs_differ_by_role_and_transcript() -> None:
    k = b"k" * 16
    assert P.proof(k, b"agent", b"t") != P.proof(k, b"proxy", b"t")
    assert P.proof(k, b"agent", b"t") != P.proof(k, b"agent", b"u")
    assert P.proof(k, b"agent", b"t") != P.proof(b"j" * 16, b"agent", b"t")


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_stream_parser(data: bytes) -> None:
    """Arbitrary bytes: whole frames decode or ProtocolError; nothing else escapes."""
    try:
        frames, _ = P.split_frames(data)
        for fr in frames:
            P.decode(fr)
    except ProtocolError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(list(T)), st.binary(max_size=200), st.integers(0, 2**32 - 1))
def test_fuzz_payload_decoders(mtype: T, payload: bytes, rid: int) -> None:
    """Valid frames around random payloads: every decoder fails only with ProtocolError."""
    frames, rest = P.split_frames(P.frame(mtype, rid, payload))
    assert rest == b"" and frames[0].payload == payload
    try:
        P.decode(frames[0])
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
                min_size=1, max_size=50), st.integers(0, 2**32 - 1))
def test_fuzz_extents_round_trip(ranges: list[tuple[int, int]], handle: int) -> None:
    ex = P.Extents(handle, tuple(ranges))
    assert P.Extents.decode(ex.encode()) == ex
