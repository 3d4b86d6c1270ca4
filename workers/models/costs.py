"""What a registered model costs to run: parameters and FLOPs per megapixel, measured rather than quoted.

FLOPs come from torch's own counter (:class:`torch.utils.flop_counter.FlopCounterMode`) on
a model built on the meta device: no weights are allocated and nothing is computed, so all
registered models are measured in seconds. The counter counts convolutions and matrix products,
a multiply-add as 2 FLOPs; normalisation, activations, pooling and resizing are not counted.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from schemas.errors import SpecError
from workers.model_table import TABLE_FILE, TABLE_TILE
from workers.models.registry import TILE_MULTIPLE, create_model, list_models, model_info

__all__ = ["ModelCosts", "model_costs", "measure_table", "write_table"]

_MEGAPIXEL = 1_000_000


@dataclass(frozen=True)
class ModelCosts:
    """A model's size and compute for given bands and classes; ``whole_tile_context`` from the registry."""

    name: str
    parameters: int
    gflops_per_megapixel: float
    output_stride: int
    whole_tile_context: bool


def model_costs(name: str, in_channels: int = 3, num_classes: int = 19, tile: int = 256) -> ModelCosts:
    """Count ``name``'s parameters and its FLOPs on one ``tile`` x ``tile`` input, scaled to a megapixel.

    Cached per process. Convolution FLOPs grow exactly with the pixel count; only
    the global-pooling branches (DeepLabV3's and DeepLabV3+'s image pooling, PSPNet's
    pyramid) cost the same per tile, a negligible share.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < TILE_MULTIPLE or tile % TILE_MULTIPLE:
        raise SpecError(f"tile must be a positive multiple of {TILE_MULTIPLE}, got {tile!r}")
    return _measure(name, in_channels, num_classes, tile)


def _count(name: str, in_channels: int, num_classes: int, tile: int) -> tuple[int, int]:
    """Parameters, and FLOPs of one ``tile`` x ``tile`` input, of a model built on the meta device."""
    with torch.device("meta"):
        model = create_model(name, in_channels, num_classes).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, in_channels, tile, tile, device="meta"))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def _measure(name: str, in_channels: int, num_classes: int, tile: int) -> ModelCosts:
    info = model_info(name)
    parameters, flops = _count(name, in_channels, num_classes, tile)
    return ModelCosts(
        name=name,
        parameters=parameters,
        gflops_per_megapixel=flops / (tile * tile) * _MEGAPIXEL / 1e9,
        output_stride=info.output_stride,
        whole_tile_context=info.whole_tile_context,
    )


def measure_table() -> dict:
    """The table `satseg models` reads (`workers.model_table`): every registered model measured at 1-2 bands and classes."""
    models = {}
    for name in list_models():
        info = model_info(name)
        corners = {f"{b}x{c}": _count(name, b, c, TABLE_TILE) for b in (1, 2) for c in (1, 2)}
        models[name] = {
            "output_stride": info.output_stride,
            "whole_tile_context": info.whole_tile_context,
            "parameters": {k: v[0] for k, v in corners.items()},
            "flops": {k: v[1] for k, v in corners.items()},
        }
    return {"tile": TABLE_TILE, "torch": torch.__version__, "models": models}


def write_table(path: Path = TABLE_FILE) -> None:
    """Measure every model and write the table, after adding or changing a model:
    ``python -c "from workers.models.costs import write_table; write_table()"``."""
    path.write_text(json.dumps(measure_table(), indent=1, sort_keys=True) + "\n")

