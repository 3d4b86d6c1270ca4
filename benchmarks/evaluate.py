"""Evaluation cost: seconds per megapixel of the Dask reduction, from a real Zarr mask and a label GeoTIFF.

Variants: confusion-matrix metrics only (boundary width 1, trimap 1), plus boundary IoU and a 10-width
trimap (the defaults), plus PR histograms from stored probabilities. Peak RSS of the process is recorded
too, to show memory does not follow the scene size.

    python benchmarks/evaluate.py                # 4096 x 4096 and 8192 x 8192, chunk 2048
    python benchmarks/evaluate.py --sizes 2048
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

CLASSES = 5


def _write_inputs(folder: Path, size: int, chunk: int) -> tuple[Path, Path]:
    """A blocky label GeoTIFF and a Zarr mask (5% of pixels wrong) with probabilities, written chunk by chunk."""
    import numpy as np
    import rasterio
    import zarr
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    labels = folder / "labels.tif"
    profile = dict(driver="GTiff", height=size, width=size, count=1, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(500000, 4600000, 10, 10), tiled=True, blockxsize=512, blockysize=512)
    store = folder / "mask.zarr"
    root = zarr.open_group(str(store), mode="w")
    mask = root.create_array("mask", shape=(size, size), chunks=(chunk, chunk), dtype="uint8", fill_value=255)
    probs = root.create_array("probabilities", shape=(CLASSES, size, size), chunks=(CLASSES, chunk, chunk), dtype="uint8")
    with rasterio.open(labels, "w", **profile) as dst:
        for r in range(0, size, chunk):
            for c in range(0, size, chunk):
                h, w = min(chunk, size - r), min(chunk, size - c)
                coarse = rng.integers(0, CLASSES, (h // 32 + 1, w // 32 + 1))
                truth = np.kron(coarse, np.ones((32, 32), dtype=np.uint8))[:h, :w]
                pred = truth.copy()
                wrong = rng.random((h, w)) < 0.05
                pred[wrong] = rng.integers(0, CLASSES, int(wrong.sum()))
                dst.write(truth, 1, window=rasterio.windows.Window(c, r, w, h))
                mask[r : r + h, c : c + w] = pred
                probs[:, r : r + h, c : c + w] = rng.integers(0, 256, (CLASSES, h, w), dtype=np.uint8)
    return store, labels


def _one(folder: Path, size: int, chunk: int, variant: str) -> dict:
    import dask

    from pipeline.counting import chunk_counts, geotiff_raster, mask_raster, probabilities_raster

    store, labels = folder / "mask.zarr", folder / "labels.tif"
    mask = mask_raster(store)
    lab = geotiff_raster(labels, mask.shape, chunk)
    kwargs = {
        "confusion": dict(boundary_width=1, trimap_max=1),
        "boundary+trimap": dict(boundary_width=3, trimap_max=10),
        "boundary+trimap+pr": dict(boundary_width=3, trimap_max=10, probabilities=probabilities_raster(store)),
    }[variant]
    started = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        chunk_counts(mask, lab, CLASSES, **kwargs)
    seconds = time.perf_counter() - started
    mpx = size * size / 1e6
    return {
        "benchmark": "evaluate", "size": size, "chunk": chunk, "variant": variant, "seconds": round(seconds, 3),
        "seconds_per_mpx": round(seconds / mpx, 4), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # one measurement, in its own process so its peak memory is its own
        if args.variant == "write":
            _write_inputs(Path(args.folder), args.size, args.chunk)
            return
        print(json.dumps(_one(Path(args.folder), args.size, args.chunk, args.variant)))
        return
    out = Path(__file__).with_name("evaluate.jsonl")
    for size in args.sizes:
        tmp = tempfile.TemporaryDirectory()
        base = [sys.executable, __file__, "--size", str(size), "--chunk", str(args.chunk), "--folder", tmp.name]
        subprocess.run([*base, "--variant", "write"], check=True)
        for variant in ("confusion", "boundary+trimap", "boundary+trimap+pr"):
            cmd = [*base, "--variant", variant]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            print(f"{size}x{size} {variant:20s} {row['seconds']:7.2f} s  {row['seconds_per_mpx']:.3f} s/Mpx  peak RSS {row['peak_rss_mib']} MiB")
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        tmp.cleanup()


if __name__ == "__main__":
    main()
