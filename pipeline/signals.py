"""Ctrl-C and SIGTERM: the ``semjpeg`` command's handlers (raised as exceptions, where that does
no harm), and deferring them over a short stretch of work that must not be cut in the middle."""
from __future__ import annotations

import contextlib
import logging
import opcode
import os
import signal
import sys
import threading
import time
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


#: The bytecodes of ``import`` statements (the frame that runs one is inside the import's C code).
_IMPORT_OPS = frozenset(opcode.opmap[name] for name in ("IMPORT_NAME", "IMPORT_FROM", "IMPORT_STAR")
                        if name in opcode.opmap)


def _unsafe(frame) -> bool:
    """Whether raising an interrupt in ``frame`` (this module's own frames skipped: a handler
    running inside another) does harm:

    * The frame is the import machinery's (``importlib._bootstrap``) or logging's, which take
      their locks just before the ``try`` blocks that release them: an exception raised between
      the two skips the release. A Ctrl-C raised in the weakref callback that drops a module
      lock, right after it took the global import lock, left that lock held by the main thread
      (Python printed "Exception ignored in ... _get_module_lock.<locals>.cb" and went on): the
      next import of any other thread, the local Dask cluster's event loop registering a worker,
      then waited forever, and so did the job closing its cluster.
    * The frame is running an ``import`` statement's C code (not a module's code, which has its
      own frame): an interrupt raised there, where an unknown name's error message is built
      (``from package import missing``), came out as "TypeError: expected a message argument".
    * The frame runs inside code that ``eval`` or ``exec`` compiled from a string (a frame of
      ``<string>`` on the stack, not the bottom one: ``python -c``): ``namedtuple`` and
      ``dataclasses`` build their methods so, all through torch's and Beam's imports. A
      KeyboardInterrupt leaving such code marks the interpreter (CPython's
      ``_Py_UnhandledKeyboardInterrupt``, caught or not), and ``python -m`` then ends by
      SIGINT at exit, whatever its status: the job printed its line and died of SIGINT (-2)
      instead of exiting 130.
    """
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None:
        return False
    filename = frame.f_code.co_filename
    if filename.startswith("<frozen importlib") or filename == logging.__file__:
        return True
    if 0 <= frame.f_lasti < len(frame.f_code.co_code) and frame.f_code.co_code[frame.f_lasti] in _IMPORT_OPS:
        return True
    while frame.f_back is not None:
        if frame.f_code.co_filename == "<string>":
            return True
        frame = frame.f_back
    return False


#: The interrupt waiting for the main thread to leave code where raising it does harm
#: (:func:`_later`), since when it waits (``time.monotonic``), and SIGALRM's handler and timer
#: (``ITIMER_REAL``: delay, interval) before :func:`_later` took them.
_pending: int | None = None
_pending_since = 0.0
_alarm_before = None
_timer_before = (0.0, 0.0)
#: Seconds between checks that the main thread has left such code.
RETRY_AFTER = 0.005
#: Seconds after which a waiting interrupt is raised wherever the main thread is: one that stays
#: in such code (waiting on a lock or a write there, or run under a wrapper's ``exec`` of a
#: string, every frame then ``<string>``'s) could not be stopped at all.
GIVE_UP_AFTER = 1.0
_CAN_WAIT = hasattr(signal, "setitimer")


def _later(signum: int) -> None:
    """Take ``signum`` again in a few milliseconds (SIGALRM), with its handler of that time, once
    the main thread has left the code that took it (:func:`_unsafe`). No thread of its own: one
    that outlived the job looked like a job still running (jobs.__main__)."""
    global _pending, _pending_since, _alarm_before, _timer_before
    if _pending is None:
        _alarm_before = signal.signal(signal.SIGALRM, _alarm)
        _pending_since = time.monotonic()
        _timer_before = signal.setitimer(signal.ITIMER_REAL, RETRY_AFTER)
    else:
        signal.setitimer(signal.ITIMER_REAL, RETRY_AFTER)
    _pending = signum


def _cancel_later() -> None:
    global _pending
    if _pending is None:
        return
    _pending = None
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL if _alarm_before is None else _alarm_before)
    delay, interval = _timer_before
    if delay:  # another's timer (pytest-timeout's, an alarm()): what was left of it, due now if spent
        signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - _pending_since), 1e-6), interval)


def _alarm(_signum, frame) -> None:
    signum = _pending
    if signum is None:
        return
    if _unsafe(frame):
        if time.monotonic() - _pending_since < GIVE_UP_AFTER:
            signal.setitimer(signal.ITIMER_REAL, RETRY_AFTER)
            return
        frame = None  # raised here all the same (the handler waits no more: no frame to judge)
    _cancel_later()
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def _interrupt_signal(exc: BaseException | None) -> int | None:
    if isinstance(exc, Terminated):
        return signal.SIGTERM
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    return None


def track_interrupts() -> None:
    """The ``semjpeg`` command's handlers: Ctrl-C raises KeyboardInterrupt and SIGTERM Terminated,
    and each is recorded, for :func:`check_interrupted`, until :func:`stop_tracking`.

    A signal that lands where raising it does harm (:func:`_unsafe`: the import machinery's lock
    handling, code compiled from a string) is raised a few milliseconds later, once the main
    thread has left it (if it stays there, a second later all the same, where it is). An
    interrupt raised where Python cannot propagate it (a weakref callback, ``__del__``, a
    garbage-collection hook: Python printed "Exception ignored in ..." with a traceback and went
    on) is not printed: it is raised again a few milliseconds later, where it can propagate. (Without ``signal.setitimer``, Windows, both are raised at once as before.)"""
    global _received
    _received = []

    def handler(signum, frame):
        if _CAN_WAIT and _unsafe(frame):
            _later(signum)
            return
        _cancel_later()
        if _received is not None:
            _received.append(signum)
        _raise(signum)

    for s in SIGNALS:
        signal.signal(s, handler)
    if not getattr(sys.unraisablehook, "_semjpeg", False):
        previous = sys.unraisablehook

        def unraisable(info):
            signum = _interrupt_signal(info.exc_value)
            if (signum is None or _received is None or not _CAN_WAIT
                    or threading.current_thread() is not threading.main_thread()):
                previous(info)
                return
            _later(signum)

        unraisable._semjpeg = True
        sys.unraisablehook = unraisable


def stop_tracking() -> None:
    """The job is over: what the handlers took is forgotten, and no longer recorded. An interrupt
    still waiting to be raised (:func:`_later`: it landed where raising does harm as the job
    ended) is dropped: the job's own end stands. Raised later, it came after the command had
    returned (a traceback from its exit handlers, status 0; or in a caller's code)."""
    global _received
    _received = None
    _cancel_later()


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
