"""Soak: many small scenes through scheduled ticks submitted to a local head; what is left over, counted.

One run starts a local Ray head on 127.0.0.1 the way `satseg cluster start`
does (`pipeline.head.start_head`, its own temp dir and state file, both in a
temporary folder), writes a schedule whose job uses `pixel_linear` (tile 32,
overlap 0, small chunks) and submits each tick to the head's Jobs API, then
delivers the scenes in batches into the watched folder and runs one tick per
batch (`pipeline.schedule.run_tick` with consecutive cron times), then one
more tick with nothing new (it must submit nothing). Every scene must end done
exactly once: the runs table and every job's scene states are checked.

Before the first tick, after every tick and once more after a settling pause
it counts, from outside the cluster (no `ray.init` here, so the soak's own
driver stays a plain Jobs API client like `satseg schedule`):

- Ray actors ALIVE, and all actors the GCS remembers (State API over the
  dashboard's HTTP address, in a short-lived probe process);
- object store memory used on the head, its primary copies and local objects
  (the raylet's store stats over gRPC, in the same probe process);
- the head's processes (the process tree of `ray start --block`), those of
  them named ``ray::...`` (workers, actors, agents), and the tree's PSS;
- open file descriptors, threads and RSS of this driver (the scheduler);
- open file descriptors and RSS of the raylet and the GCS.

Then it stops the head by its PID (`pipeline.head.stop_head`) and looks for
any process of that head still running: every PID seen in the head's tree
during the run (same PID and start time), and any process whose command line
or open files name the head's temp dir. It prints a table and appends one
JSON line to benchmarks/results.jsonl (machine, date, commit).

    python benchmarks/soak.py                      # 50 scenes of 64x80 px, 5 ticks of 10
    python benchmarks/soak.py --scenes 20 --batches 4 --settle 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from pipeline.head import head_alive, read_head, start_head, stop_head  # noqa: E402
from pipeline.job_folder import DONE, job_states  # noqa: E402
from pipeline.schedule import run_tick  # noqa: E402
from pipeline.synthetic import write_synthetic_scene  # noqa: E402
from schemas.schedule import load_schedule  # noqa: E402

FIRST_TICK = datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)  # cron "0 2 * * *": one tick a day from here

# Run in a separate, short-lived process so that neither Ray's State API client nor the GCS/raylet gRPC channels
# live in the driver whose descriptors we count. Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import: 0 keeps
# the 127.0.0.1 GCS address as it is (see pipeline.cluster._loopback_kept).
PROBE = r"""
import json, sys
from collections import Counter
from ray.util.state import list_actors
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

dashboard, gcs = sys.argv[1], sys.argv[2]
everything = list_actors(address=dashboard, limit=10000, raise_on_missing_output=False, timeout=60)
alive = [a for a in everything if a.state == "ALIVE"]
reply = get_memory_info_reply(get_state_from_address(gcs))
s = reply.store_stats
print(json.dumps({
    "actors_alive": len(alive),
    "actors_total": len(everything),
    "actors_alive_by_class": dict(Counter(a.class_name for a in alive)),
    "actors_by_state": dict(Counter(a.state for a in everything)),
    "object_store_used_bytes": int(s.object_store_bytes_used),
    "object_store_primary_bytes": int(s.object_store_bytes_primary_copy),
    "object_store_total_bytes": int(s.object_store_bytes_avail),
    "object_store_local_objects": int(s.num_local_objects),
    "spilled_bytes_total": int(s.spilled_bytes_total),
}))
"""


# ---------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], start time [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _nfds(pid: int | str) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _fd_kinds(pid: int | None, temp_dir: str) -> dict[str, int]:
    """What a process's descriptors point at: socket, pipe, anon_inode:..., or a file (under the head's temp dir: relative)."""
    kinds: Counter = Counter()
    if pid is None:
        return {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:")):
            target = target.split(":")[0]
        elif target.startswith(temp_dir):
            target = "TEMP" + target[len(temp_dir):]
        kinds[target] += 1
    return dict(sorted(kinds.items()))


def _status_kib(pid: int | str, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _short_name(cmdline: str) -> str:
    """``ray::IDLE``, ``raylet``, ``dashboard.py``: what a head process is, from its command line."""
    words = cmdline.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    script = next((w for w in words[1:4] if w.endswith(".py")), None)
    return os.path.basename(script or words[0])


def _alive(pid: int, started: str | None = None) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] != "Z" and (started is None or f[19] == started)


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, living (zombies left out)."""
    kids: dict[int, list[int]] = {}
    for pid in _pids():
        f = _stat_fields(pid)
        if f is not None:
            kids.setdefault(int(f[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _alive(pid):
            out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _touches(pid: int, folder: str) -> bool:
    """True when the process's command line, working directory or an open file names ``folder``."""
    if folder in _cmdline(pid):
        return True
    try:
        if os.readlink(f"/proc/{pid}/cwd").startswith(folder):
            return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folder):
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


# ---------------------------------------------------------------- measuring


class Watch:
    """Samples the head and this driver; remembers every PID seen in the head's tree."""

    def __init__(self, record) -> None:
        self.record = record
        self.seen: dict[int, tuple[str, str]] = {}  # pid -> (start time, command line)
        self.samples: list[dict] = []

    def _remember(self, pids: list[int]) -> None:
        for pid in pids:
            f = _stat_fields(pid)
            if f is not None and pid not in self.seen:
                self.seen[pid] = (f[19], _cmdline(pid)[:160])

    def probe(self) -> dict:
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run(
            [sys.executable, "-c", PROBE, self.record.address, self.record.gcs_address],
            capture_output=True, text=True, timeout=180, env=env,
        )
        if done.returncode != 0:
            return {"probe_error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
        return json.loads(done.stdout.strip().splitlines()[-1])

    def sample(self, label: str, **extra) -> dict:
        tree = _tree(self.record.pid)
        self._remember(tree)
        cmd = {pid: _cmdline(pid) for pid in tree}
        raylet = next((p for p, c in cmd.items() if "/raylet/raylet " in c + " "), None)
        gcs = next((p for p, c in cmd.items() if "/gcs/gcs_server" in c), None)
        named = [c.split()[0] for c in cmd.values() if c.startswith("ray::")]
        pss = {pid: _pss_kib(pid) for pid in tree}
        by_name: Counter = Counter()
        for pid, kib in pss.items():
            by_name[_short_name(cmd[pid])] += kib
        row = {
            "label": label,
            "t": round(time.monotonic() - T0, 1),
            **self.probe(),
            "head_processes": len(tree),
            "ray_processes": len(named),
            "ray_processes_by_name": dict(Counter(named)),
            "head_tree_pss_mib": round(sum(pss.values()) / 1024, 1),
            "head_pss_mib_by_process": {k: round(v / 1024, 1) for k, v in sorted(by_name.items())},
            "raylet_fds": _nfds(raylet) if raylet else None,
            "raylet_rss_mib": round((_status_kib(raylet, "VmRSS") or 0) / 1024, 1) if raylet else None,
            "gcs_fds": _nfds(gcs) if gcs else None,
            "gcs_rss_mib": round((_status_kib(gcs, "VmRSS") or 0) / 1024, 1) if gcs else None,
            "raylet_fd_kinds": _fd_kinds(raylet, self.record.temp_dir),
            "gcs_fd_kinds": _fd_kinds(gcs, self.record.temp_dir),
            "driver_fds": len(os.listdir("/proc/self/fd")),
            "driver_threads": _status_kib("self", "Threads"),
            "driver_rss_mib": round((_status_kib("self", "VmRSS") or 0) / 1024, 1),
            "driver_children": sum(1 for p in _pids() if (_stat_fields(p) or ["", "0"])[1] == str(os.getpid())),
            **extra,
        }
        self.samples.append(row)
        _print_row(row)
        return row

    def leftovers(self, wait: float = 20.0) -> list[dict]:
        """Processes of the stopped head still running (after up to ``wait`` s: Ray's per-job watchers poll once a second)."""
        temp_dir = self.record.temp_dir
        deadline = time.monotonic() + wait
        while True:
            left = {pid for pid, (started, _) in self.seen.items() if _alive(pid, started)}
            left |= {pid for pid in _pids() if pid != os.getpid() and _alive(pid) and _touches(pid, temp_dir)}
            if not left or time.monotonic() > deadline:
                return [{"pid": p, "cmdline": _cmdline(p)[:160]} for p in sorted(left)]
            time.sleep(0.5)


T0 = time.monotonic()
COLUMNS = [
    ("label", "sample", 14), ("actors_alive", "actors", 6), ("actors_total", "GCS actors", 10),
    ("object_store_used_bytes", "store B", 8), ("object_store_local_objects", "objects", 7),
    ("head_processes", "head procs", 10), ("ray_processes", "ray::", 5), ("head_tree_pss_mib", "head PSS MiB", 12),
    ("raylet_fds", "raylet fds", 10), ("raylet_rss_mib", "raylet MiB", 10), ("gcs_fds", "GCS fds", 7),
    ("gcs_rss_mib", "GCS MiB", 7), ("driver_fds", "driver fds", 10), ("driver_threads", "drv thr", 7),
    ("driver_rss_mib", "drv MiB", 7), ("tick_seconds", "tick s", 6), ("scenes_done", "done", 4),
]


def _print_header() -> None:
    print("  ".join(f"{title:>{w}}" for _, title, w in COLUMNS), flush=True)


def _print_row(row: dict) -> None:
    cells = []
    for key, _, w in COLUMNS:
        v = row.get(key, "")
        cells.append(f"{'' if v is None else v:>{w}}")
    print("  ".join(cells), flush=True)
    if "probe_error" in row:
        print(f"    probe failed: {row['probe_error']}", flush=True)


def markdown_table(samples: list[dict]) -> str:
    keys = [k for k, _, _ in COLUMNS]
    lines = ["| " + " | ".join(t for _, t, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in samples:
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the soak


def deliver(site: Path, names: list[str], height: int, width: int, seed0: int) -> None:
    """Scenes written in staging/, then moved into incoming/ (and labels/): the glob never sees half a file."""
    (site / "incoming").mkdir(exist_ok=True)
    (site / "labels").mkdir(exist_ok=True)
    for i, name in enumerate(names):
        scene = write_synthetic_scene(site / "staging", name, height, width, seed=seed0 + i, cell=24)
        shutil.move(scene.labels, site / "labels" / f"{name}_labels.tif")
        shutil.move(scene.image, site / "incoming" / f"{name}.tif")


def write_schedule(site: Path, address: str, tile: int, chunk: int) -> Path:
    spec = {
        "name": "soak",
        "cron": "0 2 * * *",
        "scenes": {"glob": str(site / "incoming" / "*.tif"), "labels": "{parent}/../labels/{stem}_labels.tif"},
        "job": {"model": "pixel_linear", "classes": ["a", "b"], "tile_size": tile, "overlap": 0, "chunk_size": chunk},
        "out": str(site / "results"),
        "address": address,
    }
    path = site / "schedule.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def check_exactly_once(out: Path, names: list[str]) -> dict:
    """Scene states over every tick's job: each scene done in exactly one job, none failed."""
    done: Counter = Counter()
    other: list[str] = []
    for job in sorted((out / "jobs").iterdir()) if (out / "jobs").is_dir() else []:
        for s in job_states(job):
            if s.status == DONE:
                done[s.scene] += 1
            else:
                other.append(f"{job.name}/{s.scene}: {s.status} {s.reason or ''}".strip())
    return {
        "scenes_done": sum(1 for n in names if done[n] == 1),
        "scenes_done_twice": sorted(n for n in names if done[n] > 1),
        "scenes_missing": sorted(n for n in names if done[n] == 0),
        "scene_states_not_done": other,
    }


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "?"
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {gpu}"


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return done.stdout.strip() or None
    except OSError:
        return None


def _versions() -> dict:
    import ray

    try:
        import torch

        tv = torch.__version__
    except ImportError:
        tv = None
    return {"torch": tv, "ray": ray.__version__}


def growth(samples: list[dict], keys: list[str]) -> dict:
    """For each key: first sample, after the first tick, last sample, and last minus after-the-first-tick."""
    ticks = [s for s in samples if s["label"].startswith("tick ")]
    first_tick = ticks[0] if ticks else samples[0]
    out = {}
    for k in keys:
        vals = [s.get(k) for s in samples]
        if any(v is None for v in vals):
            continue
        out[k] = {"before": samples[0][k], "after_tick_1": first_tick[k], "after": samples[-1][k],
                  "after_minus_before": round(samples[-1][k] - samples[0][k], 1),
                  "after_minus_tick_1": round(samples[-1][k] - first_tick[k], 1),
                  "per_tick": [s[k] for s in ticks]}
    return out


class _Timeout(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=50)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=80)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--num-cpus", type=int, default=2, help="the head's CPUs (default 2)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between a tick's end and its sample")
    ap.add_argument("--final-settle", type=float, default=30.0, help="seconds before the last sample")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up (and stop the head) after this many seconds")
    ap.add_argument("--record", default=str(ROOT / "benchmarks" / "results.jsonl"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    os.environ.pop("RAY_ADDRESS", None)
    header = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **_versions(), "commit": _commit()}
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)  # the Jobs client's packaging notices, once per tick
    names = [f"s{i:03d}" for i in range(args.scenes)]
    batches = [names[i * len(names) // args.batches:(i + 1) * len(names) // args.batches] for i in range(args.batches)]
    site = Path(tempfile.mkdtemp(prefix="satseg-soak-"))
    state_file = site / "head.json"
    print(f"{header['machine']}  torch {header['torch']}  ray {header['ray']}  commit {header['commit']}  {header['when']}")
    print(f"soak folder {site}: {args.scenes} scenes of {args.height}x{args.width} px in {args.batches} ticks, "
          f"pixel_linear, tile {args.tile}, overlap 0, chunk {args.chunk}")

    def _alarm(signum, frame):
        raise _Timeout(f"the soak ran past --timeout {args.timeout:.0f} s")

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(args.timeout))
    ticks: list[dict] = []
    error = None
    watch = record = None
    checks: dict = {}
    try:
        t = time.monotonic()
        record = start_head(state_file, num_cpus=args.num_cpus, dashboard_port=0)
        head_start_s = round(time.monotonic() - t, 1)
        print(f"head pid {record.pid} at {record.address} (GCS {record.gcs_address}), temp dir {record.temp_dir}, "
              f"up in {head_start_s} s")
        watch = Watch(record)
        spec = load_schedule(write_schedule(site, record.address, args.tile, args.chunk))
        time.sleep(args.settle)
        _print_header()
        watch.sample("before")
        quiet = lambda m: print(f"    {m}", flush=True)  # noqa: E731
        for i, batch in enumerate(batches):
            deliver(site, batch, args.height, args.width, seed0=1000 + i * 100)
            t = time.monotonic()
            row = run_tick(spec, FIRST_TICK + timedelta(days=i), log=quiet)
            seconds = round(time.monotonic() - t, 1)
            ticks.append({"run_id": row["run_id"], "seconds": seconds, "status": row["status"],
                          "found": row["scenes_found"], "submitted": row["scenes_submitted"],
                          "skipped": row["scenes_skipped"], "failed": row["scenes_failed"], "message": row["message"]})
            time.sleep(args.settle)
            done = check_exactly_once(spec.out, names)["scenes_done"]
            watch.sample(f"tick {i + 1}", tick_seconds=seconds, scenes_done=done)
        t = time.monotonic()  # one more tick with nothing new: it must find every scene done and submit nothing
        row = run_tick(spec, FIRST_TICK + timedelta(days=len(batches)), log=quiet)
        ticks.append({"run_id": row["run_id"], "seconds": round(time.monotonic() - t, 1), "status": row["status"],
                      "found": row["scenes_found"], "submitted": row["scenes_submitted"],
                      "skipped": row["scenes_skipped"], "failed": row["scenes_failed"], "message": row["message"]})
        time.sleep(args.final_settle)
        checks = check_exactly_once(spec.out, names)
        watch.sample(f"idle +{args.final_settle:.0f}s", tick_seconds=ticks[-1]["seconds"], scenes_done=checks["scenes_done"])
    except BaseException as err:  # noqa: BLE001  (reported and recorded; the head is stopped below either way)
        error = f"{type(err).__name__}: {err}"
        print(f"soak failed: {error}", file=sys.stderr, flush=True)
    finally:
        signal.alarm(0)
        stopped = left = None
        if read_head(state_file) is not None:
            t = time.monotonic()
            try:
                stop_head(state_file)
                stopped = round(time.monotonic() - t, 1)
            except Exception as err:  # noqa: BLE001
                error = (error + "; " if error else "") + f"stop_head: {err}"
        if watch is not None:
            left = watch.leftovers()
        temp_left = record is not None and Path(record.temp_dir).exists()
        head_left = record is not None and head_alive(record)
    if not args.keep:
        shutil.rmtree(site, ignore_errors=True)

    work = [t for t in ticks if t["submitted"]]
    idle = ticks[len(batches)] if len(ticks) > len(batches) else None
    ok = (
        error is None
        and len(work) == len(batches)
        and all(t["status"] == "done" and t["failed"] == 0 for t in work)
        and sum(t["submitted"] for t in work) == args.scenes
        and idle is not None and (idle["submitted"], idle["skipped"], idle["status"]) == (0, args.scenes, "idle")
        and checks.get("scenes_done") == args.scenes
        and not checks.get("scenes_done_twice") and not checks.get("scene_states_not_done")
    )
    samples = watch.samples if watch else []
    keys = ["actors_alive", "actors_total", "object_store_used_bytes", "object_store_local_objects", "head_processes",
            "ray_processes", "head_tree_pss_mib", "raylet_fds", "raylet_rss_mib", "gcs_fds", "gcs_rss_mib",
            "driver_fds", "driver_threads", "driver_rss_mib", "driver_children"]
    grown = growth(samples, keys) if samples else {}
    result = {
        **header, "kind": "soak", "scenes": args.scenes, "ticks": args.batches, "scene": f"{args.height}x{args.width}",
        "model": "pixel_linear", "tile": args.tile, "overlap": 0, "chunk": args.chunk, "head_num_cpus": args.num_cpus,
        "settle_seconds": args.settle, "final_settle_seconds": args.final_settle,
        "all_scenes_done_once": ok, "error": error, "tick_results": ticks, "checks": checks,
        "samples": samples, "growth": grown, "head_stop_seconds": stopped,
        "leftover_processes": left, "head_temp_dir_left": temp_left, "head_process_left": head_left,
    }
    with open(args.record, "a") as f:
        f.write(json.dumps(result) + "\n")

    print("\nticks:")
    for t in ticks:
        print(f"  {t['run_id']}  {t['status']:5s} found {t['found']:3d} submitted {t['submitted']:3d} "
              f"skipped {t['skipped']:3d} failed {t['failed']}  {t['seconds']:6.1f} s"
              + (f"  {t['message']}" if t["message"] else ""))
    print(f"\nscenes done exactly once: {checks.get('scenes_done')}/{args.scenes}"
          f"  twice: {checks.get('scenes_done_twice')}  missing: {checks.get('scenes_missing')}"
          f"  not done: {checks.get('scene_states_not_done')}")
    print("\nbefore -> after the first tick -> after (last minus first tick; per tick):")
    for k, g in grown.items():
        print(f"  {k:28s} {g['before']:>12} -> {g['after_tick_1']:>12} -> {g['after']:>12}   "
              f"({g['after_minus_tick_1']:+}; {g['per_tick']})")
    print("\nactors alive by class, last sample:", samples[-1].get("actors_alive_by_class") if samples else None)
    print("ray:: processes by name, last sample:", samples[-1].get("ray_processes_by_name") if samples else None)
    print(f"\nhead stopped in {stopped} s; processes of the head left running: {len(left or [])}"
          f"; temp dir left: {temp_left}; head process left: {head_left}")
    for p in left or []:
        print(f"  pid {p['pid']}: {p['cmdline']}")
    print("\nmarkdown:\n" + markdown_table(samples))
    print(f"\n{'OK' if ok else 'FAILED'}: {error or ''}  (record appended to {args.record})")
    return 0 if ok and not left else 1


if __name__ == "__main__":
    sys.exit(main())
