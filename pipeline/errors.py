"""Turning failures into ErrorRecords: dead-letter batches and mixed outputs."""
from __future__ import annotations

from typing import Any

import apache_beam as beam

from .records import Defended, ErrorRecord, RawSample, Sample, Variant

ERRORS = "errors"


def _identity(item: Any) -> tuple[int, str, str | None, str | None, str | None, str | None]:
    """(source_index, source, key, member, attack, defense) of any element type."""
    attack = defense = None
    if isinstance(item, Defended):
        defense = item.defense.text
        item = item.variant
    if isinstance(item, Variant):
        attack = item.attack.text
        item = item.sample
    if isinstance(item, (Sample, RawSample)):
        return item.source_index, item.source, item.key, getattr(item, "member", None), attack, defense
    return -1, "?", None, None, attack, defense


def _reason(info: Any) -> str:
    if isinstance(info, tuple) and len(info) >= 2:
        exc_type, exc = info[0], info[1]
        name = getattr(exc_type, "__name__", str(exc_type))
        return f"{name}: {exc}"
    return str(info)


def dead_letters(stage: str):
    """FlatMap fn: a failed RunInference batch ``(batch, exception info)`` -> one ErrorRecord per item."""

    def expand(failed):
        batch, info = failed
        reason = _reason(info)
        for item in batch:
            idx, src, key, member, attack, defense = _identity(item)
            yield ErrorRecord(idx, src, key, member, stage, reason, attack, defense)

    return expand


class SplitErrors(beam.DoFn):
    """Route ErrorRecords found among outputs to the ``errors`` output."""

    def process(self, item):
        if isinstance(item, ErrorRecord):
            yield beam.pvalue.TaggedOutput(ERRORS, item)
        else:
            yield item
