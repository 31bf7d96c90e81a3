"""Learned canonicalization: group actions, canonicalizer networks and the wrapped models.

Papers:
  Kaba, Mondal, Zhang, Bengio, Ravanbakhsh, "Equivariance with Learned Canonicalization
    Functions", ICML 2023, arXiv 2211.06489 (an equivariant network picks the group element).
  Mondal, Panigrahi, Kaba, Rajeswar, Ravanbakhsh, "Equivariant Adaptation of Large Pretrained
    Models", NeurIPS 2023, arXiv 2310.01647 (the canonicalization prior).
  Panigrahi & Mondal, "Improved Canonicalization for Model Agnostic Equivariance", CVPR 2024
    EquiVision workshop, arXiv 2405.14089 (a NON-equivariant network scores every group copy).
Official code: arnab39/equiadapt 0.1.2 (`OptimizedGroupEquivariantImageCanonicalization`).

The group acts on images (B, C, H, W). Element (angle, flip) maps x to R_angle(F^flip x): flip
(horizontal) FIRST, then rotate counter-clockwise. The scored copies and the canonical image are
the SAME tensor (the canonical image is the selected copy), so the scoring order and the applied
order cannot disagree — unlike the official code, which scores hflip∘R but applies R∘hflip.

Because the canonical image is chosen from the set {g·x : g in G}, and that set only gets permuted
when x is transformed by a group element, the canonicalized model is invariant by construction
for exact actions (C4 / D4 via `torch.rot90`, `torch.flip`), with ANY scoring network, in eval mode.
Angles that are not multiples of 90 degrees use kornia with edge padding (`pad_ratio` of the size;
0 = none, kornia fills the corners with zeros) and a centre crop, which makes C8 invariance
approximate (interpolation). equiadapt edge-pads RGB inputs by 0.5 and does not pad grayscale
ones: `pad_ratio=0.5` is faithful for RGB, `pad_ratio=0` for grayscale; 0.5 is the default for both.

The equivariant baseline ("group_conv") is a C_n group-conv network with steerable filters
(`steerable_basis`): exact at C4, and at C8 equivariant up to the pixel grid — for 45-degree steps
its argmax shifts by one for 0.90-0.97 of smooth 32 px images at init (the earlier version, whose
3x3 filters were rotated by bilinear resampling, for 0.00-0.09), and for 0.61-0.91 (by background
and seed) of `shapes_upright`'s test images of the 8 shapes without rotational symmetry, whose
sharp edges and textures the 45-degree interpolation changes most.

Registered archs (rebuilt from their spec by `build_model`, callable as images -> logits):
  "canonicalized"   canonicalizer ("cnn": cosine scoring, or "group_conv": Kaba et al.) + predictor
  "group_averaged"  mean of the predictor's logits over all |G| copies (a baseline)
"""

from __future__ import annotations

import math
from typing import Any

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from methodlab.models.factory import build_model
from methodlab.registry import register_model


# ----------------------------------------------------------------------------------------------
# Group actions


def group_elements(num_rotations: int, reflections: bool) -> list[tuple[float, bool]]:
    """The elements (angle in degrees, flip) of C_n or D_n; index 0 is the identity.
    Order: the n rotations, then (with reflections) the n reflected rotations."""
    angles = [360.0 * k / num_rotations for k in range(num_rotations)]
    return [(a, False) for a in angles] + ([(a, True) for a in angles] if reflections else [])


def inverse_indices(num_rotations: int, reflections: bool) -> list[int]:
    """inv[i] is the index of g_i^{-1}: R_k^{-1} = R_{-k}; every R_k∘F is its own inverse."""
    inv = [(-k) % num_rotations for k in range(num_rotations)]
    return inv + ([num_rotations + k for k in range(num_rotations)] if reflections else [])


def element_names(num_rotations: int, reflections: bool) -> list[str]:
    """Metric-friendly names: r0, r90, ..., r45f (f: reflected)."""
    return [f"r{a:g}".replace(".", "_") + ("f" if f else "") for a, f in group_elements(num_rotations, reflections)]


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


def rotate_interpolated(x: torch.Tensor, angles: torch.Tensor, pad_ratio: float) -> torch.Tensor:
    """Rotate each image of x (B, C, H, W) counter-clockwise by angles (B,) degrees with kornia:
    edge-pad by ceil(pad_ratio * max(H, W)) so the corners come from the border instead of zeros,
    rotate about the centre, crop back to (H, W). As in equiadapt's `group_augment`."""
    h, w = x.shape[-2:]
    pad = math.ceil(pad_ratio * max(h, w))
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate") if pad else x
    rotated = kornia.geometry.transform.rotate(padded, angles.to(x.dtype))
    return _center_crop(rotated, h, w)


def rotate(x: torch.Tensor, angle: float, pad_ratio: float) -> torch.Tensor:
    """Rotate x (B, C, H, W) counter-clockwise by `angle` degrees: exactly (`rot90`) when the angle
    is a multiple of 90 and the image square, else interpolated (`rotate_interpolated`)."""
    quarter = angle / 90.0
    if quarter == round(quarter) and (int(round(quarter)) % 2 == 0 or x.shape[-1] == x.shape[-2]):
        return torch.rot90(x, int(round(quarter)) % 4, dims=(-2, -1))
    return rotate_interpolated(x, torch.full((x.shape[0],), angle, device=x.device), pad_ratio)


def act(x: torch.Tensor, angle: float, flip: bool, pad_ratio: float) -> torch.Tensor:
    """g·x for g = (angle, flip): R_angle(F^flip x), the one order used everywhere."""
    return rotate(torch.flip(x, dims=(-1,)) if flip else x, angle, pad_ratio)


def group_copies(x: torch.Tensor, num_rotations: int, reflections: bool, pad_ratio: float) -> torch.Tensor:
    """All copies g·x of x (B, C, H, W), as (B, |G|, C, H, W) in `group_elements` order."""
    return torch.stack([act(x, a, f, pad_ratio) for a, f in group_elements(num_rotations, reflections)], dim=1)


def content_key(images: torch.Tensor) -> torch.Tensor:
    """A tie-breaking key that depends only on each image's content: (..., C, H, W) -> (...), the
    inner product with a fixed, asymmetric pseudo-random pattern. Distinct images get distinct keys
    almost surely, and a copy's key does not depend on where it sits in the batch or group."""
    n = images.shape[-3] * images.shape[-2] * images.shape[-1]
    idx = torch.arange(n, device=images.device, dtype=images.dtype)
    pattern = torch.frac(torch.sin(idx * 12.9898 + 78.233) * 43758.5453)
    return (images.flatten(-3) * pattern).sum(-1)


def straight_through_onehot(scores: torch.Tensor, beta: float = 1.0,
                            tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """(B, G) scores -> (B, G) weights: exactly one-hot(argmax) in the forward pass, with the
    gradient of softmax(beta * scores) (Kaba et al. 2023). The soft part is added as
    `(soft - soft.detach())`, which is exactly 0, so the forward value is bit-exactly one-hot
    (`hard + soft - soft.detach()` would round to 1 ± eps).

    `tiebreak` (B, G): among exactly tied top scores, the largest key wins. An argmax by position
    would make a tie (a degenerate φ, e.g. dead ReLUs) pick different images for x and g·x; a
    content key (`content_key` of the candidates) keeps the choice a function of the set of copies."""
    key = scores
    if tiebreak is not None:
        top = scores == scores.max(dim=-1, keepdim=True).values
        key = tiebreak.masked_fill(~top, float("-inf"))
    hard = F.one_hot(key.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)
    soft = torch.softmax(beta * scores, dim=-1)
    return hard + (soft - soft.detach())


def select(weights: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
    """Σ_g w_g · copy_g: (B, G) one-hot weights, (B, G, C, H, W) copies -> (B, C, H, W). With an
    exactly one-hot w this is the selected copy, bit for bit."""
    return torch.einsum("bg,bgchw->bchw", weights, copies)


# ----------------------------------------------------------------------------------------------
# Canonicalizer networks


class ConvVectorNet(nn.Module):
    """The non-equivariant φ of Panigrahi & Mondal (equiadapt `ConvNetwork`): conv-BN-GELU blocks,
    flatten (keeps the spatial layout, so φ can tell orientations apart), BN1d, dropout, ReLU,
    linear -> (B, out_dim). Convs use stride 2 while the map is >= 16 pixels, stride 1 below (the
    official k7/s2 stack assumes 96-pixel inputs; digits are 8x8)."""

    def __init__(self, in_channels: int, image_size: int, channels: int = 16, num_layers: int = 3,
                 kernel_size: int = 3, out_dim: int = 64, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        size, c_in = image_size, in_channels
        for _ in range(num_layers):
            stride = 2 if size >= 16 else 1
            layers += [nn.Conv2d(c_in, channels, kernel_size, stride=stride, padding=kernel_size // 2),
                       nn.BatchNorm2d(channels), nn.GELU()]
            size = (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1
            c_in = channels
        flat = channels * size * size
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.BatchNorm1d(flat), nn.Dropout(dropout),
                                 nn.ReLU(), nn.Linear(flat, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def steerable_basis(kernel_size: int, angle: float, sigma: float = 0.6) -> torch.Tensor:
    """A steerable basis of k x k filters (Weiler et al., CVPR 2018; escnn's R2Conv bases), rotated
    counter-clockwise by `angle` degrees: Gaussian rings g_j(r) = exp(-(r - j)^2 / 2 sigma^2),
    j = 0..k//2, inside a disk of radius k/2, times circular harmonics cos(m phi), sin(m phi) for
    m <= j (m = 0 only at the centre). Higher frequencies alias on a ring of about 2 pi j samples,
    and a square support changes under a 45-degree rotation: with m <= 2j - 1 on the square the C8
    argmax shifted correctly for 0.73 of images at init, with both choices here about 0.9 (k=5,
    32 px, smooth random images; `test_group_conv_canonicalizer_is_c8_equivariant_at_init`).
    Each element is a continuous function sampled at the pixel centres, so its rotation by ANY angle is sampled
    exactly (W_theta(p) = W(R_-theta p)), instead of resampling the pixels of a rotated filter.
    Multiples of 90 degrees go through `torch.rot90` of the residual angle's basis, so C4 stays exact.

    Shape:
        -> (num_basis, k, k), each element of unit L2 norm at angle 0 (the norm is rotation invariant
        up to sampling).
    """
    quarters, residual = divmod(angle, 90.0)
    # normalised by the angle-0 norms, so that every rotation of an element is scaled alike
    norms = _harmonics(kernel_size, 0.0, sigma).flatten(1).norm(dim=1).clamp_min(1e-12)
    basis = _harmonics(kernel_size, residual, sigma) / norms[:, None, None]
    return torch.rot90(basis, int(quarters) % 4, dims=(-2, -1)).float()


def _harmonics(kernel_size: int, angle: float, sigma: float) -> torch.Tensor:
    """The unnormalised `steerable_basis` rotated by `angle` degrees: (num_basis, k, k) float64."""
    c = kernel_size // 2
    rows, cols = torch.meshgrid(torch.arange(kernel_size, dtype=torch.float64) - c,
                                torch.arange(kernel_size, dtype=torch.float64) - c, indexing="ij")
    # y points up, so phi grows counter-clockwise on screen, as in torch.rot90 and kornia's rotate
    radius, phi = torch.hypot(rows, cols), torch.atan2(-rows, cols) - math.radians(angle)
    # a disk-shaped support with a one-pixel linear edge: the square's corners would make the
    # support itself change under a 45-degree rotation
    window = (c + 0.5 - radius).clamp(0, 1)
    basis = []
    for j in range(c + 1):
        ring = window * torch.exp(-(radius - j) ** 2 / (2 * sigma ** 2))
        basis.append(ring)
        off_centre = ring * (radius > 0)     # the angle of the centre pixel is undefined
        for m in range(1, j + 1):
            basis += [off_centre * torch.cos(m * phi), off_centre * torch.sin(m * phi)]
    return torch.stack(basis)


class GroupConv(nn.Module):
    """A C_n group convolution on the regular representation (Cohen & Welling, ICML 2016) with
    steerable filters (`steerable_basis`): a filter is a learned combination of basis elements, and
    its rotated versions are the same combination of the rotated basis, which is exact for every
    angle of C_n in the continuous domain (and bit-exact rot90 for multiples of 90 degrees).

    lifting (in_group=False): input (B, Cin, H, W);   filter for output rotation r: R_r W
    group (in_group=True):    input (B, Cin, n, H, W); filter for r: R_r W, cyclically shifted by
                              r along the input's group axis
    output (B, Cout, n, H - 2(k//2), W - 2(k//2)) (no padding: `GroupConvScoreNet` pads the input
    once, so no layer sees zero padding the rotated input would not). Rotating the input by R_j
    rotates every map by R_j and shifts the group axis by +j.
    """

    def __init__(self, in_channels: int, out_channels: int, num_rotations: int, kernel_size: int, in_group: bool):
        super().__init__()
        self.n, self.in_group = num_rotations, in_group
        # (n, num_basis, k, k): the basis rotated by each element of C_n
        self.register_buffer("basis", torch.stack([steerable_basis(kernel_size, 360.0 * r / num_rotations)
                                                   for r in range(num_rotations)]), persistent=False)
        fan_in = in_channels * (num_rotations if in_group else 1) * self.basis.shape[1]
        shape = (out_channels, in_channels) + ((num_rotations,) if in_group else ()) + (self.basis.shape[1],)
        # He init: the basis elements have unit norm, so a filter's energy is the coefficients' sum of squares
        self.weight = nn.Parameter(torch.randn(shape) * math.sqrt(2.0 / fan_in))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        filters = []
        for r in range(self.n):
            w = torch.tensordot(self.weight, self.basis[r], dims=([-1], [0]))  # (Cout, Cin, [n,] k, k)
            if self.in_group:
                w = torch.roll(w, shifts=r, dims=2)
            filters.append(w)
        w = torch.stack(filters, dim=1)                                  # (Cout, n, Cin, [n,] k, k)
        cout = w.shape[0]
        w = w.reshape(cout * self.n, -1, *w.shape[-2:])                   # (Cout*n, Cin[*n], k, k)
        if self.in_group:
            x = x.flatten(1, 2)                                           # (B, Cin*n, H, W)
        out = F.conv2d(x, w, bias=self.bias.repeat_interleave(self.n))
        return out.reshape(x.shape[0], cout, self.n, *out.shape[-2:])


def disk_mask(size: int, device=None, dtype=None) -> torch.Tensor:
    """(size, size) anti-aliased disk inscribed in the square: 1 inside radius size/2, a one-pixel
    linear edge, 0 outside. Rotations about the centre map it onto itself (exactly for rot90, up to
    the edge's sampling otherwise), which the square does not."""
    coords = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    radius = torch.hypot(coords[:, None], coords[None, :])
    return (size / 2 + 0.5 - radius).clamp(0, 1).to(dtype or torch.float32)


class GroupConvScoreNet(nn.Module):
    """The equivariant canonicalizer of Kaba et al. 2023 (equiadapt's ESCNN C_n network, rebuilt
    without escnn): steerable C_n group convs with batch norm shared over the group axis
    ("InnerBatchNorm") and ReLU, a mean over the inscribed disk, then one linear map over channels
    shared by every rotation -> (B, n) logits with a(R_j x) = roll(a(x), j).

    The input is masked to the inscribed disk and zero-padded by the network's receptive field, so
    the square's corners (which a 45-degree rotation moves out of the frame, or fills with padding)
    never reach a score, and every conv is 'valid' on real values. C4 is exact; for other angles
    the residual error is the pixel grid's (interpolating the rotated image, sampling the filters).
    Inputs above 16 px are average-pooled 2x (to 16 px) first (exactly rot90-equivariant on even sizes; it also
    low-passes what the 45-degree interpolation blurs, and keeps the cost near the φ network's).
    """

    def __init__(self, in_channels: int, num_rotations: int, channels: int = 16, num_layers: int = 3,
                 kernel_size: int = 5):
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(num_layers):
            blocks += [GroupConv(in_channels if i == 0 else channels, channels, num_rotations, kernel_size,
                                 in_group=i > 0),
                       nn.BatchNorm3d(channels), nn.ReLU()]
        self.blocks = nn.Sequential(*blocks)
        self.reach = num_layers * (kernel_size // 2)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while x.shape[-1] > 16 and x.shape[-1] % 2 == 0:
            x = F.avg_pool2d(x, 2)
        mask = disk_mask(x.shape[-1], x.device, x.dtype)                 # (H, W)
        x = F.pad(x * mask, (self.reach,) * 4)
        maps = self.blocks(x)                                            # (B, C, n, H, W)
        feats = (maps * mask).sum(dim=(-2, -1)) / mask.sum()             # (B, C, n)
        return self.head(feats.transpose(1, 2)).squeeze(-1)              # (B, n)


# ----------------------------------------------------------------------------------------------
# Wrapped models (the exported archs)


class _GroupMixin:
    def _copies(self, x: torch.Tensor) -> torch.Tensor:
        return group_copies(x, self.num_rotations, self.reflections, self.pad_ratio)


@register_model("canonicalized", example={
    "kwargs": {"predictor": {"arch": "cnn", "kwargs": {"width": 4, "embed_dim": 8}}, "in_channels": 1, "image_size": 8,
               "channels": 4, "num_layers": 2, "out_dim": 8}, "input": (2, 1, 8, 8)})
class CanonicalizedModel(_GroupMixin, nn.Module):
    """predictor(canonicalize(x)): images (B, C, H, W) -> logits, invariant to the group.

    canonicalizer="cnn" (Panigrahi & Mondal 2024): φ scores every copy g·x by the cosine between
      φ(g·x) and a reference vector r (a frozen buffer unless `learn_ref_vec`); the canonical image
      is the top-scoring copy, chosen by a straight-through argmax.
    canonicalizer="group_conv" (Kaba et al. 2023): an equivariant C_n network gives a(x) with
      a(R_j x) = roll(a(x), j); k* = argmax a and the canonical image is g_{k*}^{-1}·x.
      `group_kernel_size` is its steerable filters' size (`GroupConvScoreNet`).

    gradient_path: how the task loss reaches the scores (the forward value is the selected copy
      either way, bit for bit):
      "copies" (default): through Σ_g w_g·copy_g, so score g gets <dL/dx_c, copy_g> terms: every
        copy competes on what the predictor would make of it.
      "angle" (equiadapt `DiscreteGroupImageCanonicalization.canonicalize`): through the selected
        angle θ = Σ_g w_g·θ_g (and reflection Σ_g w_g·f_g) into a differentiable kornia rotation of
        x, so score g gets θ_g·<dL/dx_c, ∂R_θ x/∂θ> terms, which depend on how the angles are
        numbered (0..360) and only see the local slope of the rotation.
    """

    def __init__(self, predictor: dict[str, Any], in_channels: int, image_size: int,
                 canonicalizer: str = "cnn", num_rotations: int = 4, reflections: bool = False,
                 pad_ratio: float = 0.5, beta: float = 1.0, learn_ref_vec: bool = False,
                 channels: int = 16, num_layers: int = 3, kernel_size: int = 3, out_dim: int = 64,
                 dropout: float = 0.5, group_kernel_size: int = 5, gradient_path: str = "copies"):
        super().__init__()
        if canonicalizer not in ("cnn", "group_conv"):
            raise ValueError(f"canonicalizer must be 'cnn' or 'group_conv', not {canonicalizer!r}")
        if gradient_path not in ("copies", "angle"):
            raise ValueError(f"gradient_path must be 'copies' or 'angle', not {gradient_path!r}")
        self.gradient_path = gradient_path
        if canonicalizer == "group_conv" and reflections:
            raise ValueError("the group_conv canonicalizer supports rotations only (C_n)")
        self.kind, self.num_rotations, self.reflections = canonicalizer, num_rotations, reflections
        self.pad_ratio, self.beta = pad_ratio, beta
        self.predictor = build_model(predictor)
        if canonicalizer == "cnn":
            self.phi = ConvVectorNet(in_channels, image_size, channels, num_layers, kernel_size, out_dim, dropout)
            ref = torch.randn(out_dim)
            if learn_ref_vec:
                self.ref = nn.Parameter(ref)
            else:
                self.register_buffer("ref", ref)
        else:
            self.phi = GroupConvScoreNet(in_channels, num_rotations, channels, num_layers, group_kernel_size)
            self.register_buffer("inverse", torch.tensor(inverse_indices(num_rotations, False)), persistent=False)

    def score(self, copies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cnn: (vectors (B, G, D), scores (B, G)) for copies (B, G, C, H, W)."""
        b, g = copies.shape[:2]
        vectors = self.phi(copies.flatten(0, 1)).reshape(b, g, -1)
        return vectors, F.cosine_similarity(vectors, self.ref.expand_as(vectors), dim=-1)

    def canonicalize(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"image": canonical (B, C, H, W), "scores": (B, G) logits over elements, "weights":
        (B, G) one-hot over them (index 0: x is left as it is), "copies" (B, G, C, H, W) in
        `group_elements` order, and for cnn "vectors" (B, G, D)}."""
        copies = self._copies(x)
        out = {"copies": copies}
        if self.kind == "cnn":
            out["vectors"], out["scores"] = self.score(copies)
            candidates = copies                        # score k belongs to copy g_k·x
        else:
            out["scores"] = self.phi(x)
            candidates = copies[:, self.inverse]       # score k selects g_k^{-1}·x
        weights = straight_through_onehot(out["scores"], self.beta, content_key(candidates))
        out["weights"] = weights
        if self.gradient_path == "copies":
            out["image"] = select(weights, candidates)
        else:   # the exact copy forward, the gradient of the rotation by the selected angle
            along = self._rotate_by_selected(x, weights)
            out["image"] = select(weights.detach(), candidates) + (along - along.detach())
        return out

    def _rotate_by_selected(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """R_θ(F^f x) with θ = Σ_g w_g·θ_g and f = Σ_g w_g·f_g for the candidates' elements (the
        candidate for score g is g·x for cnn, g^{-1}·x for group_conv): (B, C, H, W), differentiable
        in the weights (B, G) through kornia's rotation, as in equiadapt."""
        elements = group_elements(self.num_rotations, self.reflections)
        angles = torch.tensor([a for a, _ in elements], device=x.device, dtype=x.dtype)
        flips = torch.tensor([float(f) for _, f in elements], device=x.device, dtype=x.dtype)
        sign = 1.0 if self.kind == "cnn" else -1.0
        flip = (weights * flips).sum(-1)[:, None, None, None]                       # (B, 1, 1, 1)
        mixed = (1 - flip) * x + flip * torch.flip(x, dims=(-1,))
        return rotate_interpolated(mixed, sign * (weights * angles).sum(-1), self.pad_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.canonicalize(x)["image"])


@register_model("group_averaged", example={
    "kwargs": {"predictor": {"arch": "cnn", "kwargs": {"width": 4, "embed_dim": 8}}}, "input": (2, 1, 8, 8)})
class GroupAveragedModel(_GroupMixin, nn.Module):
    """mean_g predictor(g·x): exactly invariant (for exact actions), |G| predictor passes."""

    def __init__(self, predictor: dict[str, Any], num_rotations: int = 4, reflections: bool = False,
                 pad_ratio: float = 0.5):
        super().__init__()
        self.num_rotations, self.reflections, self.pad_ratio = num_rotations, reflections, pad_ratio
        self.predictor = build_model(predictor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = self._copies(x)
        logits = self.predictor(copies.flatten(0, 1))
        return logits.reshape(*copies.shape[:2], -1).mean(dim=1)
