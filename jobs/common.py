"""Arguments shared by the jobs, and turning them into configs and Beam options."""
from __future__ import annotations

import argparse
import errno
import logging
import sys

#: Exit status of a run that wrote its outputs (``_SUCCESS`` included) but processed no input:
#: every input failed and is reported in OUT/errors. (2: configuration errors, 3: nightly regressions.)
NOTHING_PROCESSED = 4


def pipeline_options(beam_argv: list[str]):
    """Beam options from the arguments a job did not take (see pipeline.runners)."""
    from pipeline.runners import pipeline_options as build

    return build(beam_argv)


def nothing_processed(summary: dict, output: str) -> str | None:
    """The one-line complaint about a run (its summary.json content) that processed no input, or None."""
    if summary.get("samples", 0) > 0:
        return None
    errors = sum(summary.get("errors", {}).values())
    if not errors:
        return "no input was processed: the inputs hold no images (no samples, no errors)"
    return f"no input was processed: {errors} error{'s' if errors != 1 else ''} (see {output.rstrip('/')}/errors)"


def finish_run(job: str, summary: dict | None, output: str) -> int:
    """Print a finished run's table and output; the exit status (NOTHING_PROCESSED, or 0).
    ``summary`` None: the job was only submitted (a Flex Template launch), 0."""
    from pipeline.summary import format_table

    if summary is None:
        print(f"submitted: the job writes {output} when it runs")
        return 0
    print(format_table(summary))
    print(f"wrote {output}")
    problem = nothing_processed(summary, output)
    if problem:
        print(f"semjpeg {job}: error: {problem}", file=sys.stderr, flush=True)
        return NOTHING_PROCESSED
    return 0


def add_input_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("input")
    g.add_argument("--input", action="append", required=required, metavar="PATH",
                   help="WebDataset tar(s), Parquet file(s) or a folder; globs and fsspec URLs; repeatable")
    g.add_argument("--input-format", default="auto", choices=["auto", "webdataset", "parquet", "folder"])
    g.add_argument("--image-column", default="image", help="Parquet column with image bytes")
    g.add_argument("--key-column", help="Parquet column with keys; must exist when given "
                   "(default: the 'key' column if there is one, else generated keys)")
    g.add_argument("--label-column", help="Parquet column with labels; must exist when given "
                   "(default: the 'label' column if there is one)")
    g.add_argument("--labels", metavar="CSV",
                   help="file,label CSV for folder inputs (an error with tar/Parquet inputs)")
    g.add_argument("--folder-shard-size", type=int, default=1000, help="files per unit of work for folders (default: 1000)")
    g.add_argument("--resize", type=int, default=None, help="shorter side before cropping (default: the model's)")
    g.add_argument("--crop", type=int, default=None,
                   help="center crop size (default: the model's); 0: every image at its own size (no attacks)")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="decompression-bomb limit in pixels (default: Pillow's, 89,478,485)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="efficientnet_lite0",
                   help="efficientnet_lite0|1|2, a torchvision classification model name (with --weights), or "
                        "package.module:factory (a callable returning a transforms.models.Classifier)")
    g.add_argument("--weights", help="state dict path or fsspec URL (required for torchvision models)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--batch-size", type=int, default=16, help="images per model batch (default: 16)")
    g.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads per worker")
    # transforms.models.MEMORY_FORMATS, written out: importing it here would load torch for --help.
    g.add_argument("--memory-format", choices=["auto", "contiguous", "channels_last"], default="auto",
                   help="the models' memory layout (default auto: channels_last on the CPU, about 1.2-1.6x "
                        "faster there; contiguous elsewhere); results differ only by rounding")
    g.add_argument("--seed", type=int, default=0,
                   help="run seed (default: 0): the same seed and --run-id give the same shards, byte for byte, "
                        "wherever the data is stored, on the same runner, batch size and device (the metadata's "
                        "timings and summary.json's creation time differ)")
    g.add_argument("--map-model", help="model for saliency maps (default: --model)")
    g.add_argument("--map-weights", help="state dict for --map-model")
    # pipeline.config.MAP_PRECISIONS, written out: importing it here would load torch for --help.
    g.add_argument("--map-precision", choices=["fp32", "bf16"], default="fp32",
                   help="saliency maps in float32 (default) or bfloat16 autocast + channels_last (for GPUs: "
                        "about 1.7x faster on an H100; maps differ slightly)")
    g.add_argument("--map-compile", action="store_true",
                   help="torch.compile the map model's passes without activation noise (msroi, aug_msroi_gated "
                        "and its JPEG check; not aug_msroi's noisy passes): gated maps 1.8x faster on an H100, "
                        "about 1.2x on a CPU, after a first compile of seconds to a minute per worker process; "
                        "maps differ by rounding only")


def input_config(args):
    from pipeline.config import InputConfig
    from transforms.models import model_info

    info = model_info(args.model)
    return InputConfig(
        paths=tuple(args.input), format=args.input_format, image_column=args.image_column,
        key_column=args.key_column, label_column=args.label_column, labels_csv=args.labels,
        folder_shard_size=args.folder_shard_size,
        resize=(0 if args.crop == 0 else info.resize) if args.resize is None else args.resize,
        crop=info.input_size if args.crop is None else args.crop,
        **({} if args.max_pixels is None else {"max_pixels": args.max_pixels}),
    )


def model_config(args):
    from pipeline.config import ModelConfig

    return ModelConfig(name=args.model, weights=args.weights, device=args.device,
                       batch_size=args.batch_size, torch_threads=args.torch_threads,
                       memory_format=args.memory_format)


def map_model_config(args):
    """The saliency-map model, or None when it is the classifier."""
    from pipeline.config import ModelConfig

    if not args.map_model and not args.map_weights:
        return None
    return ModelConfig(name=args.map_model or args.model, weights=args.map_weights, device=args.device,
                       batch_size=args.batch_size, torch_threads=args.torch_threads,
                       memory_format=args.memory_format, weights_option="--map-weights")


def exception_chain(e: BaseException | None):
    """``e`` and the exceptions it wraps (Beam re-raises one from inside a stage as a RuntimeError
    caused by it)."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


#: A write that found no room: a full disk, a quota, a file-size limit (``ulimit -f``: Python
#: ignores its SIGXFSZ, so the write fails with EFBIG).
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def no_room(e: BaseException | None) -> OSError | None:
    """The OSError of a write that found no room, in ``e`` or what it wraps; None if there is none."""
    return next((c for c in exception_chain(e) if isinstance(c, OSError) and c.errno in NO_ROOM), None)


class DropInterruptTracebacks(logging.Filter):
    """Beam logs every exception out of a DoFn with its traceback, Ctrl-C and SIGTERM included;
    the command says in one line that it was interrupted (jobs.__main__.cli), or that a write
    found no room (jobs.__main__.main)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "apache_beam.runners.common":
            return True
        text = record.getMessage()
        return not (text.startswith("KeyboardInterrupt") or "Terminated [while running" in text
                    or (record.exc_info is not None and no_room(record.exc_info[1]) is not None))


def setup_logging(verbose: bool) -> None:
    from pipeline.dask_cluster import DropImportNoise

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for h in logging.getLogger().handlers:
        h.addFilter(DropImportNoise())
        h.addFilter(DropInterruptTracebacks())
    # Beam notes every string type hint it cannot resolve at INFO (dozens of lines per job).
    logging.getLogger("apache_beam.typehints.native_type_compatibility").setLevel(logging.WARNING)
