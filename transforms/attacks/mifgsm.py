"""MI-FGSM: Dong, Liao, Pang, Su, Zhu, Hu & Li, "Boosting Adversarial Attacks with Momentum",
CVPR 2018."""
from __future__ import annotations

import torch

from ._common import (
    AttackResult, check_budget, check_inputs, check_range, fit_budget, input_grad, l2_radius, project_l2,
    project_linf,
)


def mifgsm(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 16 / 255,
    steps: int = 10,
    mu: float = 1.0,
    rmse: float | None = None,
    target: torch.Tensor | None = None,
) -> AttackResult:
    """Momentum iterative FGSM, L-inf.

    ``g <- mu * g + grad / ||grad||_1`` (per sample), ``x <- clip(x + (eps / steps) * sign(g))``:
    the paper's Algorithm 1 with its defaults eps=16/255, T=10 steps, mu=1.0. Untargeted it ascends
    the cross-entropy of ``labels``; targeted it descends that of ``target``.

    RMSE budget: after every step the perturbation is also projected (scaled per sample) onto the
    L2 ball of radius ``rmse * sqrt(C*H*W)``; the final quantization keeps it there.

    Args:
        model: classifier on [0, 1] input, in eval mode.
        images: float32 (N, C, H, W) in [0, 1], on the uint8 grid.
        labels: int64 (N,) classes to move away from (untargeted).
        eps: L-inf budget in [0, 1] units; the step is ``eps / steps``.
        steps: iterations T.
        mu: momentum decay factor.
        rmse: optional RMSE budget in [0, 1] units, applied on top of ``eps``.
        target: int64 (N,) classes to move towards; makes the attack targeted.

    Returns:
        :class:`AttackResult`, images on the uint8 grid within the budget; ``iterations`` = steps.
    """
    check_inputs(images, labels, target)
    check_budget(eps, rmse)
    check_range("steps", steps, 1)
    check_range("mu", mu, 0.0)
    n = images.shape[0]
    iters = torch.full((n,), steps, dtype=torch.int64, device=images.device)
    if n == 0:
        return AttackResult(images.clone(), iters)
    radius = l2_radius(images, rmse) if rmse is not None else None
    alpha = eps / steps
    adv = images.clone()
    momentum = torch.zeros_like(images)
    for _ in range(steps):
        grad, _ = input_grad(model, adv, labels, target)
        l1 = grad.flatten(1).abs().sum(dim=1).clamp_min(1e-12)
        momentum = mu * momentum + grad / l1.view(-1, 1, 1, 1)
        adv = project_linf(adv + alpha * momentum.sign(), images, eps)
        if radius is not None:
            adv = project_l2(adv, images, radius)
    return AttackResult(fit_budget(adv, images, eps=eps, rmse=rmse), iters)
