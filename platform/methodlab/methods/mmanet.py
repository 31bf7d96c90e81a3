"""MMANet: incomplete multimodal learning with margin-aware distillation (MAD) and
modality-aware regularization (MAR).

Wei, Luo, Luo, "MMANet: Margin-aware Distillation and Modality-aware Regularization for
Incomplete Multimodal Learning", CVPR 2023, arXiv 2304.08028. Reproduced from the official
classification code (`shicaiwei123/MMANet-CVPR2023`, `classification/`), with the places where
it departs from the paper or from the segmentation code behind options:

* `mad_weighting`: the classification code (`classification/loss/kd/mad.py`) multiplies the
  teacher-entropy weights along the **column** axis of the (B, B) error matrix (a (B, B) matrix
  broadcast against (B,)); the segmentation code weights **rows**, which reads as the paper's
  "each sample weighted by its margin" (see `losses.mmanet.mad_loss` for how its Gram
  normalisation differs). Default `column`, the classification code.
* `mar_variant`: three normalisers of the regularization network's cross-entropy on the samples
  whose modality combination is weak (`losses.mmanet.mar_loss`). `paper` (default):
  (1/B) sum_i 1[c_i in W] CE_i, the expression the classification code writes (divided by the
  batch size B). `segmentation`: the mean CE over the weak samples, (1/n_W) sum_i 1[c_i in W] CE_i,
  as the segmentation code computes it. `code`: the classification code's actual value, where a
  (B,) loss times a (B, 1, 1, 1) indicator broadcasts to (B, 1, 1, B): the regularization head is
  trained on every sample with weight n_W (the number of weak samples in the batch).
* `mining_distance`: how far a combination's predictions on val are from the complete set's.
  `histogram_kl` is the classification code's KL between predicted-label histograms; it cannot
  see accuracy (a combination that is often wrong but predicts every class equally often looks
  like the complete set). `accuracy_gap` (default), (acc_full - acc_c)^2, is the segmentation
  code's criterion (it ranks combinations by their mIoU gap) applied to accuracy. On
  `synthetic_multimodal`, whose weak set is known ({m1, m2, m1-m2}), with the official window
  accuracy_gap picked it in 20 of 20 seeds and histogram_kl in 15 of 20 (task-only students,
  `tests/test_mmanet.py::mined_weak_sets`); in bench/results/mmanet_synthetic.json 5/5 and 4/5.

Stages: `teacher` trains the network on complete data; `student` trains the deployment network
from scratch with per-sample feature-level modality dropout against the frozen teacher. After
each of the task-only epochs `mining_from` .. `begin_epoch` - 1 (counted as completed epochs;
the official 2 .. 4 for begin_epoch 5, see `mining_epochs`) a mining pass on the validation split
accumulates each combination's distance, and the weakest combination is picked from the sum; MAD
and MAR are active from epoch `begin_epoch` (0-based, i.e. after `begin_epoch` task-only epochs).
Evaluation runs the deployment network once per combination with that combination's mask fixed
for the whole split.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from methodlab import distributed
from methodlab.config import Section
from methodlab.data import multimodal
from methodlab.errors import DataError
from methodlab.losses.mmanet import mad_loss, mar_loss
from methodlab.methods.base import Method, StepContext, freeze
from methodlab.metrics.acer import acer_counts, acer_from_counts
from methodlab.models import build_model
from methodlab.registry import register_method

# ----------------------------------------------------------------------------------------------
# Modality combinations


def all_masks(num_modalities: int) -> torch.Tensor:
    """Every non-empty modality combination as a 0/1 mask, (2^M - 1, M) float: singletons first,
    then pairs, ..., the complete set last (the order of the official code for M = 3)."""
    rows = [[1.0 if m in combo else 0.0 for m in range(num_modalities)]
            for k in range(1, num_modalities + 1)
            for combo in itertools.combinations(range(num_modalities), k)]
    return torch.tensor(rows)


def combination_name(mask: torch.Tensor, modalities: Sequence[str]) -> str:
    """`image-edges` for mask [1, 1, 0] (a '-' keeps it a valid MLflow metric name)."""
    return "-".join(name for name, on in zip(modalities, mask.tolist()) if on)


def sample_masks(batch_size: int, masks: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature-level modality dropout (`classification/lib/model_arch.py::modality_drop`): each
    sample draws one of the C = 2^M - 1 combinations uniformly. Returns (combination index (B,)
    int64, mask (B, M) with the dtype and device of `masks`)."""
    index = torch.randint(len(masks), (batch_size,), generator=generator, device=masks.device)
    return index, masks[index]


# ----------------------------------------------------------------------------------------------
# Mining the weak combination


def label_histogram(counts: torch.Tensor) -> torch.Tensor:
    """Predicted-label counts (..., K) -> normalised histograms on the simplex."""
    counts = counts.double()
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)


def histogram_distance(hist: torch.Tensor, hist_full: torch.Tensor) -> float:
    """The classification code's mining distance: KL(softmax(P_c) || softmax(P_full)), written
    there as `F.kl_div(log_softmax(P_full), softmax(P_c))` — a softmax of histograms that are
    already distributions ("double softmax"), kept for fidelity. >= 0, and 0 iff P_c = P_full."""
    return float(F.kl_div(hist_full.log_softmax(-1), hist.softmax(-1), reduction="sum").clamp_min(0))


def mine_weak_set(distances: torch.Tensor, masks: torch.Tensor) -> tuple[int, list[int]]:
    """The weak combination w* and the weak set W (paper Eq. 9-13).

    distances (C,): accumulated distance of each combination's predictions from the complete
    set's; masks (C, M). Candidates are the combinations that miss exactly one modality (the
    three two-modality masks of the official M = 3 code, the singletons for M = 2), so w* is
    never the complete set. W = w* and every non-empty sub-combination of it.
    Returns (index of w*, sorted indices of W).
    """
    sizes = masks.sum(dim=1)
    candidates = torch.nonzero(sizes == masks.shape[1] - 1).flatten()
    best = int(candidates[torch.argmax(distances[candidates])])
    inside = ((masks <= masks[best]).all(dim=1)).nonzero().flatten()
    return best, sorted(int(i) for i in inside)


def declared_weak_set(meta: dict, masks: torch.Tensor) -> list[int] | None:
    """The weak set W a dataset declares for checking the mining (sorted indices into `masks`), or
    None: `meta.weakest_combination` (modality names, `shapes_multimodal`), else the combination
    missing only the most informative modality of `meta.informativeness` (`synthetic_multimodal`),
    with its sub-combinations as `mine_weak_set` forms them."""
    modalities = meta.get("modalities", [])
    if "weakest_combination" in meta:
        target = torch.tensor([float(m in meta["weakest_combination"]) for m in modalities])
        distances = (masks == target).all(dim=1).double()
    elif "informativeness" in meta:
        # The informativeness a combination lacks orders the candidates as the mining should.
        distances = (1 - masks.double()) @ torch.tensor(meta["informativeness"], dtype=torch.float64)
    else:
        return None
    return mine_weak_set(distances, masks)[1]


# ----------------------------------------------------------------------------------------------
# Charts


def combination_chart(names: Sequence[str], series: dict[str, Sequence[float]], title: str):
    """A grouped bar chart of accuracy per modality combination (a matplotlib Figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(names) + 2), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, values, width=width, label=f"{label} (mean {sum(values) / len(values):.3f})")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# The method


class MMANetConfig(Section):
    teacher_epochs: int = Field(10, gt=0, description="epochs of the teacher stage (complete data)")
    width: int = Field(32, gt=0, description="stem channels")
    feat_dim: int = Field(64, gt=0, description="features per modality after its stem")
    hidden: int = Field(128, gt=0, description="trunk width; MAD distils the trunk output")
    lambda_mad: float = Field(30.0, ge=0, description="MAD weight (official classification: 30)")
    lambda_mar: float = Field(0.5, ge=0, description="MAR weight (official classification: 0.5)")
    begin_epoch: int = Field(5, ge=1, description="task-only student epochs; MAD and MAR from then on "
                             "(official classification: 5)")
    mining_from: int = Field(2, ge=0, description="mine after each completed student epoch from this one to "
                             "begin_epoch - 1 (official: 2, `epoch > 1 and epoch < begin_epoch`)")
    mad_weighting: Literal["column", "row"] = Field(
        "column", description="column: classification code (default); row: segmentation code's axis")
    mar_variant: Literal["paper", "segmentation", "code"] = Field(
        "paper", description="paper: sum of CE on weak samples / B (default); segmentation: mean CE over the "
        "weak samples; code: classification code's broadcast")
    mining_distance: Literal["histogram_kl", "accuracy_gap"] = Field(
        "accuracy_gap", description="accuracy_gap: (acc_full - acc_c)^2, the segmentation code's metric gap "
        "(default: it finds synthetic_multimodal's weak set more reliably); histogram_kl: classification code")

    @model_validator(mode="after")
    def _window_fits(self):
        if self.mining_from >= self.begin_epoch:
            raise ValueError(f"mining_from ({self.mining_from}) must be < begin_epoch ({self.begin_epoch}): "
                             "mining uses the task-only epochs before MAD and MAR start")
        return self


def mining_epochs(mining_from: int, begin_epoch: int) -> list[int]:
    """The completed student epochs after which the weak combination is mined: mining_from ..
    begin_epoch - 1. The official loop (`model_develop.py`, `if epoch > 1 and epoch < begin_epoch`
    after epoch `epoch`'s batches) skips every batch of its epoch 0, so its epoch e ends with e
    trained epochs: it mines after 2, 3, 4 trained epochs for begin_epoch 5 and turns MAD and MAR
    on (`epoch > begin_epoch`) after 5. Here `on_epoch_start(e)` runs after e completed epochs."""
    return list(range(mining_from, begin_epoch))


@register_method("mmanet")
class MMANet(Method):
    Config = MMANetConfig
    defaults = {"train": {"epochs": 20, "batch_size": 64, "lr": 2e-3}}
    stages = ("teacher", "student")
    metric = "val_mean_acc"
    test_metric = "test_mean_acc"
    default_dataset = "digits_multimodal"
    # The modality columns differ per dataset (`meta["modalities"]`); they are checked when the
    # method is built. `packed` is what an exported model takes.
    required_columns = ("label", multimodal.PACKED)
    export_input = multimodal.PACKED
    search_space = {
        "method.lambda_mad": {"loguniform": [1.0, 100.0]},
        "method.lambda_mar": {"loguniform": [0.05, 2.0]},
        "method.begin_epoch": {"choice": [3, 5, 8]},
    }
    demo_baseline = ("modality dropout alone", ["method.lambda_mad=0", "method.lambda_mar=0"])
    smoke_overrides = ["method.teacher_epochs=1", "train.epochs=2", "method.begin_epoch=1",
                       "method.mining_from=0", "method.width=8", "method.feat_dim=16", "method.hidden=32"]

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        info = data.info
        self.modalities = list(info.meta.get("modalities", []))
        missing = [m for m in self.modalities if m not in info.columns]
        if len(self.modalities) < 2 or missing:
            raise DataError(f"dataset {info.uri} is not a multimodal dataset with >= 2 modalities "
                            f"(meta.modalities={self.modalities}, missing columns {missing}); "
                            "write it with methodlab.data.multimodal.multimodal_splits")
        self.masks = all_masks(len(self.modalities))
        self.names = [combination_name(m, self.modalities) for m in self.masks]
        self.num_classes = info.num_classes
        # Mining state, kept across resumes.
        self.distances = [0.0] * len(self.masks)
        self.mined_upto = -1
        self.weak: list[int] | None = None
        self.accuracy: dict[str, list[float]] = {}     # split -> accuracy per combination

    # -- networks -------------------------------------------------------------------------------

    def spec(self, regularizer: bool = False) -> dict:
        c = self.mcfg
        kwargs = {"modality_shapes": [self.data.info.columns[m].shape for m in self.modalities],
                  "num_classes": self.num_classes, "width": c.width, "feat_dim": c.feat_dim, "hidden": c.hidden}
        return {"arch": "mmanet", "kwargs": {**kwargs, "regularizer": True} if regularizer else kwargs}

    @classmethod
    def epochs_by_stage(cls, cfg):
        return {"teacher": cfg.method.teacher_epochs, "student": cfg.train.epochs}

    def build_models(self, stage, previous):
        if stage == "teacher":
            return {"teacher": build_model(self.spec())}
        return {"teacher": freeze(previous["teacher"]), "student": build_model(self.spec(regularizer=True))}

    def pack(self, batch) -> torch.Tensor:
        """The modality columns of a batch as the network's (B, sum of sizes) input."""
        return torch.cat([batch[m].flatten(1).float() for m in self.modalities], dim=1)

    # -- training -------------------------------------------------------------------------------

    def active(self, epoch: int) -> bool:
        return epoch >= self.mcfg.begin_epoch

    def train_step(self, stage, models, optimizers, batch, ctx: StepContext):
        x, y = self.pack(batch), batch["label"]
        complete = torch.ones(len(y), len(self.modalities), device=x.device)
        out: dict[str, torch.Tensor] = {}
        with ctx.autocast():
            if stage == "teacher":
                loss = F.cross_entropy(models["teacher"](x, complete).float(), y)
            else:
                masks = self.masks.to(x.device)
                combo, mask = sample_masks(len(y), masks)
                logits, feats, aux = models["student"](x, mask, with_aux=True)
                task = F.cross_entropy(logits.float(), y)
                weak_ids = torch.tensor(self.weak or [], dtype=torch.long, device=x.device)
                mar = mar_loss(aux, y, torch.isin(combo, weak_ids), self.mcfg.mar_variant)
                on = self.active(ctx.epoch) and self.weak is not None
                # MAR always enters the graph (weight 0 while off) so that every DDP rank
                # produces gradients for the regularization network in every step.
                loss = task + (self.mcfg.lambda_mar if on else 0.0) * mar
                out = {"loss_task": task.detach(), "loss_mar": mar.detach()}
                if self.active(ctx.epoch) and self.mcfg.lambda_mad > 0:
                    with torch.no_grad():
                        t_logits, t_feats, _ = models["teacher"](x, complete, with_aux=True)
                    mad = mad_loss(feats, t_feats, t_logits, self.mcfg.mad_weighting)
                    loss = loss + self.mcfg.lambda_mad * mad
                    out["loss_mad"] = mad.detach()
        opt = optimizers["opt"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), **out}

    # -- mining ---------------------------------------------------------------------------------

    def on_epoch_start(self, stage, models, ctx: StepContext) -> dict[str, Any]:
        c = self.mcfg
        if stage == "student" and self.weak is None and ctx.epoch > self.mined_upto \
                and ctx.epoch in mining_epochs(c.mining_from, c.begin_epoch):
            student = distributed.unwrap(models["student"])
            # Each rank's last forward left its own BatchNorm statistics: mine with rank 0's, as
            # DDP's next forward would use, so every rank picks the same weak set.
            distributed.broadcast_buffers({"student": student})
            step = self.mining_distances(student, ctx.device)
            self.distances = [d + s for d, s in zip(self.distances, step)]
            self.mined_upto = ctx.epoch
        if stage == "student" and self.weak is None and ctx.epoch >= c.begin_epoch:
            _, self.weak = mine_weak_set(torch.tensor(self.distances), self.masks)
        if stage != "student" or self.weak is None:
            return {}
        weakest = max(self.weak, key=lambda i: self.masks[i].sum().item())   # w*: the largest in W
        return {"weakest_combination": self.names[weakest],
                "weak_set": ",".join(self.names[i] for i in self.weak),
                "mining_distances": ",".join(f"{self.names[i]}={d:.4g}" for i, d in enumerate(self.distances))}

    def mining_distances(self, student, device) -> list[float]:
        """One mining pass: each combination's distance from the complete set on the val split
        (sharded: predicted-label counts or correct counts are summed over the ranks)."""
        labels = distributed.shard(self.data.splits["val"]).tensors["label"]
        preds = [self.predict(student, "val", mask, device) for mask in self.masks]
        if self.mcfg.mining_distance == "histogram_kl":
            counts = distributed.all_sum(torch.stack([torch.bincount(p, minlength=self.num_classes) for p in preds]))
            hists = label_histogram(counts)                                              # (C, K)
            return [histogram_distance(h, hists[-1]) for h in hists]
        correct = distributed.all_sum(torch.stack([(p == labels).sum() for p in preds]))
        acc = (correct / distributed.all_sum(torch.tensor(float(len(labels))))).tolist()
        return [(acc[-1] - a) ** 2 for a in acc]

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, net, split: str, mask: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
        """Predicted labels (n,) of this rank's shard of `split` with one fixed modality mask (M,)
        for every row."""
        net.eval()
        out = []
        for b in distributed.shard(self.data.splits[split]).batches(batch_size, device):
            x = self.pack(b)
            out.append(net(x, mask.to(x.device).expand(len(x), -1)).argmax(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def evaluate(self, stage, models, split, device):
        labels = distributed.shard(self.data.splits[split]).tensors["label"]
        n = distributed.all_sum(torch.tensor(float(len(labels)))).clamp_min(1)
        if stage == "teacher":
            preds = self.predict(models["teacher"], split, self.masks[-1], device)
            return {f"{split}_teacher_acc": float(distributed.all_sum((preds == labels).sum()) / n)}
        preds = [self.predict(models["student"], split, mask, device) for mask in self.masks]
        # One collective for every combination: correct counts (C,) and, for two classes, ACER's (C, 4).
        counts = torch.stack([torch.cat([(p == labels).sum()[None].double(), acer_counts(p, labels)])
                              for p in preds])
        counts = distributed.all_sum(counts)                                           # (C, 5)
        accuracy = (counts[:, 0] / n).tolist()
        metrics: dict[str, float] = {f"{split}_acc_{name}": a for name, a in zip(self.names, accuracy)}
        metrics[f"{split}_mean_acc"] = sum(accuracy) / len(accuracy)
        if self.num_classes == 2:
            acers = [acer_from_counts(c[1:]) for c in counts]
            metrics.update({f"{split}_acer_{name}": a for name, a in zip(self.names, acers)})
            metrics[f"{split}_mean_acer"] = sum(acers) / len(acers)
        self.accuracy[split] = accuracy
        return metrics

    def epoch_artifacts(self, stage, epoch):
        if stage != "student" or epoch != self.stage_epochs(stage) - 1:
            return {}
        series = {split: self.accuracy[split] for split in ("val", "test") if split in self.accuracy}
        return {"accuracy_per_combination.png": combination_chart(
            self.names, series, f"MMANet deployment network, {self.data.info.name}")}

    # -- export and state -----------------------------------------------------------------------

    def export(self, models):
        """The deployment network alone (stems, trunk, head); the regularization network is a
        training-time device and is dropped, as in the official code."""
        spec = self.spec()
        model = build_model(spec)
        model.load_state_dict({k: v for k, v in distributed.unwrap(models["student"]).state_dict().items()
                               if not k.startswith("regularizer.")})
        return model, spec

    def state_dict(self):
        return {"distances": list(self.distances), "mined_upto": self.mined_upto, "weak": self.weak}

    def load_state_dict(self, state):
        if state:
            self.distances = list(state["distances"])
            self.mined_upto = int(state["mined_upto"])
            self.weak = None if state["weak"] is None else list(state["weak"])
