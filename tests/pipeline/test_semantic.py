"""Aug-MSROI semantic JPEG through the pipeline: rate matching, maps, decoders, defend job."""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.__main__ import main
from pipeline.evaluate import run_evaluate
from tests.pipeline.conftest import tiny_config
from tests.shards import encode, good_members, write_tar
from transforms.denoise import noise_level

DEFENSES = ("aug_msroi", "msroi:q_low=20", "jpeg:match=aug_msroi", "jpeg:quality=50", "aug_msroi_gated:gate=0.9",
            "jpeg:match=aug_msroi_gated:gate=0.9")


def members(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


def sof_markers(data: bytes) -> set[int]:
    """The SOFn markers of a JPEG (0xC0 baseline, 0xC2 progressive, ...)."""
    out, i = set(), 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:  # start of scan: headers are over
            break
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            out.add(marker)
        i += 2 + length
    return out


@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory, photos):
    from apache_beam.options.pipeline_options import PipelineOptions

    tmp = tmp_path_factory.mktemp("semantic")
    flat = [("flat.png", encode(np.full((64, 64, 3), 128, np.uint8))), ("flat.cls", b"0")]
    write_tar(tmp / "a.tar", good_members(photos) + flat)
    cfg = tiny_config([str(tmp / "a.tar")], tmp / "run", attacks=("igsm:eps=8/255,steps=3",), defenses=DEFENSES,
                      save_maps=True, run_id="fixed")
    summary = run_evaluate(cfg, PipelineOptions(["--runner", "FnApiRunner"]))
    rows = pq.read_table(sorted((tmp / "run" / "metadata").glob("*.parquet"))).to_pylist()
    return tmp, summary, rows


def _as_on_a_gpu(monkeypatch) -> list:
    """Make the map stage work as on a GPU worker, on the CPU: it computes the semantic JPEGs'
    coefficients and entropy-codes the files (:func:`transforms.defenses.prepare_requantized`).
    Returns the list each batch's prepared files are appended to."""
    import pipeline.saliency as saliency_stage

    init, prepare = saliency_stage.MapHandler.__init__, saliency_stage.prepare_requantized
    prepared: list = []
    monkeypatch.setattr(saliency_stage.MapHandler, "__init__", lambda self, *a, **k: init(self, *a, **k, prepare=True))
    monkeypatch.setattr(saliency_stage, "prepare_requantized",
                        lambda *a: prepared.append(prepare(*a, entropy=True)) or prepared[-1])
    return prepared


def test_every_variant_defended_and_rate_matched(semantic_run):
    _, summary, rows = semantic_run
    assert summary["errors"] == {} and summary["samples"] == 8  # the flat image too
    by = defaultdict(dict)
    for r in rows:
        by[(r["key"], r["attack_spec"])][r["defense_spec"]] = r
    assert len(by) == 16 and all(set(d) == {"none", *DEFENSES} for d in by.values())
    for d in by.values():
        aug, match = d["aug_msroi"], d["jpeg:match=aug_msroi"]
        assert match["bytes"] <= aug["bytes"] and match["target_bytes"] == aug["bytes"] and 1 <= match["quality"] <= 100
        assert sum(q["blocks"] for q in aug["quality_levels"]) == 16  # (64 / 16) ** 2 blocks
        assert {q["quality"] for q in aug["quality_levels"]} <= {30, 40, 50, 60, 70}
        assert aug["map_model"] == "tests.tiny:build" and aug["map_seconds"] > 0
        assert d["jpeg:quality=50"]["quality"] == 50 and d["none"]["quality_levels"] is None
        # The gated extension: its stability and decision in the row, a uniform q50 file when
        # stable, semantic q50..90 when flagged; its rate-matched JPEG fits under it.
        gated = d["aug_msroi_gated:gate=0.9"]
        assert 0 <= gated["stability"] <= 1 and 0 <= gated["jpeg_stability"] <= 1
        assert gated["flagged"] == (gated["stability"] < 0.9 or gated["jpeg_stability"] < 0.55)
        if gated["flagged"]:
            assert gated["quality"] is None and {q["quality"] for q in gated["quality_levels"]} <= {50, 60, 70, 80, 90}
        else:
            assert gated["quality"] == 50 and gated["bytes"] == d["jpeg:quality=50"]["bytes"]
        assert d["jpeg:match=aug_msroi_gated:gate=0.9"]["bytes"] <= gated["bytes"]
        assert (gated["noise_level"] is not None) == gated["flagged"]  # measured for flagged images only
        assert all(r["stability"] is None and r["jpeg_stability"] is None and r["flagged"] is None
                   and r["noise_level"] is None for k, r in d.items() if not k.startswith("aug_msroi_gated"))
    for t in summary["table"]:
        flags = [r["flagged"] for r in rows if (r["attack_spec"], r["defense_spec"]) == (t["attack_spec"], t["defense_spec"])]
        assert t["flagged"] == (sum(flags) / len(flags) if t["defense_spec"] == "aug_msroi_gated:gate=0.9" else None)


def test_semantic_files_are_baseline_and_decode_the_same_everywhere(semantic_run):
    tmp, _, _ = semantic_run
    djpeg = shutil.which("djpeg")
    checked = 0
    for shard in sorted((tmp / "run" / "shards").glob("*/aug_msroi/*.tar")):
        files = members(shard)
        for name, data in files.items():
            if not name.endswith(".jpg"):
                continue
            assert sof_markers(data) == {0xC0}, name  # baseline sequential only
            key = name[:-4]
            assert f"{key}.map.png" in files and Image.open(io.BytesIO(files[f"{key}.map.png"])).size == (64, 64)
            pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert pil.shape == (64, 64, 3)
            if djpeg:
                ppm = subprocess.run([djpeg, "-dct", "int", "-ppm"], input=data, capture_output=True, check=True).stdout
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(ppm)).convert("RGB")), pil), name
            checked += 1
    assert checked == 16
    if not djpeg:
        pytest.skip("djpeg (Debian's libjpeg-turbo-progs) not installed: Pillow checked only")


def test_reruns_are_byte_identical(semantic_run, tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions

    tmp, _, _ = semantic_run
    cfg = tiny_config([str(tmp / "a.tar")], tmp_path / "again", attacks=("igsm:eps=8/255,steps=3",),
                      defenses=DEFENSES, save_maps=True, run_id="fixed")
    run_evaluate(cfg, PipelineOptions(["--runner", "FnApiRunner"]))
    for shard in sorted((tmp / "run" / "shards").rglob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "again" / shard.relative_to(tmp / "run")).read_bytes(), shard


def test_the_same_data_and_spec_draw_the_same_numbers_wherever_they_are_and_however_written(
        semantic_run, tmp_path):
    """Attack seeds hash the shard's name and the key, not the full path, and the spec's values,
    not its spelling (Aug-MSROI's noise hashes the pixels): a copy of the dataset elsewhere, with
    the attack's parameters in another order, gives the same images."""
    from apache_beam.options.pipeline_options import PipelineOptions

    tmp, _, _ = semantic_run
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp / "a.tar", tmp_path / "elsewhere" / "a.tar")
    images = []
    for src, attack, out in ((tmp / "a.tar", "pgd:eps=8/255,steps=2", "one"),
                             (tmp_path / "elsewhere" / "a.tar", "pgd:steps=2,eps=0.031372549019607843", "two")):
        cfg = tiny_config([str(src)], tmp_path / out, attacks=(attack,), defenses=("aug_msroi",), run_id="fixed")
        run_evaluate(cfg, PipelineOptions(["--runner", "FnApiRunner"]))
        spec = cfg.attacks[1]
        images.append({(d, name): data for d in ("none", "aug_msroi")
                       for name, data in members(tmp_path / out / "shards" / spec.folder / d / "shard-00000.tar").items()
                       if not name.endswith(".json")})
    kinds = sorted((d, name.split(".", 1)[1]) for d, name in images[0])
    assert kinds.count(("none", "png")) == kinds.count(("aug_msroi", "jpg")) == 8
    assert images[0] == images[1]
    other = tiny_config([str(tmp / "a.tar")], tmp_path / "three", attacks=("pgd:eps=8/255,steps=2",),
                        defenses=(), run_id="fixed", seed=1)
    run_evaluate(other, PipelineOptions(["--runner", "FnApiRunner"]))
    third = members(tmp_path / "three" / "shards" / other.attacks[1].folder / "none" / "shard-00000.tar")
    assert any(third[name] != images[0][("none", name)] for name in third if not name.endswith(".json"))


def test_defend_job_on_an_adversarial_set(tmp_path, photos):
    write_tar(tmp_path / "a.tar", good_members(photos)[:6])
    common = ["--model", "tests.tiny:build", "--runner", "FnApiRunner", "--batch-size", "2"]
    assert main(["attack", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "adv"),
                 "--attack", "fgsm:eps=8/255", *common]) == 0
    adv = str(tmp_path / "adv" / "shards" / "fgsm-eps=8_255" / "*.tar")
    assert main(["defend", "--input", adv, "--output", str(tmp_path / "def"), "--save-maps", *common]) == 0
    out = tmp_path / "def"
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["aug_msroi"]
    files = members(out / "shards" / "aug_msroi" / "shard-00000.tar")
    expected = [f"{k}.{e}" for k in ("good_jpg", "good_png", "good_gray") for e in ("jpg", "map.png", "json")]
    assert sorted(files) == sorted(expected + ["good_jpg.cls", "good_png.cls"])  # good_gray has no label
    rows = pq.read_table(sorted((out / "metadata").glob("*.parquet"))).to_pylist()
    assert {(r["attack"], r["defense"]) for r in rows} == {("clean", "aug_msroi")} and len(rows) == 3
    assert {r["input_attack"] for r in rows} == {"fgsm:eps=8/255"}  # what made the input, from its JSON
    for r in rows:  # before (clean_pred) and after (pred), quality against the input
        assert r["clean_pred"] is not None and r["pred"] is not None and r["agree_clean"] == (r["pred"] == r["clean_pred"])
        assert 15 < r["psnr"] < 60 and 0 < r["ssim"] < 1 and r["quality_levels"]
    # Aug-MSROI's noise is seeded by the pixels: evaluate's numbers are what defend writes, for
    # the same adversarial images (other shard names, attack "clean" there), byte for byte.
    assert main(["evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "ev"),
                 "--attack", "fgsm:eps=8/255", "--defense", "aug_msroi", *common]) == 0
    evaluated = members(tmp_path / "ev" / "shards" / "fgsm-eps=8_255" / "aug_msroi" / "shard-00000.tar")
    ev_rows = pq.read_table(sorted((tmp_path / "ev" / "metadata").glob("*.parquet"))).to_pylist()
    assert {r["input_attack"] for r in ev_rows} == {None}  # clean inputs
    jpgs = sorted(n for n in files if n.endswith(".jpg"))
    assert len(jpgs) == 3 and all(files[n] == evaluated[n] for n in jpgs)


def test_defend_with_compiled_maps(tmp_path, photos):
    """``--map-compile``: the gated defense's map stage runs through torch.compile (inductor, on
    the CPU here) and gives the eager run's stabilities and, up to rounding, its maps."""
    import json

    write_tar(tmp_path / "a.tar", good_members(photos)[:6])
    common = ["--input", str(tmp_path / "a.tar"), "--model", "tests.tiny:build", "--runner", "FnApiRunner",
              "--batch-size", "3", "--save-maps", "--defense", "aug_msroi_gated"]
    assert main(["defend", "--output", str(tmp_path / "eager"), *common]) == 0
    assert main(["defend", "--output", str(tmp_path / "compiled"), "--map-compile", *common]) == 0
    assert json.loads((tmp_path / "compiled" / "summary.json").read_text())["config"]["map_compile"] is True
    assert json.loads((tmp_path / "eager" / "summary.json").read_text())["config"]["map_compile"] is False

    def rows(run):
        table = pq.read_table(sorted((tmp_path / run / "metadata").glob("*.parquet"))).to_pylist()
        return {r["key"]: r for r in table}

    eager, compiled = rows("eager"), rows("compiled")
    assert len(eager) == 3 and eager.keys() == compiled.keys()
    for k in eager:
        for col in ("stability", "jpeg_stability"):
            assert compiled[k][col] == pytest.approx(eager[k][col], abs=1e-5), (k, col)
    runs = {p: members(tmp_path / p / "shards" / "aug_msroi_gated" / "shard-00000.tar") for p in ("eager", "compiled")}
    maps = sorted(n for n in runs["eager"] if n.endswith(".map.png"))
    assert len(maps) == 3
    for n in maps:
        a, b = (np.asarray(Image.open(io.BytesIO(runs[r][n])).convert("L"), dtype=np.int16) for r in runs)
        assert np.abs(a - b).max() <= 1, n


def test_defend_maps_in_bf16(tmp_path, photos):
    """``--map-precision bf16``: the maps are drawn under bfloat16 autocast (channels_last): close
    to float32's but not equal, every file still a baseline JPEG, the precision in summary.json."""
    import json

    write_tar(tmp_path / "a.tar", good_members(photos)[:6])
    common = ["--input", str(tmp_path / "a.tar"), "--model", "tests.tiny:build", "--runner", "FnApiRunner",
              "--batch-size", "3", "--save-maps"]
    assert main(["defend", "--output", str(tmp_path / "fp32"), *common]) == 0
    assert main(["defend", "--output", str(tmp_path / "bf16"), "--map-precision", "bf16", *common]) == 0
    runs = {p: members(tmp_path / p / "shards" / "aug_msroi" / "shard-00000.tar") for p in ("fp32", "bf16")}
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["config"]["map_precision"] == "bf16"
    assert json.loads((tmp_path / "fp32" / "summary.json").read_text())["config"]["map_precision"] == "fp32"
    maps = sorted(n for n in runs["fp32"] if n.endswith(".map.png"))
    assert len(maps) == 3 and sorted(n for n in runs["bf16"] if n.endswith(".map.png")) == maps

    def heat(run, name):
        return np.asarray(Image.open(io.BytesIO(runs[run][name])).convert("L"), dtype=np.float64)

    pairs = [(heat("fp32", n), heat("bf16", n)) for n in maps]
    assert any(not np.array_equal(a, b) for a, b in pairs)  # bf16 was really used
    assert all(np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9 for a, b in pairs if a.std() > 0)
    for name, data in runs["bf16"].items():
        if name.endswith(".jpg"):
            assert sof_markers(data) == {0xC0}


def test_adaptive_bpda_attack_through_the_pipeline(tmp_path, photos, fnapi):
    """A ``bpda=`` attack in ``semjpeg evaluate``: its stored images are the transforms' BPDA attack
    of the stored clean images, and differ from the same attack without it."""
    import torch

    from transforms.attacks import parse_attack, run_attack
    from transforms.images import to_tensor
    from transforms.models import build_model

    write_tar(tmp_path / "a.tar", good_members(photos))
    adaptive = "fgsm:eps=8/255,bpda=aug_msroi:q_low=10;q_high=50"
    cfg = tiny_config([str(tmp_path / "a.tar")], tmp_path / "run", attacks=("fgsm:eps=8/255", adaptive),
                      defenses=("aug_msroi:q_low=10,q_high=50",))
    summary = run_evaluate(cfg, fnapi)
    assert summary["errors"] == {}
    rows = pq.read_table(sorted((tmp_path / "run" / "metadata").glob("*.parquet"))).to_pylist()
    assert {r["attack_spec"] for r in rows} == {"clean", "fgsm:eps=8/255", adaptive}
    shards = tmp_path / "run" / "shards"
    folder = parse_attack(adaptive).folder
    assert (shards / folder / "none").is_dir()

    def stored(attack_folder):
        files = {}
        for shard in sorted((shards / attack_folder / "none").glob("*.tar")):
            files.update({k[:-4]: np.asarray(Image.open(io.BytesIO(v)).convert("RGB"))
                          for k, v in members(shard).items() if k.endswith(".png")})
        return files

    clean, adv, plain = stored("clean"), stored(folder), stored("fgsm-eps=8_255")
    keys = sorted(clean)
    assert keys and sorted(adv) == keys == sorted(plain)
    model = build_model(cfg.model.name)  # as the pipeline builds it (the layout moves the noise)
    x = to_tensor([clean[k] for k in keys])
    with torch.no_grad():
        logits = model(x)
    want, _ = run_attack(parse_attack(adaptive), model, x, logits.argmax(1), clean_logits=logits)
    got = to_tensor([adv[k] for k in keys])
    assert float((got != want.images).float().mean()) < 1e-3  # batched differently: a rare sign flip at most
    assert not torch.equal(got, to_tensor([plain[k] for k in keys]))


def test_a_failing_map_fails_only_the_defenses_that_need_it(tmp_path, photos):
    """A map that fails at run time (a spec built past the parser here; out of memory in life) is
    reported for each variant and each defense that needs it, with that defense's spec; the
    variant's other defenses, rate-matched ones included, still give their rows."""
    import dataclasses

    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.specs import Spec

    write_tar(tmp_path / "a.tar", [("p.png", encode(photos[0])), ("q.png", encode(photos[1]))])
    cfg = tiny_config([str(tmp_path / "a.tar")], tmp_path / "run", attacks=(),
                      defenses=("msroi", "jpeg:match=msroi", "jpeg:quality=50"), run_id="fixed")
    broken = Spec("aug_msroi", {"activation_noise": float("nan")})
    cfg = dataclasses.replace(cfg, defenses=(*cfg.defenses, broken))
    run_evaluate(cfg, PipelineOptions(["--runner", "FnApiRunner"]))
    rows = pq.read_table(sorted((tmp_path / "run" / "metadata").glob("*.parquet"))).to_pylist()
    errors = pq.read_table(sorted((tmp_path / "run" / "errors").glob("*.parquet"))).to_pylist()
    assert sorted((r["key"], r["defense_spec"]) for r in rows) == sorted(
        (k, d) for k in ("p", "q") for d in ("none", "msroi", "jpeg:match=msroi", "jpeg:quality=50"))
    assert sorted((e["key"], e["stage"], e["defense_spec"], e["attack_spec"]) for e in errors) == [
        ("p", "saliency", broken.text, "clean"), ("q", "saliency", broken.text, "clean")]
    assert all("activation_noise" in e["reason"] for e in errors)


def test_defend_at_native_size(tmp_path, capsys):
    """`defend --crop 0`: every image is defended at its own size (odd sizes, one smaller than an
    MCU, a grayscale one), its map stretched over it; predictions use the model's preprocessing
    of the stored file, PSNR compares the full images. Attacks and a resize are refused with it."""
    import skimage.data
    import torch

    from pipeline.model_handlers import _build_classifier
    from pipeline.config import ModelConfig
    from transforms import metrics
    from transforms.images import resize_and_crop, to_tensor

    astronaut = skimage.data.astronaut()
    images = {"odd": astronaut[37:37 + 123, 11:11 + 201], "thin": astronaut[:40, :333],
              "tiny": np.full((13, 21, 3), 200, np.uint8), "gray": np.dstack([skimage.data.camera()[:150, :170]] * 3),
              "speck": astronaut[200:204, 200:206]}  # below SSIM's 11x11 window: no SSIM, still a JPEG
    write_tar(tmp_path / "a.tar", [(f"{k}.png", encode(v)) for k, v in images.items()])
    common = ["--model", "tests.tiny:build", "--runner", "FnApiRunner", "--batch-size", "3"]
    out = tmp_path / "out"
    assert main(["defend", "--input", str(tmp_path / "a.tar"), "--output", str(out), "--crop", "0", "--save-maps",
                 "--defense", "aug_msroi", "--defense", "jpeg:match=aug_msroi", *common]) == 0
    rows = {(r["key"], r["defense"]): r for r in pq.read_table(sorted((out / "metadata").glob("*.parquet"))).to_pylist()}
    assert len(rows) == 10 and rows[("speck", "aug_msroi")]["ssim"] is None
    assert all(r["ssim"] is not None for (k, _), r in rows.items() if k != "speck")
    model = _build_classifier(ModelConfig(name="tests.tiny:build"))
    for folder, defense in (("aug_msroi", "aug_msroi"), ("jpeg-match=aug_msroi", "jpeg")):
        files = members(out / "shards" / folder / "shard-00000.tar")
        for key, image in images.items():
            data = files[f"{key}.jpg"]
            assert sof_markers(data) == {0xC0}
            decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert decoded.shape == image.shape  # its own size, not a 64x64 crop
            if defense == "aug_msroi":
                assert Image.open(io.BytesIO(files[f"{key}.map.png"])).size == image.shape[1::-1]
            r = rows[(key, defense)]
            assert (r["width"], r["height"]) == image.shape[1::-1] and r["bytes"] == len(data)
            view = to_tensor([resize_and_crop(decoded, resize=72, crop=64)])
            with torch.no_grad():
                assert r["pred"] == int(model(view).argmax())
            if key != "tiny":  # flat: identical after JPEG, PSNR inf
                assert r["psnr"] == pytest.approx(metrics.psnr(to_tensor([decoded]), to_tensor([image])).item(), rel=1e-4)
    assert rows[("tiny", "aug_msroi")]["psnr"] == float("inf")
    capsys.readouterr()
    assert main(["defend", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "x"), "--crop", "0",
                 "--resize", "256", *common]) == 2
    assert "resize (256) needs a crop" in capsys.readouterr().err
    assert main(["evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "x"), "--crop", "0",
                 "--attack", "fgsm", *common]) == 2
    assert "--crop 0 (images at their own size) works without attacks only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_gated_defense_at_native_size_denoises_each_size_in_the_map_stage(tmp_path, monkeypatch):
    """`defend --crop 0 --defense aug_msroi_gated:gate=2` (every image flagged): the map stage
    denoises images of five sizes (one below an MCU) in groups of one size, and, as on a GPU,
    computes their files' coefficients; the files are the ones the encoder writes when it does
    all of it itself."""
    import skimage.data

    import pipeline.saliency as saliency_stage

    astronaut = skimage.data.astronaut()
    images = {"odd": astronaut[37:37 + 123, 11:11 + 201], "odd2": astronaut[100:100 + 123, 50:50 + 201],
              "thin": astronaut[:40, :333], "gray": np.dstack([skimage.data.camera()[:150, :170]] * 3),
              "speck": astronaut[200:204, 200:206]}
    write_tar(tmp_path / "a.tar", [(f"{k}.png", encode(v)) for k, v in images.items()])
    args = ["--crop", "0", "--defense", "aug_msroi_gated:gate=2", "--model", "tests.tiny:build",
            "--runner", "FnApiRunner", "--batch-size", "5"]
    calls, measured = [], []
    real = saliency_stage.denoise_flagged
    monkeypatch.setattr(saliency_stage, "denoise_flagged", lambda *a: calls.append(len(a[1])) or real(*a))
    import transforms.defenses as defenses

    real_level = defenses._noise_level
    monkeypatch.setattr(defenses, "_noise_level", lambda im: measured.append(im.shape) or real_level(im))
    assert main(["defend", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "dev"), *args]) == 0
    assert len(measured) == 5  # once per image, in the map stage; the encoder takes its measurement
    # As on a GPU: the map stage computes the files' coefficients too, for each size, and writes
    # the files (entropy coding in torch).
    init = saliency_stage.MapHandler.__init__
    prepared = _as_on_a_gpu(monkeypatch)
    assert main(["defend", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "gpu"), *args]) == 0
    assert [sum(map(len, p)) for p in prepared] == [5]
    assert all(pr.data is not None and pr.coefficients is None for p in prepared for d in p for pr in d.values())
    monkeypatch.setattr(saliency_stage.MapHandler, "__init__", init)
    monkeypatch.setattr(saliency_stage, "denoise_flagged", lambda specs, ims, *a: [{} for _ in ims])

    def no_levels(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(saliency_stage, "image_noise_levels", no_levels)  # the encoder measures them instead
    measured.clear()
    assert main(["defend", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "enc"), *args]) == 0
    assert len(measured) == 5
    assert calls == [5, 5]  # one batch a run, every image denoised in the map stage
    rows = pq.read_table(sorted((tmp_path / "dev" / "metadata").glob("*.parquet"))).to_pylist()
    assert len(rows) == 5 and all(r["flagged"] for r in rows)
    # Each row's noise level is its input's; "gray" and "speck" are under the floor (not
    # denoised), the three astronaut crops over it: both ways agree in all three runs below.
    levels = {r["key"]: r["noise_level"] for r in rows}
    assert levels == pytest.approx({k: noise_level(v) for k, v in images.items()})
    assert sorted(k for k, v in levels.items() if v < 2.0) == ["gray", "speck"]
    dev = members(tmp_path / "dev" / "shards" / "aug_msroi_gated-gate=2" / "shard-00000.tar")
    enc = members(tmp_path / "enc" / "shards" / "aug_msroi_gated-gate=2" / "shard-00000.tar")
    gpu = members(tmp_path / "gpu" / "shards" / "aug_msroi_gated-gate=2" / "shard-00000.tar")
    for key, image in images.items():
        assert dev[f"{key}.jpg"] == enc[f"{key}.jpg"] == gpu[f"{key}.jpg"]
        assert np.asarray(Image.open(io.BytesIO(dev[f"{key}.jpg"])).convert("RGB")).shape == image.shape


def test_on_a_gpu_worker_the_map_stage_writes_the_gated_defenses_files(tmp_path, monkeypatch):
    """As on a GPU (coefficients and entropy coding in the map stage, forced here on the CPU):
    every file of the gated defense, flagged (semantic JPEG) or stable (uniform JPEG), comes from
    the map stage, and the shards and rows are those the CPU encoder writes."""
    import skimage.data

    astronaut = skimage.data.astronaut()
    images = {"a": astronaut[:96, :128], "b": astronaut[200:296, 100:228], "c": astronaut[300:333, 7:58],
              "gray": np.dstack([skimage.data.camera()[:96, :128]] * 3)}
    write_tar(tmp_path / "a.tar", [(f"{k}.png", encode(v)) for k, v in images.items()])
    specs = ["aug_msroi_gated:gate=2", "aug_msroi_gated:gate=0,jpeg_gate=0"]  # every image flagged; none
    args = ["--crop", "0", "--model", "tests.tiny:build", "--runner", "FnApiRunner", "--batch-size", "4"]
    for s in specs:
        args += ["--defense", s]
    assert main(["defend", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "cpu"), *args]) == 0
    prepared = _as_on_a_gpu(monkeypatch)
    assert main(["defend", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "gpu"), *args]) == 0
    made = [(text, pr.qualities is None) for batch in prepared for d in batch for text, pr in d.items()
            if pr.data is not None]
    assert sorted(made) == sorted([(specs[0], False)] * 4 + [(specs[1], True)] * 4)
    for s in specs:
        name = s.replace(":", "-").replace(",", "-")
        cpu = members(tmp_path / "cpu" / "shards" / name / "shard-00000.tar")
        gpu = members(tmp_path / "gpu" / "shards" / name / "shard-00000.tar")
        files = sorted(k for k in cpu if k.endswith(".jpg"))  # the sidecar JSONs carry timings
        assert len(files) == 4 and sorted(cpu) == sorted(gpu) and all(cpu[k] == gpu[k] for k in files), s
    keep = ["key", "defense_spec", "bytes", "flagged", "quality_levels", "quality", "psnr", "pred"]
    rows = {}
    for run in ("cpu", "gpu"):
        table = pq.read_table(sorted((tmp_path / run / "metadata").glob("*.parquet")))
        rows[run] = sorted(table.select([c for c in keep if c in table.column_names]).to_pylist(),
                           key=lambda r: (r["defense_spec"], r["key"]))
    assert len(rows["cpu"]) == 8 and rows["cpu"] == rows["gpu"]
    assert {(r["defense_spec"], r["flagged"]) for r in rows["cpu"]} == {(specs[0], True), (specs[1], False)}


def test_a_non_srgb_colour_profile_travels_into_every_file_outside_the_byte_measures(tmp_path, photos, fnapi):
    """An Adobe-RGB-like photo keeps its profile in every written file (its pixels are used as
    stored, so without it a colour-managed viewer shows the defended file in other colours); an
    sRGB one, and one without, carry none. ``bytes``, ``bpp`` and the byte budgets are the coded
    image's, as without the profile (``profile_bytes`` is the rest of the file): a night with
    profiles measures as before, and a budget does not go to the profile."""
    from PIL import Image as PILImage

    from tests.shards import srgb_profile, wide_gamut_profile
    from transforms.defenses import apply_defense, parse_defense
    from transforms.images import decode_image

    wide = wide_gamut_profile(3000)

    def jpeg_with(p, profile):
        buf = io.BytesIO()
        PILImage.fromarray(p).save(buf, format="JPEG", quality=95, **({"icc_profile": profile} if profile else {}))
        return buf.getvalue()

    write_tar(tmp_path / "a.tar", [("wide.jpg", jpeg_with(photos[0], wide)), ("srgb.jpg", jpeg_with(photos[1], srgb_profile())),
                                   ("plain.png", encode(photos[2]))])
    budget = 1500
    cfg = tiny_config([str(tmp_path / "a.tar")], tmp_path / "run", attacks=("fgsm:eps=4/255",),
                      defenses=("msroi", "jpeg:match=msroi", f"jpeg:bytes={budget}", "jpeg:quality=50"), run_id="fixed")
    run_evaluate(cfg, fnapi)
    rows = pq.read_table(sorted((tmp_path / "run" / "metadata").glob("*.parquet"))).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(k for k in ("plain", "srgb", "wide") for _ in range(len(rows) // 3))
    files = {}  # shard member -> the stored file
    for shard in (tmp_path / "run" / "shards").rglob("*.tar"):
        files.update({(str(shard), name): data for name, data in members(shard).items()
                      if name.rsplit(".", 1)[-1] in ("jpg", "png")})
    assert len(files) == len(rows) and len(rows) // 3 > 4  # clean and fgsm x none + four defenses
    for (_, name), data in files.items():
        with PILImage.open(io.BytesIO(data)) as im:
            assert im.info.get("icc_profile") == (wide if name.startswith("wide.") else None), name
    # A row's bytes and profile_bytes add up to its file.
    assert sum(len(d) for d in files.values()) == sum(r["bytes"] + (r["profile_bytes"] or 0) for r in rows)
    for r in rows:
        assert (r["profile_bytes"] is not None) == (r["key"] == "wide"), r
        if r["defense_spec"] == f"jpeg:bytes={budget}":
            assert r["target_bytes"] == budget and r["bytes"] <= budget, r
        if r["defense_spec"] == "jpeg:match=msroi":
            ref = next(o for o in rows if o["key"] == r["key"] and o["attack_spec"] == r["attack_spec"]
                       and o["defense_spec"] == "msroi")
            assert r["target_bytes"] == ref["bytes"] >= r["bytes"], r
    # The wide photo's bytes are its coded image's: what the defense writes for its pixels alone.
    pixels = decode_image(jpeg_with(photos[0], wide), resize=72, crop=64)
    for spec in ("jpeg:quality=50", f"jpeg:bytes={budget}"):
        (row,) = [r for r in rows if r["key"] == "wide" and r["attack"] == "clean" and r["defense_spec"] == spec]
        assert row["bytes"] == len(apply_defense(parse_defense(spec), pixels).data) and row["profile_bytes"] > len(wide)
