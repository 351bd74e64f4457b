"""Deferring Ctrl-C and SIGTERM over a short stretch of work that must not be cut in the middle."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, systemd, Kubernetes), raised where the job is, so that it
    unwinds as after Ctrl-C: staging folders removed, clusters closed, the previous output kept."""


#: The signals the command's handlers (track_interrupts) took while its job ran; None when no
#: command is tracking them (a caller of ``main`` in its own process, a test).
_received: list[int] | None = None


def _raise(signum: int):
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def track_interrupts() -> None:
    """The ``semjpeg`` command's handlers: Ctrl-C raises KeyboardInterrupt and SIGTERM Terminated,
    and each is recorded, for :func:`check_interrupted`, until :func:`stop_tracking`."""
    global _received
    _received = []

    def handler(signum, frame):
        if _received is not None:
            _received.append(signum)
        _raise(signum)

    for s in SIGNALS:
        signal.signal(s, handler)


def stop_tracking() -> None:
    """The job is over: what the handlers took is forgotten, and no longer recorded."""
    global _received
    _received = None


def check_interrupted() -> None:
    """Raise again an interrupt whose exception did not stop the job: one that landed in a
    library's ``try: import ... except: pass`` while the job imported torch and Beam (a signal in
    a job's first seconds was lost that way, and the job ran to its end)."""
    if _received:
        signum = _received.pop()
        _received.clear()
        _raise(signum)


@dataclass
class Deferred:
    """The signals received while deferring (their numbers, in order)."""

    received: list[int] = field(default_factory=list)


@contextlib.contextmanager
def defer_interrupts(doing: str):
    """Hold off the first SIGINT or SIGTERM until the block ends; a second one stops at once.

    ``doing`` says what the block finishes first (logged with the warning). The first signal is
    logged and recorded (``Deferred.received``), and the block goes on; a second is handed to the
    handler that was in place before (Ctrl-C's KeyboardInterrupt, the job's SIGTERM handler, or
    the default action). The handlers are restored when the block ends, and a deferred signal is
    not raised again: the work it would have cut is done. Only the main thread can set handlers;
    elsewhere this defers nothing.
    """
    deferred = Deferred()
    if threading.current_thread() is not threading.main_thread():
        yield deferred
        return
    # None: a handler not set from Python, which could not be put back; such a signal is left alone.
    previous = {s: h for s in SIGNALS if (h := signal.getsignal(s)) is not None}

    def stop_now(signum, frame):
        for s, handler in previous.items():
            signal.signal(s, handler)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # the default action, now that it is restored

    def hold(signum, frame):
        deferred.received.append(signum)
        if len(deferred.received) > 1:
            stop_now(signum, frame)
            return
        log.warning("%s received: %s; interrupt again to stop now", signal.Signals(signum).name, doing)

    for s in previous:
        signal.signal(s, hold)
    try:
        yield deferred
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
