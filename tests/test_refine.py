"""Refinement after stitching (SLIC votes, mean-field CRF): equal to plain references written from the definitions,
the same bits on numpy and torch, and the same bits chunked as whole, for chunk sizes that do not divide the scene."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from pipeline.core.geometry import ChunkGrid, Window
from pipeline.core.plan import plan_scene
from pipeline.core.refine import (
    crf_marginals, exp32, refine_classes, refine_region, slic_superpixels, slic_vote,
)
from schemas.errors import SpecError
from schemas.job import job_from_dict
from schemas.refine import CRFOptions, SLICOptions

H, W, B, C = 301, 367, 3, 4
CRF = CRFOptions(iterations=3, radius=3, smooth_sigma_xy=1.0, appearance_sigma_xy=2.0, appearance_sigma_rgb=0.7,
                 smooth_weight=1.5, appearance_weight=2.5)
SLIC = SLICOptions(step=8, compactness=2.0, iterations=3)
SCENE = Window(0, 0, H, W)


def _smooth(rng: np.random.Generator, count: int, cell: int) -> np.ndarray:
    """``count`` smooth random fields over the scene: coarse noise, bilinearly upsampled."""
    coarse = rng.normal(size=(count, H // cell + 2, W // cell + 2))
    fr, fc = np.arange(H) / cell, np.arange(W) / cell
    r0, c0 = fr.astype(int), fc.astype(int)
    wr, wc = (fr - r0)[None, :, None], (fc - c0)[None, None, :]
    g = coarse
    top = g[:, r0][:, :, c0] * (1 - wc) + g[:, r0][:, :, c0 + 1] * wc
    bottom = g[:, r0 + 1][:, :, c0] * (1 - wc) + g[:, r0 + 1][:, :, c0 + 1] * wc
    return top * (1 - wr) + bottom * wr


@pytest.fixture(scope="module")
def scene():
    """A standardised image of blobs with noise, noisy class probabilities that mostly follow the blobs, and a hole
    without data."""
    rng = np.random.default_rng(3)
    regions = _smooth(rng, C, 30).argmax(0)
    image = (np.eye(B, C)[:, regions] * 2.0 + rng.normal(scale=0.4, size=(B, H, W))).astype(np.float32)
    logits = np.eye(C)[regions].transpose(2, 0, 1) * 2.0 + rng.normal(scale=1.2, size=(C, H, W))
    p = np.exp(logits)
    probs = (p / p.sum(0)).astype(np.float32)
    valid = np.ones((H, W), bool)
    valid[:25, :40] = False  # a corner without data
    valid[150:160, 200:260] = False
    image[:, ~valid] = 0  # as the reader normalises pixels without data
    classes = probs.argmax(0).astype(np.uint8)
    classes[~valid] = 255
    return probs, classes, image, valid


# ---- references, written from the definitions (float64, plain loops) ---------------------------------------------


def crf_reference(probs, image, valid, o: CRFOptions) -> np.ndarray:
    """Mean-field inference (Kraehenbuehl & Koltun 2011, Potts): Q_i = softmax(log P_i - mu . sum_m w_m sum_j k_m(i, j) Q_j)
    over j != i within the square of radius r inside the scene, each kernel divided by its spatial sum; pixels
    without data hold Q = 0."""
    P, I = probs.astype(np.float64), image.astype(np.float64)
    r = o.kernel_radius
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    gs = {d: math.exp(-(d[0] ** 2 + d[1] ** 2) / (2 * o.smooth_sigma_xy**2)) for d in offsets}
    ga = {d: math.exp(-(d[0] ** 2 + d[1] ** 2) / (2 * o.appearance_sigma_xy**2)) for d in offsets}
    zs, za = sum(gs.values()), sum(ga.values())
    potts = 1.0 - np.eye(C)
    with np.errstate(divide="ignore"):
        unary = np.log(P)
    Q = np.where(valid, P, 0.0)
    for _ in range(o.iterations):
        M = np.zeros_like(P)
        for dy, dx in offsets:
            Qj, Ij = np.zeros_like(Q), np.zeros_like(I)
            inside = np.zeros((H, W), bool)
            ti = (slice(max(0, -dy), H - max(0, dy)), slice(max(0, -dx), W - max(0, dx)))  # i with j = i + d inside
            tj = (slice(max(0, dy), H - max(0, -dy)), slice(max(0, dx), W - max(0, -dx)))
            Qj[(slice(None), *ti)] = Q[(slice(None), *tj)]
            Ij[(slice(None), *ti)] = I[(slice(None), *tj)]
            inside[ti] = True
            appearance = np.exp(-((I - Ij) ** 2).sum(0) / (2 * o.appearance_sigma_rgb**2))
            k = o.smooth_weight * gs[(dy, dx)] / zs + o.appearance_weight * ga[(dy, dx)] / za * appearance
            M += np.where(inside, k, 0.0) * Qj
        U = unary - np.einsum("cd,dhw->chw", potts, M)
        e = np.exp(U - U.max(0))
        Q = np.where(valid, e / e.sum(0), 0.0)
    return Q


def slic_reference(image, valid, o: SLICOptions, origin=(0, 0)) -> np.ndarray:
    """SLIC (Achanta et al. 2012, Algorithm 1) with gSLICr's search region: start from the lattice cells' means, then
    each centre in turn claims the pixels of its 3 x 3 cells that are nearer to it than to any centre before it."""
    S, m = o.step, o.compactness
    h, w = valid.shape
    ny, nx = -(-h // S), -(-w // S)
    colour = np.rint(image.astype(np.float64) * 256) / 256
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    ys += origin[0]
    xs += origin[1]
    own = (np.arange(h)[:, None] // S) * nx + np.arange(w)[None, :] // S

    def block(k):  # the pixels whose search reaches centre k: its cell's 3 x 3 cells
        ky, kx = divmod(k, nx)
        return slice(max(0, (ky - 1) * S), min(h, (ky + 2) * S)), slice(max(0, (kx - 1) * S), min(w, (kx + 2) * S))

    def means(label, old):
        new = dict(old)
        for k in range(ny * nx):
            rows, cols = block(k)
            members = valid[rows, cols] & (label[rows, cols] == k)
            if members.any():
                new[k] = (colour[:, rows, cols][:, members].mean(1), ys[rows, cols][members].mean(), xs[rows, cols][members].mean())
        return new

    centres = means(own, {})
    label = own
    for _ in range(o.iterations):
        dist = np.full((h, w), np.inf)
        label = own.copy()
        for k in sorted(centres):
            rows, cols = block(k)
            c, cy, cx = centres[k]
            d = ((colour[:, rows, cols] - c[:, None, None]) ** 2).sum(0)
            d = d + (m / S) ** 2 * ((ys[rows, cols] - cy) ** 2 + (xs[rows, cols] - cx) ** 2)
            nearer = d < dist[rows, cols]
            dist[rows, cols][nearer] = d[nearer]
            label[rows, cols][nearer] = k
        centres = means(label, centres)
    return label


def vote_reference(probs, classes, valid, label, vote) -> tuple[np.ndarray, np.ndarray]:
    """Each superpixel's class (majority of network classes, or argmax of mean probabilities), and per pixel the
    margin of the winner over the runner-up."""
    out = np.full(label.shape, 255, np.uint8)
    margin = np.full(label.shape, np.inf)
    for k in np.unique(label[valid]):
        members = valid & (label == k)
        score = np.bincount(classes[members], minlength=C).astype(float) if vote == "majority" else probs[:, members].astype(np.float64).mean(1)
        top = np.sort(score)[::-1]
        out[members] = np.argmax(score)
        margin[members] = top[0] - top[1]
    return out, margin


# ---- the building blocks --------------------------------------------------------------------------------------------


def test_exp32_is_within_two_ulp_and_the_same_bits_in_torch():
    x = np.random.default_rng(0).uniform(-87, 88, 200_003).astype(np.float32)
    got = exp32(x)
    assert np.allclose(got, np.exp(x.astype(np.float64)), rtol=2.5e-7, atol=0)
    assert np.array_equal(exp32(torch.from_numpy(x)).numpy().view(np.int32), got.view(np.int32))


def test_crf_equals_the_mean_field_reference(scene):
    probs, _, image, valid = scene
    q = crf_marginals(probs, image, valid, CRF)
    ref = crf_reference(probs, image, valid, CRF)
    assert np.abs(q - ref).max() < 2e-6
    top = np.sort(ref, axis=0)
    clear = valid & (top[-1] - top[-2] > 1e-4)  # argmax ties within float32 rounding are no test of the definition
    assert np.array_equal(q.argmax(0)[clear], ref.argmax(0)[clear])
    changed = valid & (ref.argmax(0) != probs.argmax(0))
    assert 0.01 < changed.mean() < 0.5  # the test data gives the CRF something to do


def test_slic_equals_the_textbook_reference(scene):
    probs, classes, image, valid = scene
    label = slic_superpixels(image, valid, SCENE, SLIC)
    ref = slic_reference(image, valid, SLIC)
    # float32 distances against float64 ones: a pixel almost equally near two centres may go either way
    assert (label[valid] != ref[valid]).mean() < 2e-4
    n = -(-H // SLIC.step) * -(-W // SLIC.step)
    for vote in ("majority", "mean"):
        got = slic_vote(probs, classes, valid, label, n, vote)
        want, margin = vote_reference(probs, classes, valid, label, vote)
        assert np.array_equal(got[valid & (margin > 1e-4)], want[valid & (margin > 1e-4)])
        assert np.all(got[~valid] == 255)
        assert 0.02 < (got != classes)[valid].mean() < 0.5


@pytest.mark.parametrize("options", [CRF, SLIC, SLIC.model_copy(update={"vote": "majority"})], ids=["crf", "slic", "slic-majority"])
def test_torch_gives_the_same_bits_as_numpy(scene, options):
    probs, classes, image, valid = scene
    region = Window(0, 0, 160, 200)  # a part is enough: the same operations run on every pixel
    part = region.slices_in(SCENE)
    args = (probs[:, part[0], part[1]], classes[part], image[:, part[0], part[1]], valid[part])
    got = refine_classes(*args, region, options)
    on_torch = refine_classes(*(torch.from_numpy(np.ascontiguousarray(a)) for a in args), region, options)
    assert np.array_equal(on_torch.numpy(), got)


# ---- chunked equals whole -------------------------------------------------------------------------------------------


def chunked(scene, options, chunk: int, what: str = "classes") -> np.ndarray:
    """Refine each chunk over its region (the chunk plus the halo), keep the chunk: as the actors do."""
    probs, classes, image, valid = scene
    grid = ChunkGrid(H, W, chunk)
    out = None
    for r, c in grid:
        win = grid.window(r, c)
        region = refine_region(win, H, W, options)
        sl = region.slices_in(SCENE)
        args = (probs[:, sl[0], sl[1]], classes[sl], image[:, sl[0], sl[1]], valid[sl])
        if what == "marginals":
            part = crf_marginals(args[0], args[2], args[3], options)
        elif what == "superpixels":  # as scene-lattice indexes, comparable across regions
            local = slic_superpixels(args[2], args[3], region, options)
            nx = -(-region.width // options.step)
            part = (local // nx + region.row_off // options.step) * 10_000 + local % nx + region.col_off // options.step
        else:
            part = refine_classes(*args, region, options)
        if out is None:
            out = np.zeros(part.shape[:-2] + (H, W), part.dtype) - 1
        out[(Ellipsis, *win.slices_in(SCENE))] = part[(Ellipsis, *win.slices_in(region))]
    return out


@pytest.mark.parametrize("chunk", [64, 100, 173])
def test_crf_chunked_equals_whole_scene_bit_for_bit(scene, chunk):
    whole_q = chunked(scene, CRF, 1000, "marginals")
    assert np.array_equal(chunked(scene, CRF, chunk, "marginals").view(np.int32), whole_q.view(np.int32))
    assert np.array_equal(chunked(scene, CRF, chunk), chunked(scene, CRF, 1000))


def test_a_crf_halo_one_pixel_short_is_not_enough(scene):
    """The halo is radius x iterations, not less: the test above would see a smaller one."""
    probs, _, image, valid = scene
    whole = crf_marginals(probs, image, valid, CRF)
    halo = CRF.kernel_radius * CRF.iterations - 1
    chunk = Window(100, 100, 64, 64)
    region = Window(chunk.row_off - halo, chunk.col_off - halo, 64 + 2 * halo, 64 + 2 * halo)
    sl = region.slices_in(SCENE)
    part = crf_marginals(probs[:, sl[0], sl[1]], image[:, sl[0], sl[1]], valid[sl], CRF)[(slice(None), *chunk.slices_in(region))]
    assert not np.array_equal(part, whole[(slice(None), *chunk.slices_in(SCENE))])


@pytest.mark.parametrize("chunk", [64, 100, 173])
def test_slic_chunked_equals_whole_scene_bit_for_bit(scene, chunk):
    assert np.array_equal(chunked(scene, SLIC, chunk, "superpixels"), chunked(scene, SLIC, 1000, "superpixels"))
    for vote in ("mean", "majority"):
        options = SLIC.model_copy(update={"vote": vote})
        assert np.array_equal(chunked(scene, options, chunk), chunked(scene, options, 1000))


# ---- the plan and the job -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["blend", "crop"])
@pytest.mark.parametrize("options", [CRF, SLIC], ids=["crf", "slic"])
def test_plan_reads_the_region_and_counts_each_tiles_users(mode, options):
    plan = plan_scene(H, W, tile=64, overlap=16, chunk=100, mode=mode, refine=options)
    users: dict = {}
    for task in plan.tasks():
        assert task.stitched == refine_region(task.chunk, H, W, options)
        assert task.stitched.intersection(task.chunk) == task.chunk
        assert task.read.intersection(task.stitched) == task.stitched
        if options is SLIC:
            assert task.stitched.row_off % SLIC.step == 0 and task.stitched.col_off % SLIC.step == 0
        for tile in task.tiles:
            users[tile] = users.get(tile, 0) + 1
    assert all(plan.chunks_per_tile(*tile) == n for tile, n in users.items())


def test_refine_is_a_job_option_that_leaves_other_jobs_ids_alone():
    base = {"scenes": [{"image": "a.tif"}], "model": "m", "classes": ["a", "b"]}
    plain = job_from_dict(base)
    assert "refine" not in plain.identity() and "refine_options" not in plain.identity()
    assert plain.refine_settings is None
    crf = job_from_dict({**base, "refine": "crf"})
    assert crf.refine_settings == CRFOptions()
    spelled_out = job_from_dict({**base, "refine": "crf", "refine_options": {"iterations": CRFOptions().iterations}})
    assert spelled_out.identity() == crf.identity()  # options are stored complete
    slic = job_from_dict({**base, "refine": "slic", "refine_options": {"step": 12, "vote": "majority"}})
    assert slic.refine_settings == SLICOptions(step=12, vote="majority")
    for bad, words in [
        ({"refine": "crf", "refine_options": {"step": 8}}, "takes no option 'step'"),
        ({"refine_options": {"step": 8}}, "without refine"),
        ({"refine": "slic", "refine_options": {"step": 64, "iterations": 12}}, "beyond each chunk"),
        ({"refine": "crf", "refine_options": {"radius": 99}}, "radius"),
    ]:
        with pytest.raises(SpecError, match=words) as err:
            job_from_dict({**base, **bad}, "job.yaml")
        assert "\n" not in str(err.value)


def test_refine_flag_of_satseg_run(tmp_path):
    import argparse

    from pipeline.cli import run as run_cli

    parser = argparse.ArgumentParser()
    run_cli.add_arguments(parser)
    job_file = tmp_path / "job.yaml"
    job_file.write_text("scenes: [{image: a.tif}]\nmodel: m\nclasses: [a, b]\nrefine: crf\nrefine_options: {iterations: 2}\n")
    assert run_cli.spec_from_args(parser.parse_args([str(job_file)])).refine_settings == CRFOptions(iterations=2)
    assert run_cli.spec_from_args(parser.parse_args([str(job_file), "--refine", "crf"])).refine_settings.iterations == 2
    assert run_cli.spec_from_args(parser.parse_args([str(job_file), "--refine", "slic"])).refine_settings == SLICOptions()
    assert run_cli.spec_from_args(parser.parse_args([str(job_file), "--refine", "none"])).refine_settings is None
    assert run_cli.spec_from_args(parser.parse_args(["--image", "a.tif", "--model", "m", "--classes", "a,b", "--refine", "slic"])).refine == "slic"


# ---- the actor and a whole job --------------------------------------------------------------------------------------


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize(("mode", "options"), [("blend", CRF), ("crop", SLIC)], ids=["blend-crf", "crop-slic"])
def test_the_actor_refines_chunks_as_the_whole_scene(odd_scene, one_torch_thread, mode, options):
    """TilePredictor stitches each chunk's region on its device, refines it and keeps the chunk (no Ray here)."""
    from workers.predictor import TilePredictor
    from workers.reader import read_image_window

    torch.manual_seed(0)
    predictor = TilePredictor.from_module(_Small().eval(), 5, device="cpu", batch_size=2)

    def run(chunk: int, refine, probabilities: bool = False) -> np.ndarray:
        plan = plan_scene(odd_scene.height, odd_scene.width, tile=64, overlap=16, chunk=chunk, mode=mode, refine=refine)
        out = np.zeros((odd_scene.height, odd_scene.width), np.uint8)
        for task in plan.tasks():
            data = read_image_window(str(odd_scene.image), task.read, [1, 2, 3, 4], [1000.0] * 4, [800.0] * 4, task.chunk)
            result = predictor.predict_chunk(data, task, plan, "hann", "odd", probabilities)
            assert (result.probabilities is not None) == probabilities
            out[task.chunk.row_off : task.chunk.row_stop, task.chunk.col_off : task.chunk.col_stop] = result.mask
        return out

    whole = run(512, options)
    assert np.array_equal(run(100, options, probabilities=True), whole)
    plain = run(512, None)
    assert np.array_equal(whole == 255, plain == 255)  # nodata stays nodata, and nothing else becomes it
    assert (whole != plain).any()


@pytest.mark.slow
@pytest.mark.parametrize("refine", ["crf", "slic"])
def test_a_refined_job_is_the_same_for_other_chunk_sizes_and_actor_counts(ray_local, odd_scene, tmp_path, refine):
    from pipeline.run import run_job
    from tests.test_pipeline import job, stored_mask

    options = {"crf": {"iterations": 3, "radius": 3}, "slic": {"step": 8, "iterations": 3}}[refine]
    first = run_job(job(odd_scene, tmp_path / "a", refine=refine, refine_options=options), show_progress=False)
    other = run_job(
        job(odd_scene, tmp_path / "b", refine=refine, refine_options=options, chunk_size=173, num_actors=2), show_progress=False
    )
    plain = run_job(job(odd_scene, tmp_path / "c"), show_progress=False)
    assert np.array_equal(stored_mask(first), stored_mask(other))
    assert (stored_mask(first) != stored_mask(plain)).any()
    assert first.job_id != plain.job_id
    row = pq.read_table(first.layout.report_file("scenes", first.job_id, "odd")).to_pylist()[0]
    assert row["refine"] == refine and json.loads(row["refine_options"]).items() >= options.items()
    assert pq.read_table(plain.layout.report_file("scenes", plain.job_id, "odd")).to_pylist()[0]["refine"] == "none"
    assert zarr.open_array(str(first.layout.mask_store("odd")), path="mask", mode="r").shape == (odd_scene.height, odd_scene.width)
