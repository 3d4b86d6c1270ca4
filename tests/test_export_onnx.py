"""`satseg export --format onnx`: onnxruntime gives PyTorch's logits for every registry model, at batches and tile
sizes other than the traced example, and the model carries what a consumer needs as ONNX metadata_props."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from pipeline.cli import main
from tests.conftest import CLASSES
from tests.test_export import WITHOUT_SATSEG, _randomise_batch_norm
from workers.models import build_from_checkpoint, create_model, list_models, load_checkpoint, model_info, save_checkpoint
from workers.models.export import read_export_metadata

ort = pytest.importorskip("onnxruntime", reason="ONNX export needs pip install 'satseg[onnx]' (in the test extra)")
onnx = pytest.importorskip("onnx", reason="ONNX export needs pip install 'satseg[onnx]' (in the test extra)")

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
"""The promise (README, metadata's onnx_tolerance): max |ONNX - PyTorch| <= TOLERANCE * max(1, max |PyTorch logit|)."""
WIDTHS = {"baseline": 1.0, "hrnet": 0.25, "deeplabv3plus": 0.125, "fcn": 1 / 16, "segnet": 1 / 16, "unet": 1 / 16,
          "unet_plusplus": 1 / 8, "linknet": 0.25, "pspnet": 0.125, "deeplabv3": 0.125}
"""Tiny widths by family: the graph, not the arithmetic, is what an export can get wrong."""
FAST = ["pixel_linear", "hrnet_w18_small_v1", "deeplabv3plus_resnet50", "fcn8s_vgg16", "segnet_vgg16", "unet", "unet_plusplus",
        "linknet_resnet18", "pspnet_resnet50", "deeplabv3_resnet50"]
"""One model per family in `make test`; every other registry model runs in `make test-slow`."""
BANDS = [4, 3, 2, 8]
MEAN, STD = [100.0, 200.0, 300.0, 400.0], [10.0, 20.0, 30.0, 40.0]
EXPORT_TILE = 64
"""Traced on a (2, bands, 64, 64) example; checked on the batches and sizes below."""
SIZES = [(1, 96, 128), (3, 32, 160)]
"""Batch 1 and 3, non-square, and the smallest tile (32): none is the traced example's shape."""

# Runs in a fresh interpreter in which neither satseg nor torch can be imported: onnxruntime and numpy only, as a
# QGIS plugin would. It normalises a raw tile with the model's own metadata and writes the logits: the README's lines.
_CONSUMER_SCRIPT = r"""
import importlib.util, json, os, sys
repo, model_path, raw_path, out_path = sys.argv[1:]
""" + WITHOUT_SATSEG + r"""sys.modules["torch"] = None  # any attempt to import torch fails

import numpy as np
import onnxruntime as ort
tile = np.load(raw_path)  # (bands, H, W), the checkpoint's bands in order, H and W multiples of 32
session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
meta = json.loads(session.get_modelmeta().custom_metadata_map["satseg"])
x = (tile - np.float32(meta["mean"])[:, None, None]) / np.float32(meta["std"])[:, None, None]
logits = session.run(None, {"x": x[None].astype(np.float32)})[0]  # (1, classes, H, W)

np.save(out_path, logits)
assert not {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None} & {"workers", "schemas", "pipeline", "torch"}
print("ok")
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only wait for each other


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (checkpoint, ONNX model written by `satseg export --format onnx`); each model exported once, when asked."""
    root = tmp_path_factory.mktemp("onnx")
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            torch.manual_seed(0)
            width = WIDTHS[model_info(name).family]
            model = create_model(name, len(BANDS), len(CLASSES), width_multiplier=width)
            _randomise_batch_norm(model)
            ckpt = root / f"{name}.safetensors"
            save_checkpoint(
                ckpt, model, model_name=name, model_kwargs={"width_multiplier": width}, bands=BANDS,
                class_names=CLASSES, mean=MEAN, std=STD,
            )
            assert main(["export", str(ckpt), "--format", "onnx", "--tile", str(EXPORT_TILE)]) == 0
            done[name] = ckpt, ckpt.with_suffix(".onnx")
        return done[name]

    return get


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _assert_logits_agree(got: np.ndarray, expected: torch.Tensor) -> None:
    """Within TOLERANCE of the logit scale; the argmax masks equal except where PyTorch's top two logits tie."""
    expected_np = expected.numpy()
    assert got.shape == expected_np.shape
    tolerance = TOLERANCE * max(1.0, float(np.abs(expected_np).max()))
    worst = float(np.abs(got - expected_np).max())
    assert worst <= tolerance, f"max |ONNX - PyTorch| {worst:.3g} > {tolerance:.3g}"
    top2 = torch.topk(expected, 2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]).numpy() > 2 * tolerance
    assert clear.mean() > 0.9  # the ties excused below are rare
    assert np.array_equal(got.argmax(1)[clear], expected_np.argmax(1)[clear])


def test_every_family_has_a_model_in_the_fast_suite():
    assert {model_info(name).family for name in FAST} == {model_info(name).family for name in list_models()}


@pytest.mark.parametrize(
    "name", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in list_models()]
)
def test_onnx_gives_pytorch_logits_at_other_batches_and_sizes(exported, name):
    ckpt, path = exported(name)
    onnx.checker.check_model(str(path), full_check=True)
    model = build_from_checkpoint(load_checkpoint(ckpt))
    session = _session(path)
    generator = torch.Generator().manual_seed(1)
    for batch, height, width in SIZES:
        x = torch.randn(batch, len(BANDS), height, width, generator=generator)
        with torch.no_grad():
            expected = model(x)
        _assert_logits_agree(session.run(None, {"x": x.numpy()})[0], expected)


def test_graph_declares_dynamic_batch_height_and_width(exported):
    model = onnx.load(str(exported("hrnet_w18_small_v1")[1]))
    assert model.opset_import[0].version == read_export_metadata(exported("hrnet_w18_small_v1")[1])["onnx_opset"]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [(v.name, dims(v)) for v in model.graph.input] == [("x", ["batch", len(BANDS), "height", "width"])]
    assert [(v.name, dims(v)) for v in model.graph.output] == [("logits", ["batch", len(CLASSES), "height", "width"])]


def test_metadata_props_carry_what_a_consumer_needs(exported):
    ckpt, path = exported("hrnet_w18_small_v1")
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    whole = json.loads(props["satseg"])
    assert whole == read_export_metadata(path) == json.loads(Path(f"{path}.json").read_text())
    assert whole["format"] == "onnx" and whole["model"] == "hrnet_w18_small_v1"
    assert whole["bands"] == BANDS and whole["class_names"] == CLASSES
    assert whole["mean"] == MEAN and whole["std"] == STD
    assert whole["tile_multiple"] == 32 and whole["min_tile"] == 32
    assert whole["onnx_tolerance"] == TOLERANCE
    assert whole["checkpoint_sha256"] == load_checkpoint(ckpt).sha256
    assert "(x - mean) / std" in whole["input"]
    assert whole["satseg_version"] == pipeline.__version__
    # each field also on its own: strings as they are, anything else as JSON
    assert props["model"] == "hrnet_w18_small_v1" and props["satseg_version"] == pipeline.__version__
    assert json.loads(props["class_names"]) == CLASSES and json.loads(props["mean"]) == MEAN and json.loads(props["std"]) == STD


def test_onnx_runs_with_only_onnxruntime_and_numpy_normalising_by_its_metadata(exported, tmp_path):
    ckpt, path = exported("deeplabv3plus_resnet50")
    raw = (torch.rand(len(BANDS), 64, 96, generator=torch.Generator().manual_seed(2)) * 1000).float()
    np.save(tmp_path / "raw.npy", raw.numpy())
    done = subprocess.run(
        [sys.executable, "-I", "-c", _CONSUMER_SCRIPT, *map(str, (REPO, path, tmp_path / "raw.npy", tmp_path / "out.npy"))],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    normalised = (raw - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        expected = build_from_checkpoint(load_checkpoint(ckpt))(normalised[None])
    _assert_logits_agree(np.load(tmp_path / "out.npy"), expected)


def test_cli_writes_the_model_and_its_metadata_atomically_to_out(exported, tmp_path, capsys):
    ckpt, _ = exported("pixel_linear")
    out = tmp_path / "nested" / "folders" / "linear.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--tile", "64"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"export: {out} (onnx, pixel_linear, 4 bands, 5 classes"), printed
    assert printed.rstrip().endswith(f"metadata: {out}.json"), printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["linear.onnx", "linear.onnx.json"]  # no temporary files
    assert read_export_metadata(out) == json.loads(Path(f"{out}.json").read_text())


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_onnx_packages_are_one_line_naming_the_extra(exported, tmp_path, capsys, monkeypatch, missing):
    ckpt, _ = exported("pixel_linear")
    out = tmp_path / "model.onnx"
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: importing it raises ImportError
    code = main(["export", str(ckpt), "--format", "onnx", "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "pip install 'satseg[onnx]'" in lines[0], lines
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_read_export_metadata_refuses_onnx_files_without_it(tmp_path):
    from schemas.errors import CheckpointError

    bare = tmp_path / "bare.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "bare",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), str(bare))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64)
    for path, fragment in ((bare, "holds no satseg metadata"), (garbage, "cannot read ONNX model")):
        with pytest.raises(CheckpointError, match=fragment):
            read_export_metadata(path)
