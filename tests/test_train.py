"""Training: loss goes down, held-out validation picks the best epoch, runs repeat and resume exactly."""

import argparse
import json
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.cli import main as cli_main
from pipeline.cli.train import add_arguments
from pipeline.core.geometry import Window
from pipeline.synthetic import DEMO_CLASSES, write_synthetic_scene
from pipeline.train import TrainData, TrainSettings, improves, split_scene, train_model
from pipeline.train_state import train_state_path
from schemas.errors import CheckpointError, SatsegError, SpecError
from tests.conftest import TINY
from workers.models import load_checkpoint


def test_short_training_reduces_loss_and_checkpoint_carries_metadata(tmp_path):
    scene = write_synthetic_scene(tmp_path, "train", 256, 256, seed=11, cell=48)
    ckpt = tmp_path / "model.safetensors"
    settings = TrainSettings(epochs=3, steps_per_epoch=10, batch_size=4, crop=64, lr=3e-3, seed=0)
    result = train_model(TrainData([scene.image], [scene.labels]), "hrnet_w18_small_v1", ckpt, settings, model_options=TINY,
                         show_progress=False)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.8 * first, (first, last)
    loaded = load_checkpoint(ckpt)
    assert loaded.model == "hrnet_w18_small_v1" and list(loaded.class_names) == DEMO_CLASSES
    assert list(loaded.bands) == [1, 2, 3, 4] and len(loaded.mean) == 4 and all(s > 0 for s in loaded.std)
    assert loaded.sha256 == result.sha256
    assert loaded.provenance["loss"] == "cross_entropy + soft_dice"


def test_evaluate_geotiff_prediction_equals_direct_count(tmp_path, odd_scene):
    import rasterio

    from pipeline.evaluate import evaluate_mask
    from pipeline.core.metrics import confusion_matrix

    with rasterio.open(odd_scene.labels) as src:
        labels = src.read(1)
        profile = src.profile
    rng = np.random.default_rng(0)
    pred = np.where(rng.random(labels.shape) < 0.8, labels, rng.integers(0, 5, labels.shape)).astype(np.uint8)
    path = tmp_path / "pred.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pred, 1)
    result = evaluate_mask(path, odd_scene.labels, class_names=DEMO_CLASSES, chunk=97, out=tmp_path / "eval")
    expected = confusion_matrix(labels.astype(np.int64), pred, 5)
    assert np.array_equal(result.metrics.confusion, expected)
    assert (tmp_path / "eval" / "reports" / "scenes").is_dir()


# --- validation split, best checkpoint, resume, reproducibility, bad inputs ---

MODEL = "hrnet_w18_small_v1"
QUICK = TrainSettings(epochs=4, steps_per_epoch=3, batch_size=2, crop=64, lr=3e-3, seed=0, val_crops=4, device="cpu")


def _train(scene, out, settings=QUICK, labels=None, **kwargs):
    """A quick, quiet run of the tiny model on ``scene``."""
    data = TrainData([scene.image], [scene.labels] if labels is None else labels)
    return train_model(data, MODEL, out, settings, model_options=TINY, show_progress=False, **kwargs)


class _Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory):
    """192x160: 128 training rows above a 64-row validation band (15% is under one 64-pixel crop, so a crop tall)."""
    return write_synthetic_scene(tmp_path_factory.mktemp("train"), "small", 192, 160, seed=11, cell=40)


@pytest.fixture(scope="module")
def straight(small_scene, tmp_path_factory):
    """An uninterrupted 4-epoch run, with a copy of the weights after every epoch."""
    snapshots = []

    def keep(report):
        snapshots.append({k: v.detach().clone() for k, v in report.model.state_dict().items()})

    out = tmp_path_factory.mktemp("straight") / "model.safetensors"
    result = _train(small_scene, out, on_epoch_end=keep)
    return result, snapshots


def _tensors_equal(a, b):
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_identical_checkpoint_other_seed_does_not(small_scene, straight, tmp_path):
    first, _ = straight
    again = _train(small_scene, tmp_path / "again.safetensors")
    assert _tensors_equal(first.checkpoint, again.checkpoint)
    assert _tensors_equal(first.state, again.state)
    assert again.losses == first.losses and again.history == first.history
    other = _train(small_scene, tmp_path / "other.safetensors", replace(QUICK, seed=1))
    assert not _tensors_equal(first.checkpoint, other.checkpoint)


def test_resume_after_interruption_equals_uninterrupted_run(small_scene, straight, tmp_path):
    first, _ = straight
    out = tmp_path / "resumed.safetensors"

    def stop_after_two(report):
        if report.epoch == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        _train(small_scene, out, on_epoch_end=stop_after_two)
    with safe_open(str(train_state_path(out)), framework="pt") as stream:
        header = json.loads(stream.metadata()["satseg_train_state"])
    assert header["epoch"] == 2 and header["rng"]["numpy"]["bit_generator"] == "PCG64"
    resumed = _train(small_scene, out, resume=True)
    assert _tensors_equal(first.checkpoint, resumed.checkpoint)
    assert _tensors_equal(first.state, resumed.state)  # weights, best weights, AdamW moments, RNG states
    assert resumed.losses == first.losses and resumed.history == first.history
    assert resumed.training_windows == first.training_windows[len(first.training_windows) // 2 :]
    assert load_checkpoint(out).provenance == load_checkpoint(first.checkpoint).provenance


def test_validation_crops_lie_in_held_out_band_and_never_touch_training_crops(straight, small_scene):
    result, _ = straight
    (split,) = result.splits
    assert split.train == Window(0, 0, 128, 160) and split.validation == Window(128, 0, 64, 160)
    assert len(result.validation_windows) == 4 and len(result.training_windows) == 4 * 6
    for k, win in result.validation_windows:
        assert k == 0 and win.intersection(split.validation) == win
    for k, win in result.training_windows:
        assert k == 0 and win.intersection(split.train) == win
        assert all(win.intersection(v) is None for _, v in result.validation_windows)
    assert split_scene("a.tif", "b.tif", 1000, 300, 64, 0.15).validation == Window(850, 0, 150, 300)
    with pytest.raises(SpecError, match="a.tif"):
        split_scene("a.tif", "b.tif", 100, 300, 64, 0.15)


def test_checkpoint_holds_best_epoch_by_validation_miou_and_state_holds_last(straight):
    result, snapshots = straight
    ckpt = load_checkpoint(result.checkpoint)
    history = ckpt.provenance["validation_history"]
    assert history == result.history and len(history) == 4
    assert ckpt.provenance["epoch"] == result.best_epoch == int(np.argmax(history)) + 1
    assert ckpt.provenance["validation_mean_iou"] == max(history) == result.validation_miou
    assert ckpt.provenance["seed"] == 0 and ckpt.provenance["lr"] == 3e-3 and ckpt.provenance["crop"] == 64
    best = snapshots[result.best_epoch - 1]
    assert all(torch.equal(ckpt.state_dict[k], best[k]) for k in best)
    last = {k[len("model/"):]: v for k, v in load_file(result.state).items() if k.startswith("model/")}
    assert last.keys() == snapshots[-1].keys() and all(torch.equal(last[k], snapshots[-1][k]) for k in last)
    assert improves(0.5, None) and improves(0.6, 0.5) and not improves(0.5, 0.5) and not improves(float("nan"), 0.1)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(labels=[]), SpecError, "one --labels per --image"),
        (dict(crop=100), SpecError, "multiple of 32"),
        (dict(val_fraction=1.5), SpecError, "--val-fraction"),
        (dict(crop=128), SpecError, "small.tif"),
        (dict(device="tpu"), SpecError, "auto, cpu, cuda"),
        (dict(resume=True), CheckpointError, "drop --resume"),
    ],
)
def test_bad_inputs_raise_one_line_errors(small_scene, tmp_path, change, error, words):
    change = dict(change)
    labels, resume = change.pop("labels", None), change.pop("resume", False)
    with pytest.raises(error) as exc:
        _train(small_scene, tmp_path / "m.safetensors", replace(QUICK, **change), labels=labels, resume=resume)
    assert isinstance(exc.value, SatsegError) and "\n" not in str(exc.value) and words in str(exc.value)


def test_cli_defaults_are_the_settings_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--image", "a.tif", "--labels", "b.tif", "--model", MODEL, "--out", "m.safetensors"])
    shared = [f.name for f in fields(TrainSettings) if hasattr(args, f.name)]
    assert shared == [f.name for f in fields(TrainSettings) if f.name != "threads"]
    assert {n: getattr(args, n) for n in shared} == {n: getattr(TrainSettings(), n) for n in shared}


def test_cli_trains_two_scenes_resumes_further_and_refuses_changed_settings(small_scene, tmp_path, capsys):
    second = write_synthetic_scene(tmp_path, "second", 160, 200, seed=12, cell=40)
    out = tmp_path / "cli.safetensors"
    base = ["train", "--image", str(small_scene.image), "--labels", str(small_scene.labels), "--image", str(second.image),
            "--labels", str(second.labels), "--model", MODEL, "--out", str(out), "--steps-per-epoch", "2",
            "--batch-size", "2", "--crop", "64", "--val-crops", "2", "--model-options", json.dumps(TINY),
            "--device", "cpu", "--quiet"]
    assert cli_main(base + ["--epochs", "1"]) == 0
    assert cli_main(base + ["--epochs", "2", "--resume"]) == 0
    provenance = load_checkpoint(out).provenance
    assert provenance["epochs_done"] == 2 and len(provenance["validation_history"]) == 2
    assert provenance["validation"]["rows"] == [[128, 192], [96, 160]]
    assert "best epoch" in capsys.readouterr().out
    assert cli_main(base + ["--epochs", "3", "--resume", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lr=" in err and "drop --resume" in err
    assert cli_main(base + ["--epochs", "2", "--crop", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
