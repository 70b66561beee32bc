"""The per-disk timeline: counter samples kept in the report, drawn by `vmrestore report --html`.

Unit tests for the sampler's arithmetic (segments, thinning, intervals, the
bottleneck), then one real restore-disk whose samples go into a restore report
that headless Chromium renders: the test reads the DOM Chromium built and
finds both charts of the disk with their points.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import need, run_cli
from vmrestore.report import DiskReport, Report, format_table, from_dict
from vmrestore.timeline import TIMELINE_VERSION, Sampler, bottleneck, intervals, role_busy


@dataclass
class _C:
    """The fields of vmrestore.pipeline.Counters the sampler reads."""

    bytes_written: int
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    read: float = 0.0
    decompress: float = 0.0
    write: float = 0.0
    running: bool = True

    @property
    def busy_ns(self) -> dict[str, float]:
        return {"read": self.read * 1e9, "decompress": self.decompress * 1e9,
                "write": self.write * 1e9}


def test_segments_add_up_across_core_jobs() -> None:
    s = Sampler("nbd")
    first = s.segment()
    first(_C(100, write=0.1))
    first(_C(300, 50, write=0.2, running=False))
    second = s.segment()  # a new core job: its counters start from zero again
    second(_C(10, 0, 7, read=0.05, write=0.01))
    tl = s.as_dict()
    assert tl["written"] == [100, 300, 310]
    assert tl["zeroed"] == [0, 50, 50]
    assert tl["skipped"] == [0, 0, 7]
    assert tl["busy_s"]["network"] == [0.1, 0.2, 0.21]
    assert tl["busy_s"]["target"] == [0.0, 0.0, 0.0]
    assert tl["busy_s"]["source"][-1] == 0.05
    assert tl["t"] == sorted(tl["t"]) and tl["version"] == TIMELINE_VERSION == 2
    assert tl["busy_s"]["throttle"] == [0.0, 0.0, 0.0]


def test_long_runs_are_thinned_but_keep_the_last_reading() -> None:
    s = Sampler("hotadd", max_samples=16)
    on = s.segment()
    for i in range(1, 101):
        on(_C(i, write=i / 100, running=i < 100))
    tl = s.as_dict()
    assert len(tl["t"]) <= 17
    assert tl["written"][-1] == 100 and tl["busy_s"]["target"][-1] == 1.0
    assert tl["written"] == sorted(tl["written"])


def test_intervals_and_bottleneck() -> None:
    tl = {"t": [1.0, 2.0, 4.0], "written": [10**6, 3 * 10**6, 3 * 10**6],
          "zeroed": [0, 0, 4 * 10**6], "skipped": [0, 0, 0],
          "busy_s": {"source": [0.1, 0.2, 0.3], "proxy": [0.5, 0.6, 0.7],
                     "network": [0.9, 1.9, 3.9], "target": [0, 0, 0]}}
    rows = intervals(tl)
    assert [r["data_mbps"] for r in rows] == pytest.approx([1.0, 2.0, 0.0])
    assert rows[2]["zero_mbps"] == pytest.approx(2.0)
    assert rows[1]["network"] == pytest.approx(1.0) and rows[0]["proxy"] == pytest.approx(0.5)
    role, share, led = bottleneck(tl)
    assert role == "network" and share == pytest.approx(3.9 / 4) and led == 1.0
    assert bottleneck({"t": []}) == ("", 0.0, 0.0)
    # a version 1 document has no throttle column: read as never held back
    assert all(r["throttle"] == 0.0 for r in rows)


def test_busy_names_the_rate_limit_only_when_it_held_the_disk_back() -> None:
    assert "throttle" not in role_busy("nbd", {"read": 0.2, "decompress": 0.3, "write": 0.9})
    held = role_busy("hotadd", {"read": 0.1, "write": 0.2, "throttle": 0.8})
    assert held["throttle"] == 0.8 and held["target"] == 0.2
    r = Report(vm_name="web01")
    d = r.disk(0)
    d.transport, d.status, d.busy = "hotadd", "ok", held
    assert "held back by the rate limit 80% of the time" in format_table(r)
    d.busy = role_busy("hotadd", {"read": 0.1, "write": 0.9})
    assert "held back" not in format_table(r)


def test_a_held_back_restore_names_the_rate_limit_as_its_bottleneck(tmp_path: Path) -> None:
    """A real restore-disk at --max-rate: the timeline and the page say what bounded it."""
    from vmrestore.sample import write_sample_disk

    raw, vmrb, out = tmp_path / "d.raw", tmp_path / "d.vmrb", tmp_path / "out.img"
    write_sample_disk(raw, 32 << 20, seed=6)
    run_cli("backup", "create", "--disk", str(raw), "-o", str(vmrb), "-q", check=True)
    p = run_cli("restore-disk", str(vmrb), "--disk", "0", "--to", str(out), "--json", "-q",
                "--max-rate", "32M", check=True)
    rd = json.loads(p.stdout)
    tl = rd["timeline"]
    assert tl["version"] == 2 and tl["busy_s"]["throttle"][-1] > 0
    role, share, _led = bottleneck(tl)
    assert role == "throttle" and share > 0.5, tl["busy_s"]
    page = tmp_path / "t.html"
    rep = tmp_path / "rd.json"
    rep.write_text(p.stdout)
    run_cli("report", str(rep), "--html", str(page), check=True)
    text = page.read_text()
    assert "bottleneck: the rate limit" in text
    assert 'data-role="throttle"' in text


def test_report_keeps_the_timeline_through_json() -> None:
    r = Report(vm_name="web01")
    d = r.disk(0)
    d.timeline = {"version": 1, "t": [0.1], "written": [5], "zeroed": [0], "skipped": [0],
                  "busy_s": {"source": [0.0], "proxy": [0.0], "network": [0.1],
                             "target": [0.0]}}
    doc = json.loads(json.dumps(r.as_dict()))
    assert doc["disks"][0]["timeline"]["written"] == [5]
    assert from_dict(doc).disks[0].timeline == d.timeline


def test_report_command_refuses_what_is_not_a_report(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    p = run_cli("report", str(bad), "--html", str(tmp_path / "o.html"))
    assert p.returncode == 3 and "not a restore report" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "o.html").exists()
    p = run_cli("report", str(tmp_path / "missing.json"))
    assert p.returncode == 5 and "missing.json" in p.stderr and len(p.stderr.splitlines()) == 1


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_timeline_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    """A real 64 MiB restore, its samples in a restore report, drawn and loaded by Chromium."""
    from vmrestore.sample import write_sample_disk

    browser = _chromium()
    need(browser is not None, "chromium not installed (scripts/bootstrap.sh APT_PACKAGES)")
    raw, vmrb, out = tmp_path / "d.raw", tmp_path / "d.vmrb", tmp_path / "out.img"
    write_sample_disk(raw, 64 << 20, seed=5)
    run_cli("backup", "create", "--disk", str(raw), "-o", str(vmrb), "-q", check=True)
    p = run_cli("restore-disk", str(vmrb), "--disk", "0", "--to", str(out), "--json", "-q",
                check=True)
    rd = json.loads(p.stdout)
    assert rd["timeline"]["written"][-1] == rd["bytes_written"] > 0
    # The same samples inside a restore report document, as the orchestrator keeps them.
    r = Report(vm_name="web01", backup=str(vmrb), status="ok", seconds=rd["seconds"])
    d: DiskReport = r.disk(0)
    d.transport, d.status, d.seconds = "hotadd", "ok", rd["seconds"]
    d.bytes_written, d.bytes_skipped = rd["bytes_written"], rd["bytes_skipped"]
    d.timeline = rd["timeline"]
    rep = tmp_path / "report.json"
    rep.write_text(json.dumps(r.as_dict()))
    page = tmp_path / "timeline.html"
    run_cli("report", str(rep), "--html", str(page), check=True)
    text = page.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in text
    for attempt in range(2):  # a loaded machine can make Chromium give up once
        p = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={tmp_path / f'profile{attempt}'}",
             "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90)
        dom = p.stdout
        if "</html>" in dom:
            break
    charts = re.findall(r'<svg class="chart" data-chart="(\w+)" data-disk="0" '
                        r'data-points="(\d+)"', dom)
    assert [c for c, _ in charts] == ["throughput", "busy"], p.stderr[-2000:]
    assert all(int(n) >= 1 for _, n in charts)
    assert re.search(r'<polyline data-role="target"[^>]*points="[\d., ]+"', dom)
    # The page names the stage the report's own busy totals make the busiest
    # (timeline.bottleneck; for a file target usually the target, but a 64 MiB restore
    # is one sample long, and on a loaded machine its reader can be the busiest):
    # "bottleneck: X" when that stage was busy half the time or more, else
    # "no stage saturated: the busiest, X".
    top, share, _led = bottleneck(rd["timeline"])
    named = re.search(r"(bottleneck: |no stage saturated: the busiest, )(\w+)", dom)
    assert named, dom[-1500:]
    assert named[2] == top, (named[0], rd["timeline"]["busy_s"])
    assert named[1].startswith("bottleneck") == (share >= 0.5), (named[0], share)
