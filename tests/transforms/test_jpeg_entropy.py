"""The torch entropy coder against libjpeg-turbo itself (through jpeglib): the same files, byte
for byte, and the same optimal Huffman tables as jchuff.c's procedure."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import transforms.jpeg_entropy as entropy
from transforms.jpeg_dct import SAMPLING
from transforms.jpeg_entropy import write_coefficients_batch
from transforms.jpeg_torch import requantized_coefficients
from transforms.semantic_jpeg import block_qualities, write_coefficients

SUBSAMPLINGS = list(SAMPLING)
#: The CPU, and a GPU where there is one: its scatters, sorts and bit packing are other kernels.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def _libjpeg(comps, tables, subsampling, h, w) -> list[bytes]:
    return [write_coefficients([c[i].numpy() for c in comps], tables[i].numpy(), subsampling=subsampling, height=h,
                               width=w) for i in range(comps[0].shape[0])]


def _assert_same(comps, tables, subsampling, h, w, device="cpu") -> list[bytes]:
    got = write_coefficients_batch([c.to(device) for c in comps], tables.to(device), subsampling=subsampling,
                                   height=h, width=w)
    want = _libjpeg(comps, tables, subsampling, h, w)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            at = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
            pytest.fail(f"image {i} ({h}x{w}, {subsampling}): {len(a)} bytes against libjpeg's {len(b)}, "
                        f"first difference at byte {at}")
    return got


def _component_shapes(n, h, w, subsampling):
    samp = SAMPLING[subsampling]
    vmax, hmax = max(v for v, _ in samp), max(s for _, s in samp)
    return [(n, -(-h * v // (vmax * 8)), -(-w * s // (hmax * 8)), 8, 8) for v, s in samp]


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS)
def test_semantic_jpegs_of_photos_and_noise_are_libjpegs_files(photos, subsampling):
    """Requantized coefficients of photos and of noise, whole MCUs and not (the dummy blocks at
    the right and bottom edges), single blocks, a flat image: the files libjpeg writes."""
    rng = np.random.default_rng(3)
    cases = [(np.stack(photos), 16), (rng.integers(0, 256, (3, 37, 53, 3), dtype=np.uint8), 8),
             (rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8), 8), (rng.integers(0, 256, (1, 1, 1, 3), dtype=np.uint8), 8),
             (np.full((1, 33, 17, 3), 128, np.uint8), 16), (rng.integers(0, 256, (2, 16, 40, 3), dtype=np.uint8), 32)]
    for images, block in cases:
        n, h, w = images.shape[:3]
        grids = np.stack([block_qualities(rng.random((h, w)), block=block, q_low=5, q_high=95) for _ in range(n)])
        comps, tables = requantized_coefficients(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                                                 torch.from_numpy(grids), block=block, subsampling=subsampling)
        files = _assert_same(comps, tables, subsampling, h, w)
        for f, image in zip(files, images):  # and any decoder reads them
            assert np.asarray(Image.open(io.BytesIO(f)).convert("RGB")).shape == image.shape


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS)
def test_uniform_quality_coefficients_give_pillows_own_files(photos, subsampling):
    """From libjpeg's quantized coefficients at a uniform quality (jpeg_torch's forward path),
    the coder writes what Pillow writes (libjpeg-turbo compressing pixels, optimized Huffman
    tables): a second libjpeg path, besides jpeglib's transcoding one."""
    from transforms.jpeg import encode_jpeg
    from transforms.jpeg_torch import uniform_coefficients

    rng = np.random.default_rng(8)
    batches = [np.stack(photos), rng.integers(0, 256, (2, 37, 53, 3), dtype=np.uint8),
               rng.integers(0, 256, (1, 1, 3, 3), dtype=np.uint8)]
    for quality in (1, 10, 50, 90, 100):
        for images in batches:
            comps, tables = uniform_coefficients(torch.from_numpy(images).permute(0, 3, 1, 2), quality, subsampling)
            assert comps[0].dtype == torch.int16 and tuple(tables.shape) == (len(images), 2, 8, 8)
            got = write_coefficients_batch(comps, tables, subsampling=subsampling, height=images.shape[1],
                                           width=images.shape[2])
            assert got == [encode_jpeg(im, quality, subsampling, optimize=True) for im in images], quality
    with pytest.raises(ValueError, match="quality"):
        uniform_coefficients(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subsampling", SUBSAMPLINGS)
def test_extreme_and_sparse_coefficients_are_libjpegs_files(subsampling, device):
    """Coefficients no image gives: the largest magnitudes (DC differences of 2047, size-10 AC),
    long zero runs (up to three ZRLs before a coefficient, a coefficient only at the last
    position), all-zero blocks, dense blocks without an EOB, and scans full of 0xFF bytes."""
    rng = np.random.default_rng(11)
    n, h, w = 3, 40, 56
    comps = []
    for shape in _component_shapes(n, h, w, subsampling):
        c = rng.integers(-1023, 1024, shape)
        c *= rng.random(shape) < rng.choice([0.0, 0.02, 0.3, 1.0], size=shape[:3] + (1, 1))  # density per block
        c[..., 7, 7] = rng.choice([0, 1, -1, 1023, -1023], size=shape[:3])  # last zigzag position
        c[..., 0, 0] = rng.choice([-1024, 1023, 0, 5], size=shape[:3])  # DC: differences up to 2047
        comps.append(torch.from_numpy(c.astype(np.int16)))
    tables = torch.from_numpy(rng.integers(1, 256, (n, 2, 8, 8)))
    _assert_same(comps, tables, subsampling, h, w, device)
    ones = [torch.full(s, -1, dtype=torch.int16) for s in _component_shapes(1, 24, 24, subsampling)]
    _assert_same(ones, torch.ones(1, 2, 8, 8, dtype=torch.int32), subsampling, 24, 24, device)


def _libjpeg_table(freq: list[int]) -> tuple[list[int], list[int]]:
    """jchuff.c ``jpeg_gen_optimal_table``, transcribed line by line: (bits[0..16], huffval)."""
    freq = list(freq) + [1]
    codesize, others = [0] * 257, [-1] * 257
    while True:
        c1, v = -1, 1 << 60
        for i in range(257):
            if freq[i] and freq[i] <= v:
                v, c1 = freq[i], i
        c2, v = -1, 1 << 60
        for i in range(257):
            if freq[i] and freq[i] <= v and i != c1:
                v, c2 = freq[i], i
        if c2 < 0:
            break
        freq[c1] += freq[c2]
        freq[c2] = 0
        codesize[c1] += 1
        while others[c1] >= 0:
            c1 = others[c1]
            codesize[c1] += 1
        others[c1] = c2
        codesize[c2] += 1
        while others[c2] >= 0:
            c2 = others[c2]
            codesize[c2] += 1
    bits = [0] * 33
    for i in range(257):
        if codesize[i]:
            bits[codesize[i]] += 1
    for i in range(32, 16, -1):
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
    i = 16
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1
    huffval = [j for length in range(1, 33) for j in range(256) if codesize[j] == length]
    return bits[:17], huffval


def test_optimal_tables_follow_libjpegs_procedure():
    """Batched tables equal the transcription of libjpeg's, ties and the 16-bit limit included:
    random counts, many equal counts, one symbol, and counts in powers of two (codes of up to 25
    bits before the limit); the codes are canonical and prefix-free."""
    rng = np.random.default_rng(0)
    counts = [rng.integers(0, 50, 256) * (rng.random(256) < 0.5), np.full(256, 7), np.eye(1, 256, 200, dtype=int)[0] * 9,
              rng.integers(0, 3, 256)]
    skew = np.zeros(256, dtype=int)
    skew[rng.permutation(256)[:25]] = 2 ** np.arange(25)
    counts.append(skew)
    freq = torch.from_numpy(np.stack([np.append(c, 1) for c in counts]).astype(np.int64))
    assert int(entropy._code_sizes(freq).max()) > 16  # the limit is exercised
    bits, huffval, code, length = entropy._tables(freq)
    for t, c in enumerate(counts):
        want_bits, want_val = _libjpeg_table(c.tolist())
        assert bits[t].tolist() == want_bits, t
        assert huffval[t, : len(want_val)].tolist() == want_val, t
        used = [s for s in range(256) if c[s]]
        assert sorted(used) == sorted(want_val)
        words = sorted(format(int(code[t, s]), f"0{int(length[t, s])}b") for s in used)
        assert all(1 <= len(x) <= 16 for x in words) and "1" * len(words[-1]) not in words
        assert not any(b.startswith(a) for a, b in zip(words, words[1:]))  # prefix-free (sorted neighbours)


@pytest.mark.parametrize("device", DEVICES)
def test_a_file_that_needs_the_length_limit_is_libjpegs(monkeypatch, device):
    """A luma AC table whose pure Huffman codes pass 16 bits (symbols in Fibonacci counts): the
    adjusted table and the scan are libjpeg's."""
    fib = [1, 2]
    while len(fib) < 20:
        fib.append(fib[-1] + fib[-2])
    symbols = [(run, size) for run in range(2) for size in range(1, 11)]  # 20 distinct AC symbols
    seq = [s for s, f in zip(symbols, fib) for _ in range(f)]
    np.random.default_rng(1).shuffle(seq)
    blocks, cur, pos = [], np.zeros(64, dtype=np.int16), 1
    for run, size in seq:
        if pos + run > 63:
            blocks.append(cur)
            cur, pos = np.zeros(64, dtype=np.int16), 1
        cur[entropy.ZIGZAG[pos + run]] = (1 << (size - 1))
        pos += run + 1
    blocks.append(cur)
    cols = 32
    rows = -(-len(blocks) // cols)
    y = np.zeros((rows * cols, 64), dtype=np.int16)
    y[: len(blocks)] = blocks
    h, w = rows * 8, cols * 8
    comps = [torch.from_numpy(y.reshape(1, rows, cols, 8, 8))] + [torch.zeros(1, rows, cols, 8, 8, dtype=torch.int16)] * 2
    limited = []
    real = entropy._limit_lengths
    monkeypatch.setattr(entropy, "_limit_lengths", lambda b: limited.append(1) or real(b))
    _assert_same(comps, torch.ones(1, 2, 8, 8, dtype=torch.int32), "4:4:4", h, w, device)
    assert limited


def test_batches_equal_single_images_and_inputs_are_kept():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.integers(0, 256, (4, 3, 24, 40), dtype=np.uint8))
    comps, tables = requantized_coefficients(x, torch.from_numpy(rng.integers(20, 90, (4, 2, 3))))
    before = [c.clone() for c in comps]
    batch = write_coefficients_batch(comps, tables, subsampling="4:2:0", height=24, width=40)
    for i in range(4):
        one = write_coefficients_batch([c[i : i + 1] for c in comps], tables[i : i + 1], subsampling="4:2:0",
                                       height=24, width=40)
        assert one == [batch[i]]
    assert all(torch.equal(a, b) for a, b in zip(before, comps))
    empty = [c[:0] for c in comps]
    assert write_coefficients_batch(empty, tables[:0], subsampling="4:2:0", height=24, width=40) == []


def test_bad_input_is_a_clear_error():
    comps = [torch.zeros(s, dtype=torch.int16) for s in _component_shapes(1, 16, 16, "4:2:0")]
    tables = torch.ones(1, 2, 8, 8, dtype=torch.int32)
    args = dict(subsampling="4:2:0", height=16, width=16)
    write_coefficients_batch(comps, tables, **args)  # fine
    for kw, match in [(dict(subsampling="4:1:1"), "subsampling"), (dict(height=0), "1..65500"),
                      (dict(width=65536), "1..65500"),
                      (dict(height=24), "component coefficients")]:
        with pytest.raises(ValueError, match=match):
            write_coefficients_batch(comps, tables, **{**args, **kw})
    with pytest.raises(ValueError, match="3 components"):
        write_coefficients_batch(comps[:1], tables, **args)
    with pytest.raises(ValueError, match="component coefficients"):
        write_coefficients_batch([comps[0].float(), *comps[1:]], tables, **args)
    for bad in (1024, -1024):  # an AC coefficient outside size category 10 (-1024 is a valid DC)
        big = comps[0].clone()
        big[0, 0, 0, 3, 1] = bad
        with pytest.raises(ValueError, match="range"):
            write_coefficients_batch([big, *comps[1:]], tables, **args)
    for t in (tables * 0, tables * 256, tables[:, :1], tables.float()):
        with pytest.raises(ValueError, match="tables"):
            write_coefficients_batch(comps, t, **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_entropy_coding_on_cuda_writes_the_cpus_files():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.integers(0, 256, (6, 3, 64, 48), dtype=np.uint8))
    grids = torch.from_numpy(rng.integers(10, 96, (6, 4, 3)))
    comps, tables = requantized_coefficients(x, grids)
    cpu = write_coefficients_batch(comps, tables, subsampling="4:2:0", height=64, width=48)
    gpu = write_coefficients_batch([c.cuda() for c in comps], tables.cuda(), subsampling="4:2:0", height=64, width=48)
    assert gpu == cpu == _libjpeg(comps, tables, "4:2:0", 64, 48)
