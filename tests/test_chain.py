"""Chains: a full and incrementals, resolved at every point; parents found and checked."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo_helpers import MIB, backup, make_disk, restored
from vmrestore.errors import ChainError, UsageError
from vmrestore.repository import format as fmt
from vmrestore.repository.reader import open_chain

BS = 64 * 1024


def _mutate(path: Path, seed: int, nblocks: int) -> bytes:
    """Change a few blocks: new random data, a zeroed block, a copy of another block."""
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    n = -(-len(data) // BS)
    for b in rng.choice(n, nblocks, replace=False):
        start = int(b) * BS
        end = min(len(data), start + BS)
        data[start:end] = rng.bytes(end - start)
    z = int(rng.integers(0, n)) * BS
    data[z:z + BS] = bytes(min(BS, len(data) - z))
    data[2 * BS:3 * BS] = data[5 * BS:6 * BS]
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.fixture
def chain4(tmp_path: Path) -> tuple[Path, list[Path], list[list[bytes]]]:
    """A 2-disk full + 3 incrementals; returns (dir, points, disk contents at each point)."""
    disks = [tmp_path / "d0.img", tmp_path / "d1.img"]
    states = [[make_disk(disks[0], 20 * BS + 512, seed=1, block_size=BS),
               make_disk(disks[1], 9 * BS, seed=2, block_size=BS)]]
    points = [tmp_path / "p0.vmrb"]
    backup(disks, points[0], block_size=BS, codec="lz4")
    for i in range(1, 4):
        states.append([_mutate(disks[0], 10 + i, 3), _mutate(disks[1], 20 + i, 2)])
        points.append(tmp_path / f"p{i}.vmrb")
        summary = backup(disks, points[i], parent=str(points[i - 1]))
        assert summary["depth"] == i
        assert summary["blocks"]["unchanged"] > 0
    return tmp_path, points, states


def test_every_point_restores_exactly(chain4, tmp_path: Path) -> None:
    _d, points, states = chain4
    for i, p in enumerate(points):
        chain = open_chain(p)
        assert [q.depth for q in chain.points] == list(range(i + 1))
        chain.close()
        for disk in (0, 1):
            got = restored(p, disk, tmp_path / f"r{i}-{disk}.img")
            assert got == states[i][disk], f"point {i} disk {disk} differs"


def test_incremental_stores_only_changes(chain4) -> None:
    _d, points, _s = chain4
    full = open_chain(points[0]).point
    inc = open_chain(points[1]).point
    assert len(inc.extents) < len(full.extents)
    assert inc.footer.parent_id == full.id
    assert inc.footer.parent_checksum == full.footer.checksum
    m = inc.block_map(0)
    assert set(np.unique(m["kind"]).tolist()) <= {0, 1, 2}
    assert (m["kind"] == fmt.BLOCK_UNCHANGED).sum() >= 20 - 5


def test_parent_found_by_id_after_rename(chain4) -> None:
    d, points, _s = chain4
    shutil.move(points[0], d / "renamed-full.vmrb")
    chain = open_chain(points[2])
    assert chain.points[0].name == "renamed-full.vmrb"


def test_missing_parent_names_both(chain4) -> None:
    _d, points, _s = chain4
    points[1].unlink()
    with pytest.raises(ChainError, match=r"p2\.vmrb: parent p1\.vmrb .* not found"):
        open_chain(points[2])


def test_parent_rewritten_under_the_same_id(chain4, monkeypatch) -> None:
    """Same id, different content: the recorded footer checksum catches it."""
    d, points, _s = chain4
    full = open_chain(points[0]).point
    fixed = uuid.UUID(bytes=full.id)
    monkeypatch.setattr(uuid, "uuid4", lambda: fixed)
    backup([d / "d0.img", d / "d1.img"], d / "p0.vmrb", force=True)
    with pytest.raises(ChainError, match="different footer checksum"):
        open_chain(points[1])


def test_parent_of_another_chain_is_rejected(chain4, tmp_path: Path) -> None:
    d, points, _s = chain4
    backup([d / "d0.img", d / "d1.img"], d / "other.vmrb")
    points[0].unlink()
    shutil.copy(d / "other.vmrb", points[0])
    with pytest.raises(ChainError, match="not found"):
        open_chain(points[1])


def test_chain_at_selects_a_point(chain4) -> None:
    _d, points, _s = chain4
    chain = open_chain(points[3])
    assert chain.at("p1.vmrb").point.name == "p1.vmrb"
    assert chain.at(chain.points[2].point_id[:8]).point.depth == 2
    with pytest.raises(UsageError, match="no restore point 'nope'"):
        chain.at("nope")


def test_disk_grows_in_an_incremental(tmp_path: Path) -> None:
    d = tmp_path / "g.img"
    make_disk(d, 4 * BS, seed=7, block_size=BS)
    backup([d], tmp_path / "a.vmrb", block_size=BS)
    grown = d.read_bytes() + np.random.default_rng(1).bytes(3 * BS + 1024)
    d.write_bytes(grown)
    backup([d], tmp_path / "b.vmrb", parent=str(tmp_path / "a.vmrb"))
    assert restored(tmp_path / "b.vmrb", 0, tmp_path / "r.img") == grown


def test_dedup_against_the_chain(tmp_path: Path) -> None:
    a = tmp_path / "a.img"
    make_disk(a, 8 * MIB, seed=3)
    backup([a], tmp_path / "full.vmrb")
    data = bytearray(a.read_bytes())
    data[7 * MIB:8 * MIB] = data[1 * MIB:2 * MIB]  # new content here, but known to the chain
    a.write_bytes(bytes(data))
    s = backup([a], tmp_path / "inc.vmrb", parent=str(tmp_path / "full.vmrb"))
    assert s["blocks"]["dedup"] == 1 and s["blocks"]["data"] == 0 and s["stored_bytes"] == 0
    assert restored(tmp_path / "inc.vmrb", 0, tmp_path / "r.img") == bytes(data)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_chains_restore_at_every_point(tmp_path: Path, data: st.DataObject) -> None:
    """Random disks changed at random between points (writes, zeroing, copies, resizes)."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    bs = data.draw(st.sampled_from([64 * 1024, 128 * 1024]), label="block size")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    ndisks = data.draw(st.integers(1, 2), label="disks")
    contents = [bytearray(rng.bytes(data.draw(st.integers(1, 3000), label="sectors") * 512))
                for _ in range(ndisks)]
    for c in contents:  # some zero runs
        z = int(rng.integers(0, len(c)))
        c[z:z + 3 * bs] = bytes(len(c[z:z + 3 * bs]))
    disks = [work / f"d{i}.img" for i in range(ndisks)]
    states: list[list[bytes]] = []
    points: list[Path] = []
    for k in range(data.draw(st.integers(1, 4), label="points")):
        if k:
            for c in contents:
                for _ in range(data.draw(st.integers(0, 4), label="changes")):
                    what = data.draw(st.sampled_from(["random", "zero", "copy", "resize"]))
                    at = int(rng.integers(0, len(c)))
                    n = int(rng.integers(1, 2 * bs))
                    if what == "random":
                        c[at:at + n] = rng.bytes(len(c[at:at + n]))
                    elif what == "zero":
                        c[at:at + n] = bytes(len(c[at:at + n]))
                    elif what == "copy" and len(c) > 2 * bs:
                        c[bs:2 * bs] = c[0:bs]
                    elif what == "resize":
                        new = max(512, len(c) + int(rng.integers(-8, 9)) * 512 * 64)
                        c[:] = c[:new].ljust(new, b"\1")
        for p, c in zip(disks, contents, strict=True):
            p.write_bytes(bytes(c))
        states.append([bytes(c) for c in contents])
        out = work / f"p{k}.vmrb"
        backup(disks, out, block_size=bs if k == 0 else None,
               parent=str(points[-1]) if points else None,
               codec=data.draw(st.sampled_from(["zstd", "lz4", "none"]), label="codec"))
        points.append(out)
    for k, p in enumerate(points):
        for i in range(ndisks):
            assert restored(p, i, work / "r.img") == states[k][i], f"point {k} disk {i}"


def test_inspect_counts_match_the_backup_summaries(chain4, cli) -> None:
    import json

    _d, points, _s = chain4
    info = json.loads(cli("inspect", str(points[2]), "--json", check=True).stdout)
    assert [p["depth"] for p in info["chain"]] == [0, 1, 2]
    assert [p["file"] for p in info["chain"]] == [str(p) for p in points[:3]]
    stats = info["chain"][2]["stats"]
    disks = info["disks"]
    assert sum(d["unchanged"] for d in disks) == stats["unchanged_blocks"]
    assert sum(d["zero"] for d in disks) == stats["zero_blocks"]
    assert sum(d["data"] + d["dedup"] for d in disks) == stats["data_blocks"] + \
        stats["dedup_blocks"]
    assert all(d["zero"] + d["data"] + d["dedup"] + d["unchanged"] == d["blocks"] for d in disks)
    text = cli("inspect", str(points[2]), check=True).stdout
    assert "p0.vmrb" in text and "unchanged" in text


def test_inspect_dedup_across_disks(tmp_path: Path, cli) -> None:
    import json

    a = tmp_path / "a.img"
    make_disk(a, 4 * MIB, seed=8)
    s = backup([a, a], tmp_path / "two.vmrb")
    info = json.loads(cli("inspect", str(tmp_path / "two.vmrb"), "--json", check=True).stdout)
    d0, d1 = info["disks"]
    assert d0["data"] == s["blocks"]["data"] and d1["data"] == 0
    assert d0["dedup"] + d1["dedup"] == s["blocks"]["dedup"]
