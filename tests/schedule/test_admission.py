"""Admission: each limit, the order, fallback, proxy loss, vCenter operations."""

from __future__ import annotations

import threading
import time

import pytest

from vmrestore.schedule import Admission, Limits, ProxySpec, TaskSpec


def task(key: str, size: int = 100, tier: int = 0, host: str = "h1", ds: str = "ds1",
         repo: str = "r1", options: tuple[tuple[str, str], ...] = (("p1", "nbd"),)) -> TaskSpec:
    return TaskSpec(key=key, vm=key.split("/")[0], disk=0, size=size, tier=tier, host=host,
                    datastore=ds, repo=repo, options=options)


def keys(grants) -> list[str]:
    return [g.task.key for g in grants]


def test_proxy_slots_bound_running_tasks_and_release_frees_one():
    adm = Admission([ProxySpec("p1", 2)], Limits())
    adm.add(task(f"vm{i}/0", size=10 * i) for i in range(5))
    first = adm.grants()
    assert keys(first) == ["vm4/0", "vm3/0"]
    assert adm.grants() == []
    assert adm.release(first[0])
    assert keys(adm.grants()) == ["vm2/0"]
    assert adm.usage().slots == {"p1": 2}


def test_nbd_streams_per_host_capped_other_hosts_and_transports_go_on():
    adm = Admission([ProxySpec("p1", 10)], Limits(nbd_per_host=2))
    adm.add(task(f"a{i}/0", size=1000 - i, host="h1") for i in range(4))
    adm.add([task("b/0", size=1, host="h2"),
             task("c/0", size=1, host="h1", options=(("p1", "hotadd"),))])
    got = adm.grants()
    assert sorted(keys(got)) == ["a0/0", "a1/0", "b/0", "c/0"]
    assert adm.usage().nbd_per_host == {"h1": 2, "h2": 1}


@pytest.mark.parametrize("transport", ["nbdssl", "vddk-nbd"])
def test_every_nfc_transport_counts_against_the_host(transport):
    adm = Admission([ProxySpec("p1", 10, transports=(transport,))], Limits(nbd_per_host=1))
    adm.add(task(f"a{i}/0", options=(("p1", transport),)) for i in range(3))
    assert len(adm.grants()) == 1


def test_datastore_and_repository_caps_with_per_name_overrides():
    lim = Limits(per_datastore=1, per_repo=3, datastores={"big": 2}, repos={"slow": 1})
    adm = Admission([ProxySpec("p1", 20)], lim)
    adm.add(task(f"d{i}/0", ds="ds1", repo=f"x{i}") for i in range(3))
    adm.add(task(f"b{i}/0", ds="big", repo=f"y{i}") for i in range(3))
    adm.add(task(f"s{i}/0", ds=f"z{i}", repo="slow") for i in range(3))
    adm.add(task(f"r{i}/0", ds=f"w{i}", repo="r1") for i in range(5))
    u = (adm.grants(), adm.usage())[1]
    assert u.per_datastore["ds1"] == 1 and u.per_datastore["big"] == 2
    assert u.per_repo["slow"] == 1 and u.per_repo["r1"] == 3
    assert u.running == 1 + 2 + 1 + 3


def test_order_is_tier_then_most_constrained_then_largest():
    everywhere = tuple((f"p{i}", "nbd") for i in range(1, 5))
    adm = Admission([ProxySpec(f"p{i}", 1) for i in range(1, 5)], Limits())
    adm.add([
        task("free-big/0", size=900, options=everywhere),
        task("free-small/0", size=10, options=everywhere),
        task("pinned-small/0", size=5, options=(("p1", "nbd"),)),
        task("tiny/0", size=1, tier=0, options=everywhere),
    ])
    adm.add([task("later-huge/0", size=10**6, tier=1, options=everywhere)])
    got = adm.grants()
    # tier 0 first; within it the task that only one proxy can run, then largest first
    assert keys(got) == ["pinned-small/0", "free-big/0", "free-small/0", "tiny/0"]
    assert got[0].proxy == "p1"
    adm.release(got[3])
    assert keys(adm.grants()) == ["later-huge/0"]


def test_a_vm_with_the_longest_disk_goes_first_with_all_its_disks():
    adm = Admission([ProxySpec("p1", 1)], Limits())
    adm.add([task("b/0", size=50), task("a/0", size=100), task("a/1", size=10),
             task("c/0", size=60)])
    order = []
    for _ in range(4):
        (g,) = adm.grants()
        order.append(g.task.key)
        adm.release(g)
    # a's disks together (its VM ready sooner), then the other VMs by their longest disk
    assert order == ["a/0", "a/1", "c/0", "b/0"]


def test_stream_rates_make_longest_first_mean_longest_in_time():
    opts_nbd, opts_hot = (("p1", "nbd"),), (("p1", "hotadd"),)
    adm = Admission([ProxySpec("p1", 1)], Limits(), stream_rates={"nbd": 50, "hotadd": 500})
    adm.add([task("fast-big/0", size=3000, options=opts_hot),   # 6 s
             task("slow-small/0", size=1000, options=opts_nbd)])  # 20 s
    assert keys(adm.grants()) == ["slow-small/0"]


def test_falls_back_along_its_options_and_prefers_the_first_free():
    opts = (("hot", "hotadd"), ("net", "nbd"))
    adm = Admission([ProxySpec("hot", 1), ProxySpec("net", 5)], Limits(nbd_per_host=1))
    adm.add(task(f"v{i}/0", size=100 - i, options=opts) for i in range(4))
    got = adm.grants()
    assert [(g.task.key, g.proxy, g.transport) for g in got] == [
        ("v0/0", "hot", "hotadd"), ("v1/0", "net", "nbd")]
    adm.release(got[0])
    assert [(g.proxy, g.transport) for g in adm.grants()] == [("hot", "hotadd")]


def test_a_blocked_head_does_not_block_others_behind_it():
    adm = Admission([ProxySpec("p1", 1), ProxySpec("p2", 1)], Limits())
    adm.add([task("a/0", size=10), task("b/0", size=9),
             task("c/0", size=1, options=(("p2", "nbd"),))])
    assert sorted(keys(adm.grants())) == ["a/0", "c/0"]


def test_proxy_loss_requeues_its_grants_with_a_new_attempt_elsewhere():
    opts = (("p1", "hotadd"), ("p2", "nbd"))
    adm = Admission([ProxySpec("p1", 2), ProxySpec("p2", 1)], Limits())
    adm.add([task("a/0", size=10, options=opts), task("b/0", size=5, options=opts),
             task("only-p1/0", size=1, options=(("p1", "nbd"),))])
    got = {g.task.key: g for g in adm.grants()}
    assert {k: (g.proxy, g.transport) for k, g in got.items()} == {
        "only-p1/0": ("p1", "nbd"), "a/0": ("p1", "hotadd"), "b/0": ("p2", "nbd")}
    lost = adm.proxy_lost("p1")
    assert keys(lost) == ["a/0", "only-p1/0"]
    assert adm.usage().slots == {"p2": 1}
    assert all(not adm.release(g) for g in lost)   # stale: already requeued
    assert adm.release(got["b/0"])
    assert [(g.task.key, g.proxy, g.transport, g.attempt) for g in adm.grants()] == [
        ("a/0", "p2", "nbd", 2)]
    assert [t.key for t in adm.unplaceable()] == ["only-p1/0"]
    assert adm.proxy_lost("p1") == []
    adm.proxy_added(ProxySpec("p1", 1))
    assert adm.unplaceable() == []
    assert [(g.task.key, g.proxy, g.attempt) for g in adm.grants()] == [("only-p1/0", "p1", 2)]


def test_requeue_replaces_the_spec_and_keeps_counting_attempts():
    adm = Admission([ProxySpec("p1", 1)], Limits())
    adm.add([task("a/0", size=100)])
    (g,) = adm.grants()
    assert adm.requeue(g, task("a/0", size=40))
    (g2,) = adm.grants()
    assert (g2.task.size, g2.attempt) == (40, 2)
    assert not adm.requeue(g)
    with pytest.raises(ValueError):
        adm.requeue(g2, task("other/0"))


def test_duplicate_keys_and_cancel():
    adm = Admission([ProxySpec("p1", 1)], Limits())
    adm.add([task("a/0"), task("b/0", size=1)])
    with pytest.raises(ValueError, match="a/0"):
        adm.add([task("a/0")])
    assert adm.cancel("a/0") and not adm.cancel("a/0")
    assert keys(adm.grants()) == ["b/0"]
    assert adm.queued() == 0


def test_vcenter_operations_are_bounded():
    adm = Admission([], Limits(vcenter_ops=2))
    assert adm.vcenter_acquire(blocking=False)
    with adm.vcenter_op():
        assert not adm.vcenter_acquire(blocking=False)
        assert adm.usage().vcenter_ops == 2
    assert adm.vcenter_acquire(blocking=False)
    waited: list[float] = []

    def waiter() -> None:
        t0 = time.monotonic()
        with adm.vcenter_op(timeout=5):
            waited.append(time.monotonic() - t0)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.05)
    assert waited == []            # still waiting for a slot
    adm.vcenter_release()
    th.join(5)
    assert len(waited) == 1
    with pytest.raises(TimeoutError):
        with adm.vcenter_op(timeout=0):
            with adm.vcenter_op(timeout=0):
                pass
