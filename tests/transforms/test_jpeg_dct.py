"""libjpeg's forward path in numpy against libjpeg itself: the same quality-100 coefficients."""
from __future__ import annotations

import os
import tempfile

import jpeglib
import numpy as np
import pytest

from transforms.jpeg import encode_jpeg
from transforms.jpeg_dct import SAMPLING, source_coefficients

SUBSAMPLINGS = list(SAMPLING)


def _libjpeg(image: np.ndarray, subsampling: str) -> list[np.ndarray]:
    """The oracle: Pillow (libjpeg-turbo) encodes at quality 100, jpeglib reads the blocks back."""
    fd, path = tempfile.mkstemp(suffix=".jpg")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_jpeg(image, 100, subsampling))
        jpeg = jpeglib.read_dct(path)
        jpeg.load()
        assert all(int(q) == 1 for q in np.unique(jpeg.qt))  # quality 100: every step 1
        return [jpeg.Y, jpeg.Cb, jpeg.Cr]
    finally:
        os.remove(path)


def _assert_same(image: np.ndarray, subsampling: str) -> None:
    ours = source_coefficients(image, subsampling)
    ref = _libjpeg(image, subsampling)
    for name, a, b in zip("Y Cb Cr".split(), ours, ref):
        assert a.dtype == np.int16 and a.shape == b.shape, (name, a.shape, b.shape)
        bad = np.argwhere(a != b)
        assert bad.size == 0, f"{name} {image.shape} {subsampling}: {len(bad)} coefficients differ, first {bad[0]}"


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS)
def test_real_photos_at_native_size(photos, subsampling):
    import skimage.data

    # The fixture's 64x64 crops, and two whole photographs at sizes that are not multiples of 16.
    images = list(photos) + [skimage.data.chelsea()[:300, :451], skimage.data.coffee()[:393, :599]]
    for image in images:
        _assert_same(np.ascontiguousarray(image), subsampling)


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS)
@pytest.mark.parametrize("size", [(1, 1), (1, 9), (7, 3), (8, 8), (9, 17), (15, 16), (16, 15), (17, 17), (33, 1)])
def test_edges_padding_and_extremes(subsampling, size):
    rng = np.random.default_rng(sum(size))
    noise = rng.integers(0, 256, (*size, 3), dtype=np.uint8)  # every rounding path, full range
    _assert_same(noise, subsampling)
    for colour in ([0, 0, 0], [255, 255, 255], [255, 0, 128]):  # the fixed-point limits
        _assert_same(np.full((*size, 3), colour, dtype=np.uint8), subsampling)
    # A sharp edge in the last row and column: padding replicates it, it is not zero-filled.
    edge = noise.copy()
    edge[-1], edge[:, -1] = 255, 0
    _assert_same(edge, subsampling)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="subsampling"):
        source_coefficients(np.zeros((8, 8, 3), np.uint8), "4:1:1")
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match="uint8 HxWx3"):
            source_coefficients(bad)
