"""Phase 1 refuses every impossible combination before anything is created (docs/restore.md,
"Refused in phase 1"): each case asserts the exit code, the one-line reason, a report
that failed in 'initialize', and nothing left in the lab (no VM, no directory, no
export, no hot-add, no job state)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mover.mover_helpers import TOKEN, AgentProc
from restore_helpers import assert_nothing_left, restore_cli, unique
from support import need_tool

pytestmark = [pytest.mark.lab, pytest.mark.root]


def _refused(lab, lab_si, host_services, tmp_path: Path, code: int, words: tuple[str, ...],
             *args: str) -> None:
    name = unique("refuse")
    state = tmp_path / "state"
    p, rep = restore_cli(lab, *args, "--name", name, state_dir=state)
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("vmrestore: error:")]
    assert len(errors) == 1, p.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert rep is not None and rep["failed_phase"] == "initialize", rep
    assert_nothing_left(lab, host_services, lab_si, name, state)


@pytest.fixture
def tls_agent(backup, tmp_path: Path) -> Iterator[tuple[AgentProc, Path, Path]]:
    need_tool("openssl")
    cert, key = tmp_path / "agent.crt", tmp_path / "agent.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=vmrestore-agent", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    tok = tmp_path / "agent.token"
    tok.write_text(TOKEN + "\n")
    a = AgentProc(backup.dir, tok, ["--tls-cert", str(cert), "--tls-key", str(key)]).start()
    try:
        yield a, tok, cert
    finally:
        a.stop()


def test_plain_repo_url_against_a_tls_only_agent(lab, lab_si, host_services, tls_agent,
                                                 tmp_path: Path) -> None:
    a, tok, _cert = tls_agent
    _refused(lab, lab_si, host_services, tmp_path, 2, ("requires TLS", "repos://"),
             "--repository", a.url("inc1.vmrb"), "--token-file", str(tok),
             "--datastore", "ds-local")


@pytest.mark.parametrize("transport", ["nbd", "san"])
def test_repos_source_with_a_transport_it_cannot_feed(lab, lab_si, host_services, tls_agent,
                                                      tmp_path: Path, transport: str) -> None:
    a, tok, cert = tls_agent
    ds = "ds-san" if transport == "san" else "ds-local"
    extra = ["--disk-format", "thick-eager"] if transport == "san" else []
    _refused(lab, lab_si, host_services, tmp_path, 2,
             (f"transport {transport} refused", "repos://"),
             "--repository", a.url("inc1.vmrb", scheme="repos") + f"?ca={cert}",
             "--token-file", str(tok), "--datastore", ds, "--transport", transport, *extra)


def test_san_with_thick_lazy_disks(lab, lab_si, host_services, backup, tmp_path: Path) -> None:
    _refused(lab, lab_si, host_services, tmp_path, 2,
             ("transport san refused", "thick-lazy", "--disk-format thick-eager"),
             "--backup", str(backup.inc), "--datastore", "ds-san", "--transport", "san",
             "--disk-format", "thick-lazy")


def test_hotadd_with_a_proxy_vm_that_does_not_exist(lab, lab_si, host_services, backup,
                                                    tmp_path: Path) -> None:
    infra = tmp_path / "infra.yaml"
    infra.write_text("version: 1\nproxies:\n  - name: ghost\n    vm: no-such-proxy-vm\n")
    _refused(lab, lab_si, host_services, tmp_path, 2,
             ("transport hotadd refused", "no-such-proxy-vm", "not found"),
             "--backup", str(backup.inc), "--datastore", "ds-local", "--transport", "hotadd",
             "--infra", str(infra))
