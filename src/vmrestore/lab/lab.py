"""Bring the embedded vSphere lab up and down: vcsim, datastores, SAN LUN, host data services.

Everything a lab owns lives in its directory (default ``.lab``), so several
labs coexist: ports are picked free by the kernel at start, loop devices by
``losetup -f``. ``up`` is idempotent; ``down`` removes every process, loop
device and mount the lab made, using the records in ``run.json`` plus a sweep
for anything backed by a file inside the lab directory, so a half-started or
crashed lab is cleaned up too. Layout and status format: docs/lab.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmrestore.errors import LabError
from vmrestore.lab import loopdev
from vmrestore.lab.client import STATUS_VERSION, default_lab_dir, lab_is_up
from vmrestore.procs import pid_alive, run_checked

log = logging.getLogger("vmrestore.lab")

DEFAULT_SAN_SIZE = 1 << 30   # sparse: costs only what is written
DEFAULT_HOSTS = 2
USER = "vmr"
START_TIMEOUT = 120.0

# Files and folders inside the lab dir that `down` removes (unless keep_files).
OWNED = ("lab.json", "run.json", "password", "hostd.token", "vcsim.json", "hostd.json",
         "hostd.url", "vcsim.log", "hostd.log", "datastores", "san", "hostd", "tls",
         "esx.json", "esx.log")


def _run(cmd: list[str], what: str, timeout: float = 120) -> str:
    return run_checked(cmd, what, LabError, timeout)


@contextlib.contextmanager
def _locked(lab_dir: Path) -> Iterator[None]:
    lab_dir.mkdir(parents=True, exist_ok=True)
    with open(lab_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


class _Run:
    """run.json: what this lab started, saved after each step so down can undo a partial up."""

    def __init__(self, lab_dir: Path) -> None:
        self.path = lab_dir / "run.json"
        try:
            self.data: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {"version": 1, "pids": {}, "loops": [], "mounts": []}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def add(self, key: str, value: Any) -> None:
        self.data.setdefault(key, []).append(value)
        self.save()


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], logfile: Path, what: str,
                   timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise LabError(f"{what} exited with status {proc.returncode}: {_tail(logfile)}")
        time.sleep(0.05)
    raise LabError(f"{what} did not become ready in {timeout:.0f} s: {_tail(logfile)}")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _spawn(cmd: list[str], logfile: Path) -> subprocess.Popen[bytes]:
    """Start a lab daemon detached from our session, so it outlives `vmrestore lab up`."""
    with open(logfile, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True)


def _make_san(lab_dir: Path, run: _Run, size: int) -> tuple[str, Path, Path]:
    """A LUN image on a loop device with ext4 on it, mounted as ds-san's directory."""
    san = lab_dir / "san"
    san.mkdir(exist_ok=True)
    image = san / "lun.img"
    with open(image, "wb") as f:
        f.truncate(size)
    dev = loopdev.attach(image, "attaching the SAN LUN", LabError)
    run.add("loops", dev)
    # 4 KiB blocks, every inode table initialized now: no background writes later.
    _run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-L", "vmr-san",
          "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", dev], "formatting the SAN LUN")
    mnt = lab_dir / "datastores" / "ds-san"
    mnt.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-t", "ext4", dev, str(mnt)], "mounting the SAN LUN")
    run.add("mounts", str(mnt))
    return dev, image, mnt


def up(lab_dir: Path | None = None, *, hosts: int = DEFAULT_HOSTS,
       san_size: int = DEFAULT_SAN_SIZE, proxies: int = 1,
       datastores: int = 0, netns: bool = False, esx: bool = False) -> dict[str, Any]:
    """Start the lab in lab_dir and return its status; if it is already up, just the status.

    ``proxies``: proxy VMs (vmr-proxy, vmr-proxy2, ...; one per host, round robin);
    ``datastores``: more local datastores besides the three (ds-local2, ds-local3, ...);
    ``netns``: a network namespace per proxy VM for its worker (lab/netns.py).
    ``esx``: also a standalone ESXi endpoint (status ``esx``) over ds-local and ds-san.
    Both endpoints serve https with a certificate from the lab's own CA (``ca_file``).
    """
    lab_dir = (lab_dir or default_lab_dir()).resolve()
    with _locked(lab_dir):
        if (lab_dir / "lab.json").exists() and lab_is_up(lab_dir):
            return status(lab_dir)
        if (lab_dir / "run.json").exists() or (lab_dir / "lab.json").exists():
            log.warning("lab in %s is half up or crashed: cleaning it first", lab_dir)
            _down_locked(lab_dir, keep_files=False)
        try:
            return _up_locked(lab_dir, hosts=hosts, san_size=san_size, proxies=proxies,
                              datastores=datastores, netns=netns, esx=esx)
        except BaseException:
            log.debug("lab up failed, cleaning", exc_info=True)
            _down_locked(lab_dir, keep_files=False)
            raise


def _up_locked(lab_dir: Path, *, hosts: int, san_size: int, proxies: int,
               datastores: int, netns: bool, esx: bool = False) -> dict[str, Any]:
    from vmrestore.lab.build import vcsim_binary
    from vmrestore.lab.tls import make_certs

    if os.geteuid() != 0:
        raise LabError("the lab needs root (loop devices and mounts for the SAN datastore)")
    for tool in ("losetup", "mkfs.ext4", "mount", "umount", "nbdkit"):
        if shutil.which(tool) is None:
            raise LabError(f"'{tool}' not found: run scripts/bootstrap.sh")
    binary = vcsim_binary()
    run = _Run(lab_dir)
    run.save()

    password = secrets.token_urlsafe(18)
    _write_private(lab_dir / "password", password + "\n")
    _write_private(lab_dir / "hostd.token", secrets.token_urlsafe(24) + "\n")
    ds_local = lab_dir / "datastores" / "ds-local"
    ds_vvol = lab_dir / "datastores" / "ds-vvol"
    ds_local.mkdir(parents=True, exist_ok=True)
    ds_vvol.mkdir(parents=True, exist_ok=True)
    extra = {f"ds-local{i}": lab_dir / "datastores" / f"ds-local{i}"
             for i in range(2, datastores + 2)}
    for d in extra.values():
        d.mkdir(parents=True, exist_ok=True)
    lun, lun_image, ds_san = _make_san(lab_dir, run, san_size)
    certs = make_certs(lab_dir / "tls")
    common = [str(binary), "-listen", "127.0.0.1:0", "-user", USER,
              "-password-file", str(lab_dir / "password"), "-tls-cert", str(certs.cert),
              "-tls-key", str(certs.key), "-ds-local", str(ds_local), "-ds-san", str(ds_san)]

    info_path = lab_dir / "vcsim.json"
    vcsim = _spawn([*common, "-hosts", str(hosts), "-ds-vvol", str(ds_vvol),
                    "-proxies", str(proxies),
                    *[a for name, d in extra.items() for a in ("-ds", f"{name}={d}")],
                    "-info", str(info_path)], lab_dir / "vcsim.log")
    run.data["pids"]["vcsim"] = vcsim.pid
    run.save()
    esx_proc = None
    if esx:  # a standalone host beside the vCenter, over the same directories
        esx_proc = _spawn([*common, "-esx", "-proxies", "0", "-info", str(lab_dir / "esx.json")],
                          lab_dir / "esx.log")
        run.data["pids"]["esx"] = esx_proc.pid
        run.save()
    _wait_for_file(info_path, vcsim, lab_dir / "vcsim.log", "vcsim")
    vc = json.loads(info_path.read_text())

    types = {d["name"]: d["type"] for d in vc["datastores"]}
    datastores: list[dict[str, Any]] = [
        {"name": "ds-local", "type": types["ds-local"], "dir": str(ds_local)},
        {"name": "ds-san", "type": types["ds-san"], "dir": str(ds_san), "lun": lun,
         "lun_image": str(lun_image)},
        {"name": "ds-vvol", "type": types["ds-vvol"], "dir": str(ds_vvol)},
        *({"name": name, "type": types[name], "dir": str(d)} for name, d in extra.items()),
    ]
    doc: dict[str, Any] = {
        "version": STATUS_VERSION,
        "state": "up",
        "dir": str(lab_dir),
        "vcenter_url": vc["url"],
        "user": USER,
        "password": password,
        "password_file": str(lab_dir / "password"),
        "datacenter": vc["datacenter"],
        "cluster": vc["cluster"],
        "clusters": [vc["cluster"]],
        "resource_pool": vc["resource_pool"],
        "vm_folder": vc["vm_folder"],
        "hosts": vc["hosts"],
        "networks": vc["networks"],
        "proxy_vm": vc["proxy_vm"],
        "proxy_vms": vc.get("proxy_vms") or [vc["proxy_vm"]],
        "datastores": datastores,
        "ca_file": str(certs.ca),
        "thumbprints": certs.thumbprints(),
        "hostd_url": "",
        "hostd_token_file": str(lab_dir / "hostd.token"),
        "pids": {"vcsim": vcsim.pid},
    }
    if esx_proc is not None:
        _wait_for_file(lab_dir / "esx.json", esx_proc, lab_dir / "esx.log", "vcsim (ESXi)")
        ex = json.loads((lab_dir / "esx.json").read_text())
        doc["esx"] = {"url": ex["url"], "datacenter": ex["datacenter"], "host": ex["hosts"][0],
                      "resource_pool": ex["resource_pool"], "vm_folder": ex["vm_folder"],
                      "datastores": [d["name"] for d in ex["datastores"]]}
        doc["pids"]["esx"] = esx_proc.pid
    # hostd reads its configuration (the same document) from hostd.json.
    _write_private(lab_dir / "hostd.json", json.dumps(doc, indent=2))
    url_path = lab_dir / "hostd.url"
    hostd = _spawn([sys.executable, "-m", "vmrestore.lab.hostd", "--lab-dir", str(lab_dir)],
                   lab_dir / "hostd.log")
    run.data["pids"]["hostd"] = hostd.pid
    run.save()
    _wait_for_file(url_path, hostd, lab_dir / "hostd.log", "host data services (hostd)")
    doc["hostd_url"] = url_path.read_text().strip()
    doc["pids"]["hostd"] = hostd.pid
    # The proxies' own boot disks are thin: give them their size as a host would.
    from vmrestore.transport.host import HostServices

    hs = HostServices(doc["hostd_url"], (lab_dir / "hostd.token").read_text().strip())
    for vm in doc["proxy_vms"]:
        hs.prepare_disk(f"[ds-local] {vm}/{vm}.vmdk", 16 << 20, "thin")
    if netns:
        from vmrestore.lab import netns as ns_mod

        doc["proxy_netns"] = ns_mod.make(lab_dir, doc["proxy_vms"],
                                         lambda name: run.add("netns", name))
    _write_private(lab_dir / "lab.json", json.dumps(doc, indent=2) + "\n")
    return doc


def status(lab_dir: Path | None = None) -> dict[str, Any]:
    """The lab's status document; state is "up", "down" or "broken" (see docs/lab.md)."""
    lab_dir = (lab_dir or default_lab_dir()).resolve()
    try:
        doc: dict[str, Any] = json.loads((lab_dir / "lab.json").read_text())
    except (OSError, ValueError):
        state = "broken" if (lab_dir / "run.json").exists() else "down"
        return {"version": STATUS_VERSION, "state": state, "dir": str(lab_dir)}
    problems = [f"{name} (pid {pid}) is not running"
                for name, pid in doc.get("pids", {}).items() if not pid_alive(int(pid))]
    if not problems:
        import ssl

        ctx = ssl.create_default_context(cafile=doc["ca_file"]) if doc.get("ca_file") else None
        urls = [("vcsim", doc["vcenter_url"].rsplit("/sdk", 1)[0] + "/about"),
                ("hostd", doc["hostd_url"] + "/v1/ping")]
        if doc.get("esx"):
            urls.append(("esx", doc["esx"]["url"].rsplit("/sdk", 1)[0] + "/about"))
        for name, url in urls:
            try:
                with urllib.request.urlopen(url, timeout=5,
                                            context=ctx if url.startswith("https") else None) as r:
                    r.read()
            except OSError as e:
                problems.append(f"{name} does not answer at {url}: {e}")
    doc["state"] = "broken" if problems else "up"
    if problems:
        doc["problems"] = problems
    return doc


def down(lab_dir: Path | None = None, *, keep_files: bool = False) -> list[str]:
    """Stop everything the lab started and (unless keep_files) delete its files; returns actions."""
    lab_dir = (lab_dir or default_lab_dir()).resolve()
    if not lab_dir.exists():
        return []
    with _locked(lab_dir):
        actions = _down_locked(lab_dir, keep_files=keep_files)
    if not keep_files:
        with contextlib.suppress(OSError):
            (lab_dir / ".lock").unlink()
            lab_dir.rmdir()
    return actions


def _ours(pid: int, lab_dir: Path) -> bool:
    """Is pid a process of this lab (its command line names the lab dir)? Guards against reuse."""
    try:
        return str(lab_dir) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _stop(pid: int, lab_dir: Path, name: str, actions: list[str]) -> None:
    if not pid_alive(pid) or not _ours(pid, lab_dir):
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not pid_alive(pid):
                actions.append(f"stopped {name} (pid {pid})")
                return
            time.sleep(0.05)
    log.warning("%s (pid %d) did not stop", name, pid)


def lab_processes(lab_dir: Path) -> list[int]:
    """Running lab daemons (vcsim, hostd, nbdkit) whose command line names the lab dir."""
    me = os.getpid()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            argv = [a.decode(errors="replace")
                    for a in p.joinpath("cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        daemon = (os.path.basename(argv[0]) == "nbdkit"
                  or os.path.basename(argv[0]).startswith("vmr-vcsim")
                  or "vmrestore.lab.hostd" in argv)
        if daemon and any(str(lab_dir) + "/" in a or a == str(lab_dir) for a in argv[1:]):
            if pid_alive(int(p.name)):
                pids.append(int(p.name))
    return pids


def lab_loops(lab_dir: Path) -> list[str]:
    """Loop devices whose backing file is inside the lab dir."""
    out = subprocess.run(["losetup", "-l", "-n", "--raw", "-O", "NAME,BACK-FILE"],
                         capture_output=True, text=True).stdout
    loops = []
    for line in out.splitlines():
        name, _, back = line.partition(" ")
        back = back.removesuffix(" (deleted)")
        if back.startswith(str(lab_dir) + "/"):
            loops.append(name)
    return loops


def lab_mounts(lab_dir: Path) -> list[str]:
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout
    return [t for t in out.splitlines() if t.startswith(str(lab_dir) + "/")]


def _down_locked(lab_dir: Path, *, keep_files: bool) -> list[str]:
    actions: list[str] = []
    run = _Run(lab_dir)
    pids = dict(run.data.get("pids", {}))
    # hostd first, politely: it releases its exports and hot-added disks.
    hostd_pid = pids.pop("hostd", None)
    url_path = lab_dir / "hostd.url"
    if hostd_pid and pid_alive(int(hostd_pid)) and url_path.exists():
        try:
            from vmrestore.transport.host import HostServices

            HostServices(url_path.read_text().strip(),
                         (lab_dir / "hostd.token").read_text().strip(),
                         timeout=30).release_all()
            actions.append("released host data services' exports and hot-added disks")
        except Exception as e:  # best effort: the sweep below cleans up anyway
            log.warning("hostd did not release its resources: %s", e)
    if hostd_pid:
        _stop(int(hostd_pid), lab_dir, "hostd", actions)
    for name, pid in pids.items():
        _stop(int(pid), lab_dir, name, actions)
    # Sweep: anything still running for this lab (e.g. nbdkit of a killed hostd).
    for pid in lab_processes(lab_dir):
        _stop(pid, lab_dir, "lab process", actions)
    if run.data.get("netns"):
        from vmrestore.lab import netns as ns_mod

        ns_mod.remove(run.data["netns"], actions)
    for dev in lab_loops(lab_dir):
        if dev in run.data.get("loops", []):
            continue  # the LUN: after its mount
        _detach(dev, actions)
    for mnt in sorted(set(run.data.get("mounts", [])) | set(lab_mounts(lab_dir)), reverse=True):
        _umount(mnt, actions)
    for dev in lab_loops(lab_dir):
        _detach(dev, actions)
    _unfence(lab_dir, actions)
    if not keep_files:
        for name in OWNED:
            p = lab_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        actions.append(f"removed the lab's files in {lab_dir}")
    else:
        for name in ("lab.json", "run.json", "hostd.url"):
            with contextlib.suppress(FileNotFoundError):
                (lab_dir / name).unlink()
    return actions


def _detach(dev: str, actions: list[str]) -> None:
    loopdev.detach(dev, LabError)
    actions.append(f"detached {dev}")


def _unfence(lab_dir: Path, actions: list[str]) -> None:
    """Clear the read-only flag hostd's fences left on loop devices nobody holds now.

    A killed hostd cannot do it itself; the flag would pass to the next user of
    the device number (docs/lab.md, "Fencing").
    """
    try:
        state = json.loads((lab_dir / "hostd" / "state.json").read_text())
    except (OSError, ValueError):
        return
    fenced = [d for d in state.get("fenced_devices", [])
              if isinstance(d, str) and d.startswith("/dev/loop")]
    still = loopdev.unfence_unbound(fenced)
    for dev in fenced:
        if dev not in still:
            actions.append(f"made the fenced {dev} writable again")


def _umount(mnt: str, actions: list[str]) -> None:
    if not os.path.ismount(mnt):
        return
    proc = None
    for _ in range(50):
        proc = subprocess.run(["umount", mnt], capture_output=True, text=True)
        if proc.returncode == 0:
            actions.append(f"unmounted {mnt}")
            return
        time.sleep(0.1)
    raise LabError(f"cannot unmount {mnt}: {proc.stderr.strip() if proc else ''}")
