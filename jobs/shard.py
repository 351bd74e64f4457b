"""Pack a folder of images into WebDataset tar shards: PREFIX-00000.tar, PREFIX-00001.tar, ...

Image bytes are stored unchanged; ``--labels`` (a file,label CSV) adds ``<key>.cls`` members.
"""
from __future__ import annotations

#: Runs no pipeline: Beam options are errors here, and no Dask cluster is started for them.
PIPELINE = False
HELP = "pack a folder of images into WebDataset shards"


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, help="folder of images (any fsspec URL)")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="shard path prefix")
    parser.add_argument("--per-shard", type=int, default=1000, help="images per shard (default: 1000)")
    parser.add_argument("--labels", metavar="CSV", help="file,label CSV")


def run(args, beam_argv) -> int:
    if beam_argv:
        raise ValueError(f"unrecognized arguments: {' '.join(beam_argv)}")
    from pipeline.pack import pack_folder

    paths = pack_folder(args.input, args.output, args.per_shard, args.labels)
    print(f"wrote {len(paths)} shards: {paths[0]} .. {paths[-1]}")
    return 0
