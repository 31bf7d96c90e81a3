"""The stream loader (`data.loader=stream`): per-stage sources, schedule length, the seeded
shuffle, `data.limit_rows`, resume at the exact batch, and methods that train end to end on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methodlab.config import load_config
from methodlab.data import write_dataset
from methodlab.errors import ConfigError
from methodlab.registry import get_method, method_names
from methodlab.train.core import Hooks, Loop, LoopState, Stream, chunk_minibatches, stream_steps_per_epoch
from tests.conftest import tiny

CPU = torch.device("cpu")
CLASSES, PER_CLASS = 10, 200


# ----------------------------------------------------------------------------------------------
# Schedule length and per-stage sources, in process


def test_stream_steps_per_epoch_are_the_batches_of_an_equal_shard():
    """Ray Train gives each of `world` ranks n // world rows; an epoch of them has as many batches
    as `chunk_minibatches` cuts (a trailing one-row batch dropped, as the memory loader does)."""
    for n, world, bs in [(100, 2, 16), (97, 2, 16), (33, 1, 16), (1, 1, 8), (2, 1, 8), (5000, 3, 64)]:
        rows = n // world
        chunk = 32 * bs
        chunks = ({"x": np.zeros(min(chunk, rows - a), np.uint8)} for a in range(0, rows, chunk))
        assert stream_steps_per_epoch(n, world, bs) == max(1, len(list(chunk_minibatches(chunks, bs, CPU))))


def test_toast_streams_source_rows_for_pretune_and_schedules_by_each_sources_rows(home, monkeypatch):
    """TOAST in stream mode: the pretune stage trains on the source_train table only, the transfer
    stage on the train split, and each stage's schedulers are sized by its own source's rows."""
    from methodlab.data import resolve_dataset
    from methodlab.methods.toast import Toast
    from methodlab.train.core import load_bundle
    from methodlab.train.launch import stream_sources

    overrides = tiny("toast", "data.loader=stream", "train.batch_size=16")
    cfg = load_config("toast", None, overrides)
    info = resolve_dataset("digits_transfer", cfg.data.root)
    memory = load_bundle(load_config("toast", None, tiny("toast")), info, ["train", "val", "test"])
    streamed = load_bundle(cfg, info, ["train", "val", "test"])
    assert "train" not in streamed.splits
    sources = {"table:source_train": memory.tables["source_train"], "train": memory.splits["train"].tensors}
    assert stream_sources(cfg) == sorted(sources)
    seen: list[tuple[str, torch.Tensor]] = []

    def batches(source, seed, skip):
        for batch in _rows_in_batches(sources[source], 16):
            seen.append((source, batch["label"]))
            yield batch

    lengths = {}
    original = Toast.build_schedulers

    def build_schedulers(self, stage, optimizers, steps_per_epoch):
        lengths[stage] = steps_per_epoch
        return original(self, stage, optimizers, steps_per_epoch)

    monkeypatch.setattr(Toast, "build_schedulers", build_schedulers)
    method = Toast(cfg, streamed)
    rows = {s: len(t["label"]) for s, t in sources.items()}
    Loop(cfg, method, CPU, hooks=Hooks(), stream=Stream(rows=rows, batches=batches)).fit(LoopState())
    assert lengths == {"pretune": stream_steps_per_epoch(rows["table:source_train"], 1, 16),
                       "transfer": stream_steps_per_epoch(rows["train"], 1, 16)}
    pretune = torch.cat([labels for source, labels in seen if source == "table:source_train"])
    assert len(pretune) == rows["table:source_train"] and {s for s, _ in seen} == set(sources)


def _rows_in_batches(tensors: dict, bs: int):
    n = len(tensors["label"])
    return ({k: v[a:a + bs] for k, v in tensors.items()} for a in range(0, n, bs))


# ----------------------------------------------------------------------------------------------
# The order Ray Data streams: a real local Ray, no Train


@pytest.fixture()
def class_sorted(tmp_path):
    """2000 rows sorted by class (as an image-folder import writes them), 100 rows per file, with
    an `id` column that is the row's position in file order."""
    n = CLASSES * PER_CLASS
    split = {"image": np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] % 251, 48, 1).reshape(n, 3, 4, 4),
             "label": np.repeat(np.arange(CLASSES), PER_CLASS), "id": np.arange(n)}
    return write_dataset(str(tmp_path / "sorted"), "sorted", {"train": split, "val": split, "test": split},
                         {"num_classes": CLASSES}, rows_per_file=100)


@pytest.fixture()
def preserve_order():
    """What the trainer's DataConfig sets (launch.build_trainer), for iterating outside Train."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    yield
    options.preserve_order = before


def _epoch(cfg, ds, seed: int, skip: int = 0) -> list[torch.Tensor]:
    from methodlab.train.loop import stream_batches

    return [b["id"] for b in stream_batches(cfg, ds.iterator(), seed, CPU, skip)]


@pytest.mark.slow
@pytest.mark.parametrize("cache_mb", [1024, 0])
def test_class_sorted_data_streams_in_mixed_batches_seeded_and_new_each_epoch(ray_cluster, class_sorted,
                                                                              preserve_order, cache_mb):
    from methodlab.train.launch import stream_dataset

    cfg = load_config("supervised", None, ["data.loader=stream", "train.batch_size=32",
                                           "data.shuffle_buffer_rows=256", f"data.stream_cache_mb={cache_mb}"])
    ds = stream_dataset(cfg, class_sorted)
    first, again, second = _epoch(cfg, ds, 1), _epoch(cfg, ds, 1), _epoch(cfg, ds, 2)
    rows = torch.cat(first)
    assert sorted(rows.tolist()) == list(range(CLASSES * PER_CLASS))        # every row once
    assert all(b.dtype == torch.int64 for b in first)                       # the stored dtypes
    classes_per_batch = [len(set((b // PER_CLASS).tolist())) for b in first]
    assert np.mean(classes_per_batch) >= 3, classes_per_batch               # sorted input, mixed batches
    assert all(torch.equal(a, b) for a, b in zip(first, again))             # same seed, same order
    assert not torch.equal(rows, torch.cat(second))                         # another epoch, another order
    assert all(torch.equal(a, b) for a, b in zip(first[5:], _epoch(cfg, ds, 1, skip=5)))   # resume skips


@pytest.mark.slow
@pytest.mark.parametrize("cache_mb", [1024, 0])
def test_limit_rows_streams_the_first_rows(ray_cluster, class_sorted, preserve_order, cache_mb):
    from methodlab.train.launch import stream_dataset

    cfg = load_config("supervised", None, ["data.loader=stream", "train.batch_size=32", "data.limit_rows=300",
                                           f"data.stream_cache_mb={cache_mb}"])
    ds = stream_dataset(cfg, class_sorted)
    assert ds.count() == 300
    assert sorted(torch.cat(_epoch(cfg, ds, 0)).tolist()) == list(range(300))   # the memory loader's rows


# ----------------------------------------------------------------------------------------------
# Ray Train end to end


def _weights(cfg, run_id):
    from methodlab.models.hub import load_pretrained

    model, _ = load_pretrained(f"runs:/{run_id}", cfg.tracking.uri)
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.e2e
def test_streamed_run_resumes_mid_epoch_at_the_exact_batch(ray_cluster, home, monkeypatch):
    """A worker killed mid-epoch of a 2-worker streamed run: it restarts from the mid-epoch
    checkpoint, streams the same epoch order again (a function of the seed), skips the batches
    the checkpoint had trained and ends with the weights of an uninterrupted run."""
    from methodlab.train.launch import train

    base = ["data.loader=stream", "train.epochs=3", "train.batch_size=64", "scaling.num_workers=2",
            "train.checkpoint_every_steps=4"]
    straight_cfg = load_config("supervised", None, [*base, "train.run_name=stream-straight"])
    straight = train(straight_cfg)
    cfg = load_config("supervised", None, [*base, "train.run_name=stream-crashy", "train.max_failures=1"])
    monkeypatch.setenv("METHODLAB_FAULTS", "crash_at_step=22")    # epoch 3: after step 20's checkpoint
    survived = train(cfg)
    assert survived.status == "FINISHED"
    a, b = _weights(straight_cfg, straight.run_id), _weights(cfg, survived.run_id)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


STREAMING = [n for n in method_names() if "stream" in get_method(n).loaders]


@pytest.mark.parametrize("method", sorted(set(method_names()) - set(STREAMING)))
def test_a_method_that_cannot_stream_refuses_it_in_one_line(method):
    with pytest.raises(ConfigError, match=f"data.loader: method {method} supports auto, memory, not 'stream' .*; set data.loader=auto"):
        load_config(method, None, ["data.loader=stream"])


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("method", STREAMING)
def test_methods_train_end_to_end_streamed(ray_cluster, home, method):
    """Every method that streams, on 2 workers: e.g. TOAST pretunes on the streamed source_train
    table, then transfers; Bad Batches fits its linear probe and kNN bank from a streamed pass
    over each rank's train shard."""
    from methodlab.train.launch import train

    cfg = load_config(method, None, tiny(method, "data.loader=stream", "scaling.num_workers=2",
                                         f"train.run_name=streamed-{method}"))
    summary = train(cfg)
    assert summary.status == "FINISHED"
    assert summary.metrics[get_method(method).test_metric] >= 0
