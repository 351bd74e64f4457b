"""A baseline JPEG encoded and decoded in torch, batched, on any device: libjpeg-turbo's pixels.

:func:`jpeg_roundtrip` returns, for a batch of uint8 RGB images, the pixels that Pillow gives
when it encodes each image as a baseline JPEG at an IJG ``quality`` (libjpeg-turbo's defaults:
the integer "islow" DCT, the Annex K tables scaled by ``jpeg_quality_scaling``) and decodes the
file again (the integer "islow" inverse DCT, "fancy" triangle-filter chroma upsampling, the
fixed-point YCbCr -> RGB tables). Every step is libjpeg's integer arithmetic, so the result is
the same bytes, not an approximation (``tests/transforms/test_jpeg_torch.py`` checks it against
Pillow); no entropy coding happens, since the pixels do not depend on it.

Why: the JPEG check of ``aug_msroi_gated`` (``transforms.defenses.jpeg_stability``) classifies
each image's uniform JPEG. On a GPU worker, encoding and decoding with libjpeg on the CPU (about
0.5 ms per 224x224 image and core) would bound a map stage that runs thousands of images per
second; here the whole batch stays on the device, in a few dozen elementwise integer kernels.

The forward path follows :mod:`transforms.jpeg_dct` (``jccolor.c``, ``jcsample.c``,
``jcprepct.c``, ``jfdctint.c``), then ``jcdctmgr.c``'s quantization by reciprocal
multiplication (libjpeg-turbo's SIMD path; for every step and coefficient an 8-bit image gives,
it equals rounding division, checked exhaustively);
the inverse path ``jidctint.c``, ``jdsample.c`` (``h2v2_fancy_upsample``, ``h2v1_fancy_upsample``,
with the context rows ``jdmainct.c`` replicates at the image's edges) and ``jdcolor.c``.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from .jpeg_dct import (
    _CONST_BITS,
    _F0298,
    _F0390,
    _F0541,
    _F0765,
    _F0899,
    _F1175,
    _F1501,
    _F1847,
    _F1961,
    _F2053,
    _F2562,
    _F3072,
    _ONE_HALF,
    _PASS1_BITS,
    _SCALEBITS,
    SAMPLING,
    _descale,
    _fdct_islow_pass,
    _fix16,
    _ycc,
)
from .semantic_jpeg import DEFAULT_BLOCK, _check_block, _check_levels, _check_quality, ijg_tables

__all__ = ["jpeg_roundtrip", "quant_table", "source_coefficients", "requantized_coefficients", "uniform_coefficients",
           "quality_grids"]

def quant_table(quality: int, chroma: bool = False) -> tuple[int, ...]:
    """jcparam.c ``jpeg_set_quality(quality, force_baseline=TRUE)``: the 64 steps, natural order
    (:func:`transforms.semantic_jpeg.ijg_tables`)."""
    return tuple(int(v) for v in ijg_tables(quality)[1 if chroma else 0].ravel())


def _reciprocal(divisor: int) -> tuple[int, int, int]:
    """jcdctmgr.c ``compute_reciprocal`` for 16-bit DCTELEM: (reciprocal, correction, shift), so
    that a magnitude quantizes to ``((m + correction) * reciprocal) >> shift``."""
    if divisor == 1:
        return 1, 0, 0
    b = divisor.bit_length() - 1
    r = 16 + b
    fq, fr = divmod(1 << r, divisor)
    c = divisor // 2
    if fr == 0:  # a power of two
        fq >>= 1
        r -= 1
    elif fr <= divisor // 2:
        c += 1
    else:
        fq += 1
    return fq, c, r


@functools.lru_cache(maxsize=64)
def _tables(quality: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per component kind (luma, chroma): the steps (8, 8) and the quantizer's reciprocals,
    corrections and shifts (8, 8), int64 on ``device``."""
    out = {}
    for kind, chroma in (("luma", False), ("chroma", True)):
        steps = quant_table(quality, chroma)
        rec = [_reciprocal(s << 3) for s in steps]  # islow's output is scaled by 8
        for name, values in (("step", steps), ("recip", [r[0] for r in rec]), ("corr", [r[1] for r in rec]),
                             ("shift", [r[2] for r in rec])):
            out[f"{kind}_{name}"] = torch.tensor(values, dtype=torch.int64, device=device).view(8, 8)
    return out


# --------------------------------------------------------------------------- forward path


def _rgb_to_ycc(x: torch.Tensor) -> list[torch.Tensor]:
    """jccolor.c ``rgb_ycc_convert`` on int32 (N, 3, H, W): Y, Cb, Cr planes (N, H, W)."""
    return _ycc(*x.unbind(1))


def _fit(a: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``a`` (N, h, w) cropped or edge-replicated to exactly (N, rows, cols)."""
    h, w = a.shape[-2:]
    if rows != h:
        a = a.index_select(-2, torch.arange(rows, device=a.device).clamp_(max=h - 1))
    if cols != w:
        a = a.index_select(-1, torch.arange(cols, device=a.device).clamp_(max=w - 1))
    return a


def _downsample(plane: torch.Tensor, fy: int, fx: int) -> torch.Tensor:
    """jcsample.c box average with its alternating rounding bias (see transforms.jpeg_dct)."""
    if (fy, fx) == (1, 1):
        return plane
    bias = torch.arange(plane.shape[-1] // fx, device=plane.device, dtype=plane.dtype) % 2
    if (fy, fx) == (1, 2):
        return (plane[..., 0::2] + plane[..., 1::2] + bias) >> 1
    if (fy, fx) == (2, 2):
        s = plane[..., 0::2, 0::2] + plane[..., 0::2, 1::2] + plane[..., 1::2, 0::2] + plane[..., 1::2, 1::2]
        return (s + 1 + bias) >> 2
    raise ValueError(f"unsupported downsampling {fy}x{fx}")


def _fdct_pass(d: torch.Tensor, dim: int, last: bool) -> torch.Tensor:
    """One 1-D pass of jfdctint.c along ``dim`` (size 8) of int32 data: jpeg_dct's, in torch."""
    return _fdct_islow_pass(d.movedim(dim, 0), last, stack=torch.stack).movedim(0, dim)


def _quantize(x: torch.Tensor, recip: torch.Tensor, corr: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """jcdctmgr.c ``quantize``: sign * (((|x| + corr) * recip) >> shift) on (..., 8, 8)."""
    m = x.abs().to(torch.int64)
    q = ((m + corr) * recip) >> shift
    return torch.where(x < 0, -q, q)


# --------------------------------------------------------------------------- inverse path


def _idct_pass(d: torch.Tensor, dim: int, last: bool) -> torch.Tensor:
    """One 1-D pass of jidctint.c along ``dim`` (size 8) of int64 data: pass 1 (columns,
    dequantized input) or, with ``last``, pass 2 (rows), whose output is level-shifted back and
    range-limited to 0..255."""
    w0, w1, w2, w3, w4, w5, w6, w7 = d.unbind(dim)
    z1 = (w2 + w6) * _F0541
    tmp2 = z1 + w6 * -_F1847
    tmp3 = z1 + w2 * _F0765
    tmp0 = (w0 + w4) << _CONST_BITS
    tmp1 = (w0 - w4) << _CONST_BITS
    tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
    tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
    t0, t1, t2, t3 = w7, w5, w3, w1
    z1, z2, z3, z4 = t0 + t3, t1 + t2, t0 + t2, t1 + t3
    z5 = (z3 + z4) * _F1175
    t0, t1, t2, t3 = t0 * _F0298, t1 * _F2053, t2 * _F3072, t3 * _F1501
    z1, z2 = z1 * -_F0899, z2 * -_F2562
    z3, z4 = z3 * -_F1961 + z5, z4 * -_F0390 + z5
    t0 = t0 + z1 + z3
    t1 = t1 + z2 + z4
    t2 = t2 + z2 + z3
    t3 = t3 + z1 + z4
    outs = [tmp10 + t3, tmp11 + t2, tmp12 + t1, tmp13 + t0, tmp13 - t0, tmp12 - t1, tmp11 - t2, tmp10 - t3]
    if last:
        outs = [(_descale(o, _CONST_BITS + _PASS1_BITS + 3) + 128).clamp_(0, 255) for o in outs]
    else:
        outs = [_descale(o, _CONST_BITS - _PASS1_BITS) for o in outs]
    return torch.stack(outs, dim=dim)


def _fancy_upsample(c: torch.Tensor, fy: int, fx: int) -> torch.Tensor:
    """jdsample.c: int (N, h, w) chroma at its downsampled size -> (N, h * fy, w * fx).

    h2v2 and h2v1 use the triangle filter (3/4 nearer + 1/4 further sample, with libjpeg's
    alternating rounding bias); the rows above the first and below the last, and the columns
    beside the edges, are the edge samples themselves (jdmainct.c's context rows; the edge
    columns' special cases in jdsample.c come to the same). libjpeg uses the plain box filter
    when a row has two samples or fewer."""
    n, h, w = c.shape
    if (fy, fx) == (1, 1):
        return c
    if w <= 2:  # h2v1_upsample / h2v2_upsample: replicate
        return c.repeat_interleave(fx, dim=-1).repeat_interleave(fy, dim=-2)
    if (fy, fx) == (2, 2):
        rows = torch.arange(h, device=c.device)
        above = c.index_select(1, (rows - 1).clamp_(min=0))
        below = c.index_select(1, (rows + 1).clamp_(max=h - 1))
        # Output row 2i uses row i-1 as its further row, row 2i+1 uses row i+1.
        colsum = torch.stack([3 * c + above, 3 * c + below], dim=2).view(n, 2 * h, w)
        this = colsum
        cols = torch.arange(w, device=c.device)
        last = colsum.index_select(2, (cols - 1).clamp_(min=0))
        nxt = colsum.index_select(2, (cols + 1).clamp_(max=w - 1))
        return torch.stack([(3 * this + last + 8) >> 4, (3 * this + nxt + 7) >> 4], dim=3).view(n, 2 * h, 2 * w)
    if (fy, fx) == (1, 2):
        cols = torch.arange(w, device=c.device)
        last = c.index_select(2, (cols - 1).clamp_(min=0))
        nxt = c.index_select(2, (cols + 1).clamp_(max=w - 1))
        return torch.stack([(3 * c + last + 1) >> 2, (3 * c + nxt + 2) >> 2], dim=3).view(n, h, 2 * w)
    raise ValueError(f"unsupported upsampling {fy}x{fx}")


def _ycc_to_rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """jdcolor.c ``ycc_rgb_convert`` (its tables as arithmetic): uint8 (N, 3, H, W)."""
    cb, cr = cb - 128, cr - 128
    r = y + ((_fix16(1.40200) * cr + _ONE_HALF) >> _SCALEBITS)
    g = y + ((-_fix16(0.34414) * cb + _ONE_HALF - _fix16(0.71414) * cr) >> _SCALEBITS)
    b = y + ((_fix16(1.77200) * cb + _ONE_HALF) >> _SCALEBITS)
    return torch.stack([r, g, b], dim=1).clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- round trip


def jpeg_roundtrip(pixels: torch.Tensor, quality: int = 75, subsampling: str = "4:2:0", *,
                   compiled: bool = False) -> torch.Tensor:
    """The decoded pixels of each image's baseline JPEG at ``quality``, as Pillow
    (libjpeg-turbo) encodes and decodes it (see the module's docstring).

    Args:
        pixels: uint8 (N, 3, H, W) RGB, any device and memory layout.
        quality: IJG quality 1..100.
        subsampling: "4:4:4", "4:2:2" or "4:2:0".
        compiled: run it through ``torch.compile`` (one graph per input shape and subsampling,
            compiled at its first call: seconds): the same pixels, its fifty-odd integer kernels
            fused into a few. On this machine's CPU, 32 dev images at 224x224: 3,176 images/s
            against 323 eager and about 1,200 for libjpeg through Pillow, after about 15 s of
            compiling (``bench/defend.py`` times it on each device). Where compiling fails, a
            ``RuntimeWarning`` says why and the eager code runs (from then on).

    Returns:
        uint8 (N, 3, H, W), contiguous, on the pixels' device.
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, H, W) RGB, got {pixels.dtype} {tuple(pixels.shape)}")
    if subsampling not in SAMPLING:
        raise ValueError(f"subsampling must be one of {', '.join(SAMPLING)}, got {subsampling!r}")
    quant_table(quality)  # checks the quality
    tables = _tables(int(quality), pixels.device)
    n, _, h, w = pixels.shape
    if n == 0 or h == 0 or w == 0:
        return pixels.contiguous()
    if compiled and _COMPILE["ok"]:
        try:
            return _compiled_roundtrip()(pixels, tables, subsampling)
        except torch.cuda.OutOfMemoryError:  # the batch's size, not the compiler's
            raise
        except Exception as e:  # noqa: BLE001 - compiling is an optimization
            _COMPILE["ok"] = False
            why = " ".join(str(e).split())[:300]
            warnings.warn(f"compiled JPEG round trip failed ({type(e).__name__}: {why}); running it eagerly "
                          "from now on", RuntimeWarning, stacklevel=2)
    return _roundtrip(pixels, tables, subsampling)


#: Whether compiling the round trip still gets a chance (False after it failed once).
_COMPILE = {"ok": True}


@functools.lru_cache(maxsize=1)
def _compiled_roundtrip():
    return torch.compile(_roundtrip)


def _dct_blocks(pixels: torch.Tensor, subsampling: str) -> list[torch.Tensor]:
    """The forward path up to the DCT: per component (Y, Cb, Cr), jfdctint.c's output (scaled by
    8) of its level-shifted blocks, int32 (N, height_in_blocks, width_in_blocks, 8, 8) [v, u]."""
    n, _, h, w = pixels.shape
    samp = SAMPLING[subsampling]
    vmax, hmax = max(v for v, _ in samp), max(s for _, s in samp)
    h_group = -(-h // vmax) * vmax
    out = []
    for plane, (v, s) in zip(_rgb_to_ycc(pixels.to(torch.int32)), samp):
        fy, fx = vmax // v, hmax // s
        bh, bw = -(-h * v // (vmax * 8)), -(-w * s // (hmax * 8))
        comp = _downsample(_fit(plane, h_group, bw * 8 * fx), fy, fx)
        comp = _fit(comp, bh * 8, bw * 8)
        blocks = (comp - 128).view(n, bh, 8, bw, 8).permute(0, 1, 3, 2, 4)  # (n, bh, bw, row, col)
        out.append(_fdct_pass(_fdct_pass(blocks, -1, last=False), -2, last=True))
    return out


def _roundtrip(pixels: torch.Tensor, tables: dict[str, torch.Tensor], subsampling: str) -> torch.Tensor:
    n, _, h, w = pixels.shape
    samp = SAMPLING[subsampling]
    vmax, hmax = max(v for v, _ in samp), max(s for _, s in samp)
    out = []
    for ci, (coef, (v, s)) in enumerate(zip(_dct_blocks(pixels, subsampling), samp)):
        kind = "luma" if ci == 0 else "chroma"
        fy, fx = vmax // v, hmax // s
        bh, bw = coef.shape[1:3]
        q = _quantize(coef, tables[f"{kind}_recip"], tables[f"{kind}_corr"], tables[f"{kind}_shift"])
        deq = q * tables[f"{kind}_step"]
        pix = _idct_pass(_idct_pass(deq, -2, last=False), -1, last=True)  # columns, then rows
        comp = pix.permute(0, 1, 3, 2, 4).reshape(n, bh * 8, bw * 8)
        # The component's own size (jdmaster.c: downsampled_width/height), then back to full size.
        ch, cw = -(-h * v // vmax), -(-w * s // hmax)
        comp = _fancy_upsample(comp[:, :ch, :cw], fy, fx)[:, :h, :w]
        out.append(comp)
    return _ycc_to_rgb(*out)


# --------------------------------------------------------------------------- coefficients


def _check_pixels(pixels: torch.Tensor, subsampling: str) -> None:
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3 or 0 in pixels.shape[2:]:
        raise ValueError(f"expected uint8 (N, 3, H, W) RGB with H, W >= 1, got {pixels.dtype} {tuple(pixels.shape)}")
    if subsampling not in SAMPLING:
        raise ValueError(f"subsampling must be one of {', '.join(SAMPLING)}, got {subsampling!r}")


def source_coefficients(pixels: torch.Tensor, subsampling: str = "4:2:0") -> list[torch.Tensor]:
    """libjpeg-turbo's DCT coefficients of a quality-100 baseline JPEG of each image (every step
    1): :func:`transforms.jpeg_dct.source_coefficients`, batched, on the pixels' device.

    Args:
        pixels: uint8 (N, 3, H, W) RGB.
        subsampling: "4:4:4", "4:2:2" or "4:2:0".

    Returns:
        [Y, Cb, Cr], each int32 (N, height_in_blocks, width_in_blocks, 8, 8) of [v, u]
        coefficients, as jpeglib reads them from the file libjpeg would write.
    """
    _check_pixels(pixels, subsampling)
    # jcdctmgr.c's quantization by a step of 1 divides the DCT's output (scaled by 8) by 8,
    # rounding half away from zero.
    return [torch.where(c < 0, -((-c + 4) >> 3), (c + 4) >> 3) for c in _dct_blocks(pixels, subsampling)]


def quality_grids(maps: torch.Tensor, *, levels: int = 5, q_low: int = 30, q_high: int = 70,
                  block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """:func:`transforms.semantic_jpeg.block_qualities` with ``binning="value"`` for a batch of
    maps, on their device: the same grids. Each cell's mean is taken in float64 and rounded to
    9 decimals as numpy's is, so the order of the summation practically never matters: only a mean
    within float error of a rounding boundary of its 9th decimal could round differently, and it
    changes a quality only if it also lies on a bin edge (none of the tests' 900 grids, maps on the
    bin edges included, differs). The bins and the qualities are numpy's arithmetic (``rint`` and
    ``round`` both round half to even). On a GPU worker this keeps the grids of the map stage off
    its host (0.11 ms a 224x224 map in numpy).

    Args:
        maps: float (N, H, W), values in [0, 1] (clipped).

    Returns:
        int64 (N, ceil(H / block), ceil(W / block)) qualities, on the maps' device.
    """
    levels = _check_levels(levels)
    q_low, q_high = _check_quality("q_low", q_low), _check_quality("q_high", q_high)
    if q_low > q_high:
        raise ValueError(f"q_low must be <= q_high, got q_low={q_low}, q_high={q_high}")
    block = _check_block(block)
    if maps.ndim != 3 or maps.shape[1] == 0 or maps.shape[2] == 0 or not maps.dtype.is_floating_point:
        raise ValueError(f"maps must be float (N, H, W), got {maps.dtype} {tuple(maps.shape)}")
    if maps.numel() and not bool(torch.isfinite(maps).all()):
        raise ValueError("saliency has NaN or infinite values")
    n, h, w = maps.shape
    gh, gw = -(-h // block), -(-w // block)
    x = torch.nn.functional.pad(maps.double(), (0, gw * block - w, 0, gh * block - h))
    sums = x.view(n, gh, block, gw, block).sum(dim=(2, 4))
    rows = torch.clamp(h - torch.arange(gh, device=maps.device) * block, max=block)
    cols = torch.clamp(w - torch.arange(gw, device=maps.device) * block, max=block)
    pooled = torch.round(sums / (rows[:, None] * cols[None]).double(), decimals=9)
    if levels == 1:
        return torch.full((n, gh, gw), q_high, dtype=torch.int64, device=maps.device)
    level = torch.clamp(torch.floor(pooled.clamp(0.0, 1.0) * levels + 1e-9), max=levels - 1)
    return torch.round(q_low + level * (q_high - q_low) / (levels - 1)).long()


def uniform_coefficients(pixels: torch.Tensor, quality: int, subsampling: str = "4:2:0"
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The quantized coefficients and tables of each image's baseline JPEG at an IJG ``quality``,
    as libjpeg-turbo computes them when Pillow encodes the pixels (jcdctmgr.c's quantization of
    jfdctint.c's output): entropy-coded (:func:`transforms.jpeg_entropy.write_coefficients_batch`),
    they are Pillow's own optimized file (``transforms.jpeg.encode_jpeg(..., optimize=True)``),
    byte for byte.

    Args:
        pixels: uint8 (N, 3, H, W) RGB.
        quality: IJG quality 1..100.
        subsampling: "4:4:4", "4:2:2" or "4:2:0".

    Returns:
        ([Y, Cb, Cr] int16 (N, bh, bw, 8, 8), tables int32 (N, 2, 8, 8): luma and chroma steps),
        on the pixels' device.
    """
    _check_pixels(pixels, subsampling)
    quant_table(quality)  # checks the quality
    t = _tables(int(quality), pixels.device)
    kinds = ("luma", "chroma", "chroma")
    comps = [_quantize(c, t[f"{k}_recip"], t[f"{k}_corr"], t[f"{k}_shift"]).to(torch.int16)
             for c, k in zip(_dct_blocks(pixels, subsampling), kinds)]
    tables = torch.stack([t["luma_step"], t["chroma_step"]]).to(torch.int32)
    return comps, tables.expand(pixels.shape[0], -1, -1, -1).contiguous()


@functools.lru_cache(maxsize=8)
def _all_steps(device: torch.device) -> torch.Tensor:
    """The IJG tables of every quality, float64 (101, 2, 8, 8) on ``device``, indexed by quality
    (row 0 unused): ``semantic_jpeg._float_tables``."""
    return torch.tensor(np.stack([ijg_tables(max(q, 1)) for q in range(101)]), dtype=torch.float64, device=device)


def requantized_coefficients(pixels: torch.Tensor, qualities: torch.Tensor, *, block: int = 16,
                             subsampling: str = "4:2:0") -> tuple[list[torch.Tensor], torch.Tensor]:
    """The coefficients and tables of each image's semantic JPEG (``method="requantize"``),
    batched, on the pixels' device: what :func:`transforms.semantic_jpeg.encode_semantic_jpeg`
    writes, to the bit, for the same pixels and quality grid, before its entropy coding.

    Each block's quality-100 coefficients ``c`` are quantized with its quality's IJG step ``Q_b``
    and written in the file's single table ``Q_hi``, that of the finest quality of the image:
    ``round(round(c / Q_b) * Q_b / Q_hi)``, in float64 as numpy does it there. A chroma block takes
    the finest quality of the luma cells it covers.

    Args:
        pixels: uint8 (N, 3, H, W) RGB.
        qualities: integer (N, ceil(H / block), ceil(W / block)) qualities in 1..100
            (:func:`transforms.semantic_jpeg.block_qualities` of each image's map).
        block: the grid's cell size, a multiple of 8.
        subsampling: "4:4:4", "4:2:2" or "4:2:0".

    Returns:
        ([Y, Cb, Cr] int16 (N, bh, bw, 8, 8), tables uint8-valued int32 (N, 2, 8, 8): luma and
        chroma steps of each file), on the pixels' device.
    """
    _check_pixels(pixels, subsampling)
    n, _, h, w = pixels.shape
    if block < 8 or block % 8:
        raise ValueError(f"block must be a positive multiple of 8, got {block}")
    grid = torch.as_tensor(qualities, device=pixels.device).long()
    want = (n, -(-h // block), -(-w // block))
    if tuple(grid.shape) != want:
        raise ValueError(f"qualities must have shape {want} for {n} images of {h}x{w} and block {block}, "
                         f"got {tuple(grid.shape)}")
    if grid.numel() and (int(grid.min()) < 1 or int(grid.max()) > 100):
        raise ValueError("qualities must be JPEG qualities in 1..100")
    r = block // 8
    q8 = grid.repeat_interleave(r, dim=1).repeat_interleave(r, dim=2)[:, : -(-h // 8), : -(-w // 8)]
    q_hi = q8.flatten(1).amax(dim=1)  # (N,)
    steps = _all_steps(pixels.device)
    samp = SAMPLING[subsampling]
    vmax, hmax = max(v for v, _ in samp), max(s for _, s in samp)
    out = []
    for c, (coef, (v, s)) in enumerate(zip(source_coefficients(pixels, subsampling), samp)):
        table = 0 if c == 0 else 1
        cgrid = _component_grid(q8, vmax // v, hmax // s, coef.shape[1:3])
        q_b = steps[cgrid, table]  # (N, bh, bw, 8, 8)
        q_file = steps[q_hi, table][:, None, None]  # (N, 1, 1, 8, 8)
        coarse = torch.round(coef.double() / q_b) * q_b
        # Baseline ranges: AC magnitude category <= 10 (and the DC clipped alike, as numpy does).
        out.append(torch.round(coarse / q_file).clamp_(-1023, 1023).to(torch.int16))
    return out, steps[q_hi].to(torch.int32)


def _component_grid(q8: torch.Tensor, fy: int, fx: int, shape) -> torch.Tensor:
    """``semantic_jpeg._component_grid`` batched: (N, rows, cols) luma-cell qualities -> each
    block's of a component subsampled by (fy, fx), the finest of the cells it covers, cropped or
    edge-replicated to the component's (bh, bw) blocks."""
    ph, pw = -q8.shape[1] % fy, -q8.shape[2] % fx
    g = torch.nn.functional.pad(q8, (0, pw, 0, ph)) if ph or pw else q8  # zeros: below every quality
    if (fy, fx) != (1, 1):
        n, rows, cols = g.shape
        g = g.view(n, rows // fy, fy, cols // fx, fx).amax(dim=(2, 4))
    return _fit(g, int(shape[0]), int(shape[1]))
