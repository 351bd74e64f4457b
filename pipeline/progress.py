"""Progress of long runs on local runners (FnApiRunner, DirectRunner, a local Dask cluster).

Counting DoFns after the main stages write each process's running totals to small JSON files in
a local folder; a thread in the launching process sums them once a second and shows a progress
line on stderr (a bar on a terminal, a log line every 30 s otherwise). Beam counters are
summarized when the run ends, where the runner reports them. Remote runners (Dataflow) show
counters in their own UI and get no progress files.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict

import apache_beam as beam

log = logging.getLogger(__name__)

LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "DaskRunner")
_TOTALS: dict[tuple[str, str], int] = defaultdict(int)
_LOCK = threading.Lock()


class CountProgress(beam.DoFn):
    """Pass-through that adds to this process's count for ``stage`` (written at most every 2 s)."""

    def __init__(self, folder: str, stage: str):
        self.folder = folder
        self.stage = stage
        self._last = 0.0

    def process(self, element):
        with _LOCK:
            _TOTALS[(self.folder, self.stage)] += 1
        now = time.monotonic()
        if now - self._last > 2.0:
            self._flush()
            self._last = now
        yield element

    def finish_bundle(self):
        self._flush()

    def _flush(self):
        with _LOCK:
            n = _TOTALS[(self.folder, self.stage)]
        path = os.path.join(self.folder, f"{self.stage}.{socket.gethostname()}.{os.getpid()}.json")
        try:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"stage": self.stage, "count": n}, f)
            os.replace(tmp, path)
        except OSError:  # progress is best effort; the run must not fail for it
            pass


def read_counts(folder: str) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                doc = json.load(f)
            out[doc["stage"]] += int(doc["count"])
        except (OSError, ValueError, KeyError):
            continue
    return dict(out)


class ProgressMonitor:
    """Shows the counts in ``folder`` while a run is going; ``per_input`` variants per input."""

    def __init__(self, per_input: int, stream=None, interval: float = 1.0):
        self.folder = tempfile.mkdtemp(prefix="semjpeg-progress-")
        self.per_input = max(1, per_input)
        self.stream = stream or sys.stderr
        self.interval = interval
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="semjpeg-progress", daemon=True)
        self._start = time.monotonic()
        self._last_log = 0.0
        self._clearing: list[logging.Handler] = []

    def __enter__(self):
        if self.tty:  # records logged to the bar's terminal start on a clear row
            self._clearing = [h for h in logging.getLogger().handlers
                              if isinstance(h, logging.StreamHandler) and h.stream is self.stream]
            for h in self._clearing:
                h.addFilter(self._clear)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._show(final=True)
        for h in self._clearing:
            h.removeFilter(self._clear)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _clear(self, record: logging.LogRecord) -> bool:
        """A handler filter: clears the bar's row before the record is written (the next tick
        draws the bar again below it)."""
        self.stream.write("\r\x1b[K")
        return True

    def line(self, columns: int | None = None) -> str:
        """The progress line; ``columns``: at most that many characters (its bar shrinks first)."""
        c = read_counts(self.folder)
        decoded, classified = c.get("decoded", 0), c.get("classified", 0)
        expected = decoded * self.per_input
        frac = classified / expected if expected else 0.0
        counts = (f" {100 * frac:5.1f}%  decoded {decoded}  attacked {c.get('attacked', 0)}  "
                  f"classified {classified}/{expected}  errors {c.get('errors', 0)}  "
                  f"{time.monotonic() - self._start:.0f}s")
        width = 24 if columns is None else min(24, columns - len(counts) - 2)
        if width < 4:
            return counts.lstrip()[:columns]
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        return f"[{bar}]{counts}"

    def _show(self, final: bool = False):
        if self.tty:
            # A row wider than the terminal wraps, and "\r" then redraws only its last part.
            text = self.line(terminal_columns(self.stream) - 1)
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
            self.stream.flush()
        elif final or time.monotonic() - self._last_log > 30:
            log.info("progress: %s", self.line())
            self._last_log = time.monotonic()

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._show()


def terminal_columns(stream) -> int:
    """The width of the terminal ``stream`` writes to (``COLUMNS``, or 80, where it does not say)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns or shutil.get_terminal_size().columns


def summarize_counters(result) -> str | None:
    """Beam counters of a finished run as one line, where the runner reports them."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # e.g. Beam's Dask runner does not implement metrics
        return None
    totals: dict[str, int] = defaultdict(int)
    for c in counters:
        if c.key.metric.namespace == "semjpeg":
            totals[c.key.metric.name] += c.committed or 0
    return ", ".join(f"{k}={v}" for k, v in sorted(totals.items())) or None


def runner_name(runner: str | None) -> str:
    """A ``--runner`` value's class name (``FnApiRunner`` when none is given)."""
    return (runner or "FnApiRunner").rsplit(".", 1)[-1]


def is_local(runner: str | None) -> bool:
    return runner_name(runner) in LOCAL_RUNNERS
