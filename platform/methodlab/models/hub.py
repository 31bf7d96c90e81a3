"""Load a pretrained model from wherever the platform keeps one, always with weights_only loads.

    load_pretrained("models:/methodlab-supervised@candidate")     # the MLflow registry
    load_pretrained("runs:/<mlflow-run-id>")                      # a run's latest checkpoint
    load_pretrained(".methodlab/runs/<run>/checkpoint_...")       # a checkpoint directory (or s3://)
    load_pretrained("backbone.pt")                                # a file from `save_pretrained`

Every form resolves to a spec (`{"arch", "kwargs"}`, rebuilt from the model registry) and a plain
state dict, so no pickled code is ever executed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch
from torch import nn

from methodlab import storage
from methodlab.errors import ConfigError
from methodlab.models import build_model


def save_pretrained(model: nn.Module, spec: dict, path: str) -> None:
    torch.save({"spec": spec, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def _from_payload(payload: dict, source: str) -> tuple[nn.Module, dict]:
    if not isinstance(payload, dict) or "spec" not in payload or "state_dict" not in payload:
        raise ConfigError(f"{source} holds no methodlab model (expected a spec and a state dict)")
    model = build_model(payload["spec"])
    model.load_state_dict(payload["state_dict"])
    return model, payload["spec"]


@contextlib.contextmanager
def _refusing(source: str):
    """A file that is missing, unpicklable or foreign as one line (the loads are weights-only)."""
    try:
        yield
    except FileNotFoundError:
        raise ConfigError(f"model file {source} does not exist") from None
    except Exception as e:  # noqa: BLE001 — an unpicklable or foreign file: refuse, one line
        raise ConfigError(f"{source} is not a weights-only methodlab model file "
                          f"({type(e).__name__}); refusing to load it") from None


def _load_file(path: str, source: str) -> dict:
    with _refusing(source):
        return torch.load(path, map_location="cpu", weights_only=True)


def _from_checkpoint(uri: str) -> tuple[nn.Module, dict]:
    from methodlab.train.core import STATE_FILE, read_exported

    with tempfile.TemporaryDirectory() as tmp:
        local = uri
        if storage.is_s3(uri):
            storage.download_dir(uri, tmp)
            local = tmp
        with _refusing(f"{uri}/{STATE_FILE}"):
            exported = read_exported(local)
    if not exported:
        raise ConfigError(f"checkpoint {uri} is from before the final stage; use a later checkpoint")
    return _from_payload(exported, uri)


def latest_checkpoint(root: str) -> str:
    """The newest checkpoint_* directory of a run's storage directory."""
    ckpts = [name for name, is_dir in storage.listdir(root) if is_dir and name.startswith("checkpoint_")]
    if not ckpts:
        raise ConfigError(f"run storage {root} has no checkpoint yet")
    return f"{root.rstrip('/')}/{ckpts[-1]}"


def load_pretrained(uri: str, tracking_uri: str | None = None, field: str = "model",
                    data_normalized: bool = False) -> tuple[nn.Module, dict]:
    """(model, spec) for a models:/ URI, a runs:/ URI, a checkpoint directory or a model file.

    A model that standardizes its own input (an imported timm/torchvision one carries
    `input_mean`/`input_std`) must get the decoded [0, 1] images, not a dataset standardized
    already: with `data_normalized` (data.normalize=true) it is refused, naming `field`."""
    model, spec = _load(uri, tracking_uri)
    kwargs = spec.get("kwargs", {})
    mean = kwargs.get("vit", kwargs).get("input_mean")
    if data_normalized and mean:
        raise ConfigError(f"{field} {uri} standardizes its input itself (mean {mean}); set data.normalize=false")
    return model, spec


def _load(uri: str, tracking_uri: str | None) -> tuple[nn.Module, dict]:
    if uri.startswith(("models:/", "runs:/")):
        from methodlab.config import TrackingConfig, default_tracking_uri
        from methodlab.tracking import CHECKPOINT_ROOT_TAG, Tracker

        cfg_uri = tracking_uri or default_tracking_uri()
        tracker = Tracker(cfg_uri, TrackingConfig().experiment)
        if uri.startswith("runs:/"):
            run_id = uri[len("runs:/"):].strip("/")
            try:
                root = tracker.client.get_run(run_id).data.tags[CHECKPOINT_ROOT_TAG]
            except Exception:  # noqa: BLE001 — unknown run id or a run methodlab did not start
                raise ConfigError(f"{uri}: no methodlab run with that id in {cfg_uri}") from None
            return _from_checkpoint(latest_checkpoint(root))
        with tempfile.TemporaryDirectory() as tmp:
            spec, weights = tracker.download_model_files(uri, tmp)
            return _from_payload({"spec": spec, "state_dict": _load_file(weights, uri)}, uri)
    if storage.is_s3(uri) or os.path.isdir(uri):
        return _from_checkpoint(uri)
    return _from_payload(_load_file(uri, uri), uri)
