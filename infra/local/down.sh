#!/usr/bin/env bash
# Stop everything infra/local/up.sh started (each service's whole process group, Ray's workers
# included). Logs, the token and the MLflow database stay under .methodlab/stack.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec "${METHODLAB_PYTHON:-$root/.venv/bin/python}" "$root/infra/local/stack.py" down
