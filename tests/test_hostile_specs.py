"""Hostile job and schedule files: alias bombs, deep nesting, huge files and values, bytes that are not UTF-8.

Each is refused quickly, without much memory, as one short line with exit status 2.
"""

from __future__ import annotations

import os
import time
import tracemalloc

import pytest

from schemas.errors import SpecError
from schemas.job import job_from_dict, load_evaluation_spec, load_job
from schemas.schedule import load_schedule
from schemas.specfile import MAX_SPEC_BYTES, excerpt
from tests.test_cli import assert_one_line_error, run_cli

JOB_HEAD = "scenes: [{image: a.tif}]\nmodel: hrnet_w18_small_v1\nclasses: [a, b]\nout: o\n"
SCHEDULE_HEAD = "name: nightly\ncron: '0 2 * * *'\nscenes: {glob: 'in/*.tif'}\nout: results\n"
SHORT = 300  # the most characters a one-line error may take, besides the folder of the file (pytest's are long)


def alias_bomb(levels: int, width: int = 9, indent: str = "  ") -> str:
    """Billion laughs: each anchor is a list of ``width`` aliases of the previous one (width**levels strings)."""
    lines = [f"{indent}l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"{indent}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def short_error(code, err, tmp_path, *fragments):
    """One line, exit status 2, with ``fragments``, and short: under `SHORT` characters besides the folder's path."""
    assert_one_line_error(code, err, *fragments)
    assert len(err.strip().replace(str(tmp_path), "", 1)) < SHORT, len(err)


def job_file(tmp_path, text: str | bytes, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_an_alias_bomb_fails_fast_in_one_line_and_little_memory(capsys, tmp_path):
    job = job_file(tmp_path, JOB_HEAD + "model_options:\n" + alias_bomb(9))
    run_cli(capsys, "run", str(tmp_path / "missing.yaml"))  # imports what `satseg run` needs, outside the measure
    tracemalloc.start()
    start = time.perf_counter()
    try:
        code, _, err = run_cli(capsys, "run", str(job))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 10
    assert peak < 50 << 20, peak
    short_error(code, err, tmp_path, str(job), "aliases", "fewer anchors")


def test_an_alias_bomb_in_a_schedule_is_refused(capsys, tmp_path):
    schedule = job_file(tmp_path, SCHEDULE_HEAD + "job:\n  model: m\n  model_options:\n" + alias_bomb(9, indent="    "),
                        "schedule.yaml")
    code, _, err = run_cli(capsys, "schedule", str(schedule), "--once")
    short_error(code, err, tmp_path, str(schedule), "aliases")


def test_a_few_aliases_still_work(tmp_path):
    job = job_file(
        tmp_path,
        "defaults: &opts {width_multiplier: 0.25}\n".replace("defaults", "model_options")
        + "scenes: [{image: &img a.tif}, {image: *img, name: again}]\nmodel: hrnet_w18_small_v1\nclasses: [a, b]\n",
    )
    spec = load_job(job)
    assert dict(spec.model_options) == {"width_multiplier": 0.25}
    assert [s.image.name for s in spec.scenes] == ["a.tif", "a.tif"]


def test_a_merge_key_bomb_is_refused(tmp_path):
    text = "b0: &b0 {a: 1, b: 2}\n" + "".join(
        f"b{i}: &b{i}\n  <<: [" + ", ".join([f"*b{i - 1}"] * 10) + "]\n" for i in range(1, 8)
    )
    with pytest.raises(SpecError, match="aliases"):
        load_job(job_file(tmp_path, JOB_HEAD + text))


def test_a_self_referring_alias_is_refused(capsys, tmp_path):
    job = job_file(tmp_path, JOB_HEAD + "model_options: &o {x: *o}\n")
    code, _, err = run_cli(capsys, "run", str(job))
    short_error(code, err, tmp_path, str(job), "alias")


@pytest.mark.parametrize("nesting", ["[" * 100_000 + "]" * 100_000, "{a: " * 5_000 + "1" + "}" * 5_000])
def test_deep_nesting_is_refused(capsys, tmp_path, nesting):
    job = job_file(tmp_path, JOB_HEAD + f"model_options: {{x: {nesting}}}\n")
    code, _, err = run_cli(capsys, "run", str(job))
    short_error(code, err, tmp_path, str(job), "nested deeper", "flatten")


def test_deep_nesting_through_aliases_is_refused(tmp_path):
    text = "d0: &d0 [1]\n" + "".join(f"d{i}: &d{i} [[[[*d{i - 1}]]]]\n" for i in range(1, 12))
    with pytest.raises(SpecError, match="nested deeper"):
        load_job(job_file(tmp_path, JOB_HEAD + text))


def test_a_huge_file_is_refused_before_it_is_parsed(capsys, tmp_path):
    job = job_file(tmp_path, JOB_HEAD + "# " + "x" * MAX_SPEC_BYTES + "\n")
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "run", str(job))
    assert time.perf_counter() - start < 5
    short_error(code, err, tmp_path, str(job), "1 MiB")


def test_too_many_values_are_refused(tmp_path):
    job = job_file(tmp_path, JOB_HEAD + "bands: [" + "1, " * 150_000 + "1]\n")
    with pytest.raises(SpecError, match="more than 100000 values"):
        load_job(job)


@pytest.mark.parametrize(
    "options,says",
    [
        ("{width_multiplier: '" + "x" * 500_000 + "'}", "string of 500000 characters"),
        ("{? '" + "k" * 500_000 + "': 1}", "not a keyword name"),
        ("{a: [" + ", ".join(["1"] * 1000) + "]}", "list of 1000 values"),
        ("{" + ", ".join(f"k{i}: 1" for i in range(1000)) + "}", "at most 16 options"),
        ("{a: {b: {c: 1}}}", "must be a number"),
        ("{a: .inf}", "finite"),
        ("{a: " + "9" * 4000 + "}", "too large"),
        ("[1, 2]", "mapping"),
        ("{" + ", ".join(f"k{i}: '" + "v" * 90 + "'" for i in range(8)) + "}", "at most 512"),
    ],
)
def test_model_options_are_bounded_and_quoted_short(capsys, tmp_path, options, says):
    job = job_file(tmp_path, JOB_HEAD + f"model_options: {options}\n")
    code, _, err = run_cli(capsys, "run", str(job))
    short_error(code, err, tmp_path, str(job), "model_options", says)


def test_model_options_in_a_schedule_job_are_bounded(capsys, tmp_path):
    schedule = job_file(
        tmp_path, SCHEDULE_HEAD + "job: {model: m, classes: [a], model_options: {w: '" + "x" * 500_000 + "'}}\n", "s.yaml"
    )
    code, _, err = run_cli(capsys, "schedule", str(schedule), "--once")
    short_error(code, err, tmp_path, str(schedule), "job.model_options", "at most 100")


def test_long_keys_and_values_elsewhere_are_quoted_short(capsys, tmp_path):
    hostile = "\\n\\u2028" + "y" * 200_000
    for text in (
        JOB_HEAD + f'? "{hostile}"\n: 1\n',  # an unknown key: its name is quoted in the message
        JOB_HEAD.replace("classes: [a, b]", f'classes: {{"{hostile}": a}}'),
        JOB_HEAD + "tile_size: " + "7" * 4000 + "\n",
        JOB_HEAD.replace("a.tif", "a" * 100_000 + ".tif"),
        JOB_HEAD.replace("a.tif}", "a.tif, name: " + "n" * 100_000 + "}"),
    ):
        code, _, err = run_cli(capsys, "run", str(job_file(tmp_path, text)))
        short_error(code, err, tmp_path)
    for line in (f"cron: '{'* ' * 100_000}'", f"timezone: '{'z' * 100_000}'", f"name: {'n' * 100_000}"):
        text = SCHEDULE_HEAD.replace("name: nightly\ncron: '0 2 * * *'\n", "") + "job: {model: m, classes: [a]}\n"
        text += "name: nightly\n" * ("name:" not in line) + "cron: '0 2 * * *'\n" * ("cron:" not in line) + line + "\n"
        code, _, err = run_cli(capsys, "schedule", str(job_file(tmp_path, text, "s.yaml")), "--once")
        short_error(code, err, tmp_path)


def test_describe_is_bounded_whatever_the_errors():
    with pytest.raises(SpecError) as exc:
        job_from_dict({"scenes": [{"im": "x" * 10_000}] * 5_000, "model": "m", "classes": ["a"]})
    message = str(exc.value)
    assert len(message) < SHORT and "more" in message and "x" * 100 not in message
    assert excerpt("a\nb\u2028" + "c" * 500, 20) == "a\\nb\\u2028ccccccc..."


@pytest.mark.parametrize("data", [b"\xff\xfes\x00c\x00e\x00n\x00e\x00s\x00", "scenes: [{image: caf\xe9.tif}]\n".encode("latin-1")])
def test_a_job_file_that_is_not_utf8(capsys, tmp_path, data):
    job = job_file(tmp_path, data)
    code, _, err = run_cli(capsys, "run", str(job))
    short_error(code, err, tmp_path, str(job), "not UTF-8", "save it as UTF-8")


def test_a_schedule_file_that_is_not_utf8(capsys, tmp_path):
    schedule = job_file(tmp_path, (SCHEDULE_HEAD + "job: {model: m, classes: [caf\xe9]}\n").encode("latin-1"), "s.yaml")
    code, _, err = run_cli(capsys, "schedule", str(schedule), "--once")
    short_error(code, err, tmp_path, str(schedule), "not UTF-8", "save it as UTF-8")


def test_a_utf8_bom_is_fine(tmp_path):
    assert load_job(job_file(tmp_path, "\ufeff" + JOB_HEAD)).classes == ["a", "b"]


def test_control_characters_are_one_line(capsys, tmp_path):
    job = job_file(tmp_path, JOB_HEAD + "model: \x00\x07\n")
    code, _, err = run_cli(capsys, "run", str(job))
    short_error(code, err, tmp_path, str(job), "U+0000")


@pytest.mark.parametrize("command", [["run"], ["schedule", "--once"]])
def test_a_folder_given_as_the_file(capsys, tmp_path, command):
    folder = tmp_path / "job.yaml"
    folder.mkdir()
    code, _, err = run_cli(capsys, command[0], str(folder), *command[1:])
    short_error(code, err, tmp_path, str(folder), "is a folder")
    with pytest.raises(SpecError, match="is a folder"):
        load_evaluation_spec(folder)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file(capsys, tmp_path):
    job = job_file(tmp_path, JOB_HEAD)
    job.chmod(0)
    try:
        code, _, err = run_cli(capsys, "run", str(job))
    finally:
        job.chmod(0o600)
    short_error(code, err, tmp_path, str(job), "cannot read", "permission")


def test_a_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "schedule", str(tmp_path / "nope.yaml"), "--once")
    short_error(code, err, tmp_path, "nope.yaml", "cannot read")
    with pytest.raises(SpecError, match="cannot read"):
        load_schedule(tmp_path / "nope.yaml")


def test_a_permission_error_is_one_line_even_for_root(capsys, tmp_path, monkeypatch):
    import schemas.specfile

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    job = job_file(tmp_path, JOB_HEAD)
    monkeypatch.setattr(schemas.specfile, "open", refuse, raising=False)
    code, _, err = run_cli(capsys, "run", str(job))
    short_error(code, err, tmp_path, str(job), "cannot read", "Permission denied")


def test_a_path_through_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "plain").write_text("x")
    code, _, err = run_cli(capsys, "schedule", str(tmp_path / "plain" / "s.yaml"), "--once")
    short_error(code, err, tmp_path, "plain/s.yaml", "cannot read")
