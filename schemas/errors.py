"""Errors a user can cause. Each message is one line naming the file and the fix.

One root, :class:`SatsegError`; subclasses also inherit the matching builtin so
callers can catch either. The CLI prints the message without a traceback and
exits with status 2.
"""

from __future__ import annotations

__all__ = [
    "SatsegError",
    "InputFileError",
    "SpecError",
    "CheckpointError",
    "MismatchError",
    "OutputConflictError",
    "ClusterError",
    "JobNotFoundError",
    "ScenesFailedError",
    "user_error",
]


class SatsegError(Exception):
    """Raised for any problem the user can fix (bad file, bad spec, mismatch)."""


class InputFileError(SatsegError, OSError):
    """Raised when an input raster is missing, unreadable or lacks a band."""


class SpecError(SatsegError, ValueError):
    """Raised when a job or schedule file, or a command-line value, is invalid."""


class CheckpointError(SatsegError, ValueError):
    """Raised when a checkpoint is missing, corrupt, or does not fit the data."""


class MismatchError(SatsegError, ValueError):
    """Raised when a label raster or mask does not line up with its image."""


class OutputConflictError(SatsegError, FileExistsError):
    """Raised when an output folder already holds another job's results."""


class ClusterError(SatsegError, ConnectionError):
    """Raised when no Ray cluster answers at an address, or a local head cannot be started or stopped."""


class JobNotFoundError(SatsegError, LookupError):
    """Raised when a cluster has no job with the given id."""


class ScenesFailedError(SatsegError, RuntimeError):
    """Raised at the end of a job when several of its scenes failed (each is marked failed in its state)."""


def user_error(err: BaseException | None) -> SatsegError | None:
    """The user error behind ``err`` (also when Ray wrapped it in a task error), or None for any other failure."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, SatsegError) and not type(err).__name__.startswith("RayTaskError"):
            return err
        err = getattr(err, "cause", None) or err.__cause__
        seen += 1
    return None
