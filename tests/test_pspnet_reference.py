"""PSPNet's ``reference`` option: a hszhao/semseg checkpoint gives semseg's own logits with ``reference: semseg``.

The reference below is transcribed from hszhao/semseg ``model/resnet.py`` (deep-base Bottleneck ResNet) and
``model/pspnet.py`` (PPM, cls, the dilation surgery on layer3/layer4, ``align_corners=True``), with every width
scaled so the test runs in a second. Its state dict is in semseg's own key layout, so the file goes through the
same loader users' downloads do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from schemas.errors import SpecError
from tests.test_export import _randomise_batch_norm
from workers.models import create_model
from workers.models.pretrained import load_pretrained

SCALE = 8  # every width divided by 8


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class _Bottleneck(nn.Module):  # semseg model/resnet.py
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class _SemsegPSPNet(nn.Module):  # semseg model/pspnet.py, eval mode (no aux), zoom_factor 8, deep base
    def __init__(self, layers=(3, 4, 6, 3), classes=5, bins=(1, 2, 3, 6)):
        super().__init__()
        w = lambda c: c // SCALE  # noqa: E731
        self.inplanes = w(128)
        self.layer0 = nn.Sequential(
            _conv3x3(3, w(64), stride=2), nn.BatchNorm2d(w(64)), nn.ReLU(inplace=True),
            _conv3x3(w(64), w(64)), nn.BatchNorm2d(w(64)), nn.ReLU(inplace=True),
            _conv3x3(w(64), w(128)), nn.BatchNorm2d(w(128)), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.layer1 = self._make_layer(w(64), layers[0])
        self.layer2 = self._make_layer(w(128), layers[1], stride=2)
        self.layer3 = self._make_layer(w(256), layers[2], stride=2)
        self.layer4 = self._make_layer(w(512), layers[3], stride=2)
        for n, m in self.layer3.named_modules():
            if "conv2" in n:
                m.dilation, m.padding, m.stride = (2, 2), (2, 2), (1, 1)
            elif "downsample.0" in n:
                m.stride = (1, 1)
        for n, m in self.layer4.named_modules():
            if "conv2" in n:
                m.dilation, m.padding, m.stride = (4, 4), (4, 4), (1, 1)
            elif "downsample.0" in n:
                m.stride = (1, 1)
        fea_dim = w(2048)
        self.ppm = nn.Module()
        self.ppm.features = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(fea_dim, fea_dim // len(bins), 1, bias=False),
                          nn.BatchNorm2d(fea_dim // len(bins)), nn.ReLU(inplace=True))
            for b in bins
        )
        self.cls = nn.Sequential(
            nn.Conv2d(fea_dim * 2, w(512), kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(w(512)),
            nn.ReLU(inplace=True), nn.Dropout2d(p=0.1), nn.Conv2d(w(512), classes, kernel_size=1),
        )

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [_Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [_Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        h, w = x.shape[-2:]  # semseg asks for (size - 1) % 8 == 0 and gives int((size - 1) / 8 * 8 + 1) = size
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.layer0(x)))))
        x = torch.cat([x] + [F.interpolate(f(x), x.shape[2:], mode="bilinear", align_corners=True)
                             for f in self.ppm.features], 1)
        return F.interpolate(self.cls(x), size=(h, w), mode="bilinear", align_corners=True)


def _reference(seed: int = 0) -> _SemsegPSPNet:
    torch.manual_seed(seed)
    model = _SemsegPSPNet()
    _randomise_batch_norm(model)
    return model.eval()


def test_a_semseg_checkpoint_gives_semsegs_logits_with_reference_semseg(tmp_path):
    reference = _reference()
    path = tmp_path / "train_epoch_50.pth"
    torch.save({"epoch": 50, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
    outs = {}
    for option in ("semseg", "mmseg"):
        ours = create_model("pspnet_resnet50", 3, 5, width_multiplier=1 / SCALE, reference=option).eval()
        report = load_pretrained(ours, "pspnet_resnet50", path)
        assert report.loaded == len(ours.state_dict()), report.lines()
        with torch.no_grad():
            outs[option] = ours(x)
    torch.testing.assert_close(outs["semseg"], expected, rtol=1e-4, atol=1e-4)
    assert (outs["mmseg"] - expected).abs().max() > 1e-2  # the default forward pass is mmsegmentation's, not semseg's


def test_reference_changes_no_parameter_and_an_unknown_one_is_refused():
    shapes = {option: {k: v.shape for k, v in create_model("pspnet_resnet50", 4, 3, width_multiplier=0.25,
                                                            reference=option).state_dict().items()}
              for option in ("mmseg", "semseg")}
    assert shapes["mmseg"] == shapes["semseg"]
    with pytest.raises(SpecError, match="reference must be one of mmseg, semseg, got 'caffe'"):
        create_model("pspnet_resnet50", 3, 2, reference="caffe")


def test_a_job_predicting_with_a_semseg_checkpoint_is_told_the_option_that_gives_its_forward_pass(tmp_path, caplog):
    from workers.models.pretrained import check_pretrained

    path = tmp_path / "train_epoch_50.pth"
    torch.save(_reference().state_dict(), path)
    for options, warned in (({"width_multiplier": 1 / SCALE}, True), ({"width_multiplier": 1 / SCALE, "reference": "semseg"}, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="workers.models.pretrained"):
            check_pretrained(path, "pspnet_resnet50", 3, 5, options)
        said = [r.getMessage() for r in caplog.records if "forward pass" in r.getMessage()]
        assert said == ([f"init: {path} was trained in hszhao/semseg PSPNet's forward pass; model_options reference: semseg "
                         "give it (the masks differ without)"] if warned else []), said
