"""libjpeg's forward path in numpy: an RGB image's quantization-free DCT coefficients.

:func:`source_coefficients` returns, for a uint8 RGB image, exactly the coefficients that
libjpeg-turbo writes into a baseline JPEG at quality 100 (every quantization step 1), as Pillow
encodes it: JFIF RGB -> YCbCr in libjpeg's 16-bit fixed point, the edges replicated to whole
blocks and MCUs the way libjpeg pads them, chroma box-downsampled with libjpeg's alternating
rounding bias, the integer "islow" DCT (``jfdctint.c``), and libjpeg's rounding of the
coefficients. The semantic JPEG encoder requantizes these. Computing them here, rather than
encoding a quality-100 JPEG and reading it back with jpeglib, saves two passes of entropy coding
and a temporary file per image; ``tests/transforms/test_jpeg_dct.py`` checks that both give the
same integers, so the files the encoder writes are unchanged.

Pure numpy; no codec is called.
"""
from __future__ import annotations

import numpy as np

__all__ = ["source_coefficients", "SAMPLING"]

#: (v, h) sampling factors of Y, Cb, Cr, as libjpeg sets them for Pillow's subsampling names.
SAMPLING = {
    "4:4:4": ((1, 1), (1, 1), (1, 1)),
    "4:2:2": ((1, 2), (1, 1), (1, 1)),
    "4:2:0": ((2, 2), (1, 1), (1, 1)),
}

# jccolor.c: 16-bit fixed point, FIX(x) = (int)(x * 65536 + 0.5).
_SCALEBITS = 16


def _fix16(x: float) -> int:
    return int(x * (1 << _SCALEBITS) + 0.5)


_ONE_HALF = 1 << (_SCALEBITS - 1)
_CBCR_OFFSET = 128 << _SCALEBITS

# jfdctint.c: CONST_BITS 13, PASS1_BITS 2, FIX(x) = (int)(x * 8192 + 0.5).
_CONST_BITS = 13
_PASS1_BITS = 2


def _fix13(x: float) -> int:
    return int(x * (1 << _CONST_BITS) + 0.5)


_F0298, _F0390, _F0541, _F0765 = _fix13(0.298631336), _fix13(0.390180644), _fix13(0.541196100), _fix13(0.765366865)
_F0899, _F1175, _F1501, _F1847 = _fix13(0.899976223), _fix13(1.175875602), _fix13(1.501321110), _fix13(1.847759065)
_F1961, _F2053, _F2562, _F3072 = _fix13(1.961570560), _fix13(2.053119869), _fix13(2.562915447), _fix13(3.072711026)


def _rgb_to_ycc(image: np.ndarray) -> list[np.ndarray]:
    """jccolor.c ``rgb_ycc_convert``: int32 (H, W) planes Y, Cb, Cr in 0..255."""
    return _ycc(*(image[..., i].astype(np.int32) for i in range(3)))


def _ycc(r, g, b) -> list:
    """jccolor.c's arithmetic on int32 R, G, B planes (numpy arrays or torch tensors)."""
    y = (_fix16(0.29900) * r + _fix16(0.58700) * g + _fix16(0.11400) * b + _ONE_HALF) >> _SCALEBITS
    # Cb and Cr round with 0.5 - epsilon, so that 255 cannot round up to 256.
    cb = (-_fix16(0.16874) * r - _fix16(0.33126) * g + _fix16(0.5) * b + _CBCR_OFFSET + _ONE_HALF - 1) >> _SCALEBITS
    cr = (_fix16(0.5) * r - _fix16(0.41869) * g - _fix16(0.08131) * b + _CBCR_OFFSET + _ONE_HALF - 1) >> _SCALEBITS
    return [y, cb, cr]


def _pad_edge(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Replicate the last row and column until ``a`` is at least (rows, cols); never crops."""
    ph, pw = max(0, rows - a.shape[0]), max(0, cols - a.shape[1])
    return np.pad(a, ((0, ph), (0, pw)), mode="edge") if ph or pw else a


def _downsample(plane: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """jcsample.c: box average over fy x fx with the rounding bias alternating along each row
    (h2v1: 0, 1, 0, ...; h2v2: 1, 2, 1, ...). ``plane`` is already padded to multiples."""
    if (fy, fx) == (1, 1):
        return plane
    if (fy, fx) == (1, 2):
        sums = plane[:, 0::2] + plane[:, 1::2]
        sums += np.arange(sums.shape[1], dtype=sums.dtype) % 2  # bias 0, 1, 0, 1, ...
        return sums >> 1
    if (fy, fx) == (2, 2):
        sums = plane[0::2, 0::2] + plane[0::2, 1::2]
        sums += plane[1::2, 0::2]
        sums += plane[1::2, 1::2]
        sums += 1 + np.arange(sums.shape[1], dtype=sums.dtype) % 2  # bias 1, 2, 1, 2, ...
        return sums >> 2
    raise ValueError(f"unsupported downsampling {fy}x{fx}")


def _descale(x: np.ndarray, n: int) -> np.ndarray:
    return (x + (1 << (n - 1))) >> n


def _fdct_islow_pass(d: np.ndarray, last: bool, stack=np.stack) -> np.ndarray:
    """One 1-D pass of jfdctint.c along the first axis of int32 (8, ...) data (int32, as in C:
    libjpeg's ranges keep every product inside it); torch tensors too, with ``torch.stack``."""
    d0, d1, d2, d3, d4, d5, d6, d7 = d
    tmp0, tmp7 = d0 + d7, d0 - d7
    tmp1, tmp6 = d1 + d6, d1 - d6
    tmp2, tmp5 = d2 + d5, d2 - d5
    tmp3, tmp4 = d3 + d4, d3 - d4
    tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
    tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
    shift = _CONST_BITS + _PASS1_BITS if last else _CONST_BITS - _PASS1_BITS
    if last:
        o0, o4 = _descale(tmp10 + tmp11, _PASS1_BITS), _descale(tmp10 - tmp11, _PASS1_BITS)
    else:
        o0, o4 = (tmp10 + tmp11) << _PASS1_BITS, (tmp10 - tmp11) << _PASS1_BITS
    z1 = (tmp12 + tmp13) * _F0541
    o2 = _descale(z1 + tmp13 * _F0765, shift)
    o6 = _descale(z1 - tmp12 * _F1847, shift)
    z1, z2, z3, z4 = tmp4 + tmp7, tmp5 + tmp6, tmp4 + tmp6, tmp5 + tmp7
    z5 = (z3 + z4) * _F1175
    tmp4, tmp5, tmp6, tmp7 = tmp4 * _F0298, tmp5 * _F2053, tmp6 * _F3072, tmp7 * _F1501
    z1, z2 = z1 * -_F0899, z2 * -_F2562
    z3, z4 = z3 * -_F1961 + z5, z4 * -_F0390 + z5
    o7 = _descale(tmp4 + z1 + z3, shift)
    o5 = _descale(tmp5 + z2 + z4, shift)
    o3 = _descale(tmp6 + z2 + z3, shift)
    o1 = _descale(tmp7 + z1 + z4, shift)
    return stack([o0, o1, o2, o3, o4, o5, o6, o7])


def _fdct_islow(blocks: np.ndarray) -> np.ndarray:
    """jfdctint.c ``jpeg_fdct_islow`` on (8, 8, N) level-shifted samples laid out [row, column,
    block], then jcdctmgr.c's quantization by a step of 1 (a divisor of 8: the DCT's output is
    scaled by 8), which rounds half away from zero. Returns int32 (8, 8, N), [v, u, block]."""
    rows = _fdct_islow_pass(blocks.swapaxes(0, 1), last=False)  # along each row: axis 1 first
    cols = _fdct_islow_pass(rows.swapaxes(0, 1), last=True)  # then along each column
    return np.sign(cols) * ((np.abs(cols) + 4) >> 3)


def source_coefficients(image: np.ndarray, subsampling: str = "4:2:0") -> list[np.ndarray]:
    """The DCT coefficients of ``image`` (uint8 (H, W, 3) RGB) in a quality-100 baseline JPEG
    with the given chroma subsampling, as libjpeg-turbo computes them.

    Returns [Y, Cb, Cr], each int16 (height_in_blocks, width_in_blocks, 8, 8) as jpeglib reads
    them: ``ceil(H * v / (vmax * 8))`` by ``ceil(W * h / (hmax * 8))`` blocks of [v, u]
    coefficients, for the component's sampling factors (v, h) in :data:`SAMPLING`.
    """
    if subsampling not in SAMPLING:
        raise ValueError(f"subsampling must be one of {', '.join(SAMPLING)}, got {subsampling!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape[:2]:
        raise ValueError(f"expected a non-empty uint8 HxWx3 RGB array, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    samp = SAMPLING[subsampling]
    vmax, hmax = max(v for v, _ in samp), max(s for _, s in samp)
    planes = _rgb_to_ycc(image)
    # jcprepct.c pads the converted rows to a whole row group (vmax rows) by repeating the last.
    h_group = -(-h // vmax) * vmax
    blocks, dims = [], []
    for plane, (v, s) in zip(planes, samp):
        fy, fx = vmax // v, hmax // s
        bh = -(-h * v // (vmax * 8))  # height_in_blocks
        bw = -(-w * s // (hmax * 8))  # width_in_blocks
        # jcsample.c widens each row to width_in_blocks * 8 * fx columns by repeating the last.
        full = _pad_edge(plane, h_group, bw * 8 * fx)[:h_group, : bw * 8 * fx]
        comp = _downsample(full, fy, fx)
        # jcprepct.c then repeats the component's last row down to a whole iMCU row.
        comp = _pad_edge(comp, -(-comp.shape[0] // (8 * v)) * 8 * v, bw * 8)[: bh * 8, : bw * 8]
        blocks.append((comp - 128).reshape(bh, 8, bw, 8).transpose(1, 3, 0, 2).reshape(8, 8, bh * bw))
        dims.append((bh, bw))
    coef = _fdct_islow(np.concatenate(blocks, axis=2))  # the three components' blocks in one pass
    out, start = [], 0
    for bh, bw in dims:
        part = coef[:, :, start : start + bh * bw]
        out.append(part.reshape(8, 8, bh, bw).transpose(2, 3, 0, 1).astype(np.int16))
        start += bh * bw
    return out
