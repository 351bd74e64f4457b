"""Encoder settings of Aug-MSROI semantic JPEG against uniform JPEG at matched bytes.

On the first N dev images (EfficientNet-Lite0): the clean images, FGSM (eps 4/255) and IGSM
(eps 4/255, 10 steps) against the clean prediction; Aug-MSROI maps with the default noise; for each
(levels, q_low, q_high, binning) the semantic JPEG and, per image, the highest-quality uniform JPEG
no larger than it. Prints one JSON line per (set, setting): agreement with the clean prediction
and top-1 for both, and mean bytes.

    python bench/semantic_grid.py [--n 100] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import attacked_dev_sets, emit, positive_int  # noqa: E402
from transforms.images import to_tensor  # noqa: E402
from transforms.jpeg import decode_rgb  # noqa: E402
from transforms.models import build_model  # noqa: E402
from transforms.saliency import aug_msroi  # noqa: E402
from transforms.seeds import sample_seed, seed_tensor  # noqa: E402
from transforms.semantic_jpeg import block_qualities, encode_jpeg_max_bytes, encode_semantic_jpeg  # noqa: E402

GRID = [(5, 30, 70, "value"), (5, 30, 70, "percentile"), (5, 20, 80, "value"), (5, 20, 80, "percentile"),
        (5, 10, 90, "value"), (5, 20, 70, "percentile")]
ATTACKS = {"fgsm": "fgsm:eps=4/255", "igsm": "igsm:eps=4/255,steps=10"}
BATCH = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=positive_int, default=100)
    ap.add_argument("--quick", action="store_true", help="16 images, two settings")
    args = ap.parse_args()
    n, grid = (16, GRID[:2]) if args.quick else (args.n, GRID)
    torch.set_num_threads(2)
    model = build_model("efficientnet_lite0")
    names, labels, _, preds, sets = attacked_dev_sets(model, n, ATTACKS, BATCH)
    labels = torch.as_tensor(labels)

    def classify(imgs):
        with torch.no_grad():
            out = torch.cat([model(to_tensor(imgs[i : i + BATCH])).argmax(1) for i in range(0, len(imgs), BATCH)])
        return round((out == preds).float().mean().item(), 4), round((out == labels).float().mean().item(), 4)

    for set_name, imgs in sets.items():
        t = to_tensor(imgs)
        maps = torch.cat([aug_msroi(model, t[i : i + BATCH], seeds=seed_tensor([sample_seed(0, k) for k in names[i : i + BATCH]]))
                          for i in range(0, n, BATCH)]).numpy()
        for levels, lo, hi, binning in grid:
            sem, uni, size = [], [], []
            for i in range(n):
                data = encode_semantic_jpeg(imgs[i], block_qualities(maps[i], levels=levels, q_low=lo, q_high=hi, binning=binning))
                matched, _ = encode_jpeg_max_bytes(imgs[i], len(data))
                sem.append(decode_rgb(data))
                uni.append(decode_rgb(matched))
                size.append(len(data))
            (a_s, t_s), (a_u, t_u) = classify(sem), classify(uni)
            emit({"bench": "semantic_grid", "n": n, "set": set_name, "levels": levels, "q_low": lo, "q_high": hi,
                  "binning": binning, "agree_sem": a_s, "agree_uniform": a_u, "top1_sem": t_s, "top1_uniform": t_u,
                  "mean_bytes": round(float(np.mean(size)), 1)})


if __name__ == "__main__":
    main()
