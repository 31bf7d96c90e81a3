"""D3GZSL and the GZSL data: label mapping, xlsa17 import, loss bounds and invariances, gradient
paths, the frozen teacher, WGAN-GP and the S/U/H metrics (spec part A8). The 2-worker Ray run is
the registry test (tests/test_methods.py -k d3gzsl)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.io import savemat

from methodlab.config import load_config
from methodlab.data.dataset import write_dataset
from methodlab.data.gzsl import (DIGIT_ATTRIBUTES, DIGITS_UNSEEN, DIGITS_VAL_UNSEEN, build_digits_gzsl, digit_attributes,
                                 digits_gzsl, digits_gzsl_rows, encode_seen_digits, import_xlsa17, synthetic_gzsl)
from methodlab.errors import ConfigError, DataError
from methodlab.losses.d3gzsl import (critic_terms, embedding_distillation, kl_distillation, ood_distillation,
                                     pair_bce, teacher_confidence)
from methodlab.methods.d3gzsl import label_mapping
from methodlab.metrics.gzsl import (GAMMA_GRID, attribute_precondition, best_gamma, calibrated, calibration_counts,
                                   class_counts, gzsl_counts, gzsl_scores, harmonic_mean, per_class_accuracy)
from methodlab.models.d3gzsl import LearnSigmoid

SP_NEG1, SP_0, SP_1 = math.log1p(math.exp(-1)), math.log(2), math.log1p(math.e)   # softplus(-1, 0, 1)
FAST = settings(max_examples=30, deadline=None)


def _np_softplus(x):
    return np.logaddexp(0, x)


def _np_pair_terms(u, v, same, variant="faithful", kappa=10.0):
    """Independent numpy reference of the per-pair BCE-with-logits terms."""
    un = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    vn = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    cos = un @ vn.T
    logit = (cos + 1) / 2 if variant == "faithful" else kappa * cos
    return same * _np_softplus(-logit) + (1 - same) * _np_softplus(logit)


def _np_softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


arrays = st.integers(0, 2**31 - 1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed, n, d, classes, nonneg=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return (x.relu() if nonneg else x), y


# ----------------------------------------------------------------------------------------------
# Labels and metrics


@FAST
@given(st.integers(2, 40), st.data())
def test_label_mapping_is_a_bijection_seen_first(num_classes, data):
    seen = data.draw(st.sets(st.integers(0, num_classes - 1), min_size=1, max_size=num_classes - 1))
    seen_t = torch.tensor(sorted(seen))
    unseen_t = torch.tensor(sorted(set(range(num_classes)) - seen))
    m = label_mapping(seen_t[torch.randperm(len(seen_t))], unseen_t[torch.randperm(len(unseen_t))])
    assert sorted(m.tolist()) == list(range(num_classes))
    assert m[seen_t].tolist() == list(range(len(seen)))                       # ascending order kept
    assert m[unseen_t].tolist() == list(range(len(seen), num_classes))


@FAST
@given(st.floats(0, 1), st.floats(0, 1))
@example(0.5, 5e-324)       # S*U underflows to 0 while H = 1e-323 does not
def test_harmonic_mean_bounds(s, u):
    h = harmonic_mean(s, u)
    assert min(s, u) - 1e-12 <= h <= max(s, u) + 1e-12
    assert h == pytest.approx(harmonic_mean(u, s))
    if s == 0 or u == 0:      # (not s * u == 0: that underflows for s=0.5, u=5e-324, where H = 1e-323)
        assert h == 0
    if s == u:
        assert h == pytest.approx(s)


@FAST
@given(arrays, st.integers(2, 8), st.integers(1, 5))
def test_per_class_accuracy_matches_numpy_and_ignores_class_size(seed, classes, dup):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, 60)
    pred = np.where(rng.random(60) < 0.6, labels, rng.integers(0, classes, 60))
    ref = np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)])
    acc = per_class_accuracy(class_counts(torch.from_numpy(pred), torch.from_numpy(labels), classes))
    assert acc == pytest.approx(ref) and 0 <= acc <= 1
    c0 = labels[0]                      # duplicating all rows of one class changes nothing
    extra = np.flatnonzero(labels == c0).repeat(dup)
    acc2 = per_class_accuracy(class_counts(torch.from_numpy(np.r_[pred, pred[extra]]),
                                           torch.from_numpy(np.r_[labels, labels[extra]]), classes))
    assert acc2 == pytest.approx(acc)


def test_gzsl_scores_predict_over_all_classes():
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    logits = torch.zeros(6, 4)
    logits[[0, 2], [0, 1]] = 1          # seen rows right on 2 of 3 rows (class 0: 1/2, class 1: 1/1)
    logits[[1, 3, 4, 5], [2, 2, 0, 3]] = 1  # row 1 (seen) predicts unseen; unseen: 2 -> 1/2, 3 -> 1/1
    logits[4, 3] = 0.5                  # row 4: among unseen classes only, 3 beats 2 -> ZSL wrong
    unseen = torch.tensor([2, 3])
    scores = gzsl_scores(gzsl_counts(logits, labels, unseen), unseen)
    # Sharded evaluation sums each rank's counts: any cut of the rows gives the same scores.
    assert gzsl_scores(gzsl_counts(logits[:2], labels[:2], unseen) + gzsl_counts(logits[2:], labels[2:], unseen),
                       unseen) == scores
    assert scores == pytest.approx({"S": 0.75, "U": 0.75, "H": 0.75, "ZSL": 0.75})


def _logits_case(seed, n, seen_n, unseen_n):
    g = torch.Generator().manual_seed(seed)
    c = seen_n + unseen_n
    perm = torch.randperm(c, generator=g)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, c, (n,), generator=g)
    return logits, labels, perm[:seen_n].sort().values, perm[seen_n:].sort().values


@FAST
@given(arrays, st.integers(1, 30), st.integers(1, 5), st.integers(1, 5))
def test_calibrated_stacking_gamma_zero_is_plain_and_a_large_gamma_predicts_only_unseen(seed, n, seen_n, unseen_n):
    logits, labels, seen, unseen = _logits_case(seed, n, seen_n, unseen_n)
    assert torch.equal(calibrated(logits, seen, 0.0), logits)
    assert torch.equal(gzsl_counts(calibrated(logits, seen, 0.0), labels, unseen), gzsl_counts(logits, labels, unseen))
    big = float(logits[:, seen].max() - logits[:, unseen].min()) + 1
    assert torch.isin(calibrated(logits, seen, big).argmax(1), unseen).all()
    # more gamma never moves a row from an unseen prediction back to a seen one (the grid is
    # ordered by |gamma|: sorted here); a gamma below minus every gap predicts only seen classes
    n_unseen = [int(torch.isin(calibrated(logits, seen, float(g)).argmax(1), unseen).sum())
                for g in GAMMA_GRID.sort().values]
    assert n_unseen == sorted(n_unseen)
    below = -(float(logits[:, unseen].max() - logits[:, seen].min()) + 1)
    assert not torch.isin(calibrated(logits, seen, below).argmax(1), unseen).any()
    # unseen columns and the ZSL counts (argmax over unseen classes only) do not move
    cal = calibrated(logits, seen, 3.0)
    assert torch.equal(cal[:, unseen], logits[:, unseen])
    assert torch.equal(gzsl_counts(cal, labels, unseen)[2], gzsl_counts(logits, labels, unseen)[2])


@FAST
@given(arrays, st.integers(2, 30), st.integers(1, 4), st.integers(1, 4))
def test_best_gamma_maximises_h_over_the_grid_against_numpy(seed, n, seen_n, unseen_n):
    logits, labels, seen, unseen = _logits_case(seed, n, seen_n, unseen_n)
    grid = GAMMA_GRID[::8]
    gamma = best_gamma(calibration_counts(logits, labels, unseen, seen, grid), unseen, grid)
    lg, y, s, u = logits.numpy(), labels.numpy(), seen.numpy(), unseen.numpy()

    def h(g):                                           # numpy reference of H at one gamma
        pred = (lg - np.isin(np.arange(lg.shape[1]), s) * g).argmax(1)
        acc = lambda cls: np.mean([np.mean(pred[y == c] == c) for c in cls if (y == c).any()]) \
            if any((y == c).any() for c in cls) else 0.0
        a, b = acc(s), acc(u)
        return 0.0 if a + b == 0 else 2 * a * b / (a + b)

    hs = np.array([h(float(g)) for g in grid])
    assert h(gamma) == pytest.approx(hs.max())
    assert gamma == float(grid[np.flatnonzero(np.isclose(hs, hs.max()))[0]])     # the smallest |gamma| on ties
    assert (GAMMA_GRID < 0).any() and GAMMA_GRID[0] == 0 and bool((GAMMA_GRID.abs().diff() >= 0).all())


@FAST
@given(arrays, st.integers(3, 7), st.integers(1, 6), st.floats(0.1, 10))
def test_attribute_precondition_matches_scipy_and_ignores_scale(seed, classes, a_dim, scale):
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    att = rng.normal(size=(classes, a_dim))
    labels = np.repeat(np.arange(classes), 4)
    features = rng.normal(size=(len(labels), 5)) + att[labels, :1] * 3
    seen = np.arange(classes - 1)
    pre = attribute_precondition(att, features, labels, seen)
    means = np.stack([features[labels == c].mean(0) for c in range(classes)])
    ref = spearmanr(pdist(att), pdist(means)).correlation
    assert pre["spearman"] == pytest.approx(0.0 if np.isnan(ref) else ref, abs=1e-9)
    assert -1 - 1e-12 <= pre["spearman"] <= 1 + 1e-12
    assert attribute_precondition(att * scale, features, labels, seen)["spearman"] == pytest.approx(pre["spearman"])
    assert attribute_precondition(means, features, labels, seen)["spearman"] == pytest.approx(1.0)
    assert pre["seen_rank"] == np.linalg.matrix_rank(att[seen]) and pre["attribute_dim"] == a_dim


# ----------------------------------------------------------------------------------------------
# Losses


@FAST
@given(arrays, st.integers(1, 12), st.integers(1, 6), st.integers(1, 4), st.sampled_from(["faithful", "clean"]))
def test_pair_bce_matches_numpy_and_has_a_nonzero_floor(seed, n, d, classes, variant):
    u, y = _batch(seed, n, d, classes)
    v, _ = _batch(seed + 1, n, d, classes)
    same = (y[:, None] == y[None]).double()
    kappa = 10.0
    got = float(pair_bce(u, v, same, variant, kappa))
    terms = _np_pair_terms(u.numpy(), v.numpy(), same.numpy(), variant, kappa)
    assert got == pytest.approx(terms.mean(), rel=1e-9)
    lo, hi = (SP_NEG1, SP_1) if variant == "faithful" else (_np_softplus(-kappa), _np_softplus(kappa))
    assert lo - 1e-12 <= got <= hi + 1e-12
    assert got > 0                      # the floor: even identical embeddings never reach 0
    if variant == "faithful":
        pos, neg = terms[same.numpy() == 1], terms[same.numpy() == 0]
        assert pos.min() >= SP_NEG1 - 1e-12 and pos.max() <= SP_0 + 1e-12
        assert len(neg) == 0 or (neg.min() >= SP_0 - 1e-12 and neg.max() <= SP_1 + 1e-12)


@FAST
@given(arrays, st.integers(2, 12), st.integers(1, 6), st.integers(1, 4))
def test_nonnegative_embeddings_tighten_the_faithful_pair_ranges(seed, n, d, classes):
    u, y = _batch(seed, n, d, classes, nonneg=True)
    v, _ = _batch(seed + 1, n, d, classes, nonneg=True)
    same = (y[:, None] == y[None]).numpy().astype(float)
    terms = _np_pair_terms(u.numpy(), v.numpy(), same)
    # cos in [0, 1] -> sim in [0.5, 1]: positives in [softplus(-1), softplus(-0.5)], negatives in
    # [softplus(0.5), softplus(1)]; the loss is at least 0.3133 even for identical embeddings.
    assert np.all(terms[same == 1] <= _np_softplus(-0.5) + 1e-12)
    assert np.all(terms[same == 0] >= _np_softplus(0.5) - 1e-12)
    floor = float(embedding_distillation(u, u, y, "faithful", 10.0))
    assert floor >= SP_NEG1 - 1e-12


@FAST
@given(arrays, st.integers(1, 10), st.integers(2, 6), st.sampled_from(["faithful", "clean"]), st.floats(0.5, 4))
def test_kl_distillation_reference_nonnegative_zero_and_shift_invariant(seed, n, k, variant, t):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    student = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    kl = float(kl_distillation(teacher, student, variant, t))
    tn, sn = teacher.numpy(), student.numpy()
    if variant == "faithful":
        p, q = _np_softmax(_np_softmax(tn)), _np_softmax(_np_softmax(sn))
        ref = np.sum(p * (np.log(p) - np.log(q))) / n
    else:
        p, q = _np_softmax(tn / t), _np_softmax(sn / t)
        ref = np.sum(p * (np.log(p) - np.log(q))) / n * t * t
    assert kl == pytest.approx(ref, rel=1e-7, abs=1e-12)
    assert kl >= -1e-12
    assert float(kl_distillation(teacher, student + 5.0, variant, t)) == pytest.approx(kl, rel=1e-7, abs=1e-12)
    assert abs(float(kl_distillation(teacher, teacher + 2.0, variant, t))) < 1e-12


@FAST
@given(arrays, st.integers(2, 12), st.integers(1, 4), st.sampled_from(["faithful", "clean"]))
def test_losses_invariant_to_joint_batch_permutation(seed, n, classes, variant):
    z_t, y = _batch(seed, n, 5, classes)
    z_s, _ = _batch(seed + 1, n, 5, classes)
    h_s, _ = _batch(seed + 2, n, 2, classes)
    h_t = torch.rand(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    h_t = torch.cat([h_t, 1 - h_t], 1)
    t_logits, s_logits = z_t[:, :3], z_s[:, :3]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 3))
    for fn, args in ((embedding_distillation, (z_t, z_s, y, variant, 10.0)),
                     (ood_distillation, (h_s, h_t, y, variant, 10.0))):
        a = fn(*args)
        b = fn(args[0][perm], args[1][perm], args[2][perm], *args[3:])
        assert float(a) == pytest.approx(float(b), rel=1e-10)
    assert float(kl_distillation(t_logits[perm], s_logits[perm], variant)) == \
        pytest.approx(float(kl_distillation(t_logits, s_logits, variant)), rel=1e-10)


@FAST
@given(arrays, st.integers(1, 10), st.integers(2, 20), st.floats(0.1, 5), st.floats(-3, 3))
def test_teacher_confidence_ranges_and_monotonicity(seed, n, k, w, b):
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4
    sig = LearnSigmoid(w, b).double()
    score, h = teacher_confidence(logits, sig)
    assert torch.all(score <= 1e-12) and torch.all(score >= -math.log(k) - 1e-9)
    assert torch.all((h >= 0) & (h <= 1)) and torch.allclose(h.sum(1), torch.ones(n, dtype=torch.float64))
    order = score.argsort()
    assert torch.all(h[order, 0].diff() >= -1e-12)                 # w > 0: non-decreasing in s~


@FAST
@given(arrays, st.integers(1, 16), st.integers(1, 8), st.integers(1, 5))
def test_gradient_penalty_is_nonnegative(seed, n, d, a):
    torch.manual_seed(seed)
    critic = _TinyCritic(d, a)
    real, fake, att = torch.randn(n, d), torch.randn(n, d).relu(), torch.randn(n, a)
    _, _, gp = critic_terms(critic, real, fake, att, torch.rand(n, 1))
    assert float(gp.detach()) >= 0


def test_gradient_penalty_is_zero_for_a_unit_norm_linear_critic():
    d, a = 6, 3
    critic = torch.nn.Linear(d + a, 1)
    with torch.no_grad():
        critic.weight[:, :d] = torch.nn.functional.normalize(torch.randn(1, d), dim=1)
    fn = _Concat(critic)
    _, _, gp = critic_terms(fn, torch.randn(5, d), torch.randn(5, d), torch.randn(5, a), torch.rand(5, 1))
    assert float(gp.detach()) == pytest.approx(0, abs=1e-10)


class _Concat(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, a):
        return self.net(torch.cat([x, a], 1))


class _TinyCritic(_Concat):
    def __init__(self, d, a):
        super().__init__(torch.nn.Sequential(torch.nn.Linear(d + a, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 1)))


# ----------------------------------------------------------------------------------------------
# xlsa17 import


def _write_xlsa17(directory, *, n_per_class=6, classes=6, d=5, a=4, zero_based=False, overlap_class=False,
                  bad_labels=False, drop=None):
    """A small xlsa17 pair: classes 0-1 train, 2 val (trainval = 0-2), 3 also test-seen of 0-2,
    3-5 unseen. Returns the arrays written (0-based)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), n_per_class)
    feats = rng.normal(size=(len(labels), d)).astype(np.float32)
    rows = np.arange(len(labels))
    k = n_per_class - 2                               # per seen class: k trainval rows, 2 test-seen
    first = rows - labels * n_per_class
    seen = labels < 3
    trainval = rows[seen & (first < k)]
    test_seen = rows[seen & (first >= k)]
    test_unseen = rows[~seen]
    if overlap_class:                                 # an unseen class leaks into trainval
        trainval = np.r_[trainval, test_unseen[:1]]
        test_unseen = test_unseen[1:]
    train = trainval[labels[trainval] < 2]
    val = trainval[labels[trainval] == 2]
    base = 0 if zero_based else 1
    att = rng.random((a, classes))
    res = {"features": feats.T, "labels": (labels + 1)[:, None].astype(np.float64)}
    if bad_labels:
        res["labels"] = res["labels"][:-1]
    split = {"att": att, "original_att": att * 100, "trainval_loc": (trainval + base)[:, None],
             "train_loc": (train + base)[:, None], "val_loc": (val + base)[:, None],
             "test_seen_loc": (test_seen + base)[:, None], "test_unseen_loc": (test_unseen + base)[:, None],
             "allclasses_names": np.array([[f"c{i}"] for i in range(classes)], dtype=object)}
    if drop:
        split.pop(drop)
    savemat(str(directory / "res101.mat"), res)
    savemat(str(directory / "att_splits.mat"), split)
    return feats, labels, att.T, trainval, test_seen, test_unseen


def test_xlsa17_import_reads_the_layout(tmp_path):
    src = tmp_path / "CUBmini"
    src.mkdir()
    feats, labels, att, trainval, test_seen, test_unseen = _write_xlsa17(src)
    info = import_xlsa17(str(src), str(tmp_path / "out"), val_fraction=0.25)
    from methodlab.data.dataset import read_split, read_table

    splits = {s: read_split(info, s) for s in ("train", "val", "test")}
    assert info.meta["seen_classes"] == [0, 1, 2] and info.meta["unseen_classes"] == [3, 4, 5]
    assert info.meta["val_unseen_classes"] == [2] and info.meta["classes"][0] == "c0"
    assert info.columns["features"].shape == [5]
    # every trainval row lands in exactly one of train/val, with its own (transposed) features
    tv = np.r_[splits["train"]["label"], splits["val"]["label"]]
    assert sorted(tv.tolist()) == sorted(labels[trainval].tolist())
    got = np.r_[splits["train"]["features"], splits["val"]["features"]]
    assert {tuple(r) for r in got.round(5)} == {tuple(r) for r in feats[trainval].round(5)}
    assert splits["train"]["unseen"].sum() == 0
    np.testing.assert_array_equal(splits["val"]["unseen"], splits["val"]["label"] == 2)
    np.testing.assert_array_equal(splits["test"]["unseen"], splits["test"]["label"] >= 3)
    assert len(splits["test"]["label"]) == len(test_seen) + len(test_unseen)
    table = read_table(info, "class_attributes")
    np.testing.assert_allclose(table["attributes"][table["class_id"]], att, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"zero_based": True}, "contains 0; xlsa17 locs are 1-based"),
    ({"overlap_class": True}, "both seen (trainval) and unseen"),
    ({"bad_labels": True}, "res101.mat: 'features' is 5 x 36 but 'labels' has 35"),
    ({"drop": "test_unseen_loc"}, "att_splits.mat lacks field 'test_unseen_loc'"),
])
def test_xlsa17_import_rejects_bad_files(tmp_path, kwargs, message):
    src = tmp_path / "bad"
    src.mkdir()
    _write_xlsa17(src, **kwargs)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_xlsa17(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_xlsa17_import_names_a_missing_file(tmp_path):
    with pytest.raises(DataError, match="res101.mat does not exist"):
        import_xlsa17(str(tmp_path), str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------
# Built-in and synthetic data


def test_digits_gzsl_encoder_never_sees_unseen_digits():
    assert not set(DIGITS_UNSEEN) & set(DIGITS_VAL_UNSEEN)
    from methodlab.data.builtin import load_digits

    images, labels = load_digits()
    fit = np.flatnonzero(~np.isin(labels, DIGITS_UNSEEN))[:300]
    a = encode_seen_digits(images, labels, fit, epochs=2)
    scrambled = images.copy()                          # anything outside the fit rows is ignored
    others = np.setdiff1d(np.arange(len(images)), fit)
    scrambled[others] = np.random.default_rng(1).random(scrambled[others].shape)
    b = encode_seen_digits(scrambled, labels, fit, epochs=2)
    np.testing.assert_array_equal(a[fit], b[fit])


@pytest.fixture(scope="module")
def digits_built():
    return digits_gzsl()


def test_digits_gzsl_attributes_are_informative_and_full_rank(digits_built):
    """The precondition of every GZSL claim on digits_gzsl: attribute distances follow the
    class-mean feature distances, and the seen digits span every attribute direction under both
    protocols (the validation protocol drops the validation-unseen digits)."""
    meta = digits_built["meta"]
    att = digits_built["tables"]["class_attributes"]["attributes"]
    splits = digits_built["splits"].values()
    features = np.concatenate([s["features"] for s in splits])
    labels = np.concatenate([s["label"] for s in splits])
    pre = attribute_precondition(att, features, labels, np.array(meta["seen_classes"]))
    assert pre["spearman"] > 0.5
    assert pre["seen_rank"] == pre["attribute_dim"] == len(DIGIT_ATTRIBUTES) == meta["attribute_dim"]
    train_seen = np.setdiff1d(meta["seen_classes"], meta["val_unseen_classes"])
    assert np.linalg.matrix_rank(att[train_seen]) == att.shape[1]
    assert len({tuple(r) for r in att}) == 10
    seen = meta["seen_classes"]                                   # standardised over the seen digits
    np.testing.assert_allclose(att[seen].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(att[seen].std(0), 1, rtol=1e-4)


def test_digits_gzsl_attributes_use_no_val_or_test_image(digits_built):
    """The side information comes from description images only (seen digits: train rows; unseen
    digits: images in no split): replacing every val and test image changes no attribute, and
    the description images of the unseen digits are not test rows."""
    from methodlab.data.builtin import load_digits

    images, labels = load_digits()
    rows = digits_gzsl_rows(labels)
    roles = list(rows.values())
    assert sum(map(len, roles)) == len(labels) == len(np.unique(np.concatenate(roles)))   # a partition
    assert set(labels[rows["description"]]) == set(DIGITS_UNSEEN)
    assert len(digits_built["splits"]["test"]["label"]) == len(rows["test_seen"]) + len(rows["test_unseen"])
    scrambled = images.copy()
    held = np.concatenate([rows["val"], rows["test_seen"], rows["test_unseen"]])
    scrambled[held] = np.random.default_rng(0).random(scrambled[held].shape, dtype=np.float32)
    np.testing.assert_array_equal(build_digits_gzsl(scrambled, labels)["tables"]["class_attributes"]["attributes"],
                                  digits_built["tables"]["class_attributes"]["attributes"])
    # and each is the class mean of the region ink densities, recomputed here in numpy
    described = np.concatenate([rows["train"], rows["description"]])
    x = images[described, 0]
    ink = np.stack([x[:, 0:3, 0:4].mean((1, 2)), x[:, 0:3, 4:].mean((1, 2)), x[:, 3:5, 0:4].mean((1, 2)),
                    x[:, 3:5, 4:].mean((1, 2)), x[:, 5:, 0:4].mean((1, 2)), x[:, 5:, 4:].mean((1, 2))], 1)
    ref = np.stack([ink[labels[described] == c].mean(0) for c in range(10)])
    seen = digits_built["meta"]["seen_classes"]
    ref = (ref - ref[seen].mean(0)) / ref[seen].std(0)
    np.testing.assert_allclose(digits_built["tables"]["class_attributes"]["attributes"], ref, rtol=1e-5)
    with pytest.raises(DataError, match=r"classes \[0, 4, 9\] have no description images"):
        digit_attributes(images, labels, rows["train"])


@FAST
@given(st.integers(2, 8), st.integers(1, 5), st.integers(0, 1000))
def test_synthetic_gzsl_class_roles(n_seen, n_unseen, seed):
    built = synthetic_gzsl(n_seen=n_seen, n_unseen=n_unseen, feature_dim=6, attribute_dim=3,
                           train_per_class=5, test_per_class=2, seed=seed)
    meta, sp = built["meta"], built["splits"]
    seen, unseen = set(meta["seen_classes"]), set(meta["unseen_classes"])
    assert len(seen) == n_seen and len(unseen) == n_unseen and not seen & unseen
    assert set(sp["train"]["label"]) <= seen and set(meta["val_unseen_classes"]) < seen
    assert set(sp["test"]["label"][sp["test"]["unseen"] == 1]) == unseen
    assert built["tables"]["class_attributes"]["attributes"].shape == (n_seen + n_unseen, 3)
    assert all(v["features"].dtype == np.float32 and (v["features"] >= 0).all() for v in sp.values())


# ----------------------------------------------------------------------------------------------
# The method: frozen teacher, gradient paths, protocol


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_an_optimizer_it_does_not_honour_is_refused_before_anything_starts(optimizer, home):
    """Every network trains with the official Adam(betas 0.5, 0.999): another train.optimizer
    fails when the config is resolved, in one line naming the field and the fix."""
    from methodlab.cli import main

    with pytest.raises(ConfigError) as e:
        load_config("d3gzsl", None, [f"train.optimizer={optimizer}"])
    assert str(e.value) == (f"train.optimizer: method d3gzsl supports adam, not {optimizer!r} (set by override "
                            f"'train.optimizer={optimizer}'); set train.optimizer=adam")
    assert main(["train", "d3gzsl", f"train.optimizer={optimizer}"]) != 0
    assert not home.exists()          # no MLflow store, no run directory, no dataset written



@pytest.fixture(scope="module")
def method_setup(tmp_path_factory):
    from methodlab.data import open_dataset
    from methodlab.registry import get_method
    from methodlab.train.core import load_bundle

    built = synthetic_gzsl(n_seen=6, n_unseen=3, feature_dim=8, attribute_dim=4, train_per_class=12,
                           test_per_class=4, seed=3)
    root = str(tmp_path_factory.mktemp("gzsl") / "synthetic")
    write_dataset(root, "synthetic", built["splits"], built["meta"], built["tables"])

    def make(*overrides):
        cfg = load_config("d3gzsl", None, ["method.gen_hidden=16", "method.critic_hidden=16",
                                           "method.embed_dim=12", "method.n_critic=2", "train.batch_size=20",
                                           "method.syn_num=5", "method.fresh_epochs=2",
                                           f"data.dataset={root}", *overrides])
        data = load_bundle(cfg, open_dataset(root), ["train", "val", "test"])
        method = get_method("d3gzsl")(cfg, data)
        teacher = method.build_models("teacher", {})
        models = method.build_models("gan", teacher)
        return method, models, method.build_optimizers("gan", models)

    return make, built


def _batch_of(method, n=20):
    t = method.data.splits["train"].tensors
    return {k: v[:n] for k, v in t.items()}


def test_validation_protocol_holds_out_validation_unseen_classes(method_setup):
    make, built = method_setup
    val_unseen = set(built["meta"]["val_unseen_classes"])
    method, _, _ = make()
    assert not set(method.data.splits["train"].tensors["label"].tolist()) & val_unseen
    assert val_unseen <= set(method.unseen.tolist())
    feats = method.data.splits["train"].tensors["features"]
    assert float(feats.min()) == pytest.approx(0) and float(feats.max()) == pytest.approx(1)
    final, _, _ = make("method.protocol=final")
    assert val_unseen <= set(final.data.splits["train"].tensors["label"].tolist())
    assert set(final.unseen.tolist()) == set(built["meta"]["unseen_classes"])


def test_frozen_teacher_is_bit_identical_after_training_steps(method_setup):
    make, _ = method_setup
    method, models, opts = make()
    before = {k: v.clone() for k, v in models["teacher"].state_dict().items()}
    from methodlab.methods.base import StepContext

    ctx = StepContext(stage="gan", epoch=0, step=0, device=torch.device("cpu"), rank=0, world_size=1)
    for _ in range(3):
        method.train_step("gan", models, opts, _batch_of(method), ctx)
    after = models["teacher"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in models["teacher"].parameters())
    assert not any(p.requires_grad for p in models["teacher"].parameters())


def _generator_grads(models):
    return [p.grad for p in models["generator"].parameters()]


def test_gradient_paths_to_the_generator(method_setup):
    make, _ = method_setup
    method, models, opts = make()
    b = _batch_of(method)
    x, y = b["features"], b["label"]
    y_syn = method.unseen.repeat_interleave(3)

    def aux_with_live_generator():
        models["generator"].zero_grad(set_to_none=True)
        x_syn = method.generate(models["generator"], y_syn)
        return method.aux_losses(models, x_syn, y_syn, x, y)

    aux = aux_with_live_generator()
    (aux["kl"] + aux["be"]).backward()                  # ID2SD: real rows only -> nothing reaches G
    assert all(g is None or torch.count_nonzero(g) == 0 for g in _generator_grads(models))
    for term in ("od", "cls"):                          # O2DBD and L_cls reach G in the G step
        aux = aux_with_live_generator()
        aux[term].backward()
        assert any(g is not None and torch.count_nonzero(g) > 0 for g in _generator_grads(models)), term

    models["generator"].zero_grad(set_to_none=True)     # critic step: G is frozen, gets nothing
    method.critic_step(models, opts, x, y)
    assert all(g is None for g in _generator_grads(models))
    assert all(p.grad is not None for p in models["critic"].parameters())
    method.generator_step(models, opts, x, y)           # G step: G gets gradient, D does not
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in _generator_grads(models))
    assert all(p.requires_grad for p in models["critic"].parameters())


def test_gan_step_logs_and_export_matches_student(method_setup):
    make, _ = method_setup
    method, models, opts = make()
    from methodlab.methods.base import StepContext

    ctx = StepContext(stage="gan", epoch=0, step=0, device=torch.device("cpu"), rank=0, world_size=1)
    logs = method.train_step("gan", models, opts, _batch_of(method), ctx)
    assert {"loss_d", "gp", "loss_g", "cls", "kl", "be", "od", "aux"} <= set(logs)
    assert all(torch.isfinite(v) for v in logs.values()) and float(logs["gp"]) >= 0
    metrics = method.evaluate("gan", models, "test", torch.device("cpu"))
    for prefix in ("test_", "test_fresh_"):
        s, u, h = (metrics[prefix + k] for k in "SUH")
        assert 0 <= metrics[prefix + "ZSL"] <= 1
        assert 0 <= min(s, u) and max(s, u) <= 1
        assert min(s, u) - 1e-12 <= h <= max(s, u) + 1e-12
    exported, spec = method.export(models)
    raw = method.example_input()
    scaled = (torch.from_numpy(raw).float() - method.shift) * method.scale
    with torch.no_grad():
        torch.testing.assert_close(exported(torch.from_numpy(raw)), models["student"](scaled)[1])
    assert spec["arch"] == "gzsl_classifier"
    assert 0 <= metrics["test_seen_fidelity"] <= 1 and "test_gamma" not in metrics     # gamma 0: plain


def test_calibration_gamma_val_is_chosen_on_val_and_logged(method_setup):
    make, _ = method_setup
    method, models, opts = make("method.calibration_gamma=val")
    from methodlab.methods.base import StepContext

    ctx = StepContext(stage="gan", epoch=0, step=0, device=torch.device("cpu"), rank=0, world_size=1)
    method.train_step("gan", models, opts, _batch_of(method), ctx)
    cpu = torch.device("cpu")
    val, test = method.evaluate("gan", models, "val", cpu), method.evaluate("gan", models, "test", cpu)
    grid = GAMMA_GRID.tolist()
    assert val["val_gamma"] in grid and test["test_gamma"] == val["val_gamma"]   # the same networks' val gamma
    assert test["test_fresh_gamma"] in grid
    assert val["val_H"] >= val["val_uncalibrated_H"] - 1e-12                   # 0 is on the grid
    fixed, models2, _ = make("method.calibration_gamma=1000")
    out = fixed.evaluate("gan", models2, "test", cpu)
    assert out["test_gamma"] == 1000 and out["test_S"] == 0                     # every row predicted unseen


@pytest.mark.parametrize("value, message", [
    ("val", "calibration_gamma='val' needs protocol=validation"), ("inf", "calibration_gamma.float: Input should be a finite number")])
def test_calibration_gamma_refuses_what_it_cannot_honour(value, message):
    overrides = [f"method.calibration_gamma={value}", *(["method.protocol=final"] if value == "val" else [])]
    with pytest.raises(ConfigError, match=message):
        load_config("d3gzsl", None, overrides)


def test_fclswgan_baseline_trains_g_with_the_pretrained_classifier_and_classifies_features(method_setup):
    """variant=fclswgan (Xian et al. 2018): the frozen teacher's NLL on G's seen samples reaches G,
    nothing trains the student, and the exported model is the fresh softmax on the features."""
    make, _ = method_setup
    method, models, opts = make("method.variant=fclswgan")
    assert set(models) == set(opts) | {"teacher"} == {"teacher", "generator", "critic"}     # no student
    b = _batch_of(method)
    method.critic_step(models, opts, b["features"], b["label"])
    logs = method.generator_step(models, opts, b["features"], b["label"])
    assert set(logs) == {"loss_g", "cls", "aux"} and float(logs["cls"]) > 0
    models["generator"].zero_grad(set_to_none=True)      # the classification term alone reaches G
    fake = method.generate(models["generator"], b["label"])
    F_ce = torch.nn.functional.cross_entropy(models["teacher"](fake)[1], method.mapping[b["label"]])
    F_ce.backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in models["generator"].parameters())
    metrics = method.evaluate("gan", models, "test", torch.device("cpu"))
    assert "test_e2e_H" not in metrics and "test_fresh_H" not in metrics and 0 <= metrics["test_H"] <= 1
    exported, spec = method.export(models)
    assert spec["kwargs"]["embed_dim"] == 0 and isinstance(exported.embed, torch.nn.Identity)
    raw = method.example_input()
    scaled = (torch.from_numpy(raw).float() - method.shift) * method.scale
    head = method.classifier(models, "fresh", torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(exported(torch.from_numpy(raw)), head(scaled))
