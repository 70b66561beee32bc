"""The host data services feed the real restore pipeline: san, nbdssl and hotadd targets.

A contract test between the lab (docs/lab.md, API v1) and `vmrestore restore-disk`
(transport URIs): each disk file ends byte-identical to the backed-up image.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from lab_helpers import create_vm, flat_file, need, run_cli

pytestmark = [pytest.mark.lab, pytest.mark.root, pytest.mark.slow]

MiB = 1 << 20


@pytest.fixture(scope="module")
def backup(tmp_path_factory, cli):
    d = tmp_path_factory.mktemp("bk")
    img = d / "d0.img"
    img.write_bytes(os.urandom(4 * MiB) + bytes(2 * MiB) + os.urandom(2 * MiB))
    proc = cli("backup", "create", "--disk", str(img), "-o", str(d / "p.vmrb"), "-q")
    need(proc.returncode == 0, f"backup create unavailable: {proc.stderr.strip()[-200:]}")
    return img, d / "p.vmrb"


@pytest.fixture(scope="module")
def cli():
    return run_cli  # module scope: the root conftest's `cli` fixture is function-scoped


def _restore(cli, point, uri):
    proc = cli("restore-disk", "--disk", "0", "--to", uri, "--json", "-q", str(point))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("mode", ["san", "nbd", "nbdssl", "hotadd"])
def test_restore_through_host_services(lab, lab_si, host_services, backup, cli, tmp_path, mode):
    from vmrestore.transport.uri import write_extent_map

    img, point = backup
    ds = "ds-san"
    vm, (path,) = create_vm(lab_si, lab, f"tr-{mode}-{uuid.uuid4().hex[:6]}", ds,
                            [(8 * MiB, "thick-eager" if mode == "san" else "thin")])
    if mode == "san":
        m = host_services.extent_map(path)
        write_extent_map(tmp_path / "map.json", m.lun, m.size, m.extents)
        report = _restore(cli, point, f"san:{m.lun}?map={tmp_path / 'map.json'}")
        host_services.sync_disk(path)
    elif mode in ("nbd", "nbdssl"):
        exp = host_services.export_nbd(path, tls=mode == "nbdssl")
        try:
            report = _restore(cli, point, exp.uri)
        finally:
            host_services.unexport_nbd(exp.id)
    else:
        h = host_services.hot_add(path)
        try:
            report = _restore(cli, point, h.device)
        finally:
            host_services.hot_remove(h.id)
    assert report["transport"] == mode
    assert flat_file(lab, path).read_bytes() == img.read_bytes()
    vm.Destroy_Task()
