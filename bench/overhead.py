"""Platform overhead: the same model, data and number of steps run
  (a) in a plain single-process PyTorch loop,
  (b) through methodlab on 1 Ray Train worker,
  (c) through methodlab on 2 workers (DDP, each on half the data per epoch).
Steady-state time per epoch (the median period between epochs after the first, including the
checkpoint, report and MLflow write) and start-up time are reported separately, each
as a ratio against the plain loop measured in this same process. Goal: steady-state <= 1.05x.

    .venv/bin/python bench/overhead.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("METHODLAB_HOME", tempfile.mkdtemp(prefix="methodlab-bench-"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import Figure, write_results  # noqa: E402
from methodlab.config import load_config  # noqa: E402
from methodlab.data import resolve_dataset, read_split  # noqa: E402
from methodlab.methods.base import SplitData, classify_accuracy  # noqa: E402
from methodlab.models import build_model  # noqa: E402
from methodlab.train.loop import epoch_seed, shard_indices  # noqa: E402

EPOCHS, BATCH = 8, 32
OVERRIDES = [f"train.epochs={EPOCHS}", f"train.batch_size={BATCH}"]


def plain_loop(cfg) -> tuple[float, list[float]]:
    """The baseline: what a researcher would write by hand, same model, data order and eval."""
    # Ray Train gives each worker OMP_NUM_THREADS = its CPU share (1 here); the baseline gets the
    # same, so the ratio measures the platform rather than a different thread count.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    info = resolve_dataset("digits", cfg.data.root)
    train = {k: torch.from_numpy(v) for k, v in read_split(info, "train").items()}
    val = SplitData({k: torch.from_numpy(v) for k, v in read_split(info, "val").items()})
    model = build_model({"arch": "cnn", "kwargs": {"in_channels": 1, "num_classes": 10}})
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    startup = time.perf_counter() - t0
    epochs = []
    for epoch in range(EPOCHS):
        t = time.perf_counter()
        model.train()
        idx = shard_indices(len(train["label"]), 0, 1, epoch_seed(cfg.train.seed, 0, epoch))
        for s in range(0, len(idx), BATCH):
            rows = idx[s:s + BATCH]
            loss = F.cross_entropy(model(train["image"][rows]), train["label"][rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        classify_accuracy(model, val, torch.device("cpu"))
        epochs.append(time.perf_counter() - t)
    return startup, epochs


def through_methodlab(workers: int, tag: str, extra: tuple[str, ...] = ()) -> tuple[float, list[float], float]:
    from methodlab.tracking import Tracker
    from methodlab.train.launch import ensure_ray, train

    ensure_ray()
    cfg = load_config("supervised", None, [*OVERRIDES, *extra, f"scaling.num_workers={workers}", f"train.run_name=overhead-{tag}"])
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    client = Tracker(cfg.tracking.uri, cfg.tracking.experiment).client
    # Epoch period = time between consecutive epochs' MLflow records: training, evaluation,
    # the checkpoint, report() and the MLflow write, i.e. everything the platform adds.
    stamps = [m.timestamp / 1000 for m in sorted(client.get_metric_history(summary.run_id, "epoch"), key=lambda m: m.step)]
    first = client.get_metric_history(summary.run_id, "epoch_seconds")
    first_epoch = min(first, key=lambda m: m.step).value
    periods = [first_epoch] + [b - a for a, b in zip(stamps, stamps[1:])]
    return wall - sum(periods), periods, wall


def main() -> None:
    cfg = load_config("supervised", None, OVERRIDES)
    plain_startup, plain_epochs = plain_loop(cfg)
    plain_steady = statistics.median(plain_epochs[1:])
    figures = []
    for workers in (1, 2):
        startup, epochs, wall = through_methodlab(workers, f"w{workers}")
        steady = statistics.median(epochs[1:])
        figures.append(Figure(f"steady_state_epoch_{workers}worker", steady / plain_steady, "plain torch loop",
                              {"epoch_s": steady, "plain_epoch_s": plain_steady, "steps_per_epoch_per_worker":
                               -(-1078 // workers // BATCH)}, goal="<= 1.05"))
        figures.append(Figure(f"startup_{workers}worker", startup / max(plain_startup, 1e-3), "plain torch loop",
                              {"startup_s": startup, "plain_startup_s": plain_startup, "run_wall_s": wall}))
    write_results("overhead", figures, {"epochs": EPOCHS, "batch_size": BATCH, "model": "cnn", "dataset": "digits"})


if __name__ == "__main__":
    main()
