"""What a registered model costs to run: parameters and FLOPs per megapixel, measured rather than quoted.

FLOPs come from torch's own counter (:class:`torch.utils.flop_counter.FlopCounterMode`) on
a model built on the meta device: no weights are allocated and nothing is computed, so all
seven models are measured in seconds. The counter counts convolutions and matrix products,
a multiply-add as 2 FLOPs; normalisation, activations, pooling and resizing are not counted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from schemas.errors import SpecError
from workers.models.registry import TILE_MULTIPLE, create_model, model_info

__all__ = ["ModelCosts", "model_costs"]

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
    DeepLabV3+'s image-pooling branch costs the same per tile, a negligible share.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < TILE_MULTIPLE or tile % TILE_MULTIPLE:
        raise SpecError(f"tile must be a positive multiple of {TILE_MULTIPLE}, got {tile!r}")
    return _measure(name, in_channels, num_classes, tile)


@functools.lru_cache(maxsize=None)
def _measure(name: str, in_channels: int, num_classes: int, tile: int) -> ModelCosts:
    info = model_info(name)
    with torch.device("meta"):
        model = create_model(name, in_channels, num_classes).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, in_channels, tile, tile, device="meta"))
    flops = counter.get_total_flops()
    return ModelCosts(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        gflops_per_megapixel=flops / (tile * tile) * _MEGAPIXEL / 1e9,
        output_stride=info.output_stride,
        whole_tile_context=info.whole_tile_context,
    )
