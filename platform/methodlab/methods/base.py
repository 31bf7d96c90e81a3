"""The method interface. A method is a thin class; the shared loop (`methodlab.train.loop`) owns
epochs, device placement, DDP, checkpoints, resume, metrics and MLflow.

A method declares:
  Config            its pydantic config class (the `method:` section)
  defaults          platform defaults it changes, e.g. {"train": {"epochs": 20}}
  presets           or, where its defaults depend on the data, named sets of them (timm's model
                    variants), e.g. {"digits": {...}, "cub": {...}}, picked by `method.preset`
  stages            what it trains, in order, e.g. ("teacher", "student")
  optimizers        the train.optimizer values it honours (all by default)
  loaders           the data.loader values it runs with (memory and stream by default)
  metric, mode      the validation metric that selects models and drives Tune
  default_dataset   the built-in dataset it runs on when `data.dataset` is empty
  search_space      its default Tune space, dotted config keys -> distributions

and implements `build_models`, `train_step` and `evaluate` (plus `build_optimizers`, `export`,
`epochs_by_stage` when the defaults do not fit). `train_step` owns the backward passes and optimizer
steps, because GAN-style and multi-optimizer methods need that.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from methodlab import distributed
from methodlab.config import RunConfig, Section
from methodlab.data.dataset import DatasetInfo
from methodlab.data.decode import Decoders, column_decoders, decode_batch
from methodlab.metrics.confusion import confusion_chart, confusion_counts
from methodlab.models.serving import input_doc

Batch = dict[str, torch.Tensor]


@dataclass
class StepContext:
    """What the loop tells a method about where it is."""

    stage: str
    epoch: int                  # within the stage, 0-based
    step: int                   # optimizer steps so far in the whole run
    device: torch.device
    rank: int
    world_size: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitData:
    """A whole split held as tensors on the worker (`data.loader=memory`), as stored (uint8
    images); `batches` and `head` hand out decoded values (`methodlab.data.decode`)."""

    tensors: Batch
    decoders: Decoders = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def batches(self, batch_size: int, device: torch.device | None = None) -> Iterator[Batch]:
        """Decoded batches in row order, decoded after the copy to `device`."""
        for start in range(0, len(self), batch_size):
            yield decode_batch({k: v[start:start + batch_size].to(device, non_blocking=True) if device else
                                v[start:start + batch_size] for k, v in self.tensors.items()}, self.decoders)

    def head(self, rows: int) -> Batch:
        """The first `rows` rows, decoded (examples, signatures, shape checks)."""
        return next(self.batches(rows))


@dataclass
class DataBundle:
    info: DatasetInfo
    splits: dict[str, SplitData]
    tables: dict[str, Batch]
    # data.loader=stream: (source, batch_size, device) -> one pass over this rank's shard of a
    # streamed source (`Method.train_source`), in the stored dtypes; None with the memory loader.
    stream: Callable[[str, int, torch.device], Iterator[Batch]] | None = None
    normalize: bool = False        # data.normalize: decoders standardize scaled columns

    def decoders(self, source: str) -> Decoders:
        """How the columns of `source` (a split name, or "table:<name>") decode on the device."""
        columns = self.info.tables[source.removeprefix("table:")] if source.startswith("table:") else self.info.columns
        return column_decoders(columns, self.normalize)

    def table_split(self, name: str) -> SplitData:
        """Side table `name` as a SplitData that decodes like the splits."""
        return SplitData(self.tables[name], self.decoders(f"table:{name}"))


def forward_problem(model: Callable, images: torch.Tensor) -> tuple[str | None, torch.Tensor | None]:
    """(None, output) where `model` (a module in eval mode, or its `embed`) takes `images`
    (B, C, H, W); else (why not, None): a model built for other channels or another image size."""
    try:
        with torch.no_grad():
            return None, model(images)
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        shown = "x".join(str(d) for d in images.shape[1:])
        return f"does not take this dataset's {shown} images ({str(e).splitlines()[0][:120]})", None


def make_optimizer(params, train_cfg, lr: float | None = None, weight_decay: float | None = None):
    """The optimizer named by `train.optimizer`, over `params`."""
    params = [p for p in params if p.requires_grad]
    lr = train_cfg.lr if lr is None else lr
    wd = train_cfg.weight_decay if weight_decay is None else weight_decay
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    cls = torch.optim.AdamW if train_cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=wd)


def freeze(module: nn.Module) -> nn.Module:
    """requires_grad off and eval mode: a frozen module (teacher, backbone) stays bit-identical."""
    module.requires_grad_(False)
    return module.eval()


def trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@torch.no_grad()
def classify_accuracy(model: nn.Module, split: SplitData, device, batch_size: int = 512,
                      key: str = "image") -> float:
    """Top-1 accuracy on `split`, sharded over the ranks (each evaluates its rows; the correct
    counts are summed), with one host sync at the end."""
    model.eval()
    rows = distributed.shard(split)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    for b in rows.batches(batch_size, device):
        correct += (model(b[key]).argmax(-1) == b["label"]).sum()
    total = distributed.all_sum(torch.stack([correct, torch.tensor(float(len(rows)), dtype=torch.float64,
                                                                       device=device)]))
    return float(total[0] / total[1].clamp_min(1))


def classify_confusion(model: nn.Module, split: SplitData, num_classes: int, device, batch_size: int = 512,
                       key: str = "image") -> torch.Tensor:
    """The (num_classes, num_classes) confusion counts on `split` (`metrics.confusion`), sharded
    over the ranks and summed, on the CPU; its diagonal over its sum is the top-1 accuracy."""
    model.eval()
    counts = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    with torch.no_grad():
        for b in distributed.shard(split).batches(batch_size, device):
            counts += confusion_counts(model(b[key]).argmax(-1), b["label"], num_classes)
    return distributed.all_sum(counts).cpu()


def accuracy_of(confusion: torch.Tensor) -> float:
    return float(confusion.diagonal().sum() / confusion.sum().clamp_min(1))


class Method(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[Section]] = Section
    defaults: ClassVar[dict] = {}
    # Preset name -> a config layer ({"train": ..., "method": ...}) stating each value the presets
    # differ in once; the Config's `preset` field names the one used (its default is the preset
    # the built-in dataset needs). It lies below every other layer (`config.resolve`), so YAML
    # and overrides change single keys of it. A method with presets keeps `defaults` empty.
    presets: ClassVar[dict[str, dict]] = {}
    stages: ClassVar[tuple[str, ...]] = ("train",)
    metric: ClassVar[str] = "val_acc"
    mode: ClassVar[str] = "max"
    test_metric: ClassVar[str] = "test_acc"
    default_dataset: ClassVar[str] = "digits"
    search_space: ClassVar[dict[str, dict]] = {}
    required_columns: ClassVar[tuple[str, ...]] = ("image", "label")
    export_input: ClassVar[str] = "image"       # the column the exported model takes
    # `make demo`: this method's overrides, and runs (method, overrides) it needs first, e.g. a
    # backbone registered by another method.
    demo_overrides: ClassVar[list[str]] = []
    demo_prerequisites: ClassVar[list[tuple[str, list[str]]]] = []
    # The baseline `make demo` shows next to this method, on the same task: its name and the
    # overrides (added to `demo_overrides`) that turn this method into it; None for a baseline.
    demo_baseline: ClassVar[tuple[str, list[str]] | None] = None
    # The `method.*` fields that name a pretrained model to load (models:/, runs:/, a checkpoint
    # or a file; "" and "scratch" load nothing): preflight checks each exists before Ray starts.
    pretrained_fields: ClassVar[tuple[str, ...]] = ()
    # Overrides that make a run take seconds (tests, `make demo --quick`); also smoke-tested.
    smoke_overrides: ClassVar[list[str]] = ["train.epochs=1"]
    # The `train.optimizer` values `build_optimizers` honours; a config asking for another fails
    # when it is resolved (before Ray starts) instead of training with something else.
    optimizers: ClassVar[tuple[str, ...]] = ("adam", "adamw", "sgd")
    loaders: ClassVar[tuple[str, ...]] = ("memory", "stream")      # the data.loader values it runs with
    # DDP: set True where some trainable parameters get no gradient in some steps.
    find_unused_parameters: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, data: DataBundle):
        self.cfg = cfg
        self.mcfg = cfg.method
        self.data = data

    # -- what the method must provide ----------------------------------------------------------

    @abstractmethod
    def build_models(self, stage: str, previous: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The models of `stage`; `previous` holds the models of the stage before (unwrapped)."""

    @abstractmethod
    def train_step(self, stage: str, models: dict[str, nn.Module], optimizers: dict, batch: Batch,
                   ctx: StepContext) -> dict[str, torch.Tensor]:
        """One step on `batch`: forward, backward, optimizer step(s). Returns detached losses."""

    @abstractmethod
    def evaluate(self, stage: str, models: dict[str, nn.Module], split: str, device) -> dict[str, float]:
        """Metrics on `split` ("val" or "test"), keys prefixed with the split name. Called on
        every rank with identical models: evaluate `distributed.shard(...)` of the split and
        reduce sums and counts (`distributed.all_sum`), so the result is the global one and equals
        a single-rank evaluation."""

    # -- defaults that most methods keep --------------------------------------------------------

    @classmethod
    def required_columns_for(cls, info: DatasetInfo) -> tuple[str, ...]:
        """Columns the driver checks before launching; override when they depend on the dataset
        (e.g. one column per modality listed in its metadata)."""
        return cls.required_columns

    @classmethod
    def pretrained_problem(cls, cfg: RunConfig, info: DatasetInfo, field: str, model: nn.Module, spec: dict,
                           images: torch.Tensor) -> str | None:
        """What makes the model that `method.<field>` names unfit for a run of `cfg` on dataset
        `info`, as a phrase after the field and its URI ("does not take ...", "predicts 10 classes
        ..."), or None. `images` (2, C, H, W): two val images, decoded as the run decodes them.
        By default whether the model takes them. Preflight asks before Ray starts
        (`launch.check_pretrained`); a method whose models need more (a class count, an
        architecture) says so here and asks it again where it builds them."""
        return forward_problem(model, images)[0]

    @classmethod
    def epochs_by_stage(cls, cfg: RunConfig) -> dict[str, int]:
        """Epochs of each stage, in stage order, from the resolved config alone (no data), so the
        driver knows a run's length before it starts (`sweep.final_stage_epochs`). train.epochs for every
        stage unless a method's stages have lengths of their own (a teacher, a pretune stage);
        0 skips a stage."""
        return {stage: cfg.train.epochs for stage in cls.stages}

    def stage_epochs(self, stage: str) -> int:
        return self.epochs_by_stage(self.cfg)[stage]

    @classmethod
    def train_source(cls, cfg: RunConfig, stage: str) -> str:
        """What `stage` trains on: "train" (the dataset's train split) or "table:<name>" (a side
        table). From the config alone: with `data.loader=stream` the driver streams the sources
        of the stages that run (`launch.stream_dataset`)."""
        return "train"

    def train_split(self, stage: str) -> SplitData | None:
        """The rows `stage` trains on, held in memory (its `train_source`); None with
        `data.loader=stream`, where the loop streams that source instead."""
        source = self.train_source(self.cfg, stage)
        if source.startswith("table:"):
            return self.data.table_split(source.removeprefix("table:"))
        return self.data.splits.get(source)

    def split_batches(self, split: str, batch_size: int, device) -> Iterator[Batch]:
        """This rank's shard of `split` in batches on `device`: from memory, or with
        `data.loader=stream` (where the train split is not in memory) one pass over the rank's
        streamed shard of it."""
        if split not in self.data.splits and self.data.stream is not None:
            decoders = self.data.decoders(split)
            return (decode_batch(b, decoders) for b in self.data.stream(split, batch_size, device))
        return distributed.shard(self.data.splits[split]).batches(batch_size, device)

    def build_optimizers(self, stage: str, models: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        return {"opt": make_optimizer(params, self.cfg.train)}

    def build_schedulers(self, stage: str, optimizers: dict, steps_per_epoch: int) -> dict:
        return {}

    def on_epoch_start(self, stage: str, models: dict[str, nn.Module], ctx: StepContext) -> dict[str, Any]:
        """Called on every rank before each epoch; returns params to record (e.g. a mined subset)."""
        return {}

    def epoch_artifacts(self, stage: str, epoch: int) -> dict[str, Any]:
        """Rank 0 only (so nothing collective in it), after each epoch: {"file.png": matplotlib
        Figure, "file.csv": str} to log. A chart of the model keeps its few CPU rows at the test
        evaluation, which every rank runs (e.g. `Toast.token_masks`)."""
        return {}

    confusion: torch.Tensor | None = None      # a classifier's last test confusion counts (K, K)

    def confusion_artifact(self, stage: str, epoch: int) -> dict[str, Any]:
        """The chart of `confusion` after the final epoch of the last stage (a classifier's
        diagnostic: which classes it confuses)."""
        if stage != self.stages[-1] or epoch != self.stage_epochs(stage) - 1 or self.confusion is None:
            return {}
        classes = [str(c) for c in self.data.info.meta.get("classes", range(self.data.info.num_classes))]
        return {"confusion_test.png": confusion_chart(self.confusion, classes,
                                                      f"{self.name}, {self.data.info.name}, test")}

    @abstractmethod
    def export(self, models: dict[str, nn.Module]) -> tuple[nn.Module, dict]:
        """The model to register and its spec ({"arch", "kwargs"}), from the final stage's models."""

    def example_input(self) -> Any:
        """Two rows of the exported column as the dataset stores them (numpy): the served model's
        raw input (`models.serving`), its MLflow input example."""
        return self.data.splits["val"].tensors[self.export_input][:2].numpy()

    def export_input_doc(self) -> dict:
        """The raw input the registered model takes (dtype, shape, scale, range, normalization)."""
        return input_doc(self.data.info, self.export_input, self.data.normalize)

    def state_dict(self) -> dict:
        """The method's own state that must survive a resume (running windows, mined sets)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
