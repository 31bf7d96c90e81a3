"""The Parquet dataset layout: round trips, the schema check, built-in datasets (imports: test_import.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from methodlab.data import open_dataset, prepare_builtin, read_split, read_table, split_nbytes, write_dataset
from methodlab.data.builtin import stratified_split
from methodlab.errors import DataError

SHAPES = st.lists(st.integers(1, 4), min_size=0, max_size=3)
DTYPES = st.sampled_from([np.float32, np.float64, np.int64, np.uint8])


@settings(max_examples=30, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, n=st.integers(1, 20), rows_per_file=st.integers(1, 25), data=st.data())
def test_write_read_round_trip_is_exact(tmp_path_factory, shape, dtype, n, rows_per_file, data):
    x = data.draw(hnp.arrays(dtype, (n, *shape), elements=hnp.from_dtype(np.dtype(dtype), allow_nan=False)))
    y = np.arange(n, dtype=np.int64)
    root = str(tmp_path_factory.mktemp("ds") / "d")
    info = write_dataset(root, "t", {s: {"x": x, "label": y} for s in ("train", "val", "test")},
                         {"num_classes": n}, tables={"attrs": {"a": x}}, rows_per_file=rows_per_file)
    assert info.columns["x"].shape == list(shape) and info.columns["x"].dtype == np.dtype(dtype).name
    back = read_split(info, "train")
    np.testing.assert_array_equal(back["x"], x)
    assert back["x"].dtype == x.dtype and back["x"].shape == x.shape
    np.testing.assert_array_equal(read_table(info, "attrs")["a"], x)
    # the stream loader's cache decision: the split's in-memory size, from the footers alone
    assert split_nbytes(info, "train") == x.nbytes + y.nbytes


def _small(tmp_path):
    x = np.zeros((6, 1, 4, 4), np.float32)
    y = np.arange(6, dtype=np.int64)
    return write_dataset(str(tmp_path / "d"), "small", {s: {"image": x, "label": y} for s in ("train", "val", "test")},
                         {"num_classes": 6})


def _rewrite(tmp_path, table: pa.Table):
    pq.write_table(table, tmp_path / "d" / "train" / "part-00000.parquet")


def test_missing_column_names_file_and_column(tmp_path):
    _small(tmp_path)
    _rewrite(tmp_path, pa.table({"label": np.arange(6)}))
    with pytest.raises(DataError, match=r"train/part-00000.parquet: missing column 'image'"):
        open_dataset(str(tmp_path / "d"))


def test_wrong_dtype_names_file_and_column(tmp_path):
    from methodlab.data.dataset import to_arrow

    _small(tmp_path)
    _rewrite(tmp_path, pa.table({"image": to_arrow(np.zeros((6, 1, 4, 4), np.float64)), "label": np.arange(6)}))
    with pytest.raises(DataError, match=r"column 'image' has dtype float64, expected float32"):
        open_dataset(str(tmp_path / "d"))


def test_wrong_shape_names_file_and_column(tmp_path):
    from methodlab.data.dataset import to_arrow

    _small(tmp_path)
    _rewrite(tmp_path, pa.table({"image": to_arrow(np.zeros((6, 1, 5, 4), np.float32)), "label": np.arange(6)}))
    with pytest.raises(DataError, match=r"column 'image' has shape \[1, 5, 4\], expected \[1, 4, 4\]"):
        open_dataset(str(tmp_path / "d"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_parquet_is_a_one_line_error(tmp_path, damage):
    _small(tmp_path)
    part = tmp_path / "d" / "val" / "part-00000.parquet"
    raw = part.read_bytes()
    part.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"not parquet at all" * 10, "empty": b""}[damage])
    with pytest.raises(DataError, match=r"val/part-00000.parquet is not a readable Parquet file") as e:
        open_dataset(str(tmp_path / "d"))
    assert "\n" not in str(e.value)


def test_missing_dataset_manifest_and_split(tmp_path):
    with pytest.raises(DataError, match="does not exist; run `methodlab data prepare`"):
        open_dataset(str(tmp_path / "nowhere"))
    _small(tmp_path)
    (tmp_path / "d" / "dataset.json").unlink()
    with pytest.raises(DataError, match="has no dataset.json"):
        open_dataset(str(tmp_path / "d"))
    _small(tmp_path)
    manifest = json.loads((tmp_path / "d" / "dataset.json").read_text())
    manifest["splits"].append("extra")
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="split 'extra' has no Parquet files"):
        open_dataset(str(tmp_path / "d"))


def test_failed_write_leaves_no_half_written_dataset(tmp_path):
    with pytest.raises(DataError):
        write_dataset(str(tmp_path / "d"), "bad", {"train": {"image": np.zeros((3, 2)), "label": np.zeros(4)}}, {})
    assert not (tmp_path / "d").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=5, max_size=200))
def test_stratified_split_partitions_every_row_once(labels):
    labels = np.asarray(labels)
    parts = stratified_split(labels)
    allrows = np.concatenate(list(parts.values()))
    assert sorted(allrows.tolist()) == list(range(len(labels)))
    assert stratified_split(labels)["train"].tolist() == parts["train"].tolist()   # fixed


def test_builtin_digits_is_fixed_and_idempotent(tmp_path):
    info = prepare_builtin("digits", str(tmp_path))
    mtime = (tmp_path / "digits" / "dataset.json").stat().st_mtime_ns
    again = prepare_builtin("digits", str(tmp_path))
    assert (tmp_path / "digits" / "dataset.json").stat().st_mtime_ns == mtime
    sizes = {s: len(read_split(info, s)["label"]) for s in info.splits}
    assert sizes == {"train": 1078, "val": 359, "test": 360} and again.columns == info.columns
    x = read_split(info, "train")["image"]
    # Stored as sklearn's ink counts (uint8 0..16); decoded on the device with scale 1/16.
    assert x.dtype == np.uint8 and x.shape[1:] == (1, 8, 8) and x.max() == 16
    assert info.columns["image"].scale == 1 / 16


def test_a_builtin_copy_prepared_by_other_code_is_rebuilt(tmp_path):
    """A copy of a built-in whose builder's code changed since (new attributes, say) is replaced,
    not reused because its name matches; the current code's copy is reused."""
    import json

    prepare_builtin("digits", str(tmp_path))
    manifest = tmp_path / "digits" / "dataset.json"
    stale = json.loads(manifest.read_text())
    stale["meta"]["builder_version"] = "from-old-code"
    manifest.write_text(json.dumps(stale))
    info = prepare_builtin("digits", str(tmp_path))
    assert info.meta["builder_version"] != "from-old-code"
    assert json.loads(manifest.read_text())["meta"]["builder_version"] == info.meta["builder_version"]
    assert len(read_split(info, "train")["label"]) == 1078


@pytest.mark.slow
def test_stream_dataset_is_read_once_only_within_the_cache_limit(ray_cluster, tmp_path):
    from methodlab.config import load_config
    from methodlab.train.launch import stream_dataset

    info = _small(tmp_path)
    cached = stream_dataset(load_config("supervised", None, ["data.loader=stream"]), info)
    reread = stream_dataset(load_config("supervised", None, ["data.loader=stream", "data.stream_cache_mb=0"]), info)
    # The cached one shuffles the blocks of a materialized read (stream_dataset's block order).
    read_of = lambda ds: repr(ds._logical_plan.dag.input_dependencies[0]) if ds._logical_plan.dag.input_dependencies \
        else repr(ds._logical_plan.dag)  # noqa: E731
    assert read_of(cached).startswith("InputData") and not read_of(reread).startswith("InputData")
    assert cached.count() == reread.count() == 6


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), nan_at=st.one_of(st.none(), st.integers(0, 39)), rows_per_file=st.integers(1, 16),
       batch_rows=st.integers(1, 8), foreign=st.booleans(), inf=st.booleans())
def test_nan_and_inf_are_found_wherever_they_are(tmp_path_factory, n, nan_at, rows_per_file, batch_rows, foreign, inf):
    """NaN and inf anywhere in a float column are found, however far in: from the footers of files
    DatasetWriter wrote (NaN counts, min/max; nothing is read), by reading the whole column of
    files another tool wrote, in batches of at most `batch_bytes` (the row here: 64 bytes)."""
    x = np.zeros((n, 1, 4, 4), np.float32)
    bad = nan_at is not None and nan_at < n
    if bad:
        x[nan_at, 0, 3, 3] = np.inf if inf else np.nan
    root = tmp_path_factory.mktemp("ds") / "d"
    info = write_dataset(str(root), "t", {s: {"image": x, "label": np.zeros(n, np.int64)} for s in ("train", "val", "test")},
                         {"num_classes": 1}, rows_per_file=rows_per_file)
    read_rows = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _ranges_seen(root, info, foreign, batch_rows, read_rows, monkeypatch, n, bad)


def _ranges_seen(root, info, foreign, batch_rows, read_rows, monkeypatch, n, bad):
    import methodlab.data.dataset as dataset
    from methodlab.data.dataset import NAN_COUNT_KEY, column_ranges

    if foreign:     # the same files without methodlab's NaN counts
        for part in (root / "train").glob("*.parquet"):
            assert NAN_COUNT_KEY.encode() in pq.ParquetFile(part).metadata.metadata
            pq.write_table(pq.read_table(part), part)
        iter_batches = pq.ParquetFile.iter_batches

        def spy(self, batch_size=65536, **kw):
            for batch in iter_batches(self, batch_size=batch_size, **kw):
                read_rows.append(batch.num_rows)
                yield batch
        monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    else:
        monkeypatch.setattr(dataset, "_scan", lambda *a, **k: pytest.fail("a methodlab file's footer says it all"))
    r = column_ranges(info, "train", ["image"], batch_bytes=64 * batch_rows)["image"]
    found = r.nan or not np.isfinite([r.min, r.max]).all()
    assert found == bad
    if foreign:
        assert sum(read_rows) == n and max(read_rows) <= batch_rows      # all of it, a batch at a time


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 12), rows=st.integers(1, 5), rows_per_file=st.integers(1, 4))
def test_head_rows_are_the_first_rows_of_the_split(tmp_path_factory, n, rows, rows_per_file):
    from methodlab.data.dataset import head_rows

    x = np.arange(n * 4, dtype=np.float32).reshape(n, 1, 2, 2)
    root = str(tmp_path_factory.mktemp("ds") / "d")
    info = write_dataset(root, "t", {s: {"x": x, "label": np.arange(n, dtype=np.int64)} for s in ("train", "val", "test")},
                         {"num_classes": max(n, 1)}, rows_per_file=rows_per_file)
    head = head_rows(info, "val", rows)
    np.testing.assert_array_equal(head["x"], x[:rows])
    assert head["x"].shape == (min(n, rows), 1, 2, 2) and head["label"].tolist() == list(range(min(n, rows)))
