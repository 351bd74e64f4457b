"""``semjpeg <job> ...`` (also ``python -m jobs``): one subcommand per job.

Arguments a job does not define are Beam pipeline options (``--runner``, ``--direct_num_workers``,
Dataflow options, ...). Configuration errors end with one line on stderr and exit status 2; a
run that wrote its outputs but processed no input (every input failed, see OUT/errors) exits
with status 4 (jobs.common.NOTHING_PROCESSED).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import signal
import sys

from pipeline.signals import Terminated, stop_tracking, track_interrupts

from .common import exception_chain as _chain

#: Subcommand -> module under ``jobs``; each has ``HELP``, ``add_arguments(parser)`` and
#: ``run(args, beam_argv) -> int``.
JOBS = {
    "demo": "jobs.demo",
    "evaluate": "jobs.evaluate",
    "attack": "jobs.attack",
    "defend": "jobs.defend",
    "shard": "jobs.shard",
    "nightly": "jobs.nightly",
    "report": "jobs.report",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="semjpeg",
        description="Protect image datasets against adversarial attacks with semantic JPEG (Apache Beam jobs).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    modules = {}
    for name, path in JOBS.items():
        mod = importlib.import_module(path)
        p = sub.add_parser(name, help=mod.HELP, description=mod.__doc__)
        p.add_argument("-v", "--verbose", action="store_true", help="log progress")
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from pipeline.dask_cluster import DaskRunError, early_local_cluster

    from .common import no_room, setup_logging

    setup_logging("-v" in argv or "--verbose" in argv)  # before Beam's import-time warnings
    parser, modules = build_parser()
    args, beam_argv = parser.parse_known_args(argv)
    # A local Dask cluster starts now, its workers importing while this process does. (The error
    # line comes before the cluster's shutdown, which waits for workers still starting.)
    job = modules[args.job]
    if getattr(job, "PIPELINE", True):
        # Beam flags the job puts before the command line's (nightly: its config's runner options).
        defaults = job.config_beam_argv(args) if hasattr(job, "config_beam_argv") else []
        early = early_local_cluster(beam_argv, defaults)
    else:
        early = contextlib.nullcontext(beam_argv)
    with early as beam_argv:
        try:
            return int(job.run(args, beam_argv) or 0)
        # Path errors on outputs (a file where a folder should be, no permission) are the user's
        # to fix, like unknown options; they are checked early, and these catch the rest.
        except (ValueError, FileNotFoundError, PermissionError, FileExistsError, NotADirectoryError,
                IsADirectoryError) as e:
            logging.getLogger(__name__).debug("configuration error", exc_info=True)
            print(f"semjpeg {args.job}: error: {e}", file=sys.stderr, flush=True)
            return 2
        except Exception as e:
            # A full disk mid-run, or a Dask cluster that could not finish the run: one line, not
            # the runner's traceback. A pipeline's staging
            # folder is already removed (a job may say what it had written: nightly's bookkeeping);
            # shard and report write no staging folder.
            full = no_room(e)
            dask = next((c for c in _chain(e) if isinstance(c, DaskRunError)), None)
            if full is None and dask is None:
                raise
            logging.getLogger(__name__).debug("run failed", exc_info=True)
            done = f"; {_written(e)}" if getattr(job, "PIPELINE", True) else ""
            what = f"a write failed: {full}" if full is not None else str(dask)
            print(f"semjpeg {args.job}: error: {what}{done}", file=sys.stderr, flush=True)
            return 1


def _written(e: BaseException) -> str:
    """What a stopped job had already written: a job may say (nightly's bookkeeping, through a
    ``semjpeg_written`` attribute on the exception); otherwise nothing was committed."""
    return next((getattr(c, "semjpeg_written") for c in _chain(e) if hasattr(c, "semjpeg_written")),
                "the previous output is untouched")


def _interruption(e: BaseException) -> str | None:
    """"terminated" or "interrupted" when ``e`` is SIGTERM or Ctrl-C, perhaps wrapped (Beam's
    FnApiRunner re-raises one from inside a stage as ``RuntimeError: KeyboardInterrupt [while
    running ...]``); None for anything else."""
    for c in _chain(e):
        text = str(c) if isinstance(c, RuntimeError) else ""
        if isinstance(c, Terminated) or text.startswith("Terminated"):
            return "terminated"
        if isinstance(c, KeyboardInterrupt) or text.startswith("KeyboardInterrupt"):
            return "interrupted"
    return None


def cli(argv: list[str] | None = None, *, own_process: bool | None = None) -> int:
    """The ``semjpeg`` command (``argv``: its arguments, the command line's by default):
    :func:`main`, then a quicker exit.

    Ctrl-C and SIGTERM stop the job cleanly (its staging folder removed, the previous output
    kept) with one line and exit status 130 or 143, not a traceback. The job is over when
    ``main`` returns (outputs committed, clusters closed). Freezing the garbage collector's view
    of what is left (``gc.freeze``) lets the interpreter's exit skip its final collections over
    torch's and Beam's objects: about 1 s of every run on this machine. ``main`` itself leaves
    the collector and the signal handlers alone, for callers that go on working in the process.
    ``own_process`` (by default: when ``argv`` is the command line's) lets a stopped job end the
    process at once when the runner left threads running (:func:`_end_with_threads_running`)."""
    track_interrupts()
    args = sys.argv[1:] if argv is None else list(argv)
    # The job, as every other error line names it (the first word that is not an option).
    job = next((a for a in args if not a.startswith("-")), None)
    try:
        try:
            code = main(args)
        finally:
            stop_tracking()
    except BaseException as e:
        what = _interruption(e)
        if what is None:
            raise
        name = f"semjpeg {job}" if job in JOBS else "semjpeg"
        print(f"{name}: {what}; {_written(e)}", file=sys.stderr, flush=True)
        code = 128 + (signal.SIGTERM if what == "terminated" else signal.SIGINT)
        if own_process if own_process is not None else argv is None:  # the process's own command
            _end_with_threads_running(code)
        return code
    gc.freeze()
    return code


def _end_with_threads_running(code: int) -> None:
    """End the process now with ``code`` if the stopped pipeline left threads running.

    A job stopped by a signal may leave the runner's threads in the middle of their work (Beam's
    ``multi_threading`` workers running torch): the interpreter's shutdown then took them down
    inside C++ code, and the process ended by SIGABRT ("terminate called without an active
    exception", status 134, a core dump) after its one line. The exit handlers still run (log
    handlers flushed, child processes stopped); the interpreter's teardown is skipped."""
    import atexit
    import os
    import threading

    if not any(t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(cli())
