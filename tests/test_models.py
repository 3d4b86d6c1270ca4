"""Tests for the model registry and every model family: shapes, published sizes, input contract."""

from __future__ import annotations

import pytest
import torch

from schemas.errors import SpecError
from workers.models import ModelInfo, create_model, list_models, model_info
from workers.models.registry import TILE_MULTIPLE, check_tile

HRNETS = ["hrnet_w18_small_v1", "hrnet_w18_small_v2", "hrnet_w18", "hrnet_w32", "hrnet_w48"]
DEEPLABS = ["deeplabv3plus_resnet50", "deeplabv3plus_resnet101"]
BASELINES = ["pixel_linear"]
VGGS = ["fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16", "segnet_vgg16"]
UNETS = ["unet", "unet_plusplus"]
PYRAMIDS = ["linknet_resnet18", "pspnet_resnet50", "pspnet_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101"]

# Published HRNetV2 sizes (HRNet-Semantic-Segmentation) and DeepLabV3+ sizes, 3 bands, 19 classes.
PARAMETERS = {
    "hrnet_w18_small_v1": 1_540_819,
    "hrnet_w18_small_v2": 3_939_579,
    "hrnet_w18": 9_641_119,
    "hrnet_w32": 29_546_515,
    "hrnet_w48": 65_859_379,
    "deeplabv3plus_resnet50": 40_351_667,
    "deeplabv3plus_resnet101": 59_343_795,
    "pixel_linear": 3 * 19 + 19,  # one 1x1 convolution with bias
    # FCN, SegNet, U-Net, U-Net++ at 3 bands, 19 classes; their reference configurations in tests/test_models_family.py
    "fcn32s_vgg16": 134_338_387,
    "fcn16s_vgg16": 134_348_134,
    "fcn8s_vgg16": 134_353_017,
    "segnet_vgg16": 29_453_971,
    "unet": 31_032_915,
    "unet_plusplus": 9_042_771,
    # LinkNet, PSPNet, DeepLabV3 at 3 bands, 19 classes; their reference configurations in tests/test_models_pyramid.py
    "linknet_resnet18": 11_535_699,
    "pspnet_resnet50": 46_715_347,
    "pspnet_resnet101": 65_707_475,
    "deeplabv3_resnet50": 39_638_355,
    "deeplabv3_resnet101": 58_630_483,
}
RESNET_BACKBONE_PARAMETERS = {"deeplabv3plus_resnet50": 23_508_032, "deeplabv3plus_resnet101": 42_500_160}


def _tiny(name: str) -> float:
    if name in VGGS + UNETS:
        return 1 / 16
    return 0.125 if name in DEEPLABS + PYRAMIDS else 0.25


def _logits(model: torch.nn.Module, bands: int, size: int = 64, batch: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.randn(batch, bands, size, size))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_lists_every_family():
    assert sorted(list_models()) == sorted(HRNETS + DEEPLABS + BASELINES + VGGS + UNETS + PYRAMIDS)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("bands", [4, 13])
def test_every_model_maps_a_tile_to_logits_of_the_same_size(name: str, bands: int):
    model = create_model(name, bands, 5, width_multiplier=_tiny(name))
    logits = _logits(model, bands)
    assert logits.shape == (1, 5, 64, 64)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["hrnet_w18_small_v1", "deeplabv3plus_resnet50"])
@pytest.mark.parametrize(("bands", "classes"), [(1, 2), (4, 7), (13, 2)])
def test_any_band_and_class_count(name: str, bands: int, classes: int):
    logits = _logits(create_model(name, bands, classes, width_multiplier=_tiny(name)), bands, size=32, batch=2)
    assert logits.shape == (2, classes, 32, 32)


@pytest.mark.parametrize("name", ["hrnet_w18_small_v2", "deeplabv3plus_resnet101"])
def test_non_square_tiles_keep_their_shape(name: str):
    model = create_model(name, 3, 3, width_multiplier=_tiny(name)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 96)).shape == (1, 3, 32, 96)


@pytest.mark.parametrize("name", ["hrnet_w18_small_v2", "deeplabv3plus_resnet50"])
def test_training_step_reaches_every_parameter(name: str):
    torch.manual_seed(0)
    model = create_model(name, 3, 4, width_multiplier=_tiny(name)).train()
    logits = model(torch.randn(2, 3, 32, 32))
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 4, (2, 32, 32))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameter_counts_match_the_published_architectures(name: str):
    with torch.device("meta"):
        model = create_model(name, 3, 19)
    assert _count(model) == PARAMETERS[name]


@pytest.mark.parametrize("name", DEEPLABS)
def test_resnet_backbones_match_torchvision(name: str):
    with torch.device("meta"):
        model = create_model(name, 3, 19)
    assert _count(model.backbone) == RESNET_BACKBONE_PARAMETERS[name]


def test_band_count_changes_only_the_first_convolution():
    with torch.device("meta"):
        rgb, multispectral = create_model("hrnet_w18", 3, 19), create_model("hrnet_w18", 13, 19)
    assert _count(multispectral) - _count(rgb) == 10 * 64 * 3 * 3


def test_published_width_runs():
    logits = _logits(create_model("hrnet_w18_small_v1", 3, 19), 3)
    assert logits.shape == (1, 19, 64, 64)


@pytest.mark.parametrize("name", DEEPLABS)
def test_output_stride_8_and_16_build_and_run(name: str):
    low_level_sizes = {}
    for stride in (8, 16):
        model = create_model(name, 4, 3, width_multiplier=0.125, output_stride=stride).eval()
        with torch.no_grad():
            _, high_level = model.backbone(torch.randn(1, 4, 64, 64))
            logits = model(torch.randn(1, 4, 64, 64))
        low_level_sizes[stride] = high_level.shape[-1]
        assert logits.shape == (1, 3, 64, 64)
    assert low_level_sizes == {8: 8, 16: 4}


def test_output_stride_must_be_8_or_16():
    with pytest.raises(SpecError, match="output_stride"):
        create_model("deeplabv3plus_resnet50", 3, 2, output_stride=32)


def test_width_multiplier_shrinks_every_layer():
    with torch.device("meta"):
        full, quarter = create_model("hrnet_w18", 3, 19), create_model("hrnet_w18", 3, 19, width_multiplier=0.25)
    assert _count(quarter) < _count(full) / 10
    convs = [
        (f.out_channels, q.out_channels)
        for f, q in zip(full.modules(), quarter.modules())
        if isinstance(f, torch.nn.Conv2d) and f.out_channels != 19
    ]
    assert convs and all(4 <= q <= max(4, f / 4 + 1) for f, q in convs)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "wide"])
def test_bad_width_multiplier_is_a_spec_error(bad):
    with pytest.raises(SpecError, match="width_multiplier"):
        create_model("hrnet_w18_small_v1", 3, 2, width_multiplier=bad)


@pytest.mark.parametrize("name", ["hrnet_w18_small_v1", "deeplabv3plus_resnet50"])
@pytest.mark.parametrize("size", [(64, 48), (40, 64), (16, 16)])
def test_tile_size_not_a_multiple_of_32_raises_value_error(name: str, size: tuple[int, int]):
    model = create_model(name, 3, 2, width_multiplier=_tiny(name)).eval()
    with pytest.raises(ValueError, match=f"multiples of {TILE_MULTIPLE}") as raised:
        model(torch.randn(1, 3, *size))
    assert "\n" not in str(raised.value)


def test_wrong_band_count_raises_value_error():
    model = create_model("hrnet_w18_small_v1", 4, 2, width_multiplier=0.25)
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        model(torch.randn(1, 3, 64, 64))


def test_check_tile_accepts_multiples_of_32():
    check_tile(torch.zeros(2, 3, 32, 96), 3)


def test_model_info_says_which_models_need_whole_tile_context():
    for name in HRNETS:
        info = model_info(name)
        assert isinstance(info, ModelInfo)
        assert (info.family, info.output_stride, info.whole_tile_context) == ("hrnet", 4, False)
    for name in DEEPLABS:
        info = model_info(name)
        assert (info.family, info.output_stride, info.whole_tile_context) == ("deeplabv3plus", 16, True)
    assert all(model_info(name).description for name in list_models())


def test_model_info_is_frozen():
    with pytest.raises(AttributeError):
        model_info("hrnet_w18").family = "unet"  # type: ignore[misc]


@pytest.mark.parametrize("call", [lambda: create_model("unet3plus", 3, 2), lambda: model_info("unet3plus")])
def test_unknown_name_lists_the_valid_names(call):
    with pytest.raises(SpecError) as raised:
        call()
    message = str(raised.value)
    assert "'unet3plus'" in message and all(name in message for name in list_models())
    assert isinstance(raised.value, ValueError)


def test_unknown_override_lists_the_valid_ones():
    with pytest.raises(SpecError, match="valid overrides: width_multiplier$"):
        create_model("hrnet_w18", 3, 2, output_stride=8)


@pytest.mark.parametrize(("bands", "classes"), [(0, 2), (3, 0), (2.5, 2), (True, 2)])
def test_band_and_class_counts_must_be_positive_integers(bands, classes):
    with pytest.raises(SpecError, match="positive integer"):
        create_model("hrnet_w18_small_v1", bands, classes)
