"""Image quality and perturbation measures on float32 NCHW tensors in [0, 1]; per-sample results."""
from __future__ import annotations

import functools

import torch

__all__ = ["mse", "psnr", "ssim", "linf", "l2", "rmse"]


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two NCHW tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (N,), in [0, 1]^2 units."""
    _check(a, b)
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root mean squared error per sample (N,), in [0, 1] units (the paper's attack budget)."""
    return mse(a, b).sqrt()


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L2 norm of the difference per sample (N,)."""
    _check(a, b)
    return (a.float() - b.float()).flatten(1).norm(dim=1)


def linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L-inf norm of the difference per sample (N,)."""
    _check(a, b)
    if a.shape[0] == 0:
        return a.new_zeros(0)
    return (a.float() - b.float()).abs().flatten(1).amax(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample (N,), dB, peak 1.0; ``inf`` for identical images."""
    m = mse(a, b).double()
    return (10.0 * torch.log10(1.0 / m)).float()


@functools.lru_cache(maxsize=16)
def _band_cached(n: int, window: int, sigma: float, device: str) -> torch.Tensor:
    g = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    band = torch.zeros(n - window + 1, n, dtype=torch.float64)
    for i in range(n - window + 1):
        band[i, i : i + window] = g
    return band.float().to(device)


def _band(n: int, window: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(n - window + 1, n) matrix applying a valid-mode 1-D Gaussian blur."""
    return _band_cached(n, window, sigma, str(device))


#: The side of SSIM's Gaussian window: images must be at least this large on both sides.
SSIM_WINDOW = 11

#: Images up to this many pixels on both sides are blurred with one band matrix per side. A
#: dense band costs O(side^2) memory and O(side) work per pixel (a 4000x6000 image took minutes
#: and gigabytes, an 11x40000 strip more memory than the machine had), so larger images are
#: measured in overlapping tiles of ``_SSIM_TILE`` pixels, in memory bounded by a tile.
_SSIM_ONE_BAND = 512
_SSIM_TILE = 128


def _ssim_map(a: torch.Tensor, b: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    """The SSIM of every valid window position, (N, C, H - window + 1, W - window + 1)."""
    c, h, w = a.shape[1:]
    # The valid-mode separable Gaussian blur as two banded matrix products (much faster than a
    # depthwise convolution on CPU), over the five statistics at once: a, b, a^2, b^2, ab.
    stats = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    gy = _band(h, window, sigma, a.device)
    gx = _band(w, window, sigma, a.device)
    blurred = gy @ stats @ gx.T
    mu_a, mu_b, e_aa, e_bb, e_ab = blurred.split(c, dim=1)
    mu_ab = mu_a * mu_b
    mu_aa = mu_a * mu_a
    mu_bb = mu_b * mu_b
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_ab + c1) * (2 * (e_ab - mu_ab) + c2)) / ((mu_aa + mu_bb + c1) * (e_aa - mu_aa + e_bb - mu_bb + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = SSIM_WINDOW, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per sample (N,) (Wang et al., IEEE TIP 2004), averaged over channels.

    Gaussian 11x11 window, sigma 1.5, K1=0.01, K2=0.03, data range 1, population covariances,
    mean over the valid (unpadded) region: the same as scikit-image's ``structural_similarity``
    with ``gaussian_weights=True, use_sample_covariance=False, data_range=1, channel_axis``.
    Time and memory grow linearly with the pixels (images over 512 px on a side go by tiles).
    """
    _check(a, b)
    n, c, h, w = a.shape
    if n == 0:
        return a.new_zeros(0)
    if min(h, w) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {h}x{w}")
    a = a.float()
    b = b.float()
    if max(h, w) <= _SSIM_ONE_BAND:
        return _ssim_map(a, b, window, sigma).flatten(1).mean(dim=1)
    # Tiles overlap by window - 1 pixels, so that they hold every window position exactly once.
    step = _SSIM_TILE - window + 1
    total = torch.zeros(n, dtype=torch.float64, device=a.device)
    for top in range(0, h - window + 1, step):
        for left in range(0, w - window + 1, step):
            rows, cols = slice(top, top + _SSIM_TILE), slice(left, left + _SSIM_TILE)
            total += _ssim_map(a[:, :, rows, cols], b[:, :, rows, cols], window, sigma).double().flatten(1).sum(dim=1)
    return (total / (c * (h - window + 1) * (w - window + 1))).float()
