"""Checkpoint integrity: every checkpoint carries a manifest of its files, and a resume checks the
run's checkpoints against Ray's own list of them before any worker starts.

    write_manifest(directory)        # rank 0, after the checkpoint's files, before Ray uploads it
    repair(run_dir, num_to_keep)     # the driver, with the run's lease held (`train.lease`)

Ray Train keeps the list of a run's checkpoints in `checkpoint_manager_snapshot.json` in the run
directory, and resumes from its `latest_checkpoint_result`. A truncated latest checkpoint would
fail every resume inside the workers; removing its folder would fail Ray's own start-up (a
snapshot naming a folder that is gone). So `repair` moves a bad checkpoint aside and rewrites
the snapshot without it, making the newest valid checkpoint the latest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from methodlab import storage

MANIFEST_FILE = "manifest.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"   # [ray] Ray Train's list of the run's checkpoints
CHECKPOINT_PREFIX = "checkpoint_"                     # [ray] Ray's checkpoint folder names
SET_ASIDE = "corrupt"                                 # where bad checkpoints are moved (never deleted)


def write_manifest(directory: str | Path) -> None:
    """Sizes and sha256 of every file in the checkpoint directory. Written last (and atomically):
    a checkpoint without it, or whose files differ from it, is partial or corrupt."""
    directory = Path(directory)
    files = {p.name: dict(zip(("size", "sha256"), storage.digest(str(p))))
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    partial = directory / (MANIFEST_FILE + ".partial")
    partial.write_text(json.dumps({"files": files}, indent=1))
    os.replace(partial, directory / MANIFEST_FILE)


def problem(checkpoint_uri: str) -> str | None:
    """What is wrong with a stored checkpoint (a local directory or an S3 prefix), or None."""
    try:
        manifest = json.loads(storage.read_bytes(f"{checkpoint_uri}/{MANIFEST_FILE}"))
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (partial)"
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST_FILE} ({type(e).__name__})"
    for name, want in manifest.get("files", {}).items():
        try:
            size, sha = storage.digest(f"{checkpoint_uri}/{name}")
        except (FileNotFoundError, OSError):
            return f"{name} is missing"
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']}"
        if sha != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def repair(run_dir: str, num_to_keep: int, log=print) -> None:
    """Make the run directory `run_dir` safe to resume: walk Ray's checkpoints from the latest
    back, moving each bad one aside to `run_dir/corrupt/` (one line each) until a valid one is the
    latest, and rewrite Ray's snapshot to match; then delete the checkpoint folders Ray no longer
    lists (uploads cut short by a crash, or kept past `train.num_to_keep`), which Ray would never
    use nor delete. Needs the run's lease: another submission's uploads would look orphaned."""
    snap = _snapshot(run_dir)
    if snap is None:
        return
    # [ray] the snapshot's fields: checkpoint_results (each {checkpoint_dir_name, metrics}),
    # checkpoint_report_indices (parallel to it), latest_checkpoint_result, pending results.
    results = snap["checkpoint_results"]
    order = sorted(range(len(results)), key=lambda i: snap["checkpoint_report_indices"][i], reverse=True)
    bad: set[str] = set()
    for i in order:
        name = results[i]["checkpoint_dir_name"]
        why = problem(f"{run_dir}/{name}")
        if why is None:
            break
        if storage.exists(f"{run_dir}/{name}"):
            storage.replace_dir(f"{run_dir}/{name}", f"{run_dir}/{SET_ASIDE}/{name}")
        log(f"checkpoint {run_dir}/{name} is unusable: {why}; moved to {run_dir}/{SET_ASIDE}/{name}, "
            "resuming from the one before it")
        bad.add(name)
    if bad:
        kept = [i for i in range(len(results)) if results[i]["checkpoint_dir_name"] not in bad]
        latest = max(kept, key=lambda i: snap["checkpoint_report_indices"][i], default=None)
        snap["checkpoint_results"] = [results[i] for i in kept]
        snap["checkpoint_report_indices"] = [snap["checkpoint_report_indices"][i] for i in kept]
        snap["latest_checkpoint_result"] = results[latest] if latest is not None else None
        pending = [(r, v) for r, v in zip(snap["pending_training_results"], snap["pending_validation_specs"])
                   if r["checkpoint_dir_name"] not in bad]
        snap["pending_training_results"] = [r for r, _ in pending]
        snap["pending_validation_specs"] = [v for _, v in pending]
        for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                    "failed_validation_checkpoint_dir_names"):
            snap[key] = [n for n in snap.get(key, []) if n not in bad]
        storage.write_bytes(f"{run_dir}/{SNAPSHOT_FILE}", json.dumps(snap).encode())
    listed = {r["checkpoint_dir_name"] for r in snap["checkpoint_results"]}
    orphans = [n for n, is_dir in storage.listdir(run_dir)
               if is_dir and n.startswith(CHECKPOINT_PREFIX) and n not in listed]
    for name in orphans:
        storage.remove_dir(f"{run_dir}/{name}")
    if orphans:
        log(f"removed {len(orphans)} checkpoint folder(s) of {run_dir} that Ray no longer lists "
            f"(partial uploads, or beyond train.num_to_keep={num_to_keep}): {', '.join(orphans)}")


def latest(run_dir: str) -> str | None:
    """The checkpoint a resume of the run starts from (Ray's latest), or None."""
    found = (_snapshot(run_dir) or {}).get("latest_checkpoint_result")
    return f"{run_dir}/{found['checkpoint_dir_name']}" if found else None


def _snapshot(run_dir: str) -> dict | None:
    """Ray's snapshot of the run's checkpoints, or None before its first checkpoint."""
    uri = f"{run_dir}/{SNAPSHOT_FILE}"
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
