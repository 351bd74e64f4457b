"""FGSM: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015."""
from __future__ import annotations

import torch

from ._common import AttackResult, check_budget, check_inputs, fit_budget, input_grad


def fgsm(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 8 / 255,
    rmse: float | None = None,
    target: torch.Tensor | None = None,
) -> AttackResult:
    """Fast gradient sign method, L-inf: ``x + eps * sign(grad_x loss)``, one step.

    Untargeted it ascends the cross-entropy of ``labels``; targeted it descends that of ``target``.

    RMSE budget: the signed step is scaled down per sample (a sign step has RMSE ``eps`` before
    clipping to [0, 1]) so that the quantized result has RMSE <= ``rmse``; see
    :func:`~transforms.attacks._common.fit_budget`.

    Args:
        model: classifier on [0, 1] input, in eval mode.
        images: float32 (N, C, H, W) in [0, 1], on the uint8 grid.
        labels: int64 (N,) classes to move away from (untargeted).
        eps: L-inf budget in [0, 1] units.
        rmse: optional RMSE budget in [0, 1] units, applied on top of ``eps``.
        target: int64 (N,) classes to move towards; makes the attack targeted.

    Returns:
        :class:`AttackResult` with images quantized to uint8 levels within ``eps`` (and ``rmse``)
        of ``images``; ``iterations`` is 1.
    """
    check_inputs(images, labels, target)
    check_budget(eps, rmse)
    iters = torch.ones(images.shape[0], dtype=torch.int64, device=images.device)
    if images.shape[0] == 0:
        return AttackResult(images.clone(), iters)
    grad, _ = input_grad(model, images, labels, target)
    adv = images + eps * grad.sign()
    return AttackResult(fit_budget(adv, images, eps=eps, rmse=rmse), iters)
