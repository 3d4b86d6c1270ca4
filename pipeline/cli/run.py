"""`satseg run`: run a tiling job from a job file or from flags."""

from __future__ import annotations

import argparse

from pipeline.cli.objects import thing_names
from pipeline.cli.summary import print_job_summary
from pipeline.core.boundary import CONVENTIONS
from schemas.errors import SpecError
from schemas.job import DEVICES, job_from_dict, load_job

HELP = "run a tiling job (JOB.yaml, or --image ...) on the local Ray instance or a given cluster"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job YAML file (scenes, model, tiling); flags below override it")
    p.add_argument(
        "--image",
        help="input GeoTIFF (instead of a job file): a path, an s3:// gs:// http(s):// URL or a /vsi*/ path; "
        "with --stac-bands a STAC item (JSON file or URL)",
    )
    p.add_argument("--labels", help="label GeoTIFF aligned with the image (a path or URL, as --image); enables metrics")
    p.add_argument(
        "--stac-bands",
        help="--image is a STAC item: stack its assets of these bands, by common name or asset key, in this order "
        "(e.g. blue,green,red,nir)",
    )
    p.add_argument("--name", help="scene name for outputs (default: image file name)")
    p.add_argument("--model", help="registry model name (see workers.models); implied by --checkpoint")
    p.add_argument("--checkpoint", help="safetensors checkpoint written by `satseg train`")
    p.add_argument("--classes", help="comma-separated class names (needed without a checkpoint)")
    p.add_argument("--bands", help="comma-separated 1-based band indexes (default: checkpoint's, else all)")
    p.add_argument("--tile-size", type=int, help="tile size in pixels, a multiple of 32 (default 512)")
    p.add_argument("--overlap", type=int, help="overlap between neighbouring tiles in pixels (default 64)")
    p.add_argument("--chunk-size", type=int, help="output chunk size in pixels (default: ~2048, whole strides)")
    p.add_argument(
        "--stitch", choices=["auto", "blend", "crop"],
        help="blend overlapping tiles or crop their cores (default auto: blend for models with image pooling, else crop)",
    )
    p.add_argument("--window", choices=["hann", "triangular", "gaussian", "uniform"], help="blend window (default hann)")
    p.add_argument(
        "--batch-size", type=int, help="tiles per model call (default: what ~70%% of free GPU memory holds, up to 64; 1 on CPU)"
    )
    p.add_argument(
        "--tta", choices=["none", "flip", "d4"],
        help="test-time augmentation: average logits over a horizontal flip (flip) or all 8 flips/rotations (d4); default none",
    )
    p.add_argument(
        "--compile", action="store_true", default=None,
        help="run the model through torch.compile (slower start, faster tiles; falls back to eager if compilation fails)",
    )
    p.add_argument("--num-actors", type=int, help="model actors (default: one per GPU, else one)")
    p.add_argument("--device", choices=DEVICES, help="where models run (default auto)")
    p.add_argument("--ignore-index", type=int, help="label value counted nowhere (default 255)")
    p.add_argument(
        "--save-probabilities", action="store_true", default=None,
        help="store per-class probabilities (uint8, p = value/255) beside the mask; adds PR curves and AP to the reports",
    )
    p.add_argument(
        "--refine", choices=["none", "slic", "crf"],
        help="refine the stitched probabilities before argmax: SLIC superpixel votes or a mean-field CRF, with their "
        "default options (others: refine_options in a job file); default none",
    )
    p.add_argument(
        "--things",
        help="thing classes, comma-separated, e.g. building,pond: their connected components become objects (ids, "
        "polygons and object metrics; README: Objects); default: the job's, else none",
    )
    p.add_argument(
        "--connectivity", type=int, choices=[4, 8],
        help="objects: 4, pixels sharing an edge are one object; 8, sharing a corner too (default: the job's, else 4)",
    )
    p.add_argument(
        "--simplify", type=float, metavar="MAP_UNITS",
        help="objects: simplify stored polygons to this tolerance in the scene CRS's units, topology kept "
        "(default: the job's, else pixel-exact)",
    )
    p.add_argument("--boundary-width", type=int, help="boundary IoU band width in pixels (default 3)")
    p.add_argument(
        "--boundary-ratio", type=float,
        help="boundary band width as this ratio of the scene diagonal (the paper's rule, for tile-sized images)",
    )
    p.add_argument("--trimap-max-width", type=int, help="trimap IoU for band widths 1..N px (default 10)")
    p.add_argument(
        "--boundary-convention", choices=CONVENTIONS,
        help="boundary bands: ignored and nodata pixels are neutral (default), or, as in the reference implementation, "
        "outside every class mask",
    )
    p.add_argument("--out", help="output folder (default satseg-output)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


_FLAG_FIELDS = {
    "model": "model", "checkpoint": "checkpoint", "tile_size": "tile_size", "overlap": "overlap",
    "chunk_size": "chunk_size", "stitch": "stitch", "window": "window", "batch_size": "batch_size",
    "num_actors": "num_actors", "device": "device", "tta": "tta", "compile": "compile",
    "ignore_index": "ignore_index", "out": "out", "address": "address", "save_probabilities": "save_probabilities",
    "boundary_width": "boundary_width", "boundary_ratio": "boundary_ratio", "trimap_max_width": "trimap_max_width",
    "boundary_convention": "boundary_convention", "refine": "refine", "connectivity": "connectivity",
    "simplify": "simplify",
}


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SpecError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 1,2,3,4") from None


def spec_from_args(args: argparse.Namespace):
    overrides = {f: getattr(args, a) for a, f in _FLAG_FIELDS.items() if getattr(args, a) is not None}
    if args.classes:
        overrides["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.bands:
        overrides["bands"] = _int_list(args.bands, "--bands")
    things = thing_names(args.things)  # the rule of `satseg objects --things`
    if things is not None:
        overrides["things"] = things  # checked against the classes here, or a checkpoint's in run_job
    if args.job:
        if args.image or args.stac_bands:
            raise SpecError("give either a job file or --image (and --stac-bands), not both")
        spec = load_job(args.job)
        data = spec.model_dump(mode="json")
        if overrides.get("refine", data["refine"]) != data["refine"]:
            data.pop("refine_options")  # the job's options are another method's
        data.update(overrides)
        return job_from_dict(data, args.job)
    if not args.image:
        raise SpecError("nothing to run: give a job file (satseg run JOB.yaml) or --image IMG.tif")
    scene = {"image": args.image, "labels": args.labels, "name": args.name}
    if args.stac_bands is not None:
        scene["stac_bands"] = [b.strip() for b in args.stac_bands.split(",") if b.strip()]
    return job_from_dict({"scenes": [scene], **overrides})


def main(args: argparse.Namespace) -> int:
    from pipeline.run import run_job

    spec = spec_from_args(args)
    result = run_job(spec, show_progress=not args.quiet)
    print_job_summary(result)
    return 0
