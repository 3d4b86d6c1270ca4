"""Model registry: names to entry points, and what the pipeline must know about each model.

Model families register their variants with :func:`register_model` (timm style); the
pipeline builds them by name with :func:`create_model` and asks :func:`model_info` how
to tile for them without building anything. Every registered model keeps one contract:
``forward`` maps ``(N, in_channels, H, W)`` to logits ``(N, num_classes, H, W)`` for H and
W multiples of :data:`TILE_MULTIPLE`, in eval mode (prediction, validation, export).
In train mode a deep-supervised model (U-Net++ with ``deep_supervision``) returns its
heads' logits stacked ``(heads, N, num_classes, H, W)``, which training's loss averages.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from schemas.errors import SpecError
from schemas.job import TILE_MULTIPLE

__all__ = [
    "TILE_MULTIPLE",
    "ModelInfo",
    "register_model",
    "create_model",
    "list_models",
    "model_info",
    "scale_channels",
    "check_tile",
]

MIN_CHANNELS = 4
"""No layer is narrowed below this many channels by a width multiplier."""


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a registered model, without building it.

    ``whole_tile_context`` is True when every output pixel depends on the whole tile
    (global image pooling), so tiles should overlap and be blended rather than cropped.
    """

    name: str
    family: str
    output_stride: int
    whole_tile_context: bool
    description: str


EntryPoint = TypeVar("EntryPoint", bound=Callable[..., nn.Module])

_ENTRY_POINTS: dict[str, Callable[..., nn.Module]] = {}
_INFOS: dict[str, ModelInfo] = {}


def register_model(
    *, family: str, output_stride: int, whole_tile_context: bool
) -> Callable[[EntryPoint], EntryPoint]:
    """Register an entry point under its function name; its docstring's first line describes it."""

    def decorator(fn: EntryPoint) -> EntryPoint:
        name = fn.__name__
        known = _ENTRY_POINTS.get(name)
        if known is not None and known.__module__ != fn.__module__:
            raise ValueError(f"model name {name!r} is registered twice ({known.__module__}, {fn.__module__})")
        description = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _ENTRY_POINTS[name] = fn
        _INFOS[name] = ModelInfo(name, family, output_stride, whole_tile_context, description)
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_ENTRY_POINTS)


def model_info(name: str) -> ModelInfo:
    """Describe a registered model; raise SpecError listing the valid names otherwise."""
    _check_name(name)
    return _INFOS[name]


def create_model(name: str, in_channels: int, num_classes: int, **overrides: Any) -> nn.Module:
    """Build a registered model for ``in_channels`` bands and ``num_classes`` classes.

    ``overrides`` are the entry point's keyword options, e.g. ``width_multiplier`` (every
    model) or ``output_stride`` (DeepLabV3+); anything else raises SpecError.
    """
    _check_name(name)
    entry_point = _ENTRY_POINTS[name]
    valid = _override_names(entry_point)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise SpecError(
            f"model {name!r} does not take {', '.join(unknown)}; valid overrides: {', '.join(valid) or 'none'}"
        )
    return entry_point(
        _positive_int("in_channels", in_channels), _positive_int("num_classes", num_classes), **overrides
    )


def scale_channels(channels: int, width_multiplier: float) -> int:
    """Channel count scaled by the width multiplier, rounded, at least MIN_CHANNELS (exact at 1.0)."""
    if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, (int, float)) or not (
        math.isfinite(width_multiplier) and width_multiplier > 0
    ):
        raise SpecError(f"width_multiplier must be a positive number, got {width_multiplier!r}")
    if width_multiplier == 1:
        return channels
    return max(MIN_CHANNELS, int(round(channels * width_multiplier)))


def check_tile(x: torch.Tensor, in_channels: int) -> None:
    """Raise ValueError unless ``x`` is ``(N, in_channels, H, W)`` with H, W multiples of TILE_MULTIPLE."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected a batch of shape (N, {in_channels}, H, W), got {tuple(x.shape)}")
    height, width = x.shape[-2], x.shape[-1]  # no int(): under torch.export they stay symbolic
    if height < TILE_MULTIPLE or width < TILE_MULTIPLE or height % TILE_MULTIPLE or width % TILE_MULTIPLE:
        height, width = int(height), int(width)
        fit = "x".join(str(max(1, math.ceil(s / TILE_MULTIPLE)) * TILE_MULTIPLE) for s in (height, width))
        raise ValueError(
            f"tile height and width must be positive multiples of {TILE_MULTIPLE}, got {height}x{width}; "
            f"pad the tile to {fit}"
        )


def _check_name(name: str) -> None:
    if name not in _ENTRY_POINTS:
        raise SpecError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")


def _override_names(entry_point: Callable[..., nn.Module]) -> list[str]:
    parameters = inspect.signature(entry_point).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _positive_int(label: str, value: Any) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise SpecError(f"{label} must be a positive integer, got {value!r}")
    return number
