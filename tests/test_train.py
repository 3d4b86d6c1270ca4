"""Training: a short run on generated data lowers the loss and writes a checkpoint that runs."""

import numpy as np

from pipeline.synthetic import DEMO_CLASSES, write_synthetic_scene
from pipeline.train import train_model
from tests.conftest import TINY
from workers.models import load_checkpoint


def test_short_training_reduces_loss_and_checkpoint_carries_metadata(tmp_path):
    scene = write_synthetic_scene(tmp_path, "train", 256, 256, seed=11, cell=48)
    ckpt = tmp_path / "model.safetensors"
    result = train_model([scene.image], [scene.labels], "hrnet_w18_small_v1", ckpt, epochs=3, steps_per_epoch=10,
                         batch_size=4, crop=64, lr=3e-3, model_options=TINY, seed=0, show_progress=False)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.8 * first, (first, last)
    loaded = load_checkpoint(ckpt)
    assert loaded.model == "hrnet_w18_small_v1" and list(loaded.class_names) == DEMO_CLASSES
    assert list(loaded.bands) == [1, 2, 3, 4] and len(loaded.mean) == 4 and all(s > 0 for s in loaded.std)
    assert loaded.sha256 == result.sha256
    assert loaded.provenance["loss"] == "cross_entropy + soft_dice"


def test_evaluate_geotiff_prediction_equals_direct_count(tmp_path, odd_scene):
    import rasterio

    from pipeline.assess import assess_mask
    from pipeline.metrics import confusion_matrix

    with rasterio.open(odd_scene.labels) as src:
        labels = src.read(1)
        profile = src.profile
    rng = np.random.default_rng(0)
    pred = np.where(rng.random(labels.shape) < 0.8, labels, rng.integers(0, 5, labels.shape)).astype(np.uint8)
    path = tmp_path / "pred.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pred, 1)
    result = assess_mask(path, odd_scene.labels, class_names=DEMO_CLASSES, chunk=97, out=tmp_path / "eval")
    expected = confusion_matrix(labels.astype(np.int64), pred, 5)
    assert np.array_equal(result.metrics.confusion, expected)
    assert (tmp_path / "eval" / "reports" / "scenes").is_dir()
