"""One exception hierarchy for premoe.

Every error a user can cause (bad path, unsupported model, wrong store, bad option) is a
`PremoeError` whose message says what is wrong and how to fix it, in one line. The CLI prints
that line and exits with `exit_code`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PremoeError(Exception):
    """Base class of every user-facing premoe error."""

    exit_code: int = 1


class UsageError(PremoeError):
    """An option or argument has a value that cannot work (keep < top-k, bad budget...)."""

    exit_code = 2


class ModelNotFoundError(PremoeError):
    """The model path or hub id does not resolve to a local checkpoint."""


class UnsupportedArchitectureError(PremoeError):
    """The model's `model_type` has no entry in the architecture registry."""


class CheckpointError(PremoeError):
    """A checkpoint is unreadable: missing shard, corrupt index, missing tensor."""


class KeepSetError(UsageError):
    """Keep sets that cannot be applied to this model (ids out of range, too few, groups)."""


class StoreError(PremoeError):
    """A pattern store is missing, corrupt or inconsistent."""


class StoreMismatchError(StoreError):
    """A pattern store was made for a different model."""


class CorpusError(PremoeError):
    """A task corpus is missing, empty or malformed."""


class OutputExistsError(UsageError):
    """The output folder exists and overwriting was not asked for."""


class OutputError(PremoeError):
    """An output location cannot be written: read-only, under a file, full, or busy."""


class UnsafeOutputError(UsageError):
    """The output is, contains or lies inside an input, or is not a folder premoe wrote."""
