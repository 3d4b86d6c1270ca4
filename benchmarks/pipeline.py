"""Pipeline cost on top of the model: feed rates per stage, and each job end to end beside the model alone.

One run (`make benchmark` runs the defaults) measures, on one generated scene:

1. the feed rate: single-core Mpx/s of each stage around the model (read,
   tile + stitch, write, count) with the per-pixel linear model, and from it
   how many host cores one GPU needs to keep each model fed;
2. for each stitch mode, `run_job` end to end (Ray read tasks, the model
   actor, device-side stitching, Zarr writes, counting behind the writes,
   overviews, Parquet reports), then the same lattice tiles through the model
   alone on its device, in the same process;
3. the same job with the per-pixel linear model: the pipeline's own ceiling.

Prints the figures side by side and appends one JSON line per measurement to
benchmarks/results.jsonl (with machine, date and commit); BENCHMARKS.md keeps the table.

    python benchmarks/pipeline.py --size 4096 --model hrnet_w18_small_v1 --stitch blend crop
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.run import run_job  # noqa: E402
from pipeline.synthetic import DEMO_CLASSES, write_synthetic_scene  # noqa: E402
from schemas.job import job_from_dict  # noqa: E402
from workers.predictor import ModelSource, TilePredictor  # noqa: E402


def _pss_tree(root: int) -> int:
    """Proportional set size (bytes) of ``root`` and all its descendants, from /proc.

    PSS splits shared pages (Ray's object store in /dev/shm, shared libraries)
    among the processes mapping them, so nothing is counted twice.
    """
    parents, pss = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss[int(d)] = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue
    return sum(size for pid, size in pss.items() if _descends_from(pid, root, parents))


def _descends_from(pid: int, root: int, parents: dict[int, int]) -> bool:
    """Whether ``pid`` is ``root`` or one of its descendants, by the parent of each process (``parents``)."""
    while pid and pid != root:
        pid = parents.get(pid, 0)
    return pid == root


def _lowest_priority() -> None:
    """This thread at niceness 19 (Linux: a thread is a task), below Ray's workers (15) and the driver (0)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class PeakMemory:
    """Samples the process tree's PSS in a thread; ``peak`` in bytes, ``cpu_seconds`` what sampling cost.

    Reading ``smaps_rollup`` walks each process's page tables: every 0.25 s it cost 16.6 CPU seconds in a
    119 s hrnet_w48 job, 14% of a core taken from the model actors (Ray runs them at niceness 15, this process
    at 0). So it samples once a second, at niceness 19, and says what it cost.
    """

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.cpu_seconds = 0.0

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        _lowest_priority()
        while not self._stop.is_set():
            self.peak = max(self.peak, _pss_tree(os.getpid()))
            self.cpu_seconds = time.thread_time()
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _warm_predictor(source: ModelSource, tile: int, batch: int | None, threads: int, mode: str) -> tuple[TilePredictor, torch.Tensor]:
    """A predictor with its model built and warmed up, and one full batch of tiles on its device."""
    predictor = TilePredictor(source, device="auto", batch_size=batch, threads=threads)
    size = predictor.batch_size_for(source.in_channels, tile)
    with torch.inference_mode():
        x = torch.randn((size, source.in_channels, tile, tile), generator=torch.Generator().manual_seed(0)).to(predictor.device)
        predictor._outputs(x, mode == "crop")
    return predictor, x


def _time_tiles(predictor: TilePredictor, x: torch.Tensor, n_tiles: int, mode: str) -> float:
    """Seconds for ``n_tiles`` tiles through the model on its device, in the pipeline's fixed-shape calls.

    Tiles are on the device already and the outputs stay there (probabilities
    for blend, class maps for crop): the model's own ceiling, with no copies.
    """
    with torch.inference_mode():
        t0 = time.perf_counter()
        done = 0
        while done < n_tiles:
            k = min(len(x), n_tiles - done)
            predictor._outputs(x[:k], mode == "crop")
            done += k
    return time.perf_counter() - t0


def model_alone(source: ModelSource, n_tiles: int, tile: int, batch: int | None, threads: int, mode: str) -> float:
    """Seconds for ``n_tiles`` tiles through the model alone in this process (warm)."""
    predictor, x = _warm_predictor(source, tile, batch, threads, mode)
    return _time_tiles(predictor, x, n_tiles, mode)


def _one_core_share(args: tuple) -> tuple[float, float]:
    source, n_tiles, tile, batch, mode, barrier = args
    torch.set_num_threads(1)
    predictor, x = _warm_predictor(source, tile, batch, 1, mode)  # built and warm before the clock
    barrier.wait()
    start = time.time()
    _time_tiles(predictor, x, n_tiles, mode)
    return start, time.time()


def model_alone_per_core(source: ModelSource, n_tiles: int, tile: int, batch: int | None, cores: int, mode: str) -> float:
    """Wall seconds for ``n_tiles`` tiles split over one single-threaded process per core: the CPU's best.

    Every process builds and warms its model, waits at a barrier, then runs its
    share; the time is from the first start to the last finish.
    """
    return per_core(_one_core_share, lambda k, barrier: (source, k, tile, batch, mode, barrier), n_tiles, cores)


def per_core(share, args_of, n_tiles: int, cores: int) -> float:
    """Wall seconds, first start to last finish, of ``share`` in one spawned process per core, each given
    ``args_of(its tiles, barrier)`` (the barrier: to wait at once warm); ``share`` returns its (start, end)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    barrier = manager.Barrier(cores)
    with ctx.Pool(cores) as pool:
        spans = pool.map(share, [args_of(k, barrier) for k in shares_of(n_tiles, cores)])
    manager.shutdown()
    return span_of(spans)


def shares_of(n_tiles: int, cores: int) -> list[int]:
    """``n_tiles`` split over ``cores`` workers as evenly as whole tiles allow."""
    return [n_tiles // cores + (i < n_tiles % cores) for i in range(cores)]


def span_of(spans: list[tuple[float, float]]) -> float:
    """Wall seconds from the first start to the last finish of workers' (start, end) times."""
    return max(end for _, end in spans) - min(start for start, _ in spans)


def feed_rates(image: Path, labels: Path, size: int, tile: int, overlap: int, chunk: int, stitch: str) -> dict:
    """Single-core Mpx/s of each stage around the model, with the per-pixel linear model (next to no model work).

    Every chunk of the scene is read, tiled and stitched, written to Zarr and
    counted against the labels, each stage timed on its own in this process
    with one torch thread: what one core feeds a model at.
    """
    from pipeline.counting import CountSpec, block_counts, geotiff_raster, mask_raster
    from pipeline.core.plan import plan_scene
    from workers.reader import open_scene, read_image_window
    from workers.mask_store import create_mask_store, write_mask_chunk

    torch.set_num_threads(1)
    info = open_scene(image)
    plan = plan_scene(size, size, tile=tile, overlap=overlap, chunk=chunk, mode=stitch)
    source = ModelSource("pixel_linear", info.count, len(DEMO_CLASSES))
    predictor = TilePredictor(source, device="cpu", batch_size=1, threads=1)
    store = image.parent.parent / f"feed_{size}_{stitch}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    create_mask_store(store, info, chunk, class_names=list(DEMO_CLASSES), job_id="benchmark")
    seconds = dict.fromkeys(("read", "tile + stitch", "write", "count"), 0.0)
    bands = list(range(1, info.count + 1))
    for task in plan.tasks():
        t0 = time.perf_counter()
        data = read_image_window(str(image), task.read, bands, [0.0] * len(bands), [1.0] * len(bands))
        t1 = time.perf_counter()
        result = predictor.predict_chunk(data, task, plan, "hann", "feed")
        t2 = time.perf_counter()
        write_mask_chunk(store, task.chunk, result.mask)
        t3 = time.perf_counter()
        seconds["read"] += t1 - t0
        seconds["tile + stitch"] += (t2 - t1) - result.work["model_seconds"]
        seconds["write"] += t3 - t2
    spec = CountSpec(len(DEMO_CLASSES))
    pred, lab = mask_raster(store), geotiff_raster(labels, (size, size), chunk)
    t0 = time.perf_counter()
    for task in plan.tasks():
        block_counts(task.chunk, pred, lab, None, spec)
    seconds["count"] = time.perf_counter() - t0
    seconds["model (1x1 conv)"] = predictor.model_seconds
    shutil.rmtree(store, ignore_errors=True)
    torch.set_num_threads(os.cpu_count() or 1)
    mpx = size * size / 1e6
    rates = {k: mpx / v for k, v in seconds.items()}
    host = ("read", "write", "count")
    return {
        "stage_mpx_per_s_per_core": {k: round(v, 1) for k, v in rates.items()},
        "feed_mpx_per_s_per_core": round(mpx / sum(seconds[k] for k in ("read", "tile + stitch", "write", "count")), 1),
        # on a GPU, tiling and stitching run on the device: the host's cores do the rest
        "host_feed_mpx_per_s_per_core": round(mpx / sum(seconds[k] for k in host), 1),
    }


GPU_MODEL_ALONE = {  # Mpx/s on one H200, bf16, batch 64, tile 512 (../shared/gpu/README.md, 2026-11-30)
    "hrnet_w48": 150, "hrnet_w18_small_v1": 972, "deeplabv3plus_resnet101": 344,
}


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {gpu}"


def end_to_end(args, data: Path, name: str, model: str, stitch: str, options: dict, cpus: int) -> dict:
    """One scene through `run_job`, then the same lattice tiles through the model alone, in this process."""
    import ray
    import pyarrow.parquet as pq

    from pipeline.cluster import connect
    from pipeline.core.plan import plan_scene

    job_dir = Path(args.out) / f"job_{args.size}_{model}_{stitch}"
    shutil.rmtree(job_dir, ignore_errors=True)
    spec = job_from_dict({
        "scenes": [{"image": str(data / f"{name}.tif"), "labels": str(data / f"{name}_labels.tif")}],
        "model": model, "model_options": options, "classes": DEMO_CLASSES, "tile_size": args.tile,
        "overlap": args.overlap, "chunk_size": args.chunk, "stitch": stitch, "batch_size": args.batch,
        "out": str(job_dir), "device": "auto",
    })
    started = time.perf_counter()
    connect(None)
    ray_start = time.perf_counter() - started
    with PeakMemory() as mem, CpuAccount() as cpu:
        t0 = time.perf_counter()
        result = run_job(spec, show_progress=False)
        wall = time.perf_counter() - t0
    scene = result.scenes[0]
    plan = plan_scene(args.size, args.size, tile=args.tile, overlap=args.overlap, chunk=spec.effective_chunk_size, mode=stitch)
    n_tiles = len(plan.lattice)
    report = pq.read_table(result.layout.reports / "scenes").to_pylist()[0]
    ray.shutdown()
    with PeakMemory() as mem_model:
        alone = model_alone(result.model.source, n_tiles, args.tile, args.batch, cpus, stitch)
    alone_how = f"one process, {cpus} threads" if not torch.cuda.is_available() else "one GPU"
    if not torch.cuda.is_available() and cpus > 1:  # the CPU's best: one single-threaded process per core, if faster
        per_core = model_alone_per_core(result.model.source, n_tiles, args.tile, args.batch, cpus, stitch)
        if per_core < alone:
            alone, alone_how = per_core, f"{cpus} processes, 1 thread each"
    shutil.rmtree(job_dir, ignore_errors=True)
    mpx = args.size * args.size / 1e6
    segmentation = scene.predict_seconds  # from the first read to the last write (counting runs alongside); start-up apart
    return {
        "model": model, "width_multiplier": options.get("width_multiplier", 1.0), "scene": f"{args.size}x{args.size}",
        "tile": args.tile, "overlap": args.overlap, "chunk": spec.effective_chunk_size, "stitch": stitch,
        "batch": args.batch, "lattice_tiles": n_tiles, "tiles_touching_chunks": plan.tiles_touching_chunks,
        "tiles_computed": report["tiles_computed"], "tiles_reused": report["tiles_reused"],
        "ray_start_seconds": round(ray_start, 2), "actor_startup_seconds": round(result.startup_seconds, 2),
        "pipeline_seconds_total": round(wall, 2), "pipeline_seconds_segmentation": round(segmentation, 2),
        "model_alone_seconds": round(alone, 2), "model_alone_how": alone_how,
        "model_seconds_inside_actors": round(report["model_seconds"], 2),
        "actor_busy_seconds": round(report["actor_busy_seconds"], 2),
        "ratio_segmentation_vs_model": round(segmentation / alone, 3),
        "ratio_total_vs_model": round(wall / alone, 3),
        "pipeline_mpx_per_s": round(mpx / segmentation, 2), "job_mpx_per_s": round(mpx / wall, 2),
        "model_mpx_per_s": round(mpx / alone, 2),
        "peak_pss_pipeline_mib": round(mem.peak / 2**20), "peak_pss_model_alone_mib": round(mem_model.peak / 2**20),
        "mean_iou_random_weights": scene.metrics.mean_iou if scene.metrics else None,
        "cpu_during_job": cpu.summary(), "pss_sampler_cpu_seconds": round(mem.cpu_seconds, 1),
    }


def _proc_cpu(pid: str) -> tuple[int, float, str] | None:
    """(parent pid, CPU seconds used so far, what it is) of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    first = argv[0].decode(errors="replace")
    name = first.split()[0] if first.startswith("ray::") else Path(first).name
    if name.startswith("python") and len(argv) > 1:  # Ray's python daemons: name them by their script
        name = next((Path(a.decode(errors="replace")).name for a in argv[1:] if a.endswith(b".py")), name)
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), name


class CpuAccount:
    """Where the CPU went while a job ran: CPU seconds of this process and each descendant, by what the process
    was when sampled (the driver; ``ray::TilePredictor``, the model actors; ``ray::<task>``; ``ray::IDLE``;
    raylet, gcs_server and Ray's Python agents), and the cores left idle (machine-wide, /proc/stat).

    A process seen first after the start counts from 0; a process's CPU between two samples goes to what it
    was at the later one, so a worker that changed task in between is attributed approximately.
    """

    def __init__(self, interval: float = 1.0):
        self.interval, self._stop = interval, threading.Event()
        self.seconds: dict[str, float] = {}
        self._last: dict[int, float] = {}

    @staticmethod
    def _idle() -> float:
        with open("/proc/stat") as f:
            cpu = f.readline().split()[1:]
        return (int(cpu[3]) + int(cpu[4])) / os.sysconf("SC_CLK_TCK")  # idle + iowait

    def _sample(self, first: bool = False) -> None:
        me = os.getpid()
        table = {int(d): info for d in os.listdir("/proc") if d.isdigit() and (info := _proc_cpu(d))}
        parents = {pid: info[0] for pid, info in table.items()}
        for pid, (_, used, name) in table.items():
            if not _descends_from(pid, me, parents):
                continue
            before = self._last.get(pid, used if first else 0.0)
            label = "driver" if pid == me else name
            self.seconds[label] = self.seconds.get(label, 0.0) + used - before
            self._last[pid] = used

    def __enter__(self):
        self._idle0, self._t0 = self._idle(), time.perf_counter()
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        _lowest_priority()
        while not self._stop.wait(self.interval):
            self._sample()
        self.sampler_cpu_seconds = time.thread_time()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self._t0
        self.idle = self._idle() - self._idle0

    def summary(self) -> dict:
        out = {k: round(v, 1) for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        return {"cpu_seconds": out, "idle_core_seconds": round(self.idle, 1), "wall_seconds": round(self.wall, 1),
                "of_which_this_sampler": round(self.sampler_cpu_seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="scene side in pixels (default 4096)")
    ap.add_argument("--model", default="hrnet_w18_small_v1")
    ap.add_argument("--width-multiplier", type=float, default=1.0)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=None, help="default: the job default (~2048, whole strides)")
    ap.add_argument("--stitch", nargs="+", default=["crop"], choices=["blend", "crop"])
    ap.add_argument("--batch", type=int, default=None, help="tiles per model call (default: automatic)")
    ap.add_argument("--no-feed", action="store_true", help="skip the per-stage feed rates")
    ap.add_argument("--no-probe", action="store_true", help="skip the end-to-end job with the per-pixel linear model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "output"))
    ap.add_argument("--record", default=str(ROOT / "benchmarks" / "results.jsonl"), help="append results here")
    args = ap.parse_args()

    data = Path(args.out) / "data"
    name = f"bench_{args.size}"
    if not (data / f"{name}.tif").exists():
        write_synthetic_scene(data, name, args.size, args.size, seed=7)
    from schemas.job import default_chunk_size

    chunk = args.chunk or default_chunk_size(args.tile, args.overlap)
    cpus = os.cpu_count() or 1
    header = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "torch": torch.__version__, "commit": _commit()}
    records = []
    if not args.no_feed:
        feed = feed_rates(data / f"{name}.tif", data / f"{name}_labels.tif", args.size, args.tile, args.overlap, chunk, args.stitch[0])
        records.append({**header, "kind": "feed", "scene": f"{args.size}x{args.size}", "chunk": chunk, "stitch": args.stitch[0], **feed})
    options = {"width_multiplier": args.width_multiplier} if args.width_multiplier != 1.0 else {}
    runs = [(args.model, s, options) for s in args.stitch]
    if not args.no_probe:
        runs.append(("pixel_linear", args.stitch[0], {}))
    for model, stitch, opts in runs:
        records.append({**header, "kind": "end_to_end", **end_to_end(args, data, name, model, stitch, opts, cpus)})
    with open(args.record, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    _print(records, cpus)


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def _print(records: list[dict], cpus: int) -> None:
    print(f"machine: {records[0]['machine']}  torch {records[0]['torch']}  commit {records[0]['commit']}  {records[0]['when']}")
    for r in records:
        if r["kind"] == "feed":
            print(f"\nfeed rate, one core, {r['scene']} chunk {r['chunk']} ({r['stitch']}), Mpx/s per core:")
            for stage, v in r["stage_mpx_per_s_per_core"].items():
                print(f"  {stage:18s} {v:8.1f}")
            print(f"  {'all but the model':18s} {r['feed_mpx_per_s_per_core']:8.1f}   (host stages only: {r['host_feed_mpx_per_s_per_core']})")
            print("  cores one GPU needs to keep each model fed (host stages; model alone on one H200, batch 64):")
            for model, rate in GPU_MODEL_ALONE.items():
                print(f"    {model:26s} {rate:5d} Mpx/s -> {rate / r['host_feed_mpx_per_s_per_core']:5.1f} cores")
    rows = [r for r in records if r["kind"] == "end_to_end"]
    if rows:
        print("\nend to end beside the model alone on the same tiles (segmentation: first read to last write, counting alongside;")
        print("job: actor start-up, segmentation, the rest of the counting, overviews, reports; Ray's own start apart):")
        cols = ("model", "stitch", "scene", "model_mpx_per_s", "pipeline_mpx_per_s", "job_mpx_per_s",
                "ratio_segmentation_vs_model", "ratio_total_vs_model", "model_seconds_inside_actors", "model_alone_seconds",
                "peak_pss_pipeline_mib")
        print("  " + " | ".join(cols))
        for r in rows:
            print("  " + " | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
