"""Segmentation models in plain PyTorch (HRNetV2, DeepLabV3+, a per-pixel linear baseline), their registry and checkpoints.

Importing this package registers every model family, so ``create_model`` knows them all.
"""

from workers.models import baseline, deeplab, hrnet  # noqa: F401  (importing registers the models)
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
