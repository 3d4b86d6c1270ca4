"""`satseg evaluate`: metrics of an existing mask (Zarr or GeoTIFF) against labels."""

from __future__ import annotations

import argparse

from pipeline.cli.summary import print_metrics
from pipeline.core.boundary import CONVENTIONS

HELP = "metrics of an existing mask against labels: any pair of GeoTIFFs or Zarr arrays on the same grid"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "pred",
        help="predicted mask: a satseg .zarr store (class indices, 255 = nodata), another Zarr array "
        "(STORE.zarr or STORE.zarr/ARRAY) or a single-band GeoTIFF; foreign masks hold label values",
    )
    p.add_argument(
        "labels", help="labels on the same grid: a GeoTIFF (a path, an s3:// gs:// http(s):// URL or a /vsi*/ path) or a Zarr array"
    )
    p.add_argument(
        "--classes",
        help="class names a,b,c (label value = index) or a mapping 10=tree,20=shrub (label value = name); "
        "default: those stored with the mask, or the job file's",
    )
    p.add_argument("--job", help="take classes (a list or a value: name mapping), ignore_index and boundary settings from a job file")
    p.add_argument("--ignore-index", type=int, help="label value counted nowhere (default 255)")
    p.add_argument("--boundary-width", type=int, help="boundary IoU band width in pixels (default 3)")
    p.add_argument(
        "--boundary-ratio", type=float,
        help="band width as this ratio of the image diagonal (the paper's rule, e.g. 0.02, meant for tile-sized images)",
    )
    p.add_argument("--trimap-max-width", type=int, help="trimap IoU for band widths 1..N px (default 10)")
    p.add_argument(
        "--boundary-convention", choices=CONVENTIONS,
        help="boundary bands: ignored and nodata pixels are neutral (default), or, as in the reference implementation, "
        "outside every class mask",
    )
    p.add_argument("--chunk-size", type=int, default=2048, help="chunk size for masks without chunks of their own (default 2048)")
    p.add_argument("--out", help="also write tiles/classes/scenes/curves reports under OUT/reports")


def main(args: argparse.Namespace) -> int:
    from pipeline.evaluate import ClassTable, evaluate_mask, parse_classes
    from schemas.errors import SpecError

    settings = {
        "ignore_index": 255, "boundary_width": 3, "boundary_ratio": None, "trimap_max_width": 10,
        "boundary_convention": "neutral",
    }
    table = None
    if args.job:
        from schemas.job import load_evaluation_spec

        spec = load_evaluation_spec(args.job)
        table = ClassTable(spec.class_names, spec.label_values) if spec.class_names else None
        settings.update({k: getattr(spec, k) for k in settings})
    if args.classes:
        table = parse_classes(args.classes)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if not (1 <= settings["boundary_width"] <= 256 and 1 <= settings["trimap_max_width"] <= 256):
        raise SpecError("--boundary-width and --trimap-max-width take 1 to 256 pixels")
    if settings["boundary_ratio"] is not None and not 0 < settings["boundary_ratio"] < 1:
        raise SpecError(f"--boundary-ratio {settings['boundary_ratio']}: give a ratio between 0 and 1, e.g. 0.02")
    result = evaluate_mask(args.pred, args.labels, classes=table, out=args.out, chunk=args.chunk_size, **settings)
    print_metrics(f"{result.name}: per-class metrics", result.class_names, result.metrics, result.scores)
    if result.reports:
        print(f"reports: {result.reports} (job id {result.job_id})")
    return 0
