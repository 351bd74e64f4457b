"""Turning failures into ErrorRecords, and separating them from results."""
from __future__ import annotations

from typing import Any

import apache_beam as beam

from .records import Defended, ErrorRecord, RawSample, Sample, Variant



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


def error_reason(exc: BaseException) -> str:
    """``Type: message`` for an errors row; an exception without a message (Pillow's and numpy's
    MemoryError) still says what happened, not ``MemoryError: `` with nothing after it."""
    text = str(exc).strip()
    if not text:
        text = "out of memory" if isinstance(exc, MemoryError) else "(no message)"
    return f"{type(exc).__name__}: {text}"


def batch_errors(batch, stage: str, exc: BaseException) -> list[ErrorRecord]:
    """One ErrorRecord per item of a batch that failed as a whole."""
    reason = error_reason(exc)
    out = []
    for item in batch:
        idx, src, key, member, attack, defense = _identity(item)
        out.append(ErrorRecord(idx, src, key, member, stage, reason, attack, defense))
    return out


def is_error(item: Any) -> bool:
    return isinstance(item, ErrorRecord)


class SplitErrors(beam.PTransform):
    """A PCollection mixing results and ErrorRecords -> (results, errors).

    Stages emit both kinds into one output and split it here with two filters rather than with
    tagged outputs: some runners (Beam's DaskRunner) do not separate tagged outputs.
    """

    def expand(self, mixed):
        good = mixed | "Results" >> beam.Filter(lambda x: not is_error(x))
        errors = mixed | "Errors" >> beam.Filter(is_error)
        return good, errors
