"""GA, the gradient attack: one step along the L2-normalized loss gradient, as used by Prakash,
Moran, Garber, DiLillo & Storer, "Protecting JPEG Images Against Adversarial Attacks", DCC 2018
(Foolbox's ``GradientAttack``, Rauber, Brendel & Bethge 2017)."""
from __future__ import annotations

import torch

from ._common import (
    AttackResult, check_budget, check_inputs, check_range, fit_budget, input_grad, is_adversarial, l2_radius, predict,
)


def ga(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    rmse: float = 0.02,
    search_steps: int = 0,
    target: torch.Tensor | None = None,
) -> AttackResult:
    """Gradient attack, L2: ``x + r * g / ||g||_2`` with ``g`` the gradient of the cross-entropy
    of ``labels`` (ascended) or of ``target`` (descended).

    RMSE budget, by scaling: the step length ``r`` is the L2 radius ``rmse * sqrt(C*H*W)``, and
    quantization keeps the result at or under ``rmse``. With ``search_steps > 0`` the step length
    is bisected, per sample, for the shortest step whose quantized result is adversarial (Foolbox's
    search for the smallest epsilon); samples not adversarial at the full step keep the full step,
    and samples adversarial from the start (a step of 0) stay clean.

    Args:
        model: classifier on [0, 1] input, in eval mode.
        images: float32 (N, C, H, W) in [0, 1], on the uint8 grid.
        labels: int64 (N,) classes to move away from (untargeted).
        rmse: RMSE budget in [0, 1] units (the paper's protocol: 0.02).
        search_steps: bisection steps on the step length (one forward pass each); 0 = full step.
        target: int64 (N,) classes to move towards; makes the attack targeted.

    Returns:
        :class:`AttackResult`; ``iterations`` is 1 (gradient steps; the search only classifies).
    """
    check_inputs(images, labels, target)
    check_budget(None, rmse)
    check_range("search_steps", search_steps, 0)
    n = images.shape[0]
    iters = torch.ones(n, dtype=torch.int64, device=images.device)
    if n == 0:
        return AttackResult(images.clone(), iters)
    grad, logits = input_grad(model, images, labels, target)
    g = grad.flatten(1)
    direction = (g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(grad)
    radius = l2_radius(images, rmse)

    def at(frac: torch.Tensor) -> torch.Tensor:
        return fit_budget(images + (radius * frac).view(-1, 1, 1, 1) * direction, images, rmse=rmse)

    best = at(torch.ones(n, device=images.device))
    if search_steps:
        lo = torch.zeros(n, device=images.device)
        hi = torch.ones(n, device=images.device)
        hi_ok = is_adversarial(predict(model, best), labels, target)
        for _ in range(search_steps):
            mid = (lo + hi) / 2
            cand = at(mid)
            ok = is_adversarial(predict(model, cand), labels, target)
            best = torch.where((ok & hi_ok).view(-1, 1, 1, 1), cand, best)
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, mid)
        best = torch.where(is_adversarial(logits, labels, target).view(-1, 1, 1, 1), images, best)
    return AttackResult(best, iters)
