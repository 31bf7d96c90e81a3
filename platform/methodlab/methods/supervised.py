"""Supervised baseline: a plain cross-entropy classifier.

It is what every other method is compared against, and the backbone it registers is what TOAST
and canonicalization can start from (`models:/methodlab-supervised@candidate`).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from pydantic import Field

from methodlab.config import Section
from methodlab.methods.base import Method, StepContext, classify_accuracy
from methodlab.models import build_model
from methodlab.registry import register_method


class SupervisedConfig(Section):
    arch: str = Field("cnn", description="a registered architecture (`methodlab models`)")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="e.g. {width: 32}")
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@register_method("supervised")
class Supervised(Method):
    Config = SupervisedConfig
    defaults = {"train": {"epochs": 5, "batch_size": 64, "lr": 2e-3}}
    search_space = {
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "train.batch_size": {"choice": [32, 64, 128]},
        "train.weight_decay": {"loguniform": [1e-6, 1e-3]},
    }

    def spec(self) -> dict:
        image_shape = self.data.info.columns["image"].shape
        kwargs = {"in_channels": image_shape[0], "num_classes": self.data.info.num_classes, **self.mcfg.arch_kwargs}
        return {"arch": self.mcfg.arch, "kwargs": kwargs}

    def build_models(self, stage, previous):
        return {"net": build_model(self.spec())}

    def train_step(self, stage, models, optimizers, batch, ctx: StepContext):
        opt = optimizers["opt"]
        with ctx.autocast():
            logits = models["net"](batch["image"])                       # (B, num_classes)
            loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.mcfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    def evaluate(self, stage, models, split, device):
        return {f"{split}_acc": classify_accuracy(models["net"], self.data.splits[split], device)}

    def export(self, models):
        return models["net"], self.spec()
