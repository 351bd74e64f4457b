"""Reading source shards and listing inputs: every row or member is a sample or an error with its
reason, and input mistakes are clear errors before any work."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import features

from pipeline.config import InputConfig
from pipeline.io import expand_inputs, input_shards, list_images, read_labels_csv
from pipeline.read_shards import _ReadShardFn, image_type_reason
from pipeline.records import ErrorRecord, RawSample, SourceShard
from tests.shards import encode, write_tar

PNG = encode(np.full((8, 8, 3), 100, np.uint8))


def read(path, fmt, **config):
    fn = _ReadShardFn(InputConfig(paths=(str(path),), **config))
    fn.setup()
    return list(fn.process(SourceShard(0, str(path), fmt)))


def parquet(tmp_path, **columns):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def test_a_bad_parquet_row_is_one_error_and_the_rest_is_read(tmp_path):
    out = read(parquet(tmp_path, image=["not an image", "ünïcödé € text", "after"]), "parquet")
    assert [type(o) for o in out] == [RawSample, ErrorRecord, RawSample]
    assert (out[1].member, out[1].key) == ("row 1", "x-00000001") and "holds text" in out[1].reason
    assert (out[0].data, out[2].data, out[2].member) == (b"not an image", b"after", "row 2")


def test_image_column_of_the_wrong_type_is_rejected_unread(tmp_path):
    (err,) = read(parquet(tmp_path, image=[1_000_000_000, 7]), "parquet")
    assert isinstance(err, ErrorRecord) and err.reason.startswith("wrong column type: image column 'image' is int64")
    hf = read(parquet(tmp_path, image=[{"bytes": PNG, "path": "a.png"}, {"bytes": None, "path": "b.png"}]), "parquet")
    assert hf[0].data == PNG and hf[1].reason == "null image"
    assert json.loads(hf[0].meta) == {"file": "a.png"}  # the struct's path is kept, as `shard` keeps the file name


def test_dictionary_and_view_image_columns_are_read(tmp_path):
    """A dictionary-encoded binary column (a pandas Categorical of bytes) and Arrow's binary view
    (Polars' and DuckDB's layout) hold image bytes: every row was reported as a wrong column type."""
    columns = [pa.array([PNG, PNG]).dictionary_encode(), pa.array(["a", "b"]).dictionary_encode()]
    if hasattr(pa, "binary_view"):
        columns.append(pa.array([PNG, PNG], pa.binary_view()))
    for column in columns:
        out = read(parquet(tmp_path, image=column), "parquet")
        assert [type(o) for o in out] == [RawSample, RawSample], out[0]
    assert image_type_reason(pa.dictionary(pa.int32(), pa.int64())) == (
        "is dictionary<values=int64, indices=int32, ordered=0>, not binary, string or struct<bytes, path>")


def test_integral_float_labels_are_labels_and_nan_is_none(tmp_path):
    out = read(parquet(tmp_path, image=[PNG] * 4, label=[0.0, 2.0, float("nan"), None]), "parquet")
    assert [o.label for o in out] == ["0", "2", None, None]


def test_binary_key_and_label_columns_are_text(tmp_path):
    """A tar's members converted to Parquet as they are (``__key__``, ``cls`` as bytes): keys came
    out as ``b'a'``, and every label as ``b'1'``, which decoding refused: no sample was processed."""
    path = parquet(tmp_path, image=[PNG, PNG, PNG], key=[b"a", b"b\xff", b"c"], label=[b"1", b"2", b"\xff"])
    out = read(path, "parquet")
    assert [(o.key, o.label) for o in out if isinstance(o, RawSample)] == [("a", "1"), ("c", "b'\\xff'")]
    (err,) = [o for o in out if isinstance(o, ErrorRecord)]
    assert (err.member, err.reason) == ("row 1", "key b'b\\xff' is not UTF-8 text")


def test_named_key_and_label_columns_must_exist(tmp_path):
    path = parquet(tmp_path, image=[PNG, PNG], key=["a", "b"], label=[1, 2])
    assert [(o.key, o.label) for o in read(path, "parquet")] == [("a", "1"), ("b", "2")]
    for option, column in (("key_column", "id"), ("label_column", "lbl")):
        (err,) = read(path, "parquet", **{option: column})
        assert err.reason == f"no {option.split('_')[0]} column {column!r} (columns: image, key, label)"
    bare = parquet(tmp_path, image=[PNG])
    assert [(o.key, o.label) for o in read(bare, "parquet")] == [("x-00000000", None)]


def test_tar_members_with_leading_dot_slash(tmp_path):
    path = write_tar(tmp_path / "x.tar", [("./a.png", PNG), ("./a.cls", b"1"), ("././b.png", PNG),
                                           ("./../evil.png", PNG), ("/abs.png", PNG)])
    out = read(path, "webdataset")
    samples = [(o.key, o.member, o.label) for o in out if isinstance(o, RawSample)]
    assert samples == [("a", "a.png", "1"), ("b", "b.png", None)]
    assert sorted(o.member for o in out if isinstance(o, ErrorRecord)) == ["./../evil.png", "/abs.png"]


def test_a_second_image_in_a_sample_is_reported_not_dropped(tmp_path):
    path = write_tar(tmp_path / "x.tar", [("x.png", PNG), ("x.jpg", PNG), ("x.map.png", PNG), ("y.png", PNG)])
    out = read(path, "webdataset")
    assert [(o.key, o.member) for o in out if isinstance(o, RawSample)] == [("x", "x.jpg"), ("y", "y.png")]
    (err,) = [o for o in out if isinstance(o, ErrorRecord)]  # x.map.png is a map beside the image, not one
    assert (err.key, err.member, err.reason) == ("x", "x.png", "a second image member in the sample; read x.jpg instead")


def test_empty_input_is_an_error(tmp_path, monkeypatch):
    from jobs.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(PNG)
    with pytest.raises(ValueError, match="--input must not be empty"):
        InputConfig(paths=("",))
    with pytest.raises(ValueError, match="empty input path"):
        expand_inputs(("",))
    with pytest.raises(ValueError, match="empty input path"):
        list_images(" ")
    assert main(["defend", "--input", "", "--output", "out", "--defense", "jpeg:quality=50"]) == 2
    assert not (tmp_path / "out").exists()


def test_inputs_given_twice_are_read_once(tmp_path):
    (tmp_path / "two").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "two" / name).write_bytes(PNG)
    write_tar(tmp_path / "x.tar", [("k.png", PNG)])
    shards = expand_inputs((str(tmp_path / "two"), str(tmp_path / "two") + "/", str(tmp_path / "x.tar"),
                            str(tmp_path / "*.tar")))
    assert [(s.index, s.format, s.files) for s in shards] == [(0, "folder", ("a.png", "b.png")), (1, "webdataset", ())]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_a_folder_given_as_tar_or_parquet_is_an_error_before_any_work(tmp_path, fmt):
    """It was read as one file: the run "processed" it into one error (IsADirectoryError locally;
    on an object store, whatever opening a prefix raises)."""
    (tmp_path / "parts").mkdir()
    pq.write_table(pa.table({"image": [PNG]}), tmp_path / "parts" / "part-0.parquet")
    with pytest.raises(ValueError, match=f"--input-format {fmt} needs files, got the folder '.*parts'"):
        expand_inputs((str(tmp_path / "parts"),), fmt)


def test_an_existing_path_is_literal_even_with_glob_characters(tmp_path):
    (tmp_path / "set[1]").mkdir()
    (tmp_path / "set[1]" / "a.png").write_bytes(PNG)
    (tmp_path / "set1").mkdir()  # what the glob would match
    (tmp_path / "set1" / "b.png").write_bytes(PNG)
    (shard,) = expand_inputs((str(tmp_path / "set[1]"),))
    assert shard.path.endswith("set[1]") and shard.files == ("a.png",)


def test_a_linked_folder_inside_a_folder_is_listed_once_and_never_loops(tmp_path):
    """fsspec's find lists a symbolic link to a folder without entering it: the images of
    ``in/linked`` (a folder kept elsewhere) were skipped without a word."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "e.png").write_bytes(PNG)
    (tmp_path / "in" / "real").mkdir(parents=True)
    (tmp_path / "in" / "real" / "r.png").write_bytes(PNG)
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "in" / "again").symlink_to(tmp_path / "in" / "linked")  # the same folder, once
    (tmp_path / "in" / "alias").symlink_to(tmp_path / "in" / "real")  # listed already
    (tmp_path / "in" / "loop").symlink_to(tmp_path)  # above the folder
    assert list_images(str(tmp_path / "in")) == ["again/e.png", "real/r.png"]  # the first name of a folder


def test_missing_folder_says_so(tmp_path):
    from pipeline.pack import pack_folder

    with pytest.raises(ValueError, match="input not found"):
        pack_folder(str(tmp_path / "nope"), str(tmp_path / "s"), 10)
    with pytest.raises(ValueError, match="input not found"):
        expand_inputs((str(tmp_path / "nope"),))


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_missing_fsspec_backend_names_the_package():
    with pytest.raises(ValueError, match="cannot read s3://bucket/x.tar: .*s3fs"):
        expand_inputs(("s3://bucket/x.tar",))


def test_labels_csv_checks(tmp_path):
    (tmp_path / "bom.csv").write_bytes("file,label\na.png,3\n".encode("utf-8-sig"))
    assert read_labels_csv(str(tmp_path / "bom.csv")) == {"a.png": "3"}
    (tmp_path / "bin.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ValueError, match=f"labels CSV {tmp_path / 'bin.csv'} is not UTF-8 text"):
        read_labels_csv(str(tmp_path / "bin.csv"))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(PNG)
    write_tar(tmp_path / "x.tar", [("k.png", PNG)])
    ok = InputConfig(paths=(str(tmp_path / "f"),), labels_csv=str(tmp_path / "bom.csv"))
    assert len(input_shards(ok)) == 1
    with pytest.raises(ValueError, match=r"--labels applies to folder inputs only; .*x.tar is a WebDataset tar"):
        input_shards(InputConfig(paths=(str(tmp_path / "f"), str(tmp_path / "x.tar")),
                                 labels_csv=str(tmp_path / "bom.csv")))


def test_a_file_with_two_labels_in_the_labels_csv_is_an_error(tmp_path):
    """A file listed twice with different labels silently took the last row's label; listed twice
    with the same label (a concatenated CSV, CRLF line ends, quoted fields) it is one label."""
    (tmp_path / "dup.csv").write_bytes(b'file,label,name\r\na.png,1,"x, y"\r\n"b,c.png",2,z\r\na.png,1,w\r\n')
    assert read_labels_csv(str(tmp_path / "dup.csv")) == {"a.png": "1", "b,c.png": "2"}
    (tmp_path / "two.csv").write_text("file,label\na.png,1\nb.png,2\na.png,7\n")
    with pytest.raises(ValueError, match=rf"labels CSV {tmp_path / 'two.csv'} gives 'a.png' two labels: '1' and '7' "
                                         r"\(line 4\)"):
        read_labels_csv(str(tmp_path / "two.csv"))


def test_a_labels_csv_is_matched_as_its_files_are_named_and_must_label_some(tmp_path, caplog):
    """A CSV spelling café composed while the folder (a macOS copy) spells it decomposed, or
    writing ./x.png, labels those files; a CSV that labels none of the files (another dataset's)
    is an error before any work, in every job and in shard; a file it misses is a warning."""
    import unicodedata

    from pipeline.pack import pack_folder

    nfd = unicodedata.normalize("NFD", "café.png")
    (tmp_path / "f" / "sub").mkdir(parents=True)
    for name in (nfd, "x.png", "sub/y.png", "z.png"):
        (tmp_path / "f" / name).write_bytes(PNG)
    (tmp_path / "l.csv").write_text("file,label\ncafé.png,1\n./x.png,2\n./sub/y.png,3\n", encoding="utf-8")
    config = InputConfig(paths=(str(tmp_path / "f"),), labels_csv=str(tmp_path / "l.csv"))
    with caplog.at_level("WARNING"):
        (shard,) = input_shards(config)
    assert "gives no label to 1 of 4 files (z.png, ...)" in caplog.text
    fn = _ReadShardFn(config)
    fn.setup()
    labels = {o.key: o.label for o in fn.process(shard)}
    assert labels == {unicodedata.normalize("NFD", "café"): "1", "x": "2", "sub/y": "3", "z": None}
    (tmp_path / "other.csv").write_text("file,label\nn01440764_1.JPEG,0\n")
    for run in (lambda: input_shards(InputConfig(paths=(str(tmp_path / "f"),), labels_csv=str(tmp_path / "other.csv"))),
                lambda: pack_folder(str(tmp_path / "f"), str(tmp_path / "out" / "p"), 10, str(tmp_path / "other.csv"))):
        with pytest.raises(ValueError, match=r"other.csv gives a label to none of the 4 files \(a file is found by "):
            run()
    assert not (tmp_path / "out").exists()


def _five_samples(tmp_path):
    members = [(f"k{i}.png", PNG) for i in range(5)]
    return write_tar(tmp_path / "x.tar", members), members


def _keys(out):
    return [o.key for o in out if isinstance(o, RawSample)], [o for o in out if isinstance(o, ErrorRecord)]


@pytest.mark.parametrize("cut", ["header", "boundary", "checksum"])
def test_a_tar_damaged_between_members_says_so(tmp_path, cut):
    """tarfile ends its iteration silently at a header cut short, at the end of the data without
    the end-of-archive blocks, or at a header failing its checksum: the rest of the shard would be
    lost without a word."""
    path, members = _five_samples(tmp_path)
    data = path.read_bytes()
    third = 2 * (512 + (len(PNG) + 511) // 512 * 512)  # where k2's header starts
    if cut == "header":
        data = data[: third + 100]
    elif cut == "boundary":
        data = data[:third]
    else:
        data = data[:third] + b"\x01" * 512 + data[third + 512:]
    path.write_bytes(data)
    keys, errors = _keys(read(path, "webdataset"))
    # Nothing says whether the cut took a member of the last sample (its label, say): that
    # sample is reported too, not read.
    assert keys == ["k0"]
    (e,) = errors
    assert (e.key, e.member) == ("k1", "k1.png")
    assert e.reason.startswith("tar cut short or corrupt: it ") and "after member k1.png" in e.reason
    assert e.reason.endswith("the sample may be incomplete and was not read, the samples before it were")
    assert ("end-of-archive" in e.reason) == (cut == "boundary")


def test_gzip_shards_are_checked(tmp_path):
    import gzip

    path, _ = _five_samples(tmp_path)
    raw = path.read_bytes()
    good = tmp_path / "good.tar.gz"
    good.write_bytes(gzip.compress(raw, compresslevel=0))  # stored blocks: a flipped byte stays valid deflate
    assert _keys(read(good, "webdataset")) == (["k0", "k1", "k2", "k3", "k4"], [])
    packed = bytearray(good.read_bytes())
    at = packed.index(PNG[20:40])  # inside k0's image
    packed[at] ^= 0xFF
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(bytes(packed))
    keys, errors = _keys(read(corrupt, "webdataset"))
    # Nothing says which sample the damage is in: every one is reported, none read.
    assert keys == [] and [e.key for e in errors] == ["k0", "k1", "k2", "k3", "k4"]
    assert all("compressed data is corrupt (gzip: CRC check failed" in e.reason for e in errors)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: 10 + 5 + 2 * 1024 + 100])  # gzip and block headers, k0, k1, part of k2's
    keys, errors = _keys(read(cut, "webdataset"))
    assert keys == ["k0"] and [e.key for e in errors] == ["k1"]
    assert errors[0].reason.startswith("tar cut short after member k1.png: the gzip data ends before its end;")
    cut.write_bytes(good.read_bytes()[:100])
    (e,) = read(cut, "webdataset")
    assert e.reason == "not a readable tar file: the gzip data ends before its end"
    cut.write_bytes(good.read_bytes() + b"\0" * 100 + gzip.compress(b"") + b"trailing bytes")
    assert _keys(read(cut, "webdataset")) == (["k0", "k1", "k2", "k3", "k4"], [])  # as gzip -d reads it


@pytest.mark.parametrize("fmt", ["bz2", "xz"])
def test_bzip2_and_xz_shards_are_checked_before_any_sample_is_read(tmp_path, fmt):
    """bzip2 and xz check their data at the end of a block, after tarfile's streaming reader has
    handed out what came before: damage must not reach a sample."""
    import bz2
    import lzma

    rng = np.random.default_rng(0)
    members = [(f"k{i}.png", encode(rng.integers(0, 256, (64, 64, 3), np.uint8))) for i in range(5)]
    raw = write_tar(tmp_path / "x.tar", members).read_bytes()
    packed = bytearray(bz2.compress(raw) if fmt == "bz2" else lzma.compress(raw))
    path = tmp_path / f"x.tar.{fmt}"
    path.write_bytes(bytes(packed))
    assert _keys(read(path, "webdataset")) == (["k0", "k1", "k2", "k3", "k4"], [])
    packed[len(packed) // 2] ^= 0x55
    path.write_bytes(bytes(packed))
    keys, errors = _keys(read(path, "webdataset"))
    assert keys == [] and errors and all("compressed data is corrupt" in e.reason or "not a readable tar" in e.reason
                                         for e in errors)


@pytest.mark.parametrize("fmt", ["gz", "bz2", "xz"])
def test_a_full_temporary_folder_is_not_reported_as_a_corrupt_shard(tmp_path, fmt, monkeypatch):
    """A compressed shard is inflated into a temporary file; a few hundred KB of xz can hold GBs.
    A full disk there said the shard's compressed data was corrupt (bzip2, xz), or gave the bare
    errno (gzip): it says where it ran out of room."""
    import bz2
    import errno
    import gzip
    import lzma
    import tempfile

    raw = write_tar(tmp_path / "x.tar", [("a.png", PNG), ("b.png", bytes(1 << 20))]).read_bytes()
    path = tmp_path / f"x.tar.{fmt}"
    path.write_bytes({"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[fmt](raw))

    class Full(io.BytesIO):
        def write(self, data):
            if self.tell() + len(data) > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: Full())
    (e,) = read(path, "webdataset")
    assert e.reason == (f"cannot read source: OSError: [Errno {errno.ENOSPC}] No space left on device in "
                        f"{tempfile.gettempdir()} (TMPDIR), inflating the shard to read it")


@pytest.mark.parametrize("magic, name", [(b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4")])
def test_a_tar_compressed_in_a_way_tarfile_does_not_read_says_so(tmp_path, magic, name):
    """A zstd-compressed shard named .tar was 'not a readable tar file: truncated header'."""
    path = tmp_path / "x.tar"
    path.write_bytes(magic + bytes(range(256)) * 3)
    (e,) = read(path, "webdataset")
    assert e.reason == f"not a readable tar file: it is {name}-compressed, which is not read (use gzip, bzip2 or xz)"


@pytest.mark.parametrize("suffix", [".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".TAR.GZ"])
def test_every_compressed_tar_the_reader_reads_is_known_by_its_name(tmp_path, suffix):
    (tmp_path / f"x{suffix}").write_bytes(b"")
    (shard,) = expand_inputs([str(tmp_path / f"x{suffix}")], "auto", 100)
    assert shard.format == "webdataset"


def test_a_duplicate_sample_is_one_error(tmp_path):
    path = write_tar(tmp_path / "x.tar", [("a.png", PNG), ("b.png", PNG), ("a.jpg", PNG), ("a.cls", b"1"),
                                          ("c.png", PNG)])
    keys, errors = _keys(read(path, "webdataset"))
    assert keys == ["a", "b", "c"]
    (e,) = errors
    assert (e.key, e.member) == ("a", "a.jpg,a.cls") and e.reason.startswith("duplicate key in shard")


def test_a_damaged_parquet_row_group_loses_only_its_rows(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"image": [PNG] * 9, "key": [f"r{i}" for i in range(9)]}), path, row_group_size=3)
    meta = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = meta.dictionary_page_offset or meta.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 16] = b"\xff" * 16  # the second row group's first page header
    path.write_bytes(bytes(data))
    keys, errors = _keys(read(path, "parquet"))
    assert keys == ["r0", "r1", "r2", "r6", "r7", "r8"]
    (e,) = errors
    assert e.member == "rows 3 to 5" and e.reason.startswith("Parquet row group 1 unreadable (rows 3 to 5 not read): ")
    assert "\n" not in e.reason


def test_one_file_named_two_ways_is_read_once(tmp_path):
    write_tar(tmp_path / "x.tar", [("k.png", PNG)])
    (tmp_path / "link.tar").symlink_to(tmp_path / "x.tar")
    shards = expand_inputs((str(tmp_path / "x.tar"), f"{tmp_path}//x.tar", f"{tmp_path}/./x.tar",
                            str(tmp_path / "link.tar"), f"file://{tmp_path}/x.tar"))
    assert [s.path for s in shards] == [str(tmp_path / "x.tar")]


def test_odd_file_names_give_keys_the_tar_reader_takes_back(tmp_path):
    """A folder's file names become keys, and `semjpeg shard` writes them as tar members: a name
    that is only an extension, holds a tab or a newline, or starts like a drive (``c:``), must
    give a key that reading the shard back accepts."""
    from pipeline.pack import pack_folder

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in (".jpg", "sub/.jpg", "tab\tname.png", "new\nline.png", "back\\slash.png", "a.b.png", "c:d.png",
                 "sub/e:f.png"):
        (folder / name).write_bytes(PNG)
    expected = ["_", "a_b", "back_slash", "c_d", "new_line", "sub/_", "sub/e:f", "tab_name"]
    shard = SourceShard(0, str(folder), "folder", tuple(list_images(str(folder))))
    fn = _ReadShardFn(InputConfig(paths=(str(folder),)))
    fn.setup()
    assert sorted(_keys(list(fn.process(shard)))[0]) == expected
    (tar,) = pack_folder(str(folder), str(tmp_path / "sh" / "p"), per_shard=10)
    keys, errors = _keys(read(tar, "webdataset"))
    assert sorted(keys) == expected and errors == []


@pytest.mark.parametrize("size", [1, 2, 1000])
def test_two_files_with_one_key_are_one_sample_and_one_error_however_the_folder_is_chunked(tmp_path, size):
    """a.b.jpg and a_b.png both give the key a_b: in one chunk the second was reported, but in
    two chunks (--folder-shard-size 1, or a chunk boundary between them) both were read."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.b.png", "a_a.png", "a_b.png", "z.png"):
        (folder / name).write_bytes(PNG)
    shards = expand_inputs((str(folder),), folder_shard_size=size)
    fn = _ReadShardFn(InputConfig(paths=(str(folder),)))
    fn.setup()
    out = [o for s in shards for o in fn.process(s)]
    keys, errors = _keys(out)
    assert sorted(keys) == ["a_a", "a_b", "z"]
    assert [(e.member, e.key, e.reason) for e in errors] == [("a_b.png", "a_b", "two files give the same key")]
    assert sorted(f for s in shards for f in s.files) == sorted(p.name for p in folder.iterdir())


def test_hidden_tar_members_are_reported_as_such(tmp_path):
    """macOS's tar adds ``._x.jpg`` beside ``x.jpg``; it was reported as a name without an extension."""
    tar = write_tar(tmp_path / "s.tar", [("x.png", PNG), ("._x.png", b"\0\5\26\7"), ("sub/.y.png", PNG), ("noext", PNG)])
    keys, errors = _keys(read(tar, "webdataset"))
    assert keys == ["x"]
    assert [(e.member, e.reason.split(",")[0]) for e in errors] == [
        ("._x.png", "member name starts with a dot"), ("sub/.y.png", "member name starts with a dot"),
        ("noext", "member name has no extension")]


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow cannot read AVIF (before 11.3, or built without libavif)")
def test_avif_images_are_images(tmp_path):
    """Pillow 12 decodes AVIF, but .avif files were skipped in folders without a word and
    reported as samples without an image in tars."""
    from transforms.images import decode_image

    avif = encode(np.full((16, 16, 3), 90, np.uint8), "AVIF")
    assert decode_image(avif, crop=0).shape == (16, 16, 3)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.avif").write_bytes(avif)
    assert list_images(str(folder)) == ["a.avif"]
    tar = write_tar(tmp_path / "s.tar", [("a.avif", avif), ("a.cls", b"1")])
    (sample,) = read(tar, "webdataset")
    assert isinstance(sample, RawSample) and (sample.member, sample.data) == ("a.avif", avif)


def test_shard_leaves_out_and_reports_a_file_it_cannot_read(tmp_path):
    """A broken link (or a file without read permission) stopped `semjpeg shard` with everything
    unwritten: it is left out, listed with its reason in PREFIX-errors.csv, and the rest is packed
    into full shards."""
    import csv

    from pipeline.pack import pack_folder

    folder = tmp_path / "in"
    folder.mkdir()
    for name in "abcde":
        (folder / f"{name}.png").write_bytes(PNG)
    (folder / "b2.png").symlink_to(tmp_path / "gone.png")
    prefix = str(tmp_path / "sh" / "p")
    tars = pack_folder(str(folder), prefix, per_shard=2)
    assert [_keys(read(t, "webdataset"))[0] for t in tars] == [["a", "b"], ["c", "d"], ["e"]]
    with open(f"{prefix}-errors.csv", newline="") as f:
        assert list(csv.reader(f)) == [["file", "reason"], ["b2.png", "FileNotFoundError: No such file or directory"]]
    (folder / "b2.png").unlink()
    assert len(pack_folder(str(folder), prefix, per_shard=2)) == 3
    assert not (tmp_path / "sh" / "p-errors.csv").exists()  # a clean repack leaves no stale errors
    lost = tmp_path / "lost"
    lost.mkdir()
    (lost / "x.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ValueError, match=r"no image in folder .* could be read \(1 unreadable: see .*q-errors.csv\)"):
        pack_folder(str(lost), str(tmp_path / "sh" / "q"), per_shard=2)
    assert (tmp_path / "sh" / "q-errors.csv").exists() and not (tmp_path / "sh" / "q-00000.tar").exists()


def test_a_file_name_with_a_double_colon_is_a_file_not_a_chained_url(tmp_path):
    """fsspec.open reads ``photo::1.png`` as the chained URL ``photo`` then ``1.png``: the image
    was reported unreadable (naming a file ``photo`` that does not exist), and `semjpeg shard` stopped."""
    from pipeline.pack import pack_folder

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "photo::1.png").write_bytes(PNG)
    (shard,) = expand_inputs((str(folder),))
    fn = _ReadShardFn(InputConfig(paths=(str(folder),)))
    (sample,) = fn.process(shard)
    assert isinstance(sample, RawSample) and (sample.key, sample.data) == ("photo::1", PNG)
    (tar,) = pack_folder(str(folder), str(tmp_path / "sh" / "p"), per_shard=10)
    assert _keys(read(tar, "webdataset")) == (["photo::1"], [])


def test_chained_urls_keep_their_chain(tmp_path):
    """Globs and folders under a chained URL (an archive's members, a cache in front of a store):
    the listed paths lost the chain, so a zip's tars and folder were looked for outside the
    archive and a cache was silently dropped; and a tar read from an archive was closed before
    its first member (``seek of closed file``)."""
    import zipfile

    tar = write_tar(tmp_path / "s.tar", [("a.png", PNG), ("a.cls", b"1")])
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(tar, "inner/s-0.tar")
        z.write(tar, "inner/s-1.tar")
        z.writestr("imgs/b.png", PNG)
        z.writestr("imgs/sub/c.png", PNG)
    tars = expand_inputs((f"zip://inner/*.tar::{archive}",))
    assert [s.path for s in tars] == [f"zip://inner/s-{i}.tar::{archive}" for i in (0, 1)]
    fn = _ReadShardFn(InputConfig(paths=(f"zip://inner/*.tar::{archive}",)))
    fn.setup()
    for shard in tars:
        (sample,) = fn.process(shard)
        assert isinstance(sample, RawSample) and (sample.key, sample.data, sample.label) == ("a", PNG, "1")
    (folder,) = expand_inputs((f"zip://imgs::{archive}",))
    assert (folder.path, folder.format, folder.files) == (f"zip://imgs::{archive}", "folder", ("b.png", "sub/c.png"))
    assert [o.data for o in _ReadShardFn(InputConfig(paths=(folder.path,))).process(folder)] == [PNG, PNG]
    cached = expand_inputs((f"simplecache::{tmp_path}/*.tar",))
    assert [s.path for s in cached] == [f"simplecache::{tar}"]
    (sample,) = _ReadShardFn(InputConfig(paths=(cached[0].path,))).process(cached[0])
    assert sample.data == PNG


def test_an_image_in_two_given_folders_is_read_once(tmp_path):
    """``--input a --input a/sub`` read the images of ``a/sub`` twice (two rows, counted twice in
    the summary), whichever came first."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for name in ("a/x.png", "a/sub/y.png", "a/sub/z.png"):
        (tmp_path / name).write_bytes(PNG)
    a, sub = str(tmp_path / "a"), str(tmp_path / "a" / "sub")
    shards = expand_inputs((a, sub))
    assert [(s.path, s.files) for s in shards] == [(a, ("sub/y.png", "sub/z.png", "x.png"))]
    shards = expand_inputs((sub, f"{tmp_path}/./a"), folder_shard_size=1)
    assert [(s.index, s.path, s.files) for s in shards] == [(0, sub, ("y.png",)), (1, sub, ("z.png",)),
                                                            (2, a, ("x.png",))]


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def _claiming(name: str, size: int, kind: bytes = tarfile.GNUTYPE_SPARSE) -> bytes:
    """A member whose header claims ``size`` bytes that the tar does not hold: an old-GNU sparse
    member (512 bytes stored, ``size`` once expanded), or a long-name header (no data)."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, 512 if kind == tarfile.GNUTYPE_SPARSE else size
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    if kind == tarfile.GNUTYPE_SPARSE:  # one sparse entry (offset 0, 512 bytes), then the real size
        buf[386:410] = b"%011o\0%011o\0" % (0, 512)
        buf[483:495] = b"\x80" + size.to_bytes(11, "big")
        buf[148:156] = b" " * 8
        buf[148:156] = b"%06o\0 " % sum(buf)
        return bytes(buf) + b"\0" * 512
    return bytes(buf)


def test_tar_members_are_read_only_when_used_and_within_their_limit(tmp_path):
    """A tar header can claim any size: a 5 KB tar with a GNU sparse member stating 1 TB made the
    reader allocate it (MemoryError, and the rest of the shard lost; a size that fits in memory
    killed the worker), and a plain multi-GB member was read whole before any check. Images over
    8 bytes per --max-pixels pixel (+ 64 MiB) and .json or label members over 1 MiB are reported
    unread; members a sample does not use (.npy, .txt) are never read."""
    tb = 1 << 40
    path = tmp_path / "s.tar"
    path.write_bytes(b"".join([
        _member("a.png", PNG), _claiming("big.png", tb), _member("big.cls", b"1"),
        _member("t.png", PNG), _claiming("t.npy", tb), _member("j.png", PNG),
        _member("j.json", b"[" + b"{}," * (1 << 19) + b"{}]"), _member("c.png", PNG), b"\0" * 1024]))
    keys, errors = _keys(read(path, "webdataset"))
    assert keys == ["a", "t", "c"]
    assert [(e.key, e.member, e.reason) for e in errors] == [
        ("big", "big.png,big.cls", f"member big.png of {tb} bytes is over {8 * 89_478_485 + (64 << 20)} bytes "
                                   "(8 bytes per --max-pixels pixel, plus 64 MiB); not read"),
        ("j", "j.png,j.json", "member j.json of 1572868 bytes is over 1048576 bytes (the limit for .json and "
                              "label members); not read")]


def test_a_huge_long_name_or_pax_header_is_damage_not_read(tmp_path):
    """tarfile reads a GNU long name or a pax header whole, whatever size its header states."""
    for kind in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
        path = tmp_path / "h.tar"
        path.write_bytes(_member("a.png", PNG) + _claiming("././@LongLink", 1 << 40, kind) + _member("b.png", PNG))
        (e,) = read(path, "webdataset")
        assert (e.key, e.member) == ("a", "a.png")
        assert "unreadable header at byte 1024 (a long-name or pax header of 1099511627776 bytes, over 1048576)" in e.reason


def _pax(**records: str) -> bytes:
    """A pax extended header (``--format=pax``) for the member after it."""
    body = b""
    for key, value in records.items():
        record = f" {key.replace('__', '.')}={value}\n".encode()
        n = len(record) + 1
        while len(str(n)) + len(record) != n:
            n += 1
        body += str(n).encode() + record
    info = tarfile.TarInfo("pax")
    info.type, info.size = tarfile.XHDTYPE, len(body)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512)


@pytest.mark.parametrize("name", ["s.png", "../x.png"])
def test_a_member_claiming_more_data_than_the_tar_holds_ends_the_read_at_once(tmp_path, name):
    """A member the reader skips (an unsafe name, an image over its limit) was skipped by
    tarfile's streaming reader, which reads its claimed size and, past the end of the data,
    reads nothing forever: a pax header claiming 10^20 bytes hung the job. The sample before it
    is kept or reported."""
    import threading

    path = tmp_path / "x.tar"
    path.write_bytes(_member("a.png", PNG) + _pax(size="1" + "0" * 20) + _member(name, b"x")
                     + _member("c.png", PNG) + b"\0" * 1024)
    out = []
    worker = threading.Thread(target=lambda: out.extend(read(path, "webdataset")), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the reader never ended"
    keys, errors = _keys(out)
    assert keys == (["a"] if name == "s.png" else [])
    assert [e.key for e in errors][-1] == ("s" if name == "s.png" else "a")
    assert errors[-1].reason.startswith(f"tar cut short inside member {name}: ")


def test_a_malformed_pax_header_is_damage_and_the_sample_before_it_is_reported(tmp_path):
    """A pax header's sparse map that is not numbers raised a ValueError past the reader: the
    shard was one 'cannot read source' error, and the sample read before it neither kept nor
    reported."""
    path = tmp_path / "x.tar"
    path.write_bytes(_member("a.png", PNG) + _pax(GNU__sparse__map="x,y", GNU__sparse__size="10")
                     + _member("s.png", PNG) + _member("c.png", PNG) + b"\0" * 1024)
    (e,) = read(path, "webdataset")
    assert (e.key, e.member) == ("a", "a.png")
    assert e.reason.startswith("tar cut short or corrupt: it has an unreadable header at byte ")
    assert "(ValueError: invalid literal for int() with base 10: 'x') after member a.png" in e.reason


def test_a_tar_of_many_members_is_read_in_bounded_memory(tmp_path):
    """A streaming TarFile keeps every header it has read: about 600 bytes a member, 6 GB for a
    shard of ten million tiny members."""
    import tracemalloc

    path = tmp_path / "many.tar"
    path.write_bytes(b"".join(tarfile.TarInfo(f"k{i}.txt").tobuf() for i in range(10000)) + b"\0" * 1024)
    fn = _ReadShardFn(InputConfig(paths=(str(path),)))
    tracemalloc.start()
    try:
        count = sum(1 for _ in fn.process(SourceShard(0, str(path), "webdataset")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 10000 and peak < 4 << 20, peak  # 5.9 MB before, 1.1 MB now (mostly the keys seen)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_folder_file_that_is_no_regular_file_is_reported_not_read(tmp_path):
    """A FIFO named ``x.jpg`` blocked the reader (and ``semjpeg shard``) forever, and a link to
    ``/dev/zero`` read until memory ran out."""
    import socket
    import threading

    from pipeline.pack import pack_folder

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(PNG)
    os.mkfifo(folder / "fifo.jpg")
    (folder / "null.png").symlink_to("/dev/null")  # /dev/zero is the same case, and never ends
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.png"))
    files = tuple(list_images(str(folder)))
    results = {}

    def run():
        results["read"] = _ReadShardFn(InputConfig(paths=(str(folder),))).process(SourceShard(0, str(folder), "folder", files))
        results["read"] = list(results["read"])
        results["pack"] = pack_folder(str(folder), str(tmp_path / "sh" / "p"), per_shard=10)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(30)
    try:
        assert not worker.is_alive(), "the reader blocked on the FIFO"
    finally:
        with contextlib.suppress(OSError):  # a blocked reader gets its end of file
            os.close(os.open(folder / "fifo.jpg", os.O_WRONLY | os.O_NONBLOCK))
        sock.close()
    keys, errors = _keys(results["read"])
    assert keys == ["a"]
    assert [(e.member, e.reason) for e in errors] == [
        (name, "not a regular file (a FIFO, socket or device); not read") for name in ("fifo.jpg", "null.png", "sock.png")]
    assert [_keys(read(t, "webdataset"))[0] for t in results["pack"]] == [["a"]]
    errors_csv = (tmp_path / "sh" / "p-errors.csv").read_text()
    assert errors_csv.count("not a regular file") == 3


def test_images_over_the_size_limit_are_reported_from_folders_and_parquet(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.read_shards.max_image_bytes", lambda max_pixels: 100)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(PNG)
    (tmp_path / "in" / "b.png").write_bytes(bytes(101))
    keys, (e,) = _keys(list(_ReadShardFn(InputConfig(paths=(str(tmp_path / "in"),))).process(
        SourceShard(0, str(tmp_path / "in"), "folder", ("a.png", "b.png")))))
    assert keys == ["a"] and e.reason == ("the file of 101 bytes is over 100 bytes (8 bytes per --max-pixels "
                                          "pixel, plus 64 MiB); not read")
    keys, (e,) = _keys(read(parquet(tmp_path, image=[PNG, bytes(101)]), "parquet"))
    assert keys == ["x-00000000"] and (e.member, e.reason) == (
        "row 1", "the image of 101 bytes is over 100 bytes (8 bytes per --max-pixels pixel, plus 64 MiB); not read")


class _Unseekable(io.RawIOBase):
    """A file read as a stream that cannot seek (fsspec's HTTP file on a server without range
    requests)."""

    def __init__(self, f):
        self.f = f

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self):
        self.f.close()
        super().close()


@pytest.mark.parametrize("compress", ["", "gz"])
def test_a_shard_that_cannot_seek_is_read(tmp_path, monkeypatch, compress):
    """The reader read the first bytes to tell the compression, then the seek back failed and
    those bytes were lost: every sample of such a stream was 'not a readable tar file: bad
    checksum'. It is copied to a temporary file and read from there, so a member claiming 10^20
    bytes also ends the read at once."""
    import gzip
    import threading

    import pipeline.read_shards as rs

    raw = _member("a.png", PNG) + _member("b.png", PNG) + _pax(size="1" + "0" * 20) + _member("../x.png", b"x") + b"\0" * 1024
    path = tmp_path / ("x.tar" + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(raw) if compress else raw)
    opened = []

    def unseekable(p, *a, **k):
        f = io.BufferedReader(_Unseekable(open(p, "rb")))
        opened.append(f)
        return f

    monkeypatch.setattr(rs, "open_binary", unseekable)
    out = []
    worker = threading.Thread(target=lambda: out.extend(read(path, "webdataset")), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the reader never ended"
    assert opened and not opened[0].seekable()
    keys, errors = _keys(out)
    assert keys == ["a"] and sorted(str(e.key) for e in errors) == ["None", "b"], errors
    assert any(e.reason.startswith("tar cut short inside member ../x.png: ") for e in errors), errors
