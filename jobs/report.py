"""Write one self-contained HTML report for a run: tables, plots, trends and a gallery."""
from __future__ import annotations

#: Runs no pipeline: Beam options are errors here, and no Dask cluster is started for them.
PIPELINE = False
HELP = "HTML report of a run (and of past nights with --history)"


def add_arguments(parser) -> None:
    parser.add_argument("--run", required=True, help="a run folder (evaluate, defend, attack or nightly)")
    parser.add_argument("--history", help="the nightly history dataset: trends, and regressions recomputed against it")
    parser.add_argument("--output", required=True, help="the HTML file to write")


def run(args, beam_argv) -> int:
    if beam_argv:
        raise ValueError(f"unrecognized arguments: {' '.join(beam_argv)}")
    from pipeline.report import check_report_paths, write_report

    check_report_paths(args.run, args.output, args.history)
    print(f"wrote {write_report(args.run, args.output, history=args.history)}")
    return 0
