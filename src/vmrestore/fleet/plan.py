"""The restore plan: many VM restores in one typed, versioned document (docs/fleet.md).

A plan is a list of VM restores, each with the fields of a job file
(docs/restore.md) plus ``tier`` (RTO tier: 0 most urgent), and ``defaults``
that every VM inherits. Each entry ends in :func:`vmrestore.job.from_mapping`,
so a bad field gets the same message as in a job file, prefixed with where it
is in the plan. Nothing here talks to vCenter or reads a backup.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from vmrestore import schema
from vmrestore.errors import UsageError
from vmrestore.job import RestoreJob, from_mapping, resolve_paths
from vmrestore.schedule import Limits

PLAN_VERSION = 1
DEFAULT_TIER = 1
# Per-VM fields a plan refuses: they belong to the plan run, not to one VM of it.
_RUN_FIELDS = ("resume", "json", "proxy", "keep_on_failure")


class PlanFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The plan document, version 1, as read from YAML/JSON."""

    version: int
    vms: list[dict[str, Any]]
    defaults: dict[str, Any] = msgspec.field(default_factory=dict)
    infra: str | None = None  # proxies (docs/restore.md); default: the lab's proxy VMs
    limits: Limits = msgspec.field(default_factory=Limits)
    state_dir: str | None = None  # where the plan's own state lives (default: beside the plan)
    max_vms: int | None = None  # VMs in their phases at once (default: total proxy slots)


@dataclass
class PlanVm:
    """One VM of the plan: its restore job and its RTO tier."""

    name: str
    tier: int
    job: RestoreJob
    index: int


@dataclass
class Plan:
    path: Path
    doc: PlanFile
    vms: list[PlanVm]
    digest: str  # of the normalized document: a resume must run the same plan

    @property
    def state_dir(self) -> Path:
        if self.doc.state_dir:
            p = Path(self.doc.state_dir)
            return p if p.is_absolute() else self.path.parent / p
        return self.path.parent / ".vmrestore-plan"

    @property
    def state_path(self) -> Path:
        return self.state_dir / f"plan-{self.path.stem}-{self.digest[:12]}.json"


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file; every VM entry becomes a validated RestoreJob."""
    p = Path(path)
    src = f"plan file {p}"
    text = schema.text_of(schema.read_bytes(p, src), src)
    return parse_plan(schema.parse(text, src, p.suffix == ".json"), p)


def parse_plan(data: Any, p: Path) -> Plan:
    src = f"plan file {p}"
    if not isinstance(data, dict):
        raise UsageError(f"{src}: a plan must be a mapping with 'version' and 'vms'")
    if data.get("version") != PLAN_VERSION:
        raise UsageError(f"{src}: field 'version': this build reads plan version "
                         f"{PLAN_VERSION}, got {data.get('version')!r}")
    try:
        doc = msgspec.convert(data, PlanFile)
    except msgspec.ValidationError as e:
        raise UsageError(f"{src}: {e}") from None
    if not doc.vms:
        raise UsageError(f"{src}: field 'vms' is empty: nothing to restore")
    if doc.max_vms is not None and doc.max_vms < 1:
        raise UsageError(f"{src}: field 'max_vms' must be at least 1")
    base = p.resolve().parent
    if doc.infra and not Path(doc.infra).is_absolute():
        doc.infra = str(base / doc.infra)
    for key in doc.defaults:
        if str(key).replace("-", "_") in (*_RUN_FIELDS, "name", "tier"):
            raise UsageError(f"{src}: field 'defaults.{key}' cannot be a default "
                             "(it is per VM or per plan run)")
    vms: list[PlanVm] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(doc.vms):
        where = f"{src}: vms[{i}]"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected a mapping of job fields")
        merged = {**doc.defaults, **entry}
        tier = merged.pop("tier", DEFAULT_TIER)
        if not isinstance(tier, int) or isinstance(tier, bool) or tier < 0:
            raise UsageError(f"{where}: field 'tier' must be an integer >= 0, got {tier!r}")
        name = merged.get("name")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{where}: field 'name' is required (the restored VM's name)")
        for key in merged:
            if str(key).replace("-", "_") in _RUN_FIELDS:
                raise UsageError(f"{where} ({name}): field {key!r} is given to the plan run "
                                 "(vmrestore restore --plan ... --resume/--json), not per VM")
        if name in seen:
            raise UsageError(f"{where}: VM name {name!r} already used by vms[{seen[name]}]")
        seen[name] = i
        job = resolve_paths(from_mapping(merged, f"{where} ({name})"), base)
        vms.append(PlanVm(name=name, tier=tier, job=job, index=i))
    norm = json.dumps([msgspec.to_builtins(doc.limits), doc.infra,
                       [(v.name, v.tier, v.job.identity()) for v in vms]], sort_keys=True,
                      default=str)
    return Plan(path=p.resolve(), doc=doc, vms=vms,
                digest=hashlib.sha256(norm.encode()).hexdigest())
