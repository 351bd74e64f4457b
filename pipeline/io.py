"""Filesystem edges, all through fsspec: input discovery, shard names, atomic writes, staging.

A job writes everything under a staging folder beside its output and, once the whole run is
written, replaces the output folder with it (one rename each way on a local disk; on an object
store, where a move copies each object and then deletes it, the output is missing or partial
while it is replaced, but never beside a ``_SUCCESS``); ``_SUCCESS`` comes last. A rerun into the
same output therefore replaces it as a whole and never leaves a mix of two runs.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import posixpath
import re
import secrets
import tarfile
import unicodedata

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .records import SourceShard

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm", "jp2", "jfif", "avif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
PARQUET_SUFFIXES = (".parquet", ".pq")
SUCCESS = "_SUCCESS"


def shard_name(index: int) -> str:
    """The one place shard file names come from."""
    return f"shard-{index:05d}.tar"


def part_name(index: int, ext: str) -> str:
    return f"part-{index:05d}.{ext}"


def join(base: str, *parts: str) -> str:
    """Join URL/path segments with ``/`` (fsspec paths are posix-like everywhere)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _unstrip(fs, path: str, original: str) -> str:
    """fsspec strips protocols from listed paths; put the original one back (none for local),
    with the rest of a chained URL: ``zip://inner/*.tar::data.zip`` lists ``inner/a.tar``, which is
    ``zip://inner/a.tar::data.zip``, and ``simplecache::gs://b/*.tar`` keeps its cache (unstripped
    alone, the first lost its archive and the second its cache)."""
    if "::" in original:
        head, tail = original.split("::", 1)
        if "://" in head and split_protocol(head)[1]:  # the path is the outermost layer's
            return f"{split_protocol(head)[0]}://{path}::{tail}"
        inner_fs, _ = url_to_fs(tail)  # a layer without a path (simplecache): the path is the next one's
        return f"{head}::{_unstrip(inner_fs, path, tail)}"
    if isinstance(fs, LocalFileSystem) and "://" not in original:
        return path
    return fs.unstrip_protocol(path)


def _format_of(path: str, is_dir: bool) -> str | None:
    low = path.lower()
    if is_dir:
        return "folder"
    if low.endswith(TAR_SUFFIXES):
        return "webdataset"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def input_fs(path: str, verb: str = "read"):
    """``url_to_fs`` for an input (``verb="write"``: an output); a missing fsspec backend (s3fs,
    gcsfs, ...) is a ValueError naming the package, not an ImportError traceback."""
    if not path or not path.strip():
        raise ValueError(f"empty {'input' if verb == 'read' else 'output'} path")
    try:
        return url_to_fs(path)
    except ImportError as e:
        raise ValueError(f"cannot {verb} {path}: {e}") from None


def expand_inputs(paths: tuple[str, ...], fmt: str = "auto", folder_shard_size: int = 1000) -> list[SourceShard]:
    """Expand globs, files and folders into numbered source shards (sorted, deterministic).

    An existing path is taken literally even if it holds glob characters (a folder ``set[1]``).
    A path reached twice (the same input given twice, or also through a glob) is read once, and so
    is an image in two folders given (one inside the other).
    Raises ValueError naming the first input that matches nothing or whose format is unknown.
    """
    found: list[tuple[str, str]] = []  # (path, format)
    seen: dict[str, str] = {}  # resolved path -> the input that first gave it
    for raw in paths:
        fs, p = input_fs(raw)
        if fs.exists(p):
            matches = [p]
        elif any(c in p for c in "*?["):
            matches = sorted(fs.glob(p))
            if not matches:
                raise ValueError(f"no input matches {raw}")
        else:
            raise ValueError(f"input not found: {raw}")
        for m in matches:
            is_dir = fs.isdir(m)
            f = fmt if fmt != "auto" else _format_of(m, is_dir)
            if f is None:
                raise ValueError(f"cannot tell the format of {m!r}; pass --input-format")
            if f == "folder" and not is_dir:
                raise ValueError(f"--input-format folder needs a folder, got the file {m!r}")
            if f != "folder" and is_dir:
                raise ValueError(f"--input-format {f} needs files, got the folder {m!r} (a glob names its files)")
            path = _unstrip(fs, m, raw)
            if isinstance(fs, LocalFileSystem):
                # "a//b", "a/./b", "file://a/b" and a symbolic link name the same file; object
                # stores' keys are literal ("gs://b/a//b" is not "gs://b/a/b").
                same = os.path.realpath(m)
                if "://" not in path:
                    path = os.path.normpath(path)
            else:
                same = path
            if same in seen:
                log.warning("input %s: %s was already given by %s; reading it once", raw, path, seen[same])
                continue
            seen[same] = raw
            found.append((path, f))
    shards: list[SourceShard] = []
    # A folder inside another (``a`` and ``a/sub``) lists the same files: each is read once.
    nested = sum(f == "folder" for _, f in found) > 1
    listed: dict[tuple[str, str], str] = {}  # an image file, located (_location) -> the folder listing it first
    for path, f in found:
        if f != "folder":
            shards.append(SourceShard(len(shards), path, f))
            continue
        files = list_images(path)
        if not files:
            raise ValueError(f"no images in folder {path}")
        if nested:
            protocol, base = _location(path)
            fresh = [rel for rel in files if listed.setdefault((protocol, f"{base}/{rel}"), path) == path]
            if len(fresh) < len(files):
                log.warning("input %s: %d of its images are in a folder given before; reading them once",
                            path, len(files) - len(fresh))
            files = fresh
        for chunk in _folder_chunks(files, folder_shard_size):
            shards.append(SourceShard(len(shards), path, "folder", chunk))
    return shards


def _folder_chunks(files: list[str], size: int) -> list[tuple[str, ...]]:
    """A folder's files in chunks of ``size``, in order, except that a file whose key an earlier
    file already gave (``a.b.jpg`` and ``a_b.png`` are both ``a_b``) joins that file's chunk, where
    the reader reports it; in another chunk both were read, two rows with one key and source."""
    chunks: list[list[str]] = []
    chunk_of: dict[str, int] = {}
    for rel in files:
        key = file_key(rel)
        if key in chunk_of:
            chunks[chunk_of[key]].append(rel)
            continue
        if not chunks or len(chunks[-1]) >= size:
            chunks.append([])
        chunks[-1].append(rel)
        chunk_of[key] = len(chunks) - 1
    return [tuple(c) for c in chunks]


def input_shards(config) -> list[SourceShard]:
    """An :class:`~pipeline.config.InputConfig`'s source shards, checked before any work: inputs
    exist, a labels CSV is readable and only comes with folder inputs (tar samples carry ``.cls``
    members and Parquet rows a label column, so a CSV would silently be ignored for them)."""
    shards = expand_inputs(config.paths, config.format, config.folder_shard_size)
    if config.labels_csv:
        other = next((s for s in shards if s.format != "folder"), None)
        if other is not None:
            what, where = (("a WebDataset tar", "its .cls members") if other.format == "webdataset"
                           else ("a Parquet file", "its label column"))
            raise ValueError(f"--labels applies to folder inputs only; {other.path} is {what} "
                             f"(its labels come from {where})")
        check_labels_match(config.labels_csv, read_labels_csv(config.labels_csv),
                           [f for s in shards for f in s.files])
    return shards


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, through linked folders), as sorted paths relative to it.

    Raises ValueError when ``folder`` does not exist or is not a folder."""
    fs, root = input_fs(folder)
    if not fs.exists(root):
        raise ValueError(f"input not found: {folder}")
    if not fs.isdir(root):
        raise ValueError(f"not a folder: {folder}")
    root = root.rstrip("/")
    out = []
    # fsspec's find does not enter linked folders (symbolic links): each is listed on its own,
    # unless it leads into or above a folder listed already (read once; a link up would loop).
    folders, entered = [root], []
    while folders:
        top = folders.pop(0)
        real = os.path.realpath(top) if isinstance(fs, LocalFileSystem) else top
        if any(is_within(real, e) or is_within(e, real) for e in entered):
            log.warning("%s: not listing %s, a link to a folder already listed or holding one", folder, top)
            continue
        entered.append(real)
        for p, info in fs.find(top, withdirs=True, detail=True).items():
            if info["type"] == "directory":
                continue
            if info.get("islink") and fs.isdir(p):
                folders.append(p)
                continue
            ext = p.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(p) else ""
            if ext in IMAGE_EXTS:
                out.append(p[len(root) + 1 :])
    return sorted(out)


class NotReadable(ValueError):
    """A file :func:`read_file` leaves unread on purpose; the message says why."""


class FileTooLarge(NotReadable):
    """A file over :func:`read_file`'s limit."""


def read_file(fs, path: str, limit: int | None = None) -> bytes:
    """``fs.cat_file(path)``, except for what would never end: on a local disk, a path that is not a
    regular file (a FIFO named ``x.jpg`` blocks its reader forever, a link to ``/dev/zero`` never
    ends) raises NotReadable, and a file over ``limit`` bytes FileTooLarge, unread."""
    if isinstance(fs, LocalFileSystem):
        info = fs.info(path)  # a stat; an object store, which has neither, would pay a request
        if info["type"] != "file":
            raise NotReadable("not a regular file (a FIFO, socket or device)")
        if limit is not None and info["size"] > limit:
            raise FileTooLarge(f"the file of {info['size']} bytes is over {limit} bytes")
    if limit is None:
        return fs.cat_file(path)
    data = fs.cat_file(path, start=0, end=limit + 1)  # it may have grown since, or be remote
    if len(data) > limit:
        raise FileTooLarge(f"the file is over {limit} bytes")
    return data


def read_labels_csv(path: str) -> dict[str, str]:
    """``file,label`` CSV (other columns ignored, a UTF-8 byte-order mark allowed) -> {file: label text}.
    A file listed again with the same label is one label; with another it is a ValueError."""
    input_fs(path)
    try:
        with fsspec.open(path, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            if "file" not in cols or "label" not in cols:
                raise ValueError(f"labels CSV {path} needs 'file' and 'label' columns, has {cols}")
            labels: dict[str, str] = {}
            for row in reader:
                file, label = _label_name(row["file"] or ""), row["label"]
                if labels.setdefault(file, label) != label:
                    raise ValueError(f"labels CSV {path} gives {file!r} two labels: {labels[file]!r} and "
                                     f"{label!r} (line {reader.line_num})")
            return labels
    except UnicodeDecodeError as e:
        raise ValueError(f"labels CSV {path} is not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise ValueError(f"labels CSV {path} is not a readable CSV: {e}") from None


def _label_name(name: str) -> str:
    """A file name as a labels CSV and a folder listing are matched: Unicode NFC (a macOS copy of
    a folder spells ``café`` decomposed), without a leading ``./``."""
    name = unicodedata.normalize("NFC", name)
    while name.startswith("./"):
        name = name[2:]
    return name


def file_label(labels: dict[str, str], rel: str) -> str | None:
    """A folder file's label in a :func:`read_labels_csv` mapping: by its path relative to the input
    folder, else by its name; None when the CSV has neither."""
    rel = _label_name(rel)
    return labels.get(rel, labels.get(posixpath.basename(rel)))


def check_labels_match(path: str, labels: dict[str, str], files: list[str]) -> None:
    """A labels CSV that labels none of the inputs' files is a ValueError (another dataset's CSV,
    or paths relative to another folder); some files without a label are a warning."""
    missing = [f for f in files if file_label(labels, f) is None]
    if files and len(missing) == len(files):
        raise ValueError(f"labels CSV {path} gives a label to none of the {len(files)} files (a file is "
                         f"found by its path under its input folder or by its name; {printable(files[0])!r} "
                         f"is not in it)")
    if missing:
        log.warning("labels CSV %s gives no label to %d of %d files (%s, ...): they are unlabelled",
                    path, len(missing), len(files), printable(missing[0]))


_SAFE_KEY = re.compile(r"^[^\x00-\x1f\\]+$")
_NOT_UTF8 = re.compile(r"[\ud800-\udfff]")  # bytes that are not UTF-8, as Python decodes file and member names
_DRIVE = re.compile(r"^[A-Za-z]:")  # "c:x" is a Windows path relative to drive C


def unsafe_name_reason(name: str) -> str | None:
    """Why a member or key name is unsafe to carry into outputs, or None if it is fine."""
    if not name or not _SAFE_KEY.match(name):
        return "empty name or control/backslash characters"
    if _NOT_UTF8.search(name):
        return "not UTF-8 text"
    if name.startswith("/") or _DRIVE.match(name):
        return "absolute path"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "'..', '.' or empty path component"
    return None


# --------------------------------------------------------------------------- writing


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file: to a temporary name, then renamed (atomic on local filesystems;
    object stores publish whole objects anyway)."""
    fs, p = url_to_fs(path)
    parent = posixpath.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{p}.tmp-{secrets.token_hex(4)}"
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, p)
        except BaseException:  # a full disk, an interrupt: no partial file left beside the others
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        with fs.open(p, "wb") as f:
            f.write(data)


def read_bytes(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str) -> None:
    """Run ids name staging folders and partitions: letters, digits, ``.``, ``_``, ``-`` only."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f"run id must be 1-128 letters, digits, '.', '_' or '-' (not starting with one of the last "
            f"three), got {run_id!r}"
        )


_CHAINED = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://[^:]*)?::")  # "simplecache::...", "zip://m.tar::..."


def _location(path: str) -> tuple[str, str]:
    """(protocol, a comparable form of ``path``): local paths absolute with symbolic links
    resolved, URLs as given; a chained URL is its last layer's, the file it reads
    (``simplecache::gs://b/x.tar``, ``zip://x.tar::gs://b/d.zip``). Needs no fsspec backend (a
    ``gs://`` path is compared without gcsfs)."""
    if _CHAINED.match(path):
        path = path.rsplit("::", 1)[1]
    protocol, rest = split_protocol(path)
    if protocol in (None, "file", "local"):
        return "file", os.path.realpath(rest)
    return protocol, rest.rstrip("/")


def is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (paths of one protocol only)."""
    (p_protocol, p), (f_protocol, f) = _location(path), _location(folder)
    return p_protocol == f_protocol and (p == f or p.startswith(f.rstrip("/") + "/"))


def check_output_file(path: str) -> None:
    """Fail early, with one line, when a single output file (a report, a packed shard) cannot be
    created at ``path``: a folder in its place, or a file where its parent folder should be."""
    fs, p = input_fs(path, "write")
    try:
        if fs.isdir(p):
            raise ValueError(f"output {path} is a folder; give a file name")
        parent = posixpath.dirname(p)
        if parent:
            fs.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"output {path} cannot be written: a file stands where a parent folder should be") from None
    except PermissionError:
        raise ValueError(f"output {path} cannot be written: permission denied") from None


#: What a finished semjpeg output holds at its top level (nightly runs add nightly.json and report.html).
OUTPUT_ENTRIES = frozenset({SUCCESS, "summary.json", "shards", "metadata", "errors", "stats", "nightly.json",
                            "report.html"})
_TEMPORARY = re.compile(r"^(.+)\.tmp-[0-9a-f]{8}$")  # write_bytes' name while it writes


def _ours(name: str) -> bool:
    """Whether an output folder's entry is one semjpeg writes, or what a killed write_bytes of
    one left behind."""
    m = _TEMPORARY.match(name)
    return name in OUTPUT_ENTRIES or (m is not None and m.group(1) in OUTPUT_ENTRIES)


def _not_an_output(fs, path: str, entries: list[str]) -> str | None:
    """Why the non-empty folder ``path`` is not a finished semjpeg output holding nothing else
    (None: it is one): its ``_SUCCESS`` must name a run (Spark, Hadoop and Beam outputs have an
    empty one) beside a ``summary.json``, and every top-level entry must be one semjpeg writes."""
    marker = join(path, SUCCESS)
    ours = fs.exists(marker) and fs.exists(join(path, "summary.json"))
    if ours:
        try:
            with fs.open(marker, "rb") as f:
                check_run_id(f.read(200).decode("utf-8").strip())
        except (ValueError, UnicodeDecodeError):
            ours = False
    if not ours:
        return "is not a finished semjpeg output (no _SUCCESS naming a run beside a summary.json)"
    others = sorted(n for n in (posixpath.basename(e.rstrip("/")) for e in entries) if not _ours(n))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return f"holds files semjpeg did not write ({shown})"
    return None


def _check_replaceable(fs, path: str, final: str, entries: list[str]) -> None:
    """Raise ValueError unless the non-empty folder ``path`` may be replaced (_not_an_output):
    replacing it removes everything in it, so anything else there is someone's data."""
    why = _not_an_output(fs, path, entries)
    if why and why.startswith("holds"):
        raise ValueError(f"output {final} {why}; refusing to replace it (move them, or give another --output)")
    if why:
        raise ValueError(f"output {final} exists, is not empty and {why}; refusing to replace it")


def _read_only_folder(fs, path: str) -> str | None:
    """A folder of the local tree ``path`` whose entries cannot be removed (not writable, or
    not listable), or None; other filesystems are not checked. An empty folder needs no rights
    of its own: removing it is its parent's business."""
    if not isinstance(fs, LocalFileSystem):
        return None
    unlisted = []
    for folder, folders, files in os.walk(path, onerror=lambda e: unlisted.append(e.filename)):
        if (folders or files) and not os.access(folder, os.W_OK | os.X_OK):
            return folder
    return unlisted[0] if unlisted else None


class OutputDir:
    """An output folder written through a staging folder and replaced as a whole.

    The staging folder is ``.<name>.staging-<run id>`` beside the output, on the same filesystem
    (for URLs, with the same protocol). Refuses to replace an existing folder that is not empty
    and is not a finished semjpeg output holding only what semjpeg writes (``_check_replaceable``:
    it might be someone's data), a filesystem or bucket root, the current folder or one of its
    parents, and a folder holding something the run reads.
    """

    def __init__(self, final: str, run_id: str):
        check_run_id(run_id)
        self.final = final.rstrip("/") or final
        self.run_id = run_id
        fs, path = input_fs(final, "write")  # not self.final: "memory://" stripped is a local name
        local = isinstance(fs, LocalFileSystem)
        if local:
            # Absolute and normalized now: "a/b/.." must not stage into "a/b/...staging"; and a
            # symbolic link followed, so the output is staged and replaced where it points (the
            # commit renamed the link itself, and wrote a folder in its place).
            path = os.path.realpath(path)
        parent, name = posixpath.split(path.rstrip("/"))
        if not parent or not name:
            raise ValueError(f"output {final} is a filesystem or bucket root; give a folder inside it")
        if not local and any(c in path for c in "*?["):
            # fsspec expands them in a store's listings and removals: the output was not
            # writable, and a rerun failed to remove the previous one after committing
            raise ValueError(f"output {final}: glob characters (*, ?, [) in a URL's path are not supported")
        staging = posixpath.join(parent, f".{name}.staging-{run_id}")
        #: The output and staging folders as this filesystem names them (paths or full URLs).
        self.target = path if local else fs.unstrip_protocol(path)
        self.staging = staging if local else fs.unstrip_protocol(staging)
        self._created: list[str] = []
        #: summary.json of an output that a run with this id had committed before (check): a
        #: rerun with the same --run-id has not committed while that is still the output's.
        self._previous: bytes | None = None

    def check(self, reads: tuple[str, ...] | list[str] = ()) -> None:
        """Fail early if the output cannot be replaced or written, or if replacing it would
        remove the working folder or something the run reads (``reads``: its inputs, labels CSV
        and weights)."""
        if is_within(os.getcwd(), self.target):
            raise ValueError(
                f"output {self.final} is the current folder or one of its parents; "
                "refusing to replace it (give a new folder)"
            )
        for read in reads:
            if is_within(read, self.target):  # never across filesystems
                raise ValueError(
                    f"output {self.final} holds the input {read}; the run would remove what it reads "
                    "(give another --output)"
                )
        fs, p = url_to_fs(self.target)
        if fs.exists(p):
            if not fs.isdir(p):
                raise ValueError(f"output {self.final} exists and is not a folder")
            entries = fs.ls(p, detail=False)
            if entries:
                _check_replaceable(fs, p, self.final, entries)
        self._previous = self._summary() if self.committed() else None
        stale_copies = self._stale_copies(fs, p)
        for doomed in [p, *stale_copies]:  # what the commit removes
            if fs.exists(doomed) and (folder := _read_only_folder(fs, doomed)):
                raise ValueError(f"output {self.final} cannot be replaced: {folder} is read-only (its files cannot "
                                 "be removed); make it writable, or give another --output")
        for stale in stale_copies:
            log.warning("%s is a copy of an earlier output of %s, left by a commit that was killed; this "
                        "run's commit removes it", stale, self.final)
        sfs, sp = url_to_fs(self.staging)
        if sfs.exists(sp):
            # Another run with this id is writing it, or one was killed: its files would be
            # committed with this run's (a shard of another attack, stats of another input).
            raise ValueError(
                f"output {self.final}: the staging folder {self.staging} of run {self.run_id} exists (a run with "
                "this id is still writing, or was killed); remove it, or give another --run-id"
            )
        try:
            self._created = missing_folders(sfs, posixpath.dirname(sp))  # what abandon() may remove again
            sfs.makedirs(sp, exist_ok=True)
            probe = join(sp, ".probe")
            with sfs.open(probe, "wb") as f:
                f.write(b"ok")
            sfs.rm(probe)
        except Exception as e:
            raise ValueError(f"output location {self.final} cannot be written: {e}") from None

    def path(self, *parts: str) -> str:
        """A path inside the staging folder."""
        return join(self.staging, *parts)

    def commit(self, written: list[str] | tuple[str, ...] = ()) -> None:
        """Replace the final folder with the staging folder, then write ``_SUCCESS``.

        ``written``: the files the run wrote (paths from :meth:`path`). A staging folder that
        lacks one is removed, not committed (RuntimeError): the run was abandoned while this stage
        still ran, as a Dask worker's does after the job was interrupted, and what the stage wrote
        since would be all the output held. A file it does not list (what an attempt of a stage
        whose results were not kept wrote) is left out.
        The previous output is moved aside (``<output>.old-<run id>``) and removed once the new
        one is in place. If the swap fails or is interrupted, the previous output is put back
        (here, by :meth:`abandon`, or by a retry of this commit), and the run's files, if already
        moved in, go back to staging, where a retry finds them; copies left aside by a killed
        earlier commit of this output are removed once this one has succeeded."""
        fs, final = url_to_fs(self.target)
        _, staging = url_to_fs(self.staging)
        files = fs.find(staging)
        if written:
            have = {p[len(staging) + 1:] for p in files}
            missing = sorted(rel for p in written if (rel := p[len(self.staging) + 1:]) not in have)
            if missing:
                if fs.exists(staging):  # what this stage wrote after the run had removed it
                    fs.rm(staging, recursive=True)
                raise RuntimeError(f"not committing {self.final}: its staging folder lacks {len(missing)} of "
                                   f"the run's files ({missing[0]}, ...); the run was abandoned")
        # A worker killed in a write_bytes leaves its temporary file; the retried task wrote the file.
        # A worker lost after its stage wrote has its tasks run again, upstream ones too, and an
        # outcome that differs then (a transient failure that does not recur) leaves files that
        # no kept attempt wrote (an errors part beside the image's rows): only the run's are kept.
        listed = {p[len(self.staging) + 1:] for p in written}
        for p in files:
            if _TEMPORARY.match(posixpath.basename(p)):
                log.warning("removing %s, left by a write that was killed", p)
            elif written and p[len(staging) + 1:] not in listed:
                log.warning("removing %s, written by an attempt whose results the run did not keep", p)
            else:
                continue
            fs.rm(p)
            remove_empty_folders(fs, _folders_between(p, staging))
        # A retried commit (a Dataflow bundle's) finds what the failed one left: start from the
        # previous output, not from a mix of it and the part of this run moved in.
        self._restore(fs, final)
        old = None
        moved_in = False
        try:
            if fs.exists(final):
                old = f"{final}.old-{self.run_id}"
                _move_folder(fs, final, old)
            _move_folder(fs, staging, final, keep_source_on_error=True)
            moved_in = True
            with fs.open(join(final, SUCCESS), "wb") as f:
                f.write(self.run_id.encode() + b"\n")
        except BaseException:
            if moved_in:
                # The run's files are in place, not marked done (writing _SUCCESS failed): back
                # where a retry of this commit (a Dataflow bundle's) finds them, else it could
                # only fail, and the run would be lost.
                try:
                    _move_folder(fs, final, staging)
                except Exception as e:
                    log.warning("could not move %s back to %s for a retry: %s", self.final, self.staging, e)
            self._restore(fs, final)
            raise
        if old is not None and fs.exists(old):  # an empty folder moved aside leaves no copy on a store
            fs.rm(old, recursive=True)
        for stale in self._stale_copies(fs, final):
            log.warning("removing %s, left by an interrupted earlier commit of this output", stale)
            fs.rm(stale, recursive=True)
        log.info("committed %s", self.final)

    def committed(self) -> bool:
        """Whether the output is this run's, committed in full (its ``_SUCCESS`` names the run,
        beside another summary.json than the one an earlier run with this id left there)."""
        fs, final = url_to_fs(self.target)
        try:
            with fs.open(join(final, SUCCESS), "rb") as f:
                if f.read(200).decode("utf-8", "replace").strip() != self.run_id:
                    return False
        except (FileNotFoundError, OSError):
            return False
        return self._previous is None or self._summary() != self._previous

    def _summary(self) -> bytes | None:
        """The output's summary.json, or None."""
        try:
            return read_bytes(join(self.target, "summary.json"))
        except (FileNotFoundError, OSError):
            return None

    @staticmethod
    def _stale_copies(fs, final: str) -> list[str]:
        """Previous outputs that killed commits of ``final`` left aside (``<final>.old-<run id>``)."""
        parent, name = posixpath.split(final.rstrip("/"))
        try:
            entries = fs.ls(parent, detail=False)
        except (FileNotFoundError, OSError):
            return []
        prefix = f"{name}.old-"
        stale = []
        for e in (e.rstrip("/") for e in entries):
            base = posixpath.basename(e)
            if not (base.startswith(prefix) and _RUN_ID.match(base[len(prefix):]) and fs.isdir(e)):
                continue
            inside = fs.ls(e, detail=False)
            if inside and _not_an_output(fs, e, inside) is None:  # whole and ours: nobody else's data
                stale.append(e)
        return sorted(stale)

    def _restore(self, fs, final: str) -> bool:
        """Put back the previous output this run's commit moved aside, if it did: the run's
        own output, if (partly) in place, is removed first. Whether there was one to restore."""
        old = f"{final}.old-{self.run_id}"
        if not fs.exists(old):
            return False
        if not isinstance(fs, LocalFileSystem) and not fs.exists(join(old, SUCCESS)):
            # Its copy aside was cut short (_move_folder): the previous output was not touched yet.
            fs.rm(old, recursive=True)
            return True
        if fs.exists(final):
            fs.rm(final, recursive=True)
        _move_folder(fs, old, final)
        log.warning("restored the previous output %s", self.final)
        return True

    def abandon(self) -> None:
        """After a failed or interrupted run: remove the staging folder, put back the previous
        output if the run's commit had moved it aside, and remove the folders above the output
        that :meth:`check` created for it and that are still empty. A run whose commit had
        written ``_SUCCESS`` is done: its previous output, if still aside, is removed instead."""
        fs, staging = url_to_fs(self.staging)
        if isinstance(fs, LocalFileSystem):
            # Out of the way in one step first: a stage still running elsewhere (a Dask worker's)
            # then commits nothing (commit's check), not a folder half removed.
            doomed = f"{staging}.abandoned"
            try:
                os.rename(staging, doomed)
                staging = doomed
            except FileNotFoundError:
                pass
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        _, final = url_to_fs(self.target)
        if self.committed():  # stopped while removing the previous output: the run is done
            old = f"{final}.old-{self.run_id}"
            if fs.exists(old):
                fs.rm(old, recursive=True)
            return
        if self._restore(fs, final):
            return
        remove_empty_folders(fs, self._created)


def _move_folder(fs, src: str, dst: str, keep_source_on_error: bool = False) -> None:
    """Move the folder ``src`` to ``dst`` (which does not exist). A rename on a local disk; on an
    object store a move is a copy of each object, then its deletion, so ``_SUCCESS`` is copied
    last and deleted first: a folder with a ``_SUCCESS`` holds all of its files (a reader never
    sees one beside part of them), and a copy cut short has none. ``keep_source_on_error``: once
    every object is copied, a failure deleting the source is a warning (what is left of it is
    garbage: ``dst`` is whole), not an error that would undo the copy."""
    if isinstance(fs, LocalFileSystem):
        fs.mv(src, dst, recursive=True)
        return
    files = fs.find(src)
    marker = join(src, SUCCESS)
    rest = [p for p in files if p != marker]
    if rest:
        fs.copy(rest, [dst + p[len(src):] for p in rest])
    if marker in files:
        fs.copy(marker, join(dst, SUCCESS))
        fs.rm(marker)
    try:
        fs.rm(src, recursive=True)
    except Exception as e:
        if not keep_source_on_error:
            raise
        log.warning("%s was copied to %s, but removing what is left of it failed (%s): remove it", src, dst, e)


def _folders_between(path: str, top: str) -> list[str]:
    """The folders holding ``path`` below ``top``, deepest first."""
    out = []
    while (path := posixpath.dirname(path)).startswith(top.rstrip("/") + "/"):
        out.append(path)
    return out


def missing_folders(fs, path: str) -> list[str]:
    """``path`` and its parents that do not exist yet, deepest first: what ``makedirs`` will create."""
    out = []
    while path and path != posixpath.dirname(path) and not fs.exists(path):
        out.append(path)
        path = posixpath.dirname(path)
    return out


def remove_empty_folders(fs, folders: list[str]) -> None:
    """Remove ``folders`` (deepest first, as missing_folders gives them) while they are empty."""
    for folder in folders:
        try:
            if fs.isdir(folder) and not fs.ls(folder, detail=False):
                fs.rmdir(folder)
        except OSError:
            break


def open_binary(path: str):
    """Any fsspec URL opened for binary reading, as a context manager (``with open_binary(p) as f``).

    Not ``fsspec.open(...).open()``: a chained URL's file (``zip://a.tar::data.zip``) is closed
    as soon as the filesystems it was opened through are dropped, so they are kept until the
    ``with`` block ends."""
    return fsspec.open(path, "rb")


def sanitize_key(key: str) -> str:
    """Keys become WebDataset member prefixes, so they may not contain dots."""
    return key.replace(".", "_")


_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\\\ud800-\udfff]")


def printable(name: str) -> str:
    """A file, member or input name as the UTF-8 text outputs need (Parquet columns, tar headers,
    CSV): bytes that are not UTF-8 (a Latin-1 name on a Linux disk or in a tar, which Python keeps
    as lone surrogates that none of them can encode) are written ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def file_key(rel: str) -> str:
    """The key of a folder's image file, from its path relative to the folder without its
    extension: dots, control characters, backslashes and bytes that are not UTF-8 become ``_``,
    and so do a name that is only an extension (``.jpg``, ``sub/.jpg``) and the colon of a leading
    drive letter (``c:x.jpg``), so every file gives a key that the tar reader takes back
    (unsafe_name_reason)."""
    key = _UNSAFE_CHARS.sub("_", sanitize_key(rel.rsplit(".", 1)[0]))
    if _DRIVE.match(key):
        key = f"{key[0]}_{key[2:]}"
    head, _, last = key.rpartition("/")
    return f"{head}/{last or '_'}" if head else (last or "_")


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar of (name, data) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
