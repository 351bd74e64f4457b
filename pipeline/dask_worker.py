"""Worker preload for local Dask clusters (see pipeline.dask_cluster): imports the modules Beam
unpickles the pipeline's functions into, once, as the worker starts."""
from __future__ import annotations

import logging

from pipeline.dask_cluster import DropImportNoise

logging.getLogger().addFilter(DropImportNoise())

import pipeline.evaluate  # noqa: E402,F401  (torch, Beam and every stage)
