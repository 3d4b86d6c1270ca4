"""The model inside Ray actors against the model in plain processes, with nothing else running.

The end-to-end benchmark (`benchmarks/pipeline.py`) found hrnet_w48 about 10% slower inside the job's two
single-threaded actors than alone, more than the host stages and Ray's resident processes explain. This one
removes the pipeline: the same warm model and the same tiles, timed the same way (`_time_tiles`), once in one
plain single-threaded process per core and once in one single-threaded Ray actor per core, placed as `run_job`
places CPU actors (num_cpus=0, SPREAD). The two sides alternate, so drift on a shared VM hits both.

    python benchmarks/actor_overhead.py --model hrnet_w48 --tiles 6 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.predictor import ModelSource  # noqa: E402


def _bench():
    """benchmarks/pipeline.py, whose timing this reuses (loaded by path: its name is the `pipeline` package's)."""
    import importlib.util

    if "satseg_bench_pipeline" not in sys.modules:
        spec = importlib.util.spec_from_file_location("satseg_bench_pipeline", ROOT / "benchmarks" / "pipeline.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["satseg_bench_pipeline"]


class _Timer:
    """A Ray actor that holds a warm single-threaded model and times tiles through it, as `_one_core_share` does."""

    def __init__(self, source: ModelSource, tile: int, mode: str) -> None:
        import torch

        torch.set_num_threads(1)
        self.predictor, self.x = _bench()._warm_predictor(source, tile, None, 1, mode)
        self.mode = mode

    def ready(self) -> int:
        return os.getpid()

    def run(self, n_tiles: int, start_at: float) -> tuple[float, float]:
        while time.time() < start_at:  # a shared start, as the plain processes' barrier
            time.sleep(0.001)
        start = time.time()
        _bench()._time_tiles(self.predictor, self.x, n_tiles, self.mode)
        return start, time.time()


def _plain_share(args: tuple) -> tuple[float, float]:
    source, n_tiles, tile, mode, barrier, nice = args
    os.nice(nice)
    timer = _Timer(source, tile, mode)  # built and warm before the clock
    barrier.wait()
    return timer.run(n_tiles, time.time())


def in_processes(source: ModelSource, n_tiles: int, tile: int, cores: int, mode: str, nice: int = 0) -> float:
    """Wall seconds from the first start to the last finish, one plain single-threaded process per core (at
    ``nice`` more than this one's niceness: Ray starts its workers at 15)."""
    return _bench().per_core(_plain_share, lambda k, barrier: (source, k, tile, mode, barrier, nice), n_tiles, cores)


def in_actors(source: ModelSource, n_tiles: int, tile: int, cores: int, mode: str) -> float:
    import ray

    cls = ray.remote(_Timer).options(num_cpus=0, scheduling_strategy="SPREAD")
    actors = [cls.remote(source, tile, mode) for _ in range(cores)]
    ray.get([a.ready.remote() for a in actors])
    start_at = time.time() + 1.0
    spans = ray.get([a.run.remote(k, start_at) for a, k in zip(actors, _bench().shares_of(n_tiles, cores))])
    for a in actors:
        ray.kill(a)
    return _bench().span_of(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hrnet_w48")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--tiles", type=int, default=6, help="tiles in all, split over the cores")
    parser.add_argument("--mode", default="crop", choices=["crop", "blend"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-nice", type=int, default=0, help="niceness added to the plain processes (Ray's workers: 15)")
    args = parser.parse_args()

    from pipeline.cluster import connect

    cores = os.cpu_count() or 1
    source = ModelSource(args.model, 4, 5)
    connect(None)
    rows = []
    for r in range(args.repeats):
        plain = in_processes(source, args.tiles, args.tile, cores, args.mode, args.plain_nice)
        actor = in_actors(source, args.tiles, args.tile, cores, args.mode)
        rows.append({"repeat": r, "plain_s": round(plain, 2), "actors_s": round(actor, 2), "ratio": round(actor / plain, 3)})
        print(rows[-1], flush=True)
    record = {
        "benchmark": "actor_overhead", "machine": _bench().machine(), "commit": _bench()._commit(), "date": time.strftime("%Y-%m-%d"),
        "model": args.model, "tile": args.tile, "tiles": args.tiles, "mode": args.mode, "plain_nice": args.plain_nice, "cores": cores, "rows": rows,
    }
    with open(ROOT / "benchmarks" / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
