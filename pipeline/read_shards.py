"""ReadImageShards: WebDataset tars, Parquet files and image folders -> RawSample, plus errors.

The shard is the unit of work: each source shard is read whole by one DoFn call. Everything that
cannot become a sample (an unsafe member name, a member cut short, a sample without an image, a
duplicate key, an unreadable file) is reported in the ``errors`` output with its reason, and the
rest of the shard is still read.
"""
from __future__ import annotations

import bz2
import contextlib
import dataclasses
import errno
import gzip
import json
import logging
import lzma
import math
import posixpath
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from .config import InputConfig
from .errors import SplitErrors, error_reason
from .io import (IMAGE_EXTS, FileTooLarge, NotReadable, file_key, file_label, input_fs, join, open_binary,
                 printable, read_file, read_labels_csv, sanitize_key, unsafe_name_reason)
from .records import ErrorRecord, RawSample, SourceShard

log = logging.getLogger(__name__)

STAGE = "read"
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
LABEL_EXTS = ("cls", "label", "class")
#: The largest ``.json`` or label member read: a JSON sidecar is parsed and carried into every
#: output, and a few MB of ``[{},{},...]`` parse into GBs of Python objects.
MAX_SIDECAR_BYTES = 1 << 20
#: The largest GNU long-name or pax header read (``tarfile`` reads one whole, whatever its size).
_MAX_TAR_HEADER_BYTES = 1 << 20
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)


def max_image_bytes(max_pixels: int) -> int:
    """The largest image (tar member, file, Parquet cell) read: 8 bytes for each pixel
    ``max_pixels`` allows (16-bit RGBA or CMYK stored raw, the widest layout Pillow reads) and
    64 MiB for metadata. Reading comes before the pixel check, and a tar header can claim any size
    (a GNU sparse member of a few KB expands to the size it states)."""
    return 8 * max_pixels + (64 << 20)


_IMAGE_LIMIT = "8 bytes per --max-pixels pixel, plus 64 MiB"


def _too_large(what: str, size: int, limit: int, why: str = _IMAGE_LIMIT) -> str:
    return f"{what} of {size} bytes is over {limit} bytes ({why}); not read"


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset naming: ``dir/key.ext.ext2`` -> (``dir/key``, ``ext.ext2``); None without a dot,
    or when the base name starts with one (``dir/.jpg``, ``._x.jpg``: no key)."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def label_text(label: bytes | None) -> str | None:
    """A label's bytes (a ``.cls`` member, a binary column) as text; bytes that are not UTF-8 are
    kept as their repr, which decoding then reports as unreadable."""
    if label is None:
        return None
    try:
        return label.decode("utf-8")
    except UnicodeDecodeError:
        return repr(label[:20])


def member_name(name: str) -> str:
    """A tar member's name without leading ``./`` (``tar -C dir -cf x.tar .`` writes ``./a.jpg``)."""
    while name.startswith("./"):
        name = name[2:]
    return name


def image_type_reason(t) -> str | None:
    """Why a Parquet column of Arrow type ``t`` cannot hold images (None if it can): binary or
    string values, or the Hugging Face ``struct<bytes, path>``."""
    import pyarrow as pa

    ok = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary,
          pa.types.is_string, pa.types.is_large_string, pa.types.is_null,
          # Arrow's view layouts (pyarrow 16+), which Polars and DuckDB use; read as bytes and text.
          *(getattr(pa.types, f"is_{v}_view", None) for v in ("binary", "string")))
    if any(check(t) for check in ok if check):
        return None
    if pa.types.is_dictionary(t) and image_type_reason(t.value_type) is None:
        return None  # a dictionary-encoded column, kept so by its writer: read as its values
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return image_type_reason(t.field("bytes").type)
    return f"is {t}, not binary, string or struct<bytes, path>"


def _recording_tarinfo(stopped: list) -> type[tarfile.TarInfo]:
    """A TarInfo class that appends to ``stopped`` why a header after the first could not be
    read, where that means damage. A tar ends with zero blocks; Python's ``tarfile`` also ends
    its iteration, silently, at a header cut short, one failing its checksum, or the end of the
    data, which would lose the rest of a shard without a word."""

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf):
            try:
                return super().fromtarfile(tf)
            except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError, tarfile.EmptyHeaderError) as e:
                stopped.append(e)
                raise
            except (ValueError, OverflowError) as e:  # a pax header's malformed sparse map, say
                bad = tarfile.InvalidHeaderError(f"{type(e).__name__}: {e}")
                stopped.append(bad)
                raise bad from None

        def _proc_member(self, tf):
            if self.type in _META_TYPES and self.size > _MAX_TAR_HEADER_BYTES:
                raise tarfile.InvalidHeaderError(
                    f"a long-name or pax header of {self.size} bytes, over {_MAX_TAR_HEADER_BYTES}")
            return super()._proc_member(tf)

    return RecordingTarInfo


#: Compressed tars, by their first bytes: the format's name and a new decompressor for one stream.
_COMPRESSIONS = (
    (b"\x1f\x8b", "gzip", None),  # _gunzip
    (b"BZh", "bzip2", bz2.BZ2Decompressor),
    (b"\xfd7zXZ\x00", "xz", lzma.LZMADecompressor),
)
#: Compressions Python's tarfile does not read, named so that such a shard is not called damaged.
_UNREAD_COMPRESSIONS = ((b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"))
_CHUNK = 1 << 16  # compressed bytes per step: bounds what one step can inflate to in memory


def _gunzip(f, out):
    """Inflate gzip data from ``f`` into ``out``: None, or what _tar_source says is wrong.
    ``GzipFile.read1`` checks each stream's CRC and length in a call of its own, so the data
    before a failed check is kept (to name the samples it holds)."""
    gz = gzip.GzipFile(fileobj=f, mode="rb")
    try:
        while chunk := gz.read1(1 << 20):
            out.write(chunk)
    except EOFError:
        return "cut", "the gzip data ends before its end"
    except gzip.BadGzipFile as e:
        if not (str(e).startswith("Not a gzipped file") and out.tell()):
            return "corrupt", f"gzip: {e}"
        # A complete stream, its check passed, then bytes that start no other: gzip -d ignores them.
        log.warning("%s: bytes after the gzip data, ignored (as gzip -d does)", getattr(f, "path", f))
    except zlib.error as e:
        return "corrupt", f"gzip: {e}"
    finally:
        out.seek(0)
    return None


#: Errors of a write into a full temporary folder, which say nothing of the shard's data.
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _inflating(e: OSError, doing: str = "inflating") -> OSError:
    return OSError(e.errno, f"{e.strerror} in {tempfile.gettempdir()} (TMPDIR), {doing} the shard to read it")


def _inflate(d, data: bytes) -> Iterator[bytes]:
    """``d.decompress(data)`` (bz2 or lzma) in pieces of at most 16 MiB."""
    yield d.decompress(data, 1 << 24)
    while not d.eof and not d.needs_input:
        yield d.decompress(b"", 1 << 24)


def _tar_source(f, stack: contextlib.ExitStack):
    """The file to read a tar from, and what is wrong with its compression: None (nothing, or
    not compressed), ("corrupt", why) when the data fails a check (no sample of it can be
    trusted), ("cut", why) when it ends early (the samples before the cut can), or ("unread",
    why) for a compression tarfile does not read (zstd, lz4: no tar header to find).

    ``tarfile``'s streaming reader never checks a gzip CRC, and bzip2 and xz check theirs only
    at the end of a block, after the data before it was handed out: a corrupt compressed shard
    would be read as if intact. Compressed shards are inflated into a temporary file first, each
    stream checked to its end (concatenated streams are read, as gzip does; zero padding or
    other trailing bytes after a complete stream end the data, with a warning for the latter)."""
    try:
        magic = f.read(6)
    except (OSError, ValueError):  # tarfile's reader meets the same error and reports it
        return f, None
    try:
        f.seek(0)
    except (OSError, ValueError):
        # A stream that cannot seek (an HTTP server without range requests): copied whole into a
        # temporary file, its first bytes included, and read from there (a stream read in
        # tarfile's streaming mode skips a member by reading it: one claiming 10^20 bytes
        # would never end).
        copy = stack.enter_context(tempfile.TemporaryFile(prefix="semjpeg-shard-"))
        try:
            copy.write(magic)
            shutil.copyfileobj(f, copy, _CHUNK)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise _inflating(e, "copying") from None
            raise
        copy.seek(0)
        return _tar_source(copy, stack)
    found = next(((name, new) for prefix, name, new in _COMPRESSIONS if magic.startswith(prefix)), None)
    if found is None:
        other = next((name for prefix, name in _UNREAD_COMPRESSIONS if magic.startswith(prefix)), None)
        return f, other and ("unread", f"it is {other}-compressed, which is not read (use gzip, bzip2 or xz)")
    name, new = found
    out = stack.enter_context(tempfile.TemporaryFile(prefix="semjpeg-shard-"))
    if name == "gzip":
        try:
            return out, _gunzip(f, out)
        except OSError as e:
            raise _inflating(e) if e.errno in _DISK_FULL else e from None
    d, buf = new(), b""
    try:
        while True:
            buf = buf or f.read(_CHUNK)
            if not buf:
                break
            if d is None:  # between streams
                while len(buf) < 6 and (more := f.read(_CHUNK)):
                    buf += more
                if not buf.strip(b"\0"):
                    buf = b""
                    continue
                if not any(buf.startswith(prefix) for prefix, n, _ in _COMPRESSIONS if n == name):
                    log.warning("%s: bytes after the %s data, ignored", getattr(f, "path", f), name)
                    break
                d = new()
            for piece in _inflate(d, buf):
                out.write(piece)
            buf = d.unused_data if d.eof else b""
            if d.eof:
                d = None
    except (OSError, EOFError, lzma.LZMAError) as e:
        if getattr(e, "errno", None) in _DISK_FULL:
            raise _inflating(e) from None
        out.seek(0)
        return out, ("corrupt", f"{name}: {e}")
    out.seek(0)
    if d is not None:
        return out, ("cut", f"the {name} data ends before its end")
    return out, None


@dataclasses.dataclass(frozen=True)
class _Unread:
    """A tar member too large to read, in place of its data; why, for the sample's error."""

    reason: str


def _duplicate_error(err, key: str, names: list[str]):
    return err(key, ",".join(names), "duplicate key in shard (members of one sample must be adjacent)")


class _ReadShardFn(beam.DoFn):
    def __init__(self, config: InputConfig):
        self.config = config
        self.labels: dict[str, str] | None = None
        self.samples = Metrics.counter("semjpeg", "read_samples")
        self.errors = Metrics.counter("semjpeg", "read_errors")

    def setup(self):
        if self.config.labels_csv:
            self.labels = read_labels_csv(self.config.labels_csv)

    def process(self, shard: SourceShard):
        reader = {"webdataset": self._tar, "parquet": self._parquet, "folder": self._folder}[shard.format]
        # The source as the outputs write it: a path that is not UTF-8 would fail the Parquet write.
        source = printable(shard.path)
        try:
            for item in reader(shard):
                (self.errors if isinstance(item, ErrorRecord) else self.samples).inc()
                yield item if source == shard.path else dataclasses.replace(item, source=source)
        except Exception as e:  # an unreadable source: report it, keep the job going
            self.errors.inc()
            log.warning("cannot read %s: %s", source, e)
            yield ErrorRecord(shard.index, source, None, None, STAGE, f"cannot read source: {error_reason(e)}")

    # ----------------------------------------------------------------------- WebDataset

    def _tar(self, shard: SourceShard) -> Iterator[RawSample | ErrorRecord]:
        def err(key, member, reason):
            return ErrorRecord(shard.index, shard.path, key, member, STAGE, reason)

        seen: set[str] = set()
        key: str | None = None
        members: dict[str, tuple[str, bytes]] = {}
        current = last = None
        distrust: str | None = None  # why no sample of this shard can be trusted

        def flush() -> list:
            if key is None:
                return []
            names = ",".join(m for m, _ in members.values())
            if distrust:
                return [err(key, names, f"{distrust}; sample not read")]
            images = [e for e in IMAGE_EXTS if e in members]
            if not images:
                return [err(key, names, f"no image member in sample (found: {', '.join(sorted(members)) or 'nothing'})")]
            used = (images[0], next((e for e in LABEL_EXTS if e in members), None), "json")
            big = next((members[e][1] for e in used if isinstance(members.get(e, (None, None))[1], _Unread)), None)
            if big is not None:
                return [err(key, names, big.reason)]
            member, data = members[images[0]]
            # One image per sample: the others are reported, never dropped silently.
            extra = [err(key, members[e][0], f"a second image member in the sample; read {member} instead")
                     for e in images[1:]]
            label = next((members[e][1] for e in LABEL_EXTS if e in members), None)
            meta = members.get("json", (None, None))[1]
            return [RawSample(shard.index, shard.path, key, member, data, label_text(label), meta), *extra]

        with open_binary(shard.path) as f, contextlib.ExitStack() as stack:
            source, problem = _tar_source(f, stack)
            if problem and problem[0] == "corrupt":
                # It fails its check somewhere, and nothing says where: every sample is reported.
                distrust = f"the shard's compressed data is corrupt ({problem[1]})"
            stopped: list[Exception] = []  # why tarfile stopped reading headers (_recording_tarinfo)
            try:
                # Seekable (a file, or the inflated copy): a member is skipped by seeking, which
                # ends at the data's end; the streaming reader skips by reading, and a header
                # claiming 10^20 bytes kept it reading nothing forever.
                mode = "r:" if getattr(source, "seekable", lambda: False)() else "r|*"
                tf = tarfile.open(fileobj=source, mode=mode, tarinfo=_recording_tarinfo(stopped))
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                yield err(None, None, f"not a readable tar file: {distrust or (problem[1] if problem else e)}")
                return
            duplicate: tuple[str, list[str]] | None = None  # a sample whose key came before
            image_limit = max_image_bytes(self.config.max_pixels)
            try:
                while (m := tf.next()) is not None:
                    tf.members.clear()  # a TarFile keeps every header it read (~600 B each)
                    name = member_name(m.name)
                    current = last = printable(name)
                    if m.isdir():
                        continue
                    reason = unsafe_name_reason(name)
                    if reason:
                        yield err(None, printable(m.name), f"unsafe member name ({reason})")
                        continue
                    if not m.isfile():
                        yield err(None, name, "not a regular file (link or device)")
                        continue
                    parts = split_key(name)
                    if parts is None:
                        hidden = posixpath.basename(name).startswith(".")
                        yield err(None, name, "member name starts with a dot, so it has no key (a hidden file, "
                                  "such as macOS's ._ files)" if hidden else "member name has no extension")
                        continue
                    k, ext = parts
                    if duplicate is not None and k == duplicate[0]:
                        duplicate[1].append(name)  # one error for the whole sample
                        continue
                    if k != key:
                        yield from flush()
                        key, members = None, {}
                        if duplicate is not None:
                            yield _duplicate_error(err, *duplicate)
                            duplicate = None
                        if k in seen:
                            duplicate = (k, [name])
                            continue
                        seen.add(k)
                        key = k
                    if ext in members:
                        yield err(k, name, f"duplicate member .{ext}; kept the first")
                        continue
                    # Only members the sample uses are read, and only up to their limit (a header
                    # can claim any size); tarfile skips the others' data without holding it.
                    limit, why = ((image_limit, _IMAGE_LIMIT) if ext in IMAGE_EXTS
                                  else (MAX_SIDECAR_BYTES, "the limit for .json and label members")
                                  if ext in LABEL_EXTS or ext == "json" else (None, None))
                    if limit is None:
                        members[ext] = (name, None)
                    elif m.size > limit:
                        members[ext] = (name, _Unread(_too_large(f"member {name}", m.size, limit, why)))
                    else:
                        members[ext] = (name, tf.extractfile(m).read())
                        current = None
            except (tarfile.TarError, EOFError, OSError, OverflowError, ValueError, zlib.error) as e:
                # The sample being read loses a member: reported, as are those the cut took.
                where = f" inside member {current}" if current else ""
                yield err(key, current, f"tar cut short{where}: {problem[1] if problem else e}; "
                                        "samples before it were read")
                return
            after = f" after member {last}" if last else ""
            damage = None
            if problem and problem[0] == "cut":
                damage = f"tar cut short{after}: {problem[1]}"
            elif stopped:
                e = stopped[0]
                what = ("ends without its end-of-archive blocks" if isinstance(e, tarfile.EmptyHeaderError)
                        else f"has an unreadable header at byte {tf.offset} ({e})")
                damage = f"tar cut short or corrupt: it {what}{after}"
            if damage and key is not None and not distrust:
                # The cut may have taken the rest of the last sample (its label, say): reported.
                yield err(key, ",".join(m for m, _ in members.values()),
                          f"{damage}; the sample may be incomplete and was not read, the samples before it were")
            else:
                yield from flush()
                if damage:
                    yield err(None, None, f"{damage}; samples before it were read")
            if duplicate is not None:
                yield _duplicate_error(err, *duplicate)

    # ----------------------------------------------------------------------- Parquet

    def _parquet(self, shard: SourceShard) -> Iterator[RawSample | ErrorRecord]:
        import pyarrow.parquet as pq

        cfg = self.config

        def err(key, member, reason):
            return ErrorRecord(shard.index, shard.path, key, member, STAGE, reason)

        stem = file_key(posixpath.basename(shard.path).split(".")[0] or "row")
        with open_binary(shard.path) as f:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:
                yield err(None, None, f"not a readable Parquet file: {e}")
                return
            schema = pf.schema_arrow
            names = schema.names
            # The image column must exist; key and label columns must when named (None: the
            # "key" and "label" columns if the file has them).
            for what, name, required in (("image", cfg.image_column, True),
                                         ("key", cfg.key_column, cfg.key_column is not None),
                                         ("label", cfg.label_column, cfg.label_column is not None)):
                if required and name not in names:
                    yield err(None, None, f"no {what} column {name!r} (columns: {', '.join(names)})")
                    return
            key_col, label_col = cfg.key_column or "key", cfg.label_column or "label"
            reason = image_type_reason(schema.field(cfg.image_column).type)
            if reason:
                yield err(None, None, f"wrong column type: image column {cfg.image_column!r} {reason}")
                return
            cols = [c for c in (cfg.image_column, key_col, label_col) if c in names]
            row = 0
            seen: set[str] = set()
            limit = max_image_bytes(cfg.max_pixels)
            # Row group by row group: a damaged one loses its own rows (reported), not the file's.
            for group in range(pf.num_row_groups):
                end = row + pf.metadata.row_group(group).num_rows
                try:
                    for batch in pf.iter_batches(batch_size=256, row_groups=[group], columns=cols):
                        d = batch.to_pydict()
                        n = batch.num_rows
                        images, keys, labels = (d[cfg.image_column], d.get(key_col, [None] * n),
                                                d.get(label_col, [None] * n))
                        for i in range(n):
                            yield self._parquet_row(shard, stem, row + i, images[i], keys[i], labels[i], seen, limit)
                        row += n
                except Exception as e:
                    why = " ".join(str(e).split()) or type(e).__name__  # pyarrow's messages span lines
                    rows = f"row {row}" if end - row == 1 else f"rows {row} to {end - 1}"
                    lost = f"{rows} not read" if end > row else "its rows were read"
                    yield err(None, rows if end > row else None, f"Parquet row group {group} unreadable ({lost}): {why}")
                row = end

    @staticmethod
    def _parquet_row(shard: SourceShard, stem: str, row: int, img, given_key, label,
                     seen: set[str], limit: int) -> RawSample | ErrorRecord:
        """One Parquet row -> RawSample, or an ErrorRecord with the reason (never raises)."""
        member = f"row {row}"

        def err(k, reason):
            return ErrorRecord(shard.index, shard.path, k, member, STAGE, reason)

        # Binary key and label columns hold text, as a tar's members do (str() would give "b'3'").
        if isinstance(given_key, bytes):
            try:
                given_key = given_key.decode("utf-8")
            except UnicodeDecodeError:
                return err(None, f"key {given_key[:40]!r} is not UTF-8 text")
        if isinstance(label, bytes):
            label = label_text(label)
        raw_key = str(given_key) if given_key is not None else f"{stem}-{row:08d}"
        key = sanitize_key(raw_key)

        reason = unsafe_name_reason(key)
        if reason:
            return err(None, f"unsafe key {raw_key!r} ({reason})")
        if key in seen:
            return err(key, "duplicate key in file")
        seen.add(key)
        file = None
        if isinstance(img, dict):  # Hugging Face datasets: struct<bytes, path>
            img, file = img.get("bytes"), img.get("path")
        if img is None:
            return err(key, "null image")
        if isinstance(img, str):
            # Bytes stored as text, one character per byte; anything else is not image data.
            try:
                img = img.encode("latin-1")
            except UnicodeEncodeError:
                return err(key, "image column holds text, not image bytes (a character above U+00FF)")
        if not isinstance(img, (bytes, bytearray)):
            return err(key, f"wrong column type: image value is {type(img).__name__}, not bytes")
        if len(img) > limit:
            return err(key, _too_large("the image", len(img), limit))
        if isinstance(label, float):  # an int column with nulls, through pandas
            if math.isnan(label):
                label = None
            elif label.is_integer():
                label = int(label)
        meta = {k: v for k, v in (("source_key", raw_key if raw_key != key else None), ("file", file)) if v}
        meta = json.dumps(meta).encode() if meta else None
        return RawSample(shard.index, shard.path, key, member, bytes(img),
                         None if label is None else str(label), meta)

    # ----------------------------------------------------------------------- folders

    def _folder(self, shard: SourceShard) -> Iterator[RawSample | ErrorRecord]:
        seen: set[str] = set()
        # Files are opened on the folder's filesystem, not as URLs: "a::b.jpg" is a file name,
        # where fsspec.open would read a chained URL.
        fs, root = input_fs(shard.path)
        limit = max_image_bytes(self.config.max_pixels)
        for rel in shard.files:
            key, member = file_key(rel), printable(rel)
            if key in seen:
                yield ErrorRecord(shard.index, shard.path, key, member, STAGE, "two files give the same key")
                continue
            seen.add(key)
            try:
                data = read_file(fs, join(root, rel), limit)
            except Exception as e:
                why = (f"{e} ({_IMAGE_LIMIT}); not read" if isinstance(e, FileTooLarge)
                       else f"{e}; not read" if isinstance(e, NotReadable) else f"cannot read file: {error_reason(e)}")
                yield ErrorRecord(shard.index, shard.path, key, member, STAGE, why)
                continue
            label = None
            if self.labels is not None:
                label = file_label(self.labels, rel)
            yield RawSample(shard.index, shard.path, key, member, data, label, None)


class ReadImageShards(beam.PTransform):
    """Source shards -> (RawSample PCollection, ErrorRecord PCollection)."""

    def __init__(self, shards: list[SourceShard], config: InputConfig):
        super().__init__()
        self.shards = shards
        self.config = config

    def expand(self, pbegin):
        out = (
            pbegin
            | "Shards" >> beam.Create(self.shards)
            | "Spread" >> beam.Reshuffle()
            | "ReadShard" >> beam.ParDo(_ReadShardFn(self.config))
        )
        return out | "Split" >> SplitErrors()
