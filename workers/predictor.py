"""The model side of a job: build a model, run batches of tiles, stitch a chunk.

`TilePredictor` is a plain class; the runner wraps it with ``ray.remote`` so
one actor holds one model (one per GPU, or CPU actors when there is none).
The benchmark uses the same class without Ray to time the model alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from pipeline.geometry import Window
from pipeline.plan import ChunkTask, ScenePlan
from pipeline.stitch import stitch_chunk, window_weights
from workers.reader import WindowData

__all__ = ["ModelSource", "TilePredictor", "pick_device"]


@dataclass(frozen=True)
class ModelSource:
    """How to build the model: from a checkpoint, or a registry name with seeded random weights."""

    name: str
    in_channels: int
    num_classes: int
    options: dict = field(default_factory=dict)
    checkpoint: str | None = None
    seed: int = 0

    def build(self) -> torch.nn.Module:
        from workers.models import build_from_checkpoint, create_model, load_checkpoint

        if self.checkpoint:
            return build_from_checkpoint(load_checkpoint(self.checkpoint))
        torch.manual_seed(self.seed)
        return create_model(self.name, self.in_channels, self.num_classes, **self.options).eval()


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TilePredictor:
    """One model on one device; predicts batches of tiles and stitches chunks."""

    def __init__(self, source: ModelSource, *, device: str = "auto", batch_size: int = 8, threads: int | None = None):
        self.device = torch.device(pick_device(device))
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.model = source.build().to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.num_classes = source.num_classes
        self._weights: dict[tuple[str, int], np.ndarray] = {}
        self.tiles_predicted = 0

    def predict_batch(self, batch: np.ndarray, *, classes: bool = False) -> np.ndarray:
        """Probabilities (N, C, T, T) float32, or class maps (N, T, T) uint8, of a batch of tiles."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch))
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True).to(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = self.model(x)
                logits = logits.float()
            else:
                logits = self.model(x)
            self.tiles_predicted += len(batch)
            if classes:
                return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
            return torch.softmax(logits, dim=1).cpu().numpy()

    def _tile_outputs(self, data: WindowData, wins: list[Window], classes: bool) -> Iterator[tuple[Window, np.ndarray]]:
        for i in range(0, len(wins), self.batch_size):
            part = wins[i : i + self.batch_size]
            batch = np.stack([data.image[(slice(None), *w.slices_in(data.window))] for w in part])
            yield from zip(part, self.predict_batch(batch, classes=classes))

    def predict_chunk(self, data: WindowData, task: ChunkTask, plan: ScenePlan, window: str) -> np.ndarray:
        """The chunk's class map (uint8, 255 where the input has no data)."""
        lattice = plan.lattice
        wins = []
        for r, c in task.tiles:
            win = lattice.window(r, c)
            if data.valid[win.slices_in(data.window)].any():
                wins.append(win)  # a tile with no valid pixel skips the model
        weights = None
        if plan.mode == "blend":
            key = (window, lattice.tile)
            if key not in self._weights:
                self._weights[key] = window_weights(window, lattice.tile)
            weights = self._weights[key]
        mask = stitch_chunk(
            task.chunk,
            self._tile_outputs(data, wins, classes=plan.mode == "crop"),
            lattice=lattice,
            mode=plan.mode,
            num_classes=self.num_classes,
            weights=weights,
        )
        mask[~data.valid[task.chunk.slices_in(data.window)]] = 255
        return mask

    def node(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.device)}
