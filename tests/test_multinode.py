"""Two Ray nodes on this machine: the local stack's head (infra/local) and a node joined with
`stack.py add-node`, every Ray process running a Python in which methodlab is *not* installed
(`bare_python`), as on a `rayproject/ray` image. Jobs go through `ray job submit`; the driver
imports methodlab from the uploaded working dir and ships it to the workers (`py_modules`).

One test, in phases, because each phase needs the cluster the one before left:
  1. one node: the reference run (both workers on the head);
  2. a second node joins; runs that would keep state on one node's disk (a SQLite tracking URI,
     a local storage.path) are refused in one line before any worker starts;
  3. the same run with its two workers on different nodes (STRICT_SPREAD) equals the reference;
  4. again, and the second node is lost after the first checkpoint: the job fails, the run is
     FAILED and its checkpoints are in S3; a node joins again, the resubmitted run resumes and its
     final weights equal the reference's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest
import torch

from tests.conftest import epochs_logged
from tests.localstack import ROOT, Stack, bare_python, machine_address, wait_for

EPOCHS = 40


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import ray

    host = machine_address()
    if host is None:
        pytest.skip("this machine has no non-loopback address, and Ray joins no node to a loopback-only head")
    # One Ray instance per machine, as in production (see tests/test_stack.py).
    ray.shutdown()
    s = Stack(ray_python=bare_python(tmp_path_factory.mktemp("bare") / "venv"), host=host)
    try:
        up = s.script("up.sh")
        assert up.returncode == 0, up.stderr[-3000:]
        yield s
    finally:
        down = s.script("down.sh", timeout=180)
        leftovers = s.leftovers()
        shutil.rmtree(s.dir, ignore_errors=True)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not leftovers, f"processes survived stack-down: {leftovers}"


def _weights(s: Stack, model: str, monkeypatch) -> dict[str, torch.Tensor]:
    from methodlab import storage
    from methodlab.models.hub import load_pretrained

    for key, value in s.s3_env().items():
        monkeypatch.setenv(key, value)
    storage.configure(None)
    net, _ = load_pretrained(f"models:/{model}@candidate", s.url("MLFLOW"))
    return net.state_dict()


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_two_nodes_uninstalled_workers_refusals_placement_and_node_loss(stack, monkeypatch):
    s = stack
    t0 = time.monotonic()

    def phase(what: str) -> None:
        print(f"[two-node {time.monotonic() - t0:6.1f}s] {what}", flush=True)

    common = ["data.limit_rows=256", "train.batch_size=32", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
              f"train.epochs={EPOCHS}", "storage.path=s3://methodlab/runs", "data.root=s3://methodlab/data",
              f"tracking.uri={s.url('MLFLOW')}"]

    def run(name: str, *extra: str, wait: bool = True):
        submission = f"{name}-{time.monotonic_ns()}"
        proc = s.submit(submission, [*common, f"train.run_name={name}", f"tracking.registered_model={name}-model",
                                     *extra], wait=wait)
        proc.submission = submission
        return proc

    # 1. One node.
    assert len(s.alive_nodes()) == 1
    started = time.monotonic()
    ref = run("ref")
    one_node_s = time.monotonic() - started
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-3000:] + s.diagnose()
    assert "registered ref-model v1" in ref.stdout
    # Provenance travels with the job (`methodlab submit`): the working dir on the cluster has no .git.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=s.url("MLFLOW"))
    experiment = client.get_experiment_by_name("methodlab")
    [record] = client.search_runs([experiment.experiment_id], "tags.`methodlab.run_name` = 'ref'")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert record.data.tags["git_commit"] == head and record.data.tags["git_dirty"] in ("true", "false")
    phase(f"reference on one node: {one_node_s:.1f}s")

    # 2. Two nodes: node-local services are refused before any worker starts.
    s.add_node(cpus=2, resources={"second_node": 1})
    wait_for(lambda: len(s.alive_nodes()) == 2, 120, "the second node to join")
    assert sorted(n["resources_total"].get("second_node", 0) for n in s.alive_nodes()) == [0, 1]
    workers_before = len(s.actors("RayTrainWorker"))
    for bad, expected in [
        (["tracking.uri=sqlite:////tmp/methodlab-two-node.db"],
         "error: tracking.uri=sqlite:////tmp/methodlab-two-node.db: the cluster has 2 nodes, and each would have its "
         "own copy of this store; use a tracking server every node reaches"),
        (["storage.path=/tmp/methodlab-two-node-runs"],
         "error: storage.path=/tmp/methodlab-two-node-runs: the cluster has 2 nodes, and each would have its own "
         "directory; use shared storage (storage.path=s3://bucket/runs)"),
    ]:
        refused = run("refused", *bad)
        assert refused.returncode != 0
        out = s.job_logs(refused.submission)      # (`ray job submit` prints the log twice)
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(expected), out[-3000:]
        assert "Traceback" not in out
    assert len(s.actors("RayTrainWorker")) == workers_before, "a refused run started workers"
    phase("node-local services refused")

    # 3. The same run spread over both nodes equals the reference.
    spread = ["scaling.placement_strategy=STRICT_SPREAD"]
    started = time.monotonic()
    two = run("spread", *spread)
    two_node_s = time.monotonic() - started
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:] + s.diagnose()
    nodes = {a["node_id"] for a in s.actors("RayTrainWorker") if a.get("node_id")}
    assert len(nodes) == 2, f"the workers ran on {len(nodes)} node(s)"
    reference = _weights(s, "ref-model", monkeypatch)
    for k, v in _weights(s, "spread-model", monkeypatch).items():
        assert torch.equal(v, reference[k]), k
    phase(f"two-node run equals the reference: {two_node_s:.1f}s, {two_node_s / one_node_s:.2f}x one node")

    # 4. Lose the second node after the first checkpoint; resume on a new one.
    lost = run("lost", *spread, wait=False)
    assert lost.returncode == 0, lost.stderr[-2000:]
    submission = lost.submission
    # A checkpoint to resume from is one whose manifest is written (last) and that Ray Train has
    # recorded in its snapshot; one still uploading when the node goes is rightly not used.
    wait_for(lambda: "runs/lost/checkpoint_manager_snapshot.json" in s.keys("methodlab", "runs/lost/")
             and [k for k in s.keys("methodlab", "runs/lost/checkpoint_") if k.endswith("/manifest.json")], 300,
             "the first complete checkpoint of run lost in S3")
    s.stop_node("node1")
    wait_for(lambda: s.job_status(submission) in ("FAILED", "SUCCEEDED", "STOPPED"), 300, "the job to end")
    assert s.job_status(submission) == "FAILED", s.job_logs(submission)[-3000:]
    # The driver's own lines, without what Ray forwards from the workers' and controller's stderr
    # ("(RayTrainWorker pid=...) Traceback ...").
    own = [ln for ln in s.job_logs(submission).splitlines() if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=", ln)]
    assert sum(ln.startswith("error: run lost failed") for ln in own) == 1, own[-40:]
    assert not any("Traceback" in ln for ln in own), own[-40:]
    phase("node lost; the job failed in one line")

    [record] = client.search_runs([experiment.experiment_id], "tags.`methodlab.run_name` = 'lost'")
    assert record.info.status == "FAILED"

    s.add_node(cpus=2, resources={"second_node": 1})
    wait_for(lambda: len(s.alive_nodes()) == 2, 120, "a new second node to join")
    again = run("lost", *spread)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:] + s.diagnose()
    assert "[lost] resumed at stage train, epoch" in out, \
        "\n".join(ln for ln in out.splitlines() if re.search(r"\[lost\]|checkpoint|moved|resum", ln))[-4000:]
    [record] = client.search_runs([experiment.experiment_id], "tags.`methodlab.run_name` = 'lost'")
    assert record.info.status == "FINISHED"
    assert epochs_logged(client, record.info.run_id) == list(range(1, EPOCHS + 1))
    for k, v in _weights(s, "lost-model", monkeypatch).items():
        assert torch.equal(v, reference[k]), k
    phase("resumed on a new node; final weights equal the reference")
