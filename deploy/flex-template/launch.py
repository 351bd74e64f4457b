"""Flex Template entry point: `semjpeg <job> ...` with the template's parameters as flags.

Dataflow passes template parameters as --name=value; `job` picks the subcommand (default nightly).
"""
import sys

from jobs.__main__ import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    job = "nightly"
    for a in list(argv):
        if a.startswith("--job="):
            job = a.split("=", 1)[1]
            argv.remove(a)
    sys.exit(main([job, *argv]))
