"""`satseg objects`: a finished job's objects: instance ids (Zarr), polygons (GeoParquet) and object metrics."""

from __future__ import annotations

import argparse

from schemas.errors import SpecError

HELP = (
    "objects of a finished job's masks: the thing classes' connected components as ids beside the mask, one polygon "
    "per object (GeoParquet), and with labels F1, PQ, SQ and RQ per class (README: Objects)"
)


def thing_names(text: str | None) -> list[str] | None:
    """``--things building,pond`` as class names (blanks dropped); None when the flag is not given.

    `satseg run` uses it too, so both commands read the flag by one rule.
    """
    if not text:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise SpecError(f"--things {text!r} names no class; give one or more, e.g. --things building,pond")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="a finished job's output folder (holding job.json)")
    p.add_argument("--things", help="thing classes, comma-separated, e.g. building,pond (default: the job's `things`)")
    p.add_argument(
        "--connectivity", type=int, choices=[4, 8], default=None,
        help="4: pixels sharing an edge are one object; 8: sharing a corner too (default: the job's, else 4)",
    )
    p.add_argument(
        "--simplify", type=float, default=None, metavar="MAP_UNITS",
        help="simplify stored polygons to this tolerance in the scene CRS's units, topology kept (default: the job's, "
        "else pixel-exact)",
    )
    p.add_argument("--scene", action="append", help="only this scene (repeat for more; default: every finished scene)")
    p.add_argument(
        "--instances", action="append", metavar="[SCENE=]PATH",
        help="a raster of true object ids (0: none) on the labels' grid: score against these objects instead of the "
        "labels' components (default: the scene's `instances`)",
    )


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.objects import folder_objects
    from schemas.store import OutputLayout

    results = folder_objects(
        args.out, things=thing_names(args.things), connectivity=args.connectivity, simplify=args.simplify, scenes=args.scene,
        instances=args.instances,
    )
    layout = OutputLayout(Path(args.out))
    for r in results:
        line = f"objects: {r.scene}: {r.objects} objects from {r.chunks} chunks"
        if r.scores is not None:
            things_ = r.scores.summary("things")
            every = r.scores.summary("all")
            line += (
                f"; {r.truth_objects} true; things F1 {things_['f1']:.3f} (TP {things_['true_positives']}, "
                f"FP {things_['false_positives']}, FN {things_['false_negatives']}), PQ {every['pq']:.3f}"
            )
        print(line)
    if not results:
        print(f"objects: no finished scene in {layout.root}")
    else:
        print(f"tables: {layout.reports}/objects, object_metrics, object_misses (satseg query --reports {layout.root})")
    return 0
