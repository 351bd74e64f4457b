"""The run summary: per attack x defense, means over the metadata rows; and its printed table."""
from __future__ import annotations

import importlib.metadata
import math
import platform

import apache_beam as beam

#: The distributions whose versions a run records (summary.json's ``versions``).
VERSIONED = ("semjpeg", "torch", "torchvision", "apache-beam", "numpy", "pillow", "jpeglib", "pyarrow")


def software_versions() -> dict[str, str | None]:
    """Python's version and those of VERSIONED where this runs (the worker that writes the
    summary; None for one not installed), for reproducing a run. torch's is its own
    ``__version__``, which names its build (``2.14.1+cu130``), with the CUDA it was built for."""
    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{name: version(name) for name in VERSIONED},
            "torch": str(torch.__version__), "torch_cuda": torch.version.cuda}

_SUMS = ("bytes", "bpp", "linf", "rmse")
#: The float sums, kept exactly (``_add``): a mean then depends on the rows only, not on the
#: order in which a runner adds and merges them (bundles, shards, worker processes).
_FLOATS = ("psnr", "ssim", *_SUMS)


def _add(partials: list[float], x: float) -> list[float]:
    """Add ``x`` to the exact sum held by ``partials`` (Shewchuk's non-overlapping partials, as
    ``math.fsum`` keeps them), in place; ``math.fsum(partials)`` is the sum correctly rounded."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]
    return partials


class SummaryFn(beam.CombineFn):
    """Rows of one (attack, defense) -> n, top1, agree_clean, mean bytes/bpp/psnr/ssim/linf/rmse,
    attack success rate, the share of images a gated defense flagged (None for the others).
    ``top1`` is over labeled rows only (None without labels); PSNR averages the finite values
    (identical images have infinite PSNR and are counted apart); SSIM the rows that have one (an
    image smaller than its 11x11 window, at its own size, has none)."""

    def create_accumulator(self):
        return {"n": 0, "labeled": 0, "correct": 0, "agree_n": 0, "agree": 0, "psnr_n": 0, "ssim_n": 0,
                "success_n": 0, "success": 0, "flagged_n": 0, "flagged": 0, **{k: [] for k in _FLOATS}}

    def add_input(self, acc, row):
        acc["n"] += 1
        if row.get("correct") is not None:
            acc["labeled"] += 1
            acc["correct"] += bool(row["correct"])
        if row.get("agree_clean") is not None:
            acc["agree_n"] += 1
            acc["agree"] += bool(row["agree_clean"])
        if row.get("success") is not None:
            acc["success_n"] += 1
            acc["success"] += bool(row["success"])
        if row.get("flagged") is not None:
            acc["flagged_n"] += 1
            acc["flagged"] += bool(row["flagged"])
        p = row.get("psnr")
        if p is not None and math.isfinite(p):
            _add(acc["psnr"], p)
            acc["psnr_n"] += 1
        if row.get("ssim") is not None:
            _add(acc["ssim"], row["ssim"])
            acc["ssim_n"] += 1
        for k in _SUMS:
            _add(acc[k], float(row.get(k) or 0.0))
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            for k in out:
                if k in _FLOATS:
                    for x in a[k]:
                        _add(out[k], x)
                else:
                    out[k] += a[k]
        return out

    def extract_output(self, acc):
        n = acc["n"]

        def ratio(a, b):
            return (math.fsum(a) if isinstance(a, list) else a) / b if b else None

        return {
            "n": n,
            "top1": ratio(acc["correct"], acc["labeled"]),
            "agree_clean": ratio(acc["agree"], acc["agree_n"]),
            "success": ratio(acc["success"], acc["success_n"]),
            "flagged": ratio(acc["flagged"], acc["flagged_n"]),
            "bytes": ratio(acc["bytes"], n),
            "bpp": ratio(acc["bpp"], n),
            "psnr": ratio(acc["psnr"], acc["psnr_n"]),
            "identical": n - acc["psnr_n"],
            "ssim": ratio(acc["ssim"], acc["ssim_n"]),
            "linf": ratio(acc["linf"], n),
            "rmse": ratio(acc["rmse"], n),
        }


class Summarize(beam.PTransform):
    """Results -> [((attack_spec, defense_spec), stats)], and errors -> [(stage, count)]."""

    def expand(self, pcolls):
        results, errors = pcolls
        table = (
            results
            | "BySpec" >> beam.Map(lambda r: ((r.row["attack_spec"], r.row["defense_spec"]), r.row))
            | "Combine" >> beam.CombinePerKey(SummaryFn())
        )
        error_counts = errors | "ErrorStage" >> beam.Map(lambda e: e.stage) | "CountStages" >> beam.combiners.Count.PerElement()
        return table, error_counts


def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def format_table(summary: dict) -> str:
    """The summary's table as fixed-width text, one line per attack x defense."""
    rows = summary["table"]
    wa = max([len("attack")] + [len(r["attack_spec"]) for r in rows])
    wd = max([len("defense")] + [len(r["defense_spec"]) for r in rows])
    head = (f"{'attack':<{wa}} {'defense':<{wd}} {'n':>5} {'top1':>6} {'agree':>6} {'bytes':>8} "
            f"{'bpp':>6} {'psnr':>6} {'ssim':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        psnr = _fmt(r["psnr"], ".2f", "inf" if r["n"] and r.get("identical") == r["n"] else "-")
        lines.append(
            f"{r['attack_spec']:<{wa}} {r['defense_spec']:<{wd}} {r['n']:>5} "
            f"{_fmt(r['top1'], '.3f'):>6} {_fmt(r['agree_clean'], '.3f'):>6} {_fmt(r['bytes'], '.0f'):>8} "
            f"{_fmt(r['bpp'], '.2f'):>6} {psnr:>6} {_fmt(r['ssim'], '.4f'):>6}"
        )
    errs = summary.get("errors") or {}
    lines.append(f"{summary.get('samples', 0)} inputs processed; errors: "
                 + (", ".join(f"{k} {v}" for k, v in errs.items()) if errs else "none"))
    return "\n".join(lines)
