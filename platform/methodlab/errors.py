"""One error type for everything a user can get wrong.

Every `MethodlabError` is printed by the CLI as a single line (`error: <message>`) with a non-zero
exit, and is raised before any Ray resources are spent wherever the problem can be seen that early.
Its message is redacted when the error is made (`redact.redact_value`), so a URI with credentials
in it is masked wherever the error is shown: the CLI's line, a traceback, a log.
"""

from methodlab.redact import redact_value


class MethodlabError(Exception):
    """A user-facing error: the message names the field, file or service and the fix."""

    exit_code = 2

    def __init__(self, message: str = "", *args):
        super().__init__(redact_value(str(message)), *args)


class ConfigError(MethodlabError):
    """A config key, type or value is wrong."""


class DataError(MethodlabError):
    """A dataset is missing, corrupt, or does not match its schema."""


class ServiceError(MethodlabError):
    """S3, the tracking server or the Ray cluster cannot be reached or refused the request."""

    exit_code = 3


class TrainingError(MethodlabError):
    """Training stopped: a non-finite loss, or workers failed beyond `train.max_failures`."""

    exit_code = 4
