"""`methodlab data import-<format>`: the papers' dataset formats, each written here in exactly its
real layout (file names, dtypes, byte order, keys), imported through the CLI, read back exactly
(pixel order included), opened, and for STL-10 (bad_batches) and CASIA-SURF (mmanet) trained on.
Bad input is one `error:` line and leaves nothing at --out."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from methodlab.cli import main
from methodlab.config import load_config
from methodlab.data import open_dataset, read_split
from methodlab.data.importers import IMPORTERS
from tests.conftest import tiny

CPU = torch.device("cpu")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["data", *argv])
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


def _refused(capsys, tmp_path, argv, fragment):
    """The bad-input contract: non-zero, one `error:` line with `fragment`, nothing at --out."""
    code, _, err = _cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert fragment in err, err
    assert not [n for n in os.listdir(tmp_path) if n == "out" or n.startswith(".tmp-out")]


def _all_rows(info) -> dict[str, dict[str, np.ndarray]]:
    return {s: read_split(info, s) for s in info.splits}


def _train(name: str, uri: str, *extra: str) -> list[dict]:
    """A short in-process run of `name` on the dataset at `uri` (tests/test_core.py's way): the
    reports of its epochs."""
    from methodlab.registry import get_method
    from methodlab.train.core import Loop, LoopState, load_bundle, seed_everything
    from tests.test_core import Capture

    cfg = load_config(name, None, tiny(name, "scaling.num_workers=1", f"data.dataset={uri}", *extra))
    method = get_method(name)(cfg, load_bundle(cfg, open_dataset(uri), ["train", "val", "test"]))
    seed_everything(cfg.train.seed)
    Loop(cfg, method, CPU, hooks=(capture := Capture())).fit(LoopState())
    return capture.reports


# ----------------------------------------------------------------------------------------------
# CIFAR: Python 2 pickles


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote: bytes as STRING opcodes (Python 3 writes
    `_codecs.encode` calls at protocol 2) and numpy's reconstruct under numpy.core."""

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little")) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}

    def save_global(self, obj, name=None):
        if obj is np.empty(0).__reduce__()[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(path, obj) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) -> the file's (N, 3072) rows: R plane, G plane, B plane, each row-major."""
    return images.reshape(len(images), -1)


def write_cifar10(root, per_batch=20, test=30, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir()
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    py2_pickle(root / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072})
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = test if name == "test_batch" else per_batch
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batches[name] = (images, labels)
        py2_pickle(root / name, {b"batch_label": f"batch {i}".encode(), b"labels": labels,
                                 b"data": cifar_rows(images), b"filenames": [f"img_{j}.png".encode() for j in range(n)]})
    return batches


def _sorted_rows(images: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in images)


def test_cifar10_round_trips_pixels_labels_classes_and_splits(tmp_path, capsys):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py")
    code, out, _ = _cli(capsys, "import-cifar10", str(tmp_path / "cifar-10-batches-py"), "--out", str(tmp_path / "out"))
    info = open_dataset(str(tmp_path / "out"))
    rows = _all_rows(info)
    assert code == 0 and out.startswith(f"imported cifar-10-batches-py into {tmp_path / 'out'}: train ")
    assert f"test {30}" in out and "10 classes" in out and out.endswith("written")
    assert info.meta["classes"][:3] == ["airplane", "automobile", "bird"] and info.num_classes == 10
    np.testing.assert_array_equal(rows["test"]["image"], batches["test_batch"][0])    # pixel order, row order
    np.testing.assert_array_equal(rows["test"]["label"], batches["test_batch"][1])
    train = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    assert _sorted_rows(np.concatenate([rows["train"]["image"], rows["val"]["image"]])) == _sorted_rows(train)
    assert 0 < len(rows["val"]["label"]) < len(rows["train"]["label"])
    col = info.columns["image"]
    assert (col.dtype, col.shape, col.scale) == ("uint8", [3, 32, 32], 1 / 255)
    np.testing.assert_allclose(col.mean, (rows["train"]["image"] / 255).mean(axis=(0, 2, 3)), atol=1e-12)


def test_cifar100_keeps_fine_and_coarse_labels(tmp_path, capsys):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    py2_pickle(root / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                               b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    files = {}
    for name, n in (("train", 200), ("test", 40)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine, coarse = [int(v) for v in rng.integers(0, 100, n)], [int(v) for v in rng.integers(0, 20, n)]
        files[name] = (images, fine, coarse)
        py2_pickle(root / name, {b"filenames": [b"x.png"] * n, b"batch_label": b"training batch 1 of 1",
                                 b"fine_labels": fine, b"coarse_labels": coarse, b"data": cifar_rows(images)})
    assert _cli(capsys, "import-cifar100", str(root), "--out", str(tmp_path / "out"))[0] == 0
    info = open_dataset(str(tmp_path / "out"))
    test = read_split(info, "test")
    assert info.num_classes == 100 and info.meta["coarse_classes"][19] == "coarse19"
    np.testing.assert_array_equal(test["image"], files["test"][0])
    np.testing.assert_array_equal(test["label"], files["test"][1])
    np.testing.assert_array_equal(test["coarse_label"], files["test"][2])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5))
def test_cifar_and_stl10_pixel_order_round_trips(seed, n):
    """A (C, H, W) image written as each format stores it reads back as itself."""
    import io

    from methodlab.data.stl10 import to_chw

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump({b"data": cifar_rows(images), b"labels": [0] * n})
    raw = pickle.loads(buf.getvalue(), encoding="bytes")[b"data"]
    assert raw.tobytes() == b"".join(  # the file's bytes: R plane, G plane, B plane, row by row
        images[i, c, h].tobytes() for i in range(n) for c in range(3) for h in range(32))
    np.testing.assert_array_equal(raw.reshape(-1, 3, 32, 32), images)
    stl = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
    stored = np.frombuffer(stl.transpose(0, 1, 3, 2).tobytes(), np.uint8).reshape(n, 3, 96, 96)  # column-major
    np.testing.assert_array_equal(to_chw(stored), stl)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_pickles_naming_other_globals_never_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path / "c")
    with open(tmp_path / "c" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f, protocol=2)
    _refused(capsys, tmp_path, ["import-cifar10", str(tmp_path / "c")],
             f"{tmp_path / 'c' / 'data_batch_3'} is not a CIFAR batch: refused global posix.system")
    assert not (tmp_path / "pwned").exists()


def test_a_cifar_batch_with_the_wrong_row_length_is_one_line(tmp_path, capsys):
    write_cifar10(tmp_path / "c")
    py2_pickle(tmp_path / "c" / "data_batch_2", {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4})
    _refused(capsys, tmp_path, ["import-cifar10", str(tmp_path / "c")],
             "data_batch_2: b'data' rows hold 3000 values, expected 3072")


# ----------------------------------------------------------------------------------------------
# STL-10: binary files


def write_stl10(root, n_train=60, n_test=30, n_unlabeled=50, seed=0, folds=True):
    """Images whose rows and columns differ (value = f(channel, row, col)), stored column-major."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        images[0] = (np.arange(3)[:, None, None] * 50 + np.arange(96)[:, None] * 2 + np.arange(96) // 3) % 256
        images.transpose(0, 1, 3, 2).tofile(root / f"{split}_X.bin")     # MATLAB order: column by column
        out[split] = images
        if split != "unlabeled":
            y = (np.arange(n) % 10 + 1).astype(np.uint8)
            y.tofile(root / f"{split}_y.bin")
            out[f"{split}_y"] = y
    (root / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                     "monkey", "ship", "truck"]) + "\n")
    if folds:
        (root / "fold_indices.txt").write_text("\n".join(" ".join(map(str, range(k, n_train, 10))) for k in range(10)) + "\n")
    return out


def test_stl10_layout_pixels_unlabeled_and_folds(tmp_path, capsys):
    files = write_stl10(tmp_path / "stl10_binary")
    code, out, _ = _cli(capsys, "import-stl10", str(tmp_path / "stl10_binary"), "--out", str(tmp_path / "out"))
    info = open_dataset(str(tmp_path / "out"))
    rows = _all_rows(info)
    assert code == 0 and "train 100, val 10, test 30 rows; 10 classes" in out     # 60 - 10 labelled + 50 unlabeled
    assert info.meta["classes"][7] == "monkey" and info.meta["unlabeled_rows"] == 50
    assert info.meta["folds"][1][:2] == [1, 11]
    np.testing.assert_array_equal(rows["test"]["image"], files["test"])
    np.testing.assert_array_equal(rows["test"]["label"], files["test_y"] - 1)
    assert rows["test"]["image"][0, 1, 5, 9] == (50 + 10 + 3) % 256         # (channel 1, row 5, col 9)
    train = rows["train"]
    labelled = train["label"] >= 0
    assert labelled[:50].all() and (train["label"][50:] == -1).all()      # labelled rows first
    np.testing.assert_array_equal(train["image"][50:], files["unlabeled"])
    assert _sorted_rows(np.concatenate([train["image"][:50], rows["val"]["image"]])) == _sorted_rows(files["train"])
    assert np.bincount(rows["val"]["label"]).tolist() == [1] * 10      # 10% of each class, at least one


def test_stl10_trains_bad_batches_on_unlabeled_and_probes_on_labelled(tmp_path, capsys):
    write_stl10(tmp_path / "stl10_binary", n_train=100, n_test=40, n_unlabeled=60, folds=False)
    assert _cli(capsys, "import-stl10", str(tmp_path / "stl10_binary"), "--out", str(tmp_path / "out"))[0] == 0
    reports = _train("bad_batches", str(tmp_path / "out"), "data.limit_rows=10000", "train.batch_size=40",
                     "method.arch_kwargs={width: 4, blocks: [1]}", "method.probe_steps=5")
    final = reports[-1]
    assert 0 <= final["val_linear_acc"] <= 1 and 0 <= final["test_knn_acc"] <= 1


def test_stl10_without_unlabeled_has_labels_everywhere(tmp_path, capsys):
    write_stl10(tmp_path / "stl10_binary", n_unlabeled=10)
    os.remove(tmp_path / "stl10_binary" / "unlabeled_X.bin")
    assert _cli(capsys, "import-stl10", str(tmp_path / "stl10_binary"), "--out", str(tmp_path / "out"),
                "--no-unlabeled")[0] == 0
    assert (read_split(open_dataset(str(tmp_path / "out")), "train")["label"] >= 0).all()


@pytest.mark.parametrize("damage, fragment", [
    ("x_size", "train_X.bin is 1,658,881 bytes, not a multiple of 3 x 96 x 96 = 27,648"),
    ("y_length", "test_y.bin has 29 labels but"),
    ("y_range", "train_y.bin holds labels 0..10, expected 1..10"),
])
def test_bad_stl10_files_are_one_line(tmp_path, capsys, damage, fragment):
    root = tmp_path / "stl10_binary"
    write_stl10(root)
    if damage == "x_size":
        with open(root / "train_X.bin", "ab") as f:
            f.write(b"\0")
    elif damage == "y_length":
        (root / "test_y.bin").write_bytes((root / "test_y.bin").read_bytes()[:-1])
    else:
        (root / "train_y.bin").write_bytes(b"\0" + (root / "train_y.bin").read_bytes()[1:])
    _refused(capsys, tmp_path, ["import-stl10", str(root)], fragment)


# ----------------------------------------------------------------------------------------------
# Flowers-102: jpg/ + MATLAB v5 label and split files


def write_flowers(root, n=30, classes=5, seed=0):
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    (root / "jpg").mkdir(parents=True)
    for i in range(n):
        h, w = rng.integers(20, 50, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "jpg" / f"image_{i + 1:05d}.jpg")
    labels = (np.arange(n) % classes + 1).astype(np.uint8)
    ids = rng.permutation(n) + 1
    savemat(root / "imagelabels.mat", {"labels": labels[None, :]})
    third = n // 3
    setid = {"trnid": ids[:third], "valid": ids[third:2 * third], "tstid": ids[2 * third:]}
    savemat(root / "setid.mat", {k: v[None, :].astype(np.uint16) for k, v in setid.items()})
    return labels, setid


def test_flowers102_official_split_pixels_and_numbered_classes(tmp_path, capsys):
    root = tmp_path / "flowers102"
    labels, setid = write_flowers(root)
    code, out, _ = _cli(capsys, "import-flowers102", str(root), "--out", str(tmp_path / "out"), "--size", "16",
                        "--workers", "2")
    info = open_dataset(str(tmp_path / "out"))
    assert code == 0 and "train 10, val 10, test 10 rows; 5 classes" in out
    assert info.meta["classes"] == ["1", "2", "3", "4", "5"]
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        got = read_split(info, split)
        want = np.stack([np.asarray(Image.open(root / "jpg" / f"image_{i:05d}.jpg").convert("RGB")
                                    .resize((16, 16), Image.BILINEAR)).transpose(2, 0, 1) for i in setid[key]])
        np.testing.assert_array_equal(got["image"], want)
        np.testing.assert_array_equal(got["label"], labels[setid[key] - 1] - 1)


@pytest.mark.parametrize("damage, fragment", [
    ("key", "setid.mat lacks field 'tstid' (has trnid, valid)"),
    ("image", "image_00007.jpg does not exist"),
])
def test_bad_flowers_files_are_one_line(tmp_path, capsys, damage, fragment):
    from scipy.io import loadmat, savemat

    root = tmp_path / "flowers102"
    write_flowers(root)
    if damage == "key":
        mat = loadmat(root / "setid.mat")
        savemat(root / "setid.mat", {k: mat[k] for k in ("trnid", "valid")})
    else:
        os.remove(root / "jpg" / "image_00007.jpg")
    _refused(capsys, tmp_path, ["import-flowers102", str(root)], fragment)


# ----------------------------------------------------------------------------------------------
# CASIA-SURF lists


def write_casia(root, n=24, seed=0):
    """Training/<id>/{profile,depth,ir}/NNN.jpg-style files: RGB colour, depth and IR greyscale
    PNGs; three lists, `rgb depth ir label`, relative to root."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        d = root / "Training" / f"{i:04d}"
        for sub in ("profile", "depth", "ir"):
            (d / sub).mkdir(parents=True)
        h, w = rng.integers(16, 40, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "profile" / "001.png")
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(d / "depth" / "001.png")
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(d / "ir" / "001.png")
        rel = f"Training/{i:04d}"
        lines.append(f"{rel}/profile/001.png {rel}/depth/001.png {rel}/ir/001.png {i % 2}")
    for name, part in (("train_list.txt", lines[:12]), ("val_private_list.txt", lines[12:18]),
                       ("test_private_list.txt", lines[18:])):
        (root / name).write_text("\n".join(part) + "\n")
    return [str(root / n) for n in ("train_list.txt", "val_private_list.txt", "test_private_list.txt")]


def test_casia_surf_modalities_keep_their_channels_and_mmanet_trains(tmp_path, capsys):
    root = tmp_path / "CASIA-SURF"
    lists = write_casia(root)
    code, out, _ = _cli(capsys, "import-casia-surf", *lists, "--out", str(tmp_path / "out"), "--size", "8",
                        "--workers", "2")
    info = open_dataset(str(tmp_path / "out"))
    assert code == 0 and "train 12, val 6, test 6 rows; 2 classes" in out
    assert info.meta["modalities"] == ["rgb", "depth", "ir"] and info.meta["classes"] == ["attack", "live"]
    assert [info.columns[m].shape for m in ("rgb", "depth", "ir")] == [[3, 8, 8], [1, 8, 8], [1, 8, 8]]
    assert info.columns["packed"].dtype == "uint8" and info.columns["packed"].shape == [5 * 64]
    test = read_split(info, "test")
    ref = Image.open(root / "Training" / "0019" / "depth" / "001.png").resize((8, 8), Image.BILINEAR)
    np.testing.assert_array_equal(test["depth"][1, 0], np.asarray(ref))
    np.testing.assert_array_equal(test["label"], [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(test["packed"], np.concatenate([test[m].reshape(6, -1) for m in ("rgb", "depth", "ir")], 1))
    reports = _train("mmanet", str(tmp_path / "out"))
    assert {"val_mean_acc", "test_mean_acer"} <= set(reports[-1])


def test_a_casia_list_naming_a_missing_image_is_one_line(tmp_path, capsys):
    root = tmp_path / "CASIA-SURF"
    lists = write_casia(root)
    os.remove(root / "Training" / "0013" / "ir" / "001.png")
    _refused(capsys, tmp_path, ["import-casia-surf", *lists],
             f"val_private_list.txt:2: ir image {root / 'Training/0013/ir/001.png'} does not exist")


# ----------------------------------------------------------------------------------------------
# NYUv2 labeled: MATLAB v7.3 = HDF5


def _matlab_header(path) -> None:
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan 12 10:00:00 2015 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header.ljust(512, b"\0"))


def write_nyuv2(path, n=10, seed=0, scenes=("kitchen", "bedroom", "bathroom"), drop=None):
    """nyu_depth_v2_labeled.mat at a reduced image count, full 640 x 480, as MATLAB writes it."""
    import h5py

    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (n, 480, 640, 3), dtype=np.uint8)                # (N, H, W, C) as viewed
    depth = rng.uniform(0.5, 12.0, (n, 480, 640)).astype(np.float32)
    names = [scenes[i % len(scenes)] for i in range(n)]
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")

        def put(key, data, cls):
            if key != drop:
                f.create_dataset(key, data=data).attrs["MATLAB_class"] = np.bytes_(cls)

        put("images", rgb.transpose(0, 3, 2, 1), "uint8")                         # (N, 3, 640, 480)
        put("depths", depth.transpose(0, 2, 1), "single")                         # (N, 640, 480)
        put("labels", np.zeros((n, 640, 480), np.uint16), "uint16")                # ignored
        cells = []
        for i, name in enumerate(names):
            chars = refs.create_dataset(f"s{i}", data=np.array([[ord(c)] for c in name], np.uint16))
            chars.attrs["MATLAB_class"] = np.bytes_("char")
            chars.attrs["MATLAB_int_decode"] = np.int32(2)
            cells.append(chars.ref)
        if drop != "sceneTypes":
            st_ = f.create_dataset("sceneTypes", data=np.array([cells], dtype=h5py.ref_dtype))
            st_.attrs["MATLAB_class"] = np.bytes_("cell")
    _matlab_header(path)
    return rgb, depth, names


def test_nyuv2_rgb_depth_scenes_and_standard_split(tmp_path, capsys):
    from scipy.io import savemat

    rgb, depth, names = write_nyuv2(tmp_path / "nyu_depth_v2_labeled.mat")
    assert open(tmp_path / "nyu_depth_v2_labeled.mat", "rb").read(10) == b"MATLAB 7.3"
    savemat(tmp_path / "splits.mat", {"trainNdxs": np.arange(1, 8)[:, None].astype(float),
                                      "testNdxs": np.arange(8, 11)[:, None].astype(float)})
    code, out, _ = _cli(capsys, "import-nyuv2", str(tmp_path / "nyu_depth_v2_labeled.mat"), "--splits",
                        str(tmp_path / "splits.mat"), "--out", str(tmp_path / "out"), "--size", "16")
    info = open_dataset(str(tmp_path / "out"))
    assert code == 0 and "test 3 rows; 3 classes" in out
    assert info.meta["classes"] == ["bathroom", "bedroom", "kitchen"] and info.meta["modalities"] == ["rgb", "depth"]
    test = read_split(info, "test")
    np.testing.assert_array_equal(test["label"], [info.meta["classes"].index(names[i]) for i in (7, 8, 9)])
    want_rgb = np.asarray(Image.fromarray(rgb[7]).resize((16, 16), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(test["rgb"][0], want_rgb)
    metres = np.asarray(Image.fromarray(depth[7], "F").resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(test["depth"][0, 0], np.clip(np.rint(metres * 25.5), 0, 255))
    decoded = test["depth"][0, 0] * info.columns["depth"].scale * info.meta["depth_max_m"]
    assert np.abs(decoded - np.minimum(metres, 10)).max() <= 10 / 255 / 2 + 1e-6     # metres, to half a step
    assert len(read_split(info, "train")["label"]) + len(read_split(info, "val")["label"]) == 7


def test_nyuv2_without_splits_is_stratified_by_scene(tmp_path, capsys):
    write_nyuv2(tmp_path / "nyu.mat", n=15)
    assert _cli(capsys, "import-nyuv2", str(tmp_path / "nyu.mat"), "--out", str(tmp_path / "out"), "--size", "8")[0] == 0
    info = open_dataset(str(tmp_path / "out"))
    assert [len(read_split(info, s)["label"]) for s in info.splits] == [9, 3, 3]
    assert "stratified" in info.meta["split"]


def test_a_mat_file_missing_a_key_is_one_line(tmp_path, capsys):
    write_nyuv2(tmp_path / "nyu.mat", n=3, drop="depths")
    _refused(capsys, tmp_path, ["import-nyuv2", str(tmp_path / "nyu.mat")], "nyu.mat lacks key 'depths'")


# ----------------------------------------------------------------------------------------------
# Every importer


@pytest.mark.parametrize("action", sorted(IMPORTERS))
def test_every_importer_refuses_a_missing_source_in_one_line(tmp_path, capsys, action):
    _refused(capsys, tmp_path, [action, str(tmp_path / "nowhere")], "does not exist")


# ----------------------------------------------------------------------------------------------
# xlsa17: the documented shapes of CUB, AWA2 and SUN


def write_xlsa17_cub(root) -> None:
    """xlsa17/data/CUB at its real shapes: res101.mat features (2048, 11788) float32, labels
    (11788, 1) 1-based; att_splits.mat att (312, 200), the *_loc fields (n, 1) 1-based with the
    proposed split's sizes (150 seen classes, 100 of them train_loc and 50 val_loc; 50 unseen),
    allclasses_names (200, 1) cells."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    seen_per_class = np.full(150, 8821 // 150) + (np.arange(150) < 8821 % 150)      # 8,821 seen images
    unseen_per_class = np.full(50, 2967 // 50) + (np.arange(50) < 2967 % 50)
    labels = np.repeat(np.arange(200), np.r_[seen_per_class, unseen_per_class])
    rows = rng.permutation(len(labels))
    seen_rows = rows[labels[rows] < 150]                                         # in random order
    trainval, test_seen = np.sort(seen_rows[:7057]), np.sort(seen_rows[7057:])
    test_unseen = np.flatnonzero(labels >= 150)
    root.mkdir(parents=True)
    savemat(root / "res101.mat", {"features": rng.random((2048, len(labels)), dtype=np.float32),
                                  "labels": (labels + 1)[:, None].astype(np.float64),
                                  "image_files": np.array([[f"img{i}.jpg"] for i in range(3)], dtype=object)})
    att = rng.random((312, 200))
    col = lambda r: (r + 1)[:, None].astype(np.float64)  # noqa: E731
    savemat(root / "att_splits.mat", {
        "att": att, "original_att": att * 100, "trainval_loc": col(trainval),
        "train_loc": col(trainval[labels[trainval] < 100]), "val_loc": col(trainval[labels[trainval] >= 100]),
        "test_seen_loc": col(test_seen), "test_unseen_loc": col(test_unseen),
        "allclasses_names": np.array([[f"{i + 1:03d}.bird"] for i in range(200)], dtype=object)})


def test_xlsa17_cub_at_its_real_shapes_imports(tmp_path, capsys):
    write_xlsa17_cub(tmp_path / "xlsa17" / "data" / "CUB")
    code, out, _ = _cli(capsys, "import-xlsa17", str(tmp_path / "xlsa17" / "data" / "CUB"), "--out", str(tmp_path / "out"))
    info = open_dataset(str(tmp_path / "out"))
    assert code == 0 and "200 classes" in out and "test 4,731 rows" in out        # 1,764 + 2,967
    assert len(info.meta["seen_classes"]) == 150 and len(info.meta["unseen_classes"]) == 50
    assert info.columns["features"].shape == [2048] and info.meta["attribute_dim"] == 312


def test_a_folder_named_cub_with_other_shapes_is_one_line(tmp_path, capsys):
    from tests.test_d3gzsl import _write_xlsa17

    (tmp_path / "CUB").mkdir()
    _write_xlsa17(tmp_path / "CUB")
    _refused(capsys, tmp_path, ["import-xlsa17", str(tmp_path / "CUB")],
             "res101.mat: 'features' has shape (5, 36), expected (2048, 11788) for xlsa17 CUB")
