"""Input-transformation defenses: a registry of encoders from uint8 HWC RGB to stored bytes.

Each defense is ``defense(image, *, params...) -> Encoded``; ``--defense name:k=v`` specs are
checked against :data:`DEFENSES`. Parameters named in :data:`HIDDEN` are filled by the runner, not
by specs: the saliency map of the semantic defenses (and, for ``aug_msroi_gated``, the image's
prediction stabilities), computed batched on the model beforehand (:func:`map_request` says which
map a spec needs), and the size of the file a ``jpeg:match=...`` defense must not exceed.

* ``none``: the image stored losslessly (PNG).
* ``jpeg``: uniform JPEG at one IJG quality, or rate-controlled: ``bytes=N`` (the highest quality
  whose file is at most N bytes) or ``match=<defense>`` (per image, the highest quality whose
  file is no larger than that other defense's file: the fair, rate-matched baseline).
* ``msroi`` and ``aug_msroi``: semantic JPEG (Prakash et al., DCC 2017 and 2018): the MSROI or
  Aug-MSROI saliency map sets each 16x16 block's quality among ``levels`` qualities from
  ``q_low`` to ``q_high``; salient blocks are quantized finely, the rest coarsely; one standard
  baseline JPEG. ``bytes=N`` slides the quality window, its width ``q_high - q_low`` kept, to the
  highest place (``q_high`` at most 100) whose file fits, as ``jpeg:bytes=N`` takes the highest
  uniform quality: the spec's own ``q_low``/``q_high`` then set only the width.
* ``aug_msroi_gated``: our extension: images whose prediction is unstable under the map's input
  noise or under the stable images' JPEG (likely adversarial) are denoised and get semantic JPEG
  at finer qualities; stable ones a uniform JPEG. The runner fills its ``stability`` and
  ``jpeg_stability`` with the map, and, for a flagged image, its ``denoised`` pixels, denoised
  on the map model's device (:func:`denoise_flagged`).
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from . import saliency as _saliency
from .denoise import denoise_tv_uint8, noise_levels
from .denoise import noise_level as _noise_level
from .images import to_tensor, to_uint8
from .jpeg import JPEG_MAX_DIMENSION, Subsampling, decode_rgb, encode_jpeg, encode_png
from .jpeg_torch import jpeg_roundtrip
from .semantic_jpeg import (
    MAX_LEVELS,
    Binning,
    Method,
    _check_grid,
    block_qualities,
    encode_jpeg_max_bytes,
    encode_semantic_jpeg,
    encode_semantic_jpeg_bytes,
    write_coefficients,
)
from .specs import Spec, format_spec, parse_spec, spec_params

__all__ = [
    "DEFENSES", "HIDDEN", "Encoded", "parse_defense", "apply_defense", "map_request", "match_target",
    "none", "jpeg", "msroi", "aug_msroi", "aug_msroi_gated", "denoise_tv", "jpeg_stability", "compiles_roundtrip", "gated_maps",
    "gate_flagged", "denoise_weight", "flagged_denoise", "image_noise_levels", "denoise_flagged", "Prepared",
    "prepares_on", "entropy_codes_on", "prepare_requantized", "matched_defense",
    "defend_images", "encode_batch",
]

#: Runner-filled parameters, never set from a spec.
HIDDEN = ("saliency", "stability", "jpeg_stability", "noise_level", "denoised", "prepared", "matched_bytes")


class Encoded(NamedTuple):
    """Stored form of a defended image: bytes, file extension, and metadata for its row
    (``quality`` of a uniform JPEG, ``quality_levels`` {quality: blocks} of a semantic one)."""

    data: bytes
    ext: str
    info: Mapping[str, Any] = {}


def none(image: np.ndarray) -> Encoded:
    """No defense: the image stored losslessly (PNG)."""
    return Encoded(encode_png(image), "png")


def jpeg(
    image: np.ndarray,
    *,
    quality: int = 75,
    subsampling: Subsampling = "4:2:0",
    optimize: bool = True,
    bytes: int | None = None,
    match: str | None = None,
    matched_bytes: int | None = None,
) -> Encoded:
    """Uniform JPEG (IJG quality scaling, libjpeg-turbo through Pillow).

    ``quality`` 1..100; or ``bytes=N``: the highest quality whose file is at most N bytes; or
    ``match=<defense>``: the same against another defense's file for this image (the runner
    passes its size as ``matched_bytes``). Huffman tables are optimized by default (pixels are
    unchanged; files are a few percent smaller), as the semantic encoder's are, so rate
    comparisons are about where the bits go. When nothing fits, quality 1 is used.
    """
    target = bytes if bytes is not None else matched_bytes
    if match is not None and matched_bytes is None:
        raise ValueError(f"jpeg:match={match} needs the matched defense's size")
    if target is None:
        data = encode_jpeg(image, quality, subsampling, optimize=optimize)
        return Encoded(data, "jpg", {"quality": int(quality)})
    data, q = encode_jpeg_max_bytes(image, int(target), subsampling, optimize=optimize)
    return Encoded(data, "jpg", {"quality": int(q), "target_bytes": int(target)})


class Prepared(NamedTuple):
    """A semantic JPEG's content computed beforehand (:func:`prepare_requantized`, on the map
    model's device): the quality grid and the requantized coefficients and tables, and where the
    device also entropy-coded them (:mod:`transforms.jpeg_entropy`), the file itself; what is left
    is at most the writing (:func:`transforms.semantic_jpeg.write_coefficients`). Without a
    quality grid: the uniform JPEG of an image ``aug_msroi_gated`` does not flag."""

    qualities: np.ndarray | None  # int (grid rows, grid columns); None: a stable image's uniform JPEG
    coefficients: list | None  # [Y, Cb, Cr] int16 (bh, bw, 8, 8); None when ``data`` is given
    tables: np.ndarray  # int (2, 8, 8)
    data: bytes | None = None  # the finished file, written on the device


def _semantic(image, saliency, *, levels, q_low, q_high, binning, method, subsampling, bytes,
              prepared: Prepared | None = None) -> Encoded:
    if saliency is None:
        raise ValueError("semantic JPEG needs a saliency map")
    info: dict[str, Any] = {}
    if prepared is not None and prepared.qualities is None:  # a stable image's uniform JPEG: not this file
        prepared = None
    if prepared is not None:
        if method != "requantize" or bytes is not None:
            raise ValueError("prepared coefficients are for method=requantize without a bytes= target")
        data = prepared.data if prepared.data is not None else write_coefficients(
            prepared.coefficients, prepared.tables, subsampling=subsampling, height=image.shape[0],
            width=image.shape[1])
        grid = np.asarray(prepared.qualities)
    else:
        if bytes is not None:
            res = encode_semantic_jpeg_bytes(image, saliency, max_bytes=int(bytes), levels=levels,
                                             spread=q_high - q_low, binning=binning, method=method,
                                             subsampling=subsampling)
            data, q_low, q_high = res.data, res.q_low, res.q_high
            info["target_bytes"] = int(bytes)
        grid = block_qualities(saliency, levels=levels, q_low=q_low, q_high=q_high, binning=binning)
        if bytes is None:
            data = encode_semantic_jpeg(image, grid, method=method, subsampling=subsampling)
    info["quality_levels"] = dict(sorted(Counter(int(q) for q in grid.ravel()).items()))
    return Encoded(data, "jpg", info)


def msroi(
    image: np.ndarray,
    *,
    top_k: int = 5,
    threshold: float | None = None,
    levels: int = 5,
    q_low: int = 30,
    q_high: int = 70,
    binning: Binning = "value",
    method: Method = "requantize",
    subsampling: Subsampling = "4:2:0",
    bytes: int | None = None,
    saliency: np.ndarray | None = None,
    prepared: Prepared | None = None,
) -> Encoded:
    """Semantic JPEG driven by the plain MSROI map (DCC 2017): one forward pass per image.

    Map: the class activation maps of the ``top_k`` classes (or of those whose activation passes
    ``threshold``), rank-weighted. Encoding: ``levels`` qualities ``q_low``..``q_high`` by block
    (``binning`` by value or percentile), ``method`` requantize (one baseline JPEG) or mosaic
    (the authors' re-encoding); ``bytes=N`` fits the file into N bytes.
    """
    return _semantic(image, saliency, levels=levels, q_low=q_low, q_high=q_high, binning=binning,
                     method=method, subsampling=subsampling, bytes=bytes, prepared=prepared)


def aug_msroi(
    image: np.ndarray,
    *,
    samples: int = _saliency.DEFAULT_SAMPLES,
    input_noise: float = _saliency.DEFAULT_INPUT_NOISE,
    activation_noise: float = _saliency.DEFAULT_ACTIVATION_NOISE,
    noise: _saliency.Noise = _saliency.DEFAULT_NOISE,
    top_k: int = 5,
    threshold: float | None = None,
    levels: int = 5,
    q_low: int = 30,
    q_high: int = 70,
    binning: Binning = "value",
    method: Method = "requantize",
    subsampling: Subsampling = "4:2:0",
    bytes: int | None = None,
    saliency: np.ndarray | None = None,
    prepared: Prepared | None = None,
) -> Encoded:
    """Semantic JPEG driven by the Aug-MSROI map (DCC 2018): the mean MSROI map over ``samples``
    random perturbations of the input (``input_noise``) and of every layer's input
    (``activation_noise``, relative), ``noise`` gaussian or uniform. Encoding as :func:`msroi`."""
    return _semantic(image, saliency, levels=levels, q_low=q_low, q_high=q_high, binning=binning,
                     method=method, subsampling=subsampling, bytes=bytes, prepared=prepared)


def denoise_tv(image: np.ndarray, weight: float) -> np.ndarray:
    """Total-variation denoising of uint8 HWC RGB, each channel on its own, ``weight`` in the
    units of pixels in [0, 1]; uint8 back. scikit-image's Chambolle algorithm
    (``denoise_tv_chambolle(image / 255, weight, channel_axis=-1)``, rounded), computed by
    :func:`transforms.denoise.denoise_tv_uint8` on the CPU. Weight 0 returns the image unchanged."""
    if weight == 0:
        return image
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be uint8 HWC, got {image.dtype} {image.shape}")
    # A stored image is often read-only; torch warns about wrapping one (nothing here writes to it).
    chw = torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1)
    return denoise_tv_uint8(chw, float(weight)).permute(1, 2, 0).contiguous().numpy()


def jpeg_stability(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    quality: int = 50,
    subsampling: Subsampling = "4:2:0",
    max_batch: int | None | str = "auto",
    logits: torch.Tensor | None = None,
    codec: str = "auto",
) -> torch.Tensor:
    """How much of each image's predicted class distribution survives uniform JPEG at
    ``quality``: one minus the total variation distance between the model's softmax on the image
    and on its JPEG (the file :func:`jpeg` writes, decoded). 1: the JPEG changes nothing; 0: the
    two predictions share no probability mass.

    A JPEG "squeeze" in the sense of feature squeezing (Xu et al., NDSS 2018): an attack's
    perturbation is tuned to the image's exact pixels, and a JPEG removes much of it, so the
    prediction of an adversarial image moves more than a clean one's. ``images``: float32 NCHW in
    [0, 1], rounded to the uint8 grid for the encoder; two forward passes per image in chunks of
    ``max_batch`` (None: all at once; ``"auto"``: :data:`~transforms.saliency.CPU_PASS` on the
    CPU, all at once elsewhere), or one when the caller passes the ``logits`` (N, classes) of the
    images as given. Returns (N,) float32 in [0, 1] on the images' device.

    ``codec``: ``"libjpeg"`` encodes and decodes with libjpeg-turbo through Pillow, on the CPU;
    ``"torch"`` computes the same pixels with :func:`transforms.jpeg_torch.jpeg_roundtrip` on the
    model's device (libjpeg's integer arithmetic in torch, bit-exact: no copy to the host and no
    codec call per image); ``"auto"`` (default): libjpeg on the CPU, where it is faster than the
    eager torch code (about 1,200 against 300 images/s at 224x224 on this machine's two cores),
    torch elsewhere. The torch round trip is compiled along with the model's passes
    (:func:`compiles_roundtrip`: ``--map-compile``) on a GPU only: on this machine's CPU the
    compiled round trip ran 3,176 images/s against 323 eager, but compiling it cost about 15 s
    per process and shape, more than it saves in a map stage whose passes take 30 ms per image
    there; on a GPU, where the passes take a fraction of a millisecond, the eager round trip was
    a third of the compiled gated map stage's time (H100, stop 20)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if logits is not None and tuple(logits.shape[:1]) != (len(images),):
        raise ValueError(f"logits must have one row per image ({len(images)}), got shape {tuple(logits.shape)}")
    if codec not in ("auto", "libjpeg", "torch"):
        raise ValueError(f"codec must be auto, libjpeg or torch, got {codec!r}")
    device = next(model.parameters()).device
    if codec == "auto":
        codec = "libjpeg" if device.type == "cpu" else "torch"
    compiled = compiles_roundtrip(model, device)
    n = len(images)
    if n == 0:
        return torch.zeros((0,), dtype=torch.float32, device=images.device)
    if max_batch == "auto":
        max_batch = _saliency.CPU_PASS if device.type == "cpu" else None
    per = n if max_batch is None else max(1, int(max_batch))
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()

    def probs(t: torch.Tensor) -> torch.Tensor:  # in the layout the images came in (the model's)
        t = t.contiguous(memory_format=torch.channels_last) if channels_last else t
        return _saliency.plain_logits(model, t).softmax(dim=1)

    out = []
    with torch.no_grad():
        pixels = torch.round(images.detach().to(device).clamp(0, 1) * 255.0).to(torch.uint8)
        for i in range(0, n, per):
            chunk = pixels[i : i + per]
            if codec == "libjpeg":
                hwc = chunk.permute(0, 2, 3, 1).contiguous().cpu().numpy()
                squeezed = to_tensor([decode_rgb(jpeg(p, quality=quality, subsampling=subsampling).data) for p in hwc],
                                     device)
            else:
                squeezed = jpeg_roundtrip(chunk, quality, subsampling, compiled=compiled).float().div_(255.0)
            pb = probs(squeezed)
            if logits is None:
                pa = probs(chunk.float().div_(255.0))
            else:
                pa = logits[i : i + per].to(device).float().softmax(dim=1)
            out.append(1.0 - 0.5 * (pa - pb).abs().sum(dim=1))
    return torch.cat(out).clamp(0.0, 1.0).to(images.device)


def compiles_roundtrip(model: torch.nn.Module, device) -> bool:
    """Whether :func:`jpeg_stability` runs its torch JPEG round trip compiled: when the model's
    passes are compiled (:func:`transforms.saliency.compile_plain_passes`, ``--map-compile``) and
    the device is not the CPU (see :func:`jpeg_stability`)."""
    return torch.device(device).type != "cpu" and _saliency.has_compiled_passes(model)


def gated_maps(model, images, *, jpeg_quality: int | None = None, subsampling: Subsampling = "4:2:0", seeds=None,
               **aug: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The map stage of :func:`aug_msroi_gated`: the Aug-MSROI map and the prediction stability
    under its input noise (:func:`transforms.saliency.aug_msroi_stability`, ``aug`` its
    parameters), and, unless ``jpeg_quality`` is None, :func:`jpeg_stability` at that quality; one
    unperturbed forward pass serves both. Returns (maps, {"stability": (N,), "jpeg_stability":
    (N,)})."""
    logits = _saliency.unperturbed_logits(model, images)
    maps, stability = _saliency.aug_msroi_stability(model, images, seeds=seeds, logits=logits, **aug)
    scores = {"stability": stability}
    if jpeg_quality is not None:
        scores["jpeg_stability"] = jpeg_stability(model, images, quality=jpeg_quality, subsampling=subsampling,
                                                  logits=logits)
    return maps, scores


def aug_msroi_gated(
    image: np.ndarray,
    *,
    gate: float = 0.7,
    jpeg_gate: float = 0.55,
    samples: int = _saliency.DEFAULT_SAMPLES,
    input_noise: float = _saliency.DEFAULT_INPUT_NOISE,
    activation_noise: float = 0.0,
    noise: _saliency.Noise = _saliency.DEFAULT_NOISE,
    top_k: int = 5,
    threshold: float | None = None,
    stable_quality: int = 50,
    denoise: float = 0.03,
    noise_floor: float = 2.0,
    levels: int = 5,
    q_low: int = 50,
    q_high: int = 90,
    binning: Binning = "value",
    method: Method = "requantize",
    subsampling: Subsampling = "4:2:0",
    bytes: int | None = None,
    saliency: np.ndarray | None = None,
    stability: float | None = None,
    jpeg_stability: float | None = None,
    noise_level: float | None = None,
    denoised: np.ndarray | None = None,
    prepared: Prepared | None = None,
) -> Encoded:
    """Aug-MSROI behind a stability gate: our extension, not the DCC 2018 method.

    Two checks, both run in the map stage on the map model, say how stable the image's
    prediction is:

    * ``stability``: the perturbed passes that draw the Aug-MSROI map
      (:func:`transforms.saliency.aug_msroi_stability`): the fraction of ``samples`` passes with
      input noise ``input_noise`` that keep the unperturbed top-1;
    * ``jpeg_stability`` (:func:`jpeg_stability`): the share of the predicted class distribution
      that survives the stable images' own file, uniform JPEG at ``stable_quality``.

    An image at least ``gate`` stable under noise and at least ``jpeg_gate`` under JPEG is stored
    as uniform JPEG at ``stable_quality``; one below either (likely adversarial: attacks leave
    images near a decision boundary, tuned to their exact pixels) is total-variation denoised
    (``denoise``, 0 for none; :func:`denoise_tv`) unless its estimated noise
    (:func:`transforms.denoise.noise_level`, in pixel levels) is below ``noise_floor`` (0: every
    flagged image is denoised), then semantic JPEG with its map at ``levels``
    qualities ``q_low``..``q_high``, finer than the stable images' quality to pay for the detail
    the denoising removed. ``gate=0`` and ``jpeg_gate=0`` switch a check off (``jpeg_gate=0``
    also skips its JPEG round trip and its forward pass); either above 1 flags every image.
    ``bytes=N`` fits every file into N bytes: a stable image at the highest uniform quality that
    fits, a flagged one with its quality window slid to the highest place that fits, as
    :func:`aug_msroi` does.

    Why: at Aug-MSROI's default activation noise (0.2) the perturbed passes' classes leave the
    image's own class on every image, so its map is drawn from noise-chosen classes and does not
    follow the object (README, "Does the map matter?"); a rate-matched uniform JPEG gets most of
    its gain. The gate spends the bits and the denoising only where an attack is likely. On the
    500 dev images it gains 15-16 (FGSM) and 28-29 (IGSM) points of top-1 over a rate-matched
    uniform JPEG with no measurable cost on clean images (+0.2, -0.2 and -0.2 in three noise
    draws).
    The noise floor leaves alone the flagged clean images with no pixel noise to remove, where
    the denoising cost their class: without it (``noise_floor=0``) the clean cost was 0.6-1.4
    points, with the noise check alone 1.2-1.8 (README, "The stability gate"); the defaults
    were chosen on the first 200. An
    adaptive attacker defeats it: IGSM differentiating through the whole defense
    (``bpda=aug_msroi_gated``) leaves 10% top-1; one who knows the gate can also aim at it (keep
    the prediction stable under noise and JPEG). Both stabilities are the map
    model's. The metadata row carries ``stability``, ``jpeg_stability`` and ``flagged``, and
    for a flagged image its ``noise_level``.

    ``noise_level``: the image's :func:`~transforms.denoise.noise_level`, when the map stage
    measured it (:func:`image_noise_levels`); otherwise a flagged image's is measured here.
    ``denoised``: the image already denoised at ``denoise`` (the pipeline does it on the map
    model's device, :func:`denoise_flagged`); without it, and without a ``prepared`` file or
    coefficients with a quality grid (made from the denoised pixels already), a flagged image is
    denoised here, on the CPU, to the same pixels but for float rounding (a pixel in a million,
    by one level). It is not used for an image under the noise floor."""
    if saliency is None or stability is None:
        raise ValueError("aug_msroi_gated needs its saliency map and stability")
    if jpeg_gate > 0 and jpeg_stability is None:
        raise ValueError("aug_msroi_gated with jpeg_gate > 0 needs the image's jpeg_stability")
    if denoised is not None and (denoised.shape != image.shape or denoised.dtype != np.uint8):
        raise ValueError(f"denoised pixels {denoised.dtype} {denoised.shape} do not match the image's "
                         f"{image.dtype} {image.shape}")
    flagged = gate_flagged(stability, jpeg_stability, gate=gate, jpeg_gate=jpeg_gate)
    info: dict[str, Any] = {"stability": float(stability), "flagged": flagged}
    if jpeg_gate > 0:
        info["jpeg_stability"] = float(jpeg_stability)
    if not flagged:
        if prepared is not None and prepared.qualities is None and prepared.data is not None and bytes is None:
            return Encoded(prepared.data, "jpg", {"quality": int(stable_quality), **info})  # written on the device
        enc = jpeg(image, quality=stable_quality, subsampling=subsampling, bytes=bytes)
        return Encoded(enc.data, enc.ext, {**enc.info, **info})
    info["noise_level"] = _noise_level(image) if noise_level is None else float(noise_level)
    weight = flagged_denoise({"denoise": denoise, "noise_floor": noise_floor}, image, info["noise_level"])
    ready = prepared is not None and prepared.qualities is not None  # its file needs no pixels here
    if weight == 0:
        denoised = image
    elif denoised is None and not ready:
        denoised = denoise_tv(image, weight)
    enc = _semantic(image if denoised is None else denoised, saliency, levels=levels, q_low=q_low, q_high=q_high,
                    binning=binning, method=method, subsampling=subsampling, bytes=bytes, prepared=prepared)
    return Encoded(enc.data, enc.ext, {**enc.info, **info})


def gate_flagged(stability: float, jpeg_stability: float | None, *, gate: float, jpeg_gate: float) -> bool:
    """Whether :func:`aug_msroi_gated` flags an image: its noise stability below ``gate``, or its
    JPEG stability below ``jpeg_gate`` (when that check is on, ``jpeg_gate > 0``)."""
    return bool(stability < gate) or (jpeg_gate > 0 and jpeg_stability is not None and bool(jpeg_stability < jpeg_gate))


def _with_defaults(spec: Spec) -> dict[str, Any]:
    """The parameters of a parsed defense spec, its function's defaults filled in."""
    return {**{k: v.default for k, v in spec_params(DEFENSES[spec.name]).items()}, **spec.params}


def _flagged_rows(params: Mapping[str, Any], scores: Mapping[str, Any], n: int) -> list[int]:
    """The images (of ``n``) a gated spec with ``params`` flags, from the map stage's scores."""
    js = scores.get("jpeg_stability")
    return [i for i in range(n) if gate_flagged(float(scores["stability"][i]), None if js is None else float(js[i]),
                                                gate=params["gate"], jpeg_gate=params["jpeg_gate"])]


def denoise_weight(spec: Spec) -> float:
    """The total-variation weight an ``aug_msroi_gated`` spec denoises its flagged images with
    (0: none, and for every other defense); a flagged image under its noise floor is not
    denoised (:func:`flagged_denoise`)."""
    return float(_with_defaults(spec)["denoise"]) if spec.name == "aug_msroi_gated" else 0.0


def flagged_denoise(params: Mapping[str, Any], image: np.ndarray, level: float | None = None) -> float:
    """The weight a gated spec (``params``, defaults filled) denoises a flagged ``image`` with:
    its ``denoise``, or 0 where the image's :func:`~transforms.denoise.noise_level` (``level``,
    measured here when None) is under its ``noise_floor``. The map stage and the encoder decide
    alike, from the same pixels or the same measurement."""
    weight = float(params["denoise"])
    if weight == 0:
        return 0.0
    return weight if (_noise_level(image) if level is None else level) >= params["noise_floor"] else 0.0


def image_noise_levels(images, device=None, *, batched: bool | None = None) -> np.ndarray:
    """:func:`~transforms.denoise.noise_level` of each uint8 HWC image (any sizes), float64
    (N,): one image at a time in numpy, or (``batched``, by default on any device but the CPU,
    where numpy is faster) batched by size on ``device`` (:func:`~transforms.denoise.noise_levels`;
    the same values). The map stage measures them once for ``aug_msroi_gated`` (its
    ``noise_level`` score), so that neither the denoising, the coefficients nor the encoder
    measures them again. If the device fails (out of memory, say), numpy measures them."""
    if batched is None:
        batched = device is not None and torch.device(device).type != "cpu"
    if batched:
        try:
            return _batched_noise_levels(images, device)
        except RuntimeError as e:
            warnings.warn(f"noise levels on {device} failed ({e}); measuring them on the CPU", RuntimeWarning,
                          stacklevel=2)
    return np.array([_noise_level(im) for im in images], dtype=np.float64)


def _batched_noise_levels(images, device) -> np.ndarray:
    out = np.zeros(len(images), dtype=np.float64)
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(im.shape, []).append(i)
    for group in by_shape.values():
        x = torch.from_numpy(np.stack([images[i] for i in group])).to(device)
        out[group] = noise_levels(x.permute(0, 3, 1, 2) if x.dim() == 4 else x)  # HWC, or HW
    return out


def _levels(scores: Mapping[str, Any] | None) -> Any:
    """The map stage's noise levels, if it measured them: ``levels[i]`` or None per image."""
    got = (scores or {}).get("noise_level")
    return (lambda i: float(got[i])) if got is not None else (lambda i: None)


def denoise_flagged(specs, images, scores: Mapping[str, Any], device=None) -> list[dict[float, np.ndarray]]:
    """Denoise, batched on ``device``, the images some ``aug_msroi_gated`` spec of ``specs`` flags.

    ``images``: uint8 HWC arrays (any sizes); ``scores``: the map stage's (N,) stabilities
    (``stability``, ``jpeg_stability``) of those images, for the specs' shared map request, and
    their ``noise_level`` when measured (:func:`image_noise_levels`).
    Returns, per image, {weight: denoised uint8 HWC} for each ``denoise`` weight a spec that flags
    it uses (empty when none does; an image under a spec's noise floor is not denoised for it):
    the ``denoised`` parameter :func:`aug_msroi_gated` takes.
    Images of one size are denoised together (:func:`transforms.denoise.denoise_tv_uint8`)."""
    out: list[dict[float, np.ndarray]] = [{} for _ in images]
    wanted: dict[float, set[int]] = {}
    level = _levels(scores)
    for spec in specs:
        if spec.name != "aug_msroi_gated":
            continue
        p = _with_defaults(spec)
        if p["denoise"] > 0:
            rows = [i for i in _flagged_rows(p, scores, len(images)) if flagged_denoise(p, images[i], level(i)) > 0]
            wanted.setdefault(float(p["denoise"]), set()).update(rows)
    for weight, rows in wanted.items():
        by_shape: dict[tuple, list[int]] = {}
        for i in sorted(rows):
            by_shape.setdefault(images[i].shape, []).append(i)
        for group in by_shape.values():
            x = torch.from_numpy(np.stack([images[i] for i in group])).to(device).permute(0, 3, 1, 2)
            y = denoise_tv_uint8(x, weight).permute(0, 2, 3, 1).cpu().numpy()
            for i, im in zip(group, y):
                out[i][weight] = im
    return out


def prepares_on(device, prepare: bool | None) -> bool:
    """Whether the semantic JPEGs' coefficients are computed on ``device`` beforehand
    (:func:`prepare_requantized`): ``prepare`` if given, else on any device but the CPU, where
    the encoder's numpy code is faster."""
    return bool(prepare) if prepare is not None else torch.device(device).type != "cpu"


#: The fewest same-sized images whose files the map stage entropy-codes on a GPU by default. One
#: :func:`transforms.jpeg_entropy.write_coefficients_batch` call costs about 1,500 kernel launches
#: and 15 host syncs whatever its batch (~10 ms, an estimate), while libjpeg writes a 224x224 file in
#: ~0.8 ms on one CPU core: below ~16 images (uncropped images of many sizes, a batch's tail) the
#: encoder's CPU writes them sooner.
DEVICE_ENTROPY_MIN_BATCH = 16


def entropy_codes_on(device, entropy: bool | None, batch: int | None = None) -> bool:
    """Whether :func:`prepare_requantized` also entropy-codes the files on ``device``
    (:mod:`transforms.jpeg_entropy`): ``entropy`` if given, else on any device but the CPU, where
    libjpeg (through jpeglib) writes a file several times faster than torch does, for groups of
    ``batch`` same-sized images of at least :data:`DEVICE_ENTROPY_MIN_BATCH`."""
    if entropy is not None:
        return bool(entropy)
    return torch.device(device or "cpu").type != "cpu" and (batch is None or batch >= DEVICE_ENTROPY_MIN_BATCH)


def prepare_requantized(specs, images, maps, scores: Mapping[str, Any] | None, denoised,
                        device=None, entropy: bool | None = None) -> list[dict[str, Prepared]]:
    """The semantic JPEGs' content, batched on ``device``, for the specs of ``specs`` that write by
    requantization without a ``bytes=`` target: the images they encode semantically (all of
    them for ``msroi`` and ``aug_msroi``; for ``aug_msroi_gated`` the ones it flags, from their
    denoised pixels, or the image itself under its noise floor), each with its quality grid
    (:func:`transforms.semantic_jpeg.block_qualities`; off the CPU batched on ``device``,
    :func:`_quality_grids`) and the coefficients and tables of its file
    (:func:`transforms.jpeg_torch.requantized_coefficients`). The encoder then only writes them:
    the same bytes as encoding from scratch.

    ``images``: uint8 HWC arrays (any sizes); ``maps``: each image's (H, W) map at its size;
    ``scores``: the stabilities (and noise levels) of ``aug_msroi_gated``'s map request, (N,)
    each, or None;
    ``denoised``: per image {weight: pixels} (:func:`denoise_flagged`); a flagged image without
    its denoised pixels is left to the encoder. ``entropy`` (default: on a GPU,
    :func:`entropy_codes_on`): write the files there too, the same bytes (:class:`Prepared`'s
    ``data``), and for ``aug_msroi_gated`` its stable images' uniform JPEGs as well; if that
    fails (out of memory, say), the coefficients (or the stable images) go to the encoder.
    Returns, per image, {spec text: :class:`Prepared`}."""
    from .jpeg_torch import requantized_coefficients

    out: list[dict[str, Prepared]] = [{} for _ in images]
    for spec in specs:
        if spec.name not in _MAPS:
            continue
        p = _with_defaults(spec)
        if p["method"] != "requantize" or p["bytes"] is not None:
            continue
        pixels = dict(enumerate(images))
        if spec.name == "aug_msroi_gated":
            if not scores:
                continue
            level = _levels(scores)
            weights = {i: flagged_denoise(p, images[i], level(i)) for i in _flagged_rows(p, scores, len(images))}
            rows = [i for i, w in weights.items() if w == 0 or w in denoised[i]]
            pixels = {i: denoised[i][weights[i]] if weights[i] else images[i] for i in rows}
        else:
            rows = list(range(len(images)))
        by_shape: dict[tuple, list[int]] = {}
        for i in rows:
            by_shape.setdefault((pixels[i].shape, np.shape(maps[i])), []).append(i)
        for (shape, _), rows_of in by_shape.items():
            if max(shape[:2]) > JPEG_MAX_DIMENSION:  # no JPEG holds it: the encoder reports the image
                continue
            grids = _quality_grids([maps[i] for i in rows_of], p, device)
            block = _check_grid(grids[0], *shape[:2], None)[1]  # as encode_semantic_jpeg infers it
            members = list(zip(rows_of, grids))
            x = torch.from_numpy(np.stack([pixels[i] for i in rows_of])).to(device).permute(0, 3, 1, 2)
            comps, tables = requantized_coefficients(x.contiguous(), torch.from_numpy(grids), block=block,
                                                     subsampling=p["subsampling"])
            files = (_files_on_device(comps, tables, p["subsampling"], x.shape[2], x.shape[3], device)
                     if entropy_codes_on(device, entropy, len(rows_of)) else None)
            tables = tables.cpu().numpy()
            if files is not None:
                for k, (i, grid) in enumerate(members):
                    out[i][spec.text] = Prepared(grid, None, tables[k], files[k])
                continue
            comps = [c.cpu().numpy() for c in comps]
            for k, (i, grid) in enumerate(members):
                out[i][spec.text] = Prepared(grid, [c[k] for c in comps], tables[k])
        if spec.name == "aug_msroi_gated" and entropy_codes_on(device, entropy):
            _stable_files(out, spec.text, p, images, set(weights), device, entropy)
    return out


def _quality_grids(maps: list, p: Mapping[str, Any], device) -> np.ndarray:
    """The quality grids of same-sized maps for a semantic spec's parameters ``p``
    (:func:`transforms.semantic_jpeg.block_qualities`): off the CPU, with value binning,
    batched on ``device`` (:func:`transforms.jpeg_torch.quality_grids`, the same grids); else in
    numpy, a map at a time. int32 (N, rows, cols)."""
    from .jpeg_torch import quality_grids

    kw = dict(levels=p["levels"], q_low=p["q_low"], q_high=p["q_high"])
    if p["binning"] == "value" and torch.device(device or "cpu").type != "cpu":
        return quality_grids(torch.from_numpy(np.stack(maps)).to(device), **kw).cpu().numpy().astype(np.int32)
    return np.stack([block_qualities(m, binning=p["binning"], **kw) for m in maps])


def _files_on_device(comps, tables, subsampling: str, height: int, width: int, device) -> list[bytes] | None:
    """The files of a batch's coefficients, entropy-coded on their device
    (:mod:`transforms.jpeg_entropy`); None, with a warning, if that fails (out of device memory,
    say): the encoder then writes them."""
    from .jpeg_entropy import write_coefficients_batch

    try:
        return write_coefficients_batch(comps, tables, subsampling=subsampling, height=height, width=width)
    except Exception as e:  # out of device memory, say; the encoder writes (or reports) them
        warnings.warn(f"entropy coding on {device} failed ({e}); the encoder writes the files", RuntimeWarning,
                      stacklevel=3)
        return None


def _stable_files(out: list[dict], text: str, p: Mapping[str, Any], images, flagged: set[int], device,
                  entropy: bool | None = None) -> None:
    """Into ``out``: the uniform JPEG at ``stable_quality`` of each image a gated spec (``text``,
    parameters ``p``) does not flag, written on ``device`` (:class:`Prepared` without a quality
    grid): the file :func:`jpeg` writes, byte for byte. Left to the encoder on failure, and for
    groups of same-sized images too small to pay (:func:`entropy_codes_on`)."""
    from .jpeg_torch import uniform_coefficients

    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        if i not in flagged:
            groups.setdefault(image.shape, []).append(i)
    for (h, w, _), members in groups.items():
        if max(h, w) > JPEG_MAX_DIMENSION or not entropy_codes_on(device, entropy, len(members)):
            continue
        x = torch.from_numpy(np.stack([images[i] for i in members])).to(device).permute(0, 3, 1, 2).contiguous()
        comps, tables = uniform_coefficients(x, p["stable_quality"], p["subsampling"])
        files = _files_on_device(comps, tables, p["subsampling"], h, w, device)
        if files is None:
            continue
        tables = tables.cpu().numpy()
        for k, i in enumerate(members):
            out[i][text] = Prepared(None, None, tables[k], files[k])


DEFENSES = {
    "none": none,
    "jpeg": jpeg,
    "msroi": msroi,
    "aug_msroi": aug_msroi,
    "aug_msroi_gated": aug_msroi_gated,
}

#: The map function of each semantic defense and which of its parameters the map depends on.
_MAPS = {
    "msroi": (_saliency.msroi, ("top_k", "threshold")),
    "aug_msroi": (_saliency.aug_msroi, ("samples", "input_noise", "activation_noise", "noise", "top_k", "threshold")),
    "aug_msroi_gated": (gated_maps,
                        ("samples", "input_noise", "activation_noise", "noise", "top_k", "threshold", "subsampling")),
}


def map_request(spec: Spec) -> tuple[str, dict[str, Any]] | None:
    """The saliency map a defense needs, as (canonical text, kwargs of the map function), with
    defaults filled in, so defenses that differ only in encoding share one map; None if none."""
    if spec.name not in _MAPS:
        return None
    p = _with_defaults(spec)
    kwargs = {k: p[k] for k in _MAPS[spec.name][1]}
    if spec.name == "aug_msroi_gated":  # the JPEG check encodes at the stable quality, if it is on
        if p["jpeg_gate"] > 0:
            kwargs["jpeg_quality"] = p["stable_quality"]
        else:
            del kwargs["subsampling"]
    return format_spec(spec.name, kwargs), kwargs


def compute_maps(name: str, model, images, kwargs: Mapping[str, Any], seeds=None):
    """Run the map function of semantic defense ``name`` on a batch (float32 NCHW in [0, 1]):
    (maps, scores): (N, H, W) float32 maps in [0, 1], and for ``aug_msroi_gated`` its per-image
    stabilities ({"stability": (N,), "jpeg_stability": (N,)}, the latter only when its JPEG check
    is on; the hidden parameters of the same names), else None. ``seeds`` (N,) int64 make the
    noise per-sample reproducible."""
    fn = _MAPS[name][0]
    extra = {"seeds": seeds} if name != "msroi" else {}
    out = fn(model, images, **kwargs, **extra)
    return out if isinstance(out, tuple) else (out, None)


def match_target(spec: Spec) -> str | None:
    """The defense a ``jpeg:match=...`` spec refers to, or None."""
    return spec.params.get("match") if spec.name == "jpeg" else None


def parse_match_ref(ref: str) -> Spec:
    """The defense a ``match=`` names, its own parameters separated by ``;`` (a spec's are by
    ``,``): ``aug_msroi:q_low=40;q_high=60``."""
    return parse_defense(ref.replace(";", ","))


def parse_defense(text: str) -> Spec:
    """Parse and validate ``name[:k=v,...]``; bad values fail here, before any work starts."""
    # A match names a defense, and "none" is one: read as text, never as "no match".
    spec = parse_spec(text, DEFENSES, kind="defense", hidden=HIDDEN, overrides={"match": str})
    p = spec.params

    def bad(key, why):
        raise ValueError(f"bad value for {key!r} in defense spec {text!r}: {why}")

    for key in ("quality", "q_low", "q_high", "stable_quality"):
        if key in p and not 1 <= p[key] <= 100:
            bad(key, "must be in 1..100")
    defaults = {k: v.default for k, v in spec_params(DEFENSES[spec.name]).items()}
    if spec.name in _MAPS:
        lo, hi = p.get("q_low", defaults["q_low"]), p.get("q_high", defaults["q_high"])
        if lo > hi:
            bad("q_low", f"q_low ({lo}) must not exceed q_high ({hi})")
        if not 1 <= p.get("levels", 1) <= MAX_LEVELS:
            bad("levels", f"must be in 1..{MAX_LEVELS}")
        try:  # the map function's own checks: finite noise scales, top_k and samples >= 1, ...
            checked = spec_params(_saliency.check_map_params)  # the map's own parameters, not the JPEG check's
            _saliency.check_map_params(**{k: v for k, v in map_request(spec)[1].items() if k in checked})
        except ValueError as e:
            raise ValueError(f"bad value in defense spec {text!r}: {e}") from None
    if spec.name == "aug_msroi_gated":
        for key in ("gate", "jpeg_gate"):
            if not (math.isfinite(float(p.get(key, 0))) and p.get(key, 0) >= 0):
                bad(key, "must be a finite number >= 0 (0: this check flags no image; above 1: it flags all)")
        if not (math.isfinite(float(p.get("denoise", 0))) and p.get("denoise", 0) >= 0):
            bad("denoise", "must be a finite number >= 0 (0: no denoising)")
        if not (math.isfinite(float(p.get("noise_floor", 0))) and p.get("noise_floor", 0) >= 0):
            bad("noise_floor", "must be a finite number >= 0 (0: every flagged image is denoised)")
    if "bytes" in p and p["bytes"] is not None and not 1 <= p["bytes"] < 2**63:
        bad("bytes", "must be >= 1 and below 2**63 (the metadata's target_bytes is int64)")
    if p.get("match") == "":
        bad("match", "must name a defense of this run")
    given = [k for k in ("quality", "bytes", "match") if p.get(k) is not None]
    if spec.name == "jpeg" and len(given) > 1:
        raise ValueError(f"defense spec {text!r}: give one of quality, bytes or match, not {' and '.join(given)}")
    return spec


def apply_defense(spec: Spec, image: np.ndarray, **runner_params: Any) -> Encoded:
    """Encode one uint8 HWC RGB image with a parsed defense spec; ``runner_params`` are the
    :data:`HIDDEN` parameters (``saliency=``, ``matched_bytes=``) the defense takes."""
    fn = DEFENSES[spec.name]
    accepted = spec_params(fn)
    extra = {k: v for k, v in runner_params.items() if k in accepted and v is not None}
    return fn(image, **spec.params, **extra)


def matched_defense(spec: Spec) -> Spec | None:
    """The parsed defense a ``jpeg:match=X`` spec refers to (X must not be rate-matched itself);
    None for any other spec. A run's specs are resolved against each other instead
    (``pipeline.encode.resolve_matches``); this is for a spec standing alone."""
    ref = match_target(spec)
    if ref is None:
        return None
    ref_spec = parse_match_ref(ref)
    if match_target(ref_spec) is not None:
        raise ValueError(f"{spec.text} cannot match {ref}, itself rate-matched")
    return ref_spec


def defend_images(spec: Spec, images, *, model=None):
    """The defense end to end on a batch: encode every image with ``spec``, decode the files.

    ``images``: float32 NCHW in [0, 1], rounded to the uint8 grid first, as stored images are.
    Semantic defenses compute their maps on ``model``, their noise seeded from each image's
    pixels; ``jpeg:match=X`` encodes X first and fits each file into X's size. Returns the decoded
    images, float32 NCHW in [0, 1], on the input's device, without a graph: what a classifier
    behind this defense sees (the forward pass of a BPDA attack, :mod:`transforms.attacks.bpda`).
    """
    pixels = to_uint8(images)
    if len(pixels) == 0:
        return images.detach().clone()
    ref = matched_defense(spec)
    matched = None if ref is None else [len(e.data) for e in encode_batch(ref, pixels, model=model)]
    files = encode_batch(spec, pixels, model=model, matched=matched)
    return to_tensor([decode_rgb(e.data) for e in files], images.device)


def encode_batch(spec: Spec, pixels: np.ndarray, *, model=None, matched: list[int] | None = None,
                 prepare: bool | None = None) -> list[Encoded]:
    """Encode uint8 NHWC ``pixels`` with ``spec``, one :class:`Encoded` per image. A semantic
    defense's maps are computed batched on ``model`` (noise seeded from the pixels), and
    ``aug_msroi_gated``'s flagged images denoised there too; on a GPU (``prepare=None``; True or
    False to force it) the semantic JPEGs' coefficients as well (:func:`prepare_requantized`: the
    same files). ``matched`` gives a ``jpeg:match`` defense its per-image byte budgets."""
    maps = scores = None
    device = None if model is None else next(model.parameters()).device
    req = map_request(spec)
    if req is not None:
        if model is None:
            raise ValueError(f"defense {spec.text} needs a model for its saliency maps")
        x = to_tensor(pixels, device)
        with torch.no_grad():
            maps, scores = compute_maps(spec.name, model, x, req[1])
        maps = maps.float().cpu().numpy()
        scores = {k: v.float().cpu().numpy() for k, v in (scores or {}).items()}
        if spec.name == "aug_msroi_gated":
            scores["noise_level"] = image_noise_levels(pixels, device)
    if match_target(spec) is not None and matched is None:
        raise ValueError(f"{spec.text} needs the matched defense's sizes")
    denoised = denoise_flagged([spec], pixels, scores, device) if scores else [{} for _ in pixels]
    prepared = [{} for _ in pixels]
    if maps is not None and prepares_on(device, prepare):
        try:
            prepared = prepare_requantized([spec], list(pixels), list(maps), scores, denoised, device)
        except RuntimeError as e:  # out of device memory, say: the encoder computes them instead
            warnings.warn(f"semantic JPEG coefficients on {device} failed ({e}); computing them on the CPU",
                          RuntimeWarning, stacklevel=2)
    weight = denoise_weight(spec)
    return [
        apply_defense(spec, pixels[i], saliency=None if maps is None else maps[i],
                      **{k: float(v[i]) for k, v in (scores or {}).items()},
                      denoised=denoised[i].get(weight), prepared=prepared[i].get(spec.text),
                      matched_bytes=None if matched is None else matched[i])
        for i in range(len(pixels))
    ]
