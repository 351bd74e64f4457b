"""JSMA: Papernot, McDaniel, Jha, Fredrikson, Celik & Swami, "The Limitations of Deep Learning in
Adversarial Settings", IEEE EuroS&P 2016."""
from __future__ import annotations

import math

import torch

from ._common import (
    AttackResult, check_budget, check_inputs, check_range, fit_budget, is_adversarial, runner_up, zero_iterations,
)


def jsma(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    theta: float = 0.1,
    gamma: float = 0.1,
    candidates: int = 128,
    pairs: int = 32,
    rmse: float | None = None,
    target: torch.Tensor | None = None,
) -> AttackResult:
    """Jacobian-based saliency map attack (pairs of features), L0, at ImageNet size.

    Each iteration takes the forward derivative of the logits z: ``a = d z_t / dx`` for the
    class t to reach and ``b = d (sum_{k != t} z_k) / dx``, and changes pairs (p, q) by ``theta``
    (clipped to [0, 1]) where ``a_p + a_q > 0``, ``b_p + b_q < 0`` and ``(a_p + a_q) * |b_p + b_q|`` is
    largest (the paper's saliency map; signs flip for ``theta < 0``). Changed features leave the
    search domain. t is ``target``, or untargeted the clean runner-up class (success is then any
    class but the label). Up to ``gamma`` of all features may change (the paper's budget).

    Restricted search (224x224x3 has 150,528 features, so 1.1e10 pairs): per sample only
    ``candidates`` features of the domain are paired (``candidates**2 / 2`` pairs): those that
    qualify on their own (``a_p > 0``, ``b_p < 0``) with the largest ``a_p * |b_p|``, then, if too
    few do, those with the largest ``a_p - b_p``; up to ``pairs`` disjoint pairs are changed per
    iteration, best first (the paper changes one). All of it is batched: two backward passes per
    iteration over the samples still running, pair scores as (N, k, k) tensors.

    A sample stops when its image (always on the uint8 grid) is adversarial, when no pair
    qualifies, when ``gamma`` is used up, or when the next pair would break the RMSE budget;
    samples that fail keep their last image.

    RMSE budget, by search: pairs are taken, in order, only while the squared change stays within
    ``rmse**2 * C*H*W``; a final :func:`fit_budget` is a no-op guard. Under a tight budget a
    smaller ``theta`` buys more features.

    Args:
        model: classifier on [0, 1] input, in eval mode.
        images: float32 (N, C, H, W) in [0, 1], on the uint8 grid.
        labels: int64 (N,) classes to move away from (untargeted).
        theta: change per feature, in [0, 1] units. The paper sets features to the maximum
            (+1); the default 0.1 is Foolbox's (the toolbox Prakash et al. ran), and the one that
            works under the paper's RMSE budget: at ``rmse=0.02`` a change of 1 affords only ~60
            features of a 224x224 image, a change of 0.1 about 6,000.
        gamma: maximum fraction of features changed (the paper's MNIST runs: 0.145).
        candidates: features per sample among which pairs are searched.
        pairs: disjoint pairs changed per iteration.
        rmse: optional RMSE budget in [0, 1] units.
        target: int64 (N,) classes to move towards; makes the attack targeted.

    Returns:
        :class:`AttackResult`; ``iterations`` counts gradient iterations per sample.
    """
    check_inputs(images, labels, target)
    check_range("theta", theta, -1.0, 1.0)
    if theta == 0:
        raise ValueError("theta must be non-zero, got 0")
    check_range("gamma", gamma, 0.0, 1.0, lo_open=True)
    check_range("candidates", candidates, 2)
    check_range("pairs", pairs, 1)
    check_budget(None, rmse)
    n = images.shape[0]
    dev = images.device
    iters = zero_iterations(images)
    if n == 0:
        return AttackResult(images.clone(), iters)
    clean = images.detach()
    x = clean.clone()
    d_ = clean[0].numel()
    cls = runner_up(model, clean, labels) if target is None else target
    sign = 1.0 if theta > 0 else -1.0
    c_lev = torch.round(clean.flatten(1) * 255.0)
    domain = (x.flatten(1) < 1.0) if theta > 0 else (x.flatten(1) > 0.0)
    max_feats = max(2, int(gamma * d_))
    cap = math.inf if rmse is None else (rmse * 255.0) ** 2 * d_ * (1.0 - 1e-5)  # levels^2
    used_sq = torch.zeros(n, dtype=torch.float64, device=dev)
    changed = torch.zeros(n, dtype=torch.int64, device=dev)
    k = min(candidates, d_)
    tri = torch.triu(torch.ones(k, k, dtype=torch.bool, device=dev), diagonal=1)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    for _ in range(max_feats // 2 + 1):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        with torch.enable_grad():
            xa = x[idx].requires_grad_(True)
            logits = model(xa)
            done = is_adversarial(logits.detach(), labels[idx], None if target is None else target[idx])
            active[idx[done]] = False
            if bool(done.all()):
                break
            (ga,) = torch.autograd.grad(logits.gather(1, cls[idx, None]).sum(), xa, retain_graph=True)
            (gall,) = torch.autograd.grad(logits.sum(), xa)
        a = sign * ga.flatten(1)
        b = sign * (gall - ga).flatten(1)
        dom = domain[idx]
        # Restricted search: k domain features, paired among themselves. Features that qualify on
        # their own (a > 0, b < 0) come first, by a * |b|; then the rest, by a - b (in (-1, 0)).
        single = (a > 0) & (b < 0)
        key = torch.where(single, a * (-b), torch.sigmoid(a - b) - 1)
        top = torch.where(dom, key, torch.tensor(float("-inf"), device=dev)).topk(k, dim=1)
        feats = top.indices
        infeasible = ~torch.isfinite(top.values)  # fewer than k features left in the domain
        ak, bk = a.gather(1, feats), b.gather(1, feats)
        sa = ak[:, :, None] + ak[:, None, :]
        sb = bk[:, :, None] + bk[:, None, :]
        ok = (sa > 0) & (sb < 0) & tri & ~infeasible[:, :, None] & ~infeasible[:, None, :]
        score = torch.where(ok, sa * (-sb), torch.tensor(float("-inf"), device=dev))
        m = idx.numel()
        rows = torch.arange(m, device=dev)
        picked, valid = [], []
        for _ in range(pairs):  # greedy disjoint pairs, best first, every sample at once
            best_val, best = score.flatten(1).max(dim=1)
            i, j = best // k, best % k
            valid.append(torch.isfinite(best_val))
            picked.append(torch.stack([feats[rows, i], feats[rows, j]], dim=1))
            for c in (i, j):
                score[rows, c, :] = float("-inf")
                score[rows, :, c] = float("-inf")
        pf = torch.stack(picked, dim=1)  # (m, pairs, 2) feature indices
        pv = torch.stack(valid, dim=1)  # (m, pairs)
        xf = x[idx].flatten(1)
        old = xf.gather(1, pf.flatten(1)).view_as(pf)
        new = torch.round((old + theta).clamp(0.0, 1.0) * 255.0) / 255.0
        base = c_lev[idx].gather(1, pf.flatten(1)).view_as(pf)
        sq = ((new * 255.0 - base) ** 2 - (old * 255.0 - base) ** 2).sum(dim=2).double()
        sq = torch.where(pv, sq, torch.zeros_like(sq))
        room_sq = cap - used_sq[idx]
        room_ft = max_feats - changed[idx]
        nth = torch.arange(1, pairs + 1, device=dev)
        take = pv & (sq.cumsum(dim=1) <= room_sq[:, None]) & (2 * nth <= room_ft[:, None])
        go = ~done
        take = take & (take.long().cumprod(dim=1) > 0) & go[:, None]  # in order: stop at the first misfit
        stuck = go & ~take[:, 0]
        active[idx[stuck]] = False
        # Write the taken pairs; the rest go to a dummy column (taken pairs are disjoint).
        dest = torch.where(take[:, :, None], pf, torch.full_like(pf, d_)).flatten(1)
        pad = torch.zeros(m, 1, device=dev)
        xf = torch.cat([xf, pad], dim=1).scatter(1, dest, new.flatten(1))[:, :d_]
        dm = torch.cat([dom, pad.bool()], dim=1).scatter(1, dest, torch.zeros_like(dest, dtype=torch.bool))[:, :d_]
        x[idx] = xf.view(-1, *clean.shape[1:])
        domain[idx] = dm
        used_sq[idx] += torch.where(take, sq, torch.zeros_like(sq)).sum(dim=1)
        changed[idx] += 2 * take.sum(dim=1)
        iters[idx[go]] += 1
    return AttackResult(fit_budget(x, clean, rmse=rmse), iters)
