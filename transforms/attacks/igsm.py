"""IGSM / BIM: Kurakin, Goodfellow & Bengio, "Adversarial Examples in the Physical World", 2016."""
from __future__ import annotations

import math

import torch

from ._common import (
    AttackResult, check_budget, check_inputs, check_range, fit_budget, input_grad, l2_radius, project_l2,
    project_linf,
)


def kurakin_steps(eps: float) -> int:
    """The paper's iteration count, min(eps + 4, 1.25 eps) with eps in 0..255 units (at least 1)."""
    e = eps * 255.0
    return max(1, int(math.ceil(min(e + 4.0, 1.25 * e))))


def igsm(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 8 / 255,
    step_size: float = 1 / 255,
    steps: int | None = None,
    rmse: float | None = None,
    target: torch.Tensor | None = None,
) -> AttackResult:
    """Iterative gradient sign method (basic iterative method), L-inf.

    ``steps`` sign-gradient steps of ``step_size``, each clipped back into the ``eps`` ball and
    [0, 1]. The paper's defaults: step 1/255 and ``min(eps+4, 1.25 eps)`` steps (``steps=None``).

    RMSE budget: after every step the perturbation is also projected (scaled per sample) onto the
    L2 ball of radius ``rmse * sqrt(C*H*W)``; the final quantization keeps it there.

    Args and returns as :func:`~transforms.attacks.fgsm.fgsm`; ``iterations`` is ``steps``.
    """
    check_inputs(images, labels, target)
    check_budget(eps, rmse)
    check_range("step_size", step_size, 0.0, lo_open=True)
    n_steps = kurakin_steps(eps) if steps is None else int(steps)
    check_range("steps", n_steps, 1)
    iters = torch.full((images.shape[0],), n_steps, dtype=torch.int64, device=images.device)
    if images.shape[0] == 0:
        return AttackResult(images.clone(), iters)
    radius = l2_radius(images, rmse) if rmse is not None else None
    adv = images.clone()
    for _ in range(n_steps):
        grad, _ = input_grad(model, adv, labels, target)
        adv = project_linf(adv + step_size * grad.sign(), images, eps)
        if radius is not None:
            adv = project_l2(adv, images, radius)
    return AttackResult(fit_budget(adv, images, eps=eps, rmse=rmse), iters)
