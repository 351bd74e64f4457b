"""The progress line of local runs (pipeline/progress.py): a bar on a terminal, log lines otherwise."""
from __future__ import annotations

import io
import logging
import re

from pipeline.progress import ProgressMonitor


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_fits_the_terminal(monkeypatch):
    """A bar wider than the terminal wraps, and each "\\r" then redraws only its last row: an
    80-column terminal got one stale row per second (the line is 88 characters at the start)."""
    monkeypatch.setenv("COLUMNS", "80")
    stream = Terminal()
    with ProgressMonitor(per_input=4, stream=stream, interval=60):
        pass
    rows = [r for r in stream.getvalue().replace("\x1b[K", "").replace("\n", "\r").split("\r") if r]
    # The bar shrinks, the counts stay whole (the seconds are those the machine took: "0s" unless
    # it was busy).
    assert rows and all(len(r) < 80 and re.search(r"errors 0  \d+s$", r) for r in rows), rows


def test_a_log_line_does_not_continue_the_bar(monkeypatch):
    """A record logged while the bar is shown (-v, or any warning) starts on a clear line, not
    after the bar's text."""
    monkeypatch.setenv("COLUMNS", "200")
    stream = Terminal()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with ProgressMonitor(per_input=4, stream=stream, interval=60) as monitor:
            monitor._show()
            logging.getLogger("semjpeg.test").warning("something happened")
    finally:
        root.removeHandler(handler)
    shown = stream.getvalue()
    before = shown[:shown.index("something happened")]
    assert before.endswith("\r\x1b[K"), repr(shown)
    assert "classified" in shown.split("something happened")[1]  # the bar is drawn again after it
