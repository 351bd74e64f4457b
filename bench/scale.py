"""Scaling of `semjpeg evaluate` on Beam's DaskRunner: 1 against 2 local Dask workers.

Same dev images, same job (clean + FGSM eps 4/255 x none + jpeg:quality=50, EfficientNet-Lite0),
one torch thread per worker, each run in a fresh process (cluster start and model loads
included). Prints one JSON line: images/s on 1 and 2 workers and their ratio (target >= 1.7 on a
2-core machine).

    python bench/scale.py [--quick] [--n 256] [--shards 4] [--repeat 2]

256 images by default: the fixed cost of a run (imports, cluster start, model loads, commit,
shutdown; about 8 s) would otherwise hide the scaling of the work itself. Single runs on this
shared 2-core machine vary by up to 25% (1-worker runs of the same code took 75 to 92 s), so the
runs alternate (1, 2, 1, 2, ...) and the fastest of each count is compared, as bench/pipeline.py
does; every time is printed too.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench._common import ROOT, emit  # noqa: E402
from bench.pipeline import make_shards  # noqa: E402


def run(shards: list[Path], out: Path, workers: int) -> float:
    cmd = [sys.executable, "-m", "jobs", "evaluate", *sum((["--input", str(s)] for s in shards), []),
           "--output", str(out), "--attack", "fgsm:eps=4/255", "--defense", "jpeg:quality=50",
           "--batch-size", "8", "--torch-threads", "1", "--runner", "DaskRunner", "--dask_workers", str(workers)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 images")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs per worker count, alternating; the fastest counts")
    args = ap.parse_args()
    n = 32 if args.quick else args.n
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        shards = make_shards(tmp / "in", n, per_shard=max(1, n // args.shards))
        times = {1: [], 2: []}
        for r in range(max(1, args.repeat)):
            for w in (1, 2):
                times[w].append(run(shards, tmp / f"out{w}-{r}", w))
    seconds = {w: min(t) for w, t in times.items()}
    emit({
        "bench": "scale", "runner": "DaskRunner", "images": n, "shards": len(shards), "torch_threads_per_worker": 1,
        "images_per_s_1_worker": round(n / seconds[1], 3), "images_per_s_2_workers": round(n / seconds[2], 3),
        "ratio": round(seconds[1] / seconds[2], 3), "seconds": {str(k): round(v, 1) for k, v in seconds.items()},
        "all_seconds": {str(k): [round(x, 1) for x in v] for k, v in times.items()},
        "target_ratio": 1.7,
    })


if __name__ == "__main__":
    main()
