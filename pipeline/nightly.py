"""`semjpeg nightly`: one night's evaluation, its history and regression check, and its report.

The configuration is YAML, validated key by key: unknown keys and wrong types are errors that
name the key, the expected type and the value found.

```yaml
input: gs://bucket/shards/*.tar      # a path/glob or a list of them
output: gs://bucket/nightly          # runs go to output/date=YYYY-MM-DD/
history: gs://bucket/nightly-history # Parquet dataset partitioned by date
attacks: [fgsm:eps=4/255, "igsm:eps=4/255,steps=10"]  # quote specs with commas in a flow list
defenses: [aug_msroi, jpeg:match=aug_msroi, jpeg:quality=50]
model: efficientnet_lite0            # or {name:, weights:, device:, batch_size:, torch_threads:, memory_format:}
map_model: null                      # same forms; default: the classifier
map_precision: fp32                  # or bf16: maps under bfloat16 autocast (GPU workers)
map_compile: false                   # true: torch.compile the maps' plain passes (see --map-compile)
runner: DataflowRunner               # FnApiRunner (default), DirectRunner, DaskRunner, ...
runner_options: {project: p, region: us-central1, temp_location: gs://bucket/tmp}
tolerance: {top1: 0.02, psnr: 1.0}     # merged into the defaults below
seed: 0
save_maps: true
report: true
input_options: {format: auto, resize: 256, crop: 224}  # crop 0: images at their own size (no attacks)
```

``runner`` is checked with the rest: a Beam runner name, ``DaskRunner``, or the dotted path of a
PipelineRunner subclass. ``tolerance`` is merged into the defaults (top1 0.02, agree_clean 0.02,
psnr 0.5, ssim 0.01, n 0.1): the keys given replace those defaults, ``null`` turns a metric's
check off, and bytes, bpp and success are checked only when given. Each tolerance is how much a
metric may get worse than the previous night, absolute, except ``n`` (images evaluated per
attack x defense), a fraction of the previous night's n.

Alarms (exit status 3, each named on stderr and in the report): a night with no results at all
(every input failed, or none was found); an (attack, defense) pair that had results the previous
night and has none (unless the configuration no longer asks for it); a metric worse beyond
tolerance. The previous night is the latest earlier
night *with results*: a night without any is kept in the history but is never the baseline, so
the night after it is compared with the last good night.

Pairs are matched between nights by their specs' identity (``config.spec_key``), not their text:
``jpeg:quality=050`` tonight is last night's ``jpeg:quality=50``.

The history location is checked writable before any work, like the output; it must not be the
output or lie inside it (nor the other way round). Once the night's output is committed, a
first Ctrl-C or SIGTERM waits until the history, ``nightly.json`` and the report are written
(``signals.defer_interrupts``).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import fsspec
import yaml
from apache_beam.metrics import Metrics

from .config import EvaluateConfig, InputConfig, ModelConfig, check_map_precision, parse_attacks, parse_defenses
from .history import (METRICS, ModelChange, check_night, check_writable, compare, configured_pairs, history_rows,
                      read_history, write_partition)
from .io import input_fs, is_within, join, write_bytes
from .runners import check_runner, pipeline_options
from .signals import defer_interrupts

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = {"top1": 0.02, "agree_clean": 0.02, "psnr": 0.5, "ssim": 0.01, "n": 0.1}
MODEL_KEYS = {"name": str, "weights": str, "device": str, "batch_size": int, "torch_threads": int,
              "memory_format": str}
INPUT_KEYS = {"format": str, "image_column": str, "key_column": str, "label_column": str, "labels": str,
              "folder_shard_size": int, "resize": int, "crop": int, "max_pixels": int}


def _type_name(t) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", float: "a number"}.get(t, str(t))


def _check(where: str, value: Any, t) -> Any:
    if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float's range is inf, as 1e400 is
            return math.inf if value > 0 else -math.inf
    if t is int and isinstance(value, bool):
        raise ValueError(f"{where} must be {_type_name(t)}, got {value!r}")
    if not isinstance(value, t):
        raise ValueError(f"{where} must be {_type_name(t)}, got {type(value).__name__} {value!r}")
    return value


def _strings(where: str, value: Any, *, single_ok: bool) -> tuple[str, ...]:
    if single_ok and isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a list of strings{' or a string' if single_ok else ''}, got {value!r}")
    return tuple(value)


def _mapping(where: str, value: Any, keys: dict[str, type]) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
    out = {}
    for k, v in value.items():
        if k not in keys:  # "FILE: unknown key a.b", as for a top-level key
            source, _, path = where.rpartition(": ")
            raise ValueError(f"{source + ': ' if source else ''}unknown key {path}.{k}; valid: {', '.join(keys)}")
        out[k] = None if v is None else _check(f"{where}.{k}", v, keys[k])
    return out


_TOLERANCE_KEYS = {m: float for m in METRICS}


def check_tolerance(where: str, value: Any) -> dict[str, float]:
    """``value`` as a tolerance: a mapping of METRICS names to finite numbers >= 0, ``null``
    leaving a metric unchecked (and out of the result); ValueError naming the key and the value
    otherwise (``where``: ``FILE: tolerance``). A NaN tolerance would pass every night."""
    tol = _mapping(where, value, _TOLERANCE_KEYS)
    for m, v in tol.items():
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{where}.{m} must be a finite number >= 0 or null, got {v!r}")
    return {m: v for m, v in tol.items() if v is not None}


def _location(where: str, value: Any) -> str:
    value = _check(where, value, str)
    if not value.strip():
        raise ValueError(f"{where} must not be empty, got {value!r}")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one
    silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # an unhashable key: the base class names that problem
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                            key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads exponents without a dot or a signed exponent, 1e-2 or 5e3, as text,
# and a tolerance written so was refused as "got str": numbers read as YAML 1.2 reads them.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml_error(e: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own message spans lines and quotes the text)."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return " ".join(str(e).split())
    what = "; ".join(" ".join(t.split()) for t in (e.context, e.problem) if t)
    mark = e.problem_mark or e.context_mark
    return what + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")


def _model(where: str, value: Any) -> ModelConfig | None:
    if value is None:
        return None
    option = f"{where}.weights"
    if isinstance(value, str):
        return ModelConfig(name=value, weights_option=option)
    return ModelConfig(**{k: v for k, v in _mapping(where, value, MODEL_KEYS).items() if v is not None},
                       weights_option=option)


@dataclass(frozen=True)
class NightlyConfig:
    """A validated nightly configuration (see the module docstring for the YAML form)."""

    input: tuple[str, ...]
    output: str
    history: str
    attacks: tuple[str, ...] = ()
    defenses: tuple[str, ...] = ("aug_msroi", "jpeg:match=aug_msroi")
    model: ModelConfig = field(default_factory=ModelConfig)
    map_model: ModelConfig | None = None
    map_precision: str = "fp32"
    map_compile: bool = False
    runner: str = "FnApiRunner"
    runner_options: dict = field(default_factory=dict)
    tolerance: dict = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    seed: int = 0
    save_maps: bool = True
    report: bool = True
    input_options: dict = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, text: str, source: str = "config") -> "NightlyConfig":
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ValueError(f"{source} is not valid YAML: {_yaml_error(e)}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{source} must be a YAML mapping, got {type(raw).__name__}")
        return cls.from_dict(raw, source)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "NightlyConfig":
        known = {"input", "output", "history", "attacks", "defenses", "model", "map_model", "map_precision",
                 "map_compile", "runner", "runner_options", "tolerance", "seed", "save_maps", "report",
                 "input_options"}
        for k in raw:
            if k not in known:
                raise ValueError(f"{source}: unknown key {k!r}; valid: {', '.join(sorted(known))}")
        for k in ("input", "output", "history"):
            if raw.get(k) is None:
                raise ValueError(f"{source}: {k!r} is required")
        kw: dict[str, Any] = {
            "input": _strings(f"{source}: input", raw["input"], single_ok=True),
            "output": _location(f"{source}: output", raw["output"]),
            "history": _location(f"{source}: history", raw["history"]),
        }
        out, hist = kw["output"], kw["history"]
        if is_within(hist, out) or is_within(out, hist):
            raise ValueError(f"{source}: history ({hist}) and output ({out}) must be apart: "
                             "neither the same folder nor one inside the other")
        for k in ("attacks", "defenses"):
            if k in raw:  # null is none; false, 0 or "" are wrong types, not empty lists
                kw[k] = _strings(f"{source}: {k}", [] if raw[k] is None else raw[k], single_ok=False)
        if "model" in raw:
            kw["model"] = _model(f"{source}: model", raw["model"]) or ModelConfig()
        if "map_model" in raw:
            kw["map_model"] = _model(f"{source}: map_model", raw["map_model"])
        if "runner" in raw:
            kw["runner"] = _check(f"{source}: runner", raw["runner"], str)
            try:
                check_runner(kw["runner"])
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
        if raw.get("runner_options") is not None:
            opts = raw["runner_options"]
            if not isinstance(opts, dict):
                raise ValueError(f"{source}: runner_options must be a mapping, got {opts!r}")
            kw["runner_options"] = dict(opts)
        if raw.get("tolerance") is not None:
            where = f"{source}: tolerance"
            given = _mapping(where, raw["tolerance"], _TOLERANCE_KEYS)
            kw["tolerance"] = check_tolerance(where, {**DEFAULT_TOLERANCE, **given})
        for k, t in (("seed", int), ("save_maps", bool), ("report", bool), ("map_precision", str),
                     ("map_compile", bool)):
            if k in raw:
                kw[k] = _check(f"{source}: {k}", raw[k], t)
        if "map_precision" in kw:
            try:
                check_map_precision(kw["map_precision"])
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
        if raw.get("input_options") is not None:
            kw["input_options"] = _mapping(f"{source}: input_options", raw["input_options"], INPUT_KEYS)
        cfg = cls(**kw)
        cfg.evaluate_config("2000-01-01")  # every spec and option checked now, not at night
        try:
            cfg.beam_argv()
        except ValueError as e:
            raise ValueError(f"{source}: runner_options: {e}") from None
        return cfg

    def beam_argv(self) -> list[str]:
        """``runner`` and ``runner_options`` as Beam command-line flags."""
        argv = ["--runner", self.runner]
        for k, v in self.runner_options.items():
            flag = f"--{k}"
            if v is True:
                argv.append(flag)
            elif v is False or v is None:
                continue
            elif isinstance(v, list):
                for item in v:
                    argv += [flag, str(item)]
            else:
                argv += [flag, str(v)]
        pipeline_options(argv)  # unknown options are errors
        return argv

    def run_output(self, date: str) -> str:
        return join(self.output, f"date={date}")

    def evaluate_config(self, date: str) -> EvaluateConfig:
        from transforms.models import model_info

        info = model_info(self.model.name)
        opts = dict(self.input_options)
        labels = opts.pop("labels", None)
        fmt = opts.pop("format", None) or "auto"
        crop, resize = opts.pop("crop", None), opts.pop("resize", None)  # 0 means something: not `or`
        crop = info.input_size if crop is None else crop
        resize = (0 if crop == 0 else info.resize) if resize is None else resize
        inp = InputConfig(paths=self.input, format=fmt, labels_csv=labels, resize=resize, crop=crop,
                          **{k: v for k, v in opts.items() if v is not None})
        return EvaluateConfig(
            input=inp, output=self.run_output(date), model=self.model,
            attacks=parse_attacks(list(self.attacks)), defenses=parse_defenses(list(self.defenses)),
            seed=self.seed, map_model=self.map_model, save_maps=self.save_maps, map_precision=self.map_precision,
            map_compile=self.map_compile,
        )


def parse_date(text: str | None) -> str:
    if text is None:
        return _dt.date.today().isoformat()
    try:
        # fromisoformat alone also takes 20260102 and ISO weeks (2026-W01-1 is 2025-12-29)
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError(text)
        return _dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise ValueError(f"--date must be YYYY-MM-DD, got {text!r}") from None


def load_config(path: str) -> NightlyConfig:
    input_fs(path)  # a missing fsspec backend: one line naming its package
    try:
        with fsspec.open(path, "rt") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"config not found: {path}") from None
    return NightlyConfig.from_yaml(text, source=path)


@dataclass(frozen=True)
class NightlyResult:
    date: str
    output: str
    summary: dict
    previous_date: str | None
    # history.Regression and history.EmptyNight: every alarm of the night, led by a
    # history.ModelChange note when the night compared with had another model
    regressions: tuple
    report: str | None


#: Written into the night's output folder: what the report needs to recompute the alarms.
NIGHTLY_FILE = "nightly.json"


def run_nightly(cfg: NightlyConfig, date: str, extra_beam_argv: list[str] | tuple[str, ...] = ()) -> NightlyResult:
    """Evaluate, compare with the previous night, append to history, write the report.

    ``extra_beam_argv``: Beam options from the command line (a Flex Template launcher passes
    Dataflow's own, ``--region=...``), after the config's, so they win (options that take several
    values, such as ``--experiments``, add to the config's).
    History is checked writable and read (any damage reported) before any work; it is written
    only after the run committed, one partition, atomically.
    """
    from .evaluate import run_evaluate, submit_only

    options = pipeline_options(cfg.beam_argv() + list(extra_beam_argv))  # bad options: before anything
    check_writable(cfg.history)
    check_night(cfg.history, date)
    history = read_history(cfg.history)
    evaluate = cfg.evaluate_config(date)
    if submit_only(options):
        # A Flex Template launch: the job runs after this process exits, so its last stage keeps
        # the books (history, nightly.json, report) once the output is committed.
        run_evaluate(evaluate, options,
                     then=lambda summary: summary | "FinishNight" >> beam.ParDo(FinishNight(cfg, date, evaluate.output)))
        return NightlyResult(date, evaluate.output, None, None, (), None)
    summary = run_evaluate(evaluate, options)
    # The output is committed: an interrupt now would leave a night without its history and
    # report (and its alarms unsaid), so the bookkeeping finishes first.
    try:
        with defer_interrupts("the night's output is written; finishing the night's history and report first"):
            return _bookkeeping(cfg, date, evaluate.output, summary, history)
    except BaseException as e:  # a second interrupt: the output stays, the rest may be missing
        e.semjpeg_written = (f"{evaluate.output} was written, but its history, nightly.json or report may be "
                             "missing (run that date again)")
        raise


class FinishNight(beam.DoFn):
    """The night's bookkeeping as the job's last stage, after its commit, for a job that runs once
    its launcher has exited (a Flex Template launch): the history as it is then, compared,
    appended; nightly.json and the report. Alarms are logged as errors and counted
    (``semjpeg:nightly_alarms``, which Dataflow exports to Cloud Monitoring), since no exit
    status reaches anyone. A retried bundle does it again: every write replaces its file."""

    def __init__(self, cfg: NightlyConfig, date: str, output: str):
        self.cfg, self.date, self.output = cfg, date, output

    def setup(self):
        self.alarms = Metrics.counter("semjpeg", "nightly_alarms")

    def process(self, summary):
        history = read_history(self.cfg.history)
        history.pop(self.date, None)  # a retry finds tonight's partition already written
        result = _bookkeeping(self.cfg, self.date, self.output, summary, history)
        alarms = [r for r in result.regressions if not isinstance(r, ModelChange)]
        for r in result.regressions:
            log.error("%s: %s", "NOTE" if isinstance(r, ModelChange) else "REGRESSION", r.describe())
        self.alarms.inc(len(alarms))
        log.info("night %s: history, nightly.json%s written; %d alarm(s)", self.date,
                 " and report" if result.report else "", len(alarms))
        yield len(alarms)


def _bookkeeping(cfg: NightlyConfig, date: str, output: str, summary: dict, history: dict) -> NightlyResult:
    """After the night's run committed: compare, append the history, write nightly.json and the report."""
    rows = history_rows(summary, date)
    prev, alarms = compare(history, date, rows, cfg.tolerance, summary.get("errors"),
                          configured_pairs(summary))
    regressions = tuple(alarms)
    write_partition(cfg.history, date, rows)
    write_bytes(join(output, NIGHTLY_FILE), json.dumps({
        "date": date, "history": cfg.history, "tolerance": cfg.tolerance, "previous_date": prev,
        "alarms": [a.describe() for a in regressions]}, indent=1).encode())
    report = None
    if cfg.report:
        from .report import write_report

        report = join(output, "report.html")
        # The history as written: the nights read before the run and tonight's (not read again).
        write_report(output, report, history={**history, date: rows}, regressions=regressions)
    return NightlyResult(date, output, summary, prev, regressions, report)
