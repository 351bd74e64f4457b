"""Adversarial attacks, one file each, as plain functions.

Every attack has the signature ``attack(model, images, labels, *, <budget and paper defaults>,
target=None) -> AttackResult``: float32 NCHW images in [0, 1] in, the adversarial images on the
uint8 grid out, judged after quantization. Passing ``target`` (class indices) makes it targeted;
attacks that draw noise also take ``seeds`` (N,). Every attack takes ``rmse=`` (the paper's
protocol: RMSE 0.02 from the clean image), never exceeded after quantization; the FGSM family
also takes ``eps=`` (L-inf). :data:`ATTACKS` is the registry that ``--attack name:k=v`` specs are
checked against. Every attack also takes ``bpda=<defense spec>`` in a spec: it then attacks the
classifier behind that defense, differentiating through the defense as the identity
(:mod:`.bpda`), the adaptive attack that JPEG-family defenses have to face.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..defenses import defend_images, matched_defense, parse_defense
from ..specs import Spec, parse_spec, spec_params
from ._common import AttackResult, zero_iterations
from .bpda import BPDA_PARAM, ThroughDefense, split_bpda
from .cw import cw
from .deepfool import deepfool
from .fgsm import fgsm
from .ga import ga
from .igsm import igsm
from .jsma import jsma
from .lbfgs import lbfgs
from .mifgsm import mifgsm
from .pgd import pgd

__all__ = [
    "ATTACKS", "AttackResult", "CLEAN", "check_values", "parse_attack", "resolve_target", "run_attack",
    "ThroughDefense",
    "fgsm", "igsm", "pgd", "mifgsm", "ga", "deepfool", "jsma", "lbfgs", "cw",
]

ATTACKS = {
    "fgsm": fgsm,
    "igsm": igsm,
    "bim": igsm,
    "pgd": pgd,
    "mifgsm": mifgsm,
    "ga": ga,
    "deepfool": deepfool,
    "jsma": jsma,
    "lbfgs": lbfgs,
    "cw": cw,
}

#: How a spec names the target: a class index, a random class or the least likely one.
TargetSpec = int | Literal["random", "least_likely"] | None

#: Names reserved for the unattacked images.
CLEAN = "clean"


def parse_attack(text: str) -> Spec:
    """Parse ``name[:k=v,...]``; ``clean`` is accepted and means no attack.

    ``bpda=<defense spec>`` (the defense's parameters separated by ``;``) is checked as a defense
    spec and kept, normalized, in the params under ``bpda``."""
    if text.strip().lower() == CLEAN:
        return Spec(CLEAN, {}, CLEAN)
    base, defense = split_bpda(text)
    try:
        spec = parse_spec(base, ATTACKS, kind="attack", overrides={"target": TargetSpec})
    except ValueError as e:
        if str(e).startswith("unknown parameter"):  # every attack also takes bpda=
            raise ValueError(f"{e}, {BPDA_PARAM}") from None
        raise
    check_values(spec)
    if defense is None:
        return spec
    try:
        dspec = parse_defense(defense)
        matched_defense(dspec)
    except ValueError as e:
        raise ValueError(f"bad {BPDA_PARAM} defense in attack spec {text!r}: {e}") from None
    return Spec(spec.name, {**spec.params, BPDA_PARAM: dspec.text}, text.strip())


def check_values(spec: Spec, num_classes: int | None = None) -> None:
    """Check a parsed attack spec's values, so a bad one fails before any work starts.

    Every attack checks its parameters (each one's range is in its ``check_range`` calls: finite,
    budgets in [0, 1], step counts >= 1, ...) before it touches the model or the images, so the
    checks run here on an empty batch, without a model: the same checks as at run time. A class
    index ``target`` must be >= 0, and below ``num_classes`` where the model is known.
    Raises ValueError naming the spec and the parameter."""
    if spec.name == CLEAN:
        return
    params = {k: v for k, v in spec.params.items() if k not in ("target", BPDA_PARAM)}
    target = spec.params.get("target")
    try:
        if isinstance(target, int):
            hi = "" if num_classes is None else f" and < {num_classes} (the model's classes)"
            if target < 0 or (num_classes is not None and target >= num_classes):
                raise ValueError(f"target must be a class index >= 0{hi}, random or least_likely, got {target}")
        empty = torch.zeros(0, 3, 1, 1)
        ATTACKS[spec.name](None, empty, torch.zeros(0, dtype=torch.int64), **params)
    except ValueError as e:
        raise ValueError(f"bad value in attack spec {spec.text!r}: {e}") from None


def resolve_target(
    target: TargetSpec, clean_logits: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None
) -> torch.Tensor | None:
    """Turn a spec's ``target`` into class indices (N,), or None for untargeted attacks.

    ``random`` draws, per sample from its seed, a class other than its label; ``least_likely``
    is the class with the lowest clean logit.
    """
    if target is None:
        return None
    n, c = clean_logits.shape
    if isinstance(target, int):
        if not 0 <= target < c:
            raise ValueError(f"target class {target} out of range for a model with {c} classes")
        return torch.full((n,), target, dtype=torch.int64, device=labels.device)
    if target == "least_likely":
        return clean_logits.argmin(dim=1).to(labels.device)
    if target == "random":
        out = torch.empty(n, dtype=torch.int64)
        for i in range(n):  # one generator per sample: independent of the batch it arrived in
            g = torch.Generator().manual_seed(int(seeds[i]) if seeds is not None else i)
            r = int(torch.randint(c - 1, (1,), generator=g))
            out[i] = r + (r >= int(labels[i]))
        return out.to(labels.device)
    raise ValueError(f"unknown target {target!r}")


def through_defense(model: torch.nn.Module, defense: Spec) -> ThroughDefense:
    """``model`` behind ``defense`` for a BPDA attack. A semantic defense's maps come from
    ``model`` itself, their noise seeded from each image's pixels (the attacker does not know the
    defender's seeds; a rerun draws the same noise)."""
    return ThroughDefense(model, lambda x: defend_images(defense, x, model=model))


def run_attack(
    spec: Spec,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    clean_logits: torch.Tensor,
    seeds: torch.Tensor | None = None,
) -> tuple[AttackResult, torch.Tensor | None]:
    """Run a parsed attack spec on a batch. Returns the result and the targets used (or None)."""
    if spec.name == CLEAN:
        return AttackResult(images.clone(), zero_iterations(images)), None
    params = dict(spec.params)
    target = resolve_target(params.pop("target", None), clean_logits, labels, seeds)
    through = params.pop(BPDA_PARAM, None)
    if through is not None:
        model = through_defense(model, parse_defense(through))
    fn = ATTACKS[spec.name]
    if "seeds" in spec_params(fn):
        params["seeds"] = seeds
    return fn(model, images, labels, target=target, **params), target
