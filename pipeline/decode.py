"""DecodeImages: RawSample -> Sample (uint8 RGB at the crop size, or at its own size with
``crop=0``), plus errors with reasons."""
from __future__ import annotations

import json
import math

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.images import DecodeError, decode_image_profile

from .config import InputConfig
from .errors import SplitErrors
from .records import ErrorRecord, RawSample, Sample

STAGE = "decode"


def parse_label(text: str | None, num_classes: int) -> int | None:
    """Label text -> class index; raises ValueError with the reason for anything else.

    Integral decimals (``2.0``: an int column with missing values, written by pandas) are read as
    integers; an empty label and ``nan`` (how pandas writes a missing value) are no label."""
    if text is None:
        return None
    t = text.strip()
    if not t or t.lower() == "nan":
        return None
    try:
        value = int(t)
    except ValueError:
        try:
            number = float(t)
        except ValueError:
            number = math.nan
        if not number.is_integer():
            raise ValueError(f"unreadable label {t[:40]!r}") from None
        value = int(number)
    if not 0 <= value < num_classes:
        raise ValueError(f"label {value} out of range 0..{num_classes - 1}")
    return value


def parse_meta(raw: bytes | None) -> dict | None:
    """The JSON sidecar, carried into the outputs; unparsable text is kept as text."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {"unparsed_json": raw.decode("utf-8", "replace")[:10000]}
    return value if isinstance(value, dict) else {"json": value}


class _DecodeFn(beam.DoFn):
    def __init__(self, config: InputConfig, num_classes: int):
        self.config = config
        self.num_classes = num_classes
        self.ok = Metrics.counter("semjpeg", "decoded")
        self.failed = Metrics.counter("semjpeg", "decode_errors")

    def process(self, raw: RawSample):
        cfg = self.config
        try:
            label = parse_label(raw.label, self.num_classes)
            image, profile = decode_image_profile(raw.data, resize=cfg.resize, crop=cfg.crop,
                                                  max_pixels=cfg.max_pixels)
        except (ValueError, DecodeError) as e:
            self.failed.inc()
            yield ErrorRecord(raw.source_index, raw.source, raw.key, raw.member, STAGE, str(e))
            return
        self.ok.inc()
        yield Sample(raw.source_index, raw.source, raw.key, label, image, parse_meta(raw.meta), profile)


class DecodeImages(beam.PTransform):
    """RawSample -> (Sample PCollection, ErrorRecord PCollection)."""

    def __init__(self, config: InputConfig, num_classes: int):
        super().__init__()
        self.config = config
        self.num_classes = num_classes

    def expand(self, raw):
        out = raw | "Decode" >> beam.ParDo(_DecodeFn(self.config, self.num_classes))
        return out | "Split" >> SplitErrors()
