"""glibc's malloc defaults against ``pipeline.allocator.keep_freed_memory`` (what every stage sets).

Each setting runs in a fresh process (glibc reads its settings once; they cannot be restored):
EfficientNet-Lite0 at 224x224 in the layout the pipeline uses on the CPU (channels_last), random
images, and for each stage the images per second, the CPU seconds spent in user and in system
(kernel) mode, and the minor page faults, after one warm-up call:

* ``forward``: a classification pass (batch ``--batch``);
* ``forward_backward``: one attack step, the gradient to the input (batch ``--batch``);
* ``aug_msroi``: the Aug-MSROI map at its defaults (S = 5, so 5 x ``--batch`` images per pass).

    python bench/allocator.py [--quick] [--batch 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench._common import emit, model_stages, positive_int  # noqa: E402


def child(batch: int, threads: int, rounds: int) -> dict:
    import resource
    import time

    import torch

    from pipeline.allocator import keep_freed_memory
    from transforms.models import build_model

    applied = keep_freed_memory()
    torch.set_num_threads(threads)
    model = build_model("efficientnet_lite0")
    x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    stages = model_stages(model, x, torch.arange(batch))
    out = {"kept_freed_memory": applied}
    for name in ("forward", "forward_backward", "aug_msroi"):
        fn = stages[name]
        fn()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(rounds):
            fn()
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        out[name] = {"img_s": round(rounds * batch / dt, 2), "user_s": round(r1.ru_utime - r0.ru_utime, 2),
                     "system_s": round(r1.ru_stime - r0.ru_stime, 2), "minor_faults": r1.ru_minflt - r0.ru_minflt}
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 4, one round")
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--rounds", type=positive_int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batch, rounds = (4, 1) if args.quick else (args.batch, args.rounds)
    if args.child:
        print(json.dumps(child(batch, args.threads, rounds)))
        return
    doc = {"bench": "allocator", "model": "efficientnet_lite0", "layout": "channels_last", "batch": batch,
           "threads": args.threads, "rounds": rounds}
    for name, system in (("glibc_defaults", "1"), ("keep_freed_memory", "0")):
        env = dict(os.environ, SEMJPEG_SYSTEM_MALLOC=system)
        cmd = [sys.executable, __file__, "--child", "--batch", str(batch), "--threads", str(args.threads),
               "--rounds", str(rounds)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        doc[name] = json.loads(r.stdout.strip().splitlines()[-1])
    doc["speedup"] = {stage: round(doc["keep_freed_memory"][stage]["img_s"] / doc["glibc_defaults"][stage]["img_s"], 3)
                      for stage in ("forward", "forward_backward", "aug_msroi")}
    emit(doc)


if __name__ == "__main__":
    main()
