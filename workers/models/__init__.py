"""Segmentation models in plain PyTorch (HRNetV2, DeepLabV3+, DeepLabV3, PSPNet, FCN, SegNet, U-Net, U-Net++, LinkNet, a
per-pixel linear baseline), their registry, checkpoints, exports and published weights.

Importing this package registers every model family, so ``create_model`` knows them all.
"""

from workers.models import baseline, deeplab, hrnet  # noqa: F401  (importing registers the models)
from workers.models import fcn, segnet, unet  # noqa: F401  (FCN-32s/16s/8s, SegNet, U-Net, U-Net++)
from workers.models import deeplabv3, linknet, pspnet  # noqa: F401  (DeepLabV3, LinkNet, PSPNet)
from workers.models.checkpoint import (
    Checkpoint,
    build_from_checkpoint,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from workers.models.costs import ModelCosts, model_costs
from workers.models.registry import TILE_MULTIPLE, ModelInfo, create_model, list_models, model_info

__all__ = [
    "ModelCosts",
    "model_costs",
    "TILE_MULTIPLE",
    "ModelInfo",
    "create_model",
    "list_models",
    "model_info",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "build_from_checkpoint",
    "file_sha256",
]
