"""The demo: generate scenes, train a small model once (cached), run a real job, summarise."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.synthetic import DEMO_CLASSES, write_synthetic_scene
from schemas.job import job_from_dict
from schemas.store import OutputLayout

__all__ = ["DEMO_MODEL", "DEMO_OPTIONS", "prepare_demo", "run_demo"]

DEMO_MODEL = "hrnet_w18_small_v1"
DEMO_OPTIONS = {"width_multiplier": 0.5}
TRAIN_SIZE = (1024, 1024)
SCENE_SIZE = (2100, 1900)  # odd on purpose: not a multiple of tile or chunk


def prepare_demo(root: Path, *, show_progress: bool = True) -> tuple[Path, Path, Path]:
    """Demo scene, its labels and a trained checkpoint under ``root`` (reused when present)."""
    from pipeline.train import TrainData, TrainSettings, train_model

    data = root / "data"
    scene = data / "demo_scene.tif"
    labels = data / "demo_scene_labels.tif"
    if not (scene.exists() and labels.exists()):
        write_synthetic_scene(data, "demo_scene", *SCENE_SIZE, seed=2)
    train_img = data / "train_scene.tif"
    train_lbl = data / "train_scene_labels.tif"
    if not (train_img.exists() and train_lbl.exists()):
        write_synthetic_scene(data, "train_scene", *TRAIN_SIZE, seed=1)
    ckpt = root / "model" / f"demo-{DEMO_MODEL}.safetensors"
    if not ckpt.exists():
        train_model(
            TrainData([train_img], [train_lbl], class_names=DEMO_CLASSES), DEMO_MODEL, ckpt,
            TrainSettings(epochs=8, steps_per_epoch=40, batch_size=8, crop=128, lr=3e-3, seed=0),
            model_options=DEMO_OPTIONS, show_progress=show_progress,
        )
    return scene, labels, ckpt


def run_demo(root: str | Path = "demo-output", *, show_progress: bool = True, address: str | None = None):
    """Run the demo job; earlier demo outputs are replaced, data and model are kept."""
    from pipeline.run import run_job

    root = Path(root)
    scene, labels, ckpt = prepare_demo(root, show_progress=show_progress)
    layout = OutputLayout(root)
    for old in (layout.masks, layout.reports, layout.state):
        if old.exists():
            shutil.rmtree(old)
    layout.job_file.unlink(missing_ok=True)
    spec = job_from_dict(
        {
            "scenes": [{"image": str(scene), "labels": str(labels), "name": "demo_scene"}],
            "checkpoint": str(ckpt),
            "tile_size": 256,
            "overlap": 32,
            "out": str(root),
            "address": address,
            "save_probabilities": True,
        },
        "demo",
    )
    return run_job(spec, show_progress=show_progress)
