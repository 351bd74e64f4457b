"""Runner support: ``--runner DaskRunner`` and local Dask clusters.

``DaskRunner`` here is Beam's ``apache_beam.runners.dask.dask_runner.DaskRunner`` with two fixes
that matter for this pipeline (Beam 2.77):

* Beam's Dask ParDo collects a bundle's outputs *before* calling ``finish_bundle``, so whatever a
  DoFn emits there is lost: ``BatchElements`` emits its last, partial batch there, and those
  samples silently vanished. Outputs are collected after ``finish_bundle`` here.
* Tagged outputs are not routed (they land in the main output). The pipeline never uses them;
  should a DoFn emit one anyway, the run fails loudly instead of mixing them in.

``--dask_workers N`` starts a ``distributed.LocalCluster`` of N single-threaded worker processes
for the run (and closes it afterwards); Beam's own ``--dask_client_address`` connects to an
existing cluster instead. Unless ``--dask_npartitions`` says otherwise, the inputs are split into
as many partitions as the cluster has worker threads, so every worker gets work.
"""
from __future__ import annotations

import contextlib
import logging

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.common import DoFnInvoker
from apache_beam.runners.dask import dask_runner as _dask_runner
from apache_beam.runners.dask import transform_evaluator as _evaluator

log = logging.getLogger(__name__)

#: Beam's default DirectRunner tries to download the Prism binary first; this runs offline.
DEFAULT_RUNNER = "FnApiRunner"
RUNNER_ALIASES = {"DaskRunner": "pipeline.runners.DaskRunner"}


def pipeline_options(beam_argv: list[str]) -> PipelineOptions:
    """Beam options from command-line flags; unknown flags are an error, not a warning.

    ``--runner`` defaults to FnApiRunner (offline); ``DaskRunner`` names the fixed Dask runner below.
    """
    argv = list(beam_argv)
    if not any(a == "--runner" or a.startswith("--runner=") for a in argv):
        argv = ["--runner", DEFAULT_RUNNER] + argv
    for i, a in enumerate(argv):
        if a == "--runner" and i + 1 < len(argv) and argv[i + 1] in RUNNER_ALIASES:
            argv[i + 1] = RUNNER_ALIASES[argv[i + 1]]
        elif a.startswith("--runner=") and a.split("=", 1)[1] in RUNNER_ALIASES:
            argv[i] = "--runner=" + RUNNER_ALIASES[a.split("=", 1)[1]]
    captured = {}
    options = PipelineOptions(argv)
    options.get_all_options(add_extra_args_fn=lambda p: captured.setdefault("parser", p))
    _, unknown = captured["parser"].parse_known_args(argv)
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
    return options


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


class DaskPipelineOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--dask_workers", type=int, default=None,
            help="start a local Dask cluster of this many single-threaded worker processes",
        )


@contextlib.contextmanager
def _fixed_pardo():
    original = _evaluator.apply_dofn_to_bundle
    _evaluator.apply_dofn_to_bundle = apply_dofn_to_bundle
    try:
        yield
    finally:
        _evaluator.apply_dofn_to_bundle = original


class _ClusterResult:
    """Wraps Beam's Dask result so the local cluster closes when the run is over."""

    def __init__(self, result, cluster):
        self._result = result
        self._cluster = cluster

    def wait_until_finish(self, duration=None):
        try:
            return self._result.wait_until_finish(duration)
        finally:
            self.close()

    def close(self):
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._result.client.close()
            self._cluster.close()
            self._cluster = None

    def __getattr__(self, name):
        return getattr(self._result, name)


class DaskRunner(_dask_runner.DaskRunner):
    """Beam's DaskRunner with the fixes above and ``--dask_workers``."""

    def run_pipeline(self, pipeline, options):
        dask_opts = options.view_as(_dask_runner.DaskOptions)
        workers = options.view_as(DaskPipelineOptions).dask_workers
        cluster = None
        if workers and not dask_opts.address and not dask_opts.scheduler_file:
            import dask
            from distributed import LocalCluster

            # Dask's nannies set MALLOC_TRIM_THRESHOLD_ in their workers by default; an explicit
            # trim threshold switches off glibc's adaptive mmap threshold, so every large torch
            # buffer is mmapped and zeroed anew: the attack and classify stages ran twice as slow,
            # half of it in the kernel. None unsets it (Dask's documented override).
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
            dask_opts.address = cluster.scheduler_address
            log.info("started a local Dask cluster of %d workers at %s", workers, cluster.scheduler_address)
        if not dask_opts.npartitions and not dask_opts.partition_size:
            dask_opts.npartitions = max(2, 2 * (workers or 1))
        try:
            with _fixed_pardo():
                result = super().run_pipeline(pipeline, options)
        except BaseException:
            if cluster is not None:
                cluster.close()
            raise
        return _ClusterResult(result, cluster)
