"""Runner support: ``--runner DaskRunner`` and local Dask clusters.

``DaskRunner`` here is Beam's ``apache_beam.runners.dask.dask_runner.DaskRunner`` with three fixes
that matter for this pipeline (Beam 2.77):

* Beam's Dask ParDo collects a bundle's outputs *before* calling ``finish_bundle``, so whatever a
  DoFn emits there is lost: ``BatchElements`` emits its last, partial batch there, and those
  samples silently vanished. Outputs are collected after ``finish_bundle`` here.
* Tagged outputs are not routed (they land in the main output). The pipeline never uses them;
  should a DoFn emit one anyway, the run fails loudly instead of mixing them in.
* A GroupByKey shuffles as many partitions as its input has, and a Flatten's output has the sum
  of its inputs' (the errors of six stages, say): the shuffle then took some n x n tiny tasks
  (700 of the 2,100 tasks of a 256-image run, 2 s of its end). Here a GroupByKey whose input has
  more partitions than the run's ``--dask_npartitions`` first merges neighbouring partitions
  down to that number (no data moves for that).

``--dask_workers N`` starts a ``distributed.LocalCluster`` of N single-threaded worker processes
for the run (and closes it afterwards; see pipeline.dask_cluster); without it, and without a
cluster address, N is the number of CPU cores this process may use (never Beam's default cluster
of multi-threaded workers). With Beam's own ``--dask_client_address`` the run uses that cluster
instead: the scheduler must answer within ``--dask_connection_timeout`` (30 s by default), and
``--dask_workers N`` then means "wait until it has N workers", for up to ``--dask_wait_timeout``
seconds (300 by default); the jobs start their local cluster early this way. Unless
``--dask_npartitions`` says otherwise, the inputs are split into twice as many partitions as
workers, so every worker gets work.
"""
from __future__ import annotations

import argparse
import contextlib
import logging

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, WorkerOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.common import DoFnInvoker
from apache_beam.runners.dask import dask_runner as _dask_runner
from apache_beam.runners.dask import transform_evaluator as _evaluator

from .dask_cluster import (CONNECT_TIMEOUT, WAIT_TIMEOUT, DaskRunError, check_scheduler, check_workers_import,
                           close_cluster, default_worker_count, scheduler_file_address, start_local_cluster,
                           wait_for_workers)
from .progress import is_local


#: Beam's default DirectRunner tries to download the Prism binary first; this runs offline.
DEFAULT_RUNNER = "FnApiRunner"
RUNNER_ALIASES = {"daskrunner": "pipeline.runners.DaskRunner", "dask": "pipeline.runners.DaskRunner"}


def _runner_path(name: str) -> str:
    """A ``--runner`` value as Beam will load it; unknown names raise ValueError listing the valid ones.

    Beam's own names are spelled as their class (``fnapirunner`` and ``FnApi`` are
    ``FnApiRunner``): the run's checks (a CUDA device here, one model shared in process, the
    progress line) go by that name. Beam's own check comes only when the pipeline is built,
    after the output is prepared."""
    from apache_beam.runners.runner import _RUNNER_MAP

    low = name.lower()
    if low in RUNNER_ALIASES:
        return RUNNER_ALIASES[low]
    if "." in name:
        return name
    path = _RUNNER_MAP.get(low) or _RUNNER_MAP.get(low + "runner")
    if path:
        return path.rsplit(".", 1)[-1]
    valid = sorted(set(StandardOptions.KNOWN_RUNNER_NAMES) | {"DaskRunner"})
    raise ValueError(f"unknown runner {name!r}; valid: {', '.join(valid)} or a PipelineRunner's dotted path")


def _quiet_error(message: str):
    raise ValueError(f"bad pipeline option: {message}")


def pipeline_options(beam_argv: list[str]) -> PipelineOptions:
    """Beam options from command-line flags; unknown flags and bad values are a ValueError (one
    line), not Beam's warning or its usage text.

    ``--runner`` defaults to FnApiRunner (offline); ``DaskRunner`` names the fixed Dask runner below.
    """
    argv = list(beam_argv)
    if not any(a == "--runner" or a.startswith("--runner=") for a in argv):
        argv = ["--runner", DEFAULT_RUNNER] + argv
    for i, a in enumerate(argv):
        if a == "--runner" and i + 1 < len(argv):
            argv[i + 1] = _runner_path(argv[i + 1])
        elif a.startswith("--runner="):
            argv[i] = "--runner=" + _runner_path(a.split("=", 1)[1])

    def check(parser):
        # Beam parses every option class's flags with this parser right after this call: parse
        # them here first, with errors raised instead of printed with the usage text, and unknown
        # flags refused before Beam logs that it discards them.
        parser.error = _quiet_error
        _, unknown = parser.parse_known_args(argv)
        if unknown:
            raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")

    options = PipelineOptions(argv)
    options.get_all_options(add_extra_args_fn=check)
    _check_connect_timeout(argv, options)
    workers = options.view_as(WorkerOptions)
    if workers.default_sdk_harness_log_level is None and is_local(options.view_as(StandardOptions).runner):
        # Local worker processes (--direct_running_mode multi_processing) write to the job's
        # stderr, at INFO by default: dozens of lines a run. They follow the job's verbosity (-v).
        workers.default_sdk_harness_log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return options


def _check_connect_timeout(argv: list[str], options: PipelineOptions) -> None:
    """Beam reads ``--dask_connection_timeout`` as whole seconds and quietly drops anything else
    (``2.5``, ``soon``: Dask's default then), and hands 0 or less to Dask's client, which then
    fails with a traceback after the scheduler answered: a bad pipeline option, here."""
    timeout = options.view_as(_dask_runner.DaskOptions).timeout
    if timeout is None or (isinstance(timeout, int) and timeout > 0):
        return
    given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--dask_connection_timeout"]
    given += [a.split("=", 1)[1] for a in argv if a.startswith("--dask_connection_timeout=")]
    raise ValueError("bad pipeline option: argument --dask_connection_timeout: must be a whole number of "
                     f"seconds > 0, got {given[-1] if given else timeout}")


def check_runner(name: str) -> None:
    """Raise ValueError unless Beam can load a runner by ``name``: a Beam runner name (as Beam
    matches them: any case, ``Runner`` optional), ``DaskRunner``, or the dotted import path of a
    PipelineRunner subclass (imported here to check it)."""
    import importlib

    from apache_beam.runners.runner import PipelineRunner

    path = _runner_path(name)
    if "." not in path:
        return
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"runner {name!r} cannot be loaded: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, PipelineRunner)):
        raise ValueError(f"runner {name!r} is not a PipelineRunner subclass")


def apply_dofn_to_bundle(items, do_fn_invoker_args, do_fn_invoker_kwargs, tagged_receivers):
    """One Dask partition as one Beam bundle, with ``finish_bundle`` outputs kept."""
    # Each task unpickles its own receivers; clearing guards against reuse all the same. (No
    # lock: side inputs are computed by nested Dask computations inside a task.)
    del tagged_receivers.values[:]
    invoker = DoFnInvoker.create_invoker(*do_fn_invoker_args, **do_fn_invoker_kwargs)
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()
    values = list(tagged_receivers.values)
    del tagged_receivers.values[:]
    invoker.invoke_teardown()
    if any(isinstance(v, TaggedOutput) for v in values):
        raise RuntimeError("DaskRunner cannot route tagged outputs; use a single output")
    return [v.value for v in values]


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _positive_seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not s > 0 or s == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return s


class DaskPipelineOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--dask_workers", type=_at_least_one, default=None,
            help="start a local Dask cluster of this many single-threaded worker processes (default: "
                 "one per CPU core); with --dask_client_address, wait until that cluster has this many",
        )
        parser.add_argument(
            # No default value: Beam hands every option with a value to the workers of any runner,
            # whose parsers, without this class, log "Discarding unparseable args" for it.
            "--dask_wait_timeout", type=_positive_seconds, default=None,
            help="seconds to wait for --dask_workers workers of a cluster before giving up, and for a cluster "
                 "left without workers during the run (default: 300)",
        )


def _connect_timeout(options: PipelineOptions) -> float:
    """Beam's ``--dask_connection_timeout`` (whole seconds), else Dask's default of 30 s."""
    t = options.view_as(_dask_runner.DaskOptions).timeout
    return float(t) if isinstance(t, int) and t > 0 else CONNECT_TIMEOUT


class _GroupByKey(_evaluator.GroupByKey):
    def apply(self, input_bag, side_inputs=None):
        limit = self.bag_kwargs.get("npartitions")
        if limit and input_bag.npartitions > limit:
            input_bag = input_bag.repartition(npartitions=limit)
        return super().apply(input_bag, side_inputs)


@contextlib.contextmanager
def _fixed_translations():
    """Beam's Dask translation with the fixes above, for the time the graph is built."""
    original = _evaluator.apply_dofn_to_bundle, dict(_evaluator.TRANSLATIONS)
    _evaluator.apply_dofn_to_bundle = apply_dofn_to_bundle
    for beam_transform, op in original[1].items():
        if op is _evaluator.GroupByKey:
            _evaluator.TRANSLATIONS[beam_transform] = _GroupByKey
    try:
        yield
    finally:
        _evaluator.apply_dofn_to_bundle = original[0]
        _evaluator.TRANSLATIONS.clear()
        _evaluator.TRANSLATIONS.update(original[1])


#: Seconds between checks that a running Dask job's cluster still has workers.
POLL = 5.0


class _DaskResult:
    """Beam's Dask result, closing its client (and the local cluster it started, if any) when the
    run is over. Beam leaves its client open: once an outside cluster closed, the client kept
    trying to reconnect and logged connection errors.

    A run the cluster cannot finish is a DaskRunError (one line): Beam's wait returned as if
    the run had finished when the scheduler went away (Dask cancels the futures of a client that
    lost its scheduler), raised Dask's KilledWorker traceback when workers kept dying in a task,
    and waited forever on a cluster left without workers (``no_workers_timeout`` seconds here)."""

    def __init__(self, result, cluster, address: str = "", no_workers_timeout: float = WAIT_TIMEOUT):
        self._result = result
        self._cluster = cluster
        self._address = address
        self._no_workers_timeout = no_workers_timeout

    def wait_until_finish(self, duration=None):
        try:
            if duration is None:
                self._wait_for_workers_to_finish()
            try:
                state = self._result.wait_until_finish(duration)
            except Exception as e:
                from distributed.scheduler import KilledWorker

                if not isinstance(e, KilledWorker):
                    raise
                raise DaskRunError(f"Dask workers at {self._address} died running the pipeline: "
                                   f"{e.allowed_failures + 1} in a row died in the same task (killed, or out of "
                                   "memory?); see the workers' logs") from None
            if any(f.status == "cancelled" for f in self._result.futures):
                raise DaskRunError(f"the Dask scheduler at {self._address} went away during the run "
                                   "(its client lost the connection)")
            return state
        finally:
            self.close()

    def _wait_for_workers_to_finish(self) -> None:
        """Wait until every future is done; a DaskRunError once the cluster has had no workers
        for ``no_workers_timeout`` seconds."""
        import time

        from distributed import wait
        from distributed.client import CancelledError

        client, futures = self._result.client, self._result.futures
        empty_since = None
        while True:
            try:
                wait(futures, timeout=POLL)
                return
            except TimeoutError:
                pass
            except CancelledError:  # the scheduler gone: said once every future is seen
                return
            try:
                workers = len(client.nthreads())
            except Exception:  # the scheduler gone: the futures say so
                continue
            if workers:
                empty_since = None
                continue
            now = time.monotonic()
            empty_since = now if empty_since is None else empty_since
            if now - empty_since >= self._no_workers_timeout:
                raise DaskRunError(f"the Dask cluster at {self._address} has had no workers for "
                                   f"{self._no_workers_timeout:g} s during the run (--dask_wait_timeout)")

    def close(self):
        # A client that lost its scheduler is still trying to reconnect: Dask logs a traceback
        # for the attempt that closing it cancels.
        client_log = logging.getLogger("distributed.client")
        level = client_log.level
        client_log.setLevel(logging.CRITICAL)
        try:
            with contextlib.suppress(Exception):
                self._result.client.close()
        finally:
            client_log.setLevel(level)
        if self._cluster is not None:
            close_cluster(self._cluster)
            self._cluster = None

    def __getattr__(self, name):
        return getattr(self._result, name)


class DaskRunner(_dask_runner.DaskRunner):
    """Beam's DaskRunner with the fixes above and ``--dask_workers``."""

    def run_pipeline(self, pipeline, options):
        dask_opts = options.view_as(_dask_runner.DaskOptions)
        ours = options.view_as(DaskPipelineOptions)
        workers = ours.dask_workers
        wait_timeout = ours.dask_wait_timeout or WAIT_TIMEOUT
        cluster = None
        if dask_opts.scheduler_file and not dask_opts.address:
            # Beam's client would wait forever for a file that is not there: its address, checked below.
            dask_opts.address = scheduler_file_address(dask_opts.scheduler_file)
            dask_opts.scheduler_file = None
        if dask_opts.address:
            # Beam's client would wait forever on a server that is not a Dask scheduler.
            if workers:
                wait_for_workers(dask_opts.address, workers, wait_timeout, _connect_timeout(options))
            else:
                check_scheduler(dask_opts.address, _connect_timeout(options))
            # Partitions for every worker it has (more than --dask_workers asked for, or without it).
            workers = max(workers or 0, check_workers_import(dask_opts.address, __name__, _connect_timeout(options)))
        else:
            workers = workers or default_worker_count()
            cluster = start_local_cluster(workers)
            dask_opts.address = cluster.scheduler_address
        if not dask_opts.npartitions and not dask_opts.partition_size:
            dask_opts.npartitions = max(2, 2 * (workers or 1))
        try:
            with _fixed_translations():
                result = super().run_pipeline(pipeline, options)
        except BaseException:
            if cluster is not None:
                close_cluster(cluster)
            raise
        return _DaskResult(result, cluster, dask_opts.address, wait_timeout)
