"""`satseg export`: exports give the eager logits at other sizes, load without satseg, and carry metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from tests.conftest import CLASSES
from workers.models import build_from_checkpoint, create_model, file_sha256, load_checkpoint, save_checkpoint
from workers.models.export import read_export_metadata

REPO = Path(__file__).resolve().parents[1]
MODELS = {"hrnet_w18_small_v1": 0.25, "deeplabv3plus_resnet50": 0.125}
EXPORTS = [("hrnet_w18_small_v1", "exported"), ("deeplabv3plus_resnet50", "exported"), ("deeplabv3plus_resnet50", "torchscript")]
"""Both families as torch.export programs; TorchScript for DeepLab, whose image pooling resizes to the input."""
BANDS = [4, 3, 2, 8]
EXPORT_TILE = 64
CHECK_SHAPE = (2, len(BANDS), 96, 128)
"""Batch 2 and a size other than the export's 64x64 example, so dynamic batch and H, W are exercised."""
OFF_LATTICE = [(80, 96), (96, 100), (32, 64)]
"""Sizes an exported program must refuse: not multiples of 32, or below its 64-pixel minimum."""

# Runs in a fresh interpreter in which satseg cannot be imported: only torch and numpy, one thread. For each
# export it writes the embedded metadata (read with torch's own loader) and the logits on
# input.npy; for .pt2 programs also the logits on wide.npy and which off-lattice sizes were refused.
WITHOUT_SATSEG = r"""
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != repo]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
for package in ("workers", "schemas", "pipeline"):
    assert importlib.util.find_spec(package) is None, f"{package} is importable"
"""
"""Script lines that make satseg unimportable in a fresh interpreter (its checkout ``repo`` and editable install
hidden), as on a machine that has only the export: needs ``importlib.util``, ``os`` and ``sys`` imported."""

_FOREIGN_SCRIPT = r"""
import importlib.util, json, os, sys
repo, root, *artifacts = sys.argv[1:]
""" + WITHOUT_SATSEG + r"""import numpy as np
import torch
torch.set_num_threads(1)
x = torch.from_numpy(np.load(os.path.join(root, "input.npy")))
wide = torch.from_numpy(np.load(os.path.join(root, "wide.npy")))
for artifact in artifacts:
    extra = {"satseg.json": ""}
    if artifact.endswith(".pt2"):
        model = torch.export.load(artifact, extra_files=extra).module()
    else:
        model = torch.jit.load(artifact, map_location="cpu", _extra_files=extra)
    embedded = extra["satseg.json"]
    with open(artifact + ".embedded.json", "w") as stream:
        stream.write(embedded.decode() if isinstance(embedded, bytes) else embedded)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        np.save(artifact + ".logits.npy", model(x).numpy())
        if artifact.endswith(".pt2"):
            np.save(artifact + ".wide.npy", model(wide).numpy())
            refused = []
            for size in %(off_lattice)r:
                try:
                    model(torch.zeros(1, x.shape[1], *size))
                    refused.append(False)
                except Exception:
                    refused.append(True)
            with open(artifact + ".refused.json", "w") as stream:
                json.dump(refused, stream)
assert not {m.split(".")[0] for m in sys.modules} & {"workers", "schemas", "pipeline"}
print("ok")
"""


def _randomise_batch_norm(model: torch.nn.Module) -> None:
    """Non-trivial batch-norm statistics and affine terms, so eval-mode batch norm is not the identity."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only wait for each other


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two tiny checkpoints exported by the CLI (TorchScript to a nested --out); eager logits on the inputs."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    inputs = {"input": torch.randn(*CHECK_SHAPE), "wide": torch.randn(1, len(BANDS), 64, 320)}
    for label, x in inputs.items():
        np.save(root / f"{label}.npy", x.numpy())
    checkpoints, eager, artifacts = {}, {}, {}
    for name, width in MODELS.items():
        model = create_model(name, len(BANDS), len(CLASSES), width_multiplier=width)
        _randomise_batch_norm(model)
        ckpt = checkpoints[name] = root / f"{name}.safetensors"
        save_checkpoint(
            ckpt, model, model_name=name, model_kwargs={"width_multiplier": width}, bands=BANDS, class_names=CLASSES,
            mean=[100.0, 200.0, 300.0, 400.0], std=[10.0, 20.0, 30.0, 40.0], provenance={"test": True},
        )
        rebuilt = build_from_checkpoint(load_checkpoint(ckpt))
        with torch.no_grad():
            eager[name] = {label: rebuilt(x) for label, x in inputs.items()}
    for name, fmt in EXPORTS:
        argv = ["export", str(checkpoints[name]), "--format", fmt, "--tile", str(EXPORT_TILE)]
        if fmt == "exported":
            artifacts[name, fmt] = checkpoints[name].with_suffix(".pt2")
        else:
            artifacts[name, fmt] = root / "nested" / "folders" / f"{name}.pt"
            argv += ["--out", str(artifacts[name, fmt])]
        assert main(argv) == 0
    return root, checkpoints, eager, artifacts


@pytest.fixture(scope="module")
def foreign(exported):
    """Every export loaded and run once in a Python that cannot import satseg; its outputs beside the exports."""
    root, _, _, artifacts = exported
    script = _FOREIGN_SCRIPT % {"off_lattice": OFF_LATTICE}
    done = subprocess.run(
        [sys.executable, "-I", "-c", script, str(REPO), str(root), *map(str, artifacts.values())],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    return {key: lambda what, path=path: Path(f"{path}.{what}") for key, path in artifacts.items()}


@pytest.mark.slow
def test_exports_load_and_run_in_a_python_that_cannot_import_satseg(exported, foreign):
    assert all(foreign[key]("logits.npy").is_file() for key in exported[3])


@pytest.mark.parametrize(("name", "fmt"), EXPORTS)
def test_export_gives_the_eager_logits_on_another_size_and_batch(exported, foreign, name, fmt):
    logits = torch.from_numpy(np.load(foreign[name, fmt]("logits.npy")))
    assert logits.shape == (2, len(CLASSES), 96, 128)
    torch.testing.assert_close(logits, exported[2][name]["input"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_exported_program_takes_batch_one_and_wide_tiles(exported, foreign, name):
    logits = torch.from_numpy(np.load(foreign[name, "exported"]("wide.npy")))
    torch.testing.assert_close(logits, exported[2][name]["wide"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_exported_program_refuses_tiles_off_the_lattice(foreign, name):
    assert json.loads(foreign[name, "exported"]("refused.json").read_text()) == [True] * len(OFF_LATTICE)


@pytest.mark.parametrize(("name", "fmt"), EXPORTS)
def test_metadata_travels_inside_the_export_and_beside_it(exported, foreign, name, fmt):
    _, checkpoints, _, artifacts = exported
    ckpt, artifact = checkpoints[name], artifacts[name, fmt]
    embedded = json.loads(foreign[name, fmt]("embedded.json").read_text())
    assert embedded == read_export_metadata(artifact) == json.loads(Path(f"{artifact}.json").read_text())
    source = load_checkpoint(ckpt)
    assert embedded["format"] == fmt
    assert embedded["model"] == name and embedded["model_kwargs"] == {"width_multiplier": MODELS[name]}
    assert embedded["bands"] == BANDS and embedded["class_names"] == CLASSES
    assert embedded["mean"] == list(source.mean) and embedded["std"] == list(source.std)
    assert embedded["checkpoint"] == ckpt.name
    assert embedded["checkpoint_sha256"] == file_sha256(ckpt) == source.sha256


def test_export_writes_only_its_files_and_no_temp_files(exported):
    root = exported[0]
    written = sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if p.is_file() and not p.name.endswith((".npy", ".embedded.json", ".refused.json"))
    )
    assert written == sorted(
        [f"{name}.safetensors" for name in MODELS]
        + [f"{name}.pt2" for name in MODELS] + [f"{name}.pt2.json" for name in MODELS]
        + ["nested/folders/deeplabv3plus_resnet50.pt", "nested/folders/deeplabv3plus_resnet50.pt.json"]
    )


def test_read_export_metadata_refuses_a_file_without_it(exported):
    from schemas.errors import CheckpointError

    with pytest.raises(CheckpointError, match="satseg export"):
        read_export_metadata(exported[1]["hrnet_w18_small_v1"])


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["{missing}"], "checkpoint not found"),
        (["{ckpt}", "--tile", "80"], "multiple of 32"),
        (["{ckpt}", "--out", "{ckpt}"], "is the checkpoint itself"),
    ],
)
def test_user_errors_are_one_line_with_status_2(exported, tmp_path, capsys, argv, fragment):
    ckpt, missing = exported[1]["hrnet_w18_small_v1"], tmp_path / "nope.safetensors"
    before = sorted(exported[0].rglob("*"))
    code = main(["export", *(a.format(ckpt=ckpt, missing=missing) for a in argv)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("satseg: error: ") and fragment in lines[0], err
    assert sorted(exported[0].rglob("*")) == before
