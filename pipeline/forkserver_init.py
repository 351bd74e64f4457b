"""Imported first by the fork server of local Dask clusters (pipeline.dask_cluster): it ignores
Ctrl-C from here on.

Ctrl-C in a terminal reaches the whole process group. Python's fork server ignores SIGINT, but
only once its preloads (torch, Beam, every stage: seconds) are imported; a Ctrl-C in a job's
first seconds killed it mid-import, and the job then waited for workers that could never start
and ended in tracebacks. The job handles the interrupt and closes its cluster, which ends the
server; the workers forked from it ignore SIGINT too (pipeline.dask_worker.dask_setup).
"""
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
