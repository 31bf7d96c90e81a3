"""`methodlab data import <folder> --out <path-or-s3>`: a class-per-subfolder image folder
(CIFAR, STL10, Flowers exported as files) into the platform's Parquet layout.

    methodlab data import ~/images/flowers --out s3://bucket/datasets/flowers --size 64 --workers 8
    methodlab data import ~/images/flowers --out /data/flowers --skip-bad   # skip unreadable files

Classes are the sorted subfolder names (`meta["classes"]`); the split is the fixed stratified
60/20/20 one (seed 0), computed from the file listing before anything is decoded, so each file
goes to its split. Images are converted to RGB, resized to size x size (Pillow, bilinear) and
stored as uint8 (3, size, size) with `scale` 1/255 in the manifest: a quarter of float32's bytes,
decoded to float on the device. The image column's `mean` and `std` hold the per-channel mean and std of the
decoded [0, 1] values over the train split, from exact integer sums the workers accumulate.

Decoding runs in a process pool (concurrent.futures), not Ray Data: an import is one machine's
CPU work on local files, and a pool needs no cluster (`ray.init` alone costs seconds). Workers
decode chunks of files; the parent writes each chunk as it comes back (in order, at most
2 x workers chunks in flight) through DatasetWriter, so memory holds a few chunks, never the set.
The pool forks its workers from a fork server that imported this module once: forking the parent
itself is unsafe when it runs threads (Ray, gRPC, Arrow), and spawning re-imports torch per worker.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from methodlab.data.builtin import stratified_split
from methodlab.data.dataset import Column, DatasetInfo, DatasetWriter, open_dataset
from methodlab.errors import DataError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CHUNK_FILES = 64              # files per worker task: amortises the IPC, bounds a row group
PART_BYTES = 128 << 20        # default part-file size


@dataclass
class ImageImport:
    info: DatasetInfo
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, why), in listing order
    worker_pids: set[int] = field(default_factory=set)


@dataclass
class _Chunk:
    """What a worker sends back for a chunk of files: the readable ones, decoded."""

    images: np.ndarray          # (k, 3, size, size) uint8
    ok: np.ndarray              # (n,) bool over the chunk's files
    bad: list[tuple[str, str]]
    sums: np.ndarray            # (3,) int64: per-channel sum of the uint8 values
    squares: np.ndarray         # (3,) int64: per-channel sum of their squares
    pid: int


def _decode(paths: list[str], size: int) -> _Chunk:
    from PIL import Image

    images = np.empty((len(paths), 3, size, size), np.uint8)
    ok = np.zeros(len(paths), bool)
    bad: list[tuple[str, str]] = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                images[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
            ok[i] = True
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((path, str(e).splitlines()[0][:120] if str(e) else type(e).__name__))
    images = images[ok]
    # Exact integers: 255^2 fits uint16, and 255^2 x pixels fits int64 for any realistic folder.
    squares = np.square(images, dtype=np.uint16).sum(axis=(0, 2, 3), dtype=np.int64)
    return _Chunk(images, ok, bad, images.sum(axis=(0, 2, 3), dtype=np.int64), squares, os.getpid())


def list_image_folder(folder: str) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, files, labels) of a class-per-subfolder folder, in a fixed order. Raises DataError."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"image folder {folder} needs one subfolder per class (found {len(classes)})")
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = sorted(str(p) for p in (root / cls).rglob("*") if p.suffix.lower() in EXTENSIONS)
        if not found:
            raise DataError(f"class folder {root / cls} has no images ({', '.join(sorted(EXTENSIONS))})")
        files += found
        labels += [label] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _pool(workers: int) -> ProcessPoolExecutor:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(workers, mp_context=ctx)


def import_image_folder(folder: str, out: str, size: int = 32, workers: int | None = None,
                        skip_bad: bool = False, rows_per_file: int | None = None,
                        chunk_files: int = CHUNK_FILES) -> ImageImport:
    """Decode `folder` on `workers` processes (default: the CPUs this process may use) into the
    dataset `out`. An unreadable image is a DataError naming it, and nothing is written, unless
    `skip_bad`: then it is left out and listed in the result's `skipped`."""
    classes, files, labels = list_image_folder(folder)
    workers = workers or len(os.sched_getaffinity(0))
    rows_per_file = rows_per_file or max(1, PART_BYTES // (3 * size * size))
    columns = {"image": Column("uint8", [3, size, size], 1 / 255), "label": Column("int64")}
    splits = stratified_split(labels)
    skipped: list[tuple[str, str]] = []
    pids: set[int] = set()
    sums, squares, pixels = np.zeros(3, np.int64), np.zeros(3, np.int64), 0
    pool = _pool(workers)
    try:
        with DatasetWriter(out, Path(folder).name, columns, list(splits), rows_per_file=rows_per_file) as writer:
            for split, rows in splits.items():
                chunks = [rows[i:i + chunk_files] for i in range(0, len(rows), chunk_files)]
                for idx, chunk in _in_order(pool, chunks, files, size, 2 * workers):
                    pids.add(chunk.pid)
                    if chunk.bad and not skip_bad:
                        path, why = chunk.bad[0]
                        raise DataError(f"{path} is not a readable image ({why}); remove it or pass --skip-bad")
                    skipped += chunk.bad
                    writer.append(split, {"image": chunk.images, "label": labels[idx[chunk.ok]]})
                    if split == "train":
                        sums, squares, pixels = sums + chunk.sums, squares + chunk.squares, pixels + chunk.images[:, 0].size
            if not pixels:
                raise DataError(f"image folder {folder} has no readable image in its train split; add images")
            mean = sums / (255.0 * pixels)
            std = np.sqrt(np.maximum(squares / (255.0 ** 2 * pixels) - mean ** 2, 0.0))
            std = np.where(std > 0, std, 1.0)          # a constant channel is left unscaled
            # The train split's stats, known once it is streamed: in the column, as every scaled
            # column carries them (data.normalize).
            writer.columns["image"] = Column("uint8", [3, size, size], 1 / 255, mean.tolist(), std.tolist())
            writer.meta.update({"num_classes": len(classes), "classes": classes,
                                "source": str(Path(folder).resolve()), "split": "stratified 60/20/20, seed 0",
                                "skipped": [p for p, _ in skipped]})
    finally:
        pool.shutdown(cancel_futures=True)
    return ImageImport(open_dataset(out), skipped, pids)


def _in_order(pool: ProcessPoolExecutor, chunks: list[np.ndarray], files: list[str], size: int, window: int):
    """(row indices, decoded chunk) in submission order, with at most `window` chunks in flight:
    results the writer has not taken yet would otherwise pile up in memory."""
    pending: deque = deque()
    for idx in chunks:
        pending.append((idx, pool.submit(_decode, [files[i] for i in idx], size)))
        if len(pending) >= window:
            idx0, future = pending.popleft()
            yield idx0, future.result()
    while pending:
        idx0, future = pending.popleft()
        yield idx0, future.result()
