"""Training a model on GeoTIFF pairs: random windowed crops, cross-entropy plus soft Dice.

Crops are read by window, never whole scenes. The result is a safetensors
checkpoint that carries the model name, bands, classes and normalisation, so
`satseg run --checkpoint` needs nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

from pipeline import __version__
from pipeline.geometry import Window
from pipeline.progress import progress_bar
from schemas.errors import SpecError
from workers.reader import check_bands, check_labels_match, open_scene, read_image_window, read_label_window

__all__ = ["TrainResult", "train_model", "soft_dice_loss", "band_statistics"]


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    sha256: str
    losses: list[float]
    seconds: float
    validation_miou: float


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over classes (V-Net), counting only pixels not ignored."""
    c = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    keep = (~ignore).unsqueeze(1).float()
    onehot = F.one_hot(target.clamp(min=0), c).permute(0, 3, 1, 2).float()
    inter = (probs * onehot * keep).sum(dim=(0, 2, 3))
    denom = ((probs + onehot) * keep).sum(dim=(0, 2, 3))
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()


def band_statistics(path: str, bands: Sequence[int], windows: list[Window]) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation of valid pixels over sample windows."""
    sums = np.zeros(len(bands))
    sq = np.zeros(len(bands))
    n = 0
    for win in windows:
        data = read_image_window(path, win, bands, [0.0] * len(bands), [1.0] * len(bands))
        px = data.image[:, data.valid].astype(np.float64)
        sums += px.sum(axis=1)
        sq += (px**2).sum(axis=1)
        n += px.shape[1]
    if n == 0:
        raise SpecError(f"{path}: no valid pixels in the sampled windows; check the image's nodata value")
    mean = sums / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 1e-12))
    return mean.tolist(), std.tolist()


def _class_names(labels: list[str], given: Sequence[str] | None) -> list[str]:
    if given:
        return list(given)
    with rasterio.open(labels[0]) as src:
        tag = src.tags().get("classes")
    if tag:
        return tag.split(",")
    raise SpecError(f"{labels[0]}: label raster has no `classes` tag; pass the class names with --classes")


def _sample_windows(rng: np.random.Generator, height: int, width: int, crop: int, count: int) -> list[Window]:
    return [
        Window(int(rng.integers(0, max(1, height - crop + 1))), int(rng.integers(0, max(1, width - crop + 1))), crop, crop)
        for _ in range(count)
    ]


def _augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = int(rng.integers(0, 4))
    x, y = torch.rot90(x, k, dims=(-2, -1)), torch.rot90(y, k, dims=(-2, -1))
    if rng.random() < 0.5:
        x, y = torch.flip(x, dims=(-1,)), torch.flip(y, dims=(-1,))
    return x, y


def _miou(logits: torch.Tensor, target: torch.Tensor, c: int) -> float:
    from pipeline.metrics import confusion_matrix, segmentation_metrics

    pred = logits.argmax(1).numpy()
    t = target.numpy()
    return segmentation_metrics(confusion_matrix(t, pred, c, ignore_index=-1)).mean_iou


def train_model(
    images: Sequence[str | Path],
    labels: Sequence[str | Path],
    model_name: str,
    out: str | Path,
    *,
    epochs: int = 10,
    steps_per_epoch: int = 40,
    batch_size: int = 8,
    crop: int = 128,
    lr: float = 2e-3,
    bands: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    model_options: dict | None = None,
    seed: int = 0,
    threads: int | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Fit ``model_name`` on image/label pairs and write a safetensors checkpoint to ``out``."""
    from workers.models import create_model, save_checkpoint

    if len(images) != len(labels) or not images:
        raise SpecError("give one label raster per image (--image and --labels, same count)")
    if crop % 32:
        raise SpecError(f"crop size must be a multiple of 32 (got {crop})")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if threads:
        torch.set_num_threads(threads)
    infos = [open_scene(p) for p in images]
    label_infos = [open_scene(p, role="label") for p in labels]
    for info, lab in zip(infos, label_infos):
        check_labels_match(info, lab)
    bands = list(bands or range(1, infos[0].count + 1))
    for info in infos:
        check_bands(info, bands)
    names = _class_names([str(p) for p in labels], class_names)
    c = len(names)
    mean, std = band_statistics(infos[0].path, bands, _sample_windows(rng, infos[0].height, infos[0].width, crop, 32))

    pool_x, pool_y = [], []
    pool_size = max(64, 4 * batch_size)
    for i in range(pool_size + 2 * batch_size):
        k = i % len(infos)
        win = _sample_windows(rng, infos[k].height, infos[k].width, crop, 1)[0]
        data = read_image_window(infos[k].path, win, bands, mean, std)
        y = read_label_window(label_infos[k].path, win)
        y[(~data.valid) | (y >= c)] = -1
        pool_x.append(torch.from_numpy(data.image))
        pool_y.append(torch.from_numpy(y))
    val_x, val_y = torch.stack(pool_x[pool_size:]), torch.stack(pool_y[pool_size:])
    pool_x, pool_y = pool_x[:pool_size], pool_y[:pool_size]

    options = dict(model_options or {})
    model = create_model(model_name, len(bands), c, **options)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / total) ** 0.9)
    losses: list[float] = []
    t0 = time.perf_counter()
    miou = float("nan")
    with progress_bar(show_progress) as progress:
        bar = progress.add_task(f"train {model_name}", total=total)
        for epoch in range(epochs):
            model.train()
            for _ in range(steps_per_epoch):
                idx = rng.integers(0, len(pool_x), size=batch_size)
                pairs = [_augment(pool_x[i], pool_y[i], rng) for i in idx]
                x = torch.stack([p[0] for p in pairs]).contiguous()
                y = torch.stack([p[1] for p in pairs]).contiguous()
                logits = model(x)
                ignore = y < 0
                loss = F.cross_entropy(logits, y.clamp(min=0), reduction="none")[~ignore].mean() + soft_dice_loss(logits, y, ignore)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                progress.advance(bar)
            model.eval()
            with torch.inference_mode():
                miou = _miou(model(val_x), val_y, c)
            progress.update(bar, description=f"train {model_name} epoch {epoch + 1}/{epochs} loss {np.mean(losses[-steps_per_epoch:]):.3f} val mIoU {miou:.3f}")
    provenance = {
        "images": [str(p) for p in images],
        "labels": [str(p) for p in labels],
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "crop": crop,
        "lr": lr,
        "seed": seed,
        "loss": "cross_entropy + soft_dice",
        "final_loss": losses[-1],
        "validation_mean_iou": miou,
        "satseg_version": __version__,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = save_checkpoint(
        out, model, model_name=model_name, model_kwargs=options, bands=bands, class_names=names, mean=mean, std=std, provenance=provenance
    )
    return TrainResult(out, sha, losses, time.perf_counter() - t0, miou)
