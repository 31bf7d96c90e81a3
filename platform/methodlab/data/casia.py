"""CASIA-SURF / CASIA-SURF CeFA style face anti-spoofing lists (Zhang et al., CVPR 2019; Liu et al.,
WACV 2021) into the platform's multimodal layout, for MMANet.

    methodlab data import-casia-surf ~/CASIA-SURF/train_list.txt ~/CASIA-SURF/val_private_list.txt \\
        ~/CASIA-SURF/test_private_list.txt --root ~/CASIA-SURF --out s3://bucket/datasets/casia-surf --size 64
    methodlab train mmanet data.dataset=s3://bucket/datasets/casia-surf

A list file has one sample a line, `rgb_path depth_path ir_path label`, the paths relative to
--root (default: the first list's directory) and label 1 = live (real face), 0 = attack. With
three lists they are train, val and test; with one, a stratified 60/20/20 split of it (seed 0).
Classes: 0 "attack", 1 "live" (two classes, so MMANet also reports ACER).

Layout (`multimodal.uint8_columns`): `rgb`, `depth`, `ir` uint8 (C, size, size) with scale 1/255
and the train split's mean/std, C being each modality's own channel count (from its first image:
1 for greyscale depth and IR, 3 for RGB; the rest of that modality is converted to it), `packed`
uint8 and `label`. Every listed file is checked before anything is decoded; images are decoded
in `importing`'s process pool and resized to size x size (bilinear).
"""

from __future__ import annotations

import os

import numpy as np

from methodlab.data.builtin import SPLIT_SEED, stratified_split
from methodlab.data.dataset import DatasetInfo, open_dataset
from methodlab.data.importing import DecodePool, ImportWriter, chunks
from methodlab.data.multimodal import multimodal_meta, uint8_columns, uint8_rows
from methodlab.errors import DataError

MODALITIES = ("rgb", "depth", "ir")
CLASSES = ("attack", "live")
CHUNK_FILES = 64


def read_list(path: str, root: str) -> tuple[dict[str, list[str]], np.ndarray]:
    """({modality: absolute paths}, labels (N,) int64) of one list file. Raises DataError naming
    the file and line of a malformed line or a missing image."""
    if not os.path.isfile(path):
        raise DataError(f"list file {path} does not exist")
    files: dict[str, list[str]] = {m: [] for m in MODALITIES}
    labels = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4 or fields[3] not in ("0", "1"):
                raise DataError(f"{path}:{number}: expected 'rgb_path depth_path ir_path label' with label "
                                f"1 (live) or 0 (attack), got {line.strip()[:100]!r}")
            for m, rel in zip(MODALITIES, fields[:3]):
                full = os.path.join(root, rel)
                if not os.path.isfile(full):
                    raise DataError(f"{path}:{number}: {m} image {full} does not exist; fix the list or --root")
                files[m].append(full)
            labels.append(int(fields[3]))
    if not labels:
        raise DataError(f"list file {path} has no samples")
    return files, np.asarray(labels, dtype=np.int64)


def image_mode(path: str) -> str:
    """The PIL mode a modality is decoded in, from its first image: "L" (one channel) or "RGB"."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "F"):
            raise DataError(f"{path} is a {im.mode} (16-bit or float) image; convert the modality to 8-bit")
        return "L" if len(im.getbands()) <= 2 else "RGB"        # L and LA -> L


def import_casia_surf(lists: str | list[str], out: str, root: str | None = None, size: int = 64,
                      workers: int | None = None) -> DatasetInfo:
    """One list (split 60/20/20) or three (train, val, test) -> the layout at `out`."""
    lists = [lists] if isinstance(lists, str) else list(lists)
    if len(lists) not in (1, 3):
        raise DataError(f"import-casia-surf takes one list file (split 60/20/20) or three (train, val, test), "
                        f"got {len(lists)}")
    root = root or os.path.dirname(os.path.abspath(lists[0]))
    read = [read_list(p, root) for p in lists]
    if len(read) == 1:
        (files, labels), = read
        parts = {s: (files, labels, rows) for s, rows in stratified_split(labels).items()}
        how = f"stratified 60/20/20 of {lists[0]} (seed {SPLIT_SEED})"
    else:
        parts = {s: (f, y, np.arange(len(y))) for s, (f, y) in zip(("train", "val", "test"), read)}
        how = f"train / val / test: {', '.join(lists)}"
    modes = {m: image_mode(read[0][0][m][0]) for m in MODALITIES}
    columns = uint8_columns({m: (len(modes[m]), size, size) for m in MODALITIES})
    meta = multimodal_meta(MODALITIES, 2, CLASSES, source=f"CASIA-SURF lists {', '.join(map(os.path.abspath, lists))}",
                           root=os.path.abspath(root), split=how, modes=modes)
    with DecodePool(workers) as pool, \
            ImportWriter(out, os.path.basename(os.path.normpath(root)), columns, list(parts), meta) as w:
        for split, (files, labels, rows) in parts.items():
            # One task per (chunk, modality): the chunk's row is whole once its three come back.
            # One task per (chunk, modality), in MODALITIES order: a chunk's rows are whole once
            # its last modality comes back.
            tasks = (((idx, m), [files[m][r] for r in idx], modes[m])
                     for idx in chunks(rows, CHUNK_FILES) for m in MODALITIES)
            done: dict[str, np.ndarray] = {}
            for (idx, m), decoded in pool.decode_strict(tasks, size):
                done[m] = decoded
                if m == MODALITIES[-1]:
                    w.append(split, uint8_rows(done, labels[idx]))
                    done = {}
    return open_dataset(out)
