"""`methodlab data import <folder> --out <path-or-s3>`: a class-per-subfolder image folder
(CIFAR, STL10, Flowers exported as files) into the platform's Parquet layout.

    methodlab data import ~/images/flowers --out s3://bucket/datasets/flowers --size 64 --workers 8
    methodlab data import ~/images/flowers --out /data/flowers --skip-bad   # skip unreadable files

Classes are the sorted subfolder names (`meta["classes"]`); the split is the fixed stratified
60/20/20 one (seed 0), computed from the file listing before anything is decoded, so each file
goes to its split. Images are converted to RGB, resized to size x size (Pillow, bilinear) and
stored as uint8 (3, size, size) with `scale` 1/255 in the manifest: a quarter of float32's bytes,
decoded to float on the device. The image column's `mean` and `std` hold the per-channel mean and
std of the decoded [0, 1] values over the train split, from exact integer sums
(`importing.ImportWriter`).

Decoding runs in `importing`'s process pool (shared with the Flowers102 and CASIA-SURF
importers): workers decode chunks of files and the parent streams each chunk, in order, through
the writer, so memory holds a few chunks, never the set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from methodlab.data.builtin import stratified_split
from methodlab.data.dataset import Column, DatasetInfo, open_dataset
from methodlab.data.importing import DecodePool, ImportWriter, chunks, image_column
from methodlab.errors import DataError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CHUNK_FILES = 64              # files per worker task: amortises the IPC, bounds a row group


@dataclass
class ImageImport:
    info: DatasetInfo
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, why), in listing order
    worker_pids: set[int] = field(default_factory=set)


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


def import_image_folder(folder: str, out: str, size: int = 32, workers: int | None = None,
                        skip_bad: bool = False, rows_per_file: int | None = None,
                        chunk_files: int = CHUNK_FILES) -> ImageImport:
    """Decode `folder` on `workers` processes (default: the CPUs this process may use) into the
    dataset `out`. An unreadable image is a DataError naming it, and nothing is written, unless
    `skip_bad`: then it is left out and listed in the result's `skipped`."""
    classes, files, labels = list_image_folder(folder)
    columns = {"image": image_column(3, size), "label": Column("int64")}
    splits = stratified_split(labels)
    skipped: list[tuple[str, str]] = []
    pids: set[int] = set()
    meta = {"num_classes": len(classes), "classes": classes, "source": str(Path(folder).resolve()),
            "split": "stratified 60/20/20, seed 0"}
    with DecodePool(workers) as pool, \
            ImportWriter(out, Path(folder).name, columns, list(splits), meta, rows_per_file) as writer:
        for split, rows in splits.items():
            tasks = ((idx, [files[i] for i in idx], "RGB") for idx in chunks(rows, chunk_files))
            for idx, chunk in pool.decode(tasks, size):
                pids.add(chunk.pid)
                if chunk.bad and not skip_bad:
                    path, why = chunk.bad[0]
                    raise DataError(f"{path} is not a readable image ({why}); remove it or pass --skip-bad")
                skipped += chunk.bad
                writer.append(split, {"image": chunk.images, "label": labels[idx[chunk.ok]]})
        writer.meta["skipped"] = [p for p, _ in skipped]
    return ImageImport(open_dataset(out), skipped, pids)
