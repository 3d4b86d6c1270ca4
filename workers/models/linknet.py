"""LinkNet on ResNet-18, in plain PyTorch.

Paper: Chaurasia and Culurciello, "LinkNet: Exploiting Encoder Representations for
Efficient Semantic Segmentation" (VCIP 2017, arXiv:1707.03718): 11.5M parameters.
Reference code: e-lab/pytorch-linknet ``models/linknet.py`` (the authors' lab), whose
structure this follows layer for layer.

Encoder: torchvision's ResNet-18 without avgpool and fc, with its module names under
``backbone.`` (``conv1``, ``bn1``, ``layer1-4``), so ImageNet ResNet-18 keys map one to one.
Decoder block for ``m`` input and ``n`` output channels: 1x1 conv m -> m/4, 3x3 transposed
conv m/4 -> m/4 (stride 2, except after ``layer1``, which keeps the resolution), 1x1 conv
m/4 -> n, each with batch norm and ReLU, no biases; its output is added to the encoder
features of the same resolution (the "link"). Final block: 3x3 transposed conv 64 -> 32
(stride 2), 3x3 conv 32 -> 32, 2x2 transposed conv 32 -> classes (stride 2): logits come
out at the tile's full resolution (output stride 1), and no pixel sees the whole tile.
The reference ends with LogSoftmax; satseg's models return logits, so it is left out (it
has no parameters and does not change the argmax).

Parameters with 3 bands (width_multiplier 1.0): 11,533,248 + 129 per class, e.g.
11,535,957 for the reference's default 21 classes, as e-lab's ``LinkNet(n_classes=21)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from workers.models.blocks import init_weights
from workers.models.hrnet import BasicBlock
from workers.models.registry import check_tile, register_model, scale_channels

__all__ = ["ResNet18", "DecoderBlock", "LinkNet", "linknet_resnet18"]

_RESNET18_LAYERS = (2, 2, 2, 2)
_RESNET18_WIDTHS = (64, 128, 256, 512)
_STEM_WIDTH = 64
_FINAL_WIDTH = 32


class ResNet18(nn.Module):
    """ResNet-18 feature extractor (torchvision layout, no avgpool/fc); returns the stem and all four layers."""

    def __init__(self, in_channels: int, stem_width: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = stem_width
        layers = []
        for index, (planes, blocks) in enumerate(zip(widths, _RESNET18_LAYERS)):
            stride = 1 if index == 0 else 2
            layers.append(_make_basic_layer(inplanes, planes, blocks, stride))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = [stem]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            features.append(layer(features[-1]))
        return features


def _make_basic_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """torchvision's rule: a strided (or widening) first block gets a 1x1 projection shortcut."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    rest = (BasicBlock(planes, planes) for _ in range(1, blocks))
    return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample), *rest)


def _bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """LinkNet's decoder block: 1x1 reduce to m/4, 3x3 transposed conv (x2 when strided), 1x1 to n."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        mid = max(1, in_channels // 4)
        self.conv1 = _bn_relu(nn.Conv2d(in_channels, mid, 1, bias=False), mid)
        self.tp_conv = _bn_relu(
            nn.ConvTranspose2d(mid, mid, 3, stride, padding=1, output_padding=stride - 1, bias=False), mid
        )
        self.conv2 = _bn_relu(nn.Conv2d(mid, out_channels, 1, bias=False), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.tp_conv(self.conv1(x)))


class LinkNet(nn.Module):
    """LinkNet: ResNet-18 encoder, each decoder block's output added to the encoder features it links to."""

    def __init__(self, in_channels: int, num_classes: int, width_multiplier: float = 1.0) -> None:
        super().__init__()

        def width(channels: int) -> int:
            return scale_channels(channels, width_multiplier)

        self.in_channels = in_channels
        stem = width(_STEM_WIDTH)
        widths = [width(c) for c in _RESNET18_WIDTHS]
        self.backbone = ResNet18(in_channels, stem, widths)
        # decoderK maps layerK's output to the resolution and width of what layerK read (the stem for layer1)
        self.decoder1 = DecoderBlock(widths[0], stem, stride=1)
        self.decoder2 = DecoderBlock(widths[1], widths[0], stride=2)
        self.decoder3 = DecoderBlock(widths[2], widths[1], stride=2)
        self.decoder4 = DecoderBlock(widths[3], widths[2], stride=2)
        final = width(_FINAL_WIDTH)
        self.tp_conv1 = _bn_relu(nn.ConvTranspose2d(stem, final, 3, 2, padding=1, output_padding=1), final)
        self.conv2 = _bn_relu(nn.Conv2d(final, final, 3, padding=1), final)
        self.tp_conv2 = nn.ConvTranspose2d(final, num_classes, 2, 2)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tile(x, self.in_channels)
        stem, e1, e2, e3, e4 = self.backbone(x)
        d4 = e3 + self.decoder4(e4)
        d3 = e2 + self.decoder3(d4)
        d2 = e1 + self.decoder2(d3)
        d1 = stem + self.decoder1(d2)
        return self.tp_conv2(self.conv2(self.tp_conv1(d1)))


@register_model(family="linknet", output_stride=1, whole_tile_context=False)
def linknet_resnet18(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> LinkNet:
    """LinkNet on ResNet-18: 11.5M parameters, decoder back to full resolution; light and local."""
    return LinkNet(in_channels, num_classes, width_multiplier)
