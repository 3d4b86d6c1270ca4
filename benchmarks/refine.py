"""Refinement after the network (issue 14): mean IoU, boundary IoU and cost of no refinement, SLIC and CRF.

Two scenes, both predicted by the demo's model (`pipeline.demo.prepare_demo`: trained on blob scenes): the demo scene
itself, and a scene of thin structures (`pipeline.synthetic.write_thin_structure_scene`: fields with roads, hedgerows
and rivers 2 to 5 px wide). Each runs through `satseg run` (`run_job`, local Ray, CPU) once per method with default
options; the table takes mean IoU, mean boundary IoU (3 px band), the IoU of the thin classes, and the job's Mpx/s.
The refinement alone is timed too, as the actor runs it (torch on CPU, one thread, on one chunk's region).

``--tune`` runs the parameter sweep the defaults were picked from, on the demo's *training* scene (never on the scenes
of the table): the network's stitched probabilities once, then each setting through the core functions.

    python benchmarks/refine.py                  # the table; appends to benchmarks/refine.jsonl
    python benchmarks/refine.py --tune           # the sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

THIN_SIZE = (1500, 1700)  # odd on purpose, like the demo scene
THIN_CLASSES = ("water", "urban")  # rivers and roads: the thin ones


def _commit() -> str:
    run = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = run("rev-parse", "--short", "HEAD") or "unknown"
    return f"uncommitted, on top of {head}" if run("status", "--porcelain") else head


def _scores(mask, labels, num_classes: int):
    """Mean IoU and boundary IoU of a whole mask, through the pipeline's own counting."""
    import dask

    from pipeline.core.metrics import scene_scores
    from pipeline.counting import array_raster, chunk_counts

    with dask.config.set(scheduler="synchronous"):
        counts = chunk_counts(array_raster(mask, 512), array_raster(labels, 512), num_classes)
    return scene_scores(counts.total_confusion, counts.total_boundary, counts.trimap)


def _network(image: Path, ckpt: Path, tile: int, overlap: int):
    """The whole scene's stitched probabilities (C, H, W) and classes, its normalised bands and valid pixels."""
    import numpy as np
    import torch

    from pipeline.core.geometry import Window
    from pipeline.core.plan import plan_scene
    from pipeline.core.stitch import stitch_chunk
    from workers.models import load_checkpoint, model_info
    from workers.predictor import ModelSource, TilePredictor
    from workers.reader import open_scene, read_image_window

    meta = load_checkpoint(ckpt)
    info = open_scene(str(image))
    source = ModelSource(meta.model, len(meta.bands), len(meta.class_names), dict(meta.model_kwargs), str(ckpt))
    predictor = TilePredictor(source, device="cpu", batch_size=4)
    mode = "blend" if model_info(meta.model).whole_tile_context else "crop"
    plan = plan_scene(info.height, info.width, tile=tile, overlap=overlap, chunk=max(info.height, info.width), mode=mode)
    task = plan.task(0, 0)
    data = read_image_window(str(image), task.read, list(meta.bands), list(meta.mean), list(meta.std))
    x = data.image
    tiles = []
    for r, c in task.tiles:
        win = plan.lattice.window(r, c)
        tiles.append((win, predictor.predict_batch(x[None, :, *win.slices_in(task.read)])[0]))
    classes, probs = stitch_chunk(task.chunk, tiles, lattice=plan.lattice, mode=mode, num_classes=len(meta.class_names),
                                  probabilities=True)
    inner = task.chunk.slices_in(task.read)
    valid = data.valid[inner]
    classes[~valid] = 255
    torch.set_num_threads(1)
    return probs, classes, np.ascontiguousarray(x[:, *inner]), valid, Window(0, 0, info.height, info.width)


def tune(args, scene: Path, labels: Path, ckpt: Path) -> None:
    """Every setting of a small grid on the training scene: mean IoU and boundary IoU against the labels."""
    import rasterio

    from pipeline.core.refine import refine_classes
    from schemas.refine import CRFOptions, SLICOptions

    probs, classes, image, valid, region = _network(scene, ckpt, args.tile, args.overlap)
    truth = rasterio.open(labels).read(1)
    base = _scores(classes, truth, probs.shape[0])
    print(f"none: mIoU {base.metrics.mean_iou:.4f} boundary IoU {base.mean_boundary_iou:.4f}")
    grid = [SLICOptions(step=s, compactness=m, vote=v) for s, m, v in itertools.product((8, 16, 24), (0.5, 1.0, 2.0, 4.0), ("mean", "majority"))]
    grid += [SLICOptions(iterations=k) for k in (3, 10)]
    grid += [CRFOptions(smooth_weight=sw, appearance_weight=aw, appearance_sigma_rgb=sr, appearance_sigma_xy=sa)
             for sw, aw, sr, sa in itertools.product((0.0, 1.0), (3.0, 6.0, 10.0, 15.0), (0.5, 1.0, 2.0), (3.0, 5.0))]
    grid += [CRFOptions(iterations=k) for k in (3, 10)]
    for options in grid:
        t0 = time.perf_counter()
        refined = refine_classes(probs, classes, image, valid, region, options)
        seconds = time.perf_counter() - t0
        s = _scores(refined, truth, probs.shape[0])
        print(f"{type(options).__name__[:-7]:4s} {json.dumps(options.model_dump())}: mIoU {s.metrics.mean_iou:.4f} "
              f"boundary IoU {s.mean_boundary_iou:.4f} ({seconds:.1f} s)")


def _refine_alone(probs, classes, image, valid, region, options, side: int) -> float:
    """Mpx of chunk per second of the refinement alone on one chunk of ``side`` px with its halo (torch, one thread)."""
    import torch

    from pipeline.core.geometry import Window
    from pipeline.core.refine import refine_classes, refine_region

    chunk = Window(region.height // 2 - side // 2, region.width // 2 - side // 2, side, side)
    if options is not None:
        chunk = Window(chunk.row_off - chunk.row_off % 32, chunk.col_off - chunk.col_off % 32, side, side)
    grown = refine_region(chunk, region.height, region.width, options)
    sl = grown.slices_in(region)
    part = [torch.from_numpy(a) for a in (probs[:, sl[0], sl[1]].copy(), classes[sl].copy(), image[:, sl[0], sl[1]].copy(), valid[sl].copy())]
    t0 = time.perf_counter()
    refine_classes(*part, grown, options)
    return side * side / 1e6 / (time.perf_counter() - t0), grown.height * grown.width / (side * side)


def table(args, scenes: dict, ckpt: Path) -> list[dict]:
    from pipeline.run import run_job
    from schemas.job import job_from_dict

    records = []
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = f"{platform.machine()} {os.cpu_count()} cores, CPU only"
    import torch

    for name, (image, labels) in scenes.items():
        probs = None
        for method in args.methods:
            out = Path(args.root) / "runs" / f"{name}_{method}_{args.chunk or 'default'}"
            spec = job_from_dict({
                "scenes": [{"image": str(image), "labels": str(labels), "name": name}], "checkpoint": str(ckpt),
                "tile_size": args.tile, "overlap": args.overlap, "device": "cpu", "out": str(out), "refine": method,
                "chunk_size": args.chunk,
            }, "benchmark")
            t0 = time.perf_counter()
            result = run_job(spec, show_progress=False)
            wall = time.perf_counter() - t0
            scene = result.scenes[0]
            names = result.model.class_names
            iou = {c: float(scene.metrics.iou[names.index(c)]) for c in THIN_CLASSES}
            rec = {
                "kind": "refine", "when": when, "machine": machine, "torch": torch.__version__, "commit": _commit(),
                "scene": name, "method": method, "options": spec.refine_options, "mean_iou": scene.metrics.mean_iou,
                "mean_boundary_iou": scene.scores.mean_boundary_iou, "thin_iou": iou,
                "job_mpx_per_s": scene.megapixels_per_second, "wall_seconds": wall,
                "chunk_size": spec.effective_chunk_size,
            }
            if method != "none":
                if probs is None:
                    probs = _network(image, ckpt, args.tile, args.overlap)
                rate, area = _refine_alone(*probs, spec.refine_settings, min(spec.effective_chunk_size, args.alone_side))
                rec.update(refine_alone_mpx_per_s=rate, region_over_chunk=area, alone_side=min(spec.effective_chunk_size, args.alone_side))
            records.append(rec)
            print(json.dumps(rec), flush=True)
    return records


def _print(records: list[dict]) -> None:
    r0 = records[0]
    print(f"\nmachine: {r0['machine']}, torch {r0['torch']}, {r0['when']}, commit {r0['commit']}\n")
    print("| scene | refine | mean IoU | mean boundary IoU | IoU water / urban | chunk | job Mpx/s | refinement alone, Mpx/s (region / chunk) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        alone = f"{r['refine_alone_mpx_per_s']:.3f} ({r['region_over_chunk']:.2f}x)" if "refine_alone_mpx_per_s" in r else "-"
        thin = " / ".join(f"{v:.3f}" for v in r["thin_iou"].values())
        print(f"| {r['scene']} | {r['method']} | {r['mean_iou']:.4f} | {r['mean_boundary_iou']:.4f} | {thin} | "
              f"{r['chunk_size']} | {r['job_mpx_per_s']:.3f} | {alone} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT / "benchmarks" / "output" / "refine"))
    p.add_argument("--methods", nargs="+", default=["none", "slic", "crf"])
    p.add_argument("--tile", type=int, default=256)  # the demo's tiling
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--chunk", type=int, help="the jobs' chunk_size (default: the job default, about 2048 px)")
    p.add_argument("--alone-side", type=int, default=1024, help="chunk side for timing the refinement alone")
    p.add_argument("--tune", action="store_true", help="the parameter sweep on the demo's training scene")
    p.add_argument("--record", default=str(ROOT / "benchmarks" / "refine.jsonl"))
    args = p.parse_args()

    from pipeline.demo import prepare_demo
    from pipeline.synthetic import write_thin_structure_scene

    root = Path(args.root)
    demo_scene, demo_labels, ckpt = prepare_demo(root / "demo", show_progress=False)
    if args.tune:
        data = root / "demo" / "data"
        tune(args, data / "train_scene.tif", data / "train_scene_labels.tif", ckpt)
        return
    thin = root / "data" / "thin_scene.tif"
    if not thin.exists():
        write_thin_structure_scene(root / "data", "thin_scene", *THIN_SIZE, seed=11)
    scenes = {"demo_scene": (demo_scene, demo_labels), "thin_scene": (thin, root / "data" / "thin_scene_labels.tif")}
    records = table(args, scenes, ckpt)
    with open(args.record, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    _print(records)


if __name__ == "__main__":
    main()
