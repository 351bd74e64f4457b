"""Adaptive attacks through an input-transformation defense: BPDA (Athalye, Carlini & Wagner,
"Obfuscated Gradients Give a False Sense of Security", ICML 2018).

A JPEG-family defense is not differentiable (quantization has zero gradient almost everywhere),
so an attacker who knows it is there approximates it on the backward pass. The forward pass runs
the real defense (encode, decode) and the classifier on its output, so every loss, prediction and
success test inside the attack sees the defended image; the backward pass treats the defense as
the identity, the approximation Athalye et al. use against JPEG and bit-depth reduction, since the
decoded image is close to its input.

Any attack becomes adaptive by attacking ``ThroughDefense(model, defense)`` instead of ``model``:
in a spec, ``bpda=<defense spec>`` (``;`` separates the defense's own parameters), e.g.
``igsm:eps=4/255,steps=10,bpda=aug_msroi`` or ``pgd:eps=4/255,bpda=jpeg:quality=50``. Budgets
are unchanged: the perturbation is still measured on the stored image.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ThroughDefense", "BPDA_PARAM", "split_bpda"]

#: The spec parameter that names the defense an attack differentiates through.
BPDA_PARAM = "bpda"


class ThroughDefense(nn.Module):
    """``model(defense(x))`` on the forward pass; the identity for ``defense`` on the backward.

    ``defense``: float32 NCHW in [0, 1] -> the defended images, same shape, device and dtype (no
    graph needed: :func:`transforms.defenses.defend_images` with its model bound).
    ``calls`` counts the defense's batches, for tests and benchmarks.
    """

    def __init__(self, model: nn.Module, defense):
        super().__init__()
        self.model = model
        self.defense = defense
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            defended = self.defense(x.detach())
        self.calls += 1
        if defended.shape != x.shape:
            raise ValueError(f"the defense changed the batch's shape: {tuple(x.shape)} -> {tuple(defended.shape)}")
        return self.model(x + (defended.to(x.dtype) - x).detach())


def split_bpda(text: str) -> tuple[str, str | None]:
    """Split an attack spec into (the spec without ``bpda=``, the defense spec it names or None).

    The defense's parameters are separated by ``;`` inside the attack spec, whose own parameters
    are separated by ``,``: ``fgsm:eps=4/255,bpda=jpeg:quality=50`` -> (``fgsm:eps=4/255``,
    ``jpeg:quality=50``); ``bpda=aug_msroi:levels=3;q_low=20`` names ``aug_msroi:levels=3,q_low=20``.
    A ``match=`` that names a defense with parameters takes the rest of the spec, which keeps its
    ``;`` as a run's ``--defense jpeg:match=...`` does: ``bpda=jpeg:match=aug_msroi:q_low=20;q_high=60``
    names ``jpeg:match=aug_msroi:q_low=20;q_high=60`` (the JPEG's own parameters go before ``match=``).
    """
    name, colon, rest = text.strip().partition(":")
    if not colon:
        return text, None
    kept, defense = [], None
    for item in rest.split(","):
        k, eq, v = item.partition("=")
        if eq and k.strip() == BPDA_PARAM:
            if defense is not None:
                raise ValueError(f"parameter {BPDA_PARAM!r} given twice in {text!r}")
            defense = _nested_defense(v.strip())
            if not defense:
                raise ValueError(f"empty {BPDA_PARAM}= defense in attack spec {text!r}")
        else:
            kept.append(item)
    if defense is None:
        return text, None
    return (name + (":" + ",".join(kept) if kept else "")), defense


def _nested_defense(text: str) -> str:
    """A ``bpda=`` value as a defense spec: ``;`` -> ``,``, but for the parameters of a defense
    that a ``match=`` names (``jpeg:match=aug_msroi:q_low=20;q_high=60``): they stay its own."""
    head, eq, ref = text.partition("match=")
    if not eq or ":" not in ref.split(";", 1)[0]:
        return text.replace(";", ",")
    return head.replace(";", ",") + eq + ref
