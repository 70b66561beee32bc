"""Forged backups: content changed AND every checksum recomputed (tests/adversarial/forge.py).

Checksums cannot catch a forger, so each case here is structurally impossible and
must be refused by the reader with a FormatError (exit 3) naming the file, never
a traceback, a hang or a restore that reports success. Family count for the
closing note: len(FORGERIES) cases, each through open_chain + plan + restore in
process, and a sample through the CLI for the one-line rule.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import forge
import numpy as np
import pytest

from vmrestore.errors import VmrError
from vmrestore.repository import format as fmt

MiB = 1 << 20
BS = 64 * 1024


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A full and an incremental of two small disks (64 KiB blocks), with a VM config."""
    from vmrestore.repository.create import create_backup

    d = tmp_path_factory.mktemp("forge")
    rng = np.random.default_rng(3)
    disks = []
    for i in range(2):
        p = d / f"d{i}.img"
        data = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
        data[: MiB // 2] = 0  # zero blocks too
        p.write_bytes(data.tobytes())
        disks.append(str(p))
    cfg = {"name": "vm", "num_cpus": 1, "memory_mb": 64,
           "disks": [{"index": 0, "capacity": 2 * MiB}, {"index": 1, "capacity": 2 * MiB}]}
    create_backup(disks, str(d / "full.vmrb"), vm_config=cfg, block_size=BS)
    with open(disks[0], "r+b") as f:
        f.seek(MiB)
        f.write(b"\x42" * BS)
    create_backup(disks, str(d / "inc.vmrb"), vm_config=cfg, parent=str(d / "full.vmrb"))
    return {"dir": d, "full": d / "full.vmrb", "inc": d / "inc.vmrb"}


E, B = fmt.EXTENT_DTYPE, fmt.BLOCK_DTYPE


def ext(change: Callable[[np.ndarray], object]) -> Callable[[bytes], bytes]:
    return lambda raw: forge.edit_records(raw, fmt.SEC_EXTENTS, E, change)


def bmap(change: Callable[[np.ndarray], object]) -> Callable[[bytes], bytes]:
    return lambda raw: forge.edit_records(raw, fmt.SEC_BLOCK_MAP, B, change)


def man(change: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    return lambda raw: forge.edit_json(raw, fmt.SEC_MANIFEST, change)


def vmc(change: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    return lambda raw: forge.edit_json(raw, fmt.SEC_VM_CONFIG, change)


def _set(rec: np.ndarray, field: str, value: int, i: int = 0) -> None:
    rec[field][i] = value


def _data_block(rec: np.ndarray) -> int:
    return int(np.flatnonzero(rec["kind"] == fmt.BLOCK_DATA)[0])


def _drop_sections(kind: int) -> Callable[[bytes], bytes]:
    def f(raw: bytes) -> bytes:
        _ft, secs = forge.sections(raw)
        return forge.rebuild(raw, [(s, forge.section_bytes(raw, s)) for s in secs
                                   if s.kind != kind])
    return f


def _twice(kind: int) -> Callable[[bytes], bytes]:
    def f(raw: bytes) -> bytes:
        _ft, secs = forge.sections(raw)
        bodies = [(s, forge.section_bytes(raw, s)) for s in secs]
        return forge.rebuild(raw, bodies + [b for b in bodies if b[0].kind == kind])
    return f


def _map_for_disk(disk: int) -> Callable[[bytes], bytes]:
    def f(raw: bytes) -> bytes:
        _ft, secs = forge.sections(raw)
        bodies = [(s, forge.section_bytes(raw, s)) for s in secs]
        m = next(b for b in bodies if b[0].kind == fmt.SEC_BLOCK_MAP)
        return forge.rebuild(raw, [*bodies, (fmt.Section(fmt.SEC_BLOCK_MAP, disk, 0, 0, 0,
                                                         b""), m[1])])
    return f


def _nested(depth: int) -> Callable[[bytes], bytes]:
    return lambda body: ('{"a": ' + "[" * depth + "]" * depth + "}").encode()


# (name, which file, forgery)
FORGERIES: list[tuple[str, str, Callable[[bytes], bytes]]] = [
    # extent table
    ("extent inside the header", "full", ext(lambda r: _set(r, "offset", 100))),
    ("extent past the stored data", "full",
     ext(lambda r: _set(r, "offset", int(r["offset"].max()) + 10 * MiB))),
    ("extent length 2**32-1", "full", ext(lambda r: _set(r, "stored_len", 2**32 - 1))),
    ("extent offset 2**64-1", "full", ext(lambda r: _set(r, "offset", 2**64 - 1))),
    ("unknown codec", "full", ext(lambda r: _set(r, "codec", 77))),
    ("raw length 0", "full", ext(lambda r: _set(r, "raw_len", 0))),
    ("raw length above the largest block", "full",
     ext(lambda r: _set(r, "raw_len", fmt.MAX_BLOCK_SIZE + 1))),
    ("raw length not the block's", "full", ext(lambda r: _set(r, "raw_len", BS // 2))),
    ("extent table cut short", "full", ext(lambda r: r[:-1])),
    # block maps
    ("block kind 9", "full", bmap(lambda r: _set(r, "kind", 9, _data_block(r)))),
    ("block points past the extent table", "full",
     bmap(lambda r: _set(r, "extent", 10**9, _data_block(r)))),
    ("block from a point deeper than the file", "full",
     bmap(lambda r: _set(r, "point", 5, _data_block(r)))),
    ("unchanged block in a full", "full", bmap(lambda r: _set(r, "kind", fmt.BLOCK_UNCHANGED))),
    ("block map one record short", "full", bmap(lambda r: r[:-1])),
    ("block map one record long", "full", bmap(lambda r: np.concatenate([r, r[:1]]))),
    ("incremental block points past its own table", "inc",
     bmap(lambda r: _set(r, "extent", 10**6, _data_block(r)))),
    # manifest
    ("block size 3", "full", man(lambda m: m["disks"][0].__setitem__("block_size", 3))),
    ("negative capacity", "full", man(lambda m: m["disks"][0].__setitem__("capacity", -512))),
    ("capacity not a multiple of 512", "full",
     man(lambda m: m["disks"][0].__setitem__("capacity", 2 * MiB + 1))),
    ("capacity of 2**62 bytes", "full",
     man(lambda m: m["disks"][0].__setitem__("capacity", 2**62))),
    ("block count disagrees", "full", man(lambda m: m["disks"][0].__setitem__("blocks", 1))),
    ("disks is not a list", "full", man(lambda m: m.__setitem__("disks", {"0": 1}))),
    ("disk entry is a string", "full", man(lambda m: m.__setitem__("disks", ["disk"]))),
    ("another point's manifest", "full", man(lambda m: m.__setitem__("point_id", "00" * 16))),
    ("manifest depth disagrees", "full", man(lambda m: m.__setitem__("depth", 4))),
    ("manifest is a list", "full", man(lambda m: [m])),
    ("manifest nested 100000 deep", "full",
     lambda raw: forge.edit_section(raw, fmt.SEC_MANIFEST, _nested(100000))),
    ("manifest is binary", "full",
     lambda raw: forge.edit_section(raw, fmt.SEC_MANIFEST, lambda b: b"\xff\xfe\x00" * 50)),
    ("capacity is a string", "full",
     man(lambda m: m["disks"][0].__setitem__("capacity", "big"))),
    # VM configuration
    ("VM config disks not a list", "full", vmc(lambda c: c.__setitem__("disks", 7))),
    ("VM config cpus a string", "full", vmc(lambda c: c.__setitem__("num_cpus", "many"))),
    ("VM config nested 100000 deep", "full",
     lambda raw: forge.edit_section(raw, fmt.SEC_VM_CONFIG, _nested(100000))),
    # section table and footer
    ("no manifest", "full", _drop_sections(fmt.SEC_MANIFEST)),
    ("no extent table", "full", _drop_sections(fmt.SEC_EXTENTS)),
    ("no block map", "full", _drop_sections(fmt.SEC_BLOCK_MAP)),
    ("two manifests", "full", _twice(fmt.SEC_MANIFEST)),
    ("block map for disk 7", "full", _map_for_disk(7)),
    ("depth 3 without a parent", "full", lambda raw: forge.rebuild(raw, depth=3)),
    ("a full that names a parent", "full",
     lambda raw: forge.rebuild(raw, parent_id=b"\x01" * 16)),
    ("section table inside the header", "full",
     lambda raw: raw[:-fmt.FOOTER_SIZE] + __import__("dataclasses").replace(
         forge.sections(raw)[0], section_offset=64).pack()),
    ("section count 2**31", "full",
     lambda raw: raw[:-fmt.FOOTER_SIZE] + __import__("dataclasses").replace(
         forge.sections(raw)[0], section_count=2**31).pack()),
    ("header names another point", "full",
     lambda raw: forge.with_header_id(raw, b"\x07" * 16)),
    # the parent keeps its point id but its content changed (all checksums recomputed):
    # the child's record of its parent's footer checksum no longer matches
    ("an incremental whose parent was re-forged", "inc-parent",
     man(lambda m: m.__setitem__("comment", "forged"))),
]


def _forge(sample: dict[str, Path], tmp: Path, which: str,
           how: Callable[[bytes], bytes]) -> Path:
    """The forged file in a directory of its own (with the chain it needs)."""
    tmp.mkdir()
    if which == "inc-parent":
        (tmp / "full.vmrb").write_bytes(how(sample["full"].read_bytes()))
        forged = tmp / "inc.vmrb"
        forged.write_bytes(sample["inc"].read_bytes())
        return forged
    if which == "inc":
        (tmp / "full.vmrb").write_bytes(sample["full"].read_bytes())
    forged = tmp / f"{which}.vmrb"
    forged.write_bytes(how(sample[which].read_bytes()))
    return forged


@pytest.mark.parametrize("case", FORGERIES, ids=[c[0] for c in FORGERIES])
def test_forged_backup_is_refused(sample, tmp_path: Path, case) -> None:
    from vmrestore.repository.plan import build_plan
    from vmrestore.repository.reader import open_chain
    from vmrestore.restore_disk import restore_disk

    name, which, how = case
    forged = _forge(sample, tmp_path / "f", which, how)
    out = tmp_path / "out.img"
    with pytest.raises(VmrError) as ei:
        chain = open_chain(forged)
        try:
            for d in range(len(chain.point.disks)):
                build_plan(chain, d)
        finally:
            chain.close()
        restore_disk(str(forged), 0, str(out))
    err = ei.value
    assert err.exit_code in (3, 5), (name, type(err), err)  # FormatError / ChainError
    assert forged.name in str(err) or "full.vmrb" in str(err), (name, str(err))
    assert not out.exists()


@pytest.mark.parametrize("case", [FORGERIES[0], FORGERIES[9], FORGERIES[26], FORGERIES[29]],
                         ids=lambda c: c[0])
def test_forged_backup_cli_one_line(sample, tmp_path: Path, case) -> None:
    name, which, how = case
    forged = _forge(sample, tmp_path / "f", which, how)
    for args in (["verify", str(forged)], ["inspect", str(forged), "--json"],
                 ["restore-disk", str(forged), "--disk", "0", "--to", str(tmp_path / "o.img"),
                  "-q"]):
        r = subprocess.run([sys.executable, "-m", "vmrestore", *args], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 3, (name, args, r.stderr)
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stdout == "" or json.loads(r.stdout).get("ok") is not True
    assert not (tmp_path / "o.img").exists()
