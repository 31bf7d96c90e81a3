"""Image-folder import: images/s of `methodlab data import` (the process pool decoding, the
streaming Parquet writer) against a single-process PIL loop over the same files (decode, RGB,
resize into a uint8 array, nothing written), measured in this process.

    .venv/bin/python bench/data_import.py          # IMAGES=6000 64x64 JPEGs in 10 classes, resized to 32

A second folder (IMAGES/4 256x256 JPEGs resized to 64) is the regime where decoding, not the
pool's fixed costs (forking workers, IPC, the Parquet writer), dominates. The first import of a process also starts the pool's fork server (which imports methodlab once);
that cold run is reported on its own, the figures are warm medians.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("METHODLAB_HOME", tempfile.mkdtemp(prefix="methodlab-bench-"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from common import Figure, timeit, write_results  # noqa: E402
from methodlab.data.imagefolder import import_image_folder, list_image_folder  # noqa: E402

IMAGES = int(os.environ.get("IMAGES", 6000))
CLASSES = 10
CASES = [(IMAGES, 64, 32), (IMAGES // 4, 256, 64)]      # (images, source side, --size)


def make_folder(root: str, images: int, source: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        where = f"{root}/class{i % CLASSES}"
        os.makedirs(where, exist_ok=True)
        # Smooth gradients plus noise: JPEG-typical content, not incompressible noise.
        base = np.linspace(0, 255, source, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1, 3)
        pixels = np.clip(base + rng.normal(0, 20, (source, source, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(f"{where}/{i:06d}.jpg", quality=90)


def pil_loop(files: list[str], size: int) -> np.ndarray:
    out = np.empty((len(files), 3, size, size), np.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as im:
            out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
    return out


def measure(images: int, source: int, size: int) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="methodlab-import-") as tmp:
        folder, out = f"{tmp}/images", f"{tmp}/out"
        make_folder(folder, images, source)
        _, files, _ = list_image_folder(folder)
        t0 = time.perf_counter()
        import_image_folder(folder, out, size=size, workers=2)
        cold_s = time.perf_counter() - t0
        loop_s = timeit(lambda: pil_loop(files, size), repeat=3)
        runs = {w: timeit(lambda w=w: import_image_folder(folder, out, size=size, workers=w), repeat=3)
                for w in (1, 2)}
    loop_rate = images / loop_s
    common = {"images": images, "source": f"{source}x{source} jpeg", "size": size, "cpus": os.cpu_count(),
              "pil_loop_images_per_s": loop_rate}
    return [
        Figure(f"data_import_{source}to{size}_2workers", images / runs[2] / loop_rate, "single-process PIL loop",
               {**common, "images_per_s": images / runs[2], "cold_first_import_images_per_s": images / cold_s},
               goal=">1 on 2 cores"),
        Figure(f"data_import_{source}to{size}_1worker", images / runs[1] / loop_rate, "single-process PIL loop",
               {**common, "images_per_s": images / runs[1]}),
    ]


def main() -> None:
    write_results("data_import", [f for case in CASES for f in measure(*case)])


if __name__ == "__main__":
    main()
