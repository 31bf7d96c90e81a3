"""Compact storage: images stored as uint8 with a scale (and per-channel stats) in the manifest,
decoded to float32 on the device after the copy (`methodlab.data.decode`); datasets in the old
float32 layout open and train unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from methodlab.config import load_config
from methodlab.data import open_dataset, prepare_builtin, read_split, split_nbytes, write_dataset
from methodlab.data.builtin import load_digits, stratified_split
from methodlab.data.decode import ColumnDecode, column_decoders, decode_arrays
from methodlab.errors import DataError
from methodlab.train.core import load_bundle

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(root, images, scales=None, labels=None):
    labels = np.arange(len(images)) % 3 if labels is None else labels
    split = {"image": images, "label": labels.astype(np.int64)}
    return write_dataset(str(root), "t", {"train": split, "val": split, "test": split}, {"num_classes": 3},
                         scales=scales)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.sampled_from([1 / 255, 1 / 16, 0.5]), st.integers(0, 2**31 - 1))
def test_uint8_round_trip_decodes_to_raw_times_scale_and_stats_match_numpy(tmp_path_factory, channels, side,
                                                                           scale, seed):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (7, channels, side, side), dtype=np.uint8)
    info = _write(tmp_path_factory.mktemp("ds") / "d", raw, {"image": scale})
    col = info.columns["image"]
    assert col.dtype == "uint8" and col.scale == scale
    decoded = raw.astype(np.float64) * scale
    np.testing.assert_allclose(col.mean, decoded.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(col.std, np.where(decoded.std(axis=(0, 2, 3)) > 0, decoded.std(axis=(0, 2, 3)), 1.0),
                               rtol=1e-12)
    np.testing.assert_array_equal(read_split(info, "train")["image"], raw)         # stored as is
    out = decode_arrays(read_split(info, "train"), info.columns)["image"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, raw.astype(np.float32) * np.float32(scale))
    # Normalized: each channel of the decoded train split has mean 0 and std 1 (or is constant).
    norm = decode_arrays(read_split(info, "train"), info.columns, normalize=True)["image"].astype(np.float64)
    np.testing.assert_allclose(norm.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    stds = norm.std(axis=(0, 2, 3))
    assert np.all((np.abs(stds - 1) < 1e-4) | (stds < 1e-6))


def test_builtin_digits_decode_to_exactly_the_old_float32_values(tmp_path):
    info = prepare_builtin("digits", str(tmp_path))
    images, labels = load_digits()       # the float32 layout's values: counts / 16
    cfg = load_config("supervised", None, [f"data.root={tmp_path}"])
    bundle = load_bundle(cfg, info, ["train", "val", "test"])
    assert bundle.splits["train"].tensors["image"].dtype == torch.uint8       # a quarter of the bytes
    rows = stratified_split(labels)["train"]
    got = torch.cat([b["image"] for b in bundle.splits["train"].batches(100)])
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(images[rows]))
    assert split_nbytes(info, "train") == len(rows) * (64 + 8)               # uint8 image + int64 label


def test_old_float32_datasets_open_and_pass_through_undecoded(tmp_path):
    images = np.random.default_rng(0).random((9, 1, 8, 8), dtype=np.float32)
    info = _write(tmp_path / "old", images)
    assert info.columns["image"].scale is None and column_decoders(info.columns) == {}
    # A manifest written before the scale field existed (no scale/mean/std keys) opens the same.
    raw = (tmp_path / "old" / "dataset.json").read_text()
    assert "scale" not in raw
    cfg = load_config("supervised", None, [f"data.dataset={tmp_path / 'old'}"])
    bundle = load_bundle(cfg, open_dataset(str(tmp_path / "old")), ["train"])
    got = next(bundle.splits["train"].batches(9))["image"]
    assert torch.equal(got, torch.from_numpy(images))


def test_a_scale_on_a_float_column_is_refused(tmp_path):
    with pytest.raises(DataError, match="column 'image' has a scale but holds float32"):
        _write(tmp_path / "x", np.zeros((3, 1, 2, 2), np.float32), {"image": 0.5})


def test_decode_runs_on_the_device_the_batch_is_on():
    dec = ColumnDecode(1 / 255, (0.5,), (0.25,))
    raw = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)           # (1, 1, 1, 2)
    out = dec(raw)
    assert out.dtype == torch.float32 and out.device == raw.device
    torch.testing.assert_close(out, torch.tensor([[[[-2.0, 2.0]]]]))
