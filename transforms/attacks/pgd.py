"""PGD: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018."""
from __future__ import annotations

from typing import Literal

import torch

from ..seeds import per_sample_uniform
from ._common import (
    AttackResult, check_budget, check_inputs, check_range, default_seeds, fit_budget, input_grad, l2_radius,
    project_l2, project_linf,
)


def pgd(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: Literal["inf", "2"] = "inf",
    eps: float | None = None,
    rmse: float | None = None,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    target: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
) -> AttackResult:
    """Projected gradient descent from a random start, L-inf or L2.

    L-inf: ``x <- proj(x + step_size * sign(g))``. L2: ``x <- proj(x + step * g / ||g||_2)``, where
    ``g`` is the gradient of the cross-entropy of ``labels`` (ascended) or of ``target``
    (descended), and ``proj`` clips into the budget and [0, 1]. Random start: uniform noise in the
    L-inf ball (L-inf), or uniform noise in [-1, 1]^D scaled onto the L2 ball (L2); drawn per
    sample from ``seeds``, so a sample's result does not depend on its batch.

    Budgets and how they are met (by projection after every step, then :func:`fit_budget` when
    quantizing): ``norm="inf"`` is bounded by ``eps`` (default 8/255, the paper's CIFAR budget) and,
    if given, also by ``rmse``; ``norm="2"`` is bounded by ``rmse`` (its L2 radius is
    ``rmse * sqrt(C*H*W)``, required) and, if given, also by ``eps``.

    Args:
        model: classifier on [0, 1] input, in eval mode.
        images: float32 (N, C, H, W) in [0, 1], on the uint8 grid.
        labels: int64 (N,) classes to move away from (untargeted).
        norm: ``"inf"`` or ``"2"``.
        eps: L-inf budget in [0, 1] units.
        rmse: RMSE budget in [0, 1] units.
        steps: gradient steps (the paper: 7 to train, 20 to evaluate on CIFAR; 10 here).
        step_size: L-inf: change per pixel per step; L2: step length in RMSE units. Default
            ``2.5 * budget / steps`` (2/255 for eps=8/255 and 10 steps; the rule of Madry et al.'s
            robustness library).
        random_start: start from a random point of the budget ball (the paper) or from ``images``.
        target: int64 (N,) classes to move towards; makes the attack targeted.
        seeds: int64 (N,) per-sample seeds for the random start (default 0..N-1).

    Returns:
        :class:`AttackResult`, images on the uint8 grid within the budget; ``iterations`` = steps.
    """
    check_inputs(images, labels, target)
    if norm not in ("inf", "2"):
        raise ValueError(f"norm must be 'inf' or '2', got {norm!r}")
    if norm == "inf" and eps is None:
        eps = 8 / 255
    if norm == "2" and rmse is None:
        raise ValueError("pgd with norm=2 is bounded by rmse; give one, e.g. rmse=0.02")
    check_budget(eps, rmse)
    check_range("steps", steps, 1)
    if step_size is not None:
        check_range("step_size", step_size, 0.0, lo_open=True)
    budget = eps if norm == "inf" else rmse
    step = 2.5 * budget / steps if step_size is None else step_size  # 0 only for eps=0: no attack
    n = images.shape[0]
    iters = torch.full((n,), steps, dtype=torch.int64, device=images.device)
    if n == 0:
        return AttackResult(images.clone(), iters)
    radius = l2_radius(images, rmse) if rmse is not None else None

    def project(x: torch.Tensor) -> torch.Tensor:
        x = project_linf(x, images, eps) if eps is not None else x.clamp(0.0, 1.0)
        return project_l2(x, images, radius) if radius is not None else x

    adv = images.clone()
    if random_start:
        noise = per_sample_uniform(default_seeds(seeds, n), tuple(images.shape[1:]), images.device) * 2 - 1
        if norm == "inf":
            adv = images + eps * noise
        else:  # the L2 projection brings the cube's corner-heavy noise onto the ball
            adv = images + noise
        adv = project(adv)
    l2_step = step * (images[0].numel() ** 0.5)
    for _ in range(steps):
        grad, _ = input_grad(model, adv, labels, target)
        if norm == "inf":
            adv = adv + step * grad.sign()
        else:
            g = grad.flatten(1)
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            adv = adv + l2_step * g.view_as(grad)
        adv = project(adv)
    return AttackResult(fit_budget(adv, images, eps=eps, rmse=rmse), iters)
