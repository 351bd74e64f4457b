"""Flex Template entry point: `semjpeg <job> ...` from the template's parameters.

Dataflow passes template parameters as ``--name=value`` (and its own pipeline options the same
way). ``job`` picks the subcommand (default ``nightly``):

* ``nightly`` takes ``config`` (and optionally ``date``): ``semjpeg nightly --config C --date D``;
* ``evaluate``, ``defend`` and ``attack`` take their whole argument list in ``args``, split as a
  shell would: ``args="--input gs://b/in/*.tar --output gs://b/out --defense aug_msroi"``.

Any other ``--name=value`` (Dataflow's own options) passes through to the job's Beam options.

A Dataflow launch also passes ``--template_location``: Beam then writes the job's graph there, and
Dataflow starts the job only after this program exits (Google's Flex Template docs: don't call
``wait_until_finish``). The jobs see it and only submit (``pipeline.evaluate.submit_only``): they
check their configuration, inputs and history as always, then exit 0 without waiting; the
nightly job's history, nightly.json and report are written by the job's own last stage, and its
alarms are logged as errors and counted (``semjpeg:nightly_alarms``).
"""
from __future__ import annotations

import shlex
import sys

JOBS = ("nightly", "evaluate", "defend", "attack")


def job_argv(argv: list[str]) -> list[str]:
    """The ``semjpeg`` command line for the template parameters ``argv``; ValueError if they don't fit."""
    params, rest = {}, []
    for a in argv:
        name, eq, value = a.partition("=")
        if eq and name in ("--job", "--config", "--date", "--args"):
            if name in params:
                raise ValueError(f"template parameter {name[2:]} given twice")
            params[name] = value
        else:
            rest.append(a)
    job = params.pop("--job", "nightly") or "nightly"
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; valid: {', '.join(JOBS)}")
    if job == "nightly":
        if "--args" in params:
            raise ValueError("the nightly job takes config (and date), not args")
        if "--config" not in params:
            raise ValueError("the nightly job needs the config parameter")
        return ["nightly", *(f"{k}={v}" for k, v in params.items()), *rest]
    if set(params) & {"--config", "--date"}:
        raise ValueError(f"config and date are the nightly job's parameters; {job} takes args")
    if not params.get("--args", "").strip():
        raise ValueError(f"the {job} job needs args (e.g. --input ... --output ...)")
    return [job, *shlex.split(params["--args"]), *rest]


if __name__ == "__main__":
    try:
        cmd = job_argv(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"flex template: {e}")
    from jobs.__main__ import cli  # the command's own exit: SIGTERM (a cancelled launch) stops cleanly, 143

    sys.exit(cli(cmd, own_process=True))
