"""Packing a folder of images into WebDataset tar shards (``semjpeg shard``), without torch or Beam.

The original bytes are stored unchanged as ``<key>.<ext>``, with ``<key>.cls`` when a labels
CSV names the file and ``<key>.json`` holding the original file name. Keys are the relative
paths without extension, dots replaced (WebDataset splits key and extension at the first dot).
"""
from __future__ import annotations

import glob
import json
import logging
import posixpath
import re

from fsspec.core import url_to_fs

from .io import (check_output_file, file_key, input_fs, join, list_images, read_labels_csv, tar_bytes,
                 write_bytes)

log = logging.getLogger(__name__)


def pack_folder(folder: str, prefix: str, per_shard: int, labels_csv: str | None = None) -> list[str]:
    """Write ``<prefix>-NNNNN.tar`` shards of ``per_shard`` images each; returns their paths.

    Shards of an earlier pack under the same prefix beyond these are removed (a rerun with
    more images per shard replaces the set). Raises ValueError for an empty folder, a bad labels
    CSV, two files giving the same key or a prefix where no file can be written.
    """
    if per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
    files = list_images(folder)
    if not files:
        raise ValueError(f"no images in folder {folder}")
    labels = read_labels_csv(labels_csv) if labels_csv else {}
    check_output_file(f"{prefix}-{0:05d}.tar")
    keys: dict[str, str] = {}
    for rel in files:
        key = file_key(rel)
        if key in keys:
            raise ValueError(f"{keys[key]!r} and {rel!r} would both have the key {key!r}")
        keys[key] = rel
    paths = []
    items = sorted(keys.items())
    fs, root = input_fs(folder)  # files by name on the folder's filesystem: "a::b.jpg" is no chained URL
    for s in range(0, len(items), per_shard):
        members = []
        for key, rel in items[s : s + per_shard]:
            ext = rel.rsplit(".", 1)[1].lower()
            members.append((f"{key}.{ext}", fs.cat_file(join(root, rel))))
            label = labels.get(rel, labels.get(rel.rsplit("/", 1)[-1]))
            if label is not None:
                members.append((f"{key}.cls", label.strip().encode()))
            members.append((f"{key}.json", json.dumps({"file": rel}).encode()))
        path = f"{prefix}-{s // per_shard:05d}.tar"
        write_bytes(path, tar_bytes(members))
        paths.append(path)
        log.info("wrote %s (%d samples)", path, len(items[s : s + per_shard]))
    _remove_stale(prefix, len(paths))
    return paths


def _remove_stale(prefix: str, count: int) -> None:
    """Remove ``<prefix>-NNNNN.tar`` shards numbered ``count`` and above: an earlier pack under
    this prefix with more shards left them, and a glob over the prefix would read their images
    twice. Other files are left alone."""
    fs, p = url_to_fs(prefix)
    pattern = re.compile(re.escape(posixpath.basename(p)) + r"-(\d{5})\.tar$")
    stale = [f for f in fs.glob(f"{glob.escape(p)}-*.tar")
             if (m := pattern.match(posixpath.basename(f))) and int(m.group(1)) >= count]
    for f in sorted(stale):
        fs.rm(f)
    if stale:
        log.warning("removed %d shard(s) left under %s by an earlier pack: %s", len(stale), prefix,
                    ", ".join(posixpath.basename(f) for f in sorted(stale)))
