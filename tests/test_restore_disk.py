"""`vmrestore restore-disk` end to end on real backups, chains and every target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core_helpers import MiB, backup, make_image, nbdkit, restore_cli


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, object]:
    """A full and two incrementals of one disk, with the disk's bytes at each point."""
    img = tmp_path / "disk.img"
    states = [make_image(img, 10, seed=31, tail=4096)]
    pts = [backup(img, tmp_path / "p0.vmrb")]
    for k in (1, 2):
        b = bytearray(states[-1])
        for blk in (k, 4 + k):
            b[blk * MiB:(blk + 1) * MiB] = bytes([k * 40 + blk]) * MiB
        b[7 * MiB:8 * MiB] = bytes(MiB) if k == 1 else b"\x99" * MiB
        img.write_bytes(bytes(b))
        states.append(bytes(b))
        pts.append(backup(img, tmp_path / f"p{k}.vmrb", parent=pts[-1]))
    return {"states": states, "points": pts}


def test_restore_every_point_of_a_chain(tmp_path: Path, chain: dict) -> None:
    states, pts = chain["states"], chain["points"]
    for i, p in enumerate(pts):
        out = tmp_path / f"out{i}.img"
        r = restore_cli(str(pts[-1]), "--disk", "0", "--to", str(out), "--point", p.name,
                        "--json")
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == states[i]
        js = json.loads(r.stdout)
        assert js["bytes_written"] + js["bytes_zeroed"] + js["bytes_skipped"] == len(states[i])
        assert set(js["busy_pct"]) == {"read", "decompress", "write"}
        assert js["peak_rss"] > 0 and js["seconds"] >= 0 and js["mb_per_s"] >= 0


def test_restore_latest_to_nbd(tmp_path: Path, chain: dict) -> None:
    states, pts = chain["states"], chain["points"]
    target = tmp_path / "t.img"
    target.write_bytes(b"\x01" * len(states[-1]))
    with nbdkit(tmp_path, target) as srv:
        r = restore_cli(str(pts[-1]), "--disk", "0", "--to", srv.uri, "-q")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == states[-1]


@pytest.mark.parametrize(("query", "args", "lanes"), [
    ("", (), 2),                              # the default against a multi-conn server
    ("&connections=3", (), 3),                # the URI's connections=N
    ("&connections=3", ("--connections", "1"), 1),  # --connections wins
])
def test_nbd_connections_from_the_uri_and_the_option(tmp_path: Path, chain: dict, query: str,
                                                     args: tuple[str, ...], lanes: int) -> None:
    states, pts = chain["states"], chain["points"]
    target = tmp_path / "t.img"
    target.write_bytes(b"\x01" * len(states[-1]))
    with nbdkit(tmp_path, target) as srv:  # nbdkit's file plugin offers multi-conn
        r = restore_cli(str(pts[-1]), "--disk", "0", "--to", srv.uri + query, "--json", *args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["settings"]["lanes"] == lanes
    assert target.read_bytes() == states[-1]


def test_cli_errors_are_one_line(tmp_path: Path, chain: dict) -> None:
    pts = chain["points"]
    out = tmp_path / "exists.img"
    out.write_bytes(b"x")
    cases = [
        (["--disk", "0", "--to", str(out)], 6, "exists"),
        (["--disk", "5", "--to", str(tmp_path / "n.img")], 2, "no disk 5"),
        (["--disk", "0", "--to", "ftp://x/y"], 2, "unknown target scheme"),
        (["--disk", "0", "--to", str(tmp_path / "n2.img"), "--point", "zzzz"], 2, "zzzz"),
    ]
    for args, code, text in cases:
        r = restore_cli(str(pts[-1]), *args)
        assert r.returncode == code, (args, r.stderr)
        assert text in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "n.img").exists()
    assert out.read_bytes() == b"x"


def test_force_overwrites_existing_file(tmp_path: Path, chain: dict) -> None:
    states, pts = chain["states"], chain["points"]
    out = tmp_path / "o.img"
    out.write_bytes(b"\xcc" * len(states[-1]))
    r = restore_cli(str(pts[-1]), "--disk", "0", "--to", f"file://{out}", "--force", "-q",
                    "--threads", "1", "--connections", "1")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == states[-1]


def test_failed_restore_removes_the_file_it_created(tmp_path: Path, chain: dict) -> None:
    """A new target file left half-written would look like a restored disk: it goes."""
    bad = tmp_path / "bad.vmrb"
    data = bytearray(Path(chain["points"][0]).read_bytes())
    data[4096 + 100] ^= 0x01          # inside the first stored extent
    bad.write_bytes(bytes(data))
    out = tmp_path / "new.img"
    r = restore_cli(str(bad), "--disk", "0", "--to", str(out), "-q")
    assert r.returncode == 4, r.stderr
    assert "disk 0 block 0" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    # A target that existed before the run (here with --force) is never deleted.
    kept = tmp_path / "kept.img"
    kept.write_bytes(b"\xcc" * len(chain["states"][0]))
    r = restore_cli(str(bad), "--disk", "0", "--to", str(kept), "--force", "-q")
    assert r.returncode == 4, r.stderr
    assert kept.exists()


def test_max_rate_holds_the_run_to_the_rate_and_says_so(tmp_path: Path) -> None:
    """--max-rate: data bytes per second at most (a lower bound on the time, which
    sleeping guarantees); zero ranges do not count; the JSON names the hold-up."""
    img = tmp_path / "disk.img"
    data = make_image(img, 16, seed=7)  # 16 MiB, some blocks zero
    nonzero = sum(1 for k in range(16) if any(data[k * MiB:(k + 1) * MiB]))
    bk = backup(img, tmp_path / "b.vmrb")
    out = tmp_path / "out.img"
    r = restore_cli(str(bk), "--disk", "0", "--to", str(out), "--max-rate", "8M", "--json")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    js = json.loads(r.stdout)
    # The last data entry is let through at (nonzero - 1) MiB / 8 MiB/s after the start.
    assert js["seconds"] >= (nonzero - 1) / 8 * 0.95, (nonzero, js["seconds"])
    assert js["busy_pct"]["throttle"] > 50
    assert js["settings"]["max_rate"] == 8 * MiB


def test_max_rate_is_checked_where_it_is_typed(tmp_path: Path) -> None:
    for bad in ("fast", "-1", "10X"):
        r = restore_cli("x.vmrb", "--disk", "0", "--to", str(tmp_path / "o.img"),
                        "--max-rate", bad)
        assert r.returncode == 2 and "--max-rate" in r.stderr and "not a rate" in r.stderr
        assert "Traceback" not in r.stderr
