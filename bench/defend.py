"""Throughput of the defense's two stages: the Aug-MSROI map and the semantic JPEG encoder.

Map stage: ``aug_msroi`` with its defaults (S perturbations of every image, in one batch of
N * S on CUDA, in passes of ``transforms.saliency.CPU_PASS`` perturbed images on the CPU) on EfficientNet-Lite0 at
224x224, images/s (input images, not forward passes), on CPU (contiguous and channels_last) and,
when available, CUDA; on CUDA also with channels_last and/or bf16 autocast. Memory is managed as
the pipeline's stages do it (``pipeline.allocator``; ``SEMJPEG_SYSTEM_MALLOC=1`` for glibc's
defaults). Plain ``msroi`` (one
pass) is reported alongside, and on CUDA the ceiling without noise (``msroi`` over the N * S
repeated images, per input image). Encoder stage: ``block_qualities`` + ``encode_semantic_jpeg``
(requantize and mosaic) on 224x224 dev images, one process, images/s; uniform Pillow JPEG as the
reference, and the work of ``aug_msroi_gated`` (its map and stabilities: one unperturbed pass
more, and the JPEG check: a uniform JPEG encoded and decoded on the CPU and one more pass; its
flagged images: total-variation denoising, timed on each device as the map stage runs it, then
the encoder).

For scale: the authors report 300 images x 5 perturbations in about 5 s on a Titan X (~60
images/s); the target for the map stage on an H100 is >= 5,000 images/s.

    python bench/defend.py [--quick] [--device auto|cpu|cuda] [--batch 32] [--iters 5] [--cuda-batches 128 256]
                           [--encoder-procs N ...]

On CUDA the map stage is timed at ``--batch`` and at each ``--cuda-batches`` size, in fp32,
channels_last, bf16 autocast and both; cuDNN autotuning is on (its first call is the warm-up).
``--encoder-procs`` also times the encoder in that many worker processes at once (one thread
each), as a worker's SDK processes would run it beside the GPU: does it keep up with the maps?
(requantize, and ``aug_msroi_gated``'s encoder at the shares of clean and IGSM images it flags.)

Prints one JSON line (and each stage's figures to stderr as they come).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import dev_files, emit, positive_int, torch_device  # noqa: E402

AUTHORS_IMAGES_PER_S = 60  # 300 images x 5 perturbations in ~5 s, Titan X (DCC 2018)
TARGET_H100_IMAGES_PER_S = 5000
CUDA_VARIANTS = ("fp32", "channels_last", "bf16", "bf16_channels_last")
CPU_VARIANTS = ("fp32", "channels_last")  # those the CPU times


def dev_images(n: int) -> np.ndarray:
    from transforms.images import decode_image

    return np.stack([decode_image(p.read_bytes()) for p, _ in dev_files(n)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_maps(model, x: torch.Tensor, fn, iters: int, *, bf16: bool) -> float:
    """Images per second of ``fn(model, x)`` (after one warm-up call)."""
    device = x.device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        fn(model, x)  # warm-up: kernels, allocator, oneDNN primitives
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            fn(model, x)
        _sync(device)
    return x.shape[0] * iters / (time.perf_counter() - t)


def map_stage(device: torch.device, batch: int, iters: int, images: np.ndarray, variants: list[str],
              compiled: tuple[str, ...] = (), denoise: bool = True) -> dict:
    """The map stage at one batch size (and, with ``denoise``, the denoising stage); on CUDA its
    own peak memory (``max_memory_gib``), not the peak of every batch size timed before it."""
    import copy

    from transforms.defenses import gated_maps, jpeg_stability
    from transforms.images import to_tensor
    from transforms.jpeg_torch import jpeg_roundtrip
    from transforms.models import build_model
    from transforms.saliency import DEFAULT_SAMPLES, aug_msroi, compile_plain_passes, msroi

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model("efficientnet_lite0", device=device)
    reps = -(-batch // len(images))
    x0 = to_tensor(np.concatenate([images] * reps)[:batch]).to(device)
    seeds = torch.arange(batch, dtype=torch.int64)

    def aug(m, x):
        return aug_msroi(m, x, seeds=seeds)

    def gated(m, x):  # the map stage of aug_msroi_gated: S passes, one unperturbed, the JPEG check
        return gated_maps(m, x, jpeg_quality=50, seeds=seeds)[0]

    def check_libjpeg(m, x):  # the JPEG check alone with libjpeg on the CPU (the default there)
        return jpeg_stability(m, x, quality=50, codec="libjpeg")

    def check_torch(m, x):  # the same check with the JPEG computed on the model's device
        return jpeg_stability(m, x, quality=50, codec="torch")

    out = {"batch": batch, "samples": DEFAULT_SAMPLES, "forward_batch": batch * DEFAULT_SAMPLES}
    for v in variants:
        cl, bf16 = "channels_last" in v, "bf16" in v
        m = model.to(memory_format=torch.channels_last) if cl else model.to(memory_format=torch.contiguous_format)
        x = x0.contiguous(memory_format=torch.channels_last) if cl else x0
        try:
            out[v] = {
                "aug_msroi_images_per_s": round(time_maps(m, x, aug, iters, bf16=bf16), 1),
                "msroi_images_per_s": round(time_maps(m, x, msroi, iters, bf16=bf16), 1),
                "aug_msroi_gated_images_per_s": round(time_maps(m, x, gated, iters, bf16=bf16), 1),
            }
            if device.type == "cuda":
                # The ceiling without noise: S plain passes per image, in one batch of N * S.
                xs = x.repeat_interleave(DEFAULT_SAMPLES, dim=0)
                xs = xs.contiguous(memory_format=torch.channels_last) if cl else xs
                out[v]["s_passes_no_noise_images_per_s"] = round(
                    time_maps(m, xs, msroi, iters, bf16=bf16) / DEFAULT_SAMPLES, 1)
            if v in compiled:
                # --map-compile: the plain passes through torch.compile (the first, untimed call
                # of time_maps compiles: one graph per pass shape); noisy passes stay eager.
                mc = compile_plain_passes(copy.deepcopy(m))
                t0 = time.perf_counter()
                out[v]["compiled"] = {
                    "msroi_images_per_s": round(time_maps(mc, x, msroi, iters, bf16=bf16), 1),
                    "aug_msroi_gated_images_per_s": round(time_maps(mc, x, gated, iters, bf16=bf16), 1),
                    "aug_msroi_images_per_s": round(time_maps(mc, x, aug, iters, bf16=bf16), 1),
                }
                out[v]["compiled"]["seconds_incl_compile"] = round(time.perf_counter() - t0, 1)
                out[v]["compiled"]["jpeg_check_torch_images_per_s"] = round(
                    time_maps(mc, x, check_torch, iters, bf16=bf16), 1)
                out[v]["compiled"]["jpeg_check_libjpeg_images_per_s"] = round(
                    time_maps(mc, x, check_libjpeg, max(1, iters // 5), bf16=bf16), 1)
                # The check's JPEG round trip alone, eager and compiled (not part of --map-compile).
                px = torch.round(x.clamp(0, 1) * 255.0).to(torch.uint8)
                for name, flag in (("eager", False), ("compiled", True)):
                    t0 = time.perf_counter()
                    out[v]["compiled"][f"jpeg_roundtrip_{name}_images_per_s"] = round(
                        time_maps(m, x, lambda _m, _x: jpeg_roundtrip(px, 50, compiled=flag), iters, bf16=False), 1)
                    out[v]["compiled"][f"jpeg_roundtrip_{name}_seconds_incl_compile"] = round(
                        time.perf_counter() - t0, 1)
                # Agreement: compiled against eager, and the two JPEG codecs (the same pixels).
                ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
                with ctx, torch.no_grad():
                    ge, se = gated_maps(m, x, jpeg_quality=50, seeds=seeds)
                    gc, sc = gated_maps(mc, x, jpeg_quality=50, seeds=seeds)
                    lib, dev = check_libjpeg(m, x), check_torch(m, x)
                out[v]["compiled"]["max_abs_diff_vs_eager"] = {
                    "map": float((ge - gc).abs().max()),
                    **{k: float((se[k] - sc[k]).abs().max()) for k in se}}
                out[v]["jpeg_check_max_abs_diff_torch_vs_libjpeg"] = float((lib - dev).abs().max())
        except RuntimeError as e:  # e.g. out of memory, bf16 unsupported
            out[v] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if denoise:
        out["denoise"] = denoise_stage(device, images, iters)
    if device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def denoise_stage(device: torch.device, images: np.ndarray, iters: int) -> dict:
    """``aug_msroi_gated``'s total-variation denoising (weight 0.03) of every image, as the map
    stage runs it for the flagged ones (``denoise_flagged``: one batch on the device, an image at
    a time on the CPU), images/s; on the CPU also scikit-image's, one image at a time; and the
    semantic JPEGs' coefficients computed on the device (``requantized_coefficients``)."""
    from transforms.denoise import denoise_tv_uint8

    from transforms.jpeg_torch import requantized_coefficients

    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    # The semantic JPEGs' coefficients as the map stage computes them on a GPU (prepare_requantized:
    # quality-100 DCT and requantization, batched; K = 5 random levels 30..70 per 16x16 cell).
    grids = torch.randint(0, 5, (len(images), -(-images.shape[1] // 16), -(-images.shape[2] // 16)),
                          generator=torch.Generator().manual_seed(0)).mul_(10).add_(30).to(device)
    out = {"torch_images_per_s": round(time_maps(None, x, lambda _, t: denoise_tv_uint8(t, 0.03), iters,
                                                 bf16=False), 1),
           "requantized_coefficients_images_per_s": round(time_maps(
               None, x, lambda _, t: requantized_coefficients(t, grids), iters, bf16=False), 1)}
    # ... and their files, entropy-coded there (transforms/jpeg_entropy.py; the host joins the
    # headers): batched as the map stage does it, and on CUDA at a map batch of 256 too.
    out["entropy_coding_images_per_s"] = round(entropy_rate(x, grids, iters), 1)
    if device.type == "cuda":
        reps = -(-256 // len(images))
        out["entropy_coding_images_per_s_batch_256"] = round(entropy_rate(
            x.repeat(reps, 1, 1, 1)[:256], grids.repeat(reps, 1, 1)[:256], iters), 1)
    # All of it as the map stage runs it for aug_msroi_gated (prepare_requantized from the host's
    # images and maps: grids, coefficients and every file, stable images' included), at the
    # shares of clean and IGSM images it flags; on CUDA at a batch of 256.
    n = 256 if device.type == "cuda" else len(images)
    batch = np.concatenate([images] * -(-n // len(images)))[:n]
    for share, name in ((0.21, "clean"), (0.88, "igsm")):
        out[f"gated_files_{name}_share_images_per_s"] = round(gated_files_rate(device, batch, share, iters), 1)
    if device.type == "cpu":
        from skimage.restoration import denoise_tv_chambolle

        t = time.perf_counter()
        for im in images:
            denoise_tv_chambolle(im.astype(np.float32) / 255.0, weight=0.03, channel_axis=-1)
        out["skimage_images_per_s"] = round(len(images) / (time.perf_counter() - t), 1)
    return out


def gated_files_rate(device: torch.device, images: np.ndarray, share: float, iters: int) -> float:
    """Images/s of ``prepare_requantized`` writing every ``aug_msroi_gated`` file of ``images`` on
    ``device`` with ``share`` of them flagged (random maps; the flagged images' pixels stand in
    for their denoised ones)."""
    from transforms.defenses import parse_defense, prepare_requantized

    maps = list(np.random.default_rng(0).random((len(images), *images.shape[1:3]), dtype=np.float32))
    scores, spec = _gated_scores(len(images), share), parse_defense("aug_msroi_gated")
    denoised = [{0.03: im} for im in images]
    x = torch.empty(len(images), device=device)  # time_maps only counts images and syncs the device
    return time_maps(None, x, lambda *_: prepare_requantized([spec], list(images), maps, scores, denoised, device,
                                                             entropy=True), iters, bf16=False)


def entropy_rate(x: torch.Tensor, grids: torch.Tensor, iters: int) -> float:
    """Images/s of writing the semantic JPEGs of ``x`` (uint8 NCHW on its device) from their
    coefficients on that device (``write_coefficients_batch``: the bytes come back to the host)."""
    from transforms.jpeg_entropy import write_coefficients_batch
    from transforms.jpeg_torch import requantized_coefficients

    comps, tables = requantized_coefficients(x, grids)
    h, w = x.shape[2:]
    return time_maps(None, x, lambda *_: write_coefficients_batch(comps, tables, subsampling="4:2:0", height=h,
                                                                  width=w), iters, bf16=False)


def encoder_stage(images: np.ndarray, maps: np.ndarray, repeats: int) -> dict:
    from transforms.defenses import denoise_tv
    from transforms.jpeg import encode_jpeg
    from transforms.semantic_jpeg import block_qualities, encode_semantic_jpeg, write_coefficients

    out = {}

    def rate(fn, inputs=images) -> float:
        fn(inputs[0], maps[0])
        t = time.perf_counter()
        for _ in range(repeats):
            for img, m in zip(inputs, maps):
                fn(img, m)
        return round(len(inputs) * repeats / (time.perf_counter() - t), 1)

    out["requantize_images_per_s"] = rate(lambda i, m: encode_semantic_jpeg(i, block_qualities(m)))
    out["mosaic_images_per_s"] = rate(lambda i, m: encode_semantic_jpeg(i, block_qualities(m), method="mosaic"))
    out["uniform_q50_images_per_s"] = rate(lambda i, m: encode_jpeg(i, 50, "4:2:0", optimize=True))
    # aug_msroi_gated's flagged images: total-variation denoising, then semantic JPEG at 50..90
    # (its stable images cost one uniform JPEG, as above). The pipeline denoises them in the map
    # stage, on the map model's device, so its encoder does only the second part.
    out["gated_flagged_with_denoising_images_per_s"] = rate(
        lambda i, m: encode_semantic_jpeg(denoise_tv(i, 0.03), block_qualities(m, q_low=50, q_high=90)))
    denoised = [denoise_tv(i, 0.03) for i in images]
    out["gated_flagged_images_per_s"] = rate(
        lambda i, m: encode_semantic_jpeg(i, block_qualities(m, q_low=50, q_high=90)), denoised)
    # On a GPU worker the map stage also computes the coefficients (prepare_requantized): the
    # encoder then only writes the file.
    from transforms.defenses import parse_defense, prepare_requantized

    spec = parse_defense("aug_msroi_gated")
    flag_all = {"stability": np.zeros(len(images)), "jpeg_stability": np.zeros(len(images))}
    prepared = prepare_requantized([spec], list(images), list(maps), flag_all, [{0.03: d} for d in denoised])
    files = [p["aug_msroi_gated"] for p in prepared]
    out["quality_grid_images_per_s"] = rate(lambda i, m: block_qualities(m, q_low=50, q_high=90))
    out["gated_flagged_prepared_images_per_s"] = rate(
        lambda f, m: write_coefficients(f.coefficients, f.tables, subsampling="4:2:0", height=images.shape[1],
                                        width=images.shape[2]), files)
    # Where the device also entropy-codes the files, the host's share of writing one: its headers.
    from transforms.jpeg_entropy import _headers

    bits, vals = np.zeros((4, 17), dtype=np.int64), np.zeros((4, 256), dtype=np.int64)
    bits[:, 8] = 1
    out["entropy_headers_images_per_s"] = rate(
        lambda f, m: _headers(f.tables, bits, vals, "4:2:0", images.shape[1], images.shape[2]), files)
    # The gated encoder's rate at the shares of images it flags on the dev images (README, "The
    # stability gate": 21% of clean, 68% of FGSM, 88% of IGSM images), from the two rates above.
    out["gated_encoder_images_per_s_by_flagged_share"] = {
        str(share): round(1 / (share / out["gated_flagged_images_per_s"]
                               + (1 - share) / out["uniform_q50_images_per_s"]), 1)
        for share in (0.21, 0.68, 0.88)}
    sizes = [len(encode_semantic_jpeg(i, block_qualities(m))) for i, m in zip(images, maps)]
    msizes = [len(encode_semantic_jpeg(i, block_qualities(m), method="mosaic")) for i, m in zip(images, maps)]
    out["requantize_mean_bytes"] = round(float(np.mean(sizes)), 1)
    out["mosaic_mean_bytes"] = round(float(np.mean(msizes)), 1)
    return out


def _encode_chunk(args: tuple) -> int:
    """Worker: encode ``repeats`` times over the images; returns images encoded. ``share`` None:
    requantize every image (with ``prepared``, write it from its coefficients); a number: ``aug_msroi_gated``'s encoder work with that share of the
    images flagged (their ``denoised`` pixels, as the map stage hands them over: semantic JPEG at
    50..90) and the others stable (uniform JPEG at 50); image i is flagged when frac(i * share) <
    share, which spreads them evenly. With ``prepared`` (a GPU worker's map stage computed the
    coefficients) a flagged image costs the CPU its quality grid and the writing. With the name
    of a ``*_files`` set (the map stage wrote every file, grids on the device), the encoder's own
    code runs (``apply_defense`` with each image's file and scores); the files' headers, 13 µs
    each, joined in the map stage, are timed apart (``entropy_headers_images_per_s``)."""
    images, denoised, maps, repeats, share, prepared = args
    files = isinstance(prepared, str) and prepared.endswith("_files")
    if isinstance(images, str):  # the pool's copy (_keep_inputs), not a pickled one per task
        images, denoised, maps, prepared = (_INPUTS["images"], _INPUTS["denoised"], _INPUTS["maps"],
                                            _INPUTS["prepared"].get(prepared))
    torch.set_num_threads(1)
    from transforms.jpeg import encode_jpeg
    from transforms.semantic_jpeg import block_qualities, encode_semantic_jpeg, write_coefficients

    h, w = images.shape[1:3]
    flagged = [share is not None and (i * share) % 1.0 < share for i in range(len(images))]
    if files:  # the map stage wrote every file: what is left is the encoder's own code
        from transforms.defenses import apply_defense, parse_defense

        spec = parse_defense("aug_msroi" if share is None else "aug_msroi_gated")
        scores = {} if share is None else _gated_scores(len(images), share)
        for _ in range(repeats):
            for i, m in enumerate(maps):
                apply_defense(spec, images[i], saliency=m, prepared=prepared[i],
                              **{k: float(v[i]) for k, v in scores.items()})
        return len(images) * repeats
    for _ in range(repeats):
        for i, m in enumerate(maps):
            if share is None and prepared is None:
                encode_semantic_jpeg(images[i], block_qualities(m))
            elif share is None:
                block_qualities(m)  # computed in the map stage, on the CPU
                f = prepared[i]
                write_coefficients(f.coefficients, f.tables, subsampling="4:2:0", height=h, width=w)
            elif not flagged[i]:
                encode_jpeg(images[i], 50, "4:2:0", optimize=True)
            elif prepared is None:
                encode_semantic_jpeg(denoised[i], block_qualities(m, q_low=50, q_high=90))
            else:
                block_qualities(m, q_low=50, q_high=90)  # computed in the map stage, on the CPU
                f = prepared[i]
                write_coefficients(f.coefficients, f.tables, subsampling="4:2:0", height=h, width=w)
    return len(images) * repeats


def _gated_scores(n: int, share: float) -> dict:
    """Map-stage scores that make ``aug_msroi_gated`` flag image i when frac(i * share) < share
    (as ``_encode_chunk`` spreads them) and denoise each flagged one."""
    flagged = np.array([(i * share) % 1.0 < share for i in range(n)])
    return {"stability": np.where(flagged, 0.2, 1.0), "jpeg_stability": np.full(n, 0.9),
            "noise_level": np.full(n, 9.0)}


#: A pool worker's inputs (encoder_parallel), sent once when the worker starts.
_INPUTS: dict = {}


def _keep_inputs(inputs: dict) -> None:
    _INPUTS.update(inputs)


def encoder_parallel(images: np.ndarray, maps: np.ndarray, procs: int, repeats: int) -> dict:
    """Encoder images/s with ``procs`` processes encoding at once (each its own copy of the
    images), timed from the first start to the last finish, pool start-up excluded: requantize,
    and ``aug_msroi_gated``'s encoder at the shares of clean and IGSM images it flags (21%, 88%;
    its flagged images denoised beforehand, as in the pipeline), each with and without the
    coefficients computed beforehand (``_prepared``: as on a GPU worker until stop 25), and with
    the files written beforehand (``_device_files``: as on a GPU worker now)."""
    import multiprocessing as mp

    from transforms.defenses import denoise_tv, parse_defense, prepare_requantized

    denoised = np.stack([denoise_tv(i, 0.03) for i in images])
    flag_all = {"stability": np.zeros(len(images)), "jpeg_stability": np.zeros(len(images))}
    prepared = [p["aug_msroi_gated"] for p in prepare_requantized(
        [parse_defense("aug_msroi_gated")], list(images), list(maps), flag_all, [{0.03: d} for d in denoised])]
    semantic = [p["aug_msroi"] for p in prepare_requantized(
        [parse_defense("aug_msroi")], list(images), list(maps), None, [{} for _ in images])]
    # ... and with every file written there too (on a GPU: transforms/jpeg_entropy.py), the gated
    # defense's stable images' uniform JPEGs included.
    gated_files = {share: [p["aug_msroi_gated"] for p in prepare_requantized(
        [parse_defense("aug_msroi_gated")], list(images), list(maps), _gated_scores(len(images), share),
        [{0.03: d} for d in denoised], entropy=True)] for share in (0.21, 0.88)}
    semantic_files = [p["aug_msroi"] for p in prepare_requantized(
        [parse_defense("aug_msroi")], list(images), list(maps), None, [{} for _ in images], entropy=True)]
    ctx = mp.get_context("spawn")  # no forked torch state
    out = {"procs": procs}
    # Each worker gets the inputs once, at its start: sent with every task, their pickling (some
    # 20 MB) would be timed as encoder work.
    inputs = {"images": images, "denoised": denoised, "maps": maps,
              "prepared": {"semantic": semantic, "gated": prepared, "semantic_files": semantic_files,
                           "gated_0.21_files": gated_files[0.21], "gated_0.88_files": gated_files[0.88]}}
    with ctx.Pool(procs, initializer=_keep_inputs, initargs=(inputs,)) as pool:
        pool.map(_encode_chunk, [(images[:2], None, maps[:2], 1, None, None)] * procs)  # warm-up: imports, libjpeg
        for name, share, prep in (("requantize", None, None), ("requantize_prepared", None, "semantic"),
                                  ("gated_clean_share", 0.21, None),
                                  ("gated_igsm_share", 0.88, None), ("gated_clean_share_prepared", 0.21, "gated"),
                                  ("gated_igsm_share_prepared", 0.88, "gated"),
                                  ("requantize_device_files", None, "semantic_files"),
                                  ("gated_clean_share_device_files", 0.21, "gated_0.21_files"),
                                  ("gated_igsm_share_device_files", 0.88, "gated_0.88_files")):
            t = time.perf_counter()
            done = sum(pool.map(_encode_chunk, [("pool", None, None, repeats, share, prep)] * procs))
            out[f"{name}_images_per_s"] = round(done / (time.perf_counter() - t), 1)
    out["per_process_requantize_images_per_s"] = round(out["requantize_images_per_s"] / procs, 1)
    return out


def _device(text: str) -> str:
    """argparse type of ``--device``: ``auto``, or a device :func:`~bench._common.torch_device` takes."""
    return text if text == "auto" else torch_device(text)


def compile_variant_error(devices: list[str], compile: list[str] | None, cuda_variants: list[str]) -> str | None:
    """Why ``--compile`` cannot be timed on ``devices``, or None: a variant the CPU does not time
    when only the CPU is timed, or, on CUDA, one missing from ``--cuda-variants`` (compiled
    variants are timed beside their eager runs, so it would be skipped without a word)."""
    if compile is None:
        return None
    cuda = any(torch.device(d).type == "cuda" for d in devices)
    cuda_only = [v for v in compile if v not in CPU_VARIANTS]
    if cuda_only and not cuda:
        return f"--compile: {', '.join(cuda_only)} is timed on CUDA only; the CPU times {' and '.join(CPU_VARIANTS)}"
    missing = [v for v in (compile or ["bf16_channels_last"]) if v not in cuda_variants]
    if cuda and missing:
        return (f"--compile: {', '.join(missing)} is not among --cuda-variants ({' '.join(cuda_variants)}); "
                "a compiled variant is timed beside its eager one")
    return None


def _progress(key: str, value) -> None:
    print(f"# {key}: {value}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batch, one iteration: a smoke run")
    ap.add_argument("--device", type=_device, default="auto", help="auto (CPU, and CUDA when available), cpu or cuda")
    ap.add_argument("--batch", type=positive_int, default=32, help="input images per call (x S perturbations)")
    ap.add_argument("--iters", type=positive_int, default=5)
    ap.add_argument("--cuda-batches", type=positive_int, nargs="*", default=[128, 256],
                    help="further batch sizes timed on CUDA (besides --batch)")
    ap.add_argument("--cuda-variants", nargs="+", default=list(CUDA_VARIANTS), choices=CUDA_VARIANTS,
                    help="precisions/layouts timed on CUDA (default: all)")
    ap.add_argument("--images", type=positive_int, default=32, help="distinct dev images")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--encoder-procs", type=positive_int, nargs="*", default=[],
                    help="also time the encoder in this many processes at once (e.g. 2 16)")
    ap.add_argument("--compile", nargs="*", default=None, choices=CUDA_VARIANTS, metavar="VARIANT",
                    help="also time the map stage with --map-compile (torch.compile of the plain passes) in "
                         f"these variants ({', '.join(CUDA_VARIANTS)}; the CPU times {' and '.join(CPU_VARIANTS)} "
                         "only; default with no value: channels_last on the CPU, bf16_channels_last on CUDA); each "
                         "compile takes seconds to a minute")
    ap.add_argument("--no-encoder", action="store_true", help="skip the encoder stage")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.iters, args.images = min(args.batch, 8), 1, min(args.images, 8)

    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    bad = compile_variant_error(devices, args.compile, args.cuda_variants)
    if bad:
        ap.error(bad)
    images = dev_images(args.images)
    from pipeline.allocator import keep_freed_memory

    record = {"authors_images_per_s": AUTHORS_IMAGES_PER_S, "target_h100_images_per_s": TARGET_H100_IMAGES_PER_S,
              "torch": torch.__version__, "threads": args.threads, "quick": args.quick,
              "kept_freed_memory": keep_freed_memory()}  # as the pipeline's stages run
    for d in devices:
        device = torch.device(d)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            record["cuda_device"] = torch.cuda.get_device_name(device)
            variants = args.cuda_variants
            max_batch = max([args.batch] + ([] if args.quick else args.cuda_batches))
            iters = args.iters if args.quick else max(args.iters, 10)
            compiled = () if args.compile is None else tuple(args.compile or ["bf16_channels_last"])
            for batch in [args.batch] + ([] if args.quick else args.cuda_batches):
                record[f"map_cuda_batch{batch}"] = map_stage(device, batch, iters, images, variants,
                                                             compiled if batch == max_batch else (),
                                                             denoise=batch == args.batch)
                _progress(f"map_cuda_batch{batch}", record[f"map_cuda_batch{batch}"])
        else:
            batch = args.batch if args.quick else min(args.batch, 16)  # CPU: keep the N*S batch modest
            # fp32 is the contiguous layout; channels_last is the pipeline's on the CPU (--memory-format auto)
            compiled = () if args.compile is None else tuple(args.compile or ["channels_last"])
            record["map_cpu"] = map_stage(device, batch, args.iters, images, list(CPU_VARIANTS), compiled)
            _progress("map_cpu", record["map_cpu"])

    if args.no_encoder:
        emit(record)
        return
    from transforms.images import to_tensor
    from transforms.models import build_model
    from transforms.saliency import aug_msroi

    model = build_model("efficientnet_lite0")
    maps = aug_msroi(model, to_tensor(images), seeds=torch.arange(len(images)), max_batch=40).numpy()
    record["encoder_cpu_one_process"] = encoder_stage(images, maps, 1 if args.quick else 3)
    _progress("encoder_cpu_one_process", record["encoder_cpu_one_process"])
    record["cpu_count"] = os.cpu_count()
    for procs in args.encoder_procs:
        record[f"encoder_cpu_{procs}_procs"] = encoder_parallel(images, maps, procs, 1 if args.quick else 10)
        _progress(f"encoder_cpu_{procs}_procs", record[f"encoder_cpu_{procs}_procs"])
    emit(record)


if __name__ == "__main__":
    main()
