"""Local Dask clusters for ``--runner DaskRunner [--dask_workers N]``.

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
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: ``--runner`` values that mean this package's DaskRunner (see pipeline.runners), lowercased.
DASK_RUNNERS = ("daskrunner", "dask", "pipeline.runners.daskrunner")
#: Seconds to reach a scheduler unless ``--dask_connection_timeout`` says otherwise (Dask's default).
CONNECT_TIMEOUT = 30.0
#: Seconds to wait for a cluster's workers unless ``--dask_wait_timeout`` says otherwise.
WAIT_TIMEOUT = 300.0
#: After this many seconds of waiting for workers, say so at WARNING (once).
WARN_AFTER = 30.0
#: Imported by every worker of a local cluster as it starts (the modules Beam unpickles into).
WORKER_PRELOAD = ("pipeline.dask_worker",)
_NO_MALLOC_TRIM = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


class DropImportNoise(logging.Filter):
    """Beam warns at import time that BigQuery client libraries are missing (and notes it at INFO,
    which -v shows); we never use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("apitools not found", "No module named google.cloud.bigquery_storage"))


def default_worker_count() -> int:
    """One worker per CPU core this process may run on (``--runner DaskRunner`` alone)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def start_local_cluster(workers: int, *, wait: bool = True):
    """A ``distributed.LocalCluster`` of ``workers`` single-threaded worker processes.

    ``wait=False`` returns as soon as the scheduler listens; the workers start in the background
    (``wait_for_workers`` waits for them). The workers' scratch space is a temporary folder that
    goes when the cluster closes (Dask leaves an empty ``dask-scratch-space`` in TMPDIR)."""
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
    scratch = tempfile.mkdtemp(prefix="semjpeg-dask-")
    # No dashboard; the scheduler still serves its health and metrics routes over HTTP, by default
    # on port 8787, warning on stderr when that is taken (another cluster, a `dask scheduler`):
    # any free port of this machine's loopback instead.
    scheduler_kwargs = {"local_directory": scratch, "dashboard_address": "127.0.0.1:0"}
    try:
        cluster = LocalCluster(n_workers=workers if wait else 0, threads_per_worker=1, processes=True,
                               dashboard_address=None, preload=list(WORKER_PRELOAD),
                               local_directory=scratch, scheduler_kwargs=scheduler_kwargs)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _remove_on_close(cluster, scratch)
    # The scheduler, in this process, hooks a diagnosis into every garbage collection: a Ctrl-C
    # landing in that hook is "ignored" by Python, and the job then ran to its end. Not needed.
    from distributed.gc import disable_gc_diagnosis

    disable_gc_diagnosis(force=True)
    if not wait:
        cluster.scale(workers)
    log.info("local Dask cluster at %s: %d workers%s", cluster.scheduler_address, workers,
             "" if wait else " starting")
    return cluster


def _remove_on_close(cluster, folder: str) -> None:
    """Remove ``folder`` once ``cluster`` is closed, however it is closed (``close()``, ``with``,
    garbage collection)."""
    close = cluster.close

    def close_and_remove(*args, **kwargs):
        try:
            return close(*args, **kwargs)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    cluster.close = close_and_remove


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
    multiprocessing.get_context("forkserver").set_forkserver_preload(["pipeline.forkserver_init", "distributed", *WORKER_PRELOAD])
    _start_forkserver_with_signals_blocked()


def _start_forkserver_with_signals_blocked() -> None:
    """The fork server starts with Ctrl-C and SIGTERM blocked; pipeline.forkserver_init, its first
    import, ignores them and unblocks them. Ignoring them there alone left the server's start-up
    (the interpreter's own, its site import) to them: a signal to the process group then killed
    it with a "Fatal Python error" or the nannies' tracebacks. The blocked mask is inherited by
    the server; a signal meanwhile waits, in this process too, where another thread takes it.
    CPython starts its resource tracker the same way."""
    import signal
    from multiprocessing import forkserver, resource_tracker

    server = forkserver._forkserver
    if not hasattr(signal, "pthread_sigmask") or hasattr(server.ensure_running, "_semjpeg"):
        return
    ensure_running = server.ensure_running

    def blocked():
        resource_tracker.ensure_running()  # first: starting it unblocks the signals in this thread
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))
        try:
            ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    blocked._semjpeg = True
    server.ensure_running = blocked


def check_scheduler(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise ValueError (one line) unless a Dask scheduler answers at ``address`` within
    ``timeout`` seconds.

    Dask's own client retries an address where nothing listens for its connect timeout and then
    fails with a long traceback, and it waits forever for the handshake of a server that is not
    Dask's (an HTTP server, say): this asks the scheduler who it is, all within ``timeout``."""
    import asyncio

    from distributed.comm import connect

    async def identity():
        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    try:
        # Dask's connect gives up after ``timeout`` where nothing listens; the extra second lets
        # that error (which says why) come first.
        info = asyncio.run(asyncio.wait_for(identity(), timeout + 1))
    except asyncio.TimeoutError:
        raise ValueError(f"cannot reach the Dask scheduler at {address}: no Dask answer within "
                         f"{timeout + 1:g} s (is it a Dask scheduler's address?)") from None
    except (OSError, ValueError, TypeError) as e:
        reason = str(e)
        if reason.startswith("Timed out trying to connect"):  # Dask's retries: say why they failed
            last = re.sub(r"^in <[^>]*>: ", "", str(e.__cause__ or ""))
            reason = f"no connection within {timeout:g} s" + (f" ({last})" if last else "")
        raise ValueError(f"cannot reach the Dask scheduler at {address}: {reason}") from None
    kind = info.get("type") if isinstance(info, dict) else None
    if kind != "Scheduler":
        raise ValueError(f"cannot reach the Dask scheduler at {address}: it answers as "
                         f"{kind or 'something else'}, not a Dask scheduler")


class DaskRunError(RuntimeError):
    """A Dask run that the cluster could not finish (its scheduler went away, its workers kept
    dying or were all gone): one line, the job's exit status 1 (jobs.__main__)."""


def check_workers_import(address: str, module: str, timeout: float = CONNECT_TIMEOUT) -> int:
    """A ValueError (one line) unless every worker of the cluster at ``address`` can import
    ``module``; returns how many workers it has. A worker that cannot unpickle a task's function
    closes itself, and the run then waited forever for workers that would never come."""
    import importlib

    from distributed import Client

    with Client(address, timeout=timeout) as client:
        try:
            return len(client.run(importlib.import_module, module))
        except ImportError as e:
            raise ValueError(f"the Dask workers at {address} cannot import {module} ({e}): install semjpeg "
                             "where they run") from None


def scheduler_file_address(path: str) -> str:
    """The scheduler address in a Dask scheduler file (``dask scheduler --scheduler-file``); a
    ValueError (one line) if it cannot be read. Dask's client waits forever for a file that is
    not there."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the Dask scheduler file {path}: {e}") from None
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, str) or not address:
        raise ValueError(f"cannot read the Dask scheduler file {path}: it names no scheduler address")
    return address


def close_cluster(cluster) -> None:
    """Close a local cluster this job started. Closing an interrupted run's cluster, the scheduler
    warns about every worker it removes whose results no task fetched, and a nanny about a worker
    still busy in a task that it kills: what closing means here, so quiet for that time."""
    loggers = [logging.getLogger(name) for name in ("distributed.scheduler", "distributed.nanny")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        cluster.close()
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def wait_for_workers(address: str, workers: int, timeout: float = WAIT_TIMEOUT,
                     connect_timeout: float = CONNECT_TIMEOUT) -> None:
    """Block until the scheduler at ``address`` has ``workers`` workers; a ValueError (one line)
    if it cannot be reached within ``connect_timeout`` s or has too few after ``timeout`` s.

    The wait is logged at INFO, and once at WARNING after ``WARN_AFTER`` s."""
    from distributed import Client

    check_scheduler(address, connect_timeout)
    start = time.monotonic()
    with Client(address, timeout=connect_timeout) as client:
        have = len(client.nthreads())
        if have >= workers:
            return
        log.info("waiting for the Dask cluster at %s: %d of %d workers", address, have, workers)
        warned = False
        while True:
            left = timeout - (time.monotonic() - start)
            step = left if warned else min(left, WARN_AFTER - (time.monotonic() - start))
            try:
                client.wait_for_workers(workers, timeout=max(step, 0.001))
                return
            except TimeoutError:
                have = len(client.nthreads())
            waited = time.monotonic() - start
            if waited >= timeout:
                raise ValueError(f"the Dask cluster at {address} has {have} of {workers} workers after "
                                 f"{timeout:g} s (--dask_workers {workers}; --dask_wait_timeout to wait longer)")
            if not warned:
                log.warning("waiting for the Dask cluster at %s: %d of %d workers (%.0f s so far; "
                            "--dask_wait_timeout %g)", address, have, workers, waited, timeout)
                warned = True


def _dask_flags(beam_argv: list[str]) -> argparse.Namespace:
    """The Dask flags in ``beam_argv``; a malformed value raises argparse.ArgumentError (no usage
    text printed: Beam's parsing in pipeline.runners reports it, once)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--runner")
    p.add_argument("--dask_workers", type=int)
    p.add_argument("--dask_client_address")
    p.add_argument("--dask_scheduler_file")
    flags, _ = p.parse_known_args(beam_argv)
    return flags


@contextlib.contextmanager
def early_local_cluster(beam_argv: list[str], defaults: list[str] = ()) -> Iterator[list[str]]:
    """Start the local cluster that ``beam_argv`` asks for now, without waiting for its workers.

    A Dask run without ``--dask_workers`` and without a cluster address gets one worker per CPU
    core (``default_worker_count``), as the runner itself would start. ``defaults`` are Beam flags
    that the run puts before ``beam_argv`` (a nightly config's ``runner`` and ``runner_options``):
    read here, not yielded.

    Yields the Beam flags to run with: ``--dask_client_address`` of the new cluster added (and
    ``--dask_workers`` where it was left out: the runner then waits for that many workers); other
    flags are yielded unchanged. The cluster closes when the block ends, however it ends."""
    try:
        flags = _dask_flags([*defaults, *beam_argv])
    except argparse.ArgumentError:  # a malformed value: Beam's own parsing reports it
        yield list(beam_argv)
        return
    if ((flags.runner or "").lower() not in DASK_RUNNERS or flags.dask_client_address
            or flags.dask_scheduler_file or (flags.dask_workers is not None and flags.dask_workers < 1)):
        yield list(beam_argv)
        return
    workers = default_worker_count() if flags.dask_workers is None else flags.dask_workers
    extra = [] if flags.dask_workers is not None else ["--dask_workers", str(workers)]
    cluster = start_local_cluster(workers, wait=False)
    try:
        yield list(beam_argv) + extra + ["--dask_client_address", cluster.scheduler_address]
    finally:
        close_cluster(cluster)
