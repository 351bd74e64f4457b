"""Baseline JPEG entropy coding in torch, batched, on any device: libjpeg's files, to the byte.

:func:`write_coefficients_batch` turns a batch of images' quantized DCT coefficients and tables
(what :func:`transforms.jpeg_torch.requantized_coefficients` computes on the map model's device)
into the files :func:`transforms.semantic_jpeg.write_coefficients` writes through jpeglib and
libjpeg-turbo: the same markers, the same optimized Huffman tables (``jchuff.c``
``jpeg_gen_optimal_table``, its tie-breaking and its 16-bit length limit included), the same
scan with its dummy edge blocks (``jctrans.c``), byte stuffing and padding; byte for byte
(``tests/transforms/test_jpeg_entropy.py``).

Why: on a GPU worker the map stage computes the coefficients of thousands of images a second,
and writing each file with libjpeg on the worker's CPU (about 0.9 ms per 224x224 image and core:
jpeglib's copies, a temporary file, libjpeg's two Huffman passes) bounds the encoder. Here the
symbols, their counts, the tables, the codes, the bit packing and the byte stuffing run on the
device for the whole batch, as tensor operations without a Python loop per image or block; the
host only joins each file's few hundred bytes of headers to its scan.

The steps (ITU-T T.81 Annex F.1.2 and K.2, as libjpeg does them):

1. Blocks in scan order: each component's blocks padded to whole MCUs with ``jctrans.c``'s dummy
   blocks (AC zero, DC that of the previous block in the MCU), interleaved MCU by MCU, each block
   in zigzag order.
2. Symbols: the DC difference's size category; per nonzero AC coefficient its zero run (with a
   ZRL, 0xF0, per 16 zeros) and size; an EOB where a block ends in zeros.
3. Four optimal tables per image (luma DC and AC, chroma DC and AC) from the symbol counts:
   Huffman's merging, vectorized over all tables of the batch (one step per merge).
4. Codes: the scan's entries, sparse: per block its DC, and per nonzero AC coefficient its ZRLs
   and its (run, size) code with its bits, then its EOB if it ends in zeros; each a code and a
   bit count; exclusive sums give every entry's bit position; the entries' bytes are added into
   the stream (their bits never overlap, so adding is OR-ing);
   padding with one bits to a whole byte; a zero after every 0xFF.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .jpeg import check_jpeg_size
from .jpeg_dct import SAMPLING

__all__ = ["write_coefficients_batch"]

#: jutils.c ``jpeg_natural_order``: the natural (row-major) index of the k-th zigzag coefficient.
ZIGZAG = np.array([
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61,
    54, 47, 55, 62, 63])

#: Table slots per image: luma DC, luma AC, chroma DC, chroma AC (the order of the file's DHTs).
_N_TABLES = 4
_SYMBOLS = 257  # 256 symbols and libjpeg's pseudo-symbol, which keeps any code from being all ones
_MAX_CLEN = 32  # jchuff.c: the longest code Huffman's procedure may give before the 16-bit limit
_BIG = 1 << 62


@functools.lru_cache(maxsize=64)
def _layout(height: int, width: int, subsampling: str):
    """Where each block of the scan comes from.

    Returns (rows, cols, padded, scan, table, prev):
      rows, cols: each component's real block counts; padded: each one's (rows, cols) in whole
      MCUs; scan: (B,) index of the scan's b-th block into the components' padded grids, each
      flattened row-major and concatenated; table: (B,) 0 for luma, 1 for chroma; prev: (B,)
      the scan position of the previous block of the same component, -1 for the first.
    """
    samp = SAMPLING[subsampling]
    vmax, hmax = max(v for v, _ in samp), max(h for _, h in samp)
    mcu_rows, mcu_cols = -(-height // (8 * vmax)), -(-width // (8 * hmax))
    rows = tuple(-(-height * v // (vmax * 8)) for v, _ in samp)
    cols = tuple(-(-width * h // (hmax * 8)) for _, h in samp)
    padded = tuple((mcu_rows * v, mcu_cols * h) for v, h in samp)
    idx, comp = [], []
    offset = 0
    for c, (v, h) in enumerate(samp):
        yy, xx = np.meshgrid(np.arange(v), np.arange(h), indexing="ij")
        r = np.arange(mcu_rows)[:, None, None, None] * v + yy
        q = np.arange(mcu_cols)[None, :, None, None] * h + xx
        idx.append((offset + r * padded[c][1] + q).reshape(mcu_rows, mcu_cols, v * h))
        comp.append(np.full((mcu_rows, mcu_cols, v * h), c))
        offset += padded[c][0] * padded[c][1]
    scan = np.concatenate(idx, axis=2).reshape(-1)
    comp = np.concatenate(comp, axis=2).reshape(-1)
    prev = np.full(scan.shape, -1)
    for c in range(len(samp)):
        pos = np.flatnonzero(comp == c)
        prev[pos[1:]] = pos[:-1]
    return rows, cols, padded, scan, (comp > 0).astype(np.int64), prev


def _padded_zigzag(coef: torch.Tensor, padded: tuple[int, int], mcu: tuple[int, int]) -> torch.Tensor:
    """(N, R, C, 8, 8) -> (N, Rp, Cp, 64) int64 in zigzag order, padded to whole MCUs with
    jctrans.c's dummy blocks: AC zero, DC that of the block before it in the MCU (to the right
    of a row's last real block, its DC; in the rows under the last real row, the DC of that
    row's last block in the MCU)."""
    n, r, c = coef.shape[:3]
    zz = torch.as_tensor(ZIGZAG, device=coef.device)
    z = coef.reshape(n, r, c, 64).long().index_select(3, zz)
    rp, cp = padded
    if (rp, cp) == (r, c):
        return z
    out = torch.zeros(n, rp, cp, 64, dtype=torch.long, device=coef.device)
    out[:, :r, :c] = z
    out[:, :r, c:, 0] = z[:, :, c - 1 : c, 0]
    if rp > r:
        v, h = mcu
        last_in_mcu = torch.arange(cp, device=coef.device) // h * h + h - 1
        out[:, r:, :, 0] = out[:, r - 1 : r, :, 0].index_select(2, last_in_mcu)
    return out


def _size(x: torch.Tensor) -> torch.Tensor:
    """The bit count of |x| (0 for 0): the JPEG size category."""
    a = x.abs()
    return torch.where(a > 0, torch.frexp(a.double())[1].long(), torch.zeros_like(a))


def _extra_bits(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The size low bits of x, and of x - 1 when x is negative (F.1.2.1)."""
    return torch.where(x < 0, x + (1 << size) - 1, x)


def _code_sizes(freq: torch.Tensor) -> torch.Tensor:
    """jchuff.c ``jpeg_gen_optimal_table``'s Huffman procedure for every table at once.

    ``freq``: (T, 257) int64 counts, the last column the pseudo-symbol's 1. Each step merges, in
    every table with two or more trees left, the tree of least count into the next (ties go to
    the larger symbol, as libjpeg's scans take them) and lengthens the codes of both trees' symbols.
    A tree is known by the symbol that holds its count. Returns (T, 257) int64 code sizes."""
    t = freq.shape[0]
    sym = torch.arange(_SYMBOLS, device=freq.device)
    # A tree's key: its count * 512 - its symbol, so the least key is the least count and, among
    # equal counts, the larger symbol; _BIG once merged away (or never used).
    key = torch.where(freq > 0, freq * 512 - sym, _BIG)
    tree = sym.expand(t, -1).clone()
    size = torch.zeros_like(freq)
    steps = int((freq > 0).sum(1).max()) - 1 if t else 0
    for _ in range(steps):  # one merge per table and step; a table with one tree left stays
        k1, c1 = key.min(1, keepdim=True)
        key.scatter_(1, c1, _BIG)
        k2, c2 = key.min(1, keepdim=True)
        live = k2 < _BIG
        key.scatter_(1, c2, torch.where(live, _BIG, k2))
        key.scatter_(1, c1, torch.where(live, k1 + k2 + c2, k1))  # (f1 + f2) * 512 - c1
        in2 = (tree == c2) & live
        size += ((tree == c1) & live) | in2
        tree = torch.where(in2, c1, tree)
    return size


def _limit_lengths(bits: np.ndarray) -> None:
    """jchuff.c's adjustment of one table's length counts (``bits[1..32]``) to 16 bits at most,
    in place (T.81 Annex K.3)."""
    for i in range(_MAX_CLEN, 16, -1):
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1


def _tables(freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal tables from (T, 257) counts: (bits (T, 17) with bits[l] the count of codes of
    length l, huffval (T, 256) symbols by code (padded), code (T, 256) and length (T, 256) of
    each symbol (0 where unused)), as ``jpeg_gen_optimal_table`` and ``jpeg_make_c_derived_tbl``."""
    t, dev = freq.shape[0], freq.device
    size = _code_sizes(freq)
    if int(size.max()) > _MAX_CLEN if t else False:
        raise ValueError("Huffman code lengths overflow 32 bits (libjpeg's JERR_HUFF_CLEN_OVERFLOW)")
    bits = torch.zeros(t, _MAX_CLEN + 1, dtype=torch.long, device=dev)
    bits.scatter_add_(1, size, (size > 0).long())
    bits[:, 0] = 0
    if t and int(size.max()) > 16:  # rare: only very skewed counts; libjpeg's loop, on the host
        host = bits.cpu().numpy()
        for row in np.flatnonzero(host[:, 17:].any(1)):
            _limit_lengths(host[row])
        bits = torch.from_numpy(host).to(dev)
    bits = bits[:, :17].clone()
    longest = (torch.arange(17, device=dev) * (bits > 0)).amax(1)
    bits[torch.arange(t, device=dev), longest] -= 1  # the pseudo-symbol's code
    # Symbols by (Huffman's code size, symbol); the lengths come from bits, as libjpeg takes them.
    real = size[:, :256]
    order = torch.where(real > 0, real * 256 + torch.arange(256, device=dev), _BIG).argsort(dim=1, stable=True)
    count = bits.sum(1)
    pos = torch.arange(256, device=dev)
    cum = bits[:, 1:].cumsum(1)  # (T, 16): codes of length <= l
    length = 1 + (cum[:, None, :] <= pos[None, :, None]).sum(2)  # (T, 256), for pos < count
    used = pos[None] < count[:, None]
    length = torch.where(used, length, 0)
    first = torch.zeros(t, 18, dtype=torch.long, device=dev)  # canonical first code per length
    for ln in range(1, 17):
        first[:, ln + 1] = (first[:, ln] + bits[:, ln]) << 1
    start = torch.cat([torch.zeros(t, 1, dtype=torch.long, device=dev), cum], 1) - torch.cat(
        [torch.zeros(t, 1, dtype=torch.long, device=dev), bits[:, 1:]], 1)  # (T, 17): first position of length l
    code_at = first.gather(1, length) + pos[None] - start.gather(1, length.clamp(max=16))
    code_at = torch.where(used, code_at, 0)
    huffval = torch.where(used, order, 0)
    # Each symbol's code and length, by scattering the positions' (unused ones into a spare column).
    target = torch.where(used, order, torch.full_like(order, 256))
    code = torch.zeros(t, 257, dtype=torch.long, device=dev).scatter_(1, target, code_at)[:, :256]
    lens = torch.zeros(t, 257, dtype=torch.long, device=dev).scatter_(1, target, length)[:, :256]
    return bits, huffval, code, lens


def _check(coefficients, tables: torch.Tensor, subsampling: str, height: int, width: int) -> None:
    if subsampling not in SAMPLING:
        raise ValueError(f"subsampling must be one of {', '.join(SAMPLING)}, got {subsampling!r}")
    check_jpeg_size(height, width)
    if len(coefficients) != 3:
        raise ValueError(f"expected 3 components (Y, Cb, Cr), got {len(coefficients)}")
    rows, cols = _layout(int(height), int(width), subsampling)[:2]
    n = coefficients[0].shape[0]
    for c, r, q in zip(coefficients, rows, cols):
        if tuple(c.shape) != (n, r, q, 8, 8) or c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ValueError(f"component coefficients must be integer ({n}, {r}, {q}, 8, 8) for {height}x{width} "
                             f"images under {subsampling}, got {c.dtype} {tuple(c.shape)}")
        # DC -1024..1023 as write_coefficients takes it; AC within size category 10 (jchuff.c).
        if c.numel() and (int(c.min()) < -1024 or int(c.max()) > 1023
                          or int(c.reshape(-1, 64)[:, 1:].abs().max()) > 1023):
            raise ValueError("coefficients outside baseline JPEG's range")
    if tuple(tables.shape) != (n, 2, 8, 8) or tables.dtype.is_floating_point or (
            tables.numel() and (int(tables.min()) < 1 or int(tables.max()) > 255)):
        raise ValueError(f"tables must be integer ({n}, 2, 8, 8) steps in 1..255, "
                         f"got {tables.dtype} {tuple(tables.shape)}")


def _scan_symbols(coefficients, subsampling: str, height: int, width: int):
    """Each block of the scan as its DC difference and zigzag AC coefficients, with its table
    class: (dc_diff (N, B), ac (N, B, 63), table (B,))."""
    _, _, padded, scan, table, prev = _layout(height, width, subsampling)
    dev = coefficients[0].device
    n = coefficients[0].shape[0]
    grids = [_padded_zigzag(c, p, s) for c, p, s in zip(coefficients, padded, SAMPLING[subsampling])]
    blocks = torch.cat([g.reshape(n, -1, 64) for g in grids], 1).index_select(1, torch.as_tensor(scan, device=dev))
    dc = blocks[..., 0]
    prev_t = torch.as_tensor(prev, device=dev)
    pred = torch.where(prev_t >= 0, dc.index_select(1, prev_t.clamp(min=0)), torch.zeros_like(dc))
    return dc - pred, blocks[..., 1:], torch.as_tensor(table, device=dev)


def _entries(diff: torch.Tensor, ac: torch.Tensor, table: torch.Tensor):
    """The symbols' counts, the optimal tables, and the scan's codes as (value, bit count, bit
    position) entries, in no particular order: each block's DC, a ZRL run and a coefficient per
    nonzero AC coefficient (only those: most are zero), an EOB where the block ends in zeros, and
    each image's padding. Images follow one another, each padded to a whole byte.

    Returns (value, length, position, bytes per image (N,), bits (N, 4, 17), huffval (N, 4, 256))."""
    n, b = diff.shape
    dev = diff.device
    dsize = _size(diff).flatten()
    diff = diff.flatten()
    block, k = (ac.reshape(n * b, 63) != 0).nonzero(as_tuple=True)  # by block, then zigzag position
    coef = ac.reshape(n * b, 63)[block, k]
    starts = torch.ones_like(block, dtype=torch.bool)
    starts[1:] = block[1:] != block[:-1]
    prev = torch.where(starts, -1, torch.cat([k.new_full((1,), -1), k[:-1]]))
    run = k - prev - 1
    zrl = run >> 4
    asize = _size(coef)
    sym = ((run & 15) << 4) | asize
    ends_at_62 = torch.zeros(n * b, dtype=torch.bool, device=dev)
    ends_at_62[block[k == 62]] = True
    eob = ~ends_at_62  # zeros after the last nonzero coefficient, or no nonzero one at all

    img = torch.arange(n, device=dev).repeat_interleave(b)
    tdc = img * _N_TABLES + 2 * table.repeat(n)  # (N * B,): each block's DC table; its AC table is next
    tac = tdc + 1
    freq = torch.zeros(n * _N_TABLES * _SYMBOLS, dtype=torch.long, device=dev)
    freq.index_add_(0, tdc * _SYMBOLS + dsize, torch.ones_like(dsize))
    freq.index_add_(0, tac[block] * _SYMBOLS + sym, torch.ones_like(sym))
    freq.index_add_(0, tac[block] * _SYMBOLS + 0xF0, zrl)
    freq.index_add_(0, tac * _SYMBOLS, eob.long())
    freq = freq.view(n * _N_TABLES, _SYMBOLS)
    freq[:, 256] = 1
    bits, huffval, code, lens = _tables(freq)
    code, lens = code.flatten(), lens.flatten()

    v_dc = (code[tdc * 256 + dsize] << dsize) | _extra_bits(diff, dsize)
    l_dc = lens[tdc * 256 + dsize] + dsize
    i = tac[block] * 256 + sym
    v_ac = (code[i] << asize) | _extra_bits(coef, asize)
    l_ac = lens[i] + asize
    zc, zl = code[tac[block] * 256 + 0xF0], lens[tac[block] * 256 + 0xF0]
    v_z = torch.zeros_like(zc)
    for r in range(3):  # at most 62 // 16 ZRLs before a coefficient
        v_z = torch.where(zrl > r, (v_z << zl) | zc, v_z)
    l_z = zrl * zl
    v_e = code[tac * 256]
    l_e = torch.where(eob, lens[tac * 256], 0)

    # Bit positions: blocks one after another, each DC, its (ZRL, coefficient) pairs in zigzag
    # order, its EOB; an image's padding after its last block.
    pair = l_z + l_ac
    block_bits = l_dc + l_e
    block_bits.index_add_(0, block, pair)
    image_bits = block_bits.view(n, b).sum(1)
    pad = (-image_bits) % 8
    block_bits.view(n, b)[:, -1] += pad
    block_pos = block_bits.cumsum(0) - block_bits
    done = pair.cumsum(0) - pair  # pairs' bits before each pair, over all blocks
    first = torch.zeros(n * b, dtype=torch.long, device=dev)
    first[block[starts]] = done[starts]
    pos_z = block_pos[block] + l_dc[block] + done - first[block]
    pos_e = block_pos + block_bits - l_e
    last_blocks = torch.arange(1, n + 1, device=dev) * b - 1
    pos_pad = pos_e[last_blocks] - pad
    pos_e = pos_e.clone()
    pos_e[last_blocks] -= pad
    value = torch.cat([v_dc, v_z, v_ac, v_e, (1 << pad) - 1])
    length = torch.cat([l_dc, l_z, l_ac, l_e, pad])
    position = torch.cat([block_pos, pos_z, pos_z + l_z, pos_e, pos_pad + l_e[last_blocks]])
    return (value, length, position, (image_bits + pad) // 8, bits.view(n, _N_TABLES, 17),
            huffval.view(n, _N_TABLES, 256))


def _pack(value: torch.Tensor, length: torch.Tensor, position: torch.Tensor,
          nbytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries' bits, MSB first, as one stream of the images' entropy-coded segments, with a
    zero stuffed after every 0xFF. Returns (bytes (total,) uint8, start (N,), end (N,)): image i's
    segment is bytes[start[i]:end[i]]."""
    dev = value.device
    keep = length > 0
    value, length, position = value[keep], length[keep], position[keep]
    at = position >> 3
    word = value << (64 - (position & 7) - length)  # the entry's bits at the top of 64 (<= 7 + 48 bits)
    size = int(nbytes.sum())
    buf = torch.zeros(size + 8, dtype=torch.long, device=dev)
    for j in range(7):  # entries' bits never overlap, so adding their bytes sets them
        buf.index_add_(0, at + j, (word >> (56 - 8 * j)) & 0xFF)
    buf = buf[:size]
    ff = (buf == 0xFF).long()
    seen = ff.cumsum(0)
    out = torch.zeros(size + (int(seen[-1]) if size else 0), dtype=torch.uint8, device=dev)
    out[torch.arange(size, device=dev) + seen - ff] = buf.to(torch.uint8)
    seen0 = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), seen])
    base = nbytes.cumsum(0) - nbytes
    return out, base + seen0[base], base + nbytes + seen0[base + nbytes]


_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"  # what libjpeg writes by default


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _headers(tables: np.ndarray, bits: np.ndarray, huffval: np.ndarray, subsampling: str, height: int,
             width: int) -> bytes:
    """SOI to SOS of one file, as libjpeg (through jpeglib, component ids 1, 2, 3) writes them."""
    out = [_SOI, _JFIF]
    for t in range(2):
        out.append(_segment(0xDB, bytes([t]) + tables[t].reshape(64)[ZIGZAG].astype(np.uint8).tobytes()))
    sof = bytes([8]) + int(height).to_bytes(2, "big") + int(width).to_bytes(2, "big") + bytes([3])
    for c, (v, h) in enumerate(SAMPLING[subsampling]):
        sof += bytes([c + 1, (h << 4) | v, int(c > 0)])
    out.append(_segment(0xC0, sof))
    for k in range(_N_TABLES):  # DC 0, AC 0, DC 1, AC 1
        b = bits[k, 1:17]
        out.append(_segment(0xC4, bytes([((k % 2) << 4) | (k // 2)]) + b.astype(np.uint8).tobytes()
                            + huffval[k, : int(b.sum())].astype(np.uint8).tobytes()))
    out.append(_segment(0xDA, bytes([3, 1, 0x00, 2, 0x11, 3, 0x11, 0, 63, 0])))
    return b"".join(out)


def write_coefficients_batch(coefficients, tables: torch.Tensor, *, subsampling: str, height: int,
                             width: int) -> list[bytes]:
    """Baseline JPEG files (SOF0, optimized Huffman tables) of N ``height`` x ``width`` images
    from their quantized coefficients, coded on the coefficients' device: for each image the
    bytes of :func:`transforms.semantic_jpeg.write_coefficients`.

    Args:
        coefficients: [Y, Cb, Cr], integer (N, height_in_blocks, width_in_blocks, 8, 8) each, the
            component's block counts for the size and ``subsampling``; values in -1024..1023, AC
            in -1023..1023 (:func:`transforms.jpeg_torch.requantized_coefficients`' output).
        tables: integer (N, 2, 8, 8), the luma and chroma steps in 1..255, natural order.
        subsampling: "4:4:4", "4:2:2" or "4:2:0".

    Returns:
        N files (``bytes``).
    """
    tables = torch.as_tensor(tables)
    _check(coefficients, tables, subsampling, int(height), int(width))
    n = coefficients[0].shape[0]
    if n == 0:
        return []
    diff, ac, table = _scan_symbols(coefficients, subsampling, int(height), int(width))
    value, length, position, nbytes, bits, huffval = _entries(diff, ac, table)
    data, start, end = _pack(value, length, position, nbytes)
    data, start, end = data.cpu().numpy(), start.tolist(), end.tolist()
    bits, huffval, tables = bits.cpu().numpy(), huffval.cpu().numpy(), tables.cpu().numpy()
    return [_headers(tables[i], bits[i], huffval[i], subsampling, height, width) + data[start[i]:end[i]].tobytes()
            + _EOI for i in range(n)]
