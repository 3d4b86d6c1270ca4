"""A running job's throughput and progress as Ray metrics, which Ray exports for Prometheus and its dashboard.

Recorded on the driver as chunks land, tagged with the job id and the scene.
Ray serves them on each node's metrics export port (on 127.0.0.1 for a local
instance; ``ray.nodes()[i]["MetricsExportPort"]``, and Ray's Prometheus service
discovery file ``/tmp/ray/prom_metrics_service_discovery.json``), prefixed
``ray_``: ``ray_satseg_tiles_predicted_total``, ``ray_satseg_chunks_written_total``,
``ray_satseg_megapixels_written_total``, ``ray_satseg_scene_progress`` (0..1) and
``ray_satseg_megapixels_per_second``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["SceneTelemetry"]

_TAGS = ("job_id", "scene")
_METRICS: dict = {}


def _metrics() -> dict:
    """Ray's metric objects, made once per process (after Ray is connected)."""
    if not _METRICS:
        from ray.util.metrics import Counter, Gauge

        _METRICS.update(
            tiles=Counter("satseg_tiles_predicted", description="tiles the model predicted", tag_keys=_TAGS),
            chunks=Counter("satseg_chunks_written", description="output chunks written to the mask store", tag_keys=_TAGS),
            megapixels=Counter("satseg_megapixels_written", description="megapixels of mask written", tag_keys=_TAGS),
            progress=Gauge("satseg_scene_progress", description="share of the scene's chunks written, 0..1", tag_keys=_TAGS),
            rate=Gauge(
                "satseg_megapixels_per_second", description="the scene's segmentation throughput so far", tag_keys=_TAGS
            ),
        )
    return _METRICS


@dataclass
class SceneTelemetry:
    """One scene's metrics: `chunk_written` after each chunk, from the chunk's own work."""

    job_id: str
    scene: str
    chunks_total: int
    chunks_done: int = 0
    _megapixels: float = 0.0
    _started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self._tags = {"job_id": self.job_id, "scene": self.scene}
        _metrics()["progress"].set(self.chunks_done / max(1, self.chunks_total), tags=self._tags)

    def chunk_written(self, pixels: int, tiles_predicted: int) -> None:
        m = _metrics()
        self.chunks_done += 1
        self._megapixels += pixels / 1e6
        m["chunks"].inc(1, tags=self._tags)
        m["megapixels"].inc(pixels / 1e6, tags=self._tags)
        if tiles_predicted:
            m["tiles"].inc(tiles_predicted, tags=self._tags)
        m["progress"].set(self.chunks_done / max(1, self.chunks_total), tags=self._tags)
        m["rate"].set(self._megapixels / max(1e-9, time.perf_counter() - self._started), tags=self._tags)
