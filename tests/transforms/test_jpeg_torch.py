"""The torch JPEG round trip against libjpeg-turbo itself: the same decoded pixels, byte for byte."""
from __future__ import annotations

import os
import tempfile

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
def test_cuda_matches_cpu(photos):
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2)
    for subsampling in SUBSAMPLINGS:
        torch.testing.assert_close(jpeg_roundtrip(x.cuda(), 50, subsampling).cpu(), jpeg_roundtrip(x, 50, subsampling),
                                   rtol=0, atol=0)


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


def test_reciprocal_quantization_is_rounding_division():
    # jcdctmgr.c's reciprocals, for every divisor a baseline table gives (8 x 1..255) and every
    # magnitude islow's output reaches (below 2**14): the same as rounding division.
    from transforms.jpeg_torch import _reciprocal

    m = np.arange(1 << 14, dtype=np.int64)
    for d in range(8, 8 * 256, 8):
        recip, corr, shift = _reciprocal(d)
        assert np.array_equal(((m + corr) * recip) >> shift, (m + d // 2) // d), d
