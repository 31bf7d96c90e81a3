"""`methodlab data import`: real image files (PNG and JPEG, class per subfolder) through the process
pool and the streaming writer, locally and on the test S3 server; bad input as one line."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from methodlab import storage
from methodlab.cli import main
from methodlab.config import load_config
from methodlab.data import open_dataset, read_split
from methodlab.data.builtin import stratified_split
from methodlab.data.imagefolder import import_image_folder, list_image_folder


def make_folder(root, per_class=(7, 9, 8), seed=0) -> None:
    """Random RGB images of assorted sizes; PNG and JPEG, one class in a nested subfolder."""
    rng = np.random.default_rng(seed)
    for c, n in enumerate(per_class):
        for i in range(n):
            where = root / f"class{c}" / ("nested" if c == 2 and i % 2 else "")
            where.mkdir(parents=True, exist_ok=True)
            h, w = rng.integers(6, 40, 2)
            mode = "L" if i == 3 else "RGB"     # a grey file is converted to RGB like the rest
            pixels = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(where / f"{i:02d}.{'jpg' if i % 3 == 0 else 'png'}")


def pil_reference(files, size) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
                     for f in files])


def test_import_matches_pil_with_classes_split_stats_and_bounded_parts(tmp_path):
    make_folder(tmp_path / "imgs")
    classes, files, labels = list_image_folder(str(tmp_path / "imgs"))
    done = import_image_folder(str(tmp_path / "imgs"), str(tmp_path / "out"), size=8, workers=2,
                               rows_per_file=3, chunk_files=2)
    info = done.info
    assert info.meta["classes"] == classes == ["class0", "class1", "class2"] and info.num_classes == 3
    image = info.columns["image"]
    assert (image.dtype, image.shape, image.scale) == ("uint8", [3, 8, 8], 1 / 255)
    assert len(done.worker_pids) == 2 and os.getpid() not in done.worker_pids and done.skipped == []
    expected = pil_reference(files, 8)
    for split, rows in stratified_split(labels).items():
        got = read_split(info, split)
        assert got["image"].dtype == np.uint8
        np.testing.assert_array_equal(got["image"], expected[rows])
        np.testing.assert_array_equal(got["label"], labels[rows])
        parts = sorted(os.listdir(tmp_path / "out" / split))
        assert len(parts) == -(-len(rows) // 3) >= 2      # at most rows_per_file rows a file
    train = expected[stratified_split(labels)["train"]] / 255.0
    np.testing.assert_allclose(info.columns["image"].mean, train.mean(axis=(0, 2, 3)), atol=1e-12)
    np.testing.assert_allclose(info.columns["image"].std, train.std(axis=(0, 2, 3)), atol=1e-12)
    assert sorted(os.listdir(tmp_path)) == ["imgs", "out"]     # the staging directory is gone


def test_parent_holds_a_few_chunks_not_the_folder(tmp_path):
    """Peak Python memory of the importing process stays far below the dataset's size (3.7 MB here;
    the window is 4 chunks of 8 images, 100 kB, above about 300 kB the pool's machinery costs)."""
    rng = np.random.default_rng(1)
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(600):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    dataset_bytes = 1200 * 3 * 32 * 32
    tracemalloc.start()
    try:
        import_image_folder(str(tmp_path / "imgs"), str(tmp_path / "out"), size=32, workers=2,
                            rows_per_file=50, chunk_files=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < dataset_bytes / 4, (peak, dataset_bytes)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(colors=st.lists(st.tuples(*[st.floats(0, 1)] * 3), min_size=2, max_size=4),
       shape=st.tuples(st.integers(1, 30), st.integers(1, 30)), size=st.integers(1, 12))
def test_solid_colors_round_trip_within_uint8_quantization(tmp_path_factory, colors, shape, size):
    root = tmp_path_factory.mktemp("solid")
    for c, color in enumerate(colors):           # one class per color, two files each
        (root / "imgs" / f"c{c}").mkdir(parents=True)
        pixel = np.round(np.asarray(color) * 255).astype(np.uint8)
        for i in range(2):
            Image.fromarray(np.broadcast_to(pixel, (*shape, 3)).copy()).save(root / "imgs" / f"c{c}" / f"{i}.png")
    info = import_image_folder(str(root / "imgs"), str(root / "out"), size=size, workers=2).info
    for split in info.splits:
        got = read_split(info, split)
        decoded = got["image"] * info.columns["image"].scale
        want = np.asarray(colors)[got["label"]][:, :, None, None]
        assert np.abs(decoded - want).max(initial=0) <= 0.5 / 255 + 1e-9   # val is empty at 2 a class


def test_skip_bad_leaves_out_exactly_the_corrupt_file_and_names_it(tmp_path, capsys):
    make_folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "class1" / "broken.png"
    bad.write_bytes(b"these bytes are not an image")
    code = main(["data", "import", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--size", "8",
                 "--workers", "2", "--skip-bad"])
    out = capsys.readouterr().out
    assert code == 0 and f"skipped 1 unreadable image(s): {bad}" in out
    info = open_dataset(str(tmp_path / "out"))
    assert sum(len(read_split(info, s)["label"]) for s in info.splits) == 7 + 9 + 8
    assert info.meta["skipped"] == [str(bad)]


def test_a_corrupt_file_without_skip_bad_is_one_line_and_writes_nothing(tmp_path, capsys):
    make_folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "class0" / "zz-truncated.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(["data", "import", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--workers", "2"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {bad} is not a readable image") and "--skip-bad" in err and "remove it" in err
    assert sorted(os.listdir(tmp_path)) == ["imgs"]      # no dataset, no staging directory


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist or is not a directory"),
    ("one_class", "needs one subfolder per class (found 1)"),
    ("empty_class", "class1 has no images"),
])
def test_bad_folders_are_one_line(tmp_path, capsys, layout, message):
    if layout != "missing":
        make_folder(tmp_path / "imgs", per_class=(3,))
    if layout == "empty_class":
        (tmp_path / "imgs" / "class1").mkdir()
    code = main(["data", "import", str(tmp_path / "imgs"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_import_to_s3_opens_and_a_failed_one_leaves_no_objects(tmp_path, bucket):
    endpoint, name = bucket
    storage.configure(load_config("supervised", None, [f"storage.endpoint_url={endpoint}"]).storage)
    make_folder(tmp_path / "imgs")
    uri = f"s3://{name}/datasets/imgs"
    import_image_folder(str(tmp_path / "imgs"), uri, size=8, workers=2, rows_per_file=4)
    local = import_image_folder(str(tmp_path / "imgs"), str(tmp_path / "local"), size=8, workers=2).info
    info = open_dataset(uri)
    assert info.meta["classes"] == local.meta["classes"] and info.columns == local.columns
    for split in info.splits:
        for col in ("image", "label"):
            np.testing.assert_array_equal(read_split(info, split)[col], read_split(local, split)[col])
    assert [n for n, _ in storage.listdir(f"s3://{name}/datasets")] == ["imgs"]    # staging prefix gone

    (tmp_path / "imgs" / "class2" / "bad.png").write_bytes(b"nope")
    with pytest.raises(Exception, match="bad.png is not a readable image"):
        import_image_folder(str(tmp_path / "imgs"), f"s3://{name}/datasets/other", size=8, workers=2)
    assert [n for n, _ in storage.listdir(f"s3://{name}/datasets")] == ["imgs"]


def test_an_imported_folder_trains_from_decoded_floats(tmp_path):
    """What a run on an import sees: the loop's batches are PIL's pixels / 255 as float32 on the
    device, normalized per channel with data.normalize."""
    from methodlab.train.core import load_bundle

    make_folder(tmp_path / "imgs")
    info = import_image_folder(str(tmp_path / "imgs"), str(tmp_path / "out"), size=8, workers=1).info
    raw = read_split(info, "train")["image"]
    for normalize in (False, True):
        cfg = load_config("supervised", None, [f"data.dataset={info.uri}", f"data.normalize={normalize}"])
        got = next(load_bundle(cfg, info, ["train"]).splits["train"].batches(len(raw)))["image"].numpy()
        want = raw.astype(np.float32) * np.float32(1 / 255)
        if normalize:
            col = info.columns["image"]
            want = (want - np.float32(col.mean)[None, :, None, None]) / np.float32(col.std)[None, :, None, None]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
