"""The real stack: cluster and infra configs (fast), preflight one-liners (fast), and an end-to-end
run through `ray job submit` against the local stack of infra/local (slow).

The end-to-end test brings the stack up on free ports in a private directory with its own HOME,
submits jobs/train.py, checks what landed in S3 and in the MLflow server, stops a running job and
looks for orphans, resubmits to resume, and tears the stack down in a fixture finalizer, so a
failing check never leaves services behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.listeners import listening, off_loopback
from tests.localstack import PORT_NAMES, Stack, free_ports, stack_env, wait_for
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLUSTERS = ROOT / "clusters"
KUBERAY = CLUSTERS / "kuberay"
MANIFESTS = [KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"]


def _pyproject_deps() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _pinned(prefix: str) -> str:
    """The version pyproject pins for a dependency (`ray[...]==2.60.0` -> 2.60.0)."""
    dep = next(d for d in _pyproject_deps() if re.match(rf"{prefix}(\[|==)", d))
    return dep.split("==")[1]


def _makefile_torch() -> str:
    return re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _walk(node, key: str):
    """Every value stored under `key` anywhere in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


# ----------------------------------------------------------------------------------------------
# clusters/aws.yaml


def test_aws_config_validates_against_the_schema_inside_ray():
    import jsonschema

    spec = importlib.util.find_spec("ray")
    schema_file = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_file.read_text())
    config = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())
    jsonschema.validate(config, schema)

    broken = json.loads(json.dumps(config))
    broken["available_node_types"]["head.cpu"]["resources"] = {"CPU": 0.5}   # must be an integer
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    del broken["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)

    # Ray's own checks on top of the schema (node type references, worker bounds).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_aws_config_cpu_head_gpu_workers_pinned_install_and_no_keys():
    text = (CLUSTERS / "aws.yaml").read_text()
    config = yaml.safe_load(text)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu = {k: t for k, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu, "no GPU worker node type"
    for name, t in gpu.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
        assert t["node_config"]["InstanceType"].startswith(("g", "p")), name
    # Every node type gets an instance profile; no credential or key material anywhere.
    for name, t in types.items():
        assert "IamInstanceProfile" in t["node_config"], name
        assert "KeyName" not in t["node_config"], name
    assert not re.search(r"aws_access_key_id|aws_secret_access_key|AKIA[0-9A-Z]{16}|ssh_private_key", text, re.I)

    # Setup installs the package with the Makefile's torch pin on every node type.
    torch_pin = f'torch=={_makefile_torch()}'
    for name, t in types.items():
        commands = t.get("worker_setup_commands") or (
            config["setup_commands"] + (config["head_setup_commands"] if name == config["head_node_type"]
                                        else config["worker_setup_commands"]))
        joined = "\n".join(commands)
        assert torch_pin in joined and "pip install -q -e ~/methodlab" in joined, name
        assert "/methodlab/ray-auth-token" in joined, name     # the Ray token, from SSM via the role
    assert config["file_mounts"]["~/methodlab"] == "."
    assert {".git", ".venv", ".methodlab"} <= set(config["rsync_exclude"])
    # Token auth on for every Ray process; the job server on the head's loopback only.
    for cmd in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]


# ----------------------------------------------------------------------------------------------
# clusters/kuberay


def test_every_manifest_image_is_pinned_and_matches_the_pinned_ray():
    ray_version = _pinned("ray")
    images = [img for path in MANIFESTS for doc in _docs(path) for img in _walk(doc, "image")]
    assert len(images) >= 5
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image
        if name.endswith("rayproject/ray"):
            assert tag.startswith(f"{ray_version}-"), image
    for path in MANIFESTS:
        for doc in _docs(path):
            for version in _walk(doc, "rayVersion"):
                assert version == ray_version, path


def _ray_containers(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_manifests_request_gpus_and_keep_token_auth_on():
    for path in MANIFESTS:
        doc = next(d for d in _docs(path) if d["kind"] in ("RayCluster", "RayJob"))
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for group in spec["workerGroupSpecs"]:
            for c in group["template"]["spec"]["containers"]:
                for kind in ("requests", "limits"):
                    assert int(c["resources"][kind]["nvidia.com/gpu"]) >= 1, (path, group["groupName"])
        for c in _ray_containers(doc):
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", path
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], path   # never a literal token
        assert not re.search(r"aws_secret_access_key|AKIA[0-9A-Z]{16}", path.read_text(), re.I)


def test_rayjob_entrypoint_config_and_runtime_env_exist_and_agree():
    from methodlab.config import load_config

    job = next(d for d in _docs(KUBERAY / "rayjob.yaml") if d["kind"] == "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"] and (ROOT / argv[1]).is_file()
    method, rest = argv[2], argv[3:]
    config_file = rest[rest.index("-c") + 1]
    assert (ROOT / config_file).is_file()
    overrides = [a for a in rest if "=" in a]
    # The entrypoint's arguments are a valid run config (keys and values), checked without Ray.
    cfg = load_config(method, str(ROOT / config_file), overrides)
    assert cfg.scaling.use_gpu and cfg.storage.path.startswith("s3://")

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    shared = yaml.safe_load((KUBERAY / "runtime-env.yaml").read_text())
    assert runtime_env["pip"] == shared["pip"] and runtime_env["env_vars"] == shared["env_vars"]
    # The pip list is pyproject's dependencies with the same pins, Ray (from the image) excepted,
    # plus torch at the Makefile's pin.
    packages = shared["pip"]["packages"]
    expected = [d for d in _pyproject_deps() if not d.startswith(("ray", "torch"))]
    assert sorted(p for p in packages if not p.startswith("torch")) == sorted(expected)
    assert f"torch=={_makefile_torch()}" in packages


def test_cluster_docs_name_files_that_exist():
    """Every repo path the cluster files tell users to run or pass exists."""
    for path in [CLUSTERS / "aws.yaml", *MANIFESTS, KUBERAY / "runtime-env.yaml"]:
        for ref in set(re.findall(r"(?:jobs|clusters|infra)/[\w./-]+\.(?:py|yaml|yml|md)", path.read_text())):
            assert (ROOT / ref).is_file(), f"{path.name} mentions {ref}"


# ----------------------------------------------------------------------------------------------
# infra/docker-compose.yml


def test_compose_pins_images_binds_ports_and_takes_secrets_from_env():
    text = (ROOT / "infra" / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow"} <= set(services)
    for name, svc in services.items():
        image = svc["image"]
        tag = image.rpartition(":")[2]
        assert ":" in image and tag not in ("", "latest"), name
        for port in svc.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    assert "ports" not in services["postgres"]
    assert "mlflow" in services["mlflow"]["command"] and "--serve-artifacts" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "mc mb" in services["minio-init"]["command"][0]
    # No literal secret: every password/secret value is a ${...} reference, and every variable the
    # file uses is documented in .env.example.
    for svc in services.values():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET", key):
                assert str(value).startswith("${"), key
    used = set(re.findall(r"\$\{(\w+)", text))
    documented = set(re.findall(r"^(\w+)=", (ROOT / "infra" / ".env.example").read_text(), re.M))
    assert used <= documented, used - documented
    mlflow_image = (ROOT / "infra" / "mlflow" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+:v\d+\.\d+\.\d+$", mlflow_image, re.M)
    assert _pinned("mlflow") in mlflow_image


# ----------------------------------------------------------------------------------------------
# Preflight through the job entry point: one line, non-zero, before Ray


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env.update(METHODLAB_HOME=str(tmp_path / "home"), HOME=str(tmp_path), AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", RAY_AUTH_MODE="disabled")
    return env


@pytest.mark.parametrize("service", ["s3", "tracking"])
def test_job_entry_point_refuses_unreachable_services_in_one_line(tmp_path, service):
    port = _closed_port()
    args = {"s3": ["storage.path=s3://methodlab/runs", f"storage.endpoint_url=http://127.0.0.1:{port}"],
            "tracking": [f"tracking.uri=http://127.0.0.1:{port}"]}[service]
    expected = {"s3": f"error: S3 endpoint http://127.0.0.1:{port} is unreachable for s3://methodlab/runs",
                "tracking": f"error: MLflow tracking server http://127.0.0.1:{port} is unreachable"}[service]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "jobs/train.py", "supervised", *args], cwd=ROOT, env=_job_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    # Preflight ran before Ray: no session directory, no run, no checkpoints.
    assert not (tmp_path / "home" / "runs").exists()
    assert time.monotonic() - t0 < 300


# ----------------------------------------------------------------------------------------------
# infra/local: refusals that start nothing


def test_stack_up_refuses_busy_or_clashing_ports_in_one_line(tmp_path):
    script = ROOT / "infra" / "local" / "stack.py"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = dict(zip(PORT_NAMES, free_ports(6)))
        ports["MLFLOW"] = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, str(script), "up"], env=stack_env(tmp_path / "stack", ports, tmp_path),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: port(s) in use: 127.0.0.1:{ports['MLFLOW']} (mlflow); stop what holds "
                                   "them or set METHODLAB_STACK_*_PORT (see infra/local/stack.py)")
    assert not list((tmp_path / "stack").glob("*.pid"))

    ports = dict(zip(PORT_NAMES, free_ports(6)), DASHBOARD=15000)
    proc = subprocess.run([sys.executable, str(script), "up"], env=stack_env(tmp_path / "s2", ports, tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: port(s) dashboard=15000 fall in Ray's worker port range 10002-19999; pick others")


def test_stack_down_stops_only_the_stack_never_its_caller(tmp_path):
    """A shell that exported METHODLAB_STACK_DIR (as `up` tells it to) runs `down`: the shell, its
    other children and `down` itself carry the stack's directory but are not the stack's."""
    (tmp_path / "stack").mkdir()
    script = ROOT / "infra" / "local" / "stack.py"
    shell = (f"sleep 120 & child=$!; {shlex.quote(sys.executable)} {shlex.quote(str(script))} down; rc=$?; "
             "kill -0 $child && echo child-alive; kill $child; echo shell-alive; exit $rc")
    proc = subprocess.run(["bash", "-c", shell], env={**os.environ, "METHODLAB_STACK_DIR": str(tmp_path / "stack")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "child-alive" in proc.stdout and "shell-alive" in proc.stdout
    assert "ray (not running)" in proc.stdout


# ----------------------------------------------------------------------------------------------
# End to end: infra/local stack + ray job submit


@pytest.fixture(scope="module")
def stack():
    import ray

    # One Ray instance per machine, as in production: the session's local Ray stops here (and
    # starts again for the tests after this module), so the stack's Ray never shares the
    # machine's ports and 2 CPUs with another instance.
    ray.shutdown()
    s = Stack()
    sessions: list[int] = []
    try:
        up = s.script("up.sh")
        sessions = s.sessions()
        assert up.returncode == 0, up.stderr[-3000:]
        yield s, up.stdout
    finally:
        sessions = sessions or s.sessions()
        down = s.script("down.sh", timeout=180)
        alive = [p for sid in sessions for p in s.mod.session_members(sid)] + s.leftovers()
        shutil.rmtree(s.dir, ignore_errors=True)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not alive, f"processes survived stack-down: {alive}"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ray_job_submit_against_the_local_stack(stack, monkeypatch):
    s, up_out = stack
    t0 = time.monotonic()

    def phase(what: str) -> None:      # shown when the test fails, and with -s
        print(f"[e2e {time.monotonic() - t0:6.1f}s] {what}", flush=True)

    # What `make stack-up` prints: the three URLs and the exports, never the token or the keys.
    for name in ("DASHBOARD", "MLFLOW", "S3"):
        assert s.url(name) in up_out
    assert "RAY_AUTH_MODE=token" in up_out and f"RAY_AUTH_TOKEN_PATH={s.token_file}" in up_out
    assert s.token_file.read_text().strip() not in up_out and s.mod.LOCAL_SECRET not in up_out
    assert oct(s.token_file.stat().st_mode & 0o777) == "0o600"
    # Idempotent: a second `up` keeps what runs.
    again = s.script("up.sh")
    assert again.returncode == 0 and "already running" in again.stdout, again.stderr[-2000:]
    # Token auth is on: the job server refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{s.url('DASHBOARD')}/api/jobs/", timeout=10)
    assert refused.value.code == 401

    tracking = s.url("MLFLOW")
    common = ["data.limit_rows=256", "train.batch_size=32", "scaling.num_workers=2", "storage.path=s3://methodlab/runs",
              f"tracking.uri={tracking}", "train.run_name=e2e", "tracking.registered_model=e2e-model"]

    # 1. A long job: stop it once its first checkpoint is in S3; nothing of it may survive.
    first = s.submit("e2e-first", [*common, "train.epochs=200"], wait=False)
    assert first.returncode == 0, first.stderr[-1500:] + s.diagnose()
    phase("submitted e2e-first")

    def checkpointed():
        status = s.job_status("e2e-first")
        assert status in ("PENDING", "RUNNING"), f"job e2e-first is {status} before it was stopped"
        return [k for k in s.keys("methodlab", "runs/e2e/checkpoint_") if k.endswith("/state.pt")]

    wait_for(checkpointed, 420, "the first checkpoint in s3://methodlab/runs/e2e/", poll=0.5)
    assert s.job_status("e2e-first") == "RUNNING"
    # While a job trains (its driver, controller and workers up), every listener of the stack,
    # Ray's included, is on loopback, but one: torch's c10d TCPStore, which rank 0 serves for the
    # process group, binds the wildcard address whatever MASTER_ADDR says (torch has no option
    # for its listen address; README, "What survives what").
    exposed = {addr: s.mod._cmdline(pid)[:100]
               for addr, pid in off_loopback([p for sid in s.sessions() for p in s.mod.session_members(sid)]).items()}
    store = {addr: cmd for addr, cmd in exposed.items() if addr[0] in ("::", "0.0.0.0") and "RayTrainWorker" in cmd}
    assert len(store) <= 1 and exposed == store, exposed
    phase("first checkpoint in S3; stopping e2e-first")
    stop = subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", s.url("DASHBOARD"), "e2e-first"],
                          env=s.client_env(), capture_output=True, text=True, timeout=180)
    assert stop.returncode == 0, stop.stderr[-2000:]
    wait_for(lambda: s.job_status("e2e-first") == "STOPPED", 120, "job e2e-first to be STOPPED")
    orphans = r"RayTrainWorker|TrainController|jobs/train\.py"
    wait_for(lambda: not s.processes(orphans), 90, "the stopped job's driver and workers to exit")
    assert not s.processes(orphans)
    # ... and its placement group (the workers' CPUs) is released.
    wait_for(lambda: not [p for p in s.placement_groups() if p["state"] != "REMOVED"], 90,
          "the stopped job's placement group to be removed")
    phase("e2e-first stopped, no orphans")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("methodlab")
    runs = client.search_runs([experiment.experiment_id], "tags.`methodlab.run_name` = 'e2e'")
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    logged = [m.step for m in client.get_metric_history(run_id, "val_acc")]
    assert logged, "the stopped job logged no epoch"
    # 2. The same run name again (with fewer epochs than the stopped config: a different config
    # fingerprint, but the explicit run name picks the run) resumes from the S3 checkpoint.
    epochs = max(logged) + 3     # the checkpoint is at most one epoch ahead of MLflow: >= 1 epoch left
    second = s.submit("e2e-second", [*common, f"train.epochs={epochs}"], wait=True)
    out = second.stdout + second.stderr
    phase(f"e2e-second finished (rc {second.returncode}, {epochs} epochs)")
    assert second.returncode == 0, out[-3000:] + s.diagnose()
    assert re.search(r"\[e2e\] resumed at stage train, epoch \d+", out), out[-4000:]
    assert f"[e2e] resuming with other values than it started with: train.epochs={epochs}" in out
    assert "e2e: test_acc=" in out and "registered e2e-model v1" in out and run_id in out
    # The job log carries the epoch lines, not Ray Train's per-report metric dicts from every
    # worker or MLflow's download bars from registering the model.
    assert "train epoch" in out
    assert "Reporting training result" not in out and "Downloading artifacts" not in out, out[-3000:]

    # Checkpoints: in the bucket, as Ray Train wrote them.
    keys = s.keys("methodlab", "runs/e2e/")
    assert any(k.endswith("/state.pt") for k in keys) and "runs/e2e/checkpoint_manager_snapshot.json" in keys

    # The MLflow run: the same one, finished, with the run's params and per-epoch metrics, each
    # epoch logged once.
    runs = client.search_runs([experiment.experiment_id], "tags.`methodlab.run_name` = 'e2e'")
    assert [r.info.run_id for r in runs] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.run_name"] == "e2e" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["storage.path"] == "s3://methodlab/runs"
    assert run.data.params["train.epochs"] == "200"              # as it started; the tag says how it ended
    assert run.data.tags["methodlab.resumed_with"] == f"train.epochs={epochs}"
    assert {"val_acc", "test_acc", "train_loss"} <= set(run.data.metrics)
    steps = [m.step for m in client.get_metric_history(run_id, "val_acc")]
    assert sorted(steps) == list(range(epochs))

    # The registered model version: from this run, its files in the MLflow bucket on S3.
    version = client.get_model_version_by_alias("e2e-model", "candidate")
    assert version.run_id == run_id and version.source.startswith("models:/m-")
    model_id = version.source.split("/")[1]
    assert client.get_logged_model(model_id).artifact_location.startswith("mlflow-artifacts:/")
    artifacts = [k for k in s.keys("mlflow", "artifacts/") if model_id in k]
    assert any(k.endswith("/MLmodel") for k in artifacts) and any(k.endswith("/weights.pt") for k in artifacts)

    # And the hub loads it back (weights-only), through the server and from the S3 checkpoint.
    for key, value in s.s3_env().items():
        monkeypatch.setenv(key, value)
    from methodlab import storage
    from methodlab.models.hub import load_pretrained

    storage.configure(None)
    registered, spec = load_pretrained("models:/e2e-model@candidate", tracking)
    from_checkpoint, _ = load_pretrained(f"runs:/{run_id}", tracking)
    for (k, a), (_, b) in zip(registered.state_dict().items(), from_checkpoint.state_dict().items()):
        assert a.shape == b.shape, k
    assert spec["arch"] == "cnn"
    phase("checked S3, MLflow and the hub")


def _listening_ports(pids: list[int]) -> dict[int, int]:
    """{port: pid} of the TCP sockets these processes listen on."""
    return {port: pid for (_, port), pid in listening(pids).items()}


@pytest.mark.slow
@pytest.mark.load
@pytest.mark.timeout(1800)
def test_three_jobs_and_a_16_trial_sweep_share_the_2_cpu_stack(stack):
    """Load: three `ray job submit` runs and a 16-trial sweep at once on the stack's 2 CPUs. They
    queue for CPUs and all finish, each in its own MLflow run and checkpoint prefix, and leave no
    process or listening port behind."""
    s, _ = stack
    t0 = time.monotonic()
    stack_pids = lambda: [p for sid in s.sessions() for p in s.mod.session_members(sid)]  # noqa: E731
    job_like = r"RayTrainWorker|TrainController|_Inner|ImplicitFunc|run_trial|jobs/(train|sweep)\.py"
    # Wait out whatever an earlier test left running, then note the ports Ray's own services hold.
    wait_for(lambda: not s.processes(job_like), 120, "an idle stack before the load test")
    stack_before = stack_pids()
    ports_before = _listening_ports(stack_before)

    tracking = s.url("MLFLOW")
    where = ["storage.path=s3://methodlab/load", f"tracking.uri={tracking}", "tracking.experiment=load",
             "data.limit_rows=256", "train.batch_size=32"]
    jobs = [f"load-{i}" for i in range(3)]
    for name in jobs:
        sub = s.submit(name, [*where, "train.epochs=2", "scaling.num_workers=2", f"train.run_name={name}",
                              "tracking.register_model=false"], wait=False)
        assert sub.returncode == 0, sub.stderr[-1500:] + s.diagnose()
    sweep = s.submit("load-sweep", ["-c", "jobs/sweeps/supervised.yaml", "name=load-sweep", "search.num_samples=16",
                                    "search.scheduler.type=fifo", "train.epochs=1", "scaling.num_workers=1",
                                    "tracking.register_model=false", *where],
                     wait=False, job="sweep")
    assert sweep.returncode == 0, sweep.stderr[-1500:] + s.diagnose()

    def all_done():
        states = {j: s.job_status(j) for j in [*jobs, "load-sweep"]}
        failed = {j: st for j, st in states.items() if st in ("FAILED", "STOPPED")}
        assert not failed, f"jobs ended badly: {failed}\n" + "\n".join(s.job_logs(j)[-2500:] for j in failed)
        return all(st == "SUCCEEDED" for st in states.values())

    wait_for(all_done, 1500, "three jobs and the sweep to succeed", poll=2)
    print(f"[load] all four jobs succeeded after {time.monotonic() - t0:.0f}s", flush=True)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("load")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_name = {r.data.tags.get("methodlab.run_name"): r for r in runs}
    # Separate runs: one per job, one parent and 16 children for the sweep, all FINISHED.
    assert all(by_name[j].info.status == "FINISHED" for j in jobs)
    assert len({by_name[j].info.run_id for j in jobs}) == 3
    parent = next(r for r in runs if r.data.tags.get("methodlab.sweep") == "true")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 16 and all(r.info.status == "FINISHED" for r in children)
    assert len(runs) == 3 + 1 + 16
    # No checkpoint collisions: every run has its own prefix, and each checkpoint there is its own.
    roots = [r.data.tags["methodlab.checkpoint_root"] for r in [*(by_name[j] for j in jobs), *children]]
    assert len(set(roots)) == 19
    from methodlab.config import from_dict

    for run in [*(by_name[j] for j in jobs), *children]:
        name, root = run.data.tags["methodlab.run_name"], run.data.tags["methodlab.checkpoint_root"]
        assert root.startswith("s3://methodlab/load/"), root
        prefix = root[len("s3://methodlab/"):].rstrip("/") + "/"
        configs = [k for k in s.keys("methodlab", prefix) if "/checkpoint_" in k and k.endswith("/config.yaml")]
        assert configs, f"no checkpoint of {name} under {root}"
        for key in configs:
            saved = yaml.safe_load(s.s3().get_object(Bucket="methodlab", Key=key)["Body"].read())
            assert from_dict(saved).run_name == name, f"{key} holds a checkpoint of another run"
    # Nothing left behind: no driver, controller or worker, no placement group, no new listener.
    wait_for(lambda: not s.processes(job_like), 120, "the jobs' processes to exit")
    wait_for(lambda: not [p for p in s.placement_groups() if p["state"] != "REMOVED"], 120,
          "every placement group to be removed")
    # A listener may only belong to a process that was there before the jobs (Ray's services open
    # some ports lazily), to Ray's idle worker pool, or to one of Ray's cluster-wide internal actors
    # (`ray::_...`, started once on first use): none to anything a job started.
    pids_before = set(ports_before.values()) | set(stack_before)
    ray_owned = lambda pid: (pid in pids_before or s.mod._cmdline(pid).startswith(("ray::IDLE", "ray::_")))  # noqa: E731
    leaked = {port: s.mod._cmdline(pid)[:100] for port, pid in _listening_ports(stack_pids()).items()
              if port not in ports_before and not ray_owned(pid)}
    assert not leaked, f"listening ports left behind: {leaked}"
