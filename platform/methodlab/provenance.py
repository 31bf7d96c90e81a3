"""Where the running code comes from: the git commit of its checkout and whether tracked files
differ from it. A job's working dir has no .git (the upload leaves it out), so `methodlab submit`
computes these on the submitting side and sends them as environment variables, which win here.
So it does with the submitting user's login name (the driver of a job runs as the cluster's user)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]      # platform/methodlab/provenance.py -> the repo
COMMIT_ENV, DIRTY_ENV, USER_ENV = "METHODLAB_GIT_COMMIT", "METHODLAB_GIT_DIRTY", "METHODLAB_USER"


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance() -> dict[str, str]:
    """The commit the code comes from, whether tracked files differ from it, and who runs it: the
    environment variables a job carries, or what this process computes itself when they are absent."""
    return {**_code(), USER_ENV: os.environ.get(USER_ENV) or _login()}


def _code() -> dict[str, str]:
    if os.environ.get(COMMIT_ENV):
        return {COMMIT_ENV: os.environ[COMMIT_ENV], DIRTY_ENV: os.environ.get(DIRTY_ENV, "unknown")}
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {COMMIT_ENV: "unknown", DIRTY_ENV: "unknown"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {COMMIT_ENV: commit, DIRTY_ENV: "unknown" if status is None else str(bool(status)).lower()}


def _login() -> str:
    """This process's login name (getpass: $LOGNAME/$USER, else the password database)."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):      # a container's uid with no passwd entry and no $USER
        return "unknown"
