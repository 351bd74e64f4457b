import numpy as np
import pytest
import torch

from tests.tiny import near_boundary
from transforms.defenses import (
    apply_defense,
    denoise_tv,
    encode_batch,
    gated_maps,
    jpeg_stability,
    map_request,
    match_target,
    parse_defense,
)
from transforms.images import to_tensor, to_uint8
from transforms.jpeg import decode_rgb


def test_semantic_specs_parse_and_share_maps():
    a = parse_defense("aug_msroi:q_low=20,q_high=60,levels=4")
    b = parse_defense("aug_msroi:method=mosaic")
    c = parse_defense("aug_msroi:activation_noise=0.1")
    assert map_request(a) == map_request(b) != map_request(c)  # encoding params do not change the map
    assert map_request(parse_defense("msroi:q_low=10"))[0] == "msroi:top_k=5,threshold=None"
    assert map_request(parse_defense("jpeg:quality=50")) is None
    assert match_target(parse_defense("jpeg:match=aug_msroi")) == "aug_msroi"


@pytest.mark.parametrize(
    "text, message",
    [
        ("aug_msroi:q_low=80,q_high=40", "must not exceed"),
        ("aug_msroi:q_high=101", "1..100"),
        ("aug_msroi:levels=0", "levels"),
        ("msroi:levels=9223372036854775808", "levels"),  # int64 levels overflowed: a quality below q_low
        ("aug_msroi:samples=0", "samples"),
        ("aug_msroi:input_noise=-1", "input_noise"),
        ("aug_msroi:noise=pink", "expected one of gaussian, uniform"),
        ("aug_msroi:method=magic", "expected one of requantize, mosaic"),
        ("aug_msroi:saliency=1", "unknown parameter 'saliency'"),
        ("jpeg:quality=50,match=aug_msroi", "give one of quality, bytes or match"),
        ("jpeg:bytes=0", "bytes"),
        ("aug_msroi_gated:gate=-0.1", "gate"),
        ("aug_msroi_gated:gate=nan", "gate"),
        ("aug_msroi_gated:denoise=-1", "denoise"),
        ("aug_msroi_gated:noise_floor=-0.5", "noise_floor"),
        ("aug_msroi_gated:noise_floor=nan", "noise_floor"),
        ("aug_msroi_gated:stable_quality=0", "stable_quality"),
        ("aug_msroi_gated:q_low=95", "must not exceed"),
        ("aug_msroi_gated:stability=1", "unknown parameter 'stability'"),
        ("aug_msroi_gated:jpeg_stability=1", "unknown parameter 'jpeg_stability'"),
        ("aug_msroi_gated:jpeg_gate=-1", "jpeg_gate"),
        ("aug_msroi_gated:jpeg_gate=inf", "jpeg_gate"),
        ("aug_msroi_gated:bytes=0", "bytes"),
        ("jpeg:match=", "match"),
    ],
)
def test_invalid_parameters_fail_before_work(text, message):
    with pytest.raises(ValueError, match=message):
        parse_defense(text)


def test_match_names_a_defense_even_one_called_none(photos):
    """``none`` is a defense (the PNG): ``jpeg:match=none`` is rate-matched to it, not read as
    "no match" (a plain quality-75 JPEG)."""
    spec = parse_defense("jpeg:match=none")
    assert match_target(spec) == "none"
    png = apply_defense(parse_defense("none"), photos[0])
    enc = apply_defense(spec, photos[0], matched_bytes=len(png.data))
    assert enc.info["target_bytes"] == len(png.data) and len(enc.data) <= len(png.data)


def test_a_match_standing_alone_reads_the_runs_spelling():
    """``jpeg:match=aug_msroi:q_low=40;q_high=60`` (its parameters separated by ';', as a run
    names it) names that defense on its own too (:func:`matched_defense`, BPDA's forward pass)."""
    from transforms.defenses import matched_defense

    ref = matched_defense(parse_defense("jpeg:match=aug_msroi:q_low=40;q_high=60"))
    assert (ref.name, dict(ref.params)) == ("aug_msroi", {"q_low": 40, "q_high": 60})


def test_semantic_defense_uses_the_map(photos):
    img = photos[0]
    sal = np.zeros(img.shape[:2], np.float32)
    sal[:32] = 1.0  # top half salient
    enc = apply_defense(parse_defense("aug_msroi"), img, saliency=sal)
    assert enc.ext == "jpg" and enc.data[:2] == b"\xff\xd8"
    assert enc.info["quality_levels"] == {30: 8, 70: 8}  # 4x4 blocks of 16 px: 2 rows each
    out = decode_rgb(enc.data).astype(float)
    err = (out - img) ** 2
    assert err[:32].mean() < err[32:].mean()  # salient half kept better
    with pytest.raises(ValueError, match="saliency map"):
        apply_defense(parse_defense("msroi"), img)


def test_rate_controlled_jpeg(photos):
    img = photos[1]
    ref = apply_defense(parse_defense("jpeg:quality=60"), img)
    matched = apply_defense(parse_defense("jpeg:match=x"), img, matched_bytes=len(ref.data))
    assert len(matched.data) <= len(ref.data) and matched.info["quality"] >= 55
    fixed = apply_defense(parse_defense("jpeg:bytes=900"), img)
    assert len(fixed.data) <= 900 and fixed.info["target_bytes"] == 900
    sem = apply_defense(parse_defense("aug_msroi:bytes=1200"), img, saliency=np.full((64, 64), 0.5, np.float32))
    assert len(sem.data) <= 1200 and sem.info["target_bytes"] == 1200


def test_a_byte_target_slides_the_window_keeping_its_width(photos):
    img = photos[0]
    sal = np.zeros(img.shape[:2], np.float32)
    sal[:32] = 1.0
    # A budget of the 50..90 window's file: the spec's 30..70 window (40 wide) slides up to it.
    roomy = apply_defense(parse_defense("aug_msroi:q_low=50,q_high=90"), img, saliency=sal)
    fit = apply_defense(parse_defense(f"aug_msroi:bytes={len(roomy.data)}"), img, saliency=sal)
    assert fit.data == roomy.data and fit.info["quality_levels"] == {50: 8, 90: 8}
    # A tight one slides it down, still 40 wide while q_low can go lower.
    tight = apply_defense(parse_defense(f"aug_msroi:bytes={len(roomy.data) // 2}"), img, saliency=sal)
    low, high = sorted(tight.info["quality_levels"])
    assert len(tight.data) <= len(roomy.data) // 2 and high < 70 and high - low == min(40, high - 1)


def test_gated_defense_splits_on_stability(photos):
    img = photos[0]
    sal = np.zeros(img.shape[:2], np.float32)
    sal[:32] = 1.0
    spec = parse_defense("aug_msroi_gated")
    stable = apply_defense(spec, img, saliency=sal, stability=0.8, jpeg_stability=0.6)
    assert stable.data == apply_defense(parse_defense("jpeg:quality=50"), img).data  # plain uniform JPEG
    assert stable.info == {"quality": 50, "stability": 0.8, "jpeg_stability": 0.6, "flagged": False}
    flagged = apply_defense(spec, img, saliency=sal, stability=0.6, jpeg_stability=0.9)
    assert flagged.info["flagged"] and flagged.info["quality_levels"] == {50: 8, 90: 8}
    # Either check flags: stable under noise, unstable under JPEG.
    by_jpeg = apply_defense(spec, img, saliency=sal, stability=1.0, jpeg_stability=0.5)
    assert by_jpeg.info["flagged"] and by_jpeg.data == flagged.data
    # Flagged: the denoised image, encoded semantically (not the input's semantic file).
    undenoised = apply_defense(parse_defense("aug_msroi_gated:denoise=0"), img, saliency=sal, stability=0.6,
                               jpeg_stability=0.9)
    assert flagged.data != undenoised.data
    same = apply_defense(parse_defense("aug_msroi_gated:denoise=0"), denoise_tv(img, 0.03), saliency=sal,
                         stability=0.6, jpeg_stability=0.9)
    assert flagged.data == same.data

    def tv(a):
        a = a.astype(float)
        return np.abs(np.diff(a, axis=0)).sum() + np.abs(np.diff(a, axis=1)).sum()

    assert tv(decode_rgb(flagged.data)) < tv(decode_rgb(undenoised.data))
    off = parse_defense("aug_msroi_gated:gate=0,jpeg_gate=0")
    assert not apply_defense(off, img, saliency=sal, stability=0.0, jpeg_stability=0.0).info["flagged"]
    noise_only = apply_defense(parse_defense("aug_msroi_gated:jpeg_gate=0"), img, saliency=sal, stability=0.8)
    assert noise_only.info == {"quality": 50, "stability": 0.8, "flagged": False}  # no JPEG check needed
    assert apply_defense(parse_defense("aug_msroi_gated:gate=1.01"), img, saliency=sal, stability=1.0,
                         jpeg_stability=1.0).info["flagged"]
    assert apply_defense(parse_defense("aug_msroi_gated:gate=0,jpeg_gate=1.01"), img, saliency=sal, stability=1.0,
                         jpeg_stability=1.0).info["flagged"]
    with pytest.raises(ValueError, match="stability"):
        apply_defense(spec, img, saliency=sal)
    with pytest.raises(ValueError, match="jpeg_stability"):
        apply_defense(spec, img, saliency=sal, stability=0.8)
    # Rate control: both branches fit the budget (stable: the best uniform quality that fits).
    fit = parse_defense("aug_msroi_gated:bytes=1100")
    for st in (0.8, 0.6):
        enc = apply_defense(fit, img, saliency=sal, stability=st, jpeg_stability=0.9)
        assert len(enc.data) <= 1100 and enc.info["target_bytes"] == 1100 and enc.info["flagged"] == (st < 0.7)
    stable_fit = apply_defense(fit, img, saliency=sal, stability=0.8, jpeg_stability=0.9)
    assert stable_fit.data == apply_defense(parse_defense("jpeg:bytes=1100"), img).data


def test_denoise_tv_smooths_noise_and_keeps_shape():
    rng = np.random.default_rng(0)
    flat = np.full((40, 48, 3), 120, np.uint8)
    noisy = np.clip(flat + rng.normal(0, 12, flat.shape), 0, 255).astype(np.uint8)
    out = denoise_tv(noisy, 0.1)
    assert out.shape == noisy.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 120).mean() < 0.5 * np.abs(noisy.astype(int) - 120).mean()
    assert denoise_tv(noisy, 0) is noisy
    assert denoise_tv(np.full((1, 1, 3), 7, np.uint8), 0.03).tolist() == [[[7, 7, 7]]]


def test_gated_maps_share_nothing_with_aug_msroi_and_fill_stability(photos, tiny_model):
    gated = parse_defense("aug_msroi_gated")
    assert map_request(gated) != map_request(parse_defense("aug_msroi"))  # no activation noise
    assert map_request(gated) == map_request(parse_defense("aug_msroi_gated:gate=0.5,jpeg_gate=0.3,q_high=80"))
    # The JPEG check encodes at the stable quality; switched off, it is no part of the map.
    assert map_request(gated) != map_request(parse_defense("aug_msroi_gated:stable_quality=60"))
    assert map_request(gated) != map_request(parse_defense("aug_msroi_gated:jpeg_gate=0"))
    assert (map_request(parse_defense("aug_msroi_gated:jpeg_gate=0"))
            == map_request(parse_defense("aug_msroi_gated:jpeg_gate=0,stable_quality=60,subsampling=4:4:4")))
    x = to_tensor(photos)
    pixels = to_uint8(torch.cat([x, near_boundary(tiny_model, x)]))  # stored as uint8, as in the pipeline
    files = encode_batch(gated, pixels, model=tiny_model)
    stab = np.array([f.info["stability"] for f in files])
    jstab = np.array([f.info["jpeg_stability"] for f in files])
    assert set(np.round(stab * 5, 6)) <= set(range(6))  # shares of 5 passes
    np.testing.assert_allclose(jstab, jpeg_stability(tiny_model, to_tensor(pixels)).numpy(), atol=1e-6)
    assert [f.info["flagged"] for f in files] == list((stab < 0.7) | (jstab < 0.55))
    assert not any(f.info["flagged"] for f in files[:4]) and any(f.info["flagged"] for f in files[4:])
    for f, p in zip(files, pixels):
        if not f.info["flagged"]:
            assert f.data == apply_defense(parse_defense("jpeg:quality=50"), p).data


def test_jpeg_stability_is_the_probability_mass_kept_by_the_stable_file(photos, tiny_model):
    x = to_tensor(photos)
    pixels = to_uint8(x)
    got = jpeg_stability(tiny_model, x, quality=30, max_batch=3)
    files = [apply_defense(parse_defense("jpeg:quality=30"), p).data for p in pixels]
    with torch.no_grad():
        pa = tiny_model(to_tensor(pixels)).softmax(1)
        pb = tiny_model(to_tensor([decode_rgb(f) for f in files])).softmax(1)
    want = 1 - 0.5 * (pa - pb).abs().sum(1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert ((got > 0) & (got <= 1)).all() and (got < 1).any()  # JPEG at 30 moves some prediction
    # A coarser JPEG moves the predictions at least as much on average; batching changes nothing.
    assert jpeg_stability(tiny_model, x, quality=5).mean() <= jpeg_stability(tiny_model, x, quality=95).mean()
    torch.testing.assert_close(jpeg_stability(tiny_model, x, quality=30, max_batch=None), got, atol=1e-6, rtol=0)
    assert jpeg_stability(tiny_model, x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="quality"):
        jpeg_stability(tiny_model, x, quality=0)
    with pytest.raises(ValueError, match="codec"):
        jpeg_stability(tiny_model, x, codec="nvjpeg")


@pytest.mark.parametrize("subsampling", ["4:2:0", "4:4:4"])
def test_jpeg_stability_torch_codec_gives_libjpegs_scores(photos, tiny_model, subsampling):
    # The device codec (what GPU workers use) computes libjpeg's very pixels, so the scores are
    # the same numbers, not an approximation.
    x = to_tensor(photos)
    lib = jpeg_stability(tiny_model, x, quality=30, subsampling=subsampling, codec="libjpeg")
    dev = jpeg_stability(tiny_model, x, quality=30, subsampling=subsampling, codec="torch")
    assert (lib < 1).any()
    torch.testing.assert_close(dev, lib, atol=0, rtol=0)


def test_jpeg_check_compiles_its_round_trip_with_the_passes_on_a_gpu_only(photos, monkeypatch):
    """--map-compile compiles the torch round trip too, but only off the CPU (where compiling
    costs more than it saves); the scores do not change."""
    import transforms.defenses as defenses
    from tests import tiny
    from transforms.saliency import compile_plain_passes

    plain = tiny.build()
    fused = compile_plain_passes(tiny.build(), backend=lambda gm, inputs: gm.forward)
    assert not defenses.compiles_roundtrip(fused, "cpu") and not defenses.compiles_roundtrip(plain, "cuda")
    assert defenses.compiles_roundtrip(fused, torch.device("cuda"))
    seen, real = [], defenses.jpeg_roundtrip
    monkeypatch.setattr(defenses, "jpeg_roundtrip", lambda *a, compiled: seen.append(compiled) or real(*a))
    x = to_tensor(photos)
    want = jpeg_stability(plain, x, quality=30, codec="torch")
    assert jpeg_stability(fused, x, quality=30, codec="torch").equal(want) and seen == [False, False]
    monkeypatch.setattr(defenses, "compiles_roundtrip", lambda model, device: True)  # as on a GPU
    assert jpeg_stability(fused, x, quality=30, codec="torch").equal(want) and seen[-1] is True


def test_gated_maps_share_one_unperturbed_pass_without_changing_anything(photos, tiny_model):
    from transforms.saliency import aug_msroi_stability

    x = to_tensor(to_uint8(torch.cat([to_tensor(photos), near_boundary(tiny_model, to_tensor(photos))])))
    seeds = torch.arange(len(x))
    calls = []
    hook = tiny_model.fc.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))  # every pass
    try:
        maps, scores = gated_maps(tiny_model, x, jpeg_quality=40, seeds=seeds)
    finally:
        hook.remove()
    alone_maps, alone_stab = aug_msroi_stability(tiny_model, x, seeds=seeds)
    torch.testing.assert_close(maps, alone_maps, atol=0, rtol=0)
    torch.testing.assert_close(scores["stability"], alone_stab, atol=0, rtol=0)
    torch.testing.assert_close(scores["jpeg_stability"], jpeg_stability(tiny_model, x, quality=40), atol=1e-6, rtol=0)
    assert sum(calls) == (5 + 2) * len(x)  # 5 noisy passes, one unperturbed, one on the JPEGs
    empty_maps, empty = gated_maps(tiny_model, x[:0], jpeg_quality=40)
    assert empty_maps.shape[0] == 0 and all(v.shape == (0,) for v in empty.values())
    with pytest.raises(ValueError, match="one row per image"):
        jpeg_stability(tiny_model, x, logits=torch.zeros(len(x) - 1, 10))
    with pytest.raises(ValueError, match="one row per image"):
        aug_msroi_stability(tiny_model, x, logits=torch.zeros(len(x) + 1, 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_jpeg_stability_on_cuda_matches_libjpeg_on_the_cpu(photos):
    # On CUDA the default codec is the device one; the scores match the CPU's libjpeg ones up to
    # the network's rounding on the two devices.
    from tests import tiny

    x = to_tensor(photos)
    cpu = jpeg_stability(tiny.build(), x, quality=30)
    gpu = jpeg_stability(tiny.build().cuda(), x.cuda(), quality=30)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def test_map_stage_leaves_small_groups_and_oversized_images_to_the_encoder(monkeypatch):
    """By default a GPU entropy-codes only groups of at least DEVICE_ENTROPY_MIN_BATCH same-sized
    images (one call costs about the same whatever its batch); an image no JPEG can hold is left
    to the encoder, which reports it clearly, and the rest of the batch is prepared."""
    import transforms.defenses as defenses

    n = defenses.DEVICE_ENTROPY_MIN_BATCH
    assert defenses.entropy_codes_on("cuda", None, n) and not defenses.entropy_codes_on("cuda", None, n - 1)
    assert defenses.entropy_codes_on("cuda", None) and not defenses.entropy_codes_on("cpu", None, 10 * n)
    assert defenses.entropy_codes_on("cpu", True, 1) and not defenses.entropy_codes_on("cuda", False, 10 * n)

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)] + [
        rng.integers(0, 256, (24, 16, 3), dtype=np.uint8), rng.integers(0, 256, (8, 65501, 3), dtype=np.uint8)]
    maps = [rng.random(im.shape[:2]).astype(np.float32) for im in images]
    spec = parse_defense("aug_msroi")
    # As on a GPU with a threshold of 2: the CPU stands in for the device.
    monkeypatch.setattr(defenses, "DEVICE_ENTROPY_MIN_BATCH", 2)
    real = defenses.entropy_codes_on
    monkeypatch.setattr(defenses, "entropy_codes_on",
                        lambda device, entropy, batch=None: real("cuda", entropy, batch))
    prepared = defenses.prepare_requantized([spec], images, maps, None, [{} for _ in images], "cpu")
    assert all(prepared[i][spec.text].data is not None for i in range(3))  # a group of 3: coded there
    alone = prepared[3][spec.text]
    assert alone.data is None and alone.coefficients is not None  # a group of 1: left to the encoder
    assert prepared[4] == {}
    for i in range(4):
        want = apply_defense(spec, images[i], saliency=maps[i]).data
        assert apply_defense(spec, images[i], saliency=maps[i], prepared=prepared[i][spec.text]).data == want
    with pytest.raises(ValueError, match="65500"):
        apply_defense(spec, images[4], saliency=maps[4])
