"""Adaptive attacks: how much of JPEG's and Aug-MSROI's protection survives an attacker who knows the
defense and differentiates through it (BPDA, ``bpda=`` in an attack spec).

Runs ``semjpeg evaluate`` (FnApiRunner, EfficientNet-Lite0) on every (500 / N)-th dev image with:

* ``igsm:eps=4/255,steps=10``: the non-adaptive attack of the paper's comparison;
* ``igsm:eps=4/255,steps=S``: the same with the adaptive attacks' step count (a control: more
  steps alone also change what survives the codec; with S = 10 it is the attack above);
* ``igsm:eps=4/255,steps=S,bpda=D`` for each defense D below: the attack through D;

and the defenses ``jpeg:quality=50``, ``aug_msroi`` and ``jpeg:match=aug_msroi``, so every attack
is judged under every defense (an attack through one defense, judged under another, is a transfer).
Prints one JSON line per (attack, defense) of the run's summary (top-1, agreement with the clean
prediction, mean bytes, PSNR), then one line with the agreement matrix.

    python bench/adaptive.py [--n 100] [--steps 30] [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench._common import dev_files, emit, positive_int  # noqa: E402

DEFENSES = ("jpeg:quality=50", "aug_msroi", "jpeg:match=aug_msroi")


def attacks(steps: int) -> list[str]:
    """The attacks of a run whose adaptive attacks take ``steps`` (the control is the paper's
    attack itself when ``steps`` is 10: run once, a run refuses a spec given twice)."""
    paper, base = "igsm:eps=4/255,steps=10", f"igsm:eps=4/255,steps={steps}"
    return [paper, *([base] if base != paper else []), *(f"{base},bpda={d}" for d in DEFENSES)]


def subset(n: int, folder: Path) -> Path:
    """Links to every (500 / n)-th dev image (sorted by file) in ``folder``; returns a labels CSV."""
    files = dev_files()
    if n > len(files):
        sys.exit(f"asked for {n} dev images, there are {len(files)}")
    picked = files[:: max(1, len(files) // n)][:n]
    for path, _ in picked:
        (folder / path.name).symlink_to(path)
    labels = folder.parent / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows([path.name, label] for path, label in picked)
    return labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=positive_int, default=100)
    ap.add_argument("--steps", type=positive_int, default=30, help="IGSM steps of the adaptive attacks")
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--out", help="keep the evaluate run here (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="8 images, 5 steps")
    args = ap.parse_args()
    n, steps = (8, 5) if args.quick else (args.n, args.steps)

    from jobs.__main__ import main as semjpeg

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        labels = subset(n, images)
        out = args.out or str(Path(tmp) / "run")
        argv = ["evaluate", "--input", str(images), "--labels", str(labels), "--output", out,
                "--batch-size", str(args.batch_size), "--runner", "FnApiRunner"]
        for a in attacks(steps):
            argv += ["--attack", a]
        for d in DEFENSES:
            argv += ["--defense", d]
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout is this bench's JSON lines only
            status = semjpeg(argv)
        if status != 0:
            sys.exit("semjpeg evaluate failed")
        seconds = time.perf_counter() - t0
        summary = json.loads((Path(out) / "summary.json").read_text())
    matrix: dict[str, dict[str, float]] = {}
    for r in summary["table"]:
        emit({"attack": r["attack_spec"], "defense": r["defense_spec"], "n": r["n"], "top1": r["top1"],
              "agree_clean": r["agree_clean"], "bytes": r["bytes"], "psnr": r["psnr"]})
        matrix.setdefault(r["attack_spec"], {})[r["defense_spec"]] = r["agree_clean"]
    emit({"bench": "adaptive", "images": n, "steps": steps, "seconds": round(seconds, 1),
          "agree_clean": matrix, "errors": summary.get("errors", {})})


if __name__ == "__main__":
    main()
