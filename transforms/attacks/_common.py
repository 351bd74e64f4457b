"""Helpers shared by the attacks: losses, projections, quantization onto the uint8 grid."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["AttackResult", "input_grad", "project_linf", "quantize_linf", "check_inputs"]


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


def project_linf(x: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``x`` into the L-inf ball of radius ``eps`` around ``clean`` and into [0, 1]."""
    return torch.min(torch.max(x, clean - eps), clean + eps).clamp_(0.0, 1.0)


def quantize_linf(x: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Round ``x`` to the uint8 grid without leaving the ``eps`` L-inf ball around ``clean``.

    ``clean`` is assumed on the grid. Rounding alone could step half a level past a budget that
    is not a whole number of levels (eps=0.03 is 7.65 levels), so the grid bounds are enforced.
    """
    c = torch.round(clean * 255.0)
    e = eps * 255.0
    lo = torch.clamp(c - torch.floor(torch.tensor(e + 1e-6)), 0, 255)
    hi = torch.clamp(c + torch.floor(torch.tensor(e + 1e-6)), 0, 255)
    q = torch.round(x.detach().clamp(0, 1) * 255.0)
    return (torch.min(torch.max(q, lo), hi) / 255.0).contiguous()
