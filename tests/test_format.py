"""Format v1 bytes: record layouts match docs/format.md, and every reason to reject a file."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo_helpers import MIB, backup, make_disk
from vmrestore.errors import FormatError, IncompleteBackupError, UnsupportedVersionError
from vmrestore.repository import format as fmt
from vmrestore.repository.reader import open_point


def test_record_layouts_match_the_spec() -> None:
    e = fmt.EXTENT_DTYPE
    assert [e.fields[n][1] for n in ("offset", "stored_len", "raw_len", "codec", "level",
                                     "flags", "reserved", "xxh", "blake")] == \
        [0, 8, 12, 16, 17, 18, 20, 24, 40]
    b = fmt.BLOCK_DTYPE
    assert [b.fields[n][1] for n in ("kind", "reserved0", "point", "reserved1", "extent")] == \
        [0, 1, 2, 4, 8]
    assert (e.itemsize, b.itemsize, fmt.SECTION_SIZE) == (64, 16, 48)


def test_header_footer_round_trip() -> None:
    pid = bytes(range(16))
    h = fmt.Header(pid, 123456789)
    packed = h.pack()
    assert len(packed) == fmt.HEADER_SIZE and packed[:8] == b"VMRBAK\r\n"
    assert fmt.Header.unpack(packed[:64], "x") == h
    f = fmt.Footer(pid, b"\1" * 16, b"\2" * 16, 3, 5, 4096, 240, b"\3" * 16)
    fp = f.pack()
    assert len(fp) == fmt.FOOTER_SIZE and fp[:8] == b"VMREND\r\n"
    g = fmt.Footer.unpack(fp, "x")
    assert (g.point_id, g.parent_id, g.depth, g.section_count, g.section_offset) == \
        (pid, b"\1" * 16, 3, 5, 4096)
    assert g.checksum == fp[112:]
    lo, hi = struct.unpack("<QQ", fp[112:])
    from vmrestore import core
    assert core.xxh3_128(fp[:112]) == (lo, hi)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fmt")
    make_disk(d / "d.img", 6 * MIB + 512, seed=1)
    backup([d / "d.img"], d / "b.vmrb")
    return d / "b.vmrb"


def _copy(good: Path, tmp_path: Path, edit) -> Path:
    data = bytearray(good.read_bytes())
    edit(data)
    p = tmp_path / "bad.vmrb"
    p.write_bytes(bytes(data))
    return p


def _resign_footer(data: bytearray) -> None:
    body = bytes(data[-128:-16])
    data[-16:] = fmt.checksum(body)


def test_good_file_opens(good: Path) -> None:
    p = open_point(good)
    assert p.depth == 0 and len(p.disks) == 1 and p.disks[0]["capacity"] == 6 * MIB + 512
    assert p.block_map(0).dtype == fmt.BLOCK_DTYPE and len(p.block_map(0)) == 7
    assert p.vm_config["disks"][0]["provisioning"] == "thin"


@pytest.mark.parametrize("cut", [1, 100, 4096, 5000, -1, -128])
def test_truncated_is_incomplete(good: Path, tmp_path: Path, cut: int) -> None:
    p = _copy(good, tmp_path, lambda d: d.__delitem__(slice(cut if cut > 0 else len(d) + cut,
                                                              None)))
    with pytest.raises(IncompleteBackupError, match="incomplete"):
        open_point(p)


def test_bad_footer_checksum_is_incomplete(good: Path, tmp_path: Path) -> None:
    def edit(d: bytearray) -> None:
        d[-128 + 64] ^= 1  # depth
    with pytest.raises(IncompleteBackupError, match="footer checksum"):
        open_point(_copy(good, tmp_path, edit))


def test_wrong_header_magic(good: Path, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="bad header magic"):
        open_point(_copy(good, tmp_path, lambda d: d.__setitem__(0, ord("X"))))


def test_header_checksum(good: Path, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="header checksum"):
        open_point(_copy(good, tmp_path, lambda d: d.__setitem__(33, d[33] ^ 1)))


def test_unsupported_major_version(good: Path, tmp_path: Path) -> None:
    def edit(d: bytearray) -> None:
        d[-128 + 8:-128 + 10] = struct.pack("<H", 2)
        _resign_footer(d)
    with pytest.raises(UnsupportedVersionError, match="version 2"):
        open_point(_copy(good, tmp_path, edit))


def test_higher_minor_version_is_read(good: Path, tmp_path: Path) -> None:
    def edit(d: bytearray) -> None:
        d[-128 + 10:-128 + 12] = struct.pack("<H", 7)
        _resign_footer(d)
    assert open_point(_copy(good, tmp_path, edit)).footer.minor == 7


def test_broken_section_table_checksum(good: Path, tmp_path: Path) -> None:
    f = fmt.Footer.unpack(good.read_bytes()[-128:], "x")
    with pytest.raises(FormatError, match="section table checksum"):
        open_point(_copy(good, tmp_path,
                         lambda d: d.__setitem__(f.section_offset + 9, d[f.section_offset + 9]
                                                 ^ 1)))


@pytest.mark.parametrize("kind", [fmt.SEC_MANIFEST, fmt.SEC_EXTENTS, fmt.SEC_BLOCK_MAP,
                                  fmt.SEC_VM_CONFIG])
def test_broken_section_checksum(good: Path, tmp_path: Path, kind: int) -> None:
    sec = next(s for s in open_point(good).sections if s.kind == kind)
    with pytest.raises(FormatError, match="checksum mismatch"):
        open_point(_copy(good, tmp_path,
                         lambda d: d.__setitem__(sec.offset + 3, d[sec.offset + 3] ^ 1)))


def test_section_outside_file(good: Path, tmp_path: Path) -> None:
    """A section table that is self-consistent but points past the data region."""
    f = fmt.Footer.unpack(good.read_bytes()[-128:], "x")

    def edit(d: bytearray) -> None:
        table = bytearray(d[f.section_offset:f.section_offset + f.section_length])
        struct.pack_into("<Q", table, 8, len(d) + 10)  # first section's offset
        d[f.section_offset:f.section_offset + f.section_length] = table
        nf = fmt.Footer(f.point_id, f.parent_id, f.parent_checksum, f.depth, f.section_count,
                        f.section_offset, f.section_length, fmt.checksum(bytes(table)))
        d[-128:] = nf.pack()
    with pytest.raises(FormatError, match="outside"):
        open_point(_copy(good, tmp_path, edit))


def test_broken_extent_reference_is_rejected(good: Path, tmp_path: Path) -> None:
    """A block map pointing at an extent that does not exist, with valid checksums."""
    p = open_point(good)
    sec = next(s for s in p.sections if s.kind == fmt.SEC_BLOCK_MAP)
    raw = good.read_bytes()
    f = p.footer

    def edit(d: bytearray) -> None:
        m = np.frombuffer(raw[sec.offset:sec.offset + sec.length], fmt.BLOCK_DTYPE).copy()
        b = int(np.flatnonzero(m["kind"] == fmt.BLOCK_DATA)[0])
        m["extent"][b] = 999
        d[sec.offset:sec.offset + sec.length] = m.tobytes()
        secs = [s if s is not sec else fmt.Section(s.kind, s.disk, s.offset, s.length,
                                                   s.records, fmt.checksum(m.tobytes()))
                for s in p.sections]
        table = fmt.pack_sections(secs)
        d[f.section_offset:f.section_offset + f.section_length] = table
        d[-128:] = fmt.Footer(f.point_id, f.parent_id, f.parent_checksum, f.depth,
                              f.section_count, f.section_offset, f.section_length,
                              fmt.checksum(table)).pack()
    with pytest.raises(FormatError, match="broken block map"):
        open_point(_copy(good, tmp_path, edit))


def test_block_size_validation() -> None:
    assert fmt.valid_block_size(64 * 1024) and fmt.valid_block_size(8 * MIB)
    assert not fmt.valid_block_size(32 * 1024) and not fmt.valid_block_size(16 * MIB)
    assert not fmt.valid_block_size(3 * MIB)


def _resign_all(d: bytearray) -> None:
    """Recompute every section checksum, the table checksum and the footer checksum."""
    f = fmt.Footer.unpack(bytes(d[-128:]), "x")
    secs = fmt.unpack_sections(bytes(d[f.section_offset:f.section_offset + f.section_length]),
                               f.section_count)
    secs = [fmt.Section(s.kind, s.disk, s.offset, s.length, s.records,
                        fmt.checksum(bytes(d[s.offset:s.offset + s.length]))) for s in secs]
    table = fmt.pack_sections(secs)
    d[f.section_offset:f.section_offset + f.section_length] = table
    d[-128:] = fmt.Footer(f.point_id, f.parent_id, f.parent_checksum, f.depth, f.section_count,
                          f.section_offset, f.section_length, fmt.checksum(table)).pack()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 1, exclude_max=True), value=st.integers(0, 255),
       resign=st.booleans())
def test_corrupt_index_never_crashes_the_reader(good: Path, tmp_path: Path, where: float,
                                                value: int, resign: bool) -> None:
    """Any byte of the index changed (checksums fixed up or not): a FormatError or a valid
    point whose references all stay inside the file, never another exception."""
    data = bytearray(good.read_bytes())
    f = fmt.Footer.unpack(bytes(data[-128:]), "x")
    first = min(s.offset for s in fmt.unpack_sections(
        bytes(data[f.section_offset:f.section_offset + f.section_length]), f.section_count))
    pos = first + int(where * (f.section_offset - first))  # inside the sections
    data[pos] = value
    if resign:
        _resign_all(data)
    p = tmp_path / "fuzz.vmrb"
    p.write_bytes(bytes(data))
    try:
        point = open_point(p)
    except FormatError:
        return
    from vmrestore.repository.plan import build_plan
    from vmrestore.repository.reader import Chain

    for d in range(len(point.disks)):
        plan = build_plan(Chain([point]), d).plan
        ends = plan["src_off"] + plan["stored_len"]
        assert np.all(ends[plan["kind"] == 1] <= point.data_end)
