"""Credentials never reach logs, MLflow params, tags or artifacts; pickled code is never loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from methodlab.errors import ConfigError
from tests.conftest import FAKE_SECRET


class Exploit:
    """Unpickling this runs code: exactly what weights_only refuses."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_model_file_is_refused(tmp_path):
    from methodlab.models.hub import load_pretrained

    marker = tmp_path / "pwned"
    torch.save({"spec": {"arch": "cnn", "kwargs": {}}, "state_dict": Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="is not a weights-only methodlab model file"):
        load_pretrained(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_malicious_checkpoint_is_refused(tmp_path):
    from methodlab.train.core import LoopState

    marker = tmp_path / "pwned"
    (tmp_path / "ckpt").mkdir()
    torch.save({"stage_index": Exploit(marker)}, tmp_path / "ckpt" / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        LoopState.load(str(tmp_path / "ckpt"))
    assert not marker.exists()


@pytest.mark.slow
def test_no_credentials_in_logs_params_or_artifacts(ray_cluster, home, tmp_path):
    from methodlab.config import load_config
    from methodlab.tracking import Tracker
    from methodlab.train.launch import train

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET          # the cluster's workers have it too
    cfg = load_config("supervised", None, ["train.epochs=1", "train.run_name=secrets"])
    summary = train(cfg)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run = tracker.client.get_run(summary.run_id)
    texts = [str(run.data.params), str(run.data.tags), str(run.data.metrics)]
    artifacts = Path(tracker.client.download_artifacts(summary.run_id, "", str(tmp_path / "art")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    files += [p for p in Path(cfg.storage.path, "secrets").rglob("*") if p.is_file()]
    logs = Path(os.environ["RAY_TMPDIR"]) / "session_latest" / "logs"
    files += [p for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
    assert files, "nothing was scanned"
    for p in files:
        data = p.read_bytes()
        assert FAKE_SECRET.encode() not in data, f"secret found in {p}"
    for t in texts:
        assert FAKE_SECRET not in t
