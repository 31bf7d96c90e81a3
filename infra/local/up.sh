#!/usr/bin/env bash
# Start the local stack (Ray head + job server, MLflow server, S3), wait until healthy, print the
# URLs and the exports a shell needs. Idempotent: what already runs is kept. See stack.py for ports.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec "${METHODLAB_PYTHON:-$root/.venv/bin/python}" "$root/infra/local/stack.py" up
