"""Total-variation denoising in torch, batched, on any device: scikit-image's Chambolle.

:func:`tv_chambolle` is scikit-image's ``denoise_tv_chambolle`` (the projection algorithm of
A. Chambolle, "An algorithm for total variation minimization and applications", JMIV 2004, in
scikit-image's form of Rudin-Osher-Fatemi) applied to every 2-D plane of a tensor on its own, as
``channel_axis`` does there: the same iteration, step ``tau = 1/4``, and the same stopping rule per
plane (stop when the energy changes by less than ``eps`` times its first value, or after
``max_iter`` iterations), in float32. Its output matches scikit-image's to float32 rounding: on
uint8 images, after rounding back to uint8, a pixel in a million differs, by one level
(``tests/transforms/test_denoise.py``).

Why: ``aug_msroi_gated`` denoises every image it flags, and on a GPU worker that denoising (about
8 ms per 224x224 image on one CPU core) was most of the encoder's CPU time; here a batch's flagged
images are denoised on the map model's device in the map stage, hundreds of planes at once. On a CPU
it runs an image at a time, where its working set stays in cache, at about scikit-image's speed
(``bench/defend.py``).
"""
from __future__ import annotations

import numpy as np
import torch

#: scikit-image's defaults for ``denoise_tv_chambolle``.
DEFAULT_EPS = 2.0e-4
DEFAULT_MAX_ITER = 200
#: Pixels per chunk of planes on a CPU: an image of 224x224x3 at a time (larger chunks ran
#: slower there, their arrays falling out of cache).
_CPU_CHUNK_PIXELS = 160_000
#: On other devices: 2**26 pixels, about 2.5 GiB of float32 working arrays (ten of them); 445
#: images of 224x224x3 at once, or one 12-megapixel photo.
_DEVICE_CHUNK_PIXELS = 2**26


def tv_chambolle(planes: torch.Tensor, weight: float, *, eps: float = DEFAULT_EPS,
                 max_iter: int = DEFAULT_MAX_ITER, chunk: int | None = None) -> torch.Tensor:
    """Denoise each 2-D plane of ``planes`` (float32 ``(..., H, W)``, values in the units of
    ``weight``, e.g. [0, 1]) by total variation; same shape, dtype and device, input untouched.

    ``weight``: the denoising strength (scikit-image's ``weight``; > 0). ``chunk``: planes per
    pass (default: about 160,000 pixels' worth on a CPU, 2**26 elsewhere); the result does not
    depend on it."""
    if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if planes.dim() < 2 or not planes.is_floating_point():
        raise ValueError(f"planes must be a floating-point tensor (..., H, W), got {planes.dtype} {tuple(planes.shape)}")
    shape = planes.shape
    flat = planes.detach().reshape(-1, shape[-2], shape[-1]).float()
    if flat.numel() == 0:
        return planes.detach().clone()
    if chunk is None:
        budget = _CPU_CHUNK_PIXELS if flat.device.type == "cpu" else _DEVICE_CHUNK_PIXELS
        chunk = max(1, budget // (shape[-2] * shape[-1]))
    out = torch.cat([_chambolle(flat[i:i + chunk], float(weight), eps, max_iter)
                     for i in range(0, len(flat), chunk)])
    return out.reshape(shape).to(planes.dtype)


def _chambolle(img: torch.Tensor, weight: float, eps: float, max_iter: int) -> torch.Tensor:
    """(P, H, W) float32 -> denoised, each plane stopping on its own, as scikit-image's
    ``_denoise_tv_chambolle_nd`` does for one plane."""
    P, H, W = img.shape
    result = img.clone()  # planes that never change (constant ones) are their input
    idx = torch.arange(P, device=img.device)
    p0, p1 = torch.zeros_like(img), torch.zeros_like(img)  # the dual field, one per axis
    g0, g1 = torch.zeros_like(img), torch.zeros_like(img)  # forward differences; last row/column stay 0
    d = torch.zeros_like(img)  # the negative divergence of p
    out = img.clone()
    active = torch.ones(P, dtype=torch.bool, device=img.device)
    tau = 0.25  # 1 / (2 * ndim)
    e_init = e_prev = None
    for i in range(max_iter):
        if i > 0:
            torch.add(p0, p1, out=d).neg_()
            d[:, 1:] += p0[:, :-1]
            d[:, :, 1:] += p1[:, :, :-1]
            torch.add(img, d, out=out)
            energy = d.square().sum((1, 2), dtype=torch.float64)
        else:
            energy = torch.zeros(len(img), dtype=torch.float64, device=img.device)
        torch.sub(out[:, 1:], out[:, :-1], out=g0[:, :-1])
        torch.sub(out[:, :, 1:], out[:, :, :-1], out=g1[:, :, :-1])
        norm = torch.sqrt(g0.square() + g1.square())
        energy = (energy + weight * norm.sum((1, 2), dtype=torch.float64)) / (H * W)
        norm.mul_(tau / weight).add_(1.0)
        p0.sub_(g0, alpha=tau).div_(norm)
        p1.sub_(g1, alpha=tau).div_(norm)
        if i == 0:
            # A constant plane has no gradient: it never changes, and scikit-image would run
            # every iteration to return it as it is (its energy stays 0, never below eps * 0).
            e_init = e_prev = energy
            active &= energy > 0
        else:
            done = active & ((e_prev - energy).abs() < eps * e_init)
            if bool(done.any()):
                result[idx[done]] = out[done]
                active &= ~done
            e_prev = energy
        n_active = int(active.sum())
        if n_active == 0:
            return result
        if n_active <= 3 * len(active) // 4:  # drop finished planes once they are a quarter
            idx, img, p0, p1, g0, g1, d, out, e_init, e_prev, active = (
                t[active] for t in (idx, img, p0, p1, g0, g1, d, out, e_init, e_prev, active))
    result[idx[active]] = out[active]
    return result


def denoise_tv_uint8(pixels: torch.Tensor, weight: float, *, chunk: int | None = None) -> torch.Tensor:
    """uint8 images ``(..., C, H, W)`` -> uint8, each channel denoised by :func:`tv_chambolle` with
    ``weight`` in the units of pixels in [0, 1], rounded half to even; same device. Weight 0
    returns a copy. What scikit-image's ``denoise_tv_chambolle(x / 255, weight, channel_axis=...)``
    gives, rounded back to uint8 (``transforms.defenses.denoise_tv``)."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
    if weight == 0:
        return pixels.clone()
    out = tv_chambolle(pixels.float() / 255.0, weight, chunk=chunk)
    return out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


#: Donoho and Johnstone's constant: the median absolute value of a standard normal variable.
_MAD_NORMAL = 0.6745
#: Twice a diagonal Haar coefficient of uint8 pixels is at most 2 * 255 in size.
_DIAG_BINS = 511


def noise_level(image: np.ndarray) -> float:
    """Estimated standard deviation of the noise in a uint8 HWC (or HW) image, in pixel levels
    (0..255): the median absolute value of its finest diagonal Haar wavelet coefficients over
    all channels, divided by 0.6745 (Donoho and Johnstone's robust estimator, as scikit-image's
    ``estimate_sigma`` computes it with other wavelets; channels pooled, not averaged).

    The diagonal detail of 2x2 blocks, ``(a - b - c + d) / 2``, is small in smooth and in edged
    regions alike and keeps the full variance of pixel-independent noise, so its median follows
    the noise more than the content. ``aug_msroi_gated`` leaves a flagged image undenoised
    below its ``noise_floor``: an L-infinity attack of 4/255 moves nearly every pixel, and on the
    dev images 7 of the 780 FGSM and IGSM images the gate flags fall below 2 levels against 41 of
    its 106 clean ones (README, "The stability gate"). Textured clean images read high too:
    this separates noise-free images from possibly noisy ones, not clean from attacked.

    On uint8 pixels the estimate takes few values: multiples of 0.37 levels, mostly of 0.74.
    An image with fewer than two rows or columns has no 2x2 block: 0.0. :func:`noise_levels`
    gives the same values for a batch, on any device (about 0.3 ms per 224x224 image here)."""
    x = np.asarray(image)
    if x.dtype != np.uint8 or x.ndim not in (2, 3):
        raise ValueError(f"image must be uint8 HW or HWC, got {x.dtype} {x.shape}")
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    if h == 0 or w == 0:
        return 0.0
    x = x[:h, :w].astype(np.int16)
    diag = np.abs(x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]).ravel()  # twice the coefficient
    counts = np.cumsum(np.bincount(diag, minlength=_DIAG_BINS))
    n = diag.size  # the median as numpy takes it: the middle value, or the mean of the two middle ones
    lower = int(np.searchsorted(counts, (n - 1) // 2, side="right"))
    upper = int(np.searchsorted(counts, n // 2, side="right"))
    return _level(lower, upper)


def _level(lower: int, upper: int) -> float:
    """The estimate from the two middle values (twice the coefficients) of the sorted sizes."""
    return (float(lower) + float(upper)) / 2.0 / 2.0 / _MAD_NORMAL


def noise_levels(pixels: torch.Tensor) -> list[float]:
    """:func:`noise_level` of each uint8 image of a batch ``(N, C, H, W)`` (or ``(N, H, W)``), on
    the batch's device: the same values. The median comes from a histogram of the coefficients'
    sizes per image (integers below 511), so the batch is reduced on the device and only 2N
    integers come back."""
    if pixels.dtype != torch.uint8 or pixels.dim() not in (3, 4):
        raise ValueError(f"pixels must be uint8 (N, C, H, W) or (N, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
    n_img = pixels.shape[0]
    h, w = pixels.shape[-2] // 2 * 2, pixels.shape[-1] // 2 * 2
    if n_img == 0 or h == 0 or w == 0:
        return [0.0] * n_img
    x = pixels[..., :h, :w].to(torch.int16)
    diag = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]).abs_()
    diag = diag.reshape(n_img, -1).to(torch.int64)
    n = diag.shape[1]
    offsets = torch.arange(n_img, device=diag.device).mul_(_DIAG_BINS).unsqueeze(1)
    counts = torch.bincount((diag + offsets).reshape(-1), minlength=n_img * _DIAG_BINS).view(n_img, _DIAG_BINS)
    counts = counts.cumsum_(1)
    ranks = torch.tensor([[(n - 1) // 2, n // 2]], device=counts.device, dtype=counts.dtype).expand(n_img, 2)
    middle = torch.searchsorted(counts, ranks.contiguous(), right=True).cpu().tolist()
    return [_level(lo, hi) for lo, hi in middle]
