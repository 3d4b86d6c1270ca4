"""`satseg models`: the model registry with measured sizes and costs, to choose a model and a tiling."""

from __future__ import annotations

import argparse

HELP = "list the registered models: parameters, GFLOPs per megapixel, output stride, whole-tile context"

_COLUMNS = ["name", "parameters", "gflops_per_megapixel", "output_stride", "whole_tile_context"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bands", type=int, default=3, help="input bands the models are built for (default 3)")
    p.add_argument("--classes", type=int, default=19, help="output classes the models are built for (default 19)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")


def main(args: argparse.Namespace) -> int:
    from pipeline.query import format_rows
    from schemas.errors import SpecError
    from workers.model_table import tabled_costs

    for flag, value in (("--bands", args.bands), ("--classes", args.classes)):
        if value < 1:
            raise SpecError(f"{flag} must be a positive integer, got {value}")
    readable = args.format == "table"
    rows = []
    for costs in tabled_costs(args.bands, args.classes):  # measured once per model, read without torch
        rows.append((
            costs.name,
            f"{costs.parameters:,}" if readable else costs.parameters,
            f"{costs.gflops_per_megapixel:.1f}" if readable else costs.gflops_per_megapixel,
            costs.output_stride,
            costs.whole_tile_context,
        ))
    print(format_rows(_COLUMNS, rows, args.format))
    return 0
