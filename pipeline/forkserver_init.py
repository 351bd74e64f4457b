"""Imported first by the fork server of local Dask clusters (pipeline.dask_cluster): it ignores
Ctrl-C and SIGTERM from here on.

Ctrl-C in a terminal reaches the whole process group, and so does SIGTERM from ``timeout`` or
``kill -- -PGID`` (systemd signals the whole cgroup). Python's fork server ignores SIGINT, but
only once its preloads (torch, Beam, every stage: seconds) are imported, and never SIGTERM; a
signal in a job's first seconds killed it, and the job then waited for workers that could never
start, or ended in the nannies' tracebacks. The job handles the signal and closes its cluster,
which ends the server; the workers forked from it ignore both too (pipeline.dask_worker.dask_setup).
"""
import signal

for _signal in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signal, signal.SIG_IGN)
# The server started with them blocked (pipeline.dask_cluster); one sent meanwhile is dropped now.
if hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))
