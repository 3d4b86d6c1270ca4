"""`satseg report RUN_A RUN_B` over two real jobs, and both pages as a browser shows them (headless Chromium):
every section there, no console error, no request leaving the page, images drawn."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.report import RUN_SECTIONS, SECTIONS
from pipeline.report_compare import COMPARE_SECTIONS
from pipeline.run import run_job
from tests.test_pipeline import job

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def browse(page: Path, tmp: Path) -> dict:
    """What headless Chromium makes of a page: console messages, requests the page made, its DOM, a screenshot."""
    flags = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,3000",
    ]
    net = tmp / "net.json"
    done = subprocess.run(
        [*flags, f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", f"--log-net-log={net}",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180, check=True,
    )
    shot = tmp / "shot.png"
    subprocess.run([*flags, f"--user-data-dir={tmp / 'profile2'}", f"--screenshot={shot}", page.resolve().as_uri()],
                   capture_output=True, timeout=180, check=True)
    events = json.loads(net.read_text())["events"]
    requests = {  # the page's own requests (Chromium's own background traffic has another isolation key)
        e["params"]["url"] for e in events
        if "url" in e.get("params", {}) and str(e["params"].get("network_isolation_key", "")).startswith("file://")
    }
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return {"console": console, "requests": requests, "dom": done.stdout, "shot": np.asarray(Image.open(shot).convert("RGB"))}


@pytest.fixture(scope="module")
def two_runs(ray_local, odd_scene, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    run_job(job(odd_scene, root / "a", chunk_size=128, save_probabilities=True), show_progress=False)
    run_job(job(odd_scene, root / "b", chunk_size=128, overlap=32, stitch="crop", save_probabilities=True), show_progress=False)
    return root / "a", root / "b"


@pytest.mark.slow
def test_report_compares_two_real_runs(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "compare.html"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    text = out.read_text()
    for kind in COMPARE_SECTIONS:
        assert f'data-section="{kind}"' in text, kind
    assert "<td>overlap</td><td>16</td><td>32</td>" in text and "<td>stitch</td><td>blend</td><td>crop</td>" in text
    assert 'alt="odd prediction A"' in text and 'alt="odd prediction B"' in text
    assert main(["report", str(a), str(b)]) == 0 and (a / "compare-b.html").exists()  # the default place: beside A's


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_both_pages_render_in_headless_chromium_offline(two_runs, tmp_path):
    a, b = two_runs
    assert main(["report", str(a), "--out", str(tmp_path / "report.html")]) == 0
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "compare.html")]) == 0
    doms = {}
    for name, kinds in (("report.html", [*SECTIONS, *RUN_SECTIONS]), ("compare.html", COMPARE_SECTIONS)):
        seen = browse(tmp_path / name, tmp_path / name.split(".")[0])
        doms[name] = seen["dom"]
        assert seen["console"] == [], seen["console"]
        assert not {u for u in seen["requests"] if not u.startswith(("file:", "data:"))}, seen["requests"]
        sections = set(re.findall(r'data-section="([a-z-]+)"', seen["dom"]))
        assert set(kinds) <= sections, (name, sections)
        pixels = seen["shot"]
        assert pixels.shape == (3000, 1400, 3)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # images and plots drawn, not a blank page
        header = pixels[:40].reshape(-1, 3)
        assert (np.abs(header.astype(int) - (29, 43, 69)).sum(axis=1) < 10).mean() > 0.5  # the inline CSS applied
    for panel in ("image", "labels", "prediction", "errors"):  # side by side, one extent
        assert f'alt="odd {panel}"' in doms["report.html"], panel
    for panel in ("prediction A", "prediction B", "agreement"):
        assert f'alt="odd {panel}"' in doms["compare.html"], panel
