"""DeepFool: Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool
deep neural networks", CVPR 2016."""
from __future__ import annotations

from typing import Literal

import torch

from ._common import (
    AttackResult, check_budget, check_inputs, check_range, fit_budget, is_adversarial, predict, zero_iterations,
)


def deepfool(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: Literal["2", "inf"] = "2",
    overshoot: float = 0.02,
    max_iter: int = 50,
    candidates: int = 10,
    rmse: float | None = None,
    target: torch.Tensor | None = None,
) -> AttackResult:
    """DeepFool, L2 or L-inf: iterated steps to the nearest linearized decision boundary.

    Untargeted (the paper's Algorithm 2): at each step, for the ``candidates - 1`` most likely
    clean classes k other than the label l, linearize ``f_k = z_k - z_l`` and step to the closest
    boundary: ``r = (|f| / ||w||_q + 1e-4) * w / ||w||_q`` (L2, q=2) or
    ``(|f| / ||w||_1 + 1e-4) * sign(w)`` (L-inf, q=1); the image is ``x0 + (1 + overshoot) * sum r``.
    Targeted (an extension): the boundary is that between ``target`` and the current most likely
    other class, one gradient per step.

    Batched: each step computes one forward pass over the samples still running and one backward
    pass per candidate over all of them (Jacobian rows, not per-sample gradients). A sample stops
    when its quantized image is adversarial (every step classifies the image on the uint8 grid);
    samples that never get there keep their last, most pushed, attempt.

    RMSE budget: every iterate is scaled (per sample) into the ``rmse`` ball when quantized
    (:func:`fit_budget`), so DeepFool stops inside it or runs to ``max_iter`` at its edge.

    Args:
        model: classifier on [0, 1] input, in eval mode.
        images: float32 (N, C, H, W) in [0, 1], on the uint8 grid.
        labels: int64 (N,) classes to move away from.
        norm: ``"2"`` or ``"inf"``.
        overshoot: the paper's overshoot (0.02).
        max_iter: the paper's iteration cap (50).
        candidates: classes considered, the label included (the paper: 10 on ImageNet).
        rmse: optional RMSE budget in [0, 1] units.
        target: int64 (N,) classes to move towards; makes the attack targeted.

    Returns:
        :class:`AttackResult`; ``iterations`` counts the gradient steps of each sample (0 for
        samples already adversarial).
    """
    check_inputs(images, labels, target)
    if norm not in ("2", "inf"):
        raise ValueError(f"norm must be '2' or 'inf', got {norm!r}")
    check_range("overshoot", overshoot, 0.0)
    check_range("max_iter", max_iter, 1)
    check_range("candidates", candidates, 2)
    check_budget(None, rmse)
    n = images.shape[0]
    iters = zero_iterations(images)
    if n == 0:
        return AttackResult(images.clone(), iters)
    clean = images.detach()
    x = clean.clone()
    r_tot = torch.zeros_like(clean)
    cand = None
    if target is None:
        logits0 = predict(model, clean)
        k = min(candidates, logits0.shape[1]) - 1
        cand = logits0.scatter(1, labels[:, None], float("-inf")).topk(k, dim=1).indices  # (N, k)
    active = torch.ones(n, dtype=torch.bool, device=images.device)
    for _ in range(max_iter):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        with torch.enable_grad():
            xa = x[idx].requires_grad_(True)
            logits = model(xa)
            tgt = None if target is None else target[idx]
            done = is_adversarial(logits.detach(), labels[idx], tgt)
            active[idx[done]] = False
            if bool(done.all()):
                break
            if cand is None:
                f, w = _targeted_row(logits, xa, tgt)
            else:
                f, w = _closest_boundary(logits, xa, labels[idx], cand[idx], norm)
        flat = w.flatten(1)
        if norm == "2":
            wn = flat.norm(dim=1).clamp_min(1e-12)
            r = ((f.abs() / wn + 1e-4) / wn).view(-1, 1, 1, 1) * w
        else:
            wn = flat.abs().sum(dim=1).clamp_min(1e-12)
            r = (f.abs() / wn + 1e-4).view(-1, 1, 1, 1) * w.sign()
        go = ~done
        rows = idx[go]
        r_tot[rows] += r[go]
        x[rows] = fit_budget(clean[rows] + (1 + overshoot) * r_tot[rows], clean[rows], rmse=rmse)
        iters[rows] += 1
    return AttackResult(x, iters)


def _closest_boundary(
    logits: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, cand: torch.Tensor, norm: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, w) of the candidate whose linearized boundary is closest: one backward per candidate."""
    own = logits.gather(1, labels[:, None])
    best_ratio = torch.full((x.shape[0],), float("inf"), device=x.device)
    best_f = torch.zeros(x.shape[0], device=x.device)
    best_w = torch.zeros_like(x)
    for j in range(cand.shape[1]):  # over candidate classes, each over the whole batch
        diff = logits.gather(1, cand[:, j : j + 1]) - own
        (w,) = torch.autograd.grad(diff.sum(), x, retain_graph=j < cand.shape[1] - 1)
        f = diff.detach().squeeze(1)
        wn = w.flatten(1).norm(dim=1) if norm == "2" else w.flatten(1).abs().sum(dim=1)
        ratio = f.abs() / wn.clamp_min(1e-12)
        better = ratio < best_ratio
        best_ratio = torch.where(better, ratio, best_ratio)
        best_f = torch.where(better, f, best_f)
        best_w = torch.where(better.view(-1, 1, 1, 1), w, best_w)
    return best_f, best_w


def _targeted_row(logits: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, w) for the boundary between ``target`` and the most likely other class."""
    other = logits.detach().scatter(1, target[:, None], float("-inf")).argmax(dim=1)
    diff = logits.gather(1, target[:, None]) - logits.gather(1, other[:, None])
    (w,) = torch.autograd.grad(diff.sum(), x)
    return diff.detach().squeeze(1), w
