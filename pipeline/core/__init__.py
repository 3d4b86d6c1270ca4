"""The functional core: windows, chunk grid, tile lattice, plans, stitching, metrics, boundary bands.

Pure functions over numpy arrays (stitching also over torch tensors, by duck
typing). Nothing here imports Ray, Dask, torch or any I/O library; the driver
(pipeline/) and the workers (workers/) both build on it (ARCHITECTURE.md).
"""
