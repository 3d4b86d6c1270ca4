"""SegNet on VGG-16, in plain PyTorch.

Paper: Badrinarayanan, Kendall and Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder
Architecture for Image Segmentation" (TPAMI 2017, arXiv:1511.00561).

Architecture follows the reference Caffe net ``Models/segnet_train.prototxt`` in
https://github.com/alexgkendall/SegNet-Tutorial, written afresh here. Encoder: VGG-16's
13 3x3 convolutions, each with bias, batch norm and ReLU, a 2x2 max pool after each of
the five stages that remembers where each maximum was (its *switches*). Decoder, its
mirror: each stage unpools with its encoder stage's switches (every value goes back to
the position its maximum came from, the other three of the 2x2 get zero), then 3x3
convolutions with batch norm and ReLU narrowing to the next stage's width
(512-512-512, 512-512-256, 256-256-128, 128-64, 64), and a last 3x3 convolution to the
classes (``conv1_1_D``, no batch norm). Logits come at full resolution from the
unpooling, so the output stride is 1. No layer pools the whole tile.

Unpooling is written as the scatter it is: each value goes to the flat position its
switch (``max_pool2d``'s index) names in a zero map of the encoder map's size. This is
``max_unpool2d`` exactly (values and gradients), but every exporter takes it with
dynamic sizes: torch's TorchScript-based ONNX exporter has no ``max_unpool2d``, and
``torch.jit.trace`` cannot trace it (torch 2.13).

With 3 bands and CamVid's 11 classes, the reference configuration, the model has the
reference's 29,449,355 parameters (the paper: 29.5M); Caffe's ``BN`` layer has a scale
and a shift per channel, as ``BatchNorm2d``'s affine terms.

Parameters with 3 bands and 19 classes (width_multiplier 1.0): 29,453,971.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.blocks import init_weights
from workers.models.fcn import VGG16_STAGES, vgg_stage
from workers.models.registry import check_tile, register_model, scale_channels

__all__ = ["SegNet", "max_unpool", "segnet_vgg16"]


def max_unpool(x: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """``max_unpool2d(x, indices, 2, 2, output_size=size[-2:])``: each value to the position its pool took it from."""
    unpooled = x.new_zeros(size).flatten(2).scatter(2, indices.flatten(2), x.flatten(2))
    return unpooled.view(size)


def _decoder_stage(width: int, convs: int, out_width: int) -> nn.Sequential:
    """A decoder stage: ``convs`` 3x3 conv-BN-ReLUs at ``width``, the last narrowing to ``out_width``."""
    layers: list[nn.Module] = []
    for i in range(convs):
        out = out_width if i == convs - 1 else width
        layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SegNet(nn.Module):
    """VGG-16 encoder with batch norm; a mirrored decoder that upsamples with the encoder's max-pool switches."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.in_channels = in_channels
        convs = [n for _, n in VGG16_STAGES]
        self.encoder = nn.ModuleList(
            vgg_stage(in_channels if i == 0 else widths[i - 1], widths[i], convs[i], batch_norm=True)
            for i in range(len(widths))
        )
        # decoder[i] mirrors encoder[i]; decoder[0] leaves its last convolution to the classifier
        self.decoder = nn.ModuleList(
            _decoder_stage(widths[i], convs[i] if i else convs[i] - 1, widths[i - 1] if i else widths[0])
            for i in range(len(widths))
        )
        self.classifier = nn.Conv2d(widths[0], num_classes, 3, padding=1)
        init_weights(self, transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tile(x, self.in_channels)
        switches = []
        for stage in self.encoder:
            features = stage(x)
            x, indices = F.max_pool2d(features, 2, 2, return_indices=True)
            switches.append((indices, features.shape))
        for stage, (indices, size) in zip(reversed(self.decoder), reversed(switches)):
            x = stage(max_unpool(x, indices, size))
        return self.classifier(x)


@register_model(family="segnet", output_stride=1, whole_tile_context=False)
def segnet_vgg16(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> SegNet:
    """SegNet on VGG-16: 29.5M parameters; the decoder unpools with the encoder's max-pool switches."""
    return SegNet(in_channels, num_classes, [scale_channels(width, width_multiplier) for width, _ in VGG16_STAGES])
