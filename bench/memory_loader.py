"""Per-node resident memory of the memory loader with 2 workers on one node: the splits shared
through Ray's object store (`load_bundle` with `put_splits`, what every Ray Train worker runs)
against the old path, where every worker read every split from Parquet and made it writable
(`np.require(..., ["C", "W"])`: Arrow's buffers copied).

  resident_2workers_shared   node memory the held data takes, shared loader / one copy of it  (goal <= 1.1)
  resident_2workers_copies   the same for the old per-worker copies (about 2 workers x 1 copy)

Dataset: float32 features (N, 1024) + int64 labels, about 600 MB over train/val/test. Each
"worker" is a Ray actor (0.5 CPU) that loads the bundle and holds it. Node memory = the sum of
PSS (proportional set size: a shared page counts once over the processes that map it) of the
driver, the raylet (which holds the object store) and both workers, minus the same sum before
any data was loaded. PSS is what resident memory means on a node where pages are shared; RSS
would count each shared page once per process.

    .venv/bin/python bench/memory_loader.py      # about 1 min on 2 CPU cores
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from common import Figure, write_results  # noqa: E402
import methodlab.methods  # noqa: E402,F401  (fills the registries)
from methodlab.config import load_config  # noqa: E402
from methodlab.data import write_dataset  # noqa: E402

SPLITS = ["train", "val", "test"]
ROWS = {"train": 120_000, "val": 15_000, "test": 15_000}
FEATURES = 1024


def pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def parent_pid(pid: int) -> int:
    """A worker's parent: the raylet of its node (which maps the object store)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def make_dataset(root: str) -> tuple[str, int]:
    rng = np.random.default_rng(0)
    splits = {s: {"features": rng.random((n, FEATURES), dtype=np.float32),
                  "label": rng.integers(0, 10, n, dtype=np.int64)} for s, n in ROWS.items()}
    nbytes = sum(v.nbytes for cols in splits.values() for v in cols.values())
    info = write_dataset(root, "memory_bench", splits, {"num_classes": 10}, rows_per_file=50_000)
    # Writing left Arrow buffers in its pool: given back now, so they neither inflate the
    # baseline nor vanish from it during a measurement.
    pa.default_memory_pool().release_unused()
    return info.uri, nbytes


def measure(mode: str, uri: str) -> dict:
    """Node memory taken once both workers hold the bundle, with `mode` shared or copies."""
    import ray

    from methodlab.data.dataset import open_dataset
    from methodlab.data.shared import put_splits

    @ray.remote(num_cpus=0.5)
    class Worker:
        def pid(self) -> int:
            return os.getpid()

        def load(self, cfg_json: dict, uri: str, shared) -> float:
            import torch

            from methodlab.config import from_dict
            from methodlab.data.dataset import read_split
            from methodlab.train.core import load_bundle

            cfg, info = from_dict(cfg_json), open_dataset(uri)
            if shared is not None:
                self.bundle = load_bundle(cfg, info, SPLITS, shared)
            else:   # the loader before: every worker reads every split and copies it writable
                self.bundle = {s: {k: torch.from_numpy(np.require(v, requirements=["C", "W"]))
                                   for k, v in read_split(info, s).items()} for s in SPLITS}
            # Every page read once, as an epoch would: a mapped page counts only once touched.
            splits = self.bundle.splits.values() if shared is not None else self.bundle.values()
            return sum(float(t.sum()) for split in splits for t in getattr(split, "tensors", split).values())

    cfg = load_config("supervised", None, ["data.loader=memory"])
    workers = [Worker.remote() for _ in range(2)]
    worker_pids = ray.get([w.pid.remote() for w in workers])
    pids = [os.getpid(), parent_pid(worker_pids[0]), *worker_pids]
    before = sum(pss(p) for p in pids)
    t0 = time.perf_counter()
    shared = put_splits(cfg, open_dataset(uri), SPLITS) if mode == "shared" else None
    ray.get([w.load.remote(cfg.model_dump(mode="json"), uri, shared) for w in workers])
    load_s = time.perf_counter() - t0
    after = sum(pss(p) for p in pids)
    for w in workers:
        ray.kill(w)
    del shared
    return {"node_bytes": after - before, "load_s": load_s}


def main() -> None:
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        uri, one_copy = make_dataset(os.path.join(tmp, "ds"))
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=2 * 2**30)
        figures = []
        for mode in ("shared", "copies"):
            m = measure(mode, uri)
            time.sleep(2.0)                  # the killed workers' memory is gone before the next
            figures.append(Figure(f"resident_2workers_{mode}", m["node_bytes"] / one_copy, "one copy of the splits",
                                  {"node_mb": m["node_bytes"] / 2**20, "one_copy_mb": one_copy / 2**20,
                                   "load_s": m["load_s"]}, "<= 1.1" if mode == "shared" else ""))
        ray.shutdown()
    write_results("memory_loader", figures)


if __name__ == "__main__":
    main()
