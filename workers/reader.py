"""Windowed GeoTIFF reads: scene metadata, and one reflect-padded window at a time.

The scene is never read whole: a window outside the scene is filled by
reflection (numpy's "reflect" mode) from the pixels next to the edge, read
through the same index arithmetic whichever chunk asks, so every chunk sees
the same padded scene.

A raster is read wherever GDAL reads it: a local file, a remote or virtual
path (``s3://``, ``gs://``, ``http(s)://``, ``/vsi*/``, mapped to GDAL's name
by `schemas.rasters.gdal_path`), or a STAC item's bands stacked as VRT text
(`workers.stac_input`). GDAL's own configuration (``AWS_*``, ``GS_*``,
``GDAL_HTTP_*``, from the environment) gives credentials and endpoints.
"""

from __future__ import annotations

import html
import logging
import os
import re
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window as RioWindow
from rasterio.crs import CRS

from pipeline.core.geometry import Window, reflect_index
from schemas.errors import InputFileError, MismatchError, first_line
from schemas.rasters import gdal_path

log = logging.getLogger(__name__)

__all__ = ["SceneInfo", "WindowData", "open_scene", "open_raster", "raster_tags", "check_labels_match", "read_image_window", "read_label_window", "check_bands",
           "normalise", "EXACT_IN_FLOAT32", "grid_difference", "dataset_name", "VRT_NAME_KEY"]


@dataclass(frozen=True)
class SceneInfo:
    """What planning needs to know about a raster, from its metadata only."""

    path: str
    height: int
    width: int
    count: int
    dtype: str
    crs: str | None
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None
    source: str | None = None  # what GDAL opens when it is not `path` itself: a STAC item's bands stacked as VRT text

    @property
    def dataset(self) -> str:
        """What the readers open (`read_image_window`'s ``path``): the stacked VRT text of a STAC item, else the path."""
        return self.source or self.path

    @property
    def affine(self) -> "rasterio.Affine":
        return rasterio.Affine(*self.transform)

    def bounds(self, window: Window) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of a pixel window in the scene CRS: over its four corners, so a rotated grid's too."""
        a = self.affine
        xs, ys = [], []
        for r in (window.row_off, window.row_stop):
            for c in (window.col_off, window.col_stop):
                x, y = a @ (c, r)
                xs.append(x)
                ys.append(y)
        return (min(xs), min(ys), max(xs), max(ys))


EXACT_IN_FLOAT32 = frozenset({"uint8", "int8", "uint16", "int16", "float32"})
"""Pixel types that travel as read: float32 holds each of their values exactly, so the model's device
converts and normalises them with the same result as the reader would (and 16-bit pixels are half the bytes)."""


@dataclass
class WindowData:
    """One read window: the bands as stored, which pixels hold data, and how to normalise them.

    Normalisation happens where the pixels are used (on the model's device in
    an actor; :attr:`image` on the host), so only the file's own bytes cross
    Ray's object store.
    """

    window: Window
    pixels: np.ndarray  # (bands, h, w): as stored when EXACT_IN_FLOAT32 holds its type, else float32
    has_data: np.ndarray  # (h, w) bool: GDAL's dataset mask (rasterio's dataset_mask() > 0), reflected outside the scene
    scene_shape: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    nodata_collisions: int = 0
    """Pixels of the window inside the scene that hold data per the dataset mask while a selected band
    equals that band's nodata value (NaN for a NaN nodata): the nodata value collides with valid data."""

    @property
    def inside(self) -> Window | None:
        """The part of the window inside the scene (None when it lies wholly outside)."""
        return self.window.intersection(Window(0, 0, *self.scene_shape))

    @property
    def valid(self) -> np.ndarray:
        """(h, w) bool: inside the scene and holding data."""
        out = np.zeros(self.has_data.shape, dtype=bool)
        if self.inside is not None:
            part = self.inside.slices_in(self.window)
            out[part] = self.has_data[part]
        return out

    @property
    def image(self) -> np.ndarray:
        """(bands, h, w) float32 normalised bands, 0 where a pixel has no data or a band value is not finite."""
        return normalise(
            self.pixels.astype(np.float32), self.has_data, np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        )


def normalise(image, has_data, mean, std):
    """``(image - mean) / std`` per band, in place, then 0 where a pixel has no data; returns ``image``.

    A band value that is not finite (NaN or infinite) in a pixel that has
    data becomes 0 too, the band's mean: GDAL's dataset mask keeps a pixel
    when any band holds data, so a float pixel may hold a NaN nodata value in
    one band and data in another.

    ``image`` is float32 (bands, h, w), numpy or torch on any device, with
    ``mean`` and ``std`` (bands,) of the same library: only IEEE-exact
    elementwise operations, so host and device give the same bits.
    """
    image -= mean[:, None, None]
    image /= std[:, None, None]
    image[(image != image) | (abs(image) == float("inf"))] = 0
    image[:, ~has_data] = 0
    return image


VRT_NAME_KEY = "satseg_name"
"""The metadata item of a VRT text (a stacked STAC item) that names it in messages, where a path would."""

_VRT_NAME = re.compile(r'<MDI key="' + VRT_NAME_KEY + r'">([^<]*)</MDI>')


def _is_vrt_text(path: str) -> bool:
    """Whether ``path`` is VRT text (GDAL opens the XML itself, as a file) rather than a path."""
    return path.lstrip().startswith("<VRTDataset")


def dataset_name(path: str) -> str:
    """How messages name what ``path`` opens: the path as given, or a VRT text's own name (a STAC item and its bands)."""
    if not _is_vrt_text(path):
        return path
    m = _VRT_NAME.search(path)
    return html.unescape(m.group(1)) if m else "a VRT dataset"


_NOT_FOUND = ("CPLE_AWSObjectNotFoundError", "CPLE_AWSBucketNotFoundError")
_DENIED = ("CPLE_AWSAccessDeniedError", "CPLE_AWSInvalidCredentialsError", "CPLE_AWSSignatureDoesNotMatchError")
_WHERE = "in the environment of satseg and of the Ray workers"


def _credentials_fix(name: str) -> str:
    """Where GDAL takes credentials for ``name`` (a GDAL path) from: its own configuration, from the environment."""
    if name.startswith("/vsis3"):
        return f"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or AWS_NO_SIGN_REQUEST=YES for a public bucket, {_WHERE}"
    if name.startswith("/vsigs"):
        return (f"set GOOGLE_APPLICATION_CREDENTIALS (or GS_ACCESS_KEY_ID and GS_SECRET_ACCESS_KEY), or GS_NO_SIGN_REQUEST=YES "
                f"for a public bucket, {_WHERE}")
    if name.startswith(("/vsiaz", "/vsiadls")):
        return (f"set AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_ACCESS_KEY or AZURE_STORAGE_SAS_TOKEN "
                f"(or AZURE_STORAGE_CONNECTION_STRING) {_WHERE}")
    return f"give a URL the server lets you read (a signed URL, say), or its credentials in GDAL_HTTP_AUTH or GDAL_HTTP_HEADERS {_WHERE}"


def _remote_failure(path: str, role: str, cause: BaseException | None, detail: str) -> InputFileError:
    """GDAL's failure to open a remote or virtual ``path``, as one line: not found, access denied, unreachable, not a raster."""
    kind = type(cause).__name__ if cause is not None else ""
    code = re.search(r"HTTP response code: (\d+)", detail)
    status = int(code.group(1)) if code else None
    if kind in _NOT_FOUND or status in (404, 410) or "does not exist in the file system" in detail:
        return InputFileError(f"{path}: {role} file not found ({detail}); check the path")
    if kind in _DENIED or status in (401, 403):
        return InputFileError(f"{path}: access denied ({detail}); {_credentials_fix(gdal_path(path) or path)}")
    if kind == "CPLE_HttpResponseError" or "CURL error" in detail:
        return InputFileError(f"{path}: cannot reach the {role} file ({detail}); check the URL, and that its server answers")
    return InputFileError(f"{path}: not a readable raster ({detail}); give a GeoTIFF (or another GDAL raster)")


REMOTE_DEFAULTS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_MAX_RETRY": "3", "GDAL_HTTP_RETRY_DELAY": "1"}
"""GDAL configuration for remote and virtual rasters where the environment sets none of its own: do not list the
file's folder nor probe for side-car files, a request each (as rio-tiler and TiTiler do for COGs), and retry a
request the server answers 429 or 5xx three times (1 s, then doubling) rather than fail a chunk of a long job."""


def _remote_defaults() -> dict[str, str]:
    return {k: v for k, v in REMOTE_DEFAULTS.items() if k not in os.environ}


@contextmanager
def _opened(path: str, what: str, role: str = "image"):  # what: "open" or "read"
    """``rasterio.open(path)``, with GDAL's failures as one line naming the file and its first real cause.

    ``path`` is a local path, a remote or virtual one (GDAL opens its `schemas.rasters.gdal_path` name: rasterio
    would otherwise ask boto3 for AWS credentials, where GDAL's own configuration is the one rule), or VRT text.
    A raster without georeferencing (a plain JPEG or PNG, say) opens quietly: it gets the identity transform
    and no CRS, which every output then carries, instead of a warning leaking from each worker.
    """
    remote = gdal_path(path)
    opened = False
    try:
        with warnings.catch_warnings(), ExitStack() as env:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            if remote is not None or _is_vrt_text(path):
                env.enter_context(rasterio.Env(**_remote_defaults()))
            with rasterio.open(remote or path) as src:
                opened = True
                yield src
    except RasterioIOError as err:
        cause = err.__cause__ or err.__context__  # GDAL's own message; rasterio's says "see previous exception"
        name = dataset_name(path)
        detail = first_line(cause if cause is not None else err).replace(f"'{remote or path}' ", "")[:200]  # named once
        if remote is not None and (what == "open" or not opened):  # gone or refused since: its not-found/credentials hint
            raise _remote_failure(name, role, cause, detail) from None
        if what == "open":
            raise InputFileError(f"{name}: not a readable raster ({detail}); give a GeoTIFF (or another GDAL raster)") from None
        raise InputFileError(f"{name}: read failed ({detail}); check the file, and any file it refers to, is complete") from None


def open_raster(path: str | Path, role: str = "image"):
    """A raster opened for reading as the job reads it (local, remote or virtual path, or a STAC item's VRT text):
    a context manager giving the rasterio dataset; a failure is one line (`InputFileError`)."""
    return _opened(str(path), "read", role)


def raster_tags(path: str | Path, role: str = "labels") -> dict[str, str]:
    """The dataset's GDAL metadata tags (e.g. a label raster's ``classes``), opened as every input is."""
    with _opened(str(path), "open", role) as src:
        return src.tags()


def _refuse_stac_item(path: str, role: str) -> None:
    """A local JSON file given as a raster is most likely a STAC item without its bands: say how to give them."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return
    if b'"assets"' in head or b'"stac_version"' in head:
        raise InputFileError(
            f"{path}: a JSON file, not a raster; for a STAC item as the {role} give its bands by common name or asset key "
            "(stac_bands: [blue, green, red, nir] in the job's scene, or --stac-bands blue,green,red,nir)"
        )


def open_scene(path: str | Path, *, role: str = "image", stac_bands: Sequence[str] | None = None) -> SceneInfo:
    """Metadata of a raster; a missing, unreadable or complex-valued file raises `InputFileError`.

    ``path`` is local, remote or virtual (`schemas.rasters.gdal_path`); with ``stac_bands`` it is a STAC item whose
    assets of those bands are stacked in that order (`workers.stac_input.open_stac_scene`).
    """
    if stac_bands is not None:
        from workers.stac_input import open_stac_scene

        return open_stac_scene(str(path), list(stac_bands), role=role)
    path = str(path)
    if gdal_path(path) is None and not _is_vrt_text(path):  # a local file
        if not Path(path).exists():
            raise InputFileError(f"{path}: {role} file not found; check the path")
        if Path(path).is_dir():
            raise InputFileError(f"{path}: is a folder, not a raster; give the {role} file")
        if path.lower().endswith(".json"):
            _refuse_stac_item(path, role)
    with _opened(path, "open", role) as src:
        if src.driver == "VRT":  # GDAL opens a VRT whose source is gone, and fails only at the first read
            missing = [f for f in src.files[1:] if gdal_path(f) is None and not Path(f).exists()]
            if missing:
                raise InputFileError(
                    f"{dataset_name(path)}: its source {missing[0]} does not exist; restore it or fix the VRT's "
                    "SourceFilename"
                )
        complex_bands = [b + 1 for b, t in enumerate(src.dtypes) if t.startswith("complex")]
        if complex_bands:
            raise InputFileError(
                f"{path}: band {complex_bands[0]} holds complex values ({src.dtypes[complex_bands[0] - 1]}); "
                "satseg segments real-valued imagery: convert it first (e.g. to amplitude in dB)"
            )
        return SceneInfo(
                path=path,
                height=src.height,
                width=src.width,
                count=src.count,
                dtype=src.dtypes[0],
                crs=src.crs.to_wkt() if src.crs else None,
                transform=tuple(src.transform)[:6],
                nodata=src.nodata,
            )


def grid_difference(a: SceneInfo, b: SceneInfo, *, shape_only: bool = False) -> str | None:
    """How ``b``'s pixel grid differs from ``a``'s (``"shape HxW differs from HxW"``, ``"CRS differs"``,
    ``"transform differs"``), or None when they match pixel for pixel.

    The one rule for matching two rasters: `satseg run` (image and labels) and
    `satseg evaluate` (mask and labels) both use it. CRSs are compared as
    coordinate systems, not as text; transforms agree to a millionth of a pixel.
    """
    if (a.height, a.width) != (b.height, b.width):
        return f"shape {b.height}x{b.width} differs from {a.height}x{a.width}"
    if shape_only:
        return None
    if (a.crs is None) != (b.crs is None) or (a.crs is not None and CRS.from_wkt(a.crs) != CRS.from_wkt(b.crs)):
        return "CRS differs"
    pixel = max(abs(v) for v in (a.transform[0], a.transform[1], a.transform[3], a.transform[4])) or 1.0
    if not np.allclose(a.transform[:6], b.transform[:6], rtol=0, atol=1e-6 * pixel):
        return "transform differs"
    return None


def check_labels_match(image: SceneInfo, labels: SceneInfo) -> None:
    """Labels must share the image's shape, CRS and transform, pixel for pixel."""
    fix = "resample or crop the labels onto the image grid"
    if labels.count < 1:
        raise MismatchError(f"{labels.path}: label raster has no band; {fix}")
    difference = grid_difference(image, labels)
    if difference is not None:
        raise MismatchError(f"{labels.path}: label {difference} (image {image.path}); {fix}")


def check_bands(scene: SceneInfo, bands: Sequence[int]) -> None:
    """Every requested band (1-based) must exist in the scene."""
    missing = [b for b in bands if not 1 <= b <= scene.count]
    if missing:
        raise InputFileError(
            f"{scene.path}: band {missing[0]} does not exist (the file has {scene.count}); "
            f"choose bands between 1 and {scene.count}"
        )


def _axis_take(index: np.ndarray) -> tuple[int, int, slice | np.ndarray]:
    """Bounding range of reflected indexes, and how to take them from it (a slice when contiguous)."""
    lo, hi = int(index.min()), int(index.max()) + 1
    if hi - lo == len(index) and index[0] == lo and (len(index) < 2 or index[1] > index[0]):
        return lo, hi, slice(None)
    return lo, hi, index - lo


def _dataset_mask(src, rw: RioWindow) -> np.ndarray:
    """(h, w) bool: GDAL's dataset mask over ``rw``, exactly rasterio's ``dataset_mask() > 0``.

    A per-dataset mask (internal or ``.msk``) or an alpha band is the mask;
    else a pixel holds data when any band's mask (its nodata value, NaN
    included, per band) says so; with no nodata at all every pixel does.
    Every band of the file counts, selected or not, and (rasterio's rule) a
    4-band file whose band 1 is red takes band 4's mask. Only the window's
    blocks are read.
    """
    if all(flags == [MaskFlags.all_valid] for flags in src.mask_flag_enums):
        return np.ones((rw.height, rw.width), dtype=bool)
    return src.dataset_mask(window=rw) > 0


def _equals_nodata(band: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """(h, w) bool: where ``band`` holds its nodata value, as stored in the band's type; None when it never can."""
    if nodata is None:
        return None
    if band.dtype.kind == "f":
        return np.isnan(band) if np.isnan(nodata) else band == band.dtype.type(nodata)
    if band.dtype.kind in "iu":
        info = np.iinfo(band.dtype)
        if not (np.isfinite(nodata) and float(nodata).is_integer() and info.min <= nodata <= info.max):
            return None
        return band == band.dtype.type(int(nodata))
    return band == nodata


def _collisions(src, indexes, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(h, w) bool over the read block: pixels with data per the dataset mask where a selected band equals its nodata."""
    out = np.zeros(valid.shape, dtype=bool)
    for k, i in enumerate(indexes):
        equal = _equals_nodata(data[k], src.nodatavals[i - 1])
        if equal is not None:
            out |= equal
    out &= valid
    return out


def _padded_read(src, window: Window, indexes, count_in: Window | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The window's bands and dataset mask, reflected alike, and its nodata collisions inside the scene
    (and inside ``count_in``, when given)."""
    rows = reflect_index(np.arange(window.row_off, window.row_stop), src.height)
    cols = reflect_index(np.arange(window.col_off, window.col_stop), src.width)
    r0, r1, take_r = _axis_take(rows)
    c0, c1, take_c = _axis_take(cols)
    rw = RioWindow(c0, r0, c1 - c0, r1 - r0)
    data = src.read(indexes, window=rw)
    valid = _dataset_mask(src, rw)
    # each pixel of the window inside the scene is itself in the read block: count those once, unreflected
    collisions = 0
    inside = window.intersection(Window(0, 0, src.height, src.width))
    if inside is not None and count_in is not None:
        inside = inside.intersection(count_in)
    if inside is not None:
        part = inside.slices_in(Window(r0, c0, r1 - r0, c1 - c0))
        collisions = int(_collisions(src, indexes, data[(slice(None), *part)], valid[part]).sum())
    # one axis at a time: whole rows are copied as blocks, and only the columns gathered
    if isinstance(take_r, np.ndarray):
        data, valid = np.take(data, take_r, axis=1), np.take(valid, take_r, axis=0)
    if isinstance(take_c, np.ndarray):
        data, valid = np.take(data, take_c, axis=2), np.take(valid, take_c, axis=1)
    return data, valid, collisions


def read_image_window(
    path: str,
    window: Window,
    bands: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    count_in: Window | None = None,
) -> WindowData:
    """Read ``window`` (may extend outside the scene) with GDAL's dataset mask; :attr:`WindowData.image` normalises.

    A pixel holds data exactly where GDAL (rasterio's ``dataset_mask``, QGIS)
    says so: per the per-dataset mask or alpha band when there is one, else
    where any band is not its nodata value. Pixels holding data where a
    selected band equals its nodata value are counted (``nodata_collisions``)
    and logged as a warning; with ``count_in`` (a chunk), only those inside it, so that
    windows overlapping their neighbours' count each pixel once.
    """
    with _opened(path, "read") as src:
        raw, mask, collisions = _padded_read(src, window, list(bands), count_in)
        shape = (src.height, src.width)
    if collisions:
        log.warning(
            "%s: nodata value collides with valid data in %d pixels of window %s: a band equals its nodata value "
            "where GDAL's dataset mask says the pixel holds data (another band, or the mask, is valid); "
            "they are read as data",
            dataset_name(path), collisions, window,
        )
    if raw.dtype.name not in EXACT_IN_FLOAT32:
        raw = raw.astype(np.float32)
    return WindowData(window, raw, mask, shape, tuple(float(m) for m in mean), tuple(float(s) for s in std), collisions)


def read_label_window(path: str, window: Window, band: int = 1) -> np.ndarray:
    """Read a label window inside the scene as int64 (label nodata becomes -1).

    A float label is a label value only where it is a whole number: NaN (with or without a nodata value),
    infinities and fractions such as 0.5 become -1 too, so they count nowhere rather than as a truncated class.
    """
    with _opened(path, "read") as src:
        rw = RioWindow(window.col_off, window.row_off, window.width, window.height)
        raw = src.read(band, window=rw)
        mask = src.read_masks(band, window=rw)
    if raw.dtype.kind == "f":
        whole = np.isfinite(raw) & (np.abs(raw) < 2.0**62)
        whole[whole] = raw[whole] == np.round(raw[whole])
        raw = np.where(whole, raw, 0)
        mask = np.where(whole, mask, 0)
    data = raw.astype(np.int64)
    data[mask == 0] = -1
    return data
