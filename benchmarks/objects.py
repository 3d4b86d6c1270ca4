"""The object pass at scale: a scene of about a million objects, its merge, its polygons, and the memory it takes.

Each scene is a grid of small blobs (a 2 x 2 square with pixels dropped at random, one per cell of
``cell`` px, class building or pond), crossed by ponds three pixels wide every 997 rows that span every
chunk, and roads (stuff) every 1009 columns; the labels drop and add blobs. Each measurement runs in its
own process, so its peak RSS is its own; the baseline is that process's RSS after its imports.

    python benchmarks/objects.py                        # 4000 and 8000 px at cell 4: 0.9 and 3.8 million objects
    python benchmarks/objects.py --chunk 1022           # chunk borders cut thousands of objects (1024 cuts none)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAMES = ["ground", "building", "pond", "road"]
THINGS = ["building", "pond"]


def _blocks(rng, h: int, w: int, r0: int, c0: int, cell: int):
    """Prediction and truth of one chunk (uint8 classes), drawn cell by cell."""
    import numpy as np

    rows, cols = h // cell + 2, w // cell + 2
    kind = rng.integers(1, 3, (rows, cols))
    present = rng.random((2, rows, cols))
    out = []
    for k, keep in enumerate((0.9, 0.85)):  # prediction, truth: each misses some blobs
        blob = np.zeros((rows, cols, cell, cell), np.uint8)
        inside = rng.random((rows, cols, 2, 2)) > 0.2
        blob[:, :, 1:3, 1:3] = np.where(inside, kind[:, :, None, None], 0)
        blob[present[k] > keep] = 0
        full = blob.transpose(0, 2, 1, 3).reshape(rows * cell, cols * cell)
        off_r, off_c = r0 % cell, c0 % cell
        full = full[off_r : off_r + h, off_c : off_c + w].copy()
        rr = np.arange(r0, r0 + h)
        full[(rr % 997) < 3, :] = 2  # ponds spanning the scene
        full[:, (np.arange(c0, c0 + w) % 1009) < 4] = 3  # roads
        out.append(full)
    return out


def _write_inputs(folder: Path, size: int, cell: int, chunk: int) -> None:
    import numpy as np
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from pipeline.core.geometry import Window
    from workers.mask_store import create_mask_store, mark_complete, write_mask_chunk
    from workers.reader import SceneInfo

    transform = from_origin(500000, 4600000, 0.5, 0.5)
    info = SceneInfo("bench", size, size, 1, "uint8", CRS.from_epsg(32633).to_wkt(), tuple(transform)[:6], None)
    store = folder / "mask.zarr"
    create_mask_store(store, info, chunk, class_names=NAMES, job_id="bench")
    profile = dict(driver="GTiff", height=size, width=size, count=1, dtype="uint8", crs="EPSG:32633", transform=transform,
                   tiled=True, blockxsize=512, blockysize=512, nodata=255, compress="deflate")
    rng = np.random.default_rng(0)
    with rasterio.open(folder / "labels.tif", "w", **profile) as dst:
        for r in range(0, size, chunk):
            for c in range(0, size, chunk):
                h, w = min(chunk, size - r), min(chunk, size - c)
                pred, truth = _blocks(rng, h, w, r, c, cell)
                write_mask_chunk(store, Window(r, c, h, w), pred)
                dst.write(truth, 1, window=rasterio.windows.Window(c, r, w, h))
    mark_complete(store)


def _rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _one(folder: Path, size: int, cell: int, chunk: int) -> dict:
    import dask

    from pipeline.objects import object_spec, scene_objects
    from schemas.store import OutputLayout
    from workers.mask_store import open_mask_store

    mask = open_mask_store(folder / "mask.zarr", then="rerun")
    spec = object_spec(NAMES, THINGS)
    baseline = _rss_mib()
    with dask.config.set(scheduler="threads"):
        result = scene_objects(OutputLayout(folder / "out"), "bench", "bench", folder / "mask.zarr", spec,
                               transform=mask.transform, crs=mask.crs, labels=str(folder / "labels.tif"))
    things = result.scores.summary("things")
    s = result.seconds
    return {
        "benchmark": "objects", "size": size, "cell": cell, "chunk": chunk, "chunks": result.chunks,
        "objects": result.objects, "truth_objects": result.truth_objects, "merged_objects": result.merged,
        "segments_seconds": round(s["segments"], 2), "merge_seconds": round(s["merge"], 3),
        "instances_seconds": round(s["instances"], 2), "polygons_seconds": round(s["polygons"], 2),
        "total_seconds": round(s["total"], 2), "polygons_per_second": round(result.polygons_per_second),
        "peak_rss_mib": _rss_mib(), "baseline_rss_mib": baseline, "f1_things": round(things["f1"], 4),
        "objects_parquet_mib": round((folder / "out/reports/objects/job_id=bench/bench.parquet").stat().st_size / 2**20, 1),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", nargs="+", default=["4000:4", "8000:4"], help="SIZE:CELL each")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cell", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "write":
        _write_inputs(Path(args.folder), args.size, args.cell, args.chunk)
        return
    if args.step == "measure":  # in its own process, so its peak memory is its own
        print(json.dumps(_one(Path(args.folder), args.size, args.cell, args.chunk)))
        return
    out = Path(__file__).with_name("objects.jsonl")
    for scene in args.scenes:
        size, cell = (int(v) for v in scene.split(":"))
        with tempfile.TemporaryDirectory() as tmp:
            base = [sys.executable, __file__, "--size", str(size), "--cell", str(cell), "--chunk", str(args.chunk)]
            base += ["--folder", tmp]
            started = time.perf_counter()
            subprocess.run([*base, "--step", "write"], check=True)
            print(f"{size} x {size} px written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            run = subprocess.run([*base, "--step", "measure"], check=True, capture_output=True, text=True)
            row = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"{size} x {size} px, {row['objects']:,} objects ({row['merged_objects']:,} on chunk borders, {row['chunks']} "
            f"chunks): segments {row['segments_seconds']} s, "
            f"merge {row['merge_seconds']} s, instances+counts {row['instances_seconds']} s, polygons "
            f"{row['polygons_seconds']} s ({row['polygons_per_second']:,}/s); peak RSS {row['peak_rss_mib']} MiB "
            f"(baseline {row['baseline_rss_mib']})"
        )
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
