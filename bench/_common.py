"""Shared helpers for the benchmarks: dev images, shards, timing, JSON output."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHARED = Path(os.environ.get("SEMJPEG_SHARED", ROOT.parent / "shared"))
DEV = SHARED / "data" / "imagenet-dev"


def dev_files(n: int) -> list[tuple[Path, int]]:
    """The first ``n`` dev images (sorted by file name) and their labels."""
    if not (DEV / "labels.csv").exists():
        sys.exit(f"dev images not found at {DEV} (set SEMJPEG_SHARED)")
    with open(DEV / "labels.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    return [(DEV / r["file"], int(r["label"])) for r in rows[:n]]


def emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)
