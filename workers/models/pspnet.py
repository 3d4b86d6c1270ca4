"""PSPNet on ResNet-50 / ResNet-101, in plain PyTorch.

Paper: Zhao et al., "Pyramid Scene Parsing Network" (CVPR 2017, arXiv:1612.01105).
Reference code: hszhao/semseg ``model/pspnet.py`` and ``model/resnet.py`` (the authors'
PyTorch release), whose structure this follows; the pyramid head is also mmsegmentation's
``PSPHead`` (``mmseg/models/decode_heads/psp_head.py``).

Backbone: the ResNet of ``deeplab.py`` (torchvision layout under ``backbone.``), dilated
to output stride 8 (layer3 and layer4; ``output_stride=16`` dilates layer4 only). Its stem
is the reference's "deep base" by default, three 3x3 convs of 64, 64 and 128 channels
(``stem="deep_base"``; layer1 then reads 128 channels); ``stem="deep"`` is ResNet-C's
32, 32, 64 (mmsegmentation's ``ResNetV1c``, as DeepLabV3+'s option) and ``stem="standard"``
torchvision's 7x7 conv. Pyramid pooling module: average pooling to 1x1, 2x2, 3x3 and 6x6
bins, each reduced by a 1x1 conv to 2048/4 = 512 channels, upsampled bilinearly and
concatenated with the features (4096 channels); then a 3x3 conv to 512, dropout 0.1, a 1x1
classifier and bilinear upsampling x8 to the tile. The 1x1 bin averages the whole feature
map, so every output pixel depends on the whole tile: ``whole_tile_context=True``.

Where this differs from the reference: no auxiliary head (the reference builds a 3x3
conv 1024 -> 256 and a classifier on layer3 for its training loss only; satseg trains
with one loss), bilinear resizing with ``align_corners=False`` (as mmsegmentation; the
reference uses True), and the first block of a dilated layer keeps the previous dilation
(torchvision's and mmsegmentation's ``contract_dilation`` rule; the reference dilates
every block of the layer). None of these changes a parameter of the inference model, and
``reference="semseg"`` builds the reference's forward pass (every block dilated,
``align_corners=True``) for its published checkpoints.

The pooling is written as two small matrix products (:func:`adaptive_avg_pool`), equal to
``nn.AdaptiveAvgPool2d``, because ONNX export cannot take adaptive pooling to 3x3 or 6x6
of a map whose size is only known at run time; this way every export (torch.export,
TorchScript, ONNX) takes any tile that is a multiple of 32.

Parameters with 3 bands and 21 classes (width_multiplier 1.0): 46,716,373 (ResNet-50) and
65,708,501 (ResNet-101), the reference's ``PSPNet(layers=50/101, classes=21)`` in eval mode
(its training-mode construction adds the auxiliary head: 2,365,205 more).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from schemas.errors import SpecError
from workers.models.deeplab import _CFGS, ResNet, _conv_bn_relu
from workers.models.blocks import init_weights
from workers.models.deeplabv3 import atrous_setting
from workers.models.registry import check_tile, register_model, scale_channels

__all__ = ["adaptive_avg_pool", "PyramidPooling", "PSPNet", "pspnet_resnet50", "pspnet_resnet101"]

_RESNET_WIDTHS = (64, 128, 256, 512)
_BINS = (1, 2, 3, 6)
_HEAD_CHANNELS = 512
_DROPOUT = 0.1
_STEMS = {"deep_base": (128, True), "deep": (64, True), "standard": (64, False)}
"""stem option -> (stem width, three 3x3 convs); the deep stems' convs are width/2, width/2, width."""
REFERENCES = ("mmseg", "semseg")
"""The forward pass whose published weights a PSPNet reproduces (the parameters are the same for both):
``mmseg`` (and torchvision's dilation rule): the first block of a dilated layer keeps the previous dilation,
resizing with ``align_corners=False``; ``semseg`` (hszhao/semseg, the authors' code): every block dilated,
``align_corners=True``."""


def adaptive_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, bins)`` as ``P_h @ x @ P_w^T``: row i of P averages [floor(i*n/bins), ceil((i+1)*n/bins)).

    The pooling matrices are built from the input's size with tensor arithmetic, so exports keep the size dynamic.
    """
    return _pooling_matrix(x.shape[-2], bins, x) @ x @ _pooling_matrix(x.shape[-1], bins, x).transpose(0, 1)


def _pooling_matrix(size: int, bins: int, like: torch.Tensor) -> torch.Tensor:
    # position p is in bin i when floor(i*size/bins) <= p < ceil((i+1)*size/bins), i.e. without a division:
    # bins*(p+1) > i*size and bins*p < (i+1)*size
    position = torch.arange(size, device=like.device) * bins
    edge = torch.arange(bins + 1, device=like.device) * size
    inside = ((position[None, :] + bins > edge[:-1, None]) & (position[None, :] < edge[1:, None])).to(like.dtype)
    return inside / inside.sum(dim=1, keepdim=True)


class PyramidPooling(nn.Module):
    """Pool to each bin size, reduce by a 1x1 conv, upsample back; concatenated after the input features."""

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int] = _BINS, align_corners: bool = False) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.align_corners = align_corners
        self.stages = nn.ModuleList(_conv_bn_relu(in_channels, channels, 1) for _ in self.bins)
        self.out_channels = in_channels + channels * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(stage(adaptive_avg_pool(x, bins)), size=size, mode="bilinear", align_corners=self.align_corners)
            for bins, stage in zip(self.bins, self.stages)
        ]
        return torch.cat([x] + pooled, dim=1)


class PSPNet(nn.Module):
    """PSPNet: dilated ResNet, pyramid pooling, a 3x3 conv and a classifier, logits upsampled to the tile."""

    def __init__(
        self, backbone: ResNet, channels: int, num_classes: int, in_channels: int, align_corners: bool = False
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.backbone = backbone
        self.align_corners = align_corners
        self.ppm = PyramidPooling(backbone.out_channels, max(1, backbone.out_channels // len(_BINS)), align_corners=align_corners)
        self.bottleneck = _conv_bn_relu(self.ppm.out_channels, channels, 3)
        self.dropout = nn.Dropout2d(_DROPOUT)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tile(x, self.in_channels)
        _, features = self.backbone(x)
        logits = self.classifier(self.dropout(self.bottleneck(self.ppm(features))))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)


def _create_pspnet(
    variant: str, in_channels: int, num_classes: int, width_multiplier: float, output_stride: int, stem: str,
    reference: str,
) -> PSPNet:
    dilate, _ = atrous_setting(output_stride)
    if stem not in _STEMS:
        raise SpecError(f"stem must be one of {', '.join(_STEMS)}, got {stem!r}")
    if reference not in REFERENCES:
        raise SpecError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    stem_width, deep = _STEMS[stem]
    semseg = reference == "semseg"

    def width(channels: int) -> int:
        return scale_channels(channels, width_multiplier)

    backbone = ResNet(_CFGS[variant], in_channels, width(stem_width), [width(c) for c in _RESNET_WIDTHS], dilate, deep,
                      dilate_first_block=semseg)
    model = PSPNet(backbone, width(_HEAD_CHANNELS), num_classes, in_channels, align_corners=semseg)
    init_weights(model)
    return model


@register_model(family="pspnet", output_stride=8, whole_tile_context=True)
def pspnet_resnet50(
    in_channels: int, num_classes: int, *, width_multiplier: float = 1.0, output_stride: int = 8, stem: str = "deep_base",
    reference: str = "mmseg",
) -> PSPNet:
    """PSPNet on ResNet-50: 46.7M parameters; its 1x1 pyramid bin sees the whole tile."""
    return _create_pspnet("resnet50", in_channels, num_classes, width_multiplier, output_stride, stem, reference)


@register_model(family="pspnet", output_stride=8, whole_tile_context=True)
def pspnet_resnet101(
    in_channels: int, num_classes: int, *, width_multiplier: float = 1.0, output_stride: int = 8, stem: str = "deep_base",
    reference: str = "mmseg",
) -> PSPNet:
    """PSPNet on ResNet-101: 65.7M parameters; its 1x1 pyramid bin sees the whole tile."""
    return _create_pspnet("resnet101", in_channels, num_classes, width_multiplier, output_stride, stem, reference)
