"""`semjpeg report`: one self-contained HTML page for a run (every image and plot inlined).

Sections: regressions (the nightly job's alarms, or with a history those recomputed against it;
regressed cells of the table are marked), the accuracy table per attack x defense,
accuracy against bytes (Aug-MSROI, MSROI and aug_msroi_gated against uniform JPEG), PSNR and SSIM,
trends over past nights (with a history), and a gallery per attack: clean | adversarial | JPEG |
Aug-MSROI with its saliency heatmap overlaid, each with the predicted class (an attack run's
gallery shows the clean images beside their adversarial ones, a defend run's each defense's files).
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import posixpath
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from fsspec.core import url_to_fs
from PIL import Image

from transforms.specs import safe_name, spec_name, spec_params

from .history import pair_key, read_parquet
from .io import input_fs, is_within, join, read_bytes, shard_name, write_bytes

log = logging.getLogger(__name__)

GALLERY_SIZE = 4

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.25em .6em;border-bottom:1px solid #eee;text-align:right}
th{background:#f6f6f6}td.l,th.l{text-align:left}.bad{background:#fde2e2}.good{color:#176d2b}.warn{color:#a40000}
.gallery td{text-align:center;vertical-align:top;border:none}.gallery img{width:180px;height:180px;image-rendering:auto}
.cap{font-size:.8em;max-width:180px;margin:0 auto}.meta{color:#666;font-size:.9em}img.plot{max-width:100%}
"""


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _fig_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


# --------------------------------------------------------------------------- data


#: The metadata columns the gallery's captions read (a row's other columns stay on disk).
GALLERY_COLUMNS = ("source", "key", "attack", "defense", "attack_spec", "defense_spec", "agree_clean",
                   "clean_pred", "pred", "pred_name", "prob", "label", "bytes")


def _metadata_tables(run: str, columns: Iterable[str] | None = None):
    """Each metadata file of the run as a table of ``columns`` (those it has; None: all), one
    file at a time; a damaged file is an error naming it."""
    fs, root = url_to_fs(join(run, "metadata"))
    if not fs.exists(root):
        return
    for path in sorted(fs.glob(join(root, "*.parquet"))):
        try:
            with fs.open(path, "rb") as f:
                table = read_parquet(f.read(), None if columns is None else tuple(columns))
        except (ValueError, OSError) as e:  # pyarrow's errors say what, not which file
            raise ValueError(f"metadata file {path} of {run} is corrupt: {e}") from None
        yield table


def load_rows(run: str, keys: Iterable[str] | None = None, columns: Iterable[str] | None = None) -> list[dict]:
    """The run's metadata rows as dicts: those of ``keys`` only when given (None: all), with
    ``columns`` only when given. A run of millions of rows makes its gallery's few of them."""
    return _scan(run, keys, columns)[0]


def predicted_names(run: str) -> dict[int, str]:
    """Class index -> name as the run's rows predicted them, reading those two columns only."""
    return _scan(run, (), ("pred", "pred_name"))[1]


def _scan(run: str, keys: Iterable[str] | None, columns: Iterable[str] | None) -> tuple[list[dict], dict[int, str]]:
    """One pass over the run's metadata files: the rows of ``keys`` (None: all) as dicts, and the
    class names its rows predicted (of every row, where ``columns`` has pred and pred_name)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = None if keys is None else pa.array(sorted(set(keys)), pa.string())
    rows, names = [], {}
    for table in _metadata_tables(run, columns):
        if {"pred", "pred_name"} <= set(table.column_names):
            pairs = table.group_by(["pred", "pred_name"], use_threads=False).aggregate([])
            names.update((p, n) for p, n in zip(pairs.column("pred").to_pylist(), pairs.column("pred_name").to_pylist())
                         if p is not None)
        if wanted is not None:
            table = table.filter(pc.is_in(table.column("key"), value_set=wanted)) if len(wanted) else table.slice(0, 0)
        rows += table.to_pylist()
    return rows, names


def _run_json(run: str, name: str, keys: tuple[str, ...] = ()) -> dict:
    """The run's JSON object file ``name`` (summary.json, nightly.json), holding ``keys``; a
    damaged one is an error that names it (json's own message names no file)."""
    path = join(run, name)
    try:
        value = json.loads(read_bytes(path))
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{path} is corrupt: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is corrupt: not a JSON object")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(f"{path} is corrupt: no {', '.join(missing)}")
    return value


def _read_tar(path: str) -> dict[str, bytes]:
    """A shard's files by member name; {} for one that is absent, or damaged (a truncated copy):
    that one is named in a warning, and the gallery shows the images it can read."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        return {}
    try:
        with fs.open(p, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tf:
            return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    except (tarfile.TarError, OSError) as e:
        log.warning("the gallery leaves out shard %s: it cannot be read (%s)", path, " ".join(str(e).split()))
        return {}


# --------------------------------------------------------------------------- plots


def _is_semantic(defense: str) -> bool:
    return defense in _SEMANTIC_MARKERS


#: Marker, colour and size of each semantic defense in the rate-accuracy plot.
_SEMANTIC_MARKERS = {"aug_msroi": ("*", "#c0392b", 14), "msroi": ("D", "#2471a3", 7),
                     "aug_msroi_gated": ("P", "#1e8449", 10)}
#: Colours of the rate-matched or rate-controlled JPEGs, one per spec in order of appearance.
_MATCH_COLOURS = ("#f39c12", "#8e44ad", "#a04000", "#16a085")
#: Colours of a semantic defense's further specs (its first has its own colour, filled; the
#: others are drawn hollow in these, so ``aug_msroi_gated`` and ``aug_msroi_gated:jpeg_gate=0``
#: stay apart).
_VARIANT_COLOURS = ("#17202a", "#d35400", "#7d3c98", "#117a65")


def _semantic_styles(specs: list[tuple[str, str]]) -> dict[str, dict]:
    """Plot style (``ax.plot`` keyword arguments and format) of each semantic (defense, spec),
    in order of appearance: one marker per defense; its first spec filled in the defense's
    colour, each further one hollow in a colour of its own."""
    styles, seen = {}, {}
    for defense, spec in dict.fromkeys(specs):
        m, c, size = _SEMANTIC_MARKERS[defense]
        i = seen[defense] = seen.get(defense, -1) + 1
        if i == 0:
            styles[spec] = {"fmt": m, "color": c, "markersize": size}
        else:
            colour = _VARIANT_COLOURS[(i - 1) % len(_VARIANT_COLOURS)]
            styles[spec] = {"fmt": m, "color": colour, "markersize": size, "markerfacecolor": "none",
                            "markeredgewidth": 1.8}
    return styles


#: At most this many panels a row in the rate-accuracy plot.
RATE_PANELS = 4


def _jpeg_label(spec: str) -> str:
    """A uniform JPEG's point label: its quality (the default's when the spec gives none), then its
    other parameters as written (``30,subsampling=4:4:4``)."""
    from transforms.defenses import jpeg

    params = [p.strip() for p in spec.partition(":")[2].split(",") if p.strip()]
    quality = [p.partition("=")[2].strip() for p in params if p.partition("=")[0].strip() == "quality"]
    others = [p for p in params if p.partition("=")[0].strip() != "quality"]
    return ",".join((quality or [str(spec_params(jpeg)["quality"].default)]) + others)


def plot_rate_accuracy(table: list[dict], metric: str = "agree_clean") -> bytes | None:
    """``metric`` (agreement with the clean prediction, or top1) against mean bytes, one panel
    per attack, :data:`RATE_PANELS` a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack_spec"] for r in table))
    # Each defense named by its spec: summaries of earlier versions named ``JPEG:quality=30``'s ``JPEG``.
    rows = [{**r, "defense": spec_name(r["defense_spec"])} for r in table
            if spec_name(r["defense_spec"]) != "none" and r["bytes"] and r.get(metric) is not None]
    if not rows:
        return None
    matched = list(dict.fromkeys(r["defense_spec"] for r in rows
                                 if r["defense"] == "jpeg" and ("match" in r["defense_spec"] or "bytes" in r["defense_spec"])))
    styles = _semantic_styles([(r["defense"], r["defense_spec"]) for r in rows if _is_semantic(r["defense"])])
    # At most RATE_PANELS panels a row: wider, the page shrank the figure until it could not be read.
    ncols = min(RATE_PANELS, len(attacks))
    nrows = -(-len(attacks) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False, sharey=True,
                             gridspec_kw={"hspace": 0.45})  # room for a row's x labels and the next one's titles
    axes = grid.ravel()[:len(attacks)]
    for ax in grid.ravel()[len(attacks):]:
        ax.set_visible(False)
    for ax, attack in zip(axes, attacks):
        mine = [r for r in rows if r["attack_spec"] == attack]
        jpeg = sorted((r for r in mine if r["defense"] == "jpeg" and "match" not in r["defense_spec"]
                       and "bytes" not in r["defense_spec"]), key=lambda r: r["bytes"])
        if jpeg:
            ax.plot([r["bytes"] / 1000 for r in jpeg], [r[metric] for r in jpeg], "o-", color="#777",
                    label="uniform JPEG")
            for r in jpeg:
                ax.annotate(_jpeg_label(r["defense_spec"]), (r["bytes"] / 1000, r[metric]),
                            fontsize=7, xytext=(3, -8), textcoords="offset points", color="#555")
        for r in mine:
            if _is_semantic(r["defense"]):
                style = dict(styles[r["defense_spec"]])
                ax.plot(r["bytes"] / 1000, r[metric], style.pop("fmt"), **style, label=r["defense_spec"])
            elif "match" in r["defense_spec"] or "bytes" in r["defense_spec"]:
                c = _MATCH_COLOURS[matched.index(r["defense_spec"]) % len(_MATCH_COLOURS)]
                ax.plot(r["bytes"] / 1000, r[metric], "s", color=c, label=r["defense_spec"])
        ax.set_title(attack, fontsize=10)
        ax.set_xlabel("mean kB per image")
        ax.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel("agreement with clean prediction" if metric == "agree_clean" else metric)
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    # Under the panels' x labels, however many rows it takes: anchored at a fixed height, its
    # top met the labels.
    renderer = fig.canvas.get_renderer()
    bottom = min(ax.get_tightbbox(renderer).transformed(fig.transFigure.inverted()).y0 for ax in axes)
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(4, len(handles)),
               fontsize=8, bbox_to_anchor=(0.5, bottom - 0.02))
    return _fig_png(fig)


def plot_quality(table: list[dict]) -> bytes | None:
    """PSNR and SSIM against the clean image per defense, grouped by attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r["psnr"] is not None]
    if not rows:
        return None
    attacks = list(dict.fromkeys(r["attack_spec"] for r in rows))
    defenses = list(dict.fromkeys(r["defense_spec"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / max(1, len(attacks))
    for j, metric in enumerate(("psnr", "ssim")):
        ax = axes[j]
        for i, a in enumerate(attacks):
            by = {r["defense_spec"]: r[metric] for r in rows if r["attack_spec"] == a}
            xs = [k + i * width for k in range(len(defenses))]
            ax.bar(xs, [by.get(d) or 0 for d in defenses], width, label=a)
        ax.set_xticks([k + width * (len(attacks) - 1) / 2 for k in range(len(defenses))])
        ax.set_xticklabels(defenses, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
        if metric == "ssim":
            ax.set_ylim(max(0.0, min((r["ssim"] or 1) for r in rows) - 0.05), 1.0)
        ax.grid(axis="y", alpha=0.3)
    # Above the panels: inside one, it covered the tops of its bars.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center",
               bbox_to_anchor=(0.5, axes[0].get_position().y1 + 0.01),
               ncol=min(4, len(attacks)), fontsize=7)
    return _fig_png(fig)


#: At most this many nights are named on the trends' axis (the latest always).
TREND_LABELS = 10


def plot_trends(history: dict[str, list[dict]]) -> bytes | None:
    """Agreement over past nights for every (attack, defense) that is not the reference."""
    fig = trends_figure(history)
    return None if fig is None else _fig_png(fig)


def trends_figure(history: dict[str, list[dict]]):
    """The trends' matplotlib figure: a panel per attack (:data:`RATE_PANELS` a row), a line per
    defense in the same colour and marker in every panel, one legend of the defenses under them;
    one tick per night, named by its date (thinned to :data:`TREND_LABELS` shared by a row's panels,
    at least 3 a panel: 12 across a row of four), a day of margin on either side; None without a
    history. One panel of every pair's line was unreadable past ten pairs: colours repeated, and a
    six-attack night has eighteen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return None
    dates = sorted(history)
    # One line per pair however its specs were spelled (history.pair_key), named by its latest text.
    series: dict[tuple, list] = {}
    names: dict[tuple, str] = {}  # attack or defense identity -> its latest text
    for i, d in enumerate(dates):
        for r in history[d]:
            if (r["attack_spec"], r["defense_spec"]) != ("clean", "none"):
                key = pair_key(r["attack_spec"], r["defense_spec"])
                series.setdefault(key, [None] * len(dates))[i] = r["agree_clean"]
                names[key[0]], names[key[1]] = r["attack_spec"], r["defense_spec"]
    if not series:
        return None
    attacks = sorted({a for a, _ in series}, key=lambda a: (names[a] != "clean", names[a]))
    defenses = sorted({d for _, d in series}, key=lambda d: names[d])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^Dv<>pXh"
    style = {d: {"color": colours[i % len(colours)], "marker": markers[i // len(colours) % len(markers)],
                 "linestyle": "-" if i < len(colours) * len(markers) else "--"} for i, d in enumerate(defenses)}
    days = [_dt.date.fromisoformat(d) for d in dates]  # a date axis: nights missing leave gaps
    ncols = min(RATE_PANELS, len(attacks))
    nrows = -(-len(attacks) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(11, 3.4 + 2.6 * (nrows - 1)), squeeze=False, sharey=True,
                             gridspec_kw={"hspace": 0.6})
    for ax in grid.ravel()[len(attacks):]:
        ax.set_visible(False)
    # Nights are dates: a tick per night, not the locator's hours (two nights) or years (one).
    step = -(-len(days) // max(3, TREND_LABELS // ncols))
    ticks = days[::-1][::step][::-1]
    handles: dict[str, object] = {}
    for ax, attack in zip(grid.ravel(), attacks):
        for d in defenses:
            ys = series.get((attack, d))
            if ys is not None:
                (line,) = ax.plot(days, [np.nan if y is None else y for y in ys], markersize=4, **style[d])
                handles.setdefault(names[d], line)
        ax.set_title(names[attack], fontsize=9)
        ax.set_xticks(ticks, [t.isoformat() for t in ticks], rotation=30, ha="right", fontsize=7)
        ax.set_xlim(days[0] - _dt.timedelta(days=1), days[-1] + _dt.timedelta(days=1))
        ax.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel("agreement with clean prediction" if nrows == 1 else "agreement", fontsize=8)
    # Under the axes' labels: to their right it made the figure half again as wide, and the page
    # shrank it until its labels were hard to read.
    renderer = fig.canvas.get_renderer()
    bottom = min(ax.get_tightbbox(renderer).transformed(fig.transFigure.inverted()).y0
                 for ax in grid.ravel()[:len(attacks)])
    labels = sorted(handles)
    fig.legend([handles[n] for n in labels], labels, loc="upper center", ncol=3, fontsize=8,
               bbox_to_anchor=(0.5, bottom - 0.02))
    return fig


# --------------------------------------------------------------------------- gallery


def _gallery_columns(defenses: list[str]) -> list[tuple[str, str | None]]:
    """(title, defense spec) per column: adversarial, the rate-matched (or first) JPEG, the first
    Aug-MSROI or aug_msroi_gated defense (else the first MSROI)."""
    jpegs = [d for d in defenses if spec_name(d) == "jpeg"]
    jpeg = next((d for d in jpegs if "match" in d), jpegs[0] if jpegs else None)
    sem = next((d for d in defenses if spec_name(d).startswith("aug_msroi")), None) or next(
        (d for d in defenses if spec_name(d) == "msroi"), None)
    cols = [("adversarial", "none")]
    if jpeg:
        cols.append((jpeg, jpeg))
    if sem:
        cols.append((sem, sem))
    return cols


#: A gallery column: its title, its shard folder under ``shards/`` and its rows' (attack, defense).
_Column = tuple[str, tuple[str, ...], str, str]


def _layout(run: str, config: dict) -> str:
    """How the run stores its shards: as its summary.json records it, else as its folders show
    (runs written before the layout was recorded): an attack run keeps its tars in
    ``shards/clean/``, a defend run in ``shards/<defense>/``, where an evaluate run has folders
    (``shards/<attack>/<defense>/``)."""
    if "layout" in config:
        return config["layout"]
    if _shard_indexes(join(run, "shards", safe_name("clean"))):
        return "attack"
    if config["defenses"] and _shard_indexes(join(run, "shards", safe_name(config["defenses"][0]))):
        return "defend"
    return "evaluate"


def _gallery_tables(summary: dict, layout: str) -> list[tuple[str, list[_Column]]]:
    """(title, columns) of the gallery's tables, as the run's ``layout`` stores its shards; the
    first column's folder lists the keys shown."""
    config = summary["config"]
    attacks, defenses = config["attacks"], config["defenses"]
    if layout == "attack":  # shards/<attack>/: the clean images beside their adversarial ones
        return [("attacks", [("clean", ("clean",), "clean", "none")]
                 + [(a, (a,), a, "none") for a in attacks if a != "clean"])]
    if layout == "defend":  # shards/<defense>/: each defense's file (the input is not stored)
        return [("defenses", [(d, (d,), "clean", d) for d in defenses])]
    # One table per attack; the clean images' own table only in a run without attacks (an
    # evaluate of an adversarial set), where its defended files have no other place.
    tables = []
    for attack in [a for a in attacks if a != "clean"] or ["clean"]:
        cols = [c for c in _gallery_columns(defenses) if attack != "clean" or c[1] != "none"]
        tables.append((attack, [("clean", ("clean", "none"), "clean", "none")]
                       + [(title, (attack, d), attack, d) for title, d in cols]))
    return tables


def gallery(run: str, summary: dict, rows: list[dict] | None = None, size: int = GALLERY_SIZE) -> str:
    """HTML of the run's image tables: one per attack for an evaluate run (the clean images' table
    when it has no attack), one of the attacks for an attack run, one of the defenses for a defend
    run; a note when the shards are absent (or none can be read). ``rows``: the run's metadata
    rows, or None to read those of the samples shown only."""
    tables = _gallery_tables(summary, _layout(run, summary["config"]))

    def folder(parts: tuple[str, ...]) -> str:
        return join(run, "shards", *map(safe_name, parts))

    # The first ``size`` keys over the first column's shards in order; a key's images in every
    # other folder are in the shard of the same index.
    first = tables[0][1][0][1]  # every table's first column: the clean images, or the first defense's
    firsts: dict[int, dict[str, bytes]] = {}
    keys: list[tuple[str, int, str | None]] = []
    for index in _shard_indexes(folder(first)):
        if len(keys) >= size:
            break
        tar = firsts[index] = _read_tar(join(folder(first), shard_name(index)))
        mine = sorted({n[:-4] for n in tar if n.endswith((".png", ".jpg")) and not n.endswith(".map.png")})
        keys += [(k, index, _sample_source(tar.get(f"{k}.json"))) for k in mine[:size - len(keys)]]
    if not keys:
        return "<p class='meta'>No shards to show (the run's shards are absent or cannot be read).</p>"
    if rows is None:
        rows, predicted = _scan(run, {k for k, _, _ in keys}, GALLERY_COLUMNS)
        names = _class_names(summary, predicted)
    else:
        names = _class_names(summary, {r["pred"]: r["pred_name"] for r in rows if r.get("pred") is not None})
    # A key is unique within its input shard only (the same key in two shards is two samples):
    # rows are found by their source too, which each sample's .json member names.
    by = {(r.get("source"), r["key"], r["attack_spec"], r["defense_spec"]): r for r in rows}
    out = ["<p class='meta'>Under each image: the classifier's top-1 class and its probability, "
           "and the stored file's bytes. ✓: the same class as on the clean image (for a defended set: "
           "as on its input; the agreement with the clean prediction that the table reports), not "
           "necessarily the true label; ✗: another class, followed by the clean prediction's name. "
           "Under the first image, the true label where the input has one. A semantic defense's "
           "image shows its saliency map over it when the run saved maps.</p>"]
    indexes = sorted({i for _, i, _ in keys})
    for title, cols in tables:
        shards = {(parts, i): firsts[i] if parts == first else _read_tar(join(folder(parts), shard_name(i)))
                  for _, parts, _, _ in cols for i in indexes}
        out.append(f"<h3>{html.escape(title)}</h3><table class='gallery'><tr>"
                   + "".join(f"<th>{html.escape(t)}</th>" for t, _, _, _ in cols) + "</tr>")
        for key, index, source in keys:
            cells = []
            for n, (_, parts, attack, defense) in enumerate(cols):
                tar = shards[(parts, index)]
                data = tar.get(f"{key}.jpg") or tar.get(f"{key}.png")
                mime = "image/jpeg" if f"{key}.jpg" in tar else "image/png"
                heat = tar.get(f"{key}.map.png")
                if data is not None and heat is not None:
                    try:
                        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                        hm = np.asarray(Image.open(io.BytesIO(heat)).convert("RGB"))
                    except OSError as e:  # PIL's UnidentifiedImageError among them
                        log.warning("the gallery shows %s of %s without its map: it cannot be read (%s)",
                                    key, join(folder(parts), shard_name(index)), e)
                    else:
                        data, mime = _png(_blend(img, hm)), "image/png"
                cells.append(_cell(data, mime, by.get((source, key, attack, defense)), names, label=n == 0))
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
    return "\n".join(out)


def _class_names(summary: dict, predicted: dict[int, str]) -> dict[int, str]:
    """Class index -> name: the model's own names where it is a registry or torchvision model
    (a clean prediction or a label no row predicted has its name too), and as the run's rows
    predicted them (``predicted``: any model's classes, not only ImageNet's)."""
    from transforms.models import known_class_names

    try:
        known = known_class_names(summary["config"].get("model") or "")
    except (ValueError, ImportError):  # a model this version does not know (an older run's, say)
        known = None
    names = dict(enumerate(known or ()))
    names.update(predicted)
    return names


def _sample_source(doc: bytes | None) -> str | None:
    """The ``source`` a sample's ``<key>.json`` member names (its metadata row's), or None."""
    try:
        source = json.loads(doc)["semjpeg"]["source"]
    except (TypeError, ValueError, KeyError):
        return None
    return source if isinstance(source, str) else None


def _shard_indexes(folder: str) -> list[int]:
    """Indexes of the shards in ``folder``, in order."""
    fs, root = url_to_fs(folder)
    if not fs.isdir(root):
        return []
    found = []
    for p in fs.ls(root, detail=False):
        digits = "".join(c for c in posixpath.basename(p) if c.isdigit())
        if digits and shard_name(int(digits)) == posixpath.basename(p):
            found.append(int(digits))
    return sorted(found)


def _blend(image: np.ndarray, heat_rgb: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    mix = (1 - alpha) * image.astype(np.float32) + alpha * heat_rgb.astype(np.float32)
    return np.clip(np.rint(mix), 0, 255).astype(np.uint8)


def _cell(data: bytes | None, mime: str, row: dict | None, names: dict, label: bool = False) -> str:
    """An image and its caption; ``label``: also the sample's true label (the row's first image)."""
    if data is None:
        return "<td><div class='cap'>missing</div></td>"
    cap = ""
    if row is not None:
        reference = row["attack"] == "clean" and row["defense"] == "none"
        if reference or row.get("agree_clean") is None:  # no clean prediction to compare with
            mark = ""
        elif row["agree_clean"]:
            mark = " <span class='good' title='same class as on the clean image'>✓</span>"
        else:
            clean = names.get(row.get("clean_pred"), f"class {row.get('clean_pred')}")
            mark = (" <span class='warn' title='not the class predicted on the clean image'>✗</span>"
                    f"<br><span class='meta'>clean: {html.escape(str(clean))}</span>")
        cap = f"{html.escape(str(row['pred_name']))} ({row['prob']:.2f}){mark}"
        if label and row.get("label") is not None:
            true = names.get(row["label"], f"class {row['label']}")
            cap += f"<br><span class='meta'>true: {html.escape(str(true))}</span>"
        cap += f"<br><span class='meta'>{row['bytes']:,} B</span>"
    return f"<td><img src='{_data_uri(data, mime)}' alt=''><div class='cap'>{cap}</div></td>"


# --------------------------------------------------------------------------- page


def _table(summary: dict, regressions: Iterable = ()) -> str:
    """The accuracy table; cells of metrics that regressed get the ``bad`` class."""
    bad = {(r.attack_spec, r.defense_spec, r.metric) for r in regressions if hasattr(r, "metric")}
    gated = any(r.get("flagged") is not None for r in summary["table"])  # a gated defense ran
    head = ("<tr><th class='l'>attack</th><th class='l'>defense</th><th>n</th><th>top-1</th><th>agree</th>"
            "<th>attack success</th><th>bytes</th><th>bpp</th><th>PSNR</th><th>SSIM</th>"
            + ("<th>flagged</th>" if gated else "") + "</tr>")
    body = []
    for r in summary["table"]:
        psnr = "∞" if r["psnr"] is None and r.get("identical") == r["n"] else _fmt(r["psnr"], ".2f")
        cells = {"n": html.escape(str(r["n"])), "top1": _fmt(r["top1"]), "agree_clean": _fmt(r["agree_clean"]),
                 "success": _fmt(r.get("success")), "bytes": _fmt(r["bytes"], ",.0f"), "bpp": _fmt(r["bpp"], ".2f"),
                 "psnr": psnr, "ssim": _fmt(r["ssim"], ".4f")}
        if gated:
            cells["flagged"] = _fmt(r.get("flagged"))
        pair = (r["attack_spec"], r["defense_spec"])
        body.append(
            f"<tr><td class='l'>{html.escape(pair[0])}</td><td class='l'>{html.escape(pair[1])}</td>"
            + "".join(f"<td class='bad'>{v}</td>" if (*pair, m) in bad else f"<td>{v}</td>" for m, v in cells.items())
            + "</tr>")
    if not body:  # every input failed: the header says what, the errors line above why
        return "<p class='meta'>No results: no image was evaluated (see the errors above and the run's errors/).</p>"
    return f"<table>{head}{''.join(body)}</table>"


def _img(png: bytes | None, alt: str) -> str:
    return f"<img class='plot' alt='{alt}' src='{_data_uri(png, 'image/png')}'>" if png else f"<p class='meta'>No data for {alt}.</p>"


def render_report(run: str, summary: dict, *, history: dict[str, list[dict]] | None = None,
                  regressions: Iterable = (), comparison: str = "") -> str:
    """The report page for the run at ``run`` (an evaluate, defend, attack or nightly output
    folder) and its ``summary.json`` content; ``comparison`` says what the regressions were
    computed against."""
    cfg = summary.get("config", {})
    regressions = list(regressions)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>semjpeg report {html.escape(summary['run_id'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>semjpeg report</h1><p class='meta'>run {html.escape(summary['run_id'])} · created "
        f"{html.escape(summary.get('created', ''))} · model {html.escape(str(cfg.get('model')))} · "
        f"{html.escape(str(summary.get('samples', 0)))} images · errors: "
        + html.escape(", ".join(f"{k} {v}" for k, v in summary.get("errors", {}).items()) or "none") + "</p>",
    ]
    versions = summary.get("versions")
    if isinstance(versions, dict) and versions:  # runs written before summary.json recorded them have none
        parts.append("<p class='meta'>software: " + html.escape(
            ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)) + "</p>")
    if regressions:
        items = "".join(f"<li>{html.escape(r.describe())}</li>" for r in regressions)
        parts.append(f"<h2 class='warn'>Regressions ({len(regressions)})</h2><ul class='warn'>{items}</ul>")
    if comparison:
        parts.append(f"<p class='meta'>{html.escape(comparison)}</p>")
    parts += [
        "<h2>Accuracy per attack × defense</h2>", _table(summary, regressions),
        "<p class='meta'>agree: share of images whose top-1 equals the prediction on the clean image "
        "(Prakash et al.'s metric); top-1 against labels where known; PSNR/SSIM against the clean image.</p>",
        "<h2>Accuracy against bytes</h2>", _img(plot_rate_accuracy(summary["table"]), "accuracy against bytes"),
        "<h2>PSNR and SSIM</h2>", _img(plot_quality(summary["table"]), "PSNR and SSIM"),
    ]
    if history:
        nights = f"{len(history)} night" + ("s" if len(history) != 1 else "")
        parts += [f"<h2>Trends over {nights}</h2>", _img(plot_trends(history), "trends")]
    parts += ["<h2>Gallery</h2>", gallery(run, summary),
              f"<h2>Configuration</h2><pre>{html.escape(json.dumps(cfg, indent=1))}</pre></body></html>"]
    return "\n".join(parts)


@dataclass(frozen=True)
class RecordedAlarm:
    """An alarm as ``nightly.json`` records it: its text only (the table marks no cell for it)."""

    text: str

    def describe(self) -> str:
        return self.text


def _recorded_nightly(run: str) -> dict:
    """The run's ``nightly.json`` (what the nightly job recorded), or {} for other runs; its
    tolerance checked as the nightly config's is (a damaged one is an error that names it),
    except that +inf is kept: nightly configs took it (a metric never alarming on a drop) until
    non-finite tolerances became config errors, and their nights recorded it."""
    from .nightly import NIGHTLY_FILE, check_tolerance

    fs, path = url_to_fs(join(run, NIGHTLY_FILE))
    recorded = _run_json(run, NIGHTLY_FILE) if fs.exists(path) else {}
    tolerance = recorded.get("tolerance")
    if tolerance is not None:
        where = f"{join(run, NIGHTLY_FILE)} is corrupt: tolerance"
        infinite = {m for m, v in tolerance.items() if v == math.inf} if isinstance(tolerance, dict) else set()
        checked = check_tolerance(where, {m: 0.0 if m in infinite else v for m, v in tolerance.items()}
                                  if infinite else tolerance)
        recorded["tolerance"] = {m: math.inf if m in infinite else v for m, v in checked.items()}
    return recorded


def run_night(run: str, summary: dict, history: dict[str, list[dict]], recorded: dict) -> str | None:
    """The night (YYYY-MM-DD) of the run at ``run``: the one the nightly job recorded
    (``recorded``, its ``nightly.json``), else the history night holding this run's id, else the
    run folder's ``date=`` name; None for a run that is no night (an evaluate run)."""
    date = recorded.get("date") or next(
        (d for d, rows in sorted(history.items()) if any(r.get("run_id") == summary["run_id"] for r in rows)), None)
    name = posixpath.basename(run.rstrip("/"))
    if date is None and name.startswith("date="):
        date = name[len("date="):]
    return date


def recompute_regressions(summary: dict, history: dict[str, list[dict]], night: str | None,
                          recorded: dict) -> tuple[list, str]:
    """(alarms, what they were computed against) of a run (its ``summary.json`` content) against
    ``history``, as of its ``night`` (see run_night; a run that is no night is compared with the
    latest night). The tolerance is the nightly config's as recorded in its ``nightly.json``
    (``recorded``), else the defaults (pipeline.nightly.DEFAULT_TOLERANCE).
    """
    from .history import compare, configured_pairs, history_rows
    from .nightly import DEFAULT_TOLERANCE

    tolerance, which = recorded.get("tolerance"), "the tolerance recorded with the nightly run"
    if tolerance is None:
        tolerance, which = dict(DEFAULT_TOLERANCE), "the default tolerance"
    date = night or "9999-12-31"
    prev, alarms = compare(history, date, history_rows(summary, date), tolerance, summary.get("errors"),
                          configured_pairs(summary))
    tol = ", ".join(f"{k} {v:g}" for k, v in tolerance.items())
    against = f"compared with {prev}" if prev else "no earlier night with results to compare with"
    return alarms, f"Regressions recomputed from the history: {against}, with {which} ({tol})."


def check_report_paths(run: str, output: str, history: str | None = None) -> None:
    """Fail before any work when the report would overwrite something (a file of the run or of
    the history, an existing file that is no HTML), cannot be written (io.check_output_file, which
    makes its folder), or when ``run`` is no semjpeg run."""
    from .io import check_output_file

    for what, folder in (("the run", run), ("the history", history)):
        # The one file of a run a report may replace is its own report (a nightly run's).
        if folder and is_within(output, folder) and not (what == "the run" and is_within(output, join(run, "report.html"))):
            raise ValueError(f"output {output} is inside {what} {folder}; write the report elsewhere")
    ofs, path = input_fs(output, "write")
    if ofs.isfile(path) and not path.lower().endswith((".html", ".htm")):
        raise ValueError(f"output {output} exists and is not an HTML file; refusing to replace it")
    fs, summary = input_fs(join(run, "summary.json"))
    if not fs.isfile(summary):
        raise ValueError(f"{run} is not a semjpeg run (no summary.json)")
    check_output_file(output)  # last: it makes the output's folder


def write_report(run: str, output: str, *, history: str | dict[str, list[dict]] | None = None,
                 regressions: Iterable | None = None) -> str:
    """Render and write the report (atomically); returns ``output``. ``history``: the history
    dataset's location, or its nights already read ({date: rows}, as the nightly job has them).
    With a history and no ``regressions`` given, the regressions are recomputed (see
    recompute_regressions); without either, a nightly run shows the alarms its ``nightly.json``
    recorded. The trends stop at the run's night (see run_night): a report of a
    past night shows no later ones."""
    hist, comparison = None, ""
    if isinstance(history, dict):
        hist = history
    elif history:
        from .history import read_history

        fs, root = input_fs(history)
        if not fs.isdir(root):
            raise ValueError(f"history {history} is not a folder (no such history dataset)")
        hist = read_history(history)
    summary = _run_json(run, "summary.json", ("run_id", "table", "config"))
    recorded = _recorded_nightly(run)
    if hist is None and regressions is None and recorded.get("alarms"):
        # Without a history to recompute them from, the alarms the nightly job recorded: a
        # nightly run's report written again must not lose them.
        regressions = [RecordedAlarm(text) for text in recorded["alarms"]]
        prev = recorded.get("previous_date")
        comparison = "The alarms the nightly job recorded" + (f" (compared with {prev})." if prev else ".")
    if hist is not None:
        night = run_night(run, summary, hist, recorded)
        if regressions is None:
            regressions, comparison = recompute_regressions(summary, hist, night, recorded)
            log.info("%s", comparison)
        if night is not None:  # the report of a past night shows the trend up to that night
            hist = {d: rows for d, rows in hist.items() if d <= night}
    write_bytes(output, render_report(run, summary, history=hist, regressions=regressions or (),
                                      comparison=comparison).encode())
    log.info("wrote %s", output)
    return output
