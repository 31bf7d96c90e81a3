"""Learned canonicalization: exact rotation invariance for any pretrained model.

Panigrahi & Mondal, "Improved Canonicalization for Model Agnostic Equivariance", CVPR 2024
EquiVision workshop, arXiv 2405.14089 (official code: arnab39/equiadapt 0.1.2), building on
Kaba et al., ICML 2023, arXiv 2211.06489, and Mondal et al., NeurIPS 2023, arXiv 2310.01647.

A small NON-equivariant CNN φ scores every group copy g·x by cos(φ(g·x), r); the top-scoring copy
(straight-through argmax) is fed to a pretrained predictor p. The output p(x_c) is invariant by
construction (see `methodlab.models.canonicalizer`). The loss is

    task_weight·CE(p(x_c), y) + prior_weight·CE(scores, identity) + contrast_weight·L_contrast
    + artifact_weight·L_artifact

The official `model.py` adds the contrast term twice (effective weight 2x); here it is added once.

Where this differs from equiadapt, behind named options:
  gradient_path  "copies" (default): the task loss reaches the scores through Σ_g w_g·copy_g (the
                 straight-through weights times every copy). "angle" (equiadapt): through the
                 selected angle θ = Σ_g w_g·θ_g into a differentiable kornia rotation of x. The
                 forward value is the same bit for bit. The default stays "copies": it does not
                 depend on how the angles are numbered, and it sees what the predictor would make of
                 each copy rather than the rotation's local slope (at multiples of 90 degrees a
                 one-sided slope: the samples sit on bilinear interpolation's kinks). Measured
                 (bench/results/canonicalization_gradient_path.json, digits, 2 seeds): the two
                 gradients into φ at init have cosine +0.51 / -0.51 (C4) and +0.45 / -0.49 (C8),
                 yet test group_acc is the same: C4 0.974 both, C8 0.865 (copies) vs 0.865 (angle).
  pad_ratio      edge padding before non-90-degree rotations; 0.5 (default) is equiadapt's choice
                 for RGB, 0 (no padding, zero corners) its choice for grayscale.
  mode=equivariant  Kaba et al.'s escnn network is rebuilt without escnn: steerable C_n filters
                 (`methodlab.models.canonicalizer.GroupConvScoreNet`), exact at C4, C8 up to the
                 pixel grid.

The predictor comes from `methodlab.models.hub.load_pretrained` (models:/, runs:/, a checkpoint
directory or a file); `predictor=scratch` builds a random-init CNN and exists for tests and smoke
runs on a fresh MLflow store only.

`mode` selects the method or one of the baselines it is measured against:
  canonicalize   the improved method (default)
  equivariant    Kaba et al.'s canonicalizer: an equivariant C_n group-conv network + prior
  plain          the predictor alone (fine-tuned on upright data if `finetune_predictor`)
  augment        the predictor fine-tuned with random group-element augmentation
  group_average  the mean of the predictor's logits over all |G| copies

Evaluation rotates every test image by every group element: per-element accuracy, their mean
(`group_acc`) and the invariance error (fraction of images whose prediction changes).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from methodlab import distributed
from methodlab.config import Section
from methodlab.errors import ConfigError
from methodlab.losses.canonicalization import artifact_consistency_loss, group_contrast_loss, prior_loss
from methodlab.methods.base import Method, StepContext, forward_problem, make_optimizer
from methodlab.metrics.group import group_accuracy_from_counts, group_chart, group_counts
from methodlab.metrics.images import ImageRow, image_grid_chart
from methodlab.models import build_model
from methodlab.models.canonicalizer import act, element_names, group_copies, group_elements
from methodlab.registry import register_method

POSE_IMAGES = 4           # val images whose canonical poses a canonicalizing run charts
POSE_ELEMENTS = 8         # group elements shown per image at most (evenly spaced over the group)

# ----------------------------------------------------------------------------------------------
# Config


class CanonicalizationConfig(Section):
    predictor: str = Field(
        "models:/methodlab-supervised@candidate",
        description="pretrained predictor: models:/name@alias, runs:/<id>, a checkpoint directory, a "
        "model file; 'scratch' = a random-init CNN (for tests and smoke runs only)")
    finetune_predictor: bool = Field(
        False, description="train the predictor at train.lr (the official code fine-tunes; default frozen)")
    mode: Literal["canonicalize", "equivariant", "plain", "augment", "group_average"] = Field(
        "canonicalize", description="the method, or a baseline (see the module docstring)")
    num_rotations: int = Field(4, ge=1, le=360, description="C_n: 4 is exact (rot90), others use kornia")
    reflections: bool = Field(False, description="D_n: add horizontal reflections (not for mode=equivariant)")
    pad_ratio: float = Field(
        0.5, ge=0, le=2, description="edge padding before a non-90-degree rotation, x size; 0 = none "
        "(kornia fills the corners with zeros). equiadapt pads RGB by 0.5 and grayscale not at all: "
        "the faithful choice is 0.5 for RGB, 0 for grayscale")
    gradient_path: Literal["copies", "angle"] = Field(
        "copies", description="how the task loss reaches the scores: copies = through Σ w_g·copy_g "
        "(default), angle = through the selected angle into a kornia rotation (equiadapt)")
    # The canonicalizer network φ (equiadapt ConvNetwork: kernel 7, 16 channels, 3 layers, 128-d)
    channels: int = Field(16, gt=0)
    num_layers: int = Field(3, gt=0)
    kernel_size: int = Field(3, gt=0)
    equivariant_kernel_size: int = Field(
        5, gt=0, description="mode=equivariant: size of the steerable C_n filters (C8 argmax shifted "
        "correctly at init for 0.79-0.89 of smooth 32 px images with 3, 0.90-0.97 with 5)")
    out_vector_size: int = Field(64, gt=0, description="dimension of φ's vectors and of the reference vector")
    dropout: float = Field(0.5, ge=0, lt=1)
    learn_ref_vec: bool = Field(False, description="learn the reference vector r (frozen randn by default)")
    beta: float = Field(1.0, gt=0, description="softmax temperature of the straight-through gradient")
    task_weight: float = Field(1.0, ge=0)
    prior_weight: float = Field(100.0, ge=0, description="CE of the scores to the identity (Mondal et al.)")
    contrast_weight: float = Field(
        0.1, ge=0, description="group contrast loss, added once (the official code adds it twice and "
        "defaults it to 0)")
    contrast_vectors: Literal["raw", "normalized"] = Field(
        "raw", description="raw: dot products as in the official code; normalized: cosines")
    artifact_weight: float = Field(0.0, ge=0, description="artifact-consistency term (useful for C8)")
    canonicalizer_lr: float = Field(1e-3, gt=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.mode == "augment" and not self.finetune_predictor:
            raise ValueError("mode=augment fine-tunes the predictor; set method.finetune_predictor=true")
        if self.mode == "equivariant" and self.reflections:
            raise ValueError("mode=equivariant is a C_n group-conv network; set method.reflections=false")
        if self.kernel_size % 2 == 0 or self.equivariant_kernel_size % 2 == 0:
            raise ValueError("kernel_size and equivariant_kernel_size must be odd (centred filters keep "
                             "rot90 exact)")
        return self


# ----------------------------------------------------------------------------------------------
# The method


class CanonicalizationObjective(nn.Module):
    """The exported model plus its training loss; this is the module the loop trains (and DDP
    wraps), so every term runs inside one forward. A frozen predictor stays in eval mode."""

    def __init__(self, model: nn.Module, cfg: CanonicalizationConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.predictor = getattr(model, "predictor", model)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.cfg.finetune_predictor:
            self.predictor.eval()
        return self

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.cfg
        if c.mode == "augment":    # one random group element per image
            copies = group_copies(image, c.num_rotations, c.reflections, c.pad_ratio)
            g = torch.randint(copies.shape[1], (image.shape[0],), device=image.device)
            image = copies[torch.arange(image.shape[0], device=image.device), g]
        if c.mode not in ("canonicalize", "equivariant"):
            task = F.cross_entropy(self.model(image).float(), label)
            return {"loss": task, "task": task}
        out = self.model.canonicalize(image)
        task = F.cross_entropy(self.predictor(out["image"]).float(), label)
        prior = prior_loss(out["scores"].float())
        losses = {"task": task, "prior": prior,
                  "identity_rate": (out["scores"].argmax(-1) == 0).float().mean()}
        total = c.task_weight * task + c.prior_weight * prior
        if c.mode == "canonicalize":
            losses["contrast"] = group_contrast_loss(out["vectors"].float(), c.contrast_vectors == "normalized")
            total = total + c.contrast_weight * losses["contrast"]
            if c.artifact_weight > 0:
                flat = out["copies"].flatten(0, 1)
                angles = 360.0 / c.num_rotations * torch.randint(c.num_rotations, (flat.shape[0],),
                                                                 device=flat.device)
                losses["artifact"] = artifact_consistency_loss(self.model.phi, flat, angles, c.pad_ratio)
                total = total + c.artifact_weight * losses["artifact"]
        losses["loss"] = total
        return losses


@register_method("canonicalization")
class Canonicalization(Method):
    Config = CanonicalizationConfig
    pretrained_fields = ("predictor",)
    test_counts: torch.Tensor | None = None      # group_counts of the last test evaluation, summed
    poses: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None    # canonical_poses at the test eval
    defaults = {"train": {"epochs": 10, "batch_size": 64, "lr": 1e-3}}
    metric = "val_group_acc"
    test_metric = "test_group_acc"
    search_space = {
        "method.prior_weight": {"loguniform": [1.0, 1000.0]},
        "method.contrast_weight": {"loguniform": [1e-3, 1.0]},
        "method.canonicalizer_lr": {"loguniform": [1e-4, 1e-2]},
        "method.num_rotations": {"choice": [4, 8]},
    }
    demo_prerequisites = [("supervised", [])]
    # The frozen predictor alone on rotated copies (nothing trains: one epoch evaluates it).
    demo_baseline = ("the predictor alone", ["method.mode=plain", "train.epochs=1"])
    smoke_overrides = ["train.epochs=1", "method.predictor=scratch", "method.channels=4",
                       "method.out_vector_size=8", "data.limit_rows=256"]

    def _image_shape(self) -> tuple[int, int]:
        c, h, w = self.data.info.columns["image"].shape
        if h != w:
            raise ConfigError(f"data: canonicalization needs square images (rot90), got {h}x{w}")
        return c, h

    def _load_predictor(self) -> tuple[nn.Module, dict]:
        if self.mcfg.predictor == "scratch":
            spec = {"arch": "cnn", "kwargs": {"in_channels": self._image_shape()[0],
                                              "num_classes": self.data.info.num_classes}}
            return build_model(spec), spec
        from methodlab.models.hub import load_pretrained

        return load_pretrained(self.mcfg.predictor, self.cfg.tracking.uri, "method.predictor", self.cfg.data.normalize)

    @classmethod
    def pretrained_problem(cls, cfg, info, field, model, spec, images):
        # The predictor's logits are the task's: it must take the images and predict the dataset's classes.
        why, logits = forward_problem(model.eval(), images)
        if why is None and logits.shape[-1] != info.num_classes:
            why = f"predicts {logits.shape[-1]} classes but dataset {info.name} has {info.num_classes} (meta.num_classes)"
        return why

    def _check_predictor(self, predictor: nn.Module) -> None:
        example = self.data.splits["val"].head(2)["image"]
        why = self.pretrained_problem(self.cfg, self.data.info, "predictor", predictor, {}, example)
        if why:
            raise ConfigError(f"method.predictor {self.mcfg.predictor!r} {why}")

    def spec(self, predictor_spec: dict) -> dict:
        """The exported model's spec: the bare predictor, or a wrapper around it."""
        m = self.mcfg
        if m.mode in ("plain", "augment"):
            return predictor_spec
        group = {"num_rotations": m.num_rotations, "reflections": m.reflections, "pad_ratio": m.pad_ratio}
        if m.mode == "group_average":
            return {"arch": "group_averaged", "kwargs": {"predictor": predictor_spec, **group}}
        channels, size = self._image_shape()
        return {"arch": "canonicalized", "kwargs": {
            "predictor": predictor_spec, "in_channels": channels, "image_size": size,
            "canonicalizer": "cnn" if m.mode == "canonicalize" else "group_conv", **group,
            "beta": m.beta, "learn_ref_vec": m.learn_ref_vec, "channels": m.channels,
            "num_layers": m.num_layers, "kernel_size": m.kernel_size, "out_dim": m.out_vector_size,
            "dropout": m.dropout, "group_kernel_size": m.equivariant_kernel_size,
            "gradient_path": m.gradient_path}}

    def build_models(self, stage, previous):
        # One seed for every rank: the reference vector, φ and a scratch predictor start identical.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            predictor, predictor_spec = self._load_predictor()
            self._spec = self.spec(predictor_spec)
            model = predictor if self._spec is predictor_spec else build_model(self._spec)
        self._check_predictor(predictor)
        if model is not predictor:
            model.predictor.load_state_dict(predictor.state_dict())
        getattr(model, "predictor", model).requires_grad_(self.mcfg.finetune_predictor)
        return {"model": CanonicalizationObjective(model, self.mcfg)}

    def build_optimizers(self, stage, models):
        objective = distributed.unwrap(models["model"])
        predictor = [p for p in objective.predictor.parameters() if p.requires_grad]
        seen = {id(p) for p in predictor}
        canonicalizer = [p for p in objective.parameters() if p.requires_grad and id(p) not in seen]
        if canonicalizer:
            opt = make_optimizer(canonicalizer, self.cfg.train, lr=self.mcfg.canonicalizer_lr)
            if predictor:
                opt.add_param_group({"params": predictor, "lr": self.cfg.train.lr})
            return {"opt": opt}
        # A frozen plain / group-average baseline trains nothing: the run only evaluates.
        return {"opt": make_optimizer(predictor, self.cfg.train)} if predictor else {}

    def train_step(self, stage, models, optimizers, batch, ctx: StepContext):
        opt = optimizers.get("opt")
        with ctx.autocast(), torch.set_grad_enabled(opt is not None):
            losses = models["model"](batch["image"], batch["label"])
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
        return {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def evaluate(self, stage, models, split, device):
        m = self.mcfg
        model = models["model"].model.eval()
        elements = group_elements(m.num_rotations, m.reflections)
        counts = torch.zeros(len(elements) + 2, dtype=torch.float64, device=device)
        upright = torch.zeros((), dtype=torch.float64, device=device)
        canonicalizes = hasattr(model, "canonicalize")
        for b in distributed.shard(self.data.splits[split]).batches(512, device):
            x = b["image"]
            preds = torch.stack([model(act(x, a, f, m.pad_ratio)).argmax(-1) for a, f in elements], dim=1)
            counts += group_counts(preds, b["label"])
            if canonicalizes:
                upright += (model.canonicalize(x)["weights"].argmax(-1) == 0).sum()
        totals = distributed.all_sum(torch.cat([counts, upright[None]]))
        if split == "test":
            self.test_counts = totals[:-1].cpu()           # charted after the last epoch
            if canonicalizes:
                self.poses = self.canonical_poses(model, device)
        metrics = group_accuracy_from_counts(totals[:-1], element_names(m.num_rotations, m.reflections), split)
        if canonicalizes:    # how often upright images are left upright (the prior's target)
            metrics[f"{split}_identity_rate"] = float(totals[-1] / totals[-2].clamp_min(1))
        return metrics

    @torch.no_grad()
    def canonical_poses(self, model: nn.Module, device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The first POSE_IMAGES val images under at most POSE_ELEMENTS group elements g (evenly
        spaced), copies g·x (B, S, C, H, W), the canonical pose the model gives each copy (B, S, C,
        H, W) and the elements' names (S), on the CPU. An invariant canonicalizer gives every copy
        of an image one pose (exactly at C4, whose rotations are exact)."""
        m = self.mcfg
        elements, names = group_elements(m.num_rotations, m.reflections), element_names(m.num_rotations, m.reflections)
        shown = list(range(0, len(elements), math.ceil(len(elements) / POSE_ELEMENTS)))
        x = self.data.splits["val"].head(POSE_IMAGES)["image"].to(device)
        copies = torch.stack([act(x, *elements[i], m.pad_ratio) for i in shown], dim=1)
        canonical = model.canonicalize(copies.flatten(0, 1))["image"].reshape(copies.shape)
        return copies.float().cpu(), canonical.float().cpu(), [names[i] for i in shown]

    def epoch_artifacts(self, stage, epoch):
        if epoch != self.stage_epochs(stage) - 1 or self.test_counts is None:
            return {}
        m = self.mcfg
        title = f"canonicalization ({m.mode}), {self.data.info.name}"
        out = {"group_accuracy_test.png": group_chart(self.test_counts, element_names(m.num_rotations, m.reflections),
                                                      title)}
        if self.poses is not None:
            copies, canonical, names = self.poses
            rows = [row for i in range(len(copies))
                    for row in (ImageRow(f"val image {i + 1}\ng·x", copies[i]), ImageRow("canonical", canonical[i]))]
            out["canonical_poses_val.png"] = image_grid_chart(rows, f"{title}: copies and their canonical poses", names)
        return out

    def export(self, models):
        return models["model"].model, self._spec
