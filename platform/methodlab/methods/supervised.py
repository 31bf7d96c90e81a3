"""Supervised baseline: a plain cross-entropy classifier.

It is what every other method is compared against, and the backbone it registers is what TOAST
and canonicalization can start from (`models:/methodlab-supervised@candidate`).

`method.init` fine-tunes a pretrained model instead of training `method.arch` from scratch: its
architecture and weights (e.g. a torchvision ResNet-50 that `methodlab models import` registered,
with the input normalization it carries) and a fresh head for this dataset's classes:

    methodlab train supervised data.dataset=/data/cifar10 method.init=models:/resnet50-in1k@candidate
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from methodlab.config import Section
from methodlab.errors import ConfigError
from methodlab.methods.base import Method, StepContext, accuracy_of, classify_accuracy, classify_confusion
from methodlab.models import build_model
from methodlab.registry import register_method


class SupervisedConfig(Section):
    arch: str = Field("cnn", description="a registered architecture (`methodlab models`)")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="e.g. {width: 32}")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    init: str = Field("", description="fine-tune a pretrained model (models:/name@alias, runs:/<id>, a "
                      "checkpoint, a file): its architecture and weights with a fresh head for this "
                      "dataset; arch and arch_kwargs are then not used")


@register_method("supervised")
class Supervised(Method):
    Config = SupervisedConfig
    pretrained_fields = ("init",)
    defaults = {"train": {"epochs": 5, "batch_size": 64, "lr": 2e-3}}
    search_space = {
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "train.batch_size": {"choice": [32, 64, 128]},
        "train.weight_decay": {"loguniform": [1e-6, 1e-3]},
    }

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        self._init: tuple | None = None          # (model, spec) of method.init, loaded once

    def pretrained(self) -> tuple:
        if self._init is None:
            from methodlab.models.hub import load_pretrained

            self._init = load_pretrained(self.mcfg.init, self.cfg.tracking.uri, "method.init", self.cfg.data.normalize)
        return self._init

    def spec(self) -> dict:
        image_shape = self.data.info.columns["image"].shape
        if self.mcfg.init:
            _, spec = self.pretrained()
            kwargs = {**spec["kwargs"], "num_classes": self.data.info.num_classes}
            takes = [kwargs.get("in_channels", 3), kwargs.get("img_size", image_shape[-1])]
            if takes != [image_shape[0], image_shape[-1]]:
                raise ConfigError(f"method.init {self.mcfg.init} takes {takes[0]}x{takes[1]} images but dataset "
                                  f"{self.data.info.name} has {tuple(image_shape)}; import it with --img-size "
                                  f"{image_shape[-1]}")
            return {"arch": spec["arch"], "kwargs": kwargs}
        kwargs = {"in_channels": image_shape[0], "num_classes": self.data.info.num_classes, **self.mcfg.arch_kwargs}
        return {"arch": self.mcfg.arch, "kwargs": kwargs}

    def build_models(self, stage, previous):
        # Every rank builds the same fresh head: one seed for all.
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.train.seed)
            net = build_model(self.spec())
        if self.mcfg.init:
            pretrained, _ = self.pretrained()
            body = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}
            missing, unexpected = net.load_state_dict(body, strict=False)
            assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
        return {"net": net}

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
        if split != "test":
            return {f"{split}_acc": classify_accuracy(models["net"], self.data.splits[split], device)}
        # The test split's confusion matrix: its diagonal is the accuracy, and the final epoch
        # charts it (epoch_artifacts).
        self.confusion = classify_confusion(models["net"], self.data.splits[split], self.data.info.num_classes, device)
        return {"test_acc": accuracy_of(self.confusion)}

    def epoch_artifacts(self, stage, epoch):
        return self.confusion_artifact(stage, epoch)

    def export(self, models):
        return models["net"], self.spec()
