"""Semantic JPEG: quality grids, one baseline file with per-block quantization, rate control."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile

import jpeglib
import numpy as np
import pytest
from PIL import Image

from transforms.images import resize_and_crop
from transforms.jpeg import decode_rgb, encode_jpeg
from transforms.semantic_jpeg import (
    block_qualities,
    encode_jpeg_max_bytes,
    encode_semantic_jpeg,
    encode_semantic_jpeg_bytes,
    ijg_tables,
    write_coefficients,
)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def _markers(data: bytes) -> set[int]:
    """Frame markers (SOFn) in the header, walking segments up to the first scan."""
    out, i = set(), 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        m = data[i + 1]
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            out.add(m)
        if m == 0xDA:
            break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return out


def _dct(data: bytes) -> jpeglib.DCTJPEG:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.jpg")
        with open(p, "wb") as f:
            f.write(data)
        j = jpeglib.read_dct(p)
        j.load()
    return j


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    import skimage.data

    return resize_and_crop(skimage.data.astronaut(), resize=256, crop=224)


@pytest.fixture(scope="module")
def blob() -> np.ndarray:
    yy, xx = np.mgrid[:224, :224]
    return np.exp(-((yy - 112.0) ** 2 + (xx - 112.0) ** 2) / (2 * 50.0**2))


# --------------------------------------------------------------------------- block_qualities


def test_value_binning():
    sal = np.zeros((32, 32))
    sal[:16, 16:] = 0.3
    sal[16:, :16] = 0.6
    sal[16:, 16:] = 1.0
    q = block_qualities(sal, levels=5, q_low=30, q_high=70)
    assert q.dtype == np.int32
    np.testing.assert_array_equal(q, [[30, 40], [60, 70]])  # levels floor(5 s): 0, 1, 3, 4
    np.testing.assert_array_equal(block_qualities(sal, levels=2, q_low=10, q_high=90), [[10, 10], [90, 90]])
    np.testing.assert_array_equal(block_qualities(sal, levels=1), np.full((2, 2), 70))
    # Mean pooling: a cell half at 1.0 and half at 0 is at 0.5.
    half = np.zeros((16, 16))
    half[:, :8] = 1.0
    np.testing.assert_array_equal(block_qualities(half, levels=5), [[50]])


def test_percentile_binning():
    sal = np.linspace(0.0, 0.2, 16 * 100).reshape(16, 100)  # small range: value binning uses one level
    q = block_qualities(sal, levels=5, binning="percentile", block=8)
    counts = np.unique(q, return_counts=True)
    assert list(counts[0]) == [30, 40, 50, 60, 70]
    assert counts[1].max() - counts[1].min() <= 2
    assert np.all(np.diff(q[0]) >= 0)  # monotone in saliency
    assert set(np.unique(block_qualities(sal, levels=5, block=8))) == {30}
    # A flat map sits in the middle level (ties share their rank), by value it is all q_low.
    np.testing.assert_array_equal(block_qualities(np.full((40, 40), 0.3), binning="percentile"), np.full((3, 3), 50))
    np.testing.assert_array_equal(block_qualities(np.zeros((40, 40))), np.full((3, 3), 30))


def test_grid_shape_and_block():
    assert block_qualities(np.random.rand(17, 33)).shape == (2, 3)
    assert block_qualities(np.random.rand(17, 33), block=8).shape == (3, 5)
    assert block_qualities(np.random.rand(5, 7)).shape == (1, 1)


@pytest.mark.parametrize(
    "kw, match",
    [({"q_low": 0}, "q_low"), ({"q_high": 101}, "q_high"), ({"q_low": 80, "q_high": 70}, "q_low"),
     ({"levels": 0}, "levels"), ({"binning": "otsu"}, "otsu"), ({"block": 12}, "block"),
     ({"q_low": 30.5}, "q_low"), ({"levels": 10**6 + 1}, "levels"), ({"levels": 2**63}, "levels")],
)
def test_block_qualities_rejects_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        block_qualities(np.zeros((16, 16)), **kw)


def test_block_qualities_rejects_bad_maps():
    with pytest.raises(ValueError, match="2-D"):
        block_qualities(np.zeros((3, 16, 16)))
    with pytest.raises(ValueError, match="NaN"):
        block_qualities(np.full((16, 16), np.nan))


# --------------------------------------------------------------------------- the encoder


def test_ijg_tables_match_libjpeg():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for q in (1, 10, 30, 50, 70, 95, 100):
        np.testing.assert_array_equal(_dct(encode_jpeg(img, q)).qt, ijg_tables(q))


def test_baseline_single_file_with_fine_tables(photo, blob):
    q = block_qualities(blob)
    data = encode_semantic_jpeg(photo, q)
    assert data[:2] == b"\xff\xd8" and _markers(data) == {0xC0}  # SOF0 only: baseline, Huffman
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.size == (224, 224) and not im.info.get("progressive")
        im.load()
    assert data.count(b"JFIF\x00") == 1
    sof = data.index(b"\xff\xc0")
    assert data[sof + 9] == 3 and [data[sof + 10 + 3 * k] for k in range(3)] == [1, 2, 3]  # JFIF ids
    sos = data.index(b"\xff\xda")
    assert [data[sos + 5 + 2 * k] for k in range(3)] == [1, 2, 3]
    j = _dct(data)
    np.testing.assert_array_equal(j.qt, ijg_tables(int(q.max())))
    # Coarse blocks really are coarse: far more zero coefficients where the grid says 30.
    y = j.Y
    q8 = np.repeat(np.repeat(q, 2, axis=0), 2, axis=1)
    assert (y[q8 == 30] == 0).mean() > (y[q8 == 70] == 0).mean() + 0.05
    assert encode_semantic_jpeg(photo, q) == data  # deterministic


def test_blocks_decode_at_their_quality(photo):
    """Left half at 70, right half at 30, and the mirror grid: each half is better where it is fine,
    and each region is about as good as a uniform JPEG at its quality."""
    left = np.full((14, 14), 30)
    left[:, :7] = 70
    a = decode_rgb(encode_semantic_jpeg(photo, left))
    b = decode_rgb(encode_semantic_jpeg(photo, 100 - left))
    L, R = np.s_[:, :112], np.s_[:, 112:]
    assert _psnr(photo[L], a[L]) > _psnr(photo[L], b[L]) + 2
    assert _psnr(photo[R], b[R]) > _psnr(photo[R], a[R]) + 2
    # Away from the seam, each region decodes like the uniform JPEG of its quality.
    u70, u30 = decode_rgb(encode_jpeg(photo, 70)), decode_rgb(encode_jpeg(photo, 30))
    inner_l, inner_r = np.s_[:, :96], np.s_[:, 128:]
    assert abs(_psnr(photo[inner_l], a[inner_l]) - _psnr(photo[inner_l], u70[inner_l])) < 0.3
    assert abs(_psnr(photo[inner_r], a[inner_r]) - _psnr(photo[inner_r], u30[inner_r])) < 0.5


def test_salient_blocks_have_higher_psnr(photo, blob):
    """Against a uniform JPEG at q_low, the salient blocks gain several dB, the background nothing."""
    q = block_qualities(blob)
    out = decode_rgb(encode_semantic_jpeg(photo, q))
    u30 = decode_rgb(encode_jpeg(photo, 30))
    qpix = np.repeat(np.repeat(q, 16, axis=0), 16, axis=1)
    sal, bg = qpix == 70, qpix == 30
    assert _psnr(photo[sal], out[sal]) > _psnr(photo[sal], u30[sal]) + 2
    assert abs(_psnr(photo[bg], out[bg]) - _psnr(photo[bg], u30[bg])) < 0.5


def test_size_between_uniform_low_and_high(photo, blob):
    """Smaller than uniform q_high, larger than uniform q_low: with the same (optimized) Huffman
    coding and with Pillow's standard tables (``transforms.jpeg.encode_jpeg``)."""
    n = len(encode_semantic_jpeg(photo, block_qualities(blob, q_low=30, q_high=70)))
    assert len(_uniform(photo, 30)) < n < len(_uniform(photo, 70))
    assert len(encode_jpeg(photo, 30)) < n < len(encode_jpeg(photo, 70))


def _uniform(image, q):
    from transforms.jpeg import encode_jpeg

    return encode_jpeg(image, q, "4:2:0", optimize=True)


def test_requantize_smaller_than_mosaic(blob):
    """Same grid, five photos: requantize is smaller (by ~0.5-1%) and at least as good in PSNR.
    The mosaic quantizes coarse blocks twice (and re-subsamples decoded chroma)."""
    import skimage.data

    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = resize_and_crop(img, resize=256, crop=224)
        q = block_qualities(blob)
        r = encode_semantic_jpeg(img, q)
        m = encode_semantic_jpeg(img, q, method="mosaic")
        assert _markers(m) == {0xC0}
        assert len(r) < len(m), name
        assert _psnr(img, decode_rgb(r)) > _psnr(img, decode_rgb(m)) - 0.02, name


def test_same_pixels_with_djpeg(photo, blob):
    djpeg = shutil.which("djpeg")
    if djpeg is None:
        pytest.skip("djpeg not installed (Debian: apt-get install libjpeg-turbo-progs)")
    for q in (block_qualities(blob), block_qualities(blob, q_low=5, q_high=95, levels=3)):
        data = encode_semantic_jpeg(photo, q)
        ppm = subprocess.run([djpeg, "-ppm"], input=data, capture_output=True, check=True).stdout
        with Image.open(io.BytesIO(ppm)) as im:
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), decode_rgb(data))


@pytest.mark.parametrize("method", ["requantize", "mosaic"])
@pytest.mark.parametrize("subsampling", ["4:2:0", "4:2:2", "4:4:4"])
@pytest.mark.parametrize("size", [(17, 33), (5, 7), (1, 1), (16, 16), (40, 24), (33, 17)])
def test_edge_sizes(method, subsampling, size):
    rng = np.random.default_rng(size[0] * 100 + size[1])
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    sal = rng.random(size)
    for block in (8, 16):
        q = block_qualities(sal, block=block, q_low=20, q_high=80)
        data = encode_semantic_jpeg(img, q, method=method, subsampling=subsampling, block=block)
        assert _markers(data) == {0xC0}
        assert decode_rgb(data).shape == (*size, 3)
    # Inferred block size.
    assert decode_rgb(encode_semantic_jpeg(img, block_qualities(sal), method=method)).shape == (*size, 3)


@pytest.mark.parametrize("method", ["requantize", "mosaic"])
def test_flat_and_gray_images(method):
    flat = np.full((48, 40, 3), 128, dtype=np.uint8)
    data = encode_semantic_jpeg(flat, block_qualities(np.zeros((48, 40))), method=method)
    assert np.abs(decode_rgb(data).astype(int) - 128).max() <= 1
    import skimage.data

    gray = resize_and_crop(np.repeat(skimage.data.camera()[:, :, None], 3, axis=2), resize=72, crop=64)
    out = decode_rgb(encode_semantic_jpeg(gray, block_qualities(np.random.default_rng(0).random((64, 64)))))
    assert out.shape == (64, 64, 3) and _psnr(gray, out) > 25


def test_encoder_leaves_input_untouched(photo, blob):
    before = photo.copy()
    q = block_qualities(blob)
    qb = q.copy()
    encode_semantic_jpeg(photo, q)
    encode_semantic_jpeg(photo, q, method="mosaic")
    assert np.array_equal(photo, before) and np.array_equal(q, qb)


@pytest.mark.parametrize(
    "kw, match",
    [({"qualities": np.zeros((14, 14), dtype=int)}, "1..100"), ({"qualities": np.full((14, 14), 101)}, "1..100"),
     ({"qualities": np.full((14, 14), 50.0)}, "integer"), ({"qualities": np.full((13, 14), 50)}, "shape"),
     ({"method": "magic"}, "magic"), ({"subsampling": "4:1:1"}, "4:1:1"), ({"block": 12}, "block"),
     ({"qualities": np.full((28, 28), 50), "block": 16}, "does not match")],
)
def test_encoder_rejects_bad_parameters(photo, kw, match):
    args = {"qualities": np.full((14, 14), 50), **kw}
    q = args.pop("qualities")
    with pytest.raises(ValueError, match=match):
        encode_semantic_jpeg(photo, q, **args)


def test_encoder_rejects_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        encode_semantic_jpeg(np.zeros((16, 16, 3), dtype=np.float32), np.full((1, 1), 50))
    with pytest.raises(ValueError, match="uint8"):
        encode_semantic_jpeg(np.zeros((16, 16), dtype=np.uint8), np.full((1, 1), 50))
    with pytest.raises(ValueError, match="65500"):  # libjpeg's limit, not an OSError from deep inside
        encode_semantic_jpeg(np.zeros((8, 65501, 3), dtype=np.uint8), np.full((1, 4094), 50), block=16)
    with pytest.raises(ValueError, match="65500"):
        encode_jpeg(np.zeros((65501, 8, 3), dtype=np.uint8), 75)
    with pytest.raises(ValueError, match="65500"):
        write_coefficients([np.zeros((1, 8188, 8, 8), np.int16)] * 3, np.ones((2, 8, 8), np.int16), subsampling="4:4:4",
                           height=8, width=65501)
    ac = np.zeros((1, 1, 8, 8), np.int16)
    ac[0, 0, 3, 1] = -1024  # a valid DC value, but outside an AC coefficient's size category 10
    with pytest.raises(ValueError, match="range"):  # not libjpeg's OSError
        write_coefficients([ac, ac * 0, ac * 0], np.ones((2, 8, 8), np.int16), subsampling="4:4:4", height=8, width=8)


# --------------------------------------------------------------------------- rate control


def test_encode_jpeg_max_bytes(photo):
    sizes = {q: len(_uniform(photo, q)) for q in range(1, 101)}
    target = sizes[57] + 10
    data, q = encode_jpeg_max_bytes(photo, target)
    assert len(data) <= target and data == _uniform(photo, q)
    assert all(s > target for qq, s in sizes.items() if qq > q)
    data, q = encode_jpeg_max_bytes(photo, 10)  # impossible: quality 1, larger than asked
    assert q == 1 and len(data) == sizes[1] > 10
    assert encode_jpeg_max_bytes(photo, 10**9)[1] == 100
    plain, q = encode_jpeg_max_bytes(photo, target, optimize=False)
    assert plain == encode_jpeg(photo, q)
    with pytest.raises(ValueError, match="max_bytes"):
        encode_jpeg_max_bytes(photo, 0)


@pytest.mark.parametrize("method", ["requantize", "mosaic"])
def test_encode_semantic_jpeg_bytes(photo, blob, method):
    target = 6000
    res = encode_semantic_jpeg_bytes(photo, blob, max_bytes=target, method=method)
    assert len(res.data) <= target and res.q_low == max(1, res.q_high - 40)
    nxt = encode_semantic_jpeg(photo, block_qualities(blob, q_low=max(1, res.q_high - 39), q_high=res.q_high + 1),
                               method=method)
    assert len(nxt) > target
    assert res.data == encode_semantic_jpeg(photo, block_qualities(blob, q_low=res.q_low, q_high=res.q_high),
                                            method=method)
    tiny = encode_semantic_jpeg_bytes(photo, blob, max_bytes=100, method=method)
    assert (tiny.q_low, tiny.q_high) == (1, 1) and len(tiny.data) > 100
    with pytest.raises(ValueError, match="saliency shape"):
        encode_semantic_jpeg_bytes(photo, blob[:100], max_bytes=target)
    with pytest.raises(ValueError, match="levels"):
        encode_semantic_jpeg_bytes(photo, blob, max_bytes=target, levels=0)


def test_turbo_writer_writes_libjpeg_6bs_bytes(photo, monkeypatch):
    """The files are written with libjpeg-turbo (faster); jpeglib's default libjpeg 6b writes the
    same bytes, on every subsampling, at odd sizes and on flat images."""
    from transforms import semantic_jpeg

    rng = np.random.default_rng(7)
    cases = [(photo, rng.random((224, 224)))] + [
        (rng.integers(0, 256, (*size, 3), dtype=np.uint8), rng.random(size))
        for size in [(1, 1), (9, 300), (37, 53), (100, 61)]] + [(np.full((40, 40, 3), 9, np.uint8), np.zeros((40, 40)))]

    def files():
        return [encode_semantic_jpeg(img, block_qualities(sal, q_low=20, q_high=90), subsampling=s)
                for img, sal in cases for s in ("4:2:0", "4:2:2", "4:4:4")]

    turbo = files()
    assert jpeglib.version.get() == semantic_jpeg._WRITER_LIBJPEG
    monkeypatch.setattr(semantic_jpeg, "_WRITER_LIBJPEG", "6b")
    old = files()
    assert jpeglib.version.get() == "6b"
    assert old == turbo
    monkeypatch.undo()
    encode_semantic_jpeg(photo, block_qualities(cases[0][1]))
    assert jpeglib.version.get() == semantic_jpeg._WRITER_LIBJPEG
