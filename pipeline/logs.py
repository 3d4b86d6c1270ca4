"""Where log records go when satseg runs as a command: its own to stderr at the chosen level, Ray's to a log file.

Ray logs through Python's ``ray`` logger; `pipeline.cluster.connect` leaves Ray's
driver logging to the root logger (``configure_logging=False``), so the handlers
set here decide. A long job prints satseg's warnings and one summary; Ray's
notes (token authentication, object store sizes, retries) go to the log file, and
to stderr too with ``--log-level debug``. Used as a library, satseg configures
nothing: records reach Python's default handler as usual.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

__all__ = ["LEVELS", "LOG_FILE_ENV", "LOG_LEVEL_ENV", "log_file", "SharedRotatingFile", "configure_logging"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
LOG_FILE_ENV = "SATSEG_LOG_FILE"
LOG_LEVEL_ENV = "SATSEG_LOG_LEVEL"
_LOG_BYTES = 10 << 20  # one file of at most 10 MiB, and 3 older ones
_ENGINES = ("ray", "distributed", "dask")  # loggers that are not satseg's: stderr shows them only at debug


def log_file() -> Path:
    """``$SATSEG_LOG_FILE``, else ``$XDG_STATE_HOME/satseg/satseg.log`` (``~/.local/state/satseg/satseg.log``)."""
    given = os.environ.get(LOG_FILE_ENV)
    if given:
        return Path(given)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "satseg" / "satseg.log"


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is at each record (a test's capture, a redirected stream)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _SatsegOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name == e or record.name.startswith(e + ".") for e in _ENGINES)


class _Lowercase(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"satseg: {record.levelname.lower()}: {record.getMessage()}"


_OURS = "_satseg_handler"


class SharedRotatingFile(logging.handlers.RotatingFileHandler):
    """A rotating log file that several processes may write at once (a schedule's ticks, jobs run side by side).

    Python's handler rotates with no regard to other processes: one renames the file while another still writes
    to the old one, or both rotate, and records are lost. Here every record is written under an exclusive
    ``fcntl.flock`` on ``<file>.lock``; a process whose open file was rotated away by another reopens the current one
    first, and the size that decides rotation is the file's own. Where there is nothing to share or no way to
    share it, it is the plain handler: ``fcntl`` missing (Windows), a log file that is not a regular file
    (``/dev/null``, a pipe: never rotated), or a folder where no lock file can be made beside a writable log file.
    """

    def __init__(self, filename, *args, **kwargs):
        super().__init__(filename, *args, **kwargs)
        self._lock_file = None
        self._lockable = True

    def _lock(self):
        """The open lock file, or None where records go as in Python's handler (see the class)."""
        if self._lock_file is None and self._lockable:
            path = self.baseFilename
            if os.path.exists(path) and not os.path.isfile(path):
                self._lockable = False
            else:
                try:
                    self._lock_file = open(path + ".lock", "a")  # noqa: SIM115 (held for the handler's life)
                except OSError:
                    self._lockable = False
        return self._lock_file

    def _reopen_if_rotated(self) -> None:
        if self.stream is None:
            return
        try:
            current = os.stat(self.baseFilename).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(self.stream.fileno()).st_ino:
            self.stream.close()
            self.stream = None  # FileHandler.emit opens the file there now

    def emit(self, record: logging.LogRecord) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: one process's rotation, as Python does it
            super().emit(record)
            return
        lock = self._lock()
        if lock is None:
            super().emit(record)
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._reopen_if_rotated()
                super().emit(record)
                if self.stream is not None:
                    self.stream.flush()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        try:
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
        finally:
            super().close()


def configure_logging(level: str | None = None) -> Path | None:
    """Send satseg's records at ``level`` (default ``$SATSEG_LOG_LEVEL`` or warning) to stderr, and every record at
    info or above (debug at debug) to the log file; engines' records reach stderr only at debug.

    Returns the log file, or None when it cannot be written (then nothing is logged to a file). Calling it again
    replaces what an earlier call set.
    """
    level = (level or os.environ.get(LOG_LEVEL_ENV) or "warning").lower()
    if level not in LEVELS:
        from schemas.errors import SpecError

        raise SpecError(f"unknown log level {level!r}; choose one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
        handler.close()
    stderr = _Stderr()
    stderr.setLevel(LEVELS[level])
    stderr.setFormatter(_Lowercase())
    if level != "debug":
        stderr.addFilter(_SatsegOnly())
    handlers: list[logging.Handler] = [stderr]
    path: Path | None = log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = SharedRotatingFile(path, maxBytes=_LOG_BYTES, backupCount=3, delay=True, encoding="utf-8")
        with open(path, "a", encoding="utf-8"):  # fail here, not at the first record, when the file cannot be written
            pass
    except OSError:
        path = None
    else:
        to_file.setLevel(min(LEVELS[level], logging.INFO))
        to_file.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    for handler in handlers:
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    root.setLevel(min(LEVELS[level], logging.INFO))
    return path
