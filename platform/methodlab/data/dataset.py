"""The platform's dataset layout: Parquet splits plus a manifest, on local disk or S3.

    <root>/dataset.json                  manifest: columns (dtype, shape), splits, tables, classes
    <root>/<split>/part-00000.parquet    one directory per split (train, val, test, ...)
    <root>/tables/<name>.parquet         side tables (class attributes, ...), read whole

Tensor columns use Arrow's canonical `fixed_shape_tensor` extension type, so an image column is
(N, C, H, W) on disk and converts to a tensor without per-row Python. The schema is checked when a
dataset is opened, from the Parquet footers alone: a missing column, a wrong dtype or a wrong shape
is a DataError naming the file and the column, before any cluster resources are spent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from methodlab import storage
from methodlab.errors import DataError

MANIFEST = "dataset.json"
FORMAT_VERSION = 1


@dataclass
class Column:
    dtype: str                # numpy dtype name: float32, int64, uint8, ...
    shape: list[int] = field(default_factory=list)   # per-row shape; [] for scalars
    # Stored integers that stand for floats (uint8 images): decoded = raw * scale on the device
    # (`data.decode`); mean/std are per channel of the decoded train split, for data.normalize.
    scale: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class DatasetInfo:
    """The manifest of an opened (validated) dataset."""

    uri: str
    name: str
    columns: dict[str, Column]
    splits: list[str]
    tables: dict[str, dict[str, Column]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)   # num_classes, class names, provenance

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def split_uri(self, split: str) -> str:
        return f"{self.uri.rstrip('/')}/{split}"

    def table_uri(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/tables/{name}.parquet"

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "name": self.name, "splits": self.splits,
                "columns": {k: c.to_json() for k, c in self.columns.items()},
                "tables": {t: {k: c.to_json() for k, c in cols.items()} for t, cols in self.tables.items()},
                "meta": self.meta}


# ----------------------------------------------------------------------------------------------
# Arrow <-> numpy, vectorised


def to_arrow(array: np.ndarray) -> pa.Array:
    if array.ndim == 1:
        return pa.array(array)
    # Built from the flat buffer with an explicit shape: from_numpy_ndarray infers a permutation
    # from the strides, which is ambiguous for size-1 dimensions such as a single channel.
    flat = np.ascontiguousarray(array).reshape(len(array), -1)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(array.dtype), list(array.shape[1:]))
    return pa.ExtensionArray.from_storage(tensor_type, storage)


def to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()   # zero-copy view of the flat buffer
    return column.to_numpy(zero_copy_only=False)


def _column_of(arrow_type: pa.DataType) -> Column:
    if isinstance(arrow_type, pa.FixedShapeTensorType):
        return Column(arrow_type.value_type.to_pandas_dtype().__name__, list(arrow_type.shape))
    if pa.types.is_fixed_size_list(arrow_type):
        return Column(arrow_type.value_type.to_pandas_dtype().__name__, [arrow_type.list_size])
    return Column(np.dtype(arrow_type.to_pandas_dtype()).name, [])


def channel_stats(raw: np.ndarray, scale: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the decoded values of `raw` (N, C, ...), in float64, one
    channel at a time (never a float copy of the whole split)."""
    means, stds = [], []
    for c in range(raw.shape[1]):
        x = raw[:, c].astype(np.float64) * scale
        means.append(float(x.mean()))
        stds.append(float(x.std()) or 1.0)       # a constant channel is left unscaled
    return means, stds


# ----------------------------------------------------------------------------------------------
# Writing (atomic for local roots: a temp directory renamed into place)


def write_dataset(root: str, name: str, splits: dict[str, dict[str, np.ndarray]],
                  meta: dict[str, Any], tables: dict[str, dict[str, np.ndarray]] | None = None,
                  rows_per_file: int = 1_000_000, scales: dict[str, float] | None = None) -> DatasetInfo:
    """`scales`: columns stored as integers standing for floats, e.g. {"image": 1/255} for uint8
    images; their per-channel stats come from the train split (or the first)."""
    tables = tables or {}
    scales = scales or {}
    first = next(iter(splits.values()))
    columns = {k: Column(v.dtype.name, list(v.shape[1:])) for k, v in first.items()}
    for column, scale in scales.items():
        if np.dtype(columns[column].dtype).kind not in "ui":
            raise DataError(f"dataset {name}: column {column!r} has a scale but holds {columns[column].dtype}, "
                            "not integers; store it as uint8")
        mean, std = channel_stats(splits.get("train", first)[column], scale)
        columns[column] = Column(columns[column].dtype, columns[column].shape, scale, mean, std)
    for split, cols in splits.items():
        n = {len(v) for v in cols.values()}
        if len(n) != 1:
            raise DataError(f"dataset {name}: split {split!r} has columns of different lengths {sorted(n)}")
        if {k: (v.dtype.name, list(v.shape[1:])) for k, v in cols.items()} != \
                {k: (c.dtype, c.shape) for k, c in columns.items()}:
            raise DataError(f"dataset {name}: split {split!r} has a different schema from the first split")
    info = DatasetInfo(uri=root, name=name, columns=columns, splits=list(splits),
                       tables={t: {k: Column(v.dtype.name, list(v.shape[1:]),
                                             *((columns[k].scale, columns[k].mean, columns[k].std)
                                               if k in scales else ())) for k, v in cols.items()}
                               for t, cols in tables.items()}, meta=meta)

    local = not storage.is_s3(root)
    stage_dir = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(root))) if local \
        else tempfile.mkdtemp(prefix="methodlab-dataset-")
    try:
        for split, cols in splits.items():
            os.makedirs(f"{stage_dir}/{split}")
            n = len(next(iter(cols.values())))
            for i, start in enumerate(range(0, max(n, 1), rows_per_file)):
                part = pa.table({k: to_arrow(v[start:start + rows_per_file]) for k, v in cols.items()})
                pq.write_table(part, f"{stage_dir}/{split}/part-{i:05d}.parquet")
        if tables:
            os.makedirs(f"{stage_dir}/tables")
        for t, cols in tables.items():
            pq.write_table(pa.table({k: to_arrow(v) for k, v in cols.items()}), f"{stage_dir}/tables/{t}.parquet")
        with open(f"{stage_dir}/{MANIFEST}", "w") as f:  # written last: its presence marks a whole dataset
            json.dump(info.to_json(), f, indent=1)
        if local:
            if os.path.exists(root):
                shutil.rmtree(root)
            os.replace(stage_dir, root)
        else:
            storage.upload_dir(stage_dir, root)
    finally:
        if os.path.exists(stage_dir):
            shutil.rmtree(stage_dir)
    return open_dataset(root)


# ----------------------------------------------------------------------------------------------
# Opening and validating


def open_dataset(uri: str) -> DatasetInfo:
    """Read the manifest and check every Parquet footer against it. Raises DataError."""
    fs, root = storage.filesystem(uri)
    manifest_path = f"{root}/{MANIFEST}"
    if not storage.exists(uri):
        raise DataError(f"dataset {uri} does not exist; run `methodlab data prepare` or fix data.dataset")
    try:
        with fs.open_input_stream(manifest_path) as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(f"dataset {uri} has no {MANIFEST}; write it with `methodlab data import` "
                        "or methodlab.data.write_dataset") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{uri}/{MANIFEST} is not valid JSON; re-create the dataset") from None
    try:
        info = DatasetInfo(uri=uri, name=raw["name"], splits=list(raw["splits"]),
                           columns={k: Column(**c) for k, c in raw["columns"].items()},
                           tables={t: {k: Column(**c) for k, c in cols.items()}
                                   for t, cols in raw.get("tables", {}).items()},
                           meta=raw.get("meta", {}))
    except (KeyError, TypeError) as e:
        raise DataError(f"{uri}/{MANIFEST} lacks field {e}; re-create the dataset") from None
    for split in info.splits:
        files = _parquet_files(f"{root}/{split}", uri, split)
        for path in files:
            _check_schema(fs, path, info.columns, f"{uri}/{split}/{os.path.basename(path)}")
    for t, cols in info.tables.items():
        _check_schema(fs, f"{root}/tables/{t}.parquet", cols, info.table_uri(t))
    return info


def _parquet_files(path: str, uri: str, split: str) -> list[str]:
    files = [f"{path}/{name}" for name, is_dir in storage.listdir(f"{uri.rstrip('/')}/{split}")
             if not is_dir and name.endswith(".parquet")]
    if not files:
        raise DataError(f"dataset {uri}: split {split!r} has no Parquet files under {uri}/{split}")
    return files


def _check_schema(fs, path: str, expected: dict[str, Column], shown: str) -> None:
    try:
        with fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
    except FileNotFoundError:
        raise DataError(f"{shown} is missing; re-create the dataset") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{shown} is not a readable Parquet file ({str(e).splitlines()[0][:80]}); "
                        "re-create or re-upload it") from None
    for name, col in expected.items():
        if name not in schema.names:
            raise DataError(f"{shown}: missing column {name!r} (has {', '.join(schema.names)})")
        got = _column_of(schema.field(name).type)
        if got.dtype != col.dtype:
            raise DataError(f"{shown}: column {name!r} has dtype {got.dtype}, expected {col.dtype} "
                            f"({MANIFEST} and the file disagree); re-create the dataset")
        if list(got.shape) != list(col.shape):
            raise DataError(f"{shown}: column {name!r} has shape {got.shape}, expected {col.shape}")


def split_nbytes(info: DatasetInfo, split: str) -> int:
    """In-memory size of a split: rows from the Parquet footers times the manifest's row size."""
    fs, root = storage.filesystem(info.split_uri(split))
    rows = 0
    for path in _parquet_files(root, info.uri, split):
        with fs.open_input_file(path) as f:
            rows += pq.read_metadata(f).num_rows
    row_bytes = sum(np.dtype(c.dtype).itemsize * int(np.prod(c.shape, dtype=np.int64)) for c in info.columns.values())
    return rows * row_bytes


def read_table(info: DatasetInfo, name: str) -> dict[str, np.ndarray]:
    """A side table, read whole into numpy arrays."""
    fs, path = storage.filesystem(info.table_uri(name))
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    return {k: to_numpy(table[k]) for k in table.column_names}


def read_split(info: DatasetInfo, split: str, limit_rows: int | None = None) -> dict[str, np.ndarray]:
    """A whole split with pyarrow (driver-side tools, tests). Workers read through Ray Data."""
    fs, root = storage.filesystem(info.split_uri(split))
    table = pq.read_table(root, filesystem=fs)
    if limit_rows:
        table = table.slice(0, limit_rows)
    return {k: to_numpy(table[k]) for k in info.columns}
