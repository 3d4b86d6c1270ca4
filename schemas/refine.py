"""Refinement options of a job (``refine: none | slic | crf`` with ``refine_options``): what each method takes.

Each method's options are a frozen model with defaults and bounds, so a job file's ``refine_options`` is checked
field by field and stored complete (defaults filled in): two jobs that differ only in spelling a default out
have one job id. The algorithms are in ``pipeline/core/refine.py``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["REFINE_METHODS", "MAX_CRF_RADIUS", "MAX_SLIC_HALO", "CRFOptions", "SLICOptions", "refine_options_model"]

REFINE_METHODS = ("none", "slic", "crf")

MAX_CRF_RADIUS = 12
"""Largest CRF kernel radius (px): a chunk reads radius x iterations more on each side, and each iteration sums
(2 radius + 1)^2 - 1 neighbours per pixel."""

MAX_SLIC_HALO = 1024
"""Most pixels a SLIC chunk reads beyond its edge, step x (2 iterations + 2), so a chunk's region stays bounded."""


class CRFOptions(BaseModel):
    """Mean-field inference of a fully connected CRF (Kraehenbuehl & Koltun 2011), truncated to a square window.

    Kernels: smoothness ``exp(-d^2 / 2 smooth_sigma_xy^2)`` and appearance (bilateral)
    ``exp(-d^2 / 2 appearance_sigma_xy^2 - |I_i - I_j|^2 / 2 appearance_sigma_rgb^2)``, with I the selected bands
    standardised per band (the model's input), d the pixel offset; each kernel is divided by the sum of its spatial
    part over the window, so a weight is the most (in log-probability units) a class gains when every neighbour
    holds it. Compatibility is Potts. Defaults from the sweep on the demo's training scene (``benchmarks/refine.py
    --tune``); the appearance kernel does the work there, the smoothness kernel next to nothing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(default=5, ge=1, le=20)
    smooth_sigma_xy: float = Field(default=1.0, gt=0, le=8)
    smooth_weight: float = Field(default=1.0, ge=0, le=50)
    appearance_sigma_xy: float = Field(default=3.0, gt=0, le=8)
    appearance_sigma_rgb: float = Field(default=1.0, gt=0, le=100)
    appearance_weight: float = Field(default=10.0, ge=0, le=50)
    radius: int | None = Field(default=None, ge=1, le=MAX_CRF_RADIUS)  # None: ceil(2 x the larger sigma_xy), capped

    @property
    def kernel_radius(self) -> int:
        """The truncation radius in pixels: given, else ceil(2 sigma_xy) of the wider kernel, at most `MAX_CRF_RADIUS`."""
        if self.radius is not None:
            return self.radius
        return min(MAX_CRF_RADIUS, math.ceil(2 * max(self.smooth_sigma_xy, self.appearance_sigma_xy)))


class SLICOptions(BaseModel):
    """SLIC superpixels (Achanta et al. 2012) on a lattice of step ``step`` anchored at the scene origin, then a vote.

    Distance ``D^2 = |I_p - I_k|^2 + (compactness / step)^2 |xy_p - xy_k|^2`` with I the selected bands standardised
    per band; each pixel picks the nearest of the 3 x 3 lattice neighbours of its own cell (gSLICr's search). The
    vote: ``majority`` (the class most of a superpixel's pixels got from the network) or ``mean`` (argmax of the mean
    class probabilities).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: int = Field(default=16, ge=4, le=128)
    compactness: float = Field(default=1.0, gt=0, le=100)
    iterations: int = Field(default=5, ge=1, le=20)
    vote: Literal["majority", "mean"] = "mean"

    @model_validator(mode="after")
    def _bounded_halo(self) -> "SLICOptions":
        halo = self.step * (2 * self.iterations + 2)
        if halo > MAX_SLIC_HALO:
            raise ValueError(
                f"step {self.step} with {self.iterations} iterations reads {halo} px beyond each chunk (at most "
                f"{MAX_SLIC_HALO}); give fewer iterations or a smaller step"
            )
        return self


def refine_options_model(method: str) -> type[BaseModel] | None:
    """The options model of a refinement method (None for ``none``)."""
    return {"slic": SLICOptions, "crf": CRFOptions}.get(method)
