"""The model side of a job: build a model, run batches of tiles, stitch a chunk.

`TilePredictor` is a plain class; the runner wraps it with ``ray.remote`` so
one actor holds one model (one per GPU, or CPU actors when there is none).
The benchmark uses the same class without Ray to time the model alone.
For speed: everything from a window's upload to the uint8 class map runs on
the device (normalising, batching, the model, softmax, stitching, argmax);
optional ``torch.compile`` (eager when compilation fails); a batch size from
the GPU's memory. For the same bits everywhere: every model call has one
shape. For accuracy: test-time augmentation (`workers.tta`) averages the
logits of flipped and rotated tiles.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.core.geometry import Window
from pipeline.core.plan import ChunkResult, ChunkTask, ScenePlan
from pipeline.core.refine import CRF_KERNEL_CACHE_BYTES, refine_classes
from pipeline.core.metrics import MASK_NODATA
from pipeline.core.stitch import class_argmax, quantise_probabilities, stitch_chunk, window_weights
from schemas.errors import one_line
from schemas.job import resolve_device
from workers.reader import WindowData, normalise
from workers.tta import dihedral_transforms

__all__ = ["ModelSource", "PROGRESS_GROUP", "TileCache", "TilePredictor", "TILE_CACHE_BYTES", "choose_batch_size", "pick_device",
           "use_deterministic_cuda_kernels"]

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 1  # on CPU one 512-px tile per call is fastest per pixel (BENCHMARKS.md)
MAX_BATCH_SIZE = 64
GPU_MEMORY_FRACTION = 0.7
TILE_CACHE_BYTES = 1 << 30
"""Tile outputs an actor keeps for the next chunk of its strip; the driver sizes strips to fit half of it."""


PROGRESS_GROUP = "progress"
"""The actor's concurrency group for `TilePredictor.progress`: answered in its own thread while a chunk is in work."""


@dataclass(frozen=True)
class ModelSource:
    """How to build the model: from a checkpoint, or a registry name with seeded random weights (then, with
    ``init``, published weights loaded over them by ``workers.models.pretrained``)."""

    name: str
    in_channels: int
    num_classes: int
    options: dict = field(default_factory=dict)
    checkpoint: str | None = None
    seed: int = 0
    init: str | None = None

    def build(self) -> torch.nn.Module:
        from workers.models import build_from_checkpoint, create_model, load_checkpoint

        if self.checkpoint:
            return build_from_checkpoint(load_checkpoint(self.checkpoint))
        torch.manual_seed(self.seed)
        model = create_model(self.name, self.in_channels, self.num_classes, **self.options)
        if self.init:
            from workers.models.pretrained import load_pretrained

            load_pretrained(model, self.name, self.init)
        return model.eval()


def use_deterministic_cuda_kernels() -> None:
    """Process-wide: cuDNN picks deterministic kernels without autotuning, so a tile's output never depends on
    timing (ARCHITECTURE.md, invariant 1).

    Set for the whole process on purpose: a GPU actor owns its process, and its two calls run at once, so a
    setting scoped to one call (``torch.backends.cudnn.flags``) would be restored under the other's feet.
    """
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def refine_cache_bytes(device: torch.device) -> int:
    """How much a CRF refinement may keep between iterations: on a GPU a tenth of its memory (at most 8 GiB), else
    `pipeline.core.refine.CRF_KERNEL_CACHE_BYTES`."""
    if device.type != "cuda":
        return CRF_KERNEL_CACHE_BYTES
    return min(8 << 30, torch.cuda.get_device_properties(device).total_memory // 10)


def pick_device(device: str = "auto") -> str:
    """The device this process runs a model on (``schemas.job.resolve_device`` over its visible GPUs)."""
    return resolve_device(device, torch.cuda.device_count())


def choose_batch_size(
    free_bytes: int, per_tile_bytes: int, cap: int = MAX_BATCH_SIZE, fraction: float = GPU_MEMORY_FRACTION
) -> int:
    """Tiles per model call that fit ``fraction`` of the free GPU memory; at least 1, at most ``cap``."""
    if cap < 1:
        raise ValueError(f"cap must be at least 1 (got {cap})")
    if per_tile_bytes <= 0:
        return cap
    return max(1, min(cap, int(max(0, free_bytes) * fraction) // per_tile_bytes))


class TileCache:
    """Outputs of tiles shared by several chunks, kept until every such chunk has used them.

    A shared tile is computed once, not once per chunk; a reused output is the
    very array a recomputation would give (every model call has one shape, so
    a tile's output does not depend on its batch), so the cache changes speed,
    never the mask. Bounded in bytes: past the bound the oldest entries go, and
    are recomputed if needed. Entries are numpy arrays or device tensors.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.hits = 0
        self._scope: tuple | None = None
        self._entries: OrderedDict[tuple[int, int], tuple[Any, int]] = OrderedDict()
        self._bytes = 0

    def switch(self, scope: tuple) -> None:
        """Start caching for another scene or tiling; drops everything cached before."""
        if scope != self._scope:
            self._entries.clear()
            self._bytes = 0
            self._scope = scope

    def get(self, key: tuple[int, int]) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self.hits += 1
        return entry[0]

    def use(self, key: tuple[int, int], output: Any, uses_total: int) -> None:
        """Record one chunk's use of a tile; keep it while other chunks still need it (pass a copy, not a view of a batch)."""
        entry = self._entries.pop(key, None)
        remaining = (entry[1] if entry else uses_total) - 1
        if entry:
            self._bytes -= entry[0].nbytes
        if remaining <= 0 or output.nbytes > self.max_bytes:
            return
        self._entries[key] = (output, remaining)
        self._bytes += output.nbytes
        while self._bytes > self.max_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self._bytes -= old.nbytes


class TilePredictor:
    """One model on one device; predicts batches of tiles and stitches chunks."""

    def __init__(self, source: ModelSource, **options):
        """The model ``source`` builds; ``options`` (device, batch_size, threads, cache_bytes, tta, compile) as `_setup`."""
        self._setup(source.build(), source.num_classes, **options)

    @classmethod
    def from_module(cls, module: torch.nn.Module, num_classes: int, **options) -> "TilePredictor":
        """A predictor around a model built elsewhere (any module mapping (N, B, T, T) to (N, C, T, T) logits).

        ``options`` are the constructor's keyword arguments.
        """
        predictor = cls.__new__(cls)
        predictor._setup(module, num_classes, **options)
        return predictor

    def _setup(
        self,
        model: torch.nn.Module,
        num_classes: int,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        threads: int | None = None,
        cache_bytes: int = TILE_CACHE_BYTES,
        tta: str = "none",
        compile: bool = False,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        self.device = torch.device(pick_device(device))
        if self.device.type == "cuda":
            use_deterministic_cuda_kernels()
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = batch_size  # None: chosen per tile size by `batch_size_for`
        self.num_classes = num_classes
        self.tta = tta
        self._transforms = dihedral_transforms(tta)
        self._compiled = self._compile(self.model) if compile else None
        self._auto_batch: dict[tuple[int, int], int] = {}
        self._weights: dict[tuple[str, int], torch.Tensor] = {}
        self._cache = TileCache(cache_bytes)
        self._lock = threading.Lock()
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._refine_cache = refine_cache_bytes(self.device)
        self.tiles_predicted = 0
        self.model_seconds = 0.0
        self.chunk_seconds = 0.0

    @staticmethod
    def _compile(model: torch.nn.Module):
        try:
            return torch.compile(model)
        except Exception as err:  # e.g. a platform without a compiler backend
            log.warning("torch.compile is unavailable (%s); running the model eagerly", one_line(err))
            return None

    @property
    def compiled(self) -> bool:
        """Whether model calls go through ``torch.compile`` (False after a fallback to eager)."""
        return self._compiled is not None

    def _call_model(self, x: torch.Tensor) -> torch.Tensor:
        """The compiled model when there is one; on a compilation failure, eager from then on."""
        if self._compiled is not None:
            try:
                return self._compiled(x)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:
                log.warning("torch.compile failed (%s); running the model eagerly", one_line(err))
                self._compiled = None
        return self.model(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits of one model call on a device tensor."""
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = self._call_model(x)
            return logits.float()
        return self._call_model(x.contiguous()).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits of a device batch, averaged over the TTA transforms (each mapped back first)."""
        total = None
        for t in self._transforms:
            y = t.inverse(self._forward(t.forward(x)))
            total = y if total is None else total + y
        return total / len(self._transforms) if len(self._transforms) > 1 else total

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A copy of a host array (Ray's are read-only) on the device: on a GPU through pinned memory, asynchronously."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.array(array))
        staging = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, pin_memory=True)
        staging.numpy()[...] = array
        return staging.to(self.device, non_blocking=True)

    def _outputs(self, x: torch.Tensor, classes: bool) -> torch.Tensor:
        """Probabilities (N, C, T, T) float32, or class maps (N, T, T) uint8, of tiles already on the device.

        Every model call has the same shape: the tiles go in batches of
        ``batch_size_for``, the last one padded with zero tiles. So a tile's
        output never depends on how many tiles, or which, share its batch
        (on a GPU the kernels cuDNN picks depend on the batch shape).
        """
        n, bands, tile, _ = x.shape
        if n == 0:
            return x.new_zeros((0, tile, tile), dtype=torch.uint8) if classes else x.new_zeros((0, self.num_classes, tile, tile))
        size = self.batch_size_for(bands, tile)
        outs = []
        started = time.perf_counter()
        for i in range(0, n, size):
            part = x[i : i + size]
            if len(part) < size:
                part = torch.cat([part, part.new_zeros((size - len(part), *part.shape[1:]))])
            logits = self.logits(part)[: min(size, n - i)]
            probs = torch.softmax(logits, dim=1)
            # class maps are the argmax of the probabilities, as in blend and in the whole-image reference
            # (two logits an ulp apart can round to one probability); class by class, not over NCHW's slow axis
            outs.append(class_argmax(probs.transpose(0, 1)) if classes else probs)
        self.tiles_predicted += n
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # model_seconds is the model's time, not the launches'
        self.model_seconds += time.perf_counter() - started
        return out

    def predict_batch(self, batch: np.ndarray, *, classes: bool = False) -> np.ndarray:
        """Probabilities (N, C, T, T) float32, or class maps (N, T, T) uint8, of a host batch of normalised tiles."""
        with torch.inference_mode():
            x = self._to_device(batch).float()
            return self._outputs(x, classes).cpu().numpy()

    def batch_size_for(self, channels: int, tile: int) -> int:
        """Tiles per model call: the one asked for; else 1 on CPU; else what ~70% of the GPU holds (a power of 2, <= 64).

        On a GPU the size comes from the device's total memory (less what the
        model holds), not from the memory free at the moment, so every actor on
        the same kind of GPU picks the same call shape, and with it the same bits.
        """
        if self.batch_size is not None:
            return self.batch_size
        key = (channels, tile)
        if key not in self._auto_batch:
            if self.device.type == "cuda":
                per_tile = self._tile_peak_bytes(channels, tile)
                total = torch.cuda.get_device_properties(self.device).total_memory
                held = sum(p.numel() * p.element_size() for p in self.model.parameters())
                size = choose_batch_size(total - held, per_tile)
                size = 1 << (size.bit_length() - 1)
                log.info("batch size %d for %d px tiles: %.0f MiB per tile", size, tile, per_tile / 2**20)
            else:
                size = CPU_BATCH_SIZE
            self._auto_batch[key] = size
        return self._auto_batch[key]

    def _choose_batch_size(self, channels: int, tile: int) -> None:
        """Pick the call shape before any upload: on a GPU it is measured, and no other call may allocate meanwhile.

        (A restarted actor picks it again in its first call; the other call waits here rather than uploading.)
        """
        if self.batch_size is None and (channels, tile) not in self._auto_batch:
            with self._lock:
                self.batch_size_for(channels, tile)

    def _tile_peak_bytes(self, channels: int, tile: int) -> int:
        """GPU memory one tile adds at its peak during a model call (TTA and softmax included)."""
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            x = torch.zeros((1, channels, tile, tile), device=self.device)
            torch.softmax(self.logits(x), dim=1)
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - base)

    def _upload(self, data: WindowData, valid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's normalised bands (float32) and its ``valid`` pixels (bool) on the device.

        Only the file's own pixel bytes cross from the host; conversion and
        normalisation run on the device. On a GPU the copy runs on its own
        stream, so it overlaps the model work of the chunk before.
        """
        stream = self._copy_stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            pixels = data.pixels
            if self.device.type == "cpu":
                x = torch.from_numpy(pixels.astype(np.float32))
            elif pixels.dtype == np.uint16:  # sent as int16 bits: not every CUDA build of torch converts uint16
                x = (self._to_device(pixels.view(np.int16)).to(torch.int32) & 0xFFFF).to(torch.float32)
            else:
                x = self._to_device(pixels).to(torch.float32)
            has_data = self._to_device(data.has_data)
            norm = self._to_device(np.asarray([data.mean, data.std], dtype=np.float32))
            normalise(x, has_data, norm[0], norm[1])
            on_device = self._to_device(valid)
        if stream is not None:
            stream.synchronize()  # this call waits for its copy; the other call's model work goes on
            for t in (x, on_device):
                t.record_stream(torch.cuda.current_stream(self.device))
        return x, on_device

    def _tile_outputs(
        self, x: torch.Tensor, window: Window, tiles: list[tuple[tuple[int, int], Window]], classes: bool, plan: ScenePlan
    ) -> Iterator[tuple[Window, torch.Tensor]]:
        """Tile outputs in lattice order: shared tiles from the cache, the rest from fixed-shape model calls."""
        size = self.batch_size_for(x.shape[0], plan.lattice.tile)
        hits = {rc: self._cache.get(rc) for rc, _ in tiles}
        todo = [(rc, win) for rc, win in tiles if hits[rc] is None]
        fresh: dict[tuple[int, int], torch.Tensor] = {}
        next_batch = 0
        for rc, win in tiles:
            out = hits[rc]
            if out is None:
                if rc not in fresh:
                    part = todo[next_batch : next_batch + size]
                    next_batch += len(part)
                    batch = torch.stack([x[(slice(None), *w.slices_in(window))] for _, w in part])
                    fresh.update(zip((p[0] for p in part), self._outputs(batch, classes)))
                out = fresh.pop(rc)
                uses = plan.chunks_per_tile(*rc)
                # a shared tile is kept on its own, not as a view that would hold its whole batch
                self._cache.use(rc, out.clone() if uses > 1 else out, uses)
            else:
                self._cache.use(rc, out, plan.chunks_per_tile(*rc))
            yield win, out

    def predict_chunk(
        self, data: WindowData, task: ChunkTask, plan: ScenePlan, window: str, scene_key: str = "", probabilities: bool = False
    ) -> ChunkResult:
        """The chunk's class map (uint8, 255 where the input has no data), and the work it took.

        With ``probabilities`` also the class probabilities (C, h, w) quantised
        to uint8 (q = round(255 p); 0 where the input has no data). Everything
        between the pixels' upload and these uint8 arrays runs on the device.
        The work travels with the chunk, so the job's totals count every chunk
        delivered exactly once, whatever actor restarts or resumes came between.
        """
        with torch.inference_mode():
            self._choose_batch_size(data.pixels.shape[0], plan.lattice.tile)
            started = time.perf_counter()
            host_valid = data.valid  # inside the scene and holding data: on the host for choosing tiles, uploaded for nodata
            x, valid = self._upload(data, host_valid)
            uploading = time.perf_counter() - started
            with self._lock:  # one chunk at a time on the model; the next one's upload overlaps it
                before = self.stats()
                started = time.perf_counter()
                out = self._stitch(x, valid, host_valid, data.window, task, plan, window, scene_key, probabilities)
                out = tuple(o.cpu().numpy() for o in out)
                self.chunk_seconds += uploading + time.perf_counter() - started  # busy, not waiting for the lock
                work = {k: v - before[k] for k, v in self.stats().items()}
        work["nodata_collisions"] = data.nodata_collisions  # read inside this chunk only
        return ChunkResult(out[0], out[1] if probabilities else None, work)

    def _stitch(
        self, x, valid, host_valid: np.ndarray, read: Window, task: ChunkTask, plan: ScenePlan, window: str, scene_key: str,
        probabilities: bool,
    ):
        lattice = plan.lattice
        classes = plan.mode == "crop" and not probabilities and plan.refine is None  # tiles' class maps are enough
        self._cache.switch((scene_key, plan.mode, lattice.tile, lattice.overlap, classes))
        tiles = []  # which tiles to skip is decided on the host: no device round trip per tile
        for r, c in task.tiles:
            win = lattice.window(r, c)
            if host_valid[win.slices_in(read)].any():
                tiles.append(((r, c), win))  # a tile with no valid pixel skips the model
        weights = None
        if plan.mode == "blend":
            key = (window, lattice.tile)
            if key not in self._weights:
                self._weights[key] = torch.from_numpy(window_weights(window, lattice.tile)).to(self.device)
            weights = self._weights[key]
        out = stitch_chunk(
            task.stitched,
            self._tile_outputs(x, read, tiles, classes, plan),
            lattice=lattice,
            mode=plan.mode,
            num_classes=self.num_classes,
            weights=weights,
            probabilities=probabilities or plan.refine is not None,
            like=x,
        )
        mask, probs = out if probabilities or plan.refine is not None else (out, None)
        if plan.refine is not None:  # on the stitched region, then only the chunk is kept (pipeline/core/refine.py)
            region, inner = task.stitched, task.stitched.slices_in(read)
            mask = refine_classes(probs, mask, x[(slice(None), *inner)], valid[inner], region, plan.refine, self._refine_cache)
            keep = task.chunk.slices_in(region)
            mask, probs = mask[keep], probs[(slice(None), *keep)]
        chunk_valid = valid[task.chunk.slices_in(read)]
        mask[~chunk_valid] = MASK_NODATA
        return (mask, quantise_probabilities(probs, chunk_valid)) if probabilities else (mask,)

    def progress(self) -> int:
        """Tiles predicted so far by this actor: the driver polls it (in the actor's own ``progress`` concurrency
        group, so a chunk in work does not block it) to show progress within a chunk."""
        return self.tiles_predicted

    def stats(self) -> dict:
        return {
            "tiles_predicted": self.tiles_predicted,
            "tiles_reused": self._cache.hits,
            "model_seconds": self.model_seconds,
            "chunk_seconds": self.chunk_seconds,
        }

    def node(self) -> dict:
        """Where this predictor runs: process, Ray node (None outside Ray), device, and how it predicts."""
        import ray

        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"pid": os.getpid(), "node_id": node_id, "device": str(self.device), "tta": self.tta, "compiled": self.compiled}
