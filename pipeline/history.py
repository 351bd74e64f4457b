"""Nightly history: a Parquet dataset partitioned by date, and regression checks against it.

``HIST/date=YYYY-MM-DD/summary.parquet`` holds one row per (attack, defense) of that night's run.
A partition is written to a hidden temporary name and renamed into place, so a failure never
leaves a half-written file, and writing one date never touches another. A partition folder
without its file, or a file that is not readable Parquet, is an error that names it.
"""
from __future__ import annotations

import io
import logging
import posixpath
import re
import secrets
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .io import join

log = logging.getLogger(__name__)

FILE = "summary.parquet"
_DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")

HISTORY_SCHEMA = pa.schema([
    ("date", pa.string()), ("run_id", pa.string()), ("model", pa.string()),
    ("attack", pa.string()), ("attack_spec", pa.string()),
    ("defense", pa.string()), ("defense_spec", pa.string()),
    ("n", pa.int64()), ("top1", pa.float64()), ("agree_clean", pa.float64()), ("success", pa.float64()),
    ("bytes", pa.float64()), ("bpp", pa.float64()), ("psnr", pa.float64()), ("ssim", pa.float64()),
    ("linf", pa.float64()), ("rmse", pa.float64()),
])

#: Metrics a regression can be found in, and whether higher is better.
METRICS = {"top1": True, "agree_clean": True, "psnr": True, "ssim": True, "bytes": False, "bpp": False,
           "success": False}


def history_rows(summary: dict, date: str) -> list[dict]:
    """summary.json of a run -> history rows for ``date``."""
    model = summary.get("config", {}).get("model")
    return [{**{k: r.get(k) for k in HISTORY_SCHEMA.names}, "date": date, "run_id": summary["run_id"], "model": model}
            for r in summary["table"]]


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
        path = join(entry, FILE)
        if not fs.exists(path):
            raise ValueError(f"history partition {name} in {history} has no {FILE} "
                             "(restore it, or remove the folder to forget that night)")
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(io.BytesIO(f.read()))
        except Exception as e:
            raise ValueError(f"history partition {name} in {history} is corrupt: {e}") from None
        out[m.group(1)] = table.to_pylist()
    return out


def write_partition(history: str, date: str, rows: list[dict]) -> str:
    """Write (or replace) one date's partition atomically; returns its path."""
    fs, root = url_to_fs(history)
    part = join(root, f"date={date}")
    fs.makedirs(part, exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA), buf, compression="zstd")
    tmp = join(part, f".{FILE}.tmp-{secrets.token_hex(4)}")
    with fs.open(tmp, "wb") as f:
        f.write(buf.getvalue())
    fs.mv(tmp, join(part, FILE))
    return join(part, FILE)


@dataclass(frozen=True)
class Regression:
    attack_spec: str
    defense_spec: str
    metric: str
    previous: float
    current: float
    tolerance: float
    previous_date: str

    def describe(self) -> str:
        worse = "dropped" if METRICS[self.metric] else "rose"
        return (f"{self.metric} of {self.attack_spec} x {self.defense_spec} {worse} from {self.previous:.4g} "
                f"({self.previous_date}) to {self.current:.4g} (tolerance {self.tolerance:g})")


def previous_night(history: dict[str, list[dict]], date: str) -> str | None:
    earlier = [d for d in history if d < date]
    return max(earlier) if earlier else None


def find_regressions(previous: list[dict], current: list[dict], tolerance: dict[str, float],
                     previous_date: str) -> list[Regression]:
    """Metrics of (attack, defense) pairs present both nights that got worse beyond tolerance."""
    before = {(r["attack_spec"], r["defense_spec"]): r for r in previous}
    out = []
    for r in current:
        p = before.get((r["attack_spec"], r["defense_spec"]))
        if p is None:
            continue
        for metric, tol in tolerance.items():
            a, b = p.get(metric), r.get(metric)
            if a is None or b is None:
                continue
            worse = (a - b) if METRICS[metric] else (b - a)
            if worse > tol:
                out.append(Regression(r["attack_spec"], r["defense_spec"], metric, a, b, tol, previous_date))
    return out
