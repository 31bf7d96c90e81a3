"""The Ray-free training core (`methodlab.train.core`) and the collectives it shares with the
methods (`methodlab.distributed`): world size 1 against 2 in real gloo process groups, exact
mid-epoch resume, best-epoch selection, one read per log interval, and the NaN stop."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from methodlab import distributed
from methodlab.config import load_config
from methodlab.registry import get_method, method_names
from methodlab.train.core import (FINAL_STAGE_EPOCH, Hooks, Loop, LoopState, LossMeter, load_bundle, seed_everything,
                                  steps_per_epoch)
from tests.conftest import spawn_world, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def _method(name: str, *extra: str):
    from methodlab.train.launch import dataset_for

    cfg = load_config(name, None, tiny(name, "scaling.num_workers=1", *extra))
    return get_method(name)(cfg, load_bundle(cfg, dataset_for(cfg), ["train", "val", "test"]))


# ----------------------------------------------------------------------------------------------
# Sharded evaluation: world size 1 against 2, for every registered method


def _final_stage_models(method) -> dict:
    """Untrained but seeded models of every stage in order (the final stage's are evaluated)."""
    seed_everything(0)
    models: dict = {}
    for stage in method.stages:
        models = method.build_models(stage, models)
    return models


def _evaluate_every_method() -> dict:
    out = {}
    for name in method_names():
        method = _method(name)
        models = _final_stage_models(method)
        stage = method.stages[-1]
        out[name] = {**method.evaluate(stage, models, "val", CPU), **method.evaluate(stage, models, "test", CPU)}
    return out


@pytest.mark.slow
def test_sharded_evaluation_equals_single_rank_evaluation_for_every_method(home):
    single = _evaluate_every_method()            # also prepares the built-in datasets once
    ranks = spawn_world(_evaluate_every_method, 2)
    assert ranks[0] == ranks[1], "ranks disagree on a global metric"
    for name in method_names():
        assert ranks[0][name].keys() == single[name].keys(), name
        for key, value in single[name].items():
            assert ranks[0][name][key] == pytest.approx(value, abs=1e-12), f"{name}: {key}"


# ----------------------------------------------------------------------------------------------
# Collectives with gradients: the method does not depend on the worker count


def _nt_xent_and_batchnorm(z1, z2, x, rows):
    """This rank's slice of a global batch: NT-Xent with gathered negatives and a global
    BatchNorm; returns the loss, the gradients and the BN statistics."""
    from methodlab.losses.nt_xent import nt_xent

    rank, world = distributed.world()
    part = slice(rank * rows // world, (rank + 1) * rows // world)
    a, b = z1[part].clone().requires_grad_(), z2[part].clone().requires_grad_()
    loss = nt_xent(a, b, 0.5, gather=True)
    loss.backward()
    torch.manual_seed(0)
    bn = distributed.convert_batchnorm(torch.nn.BatchNorm1d(x.shape[1]), CPU)
    xs = x[part].clone().requires_grad_()
    y = bn(xs)
    (y * torch.arange(1.0, x.numel() + 1).view_as(x)[part]).sum().backward()    # one loss, split by rows
    return {"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad, "y": y.detach(),
            "grad_x": xs.grad, "mean": bn.running_mean, "var": bn.running_var}


@pytest.mark.slow
def test_gathered_negatives_and_global_batchnorm_match_one_rank_with_the_global_batch():
    gen = torch.Generator().manual_seed(3)
    rows = 8
    z1, z2, x = torch.randn(rows, 5, generator=gen), torch.randn(rows, 5, generator=gen), \
        torch.randn(rows, 3, generator=gen) * 2 + 1
    one = _nt_xent_and_batchnorm(z1, z2, x, rows)
    ranks = spawn_world(_nt_xent_and_batchnorm, 2, z1, z2, x, rows)
    # The mean of the ranks' losses (what DDP's gradient follows) is the one-rank loss; the
    # gather's backward hands each rank the gradient of their sum, which DDP's mean divides by 2.
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, one["loss"])
    for key in ("grad_a", "grad_b"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]) / 2, one[key])
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), one["y"])
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), one["grad_x"])
    for key in ("mean", "var"):
        torch.testing.assert_close(ranks[0][key], one[key])
        torch.testing.assert_close(ranks[1][key], one[key])


def _meter_reads(per_rank_losses):
    rank, world = distributed.world()
    meter = LossMeter(CPU, world)
    for step, value in enumerate(per_rank_losses[rank]):
        meter.add({"loss": torch.tensor(value)}, step)
    interval, extra = meter.read(len(per_rank_losses[rank]) - 1, "test", [float(rank == 0)])
    return {"interval": interval, "extra": extra, "means": meter.means()}


@pytest.mark.slow
def test_train_metrics_are_global_when_the_ranks_see_different_losses():
    losses = [[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]]
    ranks = spawn_world(_meter_reads, 2, losses)
    assert ranks[0] == ranks[1]
    assert ranks[0]["means"]["loss"] == pytest.approx(66.0 / 6)
    assert ranks[0]["extra"] == [1.0]         # rank 0's checkpoint decision reaches every rank


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(1, 4), st.integers(1, 64))
def test_shard_range_covers_every_row_once(n, world, bs):
    rows = [r for rank in range(world) for r in range(*distributed.shard_range(n, rank, world))]
    assert rows == list(range(n))
    sizes = [b - a for a, b in (distributed.shard_range(n, r, world) for r in range(world))]
    assert max(sizes) - min(sizes) <= 1
    # steps_per_epoch agrees with the memory loader's batch count
    from methodlab.train.core import minibatches, shard_indices

    if n:
        idx = shard_indices(n, 0, world, 0)
        assert steps_per_epoch(n, world, bs) == max(1, len(list(minibatches({"x": torch.arange(n)}, idx, bs, CPU))))


# ----------------------------------------------------------------------------------------------
# The loop, in process


class Capture(Hooks):
    """Records every checkpoint's state (built on the spot) and the reported epochs."""

    def __init__(self):
        self.states: list[LoopState] = []
        self.reports: list[dict] = []
        self.scores: list[float | None] = []

    def on_epoch_end(self, state, report, checkpoint, timer):
        self.reports.append(dict(report))
        if checkpoint is not None:
            self.states.append(copy.deepcopy(checkpoint.build()))
            self.scores.append(checkpoint.score)


def _fit(method, hooks=None, state=None):
    seed_everything(method.cfg.train.seed)
    loop = Loop(method.cfg, method, CPU, hooks=hooks)
    return loop.fit(state or LoopState())


def _assert_same_weights(a: dict, b: dict):
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after resume"


@pytest.mark.parametrize("name", method_names())
def test_mid_epoch_resume_ends_with_the_weights_of_an_uninterrupted_run(home, name):
    """A checkpoint every 2 steps, resumed from the first one taken mid-epoch: every method's
    models end bit-identical to a run that never stopped."""
    overrides = ("train.checkpoint_every_steps=2", "train.epochs=2")
    straight = _fit(_method(name, *overrides), hooks=(capture := Capture()))
    mid = [s for s in capture.states if s.batch > 0]
    assert mid, f"{name}: no mid-epoch checkpoint (steps per epoch too few?)"
    resumed_method = _method(name, *overrides)
    resumed_method.load_state_dict(mid[0].method)
    resumed = _fit(resumed_method, state=copy.deepcopy(mid[0]))
    _assert_same_weights(straight, resumed)


class ScriptedMetric:
    """Replaces a method's evaluate: the metric follows a script, so the best epoch is known."""

    def __init__(self, method, values):
        self.method, self.values, self.calls = method, list(values), 0
        method.evaluate = self

    def __call__(self, stage, models, split, device):
        if split == "test":
            return {"test_acc": 0.0}
        value = self.values[self.calls]
        self.calls += 1
        return {"val_acc": value}


@pytest.mark.parametrize("register", ["best", "last"])
def test_the_registered_model_is_the_best_epoch_by_default(home, register):
    method = _method("supervised", "train.epochs=3", f"tracking.register={register}")
    ScriptedMetric(method, [0.5, 0.9, 0.3])
    capture = Capture()
    final = _fit(method, hooks=capture)
    # What Ray ranks checkpoints by (num_to_keep keeps the best plus the latest): the metric.
    assert capture.scores == [0.5, 0.9, 0.3]
    best_epoch, last = capture.states[1], capture.states[-1]
    assert last.complete and last.best["history_step"] == 2 and last.best["metrics"] == {"val_acc": 0.9}
    chosen = best_epoch if register == "best" else last
    exported = last.exported["state_dict"]
    for k, v in chosen.models["net"].items():
        assert torch.equal(exported[k], v), k
    # The final checkpoint keeps the last epoch's models (a longer resubmit continues from them).
    for k, v in final["net"].state_dict().items():
        assert torch.equal(last.models["net"][k], capture.states[-1].models["net"][k])


@pytest.mark.parametrize("name", method_names())
def test_the_metric_is_measured_only_in_the_final_stage_whose_epochs_asha_counts(home, name):
    """A sweep's ASHA counts FINAL_STAGE_EPOCH (`sweep._fit`) and ignores a report without it: it
    is in the final stage's reports only, 1 to that stage's epochs, each with the method's metric.
    So a teacher or pretune stage never counts towards a rung, and a metric an earlier stage
    reports too (D3GZSL's teacher has a val_H) is never compared."""
    method = _method(name, "train.epochs=2", "train.eval_every=1")
    capture = Capture()
    _fit(method, hooks=capture)
    final = [r for r in capture.reports if r["stage"] == method.stages[-1]]
    assert [r.get(FINAL_STAGE_EPOCH) for r in final] == [1, 2]
    assert all(method.metric in r for r in final), final
    assert all(FINAL_STAGE_EPOCH not in r for r in capture.reports if r["stage"] != method.stages[-1])


def test_checkpoint_state_is_built_only_when_a_checkpoint_is_due(home, monkeypatch):
    method = _method("supervised", "train.epochs=4", "train.checkpoint_every=2")
    built = []
    monkeypatch.setattr(Loop, "build_state", lambda self, state, *a, **k: built.append(state.history_step) or state)
    _fit(method, hooks=Capture())
    assert built == [2, 4]


class NanAfter(Hooks):
    def __init__(self, step):
        self.step = step

    def corrupt_losses(self, state, losses):
        return {k: v * float("nan") for k, v in losses.items()} if state.step >= self.step else losses


def test_a_non_finite_loss_stops_the_run_naming_the_term_and_the_steps(home):
    method = _method("supervised", "train.epochs=3", "train.log_every_steps=4")
    per_epoch = steps_per_epoch(len(method.train_split("train")), 1, method.cfg.train.batch_size)
    with pytest.raises(FloatingPointError, match=r"non-finite loss loss=nan in steps (\d+)-(\d+) \(stage train, "
                                                 r"epoch 2\); lower train.lr") as err:
        _fit(method, hooks=NanAfter(per_epoch + 1))
    first, last = map(int, err.value.args[0].split("in steps ")[1].split(" ")[0].split("-"))
    assert first <= per_epoch + 1 <= last and last - first < 4


def test_one_host_read_per_log_interval(home, monkeypatch):
    """Losses are read (all-reduced and copied to the host) once per train.log_every_steps steps
    and once at the end of each epoch, not per step."""
    reads = []
    original = LossMeter.read
    monkeypatch.setattr(LossMeter, "read", lambda self, *a, **k: reads.append(1) or original(self, *a, **k))
    method = _method("supervised", "train.epochs=2", "train.log_every_steps=5", "data.limit_rows=400",
                     "train.batch_size=20")
    _fit(method)
    per_epoch = steps_per_epoch(400, 1, 20)
    assert per_epoch == 20 and len(reads) == 2 * (per_epoch // 5 + 1)


def test_eval_every_skips_evaluations_but_never_the_last_epoch(home):
    method = _method("supervised", "train.epochs=4", "train.eval_every=3")
    capture = Capture()
    _fit(method, hooks=capture)
    assert ["val_acc" in r for r in capture.reports] == [False, False, True, True]
    assert "test_acc" in capture.reports[-1]


class Clock:
    """A wall clock the test moves: one second per reading."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_wall_clock_checkpoints_come_mid_epoch_when_due(home):
    """train.checkpoint_every_s is checked at every log interval (rank 0's clock decides), so a
    long epoch gets checkpoints inside it, which resume at their batch."""
    method = _method("supervised", "train.epochs=1", "train.checkpoint_every=0", "train.checkpoint_every_s=3",
                     "train.log_every_steps=2", "data.limit_rows=320", "train.batch_size=32")
    capture = Capture()
    seed_everything(0)
    Loop(method.cfg, method, CPU, hooks=capture, clock=Clock()).fit(LoopState())
    mid = [s.batch for s in capture.states if s.batch > 0]
    assert capture.scores[0] is None           # a mid-epoch checkpoint has no metric: never "best"
    # 10 steps, a read every 2 (each reads the clock once; so does taking a checkpoint): 3 s have
    # passed at the third read (step 6); after it, only the last epoch's own checkpoint comes.
    assert mid == [6] and capture.states[-1].complete


class Progress(Hooks):
    """Progress on this rank every 3 s of the loop's clock."""

    progress_every_s = 3.0

    def __init__(self):
        self.calls = []

    def on_progress(self, state, stage, done, total, rate, losses):
        self.calls.append((stage, done, total, dict(losses)))


def test_progress_comes_by_the_wall_clock_with_the_last_losses_read_and_no_read_of_its_own(home, monkeypatch):
    """A progress call every train.log_every_s of rank 0's clock (here: one second per reading,
    one reading per step), carrying the losses of the loop's last read; the reads (host syncs)
    stay one per log interval and one per epoch end."""
    reads = []
    original = LossMeter.read
    monkeypatch.setattr(LossMeter, "read", lambda self, *a, **k: reads.append(original(self, *a, **k)) or reads[-1])
    method = _method("supervised", "train.epochs=1", "train.log_every_steps=4", "data.limit_rows=320",
                     "train.batch_size=32")
    hooks = Progress()
    seed_everything(0)
    Loop(method.cfg, method, CPU, hooks=hooks, clock=Clock()).fit(LoopState())
    # 10 steps; the clock's readings: 1 (the loop), 2 (the epoch's progress clock), then one per step.
    assert [(s, d, t) for s, d, t, _ in hooks.calls] == [("train", 3, 10), ("train", 6, 10), ("train", 9, 10)]
    assert len(reads) == 10 // 4 + 1
    assert [c[3] for c in hooks.calls] == [{}, reads[0][0], reads[1][0]] and reads[0][0]["loss"] > 0


def _fit_supervised_two_epochs():
    method = _method("supervised", "train.epochs=2", "data.limit_rows=256", "train.batch_size=32")
    capture = Capture()
    models = _fit(method, hooks=capture)
    return {"weights": models["net"].state_dict(), "reports": capture.reports}


@pytest.mark.slow
def test_the_core_trains_data_parallel_without_ray(home):
    """Under a plain torch.distributed group (torchrun's setting) the core wraps the model in DDP
    itself: the ranks end with the same weights and report the same global metrics."""
    _fit_supervised_two_epochs()                  # prepares the dataset once
    ranks = spawn_world(_fit_supervised_two_epochs, 2)
    for k, v in ranks[0]["weights"].items():
        assert torch.equal(v, ranks[1]["weights"][k]), k
    strip = [{k: v for k, v in r.items() if not k.startswith("time_") and k != "epoch_seconds"}
             for r in ranks[0]["reports"]]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("time_") and k != "epoch_seconds"}
                     for r in ranks[1]["reports"]]


@pytest.mark.parametrize("name", [n for n in method_names() if len(get_method(n).stages) > 1])
def test_mlflow_records_each_epoch_at_its_global_step_with_its_stage_named(home, name):
    """What rank 0 spools per epoch (`RayHooks._epoch_record`) for a multi-stage method: the
    global optimizer step at the epoch's end (also from a mid-epoch checkpoint's state, whose
    counter has moved on), the epoch over all stages, and every stage but the last under
    `<stage>/`, so the method's metric is the final stage's; no `epoch` or `step` metric."""
    from methodlab.train.loop import ATTEMPT_METRICS, RayHooks

    method = _method(name, "train.checkpoint_every_steps=2")
    _fit(method, hooks=(capture := Capture()))
    stages = method.stages
    records = {}
    for state in (s for s in capture.states if s.metrics):      # (before the first epoch ends: none)
        metrics, step, epoch = RayHooks._epoch_record(state, {}, stages)
        assert records.setdefault(epoch, (metrics, step)) == (metrics, step), "a mid-epoch state differs"
        if state.batch == 0:
            assert step == state.step
    assert list(records) == list(range(1, len(records) + 1)) and len(records) == capture.reports[-1]["epoch"]
    steps = [step for _, step in records.values()]
    assert steps == sorted(set(steps))
    by_stage = [r["stage"] for r in capture.reports if "epoch_seconds" in r]
    for (metrics, _), stage in zip(records.values(), by_stage):
        assert not {"epoch", "step"} & set(metrics)
        named = {k for k in metrics if k not in ATTEMPT_METRICS}
        if stage == stages[-1]:
            assert not any("/" in k for k in named)
        else:
            assert named and all(k.startswith(f"{stage}/") for k in named)
    assert method.metric in records[len(records)][0]
