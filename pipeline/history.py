"""Nightly history: a Parquet dataset partitioned by date, and regression checks against it.

``HIST/date=YYYY-MM-DD/summary.parquet`` holds one row per (attack, defense) of that night's run.
The date lives in the folder name only (hive partitioning), so ``pyarrow.parquet.read_table(HIST)``
and ``pandas.read_parquet(HIST)`` read the whole dataset; files written before that change also
hold a ``date`` column, which is read and checked here but clashes with the folder's in those
readers. A partition is written to a hidden temporary name and renamed into place, so a failure
never leaves a half-written file (nor an empty folder for a new date), and writing one date never
touches another. A folder holding only such temporary leftovers (a write that was interrupted) is
not a partition: it is skipped with a warning and cleaned when that date is written again. A
partition folder without its file, a file that is not readable Parquet with the history columns
(or with null attack or defense specs), and a ``date=`` folder naming no real date
(``date=2026-02-30``) are errors that name it. A file may lack metric columns (a metric added
after it was written: no value that night), and hold columns under other types that keep every
value (a night rewritten with pandas, polars or Spark): it is read as the history's types.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import math
import posixpath
import re
import secrets
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .io import join, missing_folders, remove_empty_folders

log = logging.getLogger(__name__)

FILE = "summary.parquet"
_DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")

#: Columns of a partition's file (the date is the folder's). In memory, rows also carry ``date``.
HISTORY_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("model", pa.string()),
    ("attack", pa.string()), ("attack_spec", pa.string()),
    ("defense", pa.string()), ("defense_spec", pa.string()),
    ("n", pa.int64()), ("top1", pa.float64()), ("agree_clean", pa.float64()), ("success", pa.float64()),
    ("bytes", pa.float64()), ("bpp", pa.float64()), ("psnr", pa.float64()), ("ssim", pa.float64()),
    ("linf", pa.float64()), ("rmse", pa.float64()),
    # Images whose PSNR is infinite (identical to their reference): all of them is a PSNR of +inf,
    # not a missing one (the mean is over the finite values only).
    ("identical", pa.int64()),
])

#: The columns an (attack, defense) pair is found by: never null.
KEY_COLUMNS = ("attack_spec", "defense_spec")

#: Metrics a regression can be found in, and whether higher is better. The tolerance of ``n``
#: (images evaluated per pair) is a fraction of the previous night's n; the others are absolute.
METRICS = {"top1": True, "agree_clean": True, "psnr": True, "ssim": True, "bytes": False, "bpp": False,
           "success": False, "n": True}


def history_rows(summary: dict, date: str) -> list[dict]:
    """summary.json of a run -> history rows for ``date``."""
    model = summary.get("config", {}).get("model")
    return [{**{k: r.get(k) for k in HISTORY_SCHEMA.names}, "date": date, "run_id": summary["run_id"], "model": model}
            for r in summary["table"]]


def _evaluated(row: dict) -> bool:
    return row.get("n") is None or row["n"] > 0


def has_results(rows: list[dict]) -> bool:
    """Whether a night evaluated anything (a night where every input failed has no rows)."""
    return any(_evaluated(r) for r in rows)


def read_parquet(data: bytes, columns: tuple[str, ...] | None = None) -> pa.Table:
    """A Parquet file's table (``columns``: only those of them it has), read on the calling thread.

    pyarrow (25.0.1) reading with its thread pools and the process exiting right after (a job
    that stops on an error) sometimes aborted in C++ ("terminate called without an active
    exception", SIGABRT, exit 134). Read this way, no pyarrow thread is ever started.
    """
    f = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)
    if columns is not None:
        columns = [c for c in columns if c in f.schema_arrow.names]
    return f.read(columns=columns, use_threads=False)


#: Columns a partition may lack (a metric added after that night was written): read as no value.
OPTIONAL_COLUMNS = ("n", "top1", "agree_clean", "success", "bytes", "bpp", "psnr", "ssim", "linf", "rmse",
                    "identical")


def _compatible(column: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray | None:
    """``column`` as ``to`` where only its type differs (a night rewritten by another tool:
    pandas' float n, Spark's int32, polars' large strings, dictionary-encoded text), else None."""
    t = column.type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if to == pa.string():
        ok = pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)
    else:
        ok = pa.types.is_integer(t) or pa.types.is_floating(t)
    if not ok:
        return None
    try:
        return column.cast(to, safe=True)  # 4.5 as n is refused, not truncated
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _conform(table: pa.Table, date: str) -> pa.Table:
    """A partition's table as HISTORY_SCHEMA, or ValueError naming every problem."""
    problems, columns = [], []
    for f in HISTORY_SCHEMA:
        if f.name not in table.schema.names:
            if f.name in OPTIONAL_COLUMNS:
                columns.append(pa.nulls(table.num_rows, f.type))
            else:
                problems.append(f"no column {f.name}")
            continue
        column = table.column(f.name)
        if column.type != f.type:
            found = column.type
            column = column.cast(f.type) if found == pa.null() else _compatible(column, f.type)
            if column is None:
                problems.append(f"column {f.name} is {found}, expected {f.type}")
                continue
        if f.name in KEY_COLUMNS and column.null_count:
            problems.append(f"column {f.name} has {column.null_count} null value(s)")
        columns.append(column)
    if "date" in table.schema.names:  # files written by earlier versions (or a date32 written back)
        dates = {str(d) for d in table.column("date").to_pylist()}
        if dates - {date}:
            problems.append(f"its date column says {', '.join(sorted(dates - {date}))}")
    if problems:
        raise ValueError("; ".join(problems))
    return pa.Table.from_arrays(columns, schema=HISTORY_SCHEMA)


def _leftovers_only(fs, part: str) -> list[str]:
    """The temporary files of an interrupted write, when the folder holds nothing else but hidden
    or marker files (``.DS_Store``, ``_SUCCESS``: files pyarrow's dataset reader skips too)."""
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(part, detail=False)]
    leftovers = [n for n in names if n.startswith(f".{FILE}.tmp-")]
    return leftovers if leftovers and all(n.startswith((".", "_")) for n in names) else []


def read_history(history: str) -> dict[str, list[dict]]:
    """All partitions: {date: rows}. Raises ValueError naming a missing or corrupt partition."""
    fs, root = url_to_fs(history)
    if not fs.exists(root):
        return {}
    out: dict[str, list[dict]] = {}
    for entry in sorted(fs.ls(root, detail=False)):
        name = posixpath.basename(entry.rstrip("/"))
        m = _DATE_DIR.match(name)
        if not m or not fs.isdir(entry):
            continue
        try:
            _dt.date.fromisoformat(m.group(1))
        except ValueError:
            raise ValueError(f"history partition {name} in {history} is corrupt: {m.group(1)} is not a date "
                             "(rename or remove the folder)") from None
        path = join(entry, FILE)
        if not fs.exists(path):
            leftovers = _leftovers_only(fs, entry)
            if leftovers:
                log.warning("history folder %s in %s holds only the leftovers of an interrupted write (%s): "
                            "not a partition, skipped", name, history, ", ".join(leftovers))
                continue
            raise ValueError(f"history partition {name} in {history} has no {FILE} "
                             "(restore it, or remove the folder to forget that night)")
        try:
            with fs.open(path, "rb") as f:
                table = read_parquet(f.read())
            table = _conform(table, m.group(1))
        except Exception as e:
            raise ValueError(f"history partition {name} in {history} is corrupt: {e}") from None
        out[m.group(1)] = [{**r, "date": m.group(1)} for r in table.to_pylist()]
    return out


def check_writable(history: str) -> None:
    """Fail before any work if the history location cannot take a partition (the folders created
    for the probe, its parents too, are removed again: a run that fails later leaves no empty
    history behind)."""
    try:
        fs, root = url_to_fs(history)
        if fs.exists(root) and not fs.isdir(root):
            raise NotADirectoryError(f"{root} is a file")
        made = missing_folders(fs, root)
        fs.makedirs(root, exist_ok=True)
        probe = join(root, f".probe-{secrets.token_hex(4)}")
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:
        raise ValueError(f"history location {history} cannot be written: {e}") from None
    remove_empty_folders(fs, made)


def check_night(history: str, date: str) -> None:
    """Fail before any work if the night's partition cannot be written: something that is not a
    folder (a stray file) stands at ``HIST/date=YYYY-MM-DD``, or the folder of a night run before
    cannot take a file (read-only)."""
    fs, root = url_to_fs(history)
    part = join(root, f"date={date}")
    if not fs.exists(part):
        return
    if not fs.isdir(part):
        raise ValueError(f"history partition date={date} in {history} cannot be written: {part} exists and is "
                         "not a folder (move or remove it)")
    check_writable(join(history, f"date={date}"))


def write_partition(history: str, date: str, rows: list[dict]) -> str:
    """Write (or replace) one date's partition atomically; returns its path."""
    fs, root = url_to_fs(history)
    part = join(root, f"date={date}")
    buf = io.BytesIO()
    table = pa.Table.from_pylist([{k: r.get(k) for k in HISTORY_SCHEMA.names} for r in rows], schema=HISTORY_SCHEMA)
    pq.write_table(table, buf, compression="zstd")
    existed = fs.exists(part)
    fs.makedirs(part, exist_ok=True)
    tmp = join(part, f".{FILE}.tmp-{secrets.token_hex(4)}")
    # (An object store has no folders: a date never written has nothing to list.)
    stale = [p for p in fs.ls(part, detail=False) if posixpath.basename(p).startswith(f".{FILE}.tmp-")] if existed else []
    try:
        with fs.open(tmp, "wb") as f:
            f.write(buf.getvalue())
        fs.mv(tmp, join(part, FILE))
    except BaseException:
        # A new date's folder left empty would read as a partition that lost its file (every
        # later night an error); one holding a partial temporary file is skipped as leftovers.
        if not existed:
            with contextlib.suppress(OSError):
                fs.rmdir(part)
        raise
    for p in stale:  # an earlier interrupted write of this date; never anything else
        log.info("removing %s (left by an interrupted write)", p)
        fs.rm(p)
    return join(part, FILE)


#: The "metric" of a pair that had results the previous night and has none tonight.
MISSING = "missing"


@dataclass(frozen=True)
class Regression:
    """One (attack, defense) pair that got worse than the previous night beyond tolerance:
    ``metric`` is a METRICS name or MISSING (``previous`` is then its previous n)."""

    attack_spec: str
    defense_spec: str
    metric: str
    previous: float | None
    current: float | None
    tolerance: float
    previous_date: str

    def describe(self) -> str:
        pair = f"{self.attack_spec} x {self.defense_spec}"
        if self.metric == MISSING:
            had = f"n was {self.previous:g}" if self.previous is not None else "it had results"
            return f"{pair} has no result ({had} on {self.previous_date})"
        if self.current is None:
            return (f"{self.metric} of {pair} has no value (it was {self.previous:.4g} on {self.previous_date}): "
                    + _NO_VALUE.get(self.metric, "none of its images gave one"))
        worse = "dropped" if METRICS[self.metric] else "rose"
        tol = f"{self.tolerance:g} of the previous n" if self.metric == "n" else f"{self.tolerance:g}"
        return (f"{self.metric} of {pair} {worse} from {self.previous:.4g} "
                f"({self.previous_date}) to {self.current:.4g} (tolerance {tol})")


#: Why a metric a pair had the previous night can have no value tonight (summary.SummaryFn).
_NO_VALUE = {
    "top1": "no image had a label",
    "psnr": "none of its images gave a number",
    "ssim": "no image gave a number (smaller than SSIM's window, or not finite)",
}


@dataclass(frozen=True)
class EmptyNight:
    """A night with no results at all: every input failed, or none was found."""

    date: str
    errors: dict

    def describe(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in self.errors.items()) or "none"
        return f"the night {self.date} has no results: no input was evaluated (errors: {errors})"


@dataclass(frozen=True)
class ModelChange:
    """Not an alarm of its own: said before a night's regressions when the night compared with
    was evaluated by another model, which may explain them."""

    previous_date: str
    previous: str
    current: str

    def describe(self) -> str:
        return (f"the model changed from {self.previous} ({self.previous_date}) to {self.current}: "
                "the regressions compare two models")


def _models(rows: list[dict]) -> str:
    return ", ".join(sorted({str(r.get("model")) for r in rows if r.get("model") is not None}))


def previous_night(history: dict[str, list[dict]], date: str) -> str | None:
    """The latest night before ``date`` with results; nights without any (every input failed)
    are never the baseline, so the night after one is compared with the last good night."""
    earlier = [d for d in history if d < date and has_results(history[d])]
    return max(earlier) if earlier else None


def configured_pairs(summary: dict) -> set[tuple[str, str]] | None:
    """The (attack, defense) specs a run was configured with (its summary's ``config``), or None
    when the summary does not say."""
    config = summary.get("config") or {}
    attacks, defenses = config.get("attacks"), config.get("defenses")
    if not attacks or not defenses:
        return None
    return {(a, d) for a in attacks for d in defenses}


def compare(history: dict[str, list[dict]], date: str, rows: list[dict], tolerance: dict[str, float],
            errors: dict | None = None, configured: set[tuple[str, str]] | None = None) -> tuple[str | None, list]:
    """(the night compared with, the alarms) for the night ``date`` whose history rows are ``rows``:
    an EmptyNight when it has no results, else the regressions against previous_night()
    (``configured``: see find_regressions), led by a ModelChange when that night's model was
    another."""
    prev = previous_night(history, date)
    if not has_results(rows):
        return prev, [EmptyNight(date, dict(errors or {}))]
    if not prev:
        return prev, []
    regressions = find_regressions(history[prev], rows, tolerance, prev, configured)
    before, now = _models(history[prev]), _models(rows)
    if regressions and before and now and before != now:
        regressions = [ModelChange(prev, before, now), *regressions]
    return prev, regressions


def pair_key(attack_spec: str, defense_spec: str) -> tuple:
    """An (attack, defense) pair's identity, however its specs are spelled (config.spec_key)."""
    from .config import spec_key

    return spec_key(attack_spec, "attack"), spec_key(defense_spec, "defense")


def _value(row: dict, metric: str) -> float | None:
    """A row's ``metric``; a PSNR of +inf where every image was identical to its reference (the
    summary's mean is over finite values, none then; nights written before ``identical`` was kept
    leave it unknown)."""
    v = row.get(metric)
    if v is None and metric == "psnr" and row.get("n") and row.get("identical") == row["n"]:
        return math.inf
    return v


def find_regressions(previous: list[dict], current: list[dict], tolerance: dict[str, float],
                     previous_date: str, configured: set[tuple[str, str]] | None = None) -> list[Regression]:
    """Pairs with results the previous night and none now (MISSING), and metrics of pairs present
    both nights that got worse beyond tolerance (``n``: beyond that fraction of its previous value)
    or that had a value the previous night and have none now.

    ``configured``: the pairs tonight's run was asked for; a pair the configuration dropped is not
    missing (None: every pair of the previous night is expected).

    Pairs are matched by their specs' identity (pair_key), not their text: a spec spelled
    differently from one night to the next is the same pair. An alarm names tonight's text, or
    the previous night's for a missing pair."""
    now = {pair_key(r["attack_spec"], r["defense_spec"]): r for r in current if _evaluated(r)}
    asked = None if configured is None else {pair_key(*pair) for pair in configured}
    out = []
    for p in previous:
        key = pair_key(p["attack_spec"], p["defense_spec"])
        if asked is not None and key not in asked:
            continue
        if _evaluated(p) and key not in now:
            out.append(Regression(p["attack_spec"], p["defense_spec"], MISSING, p["n"], None, 0.0, previous_date))
    before = {pair_key(r["attack_spec"], r["defense_spec"]): r for r in previous}
    for key, r in now.items():
        p = before.get(key)
        if p is None:
            continue
        pair = (r["attack_spec"], r["defense_spec"])
        for metric, tol in tolerance.items():
            a, b = _value(p, metric), _value(r, metric)
            if a is None or a == b == math.inf:
                continue
            if b is None:  # a metric that had a value and has none: a lost measurement is no pass
                out.append(Regression(*pair, metric, a, None, tol, previous_date))
                continue
            worse = (a - b) if METRICS[metric] else (b - a)
            if metric == "n":
                worse = worse / a if a else 0.0
            if worse > tol:
                out.append(Regression(*pair, metric, a, b, tol, previous_date))
    return out
