"""The GPU path: a tile's output, and the mask, do not depend on batch, chunk size or order on a CUDA device.

Runs only where CUDA is present (the suite skips it elsewhere); benchmarks/gpu.sh
runs it on a GPU machine beside the GPU benchmarks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline.core.geometry import TileLattice, Window
from pipeline.run import run_job
from pipeline.core.stitch import sliding_window_predict, stitch_chunk, window_weights
from tests.conftest import CLASSES
from tests.test_pipeline import job
from workers.predictor import ModelSource, TilePredictor
from workers.reader import read_image_window

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SOURCE = ModelSource("hrnet_w18_small_v1", 4, len(CLASSES), {"width_multiplier": 0.5}, seed=3)


def tiles(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4, size, size)).astype(np.float32)


@pytest.mark.parametrize("classes", [False, True])
def test_a_tiles_output_does_not_depend_on_its_batch(classes):
    predictor = TilePredictor(SOURCE, device="cuda", batch_size=16)
    x = tiles(37)  # two full calls and one padded
    together = predictor.predict_batch(x, classes=classes)
    alone = np.concatenate([predictor.predict_batch(x[i : i + 1], classes=classes) for i in range(len(x))])
    shuffled = np.random.default_rng(1).permutation(len(x))
    reordered = predictor.predict_batch(x[shuffled], classes=classes)
    assert np.array_equal(together, alone)
    assert np.array_equal(together[shuffled], reordered)


def test_a_tiles_output_does_not_depend_on_the_batch_size():
    """Issue 10 asks for the same mask at any batch size on the GPU; each size is one call shape here."""
    x = tiles(32)
    outputs = [TilePredictor(SOURCE, device="cuda", batch_size=b).predict_batch(x) for b in (1, 8, 32)]
    assert all(np.array_equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("mode", ["blend", "crop"])
def test_device_stitching_equals_numpy_stitching(mode):
    lattice = TileLattice(150, 170, 64, 16)
    chunk = Window(0, 0, 150, 170)
    rng = np.random.default_rng(2)
    outs = [(lattice.window(r, c), rng.random((5, 64, 64)).astype(np.float32)) for r, c in lattice.tiles_touching(chunk)]
    weights = window_weights("hann", 64)
    host = stitch_chunk(chunk, outs, lattice=lattice, mode=mode, num_classes=5, weights=weights, probabilities=True)
    device = stitch_chunk(
        chunk, [(w, torch.from_numpy(o).cuda()) for w, o in outs], lattice=lattice, mode=mode, num_classes=5,
        weights=torch.from_numpy(weights).cuda(), probabilities=True, like=torch.zeros(1, device="cuda"),
    )
    for h, d in zip(host, device):
        assert np.array_equal(h, d.cpu().numpy())


def test_job_mask_is_identical_for_chunk_sizes_and_equals_whole_image_on_the_gpu(ray_local, odd_scene, tmp_path):
    masks = []
    for chunk in (100, 173):
        spec = job(odd_scene, tmp_path / f"c{chunk}", chunk_size=chunk, batch_size=8, device="cuda", tta="flip")
        result = run_job(spec, show_progress=False)
        masks.append(zarr.open_array(str(result.layout.mask_store("odd")), path="mask", mode="r")[:])
    assert np.array_equal(masks[0], masks[1])
    h, w = masks[0].shape
    data = read_image_window(str(odd_scene.image), Window(0, 0, h, w), [1, 2, 3, 4], [0.0] * 4, [1.0] * 4)
    predictor = TilePredictor(result.model.source, device="cuda", batch_size=8, tta="flip")
    whole = sliding_window_predict(data.image, predictor.predict_batch, tile=64, overlap=16, mode="blend", num_classes=len(CLASSES))
    whole[~data.valid] = 255
    assert np.array_equal(masks[0], whole)
