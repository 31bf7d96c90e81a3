"""`methodlab submit`: the config is checked before any job, and the checkout's provenance rides
along as the job's environment (the end-to-end and two-node tests submit through it)."""

from __future__ import annotations

import json
import subprocess

import pytest

from methodlab.cli import main
from methodlab.provenance import COMMIT_ENV, DIRTY_ENV, USER_ENV, provenance
from methodlab.submit import submit_argv

from .conftest import ROOT


def test_provenance_is_the_checkouts_commit_unless_the_job_carries_one(monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    found = provenance()
    assert found[COMMIT_ENV] == head and found[DIRTY_ENV] in ("true", "false")
    monkeypatch.setenv(COMMIT_ENV, "abc123")
    monkeypatch.setenv(DIRTY_ENV, "true")
    monkeypatch.setenv(USER_ENV, "alice")
    assert provenance() == {COMMIT_ENV: "abc123", DIRTY_ENV: "true", USER_ENV: "alice"}


def test_the_user_is_the_login_name_unless_the_job_carries_the_submitters(monkeypatch):
    import getpass

    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.setenv("LOGNAME", "bob")      # getpass.getuser() reads $LOGNAME first
    assert provenance()[USER_ENV] == getpass.getuser() == "bob"
    monkeypatch.setenv(USER_ENV, "alice")     # what `methodlab submit` sent from the submitting side
    assert provenance()[USER_ENV] == "alice"


def test_the_job_gets_the_checkout_and_provenance_merged_into_its_runtime_env(monkeypatch):
    monkeypatch.setenv(COMMIT_ENV, "abc123")
    monkeypatch.setenv(USER_ENV, "alice")
    argv = submit_argv("http://127.0.0.1:8265", "sweep", "supervised", "jobs/sweeps/supervised.yaml", ["name=x"],
                       wait=False, runtime_env={"env_vars": {"A": "1"}, "pip": ["x"]}, submission_id="s1")
    env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert env == {"env_vars": {"A": "1", COMMIT_ENV: "abc123", DIRTY_ENV: "unknown", USER_ENV: "alice"}, "pip": ["x"]}
    assert argv[argv.index("--working-dir") + 1] == str(ROOT)
    assert "--no-wait" in argv and argv[argv.index("--submission-id") + 1] == "s1"
    assert argv[argv.index("--") + 1:] == ["python", "jobs/sweep.py", "supervised", "-c",
                                          "jobs/sweeps/supervised.yaml", "name=x"]


@pytest.mark.parametrize("args, expected", [
    (["train", "supervised", "train.lr=-1"], "error: train.lr: Input should be greater than 0"),
    (["train", "supervised"], "error: submit: no cluster given; pass --address"),
    (["--runtime-env-json", "[1", "train", "supervised"], "error: --runtime-env-json is not JSON"),
    (["--runtime-env-json", "[1]", "train", "supervised"], "error: --runtime-env-json must be a JSON object"),
    (["sweep", "supervised", "search.num_samples=0"], "error: sweep search.num_samples: Input should be greater than 0"),
])
def test_bad_input_is_one_line_before_any_job(args, expected, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = [] if "no cluster" in expected else ["--address", "http://127.0.0.1:1"]
    if "--runtime-env-json" in args:
        args = [*args[:2], *address, *args[2:]]
    else:
        args = [*address, *args]
    assert main(["submit", *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
