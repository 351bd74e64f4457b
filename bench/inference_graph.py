"""The model's inference graph on the CPU: EfficientNet-Lite0 as its weights load, against the one
``build_model`` returns (batch normalizations folded into the convolutions, pointwise convolutions
on oneDNN at any batch size), and each change alone.

Channels_last (the default layout on the CPU), 224x224 random images, images per second of each
stage's model work (``bench/_common.model_stages``: a forward pass, a forward and backward pass to
the input, MSROI, Aug-MSROI at its defaults). The variants run in turn, ``--repeat`` times, and
the fastest of each is reported with its speed-up over the graph as loaded; the largest logit
difference from that graph comes with each (float rounding: the same function).

    python bench/inference_graph.py [--quick] [--threads 1 2] [--batch 8]

One thread at a batch below 16 is where PyTorch runs 1x1 convolutions on its own slow path (a
single-threaded Dask worker; ``--torch-threads 1``); with two threads, or from batch 16, it already
uses oneDNN and only the folding changes anything.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench._common import best_stage_rates, emit, positive_int  # noqa: E402

VARIANTS = ("as_loaded", "folded", "pointwise", "built")


def _variant(name: str):
    import torch

    from transforms.models import MODELS, fold_batch_norm, pointwise_on_onednn

    model = MODELS["efficientnet_lite0"][0](None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if name in ("folded", "built"):
        fold_batch_norm(model)
    if name in ("pointwise", "built"):
        pointwise_on_onednn(model)
    return model.to(memory_format=torch.channels_last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 2, one repeat, one thread")
    ap.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--repeat", type=positive_int, default=3)
    args = ap.parse_args()
    import torch

    from pipeline.allocator import keep_freed_memory
    from transforms.models import build_model

    keep_freed_memory()  # as the pipeline's stages do
    batch, repeat, threads = (2, 1, args.threads[:1]) if args.quick else (args.batch, args.repeat, args.threads)
    models = {name: _variant(name) for name in VARIANTS}
    built = build_model("efficientnet_lite0")
    x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    seeds = torch.arange(batch)

    doc = {"bench": "inference_graph", "model": "efficientnet_lite0", "size": 224, "layout": "channels_last",
           "batch": batch, "results": {}}
    for t in threads:
        torch.set_num_threads(t)
        best = best_stage_rates(models, x, seeds, repeat)
        doc["results"][f"{t}_threads"] = {
            stage: {**{f"{k}_img_s": round(v[k], 2) for k in VARIANTS},
                    **{f"{k}_speedup": round(v[k] / v["as_loaded"], 3) for k in VARIANTS[1:]}}
            for stage, v in best.items()
        }
    with torch.no_grad():
        ref = models["as_loaded"](x)
        doc["max_logit_difference"] = {k: float((m(x) - ref).abs().max()) for k, m in models.items() if k != "as_loaded"}
        doc["built_is_build_model"] = bool(torch.equal(built(x), models["built"](x)))
    doc["logit_scale"] = float(ref.abs().max())
    emit(doc)


if __name__ == "__main__":
    main()
