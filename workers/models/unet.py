"""U-Net and U-Net++, in plain PyTorch.

U-Net: Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical
Image Segmentation" (MICCAI 2015, arXiv:1505.04597), as its Fig. 1 draws it: four
levels of two 3x3 convolutions with ReLU (64, 128, 256, 512 channels), each followed by
a 2x2 max pool, a bottom level of 1024, dropout at the end of the contracting path (0.5),
and an expanding path of 2x2 up-convolutions halving the channels, concatenation with
the contracting path's map of the same level and two 3x3 convolutions, then a 1x1
convolution to the classes. No batch norm; Kaiming initialisation (fan-out, as the
other models; the paper's Gaussian of std sqrt(2/N) is the fan-in form). Difference:
the paper's convolutions are unpadded, so its output is smaller than its input
(572 -> 388) and skips are cropped; here they are padded by 1, so logits are the
tile's size and nothing is cropped. Padding adds no parameters: with the paper's 1 band
and 2 classes the model has 31,030,658, the count of Fig. 1's layers (as paper-width
Keras and tf_unet U-Nets report; the often quoted 31,031,685 is a Keras U-Net with an
extra 3x3 convolution to 2 channels and one sigmoid output, not the paper's).

U-Net++: Zhou, Rahman Siddiquee, Tajbakhsh and Liang, "UNet++: A Nested U-Net
Architecture for Medical Image Segmentation" (DLMIA 2018, arXiv:1807.10165). Follows
``Nest_Net`` in the authors' reference code (``model_logic.py`` in
https://github.com/MrGiovanni/UNetPlusPlus), written afresh here: node X(i,j) at level
i (widths 32, 64, 128, 256, 512) is two 3x3 convolutions with ReLU, each followed by
dropout 0.5; X(i,0) is the encoder (2x2 max pools between levels); X(i,j) for j > 0
takes the 2x2 up-convolution of X(i+1,j-1) concatenated with X(i,0) ... X(i,j-1) (the
dense skips); a 1x1 convolution scores X(0,4). That is the reference's default,
without deep supervision: with its 1 band and 1 class the model has the reference's
9,041,601 parameters (the paper's Table 1: 9.04M). Its convolutions are padded ("same")
already.

Deep supervision (the paper's section 2, the reference's ``deep_supervision=True``) is
the option ``deep_supervision=True``: three more 1x1 heads score X(0,1), X(0,2) and
X(0,3) (``heads.x0_1`` ... ``heads.x0_3``; ``classifier`` stays the head of X(0,4), so
the other names do not change), 3 x (32 x classes + classes) parameters more. In train
mode ``forward`` returns every head's logits, shallowest first, stacked as one tensor
``(4, N, classes, H, W)``; ``pipeline.train`` minimises the mean of the four heads'
losses (cross-entropy plus soft Dice each). In eval mode (prediction, validation,
exports) it returns the paper's "accurate mode", the heads' probabilities averaged, as
logits: ``log(mean_k softmax(logits_k))``, so the pipeline's softmax gives exactly the
mean probabilities and its argmax their most likely class. The paper's "fast mode" (one
head, the pruned network) is not offered: a model trained with deep supervision is
scored by the mean of its heads.

Both have output stride 1 and no image pooling (``whole_tile_context=False``).

Parameters with 3 bands and 19 classes (width_multiplier 1.0):

    unet                                        31,032,915
    unet_plusplus                                9,042,771
    unet_plusplus (deep_supervision=True)        9,044,652
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from schemas.errors import SpecError
from workers.models.blocks import init_weights
from workers.models.registry import check_tile, register_model, scale_channels

__all__ = ["UNet", "UNetPlusPlus", "unet", "unet_plusplus"]

_UNET_WIDTHS = (64, 128, 256, 512, 1024)
_UNET_PLUSPLUS_WIDTHS = (32, 64, 128, 256, 512)
_DROPOUT = 0.5


def _double_conv(in_channels: int, out_channels: int, dropout: float = 0.0) -> nn.Sequential:
    """Two padded 3x3 convolutions with ReLU (each followed by dropout when ``dropout`` > 0)."""
    layers: list[nn.Module] = []
    for i in range(2):
        layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _up(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """2x2 up-convolution, stride 2."""
    return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)


class UNet(nn.Module):
    """Contracting path of ``len(widths) - 1`` pools, expanding path with concatenated skips, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.down = nn.ModuleList(
            _double_conv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(len(widths))
        )
        self.pool = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout(_DROPOUT)
        self.up = nn.ModuleList(_up(widths[i + 1], widths[i]) for i in range(len(widths) - 1))
        self.decoder = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in range(len(widths) - 1))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)
        init_weights(self, transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tile(x, self.in_channels)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = self.dropout(skips.pop())
        for i in reversed(range(len(self.up))):
            x = self.decoder[i](torch.cat([skips[i], self.up[i](x)], dim=1))
        return self.classifier(x)


class UNetPlusPlus(nn.Module):
    """Nested U-Net: node X(i,j) sees every X(i,k<j) and the up-convolution of X(i+1,j-1); scores X(0,depth).

    With ``deep_supervision`` a 1x1 head also scores each X(0,j), 0 < j < depth - 1: train mode returns all heads'
    logits stacked ``(heads, N, C, H, W)``, eval mode the log of their mean softmax ``(N, C, H, W)``.
    """

    def __init__(
        self, in_channels: int, num_classes: int, widths: Sequence[int], deep_supervision: bool = False
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.depth = len(widths)
        self.deep_supervision = deep_supervision
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for i in range(self.depth):
            self.nodes[f"x{i}_0"] = _double_conv(in_channels if i == 0 else widths[i - 1], widths[i], _DROPOUT)
        for j in range(1, self.depth):
            for i in range(self.depth - j):
                self.ups[f"x{i}_{j}"] = _up(widths[i + 1], widths[i])
                self.nodes[f"x{i}_{j}"] = _double_conv((j + 1) * widths[i], widths[i], _DROPOUT)
        self.pool = nn.MaxPool2d(2, 2)
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)
        if deep_supervision:  # registered after the classifier: the default model's modules and names are untouched
            self.heads = nn.ModuleDict(
                {f"x0_{j}": nn.Conv2d(widths[0], num_classes, 1) for j in range(1, self.depth - 1)}
            )
        init_weights(self, transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tile(x, self.in_channels)
        grid: list[list[torch.Tensor]] = []  # grid[i][j] is X(i,j)
        for i in range(self.depth):
            grid.append([self.nodes[f"x{i}_0"](x if i == 0 else self.pool(grid[i - 1][0]))])
        for j in range(1, self.depth):
            for i in range(self.depth - j):
                up = self.ups[f"x{i}_{j}"](grid[i + 1][j - 1])
                grid[i].append(self.nodes[f"x{i}_{j}"](torch.cat([up, *grid[i]], dim=1)))
        if not self.deep_supervision:
            return self.classifier(grid[0][-1])
        logits = torch.stack(
            [self.heads[f"x0_{j}"](grid[0][j]) for j in range(1, self.depth - 1)] + [self.classifier(grid[0][-1])]
        )
        if self.training:
            return logits
        # accurate mode: log of the heads' mean probabilities, without leaving log space
        return torch.logsumexp(torch.log_softmax(logits, dim=2), dim=0) - math.log(logits.shape[0])


@register_model(family="unet", output_stride=1, whole_tile_context=False)
def unet(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> UNet:
    """U-Net (Ronneberger et al. 2015) with padded convolutions: 31.0M parameters."""
    return UNet(in_channels, num_classes, [scale_channels(w, width_multiplier) for w in _UNET_WIDTHS])


@register_model(family="unet_plusplus", output_stride=1, whole_tile_context=False)
def unet_plusplus(
    in_channels: int, num_classes: int, *, width_multiplier: float = 1.0, deep_supervision: bool = False
) -> UNetPlusPlus:
    """U-Net++ (Zhou et al. 2018) with dense nested skips: 9.0M parameters."""
    if not isinstance(deep_supervision, bool):
        raise SpecError(f"deep_supervision must be true or false, got {deep_supervision!r}")
    widths = [scale_channels(w, width_multiplier) for w in _UNET_PLUSPLUS_WIDTHS]
    return UNetPlusPlus(in_channels, num_classes, widths, deep_supervision)
