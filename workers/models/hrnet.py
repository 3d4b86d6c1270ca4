"""HRNetV2 for semantic segmentation, in plain PyTorch.

Paper: Sun et al., "High-Resolution Representations for Labeling Pixels and Regions"
(arXiv:1904.04514); Wang et al., "Deep High-Resolution Representation Learning for
Visual Recognition" (TPAMI 2020, arXiv:1908.07919).

Architecture and variant configurations follow ``HighResolutionNet`` in
https://github.com/HRNet/HRNet-Semantic-Segmentation (``lib/models/seg_hrnet.py`` and the
``experiments/cityscapes/seg_hrnet_*.yaml`` files, MIT licence), written afresh here.
Module names match that file, so its state-dict keys (less the ``model.`` prefix) load
when bands and classes agree. Differences: the first conv takes any number of bands,
logits are upsampled bilinearly x4 to the tile inside ``forward`` (the reference does it
in the loss), interpolation uses ``align_corners=False``, and weights start from Kaiming
initialisation because satseg trains from scratch on any number of bands.

Parameters with 3 bands and 19 classes (width_multiplier 1.0):

    hrnet_w18_small_v1   1,540,819
    hrnet_w18_small_v2   3,939,579
    hrnet_w18            9,641,119
    hrnet_w32           29,546,515
    hrnet_w48           65,859,379
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.blocks import Bottleneck, init_weights
from workers.models.registry import check_tile, register_model, scale_channels

__all__ = [
    "HighResolutionNet",
    "hrnet_w18_small_v1",
    "hrnet_w18_small_v2",
    "hrnet_w18",
    "hrnet_w32",
    "hrnet_w48",
]


@dataclass(frozen=True)
class StageConfig:
    """One HRNet stage: ``modules`` repeats of parallel branches of ``blocks`` residual blocks."""

    modules: int
    block: str
    blocks: tuple[int, ...]
    channels: tuple[int, ...]


def _stages(stage1: StageConfig, blocks: int, modules: tuple[int, int, int], width: int) -> tuple[StageConfig, ...]:
    """Stages 1-4 of a variant whose branch widths double from ``width``."""
    return (stage1,) + tuple(
        StageConfig(modules[i], "basic", (blocks,) * (i + 2), tuple(width * 2**b for b in range(i + 2)))
        for i in range(3)
    )


_CFGS: dict[str, tuple[StageConfig, ...]] = dict(
    hrnet_w18_small_v1=(
        StageConfig(modules=1, block="bottleneck", blocks=(1,), channels=(32,)),
        StageConfig(modules=1, block="basic", blocks=(2, 2), channels=(16, 32)),
        StageConfig(modules=1, block="basic", blocks=(2, 2, 2), channels=(16, 32, 64)),
        StageConfig(modules=1, block="basic", blocks=(2, 2, 2, 2), channels=(16, 32, 64, 128)),
    ),
    hrnet_w18_small_v2=_stages(StageConfig(1, "bottleneck", (2,), (64,)), blocks=2, modules=(1, 3, 2), width=18),
    hrnet_w18=_stages(StageConfig(1, "bottleneck", (4,), (64,)), blocks=4, modules=(1, 4, 3), width=18),
    hrnet_w32=_stages(StageConfig(1, "bottleneck", (4,), (64,)), blocks=4, modules=(1, 4, 3), width=32),
    hrnet_w48=_stages(StageConfig(1, "bottleneck", (4,), (64,)), blocks=4, modules=(1, 4, 3), width=48),
)

_STEM_WIDTH = 64


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet basic block)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _make_layer(
    block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, blocks: int
) -> nn.Sequential:
    """A run of residual blocks at one resolution; a 1x1 projection adapts the first when widths differ."""
    downsample = None
    if inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, 1, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches at 1/4, 1/8, ... resolution, then every branch fuses every other (sum)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        in_channels: Sequence[int],
        channels: Sequence[int],
    ) -> None:
        super().__init__()
        self.num_branches = len(channels)
        self.branches = nn.ModuleList(
            _make_layer(block, in_channels[i], channels[i], num_blocks[i]) for i in range(self.num_branches)
        )
        self.out_channels = [c * block.expansion for c in channels]
        self.fuse_layers = self._make_fuse_layers() if self.num_branches > 1 else None
        self.relu = nn.ReLU(inplace=True)

    def _make_fuse_layers(self) -> nn.ModuleList:
        """fuse_layers[i][j] maps branch j to branch i: 1x1 conv + upsample, identity, or strided 3x3s."""
        widths = self.out_channels
        fuse_layers = nn.ModuleList()
        for i in range(self.num_branches):
            fuse_layer = nn.ModuleList()
            for j in range(self.num_branches):
                if j > i:
                    fuse_layer.append(
                        nn.Sequential(nn.Conv2d(widths[j], widths[i], 1, bias=False), nn.BatchNorm2d(widths[i]))
                    )
                elif j == i:
                    fuse_layer.append(None)
                else:
                    downs = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        out = widths[i] if last else widths[j]
                        step = [_conv3x3(widths[j], out, 2), nn.BatchNorm2d(out)]
                        downs.append(nn.Sequential(*step) if last else nn.Sequential(*step, nn.ReLU(inplace=True)))
                    fuse_layer.append(nn.Sequential(*downs))
            fuse_layers.append(fuse_layer)
        return fuse_layers

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        fused = []
        for i, fuse_layer in enumerate(self.fuse_layers):
            y = xs[0] if i == 0 else fuse_layer[0](xs[0])
            for j in range(1, self.num_branches):
                if j == i:
                    y = y + xs[j]
                elif j > i:
                    y = y + _resize(fuse_layer[j](xs[j]), xs[i])
                else:
                    y = y + fuse_layer[j](xs[j])
            fused.append(self.relu(y))
        return fused


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _make_transition_layer(previous: Sequence[int], current: Sequence[int]) -> nn.ModuleList:
    """Adapt widths of existing branches (3x3 conv) and spawn new ones from the lowest (strided 3x3s)."""
    layers = nn.ModuleList()
    for i, width in enumerate(current):
        if i < len(previous):
            if width != previous[i]:
                layers.append(
                    nn.Sequential(_conv3x3(previous[i], width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
                )
            else:
                layers.append(None)
        else:
            downs = []
            for k in range(i + 1 - len(previous)):
                out = width if k == i - len(previous) else previous[-1]
                downs.append(nn.Sequential(_conv3x3(previous[-1], out, 2), nn.BatchNorm2d(out), nn.ReLU(inplace=True)))
            layers.append(nn.Sequential(*downs))
    return layers


def _make_stage(stage: StageConfig, in_channels: Sequence[int]) -> tuple[nn.Sequential, list[int]]:
    block = _BLOCKS[stage.block]
    modules = []
    for _ in range(stage.modules):
        modules.append(HighResolutionModule(block, stage.blocks, in_channels, stage.channels))
        in_channels = modules[-1].out_channels
    return nn.Sequential(*modules), list(in_channels)


def _transition(transition: nn.ModuleList, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [
        xs[i] if layer is None else layer(xs[i] if i < len(xs) else xs[-1]) for i, layer in enumerate(transition)
    ]


class HighResolutionNet(nn.Module):
    """HRNetV2: stem to 1/4, four stages of 1-4 parallel resolutions, all branches concatenated at 1/4."""

    def __init__(
        self, stages: Sequence[StageConfig], in_channels: int, num_classes: int, stem_width: int = _STEM_WIDTH
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = _conv3x3(in_channels, stem_width, 2)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.conv2 = _conv3x3(stem_width, stem_width, 2)
        self.bn2 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)

        stage1, stage2, stage3, stage4 = stages
        block = _BLOCKS[stage1.block]
        self.layer1 = _make_layer(block, stem_width, stage1.channels[0], stage1.blocks[0])
        widths = [stage1.channels[0] * block.expansion]
        self.transition1 = _make_transition_layer(widths, stage2.channels)
        self.stage2, widths = _make_stage(stage2, stage2.channels)
        self.transition2 = _make_transition_layer(widths, stage3.channels)
        self.stage3, widths = _make_stage(stage3, stage3.channels)
        self.transition3 = _make_transition_layer(widths, stage4.channels)
        self.stage4, widths = _make_stage(stage4, stage4.channels)

        last_channels = sum(widths)
        self.last_layer = nn.Sequential(
            nn.Conv2d(last_channels, last_channels, 1),
            nn.BatchNorm2d(last_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(last_channels, num_classes, 1),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tile(x, self.in_channels)
        size = x.shape[-2:]
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        xs = self.stage2(_transition(self.transition1, [self.layer1(x)]))
        xs = self.stage3(_transition(self.transition2, xs))
        xs = self.stage4(_transition(self.transition3, xs))
        features = torch.cat([xs[0]] + [_resize(x, xs[0]) for x in xs[1:]], dim=1)
        logits = self.last_layer(features)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _create_hrnet(variant: str, in_channels: int, num_classes: int, width_multiplier: float) -> HighResolutionNet:
    stages = tuple(
        replace(s, channels=tuple(scale_channels(c, width_multiplier) for c in s.channels)) for s in _CFGS[variant]
    )
    stem_width = scale_channels(_STEM_WIDTH, width_multiplier)
    return HighResolutionNet(stages, in_channels, num_classes, stem_width)


@register_model(family="hrnet", output_stride=4, whole_tile_context=False)
def hrnet_w18_small_v1(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> HighResolutionNet:
    """HRNetV2-W18-Small-v1: 1.5M parameters, the fastest HRNet."""
    return _create_hrnet("hrnet_w18_small_v1", in_channels, num_classes, width_multiplier)


@register_model(family="hrnet", output_stride=4, whole_tile_context=False)
def hrnet_w18_small_v2(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> HighResolutionNet:
    """HRNetV2-W18-Small-v2: 3.9M parameters."""
    return _create_hrnet("hrnet_w18_small_v2", in_channels, num_classes, width_multiplier)


@register_model(family="hrnet", output_stride=4, whole_tile_context=False)
def hrnet_w18(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> HighResolutionNet:
    """HRNetV2-W18: 9.6M parameters."""
    return _create_hrnet("hrnet_w18", in_channels, num_classes, width_multiplier)


@register_model(family="hrnet", output_stride=4, whole_tile_context=False)
def hrnet_w32(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> HighResolutionNet:
    """HRNetV2-W32: 29.5M parameters."""
    return _create_hrnet("hrnet_w32", in_channels, num_classes, width_multiplier)


@register_model(family="hrnet", output_stride=4, whole_tile_context=False)
def hrnet_w48(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> HighResolutionNet:
    """HRNetV2-W48: 65.9M parameters, the most accurate HRNet."""
    return _create_hrnet("hrnet_w48", in_channels, num_classes, width_multiplier)
