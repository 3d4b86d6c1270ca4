"""The state of an unfinished training run, saved after every epoch so `satseg train --resume` can continue it.

No pickle: every tensor (weights, best weights, optimizer moments, torch RNG states)
goes into one safetensors file, and everything else (epoch, histories, run settings,
optimizer hyper-parameters and param-group structure, scheduler counters, numpy and
Python RNG states) into one JSON object in its header metadata. Loading therefore
never runs code, and the file is written atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from schemas.errors import CheckpointError, first_line
from workers.models.checkpoint import write_safetensors

__all__ = [
    "STATE_FORMAT_VERSION",
    "TrainState",
    "RngState",
    "train_state_path",
    "save_train_state",
    "load_train_state",
    "capture_rng",
    "restore_rng",
]

STATE_FORMAT_VERSION = 1
"""Version of the training-state JSON object; bumped when its meaning changes."""

_METADATA_KEY = "satseg_train_state"
_FIX = "resume only from a state file written by `satseg train`, or drop --resume to start over"


@dataclass
class RngState:
    """Every random stream a training run draws from: its numpy Generator, Python's, torch's (CPU, and CUDA if used)."""

    numpy: dict[str, Any]
    python: list[Any]
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] = field(default_factory=list)


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where the last finished epoch left it."""

    config: dict[str, Any]
    epoch: int
    losses: list[float]
    history: list[float]
    best_epoch: int
    mean: list[float]
    std: list[float]
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: RngState


def train_state_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the last epoch's state lives: beside the checkpoint, ``model.safetensors`` -> ``model.train-state.safetensors``."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.train-state.safetensors")


def capture_rng(generator: np.random.Generator, device: torch.device | None = None) -> RngState:
    """Snapshot of ``generator``, the global Python and torch CPU streams, and ``device``'s stream when it is CUDA."""
    version, internal, gauss = random.getstate()
    cuda = [torch.cuda.get_rng_state(device).clone()] if device is not None and device.type == "cuda" else []
    return RngState(
        numpy=generator.bit_generator.state,
        python=[version, list(internal), gauss],
        torch_cpu=torch.get_rng_state().clone(),
        torch_cuda=cuda,
    )


def restore_rng(state: RngState, generator: np.random.Generator, device: torch.device | None = None) -> None:
    """Put the streams back where :func:`capture_rng` found them (the CUDA one only when resuming on CUDA too)."""
    generator.bit_generator.state = state.numpy
    version, internal, gauss = state.python
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state.torch_cuda[0], device)


def save_train_state(path: str | os.PathLike[str], state: TrainState) -> None:
    """Write ``state`` atomically: tensors as safetensors, the rest as JSON in the header."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(_prefixed("model/", state.model))
    tensors.update(_prefixed("best/", state.best_model))
    tensors["rng/torch"] = state.rng.torch_cpu
    tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(state.rng.torch_cuda)})
    optimizer_scalars: dict[str, dict[str, Any]] = {}
    for index, values in state.optimizer["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                optimizer_scalars.setdefault(str(index), {})[key] = value
    header = {
        "format_version": STATE_FORMAT_VERSION,
        "config": state.config,
        "epoch": state.epoch,
        "losses": state.losses,
        "history": state.history,
        "best_epoch": state.best_epoch,
        "mean": state.mean,
        "std": state.std,
        "optimizer": {
            "param_groups": state.optimizer["param_groups"],
            "state_indexes": [int(i) for i in state.optimizer["state"]],
            "scalars": optimizer_scalars,
        },
        "scheduler": state.scheduler,
        "rng": {"numpy": state.rng.numpy, "python": state.rng.python, "cuda_devices": len(state.rng.torch_cuda)},
    }
    text = json.dumps(header, sort_keys=True)
    write_safetensors(Path(path), tensors, {_METADATA_KEY: text})


def load_train_state(path: str | os.PathLike[str]) -> TrainState:
    """Read a state written by :func:`save_train_state`; raise CheckpointError if it is missing or not one."""
    location = os.fspath(path)
    if not os.path.isfile(location):
        raise CheckpointError(f"no training state at {location} to resume from; drop --resume to start a new run")
    try:
        with safe_open(location, framework="pt") as stream:
            text = (stream.metadata() or {}).get(_METADATA_KEY)
        tensors = load_file(location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{location} is not a readable safetensors file ({first_line(exc)}); {_FIX}") from exc
    try:
        header = json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{location} has corrupt training-state metadata ({exc.msg}); {_FIX}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{location} holds no satseg training state; {_FIX}")
    if header.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"{location}: training-state format_version is {header.get('format_version')!r}, this satseg reads "
            f"{STATE_FORMAT_VERSION}; resume with the satseg version that wrote it, or drop --resume"
        )
    try:
        return _decode(header, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{location} has an incomplete training state ({first_line(exc)}); {_FIX}") from exc


def _decode(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> TrainState:
    opt = header["optimizer"]
    optimizer_state: dict[int, dict[str, Any]] = {int(i): {} for i in opt["state_indexes"]}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            optimizer_state[int(index)][name] = value
    for index, values in opt["scalars"].items():
        optimizer_state[int(index)].update(values)
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}
        for group in opt["param_groups"]
    ]
    rng = header["rng"]
    return TrainState(
        config=header["config"],
        epoch=int(header["epoch"]),
        losses=[float(v) for v in header["losses"]],
        history=[float(v) for v in header["history"]],
        best_epoch=int(header["best_epoch"]),
        mean=[float(v) for v in header["mean"]],
        std=[float(v) for v in header["std"]],
        model=_unprefixed("model/", tensors),
        best_model=_unprefixed("best/", tensors),
        optimizer={"state": optimizer_state, "param_groups": groups},
        scheduler=header["scheduler"],
        rng=RngState(
            numpy=rng["numpy"],
            python=rng["python"],
            torch_cpu=tensors["rng/torch"],
            torch_cuda=[tensors[f"rng/cuda/{i}"] for i in range(int(rng["cuda_devices"]))],
        ),
    )


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in tensors.items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
