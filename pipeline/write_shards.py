"""WriteShards: Results -> WebDataset tars, one per (attack, defense, input shard).

Members ``<key>.<ext>`` (the stored image), ``<key>.cls`` (label, when known) and ``<key>.json``
(the metadata row and the input's own JSON), sorted by key with fixed tar headers, so a retried
bundle writes byte-identical files.
"""
from __future__ import annotations

import json
import math

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.specs import safe_name

from .io import OutputDir, shard_name, tar_bytes, write_bytes
from .records import Result


#: Row fields that measure the run rather than the image.
TIMINGS = ("attack_seconds", "map_seconds")


def jsonable(value):
    """Rows -> strict JSON: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        return jsonable(value.item())
    return value


def sample_members(r: Result) -> list[tuple[str, bytes]]:
    members = [(f"{r.key}.{r.ext}", r.data)]
    members += [(f"{r.key}.{ext}", data) for ext, data in sorted(r.members.items())]
    if r.label is not None:
        members.append((f"{r.key}.cls", str(r.label).encode()))
    # Timing is a property of the run, not of the image: kept in the Parquet metadata only, so
    # the shards of a run are reproducible byte for byte.
    doc = {"semjpeg": jsonable({k: v for k, v in r.row.items() if k not in TIMINGS})}
    if r.meta:
        doc["source"] = jsonable(r.meta)
    members.append((f"{r.key}.json", json.dumps(doc, sort_keys=True).encode()))
    return members


def shard_folder(r: Result, layout: str) -> tuple[str, ...]:
    """evaluate: <attack>/<defense>; attack: <attack>; defend: <defense>."""
    a, d = safe_name(r.row["attack_spec"]), safe_name(r.row["defense_spec"])
    return {"attack": (a,), "defend": (d,)}.get(layout, (a, d))


class _WriteTarFn(beam.DoFn):
    def __init__(self, out: OutputDir):
        self.out = out
        self.written = Metrics.counter("semjpeg", "shards_written")

    def process(self, item):
        (folder, index), results = item
        results = sorted(results, key=lambda r: r.key)
        members = [m for r in results for m in sample_members(r)]
        path = self.out.path("shards", *folder, shard_name(index))
        write_bytes(path, tar_bytes(members))
        self.written.inc()
        yield path


class WriteShards(beam.PTransform):
    """Result -> paths of the written tars. ``layout``: ``evaluate``, ``attack`` or ``defend``."""

    def __init__(self, out: OutputDir, layout: str = "evaluate"):
        super().__init__()
        self.out = out
        self.layout = layout

    def expand(self, results):
        layout = self.layout
        return (
            results
            | "ByShard" >> beam.Map(lambda r: ((shard_folder(r, layout), r.source_index), r))
            | "GroupShard" >> beam.GroupByKey()
            | "WriteTar" >> beam.ParDo(_WriteTarFn(self.out))
        )
