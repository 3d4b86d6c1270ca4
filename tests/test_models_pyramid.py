"""LinkNet, PSPNet and DeepLabV3: reference sizes, the tile contract, PSPNet's exportable pooling, exports, a job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from schemas.errors import SpecError
from workers.models import create_model, model_info
from workers.models.export import export_model
from workers.models.pspnet import PyramidPooling, adaptive_avg_pool

TINY = {
    "linknet_resnet18": 0.25, "pspnet_resnet50": 0.125, "pspnet_resnet101": 0.125,
    "deeplabv3_resnet50": 0.125, "deeplabv3_resnet101": 0.125,
}
"""Each model at a width whose layers are a few channels: the graph is what is under test."""

# Auxiliary heads the references build for a training loss only; satseg trains with one loss and does not build them.
# torchvision's FCNHead(1024, 21) and hszhao/semseg's PSPNet.aux (both: 3x3 conv 1024 -> 256 without bias, batch
# norm, 1x1 conv 256 -> 21 with bias) have the same shapes.
AUX_HEAD_21 = 1024 * 256 * 3 * 3 + 2 * 256 + 256 * 21 + 21
REFERENCE = {
    # e-lab/pytorch-linknet models/linknet.py, LinkNet(n_classes=21) (its default), 3 bands; the paper (Chaurasia
    # and Culurciello 2017, Table 2) rounds to 11.5M
    "linknet_resnet18": (3, 21, 11_535_957),
    # hszhao/semseg model/pspnet.py, PSPNet(layers=50/101, classes=21) in eval mode (deep base ResNet, PPM bins
    # 1, 2, 3, 6 of 512 channels, 3x3 conv 4096 -> 512); built in training mode it adds the auxiliary head
    "pspnet_resnet50": (3, 21, 49_081_578 - AUX_HEAD_21),
    "pspnet_resnet101": (3, 21, 68_073_706 - AUX_HEAD_21),
    # torchvision deeplabv3_resnet50/101 "num_params" (DeepLabV3_ResNet*_Weights.COCO_WITH_VOC_LABELS_V1.meta:
    # 42,004,074 and 60,996,202, 3 bands, 21 classes, with aux_classifier)
    "deeplabv3_resnet50": (3, 21, 42_004_074 - AUX_HEAD_21),
    "deeplabv3_resnet101": (3, 21, 60_996_202 - AUX_HEAD_21),
}

FAMILIES = {
    "linknet_resnet18": ("linknet", 1, False),
    "pspnet_resnet50": ("pspnet", 8, True), "pspnet_resnet101": ("pspnet", 8, True),
    "deeplabv3_resnet50": ("deeplabv3", 16, True), "deeplabv3_resnet101": ("deeplabv3", 16, True),
}
"""family, output stride, whole-tile context (PSPNet's 1x1 pyramid bin and DeepLabV3's image pooling)."""


def _tiny(name: str, bands: int, classes: int, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, bands, classes, width_multiplier=TINY[name], **options)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only wait for each other


def test_the_auxiliary_heads_left_out_have_the_size_subtracted():
    assert AUX_HEAD_21 == 2_365_205


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_counts_equal_the_reference_configurations(name: str):
    bands, classes, expected = REFERENCE[name]
    with torch.device("meta"):
        model = create_model(name, bands, classes)
    assert _count(model) == expected


def test_linknet_has_the_papers_rounded_size_for_any_class_count():
    with torch.device("meta"):
        counts = [_count(create_model("linknet_resnet18", 3, classes)) for classes in (2, 11, 19)]
    assert [round(count / 1e6, 1) for count in counts] == [11.5] * 3


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_registry_knows_family_output_stride_and_whole_tile_context(name: str):
    info = model_info(name)
    assert (info.family, info.output_stride, info.whole_tile_context) == FAMILIES[name]


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize(("bands", "classes"), [(1, 2), (13, 7)])
def test_logits_have_the_tiles_size_at_odd_multiples_of_32(name: str, bands: int, classes: int):
    with torch.no_grad():
        logits = _tiny(name, bands, classes).eval()(torch.randn(2, bands, 96, 160))
    assert logits.shape == (2, classes, 96, 160) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("name", "options", "stride"),
    [("linknet_resnet18", {}, 1), ("pspnet_resnet50", {}, 8), ("pspnet_resnet101", {"output_stride": 16}, 16),
     ("deeplabv3_resnet50", {}, 16), ("deeplabv3_resnet101", {"output_stride": 8}, 8)],
)
def test_the_classifier_scores_at_the_output_stride(name: str, options: dict, stride: int):
    model = _tiny(name, 2, 3, **options).eval()
    classifier = model.tp_conv2 if name.startswith("linknet") else model.classifier
    heights = []
    classifier.register_forward_hook(lambda _m, _i, out: heights.append(out.shape[-2]))
    with torch.no_grad():
        model(torch.zeros(1, 2, 128, 64))
    assert heights == [128 // stride]


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_training_step_reaches_every_parameter(name: str):
    model = _tiny(name, 3, 4).train()
    logits = model(torch.randn(2, 3, 64, 64))
    F.cross_entropy(logits, torch.randint(0, 4, (2, 64, 64))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("name", "first_conv"), [("linknet_resnet18", 64 * 7 * 7), ("pspnet_resnet50", 64 * 3 * 3),
                                                  ("deeplabv3_resnet101", 64 * 7 * 7)])
def test_band_count_changes_only_the_first_convolution(name: str, first_conv: int):
    with torch.device("meta"):
        rgb, multispectral = create_model(name, 3, 5), create_model(name, 13, 5)
    assert _count(multispectral) - _count(rgb) == 10 * first_conv


def _deep_stem(width: int) -> int:
    """Three 3x3 convs from 3 bands (width/2, width/2, width channels) and their batch norms."""
    half = width // 2
    return 9 * (3 * half + half * half + half * width) + 2 * (half + half + width)


@pytest.mark.parametrize(
    ("name", "stem", "difference"),
    [
        # the deep base (64, 64, 128) against ResNet-C's (32, 32, 64); layer1's first block then reads 128 channels
        # instead of 64 in its 1x1 conv (to 64) and its projection shortcut (to 256)
        ("pspnet_resnet50", "deep", _deep_stem(64) - _deep_stem(128) - 64 * (64 + 256)),
        # ResNet-C's stem against torchvision's 7x7 conv and its batch norm
        ("deeplabv3_resnet50", "deep", _deep_stem(64) - (3 * 64 * 7 * 7 + 2 * 64)),
    ],
)
def test_stem_option_swaps_the_stem_only(name: str, stem: str, difference: int):
    with torch.device("meta"):
        default, other = create_model(name, 3, 19), create_model(name, 3, 19, stem=stem)
    assert _count(other) - _count(default) == difference


@pytest.mark.parametrize(("name", "options", "fragment"), [
    ("pspnet_resnet50", {"output_stride": 32}, "output_stride"), ("deeplabv3_resnet50", {"output_stride": 4}, "output_stride"),
    ("pspnet_resnet101", {"stem": "v1c"}, "stem"), ("deeplabv3_resnet101", {"stem": "deep_base"}, "stem"),
    ("linknet_resnet18", {"output_stride": 8}, "valid overrides: width_multiplier$"),
])
def test_bad_options_are_spec_errors(name: str, options: dict, fragment: str):
    with pytest.raises(SpecError, match=fragment):
        create_model(name, 3, 2, **options)


@pytest.mark.parametrize("size", [(4, 4), (12, 20), (4, 36), (5, 7), (2, 3)])
def test_pyramid_pooling_equals_adaptive_average_pooling(size: tuple[int, int]):
    """Every bin of PSPNet's pyramid, where the bins do not divide the map and where they outnumber its pixels."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    for bins in (1, 2, 3, 6):
        torch.testing.assert_close(adaptive_avg_pool(x, bins), F.adaptive_avg_pool2d(x, bins), rtol=1e-6, atol=1e-6)


def _reload(path, fmt: str):
    return torch.export.load(str(path)).module() if fmt == "exported" else torch.jit.load(str(path), map_location="cpu")


FAST_EXPORTS = {("pspnet_resnet50", "torchscript")}
"""PSPNet for its pyramid pooling (3x3 and 6x6 bins of maps they do not divide); the rest in `make test-slow`
(a torch.export of a ResNet takes seconds: the fast suite exports the pyramid alone below)."""


@pytest.mark.parametrize(
    ("name", "fmt"),
    [(n, f) if (n, f) in FAST_EXPORTS else pytest.param(n, f, marks=pytest.mark.slow)
     for n in sorted(TINY) for f in ("exported", "torchscript")],
)
def test_exports_give_the_eager_logits_at_another_batch_and_size(tmp_path, name: str, fmt: str):
    """torch.export and TorchScript here (traced at 64x64, run at 96x160: 12x20 features at output stride 8);
    ONNX for every registry model in tests/test_export_onnx.py."""
    model = _tiny(name, 4, 5).eval()
    path = export_model(model, 4, tmp_path / f"{name}.{fmt}", fmt, {"model": name}, tile=64)
    x = torch.randn(3, 4, 96, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = model(x), _reload(path, fmt)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_pyramid_exports_as_a_program_with_dynamic_height_and_width(tmp_path):
    """torch.export keeps every bin's pooling dynamic: exported at 64x64, it pools 96x160 maps (neither 64 nor 160
    is a multiple of 3 or 6) as eager PyTorch does."""
    torch.manual_seed(0)
    pyramid = PyramidPooling(4, 2).eval()
    path = export_model(pyramid, 4, tmp_path / "pyramid.pt2", "exported", {}, tile=64)
    x = torch.randn(3, 4, 96, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(_reload(path, "exported")(x), pyramid(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(TINY))
def test_the_gpu_path_gives_a_tiles_output_whatever_its_batch(name: str):
    """As tests/test_cuda.py for HRNet: the actor's predictor on CUDA, bf16 autocast and channels_last included."""
    from workers.predictor import ModelSource, TilePredictor

    source = ModelSource(name, 4, 5, {"width_multiplier": TINY[name]}, seed=3)
    predictor = TilePredictor(source, device="cuda", batch_size=8)
    x = np.random.default_rng(0).normal(size=(11, 4, 64, 64)).astype(np.float32)
    together = predictor.predict_batch(x, classes=True)
    alone = np.concatenate([predictor.predict_batch(x[i : i + 1], classes=True) for i in range(len(x))])
    assert together.shape == (11, 64, 64) and np.array_equal(together, alone)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_each_model_trains_and_runs_in_a_job(ray_local, odd_scene, tmp_path, name: str):
    """A couple of training steps, then a job with the checkpoint: `stitch: auto` blends where a pixel sees the
    whole tile (PSPNet, DeepLabV3) and crops otherwise (LinkNet)."""
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
    expected = "blend" if model_info(name).whole_tile_context else "crop"
    assert read_job_record(result.layout.root)["spec"]["stitch"] == expected
