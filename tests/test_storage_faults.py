"""S3 goes away mid-run (a real S3-compatible server, moto, stopped and started again on the same
port; it keeps its objects in memory, like an outage of a real endpoint). The checkpoint upload
retries, then the run fails with one line that names the checkpoint kept on local disk, and
`methodlab train ... resume` picks that checkpoint up once S3 is back."""

from __future__ import annotations

import threading
import time

import pytest

from methodlab import storage
from methodlab.cli import main
from methodlab.train.core import LoopState
from methodlab.tracking import Tracker
from tests.conftest import epochs_logged

# The endpoint is stopped ~0.2 s after the first checkpoint lands; the run must still be training
# then. An epoch here is ~0.2 s, so 20 epochs leave a wide margin on a loaded CI machine.
EPOCHS = 20
RUN = "s3-outage"


class StoppableS3:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._server_class = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = self._server_class(ip_address="127.0.0.1", port=self.port)
        self.server.start()


@pytest.fixture()
def s3():
    server = StoppableS3()
    yield server
    server.stop()


def _state_keys(client, bucket: str) -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"runs/{RUN}/checkpoint_")
    return [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith("/state.pt")]


@pytest.mark.slow
@pytest.mark.faults      # an external fault against a real run: make test-faults
def test_s3_outage_keeps_the_checkpoint_locally_and_resume_picks_it_up(ray_cluster, home, s3, capsys):
    settings = storage.S3Settings(s3.endpoint, "us-east-1")
    client = storage.s3_client(settings)
    client.create_bucket(Bucket="ckpt")
    argv = ["train", "supervised", f"train.epochs={EPOCHS}", "train.batch_size=64", "data.limit_rows=512",
            "scaling.num_workers=2", f"train.run_name={RUN}", "storage.path=s3://ckpt/runs",
            f"storage.endpoint_url={s3.endpoint}", "storage.region=us-east-1"]

    codes: list[int] = []
    first = threading.Thread(target=lambda: codes.append(main(argv)))
    first.start()
    deadline = time.monotonic() + 240
    while not _state_keys(client, "ckpt"):
        assert first.is_alive() and time.monotonic() < deadline, "no checkpoint reached S3"
        time.sleep(0.2)
    uploaded = len(_state_keys(client, "ckpt"))
    s3.stop()                                    # the endpoint goes away mid-run
    first.join(timeout=300)
    assert not first.is_alive() and codes == [4]
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]   # (Ray's logs too)
    # Rank 0's background upload meets the outage (or the controller writing its checkpoint list
    # does). Either way the line names the local copy and the fix.
    assert len(err) == 1 and err[0].startswith("error: run s3-outage failed: "), err
    local = home / "checkpoints" / RUN
    assert f"the latest at {local}; if S3 went away, run the same command with `resume`" in err[0], err
    kept = LoopState.load(local)
    # Newer than anything S3 got. Uploads are asynchronous, so training may even have reached its
    # last epoch before Ray stopped the workers; that final state is then the local copy (and
    # nothing was registered: the run waits for its uploads first).
    assert uploaded <= kept.history_step <= EPOCHS
    tracker = Tracker(f"sqlite:///{home}/mlflow.db", "methodlab")
    run = tracker.find_run(RUN)
    assert run.status == "FAILED"
    assert "methodlab.registered_version" not in tracker.client.get_run(run.run_id).data.tags
    deadline = time.monotonic() + 60       # the failed run gives its CPUs back
    while ray_cluster.available_resources().get("CPU", 0) < 1.99 and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"[s3-outage] CPUs free again after {60 - (deadline - time.monotonic()):.1f}s", flush=True)
    assert ray_cluster.available_resources().get("CPU", 0) == pytest.approx(2.0, abs=0.01)

    # While S3 is still down, `resume` refuses in one line before any training.
    assert main([*argv, "resume"]) == 3
    assert f"S3 endpoint {s3.endpoint} is unreachable" in capsys.readouterr().err

    s3.start()
    assert main([*argv, "resume"]) == 0
    out = capsys.readouterr().out
    assert f"[{RUN}] resumed at stage train, epoch {kept.history_step + 1}," in out
    finished = tracker.client.get_run(run.run_id)
    assert finished.info.status == "FINISHED" and "test_acc" in finished.data.metrics
    assert epochs_logged(tracker.client, run.run_id) == list(range(1, EPOCHS + 1))   # every epoch once, none lost, none twice
    assert not local.exists()                          # done: the S3 copy is final
    # The recovered checkpoint sits next to Ray's, and Ray's latest is the final epoch.
    assert client.list_objects_v2(Bucket="ckpt", Prefix=f"runs/{RUN}/recovered/state.pt")["KeyCount"] == 1


def test_resume_without_a_local_checkpoint_is_one_line(home, capsys):
    s3 = StoppableS3()
    try:
        storage.s3_client(storage.S3Settings(s3.endpoint, "us-east-1")).create_bucket(Bucket="empty")
        code = main(["train", "supervised", "train.run_name=never-ran", "storage.path=s3://empty/runs",
                     f"storage.endpoint_url={s3.endpoint}", "resume"])
    finally:
        s3.stop()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1
    assert f"no local checkpoint of run never-ran in {home / 'checkpoints' / 'never-ran'}" in err[0]
    assert not (home / "checkpoints").exists()
