"""Credentials out of everything methodlab writes or shows: MLflow params, saved and printed
configs, and every user-facing error (`errors.MethodlabError` redacts its own message; the CLI
redacts the traceback of anything else).

Credentials belong in the environment (AWS_*, MLFLOW_TRACKING_*), but a URI can still carry one,
e.g. `tracking.uri=postgresql://user:pw@db/mlflow`, `s3://KEY:SECRET@bucket/x`, or a presigned
`...?X-Amz-Signature=...`.
"""

from __future__ import annotations

import re

# Keys whose values are secrets whatever they hold.
SECRET_KEY = re.compile(r"(secret|passw(or)?d|token|credential|access[_-]?key|api[_-]?key|private[_-]?key)", re.I)
URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.I)
# A query parameter of a URI whose name says it holds a secret (`?token=...`, `&X-Amz-Signature=...`).
SECRET_QUERY = re.compile(r"(?P<key>[?&][\w.-]*(" + SECRET_KEY.pattern + r"|signature|sig)[\w.-]*=)[^&#\s'\"]+", re.I)
REDACTED = "***"


def redact_value(value: str) -> str:
    """Mask the password of URIs such as postgresql://user:pw@host/db and the values of secret
    query parameters (in any text)."""
    value = URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
    return SECRET_QUERY.sub(lambda m: f"{m['key']}{REDACTED}", value)
