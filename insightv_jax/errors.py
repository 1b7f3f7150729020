"""User-facing errors: each message is one line naming the thing and the reason.

The CLI prints `error: <message>` and exits 1 for any `InsightVError`; other
exceptions are bugs and keep their traceback.
"""


class InsightVError(Exception):
    """Bad input from the user: a file, a record, a config or a checkpoint."""


class CheckpointError(InsightVError):
    """A checkpoint or Hugging Face folder is missing, truncated or inconsistent."""


class DataError(InsightVError):
    """A dataset file or record is malformed."""
