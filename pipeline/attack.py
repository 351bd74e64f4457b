"""AttackImages: Samples -> Variants (clean + each attack), through RunInference."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from transforms.specs import Spec

from .config import ModelConfig
from .errors import SplitErrors
from .model_handlers import AttackHandler


class AttackImages(beam.PTransform):
    """Sample -> (Variant PCollection, ErrorRecord PCollection). ``attacks`` starts with clean."""

    def __init__(self, model: ModelConfig, attacks: tuple[Spec, ...], *, seed: int, attack_labels: str,
                 native: bool = False):
        super().__init__()
        self.handler = AttackHandler(model, attacks, seed=seed, attack_labels=attack_labels, native=native)

    def expand(self, samples):
        return (
            samples
            | "RunAttacks" >> RunInference(self.handler)
            | "Unbatch" >> beam.FlatMap(lambda variants: variants)
            | "Split" >> SplitErrors()
        )
