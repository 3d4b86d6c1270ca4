"""A per-pixel linear classifier: the smallest model the pipeline can run.

One 1x1 convolution maps each pixel's bands to class logits, as a spectral
classifier does. It is a baseline to compare the deep models with, and the
benchmark's probe of what the pipeline itself costs: its model time is next
to nothing, so a job with it runs at the rate that reading, tiling,
stitching, writing and counting can feed a model (benchmarks/pipeline.py).
"""

from __future__ import annotations

from torch import nn

from workers.models.registry import check_tile, register_model, scale_channels

__all__ = ["PixelLinear", "pixel_linear"]


class PixelLinear(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.in_channels = in_channels
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x):
        check_tile(x, self.in_channels)
        return self.classifier(x)


@register_model(family="baseline", output_stride=1, whole_tile_context=False)
def pixel_linear(in_channels: int, num_classes: int, *, width_multiplier: float = 1.0) -> PixelLinear:
    """Per-pixel linear classifier (one 1x1 convolution): a spectral baseline and the pipeline's feed-rate probe."""
    scale_channels(in_channels, width_multiplier)  # checked like every model's; there is no hidden layer to narrow
    return PixelLinear(in_channels, num_classes)
