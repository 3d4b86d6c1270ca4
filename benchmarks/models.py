"""Model-only throughput and peak memory of every registry model, at tile sizes 512 and 1024.

Each (model, tile) runs in its own subprocess so its peak memory is its own:
resident-set high-water mark on CPU, ``torch.cuda.max_memory_allocated`` on a
GPU. Batch 1 on CPU; on a GPU, batch 8 under bf16 autocast with channels_last,
as the pipeline runs it. Achieved FLOP rate is the model's FLOPs (torch's flop
counter) over the measured time; on a GPU it is also given as a fraction of
the card's dense bf16 peak (``--peak-tflops``, e.g. 989 for an H100 SXM).

    python benchmarks/models.py                 # every model, tiles 512 and 1024
    python benchmarks/models.py --models hrnet_w18_small_v1 --tiles 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _measure(name: str, tile: int, bands: int, classes: int, repeats: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from workers.models import create_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = 8 if cuda else 1
    torch.manual_seed(0)
    model = create_model(name, bands, classes).eval().to(device)
    x = torch.randn(batch, bands, tile, tile, device=device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(x[:1].float() if not cuda else x[:1])
        flops_per_tile = counter.get_total_flops()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        with ctx:
            model(x)  # warm-up
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(repeats):
                model(x)
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / repeats
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": name,
        "tile": tile,
        "batch": batch,
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "seconds_per_batch": round(seconds, 4),
        "megapixels_per_second": round(batch * tile * tile / 1e6 / seconds, 3),
        "gflops_per_tile": round(flops_per_tile / 1e9, 2),
        "achieved_tflops": round(batch * flops_per_tile / seconds / 1e12, 4),
        "peak_memory_mib": round(peak / 2**20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="default: every registry model")
    ap.add_argument("--tiles", nargs="*", type=int, default=[512, 1024])
    ap.add_argument("--bands", type=int, default=4)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for the fraction")
    ap.add_argument("--record", default=str(ROOT / "benchmarks" / "models.jsonl"))
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "TILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_measure(args.one[0], int(args.one[1]), args.bands, args.classes, args.repeats)))
        return
    from workers.models import list_models

    models = args.models or list_models()
    when = time.strftime("%Y-%m-%d %H:%M")
    print(f"{'model':28s} {'tile':>5s} {'batch':>5s} {'Mpx/s':>8s} {'GFLOP/tile':>10s} {'TFLOP/s':>8s} {'peak MiB':>9s}")
    for name in models:
        for tile in args.tiles:
            cmd = [sys.executable, __file__, "--one", name, str(tile), "--bands", str(args.bands),
                   "--classes", str(args.classes), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{name:28s} {tile:5d} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rec.update(when=when, machine=f"{platform.machine()} {os.cpu_count()} cores", torch=__import__("torch").__version__)
            if args.peak_tflops:
                rec["fraction_of_bf16_peak"] = round(rec["achieved_tflops"] / args.peak_tflops, 4)
            print(f"{name:28s} {tile:5d} {rec['batch']:5d} {rec['megapixels_per_second']:8.3f} "
                  f"{rec['gflops_per_tile']:10.1f} {rec['achieved_tflops']:8.4f} {rec['peak_memory_mib']:9d}")
            with open(args.record, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
