"""Defend shards (clean or adversarial) with semantic JPEG: the production job.

Writes OUT/shards/<defense>/shard-N.tar (``<key>.jpg``, ``<key>.cls``, ``<key>.json``, and
``<key>.map.png`` with --save-maps), OUT/metadata/*.parquet (bytes, bpp, quality levels,
PSNR/SSIM against the input, the prediction before (``clean_pred``) and after (``pred``)),
OUT/errors/*.parquet, OUT/stats/*.json, OUT/summary.json and finally OUT/_SUCCESS.
"""
from __future__ import annotations

from . import evaluate
from .common import add_input_args, add_model_args, finish_run, pipeline_options

HELP = "defend shards with Aug-MSROI semantic JPEG: shards + metadata"


def add_arguments(parser) -> None:
    add_input_args(parser)
    parser.add_argument("--output", required=True, help="output folder (any fsspec URL); replaced as a whole")
    parser.add_argument("--defense", action="append", default=[], metavar="NAME[:k=v,...]",
                        help="default aug_msroi; e.g. aug_msroi:q_low=20,q_high=60, msroi, jpeg:quality=50")
    parser.add_argument("--save-maps", action="store_true", help="store each saliency map as <key>.map.png")
    parser.add_argument("--run-id", help="run identifier (default: UTC time + random suffix)")
    add_model_args(parser)


def run(args, beam_argv) -> int:
    from pipeline.evaluate import run_evaluate

    config = evaluate.build_config(args, layout="defend", attacks=[], defenses=args.defense or ["aug_msroi"])
    summary = run_evaluate(config, pipeline_options(beam_argv))
    return finish_run("defend", summary, config.output)
