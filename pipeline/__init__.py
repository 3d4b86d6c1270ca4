"""satseg driver side: plan a job, run it on Ray, stitch, evaluate with Dask, report."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("satseg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
