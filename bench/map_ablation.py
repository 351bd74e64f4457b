"""Does the saliency map matter? Semantic JPEG driven by Aug-MSROI against other maps, all at the same bytes.

On the first N dev images (EfficientNet-Lite0): the clean images, FGSM (eps 4/255) and IGSM (eps
4/255, 10 steps) against the clean prediction. Per image, the default Aug-MSROI semantic JPEG
(requantize, K = 5, qualities 30..70 by value) sets a byte budget; every other map then drives the
same encoder under rate control to that budget (``encode_semantic_jpeg_bytes``, the quality
window 40 wide), and the uniform JPEG gets the highest quality that fits it
(``encode_jpeg_max_bytes``). The maps:

* ``aug_msroi``: the default (5 perturbations of the image being encoded);
* ``msroi``: one unperturbed MSROI map;
* ``clean_map``: Aug-MSROI of the *clean* image applied to the adversarial one (an oracle no
  defense has; on the clean set it is ``aug_msroi`` itself);
* ``inverse``: 1 - Aug-MSROI (the salient regions coarsest);
* ``random``: uniform noise, one value per 16x16 block (one generator seeded 0 for the run).

Prints one JSON line per (set, map): top-1, agreement with the clean prediction and mean bytes of
the semantic files, and the same for the rate-matched uniform JPEG.

    python bench/map_ablation.py [--n 500] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import attacked_dev_sets, emit, positive_int  # noqa: E402
from transforms.images import to_tensor  # noqa: E402
from transforms.jpeg import decode_rgb  # noqa: E402
from transforms.models import build_model  # noqa: E402
from transforms.saliency import aug_msroi, msroi  # noqa: E402
from transforms.seeds import sample_seed, seed_tensor  # noqa: E402
from transforms.semantic_jpeg import (  # noqa: E402
    block_qualities,
    encode_jpeg_max_bytes,
    encode_semantic_jpeg,
    encode_semantic_jpeg_bytes,
)

ATTACKS = {"fgsm": "fgsm:eps=4/255", "igsm": "igsm:eps=4/255,steps=10"}
MAPS = ("aug_msroi", "msroi", "clean_map", "inverse", "random")
BATCH = 20


def _batched(fn, x: torch.Tensor, *extra) -> torch.Tensor:
    return torch.cat([fn(x[i : i + BATCH], *(e[i : i + BATCH] for e in extra)) for i in range(0, len(x), BATCH)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=positive_int, default=500)
    ap.add_argument("--quick", action="store_true", help="16 images")
    args = ap.parse_args()
    n = 16 if args.quick else args.n
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = build_model("efficientnet_lite0")
    names, labels, _, preds, sets = attacked_dev_sets(model, n, ATTACKS, BATCH)
    clean = sets["clean"]
    seeds = seed_tensor([sample_seed(0, k) for k in names])

    def aug(imgs: np.ndarray) -> np.ndarray:
        return _batched(lambda xb, sb: aug_msroi(model, xb, seeds=sb), to_tensor(imgs), seeds).numpy()

    clean_aug = aug(clean)
    rng = np.random.default_rng(0)

    def classify(imgs: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return _batched(lambda xb: model(xb).argmax(1), to_tensor(np.stack(imgs))).numpy()

    def scores(pred: np.ndarray) -> tuple[float, float]:
        return round(float((pred == labels).mean()), 4), round(float((pred == preds.numpy()).mean()), 4)

    for set_name, imgs in sets.items():
        h, w = imgs.shape[1:3]
        a = clean_aug if set_name == "clean" else aug(imgs)
        with torch.no_grad():
            ms = _batched(lambda xb: msroi(model, xb), to_tensor(imgs)).numpy()
        cells = rng.random((n, -(-h // 16), -(-w // 16)))
        maps = {"aug_msroi": a, "msroi": ms, "clean_map": clean_aug, "inverse": 1.0 - a,
                "random": np.kron(cells, np.ones((16, 16)))[:, :h, :w]}
        budget = [len(encode_semantic_jpeg(imgs[i], block_qualities(a[i]))) for i in range(n)]
        uniform = [encode_jpeg_max_bytes(imgs[i], budget[i])[0] for i in range(n)]
        u_top1, u_agree = scores(classify([decode_rgb(d) for d in uniform]))
        for map_name in MAPS:
            if set_name == "clean" and map_name == "clean_map":
                continue
            files_ = [encode_semantic_jpeg_bytes(imgs[i], maps[map_name][i], max_bytes=budget[i]).data for i in range(n)]
            top1, agree = scores(classify([decode_rgb(d) for d in files_]))
            emit({"bench": "map_ablation", "n": n, "set": set_name, "map": map_name, "top1": top1, "agree": agree,
                  "mean_bytes": round(float(np.mean([len(d) for d in files_])), 1), "uniform_top1": u_top1,
                  "uniform_agree": u_agree, "uniform_mean_bytes": round(float(np.mean([len(d) for d in uniform])), 1),
                  "gain_top1": round(top1 - u_top1, 4), "elapsed_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
