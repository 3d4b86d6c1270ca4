"""FCN-32s, FCN-16s and FCN-8s on VGG-16, in plain PyTorch.

Paper: Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic
Segmentation" (CVPR 2015, arXiv:1411.4038; TPAMI 2017, arXiv:1605.06211).

Architecture follows the reference Caffe nets ``voc-fcn32s``, ``voc-fcn16s`` and
``voc-fcn8s`` (``net.py`` in https://github.com/shelhamer/fcn.berkeleyvision.org, BSD
licence), written afresh here: the 13 convolutions of VGG-16 (3x3, ReLU, a 2x2 max pool
after each of the five stages), ``fc6`` and ``fc7`` as convolutions (7x7 and 1x1, 4096
channels, ReLU, dropout 0.5), a 1x1 scoring layer ``score_fr`` at 1/32, and for FCN-16s
and FCN-8s 1x1 scoring layers on ``pool4`` (1/16) and ``pool3`` (1/8) whose scores are
summed with the coarser ones upsampled x2. Weights start from Kaiming initialisation,
scoring layers included (the reference starts those at zero, Caffe's default, because
it fine-tunes from ImageNet VGG-16; satseg trains from scratch on any number of bands).

Differences, each forced by satseg's contract (logits the size of the tile, any tile
that is a multiple of 32): the reference pads the input by 100 pixels, runs ``fc6``
unpadded and crops every fused map; here ``fc6`` is padded by 3, so every map is
exactly 1/2^k of the tile and nothing is cropped. The reference's upsampling layers
(``upscore*``) are deconvolutions that never learn (``lr_mult: 0``), set to one bilinear
kernel per class by ``surgery.interp``: here they are bilinear interpolation, what those kernels compute,
without storing a classes x classes x k x k kernel (it would make the parameter
count quadratic in the class count). Padding and fixed upsampling add no parameters,
so the learned parameters equal the reference's: with 3 bands and PASCAL VOC's 21
classes, FCN-32s 134,346,581, FCN-16s 134,357,354, FCN-8s 134,362,751 (the paper's
Table 1: "134M" for FCN-VGG16).

With ``fc6``'s 7x7 kernel at 1/32, each score sees 404 x 404 pixels of the tile: a large
receptive field, but a local one (no image pooling), so ``whole_tile_context=False``.

Parameters with 3 bands and 19 classes (width_multiplier 1.0):

    fcn32s_vgg16   134,338,387
    fcn16s_vgg16   134,348,134
    fcn8s_vgg16    134,353,017
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.blocks import init_weights
from workers.models.registry import check_tile, register_model, scale_channels

__all__ = [
    "VGG16_STAGES",
    "FCN",
    "vgg_stage",
    "fcn32s_vgg16",
    "fcn16s_vgg16",
    "fcn8s_vgg16",
]

VGG16_STAGES: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
"""VGG-16's convolution stages: (width, 3x3 convolutions); a 2x2 max pool ends each."""

_FC_WIDTH = 4096
_FC6_KERNEL = 7
_DROPOUT = 0.5


def vgg_stage(in_channels: int, width: int, convs: int, batch_norm: bool = False) -> nn.Sequential:
    """One VGG stage without its pool: ``convs`` 3x3 convolutions (with bias), each [BN and] ReLU."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class FCN(nn.Module):
    """VGG-16 convolutionalised, scored at 1/32 and, with ``skips``, refined with pool4 (1/16) and pool3 (1/8) scores."""

    def __init__(
        self, in_channels: int, num_classes: int, skips: int, widths: Sequence[int], fc_width: int = _FC_WIDTH
    ) -> None:
        super().__init__()
        if skips not in (0, 1, 2):
            raise ValueError(f"skips must be 0 (FCN-32s), 1 (FCN-16s) or 2 (FCN-8s), got {skips!r}")
        self.in_channels = in_channels
        stages, previous = [], in_channels
        for width, (_, convs) in zip(widths, VGG16_STAGES):
            stages.append(vgg_stage(previous, width, convs))
            previous = width
        self.features = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc6 = nn.Sequential(
            nn.Conv2d(previous, fc_width, _FC6_KERNEL, padding=_FC6_KERNEL // 2), nn.ReLU(inplace=True),
            nn.Dropout(_DROPOUT),
        )
        self.fc7 = nn.Sequential(nn.Conv2d(fc_width, fc_width, 1), nn.ReLU(inplace=True), nn.Dropout(_DROPOUT))
        self.score_fr = nn.Conv2d(fc_width, num_classes, 1)
        self.score_pool4 = nn.Conv2d(widths[3], num_classes, 1) if skips >= 1 else None
        self.score_pool3 = nn.Conv2d(widths[2], num_classes, 1) if skips >= 2 else None
        init_weights(self, transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tile(x, self.in_channels)
        pools = []
        features = x
        for stage in self.features:
            features = self.pool(stage(features))
            pools.append(features)
        score = self.score_fr(self.fc7(self.fc6(features)))
        if self.score_pool4 is not None:
            score = _resize(score, pools[3]) + self.score_pool4(pools[3])
        if self.score_pool3 is not None:
            score = _resize(score, pools[2]) + self.score_pool3(pools[2])
        return _resize(score, x)


def _create_fcn(skips: int, in_channels: int, num_classes: int, width_multiplier: float) -> FCN:
    widths = [scale_channels(width, width_multiplier) for width, _ in VGG16_STAGES]
    return FCN(in_channels, num_classes, skips, widths, scale_channels(_FC_WIDTH, width_multiplier))


@register_model(family="fcn", output_stride=32, whole_tile_context=False)
def fcn32s_vgg16(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> FCN:
    """FCN-32s on VGG-16: 134.3M parameters, scores at 1/32 upsampled to the tile (Long et al. 2015)."""
    return _create_fcn(0, in_channels, num_classes, width_multiplier)


@register_model(family="fcn", output_stride=16, whole_tile_context=False)
def fcn16s_vgg16(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> FCN:
    """FCN-16s on VGG-16: 134.3M parameters, 1/32 scores refined with pool4's at 1/16."""
    return _create_fcn(1, in_channels, num_classes, width_multiplier)


@register_model(family="fcn", output_stride=8, whole_tile_context=False)
def fcn8s_vgg16(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> FCN:
    """FCN-8s on VGG-16: 134.4M parameters, refined with pool4's and pool3's scores at 1/8."""
    return _create_fcn(2, in_channels, num_classes, width_multiplier)
