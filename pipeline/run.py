"""Running a tiling job: plan, read (Ray tasks), predict and stitch (Ray actors), write, evaluate, report.

The driver holds no pixels: it keeps at most ``max_windows_in_flight`` chunks
moving and collects only small results. A scene is marked complete after its
last chunk and its reports are written; a rerun resumes from chunk markers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import dask
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.core.boundary import boundary_width_for
from pipeline.cluster import connect
from pipeline.counting import dask_scheduler, geotiff_raster, mask_raster, probabilities_raster
from pipeline.core.geometry import ChunkGrid
from pipeline.core.metrics import SceneScores, SegmentationMetrics, scene_scores
from pipeline.objects import check_instances, check_job_things, job_objects
from pipeline.overviews import write_overviews
from pipeline.core.plan import ScenePlan, plan_scene
from pipeline.progress import progress_bar
from pipeline.telemetry import SceneTelemetry
from pipeline.report_tables import aggregates_table, scores_from_rows, write_scene_reports, write_table
from pipeline.job_folder import (
    DONE, FAILED, RUNNING, chunks_marked, claim_output, model_key, scene_complete, start_scene_states, write_scene_state,
)
from schemas.errors import CheckpointError, ScenesFailedError, SpecError, first_line, one_line, user_error
from schemas.job import JobSpec, SceneSpec, resolve_device
from schemas.specfile import excerpt
from schemas.rasters import recorded_path
from schemas.store import OutputLayout
from workers.predictor import PROGRESS_GROUP, TILE_CACHE_BYTES, ModelSource
from workers.reader import SceneInfo, check_bands, check_labels_match, open_scene

__all__ = ["ResolvedModel", "SceneResult", "JobResult", "resolve_model", "run_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """The model a job runs, with everything needed to feed it."""

    source: ModelSource
    class_names: list[str]
    bands: list[int] | None  # None: every band of the scene
    mean: list[float] | None
    std: list[float] | None
    checkpoint_sha256: str | None
    init_sha256: str | None = None  # the content of the job's `init` weights, when it has them


@dataclass
class SceneResult:
    name: str
    info: SceneInfo
    mask: Path
    metrics: SegmentationMetrics | None
    seconds: float
    predict_seconds: float
    megapixels_per_second: float
    chunks_total: int
    chunks_resumed: int
    resumed_whole: bool = False
    scores: SceneScores | None = None
    nodata_collisions: int = 0  # input pixels holding data where a band equals its nodata value


@dataclass
class JobResult:
    job_id: str
    layout: OutputLayout
    model: ResolvedModel
    scenes: list[SceneResult] = field(default_factory=list)
    startup_seconds: float = 0.0


def resolve_model(spec: JobSpec) -> ResolvedModel:
    """The model from the checkpoint (its metadata is enough) or from the registry name."""
    if spec.checkpoint is not None:
        from workers.models import load_checkpoint

        ckpt = load_checkpoint(spec.checkpoint)
        if spec.model and spec.model != ckpt.model:
            raise CheckpointError(
                f"{spec.checkpoint}: checkpoint holds model {ckpt.model}, not {spec.model}; drop --model or pass a matching checkpoint"
            )
        if spec.class_names and spec.class_names != list(ckpt.class_names):
            raise CheckpointError(
                f"{spec.checkpoint}: checkpoint classes {list(ckpt.class_names)} differ from the job's {spec.class_names}; "
                "drop `classes` or pass a matching checkpoint"
            )
        if spec.bands and len(spec.bands) != len(ckpt.bands):
            raise CheckpointError(
                f"{spec.checkpoint}: checkpoint expects {len(ckpt.bands)} bands, the job selects {len(spec.bands)}; "
                "select as many bands as the model was trained on"
            )
        source = ModelSource(ckpt.model, len(ckpt.bands), len(ckpt.class_names), dict(ckpt.model_kwargs), str(spec.checkpoint))
        return ResolvedModel(source, list(ckpt.class_names), list(spec.bands or ckpt.bands), list(ckpt.mean), list(ckpt.std), ckpt.sha256)
    from workers.models import list_models

    if spec.model not in list_models():
        raise SpecError(f"unknown model {spec.model!r}; choose one of {', '.join(list_models())}")
    classes = list(spec.class_names or [])
    _check_model_options(spec.model, len(classes), dict(spec.model_options))
    init, init_sha256 = None, None
    if spec.init is not None:  # the file is read and fitted here, so a bad one fails before any actor starts
        from workers.models.pretrained import check_pretrained

        init = str(spec.init)
        init_sha256 = check_pretrained(init, spec.model, len(spec.bands) if spec.bands else 3, len(classes), dict(spec.model_options))
    source = ModelSource(spec.model, len(spec.bands) if spec.bands else 0, len(classes), dict(spec.model_options), None, spec.seed, init)
    return ResolvedModel(source, classes, list(spec.bands) if spec.bands else None, None, None, None, init_sha256)


def _check_model_options(name: str, num_classes: int, options: dict) -> None:
    """Build the model once on the meta device, so bad options fail here with one line, not in an actor."""
    import torch

    from workers.models import create_model

    try:
        with torch.device("meta"):
            create_model(name, 3, num_classes, **options)
    except (TypeError, ValueError) as err:
        raise SpecError(f"model_options {excerpt(options)}: {excerpt(first_line(err))}; fix the model options") from None


def _scene_bands(model: ResolvedModel, info: SceneInfo) -> list[int]:
    bands = model.bands or list(range(1, info.count + 1))
    check_bands(info, bands)
    if model.source.checkpoint and len(bands) != model.source.in_channels:
        raise CheckpointError(
            f"{info.path}: image has {len(bands)} bands, checkpoint {model.source.checkpoint} expects "
            f"{model.source.in_channels}; select bands with --bands or use a matching checkpoint"
        )
    return bands


PRECISION = {"cpu": "float32", "cuda": "bfloat16"}
"""The numeric precision of the model on each kind of actor device (bf16 autocast on CUDA): part of a job's identity."""


def job_id_of(spec: JobSpec, model: ResolvedModel, device: str) -> str:
    """What determines the outputs, hashed: the job's identity fields, the checkpoint's content, the precision.

    A job resumed on another kind of device (CPU float32, GPU bfloat16) is another job, not a mix of both.
    """
    keep = spec.identity()
    keep["checkpoint_sha256"] = model.checkpoint_sha256
    if model.init_sha256 is not None:  # only then: jobs without `init` keep their ids
        keep["init_sha256"] = model.init_sha256
    keep["precision"] = PRECISION[device]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def _actor_device(spec: JobSpec) -> str:
    """The device the job's model actors get (``resolve_device`` over the cluster's GPUs)."""
    import ray

    return resolve_device(spec.device, int(ray.cluster_resources().get("GPU", 0)))


def _validate_scenes(spec: JobSpec, model: ResolvedModel) -> list[_Scene]:
    """Check every scene from metadata before any work starts, so bad input fails fast."""
    out = []
    for scene in spec.scenes:
        info = open_scene(scene.image, stac_bands=scene.stac_bands)  # a STAC item's bands: stacked as VRT text
        bands = _scene_bands(model, info)
        labels = None
        if scene.labels is not None:
            labels = open_scene(scene.labels, role="label")
            check_labels_match(info, labels)
        if scene.instances is not None:  # true object ids (`things`): on the image's grid too
            check_instances(info, scene.instances)
        out.append(_Scene(scene, info, labels, bands))
    return out


def _actors(spec: JobSpec, source: ModelSource):
    import ray

    from workers.predictor import TilePredictor
    from workers.tasks import warm_up_task

    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    device = _actor_device(spec)
    if device == "cuda":
        n = spec.num_actors or max(1, int(resources.get("GPU", 0)))
        # two calls at once: one chunk's upload overlaps the other's model work (the model itself is locked)
        opts = {"num_gpus": 1, "num_cpus": 1, "max_concurrency": 2}
        threads = None
    else:
        # One single-threaded actor per core by default: torch's threads wait for each other by
        # spinning, so two threads on two cores ran 2.7x slower whenever a read or write task took
        # a core, and even alone gave only 1.3x one thread's speed, where two one-thread actors give
        # 2.1x (BENCHMARKS.md). CPU actors reserve no CPU slot, so read and write tasks always find one.
        n = spec.num_actors or cpus
        opts = {"num_gpus": 0, "num_cpus": 0, "scheduling_strategy": "SPREAD"}
        threads = max(1, cpus // n)
    # progress() runs in its own thread, beside a chunk in work (max_concurrency still bounds the chunks)
    cls = ray.remote(concurrency_groups={PROGRESS_GROUP: 1})(TilePredictor).options(max_restarts=2, max_task_retries=2, **opts)
    actors = [
        cls.remote(source, device=device, batch_size=spec.batch_size, threads=threads, tta=spec.tta, compile=spec.compile)
        for _ in range(n)
    ]
    warm = [warm_up_task.remote(["pipeline.counting"]) for _ in range(cpus)]  # task workers import while models build
    nodes = ray.get([a.node.remote() for a in actors])  # wait until every model is built, so timings exclude startup
    ray.get(warm)
    # Each actor picks its call shape now, while idle (on a GPU it measures memory): the same on the same kind of device.
    sizes = set(ray.get([a.batch_size_for.remote(source.in_channels, spec.tile_size) for a in actors]))
    if len(sizes) > 1:
        log.warning("actors chose different batch sizes %s (different GPUs?): their chunks may differ in the last bits", sorted(sizes))
    return [(a, n["node_id"]) for a, n in zip(actors, nodes)]


def _actor_for(row: int, col: int, plan: ScenePlan, strip: int, n_actors: int) -> int:
    """The actor of a chunk: one per strip of ``strip`` columns; with more actors than strips, strips split into row bands.

    A band is consecutive chunk rows of one strip, so an actor still meets its chunks next to each other (tile reuse).
    """
    rows, cols = plan.grid.shape
    strips = -(-cols // strip)
    bands = min(rows, -(-n_actors // strips))
    return ((col // strip) * bands + row // -(-rows // bands)) % n_actors


def _strip_width(plan: ScenePlan, num_classes: int, n_actors: int, cache_bytes: int = TILE_CACHE_BYTES) -> int:
    """Chunk columns per strip: the tiles a strip shares between chunk rows fit half the actor's tile cache.

    A chunk stitches its region (the chunk, grown by a refinement's halo), so with a halo a chunk column spans more
    tiles across, and consecutive chunk rows share more rows of tiles.
    """
    rows, cols = plan.grid.shape
    inner = plan.task(min(1, rows - 1), min(1, cols - 1))  # away from the scene's edges, where the halo is whole
    grown = (inner.stitched.height - inner.chunk.height, inner.stitched.width - inner.chunk.width)  # 0 without one
    tiles_across = -(-(plan.grid.chunk + grown[1]) // plan.lattice.stride) + 1
    rows_shared = -(-grown[0] // plan.lattice.stride) + 1
    per_tile = plan.lattice.tile**2 * (4 * num_classes if plan.mode == "blend" else 1)
    strip = max(1, int(cache_bytes // 2 // (tiles_across * rows_shared * per_tile)))
    return max(1, min(strip, -(-cols // n_actors)))


class _ChunkCounting:
    """Counts each chunk in a Ray task as soon as it and its halo's chunks are written, not in a second pass.

    The counts are the ones `satseg evaluate` computes (`pipeline.counting.block_counts`,
    on the same chunk grid), so they equal the whole-scene computation; Dask reduces them at the end.
    """

    def __init__(self, plan: ScenePlan, store: Path, scene: SceneSpec, spec: JobSpec, num_classes: int, written: set):
        import ray

        from pipeline.counting import CountSpec, block_counts, chunk_windows

        self.rows, self.cols = plan.grid.shape
        labels = scene.labels is not None
        self.spec = CountSpec(
            num_classes, labels, spec.save_probabilities and labels, None, spec.label_values, spec.ignore_index,
            boundary_width_for(plan.height, plan.width, pixels=spec.boundary_width, ratio=spec.boundary_ratio),
            spec.trimap_max_width, spec.boundary_convention,
        )
        self.windows, self.sizes = chunk_windows((plan.height, plan.width), (plan.grid.chunk, plan.grid.chunk))
        self.rasters = (
            mask_raster(store),
            geotiff_raster(scene.labels, (plan.height, plan.width), plan.grid.chunk) if labels else None,
            probabilities_raster(store) if self.spec.probabilities else None,
        )
        self.reach = -(-self.spec.depth // plan.grid.chunk)  # chunks a halo reaches into
        self._task = ray.remote(max_retries=3)(block_counts)
        self._written = set(written)
        self._refs: dict[tuple[int, int], object] = {}
        for rc in sorted(self._written):
            self._submit_ready(*rc)

    def _around(self, r: int, c: int):
        k = self.reach
        for rr in range(max(0, r - k), min(self.rows, r + k + 1)):
            for cc in range(max(0, c - k), min(self.cols, c + k + 1)):
                yield rr, cc

    def _submit_ready(self, r: int, c: int) -> None:
        for n in self._around(r, c):
            if n not in self._refs and n in self._written and all(m in self._written for m in self._around(*n)):
                self._refs[n] = self._task.remote(self.windows[n[0] * self.cols + n[1]], *self.rasters, self.spec)

    def written(self, r: int, c: int) -> None:
        self._written.add((r, c))
        self._submit_ready(r, c)

    def pending(self) -> list:
        """The counting tasks submitted so far (to settle when the scene fails)."""
        return list(self._refs.values())

    def result(self):
        """Every chunk's counts (all chunks must be written), reduced by Dask."""
        import ray

        from pipeline.counting import reduce_counts

        order = [(r, c) for r in range(self.rows) for c in range(self.cols)]
        missing = [rc for rc in order if rc not in self._refs]
        if missing:
            raise RuntimeError(f"chunks {missing[:3]} were never counted: not every chunk was written")
        return reduce_counts(ray.get([self._refs[rc] for rc in order]), self.spec, self.sizes)


@dataclass
class _RunningJob:
    """What every scene of a running job shares."""

    spec: JobSpec
    layout: OutputLayout
    job_id: str
    model: ResolvedModel
    actors: list  # (actor handle, node id) per model actor
    use_ray_dask: bool
    progress: object


@dataclass(frozen=True)
class _Scene:
    """One scene of the job, checked: its spec, image and label metadata, and the bands it feeds the model."""

    spec: SceneSpec
    info: SceneInfo
    labels: SceneInfo | None
    bands: list[int]

    @property
    def name(self) -> str:
        return self.spec.scene_name


def _open_store(job: _RunningJob, scene: _Scene, plan: ScenePlan) -> tuple[Path, set[tuple[int, int]]]:
    """The scene's mask store, created unless an earlier run of the job left chunks in it; the chunks already written
    and still intact (each checked against its marker's checksum)."""
    from workers.mask_store import create_mask_store, create_probabilities_array, intact_chunks

    store, markers = job.layout.mask_store(scene.name), job.layout.chunk_markers(scene.name)
    windows = {f"{r}.{c}": plan.grid.window(r, c) for r, c in plan.grid}
    done = intact_chunks(store, markers, windows) if store.exists() else set()
    if not done:
        if markers.exists():
            shutil.rmtree(markers)
        names = job.model.class_names
        from pipeline.palette import class_colour_hexes  # the job's colours, the rest from the default palette

        create_mask_store(
            store, scene.info, plan.grid.chunk, class_names=names, job_id=job.job_id, source_image=str(scene.spec.image),
            class_colors=class_colour_hexes(names, job.spec.class_colors),
        )
        if job.spec.save_probabilities:
            create_probabilities_array(store, names, plan.grid.chunk)
    return store, {(r, c) for r, c in plan.grid if f"{r}.{c}" in done}


def _predict_chunks(job: _RunningJob, scene: _Scene, plan: ScenePlan, store: Path, written: set, counting: "_ChunkCounting") -> dict:
    """Read, predict, stitch and write every chunk not yet written, with bounded windows in flight.

    Returns the work of the chunks written now (each chunk's own, so actor restarts neither lose nor repeat any).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from workers.tasks import read_window_task, write_chunk_task

    spec, actors, model = job.spec, job.actors, job.model
    mean = model.mean or [0.0] * len(scene.bands)
    std = model.std or [1.0] * len(scene.bands)
    strip = _strip_width(plan, len(model.class_names), len(actors))
    # One strip, one actor (its shared tiles are reused); each actor has its own queue, so every actor
    # is fed from the start rather than strip after strip.
    queues: list[deque] = [deque() for _ in actors]
    for task in (plan.task(r, c) for r, c in plan.strip_order(strip)):
        if (task.row, task.col) not in written:
            queues[_actor_for(task.row, task.col, plan, strip, len(actors))].append(task)
    limit = spec.max_windows_in_flight or 2 * len(actors) + 1
    per_actor = -(-limit // len(actors))
    # a chunk is read on its actor's node, so windows never cross the network (elsewhere only if that node is gone)
    reads = [read_window_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)) for _, node in actors]
    markers, image = str(job.layout.chunk_markers(scene.name)), scene.info.dataset  # what GDAL opens: the path, or a STAC stack
    # progress in tiles, polled from the actors while they work: a chunk of hundreds of tiles no longer holds the bar still
    needed = set().union(*(plan.task(r, c).tiles for r, c in plan.grid if (r, c) not in written))
    bar = job.progress.add_task(scene.name, total=max(1, len(needed)), unit="tiles", detail=f"chunks {len(written)}/{len(plan.grid)}")
    tiles = _TilesPredicted([a for a, _ in actors])
    chunks_done = len(written)
    telemetry = SceneTelemetry(job.job_id, scene.name, len(plan.grid), len(written))  # Ray metrics, for Prometheus
    spent = dict.fromkeys(("tiles_predicted", "tiles_reused", "model_seconds", "chunk_seconds", "nodata_collisions"), 0)
    in_flight: dict = {}
    busy = [0] * len(actors)
    try:
        while in_flight or any(queues):
            for k, (actor, _) in enumerate(actors):
                while queues[k] and busy[k] < per_actor and len(in_flight) < limit:
                    task = queues[k].popleft()
                    data = reads[k].remote(image, task.read, scene.bands, mean, std, task.chunk)
                    mask = actor.predict_chunk.remote(data, task, plan, spec.window, image, spec.save_probabilities)
                    in_flight[write_chunk_task.remote(str(store), task.chunk, mask, markers, task.key)] = (task, k)
                    busy[k] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=_PROGRESS_SECONDS)
            for ref in ready:
                work = ray.get(ref)
                for key in spent:
                    spent[key] += work[key]
                task, k = in_flight.pop(ref)
                busy[k] -= 1
                counting.written(task.row, task.col)  # counts a chunk as soon as its halo is written
                chunks_done += 1
                telemetry.chunk_written(task.chunk.height * task.chunk.width, work["tiles_predicted"])
            # tiles with no valid pixel skip the model, and a restarted actor may predict some again: the bar is clamped,
            # and full once every chunk is written
            done = len(needed) if not (in_flight or any(queues)) else min(tiles.poll(), len(needed) - 1)
            job.progress.update(bar, completed=max(0, done), detail=f"chunks {chunks_done}/{len(plan.grid)}")
    except Exception:
        _settle(list(in_flight) + counting.pending())  # no task left writing, and no error left unread for Ray to print
        raise
    return spent


_PROGRESS_SECONDS = 0.5
"""How often the driver asks the actors how many tiles they have predicted."""


class _TilesPredicted:
    """Tiles the model actors have predicted since a scene started, asked in their ``progress`` concurrency group (so a
    chunk in work never blocks the answer) and never waited for: each poll collects the answers that have arrived."""

    def __init__(self, actors: list):
        self._actors = actors
        self._last = [_answer(ref) for ref in [self._ask(a) for a in actors]]
        self._pending: dict = {}
        self.total = 0

    @staticmethod
    def _ask(actor):
        return actor.progress.options(concurrency_group=PROGRESS_GROUP).remote()

    def poll(self) -> int:
        import ray

        if self._pending:
            ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
            for ref in ready:
                k = self._pending.pop(ref)
                value, last = _answer(ref), self._last[k]
                if value is None:
                    continue  # a restarting actor: its next answer counts
                # a restarted actor counts from zero again
                self.total += value - last if last is not None and value >= last else value
                self._last[k] = value
        if not self._pending:
            self._pending = {self._ask(a): k for k, a in enumerate(self._actors)}
        return self.total


def _answer(ref) -> int | None:
    import ray

    try:
        return ray.get(ref)
    except Exception:  # noqa: BLE001  (an actor restarting or gone: progress is only shown, never trusted)
        return None


def _settle(refs: list) -> None:
    """Wait for ``refs`` and read each, dropping their errors: a scene that already failed says so once."""
    import ray

    for ref in refs:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001  (the scene's first error is the one reported)
            pass


def _scene_row(
    job: _RunningJob, scene: _Scene, plan: ScenePlan, store: Path, counts, boundary_width: int, spent: dict,
    resumed: set, seconds: float, predict_seconds: float,
) -> dict:
    """The scene's row of the scenes table: provenance, sizes, settings, work done and timings.

    Work and throughput count only what this run computed: chunks resumed from an earlier run are counted apart.
    """
    spec, model, info = job.spec, job.model, scene.info
    computed = (plan.grid.window(r, c) for r, c in plan.grid if (r, c) not in resumed)
    mpx = sum(w.height * w.width for w in computed) / 1e6
    return {
        "scene": scene.name,
        "image": recorded_path(scene.spec.image),  # found again from any folder (`satseg report`)
        "labels": recorded_path(scene.spec.labels) if scene.spec.labels else None,
        "mask": str(store),
        "height": info.height,
        "width": info.width,
        "bands": scene.bands,
        "num_classes": len(model.class_names),
        "class_names": model.class_names,
        "crs": info.crs,
        "valid_pixels": int(counts.valid.sum()),
        "boundary_width": boundary_width if scene.labels is not None else None,
        "boundary_convention": spec.boundary_convention if scene.labels is not None else None,
        "probabilities": f"{store}/probabilities" if spec.save_probabilities else None,
        "label_values": spec.label_values,
        "mask_label_values": False,
        "ignore_index": spec.ignore_index,
        "model": model.source.name,
        "checkpoint": model.source.checkpoint,
        "checkpoint_sha256": model.checkpoint_sha256,
        "tile_size": spec.tile_size,
        "overlap": spec.overlap,
        "chunk_size": plan.grid.chunk,
        "stitch": spec.stitch,
        "window": spec.window,
        "refine": spec.refine,
        "refine_options": json.dumps(spec.refine_settings.model_dump(), sort_keys=True) if spec.refine_settings else None,
        "tiles_lattice": len(plan.lattice),
        "tiles_computed": spent["tiles_predicted"],
        "tiles_reused": spent["tiles_reused"],
        "nodata_collisions": spent["nodata_collisions"],
        "chunks_resumed": len(resumed),
        "seconds": seconds,
        "predict_seconds": predict_seconds,
        "model_seconds": spent["model_seconds"],
        "actor_busy_seconds": spent["chunk_seconds"],
        "evaluate_seconds": seconds - predict_seconds,
        "megapixels_per_second": mpx / predict_seconds if predict_seconds > 0 and mpx > 0 else None,
        "satseg_version": __version__,
        "finished_at": datetime.now(timezone.utc),
    }


def _run_scene(job: _RunningJob, scene: _Scene) -> SceneResult:
    """Plan, predict and write every chunk, count as chunks land, then overviews, reports, and complete: in that order."""
    from workers.mask_store import mark_complete

    t0 = time.perf_counter()
    spec = job.spec
    plan = plan_scene(
        scene.info.height, scene.info.width, tile=spec.tile_size, overlap=spec.overlap, chunk=spec.effective_chunk_size,
        mode=spec.stitch, refine=spec.refine_settings,
    )
    store, written = _open_store(job, scene, plan)
    counting = _ChunkCounting(plan, store, scene.spec, spec, len(job.model.class_names), written)
    spent = _predict_chunks(job, scene, plan, store, written, counting)
    predict_seconds = time.perf_counter() - t0

    ev = job.progress.add_task(f"{scene.name} evaluate", total=1)
    with dask.config.set(scheduler=dask_scheduler(job.use_ray_dask)):
        counts = counting.result()
        write_overviews(store)  # after the last chunk, before the scene is marked complete
    scores = None
    if counts.total_confusion is not None:
        scores = scene_scores(counts.total_confusion, counts.total_boundary, counts.trimap, counts.histograms)
    job.progress.advance(ev)
    seconds = time.perf_counter() - t0
    row = _scene_row(job, scene, plan, store, counts, counting.spec.boundary_width, spent, written, seconds, predict_seconds)
    write_scene_reports(job.layout, job.job_id, plan.grid, scene.info, job.model.class_names, scores, counts, row)
    job_objects(spec, job.layout, job.job_id, scene.spec, store, job.model.class_names, scene.info, job.use_ray_dask)  # `things`
    mark_complete(store)  # the last write: the scene is done (ARCHITECTURE.md, invariant 6)
    return SceneResult(
        scene.name, scene.info, store, scores.metrics if scores is not None else None, seconds, predict_seconds,
        row["megapixels_per_second"] or 0.0, len(plan.grid), len(written), scores=scores,
        nodata_collisions=row["nodata_collisions"],
    )


def _finished_scene(layout: OutputLayout, job_id: str, name: str, info: SceneInfo) -> SceneResult:
    """A scene finished by an earlier run of the same job, read back from its report."""
    row = pq.read_table(layout.report_file("scenes", job_id, name)).to_pylist()[0]
    tables = {}
    for table in ("classes", "curves"):
        path = layout.report_file(table, job_id, name)
        tables[table] = pq.read_table(path).to_pylist() if path.exists() else []
    scores = scores_from_rows(row, tables["classes"], tables["curves"])
    return SceneResult(
        name, info, layout.mask_store(name), scores.metrics if scores else None, row["seconds"], row["predict_seconds"],
        row["megapixels_per_second"] or 0.0, 0, 0, resumed_whole=True, scores=scores,
        nodata_collisions=row.get("nodata_collisions") or 0,
    )


def run_job(spec: JobSpec, *, show_progress: bool = True) -> JobResult:
    """Run every scene of ``spec``; scenes finished by an earlier run of the same job are skipped."""
    model = resolve_model(spec)
    check_job_things(spec, model.class_names)
    scenes = _validate_scenes(spec, model)
    if model.source.in_channels == 0:  # random weights: as many bands as the first scene selects
        first = scenes[0].bands
        if any(len(s.bands) != len(first) for s in scenes):
            raise SpecError("scenes have different band counts; select the same number of bands with `bands`")
        model = replace(model, source=replace(model.source, in_channels=len(first)))
    if spec.stitch == "auto":  # blend when a pixel's output depends on the whole tile (image pooling)
        from workers.models import model_info

        spec = spec.model_copy(update={"stitch": "blend" if model_info(model.source.name).whole_tile_context else "crop"})
    layout = OutputLayout(Path(spec.out))
    use_ray_dask = connect(spec.address)  # before anything is written: a bad address leaves no trace
    job_id = job_id_of(spec, model, _actor_device(spec))
    claim_output(layout, job_id, spec.model_dump(mode="json"))
    result = JobResult(job_id, layout, model)
    states = start_scene_states(
        layout, job_id, model_key(model.checkpoint_sha256, spec.model, dict(spec.model_options), spec.seed, model.init_sha256),
        [(s.name, str(s.spec.image), len(ChunkGrid(s.info.height, s.info.width, spec.effective_chunk_size))) for s in scenes],
    )
    job = None
    failures: list[tuple[str, Exception]] = []
    with progress_bar(show_progress) as progress:
        for scene in scenes:
            name = scene.name
            if scene_complete(layout, name):
                result.scenes.append(_finished_scene(layout, job_id, name, scene.info))
                continue
            running = states[name].moved(RUNNING)
            write_scene_state(layout, running)
            try:
                if job is None:  # the model actors start with the first scene that needs them
                    started = time.perf_counter()
                    job = _RunningJob(spec, layout, job_id, model, _actors(spec, model.source), use_ray_dask, progress)
                    result.startup_seconds = time.perf_counter() - started
                result.scenes.append(_run_scene(job, scene))
            except Exception as err:  # one bad scene does not stop the others; the job fails at the end
                write_scene_state(layout, running.moved(FAILED, chunks_done=chunks_marked(layout, name), reason=one_line(err)))
                failures.append((name, err))
                continue
            except BaseException as err:  # interrupted: say so, and stop
                write_scene_state(layout, running.moved(FAILED, chunks_done=chunks_marked(layout, name), reason=one_line(err)))
                raise
            write_scene_state(layout, running.moved(DONE, chunks_done=running.chunks_total))
    if job is not None:
        import ray

        for a, _ in job.actors:
            ray.kill(a)
    _write_aggregates(layout, job_id)
    from pipeline.stac_output import write_stac

    write_stac(layout, [s.name for s in scenes])  # a STAC item per complete scene, and the job's collection
    unexpected = [err for _, err in failures if user_error(err) is None]
    if unexpected:
        raise unexpected[0]  # not the user's doing: as it is, with its traceback
    if len(failures) == 1:
        raise failures[0][1]
    if failures:
        name, err = failures[0]
        raise ScenesFailedError(
            f"{len(failures)} of {len(scenes)} scenes failed, first {name}: {one_line(err)}; "
            f"`satseg status {layout.root}` lists them; fix them and rerun to resume"
        ) from err
    return result


def _job_rows(layout: OutputLayout, table: str, job_id: str) -> list[dict]:
    folder = layout.reports / table / f"job_id={job_id}"
    return [row for f in sorted(folder.glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def _write_aggregates(layout: OutputLayout, job_id: str) -> None:
    """Micro and macro aggregates over every finished scene of the job, from its own report tables."""
    scenes = _job_rows(layout, "scenes", job_id)
    if any(s.get("confusion") is not None for s in scenes):
        table = aggregates_table(scenes, _job_rows(layout, "classes", job_id), _job_rows(layout, "curves", job_id))
        write_table(table, layout.aggregates_file(job_id))
