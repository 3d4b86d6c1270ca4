"""Scheduled batch runs: on each cron tick, one job for the new scenes not yet done with the same model.

A tick is named by its cron time (``run_id``, e.g. ``20261127T020000Z``) and
lives in the schedule's output folder::

    OUT/schedule.lock                               held while a tick runs
    OUT/jobs/<run_id>/                              the tick's job (job.json, masks/, reports/, state/)
    OUT/jobs/<run_id>/tick.json                     the tick's plan, written before its job starts
    OUT/reports/runs/schedule=<name>/<run_id>.parquet   one row per finished tick

A tick (1) takes the lock, an exclusive ``flock`` that the kernel releases when
its holder dies, so a lock left by a dead scheduler is taken over, and a tick
whose lock is held is left to its holder; (2) skips a tick already in the runs
table; (3) plans: finds scenes (glob or manifest), counts unreadable ones as
failed, and skips those already done with the same model key (the
checkpoint's content hash) or still running in an earlier tick's job; the plan
is written first, so a tick cut short resumes the same plan; (4) runs the job
here, or submits it to a cluster under a submission id derived from the tick
and waits for it; (5) writes its runs row. Ticks are therefore idempotent.
"""

from __future__ import annotations

import fcntl
import glob as globbing
import hashlib
import json
import os
import re
import select
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable
from zoneinfo import ZoneInfo

import pyarrow as pa

from pipeline import __version__
from pipeline.report_tables import write_table
from pipeline.job_folder import DONE, FAILED, PENDING, RUNNING, job_states, model_key, read_job_record
from schemas.errors import SatsegError, SpecError, one_line
from schemas.runs import RUNS
from schemas.schedule import ScheduleSpec
from schemas.store import ScheduleLayout, write_json

__all__ = [
    "ScheduleLock",
    "TickPlan",
    "previous_tick",
    "next_tick",
    "run_id_of",
    "discover_scenes",
    "schedule_model_key",
    "run_tick",
    "run_schedule",
]

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"satseg schedule: {msg}", file=sys.stderr, flush=True)


def previous_tick(spec: ScheduleSpec, now: datetime | None = None) -> datetime:
    """The latest cron time at or before ``now`` (UTC)."""
    from croniter import croniter

    now = (now or datetime.now(timezone.utc)).astimezone(ZoneInfo(spec.timezone))
    return croniter(spec.cron, now + timedelta(seconds=1)).get_prev(datetime).astimezone(timezone.utc)


def next_tick(spec: ScheduleSpec, after: datetime) -> datetime:
    """The first cron time strictly after ``after`` (UTC)."""
    from croniter import croniter

    return croniter(spec.cron, after.astimezone(ZoneInfo(spec.timezone))).get_next(datetime).astimezone(timezone.utc)


def run_id_of(tick: datetime) -> str:
    return tick.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class ScheduleLock:
    """``OUT/schedule.lock``: an exclusive flock while a tick runs; the file names its holder.

    The kernel drops a flock when its process dies, so a lock file left by a
    dead scheduler (its PID still written in it) is simply taken over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.holder: dict | None = None  # the live holder, when acquire() failed
        self.stale: dict | None = None  # a dead holder's record, when acquire() took over its lock

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            data = os.pread(fd, 4096, 0)
            return json.loads(data) if data.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self, schedule: str) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.holder = self._read(fd)
            os.close(fd)
            return False
        except OSError as err:
            os.close(fd)
            raise SpecError(
                f"{self.path}: cannot lock ({err.strerror}); put `out` on a file system that supports flock"
            ) from None
        self.stale = self._read(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "schedule": schedule,
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly
            os.close(self.fd)  # closing drops the flock
            self.fd = None


@dataclass
class TickPlan:
    """What a tick runs; written to ``jobs/<run_id>/tick.json`` before its job starts."""

    run_id: str
    tick: str
    model_key: str
    found: int
    scenes: list[dict] = field(default_factory=list)  # {"image", "labels", "name"} to run
    skipped: list[str] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)  # image -> one-line reason


def schedule_model_key(spec: ScheduleSpec) -> str:
    """The model key the tick's job will record (see pipeline.job_folder.model_key)."""
    ckpt, init = spec.job.get("checkpoint"), spec.job.get("init")
    if ckpt:
        return model_key(_weights_sha256(ckpt, "checkpoint"), None)
    init_sha256 = _weights_sha256(init, "init weights") if init else None
    return model_key(
        None, spec.job.get("model"), dict(spec.job.get("model_options") or {}), int(spec.job.get("seed", 0)), init_sha256
    )


def _weights_sha256(path: str, what: str) -> str:
    from workers.models.checkpoint import file_sha256

    try:
        return file_sha256(path)
    except OSError as err:
        raise SpecError(
            f"{path}: cannot read the {what} here ({err.strerror}); the scheduler hashes it to tell done scenes"
        ) from None


def discover_scenes(spec: ScheduleSpec, log: Log = _stderr) -> list[str]:
    """Image paths found by the schedule's glob or manifest, sorted; none found is a warning, not an error."""
    src = spec.scenes
    if src.glob is not None:
        paths = sorted(os.path.abspath(p) for p in globbing.glob(src.glob, recursive=True) if os.path.isfile(p))
        if not paths:
            log(f"warning: glob {src.glob} matches no file; nothing to run this tick")
        return paths
    try:
        lines = Path(src.manifest).read_text().splitlines()
    except OSError as err:
        log(f"warning: manifest {src.manifest} unreadable ({err.strerror}); nothing to run this tick")
        return []
    base = Path(src.manifest).absolute().parent
    paths = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            paths.append(os.path.abspath(p if p.is_absolute() else base / p))
    if not paths:
        log(f"warning: manifest {src.manifest} lists no scene; nothing to run this tick")
    return sorted(dict.fromkeys(paths))


def _scene_names(paths: list[str]) -> list[str]:
    """Scene names from file stems; stems that repeat get a short hash of their path."""
    stems = [re.sub(r"[^A-Za-z0-9._-]", "_", Path(p).name.split(".")[0]).lstrip("._-") or "scene" for p in paths]
    return [s if stems.count(s) == 1 else f"{s}-{hashlib.sha1(p.encode()).hexdigest()[:6]}" for s, p in zip(stems, paths)]


def _labels_for(spec: ScheduleSpec, image: str) -> str | None:
    if spec.scenes.labels is None:
        return None
    p = Path(image)
    candidate = spec.scenes.labels.format(stem=p.name.split(".")[0], name=p.name, parent=str(p.parent))
    return candidate if os.path.isfile(candidate) else None


def _check_scene(image: str, labels: str | None) -> str | None:
    """None if the scene's metadata reads (and its labels line up); else the one-line reason."""
    from workers.reader import check_labels_match, open_scene

    try:
        info = open_scene(image)
        if labels is not None:
            check_labels_match(info, open_scene(labels, role="label"))
    except SatsegError as err:
        text = one_line(err)
        for path in (image, labels):  # the warning names the file once: drop the error's own "PATH: " prefix
            if path and text.startswith(f"{path}: "):
                return text[len(path) + 2 :] if path == image else text
        return text
    return None


def _layout(spec: ScheduleSpec) -> ScheduleLayout:
    return ScheduleLayout(Path(spec.out))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _earlier_work(spec: ScheduleSpec, key: str, current: str) -> tuple[set[str], set[str], set[str]]:
    """Images done with ``key`` in any earlier job; those pending or running in an earlier tick's job that still
    runs on a cluster; those that failed before (run last, so one bad scene does not hold back the others)."""
    done: set[str] = set()
    failed: set[str] = set()
    unfinished: dict[str, set[str]] = {}
    jobs = _layout(spec).jobs
    for job in sorted(jobs.iterdir()) if jobs.is_dir() else []:
        for s in job_states(job):
            if s.model_key != key:
                continue
            if s.status == DONE:
                done.add(s.image)
            elif s.status == FAILED:
                failed.add(s.image)
            elif s.status in (PENDING, RUNNING) and job.name != current:
                unfinished.setdefault(job.name, set()).add(s.image)
    in_flight: set[str] = set()
    for run_id, images in unfinished.items():
        # A tick run here held the lock we hold now, so it is over; only a submitted job can outlive its tick
        # (its scheduler died while waiting): ask the cluster.
        sub = _read_json(_layout(spec).submission_file(run_id))
        if sub is None or _layout(spec).runs_file(spec.name, run_id).exists():
            continue
        try:
            from pipeline.submit import TERMINAL, job_row, jobs_client

            if job_row(jobs_client(sub["address"]), sub["submission_id"]).status not in TERMINAL:
                in_flight |= images
        except (SatsegError, KeyError):
            pass  # no such job or no cluster: nothing of it runs
    return done, in_flight - done, failed - done


def _plan(spec: ScheduleSpec, tick: datetime, log: Log) -> TickPlan:
    run_id = run_id_of(tick)
    saved = _read_json(_layout(spec).tick_file(run_id))
    if saved is not None:
        log(f"tick {run_id}: resuming its plan ({len(saved['scenes'])} scene(s))")
        return TickPlan(**saved)
    key = schedule_model_key(spec)
    paths = discover_scenes(spec, log)
    done, in_flight, failed_before = _earlier_work(spec, key, run_id)
    plan = TickPlan(run_id, tick.isoformat(), key, len(paths))
    todo = []
    for image in paths:
        if image in done or image in in_flight:
            plan.skipped.append(image)
            continue
        labels = _labels_for(spec, image)
        reason = _check_scene(image, labels)
        if reason is not None:
            log(f"warning: {image}: {reason}; left out of this tick")
            plan.invalid[image] = reason
            continue
        todo.append((image, labels))
    todo.sort(key=lambda item: item[0] in failed_before)  # stable: found order, earlier failures last
    names = _scene_names([image for image, _ in todo])
    plan.scenes = [{"image": image, "labels": labels, "name": name} for (image, labels), name in zip(todo, names)]
    if plan.scenes:
        write_json(_layout(spec).tick_file(run_id), asdict(plan))
    return plan


def _submission(client, spec: ScheduleSpec, plan: TickPlan, job_spec, address: str) -> str:
    """The tick's Ray job: attach to one still running under the tick's id, else submit under the first free id."""
    from pipeline.submit import TERMINAL, job_row, submit_job
    from schemas.errors import JobNotFoundError

    base = f"satseg-{spec.name}-{plan.run_id}"
    for attempt in range(1, 100):
        sid = base if attempt == 1 else f"{base}-{attempt}"
        try:
            row = job_row(client, sid)
        except JobNotFoundError:
            sid = submit_job(client, job_spec, python=spec.python, submission_id=sid,
                             metadata={"satseg_schedule": spec.name, "satseg_run_id": plan.run_id})
            write_json(_layout(spec).submission_file(plan.run_id), {"submission_id": sid, "address": address})
            return sid
        if row.status not in TERMINAL:
            return sid
    raise SpecError(f"tick {plan.run_id}: 99 submissions already; remove {_layout(spec).jobs / plan.run_id} to start it over")


def _run_job(spec: ScheduleSpec, plan: TickPlan, log: Log) -> tuple[str | None, str | None, str | None]:
    """Run or submit the tick's job and wait for it; returns (job id, submission id, error line)."""
    from pipeline.submit import TERMINAL, job_row, jobs_client, resolve_address

    out = _layout(spec).jobs / plan.run_id
    job_spec = spec.job_spec(plan.scenes, out)
    address = resolve_address(spec.address)
    if address is None:
        from pipeline.run import run_job

        log(f"tick {plan.run_id}: running {len(plan.scenes)} scene(s) here into {out}")
        try:
            return run_job(job_spec, show_progress=False).job_id, None, None
        except Exception as err:  # noqa: BLE001  (the tick records the failure; the scheduler keeps going)
            return (read_job_record(out) or {}).get("job_id"), None, one_line(err)
    client = jobs_client(address)
    sid = _submission(client, spec, plan, job_spec, address)
    log(f"tick {plan.run_id}: job {sid} on {address} ({len(plan.scenes)} scene(s)); waiting for it")
    row = job_row(client, sid)
    while row.status not in TERMINAL:
        time.sleep(2.0)
        row = job_row(client, sid)
    job_id = (read_job_record(out) or {}).get("job_id")
    error = None if row.status == "SUCCEEDED" else f"job {sid} {row.status}: {row.message}"
    return job_id, sid, error


def _check_before_writing(spec: ScheduleSpec) -> None:
    """What can be refused is refused before the tick writes anything: a cluster that does not answer, or an
    output folder that holds another schedule's runs (ticks of two schedules would share job folders)."""
    from pipeline.submit import check_reachable, resolve_address

    address = resolve_address(spec.address)
    if address is not None:
        check_reachable(address)
    runs = _layout(spec).runs
    others = sorted(p.name.split("=", 1)[1] for p in runs.glob("schedule=*") if p.name != f"schedule={spec.name}")
    if others:
        raise SpecError(f"{spec.out}: holds the runs of schedule {others[0]!r}; give schedule {spec.name!r} its own `out`")


def run_tick(spec: ScheduleSpec, tick: datetime, *, log: Log = _stderr) -> dict | None:
    """Run one tick; returns its runs row, or None when another scheduler holds it or it already ran."""
    run_id = run_id_of(tick)
    _check_before_writing(spec)
    lock = ScheduleLock(_layout(spec).lock)
    if not lock.acquire(spec.name):
        h = lock.holder or {}
        log(f"tick {run_id}: left to the scheduler holding {lock.path} (pid {h.get('pid', '?')} on {h.get('host', '?')})")
        return None
    try:
        if lock.stale:
            log(f"took over {lock.path} from pid {lock.stale.get('pid')} on {lock.stale.get('host')}, which is gone")
        if _layout(spec).runs_file(spec.name, run_id).exists():
            log(f"tick {run_id}: already ran (see the runs table); nothing to do")
            return None
        started = datetime.now(timezone.utc)
        plan = _plan(spec, tick, log)
        job_id = sid = error = None
        done: set[str] = set()
        if plan.scenes:
            job_id, sid, error = _run_job(spec, plan, log)
            done = {s.image for s in job_states(_layout(spec).jobs / run_id) if s.status == DONE}
        failed = len(plan.invalid) + sum(1 for s in plan.scenes if s["image"] not in done)
        if error is None and failed:
            reasons = [f"{Path(k).name}: {v}" for k, v in plan.invalid.items()]
            error = f"{failed} scene(s) failed" + (f" ({'; '.join(reasons)})" if reasons else "")
        row = {
            "run_id": run_id, "tick": tick, "started": started, "finished": datetime.now(timezone.utc),
            "scenes_found": plan.found, "scenes_submitted": len(plan.scenes), "scenes_skipped": len(plan.skipped),
            "scenes_failed": failed, "job_id": job_id, "submission_id": sid,
            "status": "failed" if failed or (error and plan.scenes) else ("done" if plan.scenes else "idle"),
            "message": error, "model_key": plan.model_key,
            "job_out": str(_layout(spec).jobs / run_id) if plan.scenes else None,
            "host": socket.gethostname(), "satseg_version": __version__,
        }
        write_table(pa.Table.from_pylist([row], schema=RUNS), _layout(spec).runs_file(spec.name, run_id))
        log(f"tick {run_id}: {row['status']}: found {plan.found}, submitted {len(plan.scenes)}, "
            f"skipped {len(plan.skipped)}, failed {failed}" + (f"; {error}" if error else ""))
        return row
    finally:
        lock.release()




class _Shutdown:
    """SIGINT/SIGTERM: the first stops after the current tick (or ends the wait), a second stops now.

    The handler takes no lock: it runs in the main thread between two bytecodes, and one that waited for a lock
    the interrupted code held (``threading.Event.set`` takes the event's, which ``Event.wait`` holds on entry)
    hung the scheduler for good. It sets a flag; the wait is a ``select`` on a socket that Python's C-level
    handler writes the signal's number to (``signal.set_wakeup_fd``), so a signal ends it at once.
    """

    def __init__(self, log: Log) -> None:
        self.requested = False
        self.in_tick = False
        self.log = log
        self._read, self._write = socket.socketpair()
        for end in (self._read, self._write):
            end.setblocking(False)

    def __call__(self, signum, frame) -> None:
        if self.requested and self.in_tick:
            raise KeyboardInterrupt
        self.requested = True
        if self.in_tick:
            self.log(f"{signal.Signals(signum).name}: stopping after this tick; send it again to stop now")

    def __enter__(self) -> "_Shutdown":
        self._previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._read.close()
        self._write.close()

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; a signal (any, once the handlers are in) ends it at once."""
        select.select([self._read], [], [], seconds)
        try:
            while self._read.recv(64):
                pass
        except BlockingIOError:
            pass


def run_schedule(spec: ScheduleSpec, *, once: bool = False, log: Log = _stderr, now: Callable[[], datetime] | None = None) -> int:
    """``once``: run the latest tick at or before now, then return. Else sleep until each next tick until a signal.

    Returns 1 when a tick run by ``once`` failed, else 0.
    """
    clock = now or (lambda: datetime.now(timezone.utc))
    stop = _Shutdown(log)
    from pipeline.submit import resolve_address

    if not once and resolve_address(spec.address) is None:
        # Ticks run here: start Ray now, since ray.init() installs its own SIGTERM handler; ours goes on top.
        from pipeline.cluster import connect

        connect(None)
    with stop:
        if once:
            stop.in_tick = True
            row = run_tick(spec, previous_tick(spec, clock()), log=log)
            return 1 if row is not None and row["status"] == "failed" else 0
        tick = next_tick(spec, clock())
        while True:
            log(f"next tick {tick.isoformat()}")
            while not stop.requested:
                left = (tick - clock()).total_seconds()
                if left <= 0:
                    break
                stop.wait(min(left, 60.0))
            if stop.requested:
                log("stopped")
                return 0
            stop.in_tick = True
            try:
                run_tick(spec, tick, log=log)
            except SatsegError as err:  # e.g. the cluster is down tonight: say so, and wait for the next tick
                log(f"tick {run_id_of(tick)}: not run: {err}")
            stop.in_tick = False
            if stop.requested:
                log("stopped")
                return 0
            tick = next_tick(spec, max(clock(), tick))
