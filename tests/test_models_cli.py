"""`satseg models` and `model_costs`: every model with its published size, measured FLOPs and tiling needs."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from pipeline.cli import main
from schemas.errors import SpecError
from tests.test_models import DEEPLABS, HRNETS, PARAMETERS
from workers.models import ModelCosts, create_model, list_models, model_costs



def _convolution_multiply_adds(name: str, tile: int) -> int:
    """Multiply-adds of every convolution on one tile, counted by hand from output sizes and kernels."""
    with torch.device("meta"):
        model = create_model(name, 3, 19).eval()
    total = 0

    def count(conv: torch.nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.empty(1, 3, tile, tile, device="meta"))
    return total


def _listed(capsys, fmt: str) -> str:
    """`satseg models` output; costs are cached per process, so only the first call measures."""
    assert main(["models", "--format", fmt]) == 0
    return capsys.readouterr().out


def test_csv_lists_every_model_with_its_published_parameter_count(capsys):
    rows = list(csv.DictReader(io.StringIO(_listed(capsys, "csv"))))
    assert [row["name"] for row in rows] == list_models() and sorted(PARAMETERS) == list_models()
    for row in rows:
        assert int(row["parameters"]) == PARAMETERS[row["name"]], row
        assert float(row["gflops_per_megapixel"]) > 0, row


def test_deeplab_is_marked_whole_tile_and_hrnet_is_not(capsys):
    rows = {row["name"]: row for row in json.loads(_listed(capsys, "json"))}
    assert {name: rows[name]["whole_tile_context"] for name in HRNETS} == dict.fromkeys(HRNETS, False)
    assert {name: rows[name]["whole_tile_context"] for name in DEEPLABS} == dict.fromkeys(DEEPLABS, True)
    assert {rows[name]["output_stride"] for name in HRNETS} == {4}
    assert {rows[name]["output_stride"] for name in DEEPLABS} == {16}


def test_json_and_csv_agree(capsys):
    as_json = {row["name"]: row for row in json.loads(_listed(capsys, "json"))}
    for row in csv.DictReader(io.StringIO(_listed(capsys, "csv"))):
        assert as_json[row["name"]]["parameters"] == int(row["parameters"])
        assert as_json[row["name"]]["gflops_per_megapixel"] == pytest.approx(float(row["gflops_per_megapixel"]))


def test_table_shows_every_model_with_readable_numbers(capsys):
    table = _listed(capsys, "table")
    lines = table.splitlines()
    assert lines[0].split() == ["name", "parameters", "gflops_per_megapixel", "output_stride", "whole_tile_context"]
    assert len(lines) == 2 + len(PARAMETERS)
    assert "1,540,819" in table and all(name in table for name in PARAMETERS)


@pytest.mark.parametrize("name", ["hrnet_w18_small_v1", "deeplabv3plus_resnet50"])
def test_flops_are_two_per_convolution_multiply_add_scaled_to_a_megapixel(name):
    expected = 2 * _convolution_multiply_adds(name, 256) / 256**2 * 1e6 / 1e9
    assert model_costs(name).gflops_per_megapixel == pytest.approx(expected, rel=1e-9)


def test_flops_per_megapixel_do_not_depend_on_the_tile_for_hrnet():
    small, large = model_costs("hrnet_w18_small_v1", tile=64), model_costs("hrnet_w18_small_v1", tile=128)
    assert small.gflops_per_megapixel == pytest.approx(large.gflops_per_megapixel, rel=1e-9)


def test_costs_follow_bands_and_classes_and_are_cached():
    rgb = model_costs("hrnet_w18_small_v1")
    assert isinstance(rgb, ModelCosts) and model_costs("hrnet_w18_small_v1") is rgb
    multispectral = model_costs("hrnet_w18_small_v1", 13, 19)
    assert multispectral.parameters - rgb.parameters == 10 * 64 * 3 * 3
    assert multispectral.gflops_per_megapixel > rgb.gflops_per_megapixel


@pytest.mark.parametrize("tile", [0, 48, 31, 256.0])
def test_tile_must_be_a_multiple_of_32(tile):
    with pytest.raises(SpecError, match="multiple of 32"):
        model_costs("hrnet_w18_small_v1", tile=tile)


@pytest.mark.parametrize(("argv", "fragment"), [(["--bands", "0"], "--bands"), (["--classes", "-2"], "--classes")])
def test_bad_counts_are_one_line_with_status_2(capsys, argv, fragment):
    code = main(["models", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("satseg: error: ") and fragment in lines[0], err


@pytest.mark.parametrize("command", ["models", "export"])
def test_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0 and f"usage: satseg {command}" in capsys.readouterr().out


_STALE = "the model table is stale: rewrite it with workers.models.costs.write_table()"


def test_the_table_lists_exactly_the_registered_models():
    from workers.model_table import read_table

    assert sorted(read_table()) == list_models(), _STALE


@pytest.mark.slow
def test_the_table_satseg_models_reads_equals_a_fresh_measurement_of_every_model():
    """The table is measured, not quoted: each model as `model_costs` measures it now (the fast suite checks a few).

    (After adding or changing a model: ``python -c "from workers.models.costs import write_table; write_table()"``.)
    """
    from workers.model_table import TABLE_TILE, read_table, tabled_costs

    table = read_table()
    assert sorted(table) == list_models(), _STALE
    for row in tabled_costs(3, 19, table):
        measured = model_costs(row.name, 3, 19, TABLE_TILE)
        assert (row.parameters, row.output_stride, row.whole_tile_context) == (
            measured.parameters, measured.output_stride, measured.whole_tile_context,
        ), row.name
        assert row.gflops_per_megapixel == pytest.approx(measured.gflops_per_megapixel, rel=1e-12), row.name


@pytest.mark.parametrize(("bands", "classes"), [(13, 7), (4, 2), (1, 40)])
def test_the_table_gives_exact_costs_for_any_band_and_class_count(bands, classes):
    """Parameters and FLOPs are bilinear in bands and classes: four tabled corners give any count exactly."""
    from workers.model_table import TABLE_TILE, tabled_costs

    rows = {row.name: row for row in tabled_costs(bands, classes)}
    for name in ("hrnet_w18_small_v1", "pixel_linear", "deeplabv3plus_resnet50"):
        measured = model_costs(name, bands, classes, TABLE_TILE)
        assert rows[name].parameters == measured.parameters, name
        assert rows[name].gflops_per_megapixel == pytest.approx(measured.gflops_per_megapixel, rel=1e-12), name


def test_satseg_models_answers_without_importing_torch():
    """`satseg models` reads the table: no model is built and torch is never imported (it answers in a fraction of a second)."""
    import subprocess
    import sys

    code = "import sys; from pipeline.cli import main; main(['models', '--format', 'csv']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[-1] == "False" and len(out) == 2 + len(list_models())
