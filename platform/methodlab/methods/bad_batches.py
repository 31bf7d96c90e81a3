"""Bad Batches: SimCLR with batch curation by the Fréchet ResNet Distance (FRD).

Göksu & Pugeault, "The Bad Batches: Enhancing Self-Supervised Learning in Image Classification
Through Representative Batch Curation", IJCNN 2024, arXiv 2403.19579 (no official code), on top of
SimCLR (Chen, Kornblith, Norouzi & Hinton, ICML 2020, arXiv 2002.05709).

Every batch yields two augmented views (kornia, on the worker's device). Before the optimizer
step the batch is scored with the FRD (`methodlab.metrics.frechet`, exact, no d x d sqrtm) and a
batch whose score is over the threshold is discarded: no backward, no optimizer or scheduler step,
and its BatchNorm statistics are rolled back, so a skipped batch leaves the model untouched.

Options (the paper's text could not be read, and no official code was found; see the spec, section 1):
  comparison  view_vs_view (default; the spec's reading of the paper, "FRD is calculated between
              the distributions of latent representations of B1 and B2"): view 1 (n rows) against
              view 2 (n rows) of the same batch.
              views_vs_originals: both views (2n) against the un-augmented batch (n) (the brief's
              "representative of the original images"; the default before issue 19).
  extractor   online (default): the encoder being trained, features after the projection head
              (`frd_features=projection`, the summary's z) or before it (`backbone`).
              frozen: a fixed reference network loaded with `methodlab.models.hub.load_pretrained`
              from `extractor_uri` (models:/..., runs:/..., a checkpoint or a file); its `embed`.
  curation    quantile (default): drop a batch whose FRD is in the top `frd_quantile` of the last
              `frd_window` scores; threshold: drop FRD > `frd_threshold`; none: plain SimCLR, no
              scoring at all. The first `warmup_epochs` only score (and fill the window).
  frd_detrend linear (default): the quantile is taken of the window's residuals about its
              least-squares line, and the new score is compared with the line extrapolated to it
              (`detrended_threshold`). The online FRD drifts upward as training goes on; against
              the raw trailing window (`none`, the behaviour before issue 19) a new score is then
              above most of the lagging window, and 26-46% of the batches were dropped at a
              nominal 20%. The paper's rule is an absolute threshold (curation=threshold), so no
              official behaviour exists for the quantile rule; `none` is kept for comparison.

Not implemented: the Huber loss. "Huber loss" is one of the paper's index terms, but its role
(replacing NT-Xent, an extra term, or part of the curation) could not be read from any source
(spec 1.3), so the loss is plain NT-Xent (`losses.nt_xent`); there is no option for it.

Under DDP the features of all ranks are all-gathered, so every rank scores the same global batch
and takes the same decision; the NT-Xent negatives are the global batch's too (`negatives`), and
BatchNorm is global (`scaling.sync_batchnorm`), as in SimCLR's global BN. The cosine schedule runs
over the optimizer steps the run takes (accepted batches only, `planned_steps`), so it reaches 0
at the last one. The dropped fraction is the epoch metric `train_dropped` (summed on the device
with the losses: no host sync of its own). Each batch's FRD and every rank's decision are logged
per epoch as a CSV, with an FRD histogram (PNG). Evaluation: a linear probe and k-NN on the
frozen encoder's features of the labelled rows of the train split (rows labelled -1 are for
pretraining only: STL-10's unlabeled images). The registered model is the encoder with the linear probe as its head (a
registered `resnet`), so it classifies images and other methods load it as a backbone.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from methodlab import distributed
from methodlab.config import Section
from methodlab.errors import ConfigError
from methodlab.losses.nt_xent import nt_xent
from methodlab.methods.base import Method, StepContext, forward_problem
from methodlab.metrics.frechet import frechet_distance
from methodlab.models import build_model
from methodlab.registry import register_method

# ----------------------------------------------------------------------------------------------
# Curation rules and evaluation (pure functions)


def quantile_threshold(window: Sequence[float], q: float) -> float:
    """The FRD above which a score is in the top `q` of `window` (linear interpolation between
    order statistics); +inf for an empty window, so the first batches are always kept."""
    if len(window) == 0:
        return math.inf
    return float(torch.quantile(torch.tensor(list(window), dtype=torch.float64), 1.0 - q))


def detrended_threshold(window: Sequence[float], q: float) -> float:
    """The FRD above which the next score (index len(window)) is in the top `q` once the window's
    least-squares linear trend is removed: the line extrapolated to the next index plus the
    (1 - q) quantile of the window's residuals about the line, widened by the ratio of the
    spread of a new score about the extrapolated line to that of the in-window residuals
    (sqrt(n/(n-2) (1 + 1/n + t0^2/Sxx)), the least-squares prediction interval's; it matters in a
    short window: 1.9 at n=5, 1.03 at n=100). Adding a + b*t to the window's t-th score moves the
    threshold by a + b*len(window), so a score that drifts linearly is dropped at the rate q,
    where the raw window's quantile lags behind it. Fewer than 3 scores fix no line with a
    residual: the raw quantile then (+inf for an empty window)."""
    n = len(window)
    if n < 3:
        return quantile_threshold(window, q)
    y = torch.tensor(list(window), dtype=torch.float64)                      # (n,)
    t = torch.arange(n, dtype=torch.float64) - (n - 1) / 2                   # centred indices
    sxx = float(t.square().sum())
    slope = (t * (y - y.mean())).sum() / sxx
    residuals = y - y.mean() - slope * t
    t0 = n - (n - 1) / 2                                                      # the next index, centred
    widen = math.sqrt(n / (n - 2) * (1 + 1 / n + t0 ** 2 / sxx))
    return float(y.mean() + slope * t0 + widen * torch.quantile(residuals, 1.0 - q))


def cosine_factor(step: int, total: int) -> float:
    """The learning-rate factor of cosine annealing to 0 (Loshchilov & Hutter, SGDR, ICLR 2017,
    eq. 5 with eta_min = 0) at optimizer step `step` of `total`, held at 0 past `total`:
    CosineAnnealingLR is periodic and would rise again if the run takes more steps than planned."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def planned_steps(accepted: int, uncurated_left: int, curated_left: int, keep_rate: float) -> int:
    """The optimizer steps a run will have taken: those taken so far, one per batch left that is
    never dropped (warm-up epochs, curation=none), and the expected kept share of the curated
    batches left. At least 1."""
    return max(1, accepted + uncurated_left + round(curated_left * keep_rate))


def keep_batch(frd: float, threshold: float) -> bool:
    """The curation rule: keep a batch whose FRD is at most the threshold. Monotone: a batch kept
    at threshold t is kept at every t' > t; threshold=+inf keeps every batch."""
    return frd <= threshold


@torch.no_grad()
def weights_key(module: nn.Module) -> tuple[float, ...]:
    """A fingerprint of a module's parameters (per tensor: the sum and the sum of squares, in
    float64): equal for equal weights, also after a checkpoint is loaded. Parameters only: DDP
    keeps them equal on every rank, so every rank takes the same (collective) branch with it."""
    return tuple(v for p in module.parameters()
                 for v in torch.stack([p.double().sum(), p.double().square().sum()]).tolist())


@torch.no_grad()
def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int,
                 weight_decay: float) -> nn.Linear:
    """A multinomial logistic regression on frozen features (the standard SSL linear evaluation,
    Chen et al. 2020, sec. 4), full-batch L-BFGS on standardised features. The standardisation is
    folded into the returned layer, so it takes raw features (B, D) -> logits (B, num_classes)."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    layer = nn.Linear(x.shape[1], num_classes).to(x.device)
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), labels) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    folded = nn.Linear(x.shape[1], num_classes).to(x.device)
    folded.weight.copy_(layer.weight / std)
    folded.bias.copy_(layer.bias - folded.weight @ mean)
    return folded


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                num_classes: int, k: int, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN on cosine similarity (Wu et al., "Unsupervised Feature Learning via
    Non-Parametric Instance Discrimination", CVPR 2018, arXiv 1805.01978): each of the k nearest
    train features votes for its label with weight exp(sim / temperature). (M, D) -> (M,) labels."""
    bank = F.normalize(train_features, dim=1)
    k = min(k, bank.shape[0])
    out = []
    for part in F.normalize(features, dim=1).split(chunk):
        sim, idx = (part @ bank.mT).topk(k, dim=1)                           # (m, k)
        votes = torch.zeros(part.shape[0], num_classes, device=part.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Config


class BadBatchesConfig(Section):
    arch: str = Field("resnet", description="encoder: a registered architecture with `embed` and a "
                      "linear `head` (resnet, cnn)")
    arch_kwargs: dict[str, Any] = Field(default_factory=lambda: {"width": 16, "blocks": [1, 1, 1]})
    proj_hidden: int = Field(128, gt=0, description="projection head: Linear-ReLU-Linear")
    proj_dim: int = Field(64, gt=0)
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature")
    negatives: Literal["global", "local"] = Field(
        "global", description="NT-Xent negatives: global: every rank's batch (gathered with gradients, so "
        "the loss does not depend on scaling.num_workers); local: this rank's batch only")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="cosine to 0 over the optimizer steps the run takes (accepted batches only), "
        "planned at each epoch start from the steps taken and the kept fraction seen so far")
    # FRD scoring
    curation: Literal["quantile", "threshold", "none"] = Field(
        "quantile", description="quantile: drop the top frd_quantile of a running window; threshold: "
        "drop FRD > frd_threshold; none: plain SimCLR (no scoring)")
    frd_quantile: float = Field(0.1, gt=0, lt=1)
    frd_window: int = Field(100, ge=1, description="batches in the running window of scores")
    frd_detrend: Literal["linear", "none"] = Field(
        "linear", description="quantile curation: linear: against the window's residuals about its "
        "least-squares line, extrapolated to the new batch (drops frd_quantile while the FRD drifts); "
        "none: the raw window (drops more while the FRD drifts upward)")
    frd_threshold: float = Field(1.0, gt=0)
    warmup_epochs: int = Field(1, ge=0, description="epochs that score but never drop a batch")
    comparison: Literal["view_vs_view", "views_vs_originals"] = Field(
        "view_vs_view", description="what the FRD compares: view_vs_view: view 1 against view 2 (the spec's "
        "B1 vs B2); views_vs_originals: both views against the un-augmented batch")
    extractor: Literal["online", "frozen"] = Field(
        "online", description="online: the encoder being trained; frozen: the model at extractor_uri")
    extractor_uri: str = Field("", description="frozen extractor: models:/name@alias, runs:/<id>, a "
                               "checkpoint directory or a model file")
    frd_features: Literal["projection", "backbone"] = Field(
        "projection", description="online extractor: features after (z) or before (h) the projection head")
    # augmentations (kornia)
    crop_scale_min: float = Field(0.5, gt=0, le=1, description="random resized crop: area in [min, 1]")
    flip_p: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.4, ge=0, lt=1, description="factor in [1-b, 1+b], p=0.8")
    contrast: float = Field(0.4, ge=0, lt=1, description="factor in [1-c, 1+c], p=0.8")
    saturation: float = Field(0.0, ge=0, lt=1, description="RGB images: factor in [1-s, 1+s], p=0.8 "
                              "(SimCLR's colour jitter: 0.8 at strength 1)")
    hue: float = Field(0.0, ge=0, le=0.5, description="RGB images: hue shift in [-h, h] turns, p=0.8 "
                       "(SimCLR: 0.2 at strength 1)")
    grayscale_p: float = Field(0.0, ge=0, le=1, description="RGB images: probability of grayscale (SimCLR: 0.2)")
    noise_std: float = Field(0.05, ge=0, description="Gaussian noise, p=0.5")
    rotation_degrees: float = Field(15.0, ge=0, le=180)
    # evaluation
    probe_steps: int = Field(100, gt=0, description="L-BFGS iterations of the linear probe")
    probe_weight_decay: float = Field(1e-4, ge=0)
    knn_k: int = Field(20, gt=0)

    @model_validator(mode="after")
    def _extractor_source(self):
        if self.extractor == "frozen" and not self.extractor_uri:
            raise ValueError("extractor=frozen needs extractor_uri (a models:/, runs:/, checkpoint or file)")
        return self


# ----------------------------------------------------------------------------------------------
# Modules


class SimCLRNet(nn.Module):
    """Encoder f (a registered arch; its classification head is frozen and unused while training)
    and projection head g. forward: images (B, C, H, W) -> (h (B, E), z (B, proj_dim))."""

    def __init__(self, backbone: nn.Module, hidden: int, out: int):
        super().__init__()
        self.backbone = backbone
        backbone.head.requires_grad_(False)     # replaced by the linear probe at export
        self.projector = nn.Sequential(nn.Linear(backbone.embed_dim, hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone.embed(x)
        return h, self.projector(h)


def build_augment(cfg: BadBatchesConfig, size: tuple[int, int], channels: int) -> nn.Module:
    """The SimCLR augmentation family T for tensors (B, C, H, W) in [0, 1], all from kornia
    (Chen et al. 2020, appendix A: crop, flip, colour jitter, grayscale; plus rotation and
    noise). Saturation, hue and grayscale exist for RGB images only, and are left out at 0."""
    import kornia.augmentation as K

    colour = []
    if channels == 3:
        colour += [K.RandomSaturation((1 - cfg.saturation, 1 + cfg.saturation), p=0.8)] if cfg.saturation else []
        colour += [K.RandomHue((-cfg.hue, cfg.hue), p=0.8)] if cfg.hue else []
        colour += [K.RandomGrayscale(p=cfg.grayscale_p)] if cfg.grayscale_p else []
    return nn.Sequential(
        K.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0)),
        K.RandomHorizontalFlip(p=cfg.flip_p),
        K.RandomBrightness((1 - cfg.brightness, 1 + cfg.brightness), p=0.8),
        K.RandomContrast((1 - cfg.contrast, 1 + cfg.contrast), p=0.8),
        *colour,
        K.RandomRotation(cfg.rotation_degrees),
        K.RandomGaussianNoise(std=cfg.noise_std, p=0.5),
    )


# ----------------------------------------------------------------------------------------------
# The method


@register_method("bad_batches")
class BadBatches(Method):
    Config = BadBatchesConfig
    pretrained_fields = ("extractor_uri",)
    defaults = {"train": {"epochs": 30, "batch_size": 64, "lr": 2e-3}}
    metric = "val_linear_acc"
    test_metric = "test_linear_acc"
    search_space = {
        "method.frd_quantile": {"choice": [0.05, 0.1, 0.2, 0.3]},
        "train.batch_size": {"choice": [32, 64, 128]},
        "method.temperature": {"loguniform": [0.1, 1.0]},
        "method.warmup_epochs": {"choice": [0, 1, 2, 4]},
    }
    smoke_overrides = ["train.epochs=1", "train.batch_size=32", "data.limit_rows=256",
                       "method.arch_kwargs={width: 8, blocks: [1, 1]}", "method.warmup_epochs=0",
                       "method.frd_quantile=0.3", "method.probe_steps=20"]
    demo_overrides = ["train.epochs=12"]
    demo_baseline = ("SimCLR without curation", ["method.curation=none"])

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        self.window: deque[float] = deque(maxlen=self.mcfg.frd_window)
        self.accepted = 0                        # optimizer steps taken (accepted batches)
        self.curated = [0, 0]                    # [batches scored after warm-up, of them kept]
        self.planned = 1                         # optimizer steps the cosine schedule runs over
        self.planned_for: tuple[str, int] | None = None   # (stage, epoch) that planned it
        self.per_epoch = 1                       # batches per epoch (build_schedulers)
        self.probe: dict[str, torch.Tensor] = {}  # the linear probe head, fitted at evaluation
        self.probe_at: tuple = ()                # `weights_key` of the backbone the probe was fitted on
        self.bank: tuple[torch.Tensor, torch.Tensor] | None = None   # train features, labels (all ranks)
        self.bank_at: tuple = ()                 # `weights_key` of the backbone the bank came from
        self.records: list[list[float]] = []     # this epoch: per batch [step, threshold, frd, kept] x rank
        self._augment: nn.Module | None = None

    # -- models ---------------------------------------------------------------------------------

    def spec(self) -> dict:
        image_shape = self.data.info.columns["image"].shape
        return {"arch": self.mcfg.arch, "kwargs": {"in_channels": image_shape[0],
                                                    "num_classes": self.data.info.num_classes,
                                                    **self.mcfg.arch_kwargs}}

    def build_models(self, stage, previous):
        backbone = build_model(self.spec())
        if not (hasattr(backbone, "embed") and isinstance(getattr(backbone, "head", None), nn.Linear)):
            raise ConfigError(f"method.arch {self.mcfg.arch!r} has no `embed` and linear `head`; use resnet or cnn")
        models = {"net": SimCLRNet(backbone, self.mcfg.proj_hidden, self.mcfg.proj_dim)}
        if self.mcfg.extractor == "frozen":
            models["extractor"] = self._load_extractor()
        return models

    def _load_extractor(self) -> nn.Module:
        from methodlab.models.hub import load_pretrained

        model, spec = load_pretrained(self.mcfg.extractor_uri, self.cfg.tracking.uri, "method.extractor_uri",
                                      self.cfg.data.normalize)
        why = self.pretrained_problem(self.cfg, self.data.info, "extractor_uri", model, spec,
                                      self.data.splits["val"].head(2)["image"])
        if why:
            raise ConfigError(f"method.extractor_uri {self.mcfg.extractor_uri!r} {why}")
        return model.requires_grad_(False).eval()

    @classmethod
    def pretrained_problem(cls, cfg, info, field, model, spec, images):
        # FRD compares the features the frozen extractor's `embed` gives the dataset's images.
        if not hasattr(model, "embed"):
            return f"is a {spec['arch']!r} model without `embed`; FRD needs a feature extractor"
        return forward_problem(model.eval().embed, images)[0]

    def build_schedulers(self, stage, optimizers, steps_per_epoch):
        if self.mcfg.lr_schedule == "constant":
            return {}
        self.per_epoch = steps_per_epoch
        # Steps on accepted batches only (train_step), and reads `planned` at each step.
        return {"lr": torch.optim.lr_scheduler.LambdaLR(optimizers["opt"],
                                                        lambda step: cosine_factor(step, self.planned))}

    def plan(self, stage: str, epoch: int) -> None:
        """`planned` at the start of `epoch`: the kept fraction is the one seen after warm-up so
        far, or before any, what the rule aims at (1 - frd_quantile; 1 for an absolute threshold).
        Once per epoch: an epoch resumed mid-way keeps its plan (in `state_dict`), as it ran."""
        if self.planned_for == (stage, epoch):
            return
        m, epochs = self.mcfg, self.stage_epochs(stage)
        uncurated = epochs - epoch if m.curation == "none" else max(0, min(m.warmup_epochs, epochs) - epoch)
        scored, kept = self.curated
        rate = kept / scored if scored else (1 - m.frd_quantile if m.curation == "quantile" else 1.0)
        self.planned = planned_steps(self.accepted, uncurated * self.per_epoch,
                                     (epochs - epoch - uncurated) * self.per_epoch, rate)
        self.planned_for = (stage, epoch)

    # -- training -------------------------------------------------------------------------------

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        if self._augment is None:
            self._augment = build_augment(self.mcfg, tuple(images.shape[-2:]), images.shape[1]).to(images.device)
        return self._augment(images)

    def on_epoch_start(self, stage, models, ctx):
        self.records = []
        self.plan(stage, ctx.epoch)
        return {}

    @torch.no_grad()
    def score_features(self, models: dict, images: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor],
                       out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two feature sets the FRD compares. `out` holds the training forward's (h, z) of
        both views (2n rows), reused when the online extractor scores the views."""
        m = self.mcfg
        if m.extractor == "frozen":
            extract = models["extractor"].embed
            views_feats = extract(torch.cat(views))
        else:
            net = distributed.unwrap(models["net"])
            pick = 1 if m.frd_features == "projection" else 0
            views_feats = out[pick].detach()

            def extract(x: torch.Tensor) -> torch.Tensor:
                # The originals are seen in train mode (batch statistics, like the views), on
                # copies of the BatchNorm buffers: scoring never changes the model.
                buffers = {k: v.clone() for k, v in net.named_buffers()}
                return torch.func.functional_call(net, buffers, (x,), strict=False)[pick]
        if m.comparison == "view_vs_view":
            n = views[0].shape[0]
            return views_feats[:n], views_feats[n:]
        return views_feats, extract(images)

    def threshold(self, epoch: int) -> float:
        m = self.mcfg
        if m.curation == "none" or epoch < m.warmup_epochs:
            return math.inf
        if m.curation == "threshold":
            return m.frd_threshold
        rule = detrended_threshold if m.frd_detrend == "linear" else quantile_threshold
        return rule(self.window, m.frd_quantile)

    def train_step(self, stage, models, optimizers, batch, ctx: StepContext):
        m, opt = self.mcfg, optimizers["opt"]
        images = batch["image"].float()
        views = (self.augment(images), self.augment(images))
        net = distributed.unwrap(models["net"])
        # Restored if the batch is dropped, so that a skipped batch changes nothing (BN included).
        saved = {k: v.clone() for k, v in net.named_buffers()} if m.curation != "none" else {}
        with ctx.autocast():
            h, z = models["net"](torch.cat(views))
            n = images.shape[0]
            loss = nt_xent(z[:n], z[n:], m.temperature, gather=m.negatives == "global")

        out: dict[str, torch.Tensor] = {"loss": loss.detach()}
        keep = True
        if m.curation != "none":
            with ctx.autocast():
                a, b = self.score_features(models, images, views, (h.float(), z.float()))
            frd = float(frechet_distance(distributed.gather_rows(a.float()), distributed.gather_rows(b.float())))
            threshold = self.threshold(ctx.epoch)
            keep = keep_batch(frd, threshold)
            self.window.append(frd)
            if ctx.epoch >= m.warmup_epochs:
                self.curated[0] += 1
                self.curated[1] += keep
            mine = torch.tensor([frd, float(keep)], dtype=torch.float64, device=images.device)
            everyone = distributed.gather_rows(mine[None]).cpu()                 # (world, 2)
            self.records.append([float(ctx.step), threshold, *everyone.flatten().tolist()])
            # The loop sums these on the device and all-reduces them once per log interval: the
            # epoch's train_dropped is the global dropped fraction (every rank decides alike).
            out.update(frd=torch.tensor(frd), dropped=torch.tensor(float(not keep)))
        if keep:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for s in ctx.extra.get("schedulers", {}).values():
                s.step()
            self.accepted += 1
        else:
            for k, v in net.named_buffers():
                v.copy_(saved[k])
        return out

    # -- evaluation and export ------------------------------------------------------------------

    @torch.no_grad()
    def _features(self, backbone: nn.Module, split: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features and labels of the labelled rows of this rank's shard of `split`. A
        train split may also hold unlabeled images for pretraining, with label -1 (STL-10's
        train+unlabeled, `data.stl10`); they are not embedded and never reach the probe."""
        backbone.eval()
        # A rank's shard may hold no labelled row (the unlabeled images come last): empty, not absent.
        feats = [torch.empty(0, backbone.embed_dim, device=device)]
        labels = [torch.empty(0, dtype=torch.int64, device=device)]
        for b in self.split_batches(split, 512, device):
            labelled = b["label"] >= 0
            if labelled.any():
                feats.append(backbone.embed(b["image"][labelled].float()).float())
                labels.append(b["label"][labelled])
        return torch.cat(feats), torch.cat(labels)

    def evaluate(self, stage, models, split, device):
        """The train split's features are extracted once per model state, sharded and gathered
        (every rank then fits the same probe on the same bank); `split` is scored shard by shard
        and the correct counts are summed."""
        backbone = models["net"].backbone
        k = self.data.info.num_classes
        # Keyed on the weights, not on a step count: the test split is scored with the best
        # epoch's weights loaded (tracking.register=best) at the same step count as the last
        # epoch's, and a probe fitted on other features scores nonsense (0.44 for 0.95).
        key = weights_key(backbone)
        if self.bank_at != key or self.bank is None:
            x, y = self._features(backbone, "train", device)
            self.bank = (distributed.gather_uneven_rows(x), distributed.gather_uneven_rows(y))
            self.bank_at = key
        train_x, train_y = self.bank
        if self.probe_at != key or not self.probe:
            head = linear_probe(train_x, train_y, k, self.mcfg.probe_steps, self.mcfg.probe_weight_decay)
            self.probe = {n: v.detach().cpu() for n, v in head.state_dict().items()}
            self.probe_at = key
        x, y = self._features(backbone, split, device)
        logits = F.linear(x, self.probe["weight"].to(x.device), self.probe["bias"].to(x.device))
        knn = knn_predict(train_x, train_y, x, k, self.mcfg.knn_k)
        counts = distributed.all_sum(torch.stack([(logits.argmax(1) == y).sum(), (knn == y).sum(),
                                                  torch.tensor(len(y), device=y.device)]))
        n = counts[2].clamp_min(1)
        return {f"{split}_linear_acc": float(counts[0] / n), f"{split}_knn_acc": float(counts[1] / n)}

    def export(self, models):
        model = copy.deepcopy(models["net"].backbone).cpu()
        if self.probe:
            model.head.load_state_dict(self.probe)
        return model, self.spec()

    def epoch_artifacts(self, stage, epoch):
        if not self.records:
            return {}
        world = (len(self.records[0]) - 2) // 2
        header = ["step", "threshold", *[f"{c}_rank{r}" for r in range(world) for c in ("frd", "kept")]]
        rows = [",".join(header)] + [",".join(f"{v:.10g}" for v in rec) for rec in self.records]
        tag = f"bad_batches/epoch_{epoch + 1:03d}"
        return {f"{tag}_frd.csv": "\n".join(rows) + "\n", f"{tag}_frd_hist.png": self._histogram(epoch)}

    def _histogram(self, epoch: int):
        from matplotlib.figure import Figure

        frd = [r[2] for r in self.records]
        kept = [r[3] for r in self.records]
        fig = Figure(figsize=(5, 3.2))
        ax = fig.add_subplot()
        ax.hist([f for f, k in zip(frd, kept) if k], bins=30, alpha=0.8, label="kept")
        ax.hist([f for f, k in zip(frd, kept) if not k], bins=30, alpha=0.8, label="dropped")
        ax.set(xlabel="FRD per batch", ylabel="batches",
               title=f"epoch {epoch + 1}: kept {sum(kept):.0f}/{len(kept)}")
        ax.legend()
        fig.tight_layout()
        return fig

    def state_dict(self):
        return {"window": list(self.window), "accepted": self.accepted, "probe": self.probe,
                "probe_at": list(self.probe_at), "curated": list(self.curated), "planned": self.planned,
                "planned_for": self.planned_for}

    def load_state_dict(self, state):
        self.window = deque(state.get("window", []), maxlen=self.mcfg.frd_window)
        self.accepted = state.get("accepted", 0)
        self.probe = state.get("probe", {})
        fitted_on = state.get("probe_at")        # (a step count in checkpoints before weights_key)
        self.probe_at = tuple(fitted_on) if isinstance(fitted_on, (list, tuple)) else ()
        self.curated = list(state.get("curated", [0, 0]))
        self.planned = state.get("planned", 1)
        planned_for = state.get("planned_for")
        self.planned_for = tuple(planned_for) if planned_for is not None else None
