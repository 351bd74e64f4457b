"""Semantic JPEG: one standard baseline JPEG whose quantization varies by block with a saliency map.

Prakash, Moran, Garber, DiLillo & Storer, "Semantic Perceptual Image Compression using Deep
Convolution Networks", DCC 2017 (MSROI), and "Protecting JPEG Images Against Adversarial
Attacks", DCC 2018 (the same encoder driven by Aug-MSROI maps, as a defense).

Codec contract: uint8 HxWx3 RGB arrays in, JPEG ``bytes`` out. The saliency map is float (H, W)
in [0, 1] (see :mod:`transforms.saliency`); qualities are IJG quality factors 1..100.

Two encoders (:data:`METHODS`):

* ``requantize`` (default): real per-block quantization inside one baseline file (SOF0, Huffman
  coded, no progressive scans, no custom decoder needed). The file carries the quantization tables
  of the finest quality present; a block meant for a coarser quality q_b gets its coefficients
  quantized with q_b's step and written back as the nearest multiple of the file's step, so it
  decodes as the coarse block would and costs fewer bits (many coefficients become zero).
* ``mosaic``: the authors' method: uniform JPEGs at each quality, decoded, their pixels put together
  block by block, and the mosaic re-encoded once at the finest quality present.

Both write optimized Huffman tables (smaller, still baseline); :func:`encode_jpeg_max_bytes`, the
rate-matched uniform baseline, does too, so rate comparisons are about where the bits go.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Literal, NamedTuple

import jpeglib
import numpy as np

from .jpeg import SUBSAMPLING, Subsampling, check_jpeg_size, decode_rgb, encode_jpeg
from .jpeg_dct import SAMPLING, source_coefficients

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "BINNINGS",
    "MAX_LEVELS",
    "SemanticEncoded",
    "block_qualities",
    "encode_semantic_jpeg",
    "encode_semantic_jpeg_bytes",
    "encode_jpeg_max_bytes",
    "write_coefficients",
    "ijg_tables",
]

Method = Literal["requantize", "mosaic"]
Binning = Literal["value", "percentile"]

#: The block of the quality grid: the 4:2:0 MCU, so luma and chroma blocks agree on a quality.
DEFAULT_BLOCK = 16

# ITU-T T.81 Annex K tables in natural (row-major) order, as libjpeg scales them.
_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.int64).reshape(8, 8)
_CHROMA = np.full((8, 8), 99, dtype=np.int64)
_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

# --------------------------------------------------------------------------- validation


def _check_quality(name: str, q) -> int:
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= int(q) <= 100:
        raise ValueError(f"{name} must be an integer JPEG quality in 1..100, got {q!r}")
    return int(q)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got {got}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image has no pixels ({image.shape[0]}x{image.shape[1]})")
    check_jpeg_size(*image.shape[:2])


#: The most levels a quality grid is binned into. More resolve nothing a JPEG can use (its
#: qualities are 100 integers), and the bins are float64 arithmetic on means rounded to 9 decimals:
#: from about 10**8 levels a mean on a bin's edge falls out of its bin, and from 2**63 the int64
#: levels overflowed (a grid at qualities outside q_low..q_high, and no error).
MAX_LEVELS = 10**6


def _check_levels(levels) -> int:
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be an integer in 1..{MAX_LEVELS}, got {levels!r}")
    return int(levels)


def _check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 8 or block % 8:
        raise ValueError(f"block must be a positive multiple of 8 (JPEG blocks are 8x8), got {block!r}")
    return int(block)


def _check_subsampling(subsampling: str) -> None:
    if subsampling not in SUBSAMPLING:
        raise ValueError(f"subsampling must be one of {', '.join(SUBSAMPLING)}, got {subsampling!r}")


def _grid_shape(h: int, w: int, block: int) -> tuple[int, int]:
    return -(-h // block), -(-w // block)


def _check_grid(qualities: np.ndarray, h: int, w: int, block: int | None) -> tuple[np.ndarray, int]:
    """Validate a quality grid for an HxW image; infer ``block`` (smallest multiple of 8 that fits)."""
    q = np.asarray(qualities)
    if q.ndim != 2 or not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"qualities must be a 2-D integer array, got {q.dtype} {q.shape}")
    if q.size == 0 or q.min() < 1 or q.max() > 100:
        lo, hi = (q.min(), q.max()) if q.size else ("-", "-")
        raise ValueError(f"qualities must be JPEG qualities in 1..100, got range {lo}..{hi}")
    if block is None:
        for b in range(8, 8 * max(h, w, 1) + 8, 8):
            if _grid_shape(h, w, b) == q.shape:
                block = b
                break
        else:
            raise ValueError(f"qualities shape {q.shape} fits no block grid of a {h}x{w} image")
    block = _check_block(block)
    if q.shape != _grid_shape(h, w, block):
        raise ValueError(
            f"qualities shape {q.shape} does not match the {block}x{block} block grid of a {h}x{w} image "
            f"(expected {_grid_shape(h, w, block)})"
        )
    return q.astype(np.int64), block


# --------------------------------------------------------------------------- quality grid


def ijg_tables(quality: int) -> np.ndarray:
    """The IJG (libjpeg ``jpeg_set_quality``, baseline) tables at ``quality``: uint16 (2, 8, 8),
    luma then chroma, natural order. What Pillow and libjpeg-turbo write."""
    q = _check_quality("quality", quality)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    t = (np.stack([_LUMA, _CHROMA]) * scale + 50) // 100
    return np.clip(t, 1, 255).astype(np.uint16)


@functools.lru_cache(maxsize=100)
def _float_tables(quality: int) -> np.ndarray:
    """:func:`ijg_tables` as float64, computed once per quality (read-only: shared)."""
    t = ijg_tables(quality).astype(np.float64)
    t.flags.writeable = False
    return t


def _pool_mean(sal: np.ndarray, block: int) -> np.ndarray:
    """Mean of each block x block cell (edge cells: over the pixels they have)."""
    h, w = sal.shape
    gh, gw = _grid_shape(h, w, block)
    if (h, w) == (gh * block, gw * block):
        pad = sal
    else:
        pad = np.zeros((gh * block, gw * block), dtype=np.float64)
        pad[:h, :w] = sal
    # Along rows first (contiguous), then down the columns: half the time of one reduction over
    # both axes (the grids are the same: rounded below).
    s = pad.reshape(gh * block, gw, block).sum(axis=-1).reshape(gh, block, gw).sum(axis=-2)
    c = np.minimum(h - np.arange(gh) * block, block)[:, None] * np.minimum(w - np.arange(gw) * block, block)[None]
    # Rounded so that equal maps pool to equal values whatever the summation order, practically
    # (ties stay ties; only a mean within float error of a 9-decimal boundary could still differ).
    return np.round(s / c, 9)


def _bin_value(pooled: np.ndarray, levels: int) -> np.ndarray:
    # The epsilon keeps a cell of exactly 0.6 in the bin that starts at 0.6 (0.6 * 5 < 3 in floats).
    return np.minimum(np.floor(np.clip(pooled, 0.0, 1.0) * levels + 1e-9), levels - 1).astype(np.int64)


def _bin_percentile(pooled: np.ndarray, levels: int) -> np.ndarray:
    # Mid-rank percentiles: ties share their average rank, so a flat map sits in the middle level.
    flat = pooled.ravel()
    uniq, inv, counts = np.unique(flat, return_inverse=True, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)[:-1]])
    p = (below[inv] + counts[inv] / 2.0) / flat.size
    return np.minimum(np.floor(p * levels), levels - 1).astype(np.int64).reshape(pooled.shape)


#: How pooled saliency becomes a level 0..K-1: by value (K equal bins of [0, 1]) or by rank.
BINNINGS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "value": _bin_value,
    "percentile": _bin_percentile,
}


def block_qualities(
    saliency: np.ndarray,
    *,
    levels: int = 5,
    q_low: int = 30,
    q_high: int = 70,
    binning: Binning = "value",
    block: int = DEFAULT_BLOCK,
) -> np.ndarray:
    """Per-block JPEG qualities from a saliency map (Prakash et al., DCC 2017).

    The map is mean-pooled over ``block`` x ``block`` cells (default 16: the 4:2:0 MCU, one chroma
    block per cell, so luma and chroma agree), binned into ``levels`` K levels and mapped linearly
    onto ``q_low`` .. ``q_high``: level k gets ``round(q_low + k (q_high - q_low) / (K - 1))``
    (K = 1: everything at ``q_high``; K at most :data:`MAX_LEVELS`).

    Binning ``value``: K equal bins of [0, 1] (values outside are clipped), so the absolute
    saliency decides, and a flat map of zeros is all ``q_low``. ``percentile``: by the cell's
    mid-rank percentile among the cells, so each level gets about 1/K of the image whatever the
    map's range; ties share a rank (a flat map lands in the middle level).

    Args:
        saliency: float (H, W) in [0, 1].

    Returns:
        int32 (ceil(H / block), ceil(W / block)).
    """
    levels = _check_levels(levels)
    q_low = _check_quality("q_low", q_low)
    q_high = _check_quality("q_high", q_high)
    if q_low > q_high:
        raise ValueError(f"q_low must be <= q_high, got q_low={q_low}, q_high={q_high}")
    if binning not in BINNINGS:
        raise ValueError(f"unknown binning {binning!r}; valid: {', '.join(BINNINGS)}")
    block = _check_block(block)
    sal = np.asarray(saliency, dtype=np.float64)
    if sal.ndim != 2 or sal.size == 0:
        raise ValueError(f"saliency must be a non-empty 2-D (H, W) map, got shape {sal.shape}")
    if not np.isfinite(sal).all():
        raise ValueError("saliency has NaN or infinite values")
    level = BINNINGS[binning](_pool_mean(sal, block), int(levels))
    if levels == 1:
        return np.full(level.shape, q_high, dtype=np.int32)
    q = np.rint(q_low + level * (q_high - q_low) / (levels - 1))
    return q.astype(np.int32)


# --------------------------------------------------------------------------- requantize


#: jpeglib reads and writes files only; a RAM-backed folder when there is one (removing folders on
#: some container filesystems costs milliseconds, more than the coding itself).
_TMPDIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextlib.contextmanager
def _tmp_path(suffix: str):
    fd, path = tempfile.mkstemp(prefix="semjpeg-", suffix=suffix, dir=_TMPDIR)
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


#: The quantization table of Y, Cb and Cr: luma, then chroma for both.
_TABLES = (0, 1, 1)
#: The libjpeg jpeglib writes with. Its default is the IJG's libjpeg 6b; libjpeg-turbo 2.1 writes
#: the same bytes (the same markers and optimal Huffman tables; checked on every subsampling and
#: odd sizes in tests/transforms/test_semantic_jpeg.py) about 13% faster per semantic JPEG here.
_WRITER_LIBJPEG = "turbo210"


@functools.lru_cache(maxsize=8)
def _loadable(version: str) -> bool:
    try:
        jpeglib.version.set(version)
        return True
    except (RuntimeError, NotImplementedError) as e:
        log.warning("jpeglib cannot load libjpeg %s (%s): writing with the one it has loaded", version, e)
        return False


def _use_writer_libjpeg() -> None:
    """Select :data:`_WRITER_LIBJPEG` in jpeglib (a process-wide setting, jpeglib's only kind)
    unless it is already selected; where jpeglib lacks it, leave jpeglib's choice."""
    if jpeglib.version.get() != _WRITER_LIBJPEG and _loadable(_WRITER_LIBJPEG):
        jpeglib.version.set(_WRITER_LIBJPEG)


def _write_dct(comps: list[np.ndarray], qt: np.ndarray, samp: np.ndarray, height: int, width: int) -> bytes:
    """A baseline JPEG of the given Y, Cb, Cr coefficient blocks, luma/chroma tables ``qt`` and
    (v, h) sampling factors, for an image of ``height`` x ``width`` pixels. A new jpeglib object
    (no source file): jpeglib would otherwise decode its source again before writing."""
    _use_writer_libjpeg()
    jpeg = jpeglib.from_dct(*comps, qt=qt)
    jpeg.quant_tbl_no = np.array(_TABLES)
    jpeg.samp_factor = samp
    jpeg.height, jpeg.width = int(height), int(width)  # from_dct infers whole blocks
    with _tmp_path(".jpg") as path:
        # Baseline sequential (no PROGRESSIVE_MODE), optimized Huffman tables.
        jpeg.write_dct(path, flags=["+OPTIMIZE_CODING", "-PROGRESSIVE_MODE"])
        with open(path, "rb") as f:
            return _jfif_component_ids(f.read())


def write_coefficients(coefficients, tables: np.ndarray, *, subsampling: Subsampling, height: int,
                       width: int) -> bytes:
    """A baseline JPEG (SOF0, optimized Huffman tables) of an ``height`` x ``width`` image from its
    quantized coefficients: what :func:`encode_semantic_jpeg` writes after its requantization,
    given the coefficients :func:`transforms.jpeg_torch.requantized_coefficients` computes (on a
    device, for a batch).

    Args:
        coefficients: [Y, Cb, Cr], integer (height_in_blocks, width_in_blocks, 8, 8) each, the
            component's block counts for the image's size and ``subsampling``; values in -1024..1023,
            AC in -1023..1023 (what the encoder writes is in -1023..1023).
        tables: integer (2, 8, 8), the luma and chroma steps in 1..255.
    """
    _check_subsampling(subsampling)
    samp = SAMPLING[subsampling]
    vmax, hmax = max(v for v, _ in samp), max(s for _, s in samp)
    check_jpeg_size(height, width)
    if len(coefficients) != 3:
        raise ValueError(f"expected 3 components (Y, Cb, Cr), got {len(coefficients)}")
    comps = []
    for c, (v, hs) in zip(coefficients, samp):
        c = np.asarray(c)
        want = (-(-int(height) * v // (vmax * 8)), -(-int(width) * hs // (hmax * 8)), 8, 8)
        if c.shape != want or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"component coefficients must be integer {want} for a {height}x{width} image under "
                             f"{subsampling}, got {c.dtype} {c.shape}")
        # DC -1024..1023; AC (every entry but [0, 0]) -1023..1023, size category 10 (jchuff.c), as
        # jpeg_entropy checks them.
        lo, hi = (int(c.min()), int(c.max())) if c.size else (0, 0)
        ac_too_low = lo == -1024 and min(int(c[..., 0, 1:].min()), int(c[..., 1:, :].min())) == -1024
        if lo < -1024 or hi > 1023 or ac_too_low:
            raise ValueError("coefficients outside baseline JPEG's range")
        comps.append(np.ascontiguousarray(c, dtype=np.int16))  # jpeglib takes no strided views
    qt = np.asarray(tables)
    if qt.shape != (2, 8, 8) or not np.issubdtype(qt.dtype, np.integer) or qt.min() < 1 or qt.max() > 255:
        raise ValueError(f"tables must be integer (2, 8, 8) steps in 1..255, got {qt.dtype} {qt.shape}")
    return _write_dct(comps, qt.astype(np.uint16), np.asarray(samp, dtype=np.int32), int(height), int(width))


def _jfif_component_ids(data: bytes) -> bytes:
    """Renumber components 0, 1, 2 (what jpeglib writes) to JFIF's 1, 2, 3 in the frame and scan
    headers. libjpeg accepts either; the JFIF spec and some strict decoders want 1, 2, 3."""
    out = bytearray(data)
    i = 2
    while i + 4 <= len(out) and out[i] == 0xFF:
        marker = out[i + 1]
        length = int.from_bytes(out[i + 2 : i + 4], "big")
        if marker == 0xC0:  # SOF0: P, Y, X, Nf, then (id, sampling, table) per component
            n = out[i + 9]
            ids = [out[i + 10 + 3 * k] for k in range(n)]
            if ids != list(range(n)):
                return data
            for k in range(n):
                out[i + 10 + 3 * k] += 1
        elif marker == 0xDA:  # SOS: Ns, then (id, tables) per component
            for k in range(out[i + 4]):
                out[i + 5 + 2 * k] += 1
            return bytes(out)
        i += 2 + length
    return data


def _component_grid(q8: np.ndarray, fy: int, fx: int, shape: tuple[int, int]) -> np.ndarray:
    """Quality of each block of a component subsampled by (fy, fx): the finest quality among the
    8x8 luma cells it covers, cropped or edge-padded to the component's block array."""
    ph, pw = -q8.shape[0] % fy, -q8.shape[1] % fx
    g = np.pad(q8, ((0, ph), (0, pw))) if ph or pw else q8  # zero pad: below every quality, max ignores it
    if (fy, fx) != (1, 1):
        g = g.reshape(g.shape[0] // fy, fy, g.shape[1] // fx, fx).max(axis=(1, 3))
    bh, bw = shape
    if g.shape[0] < bh or g.shape[1] < bw:
        g = np.pad(g, ((0, max(0, bh - g.shape[0])), (0, max(0, bw - g.shape[1]))), mode="edge")
    return g[:bh, :bw]


class _Coefficients:
    """An image's quantized DCT coefficients, read once; :meth:`encode` writes any quality grid."""

    def __init__(self, image: np.ndarray, subsampling: Subsampling):
        self.h, self.w = image.shape[:2]
        # libjpeg's quality-100 coefficients (every step 1), computed in numpy (jpeg_dct).
        self.comps = [c.astype(np.float64) for c in source_coefficients(image, subsampling)]
        self.tables = _TABLES
        self.samp = np.asarray(SAMPLING[subsampling], dtype=np.int32)  # (v, h) per component

    def encode(self, qualities: np.ndarray, block: int) -> bytes:
        r = block // 8
        q8 = np.repeat(np.repeat(qualities, r, axis=0), r, axis=1)
        q8 = q8[: -(-self.h // 8), : -(-self.w // 8)]
        levels = np.unique(q8)
        steps = {int(q): _float_tables(int(q)) for q in levels}
        q_hi = int(levels[-1])
        vmax, hmax = self.samp[:, 0].max(), self.samp[:, 1].max()
        out = []
        for c, coef in enumerate(self.comps):
            v, hf = self.samp[c]
            grid = _component_grid(q8, int(vmax // v), int(hmax // hf), coef.shape[:2])
            table = self.tables[c]
            stack = np.stack([steps[int(q)][table] for q in levels])  # (L, 8, 8)
            q_b = stack[np.searchsorted(levels, grid)]  # (bh, bw, 8, 8)
            q_file = steps[q_hi][table]
            # The coarse step's reconstruction, written as the nearest multiple of the file's step.
            coarse = np.rint(coef / q_b) * q_b
            new = np.rint(coarse / q_file)
            # Baseline ranges: AC magnitude category <= 10; the DC is clipped alike (a black
            # block's -1024 is written as -1023), as jpeg_torch.requantized_coefficients does.
            new = np.clip(new, -1023, 1023)
            out.append(new.astype(np.int16))
        qt = np.stack([steps[q_hi][0], steps[q_hi][1]]).astype(np.uint16)
        return _write_dct(out, qt, self.samp, self.h, self.w)


# --------------------------------------------------------------------------- mosaic


class _Mosaic:
    """Decoded uniform JPEGs of one image, one per quality, cached; :meth:`encode` mosaics them."""

    def __init__(self, image: np.ndarray, subsampling: Subsampling):
        self.image = image
        self.subsampling = subsampling
        self.decoded: dict[int, np.ndarray] = {}

    def encode(self, qualities: np.ndarray, block: int) -> bytes:
        h, w = self.image.shape[:2]
        qpix = np.repeat(np.repeat(qualities, block, axis=0), block, axis=1)[:h, :w]
        out = np.empty_like(self.image)
        for q in np.unique(qpix):
            q = int(q)
            if q not in self.decoded:
                self.decoded[q] = decode_rgb(encode_jpeg(self.image, q, self.subsampling))
            mask = qpix == q
            out[mask] = self.decoded[q][mask]
        return encode_jpeg(out, int(qualities.max()), self.subsampling, optimize=True)


#: Per-block variable-quality encoders: name -> factory(image, subsampling) with ``.encode``.
METHODS: dict[str, Callable[[np.ndarray, Subsampling], object]] = {
    "requantize": _Coefficients,
    "mosaic": _Mosaic,
}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def encode_semantic_jpeg(
    image: np.ndarray,
    qualities: np.ndarray,
    *,
    method: Method = "requantize",
    subsampling: Subsampling = "4:2:0",
    block: int | None = None,
) -> bytes:
    """Encode one baseline JPEG whose quality varies by block (Prakash et al., DCC 2017 / 2018).

    ``requantize``: the image is DCT-coded once at quality 100 (all steps 1, so the coefficients
    are the rounded DCT; computed in numpy exactly as libjpeg-turbo computes them, see
    :mod:`transforms.jpeg_dct`), then each block's coefficients ``c`` are quantized with its quality's
    IJG step ``Q_b`` and written in the file's single table ``Q_hi`` (that of the finest quality
    present): ``round(round(c / Q_b) * Q_b / Q_hi)``. Blocks at the finest quality are a standard
    JPEG at that quality (up to the DCT's rounding to integers); coarser ones decode to their coarse
    reconstruction (to within half a ``Q_hi`` step) and cost fewer bits. Quantizing from the
    quality-100 coefficients rather than from those at ``Q_hi`` (requantizing twice) gave smaller
    files at higher PSNR on dev photos (224x224, K = 5, 30..70: 6.34 kB at 30.0 dB against 6.57 kB
    at 29.5 dB). A chroma block takes the finest quality of the cells
    it covers (under 4:2:0 with ``block=16`` each chroma block is exactly one cell). Written with
    jpeglib as baseline sequential (SOF0) with optimized Huffman tables, which were smaller on
    every image tried than the standard ones: any JPEG decoder reads it.

    ``mosaic`` (the authors' method): each distinct quality's uniform JPEG is decoded, the pixels
    are taken block by block from the one the grid names, and the mosaic is re-encoded once at the
    finest quality present (optimized Huffman). The re-encoding quantizes the coarse blocks a
    second time and re-subsamples decoded chroma; on 224x224 photos it came out 0.5-1% larger than
    ``requantize`` for the same grid, at equal or slightly lower PSNR, and it is slower.

    Args:
        image: uint8 (H, W, 3) RGB, any size (edge blocks are padded by the codec).
        qualities: integer (ceil(H / block), ceil(W / block)) qualities in 1..100, e.g. from
            :func:`block_qualities`.
        block: the grid's cell size, a multiple of 8; ``None`` infers the smallest that fits.

    Returns:
        JPEG bytes that decode to (H, W, 3).
    """
    _check_image(image)
    _check_method(method)
    _check_subsampling(subsampling)
    q, block = _check_grid(qualities, image.shape[0], image.shape[1], block)
    return METHODS[method](np.ascontiguousarray(image), subsampling).encode(q, block)


# --------------------------------------------------------------------------- rate control


class SemanticEncoded(NamedTuple):
    """A rate-controlled semantic JPEG: the bytes and the quality range that produced them."""

    data: bytes
    q_low: int
    q_high: int


def _largest_fitting(size_of: Callable[[int], int], max_bytes: int) -> int:
    """Largest q in 1..100 with ``size_of(q) <= max_bytes`` by bisection (sizes grow with q);
    1 when nothing fits."""
    lo, hi = 1, 100
    if size_of(hi) <= max_bytes:
        return hi
    while hi - lo > 1:  # invariant: size(hi) > max_bytes; lo fits or lo == 1
        mid = (lo + hi) // 2
        if size_of(mid) <= max_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def encode_semantic_jpeg_bytes(
    image: np.ndarray,
    saliency: np.ndarray,
    *,
    max_bytes: int,
    levels: int = 5,
    spread: int = 40,
    binning: Binning = "value",
    method: Method = "requantize",
    subsampling: Subsampling = "4:2:0",
    block: int = DEFAULT_BLOCK,
) -> SemanticEncoded:
    """The semantic JPEG with the highest quality window that fits in ``max_bytes``.

    The window keeps its width: ``q_low = max(1, q_high - spread)``; ``q_high`` is bisected over
    1..100 (about 7 encodes; with ``requantize`` the DCT is computed once and only the entropy
    coding repeats). When even ``q_high = 1`` (every block at quality 1) is larger than
    ``max_bytes`` -- a header alone is about 600 bytes -- that smallest file is returned anyway;
    check ``len(result.data)``.
    """
    _check_image(image)
    _check_method(method)
    _check_subsampling(subsampling)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    if isinstance(spread, bool) or not isinstance(spread, (int, np.integer)) or not 0 <= spread <= 99:
        raise ValueError(f"spread must be an integer in 0..99, got {spread!r}")
    sal = np.asarray(saliency)
    if sal.shape != image.shape[:2]:
        raise ValueError(f"saliency shape {sal.shape} does not match the image's {image.shape[:2]}")
    block_qualities(sal, levels=levels, q_low=1, q_high=1, binning=binning, block=block)  # validate
    encoder = METHODS[method](np.ascontiguousarray(image), subsampling)
    cache: dict[int, bytes] = {}

    def size_of(q_high: int) -> int:
        if q_high not in cache:
            grid = block_qualities(sal, levels=levels, q_low=max(1, q_high - spread), q_high=q_high,
                                   binning=binning, block=block)
            cache[q_high] = encoder.encode(grid.astype(np.int64), block)
        return len(cache[q_high])

    best = _largest_fitting(size_of, int(max_bytes))
    size_of(best)
    return SemanticEncoded(cache[best], max(1, best - spread), best)


def encode_jpeg_max_bytes(
    image: np.ndarray,
    max_bytes: int,
    subsampling: Subsampling = "4:2:0",
    *,
    optimize: bool = True,
) -> tuple[bytes, int]:
    """The uniform JPEG (IJG quality, Pillow) of the highest quality no larger than ``max_bytes``.

    Bisection over qualities 1..100 (about 7 encodes). Returns ``(data, quality)``; when even
    quality 1 is larger than ``max_bytes``, the quality-1 file is returned (check its length).
    Huffman tables are optimized by default, as :func:`encode_semantic_jpeg` does, so that a
    rate-matched comparison is not won by the entropy coder; ``optimize=False`` gives the bytes of
    :func:`transforms.jpeg.encode_jpeg`.
    """
    _check_image(image)
    _check_subsampling(subsampling)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    cache: dict[int, bytes] = {}

    def size_of(q: int) -> int:
        if q not in cache:
            cache[q] = encode_jpeg(image, q, subsampling, optimize=optimize)
        return len(cache[q])

    best = _largest_fitting(size_of, int(max_bytes))
    size_of(best)
    return cache[best], best
