"""Data path: steady-state training throughput when batches come from Parquet through Ray Data
(`data.loader=stream`: Arrow -> tensors without per-row Python, prefetching), against the same
training step over tensors already in memory, measured in this process. Local files and the S3
endpoint (moto on 127.0.0.1); the built-in digits data and a 1M-row, 64-d scale set.
Goal: Ray Data >= 0.9x the in-memory loop.

    .venv/bin/python bench/data_path.py            # SCALE_ROWS=1000000 by default
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import Figure, write_results  # noqa: E402
from methodlab import storage  # noqa: E402
from methodlab.data import prepare_builtin, write_dataset  # noqa: E402

BATCH = 1024
SCALE_ROWS = int(os.environ.get("SCALE_ROWS", 1_000_000))


def model_step(dim: int):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(dim, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def in_memory(x: torch.Tensor, y: torch.Tensor, epochs: int = 2) -> float:
    step = model_step(x[0].numel())
    rate = 0.0
    for _ in range(epochs):               # the last epoch is the steady state
        t0 = time.perf_counter()
        perm = torch.randperm(len(y))
        for s in range(0, len(y), BATCH):
            rows = perm[s:s + BATCH]
            step(x[rows], y[rows])
        rate = len(y) / (time.perf_counter() - t0)
    return rate


def ray_data(uri: str, column: str, dim: int, epochs: int = 2) -> float:
    import ray.data

    fs = storage.filesystem(uri)[0] if storage.is_s3(uri) else None
    ds = ray.data.read_parquet(f"{uri}/train", filesystem=fs)
    step = model_step(dim)
    rate = 0.0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for b in ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=4, local_shuffle_buffer_size=4 * BATCH):
            step(b[column].float(), b["label"])
            n += len(b["label"])
        rate = n / (time.perf_counter() - t0)
    return rate


def main() -> None:
    import ray
    from moto.server import ThreadedMotoServer

    ray.init(num_cpus=2, include_dashboard=False)
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
        for where, uri in [("local", digits.uri), ("s3", prepare_builtin("digits", "s3://bench/data").uri)]:
            rate = ray_data(uri, "image", 64, epochs=4)
            figures.append(Figure(f"digits_ray_data_{where}", rate / base, "in-memory tensor loop",
                                  {"rows_per_s": rate, "in_memory_rows_per_s": base}, goal=">= 0.9"))

        rng = np.random.default_rng(0)
        feats = rng.standard_normal((SCALE_ROWS, 64), dtype=np.float32)
        labels = rng.integers(0, 10, SCALE_ROWS).astype(np.int64)
        split = {"features": feats, "label": labels}
        write_dataset(f"{tmp}/scale", "scale", {"train": split, "val": split, "test": split},
                      {"num_classes": 10}, rows_per_file=SCALE_ROWS // 8)
        base = in_memory(torch.from_numpy(feats), torch.from_numpy(labels))
        rate = ray_data(f"{tmp}/scale", "features", 64)
        figures.append(Figure(f"scale_{SCALE_ROWS}x64_ray_data_local", rate / base, "in-memory tensor loop",
                              {"rows_per_s": rate, "in_memory_rows_per_s": base}, goal=">= 0.9"))
    finally:
        server.stop()
        ray.shutdown()
    write_results("data_path", figures, {"batch_size": BATCH, "scale_rows": SCALE_ROWS})


if __name__ == "__main__":
    main()
