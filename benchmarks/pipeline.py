"""Pipeline cost on top of the model: one scene end to end vs the same tiles through the model alone.

Runs, in one process: (1) `run_job` on a generated scene (Ray read tasks,
model actor, stitching, Zarr writes, Dask evaluation, Parquet reports), and
(2) the scene's lattice tiles, each once, through the same `TilePredictor`
with no Ray and no I/O. Prints both times, their ratio, megapixels per second
and peak memory (PSS of the driver plus its Ray processes). Figures go to BENCHMARKS.md.

    python benchmarks/pipeline.py --size 4096 --model hrnet_w18_small_v1
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

import numpy as np
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
    total = 0
    for pid in pss:
        p = pid
        while p and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += pss[pid]
    return total


class PeakMemory:
    """Samples the process tree's PSS in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _pss_tree(os.getpid()))
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def model_alone(source: ModelSource, n_tiles: int, tile: int, batch: int, threads: int, mode: str) -> float:
    """Seconds to run ``n_tiles`` tiles through the model (warm), including softmax/argmax to host."""
    predictor = TilePredictor(source, device="auto", batch_size=batch, threads=threads)
    batch = predictor.batch_size_for(source.in_channels, tile)  # the pipeline's choice when not given
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, source.in_channels, tile, tile)).astype(np.float32)
    predictor.predict_batch(x[:1], classes=mode == "crop")  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n_tiles:
        k = min(batch, n_tiles - done)
        predictor.predict_batch(x[:k], classes=mode == "crop")
        done += k
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="scene side in pixels (default 4096)")
    ap.add_argument("--model", default="hrnet_w18_small_v1")
    ap.add_argument("--width-multiplier", type=float, default=1.0)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=None, help="default: the job default (~2048, whole strides)")
    ap.add_argument("--stitch", default="blend", choices=["blend", "crop"])
    ap.add_argument("--batch", type=int, default=None, help="tiles per model call (default: automatic)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "output"))
    ap.add_argument("--record", default=str(ROOT / "benchmarks" / "results.jsonl"), help="append results here")
    args = ap.parse_args()

    out = Path(args.out)
    data = out / "data"
    name = f"bench_{args.size}"
    if not (data / f"{name}.tif").exists():
        write_synthetic_scene(data, name, args.size, args.size, seed=7)
    job_dir = out / f"job_{args.size}_{args.stitch}"
    shutil.rmtree(job_dir, ignore_errors=True)
    options = {"width_multiplier": args.width_multiplier} if args.width_multiplier != 1.0 else {}
    spec = job_from_dict({
        "scenes": [{"image": str(data / f"{name}.tif"), "labels": str(data / f"{name}_labels.tif")}],
        "model": args.model, "model_options": options, "classes": DEMO_CLASSES, "tile_size": args.tile,
        "overlap": args.overlap, "chunk_size": args.chunk, "stitch": args.stitch, "batch_size": args.batch,
        "out": str(job_dir), "device": "auto",
    })
    import ray

    from pipeline.cluster import connect

    connect(None)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = run_job(spec, show_progress=False)
        wall = time.perf_counter() - t0
    scene = result.scenes[0]
    from pipeline.plan import plan_scene

    plan = plan_scene(args.size, args.size, tile=args.tile, overlap=args.overlap, chunk=spec.effective_chunk_size, mode=args.stitch)
    n_tiles = len(plan.lattice)
    import pyarrow.parquet as pq

    report = pq.read_table(result.layout.reports / "scenes").to_pylist()[0]
    ray.shutdown()
    with PeakMemory() as mem_model:
        alone = model_alone(result.model.source, n_tiles, args.tile, args.batch, cpus, args.stitch)
    mpx = args.size * args.size / 1e6
    record = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
        "torch": torch.__version__,
        "model": args.model, "width_multiplier": args.width_multiplier, "scene": f"{args.size}x{args.size}",
        "tile": args.tile, "overlap": args.overlap, "chunk": spec.effective_chunk_size, "stitch": args.stitch,
        "batch": args.batch, "lattice_tiles": n_tiles, "tiles_touching_chunks": plan.tiles_touching_chunks,
        "tiles_computed": report["tiles_computed"], "tiles_reused": report["tiles_reused"],
        "actor_startup_seconds": round(result.startup_seconds, 2),
        "pipeline_seconds_total": round(wall, 2), "pipeline_seconds_segmentation": round(scene.predict_seconds, 2),
        "model_alone_seconds": round(alone, 2),
        "model_seconds_inside_actors": round(report["model_seconds"], 2),
        "actor_busy_seconds": round(report["actor_busy_seconds"], 2),
        "ratio_segmentation_vs_model": round(scene.predict_seconds / alone, 3),
        "ratio_total_vs_model": round(wall / alone, 3),
        "pipeline_mpx_per_s": round(mpx / scene.predict_seconds, 3), "model_mpx_per_s": round(mpx / alone, 3),
        "peak_pss_pipeline_mib": round(mem.peak / 2**20), "peak_pss_model_alone_mib": round(mem_model.peak / 2**20),
        "mean_iou_random_weights": scene.metrics.mean_iou if scene.metrics else None,
    }
    for k, v in record.items():
        print(f"{k:32s} {v}")
    with open(args.record, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
