"""Proxy choice, task slots and transport selection: pure decisions, with their reasons."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmrestore import infra
from vmrestore.errors import UsageError

LUN = "/dev/null"  # a path that exists: 'auto' SAN visibility sees it


def facts(*provs: str, ds: str = "ds-san", lun: str | None = LUN) -> list[infra.DiskFacts]:
    return [infra.DiskFacts(i, ds, p, "VMFS", lun) for i, p in enumerate(provs)]


VM_PROXY = infra.Proxy("p", vm="vmr-proxy")
PHYS_PROXY = infra.Proxy("p")


def test_auto_san_when_all_eager_zeroed_and_lun_visible() -> None:
    ds = infra.select_transports("auto", VM_PROXY, facts("thick-eager", "thick-eager"))
    assert [d.mode for d in ds] == ["san", "san"]
    assert all(d.fallback == ["nbd"] and "sees the LUN" in d.reason for d in ds)


def test_auto_thick_lazy_disk_means_no_san() -> None:
    ds = infra.select_transports("auto", VM_PROXY, facts("thick-eager", "thick-lazy"))
    assert [d.mode for d in ds] == ["hotadd", "hotadd"]
    assert all("disk 1 is thick-lazy" in d.reason and "eager-zeroed" in d.reason for d in ds)


def test_explicit_san_with_thick_lazy_disk_refused_and_suggests_eager() -> None:
    with pytest.raises(UsageError, match=r"thick-lazy.*--disk-format thick-eager") as ei:
        infra.select_transports("san", VM_PROXY, facts("thick-lazy"))
    assert "thick-lazy or" not in str(ei.value) and "/thick-lazy" not in str(ei.value)


@pytest.mark.parametrize("mode", ["nbd", "nbdssl", "san"])
def test_repos_source_refuses_transports_other_than_hotadd(mode: str) -> None:
    ds = infra.select_transports(mode, VM_PROXY, facts("thick-eager"))
    with pytest.raises(UsageError, match=f"transport {mode} refused: a repos://"):
        infra.check_source("repos://h:1/vm/a.vmrb", "builtin", ds)
    infra.check_source("repo://h:1/vm/a.vmrb", "builtin", ds)  # plain repo:// feeds them all


def test_repos_source_auto_hotadd_has_no_nbd_fallback_and_refuses_vddk() -> None:
    ds = infra.select_transports("auto", VM_PROXY, facts("thin"))
    assert ds[0].mode == "hotadd" and ds[0].fallback == ["nbd"]
    infra.check_source("repos://h:1/vm/a.vmrb", "builtin", ds)
    assert ds[0].fallback == []
    with pytest.raises(UsageError, match="VixDiskLib"):
        infra.check_source("repos://h:1/vm/a.vmrb", "vddk", ds)
    ds = infra.select_transports("auto", PHYS_PROXY, facts("thin"))
    with pytest.raises(UsageError, match="transport nbd refused"):
        infra.check_source("repos://h:1/vm/a.vmrb", "builtin", ds)


def test_auto_one_thin_disk_means_no_san_for_any() -> None:
    ds = infra.select_transports("auto", VM_PROXY, facts("thick-eager", "thin"))
    assert [d.mode for d in ds] == ["hotadd", "hotadd"]
    assert all("disk 1 is thin" in d.reason for d in ds)


def test_auto_lun_not_visible() -> None:
    ds = infra.select_transports("auto", VM_PROXY, facts("thick-eager", lun="/nonexistent/lun"))
    assert ds[0].mode == "hotadd" and "does not see a LUN" in ds[0].reason
    ds = infra.select_transports("auto", VM_PROXY, facts("thick-eager", lun=None))
    assert ds[0].mode == "hotadd"


def test_auto_physical_proxy_uses_nbd() -> None:
    ds = infra.select_transports("auto", PHYS_PROXY, facts("thin"))
    assert ds[0].mode == "nbd" and "not a VM" in ds[0].reason and ds[0].fallback == []


def test_auto_vm_proxy_without_datastore_access() -> None:
    p = infra.Proxy("p", vm="vmr-proxy", datastores=["ds-local"])
    ds = infra.select_transports("auto", p, facts("thin", ds="ds-san"))
    assert ds[0].mode == "nbd" and "cannot reach ds-san" in ds[0].reason


def test_explicit_san_with_thin_disk_refused_with_reason() -> None:
    with pytest.raises(UsageError, match="disk 1 would be thin"):
        infra.select_transports("san", VM_PROXY, facts("thick-eager", "thin"))


def test_explicit_san_without_lun_refused() -> None:
    with pytest.raises(UsageError, match="does not see a LUN"):
        infra.select_transports("san", VM_PROXY, facts("thick-eager", lun=None))


def test_explicit_hotadd_needs_a_vm_proxy() -> None:
    with pytest.raises(UsageError, match="not a VM"):
        infra.select_transports("hotadd", PHYS_PROXY, facts("thin"))


def test_explicit_modes_have_no_fallback() -> None:
    for mode in ("san", "hotadd", "nbd", "nbdssl"):
        ds = infra.select_transports(mode, VM_PROXY, facts("thick-eager"))
        assert ds[0].mode == mode and ds[0].fallback == []


def test_proxy_without_transport_refused() -> None:
    p = infra.Proxy("p", vm="x", transports=("nbd",))
    with pytest.raises(UsageError, match="does not offer"):
        infra.select_transports("hotadd", p, facts("thin"))


def test_san_list_instead_of_auto() -> None:
    p = infra.Proxy("p", san=["ds-san"])
    assert p.sees_lun("ds-san", "/nonexistent") and not p.sees_lun("ds-local", LUN)


def test_load_infra_file(tmp_path) -> None:
    f = tmp_path / "infra.yaml"
    f.write_text("version: 1\nproxies:\n  - name: a\n    slots: 1\n  - name: b\n    vm: pvm\n"
                 "    datastores: [ds-local]\n    san: [ds-san]\n    transports: [hotadd, nbd]\n")
    inf = infra.load_infra(f)
    assert [p.name for p in inf.proxies] == ["a", "b"]
    b = inf.get("b")
    assert b.vm == "pvm" and b.san == ["ds-san"] and b.transports == ("hotadd", "nbd")
    with pytest.raises(UsageError, match="'c' not in"):
        inf.get("c")


@pytest.mark.parametrize("text, why", [
    ("proxies: []\n", "length >= 1"),
    ("proxies:\n  - slots: 1\n", "field `name`"),
    ("proxies:\n  - name: a\n    slots: 0\n", r"proxies\[0\]\.slots' \(line 3\)"),
    ("proxies:\n  - name: a\n    transports: [fibre]\n", r"transports\[0\]' \(line 3\)"),
    ("proxies:\n  - name: a\n    color: red\n", "color"),
    ("proxies:\n  - name: a\n  - name: a\n", "twice"),
    ("version: 9\nproxies:\n  - name: a\n", "version"),
])
def test_bad_infra_files(tmp_path, text: str, why: str) -> None:
    f = tmp_path / "infra.yaml"
    f.write_text(text)
    with pytest.raises(UsageError, match=why):
        infra.load_infra(f)


def test_slots_are_exclusive_and_pick_the_freest_proxy(tmp_path) -> None:
    inf = infra.Infra([infra.Proxy("a", slots=1), infra.Proxy("b", slots=2)])
    first = infra.acquire_slot(inf, tmp_path, None, "auto")
    assert first.proxy.name == "b"  # most free slots
    second = infra.acquire_slot(inf, tmp_path, None, "auto")
    third = infra.acquire_slot(inf, tmp_path, None, "auto")
    assert sorted(x.proxy.name for x in (first, second, third)) == ["a", "b", "b"]
    with pytest.raises(UsageError, match="no free task slot"):
        infra.acquire_slot(inf, tmp_path, None, "auto")
    second.release()
    again = infra.acquire_slot(inf, tmp_path, None, "auto")
    assert again.proxy.name == second.proxy.name
    for lease in (first, third, again):
        lease.release()


def test_more_slots_for_the_disks_of_one_job_only_those_free(tmp_path) -> None:
    inf = infra.Infra([infra.Proxy("a", slots=3), infra.Proxy("b", slots=4)])
    job = infra.acquire_slot(inf, tmp_path, "a", "auto")
    other = infra.acquire_slot(inf, tmp_path, "a", "auto")  # another job on the same proxy
    more = infra.acquire_more(job, tmp_path, 5)
    assert [m.proxy.name for m in more] == ["a"]   # one left on a, none taken from b
    assert {m.index for m in more} | {job.index, other.index} == {0, 1, 2}
    assert infra.acquire_more(job, tmp_path, 2) == []
    for lease in (*more, other, job):
        lease.release()


def test_slot_freed_when_holder_dies(tmp_path) -> None:
    inf = infra.Infra([infra.Proxy("a", slots=1)])
    code = ("import sys, os; from pathlib import Path; from vmrestore import infra; "
            "i = infra.Infra([infra.Proxy('a', slots=1)]); "
            f"infra.acquire_slot(i, Path({str(tmp_path)!r}), None, 'auto'); "
            "print('held', flush=True); os.kill(os.getpid(), 9)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "held" in p.stdout and p.returncode == -9
    lease = infra.acquire_slot(inf, tmp_path, "a", "auto")
    lease.release()


def test_explicit_transport_filters_proxies(tmp_path) -> None:
    inf = infra.Infra([infra.Proxy("phys"), infra.Proxy("vm", vm="pvm", slots=1)])
    lease = infra.acquire_slot(inf, tmp_path, None, "hotadd")
    assert lease.proxy.name == "vm"
    lease.release()


def test_slot_dir_is_per_machine(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("VMRESTORE_SLOT_DIR", str(tmp_path / "s"))
    assert infra.slot_dir() == tmp_path / "s"
    monkeypatch.delenv("VMRESTORE_SLOT_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert infra.slot_dir() == tmp_path / "run" / "vmrestore" / "slots"
