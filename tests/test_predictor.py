"""The model actor's inference path: test-time augmentation, torch.compile, automatic batch size."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch
import zarr

from pipeline.cli import run as run_command
from pipeline.core.geometry import Window
from pipeline.run import run_job
from pipeline.core.stitch import sliding_window_predict
from schemas.job import job_from_dict
from tests.conftest import CLASSES
from tests.test_pipeline import job
from workers.predictor import TilePredictor, choose_batch_size
from workers.reader import read_image_window
from workers.tta import dihedral_transforms


class Pointwise(torch.nn.Module):
    """1x1 convolutions only: each output pixel sees its own input pixel, so flips and rotations commute with it."""

    def __init__(self, bands: int = 4, classes: int = 5):
        super().__init__()
        self.a = torch.nn.Conv2d(bands, 8, 1)
        self.b = torch.nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Skewed(torch.nn.Module):
    """A 3x3 convolution with random (asymmetric) weights: its output changes under flips and rotations."""

    def __init__(self, bands: int = 4, classes: int = 5):
        super().__init__()
        self.conv = torch.nn.Conv2d(bands, classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class Small(torch.nn.Module):
    """A small convolutional net for compilation: 3x3 conv, ReLU, 1x1 conv."""

    def __init__(self, bands: int = 4, classes: int = 5):
        super().__init__()
        self.a = torch.nn.Conv2d(bands, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def tiles(n: int = 3, bands: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, bands, size, size)).astype(np.float32)


def predictor(module_cls, **options) -> TilePredictor:
    torch.manual_seed(0)
    return TilePredictor.from_module(module_cls().eval(), 5, device="cpu", **options)


def logits(p: TilePredictor, x: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return p.logits(torch.from_numpy(x))


# ---- transforms ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "count"), [("none", 1), ("flip", 2), ("d4", 8)])
def test_inverse_undoes_every_transform_and_transforms_are_distinct(kind, count):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    transforms = dihedral_transforms(kind)
    assert len(transforms) == count
    images = []
    for t in transforms:
        y = t.forward(x)
        assert y.shape == x.shape
        assert torch.equal(t.inverse(y), x), t
        images.append(y)
    for i in range(count):
        for j in range(i):
            assert not torch.equal(images[i], images[j]), (transforms[i], transforms[j])


def test_flip_is_a_horizontal_mirror_and_d4_holds_the_quarter_turns():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    flip = dihedral_transforms("flip")[1]
    assert torch.equal(flip.forward(x), x.flip(-1))
    d4 = {tuple(t.forward(x).flatten().tolist()) for t in dihedral_transforms("d4")}
    for k in range(4):
        assert tuple(torch.rot90(x, k, dims=(-2, -1)).flatten().tolist()) in d4
        assert tuple(torch.rot90(x.flip(-2), k, dims=(-2, -1)).flatten().tolist()) in d4


def test_unknown_tta_kind_is_refused():
    with pytest.raises(ValueError, match="none, flip, d4"):
        dihedral_transforms("d8")


# ---- test-time augmentation ----------------------------------------------------------------------


@pytest.mark.parametrize("tta", ["flip", "d4"])
def test_tta_of_an_equivariant_model_equals_its_plain_output(tta):
    x = tiles()
    plain = predictor(Pointwise)
    augmented = predictor(Pointwise, tta=tta)
    torch.testing.assert_close(logits(augmented, x), logits(plain, x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(augmented.predict_batch(x), plain.predict_batch(x), rtol=0, atol=1e-6)
    assert np.array_equal(augmented.predict_batch(x, classes=True), plain.predict_batch(x, classes=True))


@pytest.mark.parametrize("tta", ["flip", "d4"])
def test_tta_of_a_skewed_model_differs_from_plain_and_is_symmetric(tta):
    x = tiles()
    plain = predictor(Skewed)
    augmented = predictor(Skewed, tta=tta)
    assert (logits(augmented, x) - logits(plain, x)).abs().max() > 1e-2
    # averaging over a group makes any model equivariant to that group: TTA(g x) == g TTA(x)
    out = logits(augmented, x)
    for t in dihedral_transforms(tta):
        moved = logits(augmented, np.ascontiguousarray(t.forward(torch.from_numpy(x)).numpy()))
        torch.testing.assert_close(moved, t.forward(out), rtol=0, atol=1e-5)


def test_flip_tta_is_the_mean_of_plain_and_mirrored_logits():
    x = tiles()
    augmented = predictor(Skewed, tta="flip")
    model = augmented.model
    with torch.inference_mode():
        t = torch.from_numpy(x)
        expected = (model(t) + model(t.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(logits(augmented, x), expected, rtol=0, atol=1e-6)
    probs = augmented.predict_batch(x)
    np.testing.assert_allclose(probs, torch.softmax(expected, dim=1).numpy(), rtol=0, atol=1e-6)


# ---- batch size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free", "per_tile", "cap", "expected"),
    [
        (1000, 100, 64, 7),  # 70% of free memory, rounded down
        (10 * 2**30, 2**20, 64, 64),  # plenty of memory: the cap
        (10 * 2**30, 2**20, 16, 16),
        (1000, 701, 64, 1),  # not even one tile fits 70%: still one
        (0, 100, 64, 1),
        (-5, 100, 64, 1),
        (1000, 0, 64, 64),  # nothing measured: the cap
        (1000, 100, 1, 1),
    ],
)
def test_choose_batch_size(free, per_tile, cap, expected):
    assert choose_batch_size(free, per_tile, cap=cap) == expected


def test_choose_batch_size_refuses_a_cap_below_one():
    with pytest.raises(ValueError, match="at least 1"):
        choose_batch_size(1000, 10, cap=0)


def test_batch_size_is_one_on_cpu_unless_given():
    assert predictor(Pointwise).batch_size_for(4, 64) == 1
    assert predictor(Pointwise, batch_size=3).batch_size_for(4, 64) == 3
    with pytest.raises(ValueError, match="at least 1"):
        predictor(Pointwise, batch_size=0)


def test_job_batch_size_defaults_to_automatic_and_keeps_its_lower_bound(tmp_path):
    base = {"scenes": [{"image": str(tmp_path / "a.tif")}], "model": "hrnet_w18_small_v1", "classes": CLASSES}
    spec = job_from_dict(base)
    assert (spec.batch_size, spec.tta, spec.compile) == (None, "none", False)
    assert job_from_dict({**base, "batch_size": 2, "tta": "d4", "compile": True}).batch_size == 2
    for bad in ({"batch_size": 0}, {"tta": "d8"}):
        with pytest.raises(Exception, match="batch_size|tta"):
            job_from_dict({**base, **bad})


def parse_run(*argv):
    parser = argparse.ArgumentParser()
    run_command.add_arguments(parser)
    return run_command.spec_from_args(parser.parse_args(list(argv)))


def test_run_flags_set_tta_compile_and_batch_size_and_override_a_job_file(tmp_path):
    flags = ["--model", "hrnet_w18_small_v1", "--classes", ",".join(CLASSES)]
    spec = parse_run("--image", "a.tif", *flags)
    assert (spec.tta, spec.compile, spec.batch_size) == ("none", False, None)
    spec = parse_run("--image", "a.tif", *flags, "--tta", "d4", "--compile", "--batch-size", "16")
    assert (spec.tta, spec.compile, spec.batch_size) == ("d4", True, 16)
    job = tmp_path / "job.yaml"
    job.write_text("scenes: [{image: a.tif}]\nmodel: hrnet_w18_small_v1\nclasses: [a, b]\ntta: flip\ncompile: true\n")
    assert (parse_run(str(job)).tta, parse_run(str(job)).compile) == ("flip", True)  # absent flags keep the file's values
    assert parse_run(str(job), "--tta", "none").tta == "none"


# ---- fixed-shape model calls ---------------------------------------------------------------------


class ShapeRecorder(Small):
    """The small net, noting the shape of every batch it is called with."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return super().forward(x)


@pytest.mark.parametrize("classes", [False, True])
def test_every_model_call_has_one_shape_and_a_tiles_output_does_not_depend_on_its_batch(classes):
    torch.manual_seed(0)
    module = ShapeRecorder().eval()
    p = TilePredictor.from_module(module, 5, device="cpu", batch_size=4)
    x = tiles(n=7)
    together = p.predict_batch(x, classes=classes)
    alone = np.concatenate([p.predict_batch(x[i : i + 1], classes=classes) for i in range(7)])
    assert set(module.shapes) == {(4, 4, 32, 32)}  # 7 tiles: a full call and a padded one; 1 tile: padded
    assert len(together) == 7 and np.array_equal(together, alone)
    assert p.stats()["tiles_predicted"] == 14  # padding is not counted


# ---- torch.compile -------------------------------------------------------------------------------


def test_compiled_model_gives_the_eager_logits():
    x = tiles(n=2)
    eager = predictor(Small)
    compiled = predictor(Small, compile=True)
    got = logits(compiled, x)
    assert compiled.compiled, "compilation fell back to eager"
    torch.testing.assert_close(got, logits(eager, x), rtol=0, atol=1e-4)


def test_failed_compilation_falls_back_to_eager_with_a_warning(caplog):
    x = tiles(n=2)
    eager = predictor(Pointwise)
    compiled = predictor(Pointwise, compile=True)
    with caplog.at_level(logging.WARNING, logger="workers.predictor"):
        with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):  # a node without a C++ compiler
            probs = compiled.predict_batch(x)
    assert not compiled.compiled
    assert "running the model eagerly" in caplog.text
    np.testing.assert_array_equal(probs, eager.predict_batch(x))


# ---- end to end ----------------------------------------------------------------------------------


def flip_job(odd_scene, out, chunk: int):
    return job(odd_scene, out, chunk_size=chunk, tta="flip", batch_size=None)


def test_flip_tta_job_mask_is_identical_for_two_chunk_sizes(ray_local, odd_scene, tmp_path):
    masks = []
    for chunk in (100, 173):
        result = run_job(flip_job(odd_scene, tmp_path / f"c{chunk}", chunk), show_progress=False)
        masks.append(zarr.open_array(str(result.layout.mask_store("odd")), path="mask", mode="r")[:])
    assert np.array_equal(masks[0], masks[1])

    # the actors really applied the flip: the mask is the whole-image flip-TTA prediction, not the plain one
    h, w = masks[0].shape
    data = read_image_window(str(odd_scene.image), Window(0, 0, h, w), [1, 2, 3, 4], [0.0] * 4, [1.0] * 4)
    whole = {}
    for tta in ("flip", "none"):
        p = TilePredictor(result.model.source, device="cpu", batch_size=4, tta=tta)
        whole[tta] = sliding_window_predict(
            data.image, p.predict_batch, tile=64, overlap=16, mode="blend", num_classes=len(CLASSES)
        )
        whole[tta][~data.valid] = 255
    assert np.array_equal(masks[0], whole["flip"])
    assert not np.array_equal(masks[0], whole["none"])
