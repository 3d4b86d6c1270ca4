"""Stitching: chunk-size invariance, equality with whole-image sliding window, full coverage."""

import numpy as np
import pytest

from pipeline.core.geometry import ChunkGrid, Window
from pipeline.core.plan import plan_scene
from pipeline.core.stitch import WINDOW_FUNCTIONS, sliding_window_predict, stitch_chunk, window_weights

C = 4


def context_model(batch: np.ndarray) -> np.ndarray:
    """A stand-in model whose output depends on the pixel and on the whole tile (like image pooling)."""
    x = batch.astype(np.float32)
    local = np.stack([x[:, 0] * k - x[:, 1] for k in range(C)], axis=1)
    context = x.mean(axis=(1, 2, 3))[:, None, None, None] * np.arange(C, dtype=np.float32)[None, :, None, None]
    logits = local + 3.0 * context
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def chunked_predict(image: np.ndarray, *, tile, overlap, chunk, mode, window="hann") -> np.ndarray:
    """The pipeline's path without Ray: per chunk, read its extent from a virtually padded image."""
    from pipeline.core.geometry import reflect_index

    _, h, w = image.shape
    plan = plan_scene(h, w, tile=tile, overlap=overlap, chunk=chunk, mode=mode)
    out = np.full((h, w), 7, np.uint8)
    weights = window_weights(window, tile)
    for task in plan.tasks():
        rows = reflect_index(np.arange(task.read.row_off, task.read.row_stop), h)
        cols = reflect_index(np.arange(task.read.col_off, task.read.col_stop), w)
        extent = image[:, rows][:, :, cols]
        tiles = []
        for r, c in task.tiles:
            win = plan.lattice.window(r, c)
            sl = win.slices_in(task.read)
            tiles.append((win, context_model(extent[None, :, sl[0], sl[1]])[0]))
        part = stitch_chunk(task.chunk, tiles, lattice=plan.lattice, mode=mode, num_classes=C, weights=weights)
        out[task.chunk.row_off : task.chunk.row_stop, task.chunk.col_off : task.chunk.col_stop] = part
    return out


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, 157, 203)).astype(np.float32)


@pytest.mark.parametrize("mode", ["blend", "crop"])
def test_chunk_size_invariance_and_equal_to_whole_image(image, mode):
    whole = sliding_window_predict(image, context_model, tile=64, overlap=24, mode=mode, num_classes=C)
    assert whole.max() < C  # every pixel covered
    for chunk in (23, 50, 64, 97, 400):
        got = chunked_predict(image, tile=64, overlap=24, chunk=chunk, mode=mode)
        assert np.array_equal(got, whole), f"chunk {chunk} differs from the whole-image result"


def test_blend_differs_from_crop_and_reduces_to_model_on_single_tile(image):
    blend = sliding_window_predict(image, context_model, tile=64, overlap=24, mode="blend", num_classes=C)
    crop = sliding_window_predict(image, context_model, tile=64, overlap=24, mode="crop", num_classes=C)
    assert (blend != crop).any()  # the context term makes tiles disagree near edges
    small = image[:, :64, :64]
    one = sliding_window_predict(small, context_model, tile=64, overlap=0, mode="blend", num_classes=C)
    assert np.array_equal(one, context_model(small[None])[0].argmax(0))


def test_blend_is_the_weighted_mean_of_covering_tiles():
    """Independent check of blending on a 1-D-like toy: two tiles overlapping."""
    from pipeline.core.geometry import TileLattice

    lattice = TileLattice(32, 56, 32, 8)  # stride 24, margin 4
    weights = window_weights("triangular", 32)
    chunk = Window(0, 0, 32, 56)
    tiles = lattice.tiles_touching(chunk)
    rng = np.random.default_rng(1)
    outs = [(lattice.window(r, c), rng.random((C, 32, 32)).astype(np.float32)) for r, c in tiles]
    got = stitch_chunk(chunk, outs, lattice=lattice, mode="blend", num_classes=C, weights=weights)
    num = np.zeros((C, 32, 56))
    den = np.zeros((32, 56))
    for win, p in outs:
        for y in range(32):
            for x in range(56):
                ty, tx = y - win.row_off, x - win.col_off
                if 0 <= ty < 32 and 0 <= tx < 32:
                    num[:, y, x] += weights[ty, tx] * p[:, ty, tx]
                    den[y, x] += weights[ty, tx]
    assert (den > 0).all()
    assert np.array_equal(got, np.argmax(num / den, axis=0))


@pytest.mark.parametrize("name", WINDOW_FUNCTIONS)
def test_window_weights_are_positive_and_symmetric(name):
    w = window_weights(name, 64)
    assert w.shape == (64, 64) and (w > 0).all()
    assert np.allclose(w, w[::-1, ::-1]) and np.allclose(w, w.T)


def test_uncovered_pixels_are_nodata():
    grid = ChunkGrid(10, 10, 10)
    from pipeline.core.geometry import TileLattice

    out = stitch_chunk(grid.window(0, 0), [], lattice=TileLattice(10, 10, 32, 0), mode="blend", num_classes=C, weights=window_weights("hann", 32))
    assert (out == 255).all()


def test_tile_cache_keeps_shared_tiles_until_every_chunk_used_them():
    from workers.predictor import TileCache

    cache = TileCache(max_bytes=3 * 400)
    a, b = np.zeros(100, np.float32), np.ones(100, np.float32)  # 400 bytes each
    cache.switch(("scene", "blend"))
    cache.use((0, 0), a, uses_total=2)
    cache.use((0, 1), b, uses_total=1)  # needed by one chunk only: not kept
    assert cache.get((0, 1)) is None
    assert cache.get((0, 0)) is a
    cache.use((0, 0), a, uses_total=2)  # second and last use: dropped
    assert cache.get((0, 0)) is None
    for i in range(5):  # over the byte bound: the oldest go first
        cache.use((1, i), np.full(100, i, np.float32), uses_total=9)
    assert cache.get((1, 0)) is None and cache.get((1, 4)) is not None
    cache.switch(("other scene", "blend"))
    assert cache.get((1, 4)) is None


@pytest.mark.parametrize("mode", ["blend", "crop"])
def test_torch_tensors_stitch_to_the_same_bits_as_numpy_arrays(mode):
    import torch

    from pipeline.core.geometry import TileLattice
    from pipeline.core.stitch import quantise_probabilities

    lattice = TileLattice(150, 170, 64, 16)
    chunk = Window(7, 11, 120, 140)
    rng = np.random.default_rng(3)
    outs = [(lattice.window(r, c), rng.random((C, 64, 64)).astype(np.float32)) for r, c in lattice.tiles_touching(chunk)]
    weights = window_weights("hann", 64)
    host = stitch_chunk(chunk, outs, lattice=lattice, mode=mode, num_classes=C, weights=weights, probabilities=True)
    device = stitch_chunk(
        chunk, [(w, torch.from_numpy(o)) for w, o in outs], lattice=lattice, mode=mode, num_classes=C,
        weights=torch.from_numpy(weights), probabilities=True, like=torch.zeros(1),
    )
    for h, d in zip(host, device):
        assert np.array_equal(h, d.numpy())
    valid = rng.random(chunk.shape) > 0.1
    assert np.array_equal(quantise_probabilities(host[1], valid), quantise_probabilities(device[1], torch.from_numpy(valid)).numpy())
