"""End to end with the real default model on 8 dev images, through the CLI."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from jobs.__main__ import main


def test_fgsm_drops_top1_and_jpeg_recovers_part(tmp_path, dev_dir, capsys):
    files = sorted(p.name for p in dev_dir.glob("*.JPEG"))
    picked = tmp_path / "picked"
    picked.mkdir()
    for i in range(8):  # evenly spaced over the 500 classes
        name = files[i * len(files) // 8]
        (picked / name).write_bytes((dev_dir / name).read_bytes())
    assert main(["shard", "--input", str(picked), "--output", str(tmp_path / "dev"), "--per-shard", "4",
                 "--labels", str(dev_dir / "labels.csv")]) == 0
    shards = sorted(tmp_path.glob("dev-*.tar"))
    out = tmp_path / "out"
    code = main(["evaluate", *sum((["--input", str(s)] for s in shards), []), "--output", str(out),
                 "--attack", "fgsm:eps=4/255", "--defense", "jpeg:quality=50", "--batch-size", "8",
                 "--runner", "FnApiRunner"])
    printed = capsys.readouterr().out
    assert code == 0 and "fgsm:eps=4/255" in printed and "jpeg:quality=50" in printed
    summary = json.loads((out / "summary.json").read_text())
    t = {(r["attack"], r["defense"]): r for r in summary["table"]}
    assert summary["samples"] == 8
    clean, adv, adv_jpeg = t[("clean", "none")], t[("fgsm", "none")], t[("fgsm", "jpeg")]
    assert clean["top1"] >= 0.75
    assert adv["top1"] <= clean["top1"] - 0.5, "FGSM at 4/255 must drop top-1 sharply"
    assert adv_jpeg["agree_clean"] >= adv["agree_clean"] + 0.125, "JPEG must recover part of it"
    assert adv["linf"] <= 4 / 255 + 1e-6
    rows = pq.read_table(sorted((out / "metadata").glob("*.parquet"))).to_pylist()
    assert len(rows) == 8 * 4 and {r["pred_name"] for r in rows} and all(r["label"] is not None for r in rows)
