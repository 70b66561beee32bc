"""Unit tests of the repository form of a restore job: validation and the state dir."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vmrestore.commands import restore as restore_cmd
from vmrestore.errors import UsageError
from vmrestore.job import from_args, load_job_file
from vmrestore.jobstate import job_id, state_dir_for

URL = "repo://10.0.0.5:7710/web01/inc1.vmrb"


def parse(*argv: str):
    p = argparse.ArgumentParser()
    restore_cmd.register(p.add_subparsers())
    return from_args(p.parse_args(["restore", *argv]))


def test_repository_option() -> None:
    j = parse("--repository", URL, "--token-file", "/t")
    assert j.repository == URL and j.backup is None and j.token_file == "/t"
    assert "token_file" not in j.identity()  # where the token is kept is not the job


@pytest.mark.parametrize("argv, msg", [
    (["--repository", URL, "--backup", "b.vmrb"], "exactly one"),
    (["--repository", "/srv/b.vmrb"], "not a repo://"),
    (["--backup", "b.vmrb", "--token-file", "/t"], "only with 'repository'"),
    ([], "--repository"),
])
def test_repository_refusals(argv: list[str], msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        parse(*argv)


def test_job_file_repository(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(f"version: 1\nrepository: {URL}\ntoken_file: agent.token\nname: w\n")
    j = load_job_file(f)
    assert j.repository == URL and j.token_file == str(tmp_path / "agent.token")


def test_state_dir_of_a_repository_job(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("VMRESTORE_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    j = parse("--repository", URL)
    a, b = state_dir_for(j, "aa" * 16), state_dir_for(j, "bb" * 16)
    assert a.parent == tmp_path / "vmrestore" and a.name.startswith("repo-")
    assert a != b and a == state_dir_for(parse("--repository", URL), "aa" * 16)
    assert job_id(j, "vm") == job_id(parse("--repository", URL), "vm")
    monkeypatch.setenv("VMRESTORE_STATE_DIR", str(tmp_path / "s"))
    assert state_dir_for(j, "aa" * 16) == tmp_path / "s"
