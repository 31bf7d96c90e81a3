"""The synthetic shapes built-ins (`methodlab.data.shapes`): the renderer's invariants, every
dataset's factors, labels, splits and bytes, and the preconditions the datasets were built for
(raw pixels fail on `shapes`; no modality combination of `shapes_multimodal` beats its Bayes accuracy; the
`shapes_gzsl` attributes describe the features)."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from methodlab.data import shapes as S
from methodlab.methods.bad_batches import linear_probe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Test accuracy of the platform's linear probe (bad_batches.linear_probe: standardised
    L-BFGS logistic regression) on flattened inputs."""
    def flat(a):
        return torch.as_tensor(np.asarray(a, np.float32).reshape(len(a), -1))

    num_classes = int(max(train_y.max(), test_y.max())) + 1
    layer = linear_probe(flat(train_x), torch.as_tensor(train_y), num_classes, steps=100, weight_decay=1e-3)
    with torch.no_grad():
        return float((layer(flat(test_x)).argmax(1).numpy() == test_y).mean())


def factors(**values) -> dict[str, np.ndarray]:
    """One image's factor columns (each (1,) int64), defaults centred, upright, dark background."""
    f = dict(shape=0, colour=0, texture=0, size=1, angle=0, offset_x=0, offset_y=0, background=0) | values
    return {k: np.array([v], np.int64) for k, v in f.items()}


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def built() -> dict[str, dict]:
    """Every shapes built-in, built once for the module."""
    return {name: getattr(S, name)() for name in ("shapes", "shapes_upright", "shapes_source", "shapes_transfer",
                                                   "shapes_multimodal", "shapes_gzsl")}


# ----------------------------------------------------------------------------------------------
# The renderer


@settings(max_examples=30, deadline=None)
@given(shape=st.integers(0, len(S.SHAPES) - 1), texture=st.integers(0, len(S.TEXTURES) - 1),
       size=st.integers(0, len(S.SIZES) - 1), quarter=st.integers(0, 3))
def test_a_quarter_turn_of_a_centred_shape_is_rot90_of_its_mask(shape, texture, size, quarter):
    _, upright = S.render(factors(shape=shape, texture=texture, size=size), seed=0)
    _, turned = S.render(factors(shape=shape, texture=texture, size=size, angle=90 * quarter), seed=0)
    # angle is counter-clockwise, as np.rot90 (rows top-down) turns an image as displayed
    np.testing.assert_array_equal(turned[0], np.rot90(upright[0], quarter))
    assert upright.sum() > 20, "the shape covers some pixels"


@settings(max_examples=30, deadline=None)
@given(shape=st.integers(0, len(S.SHAPES) - 1), colour=st.integers(0, len(S.COLOURS) - 1),
       texture=st.integers(0, len(S.TEXTURES) - 1), size=st.integers(0, len(S.SIZES) - 1),
       background=st.integers(0, 2), angle=st.integers(0, 359), seed=st.integers(0, 2 ** 16))
def test_colour_and_texture_change_only_the_foreground(shape, colour, texture, size, background, angle, seed):
    # the tinted background (3) is the foreground's opposite hue by design, so it is left out
    base = dict(shape=shape, size=size, background=background, angle=angle)
    a, alpha = S.render(factors(colour=colour, texture=texture, **base), seed)
    b, _ = S.render(factors(colour=(colour + 3) % len(S.COLOURS), texture=(texture + 1) % len(S.TEXTURES), **base), seed)
    outside = alpha[0] == 0
    np.testing.assert_array_equal(a[0][:, outside], b[0][:, outside])
    assert (a[0][:, ~outside] != b[0][:, ~outside]).any()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 16), max_angle=st.sampled_from([0, 20, 180]))
def test_sampled_poses_keep_every_shape_inside_the_frame(seed, max_angle):
    rng = np.random.default_rng(seed)
    f = S.sample_factors(rng, rng.integers(len(S.SHAPES), size=64), max_angle=max_angle)
    _, alpha = S.render(f, seed)
    assert np.abs(f["offset_x"]).max() <= S.max_offset(f["size"]).max()
    border = np.concatenate([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], axis=1)
    assert border.max() == 0, "a shape touches the image border"


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not():
    one, two, other = S.make_shapes(per_class=5, seed=3), S.make_shapes(per_class=5, seed=3), S.make_shapes(per_class=5, seed=4)
    for split in one["splits"]:
        for column, values in one["splits"][split].items():
            assert digest(values) == digest(two["splits"][split][column]), (split, column)
    assert digest(one["splits"]["train"]["image"]) != digest(other["splits"]["train"]["image"])


def test_gzsl_features_are_deterministic_and_blind_to_a_quarter_turn():
    rng = np.random.default_rng(0)
    images, _ = S.render(S.sample_factors(rng, rng.integers(len(S.SHAPES), size=32), max_angle=180), seed=1)
    features = S.gzsl_features(images)
    np.testing.assert_array_equal(features, S.gzsl_features(images.copy()))
    # pose-free by construction: every part is a rotation-invariant statistic of the pixels
    turned = S.gzsl_features(np.ascontiguousarray(np.rot90(images, 1, axes=(2, 3))))
    np.testing.assert_allclose(turned, features, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Layouts, factors, labels and splits


@pytest.mark.parametrize("name", ["shapes", "shapes_upright", "shapes_source", "shapes_transfer"])
def test_image_datasets_store_uint8_images_with_their_factors(built, name):
    d = built[name]
    assert d["scales"] == {"image": S.IMAGE_SCALE}
    for split, cols in d["splits"].items():
        assert cols["image"].dtype == np.uint8 and cols["image"].shape[1:] == (3, 32, 32)
        assert set(cols) == {"image", "label", *(f"factor_{k}" for k in S.FACTORS)}
        assert all(cols[f"factor_{k}"].dtype == np.int64 for k in S.FACTORS)
        assert 0 <= cols["label"].min() and cols["label"].max() < d["meta"]["num_classes"]
    assert set(d["meta"]["factors"]) == set(S.FACTORS)


def test_labels_follow_the_factors(built):
    for name in ("shapes", "shapes_upright"):
        for cols in built[name]["splits"].values():
            np.testing.assert_array_equal(cols["label"], cols["factor_shape"])
    for cols in built["shapes_source"]["splits"].values():
        names = [f"{S.SHAPES[s]}/{S.TEXTURES[t]}" for s, t in zip(cols["factor_shape"], cols["factor_texture"])]
        assert [S.SOURCE_CLASSES[y] for y in cols["label"]] == names
    for cols in built["shapes_transfer"]["splits"].values():
        np.testing.assert_array_equal(np.asarray(S.TARGET_SHAPES)[cols["label"]], cols["factor_shape"])
    for cols in built["shapes_multimodal"]["splits"].values():
        names = [f"{S.SHAPES[s]}/{S.COLOURS[c]}" for s, c in zip(cols["factor_shape"], cols["factor_colour"])]
        assert [S.MM_CLASSES[y] for y in cols["label"]] == names


def test_upright_images_are_upright_and_stay_in_frame_when_turned(built):
    for cols in built["shapes_upright"]["splits"].values():
        assert (cols["factor_angle"] == 0).all()
        assert np.abs(np.stack([cols["factor_offset_x"], cols["factor_offset_y"]])).max() <= S.UPRIGHT_JITTER
        reach = S.EXTENT * np.asarray(S.SIZES)[cols["factor_size"]] + np.hypot(cols["factor_offset_x"],
                                                                                 cols["factor_offset_y"])
        assert reach.max() < 16


@pytest.mark.parametrize("name", ["shapes", "shapes_upright", "shapes_source", "shapes_transfer", "shapes_multimodal"])
def test_no_image_is_in_two_splits(built, name):
    d = built[name]
    column = "image" if "image" in d["splits"]["train"] else "packed"
    seen: dict[str, str] = {}
    for split, cols in d["splits"].items():
        for row in cols[column]:
            assert seen.setdefault(digest(row), split) == split, f"{name}: an image in {seen[digest(row)]} and {split}"


def test_transfer_has_few_shots_of_novel_shapes_and_the_source_as_tables(built):
    d, source = built["shapes_transfer"], built["shapes_source"]
    train = d["splits"]["train"]
    assert np.bincount(train["label"]).tolist() == [S.TRANSFER_SHOTS] * len(S.TARGET_SHAPES)
    assert not set(S.TARGET_SHAPES) & set(S.SOURCE_SHAPES)
    for table, split in (("source_train", "train"), ("source_val", "val")):
        assert set(d["tables"][table]) == {"image", "label"}
        np.testing.assert_array_equal(d["tables"][table]["image"], source["splits"][split]["image"])
        np.testing.assert_array_equal(d["tables"][table]["label"], source["splits"][split]["label"])
    assert d["meta"]["shots_per_class"] == S.TRANSFER_SHOTS and d["meta"]["source_classes"] == list(S.SOURCE_CLASSES)


def test_gzsl_classes_are_factor_combinations_whose_values_all_are_seen(built):
    d = built["shapes_gzsl"]
    att = d["tables"]["class_attributes"]["attributes"]
    groups = np.cumsum([0, len(S.GZSL_SHAPES), len(S.GZSL_COLOURS), len(S.GZSL_TEXTURES)])
    for k, combo in enumerate(S.GZSL_COMBOS):
        assert [int(np.argmax(att[k, a:b])) for a, b in zip(groups[:-1], groups[1:])] == list(combo)
        assert att[k].sum() == 3
    meta = d["meta"]
    train_classes = sorted(set(meta["seen_classes"]) - set(meta["val_unseen_classes"]))
    # every attribute of a (validation-)unseen class is on for some class the generator trains on
    assert (att[train_classes].max(axis=0) == 1).all()
    assert not set(meta["unseen_classes"]) & set(meta["seen_classes"])
    assert set(np.unique(d["splits"]["train"]["label"])) == set(meta["seen_classes"])
    test = d["splits"]["test"]
    np.testing.assert_array_equal(test["unseen"], np.isin(test["label"], meta["unseen_classes"]))


# ----------------------------------------------------------------------------------------------
# Preconditions


def test_raw_pixels_fail_on_shapes_where_pose_free_features_succeed(built):
    # 1,200 train and 600 test rows (every 3rd / 2nd row, all classes) keep it fast
    train = {k: v[::3] for k, v in built["shapes"]["splits"]["train"].items()}
    test = {k: v[::2] for k, v in built["shapes"]["splits"]["test"].items()}
    raw = probe_accuracy(train["image"] / 255, train["label"], test["image"] / 255, test["label"])
    invariant = probe_accuracy(S.gzsl_features(train["image"]), train["label"],
                               S.gzsl_features(test["image"]), test["label"])
    chance = 1 / len(S.SHAPES)
    assert raw < 3 * chance and invariant > raw + 0.5, (raw, invariant)


def test_multimodal_rows_show_each_factor_as_often_as_declared_and_the_ceilings_follow(built):
    """Each (modality, factor) is shown at its MM_SHOWN rate, independently; a hidden factor is
    drawn as the symbol no class has; the ideal reader of the rows' own flags (a factor known
    where a present modality shows it, else a guess) scores each combination's declared Bayes
    accuracy."""
    d = built["shapes_multimodal"]
    rows = {k: np.concatenate([s[k] for s in d["splits"].values()]) for k in d["splits"]["train"]}
    shown = {key: rows[f"shown_{key[0]}_{key[1]}"].astype(bool) for key in S.MM_SHOWN}
    n = len(rows["label"])
    for key, rate in S.MM_SHOWN.items():
        assert abs(shown[key].mean() - rate) < 3 * np.sqrt(rate * (1 - rate) / n), key
    rgb_shape, rgb_colour = shown[("rgb", "shape")], shown[("rgb", "colour")]
    assert abs(np.corrcoef(rgb_shape, rgb_colour)[0, 1]) < 3 / np.sqrt(n)           # independent
    silhouette = rows["silhouette"].reshape(n, -1)
    np.testing.assert_array_equal(silhouette.max(1) > 0, shown[("silhouette", "shape")])
    # rgb: hidden colour is yellow, hidden shape a disc (the scene's pixels, re-rendered)
    hidden = np.flatnonzero(~rgb_colour & ~rgb_shape)[:3]
    f = {k: rows[f"factor_{k}"][hidden] for k in S.FACTORS}
    disc, _ = S.render({**f, "shape": np.full(len(hidden), S.MM_HIDDEN_SHAPE), "colour": np.full(len(hidden), S.MM_HIDDEN_COLOUR)}, 0)
    pooled = disc.reshape(len(hidden), 3, 8, 4, 8, 4).mean(axis=(3, 5)) / 255
    np.testing.assert_allclose(rows["rgb"][hidden], pooled, atol=0.05)       # (background noise differs)
    for combo, cap in d["meta"]["bayes_accuracy"].items():
        present = combo.split("+")
        acc = np.ones(n)
        for factor, values in (("shape", len(S.MM_SHAPES)), ("colour", len(S.MM_COLOURS))):
            known = np.zeros(n, bool)
            for m in present:
                known |= shown.get((m, factor), np.zeros(n, bool))
            acc *= np.where(known, 1.0, 1 / values)
        assert abs(acc.mean() - cap) < 0.03, (combo, acc.mean(), cap)


def test_no_modality_combination_beats_its_ceiling_and_the_weakest_pair_is_the_documented_one(built):
    """Linear probes per combination stay under the Bayes accuracy (plus the test split's sampling
    error), all three modalities do better than any pair, and the weakest pair and modality are the
    ones the meta declares (measured, test split: rgb 0.492 / ceiling 0.542, silhouette 0.322 /
    0.308, texture 0.195 / 0.183; rgb+silhouette 0.812 / 0.834, rgb+texture 0.475 / 0.592,
    silhouette+texture 0.687 / 0.678; all three 0.868 / 0.911)."""
    d = built["shapes_multimodal"]
    train, test = d["splits"]["train"], d["splits"]["test"]
    modalities = d["meta"]["modalities"]
    accuracy = {}
    for k in (1, 2, 3):
        for combo in itertools.combinations(modalities, k):
            def joined(cols):
                return np.concatenate([cols[m].reshape(len(cols[m]), -1) for m in combo], axis=1)
            accuracy["+".join(combo)] = probe_accuracy(joined(train), train["label"], joined(test), test["label"])
    slack = 2.5 * np.sqrt(0.25 / len(test["label"]))          # 2.5 binomial standard errors at p = 0.5
    for combo, acc in accuracy.items():
        assert acc < d["meta"]["bayes_accuracy"][combo] + slack, (combo, acc)
    everything = accuracy.pop("+".join(modalities))
    assert everything > 0.8 and everything > max(accuracy.values()), accuracy
    pairs = {c: a for c, a in accuracy.items() if c.count("+") == 1}
    assert min(pairs, key=pairs.get) == "+".join(d["meta"]["weakest_combination"]), pairs
    singles = {c: a for c, a in accuracy.items() if "+" not in c}
    assert min(singles, key=singles.get) == d["meta"]["weakest_modality"], singles


def test_gzsl_attributes_describe_the_features_and_transfer_linearly(built):
    d = built["shapes_gzsl"]
    train, test = d["splits"]["train"], d["splits"]["test"]
    att = d["tables"]["class_attributes"]["attributes"]
    mean, std = train["features"].mean(0), train["features"].std(0) + 1e-6
    z = {k: (s["features"] - mean) / std for k, s in (("train", train), ("test", test))}
    labels = np.concatenate([train["label"], test["label"]])
    both = np.concatenate([z["train"], z["test"]])
    centroids = np.stack([both[labels == c].mean(0) for c in range(len(att))])
    assert spearmanr(pdist(att), pdist(centroids)).correlation > 0.4
    # ridge attributes -> seen class centroids; nearest predicted centroid among the unseen classes
    seen, unseen = np.asarray(d["meta"]["seen_classes"]), np.asarray(d["meta"]["unseen_classes"])
    targets = np.stack([z["train"][train["label"] == c].mean(0) for c in seen])
    w = np.linalg.solve(att[seen].T @ att[seen] + 0.1 * np.eye(att.shape[1]), att[seen].T @ targets)
    rows = test["unseen"] == 1
    predicted = unseen[((z["test"][rows][:, None] - (att[unseen] @ w)[None]) ** 2).sum(-1).argmin(1)]
    assert (predicted == test["label"][rows]).mean() > 5 / len(unseen)
