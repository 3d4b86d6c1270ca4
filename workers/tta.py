"""Test-time augmentation: the dihedral transforms of a square tile and their inverses.

A model run on a transformed tile gives logits in the transformed frame; the
inverse maps them back so the outputs of all transforms can be averaged pixel
by pixel. Tiles are square, so every transform keeps the shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["TTA_KINDS", "TTAKind", "DihedralTransform", "dihedral_transforms"]

TTAKind = Literal["none", "flip", "d4"]
TTA_KINDS: tuple[str, ...] = ("none", "flip", "d4")


@dataclass(frozen=True)
class DihedralTransform:
    """A horizontal flip (optional) followed by ``rotations`` quarter turns, on the last two axes."""

    rotations: int = 0
    flip: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            x = torch.flip(x, dims=(-1,))
        return torch.rot90(x, self.rotations, dims=(-2, -1)) if self.rotations % 4 else x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo `forward`: turn back, then flip back."""
        if self.rotations % 4:
            y = torch.rot90(y, -self.rotations, dims=(-2, -1))
        return torch.flip(y, dims=(-1,)) if self.flip else y


def dihedral_transforms(kind: str) -> list[DihedralTransform]:
    """The transforms of a TTA kind: `none` the identity, `flip` identity and mirror, `d4` all eight symmetries."""
    if kind == "none":
        return [DihedralTransform()]
    if kind == "flip":
        return [DihedralTransform(), DihedralTransform(flip=True)]
    if kind == "d4":
        return [DihedralTransform(k, f) for f in (False, True) for k in range(4)]
    raise ValueError(f"unknown test-time augmentation {kind!r}; choose one of {', '.join(TTA_KINDS)}")
