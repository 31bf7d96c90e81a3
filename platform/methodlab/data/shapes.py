"""Synthetic built-ins: seeded, procedurally rendered 32x32 RGB shapes whose factors are known.

Why: on 8x8 digits a raw-pixel linear probe beats every SimCLR probe, 45-degree rotations are
not meaningful, the digits-GZSL attributes barely describe the classes, and the digits
modalities are only mildly complementary (issue 19). These tasks are built so that each
method's mechanism has room to work, and so that the precondition can be measured. Nothing is
downloaded: the images are drawn by numpy (vectorised, 2x2 supersampled for anti-aliasing) from
a fixed seed, so the same code gives the same bytes.

Factors of every image (stored as int64 columns `factor_<name>` next to the images, and next to
the modalities of `shapes_multimodal`; the GZSL layout keeps features only):

    shape       one of SHAPES (12): circle, square, plus, ring (rotation-symmetric at C4 and
                finer); h, z (C2); triangle (C3); l, t, arrow, half_disc, u (no rotational
                symmetry, so a rotation is visible). The label of `shapes`.
    colour      foreground hue, one of COLOURS (8 hues at full saturation, value 0.9)
    texture     one of TEXTURES: solid, stripes, dots, checker, drawn in the object's own
                coordinates (it turns with the shape); the pattern's 0-cells are the colour at
                35% brightness
    size        index into SIZES: the object unit in pixels (6.5, 8.5, 10.5); a shape fills
                about +-0.85 units (1.2 at its corners)
    angle       pose rotation in whole degrees, counter-clockwise (0..359): uniform in +-20
                degrees (POSE_ANGLE) unless a dataset says otherwise; SimCLR's augmentations
                (crop, flip, colour) do not undo rotations, and a small CNN learns 12 shapes
                under any rotation only slowly (measured: models.cnn at 0.21-0.24 test accuracy after
                9-10 epochs, against 0.43 after 8 at +-20 degrees)
    offset_x/y  pose position: the object centre's offset from the image centre, whole pixels
    background  one of BACKGROUNDS: dark (0.08 grey), grey (0.40), noise (0.20 grey), tinted (the
                hue opposite the foreground's at value 0.35), plus N(0, s) per pixel and channel
                with s = 0.12 for noise and 0.03 for the others (no two images are equal)

Images are `image` uint8 (3, 32, 32) with scale 1/255, like every uint8 image dataset
(`methodlab.data.decode`); labels `label` int64. Train/val/test: the fixed stratified 60/20/20
split of `builtin.stratified_split` (seed 0).

Datasets (measured preconditions are in each builder's docstring):

`shapes`            label = shape (12 classes); colour, texture, size, pose and background are
                    uniformly random nuisances. For SimCLR / Bad Batches and supervised: raw
                    pixels must fail where a small CNN does not.
`shapes_upright`    the same 12 shapes at angle 0 (position jitter of +-2 px only, sizes
                    medium/large, any rotation stays in frame), random background.
                    For canonicalization, which rotates the test images itself: a classifier
                    trained upright fails on rotated copies, a canonicalizer can restore it.
`shapes_source`     shapes 0-7 x 4 textures = 32 classes, 150 images each: a rich source task
                    to pretrain a backbone on.
`shapes_transfer`   the target task for TOAST: the 4 novel shapes 8-11 (h, half_disc, u, z,
                    never in the source), `shots` training images per class (default 10), plus
                    the source as side tables `source_train` / `source_val` (the layout of
                    `digits_transfer`).
`shapes_multimodal` the MMANet layout (`multimodal.multimodal_splits`): label = shape x colour,
                    three redundant modalities that each show a factor in a known share of
                    rows, so every combination's Bayes accuracy is known: see its docstring.
`shapes_gzsl`       the GZSL layout (`gzsl.gzsl_layout`): classes are shape x colour x texture
                    combinations, attributes their true one-hot factors, unseen classes novel
                    combinations; features from a fixed hand-made extractor (`gzsl_features`).
"""

from __future__ import annotations

import itertools

import numpy as np

from methodlab.data.builtin import SPLIT_SEED, stratified_split
from methodlab.registry import register_dataset

SIZE = 32                      # image side, pixels
SUPERSAMPLE = 2                # subpixels per pixel side (anti-aliased edges at 45 degrees)
CHUNK = 512                    # images rendered at once: (CHUNK, 64, 64) float32 temporaries
IMAGE_SCALE = 1 / 255

SHAPES = ("circle", "square", "plus", "ring", "triangle", "l", "t", "arrow",
          "h", "half_disc", "u", "z")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta")
TEXTURES = ("solid", "stripes", "dots", "checker")
SIZES = (6.5, 8.5, 10.5)
BACKGROUNDS = ("dark", "grey", "noise", "tinted")
FACTORS = ("shape", "colour", "texture", "size", "angle", "offset_x", "offset_y", "background")
FACTOR_NOTE = {
    "shape": f"index into {list(SHAPES)}", "colour": f"foreground hue index into {list(COLOURS)}",
    "texture": f"index into {list(TEXTURES)}", "size": f"index into object units (px) {list(SIZES)}",
    "angle": "pose rotation, whole degrees counter-clockwise", "offset_x": "object centre - image centre, px (right)",
    "offset_y": "object centre - image centre, px (down)", "background": f"index into {list(BACKGROUNDS)}",
}
DIM = 0.35                     # brightness of a texture's 0-cells, relative to the colour
POSE_ANGLE = 20                # default pose rotation: uniform in +-20 degrees
EXTENT = 1.2                   # a shape lies within this radius in object units (h's corners: 1.17)


# ----------------------------------------------------------------------------------------------
# The renderer


SHAPE_MASKS = (
    lambda u, w, au, aw, r2: r2 < 0.8 ** 2,                                                       # circle
    lambda u, w, au, aw, r2: np.maximum(au, aw) < 0.68,                                           # square
    lambda u, w, au, aw, r2: ((au < 0.24) & (aw < 0.85)) | ((aw < 0.24) & (au < 0.85)),           # plus
    lambda u, w, au, aw, r2: (r2 > 0.45 ** 2) & (r2 < 0.85 ** 2),                                 # ring
    lambda u, w, au, aw, r2: (w > -0.55) & (w < 0.8 - 1.8 * au),                                  # triangle, apex up
    lambda u, w, au, aw, r2: ((u > -0.6) & (u < -0.15) & (aw < 0.8)) | ((w > -0.8) & (w < -0.35) & (au < 0.6)),  # l
    lambda u, w, au, aw, r2: ((w > 0.4) & (w < 0.85) & (au < 0.75)) | ((au < 0.22) & (aw < 0.85)),        # t
    lambda u, w, au, aw, r2: (((aw < 0.2) & (u > -0.85) & (u < 0.1))                                       # arrow,
                              | ((u >= 0.0) & (u < 0.85) & (aw < 0.76 * (0.85 - u)))),                      # right
    lambda u, w, au, aw, r2: ((au > 0.45) & (au < 0.8) & (aw < 0.85)) | ((aw < 0.18) & (au < 0.8)),       # h
    lambda u, w, au, aw, r2: (u * u + (w + 0.35) ** 2 < 0.95 ** 2) & (w > -0.35),                  # half_disc, dome up
    lambda u, w, au, aw, r2: ((au > 0.4) & (au < 0.8) & (aw < 0.8)) | ((w > -0.8) & (w < -0.4) & (au < 0.8)),  # u
    lambda u, w, au, aw, r2: ((aw > 0.5) & (aw < 0.85) & (au < 0.75)) | ((au < 0.75) & (np.abs(w - 0.667 * u) < 0.24)),  # z
)
TEXTURE_PATTERNS = (
    lambda u, w: np.ones(u.shape, bool),                                                         # solid
    lambda u, w: np.mod(np.floor(u / 0.25), 2) == 0,                                             # stripes
    lambda u, w: (np.mod(u, 0.5) - 0.25) ** 2 + (np.mod(w, 0.5) - 0.25) ** 2 < 0.14 ** 2,        # dots
    lambda u, w: np.mod(np.floor(u / 0.3) + np.floor(w / 0.3), 2) == 0,                          # checker
)


def by_value(index: np.ndarray, fns, *args) -> np.ndarray:
    """out[i] = fns[index[i]](*args)[i] for (N,) `index` and (N, H, W) arrays `args`: each
    function runs on its own rows only, so the cost is one function per row, not one per value."""
    out = np.zeros(args[0].shape, bool)
    for k, fn in enumerate(fns):
        rows = np.flatnonzero(index == k)
        if len(rows):
            out[rows] = fn(*(a[rows] for a in args))
    return out


def shape_mask(shape: np.ndarray, u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Inside-the-shape booleans (N, H, W) from object coordinates u (right) and w (up), (N, H, W);
    `shape` (N,) indexes SHAPES."""
    return by_value(shape, SHAPE_MASKS, u, w, np.abs(u), np.abs(w), u * u + w * w)


def texture_pattern(texture: np.ndarray, u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The pattern's 1-cells (N, H, W) bool in object coordinates; `texture` (N,) indexes TEXTURES."""
    return by_value(texture, TEXTURE_PATTERNS, u, w)


def object_coords(f: dict[str, np.ndarray], side: int = SIZE, centre: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Object coordinates (u right, w up; (N, S, S) with S = side * SUPERSAMPLE) of the subpixel
    centres. centre=True puts the object centre at the middle of the grid (a crop around it).

    Image x runs right and y down; an object turned by angle a counter-clockwise has
    u = (dx cos a - dy sin a) / s and w = (-dx sin a - dy cos a) / s. cos/sin are rounded to 12
    digits so that multiples of 90 degrees are exact (0, +-1), which makes a 90-degree turn of a
    centred object exactly np.rot90 of its mask (tested)."""
    grid = (np.arange(side * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE - side / 2
    a = np.deg2rad(f["angle"].astype(np.float64))
    cos = np.round(np.cos(a), 12).astype(np.float32)[:, None, None]
    sin = np.round(np.sin(a), 12).astype(np.float32)[:, None, None]
    s = np.asarray(SIZES, np.float32)[f["size"]][:, None, None]
    ox = np.float32(0) if centre else f["offset_x"].astype(np.float32)[:, None, None]
    oy = np.float32(0) if centre else f["offset_y"].astype(np.float32)[:, None, None]
    dx, dy = grid[None, None, :] - ox, grid[None, :, None] - oy
    return (dx * cos - dy * sin) / s, (-dx * sin - dy * cos) / s


def downsample(x: np.ndarray) -> np.ndarray:
    """(N, S*k, S*k) -> (N, S, S) mean over each k x k block of subpixels."""
    n, h, w = x.shape
    return x.reshape(n, h // SUPERSAMPLE, SUPERSAMPLE, w // SUPERSAMPLE, SUPERSAMPLE).mean(axis=(2, 4))


def hue_rgb(hue: np.ndarray, value: float) -> np.ndarray:
    """(N,) hues in [0, 1) at full saturation -> (N, 3) RGB (the HSV hexcone)."""
    k = np.mod(np.array([5.0, 3.0, 1.0])[None, :] + hue[:, None] * 6, 6)
    return value * (1 - np.clip(np.minimum(k, 4 - k), 0, 1))


def render_chunk(f: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Float images (N, 3, 32, 32) in [0, 1] and coverage (N, 32, 32) of one chunk of factors."""
    u, w = object_coords(f)
    alpha = downsample(shape_mask(f["shape"], u, w).astype(np.float32))
    pattern = downsample(texture_pattern(f["texture"], u, w).astype(np.float32))
    colour = hue_rgb(f["colour"] / len(COLOURS), 0.9).astype(np.float32)             # (N, 3)
    fg = colour[:, :, None, None] * (DIM + (1 - DIM) * pattern[:, None])
    n = len(f["shape"])
    b = f["background"]
    noise = rng.standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)
    tint = hue_rgb(np.mod(f["colour"] / len(COLOURS) + 0.5, 1), 0.35).astype(np.float32)      # (N, 3)
    base = np.select([b == 0, b == 1, b == 2], [0.08, 0.40, 0.20], 0).astype(np.float32)[:, None]
    base = np.where((b == 3)[:, None], tint, base)                                                # (N, 3)
    # Plain backgrounds get faint noise too: without it equal factors (a circle at any angle,
    # an upright shape at the same offset) drew byte-identical images into train and test.
    sigma = np.where(b == 2, 0.12, 0.03).astype(np.float32)[:, None, None, None]
    bg = base[:, :, None, None] + sigma * noise
    image = alpha[:, None] * fg + (1 - alpha[:, None]) * bg
    return np.clip(image, 0, 1), alpha


def render(f: dict[str, np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) (scale 1/255) and float32 coverage (N, 32, 32) of the factor
    columns `f` (each (N,) int64, FACTORS); background noise comes from `seed`, chunk by chunk."""
    rng = np.random.default_rng(seed)
    n = len(f["shape"])
    images = np.empty((n, 3, SIZE, SIZE), np.uint8)
    alpha = np.empty((n, SIZE, SIZE), np.float32)
    for start in range(0, n, CHUNK):
        part = {k: v[start:start + CHUNK] for k, v in f.items()}
        img, alpha[start:start + CHUNK] = render_chunk(part, rng)
        images[start:start + CHUNK] = np.round(img * 255).astype(np.uint8)
    return images, alpha


def max_offset(size: np.ndarray) -> np.ndarray:
    """The largest whole-pixel offset that keeps a shape of object unit SIZES[size] in frame
    at any angle (a 1 px margin)."""
    return np.floor(SIZE / 2 - 1 - EXTENT * np.asarray(SIZES)[size]).astype(np.int64)


def sample_factors(rng: np.random.Generator, shape: np.ndarray, *, colours=None, textures=None,
                   sizes=None, backgrounds=None, max_angle: int = POSE_ANGLE, jitter: int | None = None,
                   fixed: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Factor columns for images of the given `shape` (N,): every other factor uniform over the
    allowed values (default all), the angle uniform over the whole degrees in +-max_angle (stored
    in 0..359; 180 is any angle, 0 upright), the offset uniform in +-min(jitter, max_offset(size)).
    `fixed` columns are taken as given."""
    n = len(shape)
    fixed = fixed or {}

    def pick(name, values, default):
        if name in fixed:
            return np.asarray(fixed[name], np.int64)
        values = np.arange(default) if values is None else np.asarray(values)
        return values[rng.integers(len(values), size=n)].astype(np.int64)

    f = {"shape": np.asarray(shape, np.int64), "colour": pick("colour", colours, len(COLOURS)),
         "texture": pick("texture", textures, len(TEXTURES)), "size": pick("size", sizes, len(SIZES)),
         "background": pick("background", backgrounds, len(BACKGROUNDS))}
    f["angle"] = np.mod(rng.integers(-max_angle, max_angle + 1, size=n), 360).astype(np.int64)
    limit = max_offset(f["size"]) if jitter is None else np.minimum(jitter, max_offset(f["size"]))
    f["offset_x"] = np.round(rng.uniform(-1, 1, n) * limit).astype(np.int64)
    f["offset_y"] = np.round(rng.uniform(-1, 1, n) * limit).astype(np.int64)
    return {k: f[k] for k in FACTORS}


# ----------------------------------------------------------------------------------------------
# Assembling datasets


def balanced(num_classes: int, per_class: int) -> np.ndarray:
    """Labels 0..num_classes-1, `per_class` of each, (num_classes * per_class,) int64."""
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def image_splits(images: np.ndarray, labels: np.ndarray, factors: dict[str, np.ndarray],
                 splits: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{split: {image, label, *factor columns}} for row indices per split."""
    return {s: {"image": images[i], "label": labels[i], **factor_columns(factors, i)} for s, i in splits.items()}


def factor_columns(factors: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The factors of `rows` as int64 columns `factor_<name>` (the prefix keeps them apart from
    data columns, e.g. the `texture` modality of `shapes_multimodal`)."""
    return {f"factor_{k}": v[rows] for k, v in factors.items()}


def image_meta(classes, what: str, **extra) -> dict:
    return {"num_classes": len(classes), "classes": list(classes), "factors": FACTOR_NOTE,
            "source": f"synthetic: methodlab.data.shapes, {what}",
            "split": f"stratified 60/20/20, seed {SPLIT_SEED}", **extra}


SHAPES_PER_CLASS = 500


def make_shapes(per_class: int = SHAPES_PER_CLASS, seed: int = 0) -> dict:
    """label = shape, every other factor a uniform nuisance (module docstring)."""
    rng = np.random.default_rng(seed)
    labels = balanced(len(SHAPES), per_class)
    f = sample_factors(rng, labels)
    images, _ = render(f, seed + 1)
    return {"splits": image_splits(images, labels, f, stratified_split(labels)),
            "scales": {"image": IMAGE_SCALE},
            "meta": image_meta(SHAPES, f"label = shape, {per_class} images per class, seed {seed}")}


@register_dataset("shapes")
def shapes() -> dict:
    """12 shapes x 500 = 6,000 images (3,600 train).

    Precondition, measured on the test split (seed 0) with an L-BFGS logistic regression on
    standardised inputs (weight decay 1e-3, 100 iterations: the recipe of
    `bad_batches.linear_probe`, which tests/test_shapes.py uses):
    raw pixels 0.139 (chance 0.083); one-hots of the nuisance factors 0.085; the pose-free
    hand-made `gzsl_features` 0.965. The platform's `cnn` (models.cnn.SmallCNN, Adam 3e-3,
    batch 128, CPU) trained supervised: 0.34 after 5 epochs, 0.43 after 8, still rising. So a
    representation that discards colour, texture, position and background is linearly
    separable while raw pixels are not (tests/test_shapes.py checks raw < 3 x chance and the
    features > raw + 0.5)."""
    return make_shapes()


# ----------------------------------------------------------------------------------------------
# A fixed, hand-made feature extractor (the GZSL features; also the invariant probe of the tests)

HUE_BINS = 8
RADIAL_BINS = 8
ANGULAR_ORDERS = 6


def gzsl_features(images: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) uint8 images -> (N, FEATURE_DIM) float32 features that encode colour,
    shape and texture imperfectly and ignore pose, by construction (no learning, deterministic):

      foreground   pixels of the 3x3-blurred image farther than 0.15 (RGB distance) from the
                   median colour of the image border (an estimate: noisy backgrounds leak in)
      colour (11)  a saturation-weighted hue histogram of the foreground (8 bins) and its mean
                   chromaticity (3)
      shape (21)   the radial profile of the foreground around its centroid, in units of its
                   own sqrt(area) (8 bins: scale- and rotation-free), the magnitudes of its
                   angular Fourier orders 1..6 (rotation-free), the log of Hu's first 7 moment
                   invariants
      texture (6)  inside the foreground: mean gradient magnitude, Laplacian energy at 1 and
                   2 px, structure-tensor coherence (stripes are coherent, dots and checker are
                   not), brightness std / mean, and the fraction of dim pixels
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255                   # (N, 3, H, W)
        n, _, h, w = x.shape
        blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        border = torch.cat([blur[:, :, 0], blur[:, :, -1], blur[:, :, :, 0], blur[:, :, :, -1]], dim=2)
        bg = border.median(dim=2).values[:, :, None, None]                                  # (N, 3, 1, 1)
        m = ((blur - bg).norm(dim=1) > 0.15).float()                                        # (N, H, W)
        area = m.sum(dim=(1, 2)).clamp_min(1)
        # colour
        mx, mn = x.max(dim=1).values, x.min(dim=1).values
        sat = (mx - mn) / mx.clamp_min(1e-3)
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        hue = torch.atan2(np.sqrt(3) * (g - b), 2 * r - g - b) / (2 * np.pi) % 1            # (N, H, W)
        bins = torch.clamp((hue * HUE_BINS).long(), max=HUE_BINS - 1)
        weight = (m * sat).flatten(1)
        hist = torch.zeros(n, HUE_BINS).scatter_add_(1, bins.flatten(1), weight)
        hist = hist / hist.sum(dim=1, keepdim=True).clamp_min(1e-6)
        mean_rgb = (x * m[:, None]).sum(dim=(2, 3)) / area[:, None]
        chroma = mean_rgb / mean_rgb.sum(dim=1, keepdim=True).clamp_min(1e-6)
        # shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        cy = (m * ys).sum(dim=(1, 2)) / area
        cx = (m * xs).sum(dim=(1, 2)) / area
        dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
        rad = torch.sqrt(dx * dx + dy * dy) / area.sqrt()[:, None, None]
        rbins = torch.clamp((rad / 1.2 * RADIAL_BINS).long(), max=RADIAL_BINS - 1)
        radial = torch.zeros(n, RADIAL_BINS).scatter_add_(1, rbins.flatten(1), m.flatten(1)) / area[:, None]
        theta = torch.atan2(dy, dx)
        orders = torch.arange(1, ANGULAR_ORDERS + 1, dtype=torch.float32)[:, None, None, None]
        re = (m * torch.cos(orders * theta)).sum(dim=(2, 3)).T
        im = (m * torch.sin(orders * theta)).sum(dim=(2, 3)).T
        angular = torch.sqrt(re * re + im * im) / area[:, None]
        hu = hu_moments(m, dx, dy, area)
        # texture
        grey = x.mean(dim=1, keepdim=True)
        sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8
        gx = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), sobel[None, None])[:, 0]
        gy = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), sobel.T[None, None])[:, 0]
        lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])[None, None]
        lap1 = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), lap)[:, 0]
        lap2 = F.conv2d(F.pad(grey, (2, 2, 2, 2), mode="replicate"), lap, dilation=2)[:, 0]
        inner = m * F.max_pool2d(1 - m[:, None], 3, stride=1, padding=1)[:, 0].eq(0).float()  # no edge pixels
        inner_area = inner.sum(dim=(1, 2)).clamp_min(1)

        def inside(v):
            return (v * inner).sum(dim=(1, 2)) / inner_area

        jxx, jyy, jxy = inside(gx * gx), inside(gy * gy), inside(gx * gy)
        coherence = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy).clamp_min(1e-6)
        level = inside(grey[:, 0])
        spread = torch.sqrt((inside(grey[:, 0] ** 2) - level ** 2).clamp_min(0)) / level.clamp_min(1e-3)
        dim_share = inside((grey[:, 0] < 0.6 * level[:, None, None]).float())
        texture = torch.stack([inside(torch.sqrt(gx * gx + gy * gy)), inside(lap1.abs()), inside(lap2.abs()),
                               coherence, spread, dim_share], dim=1)
        return torch.cat([hist, chroma, radial, angular, hu, texture], dim=1).numpy().astype(np.float32)


def hu_moments(m, dx, dy, area):
    """Hu's 7 invariants of masks m (N, H, W) about their centroid (dx, dy offsets), as
    sign(h) log(1 + |h|) * 100-scaled so the 7 live on comparable ranges. (N, 7)."""
    import torch

    def eta(p, q):
        return (m * dx ** p * dy ** q).sum(dim=(1, 2)) / area ** (1 + (p + q) / 2)

    n20, n02, n11 = eta(2, 0), eta(0, 2), eta(1, 1)
    n30, n03, n21, n12 = eta(3, 0), eta(0, 3), eta(2, 1), eta(1, 2)
    a, b = n30 + n12, n21 + n03
    h = torch.stack([
        n20 + n02, (n20 - n02) ** 2 + 4 * n11 ** 2, (n30 - 3 * n12) ** 2 + (3 * n21 - n03) ** 2, a ** 2 + b ** 2,
        (n30 - 3 * n12) * a * (a ** 2 - 3 * b ** 2) + (3 * n21 - n03) * b * (3 * a ** 2 - b ** 2),
        (n20 - n02) * (a ** 2 - b ** 2) + 4 * n11 * a * b,
        (3 * n21 - n03) * a * (a ** 2 - 3 * b ** 2) - (n30 - 3 * n12) * b * (3 * a ** 2 - b ** 2)], dim=1)
    return torch.sign(h) * torch.log1p(100 * h.abs())


# ----------------------------------------------------------------------------------------------
# shapes_upright (canonicalization)

UPRIGHT_SIZES = (1, 2)          # 8.5 and 10.5 px units: a turned shape (+-2 px) stays in frame
UPRIGHT_JITTER = 2
UPRIGHT_PER_CLASS = 400


@register_dataset("shapes_upright", aliases=("shapes-upright",))
def shapes_upright() -> dict:
    """12 shapes x 400 = 4,800 images at angle 0; offsets +-2 px and sizes 8.5 / 10.5 px so that
    the shape (radius <= 1.2 x 10.5 px + 2.8 px of offset) stays inside the 16 px half-frame at any
    angle, which canonicalization's own test-time rotation relies on. Colour, texture and
    background (all four) stay random nuisances.

    Measured: the platform's `cnn` (models.cnn.SmallCNN, Adam 3e-3, batch 128, 6 epochs on
    CPU, no rotation augmentation) reaches 0.37 on the upright test split and 0.13 / 0.35 /
    0.14 on its copies turned by 90 / 180 / 270 degrees (180 is kinder: circle, square, plus,
    ring, h and z look the same), 0.14 at 45 degrees (kornia, border padding); chance 0.083.
    So rotation costs most of the accuracy, which is what a canonicalizer can win back."""
    rng = np.random.default_rng(10)
    labels = balanced(len(SHAPES), UPRIGHT_PER_CLASS)
    f = sample_factors(rng, labels, sizes=UPRIGHT_SIZES, max_angle=0, jitter=UPRIGHT_JITTER)
    images, _ = render(f, 11)
    return {"splits": image_splits(images, labels, f, stratified_split(labels)),
            "scales": {"image": IMAGE_SCALE},
            "meta": image_meta(SHAPES, "label = shape, upright (angle 0), offsets +-2 px, sizes 8.5/10.5 px, seed 10",
                               upright=True)}


# ----------------------------------------------------------------------------------------------
# shapes_source / shapes_transfer (TOAST)

SOURCE_SHAPES = tuple(range(8))          # circle .. arrow
TARGET_SHAPES = tuple(range(8, 12))      # h, half_disc, u, z: never in the source
SOURCE_PER_CLASS = 150
TARGET_PER_CLASS = 300
TRANSFER_SHOTS = 10
SOURCE_CLASSES = tuple(f"{SHAPES[s]}/{TEXTURES[t]}" for s in SOURCE_SHAPES for t in range(len(TEXTURES)))


def _source() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Images, labels (shape x texture, SOURCE_CLASSES order), factors and split rows of the source."""
    rng = np.random.default_rng(20)
    labels = balanced(len(SOURCE_CLASSES), SOURCE_PER_CLASS)
    shape = np.asarray(SOURCE_SHAPES)[labels // len(TEXTURES)]
    f = sample_factors(rng, shape, fixed={"texture": labels % len(TEXTURES)})
    images, _ = render(f, 21)
    return images, labels, f, stratified_split(labels)


@register_dataset("shapes_source", aliases=("shapes-source",))
def shapes_source() -> dict:
    """32 classes (shapes 0-7 x 4 textures), 150 images each, 4,800 in all (2,880 train)."""
    images, labels, f, splits = _source()
    return {"splits": image_splits(images, labels, f, splits), "scales": {"image": IMAGE_SCALE},
            "meta": image_meta(SOURCE_CLASSES, "label = shape x texture over shapes 0-7, seed 20")}


def transfer_task(shots: int) -> dict:
    """Target: the 4 novel shapes 8-11 (labels 0-3), `shots` training images per class (the first
    ones of each class's fixed train rows), all val and test rows; the source's train and val
    splits as tables `source_train` / `source_val` (image, label), as `digits_transfer`."""
    src_images, src_labels, _, src_splits = _source()
    rng = np.random.default_rng(30)
    labels = balanced(len(TARGET_SHAPES), TARGET_PER_CLASS)
    f = sample_factors(rng, np.asarray(TARGET_SHAPES)[labels])
    images, _ = render(f, 31)
    splits = stratified_split(labels)
    train = splits["train"]
    splits["train"] = np.sort(np.concatenate([train[labels[train] == c][:shots] for c in range(len(TARGET_SHAPES))]))
    return {
        "splits": image_splits(images, labels, f, splits), "scales": {"image": IMAGE_SCALE},
        "tables": {t: {"image": src_images[src_splits[s]], "label": src_labels[src_splits[s]]}
                   for t, s in (("source_train", "train"), ("source_val", "val"))},
        "meta": image_meta([SHAPES[s] for s in TARGET_SHAPES],
                           f"target = novel shapes 8-11 (labels 0-3), {TARGET_PER_CLASS} per class, seed 30; "
                           "source (shapes_source) in tables source_train/source_val",
                           source_classes=list(SOURCE_CLASSES), shots_per_class=shots,
                           split=f"stratified 60/20/20, seed {SPLIT_SEED}; train = first {shots} rows per "
                                 "class of the train split"),
    }


@register_dataset("shapes_transfer", aliases=("shapes-transfer",))
def shapes_transfer() -> dict:
    """4 novel shapes x 300 images, 10 shots per class (40 train rows), 240 val, 240 test.

    Measured (the logistic regression of `shapes`): on the 40 shots, raw pixels reach
    0.34 on test (chance 0.25) and the hand-made pose-free `gzsl_features` 0.93, so features
    that know shapes transfer and pixels do not; on the source, raw pixels reach 0.12 on
    source_val (32 classes, chance 0.03)."""
    return transfer_task(TRANSFER_SHOTS)


# ----------------------------------------------------------------------------------------------
# shapes_multimodal (MMANet)

MM_SHAPES = (1, 4, 2, 5)           # square, triangle, plus, l
MM_COLOURS = (0, 3, 5)             # red, green, blue
MM_MODALITIES = ("rgb", "silhouette", "texture")
MM_PER_CLASS = 250
MM_TEXTURE_SIDE = 12
MM_CLASSES = tuple(f"{SHAPES[s]}/{COLOURS[c]}" for s, c in itertools.product(MM_SHAPES, MM_COLOURS))
# What a modality draws where it does not show a factor: a symbol no class has, so that a hidden
# factor is recognisable as hidden and says nothing about the label.
MM_HIDDEN_SHAPE = 0                # circle: rgb draws a disc
MM_HIDDEN_COLOUR = 2               # yellow: rgb draws the object yellow
MM_COLOUR_TEXTURES = (1, 2, 3)     # the texture modality's code for red, green, blue: stripes, dots, checker;
                                   # solid (0) where it does not show the colour
# (modality, factor) -> how often the modality shows the factor (independently per row)
MM_SHOWN = {("rgb", "shape"): 0.5, ("rgb", "colour"): 0.8, ("silhouette", "shape"): 0.9, ("texture", "colour"): 0.6}


def multimodal_bayes_accuracy(shown: dict[tuple[str, str], float] = MM_SHOWN) -> dict[str, float]:
    """The Bayes accuracy of every modality combination ('rgb+texture', ...) of shapes_multimodal:
    the label is uniform over shape x colour; a factor is known when some modality of the
    combination shows it (else a guess among its values), and shape and colour are shown
    independently, so accuracy = P(shape known or guessed) x P(colour known or guessed)."""
    values = {"shape": len(MM_SHAPES), "colour": len(MM_COLOURS)}
    out = {}
    for k in range(1, len(MM_MODALITIES) + 1):
        for combo in itertools.combinations(MM_MODALITIES, k):
            acc = 1.0
            for factor, n in values.items():
                hidden = float(np.prod([1 - shown.get((m, factor), 0.0) for m in combo]))
                acc *= (1 - hidden) + hidden / n
            out["+".join(combo)] = acc
    return out


def multimodal_views(f: dict[str, np.ndarray], shows: dict[tuple[str, str], np.ndarray],
                     seed: int) -> dict[str, np.ndarray]:
    """The three modalities of the scenes `f` where `shows[(modality, factor)]` (N,) bool says
    whether the modality shows the factor:
      rgb (3, 8, 8)          the scene, solid, mean-pooled 4x4: the shape where shown (else a
                             disc), its colour where shown (else yellow);
      silhouette (1, 32, 32) the coverage mask of the shape where shown, else blank;
      texture (1, 12, 12)    a pattern coding the colour (stripes, dots, checker for red, green,
                             blue) where shown, else solid, in a 12 px crop at the object centre
                             in its pose, 0.35 / 1 brightness plus N(0, 0.1) noise."""
    n = len(f["shape"])
    scene = {**f, "texture": np.zeros(n, np.int64),
             "shape": np.where(shows[("rgb", "shape")], f["shape"], MM_HIDDEN_SHAPE),
             "colour": np.where(shows[("rgb", "colour")], f["colour"], MM_HIDDEN_COLOUR)}
    images, _ = render(scene, seed)
    _, alpha = render(f, seed + 1)
    alpha = np.where(shows[("silhouette", "shape")][:, None, None], alpha, np.float32(0))
    code = np.asarray(MM_COLOUR_TEXTURES)[np.searchsorted(MM_COLOURS, f["colour"])]
    coded = {**f, "texture": np.where(shows[("texture", "colour")], code, 0)}
    u, w = object_coords(coded, side=MM_TEXTURE_SIDE, centre=True)
    pattern = downsample(texture_pattern(coded["texture"], u, w).astype(np.float32))
    noise = np.random.default_rng(seed + 2).standard_normal(pattern.shape).astype(np.float32)
    rgb = images.reshape(n, 3, 8, 4, 8, 4).mean(axis=(3, 5), dtype=np.float32) * np.float32(IMAGE_SCALE)
    return {"rgb": rgb, "silhouette": alpha[:, None].astype(np.float32),
            "texture": (DIM + (1 - DIM) * pattern + 0.1 * noise)[:, None].astype(np.float32)}


@register_dataset("shapes_multimodal", aliases=("shapes-multimodal",))
def shapes_multimodal() -> dict:
    """The label is shape x colour (4 x 3 = 12 classes, 250 images each). The modalities are
    redundant and unevenly reliable, as sensors are: rgb shows the shape in 50% of rows and the
    colour in 80%; the silhouette shows the shape in 90%; the texture codes the colour in 60%
    (MM_SHOWN; otherwise each draws a symbol no class has: `multimodal_views`). So a missing
    modality costs accuracy in a known amount, and a combination's ceiling is its exact Bayes
    accuracy (`multimodal_bayes_accuracy`, in `meta.bayes_accuracy`): rgb 0.542, silhouette 0.308,
    texture 0.183; rgb+silhouette 0.834, rgb+texture 0.592, silhouette+texture 0.678; all three
    0.911. Upright (angle 0, offsets +-3 px), so that a linear probe can read the silhouette.
    The weakest combination missing one modality (MMANet's mining candidates) is rgb+texture:
    `meta.weakest_combination`. Each row's `shown_<modality>_<factor>` column says what it shows.

    (Before, each modality saw one factor only, so every combination sat at its Bayes cap from
    the first epochs and MAD and MAR had nothing to add: the dropout baseline was 0.0045 below
    the caps on average.) tests/test_shapes.py checks the shown rates against MM_SHOWN and every
    combination's linear probe against its ceiling."""
    from methodlab.data.multimodal import multimodal_meta, multimodal_splits

    rng = np.random.default_rng(40)
    labels = balanced(len(MM_CLASSES), MM_PER_CLASS)
    s, c = np.divmod(labels, len(MM_COLOURS))
    f = sample_factors(rng, np.asarray(MM_SHAPES)[s], max_angle=0, jitter=3, sizes=(1, 2),
                       fixed={"colour": np.asarray(MM_COLOURS)[c], "texture": np.zeros(len(labels), np.int64)})
    shows = {key: rng.random(len(labels)) < rate for key, rate in MM_SHOWN.items()}
    splits = multimodal_splits(multimodal_views(f, shows, 41), labels, stratified_split(labels))
    for split, rows in stratified_split(labels).items():
        splits[split].update(factor_columns(f, rows))
        splits[split].update({f"shown_{m}_{k}": v[rows].astype(np.int64) for (m, k), v in shows.items()})
    caps = multimodal_bayes_accuracy()
    pairs = {c: a for c, a in caps.items() if c.count("+") == 1}
    singles = {c: a for c, a in caps.items() if "+" not in c}
    return {"splits": splits,
            "meta": multimodal_meta(MM_MODALITIES, len(MM_CLASSES), MM_CLASSES,
                                    source="synthetic: methodlab.data.shapes, label = shape x colour, seed 40",
                                    split=f"stratified 60/20/20, seed {SPLIT_SEED}",
                                    factors=FACTOR_NOTE, bayes_accuracy=caps,
                                    shown={f"{m}/{k}": r for (m, k), r in MM_SHOWN.items()},
                                    weakest_modality=min(singles, key=singles.get),
                                    weakest_combination=min(pairs, key=pairs.get).split("+"),
                                    construction="rgb: the scene mean-pooled to 8x8, shape or disc, colour or yellow; "
                                                 "silhouette: coverage mask or blank; texture: a colour code "
                                                 "(stripes/dots/checker) or solid in a 12 px crop at the object centre")}


# ----------------------------------------------------------------------------------------------
# shapes_gzsl (D3GZSL)

GZSL_SHAPES = (0, 1, 2, 3, 4, 6)       # circle, square, plus, ring, triangle, t
GZSL_COLOURS = (0, 2, 3, 5)            # red, yellow, green, blue
GZSL_TEXTURES = (0, 1, 2)              # solid, stripes, dots
GZSL_PER_CLASS = 50
GZSL_TEST_SEEN = 10                    # per seen class; the other 40 are trainval
GZSL_COMBOS = tuple(itertools.product(range(len(GZSL_SHAPES)), range(len(GZSL_COLOURS)), range(len(GZSL_TEXTURES))))
GZSL_ATTRIBUTES = tuple([f"shape={SHAPES[s]}" for s in GZSL_SHAPES] + [f"colour={COLOURS[c]}" for c in GZSL_COLOURS]
                        + [f"texture={TEXTURES[t]}" for t in GZSL_TEXTURES])


def gzsl_roles() -> tuple[np.ndarray, np.ndarray]:
    """(unseen classes, validation-unseen classes): unseen where (s + c + t) % 4 == 0 (18 of 72;
    every shape value keeps 9 seen classes, every colour 13-14, every texture 18), validation-
    unseen where the sum is 1 mod 4 and the shape index even (9 seen classes; the 45 classes
    left to train on hold every shape value 6-9 times, every colour 10-12, every texture 15)."""
    total = np.array([sum(k) for k in GZSL_COMBOS])
    shape = np.array([k[0] for k in GZSL_COMBOS])
    return np.flatnonzero(total % 4 == 0), np.flatnonzero((total % 4 == 1) & (shape % 2 == 0))


@register_dataset("shapes_gzsl", aliases=("shapes-gzsl",))
def shapes_gzsl() -> dict:
    """72 classes = 6 shapes x 4 colours x 3 textures, 50 images each (random size, angle,
    position and background); attributes the 13 true one-hot factors; 18 unseen classes, 9
    validation-unseen (`gzsl_roles`); features `gzsl_features` (38-d, fixed, pose-free).

    Measured (features standardised on train): Spearman correlation between the classes'
    attribute distances and class-mean feature distances 0.59 (digits_gzsl: 0.28); a ridge
    map from attributes to seen class means, scored by the nearest predicted mean among the 18
    unseen classes, 0.96 on test-unseen (chance 0.056); a linear probe on the seen classes
    0.98 on test-seen. Zero-shot transfer is possible by construction, so a GZSL method that
    fails here fails on its own account."""
    from methodlab.data.gzsl import gzsl_layout

    rng = np.random.default_rng(50)
    labels = balanced(len(GZSL_COMBOS), GZSL_PER_CLASS)
    combos = np.asarray(GZSL_COMBOS)[labels]
    f = sample_factors(rng, np.asarray(GZSL_SHAPES)[combos[:, 0]], max_angle=180,
                       fixed={"colour": np.asarray(GZSL_COLOURS)[combos[:, 1]],
                              "texture": np.asarray(GZSL_TEXTURES)[combos[:, 2]]})
    images, _ = render(f, 51)
    features = gzsl_features(images)
    attributes = np.zeros((len(GZSL_COMBOS), len(GZSL_ATTRIBUTES)), np.float32)
    for k, (s, c, t) in enumerate(GZSL_COMBOS):
        attributes[k, [s, len(GZSL_SHAPES) + c, len(GZSL_SHAPES) + len(GZSL_COLOURS) + t]] = 1
    unseen, val_unseen = gzsl_roles()
    is_unseen = np.isin(labels, unseen)
    within = np.arange(len(labels)) % GZSL_PER_CLASS
    trainval = np.flatnonzero(~is_unseen & (within >= GZSL_TEST_SEEN))
    test_seen = np.flatnonzero(~is_unseen & (within < GZSL_TEST_SEEN))
    names = [f"{SHAPES[GZSL_SHAPES[s]]}/{COLOURS[GZSL_COLOURS[c]]}/{TEXTURES[GZSL_TEXTURES[t]]}"
             for s, c, t in GZSL_COMBOS]
    return gzsl_layout(features, labels, attributes, trainval, test_seen, np.flatnonzero(is_unseen), val_unseen,
                       0.2, {"source": "synthetic: methodlab.data.shapes, classes = shape x colour x texture, "
                                       "features = shapes.gzsl_features of the rendered images, seed 50",
                             "attribute_names": list(GZSL_ATTRIBUTES), "factors": FACTOR_NOTE}, names)
