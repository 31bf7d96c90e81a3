"""Learned canonicalization: exact invariance, score permutation, straight-through selection,
losses and metrics against independent numpy references. The 2-worker Ray run is in
tests/test_methods.py (registry-driven)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methodlab.errors import ConfigError
from methodlab.losses.canonicalization import artifact_consistency_loss, group_contrast_loss, prior_loss
from methodlab.metrics.group import group_accuracy_from_counts, group_counts
from methodlab.models import build_model
from methodlab.models.canonicalizer import (
    GroupConvScoreNet, act, element_names, group_copies, group_elements, inverse_indices, rotate,
    rotate_interpolated, steerable_basis, straight_through_onehot)

FAST = settings(max_examples=25, deadline=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def predictor_spec(channels: int, classes: int = 5) -> dict:
    return {"arch": "cnn", "kwargs": {"in_channels": channels, "num_classes": classes, "width": 4, "embed_dim": 4}}


@st.composite
def canonicalized(draw, canonicalizer="cnn", reflections=False):
    """An untrained canonicalized model of random size, in eval mode, and a random input."""
    seed = draw(st.integers(0, 2**31 - 1))
    channels = draw(st.integers(1, 3))
    size = draw(st.integers(4, 11))
    torch.manual_seed(seed)
    model = build_model({"arch": "canonicalized", "kwargs": dict(
        predictor=predictor_spec(channels), in_channels=channels, image_size=size,
        canonicalizer=canonicalizer, num_rotations=4, reflections=reflections,
        channels=draw(st.integers(1, 8)), num_layers=draw(st.integers(1, 3)),
        kernel_size=draw(st.sampled_from([1, 3, 5])), out_dim=draw(st.integers(2, 16)),
        learn_ref_vec=draw(st.booleans()))}).eval()
    x = torch.randn(draw(st.integers(1, 4)), channels, size, size)
    return model, x


def d4(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 elements of D4 applied to x, written independently of the module (flip AFTER rotating)."""
    return [torch.flip(torch.rot90(x, k, dims=(-2, -1)), dims=(-1,)) if f else torch.rot90(x, k, dims=(-2, -1))
            for k in range(4) for f in (False, True)]


# ----------------------------------------------------------------------------------------------
# Invariance


@FAST
@given(canonicalized(), st.integers(1, 3))
def test_canonicalized_prediction_is_exactly_c4_invariant(mx, k):
    model, x = mx
    rotated = torch.rot90(x, k, dims=(-2, -1))
    with torch.no_grad():
        assert torch.equal(model.canonicalize(rotated)["image"], model.canonicalize(x)["image"])
        assert torch.equal(model(rotated), model(x))


@FAST
@given(canonicalized(), st.integers(1, 3))
def test_group_scores_of_a_rotated_input_are_a_cyclic_shift(mx, j):
    model, x = mx
    with torch.no_grad():
        scores = model.canonicalize(x)["scores"]
        shifted = model.canonicalize(torch.rot90(x, j, dims=(-2, -1)))["scores"]
    # copy k of R_j x is R_{k+j} x, i.e. copy k+j of x
    torch.testing.assert_close(shifted, torch.roll(scores, -j, dims=1), rtol=0, atol=1e-6)


@FAST
@given(canonicalized(reflections=True))
def test_d4_invariance_and_the_scored_copy_is_the_applied_copy(mx):
    model, x = mx
    with torch.no_grad():
        ref = model.canonicalize(x)
        # the canonical image IS a top-scoring copy: scoring and applying use one order
        top = ref["weights"].argmax(-1)
        rows = torch.arange(len(x))
        assert torch.equal(ref["image"], ref["copies"][rows, top])
        assert torch.equal(ref["scores"][rows, top], ref["scores"].max(-1).values)
        for gx in d4(x):
            assert torch.equal(model.canonicalize(gx)["image"], ref["image"])
            assert torch.equal(model(gx), model(x))


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(4, 9), st.booleans())
def test_tied_scores_still_give_exact_invariance(seed, size, reflections):
    """A dead φ (constant output) ties every score; the content tie-break keeps invariance."""
    torch.manual_seed(seed)
    model = build_model({"arch": "canonicalized", "kwargs": dict(
        predictor=predictor_spec(1), in_channels=1, image_size=size, reflections=reflections,
        channels=2, out_dim=4)}).eval()
    torch.nn.init.zeros_(model.phi.net[-1].weight)
    x = torch.randn(3, 1, size, size)
    group = d4(x) if reflections else [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    with torch.no_grad():
        assert (model.canonicalize(x)["scores"] == model.canonicalize(x)["scores"][:, :1]).all()
        for gx in group:
            assert torch.equal(model.canonicalize(gx)["image"], model.canonicalize(x)["image"])


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 2), st.integers(4, 9), st.booleans())
def test_group_averaging_is_invariant(seed, channels, size, reflections):
    torch.manual_seed(seed)
    model = build_model({"arch": "group_averaged", "kwargs": {
        "predictor": predictor_spec(channels), "num_rotations": 4, "reflections": reflections}}).eval()
    x = torch.randn(3, channels, size, size)
    group = d4(x) if reflections else [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    with torch.no_grad():
        for gx in group:
            torch.testing.assert_close(model(gx), model(x), rtol=0, atol=1e-5)


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(4, 10), st.integers(1, 6),
       st.integers(1, 3), st.sampled_from([1, 3, 5]), st.integers(1, 3))
def test_group_conv_canonicalizer_is_equivariant(seed, channels, size, width, layers, kernel, j):
    torch.manual_seed(seed)
    net = GroupConvScoreNet(channels, 4, width, layers, kernel).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        torch.testing.assert_close(net(torch.rot90(x, j, dims=(-2, -1))), torch.roll(net(x), j, dims=1),
                                   rtol=1e-4, atol=1e-5)


def test_equivariant_canonicalizer_gives_c4_invariance():
    checked = []

    @FAST
    @given(canonicalized(canonicalizer="group_conv"), st.integers(1, 3))
    def check(mx, k):
        model, x = mx
        rotated = torch.rot90(x, k, dims=(-2, -1))
        with torch.no_grad():
            # a(x) ties are broken by argmax order and so are not equivariant; skip exact ties
            scores = model.canonicalize(x)["scores"]
            top2 = scores.topk(2, dim=-1).values
            keep = (top2[:, 0] - top2[:, 1]) > 1e-4
            assert torch.equal(model.canonicalize(rotated)["image"][keep], model.canonicalize(x)["image"][keep])
        checked.append(int(keep.sum()))

    check()
    assert sum(checked) > 0, "every example was a tie: the test compared nothing"


@FAST
@given(st.sampled_from([1, 3, 5, 7]), st.integers(0, 719), st.integers(0, 3))
def test_steerable_basis_rotates_like_rot90(kernel, eighths, quarters):
    """The analytic rotation turns the same way as torch.rot90 (an independent check of the sign),
    and multiples of 90 degrees are exact rot90s of the residual angle's basis."""
    angle = eighths / 8    # exact in binary, so angle + 90q splits back into q and angle exactly
    base = steerable_basis(kernel, angle)
    turned = steerable_basis(kernel, angle + 90.0 * quarters)
    assert torch.equal(turned, torch.rot90(base, quarters, dims=(-2, -1)))
    # the analytic formula at angle + 90, evaluated without rot90, agrees with the rot90 route
    from methodlab.models.canonicalizer import _harmonics

    norms = _harmonics(kernel, 0.0, 0.6).flatten(1).norm(dim=1)
    analytic = (_harmonics(kernel, angle + 90.0, 0.6) / norms[:, None, None]).float()
    torch.testing.assert_close(analytic, torch.rot90(base, 1, dims=(-2, -1)), rtol=0, atol=1e-6)


def smooth_images(n: int, channels: int, size: int, seed: int, sigma: float = 2.0) -> torch.Tensor:
    """Gaussian-blurred noise: images with content at every angle, band-limited like natural images
    (white noise has no meaningful 45-degree rotation on a pixel grid)."""
    x = torch.randn(n * channels, 1, size, size, generator=torch.Generator().manual_seed(seed))
    t = torch.arange(-6, 7, dtype=torch.float32)
    w = torch.exp(-t ** 2 / (2 * sigma ** 2))
    w = w / w.sum()
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (6, 6, 6, 6), mode="reflect"), w.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, w.view(1, 1, -1, 1)).reshape(n, channels, size, size)


C8_SHIFT_THRESHOLD = 0.75   # measured at init: 0.86-0.97 per seed (64 images); the old resampled filters: 0.06


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 3]), st.integers(1, 7))
def test_group_conv_canonicalizer_is_c8_equivariant_at_init(seed, channels, k):
    """C8 on a pixel grid: the argmax of a(R_45k x) is argmax a(x) + k for most images, with R the
    SAME interpolated rotation the group acts with (`rotate`); exact equivariance at 45 degrees is
    impossible on a grid, so the test is a fraction. Multiples of 90 degrees stay exact."""
    torch.manual_seed(seed)
    net = GroupConvScoreNet(channels, 8, 8, 3, 5).eval()
    x = smooth_images(64, channels, 32, seed)
    with torch.no_grad():
        top = net(x).argmax(-1)
        shifted = net(rotate(x, 45.0 * k, 0.5)).argmax(-1)
    fraction = float(((shifted - top) % 8 == k).float().mean())
    assert fraction >= C8_SHIFT_THRESHOLD, fraction


@FAST
@given(canonicalized(), st.sampled_from(["cnn", "group_conv"]), st.sampled_from([4, 8]))
def test_gradient_paths_share_the_forward_value(mx, kind, n):
    _, x = mx
    images = []
    for path in ("copies", "angle"):
        torch.manual_seed(0)
        model = build_model({"arch": "canonicalized", "kwargs": dict(
            predictor=predictor_spec(x.shape[1]), in_channels=x.shape[1], image_size=x.shape[-1],
            canonicalizer=kind, num_rotations=n, channels=2, num_layers=1, out_dim=4,
            gradient_path=path)}).eval()
        with torch.no_grad():
            images.append(model.canonicalize(x)["image"])
    assert torch.equal(images[0], images[1])


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([4, 8]), st.floats(0.5, 4.0), st.sampled_from(["copies", "angle"]))
def test_score_gradients_match_each_paths_closed_form(seed, n, beta, path):
    """dL/d score_k for L = <C, x_c>, against an independent closed form: beta·s_k(c_k - Σ_j s_j c_j)
    with s = softmax(beta·scores) and c_k = <C, copy_k> (copies), or c_k = θ_k·dL/dθ with dL/dθ the
    slope of a bare kornia rotation at the selected angle (angle, equiadapt). That slope is taken by
    autograd, not finite differences: at multiples of 90 degrees the samples sit on pixel centres,
    the kinks of bilinear interpolation, where autograd gives a one-sided slope."""
    torch.manual_seed(seed)
    model = build_model({"arch": "canonicalized", "kwargs": dict(
        predictor=predictor_spec(1), in_channels=1, image_size=8, num_rotations=n, channels=2,
        out_dim=4, beta=beta, gradient_path=path)}).double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    out = model.canonicalize(x)
    out["scores"].retain_grad()
    target = torch.randn_like(out["image"])
    (out["image"] * target).sum().backward()
    soft = torch.softmax(beta * out["scores"].detach(), -1)                         # (B, G)
    if path == "copies":
        c = (out["copies"].detach() * target[:, None]).flatten(2).sum(-1)           # (B, G)
    else:
        angles = torch.tensor([a for a, _ in group_elements(n, False)], dtype=torch.float64)
        theta = angles[out["weights"].detach().argmax(-1)]
        theta.requires_grad_(True)
        (slope,) = torch.autograd.grad((rotate_interpolated(x, theta, model.pad_ratio) * target).sum(), theta)
        c = angles[None] * slope[:, None]                                          # slope (B,): dL/dθ
    expected = beta * soft * (c - (soft * c).sum(-1, keepdim=True))
    torch.testing.assert_close(out["scores"].grad, expected, rtol=1e-5, atol=1e-7)


def test_pad_ratio_zero_leaves_zero_corners_as_equiadapt_grayscale():
    """pad_ratio=0 is equiadapt's grayscale path (no padding, kornia fills with zeros); 0.5 edge-pads."""
    x = torch.ones(1, 1, 16, 16)
    bare = rotate_interpolated(x, torch.tensor([45.0]), 0.0)
    assert float(bare[0, 0, 0, 0]) == 0.0 and float(bare[0, 0, 8, 8]) == 1.0
    torch.testing.assert_close(rotate_interpolated(x, torch.tensor([45.0]), 0.5), x)


# ----------------------------------------------------------------------------------------------
# Group actions


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(2, 9), st.booleans())
def test_group_copies_match_numpy_rotations_and_flips(seed, size, reflections):
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(seed))
    copies = group_copies(x, 4, reflections, 0.5)
    xn = x.numpy()
    for i, (angle, flip) in enumerate(group_elements(4, reflections)):
        ref = np.rot90(xn[..., ::-1] if flip else xn, int(angle // 90), axes=(-2, -1))
        np.testing.assert_array_equal(copies[:, i].numpy(), ref)


def test_inverse_indices_compose_to_identity():
    x = torch.randn(1, 1, 6, 6)
    for reflections in (False, True):
        elements = group_elements(4, reflections)
        for i, j in enumerate(inverse_indices(4, reflections)):
            a, f = elements[i]
            b, g = elements[j]
            # g_j (g_i x) with g = R_angle F^flip
            gx = rotate(torch.flip(x, dims=(-1,)) if f else x, a, 0.5)
            assert torch.equal(rotate(torch.flip(gx, dims=(-1,)) if g else gx, b, 0.5), x)


@FAST
@given(st.integers(0, 2**31 - 1), st.sampled_from([6, 8, 10]), st.integers(1, 3))
def test_interpolated_rotation_agrees_with_rot90_orientation(seed, size, k):
    """C8 uses kornia for 45-degree steps; its direction must match rot90's at multiples of 90."""
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(rotate_interpolated(x, torch.full((2,), 90.0 * k), 0.5),
                               torch.rot90(x, k, dims=(-2, -1)), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Straight-through selection and losses


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(2, 16), st.floats(0.1, 10))
def test_straight_through_is_exactly_one_hot_with_softmax_gradient(seed, b, g, beta):
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.rand(b, g, generator=gen) * 2 - 1).requires_grad_(True)
    w = straight_through_onehot(scores, beta)
    assert set(w.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(w.detach().sum(-1), torch.ones(b))
    assert torch.equal(w.detach().argmax(-1), scores.detach().argmax(-1))
    c = torch.randn(b, g, generator=gen)
    (grad,) = torch.autograd.grad((w * c).sum(), scores)
    s = scores.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((torch.softmax(beta * s, -1) * c).sum(), s)
    torch.testing.assert_close(grad, expected)


def contrast_reference(v: np.ndarray, normalized: bool) -> float:
    """A loop over pairs, independent of the matrix form."""
    if normalized:
        v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    b, g, _ = v.shape
    total = sum(abs(float(v[i, k] @ v[i, m])) for i in range(b) for k in range(g) for m in range(g) if k != m)
    return total / (b * g * g)


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(2, 8), st.integers(1, 12), st.booleans())
def test_contrast_loss_matches_reference_is_nonnegative_and_order_invariant(seed, b, g, d, normalized):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(b, g, d, generator=gen, dtype=torch.float64)
    loss = group_contrast_loss(v, normalized)
    assert float(loss) >= 0
    assert float(loss) == pytest.approx(contrast_reference(v.numpy(), normalized), rel=1e-9, abs=1e-12)
    perm = torch.randperm(g, generator=gen)
    assert float(group_contrast_loss(v[:, perm], normalized)) == pytest.approx(float(loss), rel=1e-9, abs=1e-12)


def test_contrast_loss_is_zero_for_orthogonal_copies():
    v = torch.eye(4).expand(3, 4, 4) * 2.5
    assert float(group_contrast_loss(v)) == 0.0
    assert float(group_contrast_loss(v, normalized=True)) == 0.0


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(2, 16))
def test_prior_loss_matches_reference_and_floor(seed, b, g):
    scores = torch.rand(b, g, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    s = scores.numpy()
    ref = float(np.mean(np.log(np.exp(s).sum(-1)) - s[:, 0]))
    assert float(prior_loss(scores)) == pytest.approx(ref, rel=1e-9)
    assert float(prior_loss(scores)) >= math.log(1 + (g - 1) * math.exp(-2)) - 1e-9


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.integers(1, 8), st.integers(2, 4), st.integers(0, 40))
def test_group_accuracy_metrics_match_reference(seed, n, g, classes, cut):
    """Against numpy on the whole split; the counts of any two shards add up to the same metrics."""
    rng = np.random.default_rng(seed)
    preds, labels = rng.integers(0, classes, (n, g)), rng.integers(0, classes, n)
    names = [f"e{i}" for i in range(g)]
    p, y, cut = torch.from_numpy(preds), torch.from_numpy(labels), min(cut, n)
    counts = group_counts(p[:cut], y[:cut]) + group_counts(p[cut:], y[cut:])
    assert torch.equal(counts, group_counts(p, y))
    out = group_accuracy_from_counts(counts, names, "test")
    per = [float(np.mean(preds[:, i] == labels)) for i in range(g)]
    for i, name in enumerate(names):
        assert out[f"test_acc_{name}"] == pytest.approx(per[i])
    assert out["test_group_acc"] == pytest.approx(np.mean(per))
    assert out["test_acc"] == pytest.approx(per[0])
    assert out["test_invariance_error"] == pytest.approx(np.mean([len(set(r)) > 1 for r in preds.tolist()]))


def test_artifact_loss_vanishes_for_right_angles_and_not_for_45_degrees():
    torch.manual_seed(0)
    phi = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert float(artifact_consistency_loss(phi, x, torch.tensor([0.0, 90.0, 180.0, 270.0]), 0.5)) < 1e-9
        assert float(artifact_consistency_loss(phi, x, torch.full((4,), 45.0), 0.5)) > 1e-6


# ----------------------------------------------------------------------------------------------
# Export and the method in-process


@pytest.mark.parametrize("canonicalizer", ["cnn", "group_conv"])
def test_exported_model_rebuilds_and_torch_exports(canonicalizer):
    # C8 for cnn (the kornia path); C4 for group_conv (C8 filter rotation is slow to trace)
    n = 8 if canonicalizer == "cnn" else 4
    spec = {"arch": "canonicalized", "kwargs": dict(predictor=predictor_spec(1), in_channels=1, image_size=8,
                                                    canonicalizer=canonicalizer, num_rotations=n, channels=4)}
    torch.manual_seed(0)
    model = build_model(spec).eval()
    again = build_model(spec)
    again.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))
        exported = torch.export.export(model, (x[:2],)).module()
        torch.testing.assert_close(exported(x[:2]), model(x[:2]))


def test_config_rejects_inconsistent_modes():
    from methodlab.config import load_config

    with pytest.raises(ConfigError, match="finetune_predictor"):
        load_config("canonicalization", None, ["method.mode=augment"])
    with pytest.raises(ConfigError, match="reflections"):
        load_config("canonicalization", None, ["method.mode=equivariant", "method.reflections=true"])
    with pytest.raises(ConfigError, match="method.num_rotations"):
        load_config("canonicalization", None, ["method.num_rotations=0"])


def _method(tmp_path, *overrides):
    from methodlab.config import load_config
    from methodlab.data import prepare_builtin
    from methodlab.registry import get_method
    from methodlab.train.core import load_bundle

    cfg = load_config("canonicalization", None, ["method.predictor=scratch", "method.channels=4",
                                                 "method.out_vector_size=8", f"data.root={tmp_path}", *overrides])
    info = prepare_builtin("digits", cfg.data.root)
    return get_method("canonicalization")(cfg, load_bundle(cfg, info, ["train", "val", "test"]))


def test_frozen_predictor_stays_bit_identical_while_the_canonicalizer_trains(tmp_path):
    from methodlab.methods.base import StepContext

    method = _method(tmp_path)
    models = method.build_models("train", {})
    opts = method.build_optimizers("train", models)
    objective = models["model"]
    before = {k: v.clone() for k, v in objective.predictor.state_dict().items()}
    phi_before = [p.clone() for p in objective.model.phi.parameters()]
    objective.train()
    assert not objective.predictor.training and objective.model.phi.training
    batch = method.data.splits["train"].head(32)
    ctx = StepContext("train", 0, 0, torch.device("cpu"), 0, 1)
    for _ in range(2):
        losses = method.train_step("train", models, opts, batch, ctx)
    assert set(losses) >= {"loss", "task", "prior", "contrast", "identity_rate"}
    assert all(torch.equal(v, before[k]) for k, v in objective.predictor.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(phi_before, objective.model.phi.parameters()))
    metrics = method.evaluate("train", models, "val", torch.device("cpu"))
    assert metrics["val_invariance_error"] == 0.0
    assert metrics["val_group_acc"] == pytest.approx(metrics["val_acc"])
    model, spec = method.export(models)
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(model.state_dict())
    x = method.data.splits["test"].head(5)["image"]
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_frozen_plain_baseline_trains_nothing_and_is_not_invariant(tmp_path):
    method = _method(tmp_path, "method.mode=plain")
    models = method.build_models("train", {})
    assert method.build_optimizers("train", models) == {}
    metrics = method.evaluate("train", models, "val", torch.device("cpu"))
    assert metrics["val_invariance_error"] > 0.0
    model, spec = method.export(models)
    assert spec["arch"] == "cnn"


@pytest.mark.parametrize("mode, rotations", [("canonicalize", 4), ("equivariant", 4), ("canonicalize", 16),
                                             ("plain", 4)])
def test_the_run_charts_group_accuracy_and_the_canonical_poses(tmp_path, mode, rotations):
    """After the last epoch: test accuracy per group element, and with a canonicalizer the first
    val images under (at most 8 evenly spaced) group elements next to their canonical poses. At C4
    (exact rotations) every copy of an image gets one pose, and it is one of the image's copies."""
    from methodlab.methods.canonicalization import POSE_ELEMENTS, POSE_IMAGES

    method = _method(tmp_path, f"method.mode={mode}", f"method.num_rotations={rotations}", "train.epochs=1")
    models = method.build_models("train", {})
    method.evaluate("train", models, "test", torch.device("cpu"))
    charts = method.epoch_artifacts("train", 0)
    if mode == "plain":                 # nothing canonicalizes: no poses to show
        assert set(charts) == {"group_accuracy_test.png"}
        return
    assert set(charts) == {"group_accuracy_test.png", "canonical_poses_val.png"}
    copies, canonical, names = method.poses
    step = math.ceil(rotations / POSE_ELEMENTS)
    assert names == element_names(rotations, False)[::step] and len(names) == min(rotations, POSE_ELEMENTS)
    x = method.data.splits["val"].head(POSE_IMAGES)["image"]
    for j, (angle, flip) in enumerate(group_elements(rotations, False)[::step]):
        torch.testing.assert_close(copies[:, j], act(x, angle, flip, method.mcfg.pad_ratio), rtol=0, atol=0)
    if rotations == 4:
        for i in range(POSE_IMAGES):
            assert all(torch.equal(canonical[i, j], canonical[i, 0]) for j in range(4))
            assert any(torch.equal(canonical[i, 0], copies[i, j]) for j in range(4))
    axes = [ax for ax in charts["canonical_poses_val.png"].axes if ax.images]
    assert len(axes) == 2 * POSE_IMAGES * len(names)
    assert [ax.get_title() for ax in axes[:len(names)]] == names
