"""Classify: Defended -> Results (predictions, quality, sizes), then agreement with the clean image."""
from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from .config import ModelConfig
from .errors import SplitErrors
from .model_handlers import ClassifyHandler

REFERENCE = ("clean", "none")


def join_clean(item):
    """All Results of one input -> the same Results with ``clean_pred`` and ``agree_clean`` set.

    The reference is the prediction on the clean, undefended image (the paper's agreement
    metric). Should that variant have failed, the clean prediction made at the attack stage is
    used: the same model on the same pixels.
    """
    _, results = item
    results = list(results)
    ref = next((r.row["pred"] for r in results if (r.row["attack"], r.row["defense"]) == REFERENCE), None)
    for r in results:
        clean_pred = ref if ref is not None else r.row["clean_pred"]
        row = dict(r.row, clean_pred=clean_pred, agree_clean=r.row["pred"] == clean_pred)
        yield dataclasses.replace(r, row=row)


class Classify(beam.PTransform):
    """Defended -> (Result PCollection with agreement filled, ErrorRecord PCollection)."""

    def __init__(self, model: ModelConfig, *, run_id: str, native: bool = False):
        super().__init__()
        self.handler = ClassifyHandler(model, run_id=run_id, native=native)

    def expand(self, defended):
        results, errors = defended | "RunClassifier" >> RunInference(self.handler) | "Split" >> SplitErrors()
        results = (
            results
            | "ByInput" >> beam.Map(lambda r: ((r.source_index, r.key), r))
            | "GroupInput" >> beam.GroupByKey()
            | "AgreeClean" >> beam.FlatMap(join_clean)
        )
        return results, errors
