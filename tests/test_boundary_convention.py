"""Boundary IoU conventions: satseg's neutral rule (the default, unchanged) and the reference implementation's.

The reference is Cheng et al.'s boundary IoU API (github.com/bowenc0221/boundary-iou-api,
``boundary_iou/utils/boundary_utils.py``), transcribed below without OpenCV:

    dilation = max(1, int(round(dilation_ratio * sqrt(h**2 + w**2))))
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=dilation)[1:h + 1, 1:w + 1]
    boundary = mask - eroded

applied to each class's binary mask: a pixel of no class (ignored, nodata, a value outside the class list)
belongs to no class mask, and the scene edge is background (the zero padding). Counts are over pixels where
truth and prediction are classes (ARCHITECTURE.md, invariant 5; the reference's panoptic evaluation likewise
takes predicted boundary on void truth out of the union). Per-chunk counts with halos equal the whole-scene
computation for both conventions (invariant 7).
"""

from __future__ import annotations

import argparse

import dask
import numpy as np
import pytest
import zarr
from scipy import ndimage

from pipeline.core.boundary import CONVENTIONS, band_codes, boundary_width_for
from pipeline.core.metrics import boundary_iou, class_indices
from pipeline.counting import CountSpec, array_raster, chunk_counts

C = 4
IGNORE = 255
H, W = 61, 79
CHUNKS = (7, 16, 23, 37, 128)  # none divides 61 or 79; 128 is the whole scene in one chunk


# ---------- the reference, transcribed (numpy only; scipy cross-checks the erosion) ----------


def ref_dilation(h: int, w: int, ratio: float) -> int:
    """mask_to_boundary's band width: the ratio of the image diagonal, rounded, at least 1."""
    dilation = int(round(ratio * np.sqrt(h**2 + w**2)))
    return max(dilation, 1)


def ref_erode(image: np.ndarray, iterations: int) -> np.ndarray:
    """cv2.erode with a 3x3 ones kernel: pixels beyond the image are left out of the minimum (its default border)."""
    out = image.copy()
    for _ in range(iterations):
        rows = out.copy()
        np.minimum(rows[1:], out[:-1], out=rows[1:])
        np.minimum(rows[:-1], out[1:], out=rows[:-1])
        nxt = rows.copy()
        np.minimum(nxt[:, 1:], rows[:, :-1], out=nxt[:, 1:])
        np.minimum(nxt[:, :-1], rows[:, 1:], out=nxt[:, :-1])
        out = nxt
    return out


def ref_mask_to_boundary(mask: np.ndarray, dilation: int) -> np.ndarray:
    """boundary_utils.mask_to_boundary for a given dilation: pad by one zero pixel, erode, crop, subtract."""
    mask = mask.astype(np.uint8)
    h, w = mask.shape
    padded = np.pad(mask, 1, mode="constant", constant_values=0)  # cv2.copyMakeBorder(..., BORDER_CONSTANT, value=0)
    eroded = ref_erode(padded, dilation)[1 : h + 1, 1 : w + 1]
    return (mask - eroded).astype(bool)  # eroded <= mask, so no wrap-around


def ref_counts(truth_idx: np.ndarray, pred_idx: np.ndarray, dilation: int) -> np.ndarray:
    """(3, C): per class |Gb|, |Pb|, |Gb & Pb| from each class's binary masks, over pixels where both are classes."""
    valid = (truth_idx >= 0) & (pred_idx >= 0)
    out = np.zeros((3, C), dtype=np.int64)
    for c in range(C):
        gb = ref_mask_to_boundary(truth_idx == c, dilation) & valid
        pb = ref_mask_to_boundary(pred_idx == c, dilation) & valid
        out[:, c] = gb.sum(), pb.sum(), (gb & pb).sum()
    return out


def ref_iou(truth_idx: np.ndarray, pred_idx: np.ndarray, dilation: int) -> np.ndarray:
    """Per class |Gb & Pb| / |Gb | Pb| from the binary boundaries themselves (NaN where both are empty)."""
    valid = (truth_idx >= 0) & (pred_idx >= 0)
    out = []
    for c in range(C):
        gb = ref_mask_to_boundary(truth_idx == c, dilation) & valid
        pb = ref_mask_to_boundary(pred_idx == c, dilation) & valid
        union = (gb | pb).sum()
        out.append((gb & pb).sum() / union if union else np.nan)
    return np.array(out)


def neutral_counts(truth_idx: np.ndarray, pred_idx: np.ndarray, dilation: int) -> np.ndarray:
    """satseg's documented rule from the same erosion: unscored pixels count as inside every mask."""
    valid = (truth_idx >= 0) & (pred_idx >= 0)
    out = np.zeros((3, C), dtype=np.int64)
    for c in range(C):
        gb = ref_mask_to_boundary((truth_idx == c) | ~valid, dilation) & (truth_idx == c) & valid
        pb = ref_mask_to_boundary((pred_idx == c) | ~valid, dilation) & (pred_idx == c) & valid
        out[:, c] = gb.sum(), pb.sum(), (gb & pb).sum()
    return out


# ---------- maps ----------


def random_case(seed: int, shape=(H, W), block: int = 6):
    """Blocky truth with ignore pixels, label nodata and values outside the class list; a noisy prediction with holes."""
    rng = np.random.default_rng(seed)
    h, w = shape
    coarse = rng.integers(0, C, (h // block + 1, w // block + 1))
    truth = np.kron(coarse, np.ones((block, block), dtype=np.int64))[:h, :w]
    pred = truth.copy()
    flip = rng.random(shape) < 0.1
    pred[flip] = rng.integers(0, C, int(flip.sum()))
    truth[rng.random(shape) < 0.03] = IGNORE  # scattered ignore pixels
    ys, xs = rng.integers(0, h, 3), rng.integers(0, w, 3)
    for y, x in zip(ys, xs):
        truth[y : y + 4, x : x + 5] = IGNORE  # ignored regions, some on the scene edge
    truth[h // 3 : h // 3 + 2, :] = -1  # label nodata (as read from a GeoTIFF)
    truth[rng.random(shape) < 0.01] = C + 2  # a label value outside the class list
    pred[:, w // 2 : w // 2 + 2] = 255  # image nodata in the mask
    pred[rng.random(shape) < 0.01] = 200  # a foreign value: no class
    return truth, pred.astype(np.uint8)


def truth_indices(truth):
    return class_indices(truth, C, ignore_index=IGNORE)


def pred_indices(pred):
    p = pred.astype(np.int64)
    return np.where(p < C, p, -1)


def counts_for(truth, pred, chunk, width, convention=None, trimap=3):
    kwargs = {} if convention is None else {"boundary_convention": convention}
    with dask.config.set(scheduler="threads"):
        return chunk_counts(
            array_raster(pred, chunk), array_raster(truth, chunk), C, ignore_index=IGNORE, boundary_width=width,
            trimap_max=trimap, **kwargs,
        )


def per_chunk(ref_fn, t, p, width, sizes):
    """The whole-scene reference's counts, summed over each chunk's pixels: (rows, cols, 3, C)."""
    valid = (t >= 0) & (p >= 0)
    bands = []
    for c in range(C):
        gb, pb = ref_fn(t, p, width, c)
        bands.append((gb & valid, pb & valid))
    out = np.zeros((len(sizes[0]), len(sizes[1]), 3, C), dtype=np.int64)
    r0 = 0
    for i, hh in enumerate(sizes[0]):
        c0 = 0
        for j, ww in enumerate(sizes[1]):
            win = (slice(r0, r0 + hh), slice(c0, c0 + ww))
            for c, (gb, pb) in enumerate(bands):
                out[i, j, :, c] = gb[win].sum(), pb[win].sum(), (gb[win] & pb[win]).sum()
            c0 += ww
        r0 += hh
    return out


def reference_bands(t, p, width, c):
    return ref_mask_to_boundary(t == c, width), ref_mask_to_boundary(p == c, width)


# ---------- the transcription itself ----------


@pytest.mark.parametrize("dilation", [1, 2, 3, 7])
def test_the_transcription_erodes_as_scipy_does_with_zero_padding(dilation):
    """Whether beyond the one-pixel zero padding is background or left out, the cropped boundary is the same."""
    rng = np.random.default_rng(dilation)
    for _ in range(5):
        mask = np.kron(rng.random((8, 11)) < 0.6, np.ones((4, 4), dtype=bool))[:29, :41]
        mask[rng.random(mask.shape) < 0.05] ^= True
        padded = np.pad(mask, 1, constant_values=False)
        for border in (0, 1):
            eroded = ndimage.binary_erosion(padded, np.ones((3, 3), bool), iterations=dilation, border_value=border)
            assert np.array_equal(ref_mask_to_boundary(mask, dilation), mask & ~eroded[1:-1, 1:-1])
    full = np.ones((9, 12), dtype=bool)  # a mask filling the image: its band is the image's rim
    band = ref_mask_to_boundary(full, dilation)
    inner = np.zeros_like(full)
    inner[dilation : 9 - dilation, dilation : 12 - dilation] = True
    assert np.array_equal(band, full & ~inner)


def test_band_width_from_a_ratio_is_the_references():
    for h, w in [(1, 1), (10, 10), (61, 79), (512, 512), (1024, 2048), (333, 777), (4000, 3000)]:
        for ratio in (0.001, 0.005, 0.01, 0.02, 0.03, 0.05):
            d = ref_dilation(h, w, ratio)
            if d <= 256:
                assert boundary_width_for(h, w, ratio=ratio) == d, (h, w, ratio)


# ---------- the reference convention against the transcription ----------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_reference_convention_equals_mask_to_boundary_whole_scene_and_per_chunk(seed, width):
    truth, pred = random_case(seed)
    t, p = truth_indices(truth), pred_indices(pred)
    assert (t < 0).any() and (p < 0).any()  # ignore, nodata and foreign values are there
    expected = ref_counts(t, p, width)
    expected_iou = ref_iou(t, p, width)
    for chunk in CHUNKS:
        counts = counts_for(truth, pred, chunk, width, "reference")
        assert np.array_equal(counts.total_boundary, expected), f"chunk {chunk}"
        assert np.array_equal(counts.boundary, per_chunk(reference_bands, t, p, width, counts.chunks)), f"chunk {chunk}"
        np.testing.assert_allclose(boundary_iou(counts.total_boundary), expected_iou, rtol=0, atol=1e-15)


@pytest.mark.parametrize("ratio", [0.01, 0.02, 0.05])
def test_reference_convention_with_the_papers_ratio(ratio):
    truth, pred = random_case(10 + int(ratio * 100), shape=(47, 90), block=5)
    t, p = truth_indices(truth), pred_indices(pred)
    d = boundary_width_for(*truth.shape, ratio=ratio)
    assert d == ref_dilation(*truth.shape, ratio)
    expected = ref_counts(t, p, d)
    for chunk in (9, 30, 200):
        counts = counts_for(truth, pred, chunk, d, "reference")
        assert np.array_equal(counts.total_boundary, expected), f"ratio {ratio}, chunk {chunk}"


@pytest.mark.parametrize("shape", [(1, 1), (3, 40), (9, 9), (40, 8)])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_reference_convention_on_scenes_and_chunks_smaller_than_the_halo(shape, chunk):
    rng = np.random.default_rng(sum(shape) * 7 + chunk)
    truth = rng.integers(0, 3, shape)
    truth[rng.random(shape) < 0.15] = IGNORE
    pred = truth.clip(0, 2).astype(np.uint8)
    pred[rng.random(shape) < 0.3] = 1
    pred[rng.random(shape) < 0.1] = 255
    t, p = truth_indices(truth), pred_indices(pred)
    counts = counts_for(truth, pred, chunk, 3, "reference", trimap=10)  # halo 10 > scene and chunk
    assert np.array_equal(counts.total_boundary, ref_counts(t, p, 3))


def test_the_scene_edge_is_background_as_with_zero_padding():
    """A uniform scene: both conventions put a band of width d along the scene edge, and nowhere else."""
    truth = np.ones((H, W), dtype=np.int64)
    pred = np.ones((H, W), dtype=np.uint8)
    for d in (1, 3):
        rim = H * W - (H - 2 * d) * (W - 2 * d)
        for convention in CONVENTIONS:
            counts = counts_for(truth, pred, 16, d, convention)
            assert counts.total_boundary[:, 1].tolist() == [rim, rim, rim], (convention, d)
            assert np.array_equal(counts.total_boundary, ref_counts(truth_indices(truth), pred_indices(pred), d))


def test_ignored_regions_make_boundaries_only_in_the_reference_convention():
    """A perfect prediction: 1.0 under the neutral rule; under the reference, holes in the truth are boundary."""
    truth = np.zeros((40, 40), dtype=np.int64)
    truth[:, 20:] = 1
    pred = truth.astype(np.uint8)
    truth[5:8, 5:8] = IGNORE  # inside class 0
    truth[30, 25] = IGNORE  # inside class 1
    truth[10:13, 28:31] = -1  # label nodata inside class 1
    pred[25:28, 8:11] = 255  # image nodata inside class 0
    t, p = truth_indices(truth), pred_indices(pred)
    neutral = counts_for(truth, pred, 16, 2, "neutral")
    assert boundary_iou(neutral.total_boundary)[:2].tolist() == [1.0, 1.0]
    reference = counts_for(truth, pred, 16, 2, "reference")
    assert np.array_equal(reference.total_boundary, ref_counts(t, p, 2))
    gt, pr, inter = reference.total_boundary[:, :2]
    assert (gt > neutral.total_boundary[0, :2]).all()  # rings around the truth's holes
    assert pr[0] > neutral.total_boundary[1, 0] and pr[1] == neutral.total_boundary[1, 1]  # a ring around the mask's hole
    assert (inter < gt).all() and (boundary_iou(reference.total_boundary)[:2] < 1).all()
    assert neutral.total_boundary[0, 0] == 40 * 20 - 36 * 16  # class 0's rim of width 2: scene edge and class edge


# ---------- neutral: today's behaviour, bit for bit ----------

# Counts computed before the conventions existed, on the arithmetic scene of `_pinned_scene`, chunk 16, trimap 4.
PINNED_NEUTRAL = {
    1: [[201, 110, 118, 183], [312, 259, 240, 293], [183, 102, 106, 166]],
    3: [[395, 299, 302, 361], [395, 361, 336, 358], [361, 272, 276, 327]],
}
PINNED_TRIMAP = (4066, 1232)  # sum of the trimap confusions, trace of the widest


def _pinned_scene():
    """No random generator: a scene defined by arithmetic, so the pinned counts hold on any numpy."""
    y, x = np.mgrid[:37, :53]
    truth = ((y // 6) * 3 + (x // 9) * 2) % 5  # 4: a value outside the class list
    truth[(x * 3 + y * 7) % 23 == 0] = IGNORE
    truth[12:15, 30:36] = -1
    pred = np.where((x + 2 * y) % 11 == 0, (truth + 1) % 4, truth % 4).astype(np.uint8)
    pred[:, 20:22] = 255
    return truth, pred


@pytest.mark.parametrize("width", sorted(PINNED_NEUTRAL))
def test_neutral_is_the_default_and_unchanged(width):
    truth, pred = _pinned_scene()
    default = counts_for(truth, pred, 16, width, None, trimap=4)
    explicit = counts_for(truth, pred, 16, width, "neutral", trimap=4)
    for counts in (default, explicit):
        assert counts.total_boundary.tolist() == PINNED_NEUTRAL[width]
        assert (int(counts.trimap.sum()), int(counts.trimap[-1].trace())) == PINNED_TRIMAP
    assert np.array_equal(default.boundary, explicit.boundary)
    assert np.array_equal(default.trimap, explicit.trimap)
    assert np.array_equal(default.total_confusion, explicit.total_confusion)
    t, p = truth_indices(truth), pred_indices(pred)
    assert np.array_equal(default.total_boundary, neutral_counts(t, p, width))
    reference = counts_for(truth, pred, 16, width, "reference", trimap=4)
    assert np.array_equal(reference.trimap, default.trimap)  # the convention is about boundary IoU only
    assert np.array_equal(reference.total_boundary, ref_counts(t, p, width))
    assert not np.array_equal(reference.total_boundary, default.total_boundary)


@pytest.mark.parametrize("seed", [0, 1])
def test_neutral_equals_its_definition_for_every_chunk_size(seed):
    truth, pred = random_case(seed)
    t, p = truth_indices(truth), pred_indices(pred)
    for width in (1, 3):
        expected = neutral_counts(t, p, width)
        for chunk in CHUNKS:
            assert np.array_equal(counts_for(truth, pred, chunk, width).total_boundary, expected), (width, chunk)


# ---------- where the option lives ----------


def test_unknown_conventions_are_refused():
    block = np.zeros((7, 7), dtype=np.int64)
    with pytest.raises(ValueError, match="convention"):
        band_codes(block, block, width=1, trimap_max=1, depth=2, convention="paper")
    with pytest.raises(ValueError, match="convention"):
        CountSpec(2, boundary_convention="paper")
    from schemas.errors import SpecError
    from schemas.job import ScoringSpec, job_from_dict

    assert ScoringSpec().boundary_convention == "neutral"
    with pytest.raises(SpecError, match="boundary_convention"):
        job_from_dict({"scenes": [{"image": "a.tif"}], "model": "x", "boundary_convention": "paper"})


def test_the_convention_is_part_of_the_job_identity():
    from schemas.job import RUN_SETTINGS, job_from_dict

    assert "boundary_convention" not in RUN_SETTINGS
    base = {"scenes": [{"image": "a.tif"}], "model": "x", "classes": ["a", "b"]}
    neutral = job_from_dict(base).identity()
    reference = job_from_dict({**base, "boundary_convention": "reference"}).identity()
    # neutral, the value every job had before the option existed, leaves the identity (and old job ids) as it was
    assert "boundary_convention" not in neutral and reference["boundary_convention"] == "reference"
    assert {k for k in reference if neutral.get(k) != reference[k]} == {"boundary_convention"}


def test_the_run_flag_sets_the_job_field():
    from pipeline.cli import run as run_cli

    parser = argparse.ArgumentParser()
    run_cli.add_arguments(parser)
    args = parser.parse_args(["--image", "a.tif", "--model", "x", "--classes", "a,b", "--boundary-convention", "reference"])
    assert run_cli.spec_from_args(args).boundary_convention == "reference"
    args = parser.parse_args(["--image", "a.tif", "--model", "x", "--classes", "a,b"])
    assert run_cli.spec_from_args(args).boundary_convention == "neutral"
    with pytest.raises(SystemExit):
        parser.parse_args(["--image", "a.tif", "--boundary-convention", "paper"])


def test_evaluate_takes_the_convention_from_the_flag_or_the_job(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.evaluate import evaluate_mask

    truth, pred = random_case(3)
    labels = np.where(truth < 0, IGNORE, truth).astype(np.uint8)  # a uint8 array: nodata -1 becomes ignored
    zarr.create_array(str(tmp_path / "labels.zarr"), data=labels, chunks=(20, 20))
    zarr.create_array(str(tmp_path / "pred.zarr"), data=pred, chunks=(20, 20))
    t, p = truth_indices(labels), pred_indices(pred)
    names = ["a", "b", "c", "d"]
    got = {}
    for convention in CONVENTIONS:
        ev = evaluate_mask(tmp_path / "pred.zarr", tmp_path / "labels.zarr", class_names=names, boundary_width=2,
                           boundary_convention=convention)
        got[convention] = ev
    assert np.array_equal(got["reference"].scores.boundary_counts, ref_counts(t, p, 2))
    assert np.array_equal(got["neutral"].scores.boundary_counts, neutral_counts(t, p, 2))
    default = evaluate_mask(tmp_path / "pred.zarr", tmp_path / "labels.zarr", class_names=names, boundary_width=2)
    assert default.job_id == got["neutral"].job_id != got["reference"].job_id  # neutral keeps its evaluation id
    job_file = tmp_path / "job.yaml"
    job_file.write_text("classes: [a, b, c, d]\nboundary_width: 2\nboundary_convention: reference\n")
    flags = ["--classes", "a,b,c,d", "--boundary-width", "2", "--boundary-convention", "reference"]
    for k, argv in enumerate((["--job", str(job_file)], flags)):
        out = tmp_path / f"ev{k}"
        assert main(["evaluate", str(tmp_path / "pred.zarr"), str(tmp_path / "labels.zarr"), *argv, "--out", str(out)]) == 0
        assert f"(job id {got['reference'].job_id})" in capsys.readouterr().out  # scored with the reference convention
