"""Build adversarial sets: lossless PNG WebDataset shards per attack, keys and labels carried over.

Writes OUT/shards/<attack>/shard-N.tar (``<key>.png``, ``<key>.cls``, ``<key>.json``) plus the same
metadata, errors, stats, summary and _SUCCESS as ``evaluate``. The shards are valid input to every
other job; images already at the crop size are not resized again.
"""
from __future__ import annotations

from . import evaluate
from .common import finish_run, pipeline_options

HELP = "write adversarial sets (PNG WebDataset shards per attack) + metadata"


#: evaluate's map options, which the attack job refuses (no defense, so no maps), with their
#: "not given" values: the option as the command line writes it, its dest and that value.
MAP_OPTIONS = (("--save-maps", "save_maps", False), ("--map-precision", "map_precision", "fp32"),
               ("--map-compile", "map_compile", False), ("--map-model", "map_model", None),
               ("--map-weights", "map_weights", None))


def add_arguments(parser) -> None:
    evaluate.add_arguments(parser)
    maps = {dest for _, dest, _ in MAP_OPTIONS}
    for action in parser._actions:  # the attack job stores undefended images only
        if action.dest == "defense":
            action.help = "not accepted: adversarial sets are stored losslessly"
        elif action.dest in maps:
            action.help = "not accepted: no defense, so no saliency maps"


def run(args, beam_argv) -> int:
    from pipeline.evaluate import run_evaluate

    if args.defense:
        raise ValueError("semjpeg attack stores images losslessly; use evaluate or defend for --defense")
    given = [flag for flag, dest, unset in MAP_OPTIONS if getattr(args, dest) != unset]
    if given:
        raise ValueError(f"semjpeg attack makes no saliency maps (no defense; a bpda= defense draws its maps with "
                         f"the classifier); {', '.join(given)} {'is' if len(given) == 1 else 'are'} for evaluate "
                         "and defend")
    if not args.attack:
        raise ValueError("give at least one --attack")
    config = evaluate.build_config(args, layout="attack", defenses=[])
    summary = run_evaluate(config, pipeline_options(beam_argv))
    return finish_run("attack", summary, config.output)
