"""The error model (docs/errors.md): core errors translated in one place, one exit code each."""

from __future__ import annotations

import pytest

from vmrestore import errors
from vmrestore.pipeline import CoreError, _pipeline


@pytest.mark.parametrize(("code", "cls", "exit_code"), [
    (_pipeline.E_CHECKSUM, errors.ChecksumError, 4),
    (_pipeline.E_SOURCE, errors.SourceError, 5),
    (_pipeline.E_TARGET, errors.TargetError, 6),
    (_pipeline.E_TRANSPORT, errors.TransportError, 7),
    (_pipeline.E_INTERRUPTED, errors.Interrupted, 130),
    (_pipeline.E_INTERNAL, errors.VmrError, 1),
])
def test_core_class_decides_the_type(code: int, cls: type, exit_code: int) -> None:
    e = errors.from_core(CoreError(code, "chain file 1: read failed", 7, 4096),
                         disk=2, sources=["a.vmrb", "b.vmrb"])
    assert type(e) is cls and e.exit_code == exit_code
    assert str(e) == "disk 2: b.vmrb: read failed (disk offset 4096)"
    assert e.plan_index == 7 and e.offset == 4096  # type: ignore[attr-defined]


@pytest.mark.parametrize("code", [_pipeline.E_TARGET, _pipeline.E_TRANSPORT])
def test_a_vendor_code_is_a_vddk_error_whatever_the_class(code: int) -> None:
    e = errors.from_core(CoreError(code, "disk x: write failed (VixError 8)", None, None, 0, 8),
                         where="disk 0 -> vddk")
    assert isinstance(e, errors.VddkError) and e.exit_code == 10 and e.code == 8
    assert e.kind == ("target" if code == _pipeline.E_TARGET else "transport")
    assert str(e).startswith("disk 0 -> vddk: disk x:")


def test_cancel_stays_an_interrupt_even_with_a_vendor_code() -> None:
    e = errors.from_core(CoreError(_pipeline.E_INTERRUPTED, "interrupted", None, None, 0, 3))
    assert type(e) is errors.Interrupted


def test_child_errors_keep_their_class_across_the_process_boundary() -> None:
    assert type(errors.from_exit(5, "m", "SourceError")) is errors.SourceError
    assert type(errors.from_exit(3, "m", "ChainError")) is errors.ChainError
    v = errors.from_exit(10, "m", "VddkError", 8)
    assert isinstance(v, errors.VddkError) and v.code == 8
    # a class name that does not match the code is not trusted; the code decides
    assert type(errors.from_exit(6, "m", "SourceError")) is errors.TargetError
    assert type(errors.from_exit(1, "m", "")) is errors.MoverError  # a crashed child


def test_empty_or_control_point_is_refused(tmp_path) -> None:
    import argparse

    from vmrestore.commands import point_id
    from vmrestore.job import RestoreJob, validate

    for bad in ("", "  ", "ab\ncd"):
        with pytest.raises(argparse.ArgumentTypeError):
            point_id(bad)
        with pytest.raises(errors.UsageError, match="field 'point'"):
            validate(RestoreJob(backup="b", point=bad))
    assert point_id("p1.vmrb") == "p1.vmrb"


def test_documents_name_field_and_line(tmp_path) -> None:
    from vmrestore import schema
    from vmrestore.infra import InfraDoc

    text = "version: 1\nproxies:\n  - name: a\n  - name: b\n    slots: 99\n"
    with pytest.raises(errors.UsageError, match=r"X: field 'proxies\[1\]\.slots' \(line 5\)"):
        schema.load(text.encode(), InfraDoc, "X")
    with pytest.raises(errors.UsageError, match="byte 0x93 at offset 1 is not UTF-8"):
        schema.load(b"a\x93", InfraDoc, "X")
    js = '{"proxies": [\n {"name": "a"},\n {"name": 7}\n]}'
    with pytest.raises(errors.UsageError, match=r"'proxies\[1\]\.name' \(line 3\)"):
        schema.load(js.encode(), InfraDoc, "X", json_only=True)


@pytest.mark.parametrize(("forged", "words"), [
    ({"disks": 5}, "field 'disks': Expected `array | null`, got `int`"),
    ({"nics": [{"type": ["x"]}]}, "field 'nics[0].type'"),
    ({"x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
     "nested deeper than 32 levels"),
])
def test_a_forged_vm_configuration_is_a_format_error_in_one_line(
        tmp_path, monkeypatch, capsys, forged: dict, words: str) -> None:
    """Checksums are right (the writer made them), the content is not: exit 3, one line."""
    from core_helpers import make_image
    from vmrestore import cli
    from vmrestore.repository import create

    img = tmp_path / "d.img"
    make_image(img, 2)
    real_finish = create.PointWriter.finish
    monkeypatch.setattr(create.PointWriter, "finish", lambda self, man, cfg, maps:
                        real_finish(self, man, {**cfg, **forged}, maps))
    bk = tmp_path / "forged.vmrb"
    create.create_backup([str(img)], str(bk), vm_config={"name": "f", "disks": [{}]})
    for argv in (["inspect", str(bk)], ["verify", str(bk)],
                 ["restore-disk", str(bk), "--disk", "0", "--to", str(tmp_path / "t.img")]):
        capsys.readouterr()
        assert cli.main(argv) == 3, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "VM configuration" in err[0] and words in err[0], err
    assert not (tmp_path / "t.img").exists()


def test_the_report_document_round_trips_and_a_forged_one_is_named(tmp_path, capsys) -> None:
    import json

    from vmrestore import cli, report

    r = report.Report(vm_name="vm1", backup="b.vmrb", status="failed", failed_phase="data",
                      error=errors.TargetError("disk 1: EIO"), seconds=1.23456)
    d = r.disk(1)
    d.bytes_written, d.seconds, d.history = 4 << 20, 2.0, ["nbd failed; fell back"]
    doc = r.as_dict()
    assert doc["error_type"] == "TargetError" and doc["disks"][0]["logical_bytes"] == 4 << 20
    back = report.from_dict(json.loads(json.dumps(doc)))
    assert back.as_dict() == {**doc, "error_type": "str"}  # the error comes back as its text
    doc["disks"][0]["bytes_written"] = "lots"
    p = tmp_path / "r.json"
    p.write_text(json.dumps(doc))
    capsys.readouterr()
    assert cli.main(["report", str(p)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "field 'disks[0].bytes_written'" in err[0], err


@pytest.mark.parametrize(("text", "words"), [
    ("[" * 100000 + "]" * 100000, "job: nested deeper than 32 levels"),
    ('{"version": 2, "tasks": [{"disk": "x"}]}', "job.tasks[0]: field 'disk': Expected `int`"),
    ("{bad", "job: not valid JSON: line 1, column 2"),
])
def test_a_bad_proxy_mover_job_is_one_error_event(text: str, words: str) -> None:
    import io
    import json

    from vmrestore.mover import proxy_mover

    out = io.StringIO()
    assert proxy_mover.main(text, out) == 2
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["error", "result"]
    assert words in events[0]["message"] and events[0]["kind"] == "UsageError"
