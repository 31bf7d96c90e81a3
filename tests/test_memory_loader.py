"""The memory loader holds each split once per node (Ray's object store), and data.loader=auto
picks it when the splits fit the per-node budget (data.memory_budget_mb), stream otherwise."""

from __future__ import annotations

import json
import os

import pytest

from methodlab.config import load_config
from methodlab.data import resolve_dataset

SPLITS = ["train", "val", "test"]


def _mapping_of(address: int) -> str:
    """The /proc/self/maps path of the mapping that holds `address` ('' for anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    return ""


def _report_tensors(loop_config: dict) -> None:
    """A Ray Train worker: load the bundle as train_worker does and write, per tensor, where its
    memory lives."""
    import ray.train

    from methodlab.config import from_dict
    from methodlab.data.dataset import open_dataset
    from methodlab.train.core import load_bundle

    cfg = from_dict(loop_config["config"])
    bundle = load_bundle(cfg, open_dataset(loop_config["dataset_uri"]), SPLITS, loop_config["shared"])
    found = {f"{split}.{k}": _mapping_of(t.data_ptr()) for split, data in bundle.splits.items()
             for k, t in data.tensors.items()}
    sums = {f"{split}.{k}": float(t.double().sum()) for split, data in bundle.splits.items()
            for k, t in data.tensors.items()}
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(loop_config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"maps": found, "sums": sums, "node": ray.get_runtime_context().get_node_id()}, f)


def _run_reporting_workers(cfg, info, out) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from methodlab.data.shared import put_splits

    shared = put_splits(cfg, info, SPLITS)
    TorchTrainer(_report_tensors, train_loop_config={"config": cfg.model_dump(mode="json"), "dataset_uri": info.uri,
                                                     "shared": shared, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2,
                                              resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
                 run_config=RunConfig(storage_path=str(out / "ray"), name="shared-views")).fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _assert_shared_views(ranks: list[dict]) -> None:
    for found in ranks:
        assert set(found["maps"]) == {f"{s}.{k}" for s in SPLITS for k in ("image", "label")}
        for name, mapping in found["maps"].items():
            # A private copy (np.require, .contiguous()) would be anonymous heap memory.
            assert "plasma" in mapping or mapping.startswith("/dev/shm"), (name, mapping)


@pytest.mark.slow
def test_two_workers_view_the_same_shared_memory_not_private_copies(ray_cluster, home, tmp_path):
    cfg = load_config("supervised", None, ["data.loader=memory", "scaling.cpus_per_worker=0.5"])
    _assert_shared_views(_run_reporting_workers(cfg, resolve_dataset("digits", cfg.data.root), tmp_path))


@pytest.mark.slow
def test_on_two_nodes_each_worker_maps_its_own_nodes_copy(home, tmp_path):
    """Placement: one worker per node of a two-node cluster started here; each maps the split
    from its own node's object store (Ray copies it across once per node) and sees the same rows."""
    import ray
    from ray.cluster_utils import Cluster

    # A cluster of its own (as tests/test_capacity.py): the session's Ray stops here, and the
    # next test that needs it starts it again (the ray_cluster fixture).
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cfg = load_config("supervised", None, ["data.loader=memory", "scaling.cpus_per_worker=1"])
        ranks = _run_reporting_workers(cfg, resolve_dataset("digits", cfg.data.root), tmp_path)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert ranks[0]["node"] != ranks[1]["node"], "both workers ran on one node"
    _assert_shared_views(ranks)
    assert ranks[0]["sums"] == ranks[1]["sums"]


def test_auto_picks_memory_when_the_splits_fit_and_stream_under_a_tiny_budget(ray_cluster, home):
    from methodlab.train.launch import choose_loader

    auto = load_config("supervised", None, [])
    info = resolve_dataset("digits", auto.data.root)
    assert auto.data.loader == "auto"
    # auto hashes as memory, so run names derived before auto existed stay valid
    assert auto.run_name == load_config("supervised", None, ["data.loader=memory"]).run_name

    chosen, why = choose_loader(auto, info)
    assert chosen.data.loader == "memory" and chosen.run_name == auto.run_name
    assert why.startswith("memory (train+val+test ") and " fit " in why and "object store per node" in why

    tiny = load_config("supervised", None, ["data.memory_budget_mb=0.01"])
    chosen, why = choose_loader(tiny, info)
    assert chosen.data.loader == "stream" and " exceed " in why and "data.memory_budget_mb=0.01" in why
    # the budget decides where data lives, not what is trained: same name, pinned on the shipped config
    assert tiny.run_name == auto.run_name == chosen.run_name


def test_auto_over_budget_refuses_a_method_that_cannot_stream(home):
    from methodlab.errors import DataError
    from methodlab.train.launch import choose_loader

    cfg = load_config("d3gzsl", None, ["data.memory_budget_mb=0.01"])      # explicit: no Ray needed
    with pytest.raises(DataError, match="data.loader=auto: .* d3gzsl trains from memory only: raise data.memory_budget_mb"):
        choose_loader(cfg, resolve_dataset("digits_gzsl", cfg.data.root))


def test_a_run_auto_sent_to_stream_is_found_again_under_auto():
    """A run logs the loader auto chose (the shipped config); submitted again under `auto` it is
    the same run, whichever loader that was, while an explicit other loader is a change."""
    from methodlab.tracking import RunRecord, flatten_params
    from methodlab.train.launch import changed_values

    streamed = load_config("supervised", None, ["data.loader=stream", "train.run_name=same"])
    logged = RunRecord("r", "FINISHED", {}, flatten_params(streamed.model_dump(mode="json")), {})
    assert changed_values(load_config("supervised", None, ["train.run_name=same"]), logged) == {}
    assert changed_values(load_config("supervised", None, ["data.loader=memory", "train.run_name=same"]),
                          logged) == {"data.loader": "memory"}
