"""The torch JPEG round trip against libjpeg-turbo itself: the same decoded pixels, byte for byte."""
from __future__ import annotations

import os
import tempfile
import warnings

import jpeglib
import numpy as np
import pytest
import torch

from tests.conftest import dev_rows
from transforms.images import decode_image
from transforms.jpeg import decode_rgb, encode_jpeg
from transforms.jpeg_dct import SAMPLING
from transforms.jpeg_torch import jpeg_roundtrip, quant_table

SUBSAMPLINGS = list(SAMPLING)


def _ours(images: list[np.ndarray], quality: int, subsampling: str) -> list[np.ndarray]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return list(jpeg_roundtrip(x, quality, subsampling).permute(0, 2, 3, 1).numpy())


def _assert_pillow(images: list[np.ndarray], quality: int, subsampling: str) -> None:
    for i, (got, image) in enumerate(zip(_ours(images, quality, subsampling), images)):
        ref = decode_rgb(encode_jpeg(image, quality, subsampling))
        bad = np.argwhere(got != ref)
        assert bad.size == 0, (f"image {i} {image.shape} q{quality} {subsampling}: {len(bad)} values differ, "
                               f"first at {bad[0]}: {got[tuple(bad[0])]} against {ref[tuple(bad[0])]}")


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS)
@pytest.mark.parametrize("quality", [1, 10, 50, 75, 95, 100])
def test_photos_decode_to_libjpegs_pixels(photos, quality, subsampling):
    _assert_pillow(photos, quality, subsampling)


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (2, 3), (5, 2), (7, 9), (8, 8), (15, 16), (16, 17), (17, 33),
                                   (41, 23)])
def test_noise_at_odd_sizes(shape, subsampling):
    # Uniform noise drives every coefficient and the clamps; odd sizes the padding, the chroma
    # edges and libjpeg's box upsampling of rows with two samples or fewer.
    rng = np.random.default_rng(sum(shape))
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(2)]
    for quality in (5, 50, 90):
        _assert_pillow(images, quality, subsampling)


def test_flat_and_extreme_images():
    images = [np.full((24, 24, 3), v, dtype=np.uint8) for v in (0, 128, 255)]
    images.append(np.tile(np.array([[[255, 0, 0]], [[0, 0, 255]]], dtype=np.uint8), (12, 24, 1)))
    for quality in (1, 50, 100):
        _assert_pillow(images, quality, "4:2:0")


def test_dev_images_at_their_own_size():
    rows = dev_rows()
    from tests.conftest import DEV

    for r in rows[:6]:
        image = decode_image((DEV / r["file"]).read_bytes())
        _assert_pillow([image], 50, "4:2:0")


@pytest.mark.parametrize("quality", [1, 25, 50, 51, 80, 100])
def test_quant_tables_are_libjpegs(quality):
    fd, path = tempfile.mkstemp(suffix=".jpg")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_jpeg(np.zeros((16, 16, 3), dtype=np.uint8), quality, "4:2:0"))
        qt = jpeglib.read_dct(path).qt
    finally:
        os.remove(path)
    assert tuple(int(v) for v in np.asarray(qt[0]).ravel()) == quant_table(quality)
    assert tuple(int(v) for v in np.asarray(qt[1]).ravel()) == quant_table(quality, chroma=True)


def test_batch_layout_and_empty(photos):
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2)
    whole = jpeg_roundtrip(x, 40)
    assert whole.dtype == torch.uint8 and whole.shape == x.shape and whole.is_contiguous()
    # Each image's pixels do not depend on its batch or on the input's memory layout.
    for i in range(len(photos)):
        torch.testing.assert_close(jpeg_roundtrip(x[i : i + 1], 40)[0], whole[i], rtol=0, atol=0)
    torch.testing.assert_close(jpeg_roundtrip(x.contiguous(memory_format=torch.channels_last), 40), whole,
                               rtol=0, atol=0)
    assert jpeg_roundtrip(x[:0], 40).shape == (0, 3, 64, 64)


def test_bad_arguments():
    x = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="quality"):
        jpeg_roundtrip(x, 0)
    with pytest.raises(ValueError, match="quality"):
        jpeg_roundtrip(x, 101)
    with pytest.raises(ValueError, match="subsampling"):
        jpeg_roundtrip(x, 50, "4:1:1")
    with pytest.raises(ValueError, match="uint8"):
        jpeg_roundtrip(x.float(), 50)
    with pytest.raises(ValueError, match="uint8"):
        jpeg_roundtrip(x[:, :1], 50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(photos, monkeypatch):
    import transforms.jpeg_torch as jt

    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2)
    for subsampling in SUBSAMPLINGS:
        torch.testing.assert_close(jpeg_roundtrip(x.cuda(), 50, subsampling).cpu(), jpeg_roundtrip(x, 50, subsampling),
                                   rtol=0, atol=0)
    # Compiled there too (--map-compile on a GPU: Triton's integer kernels), not its eager fallback.
    monkeypatch.setitem(jt._COMPILE, "ok", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jpeg_roundtrip(x.cuda(), 50, compiled=True)
    assert jt._COMPILE["ok"] and got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), jpeg_roundtrip(x, 50), rtol=0, atol=0)


def test_compiled_round_trip_gives_the_same_pixels(photos):
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2)
    for subsampling in ("4:2:0", "4:4:4"):
        torch.testing.assert_close(jpeg_roundtrip(x, 50, subsampling, compiled=True),
                                   jpeg_roundtrip(x, 50, subsampling), rtol=0, atol=0)


def test_a_failing_compiler_falls_back_to_eager(photos, monkeypatch):
    import transforms.jpeg_torch as jt

    def broken():
        def run(*args):
            raise RuntimeError("no C compiler here")

        return run

    monkeypatch.setattr(jt, "_compiled_roundtrip", broken)
    monkeypatch.setitem(jt._COMPILE, "ok", True)
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2)
    with pytest.warns(RuntimeWarning, match="compiled JPEG round trip failed .*no C compiler here"):
        got = jpeg_roundtrip(x, 50, compiled=True)
    torch.testing.assert_close(got, jpeg_roundtrip(x, 50), rtol=0, atol=0)
    assert jt._COMPILE["ok"] is False  # not tried again



def test_a_round_trip_out_of_device_memory_stays_compiled(photos, monkeypatch):
    # Out of GPU memory is the batch's size, not the compiler's: raised for the map stage to
    # split the batch, the round trip still compiled for the next one (it went eager for good).
    import transforms.jpeg_torch as jt

    def out_of_memory():
        def run(*args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        return run

    monkeypatch.setattr(jt, "_compiled_roundtrip", out_of_memory)
    monkeypatch.setitem(jt._COMPILE, "ok", True)
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        jpeg_roundtrip(x, 50, compiled=True)
    assert jt._COMPILE["ok"] is True

def test_reciprocal_quantization_is_rounding_division():
    # jcdctmgr.c's reciprocals, for every divisor a baseline table gives (8 x 1..255) and every
    # magnitude islow's output reaches (below 2**14): the same as rounding division.
    from transforms.jpeg_torch import _reciprocal

    m = np.arange(1 << 14, dtype=np.int64)
    for d in range(8, 8 * 256, 8):
        recip, corr, shift = _reciprocal(d)
        assert np.array_equal(((m + corr) * recip) >> shift, (m + d // 2) // d), d


# --------------------------------------------------------------------------- semantic JPEG coefficients


@pytest.mark.parametrize("subsampling", ["4:2:0", "4:2:2", "4:4:4"])
def test_source_coefficients_are_jpeg_dcts(subsampling):
    from transforms.jpeg_dct import source_coefficients as numpy_coefficients
    from transforms.jpeg_torch import source_coefficients

    rng = np.random.default_rng(3)
    for h, w in [(224, 224), (17, 33), (1, 1), (40, 9)]:
        images = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
        got = source_coefficients(torch.from_numpy(images).permute(0, 3, 1, 2), subsampling)
        for i, image in enumerate(images):
            for c, want in enumerate(numpy_coefficients(image, subsampling)):
                np.testing.assert_array_equal(got[c][i].numpy(), want)


@pytest.mark.parametrize("subsampling", ["4:2:0", "4:2:2", "4:4:4"])
def test_requantized_coefficients_write_the_encoders_very_files(subsampling):
    """The device path's coefficients and tables, written, are byte for byte the numpy encoder's
    semantic JPEG of the same pixels and grid: photos and noise, odd sizes (one block wide too),
    blocks of 8, 16, 32."""
    import skimage.data

    from transforms.images import resize_and_crop
    from transforms.jpeg_torch import requantized_coefficients
    from transforms.semantic_jpeg import block_qualities, encode_semantic_jpeg, write_coefficients

    rng = np.random.default_rng(5)
    photos = [resize_and_crop(skimage.data.astronaut(), resize=256, crop=224),
              resize_and_crop(skimage.data.chelsea(), resize=256, crop=224)]
    cases = [(np.stack(photos), 16), (rng.integers(0, 256, (2, 37, 53, 3), dtype=np.uint8), 8),
             (rng.integers(0, 256, (2, 37, 53, 3), dtype=np.uint8), 32), (rng.integers(0, 256, (1, 5, 7, 3), dtype=np.uint8), 8),
             # One block wide: the coefficients are strided views, which jpeglib cannot take as they are.
             (rng.integers(0, 256, (1, 33, 8, 3), dtype=np.uint8), 8), (rng.integers(0, 256, (1, 9, 1, 3), dtype=np.uint8), 16),
             (rng.integers(0, 256, (2, 40, 8, 3), dtype=np.uint8), 16)]
    for images, block in cases:
        n, h, w = images.shape[:3]
        grids = np.stack([block_qualities(rng.random((h, w)), block=block, q_low=5, q_high=95) for _ in range(n)])
        comps, tables = requantized_coefficients(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(grids),
                                                 block=block, subsampling=subsampling)
        assert comps[0].dtype == torch.int16 and tuple(tables.shape) == (n, 2, 8, 8)
        for i in range(n):
            got = write_coefficients([c[i].numpy() for c in comps], tables[i].numpy(), subsampling=subsampling,
                                     height=h, width=w)
            assert got == encode_semantic_jpeg(images[i], grids[i], subsampling=subsampling, block=block)


def test_requantized_coefficients_and_writer_reject_bad_input():
    from transforms.jpeg_torch import requantized_coefficients
    from transforms.semantic_jpeg import write_coefficients

    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    good = torch.full((2, 2, 2), 50)
    for kw, match in [(dict(qualities=torch.full((2, 1, 2), 50)), "shape"), (dict(qualities=good * 0), "1..100"),
                      (dict(qualities=good, block=12), "multiple of 8"), (dict(qualities=good, subsampling="4:1:1"), "subsampling")]:
        with pytest.raises(ValueError, match=match):
            requantized_coefficients(x, **kw)
    with pytest.raises(ValueError, match="uint8"):
        requantized_coefficients(x.float(), good)
    comps, tables = requantized_coefficients(x, good)
    args = dict(subsampling="4:2:0", height=32, width=32)
    write_coefficients([c[0].numpy() for c in comps], tables[0].numpy(), **args)  # fine
    with pytest.raises(ValueError, match="component coefficients"):
        write_coefficients([c[0].numpy() for c in comps], tables[0].numpy(), **{**args, "height": 40})
    with pytest.raises(ValueError, match="3 components"):
        write_coefficients([comps[0][0].numpy()], tables[0].numpy(), **args)
    with pytest.raises(ValueError, match="tables"):
        write_coefficients([c[0].numpy() for c in comps], tables[0].numpy() * 0, **args)
    with pytest.raises(ValueError, match="range"):
        write_coefficients([comps[0][0].numpy().astype(np.int32) + 5000, *[c[0].numpy() for c in comps[1:]]],
                           tables[0].numpy(), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_requantized_coefficients_on_cuda_match_the_cpu():
    from transforms.jpeg_torch import requantized_coefficients

    rng = np.random.default_rng(9)
    x = torch.from_numpy(rng.integers(0, 256, (4, 3, 64, 48), dtype=np.uint8))
    grids = torch.from_numpy(rng.integers(10, 96, (4, 4, 3)))
    cpu = requantized_coefficients(x, grids)
    gpu = requantized_coefficients(x.cuda(), grids.cuda())
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu[0], gpu[0])) and torch.equal(cpu[1], gpu[1].cpu())


def test_quality_grids_are_block_qualities_of_each_map():
    """The batched device grids equal numpy's, map by map: random, quantized (values on the bin
    edges), flat and smooth maps, odd sizes, every block size and level count; bad input is a
    clear error."""
    from transforms.jpeg_torch import quality_grids
    from transforms.semantic_jpeg import block_qualities

    rng = np.random.default_rng(12)
    for trial in range(60):
        n, h, w = 3, *rng.integers(1, 120, 2)
        kind = trial % 4
        if kind == 0:
            maps = rng.random((n, h, w)).astype(np.float32)
        elif kind == 1:
            maps = np.round(rng.random((n, h, w)) * 5) / 5  # float64, exactly on the value bins' edges
        elif kind == 2:
            maps = np.full((n, h, w), rng.choice([0.0, 0.2, 0.6, 1.0]), dtype=np.float32)
        else:
            yy, xx = np.mgrid[:h, :w]
            maps = np.stack([np.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (h * w / 4 + 1))] * n) * 1.3 - 0.1
        for kw in ({}, dict(levels=3, q_low=50, q_high=90), dict(block=8), dict(levels=1), dict(block=32, levels=7)):
            got = quality_grids(torch.from_numpy(maps), **kw)
            assert got.dtype == torch.int64
            np.testing.assert_array_equal(got.numpy(), np.stack([block_qualities(m, **kw) for m in maps]))
    ok = torch.zeros(1, 16, 16)
    for kw, match in [(dict(levels=0), "levels"), (dict(q_low=80, q_high=50), "q_low"), (dict(block=12), "block"),
                      (dict(q_high=101), "q_high"), (dict(levels=2**63), "levels")]:
        with pytest.raises(ValueError, match=match):
            quality_grids(ok, **kw)
    with pytest.raises(ValueError, match="float"):
        quality_grids(ok[0])
    with pytest.raises(ValueError, match="NaN"):
        quality_grids(ok.clone().fill_(float("nan")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_prepared_files_on_cuda_are_the_cpus():
    """On a GPU the map stage's grids, coefficients and files (flagged and stable images of the
    gated defense) are those the CPU encoder makes."""
    from transforms.defenses import apply_defense, denoise_flagged, parse_defense, prepare_requantized

    rng = np.random.default_rng(13)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)] + [
        rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)]
    maps = [rng.random(im.shape[:2]).astype(np.float32) for im in images]
    scores = {"stability": np.array([0.2, 1.0, 0.2, 0.2]), "jpeg_stability": np.array([0.9, 0.9, 0.9, 0.9]),
              "noise_level": np.array([9.0, 9.0, 1.0, 9.0])}
    spec = parse_defense("aug_msroi_gated")
    denoised = denoise_flagged([spec], images, scores, "cuda")
    prepared = prepare_requantized([spec], images, maps, scores, denoised, "cuda", entropy=True)
    assert all(d[spec.text].data is not None for d in prepared)
    # By default groups this small are left to the CPU's libjpeg: coefficients, or nothing for stable images.
    small = prepare_requantized([spec], images, maps, scores, denoised, "cuda")
    assert all(d.get(spec.text) is None or d[spec.text].data is None for d in small)
    for i, image in enumerate(images):
        hidden = {k: float(v[i]) for k, v in scores.items()}
        want = apply_defense(spec, image, saliency=maps[i], denoised=denoised[i].get(0.03), **hidden)
        assert prepared[i][spec.text].data == want.data
        if spec.text in small[i]:
            assert apply_defense(spec, image, saliency=maps[i], prepared=small[i][spec.text], **hidden).data == want.data
