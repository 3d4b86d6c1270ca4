"""Errors a user can cause. Each message is one line naming the file and the fix.

One root, :class:`SatsegError`; subclasses also inherit the matching builtin so
callers can catch either. The CLI prints the message without a traceback and
exits with status 2.
"""

from __future__ import annotations

import errno
import unicodedata

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
    "MachineError",
    "user_error",
    "first_line",
    "printable",
    "one_line",
]


def printable(text: str) -> str:
    """``text`` with control, format and line-separator characters escaped as Python writes them (``\\n``,
    ``\\u202e``): a path holding a newline or a right-to-left override stays one line and reads as it is."""
    return "".join(ch if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp") else ascii(ch)[1:-1] for ch in text)


class SatsegError(Exception):
    """Raised for any problem the user can fix (bad file, bad spec, mismatch).

    Its text is one line whatever it quotes: control and format characters (in a file name, say) are escaped.
    """

    def __str__(self) -> str:
        return printable(super().__str__())


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


class MachineError(SatsegError, OSError):
    """Raised when the machine refuses: a full disk, a read-only file system, no permission, no model actor left."""


_MACHINE_FIXES = {
    errno.ENOSPC: "free some space on the output's disk, then rerun the same command to resume",
    errno.EDQUOT: "free some space or raise the disk quota, then rerun the same command to resume",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.ENAMETOOLONG: "a name in that path is longer than the file system allows (255 bytes); choose a shorter one",
}


def _machine_error(err: BaseException) -> MachineError | None:
    """A failure of the machine as one user-facing line, or None when ``err`` is not one."""
    if isinstance(err, OSError) and err.errno in _MACHINE_FIXES:
        where = f"{err.filename}: " if err.filename is not None else ""
        return MachineError(f"{where}{err.strerror or first_line(err)}; {_MACHINE_FIXES[err.errno]}")
    if any(c.__name__ == "RayActorError" for c in type(err).__mro__):  # ActorDiedError and kin, from Ray
        return MachineError(
            f"a model actor died and exhausted its restarts ({first_line(err)[:200]}); rerun the same command to resume, "
            "and if it dies again give it more memory (smaller batch_size, fewer num_actors)"
        )
    return None


def user_error(err: BaseException | None) -> SatsegError | None:
    """The user error behind ``err`` (also when Ray wrapped it in a task error), or None for any other failure.

    A failure of the machine (disk full, read-only, permissions, a model actor dead beyond its restarts) counts:
    the user can fix it, and it deserves one line, not a traceback.
    """
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, SatsegError) and not type(err).__name__.startswith("RayTaskError"):
            return err
        machine = _machine_error(err)
        if machine is not None:
            return machine
        err = getattr(err, "cause", None) or err.__cause__
        seen += 1
    return None


def first_line(err: BaseException | str) -> str:
    """The first non-empty line of an error's text (or of ``err`` itself), else the error's type name."""
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else ("" if isinstance(err, str) else type(err).__name__)


def one_line(err: BaseException) -> str:
    """An error as one line: a user error's message, else the innermost cause's type and first line.

    Ray wraps a task's exception in a ``RayTaskError`` whose text is a traceback;
    the original exception is its ``cause``. The one rule for folding an error
    into a line: scene states, the schedule's runs rows and the command line use it.
    """
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return "interrupted; rerun the same job to resume"
    user = user_error(err)
    if user is not None:
        return first_line(user)
    for _ in range(5):
        inner = getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    text = first_line(str(err))
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
