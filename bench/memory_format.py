"""The models' memory layout on the CPU: contiguous (NCHW) against channels_last (NHWC).

EfficientNet-Lite0 at 224x224, random images, images per second of the work each stage does:
a forward pass (classify), a forward and backward pass to the input (one attack step), MSROI
(one pass) and Aug-MSROI (S = 5, hooks and noise) at their defaults. The layouts run in turn,
``--repeat`` times, and the fastest of each is reported with their ratio; the largest difference
between the two layouts' logits comes with it (float rounding: the same model).

    python bench/memory_format.py [--quick] [--threads 1 2] [--batch 16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench._common import best_stage_rates, emit, positive_int  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 4, one repeat, one thread count")
    ap.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=positive_int, default=16)
    ap.add_argument("--repeat", type=positive_int, default=3)
    args = ap.parse_args()
    import torch

    from transforms.models import build_model

    batch, repeat, threads = (4, 1, args.threads[:1]) if args.quick else (args.batch, args.repeat, args.threads)
    models = {name: build_model("efficientnet_lite0", layout=name) for name in ("contiguous", "channels_last")}
    x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    seeds = torch.arange(batch)

    doc = {"bench": "memory_format", "model": "efficientnet_lite0", "size": 224, "batch": batch, "results": {}}
    for t in threads:
        torch.set_num_threads(t)
        best = best_stage_rates(models, x, seeds, repeat)
        doc["results"][f"{t}_threads"] = {
            stage: {"contiguous_img_s": round(v["contiguous"], 2), "channels_last_img_s": round(v["channels_last"], 2),
                    "speedup": round(v["channels_last"] / v["contiguous"], 3)}
            for stage, v in best.items()
        }
    with torch.no_grad():
        a, b = (models[k](x) for k in ("contiguous", "channels_last"))
    doc["max_logit_difference"] = float((a - b).abs().max())
    doc["logit_scale"] = float(a.abs().max())
    emit(doc)


if __name__ == "__main__":
    main()
