"""FCN-32s/16s/8s, SegNet, U-Net and U-Net++: reference sizes, the tile contract, SegNet's unpooling, exports, a job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.models import create_model, model_info
from workers.models.export import export_model
from workers.models.segnet import max_unpool

TINY = {
    "fcn32s_vgg16": 1 / 16, "fcn16s_vgg16": 1 / 16, "fcn8s_vgg16": 1 / 16,
    "segnet_vgg16": 1 / 16, "unet": 1 / 16, "unet_plusplus": 1 / 8,
}
"""Each model at a width whose layers are a few channels: the graph is what is under test."""

REFERENCE = {
    # learned layers of voc-fcn*s/net.py (shelhamer/fcn.berkeleyvision.org), 3 bands, PASCAL VOC's 21 classes;
    # the paper (Long et al., Table 1) rounds to "134M"; the fixed bilinear upscore deconvolutions (lr_mult 0)
    # are bilinear interpolation here, as they are no learned parameters there
    "fcn32s_vgg16": (3, 21, 134_346_581),
    "fcn16s_vgg16": (3, 21, 134_357_354),
    "fcn8s_vgg16": (3, 21, 134_362_751),
    # Models/segnet_train.prototxt (alexgkendall/SegNet-Tutorial), 3 bands, CamVid's 11 classes, convolutions
    # with bias, Caffe BN's scale and shift; the paper (Badrinarayanan et al.) rounds to 29.5M
    "segnet_vgg16": (3, 11, 29_449_355),
    # Ronneberger et al. 2015, Fig. 1: 1 band, 2 classes, 64..1024 channels; padding adds no parameters
    "unet": (1, 2, 31_030_658),
    # Nest_Net in model_logic.py (MrGiovanni/UNetPlusPlus), "Total params: 9,041,601": 1 band, 1 class,
    # 32..512 channels, no deep supervision; the paper (Zhou et al., Table 1) rounds to 9.04M
    "unet_plusplus": (1, 1, 9_041_601),
}

FAMILIES = {
    "fcn32s_vgg16": ("fcn", 32), "fcn16s_vgg16": ("fcn", 16), "fcn8s_vgg16": ("fcn", 8),
    "segnet_vgg16": ("segnet", 1), "unet": ("unet", 1), "unet_plusplus": ("unet_plusplus", 1),
}


def _tiny(name: str, bands: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, bands, classes, width_multiplier=TINY[name])


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only wait for each other


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_counts_equal_the_reference_configurations(name: str):
    bands, classes, expected = REFERENCE[name]
    with torch.device("meta"):
        model = create_model(name, bands, classes)
    assert _count(model) == expected


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_registry_knows_family_output_stride_and_that_no_pixel_sees_the_whole_tile(name: str):
    info = model_info(name)
    assert (info.family, info.output_stride, info.whole_tile_context) == (*FAMILIES[name], False)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize(("bands", "classes"), [(1, 2), (13, 7)])
def test_logits_have_the_tiles_size_at_odd_multiples_of_32(name: str, bands: int, classes: int):
    with torch.no_grad():
        logits = _tiny(name, bands, classes).eval()(torch.randn(2, bands, 96, 160))
    assert logits.shape == (2, classes, 96, 160) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_finest_map_scored_is_the_registered_output_stride(name: str):
    """Every layer that outputs class scores is hooked; the finest of their maps is tile / output_stride."""
    classes, heights = 3, []
    model = _tiny(name, 2, classes).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.out_channels == classes:
            module.register_forward_hook(lambda _m, _i, out: heights.append(out.shape[-2]))
    with torch.no_grad():
        model(torch.zeros(1, 2, 128, 64))
    assert heights and 128 // max(heights) == model_info(name).output_stride


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_training_step_reaches_every_parameter(name: str):
    model = _tiny(name, 3, 4).train()
    logits = model(torch.randn(2, 3, 64, 64))
    F.cross_entropy(logits, torch.randint(0, 4, (2, 64, 64))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_band_count_changes_only_the_first_convolution():
    with torch.device("meta"):
        for name in TINY:
            rgb, multispectral = create_model(name, 3, 5), create_model(name, 13, 5)
            first = next(m for m in rgb.modules() if isinstance(m, torch.nn.Conv2d))
            assert _count(multispectral) - _count(rgb) == 10 * first.out_channels * 3 * 3, name


def test_segnet_unpooling_equals_max_unpool2d_in_values_and_gradients():
    torch.manual_seed(1)
    features = torch.relu(torch.randn(2, 3, 32, 64))
    pooled, indices = F.max_pool2d(features, 2, 2, return_indices=True)
    ours_in = (pooled * torch.randn_like(pooled)).requires_grad_()
    native_in = ours_in.detach().clone().requires_grad_()
    ours, native = max_unpool(ours_in, indices, features.shape), F.max_unpool2d(native_in, indices, 2, 2)
    assert torch.equal(ours, native)
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (native * weights).sum().backward()
    assert torch.equal(ours_in.grad, native_in.grad)


def _reload(path, fmt: str):
    return torch.export.load(str(path)).module() if fmt == "exported" else torch.jit.load(str(path), map_location="cpu")


FAST_EXPORTS = {("segnet_vgg16", "torchscript"), ("unet", "exported"), ("unet", "torchscript")}
"""SegNet's unpooling traced, U-Net's transposed convolutions in both; the rest (SegNet's torch.export takes 5 s) in
`make test-slow`. ONNX: every registry model in tests/test_export_onnx.py."""


@pytest.mark.parametrize(
    ("name", "fmt"),
    [p if p in FAST_EXPORTS else pytest.param(*p, marks=pytest.mark.slow)
     for p in [(n, f) for n in sorted(TINY) for f in ("exported", "torchscript")]],
)
def test_exports_give_the_eager_logits_at_another_batch_and_size(tmp_path, name: str, fmt: str):
    model = _tiny(name, 4, 5).eval()
    path = export_model(model, 4, tmp_path / f"{name}.{fmt}", fmt, {"model": name}, tile=64)
    x = torch.randn(1, 4, 96, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = model(x), _reload(path, fmt)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_each_model_trains_and_runs_in_a_job(ray_local, odd_scene, tmp_path, name: str):
    """A couple of training steps, then a job with the checkpoint: `stitch: auto` crops (no whole-tile context)."""
    import zarr

    from pipeline.job_folder import read_job_record
    from pipeline.run import run_job
    from pipeline.train import TrainData, TrainSettings, train_model
    from schemas.job import job_from_dict

    ckpt = tmp_path / f"{name}.safetensors"
    settings = TrainSettings(epochs=1, steps_per_epoch=2, batch_size=2, crop=64, val_crops=2, seed=0, device="cpu")
    train_model(TrainData([odd_scene.image], [odd_scene.labels]), name, ckpt, settings,
                model_options={"width_multiplier": TINY[name]}, show_progress=False)
    spec = job_from_dict({"scenes": [{"image": str(odd_scene.image), "labels": str(odd_scene.labels), "name": "odd"}],
                          "checkpoint": str(ckpt), "tile_size": 64, "overlap": 16, "stitch": "auto", "num_actors": 1,
                          "out": str(tmp_path / "out")})
    result = run_job(spec, show_progress=False)
    mask = zarr.open_array(str(result.layout.mask_store("odd")), path="mask", mode="r")[:]
    assert mask.shape == (301, 367) and set(np.unique(mask)) <= {0, 1, 2, 3, 4, 255}
    assert read_job_record(result.layout.root)["spec"]["stitch"] == "crop"
