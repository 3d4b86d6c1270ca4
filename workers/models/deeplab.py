"""DeepLabV3+ on ResNet-50 / ResNet-101, in plain PyTorch.

Paper: Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic
Image Segmentation" (ECCV 2018, arXiv:1802.02611); ASPP from Chen et al., "Rethinking
Atrous Convolution for Semantic Image Segmentation" (arXiv:1706.05587).

The backbone is torchvision's ResNet (Bottleneck v1.5, stride on the 3x3 conv) without
avgpool and fc, with the same module names, so torchvision's state-dict keys load under
``backbone.`` when bands agree; output stride 16 dilates layer4 (ASPP rates 6/12/18),
output stride 8 dilates layer3 and layer4 (rates 12/24/36), as torchvision's
``replace_stride_with_dilation``. ASPP: 1x1, three atrous 3x3 and image pooling branches
of 256 channels, projected to 256 (dropout 0.1). Decoder: layer1 features reduced to 48
channels, concatenated with the ASPP output upsampled to 1/4, two 3x3 convs of 256, a 1x1
classifier, bilinear upsampling x4 to the tile. The image-pooling branch makes every
output pixel depend on the whole tile, hence ``whole_tile_context=True``.

Two options reproduce mmsegmentation's ``deeplabv3plus_r50-d8`` / ``r101-d8`` models, so their
published checkpoints load (``workers/models/pretrained.py``): ``stem="deep"`` replaces the
7x7 stem by ResNet-C's three 3x3 convs (32, 32, 64 channels; mmseg's ``ResNetV1c``, timm's
``resnet50c``), and ``head="separable"`` builds mmseg's ``DepthwiseSeparableASPPHead``
(mmseg/models/decode_heads/sep_aspp_head.py): 512 channels, image pooling first in the
concatenation, depthwise-separable atrous branches, a 3x3 bottleneck, a decoder of two
depthwise-separable convs and dropout before the classifier. Use ``output_stride=8`` with
them, as the ``-d8`` configs do.

Parameters with 3 bands and 19 classes (width_multiplier 1.0; backbone without fc):

    deeplabv3plus_resnet50    40,351,667  (backbone 23,508,032)
    deeplabv3plus_resnet101   59,343,795  (backbone 42,500,160)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from schemas.errors import SpecError
from workers.models.blocks import Bottleneck, init_weights
from workers.models.registry import check_tile, register_model, scale_channels

__all__ = [
    "ResNet",
    "ASPP",
    "SeparableASPP",
    "Decoder",
    "DeepLabV3Plus",
    "deeplabv3plus_resnet50",
    "deeplabv3plus_resnet101",
]

_CFGS: dict[str, tuple[int, int, int, int]] = dict(
    resnet50=(3, 4, 6, 3),
    resnet101=(3, 4, 23, 3),
)

_RESNET_WIDTHS = (64, 128, 256, 512)
_STEM_WIDTH = 64
_ASPP_CHANNELS = 256
_LOW_LEVEL_CHANNELS = 48
_DECODER_CHANNELS = 256
_SEPARABLE_CHANNELS = 512  # mmseg's DepthwiseSeparableASPPHead: channels=512 for ASPP and decoder
_STEMS = ("standard", "deep")
_HEADS = ("standard", "separable")

# output stride -> (dilate layer2, layer3, layer4), ASPP atrous rates
_OUTPUT_STRIDES: dict[int, tuple[tuple[bool, bool, bool], tuple[int, int, int]]] = {
    16: ((False, False, True), (6, 12, 18)),
    8: ((False, True, True), (12, 24, 36)),
}


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResNet(nn.Module):
    """ResNet feature extractor (torchvision layout, no avgpool/fc); returns layer1 and layer4 features.

    ``deep_stem``: ResNet-C's three 3x3 convs (stem_width/2, stem_width/2, stem_width) in ``stem``,
    numbered as mmseg's ``ResNetV1c`` (convs 0, 3, 6; norms 1, 4, 7), instead of ``conv1``/``bn1``.
    """

    def __init__(
        self,
        layers: Sequence[int],
        in_channels: int,
        stem_width: int = _STEM_WIDTH,
        widths: Sequence[int] = _RESNET_WIDTHS,
        dilate: Sequence[bool] = (False, False, False),
        deep_stem: bool = False,
        dilate_first_block: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = stem_width
        self.dilation = 1
        self.dilate_first_block = dilate_first_block
        self.deep_stem = deep_stem
        if deep_stem:
            half = stem_width // 2
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                *_conv_bn_relu(half, half, 3), *_conv_bn_relu(half, stem_width, 3),
            )
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2, dilate=dilate[2])
        self.low_level_channels = widths[0] * Bottleneck.expansion
        self.out_channels = widths[3] * Bottleneck.expansion

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        """torchvision's rule: a dilated layer trades its stride for dilation from its second block on (from its
        first with ``dilate_first_block``, as hszhao/semseg's PSPNet sets every ``conv2`` of the layer)."""
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        first = self.dilation if dilate and self.dilate_first_block else previous_dilation
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, first)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x))))
        low_level = self.layer1(x)
        return low_level, self.layer4(self.layer3(self.layer2(low_level)))


class ImagePooling(nn.Module):
    """ASPP's global branch: average over the whole feature map, 1x1 conv, broadcast back."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(self.pool(x))
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3 and image pooling, concatenated and projected."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int], dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, dilation=rate) for rate in rates]
        )
        self.pooling = ImagePooling(in_channels, out_channels)
        self.project = nn.Sequential(
            *_conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 1), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [branch(x) for branch in self.branches] + [self.pooling(x)]
        return self.project(torch.cat(features, dim=1))


def _separable_conv(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (dilated), BN, ReLU, then pointwise 1x1, BN, ReLU (mmcv's DepthwiseSeparableConvModule)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=dilation, dilation=dilation, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        *_conv_bn_relu(in_channels, out_channels, 1),
    )


class SeparableASPP(nn.Module):
    """mmseg's DepthwiseSeparableASPPHead before its decoder: image pooling, 1x1 and depthwise-separable atrous
    branches, concatenated in that order, then a 3x3 bottleneck (no dropout)."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.pooling = ImagePooling(in_channels, out_channels)
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_separable_conv(in_channels, out_channels, rate) for rate in rates]
        )
        self.project = _conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([self.pooling(x)] + [branch(x) for branch in self.branches], dim=1))


class Decoder(nn.Module):
    """DeepLabV3+ decoder: sharpen upsampled ASPP features with reduced low-level (1/4) features.

    ``separable``: mmseg's decoder, two depthwise-separable 3x3 convs and dropout 0.1 before the classifier.
    """

    def __init__(
        self, low_level_in: int, low_level_out: int, aspp_channels: int, channels: int, num_classes: int,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.reduce = _conv_bn_relu(low_level_in, low_level_out, 1)
        if separable:
            self.fuse = nn.Sequential(
                _separable_conv(aspp_channels + low_level_out, channels), _separable_conv(channels, channels)
            )
        else:
            self.fuse = nn.Sequential(
                _conv_bn_relu(aspp_channels + low_level_out, channels, 3), _conv_bn_relu(channels, channels, 3)
            )
        self.dropout = nn.Dropout2d(0.1) if separable else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, low_level: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        low_level = self.reduce(low_level)
        context = F.interpolate(context, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(self.fuse(torch.cat([context, low_level], dim=1))))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+: ResNet encoder with ASPP, light decoder at 1/4, logits upsampled to the tile."""

    def __init__(self, backbone: ResNet, aspp: ASPP | SeparableASPP, decoder: Decoder, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.backbone = backbone
        self.aspp = aspp
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tile(x, self.in_channels)
        low_level, high_level = self.backbone(x)
        logits = self.decoder(low_level, self.aspp(high_level))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _create_deeplabv3plus(
    variant: str, in_channels: int, num_classes: int, width_multiplier: float, output_stride: int,
    stem: str = "standard", head: str = "standard",
) -> DeepLabV3Plus:
    if isinstance(output_stride, bool) or not isinstance(output_stride, int) or output_stride not in _OUTPUT_STRIDES:
        raise SpecError(f"output_stride must be one of {sorted(_OUTPUT_STRIDES)}, got {output_stride!r}")
    if stem not in _STEMS:
        raise SpecError(f"stem must be one of {', '.join(_STEMS)}, got {stem!r}")
    if head not in _HEADS:
        raise SpecError(f"head must be one of {', '.join(_HEADS)}, got {head!r}")
    dilate, rates = _OUTPUT_STRIDES[output_stride]

    def width(channels: int) -> int:
        return scale_channels(channels, width_multiplier)

    backbone = ResNet(
        _CFGS[variant], in_channels, width(_STEM_WIDTH), [width(c) for c in _RESNET_WIDTHS], dilate, stem == "deep"
    )
    separable = head == "separable"
    aspp_channels = width(_SEPARABLE_CHANNELS if separable else _ASPP_CHANNELS)
    aspp = (SeparableASPP if separable else ASPP)(backbone.out_channels, aspp_channels, rates)
    decoder = Decoder(
        backbone.low_level_channels, width(_LOW_LEVEL_CHANNELS), aspp_channels,
        width(_SEPARABLE_CHANNELS if separable else _DECODER_CHANNELS), num_classes, separable,
    )
    model = DeepLabV3Plus(backbone, aspp, decoder, in_channels)
    init_weights(model)
    return model


@register_model(family="deeplabv3plus", output_stride=16, whole_tile_context=True)
def deeplabv3plus_resnet50(
    in_channels: int, num_classes: int, *, width_multiplier: float = 1.0, output_stride: int = 16,
    stem: str = "standard", head: str = "standard",
) -> DeepLabV3Plus:
    """DeepLabV3+ on ResNet-50: 40.4M parameters; image pooling sees the whole tile."""
    return _create_deeplabv3plus("resnet50", in_channels, num_classes, width_multiplier, output_stride, stem, head)


@register_model(family="deeplabv3plus", output_stride=16, whole_tile_context=True)
def deeplabv3plus_resnet101(
    in_channels: int, num_classes: int, *, width_multiplier: float = 1.0, output_stride: int = 16,
    stem: str = "standard", head: str = "standard",
) -> DeepLabV3Plus:
    """DeepLabV3+ on ResNet-101: 59.3M parameters; image pooling sees the whole tile."""
    return _create_deeplabv3plus("resnet101", in_channels, num_classes, width_multiplier, output_stride, stem, head)
