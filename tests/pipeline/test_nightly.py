"""Nightly: config validation, history partitions, regression alarms, reruns, the report."""
from __future__ import annotations

import json
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.__main__ import main
from pipeline.history import find_regressions, read_history, write_partition
from pipeline.nightly import NightlyConfig
from tests.shards import good_members, write_tar


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
        ({"seed": "zero"}, "seed must be an integer"),
        ({"save_maps": 1}, "save_maps must be true or false"),
        ({"tolerance": {"top5": 0.1}}, "unknown key .*tolerance.top5"),
        ({"tolerance": {"top1": "a lot"}}, "tolerance.top1 must be a number"),
        ({"model": {"name": "tests.tiny:build", "layers": 3}}, "unknown key .*model.layers"),
        ({"attacks": ["fgsm:eps=x"]}, "bad value for 'eps'"),
        ({"runner_options": {"no_such_flag": 1}}, "unrecognized arguments: --no_such_flag"),
        ({"history": None}, "'history' is required"),
    ],
)
def test_config_errors_are_clear(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        NightlyConfig.from_dict(config(tmp_path, **change), "nightly.yaml")


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
    assert main(["nightly", "--config", path, "--date", "2026-11-24"]) == 0
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


def test_unwritable_output_is_a_clear_error(tmp_path, photos, capsys):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good_members(photos)[:2])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = config(tmp_path, output=str(blocker / "nightly"))
    assert main(["nightly", "--config", write_config(tmp_path, cfg), "--date", "2026-11-21"]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert not (tmp_path / "history").exists()
