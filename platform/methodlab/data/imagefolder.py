"""`methodlab data import <folder> --out <path-or-s3>`: a class-per-subfolder image folder
(CIFAR, STL10, Flowers exported as files) into the platform's Parquet layout.

Images are converted to RGB, resized to size x size (Pillow), stored as float32 (3, size, size)
in [0, 1]; classes are the sorted subfolder names; a fixed stratified 60/20/20 split (seed 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from methodlab.data.builtin import stratified_split
from methodlab.data.dataset import DatasetInfo, write_dataset
from methodlab.errors import DataError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def import_image_folder(folder: str, out: str, size: int = 32) -> DatasetInfo:
    from PIL import Image, UnidentifiedImageError

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"image folder {folder} needs one subfolder per class (found {len(classes)})")
    images, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"class folder {root / cls} has no images ({', '.join(sorted(EXTENSIONS))})")
        for path in files:
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                    images.append(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            except (UnidentifiedImageError, OSError):
                raise DataError(f"{path} is not a readable image; remove or replace it") from None
            labels.append(label)
    x, y = np.stack(images), np.asarray(labels, dtype=np.int64)
    splits = stratified_split(y)
    return write_dataset(out, root.name, {s: {"image": x[i], "label": y[i]} for s, i in splits.items()},
                         {"num_classes": len(classes), "classes": classes, "source": str(root.resolve()),
                          "split": "stratified 60/20/20, seed 0"})
