"""EncodeDefenses: Variant -> Defended, one per defense spec (bytes as stored + decoded pixels)."""
from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.defenses import apply_defense
from transforms.jpeg import decode_rgb
from transforms.specs import Spec

from .errors import SplitErrors
from .records import Defended, ErrorRecord, Variant

log = logging.getLogger(__name__)


class _EncodeFn(beam.DoFn):
    def __init__(self, defenses: tuple[Spec, ...]):
        self.defenses = defenses
        self.ok = Metrics.counter("semjpeg", "encoded")
        self.failed = Metrics.counter("semjpeg", "encode_errors")

    def process(self, v: Variant):
        s = v.sample
        for spec in self.defenses:
            try:
                enc = apply_defense(spec, v.image)
                # PNG is lossless: the stored pixels are the input pixels.
                decoded = v.image if enc.ext == "png" else decode_rgb(enc.data)
            except Exception as e:
                self.failed.inc()
                log.warning("defense %s failed on %s: %s", spec.text, s.key, e)
                yield ErrorRecord(s.source_index, s.source, s.key, None, "encode", f"{type(e).__name__}: {e}",
                                  v.attack.text, spec.text)
                continue
            self.ok.inc()
            yield Defended(v, spec, enc.data, enc.ext, decoded)


class EncodeDefenses(beam.PTransform):
    """Variant -> (Defended PCollection, ErrorRecord PCollection)."""

    def __init__(self, defenses: tuple[Spec, ...]):
        super().__init__()
        self.defenses = defenses

    def expand(self, variants):
        out = variants | "Encode" >> beam.ParDo(_EncodeFn(self.defenses))
        return out | "Split" >> SplitErrors()
