"""What a job's output folder records: the job (``job.json``) and each scene's state.

The job record names the job whose results the folder holds; a run of
another job is refused there (``claim_output``), and every reader of
``job.json`` goes through ``read_job_record``.

Each scene has ``OUT/state/<scene>/status.json``: pending, running, done or
failed (with a one-line reason), chunks done out of chunks total, and what
identifies the work (image path, model key), which the scheduler uses to tell
scenes already done with the same model. While a scene runs, its chunk markers
give the live count of chunks done.

There is one notion of done: the scene's mask store is marked complete, its
last write (``scene_complete``; ARCHITECTURE.md, invariant 6). A status file
is what ``satseg status`` shows; a scene reads as done exactly when its store
is complete, whatever its status file says.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from pipeline import __version__
from schemas.errors import OutputConflictError
from schemas.store import OutputLayout, create_whole, write_json
from workers.mask_store import is_complete

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
    "chunks_marked",
    "start_scene_states",
    "scene_complete",
    "read_job_record",
    "claim_output",
]

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
_STATUSES = (PENDING, RUNNING, DONE, FAILED)


def model_key(
    checkpoint_sha256: str | None, model: str | None, options: dict | None = None, seed: int = 0,
    init_sha256: str | None = None,
) -> str:
    """What identifies the model a scene was run with: the checkpoint's content hash, else name, options and seed
    (and the content hash of the `init` weights it started from, when it had them)."""
    if checkpoint_sha256:
        return f"sha256:{checkpoint_sha256}"
    identity = {"options": options or {}, "seed": seed} | ({"init": init_sha256} if init_sha256 else {})
    blob = json.dumps(identity, sort_keys=True).encode()
    return f"model:{model}:{hashlib.sha256(blob).hexdigest()[:12]}"


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


def write_scene_state(layout: OutputLayout, state: SceneState) -> None:
    """Replace the scene's status file atomically."""
    write_json(layout.status_file(state.scene), asdict(state))


def read_scene_state(layout: OutputLayout, scene: str) -> SceneState | None:
    """The scene's last written state, done exactly when its store is complete, with the live chunk count while it runs.

    None if no state was written.
    """
    try:
        data = json.loads(layout.status_file(scene).read_text())
        state = SceneState(**data)
    except (OSError, ValueError, TypeError):
        return None
    if scene_complete(layout, scene):
        return replace(state, status=DONE, chunks_done=state.chunks_total, reason=None)
    if state.status == DONE:  # its mask was removed or replaced since: not done any more
        return replace(state, status=PENDING, chunks_done=chunks_marked(layout, scene))
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
        done = scene_complete(layout, name)
        base = SceneState(name, PENDING, os.path.abspath(image), job_id, key, chunks_marked(layout, name), total)
        state = base.moved(DONE, chunks_done=total) if done else base.moved(PENDING)
        write_scene_state(layout, state)
        states[name] = state
    return states


def scene_complete(layout: OutputLayout, scene: str) -> bool:
    """Whether ``scene`` is done in this job folder: its mask store is complete (written after its reports)."""
    return is_complete(layout.mask_store(scene))


def read_job_record(root: str | Path) -> dict | None:
    """The job record of a job's output folder (``job_id``, ``satseg_version``, ``spec``), or None if none is readable."""
    try:
        record = json.loads(OutputLayout(Path(root)).job_file.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def claim_output(layout: OutputLayout, job_id: str, spec: dict) -> None:
    """Record job ``job_id`` in its output folder, or refuse a folder holding another job's results.

    Atomic (``create_whole``): of two jobs claiming one folder at the same moment, exactly one proceeds.
    """
    layout.check_folder()
    if not layout.job_file.exists():
        leftovers = [p for p in (layout.masks, layout.reports, layout.state) if p.exists()]
        if leftovers:
            raise OutputConflictError(
                f"{layout.root}: holds satseg outputs ({leftovers[0].name}/) but no job.json; choose another --out or remove them"
            )
        record = {"job_id": job_id, "satseg_version": __version__, "spec": spec}
        create_whole(layout.job_file, json.dumps(record, indent=2))  # False: another job came first; compared below
    other = (read_job_record(layout.root) or {}).get("job_id")
    if other != job_id:
        raise OutputConflictError(
            f"{layout.root}: holds results of another job ({other or 'unknown'}); choose another --out or remove that folder"
        )
