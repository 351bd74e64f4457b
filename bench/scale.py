"""Scaling of `semjpeg evaluate` on Beam's DaskRunner: 1 against 2 local Dask workers.

Same dev images, same job (clean + FGSM eps 4/255 x none + jpeg:quality=50, EfficientNet-Lite0,
batches of 8 unless ``--batch-size``: on this machine 8 ran fastest on one worker and on two, 16
and 32 slower, with no better ratio), one torch thread per worker, each run in a fresh process
(cluster start and model loads included). Prints one JSON line: images/s on 1 and 2 workers and
their ratio (target >= 1.7 on a 2-core machine).

    python bench/scale.py [--quick] [--n 256] [--shards 4] [--repeat 2] [--base 32] [--batch-size 8]

256 images by default: the fixed cost of a run (imports, cluster start, model loads, commit,
shutdown; 8 to 10 s) would otherwise hide the scaling of the work itself. Single runs on this
shared 2-core machine vary by up to 25% (1-worker runs of the same code took 73 to 100 s), so the
runs alternate (1, 2, 1, 2, ...) and the fastest of each count is compared, as bench/pipeline.py
does; every time is printed too.

Each repeat also runs `--base` images (32, or none when `--n` is 32 or less; 0 skips it) on each count, which separates the fixed
cost from the work: `marginal_ratio` is the ratio of the extra seconds the extra n - base images
take (fastest runs), `fixed_seconds` what a run costs beyond that work, extrapolated to no images.

A speed probe (on unless `--no-probe`) times three forward and backward passes of the model (one
thread, in this process) just before and just after every run, and the ratio of the fastest run
times scaled to the median speed is reported too (`ratio_speed_adjusted`): a diagnostic of how
much of a ratio is drift, not a replacement for `ratio`.

Every run prints the same fields; those it does not measure are null: ``--quick`` (32 images, a
smoke run) has no base runs and no probes, ``--base 0`` no base runs, ``--no-probe`` no probes.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench._common import ROOT, emit, non_negative_int, positive_int  # noqa: E402
from bench.pipeline import make_shards  # noqa: E402


def run(shards: list[Path], out: Path, workers: int, batch: int = 8) -> float:
    cmd = [sys.executable, "-m", "jobs", "evaluate", *sum((["--input", str(s)] for s in shards), []),
           "--output", str(out), "--attack", "fgsm:eps=4/255", "--defense", "jpeg:quality=50",
           "--batch-size", str(batch), "--torch-threads", "1", "--runner", "DaskRunner", "--dask_workers", str(workers)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return time.perf_counter() - t


class SpeedProbe:
    """Seconds for three forward+backward passes of the default model (batch 8, one thread)."""

    def __init__(self):
        import torch

        from transforms.models import build_model

        torch.set_num_threads(1)
        self.model = build_model("efficientnet_lite0").eval()
        self.x = torch.rand(8, 3, 224, 224, requires_grad=True)
        self()  # warm-up

    def __call__(self) -> float:
        t = time.perf_counter()
        for _ in range(3):
            self.model(self.x).sum().backward()
        return time.perf_counter() - t


def _per_count(values: dict[int, list[float]], digits: int) -> dict[str, list[float]]:
    return {str(k): [round(x, digits) for x in v] for k, v in values.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 images")
    ap.add_argument("--n", type=positive_int, default=256)
    ap.add_argument("--shards", type=positive_int, default=4)
    ap.add_argument("--repeat", type=positive_int, default=2, help="runs per worker count, alternating; the fastest counts")
    ap.add_argument("--base", type=non_negative_int, default=None,
                    help="images of the small runs that measure the fixed cost (default 32, none when --n is 32 or less); 0: none")
    ap.add_argument("--no-probe", dest="probe", action="store_false", help="skip the speed probes around each run")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="the job's --batch-size")
    args = ap.parse_args()
    n = 32 if args.quick else args.n
    base = 0 if args.quick else (args.base if args.base is not None else (32 if n > 32 else 0))
    if base and not 0 < base < n:
        ap.error(f"--base must be between 0 and --n ({n}), got {base}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        shards = make_shards(tmp / "in", n, per_shard=max(1, n // args.shards))
        small = []
        if base:
            (tmp / "base").mkdir()
            small = make_shards(tmp / "base", base, per_shard=max(1, base // args.shards))
        times = {1: [], 2: []}
        base_times = {1: [], 2: []}
        probe = SpeedProbe() if args.probe and not args.quick else None
        probes = {1: [], 2: []}  # mean of the probes just before and just after each big run
        for r in range(args.repeat):
            for w in (1, 2):
                before = probe() if probe else None
                times[w].append(run(shards, tmp / f"out{w}-{r}", w, args.batch_size))
                if probe:
                    probes[w].append((before + probe()) / 2)
                if small:
                    base_times[w].append(run(small, tmp / f"base{w}-{r}", w, args.batch_size))
    seconds = {w: min(t) for w, t in times.items()}
    doc = {
        "bench": "scale", "runner": "DaskRunner", "images": n, "shards": len(shards), "torch_threads_per_worker": 1,
        "batch_size": args.batch_size,
        "images_per_s_1_worker": round(n / seconds[1], 3), "images_per_s_2_workers": round(n / seconds[2], 3),
        "ratio": round(seconds[1] / seconds[2], 3), "seconds": {str(k): round(v, 1) for k, v in seconds.items()},
        "all_seconds": _per_count(times, 1),
        "target_ratio": 1.7,
        # measured only with --base (not with --quick) and with the probes (not with --quick or
        # --no-probe): null otherwise, so every run has the same fields
        "base_images": None, "base_seconds": None, "marginal_ratio": None, "fixed_seconds": None,
        "probe_seconds": None, "ratio_speed_adjusted": None,
    }
    if small:
        base_s = {w: min(t) for w, t in base_times.items()}
        extra = {w: seconds[w] - base_s[w] for w in (1, 2)}
        doc.update({
            "base_images": base, "base_seconds": _per_count(base_times, 1),
            "marginal_ratio": round(extra[1] / extra[2], 3) if extra[2] > 0 else None,
            "fixed_seconds": {str(w): round(base_s[w] - extra[w] * base / (n - base), 1) for w in (1, 2)},
        })
    if probes[1]:
        ref = statistics.median(probes[1] + probes[2])
        adjusted = {w: min(t * ref / p for t, p in zip(times[w], probes[w])) for w in (1, 2)}
        doc.update({
            "probe_seconds": _per_count(probes, 2),
            "ratio_speed_adjusted": round(adjusted[1] / adjusted[2], 3),
        })
    emit(doc)


if __name__ == "__main__":
    main()
