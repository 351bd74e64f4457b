"""AttackImages: Samples -> Variants (clean + each attack), through RunInference."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from transforms.specs import Spec

from .config import ModelConfig
from .errors import ERRORS, SplitErrors, dead_letters
from .model_handlers import AttackHandler


class AttackImages(beam.PTransform):
    """Sample -> (Variant PCollection, ErrorRecord PCollection). ``attacks`` starts with clean."""

    def __init__(self, model: ModelConfig, attacks: tuple[Spec, ...], *, seed: int, attack_labels: str):
        super().__init__()
        self.handler = AttackHandler(model, attacks, seed=seed, attack_labels=attack_labels)

    def expand(self, samples):
        main, dlq = samples | "RunAttacks" >> RunInference(self.handler).with_exception_handling()
        split = (
            main
            | "Unbatch" >> beam.FlatMap(lambda variants: variants)
            | "SplitErrors" >> beam.ParDo(SplitErrors()).with_outputs(ERRORS, main="variants")
        )
        failed = dlq.failed_inferences | "FailedBatches" >> beam.FlatMap(dead_letters("attack"))
        errors = (split[ERRORS], failed) | "Errors" >> beam.Flatten()
        return split.variants, errors
