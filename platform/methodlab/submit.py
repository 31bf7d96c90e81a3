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

from methodlab.errors import ConfigError
from methodlab.provenance import CHECKOUT, provenance

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
