"""The evaluate pipeline end to end on the tiny CNN, hostile inputs included."""
from __future__ import annotations

import json
import re
import tarfile

import pyarrow.parquet as pq
import pytest

from pipeline.evaluate import run_evaluate
from tests.pipeline.conftest import tiny_config
from tests.shards import GOOD_KEYS, cut_tar, good_members, hostile_members, write_tar


def read_dataset(folder):
    files = sorted(folder.glob("*.parquet"))
    return pq.read_table(files).to_pylist() if files else []


def tar_names(path):
    with tarfile.open(path) as tf:
        return tf.getnames()


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, photos):
    from apache_beam.options.pipeline_options import PipelineOptions

    tmp = tmp_path_factory.mktemp("hostile")
    inputs = tmp / "in"
    inputs.mkdir()
    bad, expect = hostile_members(photos)
    write_tar(inputs / "a.tar", good_members(photos) + bad)
    # Second shard: three whole samples, then a cut inside the fourth's image.
    cut = good_members(photos, prefix="cut")[:6] + [("cut_lost.png", b"\x89PNG" + b"x" * 5000), ("cut_after.cls", b"1")]
    cut_tar(inputs / "b.tar", cut, cut_member=6)
    (inputs / "c.tar").write_bytes(b"")  # empty file
    out = tmp / "out"
    summary = run_evaluate(tiny_config([str(inputs / "*.tar")], out), PipelineOptions(["--runner", "FnApiRunner"]))
    return tmp, out, summary, expect


def test_every_good_input_gives_every_variant(hostile_run):
    _, out, summary, _ = hostile_run
    rows = read_dataset(out / "metadata")
    keys = sorted({r["key"] for r in rows})
    assert keys == sorted(GOOD_KEYS + ["cut_jpg", "cut_png", "cut_gray"])
    variants = {(r["attack_spec"], r["defense_spec"]) for r in rows}
    assert variants == {(a, d) for a in ("clean", "fgsm:eps=4/255") for d in ("none", "jpeg:quality=50")}
    assert len(rows) == len(keys) * 4
    for r in rows:
        assert r["model"] == "tests.tiny:build" and r["run_id"] == summary["run_id"]
        assert (r["bytes"] > 0 and r["bpp"] > 0 and 0 < r["ssim"] <= 1 and r["width"] == r["height"] == 64)
        assert len(r["top5"]) == 5 and r["top5"][0]["label"] == r["pred"]
        assert r["agree_clean"] == (r["pred"] == r["clean_pred"])
        if r["attack"] == "clean":
            assert r["linf"] == 0 and r["rmse"] == 0 and r["success"] is None
        else:
            assert 0 < r["linf"] <= 4 / 255 + 1e-6 and r["rmse"] > 0 and r["success"] is not None
        if r["defense"] == "none" and r["attack"] == "clean":
            assert r["psnr"] == float("inf") and r["agree_clean"]
    labeled = {r["key"]: r["label"] for r in rows}
    assert labeled["good_jpg"] == 1 and labeled["good_nolabel"] is None


def test_every_bad_input_is_reported_with_its_reason(hostile_run):
    _, out, summary, expect = hostile_run
    errors = read_dataset(out / "errors")
    for ident, (stage, pattern) in expect.items():
        hits = [e for e in errors if ident in (e["key"], e["member"])]
        assert len(hits) == 1, (ident, errors)
        assert hits[0]["stage"] == stage and re.search(pattern, hits[0]["reason"]), hits[0]
    cut = [e for e in errors if e["source"].endswith("b.tar")]
    assert len(cut) == 1 and "cut short inside member cut_lost.png" in cut[0]["reason"]
    empty = [e for e in errors if e["source"].endswith("c.tar")]
    assert len(empty) == 1 and "not a readable tar" in empty[0]["reason"]
    assert sum(summary["errors"].values()) == len(errors) == len(expect) + 2


def test_shards_are_webdataset_and_nothing_escapes(hostile_run):
    tmp, out, _, _ = hostile_run
    assert (out / "_SUCCESS").exists() and (out / "summary.json").exists()
    shards = sorted((out / "shards").rglob("*.tar"))
    rel = {s.relative_to(out / "shards").as_posix() for s in shards}
    assert rel == {f"{a}/{d}/shard-0000{i}.tar" for a in ("clean", "fgsm-eps=4_255")
                   for d in ("none", "jpeg-quality=50") for i in (0, 1)}
    names = tar_names(out / "shards/fgsm-eps=4_255/jpeg-quality=50/shard-00000.tar")
    assert "good_jpg.jpg" in names and "good_jpg.cls" in names and "good_jpg.json" in names
    assert "good_nolabel.cls" not in names and all(".." not in n for n in names)
    with tarfile.open(out / "shards/clean/none/shard-00000.tar") as tf:
        doc = json.load(tf.extractfile("good_jpg.json"))
    assert doc["source"] == {"origin": "astronaut"} and doc["semjpeg"]["defense"] == "none"
    assert sorted(p.name for p in tmp.iterdir()) == ["in", "out"]  # no staging left, nothing outside
    assert not list(tmp.rglob("evil*"))


def test_summary_table_and_stats(hostile_run):
    _, out, summary, _ = hostile_run
    table = {(r["attack_spec"], r["defense_spec"]): r for r in summary["table"]}
    assert list(table) == [("clean", "none"), ("clean", "jpeg:quality=50"),
                           ("fgsm:eps=4/255", "none"), ("fgsm:eps=4/255", "jpeg:quality=50")]
    assert summary["samples"] == 10 and table[("clean", "none")]["agree_clean"] == 1.0
    assert table[("clean", "none")]["psnr"] is None and table[("clean", "none")]["identical"] == 10
    assert summary["config"]["attacks"] == ["clean", "fgsm:eps=4/255"]
    import importlib.metadata
    import platform

    import apache_beam
    import torch

    versions = summary["versions"]  # what ran it, for reproducing the run
    assert versions["python"] == platform.python_version() and versions["torch"] == torch.__version__
    assert versions["apache-beam"] == apache_beam.__version__
    assert versions["semjpeg"] == importlib.metadata.version("semjpeg")
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
    assert [s["samples"] for s in stats] == [7, 3, 0] and stats[2]["errors"] == 1


def test_summary_means_do_not_depend_on_how_a_runner_orders_and_merges_rows(hostile_run):
    """A runner adds the rows in its own order and merges the accumulators of its bundles, shards
    and worker processes: the same rows give the same summary.json (sums in float, in arrival
    order, moved a multi-process run's linf mean from 0.011764705882352944 to ...941)."""
    import math
    import random

    from pipeline.summary import SummaryFn

    _, out, _, _ = hostile_run
    rows = [r for r in read_dataset(out / "metadata") if r["attack_spec"] == "fgsm:eps=4/255"]
    rows += [{**r, "psnr": v, "ssim": v / 40, "bpp": v / 30, "linf": v / 255, "rmse": v / 2550}
             for r, v in zip(rows, [0.1, 0.2, 0.3, 1e-17, 31.7, 28.05])]
    fn = SummaryFn()

    def summarize(order, cuts):
        parts = [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))]
        accs = []
        for part in parts:
            acc = fn.create_accumulator()
            for r in part:
                acc = fn.add_input(acc, r)
            accs.append(acc)
        return fn.extract_output(fn.merge_accumulators(accs[::-1]))

    expected = summarize(rows, ())
    for k in ("psnr", "ssim", "bpp", "linf", "rmse"):
        values = [r[k] for r in rows if r[k] is not None and math.isfinite(r[k])]
        assert expected[k] == math.fsum(values) / len(values)
    rng = random.Random(0)
    for _ in range(20):
        order = rng.sample(rows, len(rows))
        assert summarize(order, sorted(rng.sample(range(1, len(rows)), 3))) == expected

def test_rerun_replaces_output_as_a_whole(tmp_path, photos, fnapi):
    write_tar(tmp_path / "a.tar", good_members(photos)[:4])
    out = tmp_path / "out"
    first = run_evaluate(tiny_config([str(tmp_path / "a.tar")], out), fnapi)
    stale = out / "stats" / "stale.json"  # anything in what semjpeg writes goes with a rerun
    stale.write_text("from the first run")
    second = run_evaluate(tiny_config([str(tmp_path / "a.tar")], out, attacks=(), defenses=()), fnapi)
    assert not stale.exists() and first["run_id"] != second["run_id"]
    assert (out / "_SUCCESS").read_text().strip() == second["run_id"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["clean"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "out"]


def test_refuses_to_replace_a_folder_that_is_not_an_output(tmp_path, photos, fnapi):
    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="refusing to replace"):
        run_evaluate(tiny_config([str(tmp_path / "a.tar")], out), fnapi)
    assert (out / "thesis.tex").exists()


@pytest.mark.parametrize("case", ["spark output", "user file in a finished output"])
def test_refuses_to_replace_other_tools_outputs_and_added_files(tmp_path, photos, fnapi, case):
    """Spark, Hadoop and Beam outputs carry an empty _SUCCESS, and a finished semjpeg output may
    have gained someone's file: a rerun used to delete both silently."""
    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    out = tmp_path / "out"
    if case == "spark output":
        out.mkdir()
        (out / "_SUCCESS").write_text("")
        (out / "part-00000.parquet").write_bytes(b"PAR1")
        message, kept = "no _SUCCESS naming a run beside a summary.json", out / "part-00000.parquet"
    else:
        run_evaluate(tiny_config([str(tmp_path / "a.tar")], out), fnapi)
        (out / "notes.txt").write_text("my analysis")
        message, kept = r"holds files semjpeg did not write \(notes.txt\)", out / "notes.txt"
    with pytest.raises(ValueError, match=message):
        run_evaluate(tiny_config([str(tmp_path / "a.tar")], out), fnapi)
    assert kept.exists()
    if case != "spark output":  # without the extra file, a rerun replaces the output
        kept.unlink()
        run_evaluate(tiny_config([str(tmp_path / "a.tar")], out), fnapi)
        assert (out / "_SUCCESS").exists()


def test_same_seed_and_run_id_give_identical_bytes(tmp_path, photos, fnapi):
    write_tar(tmp_path / "a.tar", good_members(photos))
    outs = []
    for name in ("x", "y"):
        cfg = tiny_config([str(tmp_path / "a.tar")], tmp_path / name, attacks=("igsm:eps=4/255,steps=2",), run_id="fixed")
        run_evaluate(cfg, fnapi)
        outs.append(tmp_path / name)
    for shard in sorted((outs[0] / "shards").rglob("*.tar")):
        twin = outs[1] / shard.relative_to(outs[0])
        assert shard.read_bytes() == twin.read_bytes(), shard
    a, b = (read_dataset(o / "metadata") for o in outs)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "attack_seconds"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)


def test_parquet_and_folder_inputs(tmp_path, photos, fnapi):
    import pyarrow as pa

    from tests.shards import encode

    table = pa.table({
        "img": [encode(p) for p in photos] + [None],
        "id": ["p.0", "p1", "p2", "p3", "p4"],
        "label": [0, 1, 2, 3, 4],
    })
    pq.write_table(table, tmp_path / "x.parquet")
    folder = tmp_path / "folder" / "sub"
    folder.mkdir(parents=True)
    for i, p in enumerate(photos):
        (folder / f"f{i}.png").write_bytes(encode(p))
    (tmp_path / "labels.csv").write_text("file,label\nsub/f0.png,5\nf1.png,6\n")
    out = tmp_path / "out"
    run_evaluate(tiny_config([str(tmp_path / "x.parquet")], out, defenses=(), image_column="img", key_column="id"), fnapi)
    rows = read_dataset(out / "metadata")
    assert sorted({(r["key"], r["label"]) for r in rows}) == [("p1", 1), ("p2", 2), ("p3", 3), ("p_0", 0)]
    err = read_dataset(out / "errors")
    assert [(e["key"], e["reason"]) for e in err] == [("p4", "null image")]
    out2 = tmp_path / "out2"
    run_evaluate(tiny_config([str(tmp_path / "folder")], out2, defenses=(),
                             labels_csv=str(tmp_path / "labels.csv"), folder_shard_size=3), fnapi)
    rows = read_dataset(out2 / "metadata")
    assert sorted({(r["key"], r["label"]) for r in rows}) == [("sub/f0", 5), ("sub/f1", 6), ("sub/f2", None), ("sub/f3", None)]
    assert len(list((out2 / "stats").glob("*.json"))) == 2


def test_configuration_errors_before_any_work(tmp_path, fnapi):
    with pytest.raises(ValueError, match="input not found"):
        run_evaluate(tiny_config([str(tmp_path / "missing.tar")], tmp_path / "out"), fnapi)
    with pytest.raises(ValueError, match="no input matches"):
        run_evaluate(tiny_config([str(tmp_path / "*.tar")], tmp_path / "out"), fnapi)
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        tiny_config([str(tmp_path)], tmp_path / "out", attacks=("nope",))
    with pytest.raises(ValueError, match="duplicate attack spec"):
        tiny_config([str(tmp_path)], tmp_path / "out", attacks=("fgsm:eps=4/255", "fgsm:eps=0.01568627450980392"))
    # Equal once the defaults are filled in: they used to run twice, into two identical folders.
    for given, message in ((("jpeg:quality=75", "jpeg"), "'jpeg' (same as 'jpeg:quality=75')"),
                           (("aug_msroi", "aug_msroi:q_low=30"), "'aug_msroi:q_low=30' (same as 'aug_msroi')"),
                           (("jpeg:quality=50,subsampling=4:2:0", "jpeg:quality=50"),
                            "'jpeg:quality=50' (same as 'jpeg:quality=50,subsampling=4:2:0')")):
        with pytest.raises(ValueError, match=re.escape(f"duplicate defense spec {message}")):
            tiny_config([str(tmp_path)], tmp_path / "out", defenses=given)
    tiny_config([str(tmp_path)], tmp_path / "out", defenses=("jpeg:quality=75", "jpeg:quality=76", "msroi"))
    assert not (tmp_path / "out").exists()


def test_attack_suite_metadata(tmp_path, photos, fnapi):
    """Minimal, budgeted and targeted attacks through the pipeline: a row for every sample whether
    the attack succeeded or not, with success judged on the stored (uint8) image, the target, the
    iterations spent, the perturbation's size and the time."""
    from tests.shards import good_members, write_tar

    write_tar(tmp_path / "a.tar", good_members(photos))
    attacks = ("deepfool:rmse=0.02", "pgd:eps=8/255,target=least_likely",
               "cw:steps=2,binary_search_steps=1,initial_const=0.001", "jsma:rmse=0.005")
    out = tmp_path / "out"
    run_evaluate(tiny_config([str(tmp_path / "a.tar")], out, attacks=attacks, defenses=()), fnapi)
    rows = read_dataset(out / "metadata")
    keys = {r["key"] for r in rows}
    assert len(rows) == len(keys) * (len(attacks) + 1)  # no attack drops a row
    by_attack = {}
    for r in rows:
        by_attack.setdefault(r["attack_spec"], []).append(r)
        if r["attack"] == "clean":
            continue
        targeted = r["attack"] == "pgd"
        assert r["success"] == (r["pred"] == r["target"] if targeted else r["pred"] != r["clean_pred"]), r
        assert (r["target"] is not None) == targeted
        if targeted:
            assert r["target"] != r["clean_pred"] and r["linf"] <= 8 / 255 + 1e-6
        assert r["iterations"] >= 0 and r["attack_seconds"] > 0
    assert all(r["rmse"] <= 0.02 for r in by_attack["deepfool:rmse=0.02"])
    assert all(r["rmse"] <= 0.005 for r in by_attack["jsma:rmse=0.005"])
    assert any(r["success"] for r in by_attack["deepfool:rmse=0.02"])
    # Two Adam steps at a tiny constant fool nothing: the rows stay, marked as failures.
    cw_rows = by_attack["cw:steps=2,binary_search_steps=1,initial_const=0.001"]
    assert cw_rows and not any(r["success"] for r in cw_rows)


def test_a_failed_reference_variant_loses_only_its_own_rows(tmp_path, photos, fnapi, monkeypatch):
    """The clean image's undefended PNG fails for one input: that row and the rate-matched one
    built on it become errors with their reasons; the input's other rows stay, agreeing with the
    clean prediction of the attack stage; the run still counts the input as processed (the
    summary counted only the inputs with a clean, undefended row)."""
    import itertools

    import numpy as np

    import pipeline.encode as encode_stage
    from tests.shards import encode

    real = encode_stage.apply_defense

    def flaky(spec, image, **kw):
        if spec.name == "none" and np.array_equal(image, photos[1]):
            raise RuntimeError("disk full")
        return real(spec, image, **kw)

    monkeypatch.setattr(encode_stage, "apply_defense", flaky)
    write_tar(tmp_path / "a.tar", [(f"p{i}.png", encode(p)) for i, p in enumerate(photos)])
    cfg = tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", defenses=("jpeg:quality=50", "jpeg:match=none"))
    summary = run_evaluate(cfg, fnapi)
    rows = read_dataset(tmp_path / "out" / "metadata")
    errors = read_dataset(tmp_path / "out" / "errors")
    assert sorted((e["key"], e["attack_spec"], e["defense_spec"], e["reason"]) for e in errors) == [
        ("p1", "clean", "jpeg:match=none", "ValueError: the matched defense none failed on this image"),
        ("p1", "clean", "none", "RuntimeError: disk full")]
    cells = {(r["key"], r["attack_spec"], r["defense_spec"]) for r in rows}
    cells |= {(e["key"], e["attack_spec"], e["defense_spec"]) for e in errors}
    assert len(rows) + len(errors) == len(cells) == 4 * 2 * 3
    assert cells == set(itertools.product([f"p{i}" for i in range(4)], [a.text for a in cfg.attacks],
                                          [d.text for d in cfg.defenses]))
    reference = {r["key"]: r["pred"] for r in rows if (r["attack"], r["defense"]) == ("clean", "none")}
    for r in rows:
        if r["key"] != "p1":
            assert r["clean_pred"] == reference[r["key"]]
        assert r["agree_clean"] == (r["pred"] == r["clean_pred"])
    p1 = {(r["attack"], r["defense"]): r for r in rows if r["key"] == "p1"}
    assert p1[("fgsm", "none")]["clean_pred"] == p1[("clean", "jpeg")]["clean_pred"] is not None
    assert summary["samples"] == 4 and summary["errors"] == {"encode": 2}


def test_file_and_member_names_that_are_not_utf8_are_processed_or_reported(tmp_path, photos, fnapi):
    """Latin-1 names (an old disk, a tar made on one) reach Python as lone surrogates, which the
    Parquet write cannot encode: the whole run failed at its end. A folder's file gets a key with
    ``_`` for such bytes (the same in `semjpeg shard`), a tar member is reported, and names and
    paths are written with ``\\xNN``."""
    import io
    import os

    from pipeline.pack import pack_folder
    from tests.shards import encode

    root = os.fsencode(tmp_path)
    folder = root + b"/caf\xe9"
    os.makedirs(folder + b"/sub")
    for name in (b"caf\xe9.png", b"sub/ok.png"):
        with open(folder + b"/" + name, "wb") as f:
            f.write(encode(photos[0]))
    tar = root + b"/t\xe9.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name in ("caf\xe9.png", "ok.png"):
            info = tarfile.TarInfo(name)
            info.size = len(data := encode(photos[1]))
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    run_evaluate(tiny_config([os.fsdecode(folder), os.fsdecode(tar)], out, attacks=()), fnapi)
    rows = read_dataset(out / "metadata")
    src = str(tmp_path)
    assert sorted({(r["source"], r["key"]) for r in rows}) == [
        (f"{src}/caf\\xe9", "caf_"), (f"{src}/caf\\xe9", "sub/ok"), (f"{src}/t\\xe9.tar", "ok")]
    assert [(e["source"], e["member"], e["reason"]) for e in read_dataset(out / "errors")] == [
        (f"{src}/t\\xe9.tar", "caf\\xe9.png", "unsafe member name (not UTF-8 text)")]
    (packed,) = pack_folder(os.fsdecode(folder), str(tmp_path / "sh" / "p"), per_shard=10)
    with tarfile.open(packed) as tf:
        assert tf.getnames()[:2] == ["caf_.png", "caf_.json"]
        assert json.loads(tf.extractfile("caf_.json").read()) == {"file": "caf\\xe9.png"}


def test_an_error_without_a_message_still_gives_a_reason():
    """Pillow's resize gave up on an 80-million-pixel strip with a bare MemoryError: its errors
    row read ``MemoryError: `` with nothing after it."""
    from pipeline.errors import batch_errors, error_reason
    from transforms.images import _reason

    assert error_reason(MemoryError()) == _reason(MemoryError()) == "MemoryError: out of memory"
    assert error_reason(KeyError()) == "KeyError: (no message)"
    assert error_reason(ValueError("bad")) == "ValueError: bad"
    (row,) = batch_errors([object()], "saliency", MemoryError())
    assert row.reason == "MemoryError: out of memory"


def test_a_finalize_retried_after_its_commit_finds_the_run_done(tmp_path, monkeypatch):
    """Dataflow runs a failed bundle again: one that failed once its commit had written _SUCCESS
    (removing the previous output, on a store; a worker lost then) rewrote summary.json into a
    new staging folder, found the run's files missing there and failed every retry, and with
    them the job ("the run was abandoned"), its output committed."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.evaluate import _Finalize
    from pipeline.io import OutputDir, write_bytes

    final = tmp_path / "out"
    final.mkdir()
    (final / "summary.json").write_text("{}")
    (final / "_SUCCESS").write_text("r0\n")
    config = tiny_config([str(tmp_path / "a.tar")], final, run_id="r1")
    out = OutputDir(str(final), "r1")
    out.check()
    paths = [out.path("stats", "part-00000.json"), out.path("shards", "clean", "none", "shard-00000.tar")]
    for path in paths:
        write_bytes(path, b"x")
    parts = [("written", p) for p in paths] + [("inputs", 1)]
    finalize = _Finalize(out, config, 1)
    real_rm = LocalFileSystem.rm

    def rm(self, path, *a, **kw):
        if str(path).endswith(".old-r1"):
            raise OSError("transient")
        return real_rm(self, path, *a, **kw)

    monkeypatch.setattr(LocalFileSystem, "rm", rm)
    with pytest.raises(OSError, match="transient"):
        list(finalize.process(None, parts))
    monkeypatch.setattr(LocalFileSystem, "rm", real_rm)
    (summary,) = finalize.process(None, parts)  # the retry
    assert summary["run_id"] == "r1" and summary["samples"] == 1 and out.committed()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in final.iterdir()) == ["_SUCCESS", "shards", "stats", "summary.json"]


def test_a_retried_write_bundle_writes_the_same_files(tmp_path):
    """A runner may run a write bundle again (a failure after the write, a lost worker, a
    straggler's backup) and only one attempt counts: every attempt writes the same file names,
    byte for byte, however the grouped values come, so no attempt leaves a file of its own."""
    from pipeline.io import OutputDir
    from pipeline.records import ErrorRecord, Result, SourceShard
    from pipeline.write_metadata import _WritePartFn
    from pipeline.write_shards import _WriteTarFn

    out = OutputDir(str(tmp_path / "out"), "r1")
    out.check()
    results = [Result(3, key, {"key": key, "attack_spec": "clean", "defense_spec": spec}, b"img", "png", label=1)
               for key in ("b", "a") for spec in ("none", "jpeg:quality=50")]
    errors = [ErrorRecord(3, "in.tar", k, f"{k}.jpg", "decode", "bad") for k in ("d", "c")]
    order = {("clean", "none"): 0, ("clean", "jpeg:quality=50"): 1}
    shards = (("clean", "none"), 3), results[::2]
    parts = 3, {"rows": results, "errors": errors, "sources": [SourceShard(3, "in.tar", "webdataset")]}
    retried_shards = shards[0], shards[1][::-1]
    retried_parts = 3, {**parts[1], "rows": results[::-1], "errors": errors[::-1]}
    attempts = []
    for tar, part in ((shards, parts), (retried_shards, retried_parts)):
        paths = [*_WriteTarFn(out).process(tar), *_WritePartFn(out, "r1", order).process(part)]
        attempts.append({p: open(p, "rb").read() for p in paths})
    assert attempts[0] == attempts[1]
    staged = sorted(str(p) for p in (tmp_path / ".out.staging-r1").rglob("*") if p.is_file())
    assert staged == sorted(attempts[0]) and len(staged) == 4
