"""One night of evaluation: run the configured attacks x defenses into OUTPUT/date=YYYY-MM-DD/,
append the summary to the history dataset, compare with the previous night, write the report.

Beam options on the command line (``--region=...``, as a Flex Template launcher passes Dataflow's
own) come after the config's ``runner`` and ``runner_options``, and win (options that take
several values, such as ``--experiments``, add to the config's instead).

Exit status (a Flex Template launch: 0 once the job is submitted; the job keeps its own books):
0 when nothing regressed, 3 on an alarm (a metric worse than the previous night's
beyond tolerance, an attack x defense pair without results, a night without any result; each is
named on stderr and in the report), 2 for configuration errors and a damaged or unwritable
history (nothing is run, history is untouched), 1 when a write finds no room or the Dask cluster
cannot finish the run (one line saying what was written), 130 or 143 when Ctrl-C or SIGTERM
stops it (once the output is committed, a first one only waits for the history and report).
"""
from __future__ import annotations

import sys

HELP = "nightly evaluation with history, regression alarms and an HTML report"
REGRESSION_EXIT = 3


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML configuration (see pipeline/nightly.py)")
    parser.add_argument("--date", help="the night, YYYY-MM-DD (default: today in the machine's time zone; TZ=UTC for UTC dates)")


def config_beam_argv(args) -> list[str]:
    """The config's ``runner`` and Dask ``runner_options`` as Beam flags, read without importing
    Beam or torch: the local Dask cluster that ``jobs.__main__`` starts early follows them
    (``dask_workers: 1`` in the config was a cluster of one worker per core, a
    ``dask_client_address`` a local cluster). [] where the config cannot be read: ``run`` says why."""
    import fsspec
    import yaml

    try:
        with fsspec.open(args.config, "rt", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except Exception:
        return []
    if not isinstance(raw, dict):
        return []
    argv = ["--runner", raw["runner"]] if isinstance(raw.get("runner"), str) else []
    options = raw.get("runner_options")
    for k in ("dask_workers", "dask_client_address", "dask_scheduler_file"):
        if isinstance(options, dict) and options.get(k) not in (None, False):
            argv += [f"--{k}", str(options[k])]
    return argv


def run(args, beam_argv) -> int:
    from pipeline.history import ModelChange
    from pipeline.nightly import load_config, parse_date, run_nightly
    from pipeline.summary import format_table

    cfg = load_config(args.config)
    result = run_nightly(cfg, parse_date(args.date), beam_argv)
    if result.summary is None:  # a Flex Template launch: the job keeps its own books when it runs
        print(f"submitted: the job writes {result.output}, the history, nightly.json and the report when it "
              "runs; its alarms are logged as errors and counted in semjpeg:nightly_alarms")
        return 0
    print(format_table(result.summary))
    print(f"wrote {result.output}" + (f" and {result.report}" if result.report else ""))
    if result.previous_date is None:
        print("no earlier night with results in the history: nothing to compare")
    elif not result.regressions:
        print(f"compared with {result.previous_date}: no regression")
    for r in result.regressions:
        print(f"{'NOTE' if isinstance(r, ModelChange) else 'REGRESSION'}: {r.describe()}", file=sys.stderr)
    return REGRESSION_EXIT if result.regressions else 0
