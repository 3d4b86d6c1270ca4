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
    """torchvision / timm / mmseg / hszhao ResNet trunks: stem 7x7 (conv1, bn1), timm 'deep' (conv1.0/1/3/4/6 +
    bn1), mmseg ResNetV1c (stem.0/1/3/4/6/7; both 32, 32, 64), semseg's deep base (conv1-3 and bn1-3 of 64, 64, 128;
    its PSPNet's layer0.0/1/3/4/6/7), then layer1-4 of bottlenecks (ResNet-18: basic blocks, 2 a layer)."""
    w = lambda c: scale_channels(c, scale)  # noqa: E731
    out: Shapes = {}
    width = w(64)
    if stem == "7x7":
        _conv(out, f"{prefix}conv1", width, 3, 7)
        _bn(out, f"{prefix}bn1", width)
    else:
        names = {"timm_deep": ("conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6", "bn1"),
                 "mmseg_deep": ("stem.0", "stem.1", "stem.3", "stem.4", "stem.6", "stem.7"),
                 "deep_base": ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"),
                 "semseg_layer0": ("layer0.0", "layer0.1", "layer0.3", "layer0.4", "layer0.6", "layer0.7")}[stem]
        half = width // 2
        if stem in ("deep_base", "semseg_layer0"):
            half, width = w(64), w(128)
        _conv(out, prefix + names[0], half, 3, 3)
        _bn(out, prefix + names[1], half)
        _conv(out, prefix + names[2], half, half, 3)
        _bn(out, prefix + names[3], half)
        _conv(out, prefix + names[4], width, half, 3)
        _bn(out, prefix + names[5], width)
    block, layers = {18: (_basic, (2, 2, 2, 2)), 50: (_bottleneck, (3, 4, 6, 3)),
                     101: (_bottleneck, (3, 4, 23, 3))}[depth]
    inp = width
    for i, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
        inp = _layer(out, f"{prefix}layer{i + 1}", block, inp, w(planes), blocks, 1 if i == 0 else 2, avg_down)
    return out


def imagenet_resnet(depth: int, stem: str = "7x7", scale: float = 1.0, avg_down: bool = False) -> Shapes:
    out = resnet(depth, stem, scale, avg_down=avg_down)
    out["fc.weight"], out["fc.bias"] = (1000, 512 if depth == 18 else 2048), (1000,)
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


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]  # cfgs["D"]


def vgg16(batch_norm: bool, scale: float = 1.0, timm: bool = False, counters: bool = True) -> Shapes:
    """torchvision's VGG (make_layers: Conv2d(3x3, bias), [BatchNorm2d], ReLU per width, MaxPool2d per 'M';
    classifier = Linear(512*7*7, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout, Linear(4096, 1000)), or
    timm's (the same features; ConvMlp pre_logits.fc1 7x7 / fc2 1x1 convs, head.fc)."""
    w = lambda c: scale_channels(c, scale)  # noqa: E731
    out: Shapes = {}
    index, cin = 0, 3
    for v in VGG16_CFG:
        if v == "M":
            index += 1
            continue
        _conv(out, f"features.{index}", w(v), cin, 3, bias=True)
        if batch_norm:
            _bn(out, f"features.{index + 1}", w(v))
            if not counters:
                del out[f"features.{index + 1}.num_batches_tracked"]
        index, cin = index + (3 if batch_norm else 2), w(v)
    fc = w(4096)
    if timm:
        _conv(out, "pre_logits.fc1", fc, cin, 7, bias=True)
        _conv(out, "pre_logits.fc2", fc, fc, 1, bias=True)
        out["head.fc.weight"], out["head.fc.bias"] = (1000, fc), (1000,)
    else:
        for i, (o, n) in ((0, (fc, cin * 7 * 7)), (3, (fc, fc)), (6, (1000, fc))):
            out[f"classifier.{i}.weight"], out[f"classifier.{i}.bias"] = (o, n), (o,)
    return out


def mmseg_pspnet(depth: int, classes: int, scale: float = 1.0, aux: bool = True, stem: str = "mmseg_deep") -> Shapes:
    """pspnet_r50-d8: ResNetV1c, PSPHead(channels 512, pool_scales 1/2/3/6: psp_modules.K = [AdaptiveAvgPool2d,
    ConvModule 1x1], bottleneck ConvModule 3x3, conv_seg), FCNHead(1024 -> 256) as auxiliary head; pspnet_r50b-d8
    swaps in mmseg's ResNet (stem "7x7": conv1, bn1)."""
    w = lambda c: scale_channels(c, scale)  # noqa: E731
    out = resnet(depth, stem, scale, prefix="backbone.")
    in_ch, ch = w(512) * 4, w(512)
    for k in range(4):
        _conv(out, f"decode_head.psp_modules.{k}.1.conv", ch, in_ch, 1)
        _bn(out, f"decode_head.psp_modules.{k}.1.bn", ch)
    _conv(out, "decode_head.bottleneck.conv", ch, in_ch + 4 * ch, 3)
    _bn(out, "decode_head.bottleneck.bn", ch)
    _conv(out, "decode_head.conv_seg", classes, ch, 1, bias=True)
    if aux:
        _conv(out, "auxiliary_head.convs.0.conv", w(256), w(256) * 4, 3)
        _bn(out, "auxiliary_head.convs.0.bn", w(256))
        _conv(out, "auxiliary_head.conv_seg", classes, w(256), 1, bias=True)
    return out


def semseg_pspnet(depth: int, classes: int, scale: float = 1.0, aux: bool = True) -> Shapes:
    """hszhao/semseg PSPNet: layer0 = (conv1, bn1, relu, conv2, bn2, relu, conv3, bn3, relu, maxpool) of the deep-base
    ResNet, layer1-4, ppm.features.K = (AdaptiveAvgPool2d, Conv2d 1x1 no bias, BatchNorm2d, ReLU), cls = (Conv2d 3x3
    4096 -> 512 no bias, BatchNorm2d, ReLU, Dropout2d, Conv2d 1x1), aux = the same on layer3 (1024 -> 256)."""
    w = lambda c: scale_channels(c, scale)  # noqa: E731
    out = resnet(depth, "semseg_layer0", scale)
    in_ch = w(512) * 4
    for k in range(4):
        _conv(out, f"ppm.features.{k}.1", in_ch // 4, in_ch, 1)
        _bn(out, f"ppm.features.{k}.2", in_ch // 4)
    _conv(out, "cls.0", w(512), in_ch * 2, 3)
    _bn(out, "cls.1", w(512))
    _conv(out, "cls.4", classes, w(512), 1, bias=True)
    if aux:
        _conv(out, "aux.0", w(256), w(256) * 4, 3)
        _bn(out, "aux.1", w(256))
        _conv(out, "aux.4", classes, w(256), 1, bias=True)
    return out


def torchvision_deeplabv3(depth: int, classes: int, scale: float = 1.0, aux: bool = True) -> Shapes:
    """torchvision deeplabv3_resnet50/101: IntermediateLayerGetter(resnet) as backbone (conv1 ... layer4, no fc),
    classifier = DeepLabHead = (ASPP(convs: 1x1 Sequential(conv, BN, ReLU), three ASPPConv(conv, BN, ReLU),
    ASPPPooling(pool, conv, BN, ReLU); project: conv, BN, ReLU, Dropout), Conv2d 3x3, BN, ReLU, Conv2d 1x1),
    aux_classifier = FCNHead(1024, classes) = (Conv2d 3x3 -> 256, BN, ReLU, Dropout, Conv2d 1x1)."""
    w = lambda c: scale_channels(c, scale)  # noqa: E731
    out = resnet(depth, "7x7", scale, prefix="backbone.")
    in_ch, ch = w(512) * 4, w(256)
    p = "classifier.0."
    for i in range(4):
        _conv(out, f"{p}convs.{i}.0", ch, in_ch, 1 if i == 0 else 3)
        _bn(out, f"{p}convs.{i}.1", ch)
    _conv(out, f"{p}convs.4.1", ch, in_ch, 1)
    _bn(out, f"{p}convs.4.2", ch)
    _conv(out, f"{p}project.0", ch, 5 * ch, 1)
    _bn(out, f"{p}project.1", ch)
    _conv(out, "classifier.1", ch, ch, 3)
    _bn(out, "classifier.2", ch)
    _conv(out, "classifier.4", classes, ch, 1, bias=True)
    if aux:
        mid = (w(256) * 4) // 4
        _conv(out, "aux_classifier.0", mid, w(256) * 4, 3)
        _bn(out, "aux_classifier.1", mid)
        _conv(out, "aux_classifier.4", classes, mid, 1, bias=True)
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


# torchvision make_layers index of each conv of cfgs["D"] -> (stage, position) in our stages, counted by hand
VGG16_CONVS = {0: (0, 0), 2: (0, 2), 5: (1, 0), 7: (1, 2), 10: (2, 0), 12: (2, 2), 14: (2, 4), 17: (3, 0), 19: (3, 2),
               21: (3, 4), 24: (4, 0), 26: (4, 2), 28: (4, 4)}  # conv, ReLU per width; a pool after each stage
VGG16_BN_CONVS = {0: (0, 0), 3: (0, 3), 7: (1, 0), 10: (1, 3), 14: (2, 0), 17: (2, 3), 20: (2, 6), 24: (3, 0),
                  27: (3, 3), 30: (3, 6), 34: (4, 0), 37: (4, 3), 40: (4, 6)}  # conv, BN, ReLU; BN at conv + 1


def expect_vgg(source, batch_norm: bool) -> dict[str, str]:
    out = {}
    for k in source:
        parts = k.split(".")
        if parts[0] == "features":
            index = int(parts[1])
            if batch_norm:
                conv = index if index in VGG16_BN_CONVS else index - 1
                stage, position = VGG16_BN_CONVS[conv]
                out[k] = f"encoder.{stage}.{position + index - conv}.{parts[2]}"
            else:
                stage, position = VGG16_CONVS[index]
                out[k] = f"features.{stage}.{position}.{parts[2]}"
        elif not batch_norm and parts[:2] in (["classifier", "0"], ["pre_logits", "fc1"]):
            out[k] = f"fc6.0.{parts[2]}"
        elif not batch_norm and parts[:2] in (["classifier", "3"], ["pre_logits", "fc2"]):
            out[k] = f"fc7.0.{parts[2]}"
    return out


def expect_deep_base(source) -> dict[str, str]:
    """hszhao's conv1-3/bn1-3 (or PSPNet's layer0.0/1/3/4/6/7) -> our stem.0/1/3/4/6/7; layers as named."""
    stem = {"conv1.": "stem.0.", "bn1.": "stem.1.", "conv2.": "stem.3.", "bn2.": "stem.4.", "conv3.": "stem.6.",
            "bn3.": "stem.7."} | {f"layer0.{i}.": f"stem.{i}." for i in (0, 1, 3, 4, 6, 7)}
    out = {}
    for k in source:
        module = next((m for m in stem if k.startswith(m)), None)
        if module:
            out[k] = "backbone." + stem[module] + k[len(module):]
        elif k.startswith(("layer1.", "layer2.", "layer3.", "layer4.")):
            out[k] = "backbone." + k
    return out


def expect_semseg_pspnet(source) -> dict[str, str]:
    out = expect_deep_base(source)
    table = {"cls.0.": "bottleneck.0.", "cls.1.": "bottleneck.1.", "cls.4.": "classifier."}
    table |= {f"ppm.features.{i}.1.": f"ppm.stages.{i}.0." for i in range(4)}
    table |= {f"ppm.features.{i}.2.": f"ppm.stages.{i}.1." for i in range(4)}
    for k in source:
        module = next((m for m in table if k.startswith(m)), None)
        if module:
            out[k] = table[module] + k[len(module):]
    return out


def expect_mmseg_pspnet(source) -> dict[str, str]:
    table = {"bottleneck.conv": "bottleneck.0", "bottleneck.bn": "bottleneck.1", "conv_seg": "classifier"}
    table |= {f"psp_modules.{i}.1.conv": f"ppm.stages.{i}.0" for i in range(4)}
    table |= {f"psp_modules.{i}.1.bn": f"ppm.stages.{i}.1" for i in range(4)}
    out = {}
    for k in source:
        if k.startswith("backbone."):
            out[k] = k
        elif k.startswith("decode_head."):
            module, param = k[len("decode_head."):].rsplit(".", 1)
            out[k] = f"{table[module]}.{param}"
    return out


def expect_torchvision_deeplabv3(source) -> dict[str, str]:
    table = {f"classifier.0.convs.{i}.{j}.": f"aspp.branches.{i}.{j}." for i in range(4) for j in (0, 1)}
    table |= {"classifier.0.convs.4.1.": "aspp.pooling.conv.0.", "classifier.0.convs.4.2.": "aspp.pooling.conv.1.",
              "classifier.0.project.0.": "aspp.project.0.", "classifier.0.project.1.": "aspp.project.1.",
              "classifier.1.": "head.0.", "classifier.2.": "head.1.", "classifier.4.": "classifier."}
    out = {}
    for k in source:
        if k.startswith("backbone."):
            out[k] = k
        elif not k.startswith("aux_classifier."):
            module = next(m for m in table if k.startswith(m))
            out[k] = table[module] + k[len(module):]
    return out


def assert_loaded(model, fresh, source, expected, report, first_conv=None, adapted=None, allowed_left=(),
                  reshaped=()):
    """Every expected tensor is in its place (the first conv as adapted, ``reshaped`` ones viewed as our shape);
    everything else is the model's own initialisation and allowed to be; the report counts exactly the expected
    tensors."""
    state = model.state_dict()
    for src, dst in expected.items():
        want = adapted if dst == first_conv else source[src]
        if dst in reshaped:
            want = want.reshape(state[dst].shape)
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


# --- FCN and SegNet (VGG-16), LinkNet (ResNet-18) ---------------------------------------------------------------

TINY = {"width_multiplier": 0.125}


@pytest.mark.parametrize("timm", [False, True], ids=["torchvision", "timm"])
def test_vgg16_fills_the_fcn_trunk_and_its_fc6_fc7_become_the_convolutions_of_the_fcn_surgery(tmp_path, timm):
    source = filled(vgg16(batch_norm=False, scale=0.125, timm=timm))
    path = _save(tmp_path, source, "vgg16.safetensors" if timm else "vgg16-397923af.pth")
    model, fresh = _model("fcn8s_vgg16", 4, 5, **TINY)
    report = load_pretrained(model, "fcn8s_vgg16", path)
    rgb = source["features.0.weight"]
    reshaped = () if timm else ("fc6.0.weight", "fc7.0.weight")
    assert_loaded(model, fresh, source, expect_vgg(source, False), report, "features.0.0.weight",
                  rgb[:, [0, 1, 2, 0]] * 0.75, ("score_fr.", "score_pool4.", "score_pool3."), reshaped)
    c = report.conversion
    assert c.dropped == ({"head": 2} if timm else {"classifier": 2}) and c.reshaped == reshaped
    assert c.left == {"score_pool4": 2, "score_pool3": 2}
    assert c.classifier == "score_fr not in the file: initialised for 5 classes"
    assert ("Linear weights reshaped into the convolutions fc6.0.weight, fc7.0.weight" in "\n".join(report.lines())) != timm
    # what the reshape means: at the 7x7 map VGG's classifier sees, our 7x7 fc6 computes classifier.0 (flattened
    # channel-major, as torchvision's torch.flatten after avgpool) at the centre
    if not timm:
        x = torch.randn(1, source["classifier.0.weight"].shape[1] // 49, 7, 7)
        linear = torch.nn.functional.linear(x.flatten(1), source["classifier.0.weight"], source["classifier.0.bias"])
        assert torch.allclose(model.fc6[0](x)[0, :, 3, 3], linear[0], atol=1e-3)
    assert model.eval()(torch.randn(1, 4, 64, 64)).shape == (1, 5, 64, 64)


@pytest.mark.parametrize("timm", [False, True], ids=["torchvision-without-counters", "timm"])
def test_vgg16_bn_fills_the_segnet_encoder_and_sums_rgb_for_one_band(tmp_path, timm):
    source = filled(vgg16(batch_norm=True, scale=0.125, timm=timm, counters=timm))
    path = _save(tmp_path, source)
    model, fresh = _model("segnet_vgg16", 1, 3, **TINY)
    report = load_pretrained(model, "segnet_vgg16", path)
    adapted = source["features.0.weight"].sum(dim=1, keepdim=True)
    assert_loaded(model, fresh, source, expect_vgg(source, True), report, "encoder.0.0.weight", adapted,
                  ("decoder.", "classifier.", "encoder."))  # encoder.: counters absent from the 2017 file stay 0
    c = report.conversion
    assert c.dropped == ({"pre_logits": 4, "head": 2} if timm else {"classifier": 6})
    # counters left at 0: the decoder's 12 BatchNorms, and the encoder's 13 where the file has none
    assert c.counters == 12 + (0 if timm else 13) and set(c.left) == {f"decoder.{i}" for i in range(5)}
    assert "summed over its 3 input channels" in c.first_conv and "not in the file" in c.classifier


def test_resnet18_fills_the_linknet_encoder_and_cycles_rgb_over_13_bands(tmp_path):
    source = filled(imagenet_resnet(18, scale=0.125))
    path = _save(tmp_path, source)
    model, fresh = _model("linknet_resnet18", 13, 6, **TINY)
    report = load_pretrained(model, "linknet_resnet18", path)
    rgb = source["conv1.weight"]
    assert_loaded(model, fresh, source, expect_resnet(source), report, "backbone.conv1.weight",
                  rgb[:, [k % 3 for k in range(13)]] * (3 / 13),
                  ("decoder1.", "decoder2.", "decoder3.", "decoder4.", "tp_conv1.", "conv2.", "tp_conv2."))
    c = report.conversion
    assert c.layout.startswith("torchvision / timm ResNet-18") and c.dropped == {"fc": 2}
    assert c.classifier == "tp_conv2 not in the file: initialised for 6 classes"  # transposed: classes are dim 1


# --- PSPNet and DeepLabV3 (ResNet-50/101) -------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "stem", "options"), [
    ("deeplabv3_resnet50", "7x7", {}),
    ("deeplabv3_resnet50", "mmseg_deep", {"stem": "deep"}),
    ("pspnet_resnet50", "7x7", {"stem": "standard"}),
    ("pspnet_resnet50", "timm_deep", {"stem": "deep"}),
    ("pspnet_resnet50", "deep_base", {}),  # hszhao/semseg initmodel/resnet50_v2.pth, PSPNet's default stem
])
def test_imagenet_resnets_fill_the_pspnet_and_deeplabv3_backbones(tmp_path, name, stem, options):
    source = filled(imagenet_resnet(50, stem, scale=0.125))
    path = _save(tmp_path, source)
    model, fresh = _model(name, 3, 4, **options, **TINY)
    report = load_pretrained(model, name, path)
    expected = {"7x7": expect_resnet, "timm_deep": lambda s: expect_resnet(s, "timm_deep"),
                "mmseg_deep": lambda s: {k: f"backbone.{k}" for k in s if not k.startswith("fc.")},
                "deep_base": expect_deep_base}[stem](source)
    head = ("aspp.", "head.", "classifier.") if name.startswith("deeplabv3") else ("ppm.", "bottleneck.", "classifier.")
    assert_loaded(model, fresh, source, expected, report, allowed_left=head)
    assert report.conversion.dropped == {"fc": 2}


@pytest.mark.parametrize("classes", [21, 6])
def test_torchvision_deeplabv3_loads_the_whole_model_and_drops_the_auxiliary_classifier(tmp_path, classes):
    source = filled(torchvision_deeplabv3(50, 21, scale=0.125))
    path = _save(tmp_path, source, "deeplabv3_resnet50_coco-cd0a2569.pth")
    model, fresh = _model("deeplabv3_resnet50", 3, classes, output_stride=8, **TINY)
    report = load_pretrained(model, "deeplabv3_resnet50", path)
    expected = expect_torchvision_deeplabv3(source)
    if classes != 21:
        expected = {s: d for s, d in expected.items() if not d.startswith("classifier.")}
    assert_loaded(model, fresh, source, expected, report, allowed_left=("classifier.",))
    c = report.conversion
    assert c.dropped == {"aux_classifier": 8} and not c.left
    assert ("kept" if classes == 21 else "reinitialised: the file has 21 classes, the model 6") in c.classifier


@pytest.mark.parametrize(("stem", "option"), [("mmseg_deep", "deep"), ("7x7", "standard")], ids=["r50-d8", "r50b-d8"])
def test_mmseg_pspnet_loads_backbone_pyramid_bottleneck_and_classifier(tmp_path, stem, option):
    source = filled(mmseg_pspnet(50, 19, scale=0.125, stem=stem))
    path = _save(tmp_path, source, wrap=_mmseg)
    model, fresh = _model("pspnet_resnet50", 3, 19, stem=option, **TINY)
    report = load_pretrained(model, "pspnet_resnet50", path)
    assert_loaded(model, fresh, source, expect_mmseg_pspnet(source), report)
    assert report.conversion.dropped == {"auxiliary_head": 8} and not report.conversion.left
    assert "kept" in report.conversion.classifier
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 19, 64, 64)


def test_semseg_pspnet_trained_with_dataparallel_loads_into_the_default_pspnet(tmp_path):
    source = filled(semseg_pspnet(50, 21, scale=0.125))
    path = _save(tmp_path, {f"module.{k}": v for k, v in source.items()}, "train_epoch_50.pth",
                 wrap=lambda s: {"epoch": 50, "state_dict": s})  # as semseg's tool/train.py saves
    model, fresh = _model("pspnet_resnet50", 4, 21, **TINY)
    report = load_pretrained(model, "pspnet_resnet50", path)
    rgb = source["layer0.0.weight"]
    assert_loaded(model, fresh, source, expect_semseg_pspnet(source), report, "backbone.stem.0.weight",
                  rgb[:, [0, 1, 2, 0]] * 0.75)
    assert report.conversion.dropped == {"aux": 8} and "kept" in report.conversion.classifier


FULL_SIZE = [
    ("fcn32s_vgg16", {}, lambda: vgg16(False), lambda s: expect_vgg(s, False)),
    ("fcn8s_vgg16", {}, lambda: vgg16(False, timm=True), lambda s: expect_vgg(s, False)),
    ("segnet_vgg16", {}, lambda: vgg16(True), lambda s: expect_vgg(s, True)),
    ("linknet_resnet18", {}, lambda: imagenet_resnet(18), expect_resnet),
    ("deeplabv3_resnet50", {}, lambda: imagenet_resnet(50), expect_resnet),
    ("deeplabv3_resnet101", {}, lambda: torchvision_deeplabv3(101, 21), expect_torchvision_deeplabv3),
    ("pspnet_resnet101", {"stem": "standard"}, lambda: imagenet_resnet(101), expect_resnet),
    ("pspnet_resnet101", {}, lambda: imagenet_resnet(101, "deep_base"), expect_deep_base),
    ("pspnet_resnet50", {}, lambda: semseg_pspnet(50, 21), expect_semseg_pspnet),
    ("pspnet_resnet101", {"stem": "deep"}, lambda: mmseg_pspnet(101, 21), expect_mmseg_pspnet),
]


@pytest.mark.parametrize(("name", "options", "layout", "expected"), FULL_SIZE,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(FULL_SIZE)])
def test_full_size_layouts_of_the_newer_families_map_every_tensor_name_and_shape(name, options, layout, expected):
    source = on_meta(layout())
    with torch.device("meta"):
        target = create_model(name, 3, 21, **options).state_dict()
    conversion = convert_weights(source, name, target, "w.pth")
    mapping = expected(source)
    assert set(conversion.tensors) == set(mapping.values())
    for src, dst in mapping.items():  # fc6/fc7 of torchvision's VGG: the Linear's elements, as the conv's shape
        assert conversion.tensors[dst].shape == target[dst].shape, dst
        assert source[src].numel() == target[dst].numel() and (source[src].shape == target[dst].shape or
                                                                dst in conversion.reshaped), dst


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


def test_weights_of_another_family_stem_or_head_are_refused_in_one_line_for_the_newer_families(tmp_path):
    message = _refusal(tmp_path, vgg16(False, 0.125), "linknet_resnet18", **TINY)
    assert ("VGG-16 (ImageNet) weights fit an FCN model, not linknet_resnet18; use model of fcn16s_vgg16, "
            "fcn32s_vgg16, fcn8s_vgg16 (linknet_resnet18 takes torchvision / timm ResNet-18") in message
    message = _refusal(tmp_path, vgg16(False, 0.125), "segnet_vgg16", **TINY)
    assert "fit an FCN model, not segnet_vgg16" in message and "segnet_vgg16 takes torchvision / timm VGG-16-BN" in message
    message = _refusal(tmp_path, vgg16(True, 0.125), "fcn32s_vgg16", **TINY)
    assert "fit a SegNet model, not fcn32s_vgg16; use model segnet_vgg16" in message
    message = _refusal(tmp_path, imagenet_resnet(50, scale=0.125), "linknet_resnet18", **TINY)
    assert "fit a DeepLabV3+, a DeepLabV3 or a PSPNet model, not linknet_resnet18" in message
    message = _refusal(tmp_path, imagenet_resnet(18, scale=0.125), "deeplabv3_resnet50", **TINY)
    assert "fit a LinkNet model, not deeplabv3_resnet50; use model linknet_resnet18" in message
    message = _refusal(tmp_path, vgg16(False, 0.125), "unet", **TINY)
    assert "no published layout fits unet" in message
    message = _refusal(tmp_path, imagenet_resnet(50, scale=0.125), "pspnet_resnet50", **TINY)
    assert "model options stem: standard" in message  # PSPNet's default is the deep base
    message = _refusal(tmp_path, imagenet_resnet(50, "timm_deep", 0.125), "pspnet_resnet50", **TINY)
    assert "tensor backbone.stem.0.weight has shape (4, 3, 3, 3), pspnet_resnet50 wants (8, 3, 3, 3)" in message
    assert message.endswith("stem differs; build the model with model option stem: deep")
    message = _refusal(tmp_path, imagenet_resnet(50, "deep_base", 0.125), "pspnet_resnet50", stem="standard", **TINY)
    assert "stem: deep_base" in message
    message = _refusal(tmp_path, imagenet_resnet(101, scale=0.125), "deeplabv3_resnet50", **TINY)
    assert message.endswith("use model deeplabv3_resnet101")
    message = _refusal(tmp_path, vgg16(False, 0.125), "fcn8s_vgg16", width_multiplier=0.25)
    assert "tensor features.0.0.weight has shape (8, 3, 3, 3), fcn8s_vgg16 wants (16, 3, 3, 3)" in message
    with torch.device("meta"):  # a Linear that is no reshape of our fc6 is named with the file's shape
        target = create_model("fcn32s_vgg16", 3, 5).state_dict()
    wide = vgg16(False) | {"classifier.0.weight": (4096, 512 * 6 * 6)}
    with pytest.raises(CheckpointError, match=r"tensor fc6\.0\.weight has shape \(4096, 18432\), fcn32s_vgg16 wants "
                                              r"\(4096, 512, 7, 7\)"):
        convert_weights(on_meta(wide), "fcn32s_vgg16", target, "w.pth")


def test_mmseg_deeplabv3_is_refused_for_its_head_naming_the_files_that_fit(tmp_path):
    shapes = resnet(50, "mmseg_deep", 0.125, prefix="backbone.")
    for i, k in enumerate((1, 3, 3, 3)):  # ASPPHead: plain ConvModules, 1x1 then 3x3 atrous
        _conv(shapes, f"decode_head.aspp_modules.{i}.conv", 64, 256, k)
        _bn(shapes, f"decode_head.aspp_modules.{i}.bn", 64)
    message = _refusal(tmp_path, shapes, "deeplabv3_resnet50", wrap=_mmseg, stem="deep", **TINY)
    assert "an mmsegmentation DeepLabV3 (ASPPHead" in message and "torchvision's deeplabv3_resnet50/101" in message


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
