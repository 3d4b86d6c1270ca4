"""DeepLabV3 (ASPP, no decoder) on ResNet-50 / ResNet-101, in plain PyTorch.

Paper: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation"
(arXiv:1706.05587). Reference configuration: torchvision's ``deeplabv3_resnet50`` and
``deeplabv3_resnet101`` (pytorch/vision ``torchvision/models/segmentation/deeplabv3.py``),
which this follows layer for layer.

Backbone and ASPP are DeepLabV3+'s (``deeplab.py``): torchvision's ResNet under
``backbone.``, output stride 16 (layer4 dilated, ASPP rates 6/12/18) or, with
``output_stride=8``, 8 (layer3 and layer4 dilated, rates 12/24/36, torchvision's setting);
ASPP of 1x1, three atrous 3x3 and image-pooling branches of 256 channels projected to 256,
with torchvision's dropout 0.5. Head: a 3x3 conv of 256, a 1x1 classifier, bilinear
upsampling to the tile. No decoder: logits come from the 1/16 (or 1/8) features alone. The
image-pooling branch makes every output pixel depend on the whole tile, hence
``whole_tile_context=True``. ``stem="deep"`` swaps in ResNet-C's three 3x3 convs, as for
DeepLabV3+.

Parameters with 3 bands and 21 classes (width_multiplier 1.0): 39,638,869 (ResNet-50) and
58,630,997 (ResNet-101), torchvision's ``num_params`` of 42,004,074 and 60,996,202 less its
auxiliary classifier (``FCNHead(1024, 21)``, 2,365,205 parameters, used for a training loss
only; satseg trains with one loss and does not build it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from schemas.errors import SpecError
from workers.models.deeplab import _CFGS, _OUTPUT_STRIDES, ASPP, ResNet, _conv_bn_relu
from workers.models.blocks import init_weights
from workers.models.registry import check_tile, register_model, scale_channels

__all__ = ["DeepLabV3", "atrous_setting", "deeplabv3_resnet50", "deeplabv3_resnet101"]

_RESNET_WIDTHS = (64, 128, 256, 512)
_STEM_WIDTH = 64
_ASPP_CHANNELS = 256
_ASPP_DROPOUT = 0.5  # torchvision's ASPP.project
_STEMS = ("standard", "deep")


class DeepLabV3(nn.Module):
    """DeepLabV3: dilated ResNet, ASPP, a 3x3 conv and a classifier, logits upsampled to the tile."""

    def __init__(self, backbone: ResNet, aspp: ASPP, channels: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.backbone = backbone
        self.aspp = aspp
        self.head = _conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tile(x, self.in_channels)
        _, features = self.backbone(x)
        logits = self.classifier(self.head(self.aspp(features)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def atrous_setting(output_stride: int) -> tuple[tuple[bool, bool, bool], tuple[int, int, int]]:
    """Which of ResNet's layer2-4 trade their stride for dilation, and the ASPP rates, for output stride 8 or 16."""
    if isinstance(output_stride, bool) or not isinstance(output_stride, int) or output_stride not in _OUTPUT_STRIDES:
        raise SpecError(f"output_stride must be one of {sorted(_OUTPUT_STRIDES)}, got {output_stride!r}")
    return _OUTPUT_STRIDES[output_stride]


def _create_deeplabv3(
    variant: str, in_channels: int, num_classes: int, width_multiplier: float, output_stride: int, stem: str
) -> DeepLabV3:
    dilate, rates = atrous_setting(output_stride)
    if stem not in _STEMS:
        raise SpecError(f"stem must be one of {', '.join(_STEMS)}, got {stem!r}")

    def width(channels: int) -> int:
        return scale_channels(channels, width_multiplier)

    backbone = ResNet(
        _CFGS[variant], in_channels, width(_STEM_WIDTH), [width(c) for c in _RESNET_WIDTHS], dilate, stem == "deep"
    )
    channels = width(_ASPP_CHANNELS)
    model = DeepLabV3(backbone, ASPP(backbone.out_channels, channels, rates, _ASPP_DROPOUT), channels, num_classes, in_channels)
    init_weights(model)
    return model


@register_model(family="deeplabv3", output_stride=16, whole_tile_context=True)
def deeplabv3_resnet50(
    in_channels: int, num_classes: int, *, width_multiplier: float = 1.0, output_stride: int = 16, stem: str = "standard"
) -> DeepLabV3:
    """DeepLabV3 on ResNet-50 (ASPP, no decoder): 39.6M parameters; image pooling sees the whole tile."""
    return _create_deeplabv3("resnet50", in_channels, num_classes, width_multiplier, output_stride, stem)


@register_model(family="deeplabv3", output_stride=16, whole_tile_context=True)
def deeplabv3_resnet101(
    in_channels: int, num_classes: int, *, width_multiplier: float = 1.0, output_stride: int = 16, stem: str = "standard"
) -> DeepLabV3:
    """DeepLabV3 on ResNet-101 (ASPP, no decoder): 58.6M parameters; image pooling sees the whole tile."""
    return _create_deeplabv3("resnet101", in_channels, num_classes, width_multiplier, output_stride, stem)
