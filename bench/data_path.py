"""Data path: steady-state training throughput when batches come from Parquet through Ray Data
(`data.loader=stream`: Arrow -> tensors without per-row Python, prefetching), against the same
training step over tensors already in memory, measured in this process. Local files and the S3
endpoint (moto on 127.0.0.1); the built-in digits data and a 1M-row, 64-d scale set.
Goal: Ray Data >= 0.9x the in-memory loop.

The stream loader itself (`loop.stream_batches`: seeded block order, local shuffle buffer,
chunks cut in torch) against the memory loader on a real CNN step over 32x32x3 uint8 images
(goal >= 0.95x); and its peak RSS, in the process that trains, at two dataset sizes of such
images re-read from Parquet every epoch (goal: bounded, the same at both sizes).

    .venv/bin/python bench/data_path.py            # SCALE_ROWS=1000000, IMAGE_GB=0.3,1.2
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("METHODLAB_HOME", tempfile.mkdtemp(prefix="methodlab-bench-"))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import Figure, write_results  # noqa: E402
from methodlab import storage  # noqa: E402
from methodlab.data import prepare_builtin, write_dataset  # noqa: E402
from methodlab.train.launch import ensure_ray  # noqa: E402
from methodlab.train.core import chunk_minibatches, minibatches  # noqa: E402
from methodlab.train.loop import STREAM_CHUNK_BATCHES  # noqa: E402

BATCH = 1024
CPU = torch.device("cpu")
SCALE_ROWS = int(os.environ.get("SCALE_ROWS", 1_000_000))
CNN_ROWS = int(os.environ.get("CNN_ROWS", 20_000))            # 32x32x3 uint8 rows (61 MB)
IMAGE_GB = [float(g) for g in os.environ.get("IMAGE_GB", "0.3,1.2").split(",")]
IMAGE_SHAPE = (3, 32, 32)


def model_step(dim: int):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(dim, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def in_memory(x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    """Rows/s of the last epoch: the memory loader's path (a seeded permutation, minibatches)."""
    step = model_step(x[0].numel())
    rate = 0.0
    for _ in range(epochs):               # the last epoch is the steady state
        t0 = time.perf_counter()
        for b in minibatches({"x": x, "label": y}, torch.randperm(len(y)), BATCH, CPU):
            step(b["x"], b["label"])
        rate = len(y) / (time.perf_counter() - t0)
    return rate


def ray_data(uri: str, column: str, dim: int, epochs: int, cache: bool) -> float:
    """Rows/s of the last epoch: the stream loader's path (launch.build_trainer, loop.stream_batches)
    over a Ray Data read of the Parquet split, cached in the object store or re-read per epoch."""
    import ray.data

    fs = storage.filesystem(uri)[0] if storage.is_s3(uri) else None
    ds = ray.data.read_parquet(f"{uri}/train", filesystem=fs)
    if cache:
        ds = ds.materialize()
    step = model_step(dim)
    rate = 0.0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        chunks = ds.iter_batches(batch_size=STREAM_CHUNK_BATCHES * BATCH, batch_format="numpy", prefetch_batches=2)
        for b in chunk_minibatches(chunks, BATCH, CPU):
            step(b[column].float(), b["label"])
            n += len(b["label"])
        rate = n / (time.perf_counter() - t0)
    return rate


def cnn_step():
    """The supervised baseline's CNN on 32x32x3: uint8 in, converted on the device (the step)."""
    from methodlab.models import build_model

    net = build_model({"arch": "cnn", "kwargs": {"in_channels": 3, "num_classes": 10}})
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(net(x.float() / 255), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def image_split(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (rows, *IMAGE_SHAPE), dtype=np.uint8),
            "label": np.sort(rng.integers(0, 10, rows)).astype(np.int64)}   # class-sorted, as an import


def stream_cfg(batch: int, cache_mb: int):
    from methodlab.config import load_config

    return load_config("supervised", None, ["data.loader=stream", f"train.batch_size={batch}",
                                            f"data.stream_cache_mb={cache_mb}"])


def stream_epochs(cfg, ds, step, epochs: int) -> tuple[float, int]:
    """Rows/s of the last epoch of `loop.stream_batches` over `ds` feeding `step`, and the peak
    RSS (bytes) of this process."""
    import resource

    from methodlab.train.loop import stream_batches

    rate = 0.0
    for epoch in range(epochs):
        t0, n = time.perf_counter(), 0
        for b in stream_batches(cfg, ds.iterator(), epoch, CPU, 0):
            step(b["image"], b["label"])
            n += len(b["label"])
        rate = n / (time.perf_counter() - t0)
    return rate, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cnn_figures(tmp: str) -> list[Figure]:
    """The stream loader against the memory loader on the same CNN step, 32x32x3 uint8."""
    from methodlab.train.launch import stream_dataset

    batch = 128
    split = image_split(CNN_ROWS)
    info = write_dataset(f"{tmp}/cnn", "cnn", {"train": split, "val": split, "test": split}, {"num_classes": 10},
                         rows_per_file=CNN_ROWS // 8)
    x, y = torch.from_numpy(split["image"]), torch.from_numpy(split["label"])
    torch.manual_seed(0)
    step = cnn_step()
    memory = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        for b in minibatches({"image": x, "label": y}, torch.randperm(len(y)), batch, CPU):
            step(b["image"], b["label"])
        memory = len(y) / (time.perf_counter() - t0)
    cfg = stream_cfg(batch, 1024)
    streamed, _ = stream_epochs(cfg, stream_dataset(cfg, info), cnn_step(), epochs=2)
    return [Figure("cnn_32x32x3_stream_loader", streamed / memory, "same CNN step, memory loader",
                   {"rows_per_s": streamed, "memory_rows_per_s": memory, "rows": CNN_ROWS, "batch_size": batch},
                   goal=">= 0.95")]


def rss_figures(tmp: str) -> list[Figure]:
    """Peak RSS of a process (a Ray task, as a Train worker is one) that trains one epoch with the
    stream loader on images re-read from Parquet (larger than the cache), at each of IMAGE_GB."""
    import ray

    from methodlab.train.launch import stream_dataset

    @ray.remote(num_cpus=0.5)
    def train_one_epoch(cfg, ds):
        torch.set_num_threads(1)
        step = model_step(int(np.prod(IMAGE_SHAPE)))
        return stream_epochs(cfg, ds, lambda x, y: step(x.float(), y), epochs=1)

    row_bytes = int(np.prod(IMAGE_SHAPE))
    cfg = stream_cfg(256, 0)
    peaks = {}
    for gb in IMAGE_GB:
        rows = int(gb * 2**30 / row_bytes)
        per_file = 20_000
        split = image_split(rows)
        small = {k: v[:256] for k, v in split.items()}
        info = write_dataset(f"{tmp}/img{gb}", "images", {"train": split, "val": small, "test": small},
                             {"num_classes": 10}, rows_per_file=per_file)
        del split
        t0 = time.perf_counter()
        rate, peak = ray.get(train_one_epoch.remote(cfg, stream_dataset(cfg, info)))
        peaks[gb] = {"rows": rows, "dataset_bytes": rows * row_bytes, "peak_rss_bytes": peak,
                     "rows_per_s": rate, "epoch_s": time.perf_counter() - t0}
    small, large = IMAGE_GB[0], IMAGE_GB[-1]
    return [Figure(f"stream_peak_rss_{large:g}GB_vs_{small:g}GB", peaks[large]["peak_rss_bytes"] / peaks[small]["peak_rss_bytes"],
                   f"peak RSS at {small:g} GB", {f"{gb:g}GB": v for gb, v in peaks.items()},
                   goal="~1.0 (bounded, independent of size)")]


def main() -> None:
    import ray
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # moto's per-request lines
    ensure_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    storage.configure(type("S", (), {"endpoint_url": f"http://{host}:{port}", "region": "us-east-1"})())
    storage.s3_client().create_bucket(Bucket="bench")
    tmp = tempfile.mkdtemp(prefix="methodlab-datapath-")
    figures = []
    try:
        digits = prepare_builtin("digits", tmp)
        from methodlab.data import read_split
        d = read_split(digits, "train")
        x, y = torch.from_numpy(d["image"]), torch.from_numpy(d["label"])
        base = in_memory(x, y, epochs=4)
        s3_digits = prepare_builtin("digits", "s3://bench/data").uri
        for where, uri in [("local", digits.uri), ("s3", s3_digits)]:
            for cache in (True, False):
                rate = ray_data(uri, "image", 64, epochs=4, cache=cache)
                name = f"digits_ray_data_{where}_{'cached' if cache else 'reread'}"
                figures.append(Figure(name, rate / base, "in-memory tensor loop",
                                      {"rows_per_s": rate, "in_memory_rows_per_s": base}, goal=">= 0.9"))

        # The real job: supervised CNN on digits through Ray Train, memory loader against stream.
        from overhead import through_methodlab
        steady = {loader: statistics.median(through_methodlab(1, f"datapath-{loader}", (f"data.loader={loader}",))[1][1:])
                  for loader in ("memory", "stream")}
        figures.append(Figure("digits_train_job_stream", steady["memory"] / steady["stream"], "same job, memory loader",
                              {"stream_epoch_s": steady["stream"], "memory_epoch_s": steady["memory"]}, goal=">= 0.9"))

        rng = np.random.default_rng(0)
        feats = rng.standard_normal((SCALE_ROWS, 64), dtype=np.float32)
        labels = rng.integers(0, 10, SCALE_ROWS).astype(np.int64)
        split = {"features": feats, "label": labels}
        write_dataset(f"{tmp}/scale", "scale", {"train": split, "val": split, "test": split},
                      {"num_classes": 10}, rows_per_file=SCALE_ROWS // 8)
        base = in_memory(torch.from_numpy(feats), torch.from_numpy(labels), epochs=2)
        for cache in (True, False):
            rate = ray_data(f"{tmp}/scale", "features", 64, epochs=2, cache=cache)
            name = f"scale_{SCALE_ROWS}x64_ray_data_local_{'cached' if cache else 'reread'}"
            figures.append(Figure(name, rate / base, "in-memory tensor loop",
                                  {"rows_per_s": rate, "in_memory_rows_per_s": base}, goal=">= 0.9"))
        del feats, labels, split
        figures += cnn_figures(tmp)
        figures += rss_figures(tmp)
    finally:
        server.stop()
        ray.shutdown()
    write_results("data_path", figures, {"batch_size": BATCH, "scale_rows": SCALE_ROWS, "cnn_rows": CNN_ROWS,
                                         "image_gb": IMAGE_GB})


if __name__ == "__main__":
    main()
