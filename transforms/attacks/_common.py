"""Helpers shared by the attacks: losses, projections, budgets, quantization onto the uint8 grid.

Budgets, in [0, 1] units: ``eps`` bounds the L-inf distance to the clean image; ``rmse`` bounds
``sqrt(mean((adv - clean) ** 2))`` over all C*H*W values (:func:`transforms.metrics.rmse`), which is
an L2 ball of radius ``rmse * sqrt(C*H*W)``. :func:`fit_budget` is the one place that puts an
attack's float result onto the uint8 grid without leaving either budget.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "AttackResult",
    "check_inputs",
    "check_budget",
    "check_range",
    "input_grad",
    "predict",
    "is_adversarial",
    "project_linf",
    "project_l2",
    "l2_radius",
    "fit_budget",
    "default_seeds",
    "zero_iterations",
    "runner_up",
    "bisect_const",
]

#: Relative slack kept under an RMSE budget so float32 re-measurement never lands above it.
_RMSE_SLACK = 1e-5

#: The largest float32: the attacks compute in float32, where a larger parameter is inf.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class AttackResult(NamedTuple):
    """What every attack returns.

    images: float32 NCHW in [0, 1], on the uint8 grid (what gets stored), same device as the input.
    iterations: int64 (N,), gradient steps (or optimizer iterations) spent on each sample.
    """

    images: torch.Tensor
    iterations: torch.Tensor


def check_inputs(images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> None:
    if images.ndim != 4 or images.dtype != torch.float32:
        raise ValueError(f"images must be float32 NCHW, got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if target is not None and target.shape != labels.shape:
        raise ValueError(f"target must have shape {tuple(labels.shape)}, got {tuple(target.shape)}")


def check_range(
    name: str, value: float | int, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False
) -> None:
    """Raise ValueError naming ``name`` and ``value`` unless it is a finite number with
    ``lo <= value <= hi`` (``lo < value`` when ``lo_open``): nan and inf are never valid, nor an
    integer beyond int64 (counts are int64 tensors), nor a float beyond float32's range (inf in
    the attacks' tensors: a step of 1e300 made NaN images)."""
    if isinstance(value, int) and abs(value) >= 2**63:
        raise ValueError(f"{name} must be an integer of magnitude below 2**63, got {value}")
    if isinstance(value, float) and math.isfinite(value) and abs(value) > _FLOAT32_MAX:
        raise ValueError(f"{name} must be a number of magnitude at most {_FLOAT32_MAX:.4g} (float32's "
                         f"largest), got {value}")
    ok = math.isfinite(value)
    if lo is not None:
        ok = ok and (value > lo if lo_open else value >= lo)
    if hi is not None:
        ok = ok and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf)' if hi is None else f'{hi}]'}"
        raise ValueError(f"{name} must be in {rng}, got {value}")


def check_budget(eps: float | None, rmse: float | None) -> None:
    """``eps`` in [0, 1] and ``rmse`` in (0, 1], each optional."""
    if eps is not None:
        check_range("eps", eps, 0.0, 1.0)
    if rmse is not None:
        check_range("rmse", rmse, 0.0, 1.0, lo_open=True)


def default_seeds(seeds: torch.Tensor | None, n: int) -> torch.Tensor:
    """``seeds`` as given, else 0..n-1 (then a sample's noise depends on its batch position)."""
    if seeds is None:
        return torch.arange(n, dtype=torch.int64)
    if seeds.shape != (n,):
        raise ValueError(f"seeds must have shape ({n},), got {tuple(seeds.shape)}")
    return seeds


def zero_iterations(images: torch.Tensor) -> torch.Tensor:
    """int64 (N,) zeros on the images' device: the per-sample iteration counter."""
    return torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)


def runner_up(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The most likely class other than ``labels`` (N,): the nearest class to aim for when an
    attack that needs a class is run untargeted."""
    return predict(model, images).scatter(1, labels[:, None], float("-inf")).argmax(dim=1)


def bisect_const(
    const: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, success: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the per-sample search over a loss constant (C&W, L-BFGS).

    A success lowers the upper bound to ``const``, a failure raises the lower one; the next
    constant is the midpoint once an upper bound exists, else ten times the last. ``upper``
    starts at +inf. Returns (const, lower, upper).
    """
    upper = torch.where(success, torch.minimum(upper, const), upper)
    lower = torch.where(success, lower, torch.maximum(lower, const))
    const = torch.where(torch.isfinite(upper), (lower + upper) / 2, const * 10)
    return const, lower, upper


def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (N, K) without a graph."""
    with torch.no_grad():
        return model(x)


def is_adversarial(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """bool (N,): the prediction left ``labels`` (untargeted) or reached ``target`` (targeted)."""
    pred = logits.argmax(dim=1)
    return pred != labels if target is None else pred == target


def input_grad(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the attack loss w.r.t. the input, and the logits.

    Untargeted: ascend cross-entropy of ``labels``. Targeted: descend cross-entropy of ``target``
    (returned negated, so callers always ascend). Summed over the batch so each sample's gradient
    is independent of the batch it came in.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        if target is None:
            loss = F.cross_entropy(logits, labels, reduction="sum")
        else:
            loss = -F.cross_entropy(logits, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def l2_radius(images: torch.Tensor, rmse: float) -> float:
    """The L2 radius (in [0, 1] units) that an RMSE budget allows for images of this shape."""
    return rmse * math.sqrt(images[0].numel())


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def project_linf(x: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``x`` into the L-inf ball of radius ``eps`` around ``clean`` and into [0, 1]."""
    return torch.min(torch.max(x, clean - eps), clean + eps).clamp_(0.0, 1.0)


def project_l2(x: torch.Tensor, clean: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale ``x - clean`` per sample down to L2 norm ``radius`` where it is longer.

    Scaling towards ``clean`` keeps ``x`` inside [0, 1] and inside any L-inf ball it was in.
    """
    d = x - clean
    norm = d.flatten(1).norm(dim=1)
    scale = torch.where(norm > radius, radius / norm.clamp_min(1e-12), torch.ones_like(norm))
    return clean + d * _view(scale, d)


def fit_budget(
    x: torch.Tensor, clean: torch.Tensor, *, eps: float | None = None, rmse: float | None = None
) -> torch.Tensor:
    """Put ``x`` on the uint8 grid, in [0, 1], within ``eps`` (L-inf) and ``rmse`` of ``clean``.

    ``clean`` is assumed on the grid. L-inf: the perturbation is clipped to the whole number of
    levels ``eps`` allows, then rounded. RMSE: the perturbation is first scaled (per sample) to the
    budget; rounding can push the RMSE back over it, so samples that land over are rounded towards
    the clean image (which cannot increase any coordinate's distance), except the coordinates with
    the largest fractional parts, which round away while they fit (a per-sample sort, batched).
    Works without a graph; callers that need gradients use it as a straight-through step:
    ``x + (fit_budget(x, ...) - x).detach()``.
    """
    x = x.detach()
    c = torch.round(clean.detach() * 255.0)
    d = x.clamp(0.0, 1.0) * 255.0 - c
    if eps is not None:
        lim = math.floor(eps * 255.0 + 1e-6)
        d = d.clamp(-lim, lim)
    if rmse is None or d.shape[0] == 0 or d[0].numel() == 0:
        return ((c + torch.round(d)).clamp_(0.0, 255.0) / 255.0).contiguous()
    flat = d.flatten(1)
    cap = (rmse * 255.0) ** 2 * flat.shape[1] * (1.0 - _RMSE_SLACK)  # sum of squares, levels^2
    norm2 = flat.double().pow(2).sum(dim=1)
    scale = torch.where(norm2 > cap, (cap / norm2.clamp_min(1e-30)).sqrt(), torch.ones_like(norm2)).float()
    flat = flat * scale[:, None]
    q = torch.round(flat)
    over = q.double().pow(2).sum(dim=1) > cap
    if bool(over.any()):
        q[over] = _round_within(flat[over], cap)
    return ((c + q.view_as(d)).clamp_(0.0, 255.0) / 255.0).contiguous()


def _round_within(flat: torch.Tensor, cap: float) -> torch.Tensor:
    """Round rows of ``flat`` (levels, each of squared norm <= ``cap``) to integers of squared
    norm <= ``cap``, as close to rounding to nearest as the cap allows.

    Start from rounding towards zero (which cannot exceed the cap) and round away from zero the
    coordinates that rounding to nearest would, largest fractional part first, while they fit.
    """
    mag = flat.abs()
    t = torch.floor(mag)
    frac = mag - t
    cost = (2 * t + 1).double() * (frac >= 0.5)  # extra squared norm of rounding up; 0 = not eligible
    order = torch.argsort(frac, dim=1, descending=True, stable=True)
    room = cap - t.double().pow(2).sum(dim=1, keepdim=True)
    fits = cost.gather(1, order).cumsum(dim=1) <= room
    up = torch.zeros_like(fits).scatter(1, order, fits) & (frac >= 0.5)
    return torch.sign(flat) * (t + up.float())
