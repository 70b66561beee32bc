"""Mutation fuzzers over the backup format and the job file (hypothesis, derandomized).

Deterministic (derandomize=True: the same cases every run) and bounded (max_examples),
so the whole module runs in seconds. Expected outcomes:

- raw byte mutations of a backup (no checksum fixed): a typed error (VmrError), or a
  restore byte-identical to the disk (a mutation in bytes nothing reads, e.g. the
  header's padding); never another exception, never a wrong disk reported as restored;
- field mutations of the index with every checksum recomputed (tests/adversarial/
  forge.py): a typed error, or a restore that ends (a forger who keeps the structure
  valid can swap blocks: no checksum can tell, the outcome is counted, not judged);
- job files: byte mutations and random values for each field: UsageError, or a job.

OUTCOMES counts each family's results for the closing note (printed with -s).
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import forge
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrestore.errors import UsageError, VmrError
from vmrestore.repository import format as fmt

MiB = 1 << 20
BS = 64 * 1024
FUZZ = settings(derandomize=True, max_examples=80, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
OUTCOMES: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


@dataclasses.dataclass
class Sample:
    dir: Path
    raw: bytes
    disk: bytes


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    from vmrestore.repository.create import create_backup

    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, MiB, dtype=np.uint8)
    data[: MiB // 4] = 0
    data[MiB // 2: MiB // 2 + BS] = 7  # a compressible block
    (d / "d0.img").write_bytes(data.tobytes())
    create_backup([str(d / "d0.img")], str(d / "b.vmrb"), block_size=BS,
                  vm_config={"name": "f", "disks": [{"index": 0, "capacity": MiB}]})
    return Sample(d, (d / "b.vmrb").read_bytes(), data.tobytes())


def _restore(path: Path, out: Path) -> bytes | None:
    """The restored disk, or None when refused with a typed error (any other error fails)."""
    from vmrestore.restore_disk import restore_disk

    out.unlink(missing_ok=True)
    try:
        restore_disk(str(path), 0, str(out), threads=1, lanes=1, direct=False)
    except VmrError:
        return None
    return out.read_bytes()


# ------------------------------------------------------------------ raw bytes


@st.composite
def byte_mutations(draw: st.DrawFn, size: int) -> list[tuple[str, int, int]]:
    ops = st.tuples(st.sampled_from(["flip", "set", "truncate", "insert"]),
                    st.integers(0, size - 1), st.integers(0, 255))
    return draw(st.lists(ops, min_size=1, max_size=4))


def _apply(raw: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(raw)
    for op, at, v in ops:
        if not b:
            break
        at %= len(b)
        if op == "flip":
            b[at] ^= 1 << (v % 8)
        elif op == "set":
            b[at] = v
        elif op == "truncate":
            del b[at:]
        else:
            b[at:at] = bytes([v]) * (v % 17 + 1)
    return bytes(b)


def test_raw_byte_mutations(sample: Sample, tmp_path_factory) -> None:
    work = tmp_path_factory.mktemp("raw")

    @FUZZ
    @given(byte_mutations(len(sample.raw)))
    def run(ops: list[tuple[str, int, int]]) -> None:
        p = work / "m.vmrb"
        p.write_bytes(_apply(sample.raw, ops))
        got = _restore(p, work / "o.img")
        if got is None:
            OUTCOMES["raw bytes"]["refused (typed error)"] += 1
        else:
            assert got == sample.disk, ops  # success only with the right bytes
            OUTCOMES["raw bytes"]["restored identical"] += 1

    run()
    assert sum(OUTCOMES["raw bytes"].values()) >= 60


# ------------------------------------------------------------------ fields, checksums recomputed

EDGES = [0, 1, 2, 3, 7, 255, 4095, 4096, BS - 1, BS, BS + 1, MiB, 2**31 - 1, 2**31, 2**32 - 1,
         2**32, 2**63 - 1, 2**63, 2**64 - 1]


def _field_value(dtype: np.dtype, name: str, v: int) -> int:
    kind = dtype[name]
    if kind.kind == "V" or kind.shape:
        return 0
    info = np.iinfo(kind.base)
    return v % (int(info.max) - int(info.min) + 1) + int(info.min)


@st.composite
def record_mutations(draw: st.DrawFn) -> tuple[int, list[tuple[int, str, int]]]:
    kind = draw(st.sampled_from([fmt.SEC_EXTENTS, fmt.SEC_BLOCK_MAP]))
    dtype = fmt.EXTENT_DTYPE if kind == fmt.SEC_EXTENTS else fmt.BLOCK_DTYPE
    names = [n for n in dtype.names if not dtype[n].shape and dtype[n].kind != "V"]
    edits = st.tuples(st.integers(0, 10**6), st.sampled_from(names),
                      st.one_of(st.sampled_from(EDGES), st.integers(0, 2**64 - 1)))
    return kind, draw(st.lists(edits, min_size=1, max_size=3))


def test_index_field_mutations_with_checksums_recomputed(sample: Sample,
                                                         tmp_path_factory) -> None:
    work = tmp_path_factory.mktemp("fields")
    (work / "orig.img").write_bytes(b"")

    @FUZZ
    @given(record_mutations())
    def run(m: tuple[int, list[tuple[int, str, int]]]) -> None:
        kind, edits = m
        dtype = fmt.EXTENT_DTYPE if kind == fmt.SEC_EXTENTS else fmt.BLOCK_DTYPE

        def change(rec: np.ndarray) -> None:
            for i, name, v in edits:
                rec[name][i % len(rec)] = _field_value(dtype, name, v)

        p = work / "m.vmrb"
        p.write_bytes(forge.edit_records(sample.raw, kind, dtype, change))
        got = _restore(p, work / "o.img")
        fam = OUTCOMES["index fields (checksums recomputed)"]
        if got is None:
            fam["refused (typed error)"] += 1
        elif got == sample.disk:
            fam["restored identical (no-op edit)"] += 1
        else:
            fam["restored, different bytes (undetectable without a signature)"] += 1

    run()
    assert sum(OUTCOMES["index fields (checksums recomputed)"].values()) >= 60


# ------------------------------------------------------------------ job files

JOB = {"version": 1, "backup": "b.vmrb", "name": "vm1", "datastore": "ds1",
       "disk_format": "thin", "network_map": {"VM Network": "Restore Network"},
       "disk_datastores": {"0": "ds2"}, "transport": "auto", "power_on": False,
       "threads": 2, "vcenter": "https://vc.example/sdk", "user": "admin"}

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def _load(tmp: Path, text: bytes, suffix: str = ".yaml") -> None:
    from vmrestore.job import load_job_file

    p = tmp / f"job{suffix}"
    p.write_bytes(text)
    try:
        load_job_file(p)
    except UsageError:
        OUTCOMES["job files"]["refused (UsageError)"] += 1
        return
    OUTCOMES["job files"]["accepted"] += 1


def test_job_file_fields(tmp_path_factory) -> None:
    import json

    work = tmp_path_factory.mktemp("jobs")

    @FUZZ
    @given(st.sampled_from([*JOB, "unknown_field"]), JSONISH)
    def run(key: str, value: object) -> None:
        doc = dict(JOB)
        doc[key] = value
        _load(work, json.dumps(doc, default=str).encode(), ".json")

    run()


def test_job_file_bytes(tmp_path_factory) -> None:
    import yaml

    work = tmp_path_factory.mktemp("jobbytes")
    text = yaml.safe_dump(JOB).encode()

    @FUZZ
    @given(byte_mutations(len(text)))
    def run(ops: list[tuple[str, int, int]]) -> None:
        _load(work, _apply(text, ops))

    run()
    for deep in (b"a: " + b"[" * 50000, b"\xff\xfe\x00binary\x00" * 100, b"&a [*a, *a]",
                 b"a: &x [1]\nb: [*x, *x, *x]\n" * 1000):
        _load(work, deep)


def test_report_outcomes() -> None:
    """Print what each family did (the closing note's counts; run with -s)."""
    for fam, c in sorted(OUTCOMES.items()):
        print(f"{fam}: {sum(c.values())} cases: " + ", ".join(f"{k} {v}" for k, v in
                                                              sorted(c.items())))
    assert OUTCOMES, "run the whole module"
