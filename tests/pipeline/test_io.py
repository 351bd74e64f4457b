"""Output folders: where staging goes, what an output may not be, single output files."""
from __future__ import annotations

import json

import fsspec
import pytest

from pipeline.evaluate import run_evaluate
from pipeline.io import SUCCESS, OutputDir, check_output_file
from tests.pipeline.conftest import ObjectStore, tiny_config
from tests.shards import good_members, write_tar


def test_staging_of_a_url_stays_on_its_filesystem():
    out = OutputDir("memory://ev", "r1")
    assert out.staging == "memory:///.ev.staging-r1"
    assert OutputDir("memory://ev/run/", "r1").staging == "memory:///ev/.run.staging-r1"


def test_evaluate_into_a_one_component_memory_url(tmp_path, photos, fnapi):
    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    fs = fsspec.filesystem("memory")
    try:
        summary = run_evaluate(tiny_config([str(tmp_path / "a.tar")], "memory://ev", attacks=(), defenses=()), fnapi)
        assert summary["samples"] == 1
        assert fs.exists("/ev/_SUCCESS") and fs.exists("/ev/summary.json")
        assert not [p for p in fs.ls("/", detail=False) if "staging" in p]
        assert not (tmp_path / "memory:").exists()
    finally:
        for p in fs.ls("/", detail=False):
            if "ev" in p:
                fs.rm(p, recursive=True)


@pytest.mark.parametrize("output", ["/", "memory://"])
def test_a_filesystem_root_is_never_an_output(output):
    with pytest.raises(ValueError, match="root"):
        OutputDir(output, "r1")


@pytest.mark.parametrize("output", ["memory://res/o[1]", "memory://res/o*", "memory://r?s/o"])
def test_glob_characters_in_a_url_output_are_refused_before_anything_is_written(output):
    """fsspec expands them in an object store's listings and removals: such an output could not be
    written (staging folders left behind), and a rerun failed removing the previous output."""
    import fsspec

    with pytest.raises(ValueError, match=r"glob characters \(\*, \?, \[\) in a URL's path are not supported"):
        OutputDir(output, "r1")
    assert not fsspec.filesystem("memory").exists("/res") and not fsspec.filesystem("memory").exists("/r?s")
    OutputDir("/tmp/semjpeg-[local]-output", "r1")  # a local name is taken literally


@pytest.mark.parametrize("relative", [".", "..", "sub/..", "./"])
def test_the_working_folder_and_its_parents_are_never_outputs(tmp_path, monkeypatch, relative):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    out = OutputDir(relative, "r1")
    with pytest.raises(ValueError, match="current folder or one of its parents"):
        out.check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # nothing staged anywhere
    assert not any(".staging-" in p.name for p in tmp_path.parent.iterdir())


def test_a_relative_output_stages_beside_its_normalized_path(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path)
    assert OutputDir("a/b/../out", "r1").staging == str(tmp_path / "a/.out.staging-r1")


def test_an_output_holding_an_input_is_refused(tmp_path, photos, fnapi):
    out = tmp_path / "out"
    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    run_evaluate(tiny_config([str(tmp_path / "a.tar")], out, attacks=(), defenses=()), fnapi)
    shard = out / "shards/clean/none/shard-00000.tar"
    name, data = good_members(photos)[0]
    (out / "labels.csv").write_text(f"file,label\n{name},1\n")
    (tmp_path / "imgs").mkdir()  # a labels CSV comes with folder inputs only
    (tmp_path / "imgs" / name).write_bytes(data)
    for inputs, kw in (([str(out / "shards/*/*/*.tar")], {}), ([str(shard)], {}),
                       ([f"simplecache::{shard}"], {}), ([f"simplecache::file://{out}/shards/*/*/*.tar"], {}),
                       ([str(tmp_path / "imgs")], {"labels_csv": str(out / "labels.csv")})):
        with pytest.raises(ValueError, match="holds the input"):
            run_evaluate(tiny_config(inputs, out, attacks=(), defenses=(), **kw), fnapi)
    assert shard.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "imgs", "out"]


@pytest.mark.parametrize("run_id", ["x/y", "../x", "", ".hidden", "a b", "x" * 129])
def test_unsafe_run_ids_are_refused_before_anything_is_written(tmp_path, run_id):
    with pytest.raises(ValueError, match="run id"):
        tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", run_id=run_id)
    with pytest.raises(ValueError, match="run id"):
        OutputDir(str(tmp_path / "out"), run_id)
    assert list(tmp_path.iterdir()) == []


def test_single_output_files_fail_early_with_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="a file stands where a parent folder should be"):
        check_output_file(str(tmp_path / "afile/r.html"))
    with pytest.raises(ValueError, match="is a folder"):
        check_output_file(str(tmp_path))
    check_output_file(str(tmp_path / "new/r.html"))
    assert (tmp_path / "new").is_dir()


def _finished(folder, run_id, text="old"):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(text)
    (folder / "_SUCCESS").write_text(run_id + "\n")


def test_an_interrupted_commit_puts_the_previous_output_back(tmp_path, monkeypatch):
    """A signal between moving the previous output aside and moving the new one in, or a
    failure there, must not lose the previous output: commit and abandon both restore it."""
    from fsspec.implementations.local import LocalFileSystem

    final = tmp_path / "out"
    _finished(final, "r0")
    real_mv = LocalFileSystem.mv
    for who in ("commit", "abandon"):
        out = OutputDir(str(final), f"r1{who}")
        out.check()
        (tmp_path / f".out.staging-r1{who}" / "summary.json").write_text("new")
        calls = []

        def mv(self, a, b, **kw):
            calls.append(b)
            if len(calls) == 2:  # the new output's move
                if who == "abandon":  # the caller's handler runs; the commit's own guard does not see it
                    monkeypatch.setattr(LocalFileSystem, "mv", real_mv)
                    out.abandon()
                    raise SystemExit
                raise KeyboardInterrupt
            return real_mv(self, a, b, **kw)

        monkeypatch.setattr(LocalFileSystem, "mv", mv)
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            out.commit()
        monkeypatch.setattr(LocalFileSystem, "mv", real_mv)
        out.abandon()
        assert (final / "summary.json").read_text() == "old" and (final / "_SUCCESS").read_text() == "r0\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not out.committed()


def test_a_commit_clears_what_killed_runs_left(tmp_path):
    final = tmp_path / "out"
    _finished(final, "r0")
    (final / "nightly.json.tmp-0a1b2c3d").write_text("{")  # write_bytes killed mid-write
    _finished(tmp_path / "out.old-r9", "r8")  # a commit killed before it removed the copy
    (tmp_path / "out.older").mkdir()  # not one of ours
    out = OutputDir(str(final), "r1")
    out.check()
    (tmp_path / ".out.staging-r1" / "summary.json").write_text("new")
    out.commit()
    assert out.committed() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.older"]
    (tmp_path / "out.old-v1").mkdir()  # named like a copy, but someone's data
    (tmp_path / "out.old-v1" / "thesis.tex").write_text("precious")
    (tmp_path / "out.old-notes.txt").write_text("precious")
    (tmp_path / ".out.staging-r2").mkdir()
    (tmp_path / ".out.staging-r2" / "summary.json").write_text("newer")
    OutputDir(str(final), "r2").commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.old-notes.txt", "out.old-v1", "out.older"]
    assert (tmp_path / "out.old-v1" / "thesis.tex").read_text() == "precious"
    (final / "notes.tmp-0a1b2c3d").write_text("x")  # a temporary name of a file semjpeg does not write
    with pytest.raises(ValueError, match=r"did not write \(notes.tmp-0a1b2c3d\)"):
        OutputDir(str(final), "r3").check()


def test_abandon_removes_the_folders_check_created(tmp_path):
    out = OutputDir(str(tmp_path / "a" / "b" / "out"), "r1")
    out.check()
    assert (tmp_path / "a" / "b" / ".out.staging-r1").is_dir()
    out.abandon()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_text("x")
    out = OutputDir(str(tmp_path / "a" / "b" / "out"), "r2")
    out.check()
    out.abandon()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep"]


def test_an_interrupt_after_the_commit_is_not_a_failure(tmp_path, photos, fnapi, monkeypatch):
    """The run is complete once its output is committed: a Ctrl-C landing after that (before
    the runner returns) leaves the output in place and the job reports it as done."""
    import apache_beam as beam

    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    real_run = beam.Pipeline.run

    class Late:
        def __init__(self, result):
            self.result = result

        def wait_until_finish(self):
            self.result.wait_until_finish()
            raise KeyboardInterrupt

    monkeypatch.setattr(beam.Pipeline, "run", lambda self, *a, **kw: Late(real_run(self, *a, **kw)))
    config = tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", attacks=(), defenses=())
    summary = run_evaluate(config, fnapi)
    assert summary["samples"] == 1 and (tmp_path / "out" / "_SUCCESS").read_text().strip() == config.run_id


def test_a_failed_rerun_with_the_same_run_id_is_a_failure(tmp_path, photos, fnapi, monkeypatch):
    """A rerun with the output's own --run-id (as byte-identical reruns need) found that id in
    the output's _SUCCESS when it failed or was interrupted before its commit, took the previous
    run for its own committed one and reported it complete, with that run's summary."""
    import apache_beam as beam

    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    first = run_evaluate(tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", run_id="fixed"), fnapi)
    real_run = beam.Pipeline.run

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(beam.Pipeline, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", run_id="fixed", attacks=()), fnapi)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == first  # the previous output, untouched
    monkeypatch.setattr(beam.Pipeline, "run", real_run)
    second = run_evaluate(tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", run_id="fixed", attacks=()), fnapi)
    assert [row["attack"] for row in second["table"]] == ["clean", "clean"]


def test_an_interrupt_while_the_previous_output_is_removed_keeps_the_new_one(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    final = tmp_path / "out"
    _finished(final, "r0")
    out = OutputDir(str(final), "r1")
    out.check()
    (tmp_path / ".out.staging-r1" / "summary.json").write_text("new")
    real_rm = LocalFileSystem.rm

    def rm(self, path, *a, **kw):
        if ".old-" in str(path):
            real_rm(self, str(path) + "/summary.json")  # part of it gone, as on an object store
            raise KeyboardInterrupt
        return real_rm(self, path, *a, **kw)

    monkeypatch.setattr(LocalFileSystem, "rm", rm)
    with pytest.raises(KeyboardInterrupt):
        out.commit()
    monkeypatch.setattr(LocalFileSystem, "rm", real_rm)
    out.abandon()
    assert out.committed() and (final / "summary.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_staging_folder_left_by_a_run_of_the_same_id_is_never_committed(tmp_path, photos, fnapi):
    """A run killed outright leaves its staging folder; a rerun with the same --run-id (as
    byte-identical reruns need) used to write into it and commit the killed run's files with its own."""
    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    left = tmp_path / ".out.staging-fixed" / "stats"
    left.mkdir(parents=True)
    (left / "part-00007.json").write_text("{}")
    config = tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", attacks=(), defenses=(), run_id="fixed")
    with pytest.raises(ValueError, match="staging folder .* of run fixed exists"):
        run_evaluate(config, fnapi)
    assert not (tmp_path / "out").exists() and (left / "part-00007.json").exists()


def test_a_commit_leaves_out_what_killed_writes_left(tmp_path):
    """A Dask worker killed in the middle of a write leaves write_bytes' temporary file in the
    staging folder; the retried task writes the file again, and the temporary one is not committed."""
    from pipeline.io import write_bytes

    final = tmp_path / "out"
    out = OutputDir(str(final), "r1")
    out.check()
    written = [out.path("metadata", "part-00000.parquet"), out.path("summary.json")]
    for path in written:
        write_bytes(path, b"x")
    killed = tmp_path / ".out.staging-r1" / "metadata" / "part-00000.parquet.tmp-0a1b2c3d"
    killed.write_bytes(b"half")
    out.commit(written)
    assert sorted(p.name for p in (final / "metadata").iterdir()) == ["part-00000.parquet"]


def test_a_commit_leaves_out_what_lost_attempts_wrote(tmp_path):
    """A Dask worker lost after a stage wrote its files has its tasks run again, upstream ones
    too; a failure that was transient (an image out of GPU memory) then does not recur, and the
    lost attempt's errors/part-00000.parquet, which no kept attempt wrote, was committed: the
    image both processed and reported, beside stats and a summary that count no error."""
    from pipeline.io import write_bytes

    final = tmp_path / "out"
    out = OutputDir(str(final), "r1")
    out.check()
    written = [out.path("metadata", "part-00000.parquet"), out.path("stats", "part-00000.json"),
               out.path("summary.json")]
    for path in [*written, out.path("errors", "part-00000.parquet"), out.path("stats", "part-00001.json.tmp-0a1b2c3d")]:
        write_bytes(path, b"x")
    out.commit(written)
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == [
        "_SUCCESS", "metadata", "metadata/part-00000.parquet", "stats", "stats/part-00000.json", "summary.json"]


def test_a_stage_still_running_after_the_run_was_abandoned_commits_nothing(tmp_path):
    """On a Dask cluster the last stage goes on after the interrupted job abandoned its run: it
    recreated the staging folder with its summary.json alone and committed that, _SUCCESS and all."""
    from pipeline.io import write_bytes

    final = tmp_path / "out"
    _finished(final, "r0")
    out = OutputDir(str(final), "r1")
    out.check()
    written = [out.path("shards", "clean", "none", "shard-00000.tar"), out.path("metadata", "part-00000.parquet")]
    for path in written:
        write_bytes(path, b"x")
    out.abandon()  # the job, interrupted
    write_bytes(out.path("summary.json"), b"{}")  # the last stage, on a worker, goes on
    with pytest.raises(RuntimeError, match="lacks 2 of the run's files"):
        out.commit(written + [out.path("summary.json")])
    assert (final / "summary.json").read_text() == "old" and (final / "_SUCCESS").read_text() == "r0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    out = OutputDir(str(final), "r2")
    out.check()
    written = [out.path("shards", "clean", "none", "shard-00000.tar"), out.path("summary.json")]
    for path in written:
        write_bytes(path, b"x")
    out.commit(written)
    assert out.committed()


def test_an_output_whose_files_cannot_be_removed_is_refused_before_any_work(tmp_path, photos, fnapi, read_only):
    """Replacing an output removes its files: in a read-only folder of the previous output the
    run went all the way, committed, then failed removing the previous copy (status 2, a
    traceback, the half-removed copy left beside the output as OUT.old-<run id>)."""
    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    final = tmp_path / "out"
    run_evaluate(tiny_config([str(tmp_path / "a.tar")], final, attacks=(), defenses=(), run_id="r0"), fnapi)
    before = sorted(p.relative_to(final) for p in final.rglob("*"))
    for locked in (final / "metadata", final):
        read_only(locked)
        config = tiny_config([str(tmp_path / "a.tar")], final, attacks=(), defenses=(), run_id="r1")
        with pytest.raises(ValueError, match=f"output {final} cannot be replaced: {locked} is read-only"):
            run_evaluate(config, fnapi)
        assert (final / "_SUCCESS").read_text() == "r0\n"
        assert sorted(p.relative_to(final) for p in final.rglob("*")) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "out"]


def test_a_write_that_finds_no_room_leaves_no_temporary_file(tmp_path):
    """A full disk (here a file-size limit) while write_bytes wrote its temporary file left that
    file behind: beside `semjpeg shard`'s tars (`dev-00000.tar.tmp-...`, which a `dev-*` glob
    reads) or a report. The previous file stays."""
    import errno
    import resource

    from pipeline.io import write_bytes

    (tmp_path / "dev-00000.tar").write_bytes(b"earlier")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as e:
            write_bytes(str(tmp_path / "dev-00000.tar"), b"x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert e.value.errno == errno.EFBIG
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("dev-00000.tar", b"earlier")]


def test_an_output_that_is_a_symbolic_link_is_written_where_it_points(tmp_path, photos, fnapi):
    """`results -> /mnt/big/results`: the commit renamed the link itself and put a real folder in
    its place, on the link's filesystem (staged beside the link too), and left the previous output
    where the link pointed, never replaced."""
    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    _finished(tmp_path / "big" / "results", "r0")
    (tmp_path / "results").symlink_to(tmp_path / "big" / "results")
    config = tiny_config([str(tmp_path / "a.tar")], tmp_path / "results", attacks=(), defenses=(), run_id="r1")
    run_evaluate(config, fnapi)
    assert (tmp_path / "results").is_symlink()
    assert (tmp_path / "big" / "results" / "_SUCCESS").read_text() == "r1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "big", "results"]
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["results"]


def _finished_object(fs, prefix, run_id, success=True):
    fs.pipe(f"{prefix}/summary.json", run_id.encode())
    for i in range(3):
        fs.pipe(f"{prefix}/metadata/part-{i:05d}.parquet", run_id.encode())
        fs.pipe(f"{prefix}/shards/a/b/shard-{i:05d}.tar", run_id.encode())
    if success:
        fs.pipe(f"{prefix}/_SUCCESS", f"{run_id}\n".encode())


def _objects(fs, prefix):
    return {p[len(prefix) + 1:]: fs.cat(p).decode().strip() for p in fs.find(prefix)}


def _rerun_on_a_store(objstore, failing_copy=None):
    """A finished output r0 at objstore://bk/out and run r1's written staging folder, checked;
    ``failing_copy(path, source)`` (whether the store's copy of it fails with a 503) hooked in.
    Returns (the previous output's objects, the OutputDir, the copies seen)."""
    _finished_object(objstore, "/bk/out", "r0")
    before = _objects(objstore, "/bk/out")
    out = OutputDir("objstore://bk/out", "r1")
    out.check()
    _finished_object(objstore, "/bk/.out.staging-r1", "r1", success=False)
    copied = []

    def fail(op, path, source):
        if op == "cp" and failing_copy is not None and failing_copy(path, source, copied):
            raise OSError("503 Service Unavailable")

    ObjectStore.hook = staticmethod(fail)
    return before, out, copied


def test_on_an_object_store_success_is_never_seen_beside_part_of_an_output(objstore):
    """A move there copies and deletes object by object: the previous output's _SUCCESS stayed
    while its other files were deleted, where a reader polling for _SUCCESS read part of a run."""
    _finished_object(objstore, "/bk/out", "r0")
    out = OutputDir("objstore://bk/out", "r1")
    out.check()
    _finished_object(objstore, "/bk/.out.staging-r1", "r1", success=False)
    seen = []

    def reader(op, path, source):
        files = _objects(objstore, "/bk/out")
        if SUCCESS in files:
            seen.append(len(files) == 8 and len(set(files.values())) == 1)

    ObjectStore.hook = staticmethod(reader)
    out.commit()
    assert seen and all(seen)
    assert out.committed() and set(_objects(objstore, "/bk/out").values()) == {"r1"}
    assert sorted(objstore.store) == sorted(f"/bk/out/{p}" for p in _objects(objstore, "/bk/out"))


@pytest.mark.parametrize("at", [1, 4, 7])
def test_a_commit_cut_short_copying_the_previous_output_aside_keeps_it(objstore, at):
    """Its copy aside stopped after ``at`` of 8 objects: the restore removed the whole previous
    output and moved back that partial copy."""
    def aside(path, source, copied):
        if ".old-" in path:
            copied.append(path)
        return ".old-" in path and len(copied) == at

    before, out, _ = _rerun_on_a_store(objstore, aside)
    with pytest.raises(OSError, match="503"):
        out.commit()
    ObjectStore.hook = None
    out.abandon()
    assert _objects(objstore, "/bk/out") == before and not out.committed()
    assert all(p.startswith("/bk/out/") for p in objstore.store)


def test_a_retried_commit_on_an_object_store_starts_from_the_previous_output(objstore, monkeypatch):
    """A commit killed while it moved the new output in (a Dataflow worker lost: no handler ran),
    retried, and failing again: the previous output comes back whole, not mixed with the files
    the first attempt had moved in."""
    def moving_in(path, source, copied):
        if source.startswith("/bk/.out.staging-r1/"):
            copied.append(path)
        return source.startswith("/bk/.out.staging-r1/") and len(copied) == 4

    before, out, copied = _rerun_on_a_store(objstore, moving_in)
    with monkeypatch.context() as m:
        m.setattr(OutputDir, "_restore", lambda self, fs, final: False)  # killed: nothing cleaned up
        with pytest.raises(OSError):
            out.commit()
    copied.clear()
    with pytest.raises(OSError):
        out.commit()
    ObjectStore.hook = None
    out.abandon()
    assert _objects(objstore, "/bk/out") == before and not out.committed()
    assert all(p.startswith("/bk/out/") for p in objstore.store)


def test_an_empty_output_folder_on_a_store_with_folders_is_replaced(monkeypatch):
    """memory:// (and a bucket with folder objects) keeps an empty folder: moving it aside moved no
    file and made no copy, and the commit, its output in place, failed removing that copy."""
    fs = fsspec.filesystem("memory")
    monkeypatch.setattr(type(fs), "store", {})
    monkeypatch.setattr(type(fs), "pseudo_dirs", [""])
    fs.makedirs("/rv/out")
    out = OutputDir("memory://rv/out", "r1")
    out.check()
    fs.pipe("/rv/.out.staging-r1/summary.json", b"{}")
    out.commit([out.path("summary.json")])
    assert out.committed() and sorted(fs.find("/rv")) == ["/rv/out/_SUCCESS", "/rv/out/summary.json"]


def test_a_commit_whose_success_marker_fails_is_retried_whole(objstore, tmp_path, monkeypatch):
    """Writing _SUCCESS failed once (a transient 503) after the run's files were moved in: the
    failed commit deleted them with the restore, and every retry (a Dataflow bundle's) then failed
    on a staging folder without the run's files, the run lost. They go back to staging."""
    written = []

    def once(op, path, source):
        if op == "write" and path == "/bk/out/_SUCCESS" and not written:
            written.append(path)
            raise OSError("503 Service Unavailable")

    before, out, _ = _rerun_on_a_store(objstore)
    ObjectStore.hook = staticmethod(once)
    with pytest.raises(OSError, match="503"):
        out.commit()
    assert _objects(objstore, "/bk/out") == before and not out.committed()
    out.commit()  # the retry
    ObjectStore.hook = None
    assert out.committed() and set(_objects(objstore, "/bk/out").values()) == {"r1"}
    assert all(p.startswith("/bk/out/") for p in objstore.store)

    # The same on a local disk.
    import fsspec.implementations.local as local

    final = tmp_path / "out"
    final.mkdir()
    (final / "summary.json").write_text("r0")
    (final / SUCCESS).write_text("r0\n")
    out = OutputDir(str(final), "r1")
    out.check()
    (tmp_path / ".out.staging-r1").mkdir(exist_ok=True)
    (tmp_path / ".out.staging-r1" / "summary.json").write_text("r1")
    real_open = local.LocalFileSystem.open
    failed = []

    def open_once(self, path, mode="rb", **kw):
        if "w" in mode and str(path).endswith(f"out/{SUCCESS}") and not failed:
            failed.append(path)
            raise OSError(28, "No space left on device")
        return real_open(self, path, mode, **kw)

    monkeypatch.setattr(local.LocalFileSystem, "open", open_once)
    with pytest.raises(OSError):
        out.commit([out.path("summary.json")])
    assert (final / "summary.json").read_text() == "r0" and not out.committed()
    out.commit([out.path("summary.json")])
    assert out.committed() and (final / "summary.json").read_text() == "r1"


def test_a_commit_that_cannot_remove_its_staging_on_a_store_still_commits(objstore, caplog):
    """Every object copied into the output, deleting the staging copies failed: the output is
    whole, so it is committed (a warning says what to remove), not undone."""
    def staging_rm(op, path, source):
        if op == "rm" and path.startswith("/bk/.out.staging-r1/"):
            raise OSError("503 Service Unavailable")

    before, out, _ = _rerun_on_a_store(objstore)
    ObjectStore.hook = staticmethod(staging_rm)
    out.commit()
    ObjectStore.hook = None
    assert out.committed() and set(_objects(objstore, "/bk/out").values()) == {"r1"}
    assert "removing what is left of it failed" in caplog.text
