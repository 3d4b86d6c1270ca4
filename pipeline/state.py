"""Scene state under a job's output folder, so `satseg status OUT` answers without a cluster.

Each scene has ``OUT/state/<scene>/status.json``: pending, running, done or
failed (with a one-line reason), chunks done out of chunks total, and what
identifies the work (image path, model key), which the scheduler uses to tell
scenes already done with the same model. Files are replaced atomically, so a
reader never sees half a file. While a scene runs, its chunk markers give the
live count of chunks done.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from schemas.store import OutputLayout

__all__ = [
    "PENDING",
    "RUNNING",
    "DONE",
    "FAILED",
    "SceneState",
    "model_key",
    "write_scene_state",
    "read_scene_state",
    "job_states",
    "one_line",
    "chunks_marked",
    "start_scene_states",
]

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
_STATUSES = (PENDING, RUNNING, DONE, FAILED)


def model_key(checkpoint_sha256: str | None, model: str | None, options: dict | None = None, seed: int = 0) -> str:
    """What identifies the model a scene was run with: the checkpoint's content hash, else name, options and seed."""
    if checkpoint_sha256:
        return f"sha256:{checkpoint_sha256}"
    blob = json.dumps({"options": options or {}, "seed": seed}, sort_keys=True).encode()
    return f"model:{model}:{hashlib.sha256(blob).hexdigest()[:12]}"


def one_line(err: BaseException) -> str:
    """An error as one line: a user error's message, else the innermost cause's type and first line.

    Ray wraps a task's exception in a ``RayTaskError`` whose text is a traceback;
    the original exception is its ``cause``.
    """
    from schemas.errors import SatsegError

    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return "interrupted; rerun the same job to resume"
    for _ in range(5):
        if isinstance(err, SatsegError) and not type(err).__name__.startswith("RayTaskError"):
            return (str(err).strip().splitlines() or [type(err).__name__])[0]
        inner = getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def chunks_marked(layout: OutputLayout, scene: str) -> int:
    """Chunks of ``scene`` with a done-marker (written after the chunk itself)."""
    markers = layout.chunk_markers(scene)
    return sum(1 for _ in markers.iterdir()) if markers.is_dir() else 0


@dataclass(frozen=True)
class SceneState:
    """One scene's state in one job."""

    scene: str
    status: str
    image: str
    job_id: str
    model_key: str
    chunks_done: int
    chunks_total: int
    reason: str | None = None
    updated_at: str = ""
    host: str = ""
    pid: int = 0

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"unknown scene status {self.status!r}; one of {', '.join(_STATUSES)}")

    def moved(self, status: str, *, chunks_done: int | None = None, reason: str | None = None) -> "SceneState":
        """The same scene in another status, stamped now by this process."""
        return replace(
            self,
            status=status,
            chunks_done=self.chunks_done if chunks_done is None else chunks_done,
            reason=reason,
            updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    @property
    def process_gone(self) -> bool:
        """True when a running scene's process is known to be dead (same host, no such PID)."""
        if self.status != RUNNING or self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _status_file(layout: OutputLayout, scene: str) -> Path:
    return layout.state / scene / "status.json"


def write_json(path: Path, data: dict) -> None:
    """Replace a JSON file atomically (temp file in the same folder, then rename): never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_scene_state(layout: OutputLayout, state: SceneState) -> None:
    """Replace the scene's status file atomically."""
    write_json(_status_file(layout, state.scene), asdict(state))


def read_scene_state(layout: OutputLayout, scene: str) -> SceneState | None:
    """The scene's last written state, with the live chunk count while it runs; None if none was written."""
    try:
        data = json.loads(_status_file(layout, scene).read_text())
        state = SceneState(**data)
    except (OSError, ValueError, TypeError):
        return None
    if state.status == RUNNING:
        state = replace(state, chunks_done=chunks_marked(layout, scene))
    return state


def job_states(root: str | Path) -> list[SceneState]:
    """Every scene state of the job in ``root``, in scene-name order."""
    layout = OutputLayout(Path(root))
    if not layout.state.is_dir():
        return []
    states = [read_scene_state(layout, d.name) for d in sorted(layout.state.iterdir()) if d.is_dir()]
    return [s for s in states if s is not None]


def start_scene_states(
    layout: OutputLayout, job_id: str, key: str, scenes: list[tuple[str, str, int]]
) -> dict[str, SceneState]:
    """Write each scene's state as a job starts: done if an earlier run finished it, else pending.

    ``scenes`` holds (name, image path, chunks total) for every scene of the job.
    """
    states = {}
    for name, image, total in scenes:
        done = layout.scene_done(name).exists() and layout.report_file("scenes", job_id, name).exists()
        base = SceneState(name, PENDING, os.path.abspath(image), job_id, key, chunks_marked(layout, name), total)
        state = base.moved(DONE, chunks_done=total) if done else base.moved(PENDING)
        write_scene_state(layout, state)
        states[name] = state
    return states
