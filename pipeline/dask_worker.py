"""Worker preload for local Dask clusters (see pipeline.dask_cluster): imports the modules Beam
unpickles the pipeline's functions into, once, as the worker starts.

Each worker also ignores SIGINT and SIGTERM (``dask_setup``): Ctrl-C in a terminal reaches the
whole process group, as does SIGTERM from ``timeout`` or ``kill -- -PGID``, and the job itself
stops cleanly on them and closes its cluster (a worker deep in a task is killed by its nanny after
a few seconds), so workers printed a KeyboardInterrupt traceback each for nothing. (A worker that
exits on the signal instead breaks the job's nested Dask computations with tornado tracebacks, and
the scheduler's broadcasts to it with more.) The nannies stop their workers without SIGTERM (a
request, then SIGKILL); their memory monitor's SIGTERM is followed by SIGKILL at its next check.

It then freezes the garbage collector's view of everything imported so far (``gc.freeze``), as
Python's documentation advises before forking: the workers forked from the preloading server share
those pages instead of copying them when a collection touches them, their collections skip the
hundreds of thousands of objects torch and Beam create at import, and the server's and workers'
exits skip the final collection over them (about 1 s each on this machine).
"""
from __future__ import annotations

import gc
import logging
import signal

from pipeline.dask_cluster import DropImportNoise

logging.getLogger().addFilter(DropImportNoise())

import pipeline.evaluate  # noqa: E402,F401  (torch, Beam and every stage)

gc.freeze()


def dask_setup(worker) -> None:
    """Run by Dask in each worker of a local cluster as it starts: SIGINT and SIGTERM are the
    job's to handle (it closes its cluster, which stops the workers), and the tasks the job's
    shutdown cancels are not worth a warning each."""
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave the default
        pass
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
