"""TOAST: transfer a frozen pretrained ViT by steering its attention top-down.

Shi, Gai, Darrell, Wang, "TOAST: Transfer Learning via Attention Steering" (arXiv 2305.15542;
published as "Refocusing Is Key to Transfer Learning"), following the official code bfshi/TOAST
(visual_classification/src/models/vit/vit_top_down.py, vit_models.py) and its predecessor AbSViT
(Shi, Darrell, Wang, CVPR 2023, arXiv 2303.15056; bfshi/AbSViT models/absvit.py).

The model is `methodlab.models.vit.TopDownViT` (arch `toast_vit`): a feedforward pass (no_grad),
token selection by the clamped cosine to a learned prompt, the transform P, per-layer feedback
decoders (W1, W2) from the top block down, and a second pass with the top-down signal added to
the attention values. Two stages:

  pretune   decoders (W1, W2) and prompt train on the SOURCE data (the dataset's `source_train`
            table) with the backbone's own, frozen head: CE + var_loss_coef * L_var
            (coefficient 0.1 as in the TOAST ViT file and AbSViT). Skipped (0 epochs) for the
            `linear` and `finetune` baselines, or with method.pretune_epochs=0.
  transfer  the target task (the dataset's train split) with CE only and a fresh head:
              toast       decoders, prompt, head train; P and the backbone stay frozen
              toast-lite  LoRA (r = method.lora_rank, 4) on both decoder linears, prompt, P, head
              linear      the plain ViT, head only (linear probe)
              finetune    the plain ViT, every parameter (full fine-tune)

The value-bias quirk of the official code (td goes through the whole qkv layer, so b_v is added
twice) is `method.value_bias=faithful`; the default `free` adds W_v td only, so a zero top-down
signal reproduces the bottom-up model exactly.

The backbone (`method.backbone`) is any ViT the platform can load with
`methodlab.models.hub.load_pretrained`: `models:/name@alias`, `runs:/<id>`, a checkpoint directory
or a model file; `scratch` builds a randomly initialised ViT from `method.scratch_kwargs` and is
meant for tests and benchmarks only (a random backbone has nothing to transfer).

Optimizer. The official fine-tuning setting (bfshi/TOAST `visual_classification/configs/base.yaml`
and `src/configs/config.py`: SOLVER.OPTIMIZER "sgd", MOMENTUM 0.9, WEIGHT_DECAY 1e-4, cosine
schedule with WARMUP_EPOCH 10 of TOTAL_EPOCH 100, batch 32; BASE_LR 0.01-0.03 in the README's
FGVC commands; `src/solver/optimizer.py` builds `optim.SGD(..., momentum, weight_decay)` and
exempts `last_layer.bias` from weight decay) is `train.optimizer=sgd` (SGD, momentum 0.9,
`methods.base.make_optimizer`) with train.lr 0.01-0.03 and the default warmup_fraction 0.1 (10 of
100 epochs); the head's bias is never decayed, in every optimizer. The default stays `adamw`
(lr 1e-2), which is what the small built-in task was tuned with; both are in the sweep space.

Built-in task (`digits_transfer`, methodlab.data.digits_transfer): pretrain and pretune on
digits 0-4, transfer to digits 5-9 with 10 labelled images per class.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from methodlab import distributed
from methodlab.config import Section
from methodlab.errors import ConfigError
from methodlab.losses.toast import variational_loss
from methodlab.metrics.images import ImageRow, image_grid_chart
from methodlab.methods.base import (Method, StepContext, accuracy_of, classify_accuracy, classify_confusion,
                                    make_optimizer)
from methodlab.models.vit import TopDownViT, ViT, make_head
from methodlab.registry import register_method

Mode = Literal["toast", "toast-lite", "linear", "finetune"]
TOAST_MODES = ("toast", "toast-lite")
DEFAULT_BACKBONE = "models:/methodlab-vit-source@candidate"
# The demo's source backbone: a small ViT for 8x8 digits (16 patch tokens + CLS); `scratch`
# backbones take the same sizes and the dataset's image size.
SCRATCH_VIT = {"patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 4}
SOURCE_VIT = {"img_size": 8, **SCRATCH_VIT}
MASK_IMAGES = 8          # val images whose top-down token mask a TOAST run charts


# ----------------------------------------------------------------------------------------------
# Parameter accounting and schedules (pure functions)


def vit_param_count(dim: int, depth: int, num_tokens: int, patch_size: int, in_channels: int,
                    mlp_hidden: int, num_classes: int) -> int:
    """Closed-form parameter count of `methodlab.models.vit.ViT` (qkv bias on, head Linear or
    none when num_classes=0): patch conv, CLS, positions, blocks, final LayerNorm, head."""
    patch = dim * in_channels * patch_size ** 2 + dim
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim * mlp_hidden + mlp_hidden + dim
    head = dim * num_classes + num_classes if num_classes > 0 else 0
    return patch + dim + num_tokens * dim + depth * block + 2 * dim + head


def expected_trainable(mode: str, dim: int, depth: int, num_classes: int, lora_rank: int,
                       vit_total: int) -> int:
    """Trainable parameters of each mode (TOAST spec §2.4; C = dim, L = depth, K = num_classes):

      pretune     L * 2C^2 + C                          (W1, W2 of every layer, prompt)
      toast       L * 2C^2 + C + CK + K                 (+ the head; P frozen)
      toast-lite  L * 2 * 2rC + C^2 + C + CK + K        (LoRA A, B on W1 and W2, P, prompt, head)
      linear      CK + K
      finetune    every parameter of the ViT with its K-way head (`vit_total`)
    """
    head = dim * num_classes + num_classes
    return {"pretune": depth * 2 * dim * dim + dim,
            "toast": depth * 2 * dim * dim + dim + head,
            "toast-lite": depth * 2 * 2 * lora_rank * dim + dim * dim + dim + head,
            "linear": head,
            "finetune": vit_total}[mode]


def trains(mode: str, name: str) -> bool:
    """Whether parameter `name` of the mode's model trains (official name-substring rules)."""
    if mode == "pretune":
        return name.startswith("decoders.") or name == "prompt"
    if mode == "toast":
        return name.startswith(("decoders.", "head.")) or name == "prompt"
    if mode == "toast-lite":
        return ".lora_" in name or name.startswith("head.") or name in ("prompt", "top_down_transform")
    if mode == "linear":
        return name.startswith("head.")
    return True


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR factor: linear warm-up, then cosine to 0 (official `WarmupCosineSchedule`)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------------------------
# The method


class ToastConfig(Section):
    backbone: str = Field(DEFAULT_BACKBONE, description="a ViT to transfer: models:/name@alias, runs:/<id>, "
                          "a checkpoint directory, a model file; `scratch` = random init from "
                          "scratch_kwargs (tests and benchmarks only)")
    scratch_kwargs: dict[str, Any] = Field(default_factory=lambda: dict(SCRATCH_VIT),
                                           description="ViT kwargs for backbone=scratch; image size and "
                                           "channels default to the dataset's")
    mode: Mode = Field("toast", description="toast | toast-lite | linear (probe) | finetune (full)")
    lora_rank: int = Field(4, gt=0, description="toast-lite's LoRA rank on the decoders")
    value_bias: Literal["free", "faithful"] = Field(
        "free", description="free: v += W_v td (default; td=0 is a no-op); faithful: v += W_v td + b_v "
        "as the official code does")
    pretune_epochs: int = Field(10, ge=0, description="decoders + prompt on the source data first; "
                                "0 skips it (always skipped for linear and finetune)")
    var_loss_coef: float = Field(0.1, ge=0, description="weight of L_var in the pretune stage")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="linear LR warm-up, then cosine, per stage")


@register_method("toast")
class Toast(Method):
    Config = ToastConfig
    pretrained_fields = ("backbone",)
    # The transfer stage is few-shot (digits_transfer's target train split has 50 rows): a train
    # split smaller than one global batch is the setting, not a mistake (launch.check_contents).
    defaults = {"train": {"epochs": 60, "batch_size": 32, "optimizer": "adamw", "lr": 1e-2,
                          "weight_decay": 1e-4}, "data": {"allow_tiny": True}}
    stages = ("pretune", "transfer")
    default_dataset = "digits_transfer"
    # The same space for every mode (run one sweep per method.mode, so no mode is tuned more than
    # its baselines): lr over 1e-3..1e-1 (linear reaches its best at 1e-1 on digits_transfer), and
    # the optimizer, `sgd` being the official setting (see the module docstring).
    search_space = {
        "train.lr": {"loguniform": [1e-3, 1e-1]},
        "train.weight_decay": {"choice": [0.0, 1e-4, 1e-3, 1e-2]},
        "train.optimizer": {"choice": ["adamw", "sgd"]},
    }
    demo_prerequisites = [("supervised", [
        "data.dataset=digits_source", "method.arch=vit",
        "method.arch_kwargs={img_size: 8, patch_size: 2, embed_dim: 64, depth: 4, num_heads: 4}",
        "train.epochs=30", "train.lr=1e-3", "tracking.registered_model=methodlab-vit-source"])]
    demo_baseline = ("full fine-tuning", ["method.mode=finetune"])
    smoke_overrides = ["method.backbone=scratch",
                       "method.scratch_kwargs={patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2}",
                       "method.pretune_epochs=1", "train.epochs=1", "train.batch_size=64"]

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        self.vit_kwargs: dict = {}
        self.n_trainable = 0
        self.masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # token_masks at the test eval
        if self.stage_epochs("pretune") and "source_train" not in data.tables:
            raise ConfigError(f"dataset {data.info.name} has no source_train table for the pretune stage; "
                              "use data.dataset=digits_transfer or set method.pretune_epochs=0")

    @classmethod
    def epochs_by_stage(cls, cfg):
        # The baselines have no top-down path to pretune.
        pretune = cfg.method.pretune_epochs if cfg.method.mode in TOAST_MODES else 0
        return {"pretune": pretune, "transfer": cfg.train.epochs}

    # -- models ---------------------------------------------------------------------------------

    def load_backbone(self) -> ViT | TopDownViT:
        """The pretrained ViT (with its source head), identical on every rank; or a `toast_vit`
        that is already pretuned (TOAST's released top-down ViT-B, `methodlab models import
        --from toast:vit_topdown_base_patch16_224`), whose decoders and prompt the run starts from."""
        image_shape = self.data.info.columns["image"].shape
        if self.mcfg.backbone == "scratch":
            source = self.data.tables.get("source_train", {}).get("label")
            classes = int(source.max()) + 1 if source is not None else self.data.info.num_classes
            spec = {"arch": "vit", "kwargs": {"img_size": image_shape[-1], "in_channels": image_shape[0],
                                              "num_classes": classes, **self.mcfg.scratch_kwargs}}
            from methodlab.models import build_model
            model = build_model(spec)
        else:
            from methodlab.models.hub import load_pretrained
            model, spec = load_pretrained(self.mcfg.backbone, self.cfg.tracking.uri, "method.backbone",
                                          self.cfg.data.normalize)
        why = self.backbone_problem(self.mcfg, spec, self.data.info)
        if why:
            raise ConfigError(f"method.backbone {self.mcfg.backbone} {why}")
        kw = {**(spec["kwargs"]["vit"] if spec["arch"] == "toast_vit" else spec["kwargs"])}
        kw.pop("num_classes", None)
        self.vit_kwargs = kw
        return model

    @classmethod
    def backbone_problem(cls, mcfg: ToastConfig, spec: dict, info) -> str | None:
        """What makes the backbone of `spec` unfit for TOAST on dataset `info`, or None: a ViT (or a
        pretuned top-down one of the same value_bias) for the dataset's channels and image size."""
        if spec["arch"] not in ("vit", "toast_vit"):
            return (f"is a {spec['arch']!r} model; TOAST needs a ViT (train one with `methodlab train supervised "
                    "method.arch=vit`)")
        if spec["arch"] == "toast_vit" and spec["kwargs"].get("value_bias", "free") != mcfg.value_bias:
            return (f"was pretuned with value_bias={spec['kwargs'].get('value_bias', 'free')}; set "
                    "method.value_bias to match")
        kw = spec["kwargs"]["vit"] if spec["arch"] == "toast_vit" else spec["kwargs"]
        image_shape = info.columns["image"].shape
        if [kw.get("in_channels", 3), kw.get("img_size", 224)] != [image_shape[0], image_shape[-1]]:
            return (f"takes {kw.get('in_channels', 3)}x{kw.get('img_size', 224)} images but dataset {info.name} "
                    f"has {'x'.join(map(str, image_shape))}")
        return None

    @classmethod
    def pretrained_problem(cls, cfg, info, field, model, spec, images):
        return cls.backbone_problem(cfg.method, spec, info)

    def build_models(self, stage, previous):
        # Every rank builds the same random parts (decoders, prompt, heads): one seed for all.
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.train.seed)
            model = self._pretune_model() if stage == "pretune" else self._transfer_model(previous["model"])
        return {"model": model}

    @classmethod
    def train_source(cls, cfg, stage):
        # The pretune stage trains on the source data, the transfer stage on the target task.
        if stage == "pretune" and cls.epochs_by_stage(cfg)["pretune"]:
            return "table:source_train"
        return "train"

    def _pretune_model(self) -> TopDownViT:
        vit = self.load_backbone()
        if isinstance(vit, TopDownViT):          # already pretuned: pretune further or go on
            return _set_trainable(vit, "pretune")
        if vit.num_classes == 0 and self.stage_epochs("pretune"):
            raise ConfigError("the pretune stage needs the backbone's source head; this backbone has none "
                              "(num_classes=0): set method.pretune_epochs=0")
        source = self.data.tables.get("source_train", {}).get("label")
        if source is not None and self.stage_epochs("pretune") and int(source.max()) >= vit.num_classes:
            raise ConfigError(f"the backbone's head has {vit.num_classes} classes but the source labels "
                              f"go up to {int(source.max())}; pretrain it on the source data")
        model = TopDownViT(self.vit_kwargs, max(vit.num_classes, 1), 0, self.mcfg.value_bias)
        model.backbone.load_state_dict(_without_head(vit.state_dict()))
        if vit.num_classes:
            model.head.load_state_dict(vit.head.state_dict())
        return _set_trainable(model, "pretune")

    def _transfer_model(self, pretuned: TopDownViT) -> nn.Module:
        mode, k = self.mcfg.mode, self.data.info.num_classes
        if mode in TOAST_MODES:
            model = TopDownViT(self.vit_kwargs, k, self.mcfg.lora_rank if mode == "toast-lite" else 0,
                               self.mcfg.value_bias)
            # strict=False as in the official transfer: a fresh head, and LoRA adapters (B = 0, so
            # the pretuned decoders are where toast-lite starts) that the pretuned model lacks.
            missing, unexpected = model.load_state_dict(_without_head(pretuned.state_dict()), strict=False)
            assert not unexpected and all(".lora_" in n or n.startswith("head.") for n in missing)
        else:
            model = ViT(**self.vit_kwargs, num_classes=k)
            model.load_state_dict(_without_head(pretuned.backbone.state_dict()), strict=False)
            model.head = make_head(self.vit_kwargs.get("embed_dim", 768), k)
        return _set_trainable(model, mode)

    def expected_trainable(self, stage: str) -> int:
        kw = {**_vit_defaults(), **self.vit_kwargs}
        dim, k = kw["embed_dim"], self.data.info.num_classes
        total = vit_param_count(dim, kw["depth"], (kw["img_size"] // kw["patch_size"]) ** 2 + 1,
                                kw["patch_size"], kw["in_channels"], int(dim * kw["mlp_ratio"]), k)
        mode = "pretune" if stage == "pretune" else self.mcfg.mode
        return expected_trainable(mode, dim, kw["depth"], k, self.mcfg.lora_rank, total)

    # -- optimisation ---------------------------------------------------------------------------

    def build_optimizers(self, stage, models):
        named = list(distributed.unwrap(models["model"]).named_parameters())
        params = [p for n, p in named if p.requires_grad and n != "head.bias"]
        opt = make_optimizer(params, self.cfg.train)
        # No weight decay on the classifier's bias (official optimizer.py); the prompt is decayed.
        bias = [p for n, p in named if p.requires_grad and n == "head.bias"]
        if bias:
            opt.add_param_group({"params": bias, "weight_decay": 0.0})
        self.n_trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
        expected = self.expected_trainable(stage)
        if self.n_trainable != expected:
            raise RuntimeError(f"{stage}/{self.mcfg.mode}: optimizer holds {self.n_trainable} parameters, "
                               f"the mode's formula gives {expected}")
        return {"opt": opt}

    def build_schedulers(self, stage, optimizers, steps_per_epoch):
        total = steps_per_epoch * self.stage_epochs(stage)
        warmup = int(self.mcfg.warmup_fraction * total)
        return {"lr": torch.optim.lr_scheduler.LambdaLR(
            optimizers["opt"], lambda s: warmup_cosine(s, total, warmup))}

    def on_epoch_start(self, stage, models, ctx):
        total = sum(p.numel() for p in distributed.unwrap(models["model"]).parameters())
        return {"trainable_params": self.n_trainable, "trainable_fraction": round(self.n_trainable / total, 6)}

    def train_step(self, stage, models, optimizers, batch, ctx: StepContext):
        opt, model = optimizers["opt"], models["model"]
        out: dict[str, torch.Tensor] = {}
        with ctx.autocast():
            if isinstance(distributed.unwrap(model), TopDownViT):
                logits, pairs, mask = model(batch["image"], aux=True)
                var = variational_loss(pairs).float()
                out.update(var_loss=var.detach(), mask_mean=mask.detach().float().mean())
            else:
                logits = model(batch["image"])
            ce = F.cross_entropy(logits.float(), batch["label"])
        # L_var only in pretune: the official transfer never calls var_loss.
        loss = ce + self.mcfg.var_loss_coef * var if stage == "pretune" else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ctx.extra["schedulers"]["lr"].step()
        counted = sum(p.numel() for g in opt.param_groups for p in g["params"])
        if counted != self.n_trainable:
            raise RuntimeError(f"trainable parameters changed mid-stage: {counted} != {self.n_trainable}")
        return {"loss": loss.detach(), "ce": ce.detach(), **out,
                "trainable_params": torch.tensor(float(counted), dtype=torch.float64)}

    # -- evaluation and export ------------------------------------------------------------------

    def evaluate(self, stage, models, split, device):
        if stage == "pretune":   # the source head on held-out source images
            return {f"{split}_source_acc": classify_accuracy(
                models["model"], self.data.table_split("source_val"), device)}
        if split == "test":       # the target task's confusion matrix, charted after the last epoch
            self.confusion = classify_confusion(models["model"], self.data.splits[split], self.data.info.num_classes,
                                                device)
            if isinstance(models["model"], TopDownViT):     # charted with the confusion matrix
                self.masks = self.token_masks(models["model"], device)
            return {"test_acc": accuracy_of(self.confusion)}
        return {f"{split}_acc": classify_accuracy(models["model"], self.data.splits[split], device)}

    @torch.no_grad()
    def token_masks(self, model: TopDownViT, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first MASK_IMAGES val images (B, C, H, W), their top-down token mask on the patch grid
        (B, 1, H/p, W/p; CLS dropped) and their labels (B,), on the CPU: which patches the prompt
        selects for the feedback path (`vit.token_mask`), the signal TOAST steers attention with."""
        batch = self.data.splits["val"].head(MASK_IMAGES)
        x = batch["image"].to(device)
        mask = model.top_down(model.bottom_up(model.backbone.tokens_in(x)))[1]          # (B, N, 1)
        side = math.isqrt(mask.shape[1] - 1)                                           # square images
        return x.cpu(), mask[:, 1:, 0].reshape(-1, 1, side, side).float().cpu(), batch["label"].cpu()

    def epoch_artifacts(self, stage, epoch):
        out = self.confusion_artifact(stage, epoch)
        if out and self.masks is not None:         # the run's end, in a TOAST mode
            images, masks, labels = self.masks
            classes = self.data.info.meta.get("classes", range(self.data.info.num_classes))
            out["top_down_mask_val.png"] = image_grid_chart(
                [ImageRow("val image", images), ImageRow("top-down\nmask", masks, (0.0, 1.0))],
                f"TOAST ({self.mcfg.mode}), {self.data.info.name}: token mask clamp(cos(x, prompt), 0, 1)",
                [f"label {classes[int(y)]}" for y in labels])
        return out

    def export(self, models):
        model, k = models["model"], self.data.info.num_classes
        if isinstance(model, TopDownViT):
            lora = self.mcfg.lora_rank if self.mcfg.mode == "toast-lite" else 0
            return model, {"arch": "toast_vit", "kwargs": {"vit": self.vit_kwargs, "num_classes": k,
                                                            "lora_rank": lora, "value_bias": self.mcfg.value_bias}}
        return model, {"arch": "vit", "kwargs": {**self.vit_kwargs, "num_classes": k}}


def _without_head(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _vit_defaults() -> dict:
    import inspect
    return {n: p.default for n, p in inspect.signature(ViT.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _set_trainable(model: nn.Module, mode: str) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(trains(mode, name))
    return model
