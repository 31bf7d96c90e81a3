# methodlab: two commands set everything up.
#   make demo   train the methods on built-in data (local Ray, MLflow on SQLite, local files)
#   make test   the test suite
# GPU machines: make demo TORCH_VERSION=2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
SHELL := /bin/bash
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
# The stamp records what was installed; it changes (and reinstalls) only when pyproject.toml
# or the torch pin changes, so a second `make demo` installs nothing.
STAMP := $(VENV)/.installed-torch$(TORCH_VERSION)-$(shell cat pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)

# The reference venv of the weights-import parity tests (tests/test_weights_import.py): timm and
# torchvision build the networks whose state dicts `methodlab models import` converts. They live
# apart from the main venv because PyPI's torchvision is a CUDA build that cannot import beside the
# CPU torch wheel (`operator torchvision::nms does not exist`), so they bring a torch of their own.
REF_VENV := .venv-ref
REF_PACKAGES ?= torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors==0.8.0
REF_STAMP := $(REF_VENV)/.installed-$(shell echo "$(REF_PACKAGES)" | cksum | cut -d' ' -f1)

# Ray: no usage stats. Tests and the demo train epochs of a fraction of a second, so their
# reports must not wait for Ray's health-check poll (methodlab's default is 1 s: launch.py).
export RAY_USAGE_STATS_ENABLED ?= 0
demo test test-fast test-load test-faults test-parity test-ui test-e2e: export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.1
export PYTHONUNBUFFERED := 1

.PHONY: setup reference-venv demo test test-fast test-load test-faults test-parity test-ui test-e2e bench report clean stack-up stack-down

setup: $(STAMP)

reference-venv: $(REF_STAMP)

$(REF_STAMP):
	@test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install -q $(REF_PACKAGES)
	@rm -f $(REF_VENV)/.installed-*
	@touch $@

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(VENV)/bin/methodlab demo

# The fault matrix, the end-to-end suites, the weights-import parity and the browser tests have
# targets of their own, so `make test` stays under 20 minutes on 2 CPUs; .ci/run runs all five.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not load and not faults and not parity and not ui and not e2e" --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not load and not faults and not parity and not ui and not e2e"

# Each external fault against a real run (tests/test_faults.py and the tests marked faults elsewhere: a killed or signalled sweep driver, a crashed worker, an S3 outage; ~8 min on 2 CPUs).
test-faults: setup
	$(PY) -m pytest -q -p no:cacheprovider -m faults --durations=10

# The end-to-end suites (marker e2e): a two-node cluster with a node lost, `ray job submit` against
# the local stack (MLflow server, S3 on moto), every streaming method through Ray Data, the console of a CLI run, quiet and --verbose (~12 min).
test-e2e: setup
	$(PY) -m pytest -q -p no:cacheprovider -m e2e --durations=10

# Imported timm / torchvision weights against the libraries' own logits (installs .venv-ref).
test-parity: setup reference-venv
	$(PY) -m pytest -q -p no:cacheprovider -m parity --durations=10

# The HTML report and the MLflow UI of a finished run, rendered in headless chromium (Debian's,
# installed here if missing; tests/test_ui.py, about 2 minutes on 2 CPUs).
test-ui: setup
	@which chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(PY) -m pytest -q -p no:cacheprovider -m ui --durations=10

# Three concurrent `ray job submit` runs and a 16-trial sweep on a private 2-CPU stack (~10 min).
test-load: setup
	$(PY) -m pytest -q -p no:cacheprovider -m load tests/test_stack.py

bench: setup
	$(PY) bench/run_all.py

# The HTML report from MLflow; the committed bench/results/*.json are first recorded as runs of
# experiment methodlab-bench (once per file content), so every figure comes from a run.
report: setup
	$(VENV)/bin/methodlab report

clean: stack-down
	rm -rf .methodlab .pytest_cache .hypothesis $(REF_VENV)

# The local stack (Ray head + job server, MLflow server, S3) on 127.0.0.1; see infra/README.md.
stack-up: setup
	infra/local/up.sh

stack-down:
	infra/local/down.sh
