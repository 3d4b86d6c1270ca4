"""Residual blocks shared by the model families (ResNet v1.5 bottleneck)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "init_weights"]


def init_weights(model: nn.Module, *, transposed: bool = False) -> None:
    """Kaiming-normal convolutions (fan out) with zero biases, unit batch norms: satseg trains from scratch.

    ``transposed`` initialises transposed convolutions the same way (the VGG families); otherwise they keep PyTorch's
    default, as LinkNet's reference does.
    """
    kinds = (nn.Conv2d, nn.ConvTranspose2d) if transposed else (nn.Conv2d,)
    for module in model.modules():
        if isinstance(module, kinds):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (strided or dilated), 1x1 expand (x4), residual."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)
