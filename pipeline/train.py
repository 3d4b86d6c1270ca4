"""Training a model on GeoTIFF pairs: random windowed crops, cross-entropy plus soft Dice.

Crops are read by window, never whole scenes. A band of rows at the bottom of every
scene is held out: training crops come only from the rows above it, a fixed, seeded set
of validation crops only from inside it, so the validation mean IoU after each epoch
measures pixels the model never trained on. ``out`` always holds the best epoch by that
score, a safetensors checkpoint that carries the model name, bands, classes and
normalisation, so `satseg run --checkpoint` needs nothing else; the last epoch's full
state sits beside it (:mod:`pipeline.train_state`) so a stopped run can be resumed and
ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import __version__
from pipeline.core.geometry import Window
from pipeline.progress import progress_bar
from pipeline.train_state import TrainState, capture_rng, load_train_state, restore_rng, save_train_state, train_state_path
from schemas.errors import SpecError
from schemas.rasters import recorded_path
from schemas.job import TILE_MULTIPLE, check_device, resolve_device
from workers.reader import check_bands, check_labels_match, open_scene, raster_tags, read_image_window, read_label_window

if TYPE_CHECKING:
    from workers.models.pretrained import InitReport

__all__ = [
    "TrainData",
    "TrainSettings",
    "SceneSplit",
    "EpochReport",
    "TrainResult",
    "train_model",
    "split_scene",
    "sample_windows",
    "improves",
    "training_device",
    "soft_dice_loss",
    "band_statistics",
]

_WEIGHT_DECAY = 1e-4
_POLY_POWER = 0.9
_STAT_WINDOWS = 32
_LOSS = "cross_entropy + soft_dice"


@dataclass(frozen=True)
class TrainData:
    """What to learn from: image/label GeoTIFF pairs, in the same order, and the bands and classes to use.

    ``bands`` defaults to all of them, ``class_names`` to the first label raster's ``classes`` tag.
    """

    images: tuple[str | Path, ...]
    labels: tuple[str | Path, ...]
    bands: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("images", "labels", "bands", "class_names"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if len(self.images) != len(self.labels) or not self.images:
            raise SpecError(
                f"{len(self.images)} image(s) but {len(self.labels)} label raster(s) "
                f"({', '.join(map(str, self.labels)) or 'none'}); give one --labels per --image, in the same order"
            )


@dataclass(frozen=True)
class TrainSettings:
    """How to train; checked when built, with the messages `satseg train` gives for its flags.

    A resumed run must repeat every field except ``epochs`` (which may grow), ``threads`` and ``device``.
    """

    epochs: int = 10
    steps_per_epoch: int = 40
    batch_size: int = 8
    crop: int = 128
    lr: float = 2e-3
    val_fraction: float = 0.15
    val_crops: int = 32
    seed: int = 0
    threads: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.crop <= 0 or self.crop % TILE_MULTIPLE:
            nearest = max(TILE_MULTIPLE, round(self.crop / TILE_MULTIPLE) * TILE_MULTIPLE)
            raise SpecError(
                f"crop size must be a positive multiple of {TILE_MULTIPLE} (got {self.crop}); try --crop {nearest}"
            )
        for flag, value in (("--epochs", self.epochs), ("--steps-per-epoch", self.steps_per_epoch),
                            ("--batch-size", self.batch_size), ("--val-crops", self.val_crops)):
            if value < 1:
                raise SpecError(f"{flag} must be at least 1 (got {value})")
        if not 0.0 < self.val_fraction < 1.0:
            raise SpecError(f"--val-fraction must lie strictly between 0 and 1 (got {self.val_fraction}); e.g. 0.15")
        check_device(self.device)


@dataclass(frozen=True)
class SceneSplit:
    """One scene's training region and the band of rows held out for validation below it; they never overlap."""

    image: str
    labels: str
    train: Window
    validation: Window


@dataclass(frozen=True)
class EpochReport:
    """What an ``on_epoch_end`` callback sees after an epoch is finished and saved (``model`` is live: read only)."""

    epoch: int
    epochs: int
    mean_loss: float
    validation_miou: float
    best_epoch: int
    best_miou: float
    model: nn.Module


@dataclass(frozen=True)
class TrainResult:
    """A finished run: the best checkpoint, the state beside it, and the histories that chose it."""

    checkpoint: Path
    sha256: str
    losses: list[float]
    seconds: float
    validation_miou: float
    best_epoch: int
    history: list[float]
    state: Path
    device: str
    splits: tuple[SceneSplit, ...]
    validation_windows: tuple[tuple[int, Window], ...]
    training_windows: tuple[tuple[int, Window], ...]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over classes (V-Net), counting only pixels not ignored."""
    c = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    keep = (~ignore).unsqueeze(1).float()
    onehot = F.one_hot(target.clamp(min=0), c).permute(0, 3, 1, 2).float()
    inter = (probs * onehot * keep).sum(dim=(0, 2, 3))
    denom = ((probs + onehot) * keep).sum(dim=(0, 2, 3))
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()


def band_statistics(reads: Sequence[tuple[str, Window]], bands: Sequence[int]) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation of valid pixels over (image path, window) samples."""
    sums = np.zeros(len(bands))
    sq = np.zeros(len(bands))
    n = 0
    for path, win in reads:
        data = read_image_window(path, win, bands, [0.0] * len(bands), [1.0] * len(bands))
        px = data.image[:, data.valid].astype(np.float64)
        sums += px.sum(axis=1)
        sq += (px**2).sum(axis=1)
        n += px.shape[1]
    if n == 0:
        raise SpecError(f"{reads[0][0]}: no valid pixels in the sampled windows; check the image's nodata value")
    mean = sums / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 1e-12))
    return mean.tolist(), std.tolist()


def split_scene(image: str, labels: str, height: int, width: int, crop: int, val_fraction: float) -> SceneSplit:
    """Hold out the last ``val_fraction`` of rows (at least one crop tall) for validation; train above it."""
    band = max(crop, round(val_fraction * height))
    start = height - band
    if width < crop or start < crop:
        raise SpecError(
            f"{image}: {height}x{width} pixels cannot hold a {crop}-pixel training crop above a {band}-row "
            "validation band; lower --crop or --val-fraction, or give a larger scene"
        )
    return SceneSplit(image, labels, Window(0, 0, start, width), Window(start, 0, band, width))


def sample_windows(rng: np.random.Generator, region: Window, crop: int, count: int) -> list[Window]:
    """``count`` uniformly placed square crops lying wholly inside ``region``."""
    return [
        Window(
            int(rng.integers(region.row_off, region.row_stop - crop + 1)),
            int(rng.integers(region.col_off, region.col_stop - crop + 1)),
            crop,
            crop,
        )
        for _ in range(count)
    ]


def improves(miou: float, best: float | None) -> bool:
    """Whether an epoch's validation mean IoU beats the best so far (ties keep the earlier epoch; NaN never wins)."""
    if math.isnan(miou):
        return False
    return best is None or math.isnan(best) or miou > best


def training_device(name: str) -> torch.device:
    """The torch device to train on (``schemas.job.resolve_device``); ``cuda`` without a GPU here is refused."""
    device = resolve_device(name, torch.cuda.device_count())
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda, but torch sees no CUDA GPU; use --device auto or cpu")
    return torch.device(device)


def _class_names(labels: list[str], given: Sequence[str] | None) -> list[str]:
    if given:
        return list(given)
    tag = raster_tags(labels[0]).get("classes")
    if tag:
        return tag.split(",")
    raise SpecError(f"{labels[0]}: label raster has no `classes` tag; pass the class names with --classes")


def _draw(rng: np.random.Generator, splits: Sequence[SceneSplit], part: Literal["train", "validation"], crop: int,
          count: int) -> list[tuple[int, Window]]:
    """``count`` crops taken round-robin over the scenes, each inside its scene's ``part``."""
    return [(i % len(splits), sample_windows(rng, getattr(splits[i % len(splits)], part), crop, 1)[0]) for i in range(count)]


def _read_crops(splits: Sequence[SceneSplit], draws: Sequence[tuple[int, Window]], bands: Sequence[int],
                mean: Sequence[float], std: Sequence[float], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, B, h, w) and labels (N, h, w) of the drawn crops; nodata and unknown classes are -1."""
    xs, ys = [], []
    for k, win in draws:
        data = read_image_window(splits[k].image, win, bands, mean, std)
        y = read_label_window(splits[k].labels, win)
        y[(~data.valid) | (y >= classes)] = -1
        xs.append(data.image)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = int(rng.integers(0, 4))
    x, y = torch.rot90(x, k, dims=(-2, -1)), torch.rot90(y, k, dims=(-2, -1))
    if rng.random() < 0.5:
        x, y = torch.flip(x, dims=(-1,)), torch.flip(y, dims=(-1,))
    return x, y


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice of ``(N, C, H, W)`` logits; of ``(heads, N, C, H, W)`` (deep supervision, e.g.
    U-Net++ in train mode) the mean over heads of each head's loss."""
    if logits.ndim == 5:
        return torch.stack([_loss(head, target) for head in logits.unbind(0)]).mean()
    ignore = target < 0
    return F.cross_entropy(logits, target, ignore_index=-1) + soft_dice_loss(logits, target, ignore)


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast on CUDA; the same context, disabled, keeps fp32 on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)


def _validation_miou(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int, batch: int,
                     device: torch.device, amp: bool) -> float:
    """Mean IoU over all validation crops together (one confusion matrix, not a mean of per-crop scores)."""
    from pipeline.core.metrics import confusion_matrix, segmentation_metrics

    model.eval()
    confusion = np.zeros((classes, classes), dtype=np.int64)
    with torch.inference_mode(), _autocast(device, amp):
        for i in range(0, len(x), batch):
            pred = model(x[i : i + batch].to(device, non_blocking=True)).argmax(1).cpu().numpy()
            confusion += confusion_matrix(y[i : i + batch].numpy(), pred, classes, ignore_index=-1)
    return segmentation_metrics(confusion).mean_iou


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _check_resumable(state: TrainState, config: dict[str, Any], epochs: int, path: Path) -> None:
    for key, value in config.items():
        if state.config.get(key) != value:
            raise SpecError(
                f"{path}: the saved run has {key}={state.config.get(key)!r} but this call asks {value!r}; "
                "resume with the same settings, or drop --resume to start over"
            )
    if state.epoch > epochs:
        raise SpecError(f"{path}: the saved run already finished {state.epoch} epochs; pass --epochs {state.epoch} or more")


def _describe(model_name: str, epoch: int, epochs: int, losses: list[float], steps: int, history: list[float],
              best_epoch: int) -> str:
    if not history:
        return f"train {model_name}"
    return (
        f"train {model_name} epoch {epoch}/{epochs} loss {np.mean(losses[-steps:]):.3f} "
        f"val mIoU {history[-1]:.3f} (best {history[best_epoch - 1]:.3f} @ {best_epoch})"
    )


def _provenance(config: dict[str, Any], settings: TrainSettings, best_epoch: int, history: list[float],
                losses: list[float], splits: Sequence[SceneSplit], device: torch.device, amp: bool) -> dict[str, Any]:
    epochs, steps = settings.epochs, settings.steps_per_epoch
    return {
        "images": config["images"],
        "labels": config["labels"],
        "epochs": epochs,
        "steps_per_epoch": steps,
        "batch_size": settings.batch_size,
        "crop": settings.crop,
        "lr": settings.lr,
        "seed": settings.seed,
        "loss": _LOSS,
        "optimizer": f"AdamW(weight_decay={_WEIGHT_DECAY})",
        "lr_schedule": f"poly({_POLY_POWER}) per step over {epochs * steps} steps",
        "epoch": best_epoch,
        "epochs_done": len(history),
        "validation_mean_iou": _json_number(history[best_epoch - 1]),
        "validation_history": [_json_number(v) for v in history],
        "loss_history": [_json_number(float(np.mean(losses[i : i + steps]))) for i in range(0, len(losses), steps)],
        "validation": {
            "fraction": settings.val_fraction,
            "crops": settings.val_crops,
            "rows": [[s.validation.row_off, s.validation.row_stop] for s in splits],
        },
        "final_loss": _json_number(losses[-1]),
        "device": device.type,
        "precision": "bf16 autocast" if amp else "fp32",
        "satseg_version": __version__,
        **({"init": config["init"]} if "init" in config else {}),
    }


def train_model(
    data: TrainData,
    model_name: str,
    out: str | Path,
    settings: TrainSettings = TrainSettings(),
    *,
    model_options: dict | None = None,
    resume: bool = False,
    show_progress: bool = True,
    on_epoch_end: Callable[[EpochReport], None] | None = None,
    init: str | Path | None = None,
    on_init: Callable[[InitReport], None] | None = None,
) -> TrainResult:
    """Fit ``model_name`` on ``data``; ``out`` gets the best epoch by validation mean IoU.

    With ``resume``, continue from the state beside ``out`` (same settings; ``epochs`` may
    grow, which stretches the poly learning-rate decay over the new total). With ``init``,
    start from published weights (:mod:`workers.models.pretrained`, adapted to the bands and
    classes; ``on_init`` hears what was loaded) instead of random ones.
    """
    from workers.models import create_model, save_checkpoint
    from workers.models.pretrained import load_pretrained, weights_sha256

    images, labels = data.images, data.labels
    epochs, steps_per_epoch, batch_size, crop = settings.epochs, settings.steps_per_epoch, settings.batch_size, settings.crop
    seed = settings.seed
    dev = training_device(settings.device)
    amp = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    infos = [open_scene(p) for p in images]
    label_infos = [open_scene(p, role="label") for p in labels]
    for info, lab in zip(infos, label_infos):
        check_labels_match(info, lab)
    bands = list(data.bands or range(1, infos[0].count + 1))
    for info in infos:
        check_bands(info, bands)
    names = _class_names([str(p) for p in labels], data.class_names)
    c = len(names)
    splits = tuple(split_scene(i.path, l.path, i.height, i.width, crop, settings.val_fraction)
                   for i, l in zip(infos, label_infos))
    options = dict(model_options or {})
    out = Path(out)
    state_path = train_state_path(out)
    config = {
        "model": model_name, "model_options": options, "bands": bands, "class_names": names,
        "images": [recorded_path(p) for p in images], "labels": [recorded_path(p) for p in labels],
        "crop": crop, "batch_size": batch_size, "steps_per_epoch": steps_per_epoch, "lr": settings.lr, "seed": seed,
        "val_fraction": settings.val_fraction, "val_crops": settings.val_crops,
    }
    if init is not None:  # by content, so the same weights moved elsewhere still resume
        config["init_sha256"] = weights_sha256(init)
    state = load_train_state(state_path) if resume else None
    if state is not None:
        _check_resumable(state, config, epochs, state_path)

    torch.manual_seed(seed)
    random.seed(seed)
    rng = np.random.default_rng(seed)
    if state is None:
        stat_draws = _draw(np.random.default_rng([seed, 2]), splits, "train", crop, _STAT_WINDOWS)
        mean, std = band_statistics([(splits[k].image, w) for k, w in stat_draws], bands)
    else:
        mean, std = state.mean, state.std
    val_windows = _draw(np.random.default_rng([seed, 1]), splits, "validation", crop, settings.val_crops)
    val_x, val_y = _read_crops(splits, val_windows, bands, mean, std, c)
    if not bool((val_y >= 0).any()):
        raise SpecError(
            f"{splits[0].labels}: the validation crops hold no labelled pixel; raise --val-fraction or --val-crops, "
            "or check the label rasters' nodata"
        )

    memory = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    model = create_model(model_name, len(bands), c, **options)
    if init is not None and state is None:
        started_from = load_pretrained(model, model_name, init)
        config["init"] = started_from.provenance()  # kept in the train state, so a resumed run's checkpoint says it too
        if on_init is not None:
            on_init(started_from)
    elif state is not None and "init" in state.config:
        config["init"] = state.config["init"]
    model = model.to(dev, memory_format=memory)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=_WEIGHT_DECAY)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total) ** _POLY_POWER)
    losses: list[float] = []
    history: list[float] = []
    best_epoch, best_weights, start = 0, None, 0
    if state is not None:
        model.load_state_dict(state.model)
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
        restore_rng(state.rng, rng, dev)
        losses, history, best_epoch, best_weights = state.losses, state.history, state.best_epoch, state.best_model
        start = state.epoch

    def save_best(provenance: dict[str, Any]) -> str:
        return save_checkpoint(out, model, model_name=model_name, model_kwargs=options, bands=bands, class_names=names,
                               mean=mean, std=std, provenance=provenance)

    pool_size = min(max(64, 4 * batch_size), steps_per_epoch * batch_size)
    seen: list[tuple[int, Window]] = []
    t0 = time.perf_counter()
    with progress_bar(show_progress) as progress:
        bar = progress.add_task(_describe(model_name, start, epochs, losses, steps_per_epoch, history, best_epoch),
                                total=total, completed=start * steps_per_epoch, unit="steps")
        for epoch in range(start, epochs):
            draws = _draw(rng, splits, "train", crop, pool_size)
            seen.extend(draws)
            pool_x, pool_y = (t.to(dev, non_blocking=True) for t in _read_crops(splits, draws, bands, mean, std, c))
            model.train()
            epoch_losses = []
            for _ in range(steps_per_epoch):
                pairs = [_augment(pool_x[i], pool_y[i], rng) for i in rng.integers(0, len(pool_x), size=batch_size)]
                x = torch.stack([p[0] for p in pairs]).contiguous(memory_format=memory)
                y = torch.stack([p[1] for p in pairs]).contiguous()
                with _autocast(dev, amp):
                    logits = model(x)
                loss = _loss(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                epoch_losses.append(loss.detach())
                progress.advance(bar)
            losses.extend(torch.stack(epoch_losses).tolist())
            history.append(_validation_miou(model, val_x, val_y, c, batch_size, dev, amp))
            best = history[best_epoch - 1] if best_epoch else None
            if best_weights is None or improves(history[-1], best):
                best_epoch, best_weights = epoch + 1, _cpu_copy(model.state_dict())
                save_best(_provenance(config, settings, best_epoch, history, losses, splits, dev, amp))
            save_train_state(state_path, TrainState(
                config=config, epoch=epoch + 1, losses=losses, history=history, best_epoch=best_epoch, mean=list(mean),
                std=list(std), model=_cpu_copy(model.state_dict()), best_model=best_weights, optimizer=opt.state_dict(),
                scheduler=sched.state_dict(), rng=capture_rng(rng, dev),
            ))
            description = _describe(model_name, epoch + 1, epochs, losses, steps_per_epoch, history, best_epoch)
            progress.update(bar, description=description)
            if on_epoch_end is not None:
                on_epoch_end(EpochReport(epoch + 1, epochs, float(np.mean(losses[-steps_per_epoch:])), history[-1],
                                         best_epoch, history[best_epoch - 1], model))
    model.load_state_dict(best_weights)
    sha = save_best(_provenance(config, settings, best_epoch, history, losses, splits, dev, amp))
    return TrainResult(
        checkpoint=out, sha256=sha, losses=losses, seconds=time.perf_counter() - t0,
        validation_miou=history[best_epoch - 1], best_epoch=best_epoch, history=history, state=state_path,
        device=dev.type, splits=splits, validation_windows=tuple(val_windows), training_windows=tuple(seen),
    )
