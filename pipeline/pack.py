"""Packing a folder of images into WebDataset tar shards (``semjpeg shard``), without torch or Beam.

The original bytes are stored unchanged as ``<key>.<ext>``, with ``<key>.cls`` when a labels
CSV names the file and ``<key>.json`` holding the original file name. Keys are the relative
paths without extension, dots replaced (WebDataset splits key and extension at the first dot).
"""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
import posixpath
import re

from fsspec.core import url_to_fs

from .io import (NotReadable, check_labels_match, check_output_file, file_key, file_label, input_fs, join,
                 list_images, printable, read_file, read_labels_csv, tar_bytes, write_bytes)

log = logging.getLogger(__name__)


def pack_folder(folder: str, prefix: str, per_shard: int, labels_csv: str | None = None) -> list[str]:
    """Write ``<prefix>-NNNNN.tar`` shards of ``per_shard`` images each; returns their paths.

    Shards of an earlier pack under the same prefix beyond these are removed (a rerun with
    more images per shard replaces the set). A file that cannot be read (no permission, a broken
    link) is left out and reported, with its reason, in ``<prefix>-errors.csv`` (file, reason),
    which a pack without such files removes. Raises ValueError for an empty folder, one where no
    file can be read, a bad labels CSV, two files giving the same key or a prefix where no file
    can be written.
    """
    if per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
    files = list_images(folder)
    if not files:
        raise ValueError(f"no images in folder {folder}")
    labels = read_labels_csv(labels_csv) if labels_csv else {}
    if labels_csv:
        check_labels_match(labels_csv, labels, files)
    check_output_file(f"{prefix}-{0:05d}.tar")
    keys: dict[str, str] = {}
    for rel in files:
        key = file_key(rel)
        if key in keys:
            raise ValueError(f"{keys[key]!r} and {rel!r} would both have the key {key!r}")
        keys[key] = rel
    paths: list[str] = []
    errors: list[tuple[str, str]] = []  # (file, reason)
    fs, root = input_fs(folder)  # files by name on the folder's filesystem: "a::b.jpg" is no chained URL
    members: list[tuple[str, bytes]] = []
    samples = 0
    for key, rel in sorted(keys.items()):
        try:
            data = read_file(fs, join(root, rel))
        except (OSError, NotReadable) as e:  # no permission, a broken link, gone since the listing, a FIFO
            log.warning("%s: cannot read %s, left out: %s", folder, rel, e)
            errors.append((printable(rel), str(e) if isinstance(e, NotReadable) else
                           f"{type(e).__name__}: {e.strerror or e}"))
            continue
        ext = rel.rsplit(".", 1)[1].lower()
        members.append((f"{key}.{ext}", data))
        label = file_label(labels, rel)
        if label is not None:
            members.append((f"{key}.cls", label.strip().encode()))
        members.append((f"{key}.json", json.dumps({"file": printable(rel)}).encode()))
        samples += 1
        if samples == per_shard:
            paths.append(_write_shard(prefix, len(paths), members, samples))
            members, samples = [], 0
    if samples:
        paths.append(_write_shard(prefix, len(paths), members, samples))
    _write_errors(prefix, errors)
    if not paths:
        raise ValueError(f"no image in folder {folder} could be read ({len(errors)} unreadable: "
                         f"see {errors_path(prefix)})")
    _remove_stale(prefix, len(paths))
    return paths


def _write_shard(prefix: str, index: int, members: list[tuple[str, bytes]], samples: int) -> str:
    path = f"{prefix}-{index:05d}.tar"
    write_bytes(path, tar_bytes(members))
    log.info("wrote %s (%d samples)", path, samples)
    return path


def errors_path(prefix: str) -> str:
    """Where a pack under ``prefix`` lists the files it could not read."""
    return f"{prefix}-errors.csv"


def _write_errors(prefix: str, errors: list[tuple[str, str]]) -> None:
    """``<prefix>-errors.csv`` (file, reason) for the files left out; an earlier pack's is removed
    when there are none."""
    path = errors_path(prefix)
    if errors:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["file", "reason"])
        writer.writerows(errors)
        write_bytes(path, out.getvalue().encode())
        log.warning("%d unreadable file(s) left out: see %s", len(errors), path)
        return
    fs, p = url_to_fs(path)
    if fs.exists(p):
        fs.rm(p)


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
