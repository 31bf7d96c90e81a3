"""Credentials out of everything methodlab writes: MLflow params, saved configs, printed configs.

Credentials belong in the environment (AWS_*, MLFLOW_TRACKING_*), but a URI can still carry one,
e.g. `tracking.uri=postgresql://user:pw@db/mlflow`.
"""

from __future__ import annotations

import re

# Keys whose values are secrets whatever they hold.
SECRET_KEY = re.compile(r"(secret|passw(or)?d|token|credential|access[_-]?key|api[_-]?key|private[_-]?key)", re.I)
URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.I)
REDACTED = "***"


def redact_value(value: str) -> str:
    """Strip passwords out of URIs such as postgresql://user:pw@host/db (in any text)."""
    return URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
