"""Semantic saliency maps from a classifier's class activation maps: CAM, MSROI and Aug-MSROI.

* CAM: Zhou, Khosla, Lapedriza, Oliva & Torralba, "Learning Deep Features for Discriminative
  Localization", CVPR 2016. ``M_c(x, y) = sum_d w^c_d f_d(x, y)`` over the last convolutional
  maps ``f`` and the weights ``w`` of the linear layer that follows global average pooling.
* MSROI: Prakash, Moran, Garber, DiLillo & Storer, "Semantic Perceptual Image Compression using
  Deep Convolution Networks", DCC 2017: the maps of several top classes, each normalized, combined
  with exponentially decreasing rank weights, so that every object the network sees gets bits,
  not only the arg-max one.
* Aug-MSROI: Prakash, Moran, Garber, DiLillo & Storer, "Protecting JPEG Images Against Adversarial
  Attacks", DCC 2018: the mean MSROI map over several random perturbations of the input and of
  the activations inside the network, which an adversary tuned to one forward pass cannot steer.

Data contract: images are float32 NCHW tensors in [0, 1] on any device; maps come back float32
on the images' device. The work runs on the model's device. Models must be
:class:`~transforms.models.Classifier` instances with ``has_cam`` (global average pooling + one
linear layer) and in eval mode: batch norm in training mode would mix samples and update running
statistics, so it is rejected rather than switched silently.
"""
from __future__ import annotations

import functools
import hashlib
import math
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "class_activation_maps",
    "msroi",
    "aug_msroi",
    "aug_msroi_stability",
    "msroi_rank_weights",
    "check_map_params",
    "NOISES",
    "DEFAULT_SAMPLES",
    "DEFAULT_INPUT_NOISE",
    "DEFAULT_ACTIVATION_NOISE",
    "DEFAULT_NOISE",
    "CPU_PASS",
    "compile_plain_passes",
    "has_compiled_passes",
    "plain_logits",
]

Noise = Literal["gaussian", "uniform"]

#: Aug-MSROI defaults; chosen by ``bench/aug_msroi_params.py`` (see :func:`aug_msroi`).
DEFAULT_SAMPLES = 5
DEFAULT_INPUT_NOISE = 0.05
DEFAULT_ACTIVATION_NOISE = 0.2
DEFAULT_NOISE: Noise = "gaussian"

#: Perturbed images per forward pass of :func:`aug_msroi` on the CPU (``max_batch="auto"``).
CPU_PASS = 16

#: The MSROI authors' weight for the last of the top-k classes, relative to 2**-(k-1).
_LAST_RANK_FACTOR = 1.2

#: Shift between the noise slices of consecutive layers (a prime, so that a layer's noise is not
#: the previous layer's on the same channel grid).
_LAYER_STRIDE = 4099


# --------------------------------------------------------------------------- checks

#: Layers that compute something else in training mode (batch statistics, random dropping).
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def _check(model: nn.Module, images: torch.Tensor) -> torch.device:
    """Validate model and images; return the device the work runs on (the model's)."""
    if not getattr(model, "has_cam", False):
        name = getattr(model, "name", type(model).__name__)
        raise ValueError(
            f"model {name!r} has no class activation maps: saliency needs a Classifier that ends in "
            "global average pooling + one linear layer (has_cam is False)"
        )
    # The model and every layer whose mode matters: a batch norm left training in an eval model mixes the
    # perturbed images of a pass and updates its running statistics; a dropout drops at random.
    training = next((name for name, m in model.named_modules()
                     if m.training and (m is model or isinstance(m, _MODE_DEPENDENT))), None)
    if training is not None:
        where = "" if not training else f" (its module {training!r} is in training mode)"
        raise ValueError(f"saliency needs the model in eval mode (call model.eval()){where}; it is not switched here")
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.float32:
        raise ValueError(f"images must be float32 NCHW RGB, got {images.dtype} {tuple(images.shape)}")
    param = next(model.parameters(), None)
    return param.device if param is not None else images.device


def check_map_params(
    *,
    top_k: int = 5,
    threshold: float | None = None,
    samples: int = 1,
    input_noise: float = 0.0,
    activation_noise: float = 0.0,
    noise: str = DEFAULT_NOISE,
) -> None:
    """The valid values of the map parameters of :func:`msroi` and :func:`aug_msroi` (which
    check them first): ``top_k`` and ``samples`` integers >= 1, ``threshold`` finite or None,
    ``input_noise`` and ``activation_noise`` finite and >= 0, ``noise`` a key of
    :data:`NOISES`. Raises ValueError naming the parameter; the defenses call it when a spec is
    parsed, so a bad value fails before any work starts."""
    for name, v in (("top_k", top_k), ("samples", samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number or None, got {threshold!r}")
    for name, v in (("input_noise", input_noise), ("activation_noise", activation_noise)):
        if not (math.isfinite(float(v)) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; valid: {', '.join(NOISES)}")


# --------------------------------------------------------------------------- CAM and MSROI


def class_activation_maps(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Class activation maps (Zhou et al., CVPR 2016) of the given classes.

    Args:
        model: a :class:`~transforms.models.Classifier` with ``has_cam``, in eval mode.
        images: float32 (N, 3, H, W) in [0, 1].
        classes: int64 (N, K) class indices per sample (or (N,), read as K = 1).

    Returns:
        float32 (N, K, h, w) on the images' device, at the resolution of ``model.features``:
        ``M_c(x, y) = sum_d fc.weight[c, d] * features[d, x, y]`` (no bias, no normalization).
    """
    device = _check(model, images)
    if classes.ndim == 1:
        classes = classes[:, None]
    if classes.ndim != 2 or classes.shape[0] != images.shape[0]:
        raise ValueError(f"classes must be (N, K) with N = {images.shape[0]}, got {tuple(classes.shape)}")
    n_cls = model.fc.weight.shape[0]
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= n_cls):
        raise ValueError(f"class indices must be in 0..{n_cls - 1}, got {classes.min()}..{classes.max()}")
    with torch.no_grad():
        feats = model.features(images.to(device)).float()
        w = model.fc.weight.float()[classes.to(device).long()]  # (N, K, D)
        with torch.autocast(device.type, enabled=False):  # float32 maps even under autocast
            cams = torch.einsum("nkd,ndhw->nkhw", w, feats)
    return cams.to(images.device)


def msroi_rank_weights(k: int) -> list[float]:
    """MSROI weights of the classes ranked 1..k: 1/2, 1/4, ..., 1/2**(k-1), then 1.2/2**(k-1).

    The authors' code folds the maps in from the k-th class up, ``roi = 1.2 * m_k`` then
    ``roi = (roi + m_r) / 2`` for r = k-1 .. 1; for k = 5 this is 1/2, 1/4, 1/8, 1/16, 1.2/16, and
    for any k it is the list returned here (k = 1 gives 1.2: a single map, scaled).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return [2.0 ** -(r + 1) for r in range(k - 1)] + [_LAST_RANK_FACTOR * 2.0 ** -(k - 1)]


def _normalize(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each map over its last two dims to [0, 1]; a constant map gives zeros."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    rng = hi - lo
    return torch.where(rng > 0, (maps - lo) / rng.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def _roi(
    feats: torch.Tensor, logits: torch.Tensor, fc: nn.Linear, top_k: int, threshold: float | None
) -> torch.Tensor:
    """MSROI at feature resolution: (B, D, h, w) maps and (B, C) logits -> (B, h, w) in [0, 1]."""
    b, c = logits.shape
    if threshold is None:
        k = min(top_k, c)
        order = logits.topk(k, dim=1).indices  # (B, k), best first
        counts = torch.full((b,), k, device=logits.device)
    else:
        # A class's total activation: the spatial mean of its CAM, i.e. its logit without bias.
        score = logits - (fc.bias.float() if fc.bias is not None else 0.0)
        ranked, order = score.sort(dim=1, descending=True)
        counts = (ranked > threshold).sum(dim=1).clamp_min(1)  # at least the top class
        k = int(counts.max())
        order = order[:, :k]
    # Rank weights per sample: 2**-(r+1) before its last selected rank, 1.2*2**-(n-1) at it.
    r = torch.arange(k, device=logits.device).expand(b, k)
    n = counts[:, None]
    weights = torch.where(
        r < n - 1, torch.exp2(-(r + 1).float()), _LAST_RANK_FACTOR * torch.exp2(-(n - 1).float())
    )
    weights = torch.where(r < n, weights, torch.zeros_like(weights))
    with torch.autocast(feats.device.type, enabled=False):  # maps in float32 even under autocast
        w = fc.weight.float()[order]  # (B, k, D)
        cams = torch.einsum("bkd,bdhw->bkhw", w, feats.float())
        roi = (weights[:, :, None, None] * _normalize(cams)).sum(dim=1)
        return _normalize(roi)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    out = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return out.clamp_(0.0, 1.0)


def stretch_map(saliency: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float (h, w) map resized bilinearly to ``shape`` (height, width), as maps are upsampled
    from the feature grid: a map drawn on a squashed image laid back over the image."""
    if saliency.shape == tuple(shape):
        return saliency
    t = torch.from_numpy(np.ascontiguousarray(saliency, dtype=np.float32))[None]
    return _upsample(t, tuple(shape))[0].numpy()


def _eager_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = model.features(x)
    logits = model.fc(feats.mean(dim=(2, 3)))
    return feats, logits.float()


#: Where :func:`compile_plain_passes` keeps a model's compiled forward, with the model it was
#: compiled for (a deep copy of the model carries the entry but must not use it).
_COMPILED = "_semjpeg_compiled_forward"


def compile_plain_passes(model: nn.Module, *, mode: str | None = None, backend: str | Callable = "inductor"
                         ) -> nn.Module:
    """Compile the map stage's plain forward passes of ``model`` with ``torch.compile``; returns
    the model.

    The plain passes are those without Aug-MSROI's activation noise: :func:`msroi`, the
    unperturbed logits, the passes of :func:`aug_msroi_stability` when ``activation_noise`` is 0
    (input noise is added before the network), and :func:`plain_logits` (the JPEG check of
    ``aug_msroi_gated``). Passes with activation noise stay eager: their noise comes from forward
    pre-hooks registered per call, which a compiled graph would not see.

    Compiling costs time at the first call of each input shape (seconds on the CPU for a small
    network; a second shape recompiles once with a dynamic batch size) and buys a fused graph:
    on an H100 in bf16, ``aug_msroi_gated``'s map stage ran at 4,112 images/s against 2,315
    eager, MSROI at 35,346 against 18,123 (``bench/defend.py --compile``); on this machine's CPU
    the gated stage 1.2x. Results differ from eager ones by floating-point rounding
    only. Call it once per model, e.g. when a worker loads its map model; ``mode`` and
    ``backend`` go to ``torch.compile``. A copy of the model (``copy.deepcopy``) runs eagerly
    until it is compiled itself. If a compiled pass fails (a worker without a C compiler, say),
    a ``RuntimeWarning`` says why and the model runs eagerly from then on: no batch is lost. Out
    of device memory is raised as it is (the map stage splits the batch), the passes still compiled.
    """
    _check(model, torch.zeros(0, 3, 1, 1))
    compiled = torch.compile(functools.partial(_eager_forward, model), mode=mode, backend=backend)
    # A weak reference: deepcopy keeps it pointing at this model, so a copy never runs this graph.
    model.__dict__[_COMPILED] = (weakref.ref(model), compiled)
    return model


def _forward(model: nn.Module, x: torch.Tensor, *, plain: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps and logits of one forward pass (through ``model.fc``, so its hooks fire);
    compiled when the pass is ``plain`` (no hooks) and the model was given to
    :func:`compile_plain_passes`."""
    compiled = _compiled(model) if plain else None
    if compiled is not None:
        try:
            return compiled(x)
        except torch.cuda.OutOfMemoryError:  # the batch's size, not the compiler's: the caller splits it
            raise
        except Exception as e:  # noqa: BLE001 - compiling is an optimization, never a lost batch
            _drop_compiled(model, e)
    return _eager_forward(model, x)


def _compiled(model: nn.Module) -> Callable | None:
    entry = model.__dict__.get(_COMPILED)
    return entry[1] if entry is not None and entry[0]() is model else None


def has_compiled_passes(model: nn.Module) -> bool:
    """Whether :func:`compile_plain_passes` compiled this model (and compiling has not failed)."""
    return _compiled(model) is not None


def _drop_compiled(model: nn.Module, error: Exception) -> None:
    """A compiled pass failed (no C compiler on a worker, an unsupported operator, ...): warn
    once and run this model eagerly from now on; an error that is not the compiler's repeats in
    the eager pass and is raised there."""
    why = " ".join(str(error).split())[:300]  # one line
    warnings.warn(f"compiled map pass failed ({type(error).__name__}: {why}); "
                  "running the model eagerly from now on", RuntimeWarning, stacklevel=3)
    model.__dict__.pop(_COMPILED, None)


def plain_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as float32 logits, through the compiled pass when the model has one."""
    if has_compiled_passes(model):  # only models with class activation maps are compiled
        return _forward(model, x)[1]
    return model(x).float()


def msroi(
    model: nn.Module,
    images: torch.Tensor,
    *,
    top_k: int = 5,
    threshold: float | None = None,
) -> torch.Tensor:
    """Multi-structure region-of-interest map (Prakash et al., DCC 2017).

    The CAMs of the ``top_k`` classes with the highest logits are each min-max normalized to
    [0, 1], combined with the rank weights of :func:`msroi_rank_weights` (1/2, 1/4, 1/8, 1/16,
    1.2/16 for k = 5), the sum normalized to [0, 1] again, and upsampled bilinearly to the input
    size. With ``threshold`` T, the classes are instead all those whose total activation (the
    spatial mean of their CAM, i.e. the logit without the fc bias) exceeds T, ranked by it (at
    least the top one). A constant map (e.g. from a flat image) normalizes to all zeros.

    Args:
        model: a :class:`~transforms.models.Classifier` with ``has_cam``, in eval mode.
        images: float32 (N, 3, H, W) in [0, 1], any device.

    Returns:
        float32 (N, H, W) in [0, 1] on the images' device.
    """
    device = _check(model, images)
    check_map_params(top_k=top_k, threshold=threshold)
    n, _, h, w = images.shape
    if n == 0:
        return torch.zeros((0, h, w), dtype=torch.float32, device=images.device)
    with torch.no_grad():
        feats, logits = _forward(model, images.to(device))
        maps = _upsample(_roi(feats, logits, model.fc, top_k, threshold), (h, w))
    return maps.to(images.device)


# --------------------------------------------------------------------------- Aug-MSROI


def _gaussian(out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(out.shape, generator=g, out=out)


def _uniform(out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Unit variance, like the Gaussian: U(-sqrt 3, sqrt 3).
    return torch.rand(out.shape, generator=g, out=out).mul_(2.0).sub_(1.0).mul_(math.sqrt(3.0))


#: Noise distributions, all zero-mean with unit variance; a scale is a standard deviation. Each
#: fills the tensor it is given (any dtype and device) from the generator, in place.
NOISES: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gaussian": _gaussian,
    "uniform": _uniform,
}


def _content_seeds(images: torch.Tensor) -> torch.Tensor:
    """One seed per image from its uint8-quantized pixels: batch-independent without given seeds."""
    q = torch.round(images.detach().clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    out = [int.from_bytes(hashlib.sha256(im.tobytes()).digest()[:8], "little") & ((1 << 63) - 1) for im in q]
    return torch.tensor(out, dtype=torch.int64)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None when it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


#: Values in the CPU noise table (64 MiB in float32; see _NoisePool), and the seed it is drawn from.
_TABLE_SIZE = 1 << 24
_TABLE_SEED = 20180301


@functools.lru_cache(maxsize=4)
def _noise_table(draw: Callable, dtype: torch.dtype, size: int) -> torch.Tensor:
    """``size`` i.i.d. values of ``draw`` in ``dtype`` on the CPU, the same in every process."""
    return draw(torch.empty(size, dtype=dtype), torch.Generator().manual_seed(_TABLE_SEED))


class _NoisePool:
    """Per-sample noise for one forward pass: ``take(m)`` -> (n * S, m), i.i.d. per row.

    Sample i's S rows come from its own generator, seeded with ``seeds[i]`` on the work device,
    so they do not depend on the batch the sample came in. Successive takes (the input, then each
    layer in forward order) read slices of one chunk of noise at offsets that advance by a prime
    and wrap around; a new chunk is drawn only when a request is larger than the current one
    (about three times for EfficientNet-Lite0). So noise costs one launch per sample and chunk,
    not per sample and layer, and no copies: each sample's rows are drawn in place into the chunk.
    Which values a layer gets depends only on the sequence of layer sizes.

    The chunk is float32, or under autocast on the work device its reduced-precision dtype: the
    activations the noise meets are in that dtype, so no layer converts its slice (on CUDA this
    halves the noise's memory traffic; the values are another draw than float32's).

    On the CPU, where a generator draws in one thread at about 4 ns a value (two fifths of
    Aug-MSROI's time with EfficientNet-Lite0), the noise comes from a table instead: each take
    gives each of a sample's S rows a window of one fixed table of i.i.d. values (drawn once per
    process from a fixed seed, at least twice as long as the window, 2**24 values by default),
    at an offset drawn from the sample's own generator. Within a row the values are i.i.d., as
    before; rows and layers get independent offsets; the values still depend only on the
    sample's seed and the sequence of layer sizes. A take costs a copy of the windows.
    """

    def __init__(self, seeds: torch.Tensor, samples: int, device: torch.device, draw: Callable):
        self.samples = samples
        self.device = device
        self.draw = draw
        self.dtype = _autocast_dtype(device.type) or torch.float32
        self.gens = []
        self.gen_device = device
        for s in seeds.tolist():
            try:
                g = torch.Generator(device=device)
            except RuntimeError:  # no generator on this device type: draw on CPU, then move
                g = torch.Generator()
                self.gen_device = torch.device("cpu")
            self.gens.append(g.manual_seed(int(s)))
        self.chunk = torch.empty((len(self.gens), samples, 0), device=device, dtype=self.dtype)
        self.cursor = 0

    def take(self, m: int) -> torch.Tensor:
        if self.device.type == "cpu":
            size = max(_TABLE_SIZE, 1 << (2 * m - 1).bit_length())
            table = _noise_table(self.draw, self.dtype, size)
            offsets = torch.cat([torch.randint(0, size - m + 1, (self.samples,), generator=g) for g in self.gens])
            return torch.stack([table[o : o + m] for o in offsets.tolist()])
        size = self.chunk.shape[-1]
        if m > size:
            size = m + m // 4
            self.chunk = None  # free the old chunk before the new one is allocated
            if self.gen_device == self.device:
                self.chunk = torch.empty((len(self.gens), self.samples, size), device=self.device, dtype=self.dtype)
                for row, g in zip(self.chunk, self.gens):
                    self.draw(row, g)
            else:
                self.chunk = torch.stack(
                    [self.draw(torch.empty((self.samples, size), dtype=self.dtype), g) for g in self.gens]
                ).to(self.device)
            self.cursor = 0
        offset = self.cursor % (size - m + 1)
        self.cursor = offset + _LAYER_STRIDE
        return self.chunk[:, :, offset : offset + m].reshape(-1, m)


def _noise_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _shaped(z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, m) noise viewed in ``like``'s shape and memory format (channels_last stays channels_last)."""
    if like.ndim == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = like.shape
        return z.view(b, h, w, c).permute(0, 3, 1, 2)
    return z.view(like.shape)


def _make_hook(pool: _NoisePool, scale: float, batch: int, thread: int):
    def hook(module: nn.Module, args: tuple):
        x = args[0]
        # Only this call's forward, on this thread: a model shared by threads is left alone.
        if threading.get_ident() != thread or not torch.is_tensor(x) or x.shape[0] != batch:
            return None
        m = x[0].numel()
        z = _shaped(pool.take(m), x)
        # Relative scale: layers differ in activation magnitude; the RMS is per sample. One
        # reduction and one fused multiply-add per layer (no copies in float32).
        dims = tuple(range(1, x.ndim))
        rms = torch.linalg.vector_norm(x.detach(), dim=dims, keepdim=True, dtype=torch.float32)
        coef = (rms * (scale / math.sqrt(m))).to(x.dtype)
        return (torch.addcmul(x, z.to(x.dtype), coef), *args[1:])

    return hook


def aug_msroi(
    model: nn.Module,
    images: torch.Tensor,
    *,
    samples: int = DEFAULT_SAMPLES,
    input_noise: float = DEFAULT_INPUT_NOISE,
    activation_noise: float = DEFAULT_ACTIVATION_NOISE,
    noise: Noise = DEFAULT_NOISE,
    top_k: int = 5,
    threshold: float | None = None,
    seeds: torch.Tensor | None = None,
    max_batch: int | None | Literal["auto"] = "auto",
) -> torch.Tensor:
    """Aug-MSROI (Prakash et al., DCC 2018): the mean :func:`msroi` map over random perturbations.

    Each of the ``samples`` perturbations of an image adds zero-mean noise of standard deviation
    ``input_noise`` (pixel units, the image in [0, 1], not clipped) to the input, and noise of
    standard deviation ``activation_noise`` times the input's per-sample RMS to the input of every
    ``nn.Conv2d`` and ``nn.Linear`` of the model (forward pre-hooks; the first convolution's input is
    the normalized image, and the final linear layer's noise perturbs the class ranking). The S
    MSROI maps (each normalized to [0, 1] at feature resolution) are averaged, then upsampled, so the
    result is in [0, 1] but need not reach 0 or 1.

    Defaults (gaussian, input 0.05, activation 0.2, S = 5) were chosen with
    ``bench/aug_msroi_params.py``: 100 ImageNet dev images, EfficientNet-Lite0, IGSM (eps 4/255,
    10 steps; undefended agreement 0.00), map of the adversarial image, semantic JPEG
    (requantize, K = 5, q 30..70), decoded and classified. ``agree``: top-1 equals the clean
    prediction; ``p``: mean softmax probability of the clean prediction (paired differences give
    far more signal than agreement at this N), with paired differences +- one standard error
    against plain MSROI and against a uniform JPEG rate-matched per image
    (``encode_jpeg_max_bytes``); ``bytes``: mean file size::

        noise:input:activation  agree  p      p - MSROI        p - uniform@bytes  bytes
        MSROI (no noise, S=1)   0.47   0.320  --               +0.028 +- 0.011  8422
        gaussian:0.05:0         0.47   0.354  +0.034 +- 0.010  +0.048 +- 0.011  8080
        gaussian:0:0.1          0.49   0.352  +0.032 +- 0.009  +0.044 +- 0.013  7985
        gaussian:0.05:0.1       0.46   0.357  +0.037 +- 0.009  +0.050 +- 0.011  7988
        uniform:0.05:0.1        0.48   0.347  +0.027 +- 0.008  +0.039 +- 0.012  7997
        gaussian:0.05:0.15      0.50   0.367  +0.047 +- 0.010  +0.063 +- 0.008  8075
        gaussian:0:0.2          0.51   0.375  +0.055 +- 0.010  +0.058 +- 0.009  7840
        gaussian:0.05:0.2  *    0.51   0.383  +0.063 +- 0.010  +0.066 +- 0.010  7850
        uniform:0.05:0.2        0.55   0.384  +0.064 +- 0.010  +0.066 +- 0.010  7843
        gaussian:0.05:0.25      0.52   0.381  +0.061 +- 0.010  +0.059 +- 0.009  7715
        gaussian:0.05:0.3       0.52   0.383  +0.063 +- 0.009  +0.047 +- 0.009  7577
        gaussian:0.05:0.4       0.56   0.400  +0.080 +- 0.011  +0.039 +- 0.009  7114
        (uniform JPEG q50: agree 0.49, p 0.337, 7528 bytes)

    Every perturbed setting beats plain MSROI; activation noise matters more than input noise.
    Stronger activation noise keeps raising agreement, but past 0.2 mostly by flattening the map
    (fewer bytes, which a uniform JPEG of those bytes also gets): the advantage over the
    rate-matched uniform JPEG peaks at 0.15-0.2, hence 0.2. (At 0.2 the perturbed passes' top-1
    class differs from the clean one on every one of 600 clean and attacked dev images measured
    (README, "Does the map matter?"): the map no longer follows the class the adversary pushed.) Gaussian and uniform noise of equal variance are indistinguishable here;
    Gaussian is kept. Neighbouring settings differ by about one standard error: one model, one
    attack, N = 100 -- rerun the script for other models or attacks.

    Args:
        model: a :class:`~transforms.models.Classifier` with ``has_cam``, in eval mode; its
            parameters, buffers and mode are untouched and all hooks are removed, even on error.
        images: float32 (N, 3, H, W) in [0, 1], any device; the work runs on the model's device.
        samples: perturbations per image (S >= 1).
        noise: the distribution, a key of :data:`NOISES` (``gaussian``, ``uniform``), unit variance.
        top_k, threshold: the class selection of :func:`msroi`.
        seeds: int64 (N,), one per sample; sample i's noise is drawn from its own generator seeded
            with ``seeds[i]`` on the work device, so a batch gives the per-sample results and a rerun
            on the same device gives the same bytes (CPU; on CUDA, to cuDNN's determinism). CPU and
            CUDA draw different streams. ``None`` seeds each image from a hash of its pixels.
        max_batch: at most this many perturbed images per forward pass (whole samples, at least
            one per pass); ``None`` runs all N * S at once; ``"auto"`` (default) is
            :data:`CPU_PASS` on the CPU and ``None`` elsewhere. The maps are the same either way
            (each sample's noise is its own); only time and memory change. On the CPU a pass of
            32 images x 5 perturbations holds activations of up to 770 MB each, far beyond the
            caches, and ran at 7.8 to 12 images/s against 14 to 16 in passes of 10 to 80
            perturbed images (2 threads, ``pipeline.allocator`` on).

    Speed: under ``torch.autocast`` the network runs in reduced precision, and the noise is drawn
    in it, the maps in float32 (on an H100, bf16 with channels_last maps 1.7x as many images per
    second as float32: ``bench/defend.py``); a model and images in ``channels_last`` stay so (the noise is laid out in the activations'
    memory order, so results differ from the contiguous layout's, as another draw would).

    Returns:
        float32 (N, H, W) in [0, 1] on the images' device.
    """
    device = _check(model, images)
    check_map_params(top_k=top_k, threshold=threshold, samples=samples, input_noise=input_noise,
                     activation_noise=activation_noise, noise=noise)
    maps, _ = _aug_maps(model, images, device, samples, input_noise, activation_noise, noise, top_k,
                        threshold, seeds, max_batch)
    return maps


def aug_msroi_stability(
    model: nn.Module,
    images: torch.Tensor,
    *,
    samples: int = DEFAULT_SAMPLES,
    input_noise: float = DEFAULT_INPUT_NOISE,
    activation_noise: float = 0.0,
    noise: Noise = DEFAULT_NOISE,
    top_k: int = 5,
    threshold: float | None = None,
    seeds: torch.Tensor | None = None,
    max_batch: int | None | Literal["auto"] = "auto",
    logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The :func:`aug_msroi` map and, from the same perturbed passes, each image's prediction
    stability: the fraction of its ``samples`` perturbed passes whose top-1 class is the top-1 of
    one unperturbed pass (one more forward pass per image, unless the caller passes that pass's
    ``logits``, (N, classes), of these very images).

    Adversarial images sit close to a decision boundary that their attack was tuned to cross with
    one noiseless forward pass, so small input noise sends their prediction back and forth more
    often than a clean image's: on the 500 dev images (EfficientNet-Lite0, input noise 0.05, no
    activation noise, S = 5), a stability below 0.7 flagged 19% of the clean images, 52% of the
    FGSM and 68% of the IGSM ones (eps 4/255; README, "The stability gate"). The defaults differ
    from :func:`aug_msroi`'s on purpose: at its activation noise of 0.2 the perturbed top-1 left
    the clean class on every image, which makes stability meaningless (see
    ``defenses.aug_msroi_gated``).

    Arguments as :func:`aug_msroi`. Returns (maps (N, H, W) float32 in [0, 1], stability (N,)
    float32 in [0, 1]), both on the images' device."""
    device = _check(model, images)
    check_map_params(top_k=top_k, threshold=threshold, samples=samples, input_noise=input_noise,
                     activation_noise=activation_noise, noise=noise)
    if logits is not None and tuple(logits.shape[:1]) != (len(images),):
        raise ValueError(f"logits must have one row per image ({len(images)}), got shape {tuple(logits.shape)}")
    maps, classes = _aug_maps(model, images, device, samples, input_noise, activation_noise, noise, top_k,
                              threshold, seeds, max_batch)
    if len(images) == 0:
        return maps, torch.zeros((0,), dtype=torch.float32, device=images.device)
    if logits is None:
        logits = unperturbed_logits(model, images)
    top1 = logits.to(device).argmax(dim=1)
    stability = (classes == top1[:, None]).float().mean(dim=1)
    return maps, stability.to(images.device)


def unperturbed_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """float32 logits (N, classes) of one plain forward pass, on the model's device, in chunks of
    :data:`CPU_PASS` on the CPU and all at once elsewhere."""
    device = _check(model, images)
    if len(images) == 0:
        return torch.zeros((0, model.fc.out_features), dtype=torch.float32, device=device)
    per = len(images) if device.type != "cpu" else CPU_PASS
    with torch.no_grad():
        return torch.cat([_forward(model, images[i : i + per].to(device))[1] for i in range(0, len(images), per)])


def _aug_maps(model, images, device, samples, input_noise, activation_noise, noise, top_k, threshold,
              seeds, max_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Aug-MSROI maps (N, H, W) on the images' device and each perturbed pass's top-1 class
    (N, S) int64 on the model's device; parameters checked by the caller."""
    if max_batch == "auto":
        max_batch = CPU_PASS if device.type == "cpu" else None
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be an integer >= 1, None or 'auto', got {max_batch!r}")
    n, _, h, w = images.shape
    seeds = _content_seeds(images) if seeds is None else torch.as_tensor(seeds, dtype=torch.int64)
    if seeds.shape != (n,):
        raise ValueError(f"seeds must have shape ({n},), got {tuple(seeds.shape)}")
    if n == 0:
        return (torch.zeros((0, h, w), dtype=torch.float32, device=images.device),
                torch.zeros((0, samples), dtype=torch.int64, device=device))
    per = n if max_batch is None else max(1, max_batch // samples)
    out, classes = [], []
    for i in range(0, n, per):
        x = images[i : i + per].to(device)
        roi, top1 = _aug_chunk(model, x, seeds[i : i + per], samples, input_noise, activation_noise,
                               NOISES[noise], top_k, threshold)
        out.append(roi)
        classes.append(top1)
    maps = torch.cat(out) if len(out) > 1 else out[0]
    return _upsample(maps, (h, w)).to(images.device), torch.cat(classes)


def _aug_chunk(model, x, seeds, samples, input_noise, activation_noise, draw, top_k, threshold):
    """Low-resolution mean MSROI map (n, h, w) of one chunk and each perturbed pass's top-1 class
    (n, S; -1 for a pass whose logits the noise made NaN), all n * S perturbations in one pass."""
    n = x.shape[0]
    batch = n * samples
    pool = _NoisePool(seeds, samples, x.device, draw)
    handles = []
    try:
        with torch.no_grad():
            xs = x.repeat_interleave(samples, dim=0)  # sample-major: rows i*S .. i*S+S-1
            if input_noise > 0:
                xs = xs + input_noise * pool.take(x[0].numel()).view(xs.shape)
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                xs = xs.contiguous(memory_format=torch.channels_last)
            if activation_noise > 0:
                thread = threading.get_ident()
                for layer in _noise_layers(model):
                    handles.append(layer.register_forward_pre_hook(_make_hook(pool, activation_noise, batch, thread)))
            feats, logits = _forward(model, xs, plain=not handles)
            roi = _roi(feats, logits, model.fc, top_k, threshold)
    finally:
        for hd in handles:
            hd.remove()
    # argmax reads NaN as the largest value: a pass that overflowed would vote for class 0.
    top1 = torch.where(logits.isnan().any(dim=1), -1, logits.argmax(dim=1))
    return roi.view(n, samples, *roi.shape[1:]).mean(dim=1), top1.view(n, samples)
