import numpy as np
import pytest
import torch
from skimage.restoration import denoise_tv_chambolle

from tests.conftest import dev_rows
from tests.tiny import near_boundary
from transforms.defenses import (
    apply_defense,
    denoise_flagged,
    denoise_tv,
    denoise_weight,
    encode_batch,
    flagged_denoise,
    gate_flagged,
    image_noise_levels,
    parse_defense,
    prepare_requantized,
)
from transforms.denoise import denoise_tv_uint8, noise_level, noise_levels, tv_chambolle
from transforms.images import decode_image, resize_and_crop, to_tensor, to_uint8


def _skimage_uint8(image: np.ndarray, weight: float) -> np.ndarray:
    out = denoise_tv_chambolle(image.astype(np.float32) / 255.0, weight=weight, channel_axis=-1)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _chw(images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("weight", [0.01, 0.03, 0.1])
def test_planes_match_scikit_image_to_float_rounding(photos, weight):
    x = _chw(photos).float() / 255.0
    want = np.stack([denoise_tv_chambolle(p.astype(np.float32) / 255.0, weight=weight, channel_axis=-1)
                     for p in photos]).transpose(0, 3, 1, 2)
    got = tv_chambolle(x, weight)
    assert np.abs(got.numpy() - want).max() < 1e-6
    assert np.abs(got.numpy() - x.numpy()).max() > 0.01  # it did denoise
    # The iteration cap and its per-plane stopping rule are scikit-image's.
    for cap in (1, 2, 7):
        capped = np.stack([denoise_tv_chambolle(p.astype(np.float32) / 255.0, weight=weight, channel_axis=-1,
                                                max_num_iter=cap) for p in photos]).transpose(0, 3, 1, 2)
        assert np.abs(tv_chambolle(x, weight, max_iter=cap).numpy() - capped).max() < 1e-6
    torch.testing.assert_close(tv_chambolle(x, weight, max_iter=1), x, atol=0, rtol=0)


def test_dev_images_match_scikit_image_in_uint8():
    from tests.conftest import DEV

    images = [resize_and_crop(decode_image((DEV / r["file"]).read_bytes()), resize=256, crop=224) for r in dev_rows()[:24]]
    got = denoise_tv_uint8(_chw(images), 0.03).permute(0, 2, 3, 1).numpy()
    want = np.stack([_skimage_uint8(im, 0.03) for im in images])
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-5  # float rounding at a half, a pixel in a million


def test_batching_and_chunking_change_nothing(photos):
    x = _chw(photos).float() / 255.0
    whole = tv_chambolle(x, 0.05, chunk=len(photos) * 3)
    for chunk in (None, 1, 2, 5):
        torch.testing.assert_close(tv_chambolle(x, 0.05, chunk=chunk), whole, atol=0, rtol=0)
    for i in range(len(photos)):
        torch.testing.assert_close(tv_chambolle(x[i], 0.05), whole[i], atol=0, rtol=0)


def test_edge_shapes_constant_planes_and_contract():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 9), (9, 1), (2, 2), (3, 5), (17, 31)]:
        r = rng.random(shape).astype(np.float32)
        got = tv_chambolle(torch.from_numpy(r), 0.1).numpy()
        assert np.abs(got - denoise_tv_chambolle(r, weight=0.1)).max() < 1e-6, shape
    flat = torch.full((2, 3, 12, 10), 0.4)
    noisy = torch.from_numpy(rng.random((2, 3, 12, 10)).astype(np.float32))
    both = torch.cat([flat, noisy])
    out = tv_chambolle(both, 0.1)
    torch.testing.assert_close(out[:2], flat, atol=0, rtol=0)  # constant planes stay as they are
    torch.testing.assert_close(out[2:], tv_chambolle(noisy, 0.1), atol=0, rtol=0)
    before = both.clone()
    assert out.shape == both.shape and out.dtype == both.dtype
    torch.testing.assert_close(both, before, atol=0, rtol=0)  # input untouched
    assert tv_chambolle(torch.zeros(0, 3, 8, 8), 0.1).shape == (0, 3, 8, 8)
    u8 = (noisy * 255).round().to(torch.uint8)
    assert denoise_tv_uint8(u8, 0).equal(u8)
    for bad, match in [(dict(weight=0), "weight"), (dict(weight=float("nan")), "weight"),
                       (dict(weight=0.1, max_iter=0), "max_iter")]:
        with pytest.raises(ValueError, match=match):
            tv_chambolle(noisy, **bad)
    with pytest.raises(ValueError, match="floating"):
        tv_chambolle(u8, 0.1)
    with pytest.raises(ValueError, match="uint8"):
        denoise_tv_uint8(noisy, 0.1)


def test_denoise_tv_is_the_torch_code_on_one_image(photos):
    for p in photos:
        got = denoise_tv(p, 0.03)
        assert got.dtype == np.uint8 and got.shape == p.shape
        np.testing.assert_array_equal(got, denoise_tv_uint8(_chw([p]), 0.03)[0].permute(1, 2, 0).numpy())
        assert np.abs(got.astype(int) - _skimage_uint8(p, 0.03).astype(int)).max() <= 1


def test_denoise_flagged_denoises_what_each_gated_spec_flags(photos):
    images = list(photos) + [photos[0][:40, :24]]  # another size: denoised in its own group
    scores = {"stability": np.array([1.0, 0.6, 0.8, 1.0, 0.2]), "jpeg_stability": np.array([0.9, 0.9, 0.5, 0.9, 0.9])}
    specs = [parse_defense("aug_msroi_gated"), parse_defense("aug_msroi_gated:gate=0.9,denoise=0.05"),
             parse_defense("aug_msroi_gated:gate=0.1,jpeg_gate=0,denoise=0"), parse_defense("jpeg:quality=50")]
    out = denoise_flagged(specs, images, scores)
    # defaults (gate 0.7, jpeg_gate 0.55, denoise 0.03) flag 1, 2, 4; gate 0.9 flags 1, 2, 4 too
    # (0.8 < 0.9 adds 2 by noise, it was already in by JPEG); the third denoises nothing.
    assert [sorted(d) for d in out] == [[], [0.03, 0.05], [0.03, 0.05], [], [0.03, 0.05]]
    for i, d in enumerate(out):
        for w, im in d.items():
            np.testing.assert_array_equal(im, denoise_tv(images[i], w))
    assert [denoise_weight(s) for s in specs] == [0.03, 0.05, 0.0, 0.0]
    assert gate_flagged(0.6, None, gate=0.7, jpeg_gate=0.55) and not gate_flagged(0.8, 0.1, gate=0.7, jpeg_gate=0)


def test_gated_defense_uses_given_denoised_pixels(photos, tiny_model, monkeypatch):
    from transforms import defenses

    spec = parse_defense("aug_msroi_gated")
    img = photos[1]
    sal = np.linspace(0, 1, img.shape[0] * img.shape[1], dtype=np.float32).reshape(img.shape[:2])
    here = apply_defense(spec, img, saliency=sal, stability=0.2, jpeg_stability=0.9)
    given = apply_defense(spec, img, saliency=sal, stability=0.2, jpeg_stability=0.9, denoised=denoise_tv(img, 0.03))
    assert given.data == here.data
    other = apply_defense(spec, img, saliency=sal, stability=0.2, jpeg_stability=0.9, denoised=photos[2])
    assert other.data != here.data  # the given pixels are the ones encoded
    with pytest.raises(ValueError, match="do not match"):
        apply_defense(spec, img, saliency=sal, stability=0.2, jpeg_stability=0.9, denoised=img[:8])
    # encode_batch denoises the flagged images batched on the model's device: the same files as
    # denoising each one in the encoder.
    x = to_tensor(photos)
    pixels = to_uint8(torch.cat([x, near_boundary(tiny_model, x)]))
    files = encode_batch(spec, pixels, model=tiny_model)
    assert any(f.info["flagged"] for f in files)
    monkeypatch.setattr(defenses, "denoise_flagged", lambda specs, images, *a: [{} for _ in images])
    assert [f.data for f in encode_batch(spec, pixels, model=tiny_model)] == [f.data for f in files]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_the_cpu(photos):
    x = _chw(photos)
    cpu = denoise_tv_uint8(x, 0.03)
    gpu = denoise_tv_uint8(x.cuda(), 0.03)
    assert gpu.device.type == "cuda"
    diff = (gpu.cpu().int() - cpu.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-4
    # The noise levels the map stage measures on the device are the CPU's, exactly.
    images = list(photos) + [photos[1][:31, :47], photos[2][:1]]
    assert image_noise_levels(images, "cuda").tolist() == [noise_level(im) for im in images]


def test_encode_batch_with_prepared_coefficients_writes_the_same_files(photos, tiny_model, monkeypatch):
    # What encode_batch does on a GPU (BPDA's forward pass through the defense): the maps'
    # coefficients computed batched, the files the same as encoding each image from scratch.
    from transforms import defenses

    x = to_tensor(photos)
    pixels = to_uint8(torch.cat([x, near_boundary(tiny_model, x)]))
    made = []
    real = defenses.prepare_requantized
    monkeypatch.setattr(defenses, "prepare_requantized", lambda *a: made.append(real(*a)) or made[-1])
    for text, n_prepared in (("aug_msroi_gated", None), ("msroi:levels=3", 8), ("aug_msroi:bytes=1000", 0)):
        spec = parse_defense(text)
        files = encode_batch(spec, pixels, model=tiny_model, prepare=True)
        flagged = sum(f.info.get("flagged", False) for f in files)
        assert sum(map(len, made[-1])) == (flagged if n_prepared is None else n_prepared) and len(made[-1]) == 8
        assert [f.data for f in files] == [f.data for f in encode_batch(spec, pixels, model=tiny_model, prepare=False)]
        assert [f.info for f in files] == [f.info for f in encode_batch(spec, pixels, model=tiny_model)]


def _smooth(image: np.ndarray) -> np.ndarray:
    """The image blurred (3x3 box per channel): the same content with no pixel noise left."""
    from scipy.ndimage import uniform_filter

    return np.clip(uniform_filter(image.astype(np.float64), size=(3, 3, 1)).round(), 0, 255).astype(np.uint8)


def test_noise_level_follows_the_noise_not_the_content(photos):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :128]
    # Smooth ramps and one sharp edge: no 2x2 block has a diagonal detail, whatever the contrast.
    content = np.stack([xx * 1.5, yy * 2.0, 60.0 + 120.0 * (xx >= 64)], axis=-1)
    assert noise_level(content.astype(np.uint8)) == 0.0
    for sigma in (3.0, 6.0, 12.0):
        noisy = np.clip(content + rng.normal(0, sigma, content.shape), 0, 255).round().astype(np.uint8)
        # Rounding adds 1/12 of a level's variance; the median moves in steps of 0.74 levels.
        assert abs(noise_level(noisy) - sigma) < 0.15 * sigma + 0.75, sigma
    # A sign perturbation of 4 levels, as FGSM at 4/255 leaves, reads as 5.9 (its coefficients are
    # 0, 4 or 8 in size, not normal: median 4); the blur of a photo as less than 2, the photo more.
    sign = np.clip(content + 4 * rng.choice([-1, 1], content.shape), 0, 255).astype(np.uint8)
    assert noise_level(sign) == pytest.approx(4 / 0.6745, abs=0.75)
    assert noise_level(_smooth(photos[2])) < 2.0 <= noise_level(photos[2])
    assert noise_level(photos[3][:, :, 0]) == noise_level(photos[3])  # grayscale: HW or its RGB copy
    for shape in [(1, 9, 3), (9, 1, 3), (0, 0, 3)]:
        assert noise_level(np.zeros(shape, np.uint8)) == 0.0  # no 2x2 block
    assert noise_level(np.full((5, 7, 3), 200, np.uint8)) == 0.0  # odd sizes: the last row/column left out
    with pytest.raises(ValueError, match="uint8"):
        noise_level(content)


def test_noise_levels_of_a_batch_are_the_images_own(photos):
    rng = np.random.default_rng(1)
    for shape in [(6, 3, 64, 64), (4, 3, 17, 33), (3, 3, 1, 9), (2, 3, 2, 2), (0, 3, 8, 8)]:
        x = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
        assert noise_levels(x) == [noise_level(im.permute(1, 2, 0).numpy()) for im in x], shape
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2)
    assert noise_levels(x) == [noise_level(p) for p in photos]
    assert noise_levels(x[:, 0]) == [noise_level(p[:, :, 0]) for p in photos]  # (N, H, W)
    # Mixed sizes, batched by size or one by one: the same values, float64, in order.
    images = [photos[0], photos[1][:31, :47], photos[2], photos[3][:31, :47], photos[3][:1]]
    want = [noise_level(im) for im in images]
    for batched in (False, True):
        got = image_noise_levels(images, batched=batched)
        assert got.dtype == np.float64 and got.tolist() == want
    with pytest.raises(ValueError, match="uint8"):
        noise_levels(x.float())


def test_flagged_images_under_the_noise_floor_are_not_denoised(photos, tiny_model, monkeypatch):
    smooth, noisy = _smooth(photos[2]), photos[2]
    sal = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    flag = dict(saliency=sal, stability=0.2, jpeg_stability=0.9)
    spec, always = parse_defense("aug_msroi_gated"), parse_defense("aug_msroi_gated:noise_floor=0")
    plain = parse_defense("aug_msroi_gated:denoise=0")
    under = apply_defense(spec, smooth, **flag)
    assert under.info["flagged"] and under.info["noise_level"] == noise_level(smooth) < 2.0
    assert under.data == apply_defense(plain, smooth, **flag).data  # semantic JPEG of the image itself
    assert under.data != apply_defense(always, smooth, **flag).data  # floor 0: denoised, as before
    # Given denoised pixels do not override the floor.
    assert apply_defense(spec, smooth, **flag, denoised=denoise_tv(smooth, 0.03)).data == under.data
    over = apply_defense(spec, noisy, **flag)
    assert over.info["noise_level"] >= 2.0 and over.data == apply_defense(always, noisy, **flag).data
    assert over.data == apply_defense(plain, denoise_tv(noisy, 0.03), **flag).data
    # A level measured beforehand (the map stage's) decides, and is the row's.
    given = apply_defense(spec, noisy, **flag, noise_level=1.5)
    assert given.info["noise_level"] == 1.5 and given.data == apply_defense(plain, noisy, **flag).data
    assert apply_defense(spec, smooth, **flag, noise_level=9.0).data == apply_defense(always, smooth, **flag).data
    with pytest.raises(ValueError, match="unknown parameter 'noise_level'"):
        parse_defense("aug_msroi_gated:noise_level=1")  # filled by the runner, never by a spec
    # Not flagged: no noise level in the row.
    assert "noise_level" not in apply_defense(spec, smooth, saliency=sal, stability=1.0, jpeg_stability=0.9).info
    p = {"denoise": 0.03, "noise_floor": 2.0}
    assert flagged_denoise(p, smooth) == 0.0 and flagged_denoise(p, noisy) == 0.03
    assert flagged_denoise({**p, "noise_floor": 0.0}, smooth) == 0.03
    assert flagged_denoise({**p, "denoise": 0.0}, noisy) == 0.0
    # The map stage decides alike: it denoises only what the encoder would, and prepares the
    # image under the floor from its own pixels.
    images = [smooth, noisy]
    scores = {"stability": np.array([0.2, 0.2]), "jpeg_stability": np.array([0.9, 0.9])}
    assert [sorted(d) for d in denoise_flagged([spec], images, scores)] == [[], [0.03]]
    assert [sorted(d) for d in denoise_flagged([spec, always], images, scores)] == [[0.03], [0.03]]
    maps = [sal, sal]
    prepared = prepare_requantized([spec], images, maps, scores, denoise_flagged([spec], images, scores))
    assert all(spec.text in d for d in prepared)
    from transforms.semantic_jpeg import write_coefficients

    for im, d, ref in zip(images, prepared, (under, over)):
        pr = d[spec.text]
        assert write_coefficients(pr.coefficients, pr.tables, subsampling="4:2:0", height=64, width=64) == ref.data
    # Specs of different floors share the one map request and its denoising; each decides by its
    # own floor; written on the device too (as on a GPU), the same files, no coefficients carried.
    both = [spec, always]
    shared = prepare_requantized(both, images, maps, scores, denoise_flagged(both, images, scores), entropy=True)
    for d, im in zip(shared, images):
        assert d[spec.text].coefficients is None and d[always.text].coefficients is None
        assert d[spec.text].data == apply_defense(spec, im, **flag).data
        assert d[always.text].data == apply_defense(always, im, **flag).data
        assert apply_defense(always, im, **flag, prepared=d[always.text]).data == d[always.text].data
    assert shared[0][spec.text].data != shared[0][always.text].data  # the smooth image: under one floor only
    assert shared[1][spec.text].data == shared[1][always.text].data
    # A stable image's uniform JPEG is written on the device too (no quality grid), the file
    # jpeg() writes; the encoder stores it, and a flagged image never takes such a file.
    mixed = {"stability": np.array([0.2, 1.0]), "jpeg_stability": np.array([0.9, 0.9])}
    files = prepare_requantized([spec], images, maps, mixed, denoise_flagged([spec], images, mixed), entropy=True)
    stable = files[1][spec.text]
    assert files[0][spec.text].qualities is not None and stable.qualities is None
    quiet = dict(saliency=sal, stability=1.0, jpeg_stability=0.9)
    assert stable.data == apply_defense(spec, noisy, **quiet).data
    assert apply_defense(spec, noisy, **quiet, prepared=stable._replace(data=b"device")).data == b"device"
    assert apply_defense(spec, noisy, **quiet, prepared=stable).info == apply_defense(spec, noisy, **quiet).info
    assert apply_defense(spec, noisy, **flag, prepared=stable._replace(data=b"device")).data == over.data
    assert prepare_requantized([spec], images, maps, mixed, denoise_flagged([spec], images, mixed))[1] == {}
    # With its file (or coefficients) from the map stage, a flagged image is not denoised again.
    import transforms.defenses as defenses

    def no_denoising(*a):
        raise AssertionError("denoised again in the encoder")

    ready = [files[0][spec.text], prepared[1][spec.text]]  # written; coefficients only
    with monkeypatch.context() as patched:
        patched.setattr(defenses, "denoise_tv", no_denoising)
        assert apply_defense(spec, noisy, **flag, prepared=ready[0]._replace(data=b"device")).data == b"device"
        assert apply_defense(spec, noisy, **flag, prepared=ready[1]).data == over.data
        with pytest.raises(AssertionError, match="again"):
            apply_defense(spec, noisy, **flag)
    # End to end on a batch (maps on the model): prepared or not, the same files.
    pixels = np.stack([smooth, noisy, _smooth(photos[3]), photos[0]])
    low = parse_defense("aug_msroi_gated:gate=1.01")  # flags every image
    files = encode_batch(low, pixels, model=tiny_model, prepare=True)
    assert all(f.info["flagged"] for f in files)
    assert [f.info["noise_level"] < 2.0 for f in files] == [True, False, True, False]
    assert [f.data for f in files] == [f.data for f in encode_batch(low, pixels, model=tiny_model, prepare=False)]
    # Measured once per image, beside the maps: the denoising, the coefficients and the encoder
    # take that measurement.
    from transforms import defenses

    calls = []
    real = defenses._noise_level
    monkeypatch.setattr(defenses, "_noise_level", lambda im: calls.append(1) or real(im))
    again = encode_batch(low, pixels, model=tiny_model, prepare=True)
    assert len(calls) == len(pixels) and [f.data for f in again] == [f.data for f in files]
