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
