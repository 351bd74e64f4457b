"""Local Dask clusters for ``--runner DaskRunner --dask_workers N``.

Kept free of Beam and torch imports: a job starts its cluster before it imports them, so the
workers' imports of torch, Beam and this package happen while the job's own process does the same
and builds the pipeline, instead of one after the other. Without this, each worker paid its
imports when its first task arrived, and the second worker of a two-worker cluster started work
about 3 s after the first. The workers are forked from one server process that does those imports
once (multiprocessing's ``forkserver``), so two workers cost no more start-up than one.

Workers are single-threaded processes. Dask's nannies set ``MALLOC_TRIM_THRESHOLD_`` in their
workers by default; an explicit trim threshold switches off glibc's adaptive mmap threshold, so
every large torch buffer is mmapped and zeroed anew (the attack and classify stages ran twice as
slow, half of it in the kernel). Local clusters unset it (Dask's documented override).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: ``--runner`` values that mean this package's DaskRunner (see pipeline.runners).
DASK_RUNNERS = ("DaskRunner", "pipeline.runners.DaskRunner")
#: Imported by every worker of a local cluster as it starts (the modules Beam unpickles into).
WORKER_PRELOAD = ("pipeline.dask_worker",)
_NO_MALLOC_TRIM = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


class DropImportNoise(logging.Filter):
    """Beam warns at import time that BigQuery client libraries are missing; we never use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


def start_local_cluster(workers: int, *, wait: bool = True):
    """A ``distributed.LocalCluster`` of ``workers`` single-threaded worker processes.

    ``wait=False`` returns as soon as the scheduler listens; the workers start in the background
    (``wait_for_workers`` waits for them)."""
    if workers < 1:
        raise ValueError(f"--dask_workers must be at least 1, got {workers}")
    import dask
    from distributed import LocalCluster

    # Dask logs every scheduler and nanny event at INFO; follow the job's verbosity instead.
    logging.getLogger("distributed").setLevel(logging.getLogger().getEffectiveLevel())
    # The nannies read the environment setting when they are created, which with wait=False is
    # after this call returns: it is set for the rest of this process (only local clusters read it).
    dask.config.set(_NO_MALLOC_TRIM)
    _forkserver_workers()
    cluster = LocalCluster(n_workers=workers if wait else 0, threads_per_worker=1, processes=True,
                           dashboard_address=None, preload=list(WORKER_PRELOAD))
    if not wait:
        cluster.scale(workers)
    log.info("local Dask cluster at %s: %d workers%s", cluster.scheduler_address, workers,
             "" if wait else " starting")
    return cluster


def _forkserver_workers() -> None:
    """Worker processes forked from one server that imported the worker preload once.

    Spawned workers each import torch, Beam and the pipeline (about 3 s of CPU each) while the
    job's own process does the same: three importers on two cores for a two-worker cluster, two for
    one worker, so a two-worker run started work seconds later than a one-worker run. With
    ``forkserver`` the imports happen once in the server, whatever the number of workers, and each
    worker is a fork of it (where the platform has no ``forkserver``, workers are spawned).
    Dask sets its nannies' ``pre-spawn-environ`` (``OMP_NUM_THREADS=1``, ``PYTHONHASHSEED``) in the
    environment before the first worker starts, which is when the server starts: it and every
    worker get them."""
    import multiprocessing

    import dask
    from distributed.utils import get_mp_context

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    get_mp_context()  # Dask sets its own preload list on first use: replace it, before the server starts
    multiprocessing.get_context("forkserver").set_forkserver_preload(["distributed", *WORKER_PRELOAD])


def wait_for_workers(address: str, workers: int, timeout: float = 300) -> None:
    """Block until the scheduler at ``address`` has ``workers`` workers (a clear error after ``timeout`` s)."""
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        try:
            client.wait_for_workers(workers, timeout=timeout)
        except TimeoutError as e:
            have = len(client.scheduler_info()["workers"])
            raise RuntimeError(f"the Dask cluster at {address} has {have} workers after {timeout:.0f} s, "
                               f"--dask_workers asked for {workers}") from e


def _dask_flags(beam_argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--runner")
    p.add_argument("--dask_workers", type=int)
    p.add_argument("--dask_client_address")
    p.add_argument("--dask_scheduler_file")
    flags, _ = p.parse_known_args(beam_argv)
    return flags


@contextlib.contextmanager
def early_local_cluster(beam_argv: list[str]) -> Iterator[list[str]]:
    """Start the local cluster that ``beam_argv`` asks for now, without waiting for its workers.

    Yields the Beam flags to run with: ``--dask_client_address`` of the new cluster added (the
    runner then waits for the ``--dask_workers`` it names); other flags are yielded unchanged. The
    cluster closes when the block ends, however it ends."""
    try:
        flags = _dask_flags(beam_argv)
    except SystemExit:  # a malformed value: Beam's own parser reports it
        yield list(beam_argv)
        return
    if (flags.runner not in DASK_RUNNERS or not flags.dask_workers or flags.dask_workers < 1
            or flags.dask_client_address or flags.dask_scheduler_file):
        yield list(beam_argv)
        return
    cluster = start_local_cluster(flags.dask_workers, wait=False)
    try:
        yield list(beam_argv) + ["--dask_client_address", cluster.scheduler_address]
    finally:
        cluster.close()
