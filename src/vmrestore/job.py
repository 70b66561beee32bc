"""The restore job: one typed, validated description of what a restore must do.

A job comes from the command line or from a YAML/JSON file with the same
fields; both paths end in :func:`validate`, so a bad value gets the same
message naming the field whichever way it was given. The orchestrator only
ever sees a valid :class:`RestoreJob`. Nothing here talks to vCenter or reads
the backup: those checks belong to the phases that own them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec import field

from vmrestore import schema
from vmrestore.errors import UsageError

if TYPE_CHECKING:
    from vmrestore.disktask import TaskSettings

DISK_FORMATS = ("same", "thin", "thick-lazy", "thick-eager")
TRANSPORTS = ("auto", "san", "hotadd", "nbd", "nbdssl")
DISK_LIBRARIES = ("native", "vddk")
JOB_VERSION = 1

# A VM name vSphere accepts: 1..80 characters, no path separators or control chars.
_NAME_RE = re.compile(r"^[^/\\\x00-\x1f%]{1,80}$")


class RestoreJob(msgspec.Struct, kw_only=True):
    """Everything a restore needs to know, already checked for shape and type.

    The one declaration of the job document (a job file's fields, docs/restore.md):
    a file is converted into it by msgspec, which checks every field's type.
    """

    backup: str | None = None  # a local restore point file (its chain is resolved)
    # ... or a restore point on a repository agent: repo://HOST:PORT/PATH (exactly one of them)
    repository: str | None = None
    token_file: str | None = None  # the agent's per-job token (else $VMRESTORE_REPO_TOKEN)
    point: str | None = None
    # vCenter/ESXi connection; None = the lab's when the lab is up.
    vcenter: str | None = None
    user: str | None = None
    password_file: str | None = None
    thumbprint: str | None = None  # SHA-1/SHA-256 of the server cert, "aa:bb:..."
    ca_file: str | None = None  # PEM bundle to verify the server cert
    insecure: bool = False  # https without certificate checks (lab use)
    # Placement and amendments.
    datacenter: str | None = None
    name: str | None = None
    folder: str | None = None
    host: str | None = None
    resource_pool: str | None = None
    datastore: str | None = None
    disk_datastores: dict[int, str] = field(default_factory=dict)
    disk_format: str = "same"
    network_map: dict[str, str] = field(default_factory=dict)
    power_on: bool = False
    # Data movement.
    transport: str = "auto"
    proxy: str | None = None
    infra: str | None = None
    threads: int | None = None
    queue_depth: int | None = None
    max_rate: str | None = None  # data bytes per second per disk at most: "200M", "1G"
    # Who writes the disks: vmrestore's own writers, or VMware's VixDiskLib (vddk).
    disk_library: str = "native"
    vddk_libdir: str | None = None  # None: $VMRESTORE_VDDK_LIBDIR, or vddk_sim on the lab
    # Restore to the original location (original.py): the VM the backup was taken of,
    # rolled back in place; found by instance UUID, then name (``name``), or this moref.
    original: bool = False
    original_vm: str | None = None
    quick_rollback: bool = False  # write only the blocks that differ (compare first)
    keep_config: bool = False  # keep the VM's CPU, memory and NICs as they are
    force: bool = False  # power the original VM off when it is on
    full: bool = False  # replace disks that differ from the backup's with new ones (original.py)
    # Failure handling.
    resume: bool = False
    keep_on_failure: bool = False
    state_dir: str | None = None
    # Output.
    json: bool = False

    @property
    def max_rate_bytes(self) -> int:
        """max_rate in bytes per second (0: no limit); validate() checked the text."""
        from vmrestore.commands import parse_rate

        return parse_rate(self.max_rate) if self.max_rate else 0

    def task_settings(self, *, target_zeroed: bool, compare: bool = False,
                      stall: float = 0.0) -> TaskSettings:
        """The disk task settings this job gives every disk (disktask.TaskSettings).

        One place for what the job's options mean to the data mover: the
        orchestrator and the fleet's VM restore both build their disk tasks here.
        """
        from vmrestore.disktask import TaskSettings as Settings

        return Settings(threads=self.threads or 0, queue_depth=self.queue_depth or 0,
                        max_rate=self.max_rate_bytes, token_file=self.token_file,
                        target_zeroed=target_zeroed, compare=compare, stall=stall)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the job-state file stores it to check a resume is the same job)."""
        d: dict[str, Any] = msgspec.to_builtins(self, str_keys=True)
        return d

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it resumes."""
        d = self.to_dict()
        for k in ("resume", "keep_on_failure", "json", "threads", "queue_depth", "max_rate",
                  "password_file",
                  "state_dir", "token_file"):
            d.pop(k, None)
        return d


_FIELDS = {f.name: f for f in msgspec.structs.fields(RestoreJob)}
# Text fields a YAML file may give as a number (a point id prefix "1234", a host "10"):
# taken as the text they were written as.
_STR_FIELDS = {f.name for f in msgspec.structs.fields(RestoreJob)
               if f.type in (str, str | None)}


def _pairs(items: Iterable[str], what: str) -> dict[str, str]:
    """Parse repeated ``A=B`` options into a dict; a malformed one names the option."""
    out: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise UsageError(f"{what}: expected SRC=DST, got {item!r}")
        k, v = item.split("=", 1)
        k, v = k.strip(), v.strip()
        if not k or not v:
            raise UsageError(f"{what}: empty side in {item!r}")
        if k in out and out[k] != v:
            raise UsageError(f"{what}: {k!r} given twice ({out[k]!r} and {v!r})")
        out[k] = v
    return out


def _disk_index(key: Any, what: str) -> int:
    try:
        n = int(key)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: disk must be a disk index (0, 1, ...), got {key!r}") from None
    if n < 0:
        raise UsageError(f"{what}: disk index must be >= 0, got {n}")
    return n


def from_mapping(data: Mapping[str, Any], source: str = "job",
                 text: str | None = None) -> RestoreJob:
    """Build a job from a dict (a parsed job file); every field is checked by name.

    ``text``: the file's text, so that an error names the field's line too.
    """
    if not isinstance(data, Mapping):
        raise UsageError(f"{source}: a job must be a mapping of field: value")
    kw: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        line = schema.line_of(text, f"$.{raw_key}") if text is not None else None
        at = f" (line {line})" if line else ""
        if key == "version":
            if value != JOB_VERSION:
                raise UsageError(f"{source}: field 'version'{at}: this build reads job version "
                                 f"{JOB_VERSION}, got {value!r}")
            continue
        if key == "password":
            raise UsageError(f"{source}: field 'password'{at}: not allowed in a job file; "
                             "use 'password_file'")
        if key not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise UsageError(f"{source}: unknown field {raw_key!r}{at} (known: {known})")
        if value is None:
            continue
        if key in _STR_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        elif key in ("disk_datastores", "network_map") and isinstance(value, list):
            value = _pairs(value, f"{source}: field {key!r}{at}")
        kw[key] = value
    if "backup" not in kw and "repository" not in kw:
        raise UsageError(f"{source}: field 'backup' (a local restore point) or 'repository' "
                         "(repo://HOST:PORT/PATH) is required")
    # disk indexes may be written as "1": (strict=False lets a key be a numeric string)
    if isinstance(kw.get("disk_datastores"), Mapping):
        kw["disk_datastores"] = {_disk_index(k, f"{source}: field 'disk_datastores'"): v
                                 for k, v in kw["disk_datastores"].items()}
    job = schema.convert(kw, RestoreJob, source, text)
    return validate(job, source)


def load_job_file(path: str | Path) -> RestoreJob:
    """Read a YAML or JSON job file (YAML is a superset of JSON, so one parser reads both)."""
    p = Path(path)
    where = f"job file {p}"
    text = schema.text_of(schema.read_bytes(p, where), where)
    data = schema.parse(text, where, json_only=p.suffix == ".json")
    job = from_mapping(data or {}, where, text)
    return resolve_paths(job, p.resolve().parent)


def resolve_paths(job: RestoreJob, base: Path) -> RestoreJob:
    """Relative paths in a job (or plan) file are relative to the file, not to the cwd."""
    for key in ("backup", "password_file", "infra", "ca_file", "state_dir", "vddk_libdir",
                "token_file"):
        v = getattr(job, key)
        if v and not Path(v).is_absolute():
            setattr(job, key, str(base / v))
    return job


def from_args(args: Any) -> RestoreJob:
    """Build a job from parsed CLI arguments (commands/restore.py's parser)."""
    if getattr(args, "job_file", None):
        # Any other option next to a job file would be silently ignored: refuse it instead.
        flags = ("resume", "keep_on_failure", "json", "power_on")
        extra = sorted("--" + k.replace("_", "-") for k in (*_FIELDS, "disk_datastore")
                       if k not in flags and getattr(args, k, None) not in (None, [], {}))
        if extra:
            raise UsageError(f"restore: {', '.join(extra)} cannot be combined with a job file "
                             f"({args.job_file}): put them in the file (only --resume, "
                             "--keep-on-failure, --json, --power-on, -q may be added)")
        job = load_job_file(args.job_file)
        # Flags given on the command line next to a job file only switch things on.
        for key in ("resume", "keep_on_failure", "json", "power_on"):
            if getattr(args, key, False):
                setattr(job, key, True)
        return job
    if not args.backup and not getattr(args, "repository", None):
        raise UsageError("restore: give --backup BACKUP, --repository repo://HOST:PORT/PATH or a "
                         "job file (vmrestore restore JOB.yaml)")
    kw: dict[str, Any] = {}
    for key in _FIELDS:
        if key in ("disk_datastores", "network_map"):
            continue
        v = getattr(args, key, None)
        if v is not None:
            kw[key] = v
    kw["disk_datastores"] = {
        _disk_index(k, "--disk-datastore"): v
        for k, v in _pairs(getattr(args, "disk_datastore", None) or [], "--disk-datastore").items()
    }
    kw["network_map"] = _pairs(getattr(args, "network_map", None) or [], "--network-map")
    return validate(RestoreJob(**kw), "restore")


def validate(job: RestoreJob, source: str = "job") -> RestoreJob:
    """Check values that have a fixed shape; raise UsageError naming the field."""
    def bad(fieldname: str, why: str) -> UsageError:
        return UsageError(f"{source}: field {fieldname!r}: {why}")

    if bool(job.backup) == bool(job.repository):
        raise bad("backup", "give exactly one of 'backup' (a local restore point file) and "
                  "'repository' (repo://HOST:PORT/PATH on a repository agent)")
    if job.repository is not None and not job.repository.startswith(("repo://", "repos://")):
        raise bad("repository", f"{job.repository!r} is not a repo://HOST:PORT/PATH URL "
                  "(a local file goes in 'backup')")
    if job.point is not None and (not job.point.strip() or
                                  any(ord(c) < 32 for c in job.point)):
        raise bad("point", f"{job.point!r} is not a restore point (a point file name or an id "
                  "prefix)")
    if job.token_file and not job.repository:
        raise bad("token_file", "only with 'repository'")
    if job.disk_format not in DISK_FORMATS:
        raise bad("disk_format", f"{job.disk_format!r} is not one of {', '.join(DISK_FORMATS)}")
    if job.transport not in TRANSPORTS:
        raise bad("transport", f"{job.transport!r} is not one of {', '.join(TRANSPORTS)}")
    if job.disk_library not in DISK_LIBRARIES:
        raise bad("disk_library", f"{job.disk_library!r} is not one of {', '.join(DISK_LIBRARIES)}")
    if job.vddk_libdir and job.disk_library != "vddk":
        raise bad("vddk_libdir", "only with disk_library vddk")
    if job.name is not None and not _NAME_RE.match(job.name):
        raise bad("name", f"{job.name!r} is not a valid VM name (1-80 characters, no / \\ %)")
    if job.vcenter is not None:
        if not re.match(r"^(https?://)?[^/\s]+(/.*)?$", job.vcenter):
            raise bad("vcenter", f"{job.vcenter!r} is not a host or URL")
        if not job.user:
            raise bad("user", "required with 'vcenter'")
        if not job.password_file:
            raise bad("password_file", "required with 'vcenter'")
    for key in ("threads", "queue_depth"):
        v = getattr(job, key)
        if v is not None and not 1 <= v <= 256:
            raise bad(key, f"must be 1..256, got {v}")
    if job.max_rate is not None:
        from vmrestore.commands import RATE_EXAMPLES, parse_rate

        try:
            parse_rate(job.max_rate)
        except UsageError:
            raise bad("max_rate", f"{job.max_rate!r} is not a rate ({RATE_EXAMPLES})") from None
    if job.thumbprint is not None:
        tp = job.thumbprint.replace(":", "").lower()
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", tp):
            raise bad("thumbprint", "expected a SHA-1 or SHA-256 fingerprint in hex")
    for k, v in job.network_map.items():
        if not k or not v:
            raise bad("network_map", f"empty network name in {k!r}={v!r}")
    if not job.original:
        for key in ("original_vm", "quick_rollback", "keep_config", "force", "full"):
            if getattr(job, key):
                raise bad(key, "only with 'original' (restore to the original VM)")
    else:
        for key in ("datastore", "folder", "host", "resource_pool"):
            if getattr(job, key):
                raise bad(key, "not with 'original': the VM stays where it is")
        if job.disk_datastores:
            raise bad("disk_datastores", "not with 'original': the VM keeps its disks")
        if job.disk_format != "same":
            raise bad("disk_format", "not with 'original': the VM keeps its disks")
        if job.full and job.quick_rollback:
            raise bad("full", "not with 'quick_rollback': --full writes new disks, there is "
                      "nothing to compare them with")
        if job.keep_config and job.network_map:
            raise bad("network_map", "not with 'keep_config' (the NICs are kept as they are)")
        if job.disk_library != "native" and not job.quick_rollback:
            raise bad("disk_library", "restore to the original VM writes with vmrestore's own "
                      "writers in this build, unless it is a quick rollback")
    return job


def parse_vcenter(url: str) -> tuple[str, str, int, str]:
    """Split 'https://host:port/sdk' (or a bare host) into (protocol, host, port, path)."""
    from urllib.parse import urlsplit

    if "://" not in url:
        url = "https://" + url
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UsageError(f"restore: field 'vcenter': {url!r} is not an http(s) URL")
    port = u.port or (443 if u.scheme == "https" else 80)
    return u.scheme, u.hostname, port, u.path or "/sdk"
