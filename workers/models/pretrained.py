"""Published weights into satseg's models: the one owner of "converting published weights to our models".

`satseg train --init FILE` and a job's ``init: FILE`` start a registered model from weights trained elsewhere.
The file is read without running code (``torch.load(weights_only=True)`` for .pth/.pt/.bin, safetensors for
.safetensors), its layout is recognised from its tensor names, the tensors are renamed to our parameter names,
the first convolution is adapted to the band count and the classifier to the class count, and every other
tensor must fit exactly: a file that does not is refused with one line naming it, the layout it looked like
and the fix. Layouts, transcribed from the projects' own sources:

* HRNet ImageNet classifiers: timm ``hrnet_w18_small``, ``hrnet_w18_small_v2``, ``hrnet_w18``, ``hrnet_w32``,
  ``hrnet_w48`` (huggingface/pytorch-image-models, ``timm/models/hrnet.py``, itself copied from
  HRNet/HRNet-Image-Classification ``lib/models/cls_hrnet.py``, so the original ImageNet files load too). Our
  HRNetV2 (``hrnet.py``) has the same module names for stem, ``layer1``, ``transition1-3`` and ``stage2-4``; the
  classification head (``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``) is dropped and
  ``last_layer`` keeps its initialisation. (Their fusion upsamples with nearest neighbours, ours bilinearly as the
  segmentation HRNet does; the parameters are the same.) torchvision has no HRNet.
* HRNet-Semantic-Segmentation (HRNet/HRNet-Semantic-Segmentation ``lib/models/seg_hrnet.py``, whose names
  ``hrnet.py`` follows) and satseg's own checkpoints: our names, a ``model.`` prefix stripped, ``loss.*`` dropped.
* mmsegmentation FCN on HRNetV2 (open-mmlab/mmsegmentation ``configs/_base_/models/fcn_hr18.py``,
  ``mmseg/models/backbones/hrnet.py``, ``mmseg/models/decode_heads/fcn_head.py``; files are
  ``{"meta": ..., "state_dict": ...}``): ``backbone.*`` are our names; ``decode_head.convs.0`` (mmcv
  ``ConvModule``: 1x1 conv without bias, ``bn``) goes to ``last_layer.0``/``last_layer.1``, whose conv bias is set
  to 0 (the same function), and ``decode_head.conv_seg`` to ``last_layer.3``; ``auxiliary_head.*`` is dropped.
* ResNet ImageNet classifiers: torchvision ``resnet50``/``resnet101`` (pytorch/vision
  ``torchvision/models/resnet.py``) and timm's (``timm/models/resnet.py``, same names): ``conv1``, ``bn1``,
  ``layer1-4`` go under ``backbone.`` of our DeepLabV3+ (``deeplab.py``); ``fc`` is dropped; ASPP and decoder keep
  their initialisation.
* ResNet-C deep stem: timm ``resnet50c``/``resnet101c`` (``conv1.0/.1/.3/.4/.6`` and ``bn1``) and mmcv's ImageNet
  ``ResNetV1c`` (``open-mmlab://resnet50_v1c``, named as mmseg's ``ResNetV1c``, which loads it: ``stem.0/1/3/4/6/7``,
  ``layer1-4``) go to ``backbone.stem.*`` of a DeepLabV3+ built with ``stem: deep``. ResNet-D (timm ``resnet50d``: average-pool shortcuts, ``downsample.1/.2``) has no
  counterpart in our model and is refused.
* mmsegmentation DeepLabV3+ (``configs/_base_/models/deeplabv3plus_r50-d8.py``: ``ResNetV1c`` from
  ``mmseg/models/backbones/resnet.py``, ``DepthwiseSeparableASPPHead`` from ``decode_heads/sep_aspp_head.py`` and
  ``aspp_head.py``, mmcv's ``ConvModule``/``DepthwiseSeparableConvModule``): into a DeepLabV3+ built with
  ``stem: deep`` and ``head: separable`` (add ``output_stride: 8``, as the ``-d8`` configs); ``image_pool``,
  ``aspp_modules``, ``bottleneck``, ``c1_bottleneck``, ``sep_bottleneck`` and ``conv_seg`` map one to one (see
  :data:`_MMSEG_SEP_ASPP`); ``auxiliary_head.*`` is dropped.

The newer families (``pspnet.py``, ``deeplabv3.py``, ``linknet.py``, ``fcn.py``, ``segnet.py``) take the layouts
of their backbones, and of whole models where a published one has our layers:

* The ResNet-50/101 ImageNet layouts above (torchvision/timm 7x7 stem; timm ResNet-C and mmcv ``ResNetV1c``)
  also fill the ``backbone.`` of DeepLabV3 and PSPNet, whose ResNet is ``deeplab.py``'s (the same rules; PSPNet
  then needs ``stem: standard`` or ``stem: deep``, DeepLabV3 ``stem: deep`` for ResNet-C).
* hszhao/semseg's deep-base ImageNet ResNet (``initmodel/resnet50_v2.pth``, ``resnet101_v2.pth``; ``model/resnet.py``
  with ``deep_base=True``: ``conv1``/``bn1``, ``conv2``/``bn2``, ``conv3``/``bn3`` of 64, 64 and 128 channels) goes to
  ``backbone.stem.0/1/3/4/6/7`` of a PSPNet with its default ``stem: deep_base``, ``layer1-4`` as above.
* hszhao/semseg PSPNet (``model/pspnet.py``, the reference ``pspnet.py`` follows): ``layer0.0/1/3/4/6/7`` (its
  ``Sequential`` of conv1, bn1, relu, conv2, ...) to ``backbone.stem.*``, ``layer1-4``, ``ppm.features.K.1/.2``
  (conv, BN after the pool) to ``ppm.stages.K.0/.1``, ``cls.0/.1`` to ``bottleneck.0/.1``, ``cls.4`` the
  classifier; ``aux.*`` is dropped.
* mmsegmentation PSPNet (``configs/_base_/models/pspnet_r50-d8.py``: ``ResNetV1c`` and ``PSPHead``,
  ``decode_heads/psp_head.py``): into a PSPNet built with ``stem: deep``; ``decode_head.psp_modules.K.1`` (the
  ``ConvModule`` after the ``AdaptiveAvgPool2d``) to ``ppm.stages.K``, ``bottleneck`` to ``bottleneck``,
  ``conv_seg`` to ``classifier`` (both concatenate the features first, then the bins 1, 2, 3, 6); ``auxiliary_head``
  is dropped. Its ``r50b``/``r101b`` configs (mmseg's ``ResNet``, 7x7 ``conv1``/``bn1``) load with ``stem: standard``.
* torchvision DeepLabV3 (``torchvision/models/segmentation/deeplabv3.py``, ``deeplabv3_resnet50``/``101``, COCO with
  VOC labels): ``backbone.*`` are our names; ``classifier.0`` (``ASPP``: ``convs.0-3``, ``convs.4`` the
  ``ASPPPooling`` whose conv and BN are ``.1``/``.2``, ``project``) to ``aspp.branches.0-3``, ``aspp.pooling.conv``,
  ``aspp.project``; ``classifier.1/.2`` (``DeepLabHead``'s 3x3 conv and BN) to ``head.0/.1``; ``classifier.4`` the
  classifier; ``aux_classifier.*`` is dropped.
* torchvision / timm VGG-16 (``torchvision/models/vgg.py`` ``vgg16``, ``cfgs["D"]`` through ``make_layers``;
  ``timm/models/vgg.py``, the same ``features``): ``features.N`` (conv, ReLU per width, one max pool per stage) to
  ``features.S.J`` of the FCNs (``fcn.py``, whose VGG has no batch norm). torchvision's fc6/fc7, ``classifier.0``
  (Linear 25088 -> 4096) and ``classifier.3`` (4096 -> 4096), become the 7x7 and 1x1 convolutions ``fc6.0`` and
  ``fc7.0`` by reshaping, as the FCN reference does (``surgery.transplant`` in shelhamer/fcn.berkeleyvision.org;
  timm's ``_filter_fn`` does the same reshape, and timm's own files hold ``pre_logits.fc1``/``fc2`` already as
  convolutions); the 1000-class ``classifier.6`` / ``head.fc`` is dropped; ``score_fr`` is the classifier and
  ``score_pool4``/``score_pool3`` keep their initialisation.
* torchvision / timm VGG-16-BN (``vgg16_bn``: conv, BN, ReLU per width) into SegNet's ``encoder.S.J`` (``segnet.py``:
  batch norm after every conv, as the reference); fc6, fc7 and the classifier are dropped (SegNet has none), the
  decoder and classifier keep their initialisation. The FCNs take ``vgg16``, SegNet ``vgg16_bn``; each refuses the
  other.
* torchvision / timm ResNet-18 (``resnet18``: basic blocks, ``conv1``/``bn1``/``conv2``/``bn2``/``downsample.0/.1``)
  into LinkNet's ``backbone.`` (``linknet.py``, torchvision's names); ``fc`` is dropped, the decoder keeps its
  initialisation.

Not loaded: mmsegmentation DeepLabV3 (``deeplabv3_r50-d8``, ``ASPPHead``: 512 channels, image pooling first, a 3x3
bottleneck and no 1x1 projection) has another head than our DeepLabV3 (torchvision's) and is refused naming the files
that fit; ResNet-D likewise. U-Net, U-Net++ and the baseline have no published layout.

Bands (the rule of timm's ``adapt_input_conv``, ``timm/models/_manipulate.py``, generalised to any source
count C): for B bands, B == C keeps the filters; B == 1 sums them over the input channels; otherwise band k takes
input channel k mod C (RGB filters cycled over the bands: R, G, B, R, ...) scaled by C/B, so a uniform image
keeps the scale of its response (exactly when B is a multiple of C). Select bands in the order the weights expect (R, G, B for ImageNet files) first.
Classes: the classifier is kept when the file has as many classes as the model, else it keeps its
initialisation; a line says which.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from schemas.errors import CheckpointError, first_line
from workers.models.registry import list_models, model_info

__all__ = ["Layout", "LAYOUTS", "InitReport", "Conversion", "read_weights", "detect_layout", "convert_weights",
           "load_pretrained", "check_pretrained", "weights_sha256"]

log = logging.getLogger(__name__)

_FIX = "see 'Pretrained weights' in the README for the layouts satseg loads"

_BN = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
_HRNET_BODY = rf"(?:(?:conv[12]\.weight)|(?:bn[12]\.{_BN})|(?:(?:layer1|transition[123]|stage[234])\..+))"
_RESNET_LAYERS = r"(?:layer[1-4]\.\d+\.(?:conv[123]\.weight|bn[123]\.\w+|downsample\.[01]\.\w+))"

# mmseg DepthwiseSeparableASPPHead (decode_head.*) -> our SeparableASPP / separable Decoder (deeplab.py).
# ConvModule = conv + bn (+ act); DepthwiseSeparableConvModule = depthwise_conv + pointwise_conv, each a ConvModule;
# our _separable_conv numbers them 0 (depthwise conv), 1 (bn), 3 (pointwise conv), 4 (bn).
_MMSEG_SEP_ASPP: tuple[tuple[str, str], ...] = (
    (r"image_pool\.1\.conv\.weight", "aspp.pooling.conv.0.weight"),
    (rf"image_pool\.1\.bn\.({_BN})", r"aspp.pooling.conv.1.\1"),
    (r"aspp_modules\.0\.conv\.weight", "aspp.branches.0.0.weight"),
    (rf"aspp_modules\.0\.bn\.({_BN})", r"aspp.branches.0.1.\1"),
    (r"aspp_modules\.([1-9])\.depthwise_conv\.conv\.weight", r"aspp.branches.\1.0.weight"),
    (rf"aspp_modules\.([1-9])\.depthwise_conv\.bn\.({_BN})", r"aspp.branches.\1.1.\2"),
    (r"aspp_modules\.([1-9])\.pointwise_conv\.conv\.weight", r"aspp.branches.\1.3.weight"),
    (rf"aspp_modules\.([1-9])\.pointwise_conv\.bn\.({_BN})", r"aspp.branches.\1.4.\2"),
    (r"bottleneck\.conv\.weight", "aspp.project.0.weight"),
    (rf"bottleneck\.bn\.({_BN})", r"aspp.project.1.\1"),
    (r"c1_bottleneck\.conv\.weight", "decoder.reduce.0.weight"),
    (rf"c1_bottleneck\.bn\.({_BN})", r"decoder.reduce.1.\1"),
    (r"sep_bottleneck\.([01])\.depthwise_conv\.conv\.weight", r"decoder.fuse.\1.0.weight"),
    (rf"sep_bottleneck\.([01])\.depthwise_conv\.bn\.({_BN})", r"decoder.fuse.\1.1.\2"),
    (r"sep_bottleneck\.([01])\.pointwise_conv\.conv\.weight", r"decoder.fuse.\1.3.weight"),
    (rf"sep_bottleneck\.([01])\.pointwise_conv\.bn\.({_BN})", r"decoder.fuse.\1.4.\2"),
    (r"conv_seg\.(weight|bias)", r"decoder.classifier.\1"),
)

# mmseg PSPHead (decode_head.*) -> our PSPNet (pspnet.py): PPM's K-th Sequential is (AdaptiveAvgPool2d, ConvModule).
_MMSEG_PSP: tuple[tuple[str, str], ...] = (
    (r"psp_modules\.(\d)\.1\.conv\.weight", r"ppm.stages.\1.0.weight"),
    (rf"psp_modules\.(\d)\.1\.bn\.({_BN})", r"ppm.stages.\1.1.\2"),
    (r"bottleneck\.conv\.weight", "bottleneck.0.weight"),
    (rf"bottleneck\.bn\.({_BN})", r"bottleneck.1.\1"),
    (r"conv_seg\.(weight|bias)", r"classifier.\1"),
)

# torchvision DeepLabHead (classifier.*) -> our DeepLabV3 (deeplabv3.py): ASPP, then 3x3 conv, BN, ReLU, classifier.
_TORCHVISION_DEEPLAB_HEAD: tuple[tuple[str, str], ...] = (
    (r"0\.convs\.([0-3])\.0\.weight", r"aspp.branches.\1.0.weight"),  # convs 0-3: conv, BN, ReLU
    (rf"0\.convs\.([0-3])\.1\.({_BN})", r"aspp.branches.\1.1.\2"),
    (r"0\.convs\.4\.1\.weight", "aspp.pooling.conv.0.weight"),  # ASPPPooling: AdaptiveAvgPool2d, conv, BN, ReLU
    (rf"0\.convs\.4\.2\.({_BN})", r"aspp.pooling.conv.1.\1"),
    (r"0\.project\.0\.weight", "aspp.project.0.weight"),
    (rf"0\.project\.1\.({_BN})", r"aspp.project.1.\1"),
    (r"1\.weight", "head.0.weight"),
    (rf"2\.({_BN})", r"head.1.\1"),
    (r"4\.(weight|bias)", r"classifier.\1"),
)

_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
"""torchvision's ``cfgs["D"]`` (timm's ``cfgs["vgg16"]``): 3x3 conv widths; "M" a 2x2 max pool."""


def _vgg_rules(batch_norm: bool, ours: str) -> tuple[tuple[str, str], ...]:
    """torchvision's ``make_layers`` numbering (``features.N``: conv, [BN,] ReLU per width, one MaxPool per "M") to
    our stages (``{ours}.S.J``: ``vgg_stage`` numbers conv, [BN,] ReLU alike within a stage; pools are no modules)."""
    rules: list[tuple[str, str]] = []
    index = stage = position = 0
    step = 3 if batch_norm else 2
    for width in _VGG16_CFG:
        if width == "M":
            index, stage, position = index + 1, stage + 1, 0
            continue
        rules.append((rf"features\.{index}\.(weight|bias)", rf"{ours}.{stage}.{position}.\1"))
        if batch_norm:
            rules.append((rf"features\.{index + 1}\.({_BN})", rf"{ours}.{stage}.{position + 1}.\1"))
        index, position = index + step, position + step
    return tuple(rules)


DROP = None
"""A rule's target meaning: a tensor this layout holds that no satseg model has (a classification head, say)."""


@dataclass(frozen=True)
class Layout:
    """One published key layout: how to recognise it and how its tensor names become ours.

    ``rules`` are (pattern, target) pairs tried in order on each whole key; a target of :data:`DROP` names a
    known part that is dropped (``dropped`` says what it is). A key no rule matches is not of this layout.
    """

    name: str
    families: tuple[str, ...]  # the registry families its tensors fit (our names are the same in each)
    rules: tuple[tuple[str, str | None], ...]
    marker: Callable[[set[str]], bool] = field(repr=False)
    dropped: str = ""  # what its dropped parts are, for the report
    zero_bias: tuple[str, ...] = ()  # our conv biases the source has no counterpart for (conv without bias, then BN)
    linear_to_conv: tuple[str, ...] = ()  # our conv weights the source holds as Linear weights (same values, reshaped)
    forward: tuple[tuple[str, object], ...] = ()  # model options whose forward pass is the one the file was trained in

    def rename(self, key: str) -> tuple[bool, str | None]:
        """(known, our name): our name, or None when the key is a dropped part; (False, None) when unknown."""
        for pattern, target in self.rules:
            match = re.fullmatch(pattern, key)
            if match:
                return True, None if target is DROP else match.expand(target)
        return False, None


def _has(*names: str, without: tuple[str, ...] = ()) -> Callable[[set[str]], bool]:
    return lambda keys: all(n in keys for n in names) and not any(n in keys for n in without)


def _prefixed(rules: tuple[tuple[str, str | None], ...], prefix: str) -> tuple[tuple[str, str | None], ...]:
    return tuple((re.escape(prefix) + p, t) for p, t in rules)


_RESNET_FC = (r"fc\.(?:weight|bias)", DROP)
_RESNET_BODY = ((rf"({_RESNET_LAYERS})", r"backbone.\1"),)
_MMSEG_BACKBONE = (
    (r"auxiliary_head\..+", DROP),
    (r"backbone\.(stem\.[013467]\.\w+|conv1\.weight|bn1\.\w+)", r"backbone.\1"),
    (rf"backbone\.({_RESNET_LAYERS})", r"backbone.\1"),
)
_RESNETS = ("deeplabv3plus", "deeplabv3", "pspnet")
"""The families whose backbone is ``deeplab.py``'s ResNet-50/101 (torchvision names under ``backbone.``)."""

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "satseg / HRNet-Semantic-Segmentation HRNetV2", ("hrnet",),
        ((r"loss\..+", DROP), (rf"({_HRNET_BODY})", r"\1"), (r"(last_layer\.[03]\.(?:weight|bias)|last_layer\.1\.\w+)", r"\1")),
        _has("last_layer.3.weight", "conv1.weight"), dropped="the training loss",
    ),
    Layout(
        "mmsegmentation FCN-HRNetV2", ("hrnet",),
        ((r"auxiliary_head\..+", DROP), (rf"backbone\.({_HRNET_BODY})", r"\1"),
         (r"decode_head\.convs\.0\.conv\.weight", "last_layer.0.weight"),
         (rf"decode_head\.convs\.0\.bn\.({_BN})", r"last_layer.1.\1"),
         (r"decode_head\.conv_seg\.(weight|bias)", r"last_layer.3.\1")),
        _has("backbone.conv1.weight", "backbone.transition1.0.0.weight"), dropped="the auxiliary head",
        zero_bias=("last_layer.0.bias",),
    ),
    Layout(
        "timm / HRNet-Image-Classification HRNet (ImageNet)", ("hrnet",),
        ((r"(?:incre_modules|downsamp_modules|final_layer|classifier)\..+", DROP), (rf"({_HRNET_BODY})", r"\1")),
        _has("conv1.weight", "transition1.0.0.weight"), dropped="the ImageNet classification head",
    ),
    Layout(
        "satseg DeepLabV3+", ("deeplabv3plus",),
        ((r"((?:backbone|aspp|decoder)\..+)", r"\1"),),
        lambda keys: "decoder.classifier.weight" in keys or "aspp.project.0.weight" in keys,
    ),
    Layout(
        "torchvision DeepLabV3 (COCO with VOC labels)", ("deeplabv3",),
        ((r"aux_classifier\..+", DROP), (r"backbone\.(conv1\.weight|bn1\.\w+)", r"backbone.\1"),
         (rf"backbone\.({_RESNET_LAYERS})", r"backbone.\1"))
        + _prefixed(_TORCHVISION_DEEPLAB_HEAD, "classifier."),
        _has("backbone.layer1.0.conv1.weight", "classifier.0.project.0.weight"), dropped="the auxiliary classifier",
    ),
    Layout(
        "mmsegmentation PSPNet (ResNetV1c, PSPHead)", ("pspnet",),
        _MMSEG_BACKBONE + _prefixed(_MMSEG_PSP, "decode_head."),
        _has("backbone.layer1.0.conv1.weight", "decode_head.psp_modules.0.1.conv.weight"),
        dropped="the auxiliary head",
    ),
    Layout(
        "hszhao/semseg PSPNet", ("pspnet",),
        ((r"aux\..+", DROP), (r"layer0\.([013467])\.(\w+)", r"backbone.stem.\1.\2"))
        + _RESNET_BODY
        + ((r"ppm\.features\.(\d)\.1\.weight", r"ppm.stages.\1.0.weight"),
           (rf"ppm\.features\.(\d)\.2\.({_BN})", r"ppm.stages.\1.1.\2"),
           (r"cls\.0\.weight", "bottleneck.0.weight"), (rf"cls\.1\.({_BN})", r"bottleneck.1.\1"),
           (r"cls\.4\.(weight|bias)", r"classifier.\1")),
        _has("layer0.0.weight", "ppm.features.0.1.weight"), dropped="the auxiliary head",
        forward=(("reference", "semseg"),),
    ),
    Layout(
        "mmsegmentation DeepLabV3+ (ResNetV1c, DepthwiseSeparableASPPHead)", ("deeplabv3plus",),
        ((r"head\.fc\.(?:weight|bias)", DROP),) + _MMSEG_BACKBONE + _prefixed(_MMSEG_SEP_ASPP, "decode_head."),
        _has("backbone.layer1.0.conv1.weight"), dropped="the auxiliary head (or mmpretrain's ImageNet head.fc)",
    ),
    Layout(
        "hszhao/semseg deep-base ResNet (ImageNet)", ("pspnet",),
        (_RESNET_FC, (r"conv1\.weight", "backbone.stem.0.weight"), (r"bn1\.(\w+)", r"backbone.stem.1.\1"),
         (r"conv2\.weight", "backbone.stem.3.weight"), (r"bn2\.(\w+)", r"backbone.stem.4.\1"),
         (r"conv3\.weight", "backbone.stem.6.weight"), (r"bn3\.(\w+)", r"backbone.stem.7.\1"))
        + _RESNET_BODY,
        _has("conv1.weight", "conv3.weight", "layer1.0.conv1.weight"), dropped="the ImageNet classifier",
    ),
    Layout(
        "torchvision / timm ResNet (ImageNet)", _RESNETS,
        (_RESNET_FC, (r"(conv1\.weight|bn1\.\w+)", r"backbone.\1")) + _RESNET_BODY,
        _has("conv1.weight", "layer1.0.conv3.weight"), dropped="the ImageNet classifier",
    ),
    Layout(
        "torchvision / timm ResNet-18 (ImageNet, basic blocks)", ("linknet",),
        (_RESNET_FC, (r"(conv1\.weight|bn1\.\w+)", r"backbone.\1")) + _RESNET_BODY,
        _has("conv1.weight", "layer1.0.conv1.weight", without=("layer1.0.conv3.weight",)),
        dropped="the ImageNet classifier",
    ),
    Layout(
        "timm ResNet-C deep stem (resnet50c, ImageNet)", _RESNETS,
        (_RESNET_FC, (r"conv1\.([01346])\.(\w+)", r"backbone.stem.\1.\2"), (r"bn1\.(\w+)", r"backbone.stem.7.\1"))
        + _RESNET_BODY,
        _has("conv1.0.weight", "layer1.0.conv1.weight"), dropped="the ImageNet classifier",
    ),
    Layout(
        "mmcv ResNetV1c (open-mmlab://resnet50_v1c, ImageNet)", _RESNETS,
        (_RESNET_FC, (r"(stem\.[013467]\.\w+)", r"backbone.\1")) + _RESNET_BODY,
        _has("stem.0.weight", "layer1.0.conv1.weight"), dropped="the ImageNet classifier",
    ),
    Layout(
        "torchvision / timm VGG-16 (ImageNet)", ("fcn",),
        _vgg_rules(False, "features")
        + ((r"(?:classifier\.0|pre_logits\.fc1)\.(weight|bias)", r"fc6.0.\1"),
           (r"(?:classifier\.3|pre_logits\.fc2)\.(weight|bias)", r"fc7.0.\1"),
           (r"(?:classifier\.6|head\.fc)\.(?:weight|bias)", DROP)),
        _has("features.0.weight", "features.2.weight"), dropped="the 1000-class ImageNet classifier",
        linear_to_conv=("fc6.0.weight", "fc7.0.weight"),
    ),
    Layout(
        "torchvision / timm VGG-16-BN (ImageNet)", ("segnet",),
        _vgg_rules(True, "encoder") + ((r"(?:classifier\.[036]|pre_logits\.fc[12]|head\.fc)\.(?:weight|bias)", DROP),),
        _has("features.0.weight", "features.1.running_var"),
        dropped="the ImageNet classifier with its fc6/fc7, which SegNet has not",
    ),
)
"""Known layouts, most specific first: the first whose marker matches a file is its layout."""

_REFUSED: tuple[tuple[str, str], ...] = (
    (r"(?:backbone\.)?layer\d\.\d+\.downsample\.2\.\w+",
     "a ResNet-D (average-pool shortcuts, e.g. timm resnet50d), which satseg's ResNets do not have; use torchvision "
     "or timm resnet50/resnet101, or timm resnet50c (with model option stem: deep)"),
    (r"decode_head\.aspp_modules\.1\.conv\.weight",
     "an mmsegmentation DeepLabV3 (ASPPHead: 512 channels, a 3x3 bottleneck, no 1x1 projection), a head satseg's "
     "DeepLabV3 (torchvision's) does not have; use torchvision's deeplabv3_resnet50/101 weights, mmseg's ImageNet "
     "ResNetV1c (model option stem: deep), or an mmseg DeepLabV3+ or PSPNet file with their models"),
)
"""Published layouts recognised but not loaded: (a key pattern that identifies them, why and what to use)."""

_FAMILY_NAMES = {"hrnet": "an HRNetV2", "deeplabv3plus": "a DeepLabV3+", "deeplabv3": "a DeepLabV3",
                 "pspnet": "a PSPNet", "linknet": "a LinkNet", "fcn": "an FCN", "segnet": "a SegNet"}
_RESNET_FIRST_CONV = ("backbone.conv1.weight", "backbone.stem.0.weight")
_FIRST_CONV = {"hrnet": ("conv1.weight",), "deeplabv3plus": _RESNET_FIRST_CONV, "deeplabv3": _RESNET_FIRST_CONV,
               "pspnet": _RESNET_FIRST_CONV, "linknet": ("backbone.conv1.weight",), "fcn": ("features.0.0.weight",),
               "segnet": ("encoder.0.0.weight",)}
_CLASSIFIER = {"hrnet": "last_layer.3", "deeplabv3plus": "decoder.classifier", "deeplabv3": "classifier",
               "pspnet": "classifier", "linknet": "tp_conv2", "fcn": "score_fr", "segnet": "classifier"}
_HEAD = {"hrnet": ("last_layer.",), "deeplabv3plus": ("aspp.", "decoder."), "deeplabv3": ("aspp.", "head."),
         "pspnet": ("ppm.", "bottleneck."),
         "linknet": ("decoder1.", "decoder2.", "decoder3.", "decoder4.", "tp_conv1.", "conv2."),
         "fcn": ("score_pool4.", "score_pool3."), "segnet": ("decoder.",)}
"""Our parameters outside the backbone: a backbone-only file leaves them at their initialisation."""


@dataclass(frozen=True)
class Conversion:
    """A file's tensors under our names, ready to load, and what happened to everything else."""

    layout: str
    tensors: dict[str, torch.Tensor] = field(repr=False)
    first_conv: str | None  # the adaptation line, when the band count differed
    classifier: str  # kept, reinitialised or not in the file
    dropped: dict[str, int]  # the file's part -> tensors not loaded
    dropped_note: str  # what those parts are, in a few words
    left: dict[str, int]  # our part left at initialisation -> tensors (the classifier: see ``classifier``)
    zero_filled: tuple[str, ...] = ()
    counters: int = 0  # BatchNorm num_batches_tracked counters absent from the file (left at 0)
    reshaped: tuple[str, ...] = ()  # our convolutions the file holds as Linear weights (reshaped)
    forward: tuple[tuple[str, object], ...] = ()  # the layout's model options for its own forward pass


@dataclass(frozen=True)
class InitReport:
    """What :func:`load_pretrained` did; :meth:`lines` says it to the user."""

    path: str
    sha256: str
    conversion: Conversion
    loaded: int

    def lines(self) -> list[str]:
        c = self.conversion
        out = [f"init: {self.path} (sha256 {self.sha256[:12]}): {c.layout} layout, {self.loaded} tensors loaded"]
        if c.first_conv:
            out.append(f"init: {c.first_conv}")
        out.append(f"init: classifier {c.classifier}")
        if c.dropped:
            out.append(f"init: dropped from the file ({c.dropped_note}): {_parts(c.dropped)}")
        if c.left:
            out.append(f"init: left at initialisation (not in the file): {_parts(c.left)}")
        if c.zero_filled:
            out.append(f"init: set to 0 (the file's conv has no bias before its BatchNorm): {', '.join(c.zero_filled)}")
        if c.counters:
            out.append(f"init: {c.counters} BatchNorm num_batches_tracked counters not in the file, left at 0")
        if c.reshaped:
            out.append(f"init: Linear weights reshaped into the convolutions {', '.join(c.reshaped)} (as FCN's surgery)")
        return out

    def provenance(self) -> dict:
        """The JSON a checkpoint's provenance records about where training started."""
        c = self.conversion
        return {"path": self.path, "sha256": self.sha256, "layout": c.layout, "tensors_loaded": self.loaded,
                "classifier": c.classifier, "first_conv": c.first_conv, "dropped": c.dropped, "left": c.left}


def _parts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{part} ({n} tensors)" for part, n in counts.items())


def _part(key: str) -> str:
    return ".".join(key.split(".")[:2]) if key.split(".")[0] in ("backbone", "decode_head", "model") else key.split(".")[0]


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (a state dict, or mmseg/mmcv/timm's ``{"state_dict": ...}``), on the CPU.

    Never runs code: safetensors, or ``torch.load(weights_only=True)``, which refuses pickled Python objects.
    ``module.`` (DataParallel) and ``model.`` (HRNet-Semantic-Segmentation) prefixes are stripped.
    """
    location = _existing(path)
    if location.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: object = load_file(location)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{location}: not a readable safetensors file ({first_line(exc)}); pass the weights file itself"
            ) from None
    else:
        try:
            loaded = torch.load(location, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            raise CheckpointError(
                f"{location}: holds pickled Python objects besides tensors ({found.group(1) if found else 'not a tensor'}), "
                "which satseg does not unpickle; where you trust the file, keep its tensors: python -c \"import torch; "
                "c = torch.load('IN.pth', weights_only=False); torch.save(c.get('state_dict', c), 'OUT.pth')\""
            ) from None
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(
                f"{location}: not a readable PyTorch file ({first_line(exc)[:160]}); pass a .pth, .pt or .safetensors file"
            ) from None
    state = _state_dict(loaded)
    if not state:
        raise CheckpointError(f"{location}: holds no tensors; pass a state dict or an mmseg/timm checkpoint")
    for prefix in ("module.", "model."):
        own = [k for k in state if not k.startswith("loss.")]
        if own and all(k.startswith(prefix) for k in own):
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def _state_dict(loaded: object) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = loaded.get(wrapper)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                loaded = inner
                break
        return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    return {}


def detect_layout(state: Mapping[str, torch.Tensor], where: str) -> Layout:
    """The layout of a file's tensors; CheckpointError naming the closest layout when none fits every tensor."""
    keys = set(state)
    for pattern, why in _REFUSED:
        if any(re.fullmatch(pattern, k) for k in keys):
            raise CheckpointError(f"{where}: {why}")
    for layout in LAYOUTS:
        if layout.marker(keys):
            unknown = sorted(k for k in keys if not layout.rename(k)[0])
            if not unknown:
                return layout
            raise CheckpointError(
                f"{where}: looks like {layout.name} but {len(unknown)} of its {len(keys)} tensors are not of that "
                f"layout (first {unknown[0]}); {_FIX}"
            )
    scores = [(sum(layout.rename(k)[0] for k in keys), layout) for layout in LAYOUTS]
    best, closest = max(scores, key=lambda s: s[0])
    sample = ", ".join(sorted(keys)[:3])
    like = f"closest: {closest.name}, {best} of {len(keys)} tensors" if best else "no tensor of a known layout"
    raise CheckpointError(f"{where}: an unknown weights layout ({like}; first keys {sample}); {_FIX}")


def convert_weights(
    state: Mapping[str, torch.Tensor], model_name: str, target: Mapping[str, torch.Tensor], where: str
) -> Conversion:
    """``state`` under our names for ``model_name`` (whose state dict, or its shapes, is ``target``), adapted.

    Pure: reads only shapes from ``target``, so a model on the meta device checks a file without weights.
    """
    family = model_info(model_name).family
    layout = detect_layout(state, where)
    if family not in layout.families:
        raise CheckpointError(f"{where}: {_wrong_family(layout, state, model_name, family)}")
    tensors, dropped = _renamed(layout, state)
    reshaped = _linear_to_conv(tensors, target, layout)
    _check_structure(tensors, target, where, model_name, layout, family)
    first_conv = _adapt_first_conv(tensors, target, family)
    classifier = _fit_classifier(tensors, target, family)
    wrong = [k for k, tensor in tensors.items() if tuple(tensor.shape) != tuple(target[k].shape)]
    if wrong:
        key = wrong[0]
        guess = _variant(family, tensors)
        stem = _stem_option(tensors)
        if stem and all(re.fullmatch(r"backbone\.(?:stem\..+|layer1\.0\.(?:conv1|downsample\.0)\.weight)", k)
                        for k in wrong):
            fix = f"the file's stem differs; build the model with model option stem: {stem}"
        elif family == "deeplabv3plus" and key.startswith(_HEAD[family]) and guess == model_name:
            fix = "the file's head differs; set model option head (standard or separable) as the file's"
        else:
            fix = (f"the file holds {guess or 'another variant'}; use model {guess or 'matching the file'} "
                   "(published weights fit width_multiplier 1 only)")
        raise CheckpointError(
            f"{where}: {layout.name} tensor {key} has shape {tuple(_file_shape(layout, state, key, tensors))}, "
            f"{model_name} wants {tuple(target[key].shape)}: {fix}"
        )
    zero = tuple(k for k in layout.zero_bias if k in target and k not in tensors and _zero_fits(k, tensors))
    for key in zero:
        tensors[key] = torch.zeros(target[key].shape, dtype=target[key].dtype)
    missing = [k for k in target if k not in tensors]
    counters = [k for k in missing if k.endswith(".num_batches_tracked")]
    left = [k for k in missing if not k.endswith(".num_batches_tracked")]
    inside = [k for k in left if not k.startswith(_HEAD[family]) and not k.startswith(_CLASSIFIER[family] + ".")]
    if inside:
        raise CheckpointError(
            f"{where}: {layout.name} file lacks {len(inside)} backbone tensors of {model_name} (first {inside[0]}); "
            "pass a complete file of the same variant"
        )
    return Conversion(
        layout=layout.name, tensors=tensors, first_conv=first_conv, classifier=classifier,
        dropped=dict(Counter(_part(k) for k in dropped)), dropped_note=layout.dropped,
        left=dict(Counter(_our_part(k) for k in left if not k.startswith(_CLASSIFIER[family] + "."))),
        zero_filled=zero, counters=len(counters), reshaped=reshaped, forward=layout.forward,
    )


def _file_shape(
    layout: Layout, state: Mapping[str, torch.Tensor], key: str, tensors: Mapping[str, torch.Tensor]
) -> torch.Size:
    """The shape the file gives our ``key``: a reshaped Linear weight is named by its shape in the file."""
    if key in layout.linear_to_conv:
        source = next((k for k in state if layout.rename(k)[1] == key), None)
        if source is not None:
            return state[source].shape
    return tensors[key].shape


def _wrong_family(layout: Layout, state: Mapping[str, torch.Tensor], model_name: str, family: str) -> str:
    """The refusal of weights whose layout fits other families than the model's: which models take it, and what
    the model takes."""
    renamed = _renamed(layout, state)[0]
    guesses = [g for f in layout.families if (g := _variant(f, renamed))]
    use = " or ".join(guesses) if guesses else "of " + ", ".join(
        m for m in list_models() if model_info(m).family in layout.families)
    names = [_FAMILY_NAMES.get(f, f) for f in layout.families]
    fits = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    takes = [other.name for other in LAYOUTS if family in other.families]
    takes_line = (f"{model_name} takes {'; '.join(takes)}" if takes
                  else f"no published layout fits {model_name}, which trains from scratch")
    return f"{layout.name} weights fit {fits} model, not {model_name}; use model {use} ({takes_line})"


def _linear_to_conv(tensors: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], layout: Layout) -> tuple[str, ...]:
    """Linear weights (out, in) that are our convolutions (out, c, k, k) with in = c*k*k, reshaped in place.

    torchvision's VGG flattens the pooled (512, 7, 7) map channel-major before ``classifier.0``, so row o viewed as
    (512, 7, 7) is the 7x7 filter of output o: what the FCN reference's ``surgery.transplant`` copies flat.
    """
    done = []
    for key in layout.linear_to_conv:
        tensor, want = tensors.get(key), target.get(key)
        if tensor is None or want is None or tensor.dim() != 2 or len(want.shape) != 4:
            continue
        if tensor.shape[0] == want.shape[0] and tensor.numel() == want.shape.numel():
            tensors[key] = tensor.reshape(want.shape)
            done.append(key)
    return tuple(done)


def _stem_option(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The ``stem`` model option that builds the file's stem: standard (7x7), deep (ResNet-C) or deep_base (PSPNet)."""
    if "backbone.conv1.weight" in tensors:
        return "standard"
    last, planes = tensors.get("backbone.stem.6.weight"), tensors.get("backbone.layer1.0.conv1.weight")
    if last is None or planes is None:
        return None
    # ResNet-C's stem ends as wide as layer1's planes (64), PSPNet's deep base twice as wide (128)
    return {1: "deep", 2: "deep_base"}.get(last.shape[0] // max(1, planes.shape[0]))


def _zero_fits(bias_key: str, tensors: Mapping[str, torch.Tensor]) -> bool:
    """A zero bias stands for the missing one only when its conv's weight came from the file."""
    return bias_key.removesuffix(".bias") + ".weight" in tensors


def _our_part(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] in ("aspp", "decoder") else parts[0]


def _renamed(layout: Layout, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, tensor in state.items():
        _, target = layout.rename(key)
        if target is None:
            dropped.append(key)
        else:
            tensors[target] = tensor
    return tensors, dropped


def _check_structure(
    tensors: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], where: str, model_name: str,
    layout: Layout, family: str,
) -> None:
    """Refuse tensors the model lacks, naming the model option that builds them when there is one."""
    extra = sorted(k for k in tensors if k not in target)
    if not extra:
        return
    fixes = []
    if any(k.startswith("backbone.stem.") for k in extra):
        fixes.append("stem: deep_base (PSPNet's 64, 64, 128 3x3 convs)" if _stem_option(tensors) == "deep_base"
                     else "stem: deep (ResNet-C's three 3x3 convs)")
    if "backbone.conv1.weight" in extra:
        fixes.append("stem: standard (the file has the 7x7 stem)")
    if any(re.match(r"(aspp\.branches\.[1-9]\.3|decoder\.fuse\.\d\.3)\.", k) for k in extra):
        fixes.append("head: separable (mmseg's DepthwiseSeparableASPPHead)")
    fix = (f"build the model with model options {', '.join(fixes)}" if fixes
           else f"use model {_variant(family, tensors) or 'matching the file'}")
    raise CheckpointError(
        f"{where}: {layout.name} file has {len(extra)} tensors {model_name} lacks (first {extra[0]}); {fix}"
    )


def _adapt_first_conv(tensors: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], family: str) -> str | None:
    """Band adaptation (module docstring): keep, sum (1 band), or cycle the input filters scaled by C/B."""
    key = next((k for k in _FIRST_CONV[family] if k in tensors and k in target), None)
    if key is None:
        return None
    weight, want = tensors[key], target[key].shape
    have, bands = weight.shape[1], want[1]
    if have == bands or weight.shape[0] != want[0]:
        return None  # same bands, or another variant: the shape check names it
    source = weight.float()
    if bands == 1:
        adapted = source.sum(dim=1, keepdim=True)
        rule = f"summed over its {have} input channels"
    else:
        adapted = source[:, [k % have for k in range(bands)]] * (have / bands)
        rule = f"input filters cycled over the bands (band k takes channel k mod {have}), scaled by {have}/{bands}"
    tensors[key] = adapted.to(weight.dtype)
    return f"first convolution {key} adapted from {have} to {bands} bands: {rule}"


def _fit_classifier(tensors: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], family: str) -> str:
    prefix = _CLASSIFIER[family]
    weight = tensors.get(f"{prefix}.weight")
    want = target[f"{prefix}.weight"].shape
    # the bias counts the classes of a convolution and of a transposed one (LinkNet's, whose weight is in x out)
    classes = target[f"{prefix}.bias"].shape[0] if f"{prefix}.bias" in target else want[0]
    if weight is None:
        return f"{prefix} not in the file: initialised for {classes} classes"
    if weight.shape[0] == classes and weight.shape[1:] == want[1:]:
        return f"{prefix} kept: the file has {classes} classes, as the model"
    if weight.shape[1:] != want[1:]:
        return f"{prefix} shape differs"  # the shape check names the variant
    for name in ("weight", "bias"):
        tensors.pop(f"{prefix}.{name}", None)
    return f"{prefix} reinitialised: the file has {weight.shape[0]} classes, the model {classes}"


def _variant(family: str, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Our model name, in ``family``, for the variant the (renamed) tensors come from, or None when satseg has none
    (or several: the FCNs differ only in their score layers)."""
    if family == "hrnet":
        branch = tensors.get("transition1.0.0.weight")
        if branch is None:
            return None
        width = branch.shape[0]
        blocks = len({k.split(".")[1] for k in tensors if k.startswith("layer1.")})
        names = {16: "hrnet_w18_small_v1", 32: "hrnet_w32", 48: "hrnet_w48"}
        return ("hrnet_w18_small_v2" if blocks == 2 else "hrnet_w18") if width == 18 else names.get(width)
    if family == "segnet":
        return "segnet_vgg16"
    if family not in _RESNETS + ("linknet",):
        return None
    blocks = [len({k.split(".")[2] for k in tensors if k.startswith(f"backbone.layer{i}.")}) for i in (1, 2, 3, 4)]
    if not any(k.startswith("backbone.layer1.0.conv3.") for k in tensors):
        return "linknet_resnet18" if family == "linknet" and blocks == [2, 2, 2, 2] else None
    depth = {6: 50, 23: 101}.get(blocks[2])
    return f"{family}_resnet{depth}" if depth and family in _RESNETS else None


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """The weights file's SHA-256: what identifies it in job ids, train states and provenance, wherever it lies."""
    from workers.models.checkpoint import file_sha256

    return file_sha256(_existing(path))


def _existing(path: str | os.PathLike[str]) -> str:
    location = os.fspath(path)
    if not os.path.isfile(location):
        raise CheckpointError(f"init weights not found: {location}; pass the path of a .pth, .pt or .safetensors file")
    return location


def load_pretrained(model: nn.Module, model_name: str, path: str | os.PathLike[str]) -> InitReport:
    """Load the weights file at ``path`` into ``model`` (a registered ``model_name``), adapted; say what happened.

    Every tensor of the model comes from the file except what the report lists (a head the file lacks, a
    classifier for another class count); the rest keeps the model's own initialisation.
    """
    location = os.fspath(path)
    state = read_weights(location)
    target = model.state_dict()
    conversion = convert_weights(state, model_name, target, location)
    merged = dict(target)
    for key, tensor in conversion.tensors.items():
        merged[key] = tensor.to(dtype=target[key].dtype)
    model.load_state_dict(merged, strict=True)
    loaded = len(conversion.tensors) - len(conversion.zero_filled)
    report = InitReport(location, weights_sha256(location), conversion, loaded)
    for line in report.lines():
        log.info("%s", line)
    return report


def check_pretrained(path: str | os.PathLike[str], model_name: str, in_channels: int, num_classes: int,
                     options: Mapping[str, object]) -> str:
    """Refuse, in one line, weights that would not load into the model; return the file's SHA-256.

    For the driver of a job, which predicts with them: a head that does not come from the file predicts at random,
    which a warning says. The model is built on the meta device, so no memory goes to its weights.
    """
    from workers.models.registry import create_model

    location = os.fspath(path)
    state = read_weights(location)
    with torch.device("meta"):
        target = create_model(model_name, in_channels, num_classes, **options).state_dict()
    conversion = convert_weights(state, model_name, target, location)
    untrained = list(conversion.left) + ([] if " kept" in conversion.classifier else ["the classifier"])
    if untrained:
        log.warning(
            "init: %s leaves %s of %s at initialisation (classifier %s); masks mean little until it is fine-tuned "
            "with `satseg train --init`", location, ", ".join(untrained), model_name, conversion.classifier,
        )
    other = {k: v for k, v in conversion.forward if options.get(k) != v}
    if other:
        log.warning(
            "init: %s was trained in %s's forward pass; model_options %s give it (the masks differ without)",
            location, conversion.layout, ", ".join(f"{k}: {v}" for k, v in other.items()),
        )
    return weights_sha256(location)
