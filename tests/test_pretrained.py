"""Published weights load into our models with every tensor where it belongs (workers/models/pretrained.py).

Nothing is downloaded: the state dicts are generated here from the published architecture definitions, not
from our models. Key names and shapes are transcribed from timm/models/hrnet.py (HighResolutionNet,
HighResolutionModule, `cfg_cls`; huggingface/pytorch-image-models), mmseg/models/backbones/hrnet.py with
decode_heads/fcn_head.py and configs/_base_/models/fcn_hr18.py, torchvision/models/resnet.py,
timm/models/resnet.py (resnet50c's deep stem, resnet50d's average-pool shortcut), mmseg's ResNetV1c
(backbones/resnet.py) with decode_heads/sep_aspp_head.py, aspp_head.py and
configs/_base_/models/deeplabv3plus_r50-d8.py, and mmcv's ConvModule / DepthwiseSeparableConvModule (conv + `bn`;
`depthwise_conv` + `pointwise_conv`). Each tensor gets its own seeded values, so a tensor loaded into the wrong
place, or left at initialisation, is caught. Full-size layouts are checked for names and shapes on the meta device
(no memory); values are checked at full size for timm's HRNet-W18 and at reduced widths elsewhere (the same
names, channels scaled as `width_multiplier` scales ours; the published stems are 64 wide, scaled here too).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from pipeline.cli import main as cli_main
from schemas.errors import CheckpointError
from schemas.job import job_from_dict
from workers.models import create_model, load_checkpoint
from workers.models.pretrained import check_pretrained, convert_weights, load_pretrained, read_weights
from workers.models.registry import scale_channels

Shapes = dict[str, tuple[int, ...]]


# --- the published layouts, transcribed -----------------------------------------------------------------------

def _bn(out: Shapes, p: str, c: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        out[f"{p}.{name}"] = (c,)
    out[f"{p}.num_batches_tracked"] = ()


def _conv(out: Shapes, p: str, cout: int, cin: int, k: int, bias: bool = False, groups: int = 1) -> None:
    out[f"{p}.weight"] = (cout, cin // groups, k, k)
    if bias:
        out[f"{p}.bias"] = (cout,)


def _basic(out: Shapes, p: str, inp: int, planes: int, stride: int = 1, avg_down: bool = False) -> int:
    _conv(out, f"{p}.conv1", planes, inp, 3)
    _bn(out, f"{p}.bn1", planes)
    _conv(out, f"{p}.conv2", planes, planes, 3)
    _bn(out, f"{p}.bn2", planes)
    if stride != 1 or inp != planes:
        _conv(out, f"{p}.downsample.0", planes, inp, 1)
        _bn(out, f"{p}.downsample.1", planes)
    return planes


def _bottleneck(out: Shapes, p: str, inp: int, planes: int, stride: int = 1, avg_down: bool = False) -> int:
    _conv(out, f"{p}.conv1", planes, inp, 1)
    _bn(out, f"{p}.bn1", planes)
    _conv(out, f"{p}.conv2", planes, planes, 3)
    _bn(out, f"{p}.bn2", planes)
    _conv(out, f"{p}.conv3", planes * 4, planes, 1)
    _bn(out, f"{p}.bn3", planes * 4)
    if stride != 1 or inp != planes * 4:
        first = 1 if avg_down else 0  # timm's downsample_avg: [AvgPool2d, conv, norm]
        _conv(out, f"{p}.downsample.{first}", planes * 4, inp, 1)
        _bn(out, f"{p}.downsample.{first + 1}", planes * 4)
    return planes * 4


def _layer(out: Shapes, p: str, block, inp: int, planes: int, blocks: int, stride: int = 1,
           avg_down: bool = False) -> int:
    width = block(out, f"{p}.0", inp, planes, stride, avg_down)
    for i in range(1, blocks):
        block(out, f"{p}.{i}", width, planes)
    return width


# timm cfg_cls (and mmseg's fcn_hr18*/hr48 configs): stage1 (blocks, channels); stages 2-4 (modules, blocks, channels)
HRNET_CFGS = {
    "hrnet_w18_small": ((1, 32), [(1, 2, (16, 32)), (1, 2, (16, 32, 64)), (1, 2, (16, 32, 64, 128))]),
    "hrnet_w18_small_v2": ((2, 64), [(1, 2, (18, 36)), (3, 2, (18, 36, 72)), (2, 2, (18, 36, 72, 144))]),
    "hrnet_w18": ((4, 64), [(1, 4, (18, 36)), (4, 4, (18, 36, 72)), (3, 4, (18, 36, 72, 144))]),
    "hrnet_w32": ((4, 64), [(1, 4, (32, 64)), (4, 4, (32, 64, 128)), (3, 4, (32, 64, 128, 256))]),
    "hrnet_w48": ((4, 64), [(1, 4, (48, 96)), (4, 4, (48, 96, 192)), (3, 4, (48, 96, 192, 384))]),
}
OURS = {"hrnet_w18_small": "hrnet_w18_small_v1"}


def hrnet_backbone(cfg, scale: float = 1.0, prefix: str = "", bands: int = 3) -> tuple[Shapes, list[int]]:
    """HighResolutionNet's stem, layer1, transitions and stages (timm, mmseg and the originals share them)."""
    w = lambda c: scale_channels(c, scale)  # noqa: E731
    out: Shapes = {}
    stem = w(64)
    _conv(out, f"{prefix}conv1", stem, bands, 3)
    _bn(out, f"{prefix}bn1", stem)
    _conv(out, f"{prefix}conv2", stem, stem, 3)
    _bn(out, f"{prefix}bn2", stem)
    (blocks1, channels1), stages = cfg
    pre = [_layer(out, f"{prefix}layer1", _bottleneck, stem, w(channels1), blocks1)]
    for s, (modules, blocks, channels) in enumerate(stages, start=2):
        channels = [w(c) for c in channels]
        t = f"{prefix}transition{s - 1}"
        for i, c in enumerate(channels):  # _make_transition_layer
            if i < len(pre):
                if c != pre[i]:
                    _conv(out, f"{t}.{i}.0", c, pre[i], 3)
                    _bn(out, f"{t}.{i}.1", c)
            else:
                for j in range(i + 1 - len(pre)):
                    cout = c if j == i - len(pre) else pre[-1]
                    _conv(out, f"{t}.{i}.{j}.0", cout, pre[-1], 3)
                    _bn(out, f"{t}.{i}.{j}.1", cout)
        for m in range(modules):  # HighResolutionModule: branches, then fuse_layers[i][j]
            p = f"{prefix}stage{s}.{m}"
            for b, c in enumerate(channels):
                _layer(out, f"{p}.branches.{b}", _basic, c, c, blocks)
            for i in range(len(channels)):
                for j in range(len(channels)):
                    if j > i:
                        _conv(out, f"{p}.fuse_layers.{i}.{j}.0", channels[i], channels[j], 1)
                        _bn(out, f"{p}.fuse_layers.{i}.{j}.1", channels[i])
                    elif j < i:
                        for k in range(i - j):
                            cout = channels[i] if k == i - j - 1 else channels[j]
                            _conv(out, f"{p}.fuse_layers.{i}.{j}.{k}.0", cout, channels[j], 3)
                            _bn(out, f"{p}.fuse_layers.{i}.{j}.{k}.1", cout)
        pre = channels
    return out, pre


def timm_hrnet(variant: str, scale: float = 1.0) -> Shapes:
    """timm's ImageNet HRNet: the backbone plus _make_head (incre_modules, downsamp_modules, final_layer), classifier."""
    out, pre = hrnet_backbone(HRNET_CFGS[variant], scale)
    head = [32, 64, 128, 256]
    for i, c in enumerate(pre):
        _layer(out, f"incre_modules.{i}", _bottleneck, c, head[i], 1)
    for i in range(3):
        _conv(out, f"downsamp_modules.{i}.0", head[i + 1] * 4, head[i] * 4, 3, bias=True)
        _bn(out, f"downsamp_modules.{i}.1", head[i + 1] * 4)
    _conv(out, "final_layer.0", 2048, 1024, 1, bias=True)
    _bn(out, "final_layer.1", 2048)
    out["classifier.weight"], out["classifier.bias"] = (1000, 2048), (1000,)
    return out


def mmseg_fcn_hrnet(variant: str, classes: int, scale: float = 1.0) -> Shapes:
    """mmseg's EncoderDecoder with HRNet and FCNHead(kernel_size=1, num_convs=1, concat_input=False, resize_concat)."""
    out, pre = hrnet_backbone(HRNET_CFGS[variant], scale, prefix="backbone.")
    c = sum(pre)
    _conv(out, "decode_head.convs.0.conv", c, c, 1)
    _bn(out, "decode_head.convs.0.bn", c)
    _conv(out, "decode_head.conv_seg", classes, c, 1, bias=True)
    return out


def resnet(depth: int, stem: str = "7x7", scale: float = 1.0, prefix: str = "", avg_down: bool = False) -> Shapes:
    """torchvision / timm / mmseg ResNet trunks: stem 7x7 (conv1, bn1), timm 'deep' (conv1.0/1/3/4/6 + bn1) or
    mmseg ResNetV1c (stem.0/1/3/4/6/7), then layer1-4 of bottlenecks."""
    w = lambda c: scale_channels(c, scale)  # noqa: E731
    out: Shapes = {}
    width = w(64)
    if stem == "7x7":
        _conv(out, f"{prefix}conv1", width, 3, 7)
        _bn(out, f"{prefix}bn1", width)
    else:
        names = ("conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6", "bn1") if stem == "timm_deep" else \
            ("stem.0", "stem.1", "stem.3", "stem.4", "stem.6", "stem.7")
        half = width // 2
        _conv(out, prefix + names[0], half, 3, 3)
        _bn(out, prefix + names[1], half)
        _conv(out, prefix + names[2], half, half, 3)
        _bn(out, prefix + names[3], half)
        _conv(out, prefix + names[4], width, half, 3)
        _bn(out, prefix + names[5], width)
    layers = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    inp = width
    for i, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
        inp = _layer(out, f"{prefix}layer{i + 1}", _bottleneck, inp, w(planes), blocks, 1 if i == 0 else 2, avg_down)
    return out


def imagenet_resnet(depth: int, stem: str = "7x7", scale: float = 1.0, avg_down: bool = False) -> Shapes:
    out = resnet(depth, stem, scale, avg_down=avg_down)
    out["fc.weight"], out["fc.bias"] = (1000, 2048), (1000,)
    return out


def _dsconv(out: Shapes, p: str, cin: int, cout: int) -> None:
    _conv(out, f"{p}.depthwise_conv.conv", cin, cin, 3, groups=cin)
    _bn(out, f"{p}.depthwise_conv.bn", cin)
    _conv(out, f"{p}.pointwise_conv.conv", cout, cin, 1)
    _bn(out, f"{p}.pointwise_conv.bn", cout)


def mmseg_deeplabv3plus(depth: int, classes: int, scale: float = 1.0, aux: bool = True) -> Shapes:
    """deeplabv3plus_r50-d8: ResNetV1c, DepthwiseSeparableASPPHead(channels 512, c1 48, dilations 1/12/24/36),
    and FCNHead(1024 -> 256, num_convs 1) as auxiliary head."""
    w = lambda c: scale_channels(c, scale)  # noqa: E731
    out = resnet(depth, "mmseg_deep", scale, prefix="backbone.")
    in_ch, ch, c1_in, c1 = w(512) * 4, w(512), w(64) * 4, w(48)
    p = "decode_head."
    _conv(out, p + "image_pool.1.conv", ch, in_ch, 1)
    _bn(out, p + "image_pool.1.bn", ch)
    for i, dilation in enumerate((1, 12, 24, 36)):
        if dilation == 1:
            _conv(out, f"{p}aspp_modules.{i}.conv", ch, in_ch, 1)
            _bn(out, f"{p}aspp_modules.{i}.bn", ch)
        else:
            _dsconv(out, f"{p}aspp_modules.{i}", in_ch, ch)
    _conv(out, p + "bottleneck.conv", ch, 5 * ch, 3)
    _bn(out, p + "bottleneck.bn", ch)
    _conv(out, p + "c1_bottleneck.conv", c1, c1_in, 1)
    _bn(out, p + "c1_bottleneck.bn", c1)
    _dsconv(out, p + "sep_bottleneck.0", ch + c1, ch)
    _dsconv(out, p + "sep_bottleneck.1", ch, ch)
    _conv(out, p + "conv_seg", classes, ch, 1, bias=True)
    if aux:
        _conv(out, "auxiliary_head.convs.0.conv", w(256), w(256) * 4, 3)
        _bn(out, "auxiliary_head.convs.0.bn", w(256))
        _conv(out, "auxiliary_head.conv_seg", classes, w(256), 1, bias=True)
    return out


def filled(shapes: Shapes) -> dict[str, torch.Tensor]:
    """Distinct values per tensor: seeded normal draws; BatchNorm counters get their own index."""
    out = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(i + 1, dtype=torch.long)
        else:
            out[key] = torch.randn(shape, generator=torch.Generator().manual_seed(i))
    return out


def on_meta(shapes: Shapes) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta", dtype=torch.long if k.endswith("tracked") else torch.float32)
            for k, s in shapes.items()}


# --- the expected mapping, written independently of the converter ----------------------------------------------

def expect_timm_hrnet(source) -> dict[str, str]:
    head = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
    return {k: k for k in source if not k.startswith(head)}


def expect_mmseg_hrnet(source) -> dict[str, str]:
    table = {"decode_head.convs.0.conv.": "last_layer.0.", "decode_head.convs.0.bn.": "last_layer.1.",
             "decode_head.conv_seg.": "last_layer.3."}
    out = {}
    for k in source:
        if k.startswith("backbone."):
            out[k] = k[len("backbone."):]
        else:
            module = next(m for m in table if k.startswith(m))
            out[k] = table[module] + k[len(module):]
    return out


def expect_resnet(source, stem: str = "7x7") -> dict[str, str]:
    timm_deep = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.",
                 "conv1.6.": "stem.6.", "bn1.": "stem.7."}
    out = {}
    for k in source:
        if k.startswith("fc."):
            continue
        module = next((m for m in timm_deep if k.startswith(m)), None) if stem == "timm_deep" else None
        out[k] = "backbone." + (timm_deep[module] + k[len(module):] if module else k)
    return out


def expect_mmseg_deeplab(source) -> dict[str, str]:
    table = {"image_pool.1.conv": "aspp.pooling.conv.0", "image_pool.1.bn": "aspp.pooling.conv.1",
             "aspp_modules.0.conv": "aspp.branches.0.0", "aspp_modules.0.bn": "aspp.branches.0.1",
             "bottleneck.conv": "aspp.project.0", "bottleneck.bn": "aspp.project.1",
             "c1_bottleneck.conv": "decoder.reduce.0", "c1_bottleneck.bn": "decoder.reduce.1",
             "conv_seg": "decoder.classifier"}
    separable = {"depthwise_conv.conv": 0, "depthwise_conv.bn": 1, "pointwise_conv.conv": 3, "pointwise_conv.bn": 4}
    for i in (1, 2, 3):
        table.update({f"aspp_modules.{i}.{m}": f"aspp.branches.{i}.{n}" for m, n in separable.items()})
    for j in (0, 1):
        table.update({f"sep_bottleneck.{j}.{m}": f"decoder.fuse.{j}.{n}" for m, n in separable.items()})
    out = {}
    for k in source:
        if k.startswith("backbone."):
            out[k] = k
        elif k.startswith("decode_head."):
            module, param = k[len("decode_head."):].rsplit(".", 1)
            out[k] = f"{table[module]}.{param}"
    return out


def assert_loaded(model, fresh, source, expected, report, first_conv=None, adapted=None, allowed_left=()):
    """Every expected tensor is in its place (the first conv as adapted); everything else is the model's own
    initialisation and allowed to be; the report counts exactly the expected tensors."""
    state = model.state_dict()
    for src, dst in expected.items():
        want = adapted if dst == first_conv else source[src]
        assert torch.equal(state[dst], want.to(state[dst].dtype)), (src, dst)
    placed = set(expected.values())
    for key, tensor in state.items():
        if key not in placed:
            assert key.startswith(tuple(allowed_left)), f"{key} was not loaded and is not allowed to stay at init"
            assert torch.equal(tensor, fresh[key]), key
    assert report.loaded == len(expected)


def _model(name, bands, classes, **options):
    """The model and a copy of its initial state (what "left at initialisation" must equal)."""
    torch.manual_seed(0)
    model = create_model(name, bands, classes, **options)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _save(tmp_path, tensors, name="weights.pth", wrap=None):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(tensors, str(path))
    else:
        torch.save(wrap(tensors) if wrap else tensors, path)
    return path


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mmseg(state):
    return {"meta": {"CLASSES": ["a", "b"], "mmseg_version": "1.2.2", "epoch": 40}, "state_dict": state}


# --- HRNet -------------------------------------------------------------------------------------------------------

def test_timm_hrnet_w18_loads_every_backbone_tensor_and_cycles_rgb_over_four_bands(tmp_path):
    source = filled(timm_hrnet("hrnet_w18", scale=0.25))
    path = _save(tmp_path, source, "hrnet_w18.safetensors")
    model, fresh = _model("hrnet_w18", 4, 5, width_multiplier=0.25)
    report = load_pretrained(model, "hrnet_w18", path)
    rgb = source["conv1.weight"]
    adapted = rgb[:, [0, 1, 2, 0]] * 0.75  # band k takes channel k mod 3, scaled by 3/4
    assert_loaded(model, fresh, source, expect_timm_hrnet(source), report, "conv1.weight", adapted, ("last_layer.",))
    text = "\n".join(report.lines())
    assert "timm / HRNet-Image-Classification" in text and "from 3 to 4 bands" in text
    assert "incre_modules (" in text and "classifier (2 tensors)" in text and "last_layer (" in text
    assert "not in the file" in report.conversion.classifier


@pytest.mark.parametrize("variant", sorted(HRNET_CFGS))
def test_every_timm_hrnet_variant_maps_every_tensor_name_and_shape(variant):
    source = on_meta(timm_hrnet(variant))
    ours = OURS.get(variant, variant)
    with torch.device("meta"):
        target = create_model(ours, 3, 7).state_dict()
    conversion = convert_weights(source, ours, target, "timm.pth")
    expected = expect_timm_hrnet(source)
    assert set(conversion.tensors) == set(expected.values())
    assert all(conversion.tensors[dst].shape == source[src].shape for src, dst in expected.items())
    assert set(target) - set(conversion.tensors) == {k for k in target if k.startswith("last_layer.")}


@pytest.mark.parametrize(("bands", "classes"), [(3, 19), (13, 6)])
def test_mmseg_fcn_hrnet_maps_backbone_and_head_and_keeps_the_classifier_only_for_as_many_classes(
    tmp_path, bands, classes
):
    source = filled(mmseg_fcn_hrnet("hrnet_w18", 19, scale=0.25))
    path = _save(tmp_path, source, wrap=_mmseg)
    model, fresh = _model("hrnet_w18", bands, classes, width_multiplier=0.25)
    report = load_pretrained(model, "hrnet_w18", path)
    expected = expect_mmseg_hrnet(source)
    left = ["last_layer.0.bias"]  # mmseg's ConvModule has no bias: ours is set to 0 (and starts at 0 anyway)
    if classes != 19:
        expected = {s: d for s, d in expected.items() if not d.startswith("last_layer.3.")}
        left.append("last_layer.3.")
    rgb = source["backbone.conv1.weight"]
    adapted = {3: rgb, 13: rgb[:, [k % 3 for k in range(13)]] * (3 / 13)}[bands]
    assert_loaded(model, fresh, source, expected, report, "conv1.weight", adapted, left)
    assert torch.equal(model.state_dict()["last_layer.0.bias"], torch.zeros_like(fresh["last_layer.0.bias"]))
    assert report.conversion.zero_filled == ("last_layer.0.bias",)
    kept = "kept" if classes == 19 else "reinitialised: the file has 19 classes, the model 6"
    assert kept in report.conversion.classifier
    assert (report.conversion.first_conv is None) == (bands == 3)


def test_the_original_hrnet_seg_layout_with_a_model_prefix_loads_as_ours(tmp_path):
    torch.manual_seed(3)
    trained = create_model("hrnet_w18_small_v1", 3, 4, width_multiplier=0.25)
    state = {f"model.{k}": v for k, v in trained.state_dict().items()} | {"loss.criterion.weight": torch.ones(4)}
    path = _save(tmp_path, state, wrap=lambda s: {"state_dict": s})
    model, fresh = _model("hrnet_w18_small_v1", 3, 4, width_multiplier=0.25)
    report = load_pretrained(model, "hrnet_w18_small_v1", path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert report.loaded == len(trained.state_dict()) and report.conversion.dropped == {"loss": 1}


# --- DeepLabV3+ --------------------------------------------------------------------------------------------------

DEEPLAB_TINY = {"width_multiplier": 0.125}


def test_torchvision_resnet50_fills_the_backbone_and_sums_rgb_for_one_band(tmp_path):
    source = filled(imagenet_resnet(50, scale=0.125))
    path = _save(tmp_path, source)
    model, fresh = _model("deeplabv3plus_resnet50", 1, 3, **DEEPLAB_TINY)
    report = load_pretrained(model, "deeplabv3plus_resnet50", path)
    adapted = source["conv1.weight"].sum(dim=1, keepdim=True)
    assert_loaded(model, fresh, source, expect_resnet(source), report, "backbone.conv1.weight", adapted,
                  ("aspp.", "decoder."))
    assert report.conversion.dropped == {"fc": 2}
    assert "summed over its 3 input channels" in report.conversion.first_conv


@pytest.mark.parametrize(("stem", "name"), [("timm_deep", "timm ResNet-C"), ("mmseg_deep", "mmcv ResNetV1c")])
def test_deep_stem_imagenet_resnets_fill_a_deep_stem_backbone(tmp_path, stem, name):
    source = filled(imagenet_resnet(50, stem, scale=0.125))
    path = _save(tmp_path, source, wrap=lambda s: {"state_dict": s})
    model, fresh = _model("deeplabv3plus_resnet50", 3, 3, stem="deep", **DEEPLAB_TINY)
    report = load_pretrained(model, "deeplabv3plus_resnet50", path)
    if stem == "timm_deep":
        expected = expect_resnet(source, stem)
    else:  # mmcv's names are ours under backbone.
        expected = {k: f"backbone.{k}" for k in source if not k.startswith("fc.")}
    assert_loaded(model, fresh, source, expected, report, allowed_left=("aspp.", "decoder."))
    assert report.conversion.layout.startswith(name)


def test_mmseg_deeplabv3plus_loads_backbone_aspp_decoder_and_classifier_and_drops_the_auxiliary_head(tmp_path):
    source = filled(mmseg_deeplabv3plus(50, 19, scale=0.125))
    path = _save(tmp_path, source, wrap=_mmseg)
    options = dict(stem="deep", head="separable", output_stride=8, **DEEPLAB_TINY)
    model, fresh = _model("deeplabv3plus_resnet50", 3, 19, **options)
    report = load_pretrained(model, "deeplabv3plus_resnet50", path)
    assert_loaded(model, fresh, source, expect_mmseg_deeplab(source), report)
    assert report.conversion.dropped == {"auxiliary_head": 8} and not report.conversion.left
    assert "kept" in report.conversion.classifier
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 19, 32, 32)


@pytest.mark.parametrize("depth", [50, 101])
def test_full_size_mmseg_deeplabv3plus_and_torchvision_resnets_map_every_tensor_name_and_shape(depth):
    name = f"deeplabv3plus_resnet{depth}"
    for source, options, expected in (
        (on_meta(mmseg_deeplabv3plus(depth, 19)), {"stem": "deep", "head": "separable"}, expect_mmseg_deeplab),
        (on_meta(imagenet_resnet(depth)), {}, expect_resnet),
    ):
        with torch.device("meta"):
            target = create_model(name, 3, 19, **options).state_dict()
        conversion = convert_weights(source, name, target, "w.pth")
        mapping = expected(source)
        assert set(conversion.tensors) == set(mapping.values())
        assert all(conversion.tensors[dst].shape == source[src].shape == target[dst].shape for src, dst in mapping.items())


# --- refusals: one line naming the file, what it looked like, and the fix ------------------------------------------

def _refusal(tmp_path, shapes, model, bands=3, classes=5, wrap=None, **options) -> str:
    path = _save(tmp_path, on_cpu_zeros(shapes), wrap=wrap)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(create_model(model, bands, classes, **options), model, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def on_cpu_zeros(shapes: Shapes) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=torch.long if k.endswith("tracked") else torch.float32) for k, s in shapes.items()}


def test_weights_of_another_family_variant_stem_or_head_are_refused_with_the_fix(tmp_path):
    tiny = {"width_multiplier": 0.125}
    message = _refusal(tmp_path, timm_hrnet("hrnet_w18", 0.125), "deeplabv3plus_resnet50", **tiny)
    assert "fit an HRNetV2 model, not deeplabv3plus_resnet50; use model of hrnet_w18" in message
    message = _refusal(tmp_path, timm_hrnet("hrnet_w18", 0.25), "hrnet_w18", width_multiplier=0.5)
    assert "tensor conv1.weight has shape (16, 3, 3, 3), hrnet_w18 wants (32, 3, 3, 3)" in message
    with torch.device("meta"):
        target = create_model("hrnet_w18_small_v2", 3, 5).state_dict()
    with pytest.raises(CheckpointError, match="w32.pth: .* tensors hrnet_w18_small_v2 lacks .*; use model hrnet_w32$"):
        convert_weights(on_meta(timm_hrnet("hrnet_w32")), "hrnet_w18_small_v2", target, "w32.pth")
    message = _refusal(tmp_path, imagenet_resnet(50, "timm_deep", 0.125), "deeplabv3plus_resnet50", **tiny)
    assert "stem: deep" in message
    message = _refusal(tmp_path, imagenet_resnet(101, scale=0.125), "deeplabv3plus_resnet50", **tiny)
    assert "deeplabv3plus_resnet101" in message
    message = _refusal(tmp_path, mmseg_deeplabv3plus(50, 19, 0.125), "deeplabv3plus_resnet50", wrap=_mmseg,
                       stem="deep", **tiny)
    assert "head: separable" in message
    message = _refusal(tmp_path, imagenet_resnet(50, "timm_deep", 0.125, avg_down=True), "deeplabv3plus_resnet50",
                       stem="deep", **tiny)
    assert "ResNet-D" in message and "resnet50c" in message


def test_an_unknown_layout_names_the_closest_one_and_where_to_read(tmp_path):
    vit = {"patch_embed.proj.weight": (768, 3, 16, 16), "blocks.0.attn.qkv.weight": (2304, 768), "head.weight": (1000, 768)}
    message = _refusal(tmp_path, vit, "hrnet_w18")
    assert "unknown weights layout" in message and "Pretrained weights" in message
    partial = timm_hrnet("hrnet_w18", 0.25) | {"se_module.fc.weight": (4, 4)}
    message = _refusal(tmp_path, partial, "hrnet_w18", width_multiplier=0.25)
    assert "looks like timm / HRNet-Image-Classification" in message and "se_module.fc.weight" in message


def test_files_are_read_without_running_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "hub": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth: holds pickled Python objects besides tensors \(print\)"):
        read_weights(path)
    with pytest.raises(CheckpointError, match="init weights not found"):
        read_weights(tmp_path / "missing.pth")


# --- the job path and the command line -------------------------------------------------------------------------

def test_a_job_with_init_builds_the_loaded_model_and_its_id_follows_the_content_not_the_path(tmp_path, caplog):
    from pipeline.run import job_id_of, resolve_model

    source = filled(mmseg_fcn_hrnet("hrnet_w18_small", 5, scale=0.25))
    first = _save(tmp_path, source, "a.pth", wrap=_mmseg)
    moved = tmp_path / "elsewhere" / "b.pth"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    other = _save(tmp_path, {k: v + 1 if v.is_floating_point() else v for k, v in source.items()}, "c.pth", wrap=_mmseg)
    base = {"scenes": [{"image": "x.tif"}], "model": "hrnet_w18_small_v1", "classes": list("abcde"),
            "model_options": {"width_multiplier": 0.25}, "bands": [1, 2, 3]}
    ids = {}
    for name, init in (("plain", None), ("first", first), ("moved", moved), ("other", other)):
        spec = job_from_dict(base | ({"init": str(init)} if init else {}))
        assert "init" not in spec.identity()
        ids[name] = job_id_of(spec, resolve_model(spec), "cpu")
    assert ids["first"] == ids["moved"] and len({ids["plain"], ids["first"], ids["other"]}) == 3
    spec = job_from_dict(base | {"init": str(first)})
    built = resolve_model(spec).source.build()
    assert torch.equal(built.state_dict()["layer1.0.conv1.weight"], source["backbone.layer1.0.conv1.weight"])
    assert torch.equal(built.state_dict()["last_layer.3.weight"], source["decode_head.conv_seg.weight"])
    with pytest.raises(Exception, match="not both"):
        job_from_dict(base | {"init": str(first), "checkpoint": "m.safetensors"})
    with pytest.raises(CheckpointError, match=r"a\.pth: mmsegmentation FCN-HRNetV2 tensor .* hrnet_w18 wants"):
        resolve_model(job_from_dict(base | {"init": str(first), "model": "hrnet_w18"}))
    assert check_pretrained(first, "hrnet_w18_small_v1", 4, 5, {"width_multiplier": 0.25}) == _sha256(first)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # the whole model came from the file
    check_pretrained(first, "hrnet_w18_small_v1", 4, 3, {"width_multiplier": 0.25})
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "leaves the classifier of hrnet_w18_small_v1 at initialisation" in warning[0]


def test_the_init_path_travels_like_the_checkpoints_and_its_content_keys_scheduled_scenes(tmp_path):
    import yaml

    from pipeline.job_folder import model_key
    from pipeline.schedule import schedule_model_key
    from pipeline.submit import shipped_spec
    from schemas.job import load_job
    from schemas.schedule import load_schedule

    (tmp_path / "w.pth").write_bytes(b"first")
    job = {"scenes": [{"image": "x.tif"}], "model": "hrnet_w18", "classes": ["a", "b"], "init": "w.pth"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    spec = load_job(tmp_path / "job.yaml")
    assert spec.init == tmp_path / "w.pth"  # relative to the job file, as `checkpoint`
    assert shipped_spec(spec.model_copy(update={"init": "w.pth"})).init.is_absolute()
    schedule = {"name": "n", "cron": "0 2 * * *", "scenes": {"glob": "*.tif"}, "out": "out",
                "job": {k: v for k, v in job.items() if k != "scenes"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(schedule))
    loaded = load_schedule(tmp_path / "s.yaml")
    assert loaded.job["init"] == str(tmp_path / "w.pth")
    first = schedule_model_key(loaded)
    (tmp_path / "w.pth").write_bytes(b"second")
    assert schedule_model_key(loaded) != first != schedule_model_key(loaded.model_copy(update={"job": job | {"init": None}}))
    assert model_key(None, "m", {}, 0) == model_key(None, "m", {}, 0, None) != model_key(None, "m", {}, 0, "ab12")


@pytest.mark.slow  # a few training steps: about 3-5 s on 2 cores
def test_satseg_train_init_starts_from_an_mmseg_file_and_records_it(tmp_path, capsys):
    from pipeline.synthetic import write_synthetic_scene

    scene = write_synthetic_scene(tmp_path, "train", 160, 128, seed=3, cell=40)
    source = filled(mmseg_fcn_hrnet("hrnet_w18_small", 19, scale=0.25))
    weights = _save(tmp_path, source, "fcn_hr18s.pth", wrap=_mmseg)
    out = tmp_path / "model.safetensors"
    argv = ["train", "--image", str(scene.image), "--labels", str(scene.labels), "--model", "hrnet_w18_small_v1",
            "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "64",
            "--val-crops", "2", "--device", "cpu", "--model-options", json.dumps({"width_multiplier": 0.25}),
            "--init", str(weights), "--quiet"]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "mmsegmentation FCN-HRNetV2 layout" in err and "from 3 to 4 bands" in err
    assert "reinitialised: the file has 19 classes, the model 5" in err
    init = load_checkpoint(out).provenance["init"]
    assert init["sha256"] == _sha256(weights)
    assert init["layout"] == "mmsegmentation FCN-HRNetV2" and init["tensors_loaded"] == len(source) - 2
    assert cli_main(argv[:-3] + ["--init", str(tmp_path / "nope.pth"), "--quiet"]) == 2
    assert "init weights not found" in capsys.readouterr().err
    other = _save(tmp_path, {k: v * 2 for k, v in source.items()}, "other.pth", wrap=_mmseg)
    assert cli_main(argv[:-3] + ["--init", str(other), "--resume", "--epochs", "2", "--quiet"]) == 2
    assert "the saved run has init_sha256=" in capsys.readouterr().err  # a resume continues from the same weights


@pytest.mark.slow  # a whole job on the local Ray instance
def test_satseg_run_with_init_in_the_job_file_and_the_same_weights_moved_resumes(tmp_path, odd_scene, ray_local, capsys):
    import yaml

    from pipeline.job_folder import read_job_record

    source = filled(mmseg_fcn_hrnet("hrnet_w18_small", 5, scale=0.25))
    _save(tmp_path, source, "fcn.pth", wrap=_mmseg)
    job = {"scenes": [{"image": str(odd_scene.image), "name": "s"}], "model": "hrnet_w18_small_v1",
           "model_options": {"width_multiplier": 0.25}, "classes": list("abcde"), "init": "fcn.pth",
           "tile_size": 64, "overlap": 16, "chunk_size": 512, "out": "out"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert cli_main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    record = read_job_record(tmp_path / "out")
    assert (tmp_path / "out" / "masks" / "s.zarr").is_dir()
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "fcn.pth", tmp_path / "moved" / "fcn.pth")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job | {"init": "moved/fcn.pth"}))
    capsys.readouterr()
    assert cli_main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0  # the same content: the same job, resumed
    assert record["spec"]["init"] == str(tmp_path / "fcn.pth")  # the job record keeps the path it first ran with
    assert read_job_record(tmp_path / "out")["job_id"] == record["job_id"]
