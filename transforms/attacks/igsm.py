"""IGSM / BIM: Kurakin, Goodfellow & Bengio, "Adversarial Examples in the Physical World", 2016."""
from __future__ import annotations

import math

import torch

from ._common import AttackResult, check_inputs, input_grad, project_linf, quantize_linf


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
    target: torch.Tensor | None = None,
) -> AttackResult:
    """Iterative gradient sign method (basic iterative method), L-inf.

    ``steps`` sign-gradient steps of ``step_size``, each clipped back into the ``eps`` ball and
    [0, 1]. The paper's defaults: step 1/255 and ``min(eps+4, 1.25 eps)`` steps (``steps=None``).

    Args and returns as :func:`~transforms.attacks.fgsm.fgsm`; ``iterations`` is ``steps``.
    """
    check_inputs(images, labels, target)
    if not 0 <= eps <= 1:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    n_steps = kurakin_steps(eps) if steps is None else int(steps)
    if n_steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    iters = torch.full((images.shape[0],), n_steps, dtype=torch.int64, device=images.device)
    if images.shape[0] == 0:
        return AttackResult(images.clone(), iters)
    adv = images.clone()
    for _ in range(n_steps):
        grad, _ = input_grad(model, adv, labels, target)
        adv = project_linf(adv + step_size * grad.sign(), images, eps)
    return AttackResult(quantize_linf(adv, images, eps), iters)
