"""The platform's dataset layout: Parquet splits plus a manifest, on local disk or S3.

    <root>/dataset.json                  manifest: columns (dtype, shape), splits, tables, classes
    <root>/<split>/part-00000.parquet    one directory per split (train, val, test, ...)
    <root>/tables/<name>.parquet         side tables (class attributes, ...), read whole

Tensor columns use Arrow's canonical `fixed_shape_tensor` extension type, so an image column is
(N, C, H, W) on disk and converts to a tensor without per-row Python. The schema is checked when a
dataset is opened, from the Parquet footers alone: a missing column, a wrong dtype or a wrong shape
is a DataError naming the file and the column, before any cluster resources are spent. What the
columns hold (label range, nulls, NaN/inf) is read from the footers' statistics too
(`column_ranges`), for the driver's preflight.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
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
# Writing: streamed into a staging directory next to the root, moved into place, manifest last


def _arrow_type(col: Column) -> pa.DataType:
    value = pa.from_numpy_dtype(np.dtype(col.dtype))
    return pa.fixed_shape_tensor(value, col.shape) if col.shape else value


class DatasetWriter:
    """Writes a dataset split by split without holding it: each `append` goes straight to the
    split's current part file (one row group per append), a new file starts every `rows_per_file`
    rows, and the manifest is written last, on leaving the `with` block without an error.

        with DatasetWriter(root, name, {"image": Column("uint8", [3, 32, 32], 1 / 255),
                                        "label": Column("int64")}, ["train", "val", "test"]) as w:
            w.append("train", {"image": x, "label": y})     # as often as needed, any split
            w.meta["num_classes"] = 10                     # meta may be filled until the end
        info = open_dataset(root)

    Parts go to `<parent>/.tmp-<name>-<hex>` (local or S3) and replace `root` only when complete;
    an error inside the block deletes them, so a failed write leaves nothing, and a dataset whose
    manifest is missing does not open. Row-group bound: the size of one `append`.
    """

    def __init__(self, root: str, name: str, columns: dict[str, Column], splits: list[str],
                 meta: dict[str, Any] | None = None, rows_per_file: int = 1_000_000):
        self.root, self.name, self.columns, self.splits = root.rstrip("/"), name, columns, list(splits)
        self.meta = dict(meta or {})
        self.rows_per_file = rows_per_file
        self.tables: dict[str, dict[str, Column]] = {}
        self.rows = dict.fromkeys(self.splits, 0)
        self._schema = pa.schema([(k, _arrow_type(c)) for k, c in columns.items()])
        parent, base = self.root.rsplit("/", 1) if "/" in self.root else (".", self.root)
        self._stage = f"{parent}/.tmp-{base}-{uuid.uuid4().hex[:8]}"
        self._open: dict[str, tuple[Any, pq.ParquetWriter, int]] = {}   # split -> (stream, writer, rows)
        self._files = dict.fromkeys(self.splits, 0)
        # split -> {float column: NaN count} of the part being written, for its footer (`NAN_COUNT_KEY`)
        self._nans: dict[str, dict[str, int]] = {}

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._commit()
            return
        for stream, writer, _ in self._open.values():
            try:
                writer.close()
                stream.close()
            except (OSError, pa.ArrowException):
                pass   # the error being raised is the one to report
        storage.remove_dir(self._stage)

    def append(self, split: str, cols: dict[str, np.ndarray]) -> None:
        if split not in self.rows:
            raise DataError(f"dataset {self.name}: split {split!r} is not one of {self.splits}")
        n = {len(v) for v in cols.values()}
        if len(n) != 1:
            raise DataError(f"dataset {self.name}: split {split!r} has columns of different lengths {sorted(n)}")
        got = {k: (v.dtype.name, list(v.shape[1:])) for k, v in cols.items()}
        if got != {k: (c.dtype, c.shape) for k, c in self.columns.items()}:
            raise DataError(f"dataset {self.name}: split {split!r} has columns {got}, expected "
                            f"{ {k: (c.dtype, c.shape) for k, c in self.columns.items()} }")
        start, total = 0, n.pop()
        while start < total:
            stream, writer, rows = self._open.get(split) or self._new_part(split)
            take = min(total - start, self.rows_per_file - rows)
            writer.write_table(pa.Table.from_arrays([to_arrow(cols[k][start:start + take]) for k in self.columns],
                                                    schema=self._schema))
            nans = self._nans.setdefault(split, dict.fromkeys(_float_columns(self.columns), 0))
            for k in nans:
                nans[k] += int(np.isnan(cols[k][start:start + take]).sum())
            start, rows = start + take, rows + take
            self._open[split] = (stream, writer, rows)
            if rows == self.rows_per_file:
                self._close_part(split)
        self.rows[split] += total

    def write_table(self, name: str, cols: dict[str, np.ndarray]) -> None:
        """A side table, written whole (class attributes and the like are small)."""
        # A table column named like a scaled split column (TOAST's source images) decodes like it.
        self.tables[name] = {k: Column(v.dtype.name, list(v.shape[1:]), *(
            (self.columns[k].scale, self.columns[k].mean, self.columns[k].std)
            if k in self.columns and self.columns[k].scale is not None and v.dtype.name == self.columns[k].dtype
            else ())) for k, v in cols.items()}
        with storage.open_output(f"{self._stage}/tables/{name}.parquet") as f:
            pq.write_table(pa.table({k: to_arrow(v) for k, v in cols.items()}), f)

    def _new_part(self, split: str) -> tuple[Any, pq.ParquetWriter, int]:
        stream = storage.open_output(f"{self._stage}/{split}/part-{self._files[split]:05d}.parquet")
        self._files[split] += 1
        return stream, pq.ParquetWriter(stream, self._schema), 0

    def _close_part(self, split: str) -> None:
        stream, writer, _ = self._open.pop(split)
        nans = self._nans.pop(split, dict.fromkeys(_float_columns(self.columns), 0))
        writer.add_key_value_metadata({NAN_COUNT_KEY: json.dumps(nans)})
        writer.close()
        stream.close()

    def _commit(self) -> None:
        for split in self.splits:
            if not self._files[split]:     # an empty split still has a (row-less) file to open
                self._open[split] = self._new_part(split)
            if split in self._open:
                self._close_part(split)
        info = DatasetInfo(uri=self.root, name=self.name, columns=self.columns, splits=self.splits,
                           tables=self.tables, meta=self.meta)
        storage.replace_dir(self._stage, self.root)
        # Written last, after the parts are in place: its presence marks a whole dataset.
        storage.write_bytes(f"{self.root}/{MANIFEST}", json.dumps(info.to_json(), indent=1).encode())


def write_dataset(root: str, name: str, splits: dict[str, dict[str, np.ndarray]],
                  meta: dict[str, Any], tables: dict[str, dict[str, np.ndarray]] | None = None,
                  rows_per_file: int = 1_000_000, scales: dict[str, float] | None = None) -> DatasetInfo:
    """Arrays already in memory, written in one go through DatasetWriter. `scales`: columns
    stored as integers standing for floats, e.g. {"image": 1/255} for uint8 images; their
    per-channel stats come from the train split (or the first)."""
    first = next(iter(splits.values()))
    columns = {k: Column(v.dtype.name, list(v.shape[1:])) for k, v in first.items()}
    for column, scale in (scales or {}).items():
        if np.dtype(columns[column].dtype).kind not in "ui":
            raise DataError(f"dataset {name}: column {column!r} has a scale but holds {columns[column].dtype}, "
                            "not integers; store it as uint8")
        mean, std = channel_stats(splits.get("train", first)[column], scale)
        columns[column] = Column(columns[column].dtype, columns[column].shape, scale, mean, std)
    with DatasetWriter(root, name, columns, list(splits), meta, rows_per_file) as w:
        for split, cols in splits.items():
            w.append(split, cols)
        for t, cols in (tables or {}).items():
            w.write_table(t, cols)
    return open_dataset(root)


# ----------------------------------------------------------------------------------------------
# Opening and validating


def open_dataset(uri: str) -> DatasetInfo:
    """Read the manifest and check every Parquet footer against it. Raises DataError."""
    fs, root = storage.filesystem(uri)
    manifest_path = f"{root}/{MANIFEST}"
    try:
        kind = fs.get_file_info(root).type
    except OSError as e:      # pyarrow's S3 errors: endpoint down, no such bucket, access denied
        raise DataError(f"dataset {uri} cannot be read ({str(e).splitlines()[0][:160]}); check the bucket "
                        "and storage.endpoint_url / AWS_ENDPOINT_URL") from None
    if kind == pafs.FileType.NotFound:
        raise DataError(f"dataset {uri} does not exist; run `methodlab data prepare` or fix data.dataset")
    if kind == pafs.FileType.File:
        raise DataError(f"dataset {uri} is a file, not a dataset directory; point data.dataset at the "
                        f"directory that holds {MANIFEST}")
    try:
        with fs.open_input_stream(manifest_path) as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(f"dataset {uri} has no {MANIFEST}; write it with `methodlab data import` "
                        "or methodlab.data.write_dataset") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{uri}/{MANIFEST} is not valid JSON; re-create the dataset") from None
    info = _manifest(uri, raw)
    for split in info.splits:
        files = _parquet_files(f"{root}/{split}", uri, split)
        for path in files:
            _check_schema(fs, path, info.columns, f"{uri}/{split}/{os.path.basename(path)}")
    for t, cols in info.tables.items():
        _check_schema(fs, f"{root}/tables/{t}.parquet", cols, info.table_uri(t))
    return info


def _manifest(uri: str, raw: Any) -> DatasetInfo:
    """The manifest's JSON as a DatasetInfo; DataError naming the field that has the wrong form."""
    shown = f"{uri}/{MANIFEST}"

    def mapping(value: Any, what: str) -> dict:
        if not isinstance(value, dict):
            raise DataError(f"{shown}: {what} must be a JSON object, not {type(value).__name__}; "
                            "re-create the dataset")
        return value

    def columns(value: Any, what: str) -> dict[str, Column]:
        out = {}
        for k, c in mapping(value, what).items():
            spec = mapping(c, f"{what}[{k!r}]")
            try:
                out[k] = Column(**spec)
                np.dtype(out[k].dtype)
            except TypeError as e:
                raise DataError(f"{shown}: {what}[{k!r}] is not {{dtype, shape}} ({e}); re-create the dataset") from None
        return out

    mapping(raw, "the manifest")
    missing = [k for k in ("name", "splits", "columns") if k not in raw]
    if missing:
        raise DataError(f"{shown} lacks field {missing[0]!r}; re-create the dataset")
    if not isinstance(raw["splits"], list) or not all(isinstance(x, str) for x in raw["splits"]):
        raise DataError(f"{shown}: 'splits' must be a list of split names; re-create the dataset")
    return DatasetInfo(uri=uri, name=str(raw["name"]), splits=list(raw["splits"]),
                       columns=columns(raw["columns"], "'columns'"),
                       tables={t: columns(cols, f"'tables'[{t!r}]")
                               for t, cols in mapping(raw.get("tables", {}), "'tables'").items()},
                       meta=mapping(raw.get("meta", {}), "'meta'"))


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


def row_nbytes(columns: dict[str, Column]) -> int:
    """Bytes one row of `columns` takes in memory, as stored."""
    return sum(np.dtype(c.dtype).itemsize * int(np.prod(c.shape, dtype=np.int64)) for c in columns.values())


def split_rows(info: DatasetInfo, split: str) -> int:
    """Rows of a split, from the Parquet footers alone."""
    fs, root = storage.filesystem(info.split_uri(split))
    rows = 0
    for path in _parquet_files(root, info.uri, split):
        with fs.open_input_file(path) as f:
            rows += pq.read_metadata(f).num_rows
    return rows


# Parquet statistics leave NaN out of min/max (and pyarrow writes no NaN count), so DatasetWriter
# counts the NaN of each float column into the file's footer, as key-value metadata: {column:
# count}. A file without it (written by another tool) has its float columns read instead.
NAN_COUNT_KEY = "methodlab.nan_count"
# What `column_ranges` reads (a column without statistics, or for NaN) it streams in batches of
# at most this many bytes: memory stays bounded and the whole column is looked at.
SCAN_BATCH_BYTES = 64 * 2**20


def _float_columns(columns: dict[str, Column]) -> list[str]:
    return [k for k, c in columns.items() if np.dtype(c.dtype).kind == "f"]


@dataclass
class ColumnRange:
    """A column's values over a split: min and max (None when it has no non-null values), how
    many are null, and whether a NaN was seen in the scanned part (float columns)."""

    min: float | None = None
    max: float | None = None
    nulls: int = 0
    nan: bool = False


def column_ranges(info: DatasetInfo, split: str, names: list[str],
                  batch_bytes: int = SCAN_BATCH_BYTES) -> dict[str, ColumnRange]:
    """The `ColumnRange` of each named column over a split, from the Parquet footers: min, max
    and nulls from the row-group statistics, NaN from the counts DatasetWriter puts in each file's
    footer (`NAN_COUNT_KEY`). What a footer does not say (a row group without statistics for a
    column, NaN in a float column of a file another tool wrote) is read, the whole column,
    streamed in batches of at most `batch_bytes`."""
    fs, root = storage.filesystem(info.split_uri(split))
    out = {n: ColumnRange() for n in names}
    for path in _parquet_files(root, info.uri, split):
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            meta = pf.metadata
            counted = json.loads((meta.metadata or {}).get(NAN_COUNT_KEY.encode(), b"{}"))
            for name in out.keys() & counted.keys():
                out[name].nan |= counted[name] > 0
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for j in range(group.num_columns):
                    chunk = group.column(j)
                    name = chunk.path_in_schema.split(".")[0]
                    if name not in out:
                        continue
                    float_column = np.dtype(info.columns[name].dtype).kind == "f"
                    stats = chunk.statistics
                    has_stats = stats is not None and stats.has_min_max
                    if has_stats:
                        _widen(out[name], stats.min, stats.max)
                        out[name].nulls += stats.null_count or 0
                    if not has_stats or (float_column and name not in counted):
                        _scan(pf, g, name, info.columns[name], out[name], not has_stats, batch_bytes)
    return out


def _scan(pf: pq.ParquetFile, group: int, name: str, column: Column, r: ColumnRange, count: bool,
          batch_bytes: int) -> None:
    """Read column `name` of row group `group` into `r` (NaN; with `count`, also min/max and
    nulls), at most `batch_bytes` of it at a time."""
    row = int(np.prod(column.shape, dtype=np.int64)) * np.dtype(column.dtype).itemsize
    for batch in pf.iter_batches(batch_size=max(1, batch_bytes // max(1, row)), row_groups=[group], columns=[name]):
        part = batch.column(0)
        values = to_numpy(part.drop_null())
        if np.dtype(column.dtype).kind == "f":
            r.nan |= bool(np.isnan(values).any())
            values = values[~np.isnan(values)]
        if count:
            r.nulls += part.null_count
            if values.size:
                _widen(r, values.min(), values.max())


def _widen(r: ColumnRange, lo, hi) -> None:
    r.min = lo if r.min is None else min(r.min, lo)
    r.max = hi if r.max is None else max(r.max, hi)


def split_nbytes(info: DatasetInfo, split: str) -> int:
    """In-memory size of a split: its rows times the manifest's row size."""
    return split_rows(info, split) * row_nbytes(info.columns)


def read_table(info: DatasetInfo, name: str) -> dict[str, np.ndarray]:
    """A side table, read whole into numpy arrays."""
    fs, path = storage.filesystem(info.table_uri(name))
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    return {k: to_numpy(table[k]) for k in table.column_names}


def head_rows(info: DatasetInfo, split: str, rows: int) -> dict[str, np.ndarray]:
    """Some `rows` rows of a split (fewer if it has fewer), reading no more than the batch they
    are in: what preflight runs a pretrained model on, whatever the split's size."""
    fs, root = storage.filesystem(info.split_uri(split))
    batches = []
    for path in _parquet_files(root, info.uri, split):
        with fs.open_input_file(path) as f:
            batch = next(pq.ParquetFile(f).iter_batches(batch_size=rows, columns=list(info.columns)), None)
        if batch is not None and batch.num_rows:
            batches.append(batch)
        if sum(b.num_rows for b in batches) >= rows:
            break
    table = pa.Table.from_batches(batches).slice(0, rows) if batches else None
    return {k: to_numpy(table[k]) if table is not None else np.empty((0, *c.shape), c.dtype)
            for k, c in info.columns.items()}


def read_split(info: DatasetInfo, split: str, limit_rows: int | None = None) -> dict[str, np.ndarray]:
    """A whole split with pyarrow (driver-side tools, tests). Workers read through Ray Data."""
    fs, root = storage.filesystem(info.split_uri(split))
    table = pq.read_table(root, filesystem=fs)
    if limit_rows:
        table = table.slice(0, limit_rows)
    return {k: to_numpy(table[k]) for k in info.columns}
