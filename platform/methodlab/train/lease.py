"""The run lease: one submission at a time per run name (and per sweep name).

    with Lease(f"{storage.path}/{run_name}", "run", run_name, cfg.train.lease_timeout_s):
        ...                             # the whole life of the run on this driver

Taking it is an atomic create-if-absent of `lease.json` in the run's storage prefix
(`storage.put_if`), so two submissions racing for one name cannot both win, whichever hosts
they run on. A driver-side thread renews its heartbeat every third of the timeout (never a cost
on the training path); a lease whose heartbeat is older than `train.lease_timeout_s` belongs to
a driver that died without releasing it (SIGKILL, a lost host) and is taken over, atomically
too (replace-if-unchanged), with one line saying whose it was; so is one whose holder was a
process of this host that is gone (no need to wait out the timeout there), or this process's
own, left behind by a release that storage refused.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from methodlab import storage
from methodlab.errors import ConfigError

LEASE_FILE = "lease.json"
_HELD: set[str] = set()     # tokens of the leases this process holds now


def _job_id() -> str:
    """Who submitted it, as far as the environment says: a Ray job, a CI job, or the process."""
    for var in ("RAY_JOB_ID", "RAY_JOB_SUBMISSION_ID", "CI_JOB_ID", "GITHUB_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return f"pid {os.getpid()}"


def _alive(pid) -> bool:
    """Whether process `pid` of this host exists (a driver killed with SIGKILL on this host need
    not wait out the timeout: its resubmission takes the lease at once)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True      # another user's process, or no pid recorded: trust the heartbeat
    return True


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _missing_parents(uri: str) -> list[str]:
    """The folders above the local file `uri` that do not exist yet, deepest first."""
    missing, folder = [], os.path.dirname(os.path.abspath(uri))
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def drop(prefix: str) -> None:
    """Delete the lease in `prefix` on behalf of a holder known to be gone: a sweep's trials once
    Tune has stopped their actors (their heartbeat died with them; on another host than the
    resubmission's the lease would otherwise refuse it for train.lease_timeout_s). Best effort,
    as `release`: with storage away it is taken over once stale."""
    try:
        storage.remove_file(f"{prefix.rstrip('/')}/{LEASE_FILE}")
    except OSError:
        pass


class Lease:
    def __init__(self, prefix: str, what: str, name: str, timeout_s: float, log=print):
        self.uri = f"{prefix.rstrip('/')}/{LEASE_FILE}"
        self.what, self.name, self.timeout_s, self.log = what, name, timeout_s, log
        self.holder = {"owner": getpass.getuser(), "host": socket.gethostname(), "pid": os.getpid(),
                       "job": _job_id(), "token": uuid.uuid4().hex}
        self.tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: list[str] = []

    def _body(self, since: float) -> bytes:
        return json.dumps({**self.holder, "since": since, "heartbeat": time.time()}).encode()

    def acquire(self) -> None:
        """Take the lease or raise ConfigError naming its holder; then start the heartbeat."""
        now = time.time()
        self.since = now
        # Local folders that taking the lease creates: a run refused right after it (the cluster
        # too small, say) must leave no run folder behind, so release removes them while empty.
        self._made = [] if storage.is_s3(self.uri) else _missing_parents(self.uri)
        self.tag = storage.put_if(self.uri, self._body(now))
        while self.tag is None:
            current = storage.read_tagged(self.uri)
            if current is None:                      # released meanwhile: try again
                self.tag = storage.put_if(self.uri, self._body(now))
                continue
            data, tag = current
            held = json.loads(data)
            age = time.time() - float(held.get("heartbeat", 0))
            # Its holder is gone: a dead process of this host, or this very process, whose release
            # failed (storage was away at the end of the run) and which holds it no more.
            gone = held.get("host") == self.holder["host"] and (
                not _alive(held.get("pid")) or (held.get("pid") == os.getpid() and held.get("token") not in _HELD))
            if age <= self.timeout_s and not gone:
                raise ConfigError(
                    f"{self.what} {self.name} is already running: leased by {held.get('owner')}@{held.get('host')} "
                    f"({held.get('job')}) since {_when(float(held.get('since', 0)))}, last heartbeat {age:.0f}s ago "
                    f"({self.uri}); wait for it to end, or train.lease_timeout_s={self.timeout_s:g} after its "
                    "last heartbeat it is taken over")
            self.tag = storage.put_if(self.uri, self._body(now), match=tag)
            if self.tag is None:                     # another submission took it over first
                continue
            why = (f"its process {held.get('pid')} on this host is gone" if gone else
                   f"its last heartbeat was {age:.0f}s ago (over train.lease_timeout_s={self.timeout_s:g})")
            self.log(f"[{self.name}] took over the lease of {held.get('owner')}@{held.get('host')} "
                     f"({held.get('job')}): {why}", flush=True)
        _HELD.add(self.holder["token"])
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 3):
            try:
                tag = storage.put_if(self.uri, self._body(self.since), match=self.tag)
            except Exception as e:  # noqa: BLE001 — a storage hiccup: the next beat tries again
                self.log(f"[{self.name}] lease heartbeat failed ({type(e).__name__}); retrying", flush=True)
                continue
            if tag is None:
                self.log(f"[{self.name}] lost the lease {self.uri}: another submission took it over after "
                         f"a heartbeat gap over train.lease_timeout_s={self.timeout_s:g}", flush=True)
                return
            self.tag = tag

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, if it is still this one. Best effort: with
        storage away it stays, and is taken over once its heartbeat is stale (at once from this
        host when this process is gone or no longer holds it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD.discard(self.holder["token"])
        try:
            current = storage.read_tagged(self.uri)
            if current is not None and json.loads(current[0]).get("token") == self.holder["token"]:
                storage.remove_file(self.uri)
                for folder in self._made:            # deepest first; stops at the first one in use
                    try:
                        os.rmdir(folder)
                    except OSError:
                        break
        except Exception as e:  # noqa: BLE001 — the run's own outcome is what the user needs
            self.log(f"[{self.name}] could not release the lease {self.uri} ({type(e).__name__}); the next "
                     f"submission takes it over", flush=True)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
