"""Tests for safetensors checkpoints: round trip, content hash, and one-line errors for bad files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from schemas.errors import CheckpointError
from workers.models import (
    Checkpoint,
    build_from_checkpoint,
    create_model,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)

MODEL = "hrnet_w18_small_v1"
KWARGS = {"width_multiplier": 0.25}
META = dict(
    bands=(4, 3, 2, 1),
    class_names=("background", "building", "road"),
    mean=(0.1, 0.2, 0.3, 0.4),
    std=(1.0, 2.0, 3.0, 4.0),
)


@pytest.fixture
def trained():
    """A tiny model whose BN statistics differ from fresh ones, as after training."""
    torch.manual_seed(0)
    model = create_model(MODEL, 4, 3, **KWARGS)
    with torch.no_grad():
        model.train()(torch.randn(2, 4, 32, 32))
    return model.eval()


def _save(path: Path, model: torch.nn.Module, **changes) -> str:
    arguments = dict(model_name=MODEL, model_kwargs=KWARGS, provenance={"epochs": 3, "seed": 7}, **META)
    arguments.update(changes)
    return save_checkpoint(path, model, **arguments)


def _one_line_error(path: Path, call=load_checkpoint) -> str:
    with pytest.raises(CheckpointError) as raised:
        call(path)
    message = str(raised.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_round_trip_keeps_metadata_and_logits(tmp_path: Path, trained: torch.nn.Module):
    path = tmp_path / "model.safetensors"
    sha256 = _save(path, trained)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.model == MODEL and ckpt.model_kwargs == KWARGS
    assert ckpt.bands == META["bands"] and ckpt.class_names == META["class_names"]
    assert ckpt.mean == META["mean"] and ckpt.std == META["std"]
    assert ckpt.provenance == {"epochs": 3, "seed": 7}
    assert ckpt.path == str(path) and ckpt.sha256 == sha256

    rebuilt = build_from_checkpoint(ckpt)
    assert not rebuilt.training
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))


def test_sha256_is_the_hash_of_the_file(tmp_path: Path, trained: torch.nn.Module):
    path = tmp_path / "model.safetensors"
    sha256 = _save(path, trained)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256 == expected == file_sha256(path) == load_checkpoint(path).sha256


def test_save_is_atomic_and_overwrites(tmp_path: Path, trained: torch.nn.Module):
    path = tmp_path / "runs" / "model.safetensors"
    first = _save(path, trained)
    second = _save(path, trained, provenance={"epochs": 4})
    assert first != second
    assert load_checkpoint(path).provenance == {"epochs": 4}
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]


def test_metadata_is_one_json_object_in_the_header(tmp_path: Path, trained: torch.nn.Module):
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    _save(path, trained)
    with safe_open(path, framework="pt") as stream:
        metadata = stream.metadata()
    assert set(metadata) == {"satseg"}
    assert json.loads(metadata["satseg"])["format_version"] == 1


def test_missing_file(tmp_path: Path):
    message = _one_line_error(tmp_path / "absent.safetensors")
    assert message.startswith("checkpoint not found:") and "satseg train" in message


def test_garbage_file(tmp_path: Path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file\n" * 4)
    assert "not a readable safetensors file" in _one_line_error(path)


def test_truncated_file(tmp_path: Path, trained: torch.nn.Module):
    path = tmp_path / "model.safetensors"
    _save(path, trained)
    path.write_bytes(path.read_bytes()[:-100])
    _one_line_error(path)


def test_safetensors_without_metadata(tmp_path: Path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    assert "no satseg metadata" in _one_line_error(path)


def _write_with_metadata(path: Path, metadata: dict) -> None:
    save_file({"w": torch.zeros(2)}, path, metadata={"satseg": json.dumps(metadata)})


def test_unknown_model_name(tmp_path: Path):
    path = tmp_path / "future.safetensors"
    _write_with_metadata(
        path, dict(format_version=1, model="segformer_b5", model_kwargs={}, provenance={}, **_lists(META))
    )
    message = _one_line_error(path)
    assert "segformer_b5" in message and MODEL in message


def test_newer_format_version(tmp_path: Path):
    path = tmp_path / "future.safetensors"
    _write_with_metadata(path, dict(format_version=2, model=MODEL, model_kwargs={}, provenance={}, **_lists(META)))
    assert "format_version" in _one_line_error(path)


def test_inconsistent_normalisation(tmp_path: Path):
    path = tmp_path / "bad.safetensors"
    metadata = dict(format_version=1, model=MODEL, model_kwargs={}, provenance={}, **_lists(META))
    metadata["std"] = [1.0, 0.0, 1.0, 1.0]
    _write_with_metadata(path, metadata)
    assert "std" in _one_line_error(path)


def test_state_dict_mismatch(tmp_path: Path, trained: torch.nn.Module):
    path = tmp_path / "model.safetensors"
    _save(path, trained, model_kwargs={"width_multiplier": 0.5})
    message = _one_line_error(path, call=lambda p: build_from_checkpoint(load_checkpoint(p)))
    assert "does not fit" in message and "wrong shape" in message


def test_bad_model_kwargs_in_checkpoint(tmp_path: Path, trained: torch.nn.Module):
    path = tmp_path / "model.safetensors"
    _save(path, trained, model_kwargs={"output_stride": 8})
    message = _one_line_error(path, call=lambda p: build_from_checkpoint(load_checkpoint(p)))
    assert "output_stride" in message


def test_save_rejects_mismatched_normalisation(tmp_path: Path, trained: torch.nn.Module):
    path = tmp_path / "model.safetensors"
    with pytest.raises(CheckpointError, match="mean"):
        _save(path, trained, mean=(0.0,))
    assert not path.exists()


def _lists(meta: dict) -> dict:
    return {key: list(value) for key, value in meta.items()}
