"""The registry's measured sizes and costs as a table that reads without torch: `satseg models` answers from it at once.

`workers.models.costs` measures each model (building it on the meta device, counting
FLOPs with torch's own counter) and writes this table (``write_table``); a test measures again and fails when the table and
the models disagree, so it cannot drift. Parameters and FLOPs are bilinear in the
band and class counts (the first convolution scales with bands, the classifier
with classes, a per-pixel linear model with both), so four measurements per model,
at 1 or 2 bands and 1 or 2 classes, give them exactly for any count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TABLE_FILE", "TABLE_TILE", "TabledCosts", "read_table", "tabled_costs"]

TABLE_FILE = Path(__file__).with_name("model_table.json")
TABLE_TILE = 256
"""The tile the table's FLOPs were counted on (as `model_costs`' default)."""

_CORNERS = ("1x1", "1x2", "2x1", "2x2")  # bands x classes of the four measurements


@dataclass(frozen=True)
class TabledCosts:
    """One row of `satseg models`: as `workers.models.costs.ModelCosts`, from the table."""

    name: str
    parameters: int
    gflops_per_megapixel: float
    output_stride: int
    whole_tile_context: bool


def read_table(path: Path = TABLE_FILE) -> dict:
    """The table: model name -> output stride, whole-tile context, and parameters and FLOPs at the four corners."""
    return json.loads(path.read_text())["models"]


def _bilinear(corners: dict, bands: int, classes: int) -> int:
    f11, f12, f21, f22 = (corners[k] for k in _CORNERS)
    b, c = bands - 1, classes - 1
    return f11 + b * (f21 - f11) + c * (f12 - f11) + b * c * (f22 - f21 - f12 + f11)


def tabled_costs(bands: int, classes: int, table: dict | None = None) -> list[TabledCosts]:
    """Every tabled model's parameters and GFLOPs per megapixel for ``bands`` input bands and ``classes`` classes."""
    table = read_table() if table is None else table
    rows = []
    for name in sorted(table):
        entry = table[name]
        flops = _bilinear(entry["flops"], bands, classes)
        rows.append(TabledCosts(
            name=name,
            parameters=_bilinear(entry["parameters"], bands, classes),
            gflops_per_megapixel=flops / (TABLE_TILE * TABLE_TILE) * 1_000_000 / 1e9,
            output_stride=entry["output_stride"],
            whole_tile_context=entry["whole_tile_context"],
        ))
    return rows
