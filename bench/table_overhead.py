"""What one quantization table per file costs semantic JPEG: the bytes of a coarse block written in
the fine table.

A baseline JPEG has one quantization table per component, so the requantize encoder writes the
file in the table of its finest quality, and a block meant for a coarser quality q is written as
multiples of the fine steps: it decodes as the coarse block would, but each nonzero coefficient
carries about log2(step_q / step_fine) more magnitude bits than in a native quality-q file.

On the first N dev images (decoded and cropped as the pipeline does, 224x224):

* ``level_overhead``: per quality q of the default ladder (30, 40, 50, 60 under a 70 table), the
  mean ratio of the bytes of the image with every block at q but the file in the quality-70 table
  (one block at 70 forces it) to the bytes of a native quality-q JPEG (optimized Huffman tables,
  as both encoders write).
* ``blocks``: the share of 16x16 blocks the default Aug-MSROI maps put at each quality (clean
  images, EfficientNet-Lite0); ``file_tables``: how many files carry each quality's table (the
  finest present); ``estimated_overhead``: the share of a default Aug-MSROI file's bytes the
  single table costs, estimated per image as sum_q n_q b_q (r_q - 1) / sum_q n_q b_q r_q with n_q
  the blocks at q, b_q a native quality-q file's bytes per block and r_q the ratio above for that
  image's own table.

    python bench/table_overhead.py [--n 100] [--no-maps]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import numpy as np  # noqa: E402

from bench._common import dev_files, emit, positive_int  # noqa: E402
from transforms.images import decode_image  # noqa: E402
from transforms.jpeg import encode_jpeg  # noqa: E402
from transforms.semantic_jpeg import DEFAULT_BLOCK, METHODS, block_qualities  # noqa: E402

LADDER = (30, 40, 50, 60, 70)


def _overhead(enc, im: np.ndarray, q: int, table: int, native: int) -> float:
    """Bytes of ``im`` with every block at ``q`` in a file whose table is ``table``'s, over ``native``."""
    gh, gw = -(-im.shape[0] // DEFAULT_BLOCK), -(-im.shape[1] // DEFAULT_BLOCK)
    grid = np.full((gh, gw), q, dtype=np.int64)
    grid[0, 0] = table
    return len(enc.encode(grid, DEFAULT_BLOCK)) / native


def _grids(images: list[np.ndarray]) -> list[np.ndarray]:
    """The default Aug-MSROI quality grids (EfficientNet-Lite0, seeded by position)."""
    from transforms.images import to_tensor
    from transforms.models import build_model
    from transforms.saliency import aug_msroi
    from transforms.seeds import seed_tensor

    model = build_model("efficientnet_lite0").eval()
    grids = []
    for i in range(0, len(images), 16):
        batch = np.stack(images[i : i + 16])
        maps = aug_msroi(model, to_tensor(batch), seeds=seed_tensor(list(range(i, i + len(batch))))).numpy()
        grids += [block_qualities(m, levels=len(LADDER), q_low=LADDER[0], q_high=LADDER[-1]) for m in maps]
    return grids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=positive_int, default=100)
    ap.add_argument("--no-maps", dest="maps", action="store_false", help="skip the Aug-MSROI block shares")
    args = ap.parse_args()
    images = [decode_image(p.read_bytes()) for p, _ in dev_files(args.n)]
    top = LADDER[-1]
    encoders = [METHODS["requantize"](im, "4:2:0") for im in images]
    native = [{q: len(encode_jpeg(im, q, "4:2:0", optimize=True)) for q in LADDER} for im in images]
    ratios = {q: [_overhead(e, im, q, top, nat[q]) for e, im, nat in zip(encoders, images, native)]
              for q in LADDER[:-1]}
    doc = {"bench": "table_overhead", "images": len(images), "file_quality": top,
           "level_overhead": {str(q): round(float(np.mean(r)), 3) for q, r in ratios.items()}}
    if args.maps:
        shares, tables, overheads = dict.fromkeys(LADDER, 0), dict.fromkeys(LADDER, 0), []
        for grid, enc, im, nat in zip(_grids(images), encoders, images, native):
            table = int(grid.max())  # the encoder writes the table of the finest quality present
            tables[table] += 1
            counts = {q: int((grid == q).sum()) for q in LADDER}
            for q, c in counts.items():
                shares[q] += c
            blocks = grid.size
            paid = extra = 0.0
            for q, c in counts.items():
                if c:
                    r = 1.0 if q == table else _overhead(enc, im, q, table, nat[q])
                    paid += c * nat[q] / blocks * r
                    extra += c * nat[q] / blocks * (r - 1)
            overheads.append(extra / paid)
        total = sum(shares.values())
        doc.update({"blocks": {str(q): round(c / total, 3) for q, c in shares.items()},
                    "file_tables": {str(q): c for q, c in tables.items() if c},
                    "estimated_overhead": round(float(np.mean(overheads)), 3)})
    emit(doc)


if __name__ == "__main__":
    main()
