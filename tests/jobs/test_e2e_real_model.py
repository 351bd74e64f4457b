"""End to end with the real default model through the CLI: on 8 dev images, and the embedded demo
(scikit-image's photos, no ../shared needed)."""
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


def test_demo_runs_on_its_embedded_default_and_its_source_outlives_the_run(tmp_path, monkeypatch, capsys):
    """`semjpeg demo` as the README shows it: 8 photos (one grayscale), clean + FGSM + IGSM x
    none + JPEG 50. Its input is a cached copy of the photos, which the metadata's source names
    and which still exists after the run (it used to name a deleted temporary folder)."""
    from jobs.demo import PHOTOS

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--runner", "FnApiRunner"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "semjpeg-demo"
    assert f"wrote {out.name}" in printed or f"wrote ./{out.name}" in printed
    summary = json.loads((out / "summary.json").read_text())
    t = {(r["attack"], r["defense"]): r for r in summary["table"]}
    assert summary["samples"] == len(PHOTOS) and set(t) == {
        (a, d) for a in ("clean", "fgsm", "igsm") for d in ("none", "jpeg")}
    assert t[("clean", "none")]["agree_clean"] == 1.0
    assert t[("igsm", "none")]["agree_clean"] <= 0.25, "IGSM at 4/255 must fool the model"
    assert t[("igsm", "jpeg")]["agree_clean"] > t[("igsm", "none")]["agree_clean"]
    rows = pq.read_table(sorted((out / "metadata").glob("*.parquet"))).to_pylist()
    sources = {r["source"] for r in rows}
    photos = tmp_path / "cache" / "semjpeg" / "demo-photos"
    assert len(rows) == len(PHOTOS) * 6 and sources == {str(photos)}
    assert sorted(p.name for p in photos.iterdir()) == sorted(PHOTOS)
    stamps = {p.name: p.stat().st_mtime_ns for p in photos.iterdir()}
    (photos / "stray.png").write_bytes((photos / PHOTOS[0]).read_bytes())  # not the demo's: not its input
    assert main(["demo", "--runner", "FnApiRunner", "--attack", "fgsm:eps=4/255"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in photos.iterdir()} == stamps  # reused, not copied again
    assert json.loads((out / "summary.json").read_text())["samples"] == len(PHOTOS)
