"""Worker preload for local Dask clusters (see pipeline.dask_cluster): imports the modules Beam
unpickles the pipeline's functions into, once, as the worker starts.

It then freezes the garbage collector's view of everything imported so far (``gc.freeze``), as
Python's documentation advises before forking: the workers forked from the preloading server share
those pages instead of copying them when a collection touches them, their collections skip the
hundreds of thousands of objects torch and Beam create at import, and the server's and workers'
exits skip the final collection over them (about 1 s each on this machine).
"""
from __future__ import annotations

import gc
import logging

from pipeline.dask_cluster import DropImportNoise

logging.getLogger().addFilter(DropImportNoise())

import pipeline.evaluate  # noqa: E402,F401  (torch, Beam and every stage)

gc.freeze()
