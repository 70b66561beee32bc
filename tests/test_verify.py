"""verify: good chains pass; any flipped byte in stored data is caught and its block named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from repo_helpers import MIB, backup, flip_byte, make_disk
from vmrestore.repository.reader import open_chain, open_point
from vmrestore.repository.verify import verify_chain

LINE = re.compile(r"^(?P<file>\S+), disk (?P<disk>\d+), block (?P<block>\d+), offset "
                  r"(?P<offset>\d+), extent (?P<ext>\d+) at file offset (?P<foff>\d+): .+$")


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    d = tmp_path / "d.img"
    make_disk(d, 12 * MIB + 4096, seed=11)
    backup([d], tmp_path / "full.vmrb")
    data = bytearray(d.read_bytes())
    data[10 * MIB:11 * MIB] = np.random.default_rng(2).bytes(MIB)
    d.write_bytes(bytes(data))
    backup([d], tmp_path / "inc.vmrb", parent=str(tmp_path / "full.vmrb"))
    return d, tmp_path / "full.vmrb", tmp_path / "inc.vmrb"


def test_good_chain_verifies(cli, pair) -> None:
    _d, _full, inc = pair
    r = cli("verify", str(inc), check=True)
    assert "OK" in r.stdout and "2 file(s)" in r.stdout
    s = json.loads(cli("verify", str(inc), "--json", "-q", check=True).stdout)
    assert s["ok"] and len(s["chain"]) == 2 and s["extents"] > 0 and s["problems"] == []


def test_flipped_byte_anywhere_is_caught(cli, pair) -> None:
    """Flip a byte inside each stored extent of the full in turn (first, middle, last byte)."""
    _d, full, _inc = pair
    p = open_point(full)
    ext = p.extents.copy()
    p.close()
    original = full.read_bytes()
    for i in range(len(ext)):
        for where in (0, int(ext["stored_len"][i]) // 2, int(ext["stored_len"][i]) - 1):
            full.write_bytes(original)
            flip_byte(full, int(ext["offset"][i]) + where)
            r = cli("verify", str(full))
            assert r.returncode == 4, r.stderr
            bad = [LINE.match(ln) for ln in r.stderr.splitlines() if LINE.match(ln)]
            assert bad, r.stderr
            assert {int(m["ext"]) for m in bad} == {i}
            for m in bad:
                assert m["file"] == str(full)
                assert int(m["offset"]) == int(m["block"]) * MIB
                assert int(m["foff"]) == int(ext["offset"][i])
            assert "Traceback" not in r.stderr
            assert r.stderr.strip().splitlines()[-1].startswith("vmrestore: error:")


def test_deduplicated_extent_names_every_block(pair, tmp_path: Path) -> None:
    _d, full, _inc = pair
    chain = open_chain(full)
    m = chain.point.block_map(0)
    # make_disk repeats block 1 at block 4: one extent, two blocks.
    assert m["extent"][1] == m["extent"][4]
    off = int(chain.point.extents["offset"][int(m["extent"][1])])
    chain.close()
    flip_byte(full, off + 10)
    res = verify_chain(open_chain(full))
    assert not res.ok and res.bad_extents == 1
    blocks = sorted(int(LINE.match(p)["block"]) for p in res.problems)
    assert blocks == [1, 4]


def test_incremental_checks_the_parent_blocks_it_uses(cli, pair) -> None:
    _d, full, inc = pair
    chain = open_chain(inc)
    point, extent, kind = chain.resolved_map(0)
    used = int(extent[(kind == 1) & (point == 0)][0])
    replaced = int(chain.points[0].block_map(0)["extent"][10])  # block 10 changed in inc
    off_used = int(chain.points[0].extents["offset"][used])
    off_replaced = int(chain.points[0].extents["offset"][replaced])
    chain.close()
    original = full.read_bytes()
    flip_byte(full, off_replaced + 100)
    assert cli("verify", str(inc)).returncode == 0  # the child no longer needs that block
    assert cli("verify", str(full)).returncode == 4
    full.write_bytes(original)
    flip_byte(full, off_used + 100)
    r = cli("verify", str(inc), "--json")
    assert r.returncode == 4
    s = json.loads(r.stdout)
    assert not s["ok"] and s["problems"] and all(str(full) in p for p in s["problems"])
