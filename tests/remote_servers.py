"""Real servers for remote inputs, on 127.0.0.1 and ephemeral ports: an HTTP server honouring Range requests
(Python's own SimpleHTTPRequestHandler ignores them), and an S3-compatible one (moto's server mode)."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine

ROOT = Path(__file__).resolve().parents[1]
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with single byte ranges (206 and Content-Range), as object stores and CDNs do; the server's
    ``deny`` paths answer 403. Each request is one JSON line in the server's log."""

    def log_message(self, *args) -> None:  # quiet: the server keeps its own log
        pass

    def _log(self, status: int) -> None:
        line = json.dumps({"method": self.command, "path": self.path, "range": self.headers.get("Range"), "status": status})
        with self.server.log_lock, open(self.server.log_path, "a") as log:
            log.write(line + "\n")

    def send_head(self):
        url_path = self.path.split("?", 1)[0]
        if url_path in self.server.deny:
            self._log(403)
            self.send_error(403)
            return None
        path = self.translate_path(url_path)
        if not os.path.isfile(path):
            self._log(404)
            self.send_error(404)
            return None
        size = os.path.getsize(path)
        start, stop = 0, size  # [start, stop)
        m = _RANGE.match(self.headers.get("Range") or "")
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                stop = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:  # a suffix: the last n bytes
                start = max(0, size - int(m.group(2)))
            if start >= size or start >= stop:
                self._log(416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
        status = 206 if m else 200
        self._log(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if path.endswith(".json") else "image/tiff")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(stop - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.end_headers()
        f = open(path, "rb")
        f.seek(start)
        self._left = stop - start
        return f

    def copyfile(self, source, outputfile) -> None:
        outputfile.write(source.read(self._left))


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int


@dataclass
class RangeServer:
    """A running server over ``root``: ``url(name)`` of a file under it, ``requests`` as they came."""

    root: Path
    port: int
    log: Path

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    @property
    def requests(self) -> list[Request]:
        text = self.log.read_text() if self.log.exists() else ""
        return [Request(**json.loads(line)) for line in text.splitlines() if line.strip()]


@contextmanager
def _server_process(*args: str):
    """``python -m tests.remote_servers ARGS``: a server in its own process (GDAL holds the GIL in some of its
    network calls, so a server thread in the test's own process could never answer them); yields its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.remote_servers", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"test server {args[0]} did not start: {line!r}")
        yield int(line)
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()


@contextmanager
def range_server(root: Path, deny: tuple[str, ...] = ()):
    """Serve ``root`` over HTTP on 127.0.0.1 (an ephemeral port) until the block ends; ``deny`` paths answer 403."""
    log = Path(root).parent / f"{Path(root).name}.requests.jsonl"
    log.unlink(missing_ok=True)
    with _server_process("http", str(root), str(log), *deny) as port:
        yield RangeServer(Path(root), port, log)


def _serve_http(root: str, log: str, *deny: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=root))
    server.daemon_threads = True
    server.log_path, server.log_lock, server.deny = log, threading.Lock(), set(deny)
    print(server.server_address[1], flush=True)
    server.serve_forever()


@dataclass
class S3Server:
    """moto's S3 on 127.0.0.1: ``env`` is the GDAL configuration a user would export to read from it."""

    endpoint: str  # host:port
    client: object  # boto3's S3 client

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_S3_ENDPOINT": self.endpoint, "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
            "AWS_ACCESS_KEY_ID": "satseg-test", "AWS_SECRET_ACCESS_KEY": "satseg-test", "AWS_REGION": "us-east-1",
        }


@contextmanager
def s3_server():
    """A moto S3 server on 127.0.0.1 (an ephemeral port, its own process) until the block ends."""
    import boto3

    with _server_process("s3") as port:
        client = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="satseg-test",
            aws_secret_access_key="satseg-test", region_name="us-east-1",
        )
        yield S3Server(f"127.0.0.1:{port}", client)


def _serve_s3() -> None:
    import time

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    while True:
        time.sleep(3600)


def write_single_bands(image: Path, directory: Path, names: list[str]) -> dict[str, Path]:
    """Each band of ``image`` as its own tiled GeoTIFF (``<name>.tif``), as Sentinel-2 publishes them."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    with rasterio.open(image) as src:
        profile = src.profile | {"count": 1}
        for k, name in enumerate(names, start=1):
            out[name] = directory / f"{name}.tif"
            with rasterio.open(out[name], "w", **profile) as dst:
                dst.write(src.read(k), 1)
    return out


def write_coarse_band(image: Path, path: Path, band: int, factor: int, *, shift: float = 0.0) -> np.ndarray:
    """``band`` of ``image`` at ``factor`` times its pixel size (every factor-th pixel) over the same extent (moved
    ``shift`` metres east); returns what it holds."""
    with rasterio.open(image) as src:
        data = src.read(band)[::factor, ::factor]
        t = src.transform
        profile = src.profile | {
            "count": 1, "height": data.shape[0], "width": data.shape[1],
            "transform": Affine(t.a * factor, 0.0, t.c + shift, 0.0, t.e * factor, t.f),
        }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return data


COG = "image/tiff; application=geotiff; profile=cloud-optimized"


def stac_asset(href: str, *common_names: str, version: str = "1.0.0", name: str | None = None) -> dict:
    """A STAC asset whose bands carry these common names: STAC 1.0's ``eo:bands``, or 1.1's ``bands``."""
    if version.startswith("1.0"):
        bands = {"eo:bands": [{"name": name or c.upper(), "common_name": c} for c in common_names]}
    else:
        bands = {"bands": [{"name": name or c.upper(), "eo:common_name": c} for c in common_names]}
    return {"href": href, "type": COG, "roles": ["data"], **(bands if common_names else {})}


def write_stac_item(path: Path, assets: dict[str, dict], *, version: str = "1.0.0") -> Path:
    """A STAC Item (a GeoJSON Feature) holding ``assets``, written to ``path``."""
    item = {
        "type": "Feature", "stac_version": version, "id": path.stem, "geometry": None, "bbox": None,
        "properties": {"datetime": "2026-06-01T10:00:00Z"}, "links": [], "assets": assets,
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"] if version.startswith("1.0") else [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(item, indent=1))
    return path


if __name__ == "__main__":
    _serve_http(*sys.argv[2:]) if sys.argv[1] == "http" else _serve_s3()
