import numpy as np
import pytest

from pipeline.core.geometry import ChunkGrid, TileLattice, Window, reflect_index
from pipeline.core.plan import plan_scene


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50])
def test_reflect_index_matches_numpy_pad(n):
    pad = 3 * n + 5
    expected = np.pad(np.arange(n), pad, mode="reflect") if n > 1 else np.zeros(n + 2 * pad, int)
    got = reflect_index(np.arange(-pad, n + pad), n)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("h,w,tile,overlap", [(301, 367, 64, 16), (100, 33, 32, 0), (513, 1000, 128, 37), (5, 7, 32, 8)])
def test_lattice_cores_partition_the_scene(h, w, tile, overlap):
    lat = TileLattice(h, w, tile, overlap)
    owner = np.zeros((h, w), int)
    for r in range(lat.shape[0]):
        for c in range(lat.shape[1]):
            core = lat.core(r, c)
            win = lat.window(r, c)
            assert core.intersection(win) == core  # the core lies inside its tile
            owner[core.row_off : core.row_stop, core.col_off : core.col_stop] += 1
    assert (owner == 1).all()


@pytest.mark.parametrize("chunk", [17, 64, 100, 1000])
def test_tiles_touching_are_exactly_the_touching_tiles(chunk):
    h, w, tile, overlap = 301, 367, 64, 20
    lat = TileLattice(h, w, tile, overlap)
    grid = ChunkGrid(h, w, chunk)
    all_tiles = [(r, c) for r in range(lat.shape[0]) for c in range(lat.shape[1])]
    for rc in grid:
        win = grid.window(*rc)
        blend = lat.tiles_touching(win)
        crop = lat.tiles_touching(win, cores_only=True)
        assert blend == [t for t in all_tiles if lat.window(*t).intersection(win)]
        assert crop == [t for t in all_tiles if lat.core(*t).intersection(win)]


def test_chunk_grid_clips_at_scene_edge():
    grid = ChunkGrid(301, 367, 100)
    assert grid.shape == (4, 4)
    assert grid.window(3, 3) == Window(300, 300, 1, 67)
    assert len(grid) == 16


def test_plan_reads_cover_every_tile_of_a_chunk():
    plan = plan_scene(301, 367, tile=64, overlap=16, chunk=90, mode="blend")
    for task in plan.tasks():
        for r, c in task.tiles:
            assert plan.lattice.window(r, c).intersection(task.read) == plan.lattice.window(r, c)


def test_invalid_overlap_is_refused():
    with pytest.raises(ValueError):
        TileLattice(10, 10, 32, 32)
