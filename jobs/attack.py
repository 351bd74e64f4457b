"""Build adversarial sets: lossless PNG WebDataset shards per attack, keys and labels carried over.

Writes OUT/shards/<attack>/shard-N.tar (``<key>.png``, ``<key>.cls``, ``<key>.json``) plus the same
metadata, errors, stats, summary and _SUCCESS as ``evaluate``. The shards are valid input to every
other job; images already at the crop size are not resized again.
"""
from __future__ import annotations

from . import evaluate
from .common import finish_run, pipeline_options

HELP = "write adversarial sets (PNG WebDataset shards per attack) + metadata"


def add_arguments(parser) -> None:
    evaluate.add_arguments(parser)
    for action in parser._actions:  # the attack job stores undefended images only
        if action.dest == "defense":
            action.help = "not accepted: adversarial sets are stored losslessly"
        elif action.dest in ("save_maps", "map_precision", "map_compile", "map_model", "map_weights"):
            action.help = "not accepted: no defense, so no saliency maps"


def run(args, beam_argv) -> int:
    from pipeline.evaluate import run_evaluate

    if args.defense:
        raise ValueError("semjpeg attack stores images losslessly; use evaluate or defend for --defense")
    if args.save_maps:
        raise ValueError("semjpeg attack makes no saliency maps (no defense); use evaluate or defend for --save-maps")
    if args.map_precision != "fp32":
        raise ValueError("semjpeg attack makes no saliency maps (no defense); --map-precision is for evaluate and defend")
    if args.map_compile:
        raise ValueError("semjpeg attack makes no saliency maps (no defense); --map-compile is for evaluate and defend")
    if args.map_model or args.map_weights:
        raise ValueError("semjpeg attack makes no saliency maps (no defense; a bpda= defense draws its maps with the "
                         "classifier); --map-model and --map-weights are for evaluate and defend")
    if not args.attack:
        raise ValueError("give at least one --attack")
    config = evaluate.build_config(args, layout="attack", defenses=[])
    summary = run_evaluate(config, pipeline_options(beam_argv))
    return finish_run("attack", summary, config.output)
