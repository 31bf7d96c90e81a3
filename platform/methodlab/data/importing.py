"""What every dataset importer shares: the writer that gives uint8 columns the train split's exact
per-channel mean/std, the image-decoding process pool, MATLAB-file reading, and the one-line
summary. The importers themselves are `imagefolder` (`data import`), `gzsl` (`import-xlsa17`)
and the papers' formats (`cifar`, `stl10`, `flowers`, `casia`, `nyuv2`); `importers` is their
table, which the CLI and the tests read.

The decode pool: concurrent.futures, not Ray Data: an import is one machine's CPU work on local
files, and a pool needs no cluster (`ray.init` alone costs seconds). Workers decode chunks of
files; the parent writes each chunk as it comes back (in order, at most `window` chunks in
flight), so memory holds a few chunks, never the set. The pool forks its workers from a fork
server that imported this module once: forking the parent itself is unsafe when it runs threads
(Ray, gRPC, Arrow), and spawning re-imports torch per worker.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from methodlab import storage
from methodlab.data.dataset import Column, DatasetInfo, DatasetWriter, row_nbytes, split_rows
from methodlab.data.shared import fmt_bytes
from methodlab.errors import DataError

UINT8_SCALE = 1 / 255          # uint8 pixels decode to [0, 1]
PART_BYTES = 128 << 20         # part-file size the importers aim at


# ----------------------------------------------------------------------------------------------
# Writing


class ChannelStats:
    """Exact per-channel sums of uint8 values (N, C, ...) and of their squares: the mean and std
    do not depend on how the rows were chunked. 255^2 fits uint16, and 255^2 x pixels fits int64
    for any realistic dataset."""

    def __init__(self, channels: int):
        self.sums = np.zeros(channels, np.int64)
        self.squares = np.zeros(channels, np.int64)
        self.pixels = 0                              # values per channel so far

    def add(self, raw: np.ndarray) -> None:
        axes = (0, *range(2, raw.ndim))
        self.sums += raw.sum(axis=axes, dtype=np.int64)
        self.squares += np.square(raw, dtype=np.uint16).sum(axis=axes, dtype=np.int64)
        self.pixels += raw[:, 0].size

    def mean_std(self, scale: float) -> tuple[list[float], list[float]]:
        mean = self.sums * scale / self.pixels
        std = np.sqrt(np.maximum(self.squares * scale ** 2 / self.pixels - mean ** 2, 0.0))
        return mean.tolist(), np.where(std > 0, std, 1.0).tolist()   # a constant channel is left unscaled


class ImportWriter(DatasetWriter):
    """A DatasetWriter whose scaled image columns ((C, H, W) or more, uint8) get the per-channel
    mean and std of the decoded train split, accumulated from what is appended to it and set in
    the manifest on commit (the train split is streamed, so they are known only at the end).
    Part files are sized to about PART_BYTES. Like DatasetWriter, nothing is left at `root` when
    the block raises."""

    def __init__(self, root: str, name: str, columns: dict[str, Column], splits: list[str],
                 meta: dict[str, Any] | None = None, rows_per_file: int | None = None):
        super().__init__(root, name, columns, splits, meta,
                         rows_per_file or max(1, PART_BYTES // row_nbytes(columns)))
        # A flat scaled column (multimodal `packed`) has no channels to standardise.
        self.stats = {k: ChannelStats(c.shape[0]) for k, c in columns.items()
                      if c.scale is not None and len(c.shape) >= 3}

    def append(self, split: str, cols: dict[str, np.ndarray]) -> None:
        super().append(split, cols)
        if split == "train":
            for k, stats in self.stats.items():
                stats.add(cols[k])

    def _commit(self) -> None:
        for k, stats in self.stats.items():
            if not stats.pixels:
                raise DataError(f"dataset {self.name}: the train split has no rows; nothing to import")
            col = self.columns[k]
            self.columns[k] = Column(col.dtype, col.shape, col.scale, *stats.mean_std(col.scale))
        super()._commit()


def image_column(channels: int, size: int | tuple[int, int]) -> Column:
    h, w = (size, size) if isinstance(size, int) else size
    return Column("uint8", [channels, h, w], UINT8_SCALE)


def dataset_nbytes(uri: str) -> int:
    """Bytes of every file of a written dataset (parts, tables, manifest), as stored."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(uri)
    return sum(f.size for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
               if f.type == pafs.FileType.File)


def summary(info: DatasetInfo) -> str:
    """The line every import ends with: rows per split, classes, bytes written."""
    rows = ", ".join(f"{s} {split_rows(info, s):,}" for s in info.splits)
    return (f"imported {info.name} into {info.uri}: {rows} rows; {info.num_classes} classes; "
            f"{fmt_bytes(dataset_nbytes(info.uri))} written")


# ----------------------------------------------------------------------------------------------
# Reading source files


def load_mat(path: str) -> dict:
    """A MATLAB v5 file (scipy). Raises DataError naming the file."""
    from scipy.io import loadmat

    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist")
    try:
        return loadmat(path)
    except Exception as e:      # noqa: BLE001  scipy raises a different type per way a file is not MATLAB (MatReadError, IndexError, ...)
        raise DataError(f"{path} is not a readable MATLAB file ({str(e).splitlines()[0][:80]})") from None


def mat_field(mat: dict, name: str, path: str) -> np.ndarray:
    if name not in mat:
        raise DataError(f"{path} lacks field {name!r} (has {', '.join(k for k in mat if not k.startswith('__'))})")
    return np.asarray(mat[name])


def require_files(folder: str, names: Iterable[str], what: str) -> dict[str, str]:
    """{name: path} of files that must exist in `folder`; DataError naming the first missing one."""
    paths = {n: os.path.join(folder, n) for n in names}
    for path in paths.values():
        if not os.path.isfile(path):
            raise DataError(f"{path} does not exist; {what}")
    return paths


# ----------------------------------------------------------------------------------------------
# Decoding image files in a process pool


@dataclass
class Decoded:
    """What a worker sends back for a chunk of files: the readable ones, decoded."""

    images: np.ndarray          # (k, C, size, size) uint8, C = 1 for mode "L", 3 for "RGB"
    ok: np.ndarray              # (n,) bool over the chunk's files
    bad: list[tuple[str, str]]  # (path, why)
    pid: int


def decode_files(paths: list[str], size: int, mode: str = "RGB") -> Decoded:
    from PIL import Image

    channels = len(mode)                      # "RGB" -> 3, "L" -> 1
    images = np.empty((len(paths), channels, size, size), np.uint8)
    ok = np.zeros(len(paths), bool)
    bad: list[tuple[str, str]] = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR))
            images[i] = pixels.reshape(size, size, channels).transpose(2, 0, 1)   # (H, W, C) -> (C, H, W)
            ok[i] = True
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((path, str(e).splitlines()[0][:120] if str(e) else type(e).__name__))
    return Decoded(images[ok], ok, bad, os.getpid())


class DecodePool:
    """`workers` decoding processes (default: every CPU this process may use), shut down on
    leaving the `with` block.

        with DecodePool(workers) as pool:
            for key, chunk in pool.decode(((key, paths, "RGB") for ...), size): ...
    """

    def __init__(self, workers: int | None = None):
        self.workers = workers or len(os.sched_getaffinity(0))
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(cancel_futures=True)

    def decode(self, tasks: Iterable[tuple[Any, list[str], str]], size: int) -> Iterator[tuple[Any, Decoded]]:
        """(key, decoded chunk) for tasks (key, paths, mode), in submission order, with at most
        2 x workers chunks in flight: results the writer has not taken yet would otherwise pile up."""
        pending: deque = deque()
        for key, paths, mode in tasks:
            pending.append((key, self.pool.submit(decode_files, paths, size, mode)))
            if len(pending) >= 2 * self.workers:
                key0, future = pending.popleft()
                yield key0, future.result()
        while pending:
            key0, future = pending.popleft()
            yield key0, future.result()

    def decode_strict(self, tasks: Iterable[tuple[Any, list[str], str]], size: int) -> Iterator[tuple[Any, np.ndarray]]:
        """`decode` for formats whose rows all must decode: the first unreadable file is a
        DataError naming it."""
        for key, chunk in self.decode(tasks, size):
            if chunk.bad:
                path, why = chunk.bad[0]
                raise DataError(f"{path} is not a readable image ({why}); replace it or fix the list")
            yield key, chunk.images


def chunks(rows: np.ndarray, n: int) -> list[np.ndarray]:
    return [rows[i:i + n] for i in range(0, len(rows), n)]
