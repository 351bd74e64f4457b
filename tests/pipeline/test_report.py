"""The HTML report: self-contained, every section present, rendered by headless Chromium."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from jobs.__main__ import main
from pipeline.evaluate import run_evaluate
from tests.pipeline.conftest import tiny_config
from tests.shards import good_members, write_tar


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, photos):
    from apache_beam.options.pipeline_options import PipelineOptions

    tmp = tmp_path_factory.mktemp("report")
    write_tar(tmp / "a.tar", good_members(photos))
    cfg = tiny_config([str(tmp / "a.tar")], tmp / "run", attacks=("fgsm:eps=8/255",),
                      defenses=("jpeg:quality=30", "jpeg:quality=70", "aug_msroi", "jpeg:match=aug_msroi"),
                      save_maps=True)
    run_evaluate(cfg, PipelineOptions(["--runner", "FnApiRunner"]))
    return tmp / "run"


def test_report_is_self_contained_with_every_section(run_dir, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", "--run", str(run_dir), "--output", str(out)]) == 0
    page = out.read_text()
    for section in ("Accuracy per attack × defense", "Accuracy against bytes", "PSNR and SSIM", "Gallery",
                    "fgsm:eps=8/255", "jpeg:match=aug_msroi"):
        assert section in page
    srcs = re.findall(r"src='([^']*)'", page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)  # nothing fetched from elsewhere
    assert len([s for s in srcs if s.startswith("data:image/png")]) >= 3  # plots and overlays
    # Under each gallery image its predicted class (the tiny model's "classN"), what the mark
    # means, and under the clean images the true labels the shard gives (1 to 4, not every image).
    gallery = page[page.index("<h2>Gallery</h2>"):page.index("<h2>Configuration</h2>")]
    assert re.search(r"<div class='cap'>class\d \(0\.\d\d\)", gallery)
    assert "same class as on the clean image" in gallery and "true label" in gallery
    true = re.findall(r"true: ([^<]*)<", gallery)
    assert len(true) >= 2 and set(true) <= {f"class{i}" for i in range(1, 5)} | {f"class {i}" for i in range(1, 5)}
    assert "http://" not in page and "https://" not in page


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    out = tmp_path / "report.html"
    assert main(["report", "--run", str(run_dir), "--output", str(out)]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400",
                    f"--screenshot={shot}", out.as_uri()], capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (2400, 1200)
    assert img.std() > 20  # text, plots and photos, not a blank page


def test_report_of_specs_written_in_capitals(tmp_path, photos, fnapi):
    """Specs are kept as written (``JPEG:quality=30``), their names read in any case: the summary
    names each row's attack and defense as the registry does, the rate plot draws them (the
    report ended with a traceback, the plot's legend empty), and the gallery shows their columns."""
    write_tar(tmp_path / "a.tar", good_members(photos))
    cfg = tiny_config([str(tmp_path / "a.tar")], tmp_path / "run", attacks=("FGSM:eps=8/255",),
                      defenses=("JPEG:quality=30", "Aug_MSROI"))
    summary = run_evaluate(cfg, fnapi)
    assert {(r["attack"], r["defense"]) for r in summary["table"]} == {
        (a, d) for a in ("clean", "fgsm") for d in ("none", "jpeg", "aug_msroi")}
    out = tmp_path / "report.html"
    assert main(["report", "--run", str(tmp_path / "run"), "--output", str(out)]) == 0
    gallery = out.read_text().split("<h2>Gallery</h2>")[1]
    assert re.findall(r"<th>([^<]*)</th>", gallery) == ["clean", "adversarial", "JPEG:quality=30", "Aug_MSROI"]
    assert "missing" not in gallery


def test_report_with_a_history_that_does_not_exist_is_an_error(run_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", "--run", str(run_dir), "--history", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert f"history {tmp_path / 'nope'} is not a folder" in capsys.readouterr().err
    assert not out.exists()


def test_report_recomputes_regressions_with_default_tolerance_and_marks_cells(run_dir, tmp_path):
    """An evaluate run (no nightly.json) against a history: compared with the latest night."""
    import json

    from pipeline.history import history_rows, write_partition

    summary = json.loads((run_dir / "summary.json").read_text())
    rows = history_rows(summary, "2026-01-01")
    write_partition(str(tmp_path / "h"), "2026-01-01", [dict(r, agree_clean=2.0, run_id="earlier") for r in rows])
    out = tmp_path / "report.html"
    assert main(["report", "--run", str(run_dir), "--history", str(tmp_path / "h"), "--output", str(out)]) == 0
    page = out.read_text()
    assert f"Regressions ({len(rows)})" in page and "compared with 2026-01-01, with the default tolerance" in page
    assert page.count("<td class='bad'>") == len(rows) and "Trends over 1 night<" in page


def test_report_without_history_shows_the_alarms_the_nightly_job_recorded(run_dir, tmp_path):
    """A nightly run's report written again without --history (its own report.html, say) keeps
    the night's alarms, as nightly.json has them; with a history they are recomputed."""
    import json

    run = tmp_path / "out" / "date=2026-01-05"
    shutil.copytree(run_dir, run)
    alarm = "top1 of fgsm:eps=8/255 x none dropped from 0.9 (2026-01-04) to 0.1 (tolerance 0.02)"
    (run / "nightly.json").write_text(json.dumps({
        "date": "2026-01-05", "history": str(tmp_path / "h"), "tolerance": {"top1": 0.02},
        "previous_date": "2026-01-04", "alarms": [alarm, "<b>x</b>"]}))
    out = run / "report.html"
    assert main(["report", "--run", str(run), "--output", str(out)]) == 0
    page = out.read_text()
    assert "Regressions (2)" in page and f"<li>{alarm}</li>" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "The alarms the nightly job recorded (compared with 2026-01-04)." in page
    (tmp_path / "h").mkdir()  # a history: recomputed (nothing to compare with), not as recorded
    assert main(["report", "--run", str(run), "--history", str(tmp_path / "h"), "--output", str(out)]) == 0
    assert "Regressions (" not in out.read_text()


def test_report_of_a_night_that_recorded_an_infinite_tolerance(run_dir, tmp_path, capsys):
    """Nightly configs took ``psnr: .inf`` (never alarm on a PSNR drop) until non-finite
    tolerances became config errors, and nightly.json recorded it as ``Infinity``: the report of
    such a night was refused as a corrupt nightly.json."""
    import json

    from pipeline.history import history_rows, write_partition

    run = tmp_path / "out" / "date=2026-01-05"
    shutil.copytree(run_dir, run)
    (run / "nightly.json").write_text(json.dumps({  # as the nightly job wrote it then
        "date": "2026-01-05", "history": str(tmp_path / "h"),
        "tolerance": {"top1": 0.02, "agree_clean": 0.02, "psnr": float("inf"), "ssim": 0.01, "n": 0.1},
        "previous_date": None, "alarms": []}, indent=1))
    assert '"psnr": Infinity' in (run / "nightly.json").read_text()
    summary = json.loads((run / "summary.json").read_text())
    better = [dict(r, agree_clean=2.0, psnr=(r["psnr"] or 0.0) + 100.0, run_id="earlier")
              for r in history_rows(summary, "2026-01-04")]
    write_partition(str(tmp_path / "h"), "2026-01-04", better)
    out = tmp_path / "report.html"
    assert main(["report", "--run", str(run), "--history", str(tmp_path / "h"), "--output", str(out)]) == 0, \
        capsys.readouterr().err
    page = out.read_text()
    assert "with the tolerance recorded with the nightly run (top1 0.02, agree_clean 0.02, psnr inf," in page
    assert f"Regressions ({len(better)})" in page and "agree_clean of" in page and "psnr of" not in page


def test_report_of_a_past_night_shows_no_later_nights(run_dir, tmp_path):
    """A nightly run folder of 2026-01-05 reported against a history that goes on to 2026-01-09:
    compared with the night before it, and its trends stop at its own night."""
    import json

    from pipeline.history import history_rows, write_partition

    run = tmp_path / "out" / "date=2026-01-05"
    shutil.copytree(run_dir, run)
    summary = json.loads((run / "summary.json").read_text())
    for date, run_id in (("2026-01-01", "earlier"), ("2026-01-05", "that-night"), ("2026-01-09", "later")):
        write_partition(str(tmp_path / "h"), date, [dict(r, run_id=run_id) for r in history_rows(summary, date)])
    out = tmp_path / "report.html"
    assert main(["report", "--run", str(run), "--history", str(tmp_path / "h"), "--output", str(out)]) == 0
    page = out.read_text()
    assert "compared with 2026-01-01" in page and "Trends over 2 nights<" in page
    out_evaluate = tmp_path / "evaluate.html"  # a run that is no night: every night
    assert main(["report", "--run", str(run_dir), "--history", str(tmp_path / "h"), "--output",
                 str(out_evaluate)]) == 0
    assert "Trends over 3 nights<" in out_evaluate.read_text()


def test_trends_use_a_date_axis(caplog):
    import logging

    from pipeline.report import plot_trends

    row = {"attack_spec": "fgsm", "defense_spec": "jpeg", "agree_clean": 0.5}
    with caplog.at_level(logging.INFO, logger="matplotlib"):
        assert plot_trends({"2026-01-01": [row], "2026-01-09": [row]}).startswith(b"\x89PNG")
    assert "categorical" not in caplog.text


@pytest.mark.parametrize("nights", [
    ["2026-11-27"],  # one night: the axis once spanned four years
    ["2026-11-26", "2026-11-27"],  # two: it once ticked every few hours
    ["2026-11-01", "2026-11-09"],  # a gap keeps its width
    [f"2026-{m:02d}-{d:02d}" for m in (10, 11) for d in range(1, 29)],  # 56 nights: thinned
])
def test_trends_name_each_night_by_its_date(nights):
    import datetime as dt

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    from pipeline.report import TREND_LABELS, trends_figure

    row = {"attack_spec": "fgsm", "defense_spec": "jpeg", "agree_clean": 0.5}
    fig = trends_figure({n: [row] for n in nights})
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert set(labels) <= set(nights) and labels[-1] == nights[-1]
    assert len(labels) <= TREND_LABELS and (len(nights) > TREND_LABELS or labels == nights)
    assert [mdates.num2date(x).date().isoformat() for x in ax.get_xticks()] == labels
    lo, hi = (mdates.num2date(x).date() for x in ax.get_xlim())
    first, last = dt.date.fromisoformat(nights[0]), dt.date.fromisoformat(nights[-1])
    assert lo == first - dt.timedelta(days=1) and hi == last + dt.timedelta(days=1)
    plt.close(fig)


def test_trends_legend_sits_under_the_axes_and_keeps_the_figure_its_width():
    """Its legend stood right of the axes: a figure half again as wide, shrunk by the page until
    its labels were hard to read."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    from pipeline.report import trends_figure

    pairs = [(a, d) for a in ("fgsm:eps=4/255", "igsm:eps=4/255,steps=10") for d in ("jpeg:match=aug_msroi", "aug_msroi", "msroi")]
    history = {n: [{"attack_spec": a, "defense_spec": d, "agree_clean": 0.5} for a, d in pairs]
               for n in ("2026-01-01", "2026-01-02", "2026-01-03")}
    fig = trends_figure(history)
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    assert len(legend.get_texts()) == 3 and not any(ax.get_legend() for ax in fig.axes)  # the defenses
    for ax in fig.axes:
        assert not legend.get_window_extent(renderer).overlaps(ax.get_tightbbox(renderer))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    assert Image.open(buf).width <= 11 * 110 * 1.05  # the figure's own width, not the legend's
    plt.close(fig)


def test_trends_of_many_pairs_stay_readable():
    """Every pair's line in one panel: past ten pairs the colours repeated (a six-attack x three-
    defense night has eighteen) and lines could not be told apart. A panel per attack, a defense
    in one style everywhere and a style of its own in each panel."""
    import matplotlib.pyplot as plt

    from pipeline.report import RATE_PANELS, trends_figure

    attacks = ["clean", "fgsm:eps=4/255", "igsm:eps=4/255,steps=10", "pgd:eps=4/255", "deepfool", "jsma", "cw"]
    defenses = [f"jpeg:quality={q}" for q in (20, 30, 40, 50, 60, 75, 90)] + ["aug_msroi", "msroi", "jpeg:match=aug_msroi",
                                                                           "aug_msroi_gated", "none"]
    history = {n: [{"attack_spec": a, "defense_spec": d, "agree_clean": 0.5 + 0.01 * i}
                   for i, (a, d) in enumerate((a, d) for a in attacks for d in defenses)]
               for n in ("2026-01-01", "2026-01-02", "2026-01-03")}
    fig = trends_figure(history)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == [attacks[0]] + sorted(attacks[1:])
    assert len(fig.axes) == -(-len(attacks) // RATE_PANELS) * RATE_PANELS
    styles = {}
    for ax in shown:
        lines = ax.get_lines()
        # clean x none is the reference, not drawn
        assert len(lines) == len(defenses) - (ax.get_title() == "clean")
        look = [(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines]
        assert len(set(look)) == len(look)  # told apart within a panel
        styles[ax.get_title()] = look
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == sorted(defenses)
    # the same defense looks the same in every panel: the legend's styles, in legend order
    legend_look = [(h.get_color(), h.get_marker(), h.get_linestyle()) for h in legend.legend_handles]
    for title in attacks[1:]:
        assert styles[title] == legend_look
    plt.close(fig)


def test_gallery_reads_only_the_rows_it_shows(run_dir):
    """The report turned every metadata row of the run (all its columns) into a dict for a
    gallery of a few samples: 35,000 rows took 95 MB of Python heap, millions would not fit. It
    reads the shown samples' rows (caption columns only) and the predicted class names."""
    import json

    from pipeline.report import GALLERY_COLUMNS, gallery, load_rows, predicted_names

    summary = json.loads((run_dir / "summary.json").read_text())
    rows = load_rows(str(run_dir))
    assert len({r["key"] for r in rows}) > 2
    lean = gallery(str(run_dir), summary, size=2)
    assert lean == gallery(str(run_dir), summary, rows, size=2) and "✓" in lean
    some = load_rows(str(run_dir), keys=[rows[0]["key"]], columns=GALLERY_COLUMNS + ("no_such_column",))
    assert {r["key"] for r in some} == {rows[0]["key"]} and set(some[0]) == set(GALLERY_COLUMNS)
    assert len(some) == sum(r["key"] == rows[0]["key"] for r in rows)
    assert predicted_names(str(run_dir)) == {r["pred"]: r["pred_name"] for r in rows}


def test_gallery_gathers_samples_across_shards(tmp_path, photos):
    from pipeline.io import shard_name
    from pipeline.report import gallery
    from tests.shards import encode, write_tar
    from transforms.specs import safe_name

    run = tmp_path / "run"
    for attack, defense in (("clean", "none"), ("fgsm", "none"), ("fgsm", "jpeg:quality=50")):
        folder = run / "shards" / safe_name(attack) / safe_name(defense)
        folder.mkdir(parents=True)
        for index, keys in ((0, ("a", "b")), (1, ("c", "d")), (2, ("e",))):
            write_tar(folder / shard_name(index), [(f"{k}.png", encode(photos[0])) for k in keys])
    summary = {"config": {"attacks": ["clean", "fgsm"], "defenses": ["none", "jpeg:quality=50"]}}
    page = gallery(str(run), summary, [], size=4)
    assert page.count("<tr><td>") == 4 and "missing" not in page  # a, b, c, d from shards 0 and 1


def test_gallery_leaves_out_a_damaged_shard_or_map_with_a_warning(tmp_path, photos, caplog):
    """A damaged shard (a truncated copy) or saliency map is named in a warning and left out: the
    gallery shows the images it can read, and the report is still written (it was a traceback)."""
    import logging

    from pipeline.io import shard_name
    from pipeline.report import gallery
    from tests.shards import encode, write_tar
    from transforms.specs import safe_name

    run = tmp_path / "run"
    for attack, defense in (("clean", "none"), ("fgsm", "none"), ("fgsm", "aug_msroi")):
        folder = run / "shards" / safe_name(attack) / safe_name(defense)
        folder.mkdir(parents=True)
        for index, key in ((0, "a"), (1, "b")):
            members = [(f"{key}.png", encode(photos[0]))]
            if defense == "aug_msroi":
                members.append((f"{key}.map.png", b"not a png"))
            write_tar(folder / shard_name(index), members)
    damaged = run / "shards" / "clean" / "none" / shard_name(0)
    damaged.write_bytes(damaged.read_bytes()[:700])  # cut inside its first member
    summary = {"config": {"attacks": ["clean", "fgsm"], "defenses": ["none", "aug_msroi"]}}
    with caplog.at_level(logging.WARNING, logger="pipeline.report"):
        page = gallery(str(run), summary, [])
    assert page.count("<tr><td>") == 1 and "missing" not in page  # b, from shard 1, with its aug_msroi file
    assert page.count("<img") == 3 and page.count("data:image/png") == 3
    warnings = [r.getMessage() for r in caplog.records]
    assert any(str(damaged) in w for w in warnings)
    assert any(w.startswith("the gallery shows b of ") and "aug_msroi" in w and "without its map" in w for w in warnings)


def test_gallery_of_a_clean_only_run_shows_its_defenses(tmp_path, photos):
    """A run with no attack but ``clean`` (evaluate on an adversarial set, say) still shows its
    images: one table of the clean images beside their defended files."""
    from pipeline.io import shard_name
    from pipeline.report import gallery
    from tests.shards import encode, write_tar
    from transforms.specs import safe_name

    run = tmp_path / "run"
    for defense, ext in (("none", "png"), ("jpeg:quality=50", "jpg")):
        folder = run / "shards" / safe_name("clean") / safe_name(defense)
        folder.mkdir(parents=True)
        write_tar(folder / shard_name(0), [(f"{k}.{ext}", encode(photos[0], {"png": "PNG", "jpg": "JPEG"}[ext])) for k in ("a", "b")])
    summary = {"config": {"attacks": ["clean"], "defenses": ["none", "jpeg:quality=50"]}}
    page = gallery(str(run), summary, [])
    assert "<h3>clean</h3>" in page and "<th>jpeg:quality=50</th>" in page and "adversarial" not in page
    assert page.count("<tr><td>") == 2 and "missing" not in page
    assert page.count("data:image/png") == 2 and page.count("data:image/jpeg") == 2


def test_gallery_of_attack_and_defend_runs(tmp_path, photos, fnapi):
    """An attack run's gallery shows each clean image beside its adversarial ones; a defend run's,
    each defense's file (with its map over it), captioned by their own rows."""
    import dataclasses

    from pipeline.config import parse_defenses
    from pipeline.report import gallery, load_rows

    write_tar(tmp_path / "a.tar", good_members(photos))
    attack = tiny_config([str(tmp_path / "a.tar")], tmp_path / "adv", attacks=("fgsm:eps=8/255", "igsm:eps=4/255"),
                         defenses=(), layout="attack")
    defend = dataclasses.replace(
        tiny_config([str(tmp_path / "a.tar")], tmp_path / "def", attacks=(), defenses=(), save_maps=True),
        layout="defend", defenses=parse_defenses(["aug_msroi", "jpeg:quality=50"], reference=False))
    for cfg, heads in ((attack, ["clean", "fgsm:eps=8/255", "igsm:eps=4/255"]), (defend, ["aug_msroi", "jpeg:quality=50"])):
        summary = run_evaluate(cfg, fnapi)
        rows = load_rows(cfg.output)
        page = gallery(cfg.output, summary, rows, size=len({r["key"] for r in rows}))
        assert re.findall(r"<th>([^<]*)</th>", page) == heads
        # A run written before summary.json recorded its layout (the same folders): told by them
        # (its gallery said its shards were absent).
        earlier = {**summary, "config": {k: v for k, v in summary["config"].items() if k != "layout"}}
        assert gallery(cfg.output, earlier, rows, size=len({r["key"] for r in rows})) == page
        samples = {r["key"] for r in rows}
        assert page.count("<tr><td>") == len(samples) and "missing" not in page
        caps = re.findall(r"<div class='cap'>([^<]*) \([01]\.\d\d\)", page)
        assert len(caps) == len(samples) * len(heads) and all(c.startswith("class") for c in caps)
        # under each sample's first image its true label (a row per sample and column)
        assert page.count("true: class") == sum(r["label"] is not None for r in rows) // len(heads) > 0
    assert page.count("data:image/png") == len(samples)  # the defend run's aug_msroi files under their maps


def test_gallery_tells_apart_one_key_in_two_shards(tmp_path, photos, fnapi):
    """The same key in two input shards is two samples (told apart by ``source``): each gallery
    row shows its own shard's images under its own rows' captions."""
    from pipeline.report import gallery, load_rows
    from tests.shards import encode

    write_tar(tmp_path / "a.tar", [("k.png", encode(photos[0])), ("k.cls", b"1")])
    write_tar(tmp_path / "b.tar", [("k.png", encode(photos[1])), ("k.cls", b"2")])
    cfg = tiny_config([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], tmp_path / "run")
    summary = run_evaluate(cfg, fnapi)
    run = str(tmp_path / "run")
    rows = load_rows(run)
    page = gallery(run, summary, rows)
    clean = {r["source"]: r for r in rows if (r["attack"], r["defense"]) == ("clean", "none")}
    a, b = clean[str(tmp_path / "a.tar")], clean[str(tmp_path / "b.tar")]
    assert a["bytes"] != b["bytes"]
    cells = re.findall(r"<td><img src='data:image/png;base64,([^']*)' alt=''><div class='cap'>(.*?)</div>", page)
    firsts = [(data, cap) for data, cap in cells if "true: class " in cap]  # the clean column
    assert [cap.split("true: class ")[1][0] for _, cap in firsts] == ["1", "2"]
    assert [f"{r['bytes']:,} B" in cap for r, (_, cap) in zip((a, b), firsts)] == [True, True]
    assert firsts[0][0] != firsts[1][0]  # each shard's own clean image


def test_gallery_captions_name_the_classes_and_say_what_the_mark_means(tmp_path, photos):
    from pipeline.io import shard_name
    from pipeline.report import gallery
    from tests.shards import encode, write_tar
    from transforms.specs import safe_name

    run = tmp_path / "run"
    for attack, defense in (("clean", "none"), ("fgsm", "none"), ("fgsm", "jpeg:quality=50")):
        folder = run / "shards" / safe_name(attack) / safe_name(defense)
        folder.mkdir(parents=True)
        write_tar(folder / shard_name(0), [("a.png", encode(photos[0]))])
    base = {"key": "a", "label": 7, "prob": 0.9, "bytes": 1234, "clean_pred": 3}
    rows = [
        {**base, "attack": "clean", "defense": "none", "attack_spec": "clean", "defense_spec": "none",
         "pred": 3, "pred_name": "tabby cat", "agree_clean": True},
        {**base, "attack": "fgsm", "defense": "none", "attack_spec": "fgsm", "defense_spec": "none",
         "pred": 5, "pred_name": "guacamole", "agree_clean": False},
        {**base, "attack": "fgsm", "defense": "jpeg", "attack_spec": "fgsm", "defense_spec": "jpeg:quality=50",
         "pred": 3, "pred_name": "tabby cat", "agree_clean": True},
    ]
    summary = {"config": {"attacks": ["clean", "fgsm"], "defenses": ["none", "jpeg:quality=50"]}}
    page = gallery(str(run), summary, rows)
    legend = page[:page.index("<h3>")]
    assert "✓: the same class as on the clean image" in legend and "agreement with the clean prediction" in legend
    assert "not necessarily the true label" in legend and "true label" in legend
    caps = re.findall(r"<div class='cap'>(.*?)</div>", page)
    assert len(caps) == 3
    assert caps[0].startswith("tabby cat (0.90)") and "true: class 7" in caps[0] and "✓" not in caps[0]
    assert caps[1].startswith("guacamole (0.90)") and "✗" in caps[1] and "clean: tabby cat" in caps[1]
    assert caps[2].startswith("tabby cat (0.90)") and "✓" in caps[2] and "clean:" not in caps[2]
    # the true label by name when the run predicted that class somewhere
    named = gallery(str(run), summary, rows[:1] + [{**rows[1], "pred": 7, "pred_name": "goldfish"}])
    assert "true: goldfish" in named
    # an ImageNet model's names for a class no row predicted; the rows' own names first
    imagenet = gallery(str(run), {"config": {**summary["config"], "model": "efficientnet_lite0"}}, rows)
    assert "true: cock" in imagenet and "clean: tabby cat" in imagenet


def test_accuracy_table_shows_the_flagged_share_only_when_a_gated_defense_ran():
    from pipeline.report import _table

    row = {"attack_spec": "clean", "defense_spec": "jpeg:quality=50", "n": 4, "top1": 0.5, "agree_clean": 1.0,
           "success": None, "bytes": 1000.0, "bpp": 1.0, "psnr": 30.0, "identical": 0, "ssim": 0.9, "flagged": None}
    plain = _table({"table": [row]})
    assert "flagged" not in plain and plain.count("<td") == 10
    gated = _table({"table": [row, {**row, "defense_spec": "aug_msroi_gated", "flagged": 0.25}]})
    assert "<th>flagged</th>" in gated and "<td>0.250</td>" in gated and gated.count("<td") == 22


def test_rate_accuracy_plot_tells_variants_of_one_semantic_defense_apart():
    from pipeline.report import _semantic_styles

    styles = _semantic_styles([("aug_msroi_gated", "aug_msroi_gated"), ("aug_msroi", "aug_msroi"),
                               ("aug_msroi_gated", "aug_msroi_gated:jpeg_gate=0"),
                               ("aug_msroi_gated", "aug_msroi_gated"),  # the same spec again, another attack
                               ("aug_msroi_gated", "aug_msroi_gated:gate=0.5")])
    assert list(styles) == ["aug_msroi_gated", "aug_msroi", "aug_msroi_gated:jpeg_gate=0", "aug_msroi_gated:gate=0.5"]
    gated = [styles[s] for s in ("aug_msroi_gated", "aug_msroi_gated:jpeg_gate=0", "aug_msroi_gated:gate=0.5")]
    assert len({s["fmt"] for s in gated}) == 1  # one marker per defense
    assert len({(s["color"], s.get("markerfacecolor")) for s in gated}) == 3  # every spec its own look
    assert "markerfacecolor" not in gated[0] and styles["aug_msroi"]["fmt"] != gated[0]["fmt"]


def _plot_rows(attacks: list[str]) -> list[dict]:
    """Summary rows of a run with ``attacks`` (clean first) x none, two uniform JPEGs, Aug-MSROI
    and the JPEG matched to it, at the PSNRs and SSIMs of a real run."""
    row = {"n": 8, "top1": 0.5, "agree_clean": 0.9, "bpp": 2.0, "identical": 0}
    defenses = (("none", "none", 9000.0, 36.1, 0.96), ("jpeg", "jpeg:quality=50", 1031.0, 30.5, 0.916),
                ("jpeg", "jpeg:quality=75", 1500.0, 33.0, 0.94), ("aug_msroi", "aug_msroi", 1045.0, 29.9, 0.906),
                ("jpeg", "jpeg:match=aug_msroi", 1040.0, 30.5, 0.916))
    return [{**row, "attack_spec": a, "defense": d, "defense_spec": spec, "bytes": b,
             "psnr": None if (a, d) == ("clean", "none") else psnr, "ssim": 1.0 if (a, d) == ("clean", "none") else ssim}
            for a in attacks for d, spec, b, psnr, ssim in defenses]


@pytest.mark.parametrize("attacks", [["clean", "fgsm:eps=4/255"],
                                     ["clean", "fgsm:eps=4/255", "igsm:eps=16/255,steps=5"]])
def test_plot_legends_cover_no_labels_and_no_bars(monkeypatch, attacks):
    # The rate-accuracy legend, anchored at a fixed height under the panels, overlapped their x
    # labels ("mean kB per image"); the PSNR panel's legend, placed inside it, covered the tops of
    # its bars once three attacks' bars stood there.
    import matplotlib.pyplot as plt

    from pipeline import report

    figs = []
    monkeypatch.setattr(report, "_fig_png", lambda fig: figs.append(fig) or b"png")
    table = _plot_rows(attacks)
    report.plot_rate_accuracy(table)
    report.plot_quality(table)
    rate, quality = figs
    renderer = rate.canvas.get_renderer()
    (legend,) = rate.legends
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_tightbbox(renderer)) for ax in rate.axes)
    renderer = quality.canvas.get_renderer()
    legends = [*quality.legends, *(ax.get_legend() for ax in quality.axes if ax.get_legend())]
    assert len(legends) == 1 and len(legends[0].get_texts()) == len(attacks)
    box = legends[0].get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for ax in quality.axes for p in ax.patches]
    assert len(bars) == 2 * len(attacks) * 5 and not any(box.overlaps(b) for b in bars)
    assert not any(box.overlaps(ax.get_tightbbox(renderer)) for ax in quality.axes)
    for fig in figs:
        plt.close(fig)


def test_rate_accuracy_plot_labels_each_uniform_jpeg_by_its_quality(monkeypatch):
    """A uniform JPEG's point is labelled by its quality (the default's for ``jpeg``), its other
    parameters after it: the label was the last value in the spec, ``4:4:4`` or ``true``."""
    import matplotlib.pyplot as plt

    from pipeline import report

    figs = []
    monkeypatch.setattr(report, "_fig_png", lambda fig: figs.append(fig) or b"png")
    row = {"attack_spec": "clean", "defense": "jpeg", "n": 8, "top1": 0.5, "agree_clean": 0.9, "bpp": 2.0}
    specs = ["jpeg:quality=50", "jpeg", "jpeg:quality=30,subsampling=4:4:4", "jpeg:optimize=true,quality=20"]
    report.plot_rate_accuracy([{**row, "defense_spec": s, "bytes": 1000.0 + i} for i, s in enumerate(specs)])
    (fig,) = figs
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(
        ["50", "75", "30,subsampling=4:4:4", "20,optimize=true"])
    plt.close(fig)


def test_rate_accuracy_plot_wraps_many_attacks_into_rows(monkeypatch):
    """Seven attacks' panels side by side made a 2,600 px wide figure (twenty: 7,300 px) that the
    page's 1,200 px shrank until its text could not be read: at most 4 panels a row."""
    import matplotlib.pyplot as plt

    from pipeline import report

    figs = []
    monkeypatch.setattr(report, "_fig_png", lambda fig: figs.append(fig) or b"png")
    attacks = ["clean"] + [f"fgsm:eps={i}/255" for i in range(1, 7)]
    report.plot_rate_accuracy(_plot_rows(attacks))
    (fig,) = figs
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == attacks
    assert fig.get_figwidth() <= 4 * 4.2 and len({ax.get_position().y0 for ax in shown}) == 2
    assert all(ax.get_ylabel() for ax in shown if ax.get_subplotspec().is_first_col())
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    boxes = [ax.get_tightbbox(renderer) for ax in shown]  # titles and x labels included
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert not any(legend.get_window_extent(renderer).overlaps(b) for b in boxes)
    plt.close(fig)


def test_rate_accuracy_plot_of_an_earlier_summary_names_defenses_by_their_specs(monkeypatch):
    """A summary.json written before its rows' ``defense`` was the registry's name (``JPEG`` for
    ``JPEG:quality=30``): the plot reads the name from the spec (it drew nothing, and its empty
    legend ended the report with a traceback)."""
    import matplotlib.pyplot as plt

    from pipeline import report

    figs = []
    monkeypatch.setattr(report, "_fig_png", lambda fig: figs.append(fig) or b"png")
    table = []
    for r in _plot_rows(["clean", "fgsm:eps=4/255"]):
        name, colon, params = r["defense_spec"].partition(":")
        table.append({**r, "defense_spec": name.upper() + colon + params, "defense": name.upper()})
    assert report.plot_rate_accuracy(table) == b"png"
    (fig,) = figs
    labels = fig.legends[0].get_texts()
    assert [t.get_text() for t in labels] == ["uniform JPEG", "AUG_MSROI", "JPEG:match=aug_msroi"]
    plt.close(fig)


def test_report_never_overwrites_the_run_the_history_or_a_file_that_is_no_report(run_dir, tmp_path, capsys):
    import json

    from pipeline.history import history_rows, write_partition

    run_dir = shutil.copytree(run_dir, tmp_path / "run")  # the module's run stays whole if this fails
    summary = json.loads((run_dir / "summary.json").read_text())
    hist = tmp_path / "h"
    write_partition(str(hist), "2026-01-01", history_rows(summary, "2026-01-01"))
    partition = hist / "date=2026-01-01" / "summary.parquet"
    kept = {p: p.read_bytes() for p in (run_dir / "summary.json", partition)}
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    kept[notes] = b"mine"
    for output, message in (
        (run_dir / "summary.json", f"output {run_dir / 'summary.json'} is inside the run {run_dir}"),
        (run_dir / "new" / "report.html", "is inside the run"),
        (partition, f"output {partition} is inside the history {hist}"),
        (hist / "date=2026-01-02" / "r.html", "is inside the history"),
        (notes, f"output {notes} exists and is not an HTML file; refusing to replace it"),
    ):
        assert main(["report", "--run", str(run_dir), "--history", str(hist), "--output", str(output)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert {p: p.read_bytes() for p in kept} == kept
    assert not (run_dir / "new").exists() and not (hist / "date=2026-01-02").exists()
    again = tmp_path / "again.html"  # an earlier report is replaced
    again.write_text("<html>old</html>")
    assert main(["report", "--run", str(run_dir), "--output", str(again)]) == 0 and "old" not in again.read_text()


def test_report_escapes_the_counts_of_a_summary_it_did_not_write(run_dir, tmp_path):
    """A run's files are input like any other (its nightly.json's alarms are escaped): the image
    and row counts of a summary.json edited by hand, or written by another tool, too."""
    import json

    run = shutil.copytree(run_dir, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["samples"] = "<script>alert(1)</script>"
    summary["table"][0]["n"] = "<img src=x onerror=alert(2)>"
    assert summary["versions"]["torch"]  # the run's software, shown in the page
    summary["versions"]["torch"] = "<b>2</b>"
    (run / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "r.html"
    assert main(["report", "--run", str(run), "--output", str(out)]) == 0
    page = out.read_text()
    assert "<script>" not in page and "<img src=x" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; images" in page and "<td>&lt;img src=x onerror=alert(2)&gt;</td>" in page
    assert "torch &lt;b&gt;2&lt;/b&gt;, torchvision " in page


def test_report_of_a_run_without_results_says_so(run_dir, tmp_path):
    """A run where every input failed has no table rows: the page showed a header over nothing."""
    import json

    run = shutil.copytree(run_dir, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary.update(table=[], samples=0, errors={"decode": 3})
    (run / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "r.html"
    assert main(["report", "--run", str(run), "--output", str(out)]) == 0
    page = out.read_text()
    assert "No results: no image was evaluated" in page and "<th>top-1</th>" not in page
    assert "errors: decode 3" in page


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", "--run", str(tmp_path / "empty"), "--output", str(tmp_path / "new" / "r.html")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"semjpeg report: error: {tmp_path / 'empty'} is not a semjpeg run (no summary.json)"]
    assert not (tmp_path / "new").exists()  # the output's folder was made before the run was checked


@pytest.mark.parametrize("name, text, message", [
    ("summary.json", "{bad", "summary.json is corrupt: Expecting property name"),
    ("summary.json", "[]", "summary.json is corrupt: not a JSON object"),
    ("summary.json", '{"run_id": "r"}', "summary.json is corrupt: no table, config"),
    ("nightly.json", "", "nightly.json is corrupt: Expecting value"),
    # A recorded tolerance that is not one: NaN compared as no regression ever, a key that is
    # no metric or a value that is no number ended the report with a traceback.
    ("nightly.json", '{"tolerance": {"psnr": NaN}}',
     r"nightly.json is corrupt: tolerance.psnr must be a finite number >= 0 or null, got nan"),
    ("nightly.json", '{"tolerance": {"psnr": -1}}',
     r"nightly.json is corrupt: tolerance.psnr must be a finite number >= 0 or null, got -1"),
    ("nightly.json", '{"tolerance": {"linf": 0.1}}', r"nightly.json is corrupt: unknown key tolerance.linf; valid: "),
    ("nightly.json", '{"tolerance": {"psnr": "0.5"}}', r"nightly.json is corrupt: tolerance.psnr must be a number"),
    ("nightly.json", '{"tolerance": [0.1]}', r"nightly.json is corrupt: tolerance must be a mapping"),
    ("metadata/part-00000.parquet", "PAR1 garbage", r"metadata file .*part-00000.parquet of .* is corrupt: "),
])
def test_a_damaged_run_file_is_one_line_naming_it(run_dir, tmp_path, capsys, name, text, message):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / name).write_text(text)
    (tmp_path / "history").mkdir()
    out = tmp_path / "r.html"
    assert main(["report", "--run", str(run), "--history", str(tmp_path / "history"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not out.exists()
