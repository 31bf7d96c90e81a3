"""The capacity preflight: a run the cluster cannot place is refused before it exists, unless
`scaling.wait_for_nodes_s` lets an autoscaler bring the nodes first. The node that "the
autoscaler" adds here is a real Ray node joining a real two-node cluster during the wait."""

from __future__ import annotations

import threading
import time

import pytest

from methodlab.config import load_config
from methodlab.errors import ConfigError
from methodlab.train.launch import check_capacity


@pytest.mark.slow
def test_the_wait_ends_in_a_one_line_refusal_when_no_node_comes(ray_cluster, home, capsys):
    cfg = load_config("supervised", None, ["scaling.num_workers=8", "scaling.wait_for_nodes_s=1.5"])
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        check_capacity(cfg)
    assert time.monotonic() - t0 >= 1.5
    message = str(refused.value)
    assert "\n" not in message
    assert "scaling.num_workers=8 x scaling.cpus_per_worker=0.5 needs 4 CPUs but the cluster has 2" in message
    assert "after waiting scaling.wait_for_nodes_s=1.5" in message and "max_workers" in message
    assert "asking the autoscaler and waiting up to 1.5s" in capsys.readouterr().out


def test_scaling_does_not_change_the_run_name():
    """A run may resume on another cluster: how it runs is not what it trains."""
    plain = load_config("supervised", None, [])
    for other in (["scaling.wait_for_nodes_s=900"], ["scaling.num_workers=3"], ["scaling.use_gpu=true"],
                  ["scaling.placement_strategy=STRICT_SPREAD", "scaling.cpus_per_worker=2"]):
        assert load_config("supervised", None, other).run_name == plain.run_name, other
    assert plain.run_name != load_config("supervised", None, ["train.lr=0.5"]).run_name


@pytest.mark.slow
def test_a_node_joining_during_the_wait_lets_the_run_through(home, capsys):
    import ray
    from ray.cluster_utils import Cluster

    # A two-node cluster of its own: the session's Ray stops here; the next test that needs
    # it starts it again (the ray_cluster fixture).
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        ray.init(address=cluster.address)
        overrides = ["scaling.num_workers=2", "scaling.cpus_per_worker=1"]
        with pytest.raises(ConfigError, match="needs 2 CPUs but the cluster has 1; .* set scaling.wait_for_nodes_s"):
            check_capacity(load_config("supervised", None, overrides))

        cfg = load_config("supervised", None, [*overrides, "scaling.wait_for_nodes_s=120"])
        outcome: list[BaseException | None] = []

        def preflight():
            try:
                check_capacity(cfg)       # returns once the node has joined
                outcome.append(None)
            except BaseException as e:                     # noqa: BLE001 (re-raised below)
                outcome.append(e)

        waiting = threading.Thread(target=preflight)
        t0 = time.monotonic()
        waiting.start()
        time.sleep(2.0)
        assert waiting.is_alive(), outcome
        cluster.add_node(num_cpus=2)                       # (Ray starts nodes from the main thread only)
        waiting.join(timeout=120)
        waited = time.monotonic() - t0
        assert not waiting.is_alive() and outcome == [None], outcome
        assert 2.0 <= waited < 120
        assert ray.cluster_resources()["CPU"] == 3
        assert "needs 2 CPUs but the cluster has 1; asking the autoscaler" in capsys.readouterr().out
    finally:
        ray.shutdown()
        cluster.shutdown()
