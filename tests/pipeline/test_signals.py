"""The semjpeg command's Ctrl-C and SIGTERM handlers (pipeline.signals.track_interrupts) where
raising at once does harm: inside the import machinery's lock handling, and where Python cannot
propagate an exception. Each runs in a fresh interpreter: the handlers are process-wide."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_ctrl_c_as_the_main_thread_takes_the_import_lock_leaves_it_free():
    """Ctrl-C landing just as the main thread took Python's global import lock, before the
    ``try`` that releases it (``importlib._bootstrap._get_module_lock``; the weakref callback
    that drops a module lock is the same), raised there and left the lock held: every import of
    another thread then waited forever (the local Dask cluster's event loop registering a
    worker, so the job closing its cluster hung: about one Dask job in 30 signalled in its first
    seconds). Made deterministic here: a helper thread holds the lock until the main thread
    waits for it (that wait cannot be interrupted), signals it, and lets go. The interrupt is
    still raised, just after: where the main thread goes on."""
    r = run_python("""
        import _imp, signal, sys, threading, time, traceback

        from pipeline.signals import track_interrupts

        track_interrupts()
        main = threading.main_thread().ident
        held = threading.Event()

        def hold_the_import_lock():
            _imp.acquire_lock()
            held.set()
            try:
                while True:  # until the main thread waits for it, in the import machinery
                    frame = sys._current_frames().get(main)
                    if frame is not None and frame.f_code.co_name == "_get_module_lock":
                        break
                    time.sleep(0.001)
                signal.pthread_kill(main, signal.SIGINT)
                time.sleep(0.1)  # the signal is taken while the main thread waits
            finally:
                _imp.release_lock()

        helper = threading.Thread(target=hold_the_import_lock)
        helper.start()
        held.wait()
        where = None
        try:
            import wave  # noqa: F401  (not imported yet)
            time.sleep(5)  # a deferred interrupt comes within milliseconds
        except KeyboardInterrupt as e:
            where = [f.name for f in traceback.extract_tb(e.__traceback__) if not f.filename.endswith("signals.py")]
        helper.join()
        other = threading.Thread(target=__import__, args=("colorsys",), daemon=True)
        other.start()
        other.join(10)
        print(f"raised in: {where}; another thread imports: {not other.is_alive()}", flush=True)
    """)
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"raised in: (\[.*\]); another thread imports: True", r.stdout.strip())
    assert m, r.stdout
    # Raised in this script or, when the retry comes first, in the module it imports (its own
    # code, which an exception leaves cleanly: ['<module>', '<module>', 'Wave_read'] once in CI);
    # never inside the import machinery's lock handling.
    where = ast.literal_eval(m.group(1))
    assert where[0] == "<module>" and not {"_get_module_lock", "cb", "_lock_unlock_module"} & set(where), where
    assert r.stderr == ""


def test_an_interrupt_python_cannot_propagate_is_raised_where_it_can_without_a_traceback():
    """Ctrl-C or SIGTERM taken in a weakref callback (or ``__del__``, a garbage-collection hook):
    Python printed "Exception ignored in ..." with the handler's traceback and went on, and the
    job stopped only at its next check (or ran to its end). The signal is now sent again and
    raised in the code that follows, and nothing is printed."""
    r = run_python("""
        import os, signal, time, weakref

        from pipeline.signals import Terminated, track_interrupts

        track_interrupts()

        class Thing:
            pass

        for signum, exc in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)):
            thing = Thing()
            ref = weakref.ref(thing, lambda r, signum=signum: os.kill(os.getpid(), signum))
            try:
                del thing  # the callback runs here
                time.sleep(5)
                print("not raised", flush=True)
            except exc:
                print(f"raised {exc.__name__}", flush=True)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["raised", "KeyboardInterrupt", "raised", "Terminated"]
    assert r.stderr == ""


def test_ctrl_c_in_code_compiled_from_a_string_does_not_end_the_process_by_sigint():
    """``namedtuple`` and ``dataclasses`` run code they compile from a string (``eval``, ``exec``),
    all through torch's and Beam's imports. A KeyboardInterrupt raised there and caught outside
    marked the interpreter as ended by an unhandled Ctrl-C (CPython's
    ``_Py_UnhandledKeyboardInterrupt``): ``python -m jobs`` printed its line and then killed
    itself with SIGINT at exit (-2) instead of exiting 130, about one Dask job in 15 signalled in
    its first seconds. (``python -c`` ending normally does the same: the status here.) The
    interrupt is now raised once that code has returned."""
    r = run_python("""
        import os, signal, time

        from pipeline.signals import track_interrupts

        track_interrupts()
        try:
            eval("os.kill(os.getpid(), signal.SIGINT) or time.sleep(0.2)")  # Ctrl-C in string-built code
            time.sleep(5)
            print("not raised", flush=True)
        except KeyboardInterrupt:
            print("raised", flush=True)
    """)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "raised", "")


def test_an_interrupt_waiting_as_the_command_ends_is_not_raised_after_it():
    """A signal landing where raising it does harm (here: code built from a string) just as the
    job ends waits a few milliseconds, and the job returned meanwhile: the retry then came after
    the command, a KeyboardInterrupt traceback from its exit handlers (status 0), or in the code
    of a caller that went on. The job's end stands; SIGALRM's handler is put back."""
    r = run_python("""
        import os, signal, time

        import jobs.__main__ as command

        def main(argv):
            eval("os.kill(os.getpid(), signal.SIGINT)")  # just as the job ends
            return 0

        command.main = main
        code = command.cli(["evaluate"], own_process=False)
        time.sleep(0.2)  # the caller goes on
        print(code, signal.getsignal(signal.SIGALRM) == signal.SIG_DFL, flush=True)
    """)
    assert (r.returncode, r.stdout.split(), r.stderr) == (0, ["0", "True"], "")


def test_an_interrupt_is_raised_within_a_second_where_the_main_thread_stays_unsafe():
    """The main thread staying where raising does harm (here: everything under a wrapper's
    ``exec`` of a string is ``<string>``'s; a write or lock wait in logging or the import machinery
    does the same): the interrupt waited for it to leave, forever, and Ctrl-C or SIGTERM could not
    stop the job at all (it ran to its end). Now it is raised where the main thread is, a second
    later."""
    r = run_python("""
        import os, signal, threading, time

        from pipeline.signals import track_interrupts

        track_interrupts()
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        exec("try:\\n    time.sleep(10)\\n    print('not raised')\\nexcept KeyboardInterrupt:\\n    print('raised')")
        print(round(time.monotonic() - start) <= 3, flush=True)
    """)
    assert (r.returncode, r.stdout.split(), r.stderr) == (0, ["raised", "True"], "")


def test_an_interrupt_waiting_puts_back_another_timer():
    """SIGALRM's timer, which the retry takes, belongs to others too (pytest-timeout's signal
    method, ``signal.alarm``): what was left of it was lost, so that alarm never came."""
    r = run_python("""
        import os, signal, time

        from pipeline.signals import track_interrupts

        track_interrupts()
        fired = []
        signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(time.monotonic()))
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        try:
            eval("os.kill(os.getpid(), signal.SIGINT) or time.sleep(0.1)")  # waits, and is raised after
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        time.sleep(1)
        print(len(fired), all(0.45 < t - start < 1.5 for t in fired), flush=True)  # due at 0.5 s
    """)
    assert (r.returncode, r.stdout.split(), r.stderr) == (0, ["1", "True"], "")
