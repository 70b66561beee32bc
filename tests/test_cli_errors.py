"""Wrong arguments and full disks, through the real CLI: one line, right exit code, no traceback.

The house rule (docs/design.md): bad input gets a one-line error naming what and
where, a non-zero exit code, no traceback, and nothing that looks like a valid
result. Each case here was tried by hand first; the ones that broke the rule
were fixed in the same commit.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from support import need_root, need_tool, run_cli

MIB = 1 << 20


def _image(path: Path, mib: int) -> Path:
    """A disk image with data in every other MiB (incompressible, so nothing shrinks it)."""
    with open(path, "wb") as f:
        f.truncate(mib * MIB)
        for i in range(0, mib, 2):
            f.seek(i * MIB)
            f.write(os.urandom(MIB))
    return path


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-disk backup with a VM config (name web01, datastore ds1), 16 MiB stored of 32."""
    d = tmp_path_factory.mktemp("cli_errors")
    cfg = {"name": "web01", "guest_os": "otherGuest64", "cpus": 1, "memory_mb": 512,
           "disks": [{"index": 0, "capacity": 32 * MIB, "datastore": "ds1"}], "nics": []}
    (d / "vm.json").write_text(json.dumps(cfg))
    out = d / "full.vmrb"
    run_cli("backup", "create", "--disk", str(_image(d / "d0.img", 32)), "--vm-config",
            str(d / "vm.json"), "--codec", "none", "-o", str(out), check=True)
    return out


def _one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The error line, after checking the rule: exit code, one 'vmrestore: error:' line."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


# --- full disk ----------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path: Path):
    """An 8 MiB tmpfs, unmounted even when the test fails."""
    need_root()
    need_tool("mount", "umount")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_restore_disk_onto_a_full_filesystem_names_disk_and_offset(backup: Path,
                                                                     small_fs: Path) -> None:
    r = run_cli("restore-disk", str(backup), "--disk", "0", "--to", str(small_fs / "out.img"),
                "-q")
    line = _one_line_error(r, 6, "disk 0", "offset", "No space left on device")
    assert str(small_fs / "out.img") in line
    assert r.stdout == ""  # no summary of a restore that did not happen


def test_restore_disk_json_onto_a_full_filesystem_prints_no_summary(backup: Path,
                                                                      small_fs: Path) -> None:
    r = run_cli("restore-disk", str(backup), "--disk", "0", "--to", str(small_fs / "o.img"),
                "--json", "-q")
    _one_line_error(r, 6, "disk 0", "offset")
    assert r.stdout == ""  # nothing a script could take for bytes written


def test_backup_create_onto_a_full_filesystem_leaves_nothing(tmp_path: Path,
                                                             small_fs: Path) -> None:
    img = _image(tmp_path / "d.img", 32)  # 16 MiB of random data into 8 MiB of space
    out = small_fs / "b.vmrb"
    r = run_cli("backup", "create", "--disk", str(img), "--codec", "none", "-o", str(out))
    _one_line_error(r, 6, "offset", "No space left on device")
    assert list(small_fs.iterdir()) == []  # no file under the final name, temp file removed


# --- restore failure reports --------------------------------------------------------------

DEAD_VC = ("--vcenter", "https://127.0.0.1:1/sdk", "--user", "u")


def _pw(tmp_path: Path) -> str:
    p = tmp_path / "pw"
    p.write_text("secret\n")
    return str(p)


def test_restore_failed_in_initialize_reads_well(backup: Path, tmp_path: Path) -> None:
    r = run_cli("restore", "--backup", str(backup), *DEAD_VC, "--password-file", _pw(tmp_path),
                "--state-dir", str(tmp_path / "st"), "-q")
    _one_line_error(r, 8, "cannot reach vCenter/ESXi at https://127.0.0.1:1/sdk")
    head = r.stdout.splitlines()[0]
    assert "VM 'web01'" in head and "VM ''" not in head and "?" not in head
    assert "disk " not in r.stdout and "(sizes in MiB)" not in r.stdout  # no empty disk table
    assert "FAILED in phase initialize: cannot reach" in r.stdout


def test_restore_failed_before_the_backup_was_read_says_so(backup: Path,
                                                           tmp_path: Path) -> None:
    r = run_cli("restore", "--backup", str(backup), "--point", "nope", *DEAD_VC,
                "--password-file", _pw(tmp_path), "--state-dir", str(tmp_path / "st"), "-q")
    _one_line_error(r, 2, "no restore point 'nope'")
    assert "VM (not read)" in r.stdout.splitlines()[0]


def test_restore_json_on_failure_is_valid_and_names_phase(backup: Path, tmp_path: Path) -> None:
    r = run_cli("restore", "--backup", str(backup), *DEAD_VC, "--password-file", _pw(tmp_path),
                "--state-dir", str(tmp_path / "st"), "--json", "-q")
    _one_line_error(r, 8, "cannot reach")
    doc = json.loads(r.stdout)
    assert doc["status"] == "failed" and doc["failed_phase"] == "initialize"
    assert doc["error_type"] == "VSphereError" and "127.0.0.1:1" in doc["error"]
    assert doc["vm"]["name"] == "web01"
    assert [p["status"] for p in doc["phases"]] == ["failed"] + ["pending"] * 4


# --- wrong arguments ----------------------------------------------------------------------

def _job(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_restore_disk_wrong_arguments(backup: Path, tmp_path: Path) -> None:
    b = str(backup)
    t = str(tmp_path / "t.img")
    cases = [
        (["--disk", "3", "--to", t], 2, "no disk 3"),  # was exit 3 (FormatError): the file is fine
        (["--disk", "0", "--to", t, "--point", "nope"], 2, "no restore point 'nope'"),  # was 3
        (["--disk", "0", "--to", "foo://bar"], 2, "unknown target scheme 'foo'"),
        (["--disk", "-1", "--to", t], 2, "--disk must be >= 0"),
        (["--disk", "0", "--to", t, "--token-file", "x"], 2, "need a repo:// source"),
    ]
    for args, code, text in cases:
        _one_line_error(run_cli("restore-disk", b, *args), code, text)
    assert not Path(t).exists()


def test_not_a_backup_is_named_as_such(tmp_path: Path) -> None:
    img = _image(tmp_path / "disk.img", 2)  # a disk image given where a backup belongs
    for cmd in ("inspect", "verify"):
        _one_line_error(run_cli(cmd, str(img)), 3, str(img), "not a vmrestore backup")


def test_missing_backup_is_a_source_error_everywhere_printed_once(tmp_path: Path) -> None:
    """One failure, one exit code (5, SourceError) from every command, and its message once."""
    gone = str(tmp_path / "gone.vmrb")
    img = str(_image(tmp_path / "d.img", 1))
    st = str(tmp_path / "st")
    for argv in (["verify", gone], ["inspect", gone],
                 ["restore-disk", gone, "--disk", "0", "--to", str(tmp_path / "t.img")],
                 ["backup", "create", "--disk", img, "--parent", gone, "-o", str(tmp_path / "o")],
                 ["restore", "--backup", gone, "--state-dir", st, "-q"]):
        r = run_cli(*argv)
        _one_line_error(r, 5, gone)
        assert r.stderr.count("cannot open backup") == 1, (argv, r.stderr)


def test_restore_wrong_arguments(backup: Path, tmp_path: Path) -> None:
    b = str(backup)
    pw = _pw(tmp_path)
    common = [*DEAD_VC, "--password-file", pw, "--state-dir", str(tmp_path / "st"), "-q"]
    infra = _job(tmp_path, "infra.yaml", "version: 1\nproxies:\n  - name: p1\n    slots: two\n")
    cases = [
        (["--backup", b, "--network-map", "abc"], 2, "--network-map: expected SRC=DST"),
        (["--backup", b, "--disk-datastore", "9=ds"], 2, "no disk 9"),
        (["--backup", b, "--proxy", "nosuch"], 2, "proxy 'nosuch' not in the infrastructure"),
        (["--backup", b, "--infra", infra], 2, "field 'proxies[0].slots' (line 4): Expected `int`"),
        (["--backup", str(tmp_path / "none.vmrb")], 5, "cannot open backup"),
    ]
    for args, code, text in cases:
        _one_line_error(run_cli("restore", *args, *common), code, text)


def test_restore_job_file_errors(backup: Path, tmp_path: Path) -> None:
    b = str(backup)
    cases = [
        ("unknown.yaml", f"backup: {b}\nnmae: x\n", "unknown field 'nmae' (line 2)"),
        ("type.yaml", f"backup: {b}\npower_on: maybe\n", "'power_on' (line 2): Expected `bool`"),
        ("int.yaml", f"backup: {b}\nthreads: many\n",
         "'threads' (line 2): Expected `int | null`, got `str`"),
        ("nested.yaml", f"backup: {b}\nnetwork_map: {{a: [[1]]}}\n",
         "'network_map[...]' (line 2): Expected `str`, got `array`"),
        ("deep.json", "[" * 100000 + "]" * 100000, "nested deeper than 32 levels"),
        ("deep.yaml", "a:\n" + "".join(" " * i + "- \n" for i in range(1, 3000)),
         "nested too deeply"),
        ("binary.yaml", "\ufffd\x00PK", "not a text file"),
        # syntax errors say where (was: the parser's first line, no position)
        ("syntax.yaml", f"backup: [{b}\n", "not valid YAML/JSON: line 2, column 1"),
        ("syntax.json", '{"backup": "x",}', "line 1, column 16"),
    ]
    for name, text, words in cases:
        path = _job(tmp_path, name, text)
        _one_line_error(run_cli("restore", path, "-q"), 2, f"job file {path}", words)


def test_options_next_to_a_job_file_are_refused_not_ignored(backup: Path,
                                                             tmp_path: Path) -> None:
    # was: --name and --network-map silently ignored (only run flags were taken)
    path = _job(tmp_path, "job.yaml", f"backup: {backup}\n")
    r = run_cli("restore", path, "--name", "x", "--network-map", "a=b", "-q")
    _one_line_error(r, 2, "--name, --network-map cannot be combined with a job file")


# --- help ---------------------------------------------------------------------------------

def _parsers():
    import argparse

    from vmrestore.cli import build_parser

    todo = [("vmrestore", build_parser())]
    while todo:
        path, p = todo.pop()
        yield path, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{path} {name}", sp) for name, sp in a.choices.items()]


def test_every_command_explains_itself_and_every_option() -> None:
    import argparse

    seen = 0
    for path, p in _parsers():
        seen += 1
        assert p.description, f"{path}: no description"
        text = p.format_help()
        assert "default: None" not in text, path  # argparse noise instead of a real default
        for a in p._actions:
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                assert a.help, f"{path} {a.option_strings or a.dest}: no help text"
    assert seen >= 15


def test_top_level_help_lists_forms_and_every_exit_code() -> None:
    from vmrestore import errors

    r = run_cli("--help", check=True)
    assert "vmrestore restore-disk" in r.stdout and "nbd://" in r.stdout
    codes = {c.exit_code for c in vars(errors).values()
             if isinstance(c, type) and issubclass(c, errors.VmrError)}
    for code in codes:
        assert f"\n  {code:<4} " in r.stdout, code


def test_backup_create_wrong_arguments(tmp_path: Path) -> None:
    img = _image(tmp_path / "d.img", 2)
    out = tmp_path / "o.vmrb"
    (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    cases = [
        # was: accepted, zstd clamped it to 22 while the index recorded 99
        (["--disk", str(img), "--codec", "zstd", "--level", "99"], 2,
         "--level 99: zstd levels are -128..22"),
        (["--disk", str(img), "--block-size", "3M"], 2, "not a power of two"),
        (["--disk", str(tmp_path / "none.img")], 5, "cannot open source disk"),
        (["--disk", str(tmp_path / "odd.img")], 5, "not a multiple of 512"),
        (["--disk", str(img), "--vm-config", str(tmp_path / "none.json")], 2,
         "VM configuration: No such file or directory"),
    ]
    for args, code, text in cases:
        _one_line_error(run_cli("backup", "create", *args, "-o", str(out)), code, text)
        assert not out.exists()


def test_san_target_without_its_map_names_the_map_once(backup: Path, tmp_path: Path) -> None:
    m = tmp_path / "none.json"
    r = run_cli("restore-disk", str(backup), "--disk", "0", "--to",
                f"san:{tmp_path / 'lun'}?map={m}", "-q")
    line = _one_line_error(r, 6, "cannot read extent map: No such file or directory")
    assert line.count(str(m)) == 1  # was: "[Errno 2] No such file or directory: '...'" too


def test_restore_json_when_the_job_is_refused_before_it_starts(backup: Path) -> None:
    # was: nothing on stdout, so a script parsing --json output got no document at all
    r = run_cli("restore", "--backup", str(backup), "--network-map", "abc", "--json", "-q")
    _one_line_error(r, 2, "--network-map: expected SRC=DST")
    doc = json.loads(r.stdout)
    assert doc["status"] == "failed" and doc["failed_phase"] == "initialize"
    assert doc["error_type"] == "UsageError" and "SRC=DST" in doc["error"]
