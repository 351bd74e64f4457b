"""Attack and defend every input, classify every variant, and write shards, metadata and a summary.

Writes OUT/shards/<attack>/<defense>/shard-N.tar, OUT/metadata/*.parquet, OUT/errors/*.parquet,
OUT/stats/*.json, OUT/summary.json and finally OUT/_SUCCESS. The clean images (attack ``clean``)
and the undefended images (defense ``none``) are always evaluated.
"""
from __future__ import annotations

from .common import (add_input_args, add_model_args, finish_run, input_config, map_model_config, model_config,
                     pipeline_options)

HELP = "attack x defense evaluation: shards + Parquet metadata + summary"


def add_arguments(parser) -> None:
    add_input_args(parser)
    parser.add_argument("--output", required=True, help="output folder (any fsspec URL); replaced as a whole")
    parser.add_argument("--attack", action="append", default=[], metavar="NAME[:k=v,...]",
                        help="e.g. fgsm:eps=4/255, igsm:eps=4/255,steps=10; repeatable")
    parser.add_argument("--defense", action="append", default=[], metavar="NAME[:k=v,...]",
                        help="e.g. jpeg:quality=50, aug_msroi, msroi:q_low=20, jpeg:match=aug_msroi; repeatable")
    parser.add_argument("--save-maps", action="store_true", help="store each saliency map as <key>.map.png")
    parser.add_argument("--attack-labels", choices=["pred", "label"], default="pred",
                        help="attack the clean prediction (default, the paper's protocol) or the dataset label")
    parser.add_argument("--run-id", help="run identifier (default: UTC time + random suffix)")
    add_model_args(parser)


def build_config(args, *, layout: str = "evaluate", defenses=None, attacks=None):
    from pipeline.config import EvaluateConfig, parse_attacks, parse_defenses

    extra = {"run_id": args.run_id} if args.run_id else {}
    return EvaluateConfig(
        input=input_config(args), output=args.output, model=model_config(args),
        attacks=parse_attacks(args.attack if attacks is None else attacks),
        defenses=parse_defenses(args.defense if defenses is None else defenses, reference=layout != "defend"),
        seed=args.seed, attack_labels=getattr(args, "attack_labels", "pred"), layout=layout,
        map_model=map_model_config(args), save_maps=args.save_maps,
        map_precision=args.map_precision, map_compile=args.map_compile,
        **extra,
    )


def run(args, beam_argv) -> int:
    from pipeline.evaluate import run_evaluate

    config = build_config(args)
    options = pipeline_options(beam_argv)
    summary = run_evaluate(config, options)
    return finish_run("evaluate", summary, config.output)
