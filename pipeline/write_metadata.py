"""WriteMetadata: per input shard, ``metadata/part-N.parquet`` (zstd), ``errors/part-N.parquet``
and ``stats/part-N.json``; every source gets a stats file, even one that yielded nothing."""
from __future__ import annotations

import io
import json
from collections import Counter

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from .io import OutputDir, part_name, printable, write_bytes
from .records import ErrorRecord
from .schema import ERRORS_SCHEMA, METADATA_SCHEMA


def parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class _WritePartFn(beam.DoFn):
    def __init__(self, out: OutputDir, run_id: str, order: dict[tuple[str, str], int]):
        self.out = out
        self.run_id = run_id
        self.order = order

    def process(self, item):
        index, groups = item
        rows = [r.row for r in groups["rows"]]
        errors: list[ErrorRecord] = sorted(
            groups["errors"], key=lambda e: (e.key or "", e.member or "", e.stage, e.attack or "", e.defense or "", e.reason)
        )
        source = next(iter(groups["sources"]), None)
        rows.sort(key=lambda r: (r["key"], self.order.get((r["attack_spec"], r["defense_spec"]), 1 << 30)))
        written = []
        if rows:
            path = self.out.path("metadata", part_name(index, "parquet"))
            write_bytes(path, parquet_bytes(rows, METADATA_SCHEMA))
            written.append(path)
        if errors:
            path = self.out.path("errors", part_name(index, "parquet"))
            write_bytes(path, parquet_bytes([e.as_row(self.run_id) for e in errors], ERRORS_SCHEMA))
            written.append(path)
        stats = {
            "source": printable(source.path) if source else (errors[0].source if errors else None),
            "source_index": index,
            "samples": len({r["key"] for r in rows}),
            "rows": len(rows),
            "errors": len(errors),
            "errors_by_stage": dict(sorted(Counter(e.stage for e in errors).items())),
            "run_id": self.run_id,
        }
        path = self.out.path("stats", part_name(index, "json"))
        write_bytes(path, json.dumps(stats, indent=1, sort_keys=True).encode())
        written.append(path)
        yield from written


class WriteMetadata(beam.PTransform):
    """(Results, ErrorRecords, SourceShards) -> paths of the written files."""

    def __init__(self, out: OutputDir, run_id: str, order: dict[tuple[str, str], int]):
        super().__init__()
        self.out = out
        self.run_id = run_id
        self.order = order

    def expand(self, pcolls):
        results, errors, sources = pcolls
        return (
            {
                "rows": results | "RowsByShard" >> beam.Map(lambda r: (r.source_index, r)),
                "errors": errors | "ErrorsByShard" >> beam.Map(lambda e: (e.source_index, e)),
                "sources": sources | "SourcesByIndex" >> beam.Map(lambda s: (s.index, s)),
            }
            | "GroupByShard" >> beam.CoGroupByKey()
            | "WriteParts" >> beam.ParDo(_WritePartFn(self.out, self.run_id, self.order))
        )
