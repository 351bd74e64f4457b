"""The evaluate pipeline, as the diagram reads:

read shards -> decode -> attack -> saliency -> encode -> classify + measure -> write shards + metadata
                                                                            -> summary -> commit
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from transforms.specs import spec_name

from .attack import AttackImages
from .classify import Classify
from .config import EvaluateConfig
from .decode import DecodeImages
from .encode import EncodeDefenses
from .io import OutputDir, input_shards, join, read_bytes, write_bytes
from .progress import CountProgress, ProgressMonitor, is_local, runner_name, summarize_counters
from .read_shards import ReadImageShards
from .records import SourceShard
from .saliency import SaliencyMaps
from .signals import check_interrupted
from .summary import Summarize, software_versions
from .write_metadata import WriteMetadata
from .write_shards import WriteShards, jsonable

log = logging.getLogger(__name__)


class _Finalize(beam.DoFn):
    """Runs once, after every output is written: summary.json, then the commit (OutputDir.commit:
    the output replaced as a whole, ``_SUCCESS`` last)."""

    def __init__(self, out: OutputDir, config: EvaluateConfig, n_sources: int):
        self.out = out
        self.config = config
        self.n_sources = n_sources

    def process(self, _, parts):
        if self.out.committed():
            # A retry of this bundle (Dataflow's) after a failure that came once the commit had
            # written _SUCCESS: the run is done; what that commit left (the previous output aside)
            # goes, and a new staging folder, a new summary or a second commit are not made.
            log.warning("run %s: %s is already committed; finishing its commit", self.config.run_id, self.out.final)
            self.out.abandon()
            yield json.loads(read_bytes(join(self.out.target, "summary.json")))
            return
        table = [v for tag, v in parts if tag == "table"]
        error_counts = [v for tag, v in parts if tag == "errors"]
        written = [v for tag, v in parts if tag == "written"]
        inputs = sum(v for tag, v in parts if tag == "inputs")
        order = {(a.text, d.text): i for i, (a, d) in
                 enumerate((a, d) for a in self.config.attacks for d in self.config.defenses)}
        rows = sorted(table, key=lambda kv: order.get(kv[0], 1 << 30))
        summary = {
            "run_id": self.config.run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": self.config.describe(),
            "versions": software_versions(),
            "sources": self.n_sources,
            "samples": inputs,
            "errors": dict(sorted(error_counts)),
            "files_written": len(written),
            "table": [
                {"attack_spec": a, "defense_spec": d, "attack": spec_name(a), "defense": spec_name(d), **stats}
                for (a, d), stats in rows
            ],
        }
        path = self.out.path("summary.json")
        write_bytes(path, json.dumps(jsonable(summary), indent=1).encode())
        self.out.commit(written + [path])
        yield summary


def _count(pcoll, label: str, folder: str | None, stage: str):
    if folder is None:
        return pcoll
    return pcoll | label >> beam.ParDo(CountProgress(folder, stage))


def build_evaluate(p: beam.Pipeline, config: EvaluateConfig, shards: list[SourceShard], out: OutputDir,
                   progress: str | None = None):
    """Add the whole evaluate graph to ``p``; returns the PCollection holding the summary.

    ``progress``: a local folder for per-process progress counts (local runners only)."""
    order = {(a.text, d.text): i for i, (a, d) in
             enumerate((a, d) for a in config.attacks for d in config.defenses)}
    raw, read_errors = p | "ReadImageShards" >> ReadImageShards(shards, config.input)
    samples, decode_errors = raw | "DecodeImages" >> DecodeImages(config.input, config.model.num_classes)
    samples = _count(samples, "CountDecoded", progress, "decoded")
    variants, attack_errors = samples | "AttackImages" >> AttackImages(
        config.model, config.attacks, seed=config.seed, attack_labels=config.attack_labels, native=config.native
    )
    variants = _count(variants, "CountAttacked", progress, "attacked")
    mapped, map_errors = variants | "SaliencyMaps" >> SaliencyMaps(
        config.maps, config.defenses, seed=config.seed, native=config.native, precision=config.map_precision,
        compile=config.map_compile,
    )
    defended, encode_errors = mapped | "EncodeSemanticJpeg" >> EncodeDefenses(
        config.defenses, map_model=config.maps.name, save_maps=config.save_maps
    )
    results, classify_errors = defended | "Classify" >> Classify(
        config.model, run_id=config.run_id, native=config.native
    )
    results = _count(results, "CountClassified", progress, "classified")
    errors = (
        (read_errors, decode_errors, attack_errors, map_errors, encode_errors, classify_errors)
        | "AllErrors" >> beam.Flatten()
    )
    errors = _count(errors, "CountErrors", progress, "errors")

    shard_paths = results | "WriteShards" >> WriteShards(out, config.layout)
    sources = p | "Sources" >> beam.Create(shards)
    part_paths = (results, errors, sources) | "WriteMetadata" >> WriteMetadata(out, config.run_id, order)
    table, error_counts = (results, errors) | "Summarize" >> Summarize()
    written = (shard_paths, part_paths) | "Written" >> beam.Flatten()
    # The inputs with a row, as the stats files count them: not the clean, undefended rows,
    # which miss an input whose PNG or whose classification failed. Without defaults: a
    # default for an empty run would take a side input of its own.
    inputs = (
        results
        | "InputOfRow" >> beam.Map(lambda r: (r.source_index, r.key))
        | "DistinctInputs" >> beam.Distinct()
        | "CountInputs" >> beam.CombineGlobally(beam.combiners.CountCombineFn()).without_defaults()
    )
    # One side input, not three: Beam's Dask runner computes each side input separately, and
    # three would run the whole pipeline three times.
    parts = (
        table | "TagTable" >> beam.Map(lambda kv: ("table", kv)),
        error_counts | "TagErrorCounts" >> beam.Map(lambda kv: ("errors", kv)),
        written | "TagWritten" >> beam.Map(lambda path: ("written", path)),
        inputs | "TagInputs" >> beam.Map(lambda n: ("inputs", n)),
    ) | "Gather" >> beam.Flatten()
    return (
        p
        | "Once" >> beam.Create([None])
        | "Finalize" >> beam.ParDo(_Finalize(out, config, len(shards)), beam.pvalue.AsList(parts))
    )


def check_models(config: EvaluateConfig, *, devices_here: bool = False) -> list:
    """Load the classifier, and the map model where the defenses need maps and it is another
    model, once before the run (model_handlers.check_model): a model that cannot load is one
    line before any work, not a traceback from every worker. ``devices_here``: the run's workers
    are processes of this machine, so a CUDA device it lacks is an error too. Returns the models
    loaded on the CPU (the classifier), which the stages of an in-process run reuse while the
    caller holds them."""
    from .model_handlers import check_device, check_model
    from .saliency import map_requests

    needs_maps = bool(map_requests(config.defenses))
    separate = needs_maps and config.maps != config.model
    if devices_here:
        check_device(config.model.device)
        if separate:
            check_device(config.maps.device)
    model = check_model(config.model, maps=needs_maps and not separate)
    if separate:  # checked, not kept: the map stage always builds its own (it hooks noise into it)
        check_model(config.maps, maps=True, role="map model")
    return [] if model is None else [model]


def _devices_here(options: PipelineOptions) -> bool:
    """Whether the run's stages run in processes of this machine (the FnApiRunner and the
    DirectRunner; a Dask cluster may be elsewhere, Dataflow is)."""
    runner = options.view_as(StandardOptions).runner
    return is_local(runner) and runner_name(runner) != "DaskRunner"


def _in_process(options: PipelineOptions) -> bool:
    """Whether the pipeline's stages run in this process (the FnApiRunner or the DirectRunner,
    with ``--direct_running_mode in_memory``, the default), so a model this process holds is the
    one they use."""
    mode = options.get_all_options().get("direct_running_mode") or "in_memory"
    name = runner_name(options.view_as(StandardOptions).runner)
    return name in ("FnApiRunner", "DirectRunner", "SwitchingDirectRunner") and mode == "in_memory"


def submit_only(options: PipelineOptions) -> bool:
    """Whether running the pipeline only records the job, which starts after this process exits
    (a Dataflow Flex Template launch, ``--template_location``): nothing can be waited for or
    read back then."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    return bool(options.view_as(GoogleCloudOptions).template_location)


def run_evaluate(config: EvaluateConfig, options: PipelineOptions,
                 then: Callable[[beam.PCollection], object] | None = None) -> dict | None:
    """Check inputs and output, run the pipeline to completion, return summary.json's content;
    None when the job is only submitted (:func:`submit_only`): it writes its output when it runs.

    ``then`` adds stages after the commit, given the PCollection of the summary (the nightly
    job's bookkeeping, where it cannot wait for the job).
    Configuration problems raise ValueError before any work starts; a failed run removes its
    staging folder and leaves the previous output untouched.
    """
    shards = input_shards(config.input)
    out = OutputDir(config.output, config.run_id)
    reads = [s.path for s in shards] + [config.input.labels_csv, config.model.weights, config.maps.weights]
    out.check(reads=[r for r in reads if r])  # creates the staging folder: removed however the run ends
    try:
        checked = check_models(config, devices_here=_devices_here(options))
        if not _in_process(options):
            checked.clear()  # the workers load their own; this process need not keep a copy
        log.info("run %s: %d source shards -> %s", config.run_id, len(shards), config.output)
        runner = options.view_as(StandardOptions).runner
        monitor = ProgressMonitor(len(config.attacks) * len(config.defenses)) if is_local(runner) else None
        p = beam.Pipeline(options=options)
        summary = build_evaluate(p, config, shards, out, progress=monitor.folder if monitor else None)
        if then is not None:
            then(summary)
        check_interrupted()  # a Ctrl-C or SIGTERM that an import swallowed stops the job here
        with monitor or contextlib.nullcontext():
            result = p.run()
            if submit_only(options):
                # The job is recorded, to run once this process exits (Beam 2.77 reports it done):
                # its staging folder is where its workers write.
                log.info("run %s: job submitted; it writes %s when it runs", config.run_id, config.output)
                return None
            result.wait_until_finish()
    except BaseException as e:
        out.abandon()
        if not out.committed():
            raise
        # The last stage had committed the output when this came (an interrupt, say): the run
        # is complete, and saying otherwise would be wrong.
        log.warning("%s after the output was committed: the run is complete", type(e).__name__)
        result = None
    del checked  # held until the run ended, for its stages to share
    counters = summarize_counters(result) if result is not None else None
    if counters:
        log.info("counters: %s", counters)
    return json.loads(read_bytes(join(config.output, "summary.json")))
