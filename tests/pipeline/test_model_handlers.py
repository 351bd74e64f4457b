"""The model handlers on the tiny CNN, outside Beam: the attack stage's softmax is reused for
variants stored losslessly, and only for them."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model_handlers import AttackHandler, ClassifyHandler
from pipeline.records import Defended, Sample
from transforms.attacks import parse_attack
from transforms.defenses import apply_defense, parse_defense
from transforms.images import to_tensor
from transforms.jpeg import decode_rgb


def test_classify_reuses_attack_stage_softmax_for_lossless_variants_only(tiny_model, photos):
    config = ModelConfig(name="tests.tiny:build", batch_size=4, device="cpu")
    samples = [Sample(0, "s.tar", f"k{i}", None, p) for i, p in enumerate(photos)]
    attack = AttackHandler(config, (parse_attack("clean"), parse_attack("fgsm:eps=4/255")), seed=0,
                           attack_labels="pred")
    variants = [v for per_sample in attack.run_inference(samples, tiny_model) for v in per_sample]
    assert len(variants) == 8 and all(v.probs is not None and v.probs.shape == (10,) for v in variants)

    # The attack stage's softmax is the model's on the variant's own pixels.
    with torch.no_grad():
        direct = torch.softmax(tiny_model(to_tensor([v.image for v in variants])), 1)
    assert np.allclose(np.stack([v.probs for v in variants]), direct.numpy(), atol=1e-5)

    # Plant a softmax no model gives: lossless variants must report it, JPEG ones must not.
    planted = np.full(10, 0.01, dtype=np.float32)
    planted[7] = 0.91
    none, jpeg = parse_defense("none"), parse_defense("jpeg:quality=50")
    batch = []
    for v in variants[:4]:
        v = dataclasses.replace(v, probs=planted)
        png = apply_defense(none, v.image)
        jp = apply_defense(jpeg, v.image)
        batch.append(Defended(v, none, png.data, png.ext, v.image))
        batch.append(Defended(v, jpeg, jp.data, jp.ext, decode_rgb(jp.data)))
    results = ClassifyHandler(config, run_id="r").run_inference(batch, tiny_model)
    for d, r in zip(batch, results):
        if d.defense.name == "none":
            assert r.row["pred"] == 7 and abs(r.row["prob"] - 0.91) < 1e-6
        else:
            with torch.no_grad():
                want = torch.softmax(tiny_model(to_tensor([d.decoded])), 1)
            assert r.row["pred"] == int(want.argmax()) and abs(r.row["prob"] - float(want.max())) < 1e-5


def test_attack_seconds_wait_for_the_batchs_own_gpu(tiny_model, photos, monkeypatch):
    """The attack stage times each attack between two syncs of the GPU. It synced the current
    device (cuda:0), so with ``--device cuda:1`` the seconds missed the queued work and every
    worker process opened a context on cuda:0 too. The CPU stands in for a GPU here."""
    import pipeline.model_handlers as handlers

    class OnAGpu(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    synced = []
    monkeypatch.setattr(handlers, "to_tensor", lambda *a: to_tensor(*a).as_subclass(OnAGpu))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    config = ModelConfig(name="tests.tiny:build", batch_size=4, device="cpu")
    samples = [Sample(0, "s.tar", f"k{i}", None, p) for i, p in enumerate(photos)]
    out = AttackHandler(config, (parse_attack("clean"),), seed=0, attack_labels="pred").run_inference(samples,
                                                                                                      tiny_model)
    assert len(out) == 4 and synced == [torch.device("cpu")] * 2  # the device the batch is on


def test_attack_norms_measure_the_stored_perturbation_exactly(tiny_model, photos):
    """A variant's linf, l2 and rmse are the perturbation as stored, in whole uint8 levels: an
    FGSM step of eps = 4/255 moves pixels by exactly 4 levels and reads 4/255. Measured in float32
    on the [0, 1] images, every such row read linf 0.0156863034, above its budget even as float32
    (4/255 is 0.0156862754 there), so checking the metadata against the budget failed."""
    config = ModelConfig(name="tests.tiny:build", batch_size=4, device="cpu")
    samples = [Sample(0, "s.tar", f"k{i}", None, p) for i, p in enumerate(photos)]
    specs = tuple(map(parse_attack, ("clean", "fgsm:eps=4/255", "pgd:eps=8/255,steps=3,rmse=0.02")))
    out = AttackHandler(config, specs, seed=0, attack_labels="pred").run_inference(samples, tiny_model)
    for s, variants in zip(samples, out):
        fgsm, pgd = variants[1], variants[2]
        assert fgsm.linf == 4 / 255 and np.float32(fgsm.linf) <= np.float32(4 / 255)
        assert pgd.linf <= 8 / 255 and pgd.rmse <= 0.02
        for v in variants:
            d = v.image.astype(np.float64) - s.image
            assert v.linf == np.abs(d).max() / 255
            assert v.l2 == pytest.approx(np.sqrt((d**2).sum()) / 255, rel=1e-6, abs=0)
            assert v.rmse == pytest.approx(np.sqrt((d**2).mean()) / 255, rel=1e-6, abs=0)


def test_attack_and_classify_share_one_classifier_and_saliency_gets_its_own():
    from pipeline.model_handlers import load_classifier
    from pipeline.saliency import MapHandler

    config = ModelConfig(name="tests.tiny:build", batch_size=4, device="cpu")
    attack = AttackHandler(config, (parse_attack("clean"),), seed=0, attack_labels="pred").load_model()
    classify = ClassifyHandler(config, run_id="r").load_model()
    maps = MapHandler(config, {}, seed=0).load_model()
    assert attack is classify is load_classifier(config)
    assert maps is not attack and type(maps) is type(attack)
    assert load_classifier(dataclasses.replace(config, batch_size=8)) is not attack  # another configuration



@pytest.mark.parametrize("case, reason", [
    ("shapes", "size mismatch for fc.weight: copying a param with shape torch.Size([3, 16])"),
    ("prefix", 'Missing key(s) in state_dict: "mean", "std", "body.0.weight"'),
])
def test_weights_that_do_not_fit_the_model_say_why_in_their_one_line(tmp_path, case, reason):
    """torch's state-dict error opens with a line that only names the model; the reason (keys
    missing, unexpected, of another shape) is on the next, and it used to be cut off."""
    from pipeline.model_handlers import _build_classifier
    from tests import tiny

    state = tiny.build(num_classes=3 if case == "shapes" else tiny.NUM_CLASSES).state_dict()
    if case == "prefix":  # saved from a DataParallel wrapper
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ValueError) as e:
        _build_classifier(ModelConfig(name="tests.tiny:build", weights=str(tmp_path / "w.pt"), device="cpu"))
    message = str(e.value)
    assert "\n" not in message and "RuntimeError: Error(s) in loading state_dict for Classifier: " in message
    assert reason in message


def test_a_model_must_be_what_its_model_info_declares():
    """Labels and targets are checked against the declared class count, images cropped to the
    declared size: a 3-class factory without model_info took the label 7, and every attack in
    that image's batch failed on an IndexError."""
    from pipeline.model_handlers import check_model

    with pytest.raises(ValueError, match=r"^model 'tests.tiny:build_undeclared' is not what its model_info declares: "
                                         r"classes 3 \(declared 1000\), outputs 3 \(declared 1000\), "
                                         r"input size 64 \(declared 224\); give its factory a model_info"):
        check_model(ModelConfig(name="tests.tiny:build_undeclared", device="cpu"))
    with pytest.raises(ValueError, match=r"^map model 'tests.tiny:build_undeclared' is not what"):
        check_model(ModelConfig(name="tests.tiny:build_undeclared", device="cpu"), maps=True, role="map model")
    assert check_model(ModelConfig(name="tests.tiny:build", device="cpu")).num_classes == 10


def test_every_stage_loads_its_model_in_the_configured_memory_format():
    from pipeline.saliency import MapHandler

    def layouts(model):
        stem = next(p for p in model.parameters() if p.ndim == 4)  # 3 input channels: the layouts differ
        return stem.is_contiguous(), stem.is_contiguous(memory_format=torch.channels_last)

    auto = ModelConfig(name="tests.tiny:build", batch_size=4, device="cpu")
    plain = dataclasses.replace(auto, memory_format="contiguous")
    for config, want in ((auto, (False, True)), (plain, (True, False))):
        assert layouts(AttackHandler(config, (parse_attack("clean"),), seed=0, attack_labels="pred").load_model()) == want
        assert layouts(ClassifyHandler(config, run_id="r").load_model()) == want
        assert layouts(MapHandler(config, {}, seed=0).load_model()) == want
    with pytest.raises(ValueError, match="memory format must be one of auto, contiguous, channels_last, got 'NHWC'"):
        dataclasses.replace(auto, memory_format="NHWC")


def test_map_handler_bf16_runs_the_map_model_under_autocast_in_channels_last(photos):
    from pipeline.records import Variant
    from pipeline.saliency import MapHandler, map_requests
    from transforms.defenses import parse_defense

    config = ModelConfig(name="tests.tiny:build", batch_size=4, device="cpu")
    requests = map_requests((parse_defense("aug_msroi"),))
    batch = [Variant(Sample(0, "s.tar", f"k{i}", None, p), parse_attack("clean"), p, 0) for i, p in enumerate(photos)]
    seen = {}
    out = {}
    for precision in ("fp32", "bf16"):
        handler = MapHandler(config, requests, seed=0, precision=precision)
        model = handler.load_model()

        def hook(module, args, precision=precision):
            seen[precision] = (torch.is_autocast_enabled("cpu"), args[0].is_contiguous(memory_format=torch.channels_last))

        model.body.register_forward_pre_hook(hook)
        out[precision] = handler.run_inference(batch, model)
        assert all(isinstance(v, Variant) for v in out[precision])  # no error rows
    assert seen == {"fp32": (False, False), "bf16": (True, True)}
    for a, b in zip(out["fp32"], out["bf16"]):
        (ma,), (mb,) = a.maps.values(), b.maps.values()
        assert ma.dtype == mb.dtype == np.float32 and ma.shape == mb.shape and 0 <= mb.min() and mb.max() <= 1
    with pytest.raises(ValueError, match="map precision must be one of fp32, bf16"):
        MapHandler(config, requests, seed=0, precision="fp16")


def test_map_stage_denoises_the_flagged_images_for_the_encoder(tiny_model, photos, monkeypatch):
    """`aug_msroi_gated`'s flagged images are denoised in the map stage, on the map model's
    device, once per weight; the encoder writes the same files as when it denoises them itself,
    and drops the denoised pixels from what it passes on. A failed denoising loses nothing."""
    import pipeline.saliency as saliency_stage
    from pipeline.encode import _EncodeFn
    from pipeline.records import Variant
    from pipeline.saliency import MapHandler, map_requests
    from tests.tiny import near_boundary
    from transforms.defenses import denoise_tv
    from transforms.images import to_uint8

    config = ModelConfig(name="tests.tiny:build", batch_size=8, device="cpu")
    specs = (parse_defense("aug_msroi_gated"), parse_defense("aug_msroi_gated:denoise=0.08"),
             parse_defense("jpeg:match=aug_msroi_gated"))
    x = to_tensor(photos)
    pixels = to_uint8(torch.cat([x, near_boundary(tiny_model, x)]))
    batch = [Variant(Sample(0, "s.tar", f"k{i}", None, p), parse_attack("clean"), p, 0) for i, p in enumerate(pixels)]
    handler = MapHandler(config, {t: r for t, r in map_requests(specs).items()}, seed=0)
    model = handler.load_model()
    out = handler.run_inference(batch, model)
    assert len(map_requests(specs)) == 1 and all(isinstance(v, Variant) for v in out)
    (text,) = map_requests(specs)
    flagged = [v.map_stability[text]["stability"] < 0.7 or v.map_stability[text]["jpeg_stability"] < 0.55 for v in out]
    assert any(flagged) and not all(flagged)
    for v, f in zip(out, flagged):
        assert sorted(v.denoised) == ([0.03, 0.08] if f else [])
        for w, im in v.denoised.items():
            np.testing.assert_array_equal(im, denoise_tv(v.image, w))

    def encode(variants):
        fn = _EncodeFn(specs, "tests.tiny:build", save_maps=False)
        return [d for v in variants for d in fn.process(v)]

    done = encode(out)
    assert len(done) == 3 * len(out) and all(d.variant.denoised == {} for d in done)
    bare = encode([dataclasses.replace(v, denoised={}) for v in out])  # the encoder denoises itself
    assert [d.data for d in done] == [d.data for d in bare]

    def broken(*args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(saliency_stage, "denoise_flagged", broken)
    again = handler.run_inference(batch, model)
    assert all(isinstance(v, Variant) and v.denoised == {} for v in again)  # no error rows
    assert [d.data for d in encode(again)] == [d.data for d in done]


def test_map_stage_prepares_semantic_files_the_encoder_only_writes(tiny_model, photos, monkeypatch):
    """With ``prepare`` (the default on a GPU), the map stage computes each requantized semantic
    JPEG's coefficients (all images for msroi / aug_msroi, the flagged ones of a gated defense,
    from their denoised pixels); the encoder writes them: the same files, rows and metadata as
    encoding from scratch. Rate-controlled and mosaic specs are left to the encoder."""
    import pipeline.saliency as saliency_stage
    from pipeline.encode import _EncodeFn
    from pipeline.records import Variant
    from pipeline.saliency import MapHandler, map_requests
    from tests.tiny import near_boundary
    from transforms.images import to_uint8

    config = ModelConfig(name="tests.tiny:build", batch_size=8, device="cpu")
    specs = tuple(parse_defense(t) for t in (
        "aug_msroi", "aug_msroi:levels=3,binning=percentile,subsampling=4:4:4", "msroi", "aug_msroi_gated",
        "aug_msroi_gated:denoise=0", "aug_msroi:bytes=900", "msroi:method=mosaic", "jpeg:match=aug_msroi"))
    x = to_tensor(photos)
    pixels = to_uint8(torch.cat([x, near_boundary(tiny_model, x)]))
    batch = [Variant(Sample(0, "s.tar", f"k{i}", None, p), parse_attack("clean"), p, 0) for i, p in enumerate(pixels)]
    requests = map_requests(specs)
    model = MapHandler(config, requests, seed=0).load_model()
    out = MapHandler(config, requests, seed=0, prepare=True).run_inference(batch, model)
    plain = MapHandler(config, requests, seed=0).run_inference(batch, model)  # on the CPU: prepare=None is off
    assert all(v.prepared == {} for v in plain)
    gated = next(t for t, r in requests.items() if r[0] == "aug_msroi_gated")
    for v in out:
        st = v.map_stability[gated]
        flagged = st["stability"] < 0.7 or st["jpeg_stability"] < 0.55
        want = {"aug_msroi", "aug_msroi:levels=3,binning=percentile,subsampling=4:4:4", "msroi"}
        want |= {"aug_msroi_gated", "aug_msroi_gated:denoise=0"} if flagged else set()
        assert set(v.prepared) == want
    assert any(len(v.prepared) == 5 for v in out) and any(len(v.prepared) == 3 for v in out)

    def encode(variants):
        fn = _EncodeFn(specs, "tests.tiny:build", save_maps=False)
        return [d for v in variants for d in fn.process(v)]

    done, bare = encode(out), encode(plain)
    assert len(done) == len(specs) * len(out) and all(d.variant.prepared == {} for d in done)
    def rows(ds):  # the map's timing is the run's own
        return [(d.defense.text, d.data, {k: x for k, x in d.extra.items() if k != "map_seconds"}) for d in ds]

    assert rows(done) == rows(bare)

    def broken(*args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(saliency_stage, "prepare_requantized", broken)
    again = MapHandler(config, requests, seed=0, prepare=True).run_inference(batch, model)
    assert all(isinstance(v, Variant) and v.prepared == {} for v in again)  # no error rows
    assert [d.data for d in encode(again)] == [d.data for d in done]


def test_input_attack_survives_a_rewrite_by_another_semjpeg_job():
    """An adversarial set written again by ``semjpeg attack`` (its ``clean`` folder: the input's
    pixels, stored again) or by ``semjpeg defend`` has rows with attack ``clean`` and the attack
    that made the input in ``input_attack``; evaluating those shards used to say the inputs were
    clean (None), though their ``<key>.json`` recorded the attack."""
    import json

    from pipeline.model_handlers import input_attack
    from pipeline.records import Result
    from pipeline.write_shards import sample_members

    def written(attack_spec, made_by, meta=None):  # the <key>.json a job writes for a row
        row = {"attack_spec": attack_spec, "input_attack": made_by}
        members = dict(sample_members(Result(0, "k", row, b"", "png", meta=meta)))
        return json.loads(members["k.json"])

    adv = written("fgsm:eps=4/255", None)
    assert input_attack(adv) == "fgsm:eps=4/255"
    assert input_attack(written("clean", None)) is None
    assert input_attack(written("clean", "fgsm:eps=4/255", meta=adv)) == "fgsm:eps=4/255"
    assert input_attack(written("igsm:eps=2/255", "fgsm:eps=4/255", meta=adv)) == "igsm:eps=2/255"
    assert input_attack(None) is None and input_attack({"semjpeg": "x"}) is None



def _breaks(x: torch.Tensor) -> None:
    """Raise on any batch holding the planted image (first pixel's red level 7)."""
    if bool((x[:, 0, 0, 0] * 255).round().eq(7).any()):
        raise RuntimeError("this image breaks the model")


class _Breaking(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.class_names = model, model.class_names

    def forward(self, x):
        _breaks(x)
        return self.model(x)


def test_a_batch_that_fails_loses_only_the_image_that_fails_it(tiny_model, photos, monkeypatch):
    """Every stage caught a failed batch as error rows for all of it: one bad image (or a batch
    too big for the GPU's memory) cost its batch-mates their rows. A failed batch is now run
    again image by image; only what fails alone is an error."""
    import pipeline.model_handlers as handlers
    import pipeline.saliency as saliency_stage
    from pipeline.records import ErrorRecord
    from pipeline.saliency import MapHandler, map_requests

    config = ModelConfig(name="tests.tiny:build", batch_size=4, device="cpu")
    images = [p.copy() for p in photos]
    images[2][0, 0, 0] = 7
    samples = [Sample(0, "s.tar", f"k{i}", None, im) for i, im in enumerate(images)]
    specs = (parse_attack("clean"), parse_attack("fgsm:eps=4/255"))

    def outcome(items):
        return [(e.key, e.stage) if isinstance(e, ErrorRecord) else "ok" for e in items]

    def attack(model):
        return AttackHandler(config, specs, seed=0, attack_labels="pred").run_inference(samples, model)

    # the clean pass fails on the batch: each image alone
    assert [outcome(v) for v in attack(_Breaking(tiny_model))] == [["ok", "ok"], ["ok", "ok"], [("k2", "attack")],
                                                                   ["ok", "ok"]]
    # an attack fails on the batch: that attack, image by image
    whole = attack(tiny_model)
    real_attack = handlers.run_attack

    def fgsm_breaks(spec, model, x, *a, **k):
        if spec.name != "clean":
            _breaks(x)
        return real_attack(spec, model, x, *a, **k)

    monkeypatch.setattr(handlers, "run_attack", fgsm_breaks)
    alone = attack(tiny_model)
    assert [outcome(v) for v in alone] == [["ok", "ok"], ["ok", "ok"], ["ok", ("k2", "attack")], ["ok", "ok"]]
    for i in (0, 1, 3):  # alone as in the batch, but for rounding
        assert np.abs(alone[i][1].image.astype(int) - whole[i][1].image.astype(int)).max() <= 1

    clean = [v[0] for v in whole]
    none = parse_defense("none")
    defended = [Defended(dataclasses.replace(v, probs=None), none, b"png", "png", v.image) for v in clean]
    assert outcome(ClassifyHandler(config, run_id="r").run_inference(defended, _Breaking(tiny_model))) == [
        "ok", "ok", ("k2", "classify"), "ok"]

    real_maps = saliency_stage.compute_maps

    def maps_break(name, model, x, *a):
        _breaks(x)
        return real_maps(name, model, x, *a)

    monkeypatch.setattr(saliency_stage, "compute_maps", maps_break)
    out = MapHandler(config, map_requests((parse_defense("msroi"),)), seed=0).run_inference(clean, tiny_model)
    # every variant goes on (its other defenses need no map); only k2's map is missing, and reported
    assert outcome(out) == ["ok", "ok", "ok", ("k2", "saliency"), "ok"]
    assert [(v.sample.key, len(v.maps)) for v in out if not isinstance(v, ErrorRecord)] == [
        ("k0", 1), ("k1", 1), ("k2", 0), ("k3", 1)]
