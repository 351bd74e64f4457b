"""FGSM: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015."""
from __future__ import annotations

import torch

from ._common import AttackResult, check_inputs, input_grad, quantize_linf


def fgsm(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 8 / 255,
    target: torch.Tensor | None = None,
) -> AttackResult:
    """Fast gradient sign method, L-inf: ``x + eps * sign(grad_x loss)``, one step.

    Args:
        model: classifier on [0, 1] input, in eval mode.
        images: float32 (N, C, H, W) in [0, 1], on the uint8 grid.
        labels: int64 (N,) classes to move away from (untargeted).
        eps: L-inf budget in [0, 1] units.
        target: int64 (N,) classes to move towards; makes the attack targeted.

    Returns:
        :class:`AttackResult` with images quantized to uint8 levels within ``eps`` of ``images``.
    """
    check_inputs(images, labels, target)
    if not 0 <= eps <= 1:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    iters = torch.ones(images.shape[0], dtype=torch.int64, device=images.device)
    if images.shape[0] == 0:
        return AttackResult(images.clone(), iters)
    grad, _ = input_grad(model, images, labels, target)
    adv = images + eps * grad.sign()
    return AttackResult(quantize_linf(adv, images, eps), iters)
