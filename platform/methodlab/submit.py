"""`methodlab submit`: a `train` or `sweep` as a Ray job of a running cluster, from a checkout.

    methodlab submit --address http://127.0.0.1:8265 train supervised -c jobs/configs/supervised.yaml \
        storage.path=s3://methodlab/runs tracking.uri=http://127.0.0.1:5000

is `ray job submit --working-dir <checkout> -- python jobs/train.py supervised ...` with two
additions: the config is resolved here first (a bad key is one line before the cluster is asked
for anything), and the checkout's git commit and dirty flag travel with the job as environment
variables, which `tracking.provenance_tags` reads on the cluster (the working dir upload leaves .git
out, so the driver could not ask git itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from methodlab.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parents[2]      # platform/methodlab/submit.py -> the repo
COMMIT_ENV, DIRTY_ENV = "METHODLAB_GIT_COMMIT", "METHODLAB_GIT_DIRTY"


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance() -> dict[str, str]:
    """The commit the code comes from and whether tracked files differ from it: the environment
    variables a job carries, or what this process computes itself when they are absent."""
    if os.environ.get(COMMIT_ENV):
        return {COMMIT_ENV: os.environ[COMMIT_ENV], DIRTY_ENV: os.environ.get(DIRTY_ENV, "unknown")}
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {COMMIT_ENV: "unknown", DIRTY_ENV: "unknown"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {COMMIT_ENV: commit, DIRTY_ENV: "unknown" if status is None else str(bool(status)).lower()}


def submit_argv(address: str, command: str, method: str, config: str | None, overrides: list[str],
                wait: bool, runtime_env: dict | None = None, submission_id: str | None = None) -> list[str]:
    """The `ray job submit` command line for `methodlab <command> <method> ...` on the cluster."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), **provenance()}
    return [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
            "--working-dir", str(CHECKOUT), "--runtime-env-json", json.dumps(env),
            *(["--submission-id", submission_id] if submission_id else []), *([] if wait else ["--no-wait"]),
            "--", "python", f"jobs/{command}.py", method, *(["-c", config] if config else []), *overrides]


def submit(address: str | None, command: str, method: str, config: str | None, overrides: list[str],
           wait: bool = True, runtime_env_json: str | None = None, submission_id: str | None = None) -> int:
    from methodlab.config import load_config
    from methodlab.sweep import load_spec

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("submit: no cluster given; pass --address http://<head>:8265 (the Ray job server) "
                          "or set RAY_ADDRESS")
    if not (CHECKOUT / "jobs" / f"{command}.py").exists():
        raise ConfigError(f"submit: {CHECKOUT} is not a methodlab checkout (no jobs/{command}.py); run it from one")
    try:
        runtime_env = json.loads(runtime_env_json) if runtime_env_json else None
    except ValueError as e:
        raise ConfigError(f"--runtime-env-json is not JSON ({e})") from None
    if runtime_env is not None and not isinstance(runtime_env, dict):
        raise ConfigError("--runtime-env-json must be a JSON object, e.g. '{\"env_vars\": {\"K\": \"V\"}}'")
    # Resolved here, so that bad input costs no job: the same layers the driver will merge.
    if command == "train":
        load_config(method, config, [o for o in overrides if o != "resume"])
    else:
        load_spec(method, config, overrides)
    return subprocess.run(submit_argv(address, command, method, config, overrides, wait, runtime_env,
                                      submission_id)).returncode
