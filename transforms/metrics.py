"""Image quality and perturbation measures on float32 NCHW tensors in [0, 1]; per-sample results."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

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


@functools.lru_cache(maxsize=8)
def _gauss(size: int, sigma: float, device: str) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    return g.to(device)


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per sample (N,) (Wang et al., IEEE TIP 2004), averaged over channels.

    Gaussian 11x11 window, sigma 1.5, K1=0.01, K2=0.03, data range 1, population covariances,
    mean over the valid (unpadded) region: the same as scikit-image's ``structural_similarity``
    with ``gaussian_weights=True, use_sample_covariance=False, data_range=1, channel_axis``.
    """
    _check(a, b)
    n, c, h, w = a.shape
    if n == 0:
        return a.new_zeros(0)
    if min(h, w) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {h}x{w}")
    g = _gauss(window, sigma, str(a.device))
    kx = g.view(1, 1, 1, window).expand(c, 1, 1, window)
    ky = g.view(1, 1, window, 1).expand(c, 1, window, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    a = a.float()
    b = b.float()
    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a * mu_a
    sbb = blur(b * b) - mu_b * mu_b
    sab = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(dim=1)
