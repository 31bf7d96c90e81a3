"""The memory loader's splits, held once per node in Ray's shared-memory object store.

    shared = put_splits(cfg, info, ["train", "val", "test"])   # the driver: Parquet -> object store
    bundle = load_bundle(cfg, info, splits, shared)             # each worker: views, no copies

Why the object store and not memory-mapped files on node-local disk: Ray already keeps one copy
of an object per node that reads it, hands it to every process there as a zero-copy read-only
numpy view, moves it between nodes, spills it when the store fills and frees it when the
driver drops its references (the run ends). Files would need a writer per node, a lock the
other workers wait on, a cache key and someone to delete them afterwards. The budget a run must
fit is then one number Ray knows for every node: its object store (`memory_budget`).

The driver reads and puts one column at a time, so its own heap holds one column of one split
at most, never a whole split; the workers hold none of it privately.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from methodlab import storage
from methodlab.config import RunConfig
from methodlab.data.dataset import DatasetInfo, row_nbytes, split_nbytes, to_numpy

# The default budget (data.memory_budget_mb unset): this share of the smallest node's object
# store; the rest stays for Ray Data's blocks, checkpoints in flight and other runs' objects.
MEMORY_BUDGET_FRACTION = 0.5


def memory_splits(cfg: RunConfig, splits: list[str]) -> list[str]:
    """The splits a worker holds whole: all of them, but train with data.loader=stream (Ray Data
    streams it)."""
    return [s for s in splits if not (s == "train" and cfg.data.loader == "stream")]


def limit_rows(cfg: RunConfig, split: str) -> int | None:
    return cfg.data.limit_rows if split == "train" else None


@dataclass
class SharedSplits:
    """Object refs of every column of the held splits and tables: {split: {column: ref}}. Passed
    to the workers in the train loop config; the driver owns the objects while it holds this."""

    splits: dict[str, dict] = field(default_factory=dict)
    tables: dict[str, dict] = field(default_factory=dict)

    def split(self, name: str) -> dict[str, np.ndarray]:
        """{column: read-only view of the node's shared memory, [rows, ...]}; the first ray.get on
        a node brings the objects there, every later one on that node maps the same pages."""
        import ray

        return dict(zip(self.splits[name], ray.get(list(self.splits[name].values()))))  # [ray]

    def table(self, name: str) -> dict[str, np.ndarray]:
        import ray

        return dict(zip(self.tables[name], ray.get(list(self.tables[name].values()))))  # [ray]


def _put_columns(uri: str, columns: list[str], limit: int | None) -> dict:
    """One Parquet file or directory into the object store, a column at a time."""
    import ray

    fs, path = storage.filesystem(uri)
    refs = {}
    for column in columns:
        table = pq.read_table(path, filesystem=fs, columns=[column])
        if limit:
            table = table.slice(0, limit)
        refs[column] = ray.put(to_numpy(table[column]))  # [ray] copied into shared memory once
        del table
        # Arrow's allocator keeps freed pages for reuse; measured, the driver then held a freed
        # split's worth (bench/memory_loader.py). Given back, the heap copy is gone.
        pa.default_memory_pool().release_unused()
    return refs


def put_splits(cfg: RunConfig, info: DatasetInfo, splits: list[str]) -> SharedSplits:
    """The driver's part: every held split (`memory_splits`) and every table, into Ray's object
    store, in the stored dtypes."""
    return SharedSplits(
        splits={s: _put_columns(info.split_uri(s), list(info.columns), limit_rows(cfg, s))
                for s in memory_splits(cfg, splits)},
        tables={t: _put_columns(info.table_uri(t), list(cols), None) for t, cols in info.tables.items()})


# ----------------------------------------------------------------------------------------------
# The budget


def table_nbytes(info: DatasetInfo, name: str) -> int:
    fs, path = storage.filesystem(info.table_uri(name))
    with fs.open_input_file(path) as f:
        rows = pq.read_metadata(f).num_rows
    return rows * row_nbytes(info.tables[name])


def held_nbytes(cfg: RunConfig, info: DatasetInfo, splits: list[str]) -> int:
    """Bytes the held splits and tables take in memory (from the Parquet footers alone)."""
    row = row_nbytes(info.columns)
    total = sum(table_nbytes(info, t) for t in info.tables)
    for s in memory_splits(cfg, splits):
        limit = limit_rows(cfg, s)
        total += min(split_nbytes(info, s), limit * row) if limit else split_nbytes(info, s)
    return total


def object_store_per_node() -> int:
    """The smallest object store of the cluster's alive nodes, in bytes (Ray must be up)."""
    import ray

    stores = [n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n["Alive"]]  # [ray]
    return int(min(stores))


def memory_budget(cfg: RunConfig) -> tuple[int, str] | None:
    """(bytes per node the held splits may take, how that was set); None when it comes from the
    object store and Ray is not up yet."""
    if cfg.data.memory_budget_mb is not None:
        return cfg.data.memory_budget_mb * 2**20, f"data.memory_budget_mb={cfg.data.memory_budget_mb} per node"
    # Ray cannot be up unless it was imported; not importing it here keeps a local Ray's
    # addresses for `launch.ensure_ray` to choose.
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    store = object_store_per_node()
    return int(store * MEMORY_BUDGET_FRACTION), (f"{MEMORY_BUDGET_FRACTION:.0%} of the {fmt_bytes(store)} "
                                                 "object store per node")


def fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"
