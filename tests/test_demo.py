"""`satseg demo` end to end: generated data, a trained model, a real job, and masks worth looking at."""

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main


@pytest.mark.slow
def test_demo_reaches_mean_iou_085(tmp_path, capsys, ray_local):
    out = tmp_path / "demo-output"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mean IoU" in printed and "Mpx/s" in printed
    assert str(out / "masks" / "demo_scene.zarr") in printed and str(out / "reports") in printed
    row = pq.read_table(out / "reports" / "scenes").to_pylist()[0]
    assert row["mean_iou"] >= 0.85, row["mean_iou"]
    assert row["mean_average_precision"] is not None and row["mean_boundary_iou"] is not None
    assert (out / "report.html").stat().st_size > 100_000 and str(out / "report.html") in printed
    model = out / "model" / "demo-hrnet_w18_small_v1.safetensors"
    assert model.is_file()
    # A second demo reuses the data and the trained model and runs the job again.
    mtime = model.stat().st_mtime
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    assert model.stat().st_mtime == mtime
    assert pq.read_table(out / "reports" / "scenes").to_pylist()[0]["mean_iou"] == row["mean_iou"]
