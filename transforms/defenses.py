"""Input-transformation defenses: a registry of encoders from uint8 HWC RGB to stored bytes.

Each defense is ``defense(image, *, params...) -> Encoded``; ``--defense name:k=v`` specs are
checked against :data:`DEFENSES`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .jpeg import Subsampling, encode_jpeg, encode_png
from .specs import Spec, parse_spec

__all__ = ["DEFENSES", "Encoded", "parse_defense", "apply_defense", "none", "jpeg"]


class Encoded(NamedTuple):
    """Stored form of a defended image: the bytes and their file extension (``jpg``, ``png``)."""

    data: bytes
    ext: str


def none(image: np.ndarray) -> Encoded:
    """No defense: the image stored losslessly (PNG)."""
    return Encoded(encode_png(image), "png")


def jpeg(image: np.ndarray, *, quality: int = 75, subsampling: Subsampling = "4:2:0") -> Encoded:
    """Uniform JPEG at one IJG ``quality`` (1..100): the classic compression defense."""
    return Encoded(encode_jpeg(image, quality, subsampling), "jpg")


DEFENSES = {
    "none": none,
    "jpeg": jpeg,
}


def parse_defense(text: str) -> Spec:
    """Parse and validate ``name[:k=v,...]``; bad values fail here, before any work starts."""
    spec = parse_spec(text, DEFENSES, kind="defense")
    q = spec.params.get("quality")
    if q is not None and not 1 <= q <= 100:
        raise ValueError(f"bad value for 'quality' in defense spec {text!r}: must be in 1..100")
    return spec


def apply_defense(spec: Spec, image: np.ndarray) -> Encoded:
    """Encode one uint8 HWC RGB image with a parsed defense spec."""
    return DEFENSES[spec.name](image, **spec.params)
