"""Shared helpers for the benchmarks: dev images, shards, timing, JSON output."""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]

SHARED = Path(os.environ.get("SEMJPEG_SHARED", ROOT.parent / "shared"))
DEV = SHARED / "data" / "imagenet-dev"


def dev_files(n: int | None = None) -> list[tuple[Path, int]]:
    """The first ``n`` dev images (sorted by file name; all when None) and their labels; exits
    with a message when the dev images are missing or fewer than ``n``."""
    if not (DEV / "labels.csv").exists():
        sys.exit(f"dev images not found at {DEV} (set SEMJPEG_SHARED)")
    with open(DEV / "labels.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    if n is None:
        n = len(rows)
    if n > len(rows):
        sys.exit(f"asked for {n} dev images, {DEV} has {len(rows)}")
    return [(DEV / r["file"], int(r["label"])) for r in rows[:n]]


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (image counts, batches, repeats, threads)."""
    return _bounded_int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0 (0 switches something off)."""
    return _bounded_int(text, 0, "an integer >= 0")


def _bounded_int(text: str, low: int, what: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def torch_device(text: str) -> str:
    """argparse type: ``cpu``, or a CUDA device (``cuda``, ``cuda:1``) that this machine has."""
    import argparse

    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: no such CUDA device here ({torch.cuda.device_count()} found)")
    return text


class AttackedDevSets(NamedTuple):
    """The first N dev images, their clean predictions and their adversarial versions."""

    names: list[str]  # file stems
    labels: Any  # numpy int (N,)
    logits: Any  # torch (N, classes), clean
    preds: Any  # torch (N,), clean top-1
    sets: dict  # "clean" and each attack's name -> uint8 (N, H, W, 3)


def attacked_dev_sets(model, n: int, attacks: dict[str, str], batch: int) -> AttackedDevSets:
    """Decode the first ``n`` dev images, classify them, and attack them with each of ``attacks``
    ({name: spec}) in batches of ``batch``, against the clean prediction."""
    import numpy as np
    import torch

    from transforms.attacks import parse_attack, run_attack
    from transforms.images import decode_image, to_tensor, to_uint8

    files = dev_files(n)
    clean = np.stack([decode_image(p.read_bytes()) for p, _ in files])
    x = to_tensor(clean)
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + batch]) for i in range(0, n, batch)])
    preds = logits.argmax(1)
    sets = {"clean": clean}
    for name, spec in attacks.items():
        attack = parse_attack(spec)
        adv = [run_attack(attack, model, x[i : i + batch], preds[i : i + batch],
                          clean_logits=logits[i : i + batch])[0].images for i in range(0, n, batch)]
        sets[name] = to_uint8(torch.cat(adv))
    return AttackedDevSets([p.stem for p, _ in files], np.array([lab for _, lab in files]), logits, preds, sets)


def model_stages(model, x, seeds) -> dict[str, Callable[[], Any]]:
    """The model work of the pipeline's stages on the batch ``x``, as calls to time: a
    classification pass, one attack step (the gradient to the input), MSROI, and Aug-MSROI at its
    defaults (seeded by ``seeds``)."""
    import torch

    from transforms.saliency import aug_msroi, msroi

    def forward():
        with torch.inference_mode():
            model(x)

    def attack_step():
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xg).logsumexp(1).sum(), xg)

    return {"forward": forward, "forward_backward": attack_step, "msroi": lambda: msroi(model, x),
            "aug_msroi": lambda: aug_msroi(model, x, seeds=seeds)}


#: Calls of each stage per timing (the fast stages twice).
STAGE_CALLS = {"forward": 2, "forward_backward": 1, "msroi": 2, "aug_msroi": 1}


def best_stage_rates(models: dict[str, Any], x, seeds, repeat: int) -> dict[str, dict[str, float]]:
    """{stage: {model name: images/s}}, the fastest of ``repeat`` timings of each of
    :func:`model_stages` on ``x``, the models taking turns (after one warm-up call of each:
    oneDNN primitives, the allocator)."""
    stages = {name: model_stages(model, x, seeds) for name, model in models.items()}
    for calls in stages.values():
        for fn in calls.values():
            fn()
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeat):
        for name, calls in stages.items():
            for stage, fn in calls.items():
                n = STAGE_CALLS[stage]
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                ips = n * x.shape[0] / (time.perf_counter() - t)
                best.setdefault(stage, {})[name] = max(best.get(stage, {}).get(name, 0.0), ips)
    return best


def emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)
