"""Bad Batches: the exact Fréchet distance, NT-Xent, the curation rule, and the method's guarantees
(infinite threshold = plain SimCLR bit for bit; a dropped batch changes nothing; ranks agree)."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from methodlab.config import load_config
from methodlab.errors import ConfigError
from methodlab.losses.nt_xent import nt_xent
from methodlab.methods.bad_batches import (BadBatches, build_augment, cosine_factor, detrended_threshold, keep_batch,
                                           knn_predict, linear_probe, planned_steps, quantile_threshold)
from methodlab.methods.base import DataBundle, StepContext
from methodlab.metrics.frechet import feature_stats, frechet_distance
from tests.conftest import tiny

# -- an independent reference: pytorch-fid's formula with scipy's sqrtm --------------------------


def fd_reference(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _features(seed: int, n: int, d: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / math.sqrt(d)          # correlated, non-diagonal covariance
    return torch.from_numpy(rng.normal(size=(n, d)) @ mix * scale + shift)


def _scale(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x.var(0).sum() + y.var(0).sum() + (x.mean(0) - y.mean(0)).square().sum()) + 1e-12


shapes = st.tuples(st.integers(2, 40), st.integers(2, 40), st.integers(1, 24))   # n1, n2, d
seeds = st.integers(0, 2**31 - 1)
FD = settings(max_examples=60, deadline=None)
# Round-off bound relative to the scale of the inputs: square roots of eigenvalues that are 0 up to
# round-off (~1e-16) contribute ~1e-8 on the eigen routes (see methodlab.metrics.frechet).
EPS = 1e-7


@FD
@given(shapes, seeds, st.floats(0.1, 3.0), st.floats(-2.0, 2.0))
def test_fd_is_nonnegative_and_symmetric(shape, seed, scale, shift):
    n1, n2, d = shape
    x, y = _features(seed, n1, d), _features(seed + 1, n2, d, scale, shift)
    fxy, fyx = float(frechet_distance(x, y)), float(frechet_distance(y, x))
    assert fxy >= -EPS * _scale(x, y)
    assert fxy == pytest.approx(fyx, abs=EPS * _scale(x, y))


@FD
@given(st.integers(2, 40), st.integers(1, 24), seeds)
def test_fd_of_a_set_with_itself_is_zero(n, d, seed):
    x = _features(seed, n, d)
    assert abs(float(frechet_distance(x, x))) <= EPS * _scale(x, x)
    assert abs(float(frechet_distance(x, feature_stats(x)))) <= EPS * _scale(x, x)


@FD
@given(shapes, seeds, st.floats(-5.0, 5.0), st.floats(0.1, 10.0))
def test_fd_translation_rotation_and_scaling(shape, seed, shift, a):
    n1, n2, d = shape
    x, y = _features(seed, n1, d), _features(seed + 1, n2, d, 1.5, 0.3)
    base = float(frechet_distance(x, y))
    tol = EPS * _scale(x, y)
    c = torch.from_numpy(np.random.default_rng(seed + 2).normal(size=d) * shift)
    q, _ = torch.linalg.qr(torch.from_numpy(np.random.default_rng(seed + 3).normal(size=(d, d))))
    assert float(frechet_distance(x + c, y + c)) == pytest.approx(base, abs=tol * (1 + shift ** 2))
    assert float(frechet_distance(x @ q, y @ q)) == pytest.approx(base, abs=tol)
    assert float(frechet_distance(a * x, a * y)) == pytest.approx(a * a * base, abs=a * a * tol)
    # FD(X + c, X) = ||c||^2: only the means differ
    assert float(frechet_distance(x + c, x)) == pytest.approx(float(c.square().sum()), abs=tol * (1 + shift ** 2))


def _diagonal_sample(seed: int, n: int, d: int, mu: np.ndarray, sigma: np.ndarray) -> torch.Tensor:
    """n rows whose sample mean is exactly mu and sample covariance exactly diag(sigma^2); at most
    n-1 of the sigma can be non-zero (the rank of a centred n-row sample)."""
    rng = np.random.default_rng(seed)
    k = int((sigma > 0).sum())
    raw = rng.normal(size=(n, k))
    q, _ = np.linalg.qr(raw - raw.mean(0))                  # centred orthonormal columns
    z = np.zeros((n, d))
    z[:, sigma > 0] = q * math.sqrt(n - 1) * sigma[sigma > 0]
    return torch.from_numpy(z + mu)


@FD
@given(st.integers(1, 12), st.integers(0, 20), seeds)
def test_fd_closed_form_for_diagonal_covariances(d, extra_rows, seed):
    """FD = ||mu1 - mu2||^2 + sum_i (sigma1_i - sigma2_i)^2, on both routes: n > d (eigh) and
    n <= d (nuclear norm), and with precomputed statistics."""
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    n = d + 1 + extra_rows if extra_rows % 2 else max(2, min(d, extra_rows + 2))
    k = min(d, n - 1)
    s1, s2 = np.zeros(d), np.zeros(d)
    s1[:k], s2[:k] = rng.uniform(0.1, 3, size=k), rng.uniform(0.1, 3, size=k)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    x, y = _diagonal_sample(seed, n, d, mu1, s1), _diagonal_sample(seed + 1, n, d, mu2, s2)
    stats2 = (torch.from_numpy(mu2), torch.from_numpy(np.diag(s2 ** 2)))
    assert float(frechet_distance(x, y)) == pytest.approx(expected, rel=EPS, abs=EPS)
    assert float(frechet_distance(x, stats2)) == pytest.approx(expected, rel=EPS, abs=EPS)
    assert float(frechet_distance(feature_stats(x), stats2)) == pytest.approx(expected, rel=EPS, abs=EPS)


@settings(max_examples=40, deadline=None)
@given(shapes, seeds, st.floats(0.2, 3.0))
def test_fd_agrees_with_scipy_sqrtm_including_n_below_d(shape, seed, scale):
    n1, n2, d = shape
    x, y = _features(seed, n1, d), _features(seed + 1, n2, d, scale, 0.5)
    ref = fd_reference(x.numpy(), y.numpy())
    for value in (frechet_distance(x, y), frechet_distance(x, feature_stats(y)),
                  frechet_distance(feature_stats(x), feature_stats(y))):
        assert float(value) == pytest.approx(ref, rel=1e-4, abs=1e-7 * _scale(x, y))


def test_fd_routes_nuclear_and_eigh_on_wide_features():
    """n <= d (the nuclear-norm route) on the shapes the benchmark uses, against scipy."""
    x, y = _features(0, 64, 128), _features(1, 48, 128, 2.0, 0.1)
    assert float(frechet_distance(x, y)) == pytest.approx(fd_reference(x.numpy(), y.numpy()), rel=1e-4)
    assert float(frechet_distance(x.float(), y.float())) == pytest.approx(float(frechet_distance(x, y)), rel=1e-4)
    assert frechet_distance(x.float().requires_grad_(), y.float()).requires_grad is False


# -- NT-Xent ------------------------------------------------------------------------------------


def nt_xent_reference(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """Eq. 1 of Chen et al. 2020, one anchor at a time, in float64."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n, total = len(z1), 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        logits = np.array([z[i] @ z[k] / t for k in range(2 * n) if k != i])
        total += -(z[i] @ z[pos] / t) + np.log(np.exp(logits).sum())
    return total / (2 * n)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 16), st.integers(1, 12), st.floats(0.05, 2.0), seeds)
@example(n=2, d=1, t=0.125, seed=743232)     # a loss of 2e-7: only the absolute tolerance holds
def test_nt_xent_bounds_permutation_and_reference(n, d, t, seed):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    loss = float(nt_xent(z1, z2, t))
    lo, hi = math.log1p((2 * n - 2) * math.exp(-2 / t)), math.log1p((2 * n - 2) * math.exp(2 / t))
    assert lo - 1e-4 <= loss <= hi * (1 + 1e-5)
    # float32 logits reach 1/t = 20, whose spacing is 2e-6: a loss near 0 is only that exact.
    near = {"rel": 1e-5, "abs": 1e-5}
    perm = torch.randperm(n, generator=g)
    assert float(nt_xent(z1[perm], z2[perm], t)) == pytest.approx(loss, **near)
    assert float(nt_xent(z2, z1, t)) == pytest.approx(loss, **near)
    assert float(nt_xent(3.0 * z1, z2, t)) == pytest.approx(loss, **near)     # cosine similarity
    assert loss == pytest.approx(nt_xent_reference(z1.numpy(), z2.numpy(), t), rel=1e-4, abs=1e-5)


def test_nt_xent_prefers_aligned_views():
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert float(nt_xent(z, z, 0.5)) < float(nt_xent(z, torch.roll(z, 1, 0), 0.5))


# -- the curation rule ----------------------------------------------------------------------------

frds = st.floats(0, 1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(frds, frds, st.floats(0, 1e6))
def test_threshold_rule_is_monotone(frd, t, delta):
    if keep_batch(frd, t):
        assert keep_batch(frd, t + delta)
    assert keep_batch(frd, math.inf)


@settings(max_examples=100, deadline=None)
@given(st.lists(frds, min_size=1, max_size=50), frds, st.floats(0.01, 0.99), st.floats(0.01, 0.99))
def test_quantile_rule_is_monotone_in_q(window, frd, q1, q2):
    lo, hi = sorted((q1, q2))
    # dropping a larger top fraction keeps fewer batches: kept at q=hi implies kept at q=lo
    if keep_batch(frd, quantile_threshold(window, hi)):
        assert keep_batch(frd, quantile_threshold(window, lo))
    assert keep_batch(frd, quantile_threshold([], hi))          # an empty window keeps everything
    assert keep_batch(min(window), quantile_threshold(window, hi))      # the minimum is never dropped
    assert quantile_threshold(window, hi) == pytest.approx(float(np.quantile(window, 1 - hi)), rel=1e-9, abs=1e-9)


def _dropped_fraction(scores: np.ndarray, q: float, window: int, rule) -> float:
    """The curation rule run over a sequence of batch scores, as `BadBatches.train_step` runs it:
    each score is judged against the window of the scores before it, then joins the window."""
    from collections import deque

    recent: deque[float] = deque(maxlen=window)
    dropped = 0
    for v in scores.tolist():
        dropped += not keep_batch(v, rule(recent, q))
        recent.append(v)
    return dropped / len(scores)


@settings(max_examples=12, deadline=None)
@given(st.floats(0.05, 0.3), st.floats(0.0, 0.5), st.floats(0.0, 20.0), st.floats(200.0, 2000.0),
       st.sampled_from(["normal", "exponential"]), seeds)
def test_detrended_window_drops_the_quantile_of_a_drifting_score(q, slope, amp, tau, noise, seed):
    """FRD drifts upward while the encoder trains. A monotone trend (linear plus a saturating
    rise, in units of the noise's spread) with symmetric or skewed noise: the detrended rule drops
    q of the batches (tolerance: 4 binomial standard deviations of 2000 decisions at q = 0.3,
    plus a little for the trend's curvature within a window)."""
    rng = np.random.default_rng(seed)
    t = np.arange(2000)
    scores = slope * t + amp * (1 - np.exp(-t / tau)) + getattr(rng, noise)(size=len(t))
    assert _dropped_fraction(scores, q, 100, detrended_threshold) == pytest.approx(q, abs=0.05)


def test_raw_window_overdrops_a_drifting_score():
    """Why the detrending exists: against the raw trailing window, the same kind of drift drops
    far more than q (the review measured 26-46% at q=0.2 in training); without a drift both
    rules drop q."""
    rng = np.random.default_rng(0)
    t = np.arange(2000)
    drifting, flat = 0.02 * t + rng.normal(size=len(t)), rng.normal(size=len(t))
    assert _dropped_fraction(drifting, 0.2, 100, quantile_threshold) > 0.3
    for rule in (quantile_threshold, detrended_threshold):
        assert _dropped_fraction(flat, 0.2, 100, rule) == pytest.approx(0.2, abs=0.04)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=60), st.floats(-1e3, 1e3), st.floats(-10, 10),
       st.floats(0.01, 0.99), st.floats(0.01, 0.99))
def test_detrended_threshold_follows_a_linear_trend_and_is_monotone_in_q(window, a, b, q1, q2):
    n = len(window)
    shifted = [v + a + b * i for i, v in enumerate(window)]
    base = detrended_threshold(window, q1)
    if n == 0:
        assert base == math.inf
        return
    scale = 1 + max(abs(v) for v in window) + abs(a) + abs(b) * n
    tol = 1e-9 * scale
    if n >= 3:        # with fewer, it is the raw quantile (no line to fit), which only shifts by a
        assert detrended_threshold(shifted, q1) == pytest.approx(base + a + b * n, abs=tol)
    lo, hi = sorted((q1, q2))
    assert detrended_threshold(window, hi) <= detrended_threshold(window, lo) + tol
    # a window exactly on a line: the threshold is the line's next point
    assert detrended_threshold([a + b * i for i in range(max(n, 3))], q1) == pytest.approx(a + b * max(n, 3), abs=tol)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10_000), st.integers(0, 10_000))
def test_cosine_factor_anneals_to_zero_and_stays(total, step):
    assert cosine_factor(0, total) == 1.0 and cosine_factor(total, total) == pytest.approx(0.0, abs=1e-15)
    assert 0.0 <= cosine_factor(step, total) <= 1.0
    assert cosine_factor(step + 1, total) <= cosine_factor(step, total)
    if step >= total:
        assert cosine_factor(step, total) == cosine_factor(total, total)      # not periodic


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 500), st.integers(0, 500), st.integers(0, 500), st.floats(0, 1))
def test_planned_steps_counts_the_steps_a_run_takes(accepted, uncurated, curated, rate):
    plan = planned_steps(accepted, uncurated, curated, rate)
    assert plan >= 1
    assert accepted + uncurated <= plan <= max(1, accepted + uncurated + curated)
    assert planned_steps(accepted, uncurated, curated, 0.0) == max(1, accepted + uncurated)
    assert planned_steps(accepted, uncurated, curated, 1.0) == max(1, accepted + uncurated + curated)


# -- the method, in process ---------------------------------------------------------------------

TINY = ["method.arch_kwargs={width: 4, blocks: [1]}", "method.proj_hidden=16", "method.proj_dim=8",
        "train.batch_size=16", "method.warmup_epochs=0"]


@functools.cache
def _bundle(dataset: str = "digits"):
    from methodlab.data import resolve_dataset
    from methodlab.train.core import load_bundle

    cfg = load_config("bad_batches", None, ["data.limit_rows=96"])
    return load_bundle(cfg, resolve_dataset(dataset, cfg.data.root), ["train", "val", "test"])


def _run(*overrides: str, steps: int = 3, seed: int = 0, check=None, dataset: str = "digits"):
    """Train `steps` batches in process (no Ray); returns the method, its models and the outputs."""
    from methodlab.train.core import memory_batches

    cfg = load_config("bad_batches", None, [*TINY, *overrides])
    torch.manual_seed(seed)
    method = BadBatches(cfg, DataBundle(_bundle(dataset).info, _bundle(dataset).splits, {}))
    models = method.build_models("train", {})
    opts = method.build_optimizers("train", models)
    scheds = method.build_schedulers("train", opts, steps)
    ctx = StepContext(stage="train", epoch=0, step=0, device=torch.device("cpu"), rank=0, world_size=1,
                      extra={"schedulers": scheds})
    method.on_epoch_start("train", models, ctx)
    outs = []
    batches = memory_batches(cfg, method.train_split("train"), seed, 0, 1, torch.device("cpu"))
    for step, batch in zip(range(steps), batches):
        ctx.step = step
        before = copy.deepcopy(models["net"].state_dict())
        out = method.train_step("train", models, opts, batch, ctx)
        outs.append(out)
        if check:
            check(before, models["net"].state_dict(), out, opts, scheds)
    return method, models, outs


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_infinite_threshold_is_plain_simclr_bit_for_bit():
    _, plain, _ = _run("method.curation=none")
    for comparison in ("views_vs_originals", "view_vs_view"):
        method, curated, outs = _run("method.curation=threshold", f"method.frd_threshold={1.7e308}",
                                     f"method.comparison={comparison}")
        assert all(float(o["dropped"]) == 0.0 for o in outs) and method.accepted == len(outs)
        assert _same(plain["net"].state_dict(), curated["net"].state_dict())


def test_a_dropped_batch_changes_nothing_and_a_kept_one_steps():
    seen = {"kept": 0, "dropped": 0}

    def check(before, after, out, opts, scheds):
        if float(out["dropped"]) == 1.0:
            seen["dropped"] += 1
            assert _same(before, after)          # parameters and BatchNorm buffers
        else:
            seen["kept"] += 1
            assert not _same(before, after)

    # q=0.5: after the first batch about half of the batches are over the running median
    method, _, outs = _run("method.curation=quantile", "method.frd_quantile=0.5", steps=6, check=check)
    assert seen["kept"] >= 1 and seen["dropped"] >= 1
    assert method.accepted == seen["kept"]
    assert all(isinstance(float(o["frd"]), float) and not o["frd"].requires_grad for o in outs)

    # every batch dropped: no optimizer step, no scheduler step, no optimizer state
    def unchanged(before, after, out, opts, scheds):
        assert _same(before, after) and not opts["opt"].state and scheds["lr"].last_epoch == 0

    method, models, outs = _run("method.curation=threshold", "method.frd_threshold=1e-12", steps=3,
                                check=unchanged)
    assert method.accepted == 0 and all(float(o["dropped"]) == 1.0 for o in outs)


@pytest.mark.parametrize("comparison", ["view_vs_view", "views_vs_originals"])
@pytest.mark.parametrize("features", ["projection", "backbone"])
def test_the_frd_compares_exactly_the_named_feature_sets(comparison, features, monkeypatch):
    """Spies on the FRD and the augmentation, and recomputes both feature sets independently with
    the encoder as it was before the step: view_vs_view compares view 1's n rows with view 2's,
    views_vs_originals both views' 2n rows with the un-augmented batch's n."""
    import methodlab.methods.bad_batches as bb

    scored, augmented, before = [], [], []
    real_fd, real_augment = bb.frechet_distance, BadBatches.augment

    def fd_spy(a, b):
        scored.append((a.clone(), b.clone()))
        return real_fd(a, b)

    def augment_spy(self, images):
        out = real_augment(self, images)
        augmented.append((images.clone(), out.clone()))
        return out

    monkeypatch.setattr(bb, "frechet_distance", fd_spy)
    monkeypatch.setattr(BadBatches, "augment", augment_spy)
    method, models, outs = _run("method.curation=threshold", "method.frd_threshold=1e300",
                                f"method.comparison={comparison}", f"method.frd_features={features}",
                                steps=1, check=lambda b, *_: before.append(b))
    (a, b), = scored
    (images, view1), (again, view2) = augmented
    assert torch.equal(images, again) and not torch.equal(view1, view2)
    net = copy.deepcopy(models["net"])
    net.load_state_dict(before[0])                   # the encoder that scored the batch
    net.train()                                      # batch statistics, as in the training forward
    pick = 1 if features == "projection" else 0
    with torch.no_grad():
        views = net(torch.cat([view1, view2]))[pick]
        n = len(images)
        expected = (views[:n], views[n:]) if comparison == "view_vs_view" else (views, net(images)[pick])
    assert a.shape == expected[0].shape and b.shape == expected[1].shape
    assert torch.allclose(a, expected[0], atol=1e-6) and torch.allclose(b, expected[1], atol=1e-6)
    assert float(outs[0]["frd"]) == pytest.approx(float(real_fd(*expected)), rel=1e-5)


def test_colour_jitter_and_grayscale_apply_to_rgb_images_only():
    cfg = load_config("bad_batches", None, ["method.saturation=0.4", "method.hue=0.1", "method.grayscale_p=1.0",
                                            "method.noise_std=0.0"]).method
    rgb, gray = build_augment(cfg, (16, 16), 3), build_augment(cfg, (16, 16), 1)
    assert len(rgb) == len(gray) + 3
    out = rgb(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)
    assert gray(torch.rand(4, 1, 16, 16)).shape == (4, 1, 16, 16)


def _fit(*overrides: str) -> tuple[BadBatches, dict, "object"]:
    """A whole run in process (the training core, no Ray); returns the method, its scheduler and
    the final loop state."""
    from methodlab.train.core import Loop, LoopState

    cfg = load_config("bad_batches", None, [*TINY, *overrides])
    torch.manual_seed(0)
    method = BadBatches(cfg, DataBundle(_bundle().info, _bundle().splits, {}))
    built = {}
    schedulers = method.build_schedulers

    def keep(stage, optimizers, per_epoch):
        built.update(schedulers(stage, optimizers, per_epoch))
        return built

    method.build_schedulers = keep
    state = LoopState()
    Loop(cfg, method, torch.device("cpu")).fit(state)
    return method, built, state


@pytest.mark.parametrize("rule", [["method.curation=quantile", "method.frd_quantile=0.5"],
                                  ["method.curation=threshold"]])
def test_cosine_runs_over_the_steps_taken_not_the_batches_drawn(rule, monkeypatch):
    """Every other batch is dropped (the rule's decision is pinned), 3 epochs of 6 batches: 9
    optimizer steps. The quantile rule plans 9 from the start (1 - q of 18); the threshold rule
    plans 18 (its kept share is unknown), then 3 + 12 x 0.5 = 9 once epoch 1 has shown it. Both
    end at a learning rate of 0 after the 9th step; counting every batch drawn (T_max = 18) it
    ended at half of it."""
    import itertools

    import methodlab.methods.bad_batches as bb

    pattern = itertools.cycle([True, False])
    monkeypatch.setattr(bb, "keep_batch", lambda frd, threshold: next(pattern))
    lrs = []
    step = BadBatches.train_step

    def recording(self, stage, models, optimizers, batch, ctx):
        out = step(self, stage, models, optimizers, batch, ctx)
        lrs.append((self.accepted, self.planned, optimizers["opt"].param_groups[0]["lr"]))
        return out

    monkeypatch.setattr(BadBatches, "train_step", recording)
    method, sched, state = _fit("train.epochs=3", *rule, "method.probe_steps=2")
    lr = method.cfg.train.lr
    assert method.per_epoch == 6 and method.accepted == 9 and state.step == 18
    assert sched["lr"].last_epoch == 9 and method.planned == 9
    # the learning rate after each batch is the cosine at the steps taken of the plan
    assert all(got == pytest.approx(lr * cosine_factor(taken, plan), abs=1e-12) for taken, plan, got in lrs)
    assert lrs[-1][2] == pytest.approx(0.0, abs=1e-12)
    assert [p for _, p, _ in lrs[:6]] == [9 if "method.curation=quantile" in rule else 18] * 6
    assert state.metrics["train_dropped"] == 0.5


def test_dropped_fraction_is_an_epoch_metric():
    method, _, state = _fit("train.epochs=2", "method.warmup_epochs=1", "method.frd_quantile=0.3",
                            "method.probe_steps=2")
    kept = [r[3] for r in method.records]            # the last epoch's decisions
    assert len(kept) == 6 and 0 < sum(kept) < 6
    assert state.metrics["train_dropped"] == pytest.approx(1 - sum(kept) / len(kept))
    assert method.planned == planned_steps(6, 0, 6, 0.7)


def test_warmup_scores_but_never_drops_and_state_survives_resume():
    method, _, outs = _run("method.curation=threshold", "method.frd_threshold=1e-12",
                           "method.warmup_epochs=1", steps=3)
    assert all(float(o["dropped"]) == 0.0 for o in outs) and len(method.window) == 3
    assert method.threshold(0) == math.inf and method.threshold(1) == pytest.approx(1e-12)
    method, _, _ = _run("method.frd_quantile=0.2", steps=5)
    fresh = BadBatches(method.cfg, method.data)
    fresh.load_state_dict(method.state_dict())
    assert list(fresh.window) == list(method.window) and fresh.accepted == method.accepted
    assert fresh.threshold(3) == method.threshold(3) < math.inf


def test_frozen_extractor_scores_with_a_loaded_model(tmp_path):
    from methodlab.models import build_model
    from methodlab.models.hub import save_pretrained

    spec = {"arch": "resnet", "kwargs": {"in_channels": 1, "num_classes": 10, "width": 4, "blocks": [1]}}
    save_pretrained(build_model(spec), spec, str(tmp_path / "ref.pt"))
    method, models, outs = _run("method.extractor=frozen", f"method.extractor_uri={tmp_path / 'ref.pt'}",
                                "method.curation=threshold", "method.frd_threshold=1e6", steps=2)
    assert not any(p.requires_grad for p in models["extractor"].parameters())
    assert all(float(o["frd"]) > 0 for o in outs)
    with pytest.raises(ConfigError, match="extractor_uri"):
        load_config("bad_batches", None, ["method.extractor=frozen"])


def test_probe_knn_and_export():
    method, models, _ = _run(steps=2)
    metrics = method.evaluate("train", models, "val", torch.device("cpu"))
    assert set(metrics) == {"val_linear_acc", "val_knn_acc"} and all(0 <= v <= 1 for v in metrics.values())
    model, spec = method.export(models)
    from methodlab.models import build_model
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(model.state_dict())
    x = method.data.splits["val"].head(5)["image"]
    logits = rebuilt.eval()(x)
    assert logits.shape == (5, 10)
    # the exported head is the linear probe: same predictions as the evaluation's
    feats = rebuilt.embed(x)
    assert torch.allclose(logits, torch.nn.functional.linear(feats, method.probe["weight"], method.probe["bias"]),
                          atol=1e-5)
    art = method.epoch_artifacts("train", 0)
    assert set(art) == {"bad_batches/epoch_001_frd.csv", "bad_batches/epoch_001_frd_hist.png"}
    assert art["bad_batches/epoch_001_frd.csv"].splitlines()[0] == "step,threshold,frd_rank0,kept_rank0"


def test_evaluation_follows_the_weights_loaded_not_the_step_count():
    """The loop scores the test split after loading the best epoch's weights, at the last epoch's
    step count: the probe and the train bank must be those of the weights being scored (a stale
    probe gave test 0.44 where val was 0.95)."""
    import copy

    def score(m):        # (the probe's initialisation draws from torch's RNG: the same for each)
        torch.manual_seed(0)
        return m.evaluate("train", models, "val", torch.device("cpu"))

    method, models, _ = _run(steps=2)
    before = copy.deepcopy(models["net"].state_dict())
    score(method)
    with torch.no_grad():
        for p in models["net"].parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert score(method) == score(BadBatches(method.cfg, method.data))
    models["net"].load_state_dict(before)                # (the best epoch's, same step count)
    assert score(method) == score(BadBatches(method.cfg, method.data))


def test_trains_and_probes_on_rgb_shapes():
    """The 3x32x32 built-in (`data.shapes`) with SimCLR's colour augmentations: the encoder takes
    3 channels, a step changes it, and the probe classifies its 12 shapes."""
    method, models, outs = _run("method.saturation=0.4", "method.hue=0.1", "method.grayscale_p=0.2",
                                "method.curation=threshold", "method.frd_threshold=1e300", steps=2, dataset="shapes")
    assert method.data.info.columns["image"].shape == [3, 32, 32]
    assert models["net"].backbone.encoder[0].in_channels == 3 and method.accepted == 2
    assert all(float(o["frd"]) > 0 for o in outs)
    metrics = method.evaluate("train", models, "test", torch.device("cpu"))
    assert all(0 <= v <= 1 for v in metrics.values())
    assert method.export(models)[0](method.data.splits["test"].head(4)["image"]).shape == (4, 12)


def test_linear_probe_and_knn_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 5, generator=g) * 5
    y = torch.arange(90) % 3
    x = centres[y] + torch.randn(90, 5, generator=g) * 0.3 + 100.0      # offset: checks the folding
    head = linear_probe(x, y, 3, steps=50, weight_decay=1e-4)
    assert (head(x).argmax(1) == y).float().mean() == 1.0
    assert (knn_predict(x, y, x, 3, k=5) == y).all()


# -- on a Ray cluster -----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_take_the_same_decisions(ray_cluster, home, tmp_path):
    """Every rank records its own FRD and decision per batch; rank 0 logs them all as a CSV."""
    import csv

    from methodlab.tracking import Tracker
    from methodlab.train.launch import train

    cfg = load_config("bad_batches", None, tiny("bad_batches", "scaling.num_workers=2",
                                                "train.epochs=2", "method.frd_quantile=0.5"))
    summary = train(cfg)
    assert summary.status == "FINISHED"
    client = Tracker(cfg.tracking.uri, cfg.tracking.experiment).client
    rows = []
    for epoch in range(1, cfg.train.epochs + 1):
        path = client.download_artifacts(summary.run_id, f"bad_batches/epoch_{epoch:03d}_frd.csv", str(tmp_path))
        with open(path) as f:
            rows += list(csv.DictReader(f))
        names = {a.path for a in client.list_artifacts(summary.run_id, "bad_batches")}
        assert f"bad_batches/epoch_{epoch:03d}_frd_hist.png" in names
    assert rows and all(r["kept_rank0"] == r["kept_rank1"] and r["frd_rank0"] == r["frd_rank1"] for r in rows)
    kept = [float(r["kept_rank0"]) for r in rows]
    assert 0 < sum(kept) < len(kept)              # the run really dropped some batches
    # the last epoch's global dropped fraction, as the loop reduced it
    assert summary.metrics["train_dropped"] == pytest.approx(1 - sum(kept[len(kept) // 2:]) / (len(kept) // 2))
