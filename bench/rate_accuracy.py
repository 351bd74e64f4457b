"""Accuracy against bytes of a finished evaluate run: a Markdown table and a plot (PNG).

    python bench/rate_accuracy.py --run OUT [--plot rate_accuracy.png] [--metric top1]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from pipeline.io import join, read_bytes, write_bytes  # noqa: E402
from pipeline.report import plot_rate_accuracy  # noqa: E402


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--plot", help="write the plot here (PNG)")
    ap.add_argument("--metric", default="top1", choices=["top1", "agree_clean"])
    args = ap.parse_args()
    try:
        summary = json.loads(read_bytes(join(args.run, "summary.json")))
    except (FileNotFoundError, NotADirectoryError):
        ap.error(f"--run {args.run} is not a semjpeg run (no summary.json)")
    print("| attack | defense | n | top-1 | agree_clean | mean bytes | bpp | PSNR | SSIM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in summary["table"]:
        print(f"| {r['attack_spec']} | {r['defense_spec']} | {r['n']} | {fmt(r['top1'], '.3f')} | "
              f"{fmt(r['agree_clean'], '.3f')} | {fmt(r['bytes'], '.0f')} | {fmt(r['bpp'], '.2f')} | "
              f"{fmt(r['psnr'], '.2f') if r['psnr'] is not None else 'inf'} | {fmt(r['ssim'], '.4f')} |")
    if args.plot:
        png = plot_rate_accuracy(summary["table"], metric=args.metric)
        if png is None:  # e.g. top1 of a run without labels
            sys.exit(f"no plot: no defended row of {args.run} has a {args.metric} value (--metric)")
        write_bytes(args.plot, png)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
