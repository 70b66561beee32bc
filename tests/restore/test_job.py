"""RestoreJob: CLI args and job files validate the same way, errors name the field."""

from __future__ import annotations

import json

import pytest

from vmrestore import cli
from vmrestore import job as jobmod
from vmrestore.errors import UsageError


def parse(*argv: str) -> jobmod.RestoreJob:
    args = cli.build_parser().parse_args(["restore", *argv])
    return jobmod.from_args(args)


def test_cli_args_build_a_typed_job() -> None:
    j = parse("--backup", "b.vmrb", "--name", "web02", "--disk-datastore", "1=ds-san",
              "--network-map", "VM Network=Restore Network", "--disk-format", "thin",
              "--transport", "nbd", "--power-on")
    assert j.backup == "b.vmrb" and j.name == "web02"
    assert j.disk_datastores == {1: "ds-san"}
    assert j.network_map == {"VM Network": "Restore Network"}
    assert (j.disk_format, j.transport, j.power_on, j.resume) == ("thin", "nbd", True, False)


def test_defaults() -> None:
    j = parse("--backup", "b.vmrb")
    assert (j.disk_format, j.transport, j.keep_on_failure, j.vcenter) == \
        ("same", "auto", False, None)


@pytest.mark.parametrize("argv, field", [
    (["--disk-datastore", "x=ds"], "--disk-datastore"),
    (["--disk-datastore", "1"], "--disk-datastore"),
    (["--network-map", "A"], "--network-map"),
    (["--network-map", "A=B", "--network-map", "A=C"], "--network-map"),
    (["--name", "a/b"], "'name'"),
    (["--vcenter", "https://vc"], "'user'"),
    (["--vcenter", "https://vc", "--user", "u"], "'password_file'"),
    (["--threads", "0"], "'threads'"),
    (["--max-rate", "fast"], "'max_rate'"),
    (["--thumbprint", "zz"], "'thumbprint'"),
])
def test_cli_errors_name_the_field(argv: list[str], field: str) -> None:
    with pytest.raises(UsageError, match=field):
        parse("--backup", "b.vmrb", *argv)


def test_backup_required() -> None:
    with pytest.raises(UsageError, match="--backup"):
        parse()


def test_job_file_yaml_same_fields(tmp_path) -> None:
    (tmp_path / "b.vmrb").write_bytes(b"")
    f = tmp_path / "job.yaml"
    f.write_text("version: 1\nbackup: b.vmrb\nname: web02\ndisk-format: thick-eager\n"
                 "network_map:\n  VM Network: Restore Network\ndisk_datastores:\n  1: ds-san\n"
                 "power_on: true\ntransport: hotadd\n")
    j = parse(str(f))
    assert j.backup == str(tmp_path / "b.vmrb")  # relative to the job file
    assert (j.name, j.disk_format, j.transport, j.power_on) == \
        ("web02", "thick-eager", "hotadd", True)
    assert j.network_map == {"VM Network": "Restore Network"}
    assert j.disk_datastores == {1: "ds-san"}


@pytest.mark.parametrize("text, rate", [("200M", 200 << 20), ("1G/s", 1 << 30), ("0", 0),
                                        (None, 0)])
def test_max_rate_in_bytes_per_second(tmp_path, text, rate) -> None:
    j = parse("--backup", "b.vmrb", *(["--max-rate", text] if text else []))
    assert j.max_rate_bytes == rate
    f = tmp_path / "job.yaml"
    f.write_text("backup: b.vmrb\n" + (f"max_rate: {text}\n" if text else ""))
    assert parse(str(f)).max_rate_bytes == rate  # a bare 0 in YAML is read as text too


def test_every_disk_task_gets_the_jobs_data_mover_options(tmp_path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("x")
    j = parse("--repository", "repo://h:1/b.vmrb", "--threads", "3",
              "--queue-depth", "8", "--max-rate", "8M", "--token-file", str(tok))
    s = j.task_settings(target_zeroed=False, compare=True, stall=0.5)
    assert (s.threads, s.queue_depth, s.max_rate, s.token_file) == (3, 8, 8 << 20, str(tok))
    assert (s.target_zeroed, s.compare, s.stall) == (False, True, 0.5)
    d = parse("--backup", "b.vmrb").task_settings(target_zeroed=True)
    assert (d.threads, d.queue_depth, d.max_rate, d.compare) == (0, 0, 0, False)


def test_job_file_json_and_list_forms(tmp_path) -> None:
    f = tmp_path / "job.json"
    f.write_text(json.dumps({"backup": "/x/b.vmrb", "network_map": ["A=B"],
                             "disk_datastores": ["0=ds1"]}))
    j = parse(str(f))
    assert j.network_map == {"A": "B"} and j.disk_datastores == {0: "ds1"}


@pytest.mark.parametrize("text, field", [
    ("backup: b\nbogus: 1\n", "bogus"),
    ("name: x\n", "'backup'"),
    ("backup: b\ndisk_format: sparse\n", "'disk_format'"),
    ("backup: b\ntransport: fibre\n", "'transport'"),
    ("backup: b\npower_on: yes please\n", "'power_on'"),
    ("backup: b\nthreads: many\n", "'threads'"),
    ("backup: b\nmax_rate: 10 MB per second\n", "'max_rate'"),
    ("backup: b\npassword: hunter2\n", "'password'"),
    ("backup: b\nversion: 2\n", "'version'"),
    ("backup: b\nnetwork_map: 3\n", "'network_map'"),
    ("backup: [b\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
])
def test_job_file_errors_name_the_field(tmp_path, text: str, field: str) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(text)
    with pytest.raises(UsageError, match=field) as ei:
        parse(str(f))
    assert str(f) in str(ei.value)


def test_job_file_missing(tmp_path) -> None:
    with pytest.raises(UsageError, match="job file"):
        parse(str(tmp_path / "nope.yaml"))


def test_cli_flags_switch_on_next_to_job_file(tmp_path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("backup: /b.vmrb\n")
    j = parse(str(f), "--resume", "--json")
    assert j.resume and j.json


def test_parse_vcenter() -> None:
    assert jobmod.parse_vcenter("vc.example") == ("https", "vc.example", 443, "/sdk")
    assert jobmod.parse_vcenter("http://127.0.0.1:8989/sdk") == \
        ("http", "127.0.0.1", 8989, "/sdk")
    with pytest.raises(UsageError):
        jobmod.parse_vcenter("ftp://x")


def test_identity_ignores_run_flags() -> None:
    a = parse("--backup", "b.vmrb", "--name", "x")
    b = parse("--backup", "b.vmrb", "--name", "x", "--resume", "--json", "--keep-on-failure")
    c = parse("--backup", "b.vmrb", "--name", "y")
    assert a.identity() == b.identity() != c.identity()
