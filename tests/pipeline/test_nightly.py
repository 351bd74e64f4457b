"""Nightly: config validation, history partitions, regression alarms, reruns, the report."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.__main__ import main
from pipeline.history import (HISTORY_SCHEMA, MISSING, compare, configured_pairs, find_regressions, history_rows,
                              read_history, write_partition)
from pipeline.nightly import DEFAULT_TOLERANCE, NightlyConfig, parse_date
from tests.conftest import ROOT
from tests.shards import good_members, hostile_members, write_tar


def config(tmp_path, **over) -> dict:
    cfg = {
        "input": str(tmp_path / "in" / "*.tar"), "output": str(tmp_path / "nightly"),
        "history": str(tmp_path / "history"), "attacks": ["fgsm:eps=4/255"],
        "defenses": ["jpeg:quality=50"], "model": {"name": "tests.tiny:build", "batch_size": 4},
        "runner": "FnApiRunner", "tolerance": {"agree_clean": 0.05, "top1": 0.05},
        "input_options": {"resize": 72, "crop": 64},
    }
    cfg.update(over)
    return cfg


def write_config(tmp_path, cfg) -> str:
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"atacks": ["fgsm"]}, "unknown key 'atacks'"),
        ({"attacks": "fgsm"}, "attacks must be a list of strings"),
        ({"attacks": ""}, "attacks must be a list of strings, got ''"),
        ({"attacks": 0}, "attacks must be a list of strings, got 0"),
        ({"defenses": False}, "defenses must be a list of strings, got False"),
        ({"seed": "zero"}, "seed must be an integer"),
        ({"map_precision": "fp16"}, "nightly.yaml: map precision must be one of fp32, bf16, got 'fp16'"),
        ({"map_precision": 16}, "map_precision must be a string"),
        ({"map_compile": "yes"}, "map_compile must be true or false"),
        ({"save_maps": 1}, "save_maps must be true or false"),
        ({"tolerance": {"top5": 0.1}}, r"\.yaml: unknown key tolerance\.top5; valid"),
        ({"tolerance": {"top1": "a lot"}}, "tolerance.top1 must be a number"),
        ({"model": {"name": "tests.tiny:build", "layers": 3}}, r"\.yaml: unknown key model\.layers; valid"),
        ({"model": {"name": "tests.tiny:build", "memory_format": "nhwc"}}, "memory format must be one of auto, "),
        ({"model": {"name": "tests.tiny:build", "memory_format": 4}}, "model.memory_format must be a string"),
        ({"attacks": ["fgsm:eps=x"]}, "bad value for 'eps'"),
        ({"runner_options": {"no_such_flag": 1}}, "unrecognized arguments: --no_such_flag"),
        ({"history": None}, "'history' is required"),
        ({"runner": "NoSuchRunner"}, "nightly.yaml: unknown runner 'NoSuchRunner'; valid: .*DaskRunner"),
        ({"runner": "no_such_module.Runner"}, "nightly.yaml: runner 'no_such_module.Runner' cannot be loaded"),
        ({"runner": "pipeline.nightly.NightlyConfig"}, "is not a PipelineRunner subclass"),
        ({"output": ""}, "nightly.yaml: output must not be empty, got ''"),
        ({"history": "  "}, "nightly.yaml: history must not be empty, got '  '"),
        ({"tolerance": {"top1": float("nan")}}, r"tolerance.top1 must be a finite number >= 0 or null, got nan"),
        ({"tolerance": {"psnr": float("inf")}}, r"tolerance.psnr must be a finite number >= 0 or null, got inf"),
        # An integer beyond float's range is inf, as 1e400 is (it was an OverflowError traceback).
        ({"tolerance": {"bytes": 10**400}}, r"tolerance.bytes must be a finite number >= 0 or null, got inf"),
        ({"history": "OUT"}, "history .* and output .* must be apart"),
        ({"history": "OUT/history"}, "history .* and output .* must be apart"),
        ({"history": "OUT/../nightly/"}, "history .* and output .* must be apart"),
        ({"output": "memory://b/n", "history": "memory://b/n/h"}, "history .* and output .* must be apart"),
        # The YAML's own key, not a command-line option it has none of (the message said --weights).
        ({"model": "resnet18"}, r"model 'resnet18' needs nightly.yaml: model.weights \(a state-dict"),
        ({"map_model": {"name": "resnet18"}}, r"model 'resnet18' needs nightly.yaml: map_model.weights \("),
    ],
)
def test_config_errors_are_clear(tmp_path, change, message):
    change = {k: v.replace("OUT", str(tmp_path / "nightly")) if isinstance(v, str) else v for k, v in change.items()}
    with pytest.raises(ValueError, match=message):
        NightlyConfig.from_dict(config(tmp_path, **change), "nightly.yaml")


def test_output_inside_history_is_refused_and_locations_apart_are_fine(tmp_path):
    with pytest.raises(ValueError, match="must be apart"):
        NightlyConfig.from_dict(config(tmp_path, output=str(tmp_path / "history" / "runs")))
    for output, history in ((str(tmp_path / "nightly"), str(tmp_path / "nightly-history")),  # a prefix, not a folder
                            ("memory://b/n", str(tmp_path / "memory:" / "b" / "n" / "h")),  # another protocol
                            ("memory://b/n", "memory://b/nh")):
        cfg = NightlyConfig.from_dict(config(tmp_path, output=output, history=history))
        assert (cfg.output, cfg.history) == (output, history)


@pytest.mark.parametrize(
    "text, message",
    [
        ("input: a.tar\noutput: o\nhistory: [h\n",
         r"nightly.yaml is not valid YAML: while parsing a flow sequence; expected ',' or ']', but got '<stream end>' "
         r"\(line 4, column 1\)"),
        ("input: a.tar\noutput: o\nhistory: h\nseed: 1\nseed: 2\n",
         r"nightly.yaml is not valid YAML: duplicate key 'seed' \(line 5, column 1\)"),
        ("input: a.tar\noutput: o\nhistory: h\nmodel: {name: tests.tiny:build, batch_size: 2, batch_size: 4}\n",
         r"nightly.yaml is not valid YAML: duplicate key 'batch_size' \(line 4, column 48\)"),
        ("input: a.tar\noutput: o\nhistory: h\ntolerance:\n  top1: 0.1\n  top1: 0.2\n",
         r"nightly.yaml is not valid YAML: duplicate key 'top1' \(line 6, column 3\)"),
    ],
)
def test_yaml_errors_are_one_line_and_duplicate_keys_are_errors(text, message):
    with pytest.raises(ValueError, match=message) as e:
        NightlyConfig.from_yaml(text, "nightly.yaml")
    assert "\n" not in str(e.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = (f"input: a.tar\noutput: {tmp_path / 'o'}\nhistory: {tmp_path / 'h'}\n"
            "model: {<<: {name: tests.tiny:build, batch_size: 2}, batch_size: 4}\n")
    assert NightlyConfig.from_yaml(text).model.batch_size == 4


def test_yaml_numbers_with_exponents_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-2 (no dot, or an unsigned exponent) as text: a tolerance so written was refused
    text = (f"input: a.tar\noutput: {tmp_path / 'o'}\nhistory: {tmp_path / 'h'}\n"
            "tolerance: {top1: 1e-2, agree_clean: 2E-2, psnr: .5e0, ssim: 1.0e-2, n: 1e-1}\n")
    cfg = NightlyConfig.from_yaml(text)
    assert {k: cfg.tolerance[k] for k in ("top1", "agree_clean", "psnr", "ssim", "n")} == {
        "top1": 0.01, "agree_clean": 0.02, "psnr": 0.5, "ssim": 0.01, "n": 0.1}
    assert NightlyConfig.from_yaml(text.replace("\ntolerance", "\nseed: 7\ntolerance")).seed == 7  # ints stay ints
    with pytest.raises(ValueError, match="must be a string"):  # as YAML 1.2 reads it: quote such a path
        NightlyConfig.from_yaml(text.replace("output: ", "output: 1e5 #"))


@pytest.mark.parametrize("text", ["20260102", "2026-W01-1", "2026-1-2", "2026-02-30", " 2026-01-02", "2026-01-02T00:00"])
def test_date_must_be_a_calendar_day_written_yyyy_mm_dd(text):
    with pytest.raises(ValueError, match=r"--date must be YYYY-MM-DD, got"):
        parse_date(text)
    assert parse_date("2024-02-29") == "2024-02-29"


def test_map_precision_reaches_the_run(tmp_path):
    plain = NightlyConfig.from_dict(config(tmp_path), "nightly.yaml").evaluate_config("2026-01-01")
    low = NightlyConfig.from_dict(config(tmp_path, map_precision="bf16"), "nightly.yaml").evaluate_config("2026-01-01")
    assert (plain.map_precision, low.map_precision) == ("fp32", "bf16")
    assert low.describe()["map_precision"] == "bf16"
    fused = NightlyConfig.from_dict(config(tmp_path, map_compile=True), "nightly.yaml").evaluate_config("2026-01-01")
    assert (plain.map_compile, fused.map_compile, fused.describe()["map_compile"]) == (False, True, True)
    model = dict(config(tmp_path)["model"], memory_format="contiguous")
    plain_layout = NightlyConfig.from_dict(config(tmp_path, model=model), "nightly.yaml").evaluate_config("2026-01-01")
    assert (plain.model.memory_format, plain_layout.model.memory_format) == ("auto", "contiguous")
    assert plain_layout.describe()["memory_format"] == "contiguous"


def test_history_partitions_regressions_and_damage(tmp_path):
    hist = str(tmp_path / "h")
    rows = [{"attack_spec": "fgsm", "defense_spec": "jpeg", "agree_clean": 0.5, "top1": 0.4, "bytes": 1000.0}]
    write_partition(hist, "2026-01-01", rows)
    worse = [dict(rows[0], agree_clean=0.4, bytes=1200.0)]
    write_partition(hist, "2026-01-02", worse)
    h = read_history(hist)
    assert sorted(h) == ["2026-01-01", "2026-01-02"] and h["2026-01-01"][0]["agree_clean"] == 0.5
    regs = find_regressions(h["2026-01-01"], h["2026-01-02"], {"agree_clean": 0.05, "top1": 0.05, "bytes": 100}, "2026-01-01")
    assert sorted(r.metric for r in regs) == ["agree_clean", "bytes"]
    assert "agree_clean of fgsm x jpeg dropped from 0.5" in regs[0].describe() or "dropped" in regs[1].describe()
    # Rewriting one date leaves the others alone and leaves no temporary files.
    write_partition(hist, "2026-01-02", rows)
    assert read_history(hist)["2026-01-02"][0]["agree_clean"] == 0.5
    assert sorted(p.name for p in (tmp_path / "h" / "date=2026-01-02").iterdir()) == ["summary.parquet"]
    (tmp_path / "h" / "date=2026-01-02" / "summary.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="history partition date=2026-01-02 .* is corrupt"):
        read_history(hist)
    (tmp_path / "h" / "date=2026-01-02" / "summary.parquet").unlink()
    with pytest.raises(ValueError, match="date=2026-01-02 .* has no summary.parquet"):
        read_history(hist)


def test_two_nights_regression_exit_and_report(tmp_path, photos, capsys):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good_members(photos))
    cfg = config(tmp_path)
    path = write_config(tmp_path, cfg)
    # Beam options on the command line, as a Flex Template launcher passes Dataflow's own: accepted
    # (this one means nothing to the FnApiRunner); an unknown one stops the night before anything.
    assert main(["nightly", "--config", path, "--date", "2026-11-24", "--region=us-central1", "--no_such_flag=1"]) == 2
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err
    assert not (tmp_path / "nightly").exists() and not (tmp_path / "history").exists()
    assert main(["nightly", "--config", path, "--date", "2026-11-24", "--region=us-central1"]) == 0
    first = tmp_path / "nightly" / "date=2026-11-24"
    assert (first / "_SUCCESS").exists() and (first / "report.html").exists()
    assert "nothing to compare" in capsys.readouterr().out

    # The second night evaluates a degraded copy of history's last night: plant a better past.
    hist = read_history(cfg["history"])
    better = [dict(r, agree_clean=1.0, top1=1.0) for r in hist["2026-11-24"]]
    write_partition(cfg["history"], "2026-11-24", better)
    assert main(["nightly", "--config", path, "--date", "2026-11-25"]) == 3
    err = capsys.readouterr().err
    assert "REGRESSION: top1 of fgsm:eps=4/255 x jpeg:quality=50 dropped from 1 (2026-11-24)" in err
    report = (tmp_path / "nightly" / "date=2026-11-25" / "report.html").read_text()
    assert "Regressions" in report and "Trends over 2 nights" in report and "data:image/png;base64," in report
    assert sorted(read_history(cfg["history"])) == ["2026-11-24", "2026-11-25"]

    # Rerunning a night replaces that partition and nothing else.
    marker = tmp_path / "nightly" / "date=2026-11-24" / "extra.txt"
    marker.write_text("x")
    before = (tmp_path / "history" / "date=2026-11-24" / "summary.parquet").read_bytes()
    assert main(["nightly", "--config", path, "--date", "2026-11-25"]) in (0, 3)
    assert marker.exists()
    assert (tmp_path / "history" / "date=2026-11-24" / "summary.parquet").read_bytes() == before


def test_a_template_launch_submits_and_the_job_keeps_its_own_books(tmp_path, photos, capsys, caplog):
    """A Flex Template launch (``--template_location``) runs the job only after the launcher has
    exited: the launcher cannot wait for it, nor read its summary, so the night's history,
    nightly.json and report come from the job's last stage, and its alarms are logged and counted.
    The FnApiRunner ignores the option and runs the job in place, which shows that stage at work."""
    import json
    import logging

    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good_members(photos))
    cfg = config(tmp_path)
    path = write_config(tmp_path, cfg)
    assert main(["nightly", "--config", path, "--date", "2026-11-24"]) == 0
    better = [dict(r, agree_clean=1.0, top1=1.0) for r in read_history(cfg["history"])["2026-11-24"]]
    write_partition(cfg["history"], "2026-11-24", better)
    capsys.readouterr()
    launch = tmp_path / "staging" / "job_object"
    with caplog.at_level(logging.ERROR, logger="pipeline.nightly"):
        code = main(["nightly", "--config", path, "--date", "2026-11-25", f"--template_location={launch}"])
    out = capsys.readouterr().out
    assert code == 0 and "submitted: the job writes" in out and "REGRESSION" not in out
    night = tmp_path / "nightly" / "date=2026-11-25"
    assert (night / "_SUCCESS").exists() and (night / "report.html").exists()
    assert sorted(read_history(cfg["history"])) == ["2026-11-24", "2026-11-25"]
    alarms = json.loads((night / "nightly.json").read_text())["alarms"]
    assert alarms and any("top1 of fgsm:eps=4/255 x jpeg:quality=50 dropped from 1 (2026-11-24)" in a for a in alarms)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert {f"REGRESSION: {a}" for a in alarms} <= set(logged)


def test_corrupt_history_stops_before_any_work(tmp_path, photos, capsys):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good_members(photos)[:2])
    cfg = config(tmp_path)
    part = tmp_path / "history" / "date=2026-11-20"
    part.mkdir(parents=True)
    (part / "summary.parquet").write_bytes(b"PAR1 truncated")
    assert main(["nightly", "--config", write_config(tmp_path, cfg), "--date", "2026-11-21"]) == 2
    assert "is corrupt" in capsys.readouterr().err
    assert not (tmp_path / "nightly").exists()
    assert (part / "summary.parquet").read_bytes() == b"PAR1 truncated"


def under_a_file(tmp_path, photos):
    """Two input images, and a plain file for a location to be put under (so it cannot be made)."""
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good_members(photos)[:2])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    return blocker


def test_unwritable_output_is_a_clear_error(tmp_path, photos, capsys):
    blocker = under_a_file(tmp_path, photos)
    cfg = config(tmp_path, output=str(blocker / "nightly"))
    assert main(["nightly", "--config", write_config(tmp_path, cfg), "--date", "2026-11-21"]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert not (tmp_path / "history").exists()


@pytest.mark.parametrize("runner", ["FnApiRunner", "DirectRunner", "direct", "DaskRunner", "PrismRunner",
                                    "pipeline.runners.DaskRunner"])
def test_runner_names_beam_accepts_are_valid(tmp_path, runner):
    assert NightlyConfig.from_dict(config(tmp_path, runner=runner)).runner == runner


def test_bad_runner_stops_before_any_work(tmp_path, capsys):
    path = write_config(tmp_path, config(tmp_path, runner="NoSuchRunner"))
    assert main(["nightly", "--config", path, "--date", "2026-11-21"]) == 2
    assert f"{path}: unknown runner 'NoSuchRunner'" in capsys.readouterr().err
    assert not (tmp_path / "nightly").exists() and not (tmp_path / "history").exists()


def test_partial_tolerance_merges_with_the_defaults(tmp_path):
    cfg = NightlyConfig.from_dict(config(tmp_path, tolerance={"top1": 0.9, "psnr": None, "bytes": 500}))
    assert cfg.tolerance == {**{k: v for k, v in DEFAULT_TOLERANCE.items() if k != "psnr"}, "top1": 0.9, "bytes": 500}
    assert NightlyConfig.from_dict(config(tmp_path, tolerance=None)).tolerance == DEFAULT_TOLERANCE


def test_a_metric_that_loses_its_value_is_a_regression():
    """A NaN SSIM (null in summary.json) or labels gone from the data left the metric without a
    value, and a missing value was never compared: the night passed."""
    before = [{"attack_spec": "fgsm", "defense_spec": "jpeg", "n": 10, "top1": 0.5, "ssim": 0.9, "psnr": None}]
    now = [dict(before[0], top1=None, ssim=None, psnr=30.0)]
    regs = find_regressions(before, now, {"top1": 0.02, "ssim": 0.01, "psnr": 0.5}, "2026-01-01")
    assert sorted(r.metric for r in regs) == ["ssim", "top1"]  # psnr gained a value: no alarm
    text = " ".join(r.describe() for r in regs)
    assert "top1 of fgsm x jpeg has no value (it was 0.5 on 2026-01-01): no image had a label" in text
    assert "ssim of fgsm x jpeg has no value (it was 0.9 on 2026-01-01)" in text
    assert find_regressions(before, now, {"psnr": 0.5}, "2026-01-01") == []  # only the metrics checked


def test_a_pair_whose_images_are_all_identical_has_an_infinite_psnr():
    """Every image identical to its reference (infinite PSNR) leaves the summary's mean, over
    finite values, without a value: that was an alarm ("has no value", status 3) for a perfect
    night, and a real drop from it (to 35.7 dB) passed. The history keeps ``identical``."""
    tol = {"psnr": 0.5}
    perfect = [{"attack_spec": "fgsm:eps=0", "defense_spec": "jpeg:quality=100", "n": 4, "psnr": None, "identical": 4}]
    lossy = [dict(perfect[0], psnr=35.74, identical=0)]
    assert find_regressions(lossy, perfect, tol, "2026-01-01") == []
    assert find_regressions(perfect, perfect, tol, "2026-01-01") == []
    (reg,) = find_regressions(perfect, lossy, tol, "2026-01-01")
    assert reg.metric == "psnr" and "dropped from inf (2026-01-01) to 35.74" in reg.describe()
    # Some images identical: the mean of the others is compared, as before.
    some = [dict(perfect[0], psnr=40.0, identical=2)]
    assert [r.metric for r in find_regressions(some, lossy, tol, "2026-01-01")] == ["psnr"]
    # A night written before `identical` was kept: unknown, never an alarm of its own.
    old = [{k: v for k, v in perfect[0].items() if k != "identical"}]
    assert find_regressions(old, lossy, tol, "2026-01-01") == []
    (row,) = history_rows({"run_id": "r", "config": {"model": "m"},
                           "table": [dict(perfect[0], attack="fgsm", defense="jpeg")]}, "2026-01-02")
    assert row["identical"] == 4


def test_missing_pairs_and_fewer_images_are_regressions():
    before = [{"attack_spec": a, "defense_spec": "jpeg", "n": 100, "top1": 0.5} for a in ("clean", "fgsm", "pgd")]
    now = [dict(before[0], n=95), dict(before[1], n=80), dict(before[2], n=0)]
    regs = find_regressions(before, now, {"n": 0.1, "top1": 0.02}, "2026-01-01")
    assert sorted((r.attack_spec, r.metric) for r in regs) == [("fgsm", "n"), ("pgd", MISSING)]
    text = " ".join(r.describe() for r in regs)
    assert "pgd x jpeg has no result (n was 100 on 2026-01-01)" in text
    assert "n of fgsm x jpeg dropped from 100 (2026-01-01) to 80 (tolerance 0.1 of the previous n)" in text


def test_a_pair_the_configuration_dropped_is_not_missing():
    before = [{"attack_spec": a, "defense_spec": "jpeg", "n": 100, "top1": 0.5} for a in ("clean", "fgsm", "pgd")]
    now = before[:2]  # pgd has no rows tonight
    asked = {("clean", "jpeg"), ("fgsm", "jpeg")}
    assert find_regressions(before, now, {"top1": 0.02}, "2026-01-01", asked) == []
    regs = find_regressions(before, now, {"top1": 0.02}, "2026-01-01", asked | {("pgd", "jpeg")})
    assert [(r.attack_spec, r.metric) for r in regs] == [("pgd", MISSING)]
    summary = {"config": {"attacks": ["clean", "fgsm"], "defenses": ["jpeg"]}}
    assert configured_pairs(summary) == asked and configured_pairs({}) is None


def test_regressions_after_a_model_change_say_so():
    """A new model's night compared with the old model's: its alarms said only "top1 dropped"."""
    before = [{"attack_spec": "fgsm", "defense_spec": "jpeg", "n": 10, "top1": 0.5, "model": "efficientnet_lite0"}]
    history = {"2026-01-01": before}
    worse = [dict(before[0], top1=0.3, model="resnet18")]
    prev, alarms = compare(history, "2026-01-02", worse, DEFAULT_TOLERANCE)
    assert alarms[0].describe() == ("the model changed from efficientnet_lite0 (2026-01-01) to resnet18: "
                                    "the regressions compare two models")
    assert [getattr(a, "metric", None) for a in alarms] == [None, "top1"]
    assert compare(history, "2026-01-02", [dict(worse[0], top1=0.5)], DEFAULT_TOLERANCE)[1] == []  # no regression
    same = compare(history, "2026-01-02", [dict(before[0], top1=0.3)], DEFAULT_TOLERANCE)[1]
    assert [a.metric for a in same] == ["top1"]


def test_a_night_without_results_is_an_alarm_and_never_the_baseline():
    good = [{"attack_spec": "clean", "defense_spec": "none", "n": 4, "top1": 0.75}]
    history = {"2026-01-01": good, "2026-01-02": []}
    prev, alarms = compare(history, "2026-01-02", [], DEFAULT_TOLERANCE, {"decode": 4})
    assert [a.describe() for a in alarms] == [
        "the night 2026-01-02 has no results: no input was evaluated (errors: decode 4)"]
    prev, alarms = compare(history, "2026-01-03", [dict(good[0], top1=0.25)], DEFAULT_TOLERANCE)
    assert prev == "2026-01-01" and [a.metric for a in alarms] == ["top1"]


def test_failed_night_alarms_and_next_night_compares_with_the_last_good_one(tmp_path, photos, capsys):
    (tmp_path / "in").mkdir()
    bad, _ = hostile_members(photos)
    write_tar(tmp_path / "in" / "a.tar", [m for m in bad if m[0].startswith("bad_truncated")])
    loose = {"top1": 1.0, "agree_clean": 1.0, "psnr": 100.0, "ssim": 1.0, "n": 1.0}
    cfg = config(tmp_path, tolerance=loose, report=False)
    path = write_config(tmp_path, cfg)
    pairs = [(a, d) for a in ("clean", "fgsm:eps=4/255") for d in ("none", "jpeg:quality=50")]
    write_partition(cfg["history"], "2026-01-01", [{"attack_spec": a, "defense_spec": d, "n": 1} for a, d in pairs])

    assert main(["nightly", "--config", path, "--date", "2026-01-02"]) == 3
    assert "REGRESSION: the night 2026-01-02 has no results: no input was evaluated (errors: decode" \
        in capsys.readouterr().err
    assert read_history(cfg["history"])["2026-01-02"] == []  # kept: the history says what happened

    (tmp_path / "in" / "a.tar").unlink()
    write_tar(tmp_path / "in" / "b.tar", good_members(photos)[:4])
    assert main(["nightly", "--config", path, "--date", "2026-01-03"]) == 0
    assert "compared with 2026-01-01: no regression" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "nightly" / "date=2026-01-03" / "nightly.json").read_text())
    assert recorded["previous_date"] == "2026-01-01" and recorded["tolerance"] == loose

    # Re-rendered with the history, the report recomputes the alarms with the recorded tolerance.
    better = [dict(r, top1=2.0) for r in read_history(cfg["history"])["2026-01-01"]]
    write_partition(cfg["history"], "2026-01-01", better)
    out = tmp_path / "r.html"
    run = str(tmp_path / "nightly" / "date=2026-01-03")
    assert main(["report", "--run", run, "--history", cfg["history"], "--output", str(out)]) == 0
    page = out.read_text()
    assert "Regressions (4)" in page and "top1 of clean x none dropped from 2 (2026-01-01)" in page
    assert "with the tolerance recorded with the nightly run" in page and "<td class='bad'>" in page
    assert "Trends over 3 nights" in page


def test_unwritable_history_stops_before_any_work(tmp_path, photos, capsys):
    blocker = under_a_file(tmp_path, photos)
    cfg = config(tmp_path, history=str(blocker / "history"))
    assert main(["nightly", "--config", write_config(tmp_path, cfg), "--date", "2026-11-21"]) == 2
    err = capsys.readouterr().err
    assert f"history location {blocker / 'history'} cannot be written" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nightly").exists()


def test_a_read_only_partition_of_the_night_stops_before_any_work(tmp_path, photos, capsys, read_only):
    """Rerunning a date whose history partition is read-only ran the night, committed its output,
    then failed writing the history (status 2, no nightly.json nor report, the history stale)."""
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good_members(photos)[:2])
    hist = tmp_path / "history"
    write_partition(str(hist), "2026-11-21", [HISTORY_ROW])
    read_only(hist / "date=2026-11-21")
    assert main(["nightly", "--config", write_config(tmp_path, config(tmp_path)), "--date", "2026-11-21"]) == 2
    err = capsys.readouterr().err
    assert f"history location {hist / 'date=2026-11-21'} cannot be written" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nightly").exists()
    assert sorted(p.name for p in (hist / "date=2026-11-21").iterdir()) == ["summary.parquet"]


HISTORY_ROW = {"run_id": "r", "model": "m", "attack": "clean", "attack_spec": "clean", "defense": "none",
               "defense_spec": "none", "n": 4, "top1": 0.5, "agree_clean": 1.0, "success": None, "bytes": 900.0,
               "bpp": 1.5, "psnr": None, "ssim": 1.0, "linf": 0.0, "rmse": 0.0}


def test_partition_with_the_wrong_schema_is_corrupt(tmp_path):
    import pyarrow as pa

    hist = tmp_path / "h"
    write_partition(str(hist), "2026-01-01", [HISTORY_ROW])
    part = hist / "date=2026-01-02"
    part.mkdir()
    pq.write_table(pa.Table.from_pylist([{"key": "a", "attack_spec": "clean", "defense_spec": "none", "n": "4"}]),
                   part / "summary.parquet")  # a run's metadata file, say
    with pytest.raises(ValueError, match="partition date=2026-01-02 .* is corrupt: no column run_id.*column n is string"):
        read_history(str(hist))
    # A file of an earlier version (with its own date column) copied to another night.
    old = pa.Table.from_pylist([{**HISTORY_ROW, "date": "2026-01-01"}])
    pq.write_table(old, part / "summary.parquet")
    with pytest.raises(ValueError, match="date=2026-01-02 .* is corrupt: its date column says 2026-01-01"):
        read_history(str(hist))


def test_history_reads_as_a_hive_dataset_and_reads_older_files(tmp_path):
    import pyarrow as pa

    hist = tmp_path / "h"
    write_partition(str(hist), "2026-01-01", [HISTORY_ROW])
    write_partition(str(hist), "2026-01-02", [dict(HISTORY_ROW, top1=0.25)])
    table = pq.read_table(hist)  # the date comes from the folder names
    assert sorted(zip(map(str, table.column("date").to_pylist()), table.column("top1").to_pylist())) == [
        ("2026-01-01", 0.5), ("2026-01-02", 0.25)]
    # Written by an earlier version: a date column inside the file.
    pq.write_table(pa.Table.from_pylist([{**HISTORY_ROW, "date": "2026-01-02"}]), hist / "date=2026-01-02" / "summary.parquet")
    h = read_history(str(hist))
    assert h["2026-01-02"][0]["date"] == "2026-01-02" and h["2026-01-01"][0]["date"] == "2026-01-01"


def test_leftovers_of_an_interrupted_write_are_not_a_partition(tmp_path, caplog):
    hist = tmp_path / "h"
    write_partition(str(hist), "2026-01-01", [HISTORY_ROW])
    part = hist / "date=2026-01-02"
    part.mkdir()
    (part / ".summary.parquet.tmp-0badc0de").write_bytes(b"PAR1 half")
    with caplog.at_level(logging.WARNING, logger="pipeline.history"):
        assert sorted(read_history(str(hist))) == ["2026-01-01"]
    assert "leftovers of an interrupted write" in caplog.text
    write_partition(str(hist), "2026-01-02", [HISTORY_ROW])  # the next write of that date cleans up
    assert sorted(p.name for p in part.iterdir()) == ["summary.parquet"]
    # Anything else in a folder without its file is still an error, and nothing is deleted.
    (part / "summary.parquet").rename(part / "summary.parquet.bak")
    (part / ".summary.parquet.tmp-0badc0de").write_bytes(b"PAR1 half")
    with pytest.raises(ValueError, match="has no summary.parquet"):
        read_history(str(hist))
    assert sorted(p.name for p in part.iterdir()) == [".summary.parquet.tmp-0badc0de", "summary.parquet.bak"]


def test_the_history_check_leaves_no_folder_it_made(tmp_path):
    from pipeline.history import check_writable

    (tmp_path / "kept").mkdir()
    check_writable(str(tmp_path / "kept" / "a" / "b" / "history"))
    assert list((tmp_path / "kept").iterdir()) == []
    (tmp_path / "h").mkdir()
    check_writable(str(tmp_path / "h"))  # an existing history stays, empty or not
    assert (tmp_path / "h").is_dir()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_of_a_new_date_leaves_the_history_readable(tmp_path, monkeypatch, failure):
    """A write that fails before its temporary file exists (a full disk, a second Ctrl-C during
    the night's bookkeeping) must not leave an empty date folder: that reads as a partition that
    lost its file, and every later night (the rerun of that date too) would stop on it."""
    from fsspec.implementations.local import LocalFileSystem

    hist = tmp_path / "h"
    write_partition(str(hist), "2026-01-01", [HISTORY_ROW])

    def fail(*args, **kwargs):
        raise failure

    with monkeypatch.context() as m:
        m.setattr(LocalFileSystem, "open", fail)
        with pytest.raises(type(failure)):
            write_partition(str(hist), "2026-01-02", [HISTORY_ROW])
    assert sorted(read_history(str(hist))) == ["2026-01-01"]
    write_partition(str(hist), "2026-01-02", [HISTORY_ROW])  # that date again
    assert sorted(read_history(str(hist))) == ["2026-01-01", "2026-01-02"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_history_and_report_reads_start_no_pyarrow_threads(tmp_path):
    """pyarrow 25 aborted (SIGABRT, exit 134) now and then when the process exited right after a
    read on its thread pools: a damaged history ends the job just then. Reads stay on the calling
    thread; a fresh process shows it (pools, once started, stay for the process's life)."""
    write_partition(str(tmp_path / "h"), "2026-01-01", [HISTORY_ROW])
    (tmp_path / "run" / "metadata").mkdir(parents=True)
    shutil.copy(tmp_path / "h" / "date=2026-01-01" / "summary.parquet", tmp_path / "run" / "metadata" / "part-00000.parquet")
    code = (
        "import os, sys\n"
        "from pipeline.history import read_history\n"
        "from pipeline.report import load_rows\n"
        "threads = lambda: len(os.listdir('/proc/self/task'))\n"
        "before = threads()\n"
        f"assert read_history({str(tmp_path / 'h')!r}) and load_rows({str(tmp_path / 'run')!r})\n"
        "sys.exit(0 if threads() == before else 1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["date=2026-02-30", "date=2026-13-45"])
def test_a_partition_named_by_no_real_date_is_corrupt_before_any_work(tmp_path, photos, capsys, name):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good_members(photos)[:2])
    cfg = config(tmp_path)
    write_partition(cfg["history"], "2026-01-01", [HISTORY_ROW])
    (tmp_path / "history" / name).mkdir()
    shutil.copy(tmp_path / "history" / "date=2026-01-01" / "summary.parquet", tmp_path / "history" / name)
    (tmp_path / "history" / "date=garbage").mkdir()  # no date at all: not a partition, ignored
    assert main(["nightly", "--config", write_config(tmp_path, cfg), "--date", "2026-03-01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"semjpeg nightly: error: history partition {name} in {cfg['history']} is corrupt: "
                   f"{name[5:]} is not a date (rename or remove the folder)"]
    assert not (tmp_path / "nightly").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")  # read after the history
    assert main(["report", "--run", str(tmp_path / "run"), "--history", cfg["history"], "--output",
                 str(tmp_path / "r.html")]) == 2
    assert f"history partition {name} in {cfg['history']} is corrupt" in capsys.readouterr().err


@pytest.mark.parametrize("column", ["attack_spec", "defense_spec"])
def test_a_partition_with_null_specs_is_corrupt(tmp_path, column):
    import pyarrow as pa

    hist = tmp_path / "h"
    part = hist / "date=2026-01-02"
    part.mkdir(parents=True)
    rows = [dict(HISTORY_ROW, **{column: None}), dict(HISTORY_ROW, **{column: None})]
    pq.write_table(pa.Table.from_pylist(rows), part / "summary.parquet")  # the column's type: null
    assert pa.Table.from_pylist(rows).schema.field(column).type == pa.null()
    with pytest.raises(ValueError, match=f"partition date=2026-01-02 .* is corrupt: column {column} has 2 null value"):
        read_history(str(hist))
    write_partition(str(hist), "2026-01-02", [HISTORY_ROW, dict(HISTORY_ROW, **{column: None})])  # typed, one null
    with pytest.raises(ValueError, match=f"is corrupt: column {column} has 1 null value"):
        read_history(str(hist))
    write_partition(str(hist), "2026-01-02", [dict(HISTORY_ROW, run_id=None, model=None)])  # other columns may be null
    assert read_history(str(hist))["2026-01-02"][0]["run_id"] is None


def test_a_file_where_the_nights_partition_goes_stops_before_any_work(tmp_path, photos, capsys):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good_members(photos)[:2])
    cfg = config(tmp_path)
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "date=2026-01-20").write_text("junk")
    assert main(["nightly", "--config", write_config(tmp_path, cfg), "--date", "2026-01-20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "history partition date=2026-01-20 in" in err[0]
    assert "exists and is not a folder (move or remove it)" in err[0]
    assert not (tmp_path / "nightly").exists()
    assert (tmp_path / "history" / "date=2026-01-20").read_text() == "junk"


def test_specs_are_compared_by_identity_not_text():
    """A spec written another way (4/255 or its decimals, 050 or 50, a default spelled out) is the
    same pair: its regressions are found, and it is not missing."""
    before = [{"attack_spec": a, "defense_spec": d, "n": 100, "top1": 0.5}
              for a in ("clean", "fgsm:eps=4/255") for d in ("none", "jpeg:quality=50", "jpeg")]
    respell = {"fgsm:eps=4/255": "fgsm:eps=0.01568627450980392", "jpeg:quality=50": "jpeg:quality=050",
               "jpeg": "jpeg:quality=75"}
    now = [dict(r, attack_spec=respell.get(r["attack_spec"], r["attack_spec"]),
                defense_spec=respell.get(r["defense_spec"], r["defense_spec"]), top1=0.1) for r in before]
    asked = {(r["attack_spec"], r["defense_spec"]) for r in now}
    regs = find_regressions(before, now, {"top1": 0.02}, "2026-01-01", asked)
    assert sorted((r.attack_spec, r.defense_spec, r.metric) for r in regs) == sorted(
        (r["attack_spec"], r["defense_spec"], "top1") for r in now)  # named as spelled tonight
    gone = find_regressions(before, now[:-1], {"top1": 1.0}, "2026-01-01", asked)
    assert [(r.attack_spec, r.defense_spec, r.metric) for r in gone] == [("fgsm:eps=4/255", "jpeg", MISSING)]
    other = [dict(now[-1], attack_spec="fgsm:eps=8/255")]  # another budget is another pair
    assert find_regressions(before[-1:], other, {"top1": 0.02}, "2026-01-01") == [
        type(gone[0])("fgsm:eps=4/255", "jpeg", MISSING, 100, None, 0.0, "2026-01-01")]


def test_deferred_interrupts_hold_the_first_signal_and_restore_the_handlers(caplog):
    import signal

    from pipeline.signals import defer_interrupts

    before = signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.WARNING, logger="pipeline.signals"):
        try:
            with defer_interrupts("finishing the night's history and report first") as deferred:
                os.kill(os.getpid(), signal.SIGINT)
                finished = True  # no KeyboardInterrupt: the block runs to its end
        except KeyboardInterrupt:
            pytest.fail("the first signal was not deferred")
    assert finished and deferred.received == [signal.SIGINT]
    assert ("SIGINT received: finishing the night's history and report first; interrupt again to stop now"
            in caplog.text)
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):  # a second one stops at once
        with defer_interrupts("x"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second signal did not stop the block")
    assert signal.getsignal(signal.SIGINT) is before

    class Stop(Exception):
        pass

    def terminate(signum, frame):
        raise Stop()

    old = signal.signal(signal.SIGTERM, terminate)  # as the semjpeg command installs one
    try:
        with pytest.raises(Stop):
            with defer_interrupts("x") as deferred:
                os.kill(os.getpid(), signal.SIGTERM)
                assert deferred.received == [signal.SIGTERM]
                os.kill(os.getpid(), signal.SIGTERM)
                pytest.fail("the second signal did not stop the block")
        assert signal.getsignal(signal.SIGTERM) is terminate
    finally:
        signal.signal(signal.SIGTERM, old)


def test_an_interrupt_after_the_commit_finishes_the_nights_history_and_report(tmp_path, photos, capsys, caplog,
                                                                              monkeypatch):
    import signal

    import pipeline.nightly as nightly

    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good_members(photos)[:2])
    cfg = config(tmp_path)
    path = write_config(tmp_path, cfg)
    rows = [{"attack_spec": a, "defense_spec": d, "n": 2, "top1": 2.0}  # an alarm tonight
            for a in ("clean", "fgsm:eps=4/255") for d in ("none", "jpeg:quality=50")]
    write_partition(cfg["history"], "2026-01-01", rows)
    write = nightly.write_partition

    def interrupted_write(*args):  # Ctrl-C just as the history is appended
        os.kill(os.getpid(), signal.SIGINT)
        return write(*args)

    monkeypatch.setattr(nightly, "write_partition", interrupted_write)
    with caplog.at_level(logging.WARNING, logger="pipeline.signals"):
        try:
            code = main(["nightly", "--config", path, "--date", "2026-01-02"])
        except KeyboardInterrupt:
            pytest.fail("the interrupt cut the night's bookkeeping short")
    assert code == 3
    assert "interrupt again to stop now" in caplog.text
    assert "REGRESSION: top1 of clean x none dropped from 2" in capsys.readouterr().err
    assert sorted(read_history(cfg["history"])) == ["2026-01-01", "2026-01-02"]
    night = tmp_path / "nightly" / "date=2026-01-02"
    assert (night / "report.html").exists() and json.loads((night / "nightly.json").read_text())["alarms"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_interrupt_after_the_commit_says_what_was_written(tmp_path, photos, capsys, monkeypatch):
    import signal

    import pipeline.nightly as nightly
    from jobs.__main__ import cli

    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good_members(photos)[:2])
    cfg = config(tmp_path)
    write = nightly.write_partition

    def twice_interrupted_write(*args):  # Ctrl-C, and Ctrl-C again, as the history is appended
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return write(*args)

    monkeypatch.setattr(nightly, "write_partition", twice_interrupted_write)
    monkeypatch.setattr("sys.argv", ["semjpeg", "nightly", "--config", write_config(tmp_path, cfg),
                                     "--date", "2026-01-02"])
    term = signal.getsignal(signal.SIGTERM)
    try:
        assert cli() == 130
    finally:
        signal.signal(signal.SIGTERM, term)
    night = tmp_path / "nightly" / "date=2026-01-02"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"semjpeg nightly: interrupted; {night} was written, but its history, nightly.json or report may be missing "
        "(run that date again)")
    assert (night / "_SUCCESS").exists() and not (night / "nightly.json").exists()


@pytest.mark.parametrize("column,array", [
    ("n", lambda pa: pa.array([4.0])),  # pandas writes an int column holding a null as float
    ("n", lambda pa: pa.array([4], pa.int32())),  # Spark's IntegerType
    ("psnr", lambda pa: pa.array([30], pa.int64())),
    ("top1", lambda pa: pa.array([0.5], pa.float32())),
    ("attack_spec", lambda pa: pa.array(["clean"], pa.large_string())),  # polars' strings
    ("defense_spec", lambda pa: pa.array(["none"]).dictionary_encode()),
])
def test_a_partition_with_compatible_column_types_is_read(tmp_path, column, array):
    """A night rewritten by another tool (a value fixed by hand with pandas, polars or Spark) keeps
    its values under other but compatible types: it is read as the history's types, not refused
    as corrupt (which stopped every later night)."""
    import pyarrow as pa

    hist = tmp_path / "h"
    write_partition(str(hist), "2026-01-01", [HISTORY_ROW])
    part = hist / "date=2026-01-02"
    part.mkdir()
    table = pa.Table.from_pylist([HISTORY_ROW], schema=HISTORY_SCHEMA)
    table = table.set_column(table.schema.get_field_index(column), column, array(pa))
    pq.write_table(table, part / "summary.parquet")
    row = read_history(str(hist))["2026-01-02"][0]
    assert row[column] == pa.Table.from_pylist([HISTORY_ROW]).column(column).to_pylist()[0] or column == "psnr"
    assert type(row["n"]) is int and row["attack_spec"] == "clean" and row["defense_spec"] == "none"
    # Values a cast would change are still refused.
    table = table.set_column(table.schema.get_field_index("n"), "n", pa.array([4.5]))
    pq.write_table(table, part / "summary.parquet")
    with pytest.raises(ValueError, match="date=2026-01-02 .* is corrupt: column n is double, expected int64"):
        read_history(str(hist))


def test_a_partition_without_a_metric_column_reads_it_as_no_value(tmp_path):
    """A night written before a metric existed (a column added later) is read with that metric
    empty, compared where it has values; its identity columns are still required."""
    import pyarrow as pa

    hist = tmp_path / "h"
    part = hist / "date=2026-01-01"
    part.mkdir(parents=True)
    old = pa.Table.from_pylist([dict(HISTORY_ROW, attack_spec="fgsm", defense_spec="jpeg")], schema=HISTORY_SCHEMA)
    pq.write_table(old.drop_columns(["ssim", "linf", "rmse"]), part / "summary.parquet")
    h = read_history(str(hist))
    assert h["2026-01-01"][0]["ssim"] is None and h["2026-01-01"][0]["top1"] == 0.5
    tonight = [dict(HISTORY_ROW, attack_spec="fgsm", defense_spec="jpeg", top1=0.1, ssim=0.5)]
    _, alarms = compare(h, "2026-01-02", tonight, DEFAULT_TOLERANCE)
    assert [a.metric for a in alarms] == ["top1"]
    pq.write_table(old.drop_columns(["defense_spec"]), part / "summary.parquet")
    with pytest.raises(ValueError, match="date=2026-01-01 .* is corrupt: no column defense_spec"):
        read_history(str(hist))


def test_stray_files_beside_interrupted_write_leftovers_are_no_partition(tmp_path):
    """A folder holding a leftover temporary file and hidden or marker files (a Finder .DS_Store,
    a _SUCCESS) is the leftovers of an interrupted write too, as pyarrow reads it."""
    hist = tmp_path / "h"
    write_partition(str(hist), "2026-01-01", [HISTORY_ROW])
    part = hist / "date=2026-01-02"
    part.mkdir()
    (part / ".summary.parquet.tmp-0badc0de").write_bytes(b"PAR1 half")
    (part / ".DS_Store").write_bytes(b"x")
    (part / "_SUCCESS").write_bytes(b"")
    assert sorted(read_history(str(hist))) == ["2026-01-01"]
    (part / ".summary.parquet.tmp-0badc0de").unlink()  # a folder with stray files only lost its file
    with pytest.raises(ValueError, match="has no summary.parquet"):
        read_history(str(hist))


def test_history_on_an_object_store_takes_new_dates_and_survives_a_failed_write(objstore):
    """An object store has no folders: listing a date never written raised FileNotFoundError, so
    a nightly run on gs:// or s3:// could write no new night. A write that fails leaves the
    night's previous file (a move there is a copy, then a deletion)."""
    from tests.pipeline.conftest import ObjectStore

    row = {"run_id": "r0", "model": "m", "attack": "clean", "attack_spec": "clean", "defense": "none",
           "defense_spec": "none", "n": 3, "top1": 0.5}
    write_partition("objstore://h/hist", "2026-01-01", [row])

    def fail(op, path, source):
        if op == "cp":
            raise OSError("503 Service Unavailable")

    ObjectStore.hook = staticmethod(fail)
    for date in ("2026-01-01", "2026-01-02"):
        with pytest.raises(OSError, match="503"):
            write_partition("objstore://h/hist", date, [{**row, "run_id": "r1"}])
    ObjectStore.hook = None
    assert {d: [r["run_id"] for r in rows] for d, rows in read_history("objstore://h/hist").items()} == {
        "2026-01-01": ["r0"]}
    write_partition("objstore://h/hist", "2026-01-02", [{**row, "run_id": "r2"}])
    assert {d: [r["run_id"] for r in rows] for d, rows in read_history("objstore://h/hist").items()} == {
        "2026-01-01": ["r0"], "2026-01-02": ["r2"]}
