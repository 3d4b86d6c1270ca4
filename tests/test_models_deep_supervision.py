"""U-Net++ deep supervision (Zhou et al. 2018, section 2): three more 1x1 heads, all heads' logits in train mode, the
"accurate mode" (log of the heads' mean softmax) in eval mode, the mean of the heads' losses in training, exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.synthetic import write_synthetic_scene
from pipeline.train import _loss
from schemas.errors import SpecError
from workers.models import build_from_checkpoint, create_model, load_checkpoint, save_checkpoint
from workers.models.registry import scale_channels
from workers.models.unet import _UNET_PLUSPLUS_WIDTHS, UNetPlusPlus

WIDTH = 1 / 8
"""widths 4, 8, 16, 32, 64: a few channels, the graph is what is under test."""
HEADS = ["heads.x0_1", "heads.x0_2", "heads.x0_3", "classifier"]
"""The 1x1 heads of X(0,1) ... X(0,4), in the order train mode stacks them."""

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only wait for each other


def _model(bands: int = 3, classes: int = 4, *, deep_supervision: bool = True, seed: int = 0) -> UNetPlusPlus:
    torch.manual_seed(seed)
    return create_model("unet_plusplus", bands, classes, width_multiplier=WIDTH, deep_supervision=deep_supervision)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _heads_of(model: UNetPlusPlus, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's output and, hooked, each head's own logits."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out)) for n in HEADS]
    try:
        out = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return out, [seen[n] for n in HEADS]


@pytest.mark.parametrize(("width", "bands", "classes"), [(1.0, 3, 19), (1.0, 1, 1), (WIDTH, 4, 7)])
def test_deep_supervision_adds_exactly_three_one_by_one_heads(width: float, bands: int, classes: int):
    with torch.device("meta"):
        plain = create_model("unet_plusplus", bands, classes, width_multiplier=width)
        deep = create_model("unet_plusplus", bands, classes, width_multiplier=width, deep_supervision=True)
    first = scale_channels(_UNET_PLUSPLUS_WIDTHS[0], width)
    assert _count(deep) == _count(plain) + 3 * (first * classes + classes)
    extra = [k for k in deep.state_dict() if k not in plain.state_dict()]
    assert list(plain.state_dict()) == [k for k in deep.state_dict() if k not in extra]  # every other name kept
    assert extra == [f"{h}.{p}" for h in HEADS[:3] for p in ("weight", "bias")]


def test_the_default_is_the_model_without_deep_supervision_bit_for_bit():
    """create_model's default, and an explicit False, are the plain U-Net++ (same names, weights and logits)."""
    widths = [scale_channels(w, WIDTH) for w in _UNET_PLUSPLUS_WIDTHS]
    torch.manual_seed(0)
    reference = UNetPlusPlus(3, 4, widths)
    default = _model(deep_supervision=False)
    torch.manual_seed(0)
    implicit = create_model("unet_plusplus", 3, 4, width_multiplier=WIDTH)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    for model in (default, implicit):
        assert not hasattr(model, "heads")
        assert list(model.state_dict()) == list(reference.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
        for train in (False, True):
            model.train(train)
            reference.train(train)
            torch.manual_seed(2)
            got = model(x)
            torch.manual_seed(2)
            assert torch.equal(got, reference(x)) and got.shape == (2, 4, 64, 96)


def test_train_mode_stacks_the_heads_and_eval_mode_is_the_log_of_their_mean_softmax():
    model = _model(classes=5)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.eval()
        out, heads = _heads_of(model, x)
        expected = torch.log(torch.stack([torch.softmax(h, dim=1) for h in heads]).mean(0))
        assert out.shape == (2, 5, 64, 96) and torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.softmax(out, 1), torch.stack([torch.softmax(h, 1) for h in heads]).mean(0))
        model.train()
        stacked = model(x)
        assert stacked.shape == (4, 2, 5, 64, 96)
        for module in model.modules():  # train mode, but dropout off: the same heads as in eval mode, in order
            if isinstance(module, torch.nn.Dropout):
                module.eval()
        assert torch.equal(model(x), torch.stack(heads))


def test_eval_mode_stays_finite_where_the_heads_are_very_sure():
    """Heads so sure that float32 softmax underflows to 0 (its log is -inf); the log-sum-exp form stays finite."""
    model = _model(classes=3).eval()
    with torch.no_grad():
        for name in HEADS:
            dict(model.named_modules())[name].weight.mul_(1e4)
        out, heads = _heads_of(model, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    naive = torch.log(torch.stack([torch.softmax(h, 1) for h in heads]).mean(0))
    assert not torch.isfinite(naive).all() and torch.isfinite(out).all()
    expected = torch.logsumexp(torch.stack([torch.log_softmax(h.double(), 1) for h in heads]), 0) - np.log(4)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_loss_of_stacked_heads_is_the_mean_of_each_heads_loss():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 2, 5, 32, 48, generator=generator, requires_grad=True)
    target = torch.randint(-1, 5, (2, 32, 48), generator=generator)  # -1: ignored pixels
    loss = _loss(logits, target)
    torch.testing.assert_close(loss, torch.stack([_loss(head, target) for head in logits]).mean())
    assert loss.ndim == 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and all(bool(g.abs().sum() > 0) for g in logits.grad)


def test_a_training_step_reaches_every_head():
    model = _model(classes=4).train()
    _loss(model(torch.randn(2, 3, 64, 64)), torch.randint(0, 4, (2, 64, 64))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(dict(model.named_parameters())[f"{h}.weight"].grad.abs().sum() > 0 for h in HEADS)


@pytest.mark.parametrize("value", ["yes", 1, 0, None, [True]])
def test_a_wrong_deep_supervision_is_one_line(value):
    with pytest.raises(SpecError) as err:
        create_model("unet_plusplus", 3, 2, deep_supervision=value)
    assert len(str(err.value).splitlines()) == 1 and "deep_supervision must be true or false" in str(err.value)


def test_a_job_takes_the_option_and_refuses_a_wrong_value_before_anything_runs(tmp_path):
    from pipeline.run import _check_model_options
    from schemas.job import job_from_dict

    spec = job_from_dict({"scenes": [{"image": str(tmp_path / "a.tif")}], "model": "unet_plusplus", "classes": ["a", "b"],
                          "model_options": {"deep_supervision": True, "width_multiplier": WIDTH}, "out": str(tmp_path)})
    _check_model_options(spec.model, 2, dict(spec.model_options))
    with pytest.raises(SpecError) as err:
        _check_model_options("unet_plusplus", 2, {"deep_supervision": "yes"})
    assert len(str(err.value).splitlines()) == 1 and "deep_supervision" in str(err.value)
    with pytest.raises(SpecError, match="does not take deep_supervision"):  # only U-Net++ has the option
        create_model("unet", 3, 2, deep_supervision=True)


def _checkpoint(tmp_path):
    model = _model(bands=4, classes=5, seed=1)
    ckpt = tmp_path / "deep.safetensors"
    save_checkpoint(ckpt, model, model_name="unet_plusplus",
                    model_kwargs={"width_multiplier": WIDTH, "deep_supervision": True}, bands=[1, 2, 3, 4],
                    class_names=["a", "b", "c", "d", "e"], mean=[0.0] * 4, std=[1.0] * 4)
    return ckpt


@pytest.mark.parametrize("fmt", ["exported", "torchscript", "onnx"])
def test_exports_of_a_deep_supervised_model_give_its_accurate_mode(tmp_path, fmt: str):
    """`satseg export` traces eval mode: the export's logits are the eager model's (N, C, H, W) at another size."""
    from workers.models.export import export_checkpoint

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    ckpt = _checkpoint(tmp_path)
    model = build_from_checkpoint(load_checkpoint(ckpt), "cpu")
    assert model.deep_supervision and not model.training
    result = export_checkpoint(ckpt, fmt, tmp_path / f"deep.{fmt}", tile=64)
    x = torch.randn(3, 4, 96, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    if fmt == "exported":
        got = torch.export.load(str(result.path)).module()(x)
    elif fmt == "torchscript":
        got = torch.jit.load(str(result.path), map_location="cpu")(x)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    assert got.shape == (3, 5, 96, 160)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_satseg_train_with_deep_supervision_saves_a_model_that_predicts_the_accurate_mode(tmp_path, capsys):
    scene = write_synthetic_scene(tmp_path, "small", 192, 160, seed=11, cell=40)
    out = tmp_path / "deep.safetensors"
    base = ["train", "--image", str(scene.image), "--labels", str(scene.labels), "--model", "unet_plusplus",
            "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "64",
            "--val-crops", "2", "--device", "cpu", "--quiet", "--model-options"]
    assert cli_main(base + [json.dumps({"deep_supervision": True, "width_multiplier": WIDTH})]) == 0
    assert "best epoch" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert dict(ckpt.model_kwargs) == {"deep_supervision": True, "width_multiplier": WIDTH}
    assert np.isfinite(ckpt.provenance["final_loss"]) and ckpt.provenance["validation_mean_iou"] is not None
    model = build_from_checkpoint(ckpt, "cpu")
    with torch.no_grad():
        logits = model(torch.randn(1, 4, 64, 64))
    assert logits.shape == (1, len(ckpt.class_names), 64, 64)
    assert cli_main(base + [json.dumps({"deep_supervision": "yes"})]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "deep_supervision must be true or false" in err, err


@pytest.mark.slow
def test_a_deep_supervised_checkpoint_runs_in_a_job(ray_local, odd_scene, tmp_path):
    """Trained with deep supervision, predicted in eval mode: a job gets (N, C, H, W) logits and writes a mask."""
    import zarr

    from pipeline.run import run_job
    from pipeline.train import TrainData, TrainSettings, train_model
    from schemas.job import job_from_dict

    ckpt = tmp_path / "deep.safetensors"
    settings = TrainSettings(epochs=1, steps_per_epoch=2, batch_size=2, crop=64, val_crops=2, seed=0, device="cpu")
    train_model(TrainData([odd_scene.image], [odd_scene.labels]), "unet_plusplus", ckpt, settings,
                model_options={"width_multiplier": WIDTH, "deep_supervision": True}, show_progress=False)
    spec = job_from_dict({"scenes": [{"image": str(odd_scene.image), "labels": str(odd_scene.labels), "name": "odd"}],
                          "checkpoint": str(ckpt), "tile_size": 64, "overlap": 16, "num_actors": 1,
                          "out": str(tmp_path / "out")})
    result = run_job(spec, show_progress=False)
    mask = zarr.open_array(str(result.layout.mask_store("odd")), path="mask", mode="r")[:]
    assert mask.shape == (301, 367) and set(np.unique(mask)) <= {0, 1, 2, 3, 4, 255}
