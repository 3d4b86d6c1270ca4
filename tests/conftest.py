"""Shared fixtures: one real local Ray instance per session, generated GeoTIFFs in tmp dirs."""

from __future__ import annotations

import os
import tempfile

import pytest

# commands run by the tests log to a file of their own, not to the user's ~/.local/state/satseg/satseg.log
os.environ.setdefault("SATSEG_LOG_FILE", os.path.join(tempfile.mkdtemp(prefix="satseg-tests-"), "satseg.log"))

CLASSES = ["water", "forest", "cropland", "urban", "bare_soil"]
TINY = {"width_multiplier": 0.25}


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray instance on 127.0.0.1, shared by the whole session."""
    import ray

    from pipeline.cluster import connect

    connect(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def odd_scene(tmp_path_factory):
    """A 4-band scene of odd size (not a multiple of tile or chunk) with labels and a nodata swath."""
    from pipeline.synthetic import write_synthetic_scene

    return write_synthetic_scene(tmp_path_factory.mktemp("scene"), "odd", 301, 367, seed=5, cell=40)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: they gain nothing from threads, and OpenMP threads crawl on
    shared, busy CPUs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
