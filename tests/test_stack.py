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

from tests.conftest import epochs_logged
from tests.listeners import listening, off_loopback
from tests.localstack import PORT_NAMES, Stack, free_ports, stack_env, wait_for
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLUSTERS = ROOT / "clusters"
KUBERAY = CLUSTERS / "kuberay"
RAY_MANIFESTS = [KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"]
MLFLOW_MANIFEST = KUBERAY / "mlflow.yaml"
MANIFESTS = [*RAY_MANIFESTS, MLFLOW_MANIFEST]
RAY_IMAGE_DOCKERFILE = ROOT / "infra" / "ray" / "Dockerfile"
MLFLOW_DOCKERFILE = ROOT / "infra" / "mlflow" / "Dockerfile"
SCHEMAS = ROOT / "tests" / "schemas"          # vendored KubeRay CRD schemas, see its README


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pyproject_deps() -> list[str]:
    return _pyproject()["dependencies"]


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


def _image_tags(dockerfile: Path) -> list[str]:
    """The image names a Dockerfile's header builds (`docker build ... -t NAME`): where the cluster
    configs' image names are defined."""
    return re.findall(r"^#.*docker build .*?-t (\S+)", dockerfile.read_text(), re.M)


def _ray_image(variant: str) -> str:
    """methodlab's Ray image, `cpu` or `gpu`, as infra/ray/Dockerfile names it."""
    return next(t for t in _image_tags(RAY_IMAGE_DOCKERFILE) if t.endswith(f"-{variant}"))


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (`5Gi`, `512Mi`, `2147483648`) in bytes."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(quantity)).groups()
    return int(number) * 1024 ** (["Ki", "Mi", "Gi", "Ti"].index(unit) + 1 if unit else 0)


def _copy(node):
    return json.loads(json.dumps(node))


# ----------------------------------------------------------------------------------------------
# clusters/aws.yaml

# Memory of the instance types aws.yaml uses, in GiB (AWS's instance type specifications).
INSTANCE_GIB = {"m6i.2xlarge": 32, "g5.xlarge": 16, "g5.12xlarge": 192}


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
    broken = json.loads(json.dumps(config))
    broken["available_node_types"]["gpu.1xA10G"]["docker"]["head_run_options"] = []  # not per node type
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)

    # Ray's own checks on top of the schema (node type references, worker bounds, docker images).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def _aws_node_docker(config: dict, name: str) -> tuple[str, list[str]]:
    """The image and `docker run` options a node type gets, merged the way Ray's launcher merges
    them (the node type's `docker` keys replace the global ones; `run_options` always apply)."""
    docker = config["docker"]
    if name == config["head_node_type"]:
        return docker["head_image"], docker["run_options"] + docker.get("head_run_options", [])
    merged = {**docker, **config["available_node_types"][name].get("docker", {})}
    return merged["worker_image"], merged["run_options"] + merged.get("worker_run_options", [])


def test_aws_config_cpu_head_gpu_workers_in_the_image_and_no_keys():
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

    # Every node runs methodlab's image (the GPU build where there are GPUs); nothing is installed
    # and no copy of the repo is mounted when a node starts: jobs bring the code.
    for name, t in types.items():
        image, options = _aws_node_docker(config, name)
        assert image == _ray_image("gpu" if t["resources"].get("GPU", 0) else "cpu"), name
        assert ("--gpus all" in options) == (name in gpu), name
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands") for c in config.get(key, [])]
    commands += [c for t in types.values() for c in t.get("worker_setup_commands", [])]
    assert not [c for c in commands if re.search(r"\b(pip|uv|conda)\b.*\binstall\b", c)]
    assert "." not in config.get("file_mounts", {}).values()
    # The Ray token, from SSM through the instance profile, on every node (the global setup
    # commands, which no node type overrides).
    assert not [n for n, t in types.items() if "worker_setup_commands" in t]
    assert "/methodlab/ray-auth-token" in "\n".join(config["setup_commands"])
    # Token auth on for every Ray process; the job server on the head's loopback only.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    for cmd in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]
    # Spot workers are reclaimed: the documented submission restarts the workers instead of
    # failing the run.
    if any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in types.values()):
        assert int(re.search(r"train\.max_failures=(\d+)", text).group(1)) > 0


def _aws_shm_and_region_problems(config: dict, text: str) -> list[str]:
    from ray._private.ray_constants import DEFAULT_OBJECT_STORE_MEMORY_PROPORTION

    problems = []
    for name, t in config["available_node_types"].items():
        gib = INSTANCE_GIB[t["node_config"]["InstanceType"]]
        sizes = [int(m) for o in _aws_node_docker(config, name)[1] for m in re.findall(r"--shm-size=(\d+)g$", o)]
        # Ray's object store takes this share of the node's memory and lives in /dev/shm.
        if len(sizes) != 1 or not DEFAULT_OBJECT_STORE_MEMORY_PROPORTION * gib <= sizes[0] < gib:
            problems.append(f"{name}: /dev/shm {sizes} GiB for {gib} GiB of memory")
    region = config["provider"]["region"]
    if f"--env AWS_DEFAULT_REGION={region}" not in config["docker"]["run_options"]:
        problems.append(f"no AWS_DEFAULT_REGION={region} in docker.run_options")
    others = set(re.findall(r"\b[a-z]{2}(?:-gov)?-[a-z]+-\d\b", text)) - {region}
    if others:
        problems.append(f"regions {sorted(others)} besides provider.region {region}")
    if not all(z.startswith(region) for z in config["provider"]["availability_zone"].split(",")):
        problems.append("availability zones outside provider.region")
    return problems


def test_aws_config_sizes_shm_for_the_object_store_and_takes_the_region_from_the_provider():
    text = (CLUSTERS / "aws.yaml").read_text()
    config = yaml.safe_load(text)
    assert _aws_shm_and_region_problems(config, text) == []

    small = _copy(config)
    small["available_node_types"]["gpu.4xA10G"]["docker"]["worker_run_options"] = ["--gpus all", "--shm-size=16g"]
    assert _aws_shm_and_region_problems(small, text)                    # 16 of 192 GiB
    moved = text.replace("region: us-west-2", "region: eu-west-1")
    assert _aws_shm_and_region_problems(yaml.safe_load(moved), moved)   # the env and zones still say us-west-2


# ----------------------------------------------------------------------------------------------
# infra/ray/Dockerfile: the image of every cluster node


def test_ray_image_bakes_in_pyprojects_dependencies_and_not_methodlab(tmp_path):
    text = RAY_IMAGE_DOCKERFILE.read_text()
    ray, version = _pinned("ray"), _pyproject()["version"]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["BASE_IMAGE"] == f"rayproject/ray:{ray}-py311-gpu" and re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert args["TORCH_VERSION"] == _makefile_torch()
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX"])
    # The CPU variant: the CPU Ray image and the CPU torch index.
    assert f"--build-arg BASE_IMAGE=rayproject/ray:{ray}-py311 " in text
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    name = "ghcr.io/OWNER/methodlab-ray"
    assert sorted(_image_tags(RAY_IMAGE_DOCKERFILE)) == [f"{name}:{version}-cpu", f"{name}:{version}-gpu"]

    # Only pyproject.toml and the script go in (the build context admits nothing else): methodlab
    # itself never does, and nothing installs it.
    sources = [s for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for s in line.split()]
    assert sorted(sources) == ["infra/ray/requirements.py", "pyproject.toml"]
    ignore = [ln for ln in (RAY_IMAGE_DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
              if ln and not ln.startswith("#")]
    assert ignore[0] == "*" and sorted(ignore[1:]) == [f"!{s}" for s in sorted(sources)]
    assert not re.search(r"pip install[^\n]*(\s-e\s|\s\.\s|methodlab)", text)
    assert 'pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in text
    assert "-r requirements.txt -c constraints.txt" in text and 'echo "torch==${TORCH_VERSION}" > constraints.txt' in text

    # What the image's pip installs after torch: pyproject's dependencies, torch left to the pin.
    script = str(RAY_IMAGE_DOCKERFILE.parent / "requirements.py")
    out = subprocess.run([sys.executable, script, str(ROOT / "pyproject.toml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [d for d in _pyproject_deps() if not d.startswith("torch")]
    # A base image with another Ray than the pin (this venv has the pin) is refused in one line.
    other = tmp_path / "pyproject.toml"
    other.write_text((ROOT / "pyproject.toml").read_text().replace(f"=={ray}\"", "==9.9.9\""))
    out = subprocess.run([sys.executable, script, str(other)], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: the base image has Ray") and len(out.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# clusters/kuberay


def test_every_manifest_image_is_pinned_and_matches_the_pinned_ray():
    ray_version = _pinned("ray")
    images = [img for path in MANIFESTS for doc in _docs(path) for img in _walk(doc, "image")]
    assert len(images) >= 7
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image
        if name.endswith("rayproject/ray"):
            assert tag.startswith(f"{ray_version}-"), image
    for path in RAY_MANIFESTS:
        for doc in _docs(path):
            for version in _walk(doc, "rayVersion"):
                assert version == ray_version, path
    # The Ray nodes run methodlab's image: the GPU build on the GPU workers, the CPU one on the head.
    for path in RAY_MANIFESTS:
        spec = _ray_spec(next(d for d in _docs(path) if d["kind"] in ("RayCluster", "RayJob")))
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
            assert c["image"] == _ray_image("cpu"), path
        for group in spec["workerGroupSpecs"]:
            for c in group["template"]["spec"]["containers"]:
                assert c["image"] == _ray_image("gpu"), (path, group["groupName"])
    # MLflow's: infra/ built the same server for the compose file (PostgreSQL the same release).
    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())["services"]
    mlflow_images = {c["name"]: c["image"] for cs in _walk(_docs(MLFLOW_MANIFEST), "containers") for c in cs}
    assert mlflow_images["postgres"] == compose["postgres"]["image"]
    assert mlflow_images["mlflow"] in _image_tags(MLFLOW_DOCKERFILE)
    assert mlflow_images["mlflow"].endswith(f":{_pinned('mlflow')}")


def _ray_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec", doc["spec"])


def _ray_groups(doc: dict) -> list[dict]:
    spec = _ray_spec(doc)
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _ray_containers(doc: dict) -> list[dict]:
    return [c for g in _ray_groups(doc) for c in g["template"]["spec"]["containers"]]


def _ray_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in RAY_MANIFESTS for d in _docs(p) if d["kind"] in ("RayCluster", "RayJob")]


def test_manifests_request_gpus_keep_token_auth_on_and_set_one_region():
    regions = set()
    for path, doc in _ray_docs():
        for group in _ray_spec(doc)["workerGroupSpecs"]:
            for c in group["template"]["spec"]["containers"]:
                for kind in ("requests", "limits"):
                    assert int(c["resources"][kind]["nvidia.com/gpu"]) >= 1, (path, group["groupName"])
        for c in _ray_containers(doc):
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", path
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], path   # never a literal token
            # Every Ray container knows the bucket's region (pyarrow would assume us-east-1).
            regions.add(env["AWS_DEFAULT_REGION"]["value"])
        assert not re.search(r"aws_secret_access_key|AKIA[0-9A-Z]{16}", path.read_text(), re.I)
    mlflow = next(d for d in _docs(MLFLOW_MANIFEST) if d["kind"] == "Deployment")
    regions |= {e["value"] for c in mlflow["spec"]["template"]["spec"]["containers"] for e in c["env"]
                if e["name"] == "AWS_DEFAULT_REGION"}
    assert len(regions) == 1 and re.fullmatch(r"[a-z]{2}-[a-z]+-\d", regions.pop())


def _shm_problems(doc: dict) -> list[str]:
    """Each Ray pod's /dev/shm: a memory-backed emptyDir that holds the object store Ray is told
    to use and fits in the pod's memory limit."""
    problems = []
    for group in _ray_groups(doc):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            empty_dir = volumes.get(mounts[0]["name"], {}).get("emptyDir", {}) if len(mounts) == 1 else {}
            store = int(group["rayStartParams"].get("object-store-memory", 0))
            if empty_dir.get("medium") != "Memory" or not 0 < store <= _bytes(empty_dir.get("sizeLimit", 0)) \
                    < _bytes(c["resources"]["limits"]["memory"]):
                problems.append(f"{group.get('groupName', 'head')}: /dev/shm {empty_dir}, object store {store}")
    return problems


def test_manifests_size_dev_shm_for_the_object_store():
    for path, doc in _ray_docs():
        assert _shm_problems(doc) == [], path
    _, doc = _ray_docs()[0]
    big_store = _copy(doc)
    big_store["spec"]["workerGroupSpecs"][0]["rayStartParams"]["object-store-memory"] = str(6 * 2**30)
    no_mount = _copy(doc)
    del no_mount["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    for broken in (big_store, no_mount):
        assert len(_shm_problems(broken)) == 1


def _strict(schema):
    """A CRD schema as `kubectl apply` enforces it (strict field validation, its default): an
    object that lists its properties takes no others, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


def _crd_schema(kind: str) -> dict:
    plural = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}[kind]
    return _strict(json.loads((SCHEMAS / f"{plural}.ray.io-v1.json").read_text()))


def _schema_errors(node: dict, schema: dict) -> list[str]:
    import jsonschema

    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(node)]


def test_manifests_validate_against_the_kuberay_crd_schemas():
    for path, doc in _ray_docs():
        assert doc["apiVersion"] == "ray.io/v1", path
        assert _schema_errors(doc, _crd_schema(doc["kind"])) == [], path

    _, cluster = _ray_docs()[0]
    schema = _crd_schema("RayCluster")
    typo = _copy(cluster)
    typo["spec"]["workerGroupSpec"] = typo["spec"].pop("workerGroupSpecs")        # unknown field
    wrong_type = _copy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    unnamed = _copy(cluster)
    del unnamed["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]   # required
    for broken in (typo, wrong_type, unnamed):
        assert len(_schema_errors(broken, schema)) == 1
    job = next(d for p, d in _ray_docs() if d["kind"] == "RayJob")
    bad_volume = _copy(job)
    bad_volume["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] = "3 GB"
    assert len(_schema_errors(bad_volume, _crd_schema("RayJob"))) == 1             # not a quantity


# What clusters/kuberay/mlflow.yaml may hold, with each kind's API version.
K8S_KINDS = {"ServiceAccount": "v1", "Service": "v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1"}


def _k8s_problems(docs: list[dict]) -> list[str]:
    """The structure `kubectl apply` and the controllers rely on: known kinds, pod templates valid
    against Kubernetes' PodTemplateSpec schema (as the KubeRay CRD embeds it), selectors that
    match, Services that reach a container port, pinned images, secrets only from Secrets."""
    pod_schema = _crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    problems = []
    workloads = [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet")]
    for d in docs:
        if K8S_KINDS.get(d.get("kind")) != d.get("apiVersion") or not d.get("metadata", {}).get("name"):
            problems.append(f"{d.get('kind')} {d.get('metadata')}: kind, apiVersion or name")
    for w in workloads:
        name, template = w["metadata"]["name"], w["spec"]["template"]
        problems += [f"{name}: {e}" for e in _schema_errors(template, pod_schema)]
        if not w["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items():
            problems.append(f"{name}: the selector does not select its own pods")
        for c in template["spec"]["containers"]:
            repository, _, tag = c["image"].rpartition(":")
            if not repository or tag in ("", "latest") or "/" in tag:
                problems.append(f"{name}: image {c['image']} is not pinned")
            defined = set()
            for e in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", e["name"]) and "secretKeyRef" not in e.get("valueFrom", {}):
                    problems.append(f"{name}: {e['name']} is not from a Secret")
                if set(re.findall(r"\$\((\w+)\)", e.get("value", ""))) - defined:
                    problems.append(f"{name}: {e['name']} uses a variable not defined before it")
                defined.add(e["name"])
    for svc in (d for d in docs if d.get("kind") == "Service"):
        selected = [w for w in workloads if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        if len(selected) != 1:
            problems.append(f"service {svc['metadata']['name']} selects {len(selected)} workloads")
            continue
        ports = [p for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
        for port in svc["spec"]["ports"]:
            if port["targetPort"] not in [p["containerPort"] for p in ports] + [p.get("name") for p in ports]:
                problems.append(f"service {svc['metadata']['name']}: no container port {port['targetPort']}")
    return problems


def _service_port(docs: list[dict], name: str) -> int:
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == name)
    return svc["spec"]["ports"][0]["port"]


def test_mlflow_manifest_serves_the_tracking_uri_the_ray_manifests_use():
    from urllib.parse import urlsplit

    docs = _docs(MLFLOW_MANIFEST)
    assert _k8s_problems(docs) == []
    server = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in server["env"]}
    # The backend store is the PostgreSQL Service (the compose file's backend), artifacts go to S3
    # through the server.
    backend = urlsplit(env["MLFLOW_BACKEND_STORE_URI"])
    assert backend.scheme == "postgresql" and backend.password == "$(POSTGRES_PASSWORD)"
    assert backend.port == _service_port(docs, backend.hostname)
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and "--serve-artifacts" in server["command"]
    # Every tracking.uri the Ray manifests give reaches the `mlflow` Service and passes the
    # server's Host check.
    allowed = server["command"][server["command"].index("--allowed-hosts") + 1].split(",")
    uris = {u for p in RAY_MANIFESTS for u in re.findall(r"tracking\.uri=(\S+)", p.read_text())}
    assert len(uris) == 1, uris
    uri = urlsplit(uris.pop())
    service, namespace, *_ = uri.hostname.split(".")
    assert uri.hostname == f"{service}.{namespace}.svc.cluster.local" and uri.port == _service_port(docs, service)
    assert uri.netloc in allowed

    selector = _copy(docs)
    selector[-1]["spec"]["selector"]["app.kubernetes.io/component"] = "mlflow-server"
    literal = _copy(docs)
    next(d for d in literal if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"][2] = \
        {"name": "POSTGRES_PASSWORD", "value": "hunter2"}
    unpinned = _copy(docs)
    next(d for d in unpinned if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["image"] = "postgres"
    unknown = _copy(docs)
    next(d for d in unknown if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paths"] = "/health"
    late = _copy(docs)
    next(d for d in late if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"].reverse()
    for broken in (selector, literal, unpinned, unknown, late):   # late: $(POSTGRES_PASSWORD) before it is set
        assert len(_k8s_problems(broken)) == 1


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
    # The entrypoint's arguments are a valid run config (keys and values), checked without Ray;
    # worker pods may be lost (spot nodes), so the workers restart from the last checkpoint.
    cfg = load_config(method, str(ROOT / config_file), overrides)
    assert cfg.scaling.use_gpu and cfg.storage.path.startswith("s3://") and cfg.train.max_failures > 0

    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    shared = yaml.safe_load((KUBERAY / "runtime-env.yaml").read_text())
    assert runtime_env["env_vars"] == shared["env_vars"]
    for env in (runtime_env, shared):
        # Ray's own validation of a runtime env (it would take an unknown key for a plugin's).
        RuntimeEnv(**env)
        assert set(env) <= RuntimeEnv.known_fields
        # Nothing is installed when a job starts: the image has the dependencies, the job the code.
        assert not {"pip", "uv", "conda", "container", "image_uri"} & set(env)
    with pytest.raises(TypeError):
        RuntimeEnv(**{**shared, "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": 0}})   # values are strings


def test_cluster_docs_name_files_that_exist():
    """Every repo path the cluster files tell users to run or pass exists."""
    for path in [CLUSTERS / "aws.yaml", *MANIFESTS, KUBERAY / "runtime-env.yaml", RAY_IMAGE_DOCKERFILE,
                 MLFLOW_DOCKERFILE]:
        for ref in set(re.findall(r"(?:jobs|clusters|infra)/[\w./-]+(?:\.(?:py|yaml|yml|md)|/Dockerfile)", path.read_text())):
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
@pytest.mark.e2e
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
    logged = epochs_logged(client, run_id)
    assert logged, "the stopped job logged no epoch"
    # 2. The same run name again (with fewer epochs than the stopped config: a different config
    # fingerprint, but the explicit run name picks the run) resumes from the S3 checkpoint.
    epochs = max(logged) + 2     # the checkpoint is at most one epoch ahead of MLflow: >= 1 epoch left
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
    assert epochs_logged(client, run_id) == list(range(1, epochs + 1))

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
