"""NYU Depth V2, labeled part (Silberman et al., ECCV 2012), as MMANet classification data: RGB and
depth, classified by **scene type** (kitchen, bedroom, ...). The dataset's own task is
per-pixel semantic labels; scene classification is how this platform uses it, so that MMANet's
classification code runs on a real RGB-D set.

    methodlab data import-nyuv2 ~/data/nyu_depth_v2_labeled.mat --splits ~/data/splits.mat \\
        --out s3://bucket/datasets/nyuv2 --size 64
    methodlab train mmanet data.dataset=s3://bucket/datasets/nyuv2

The file is MATLAB v7.3, i.e. HDF5 (read with h5py), whose arrays appear with their dimensions
reversed: 'images' uint8 (1449, 3, 640, 480) = (N, C, W, H); 'depths' float32 (1449, 640, 480)
metres = (N, W, H); 'sceneTypes' (1, 1449) object references into '#refs#', each a uint16 char
array (the scene name). Other keys (labels, instances, rawDepths, ...) are ignored. Rows are
read in chunks of CHUNK images, never the whole 2.8 GB.

Layout (`multimodal.uint8_columns`): `rgb` uint8 (3, size, size), `depth` uint8 (1, size, size),
both scale 1/255 with the train split's mean/std, `packed`, `label` (the scene's index in
meta["classes"], the sorted scene names). Depth is stored as round(depth / DEPTH_MAX_M * 255),
clipped: it decodes to depth / 10 m in [0, 1] (meta["depth_max_m"]; 3.9 cm a step, the Kinect's
range is about 0.5-10 m). Images are resized to size x size (bilinear; depth in float, then
quantized).

Split: with the standard splits.mat (trainNdxs / testNdxs, 1-based; 795 / 654), test is
testNdxs and val is 10% of each scene of trainNdxs (seed 0; a scene with a single train image
keeps it in train); without it, a stratified 60/20/20 split by scene (seed 0).
"""

from __future__ import annotations

import os

import numpy as np

from methodlab.data.builtin import SPLIT_SEED, heldout_rows, stratified_split
from methodlab.data.dataset import DatasetInfo, open_dataset
from methodlab.data.importing import ImportWriter, chunks, load_mat, mat_field
from methodlab.data.multimodal import multimodal_meta, uint8_columns, uint8_rows
from methodlab.errors import DataError

DEPTH_MAX_M = 10.0
VAL_FRACTION = 0.1
CHUNK = 32
KEYS = ("images", "depths", "sceneTypes")


def _dataset(f, key: str, path: str):
    if key not in f:
        raise DataError(f"{path} lacks key {key!r} (has {', '.join(sorted(k for k in f if not k.startswith('#')))}); "
                        "is it nyu_depth_v2_labeled.mat?")
    return f[key]


def scene_names(f, path: str) -> list[str]:
    """'sceneTypes' (1, N) references -> N strings (each a uint16 MATLAB char array)."""
    refs = _dataset(f, "sceneTypes", path)
    names = []
    for ref in np.asarray(refs).ravel():
        chars = f[ref]
        names.append("" if chars.attrs.get("MATLAB_empty", 0) else "".join(map(chr, np.asarray(chars).ravel())))
    return names


def read_split(path: str, n: int, scenes: np.ndarray) -> tuple[dict[str, np.ndarray], str]:
    """Rows per split from splits.mat, or the seeded stratified split without it."""
    if path is None:
        return stratified_split(scenes), f"stratified 60/20/20 by scene (seed {SPLIT_SEED})"
    mat = load_mat(path)
    idx = {}
    for key in ("trainNdxs", "testNdxs"):
        rows = mat_field(mat, key, path).ravel().astype(np.int64) - 1
        if len(rows) == 0 or rows.min() < 0 or rows.max() >= n:
            raise DataError(f"{path}: key {key!r} must hold 1-based image indices in 1..{n}")
        idx[key] = rows
    held = heldout_rows(scenes[idx["trainNdxs"]], VAL_FRACTION, SPLIT_SEED)
    return ({"train": idx["trainNdxs"][~held], "val": idx["trainNdxs"][held], "test": idx["testNdxs"]},
            f"{path}: test = testNdxs; val = {VAL_FRACTION:g} of each scene of trainNdxs (seed {SPLIT_SEED}); "
            "train = the rest")


def resize(rgb: np.ndarray, depth: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """rgb (k, 3, W, H) uint8, depth (k, W, H) float32 metres, as stored -> (k, 3, size, size),
    (k, 1, size, size) uint8."""
    from PIL import Image

    out_rgb = np.empty((len(rgb), 3, size, size), np.uint8)
    out_depth = np.empty((len(rgb), 1, size, size), np.uint8)
    for i in range(len(rgb)):
        image = Image.fromarray(np.ascontiguousarray(rgb[i].transpose(2, 1, 0)))        # (H, W, 3)
        out_rgb[i] = np.asarray(image.resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
        metres = Image.fromarray(np.ascontiguousarray(depth[i].T, dtype=np.float32), "F")   # (H, W)
        d = np.asarray(metres.resize((size, size), Image.BILINEAR))
        out_depth[i, 0] = np.clip(np.rint(d * (255 / DEPTH_MAX_M)), 0, 255)
    return out_rgb, out_depth


def import_nyuv2(path: str, out: str, splits_file: str | None = None, size: int = 64) -> DatasetInfo:
    """nyu_depth_v2_labeled.mat (+ optional splits.mat) -> the layout at `out` (path or s3:// URI)."""
    import h5py

    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path} is not a MATLAB v7.3 (HDF5) file ({str(e)[:80]}); "
                        "it should be nyu_depth_v2_labeled.mat") from None
    with f:
        images, depths = (_dataset(f, k, path) for k in KEYS[:2])
        n = len(images)
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
            raise DataError(f"{path}: 'images' is {images.dtype} {images.shape}, expected uint8 (N, 3, 640, 480)")
        if depths.shape != (n, *images.shape[2:]):
            raise DataError(f"{path}: 'depths' is {depths.shape}, expected {(n, *images.shape[2:])} like 'images'")
        names = scene_names(f, path)
        if len(names) != n:
            raise DataError(f"{path}: 'sceneTypes' has {len(names)} entries for {n} images")
        classes = sorted(set(names))
        scenes = np.searchsorted(classes, names).astype(np.int64)
        parts, how = read_split(splits_file, n, scenes)
        columns = uint8_columns({"rgb": (3, size, size), "depth": (1, size, size)})
        meta = multimodal_meta(("rgb", "depth"), len(classes), classes, source=f"NYUv2 labeled {os.path.abspath(path)}",
                               task="scene classification (sceneTypes), not NYUv2's per-pixel labels",
                               depth_max_m=DEPTH_MAX_M, depth="uint8 = round(metres / depth_max_m * 255), clipped; "
                               "decoded: metres / depth_max_m", split=how)
        with ImportWriter(out, os.path.splitext(os.path.basename(path))[0], columns, list(parts), meta) as w:
            for split, rows in parts.items():
                for idx in chunks(np.sort(rows), CHUNK):
                    # h5py reads a sorted index list as one selection.
                    rgb, depth = resize(images[idx], depths[idx], size)
                    w.append(split, uint8_rows({"rgb": rgb, "depth": depth}, scenes[idx]))
    return open_dataset(out)
