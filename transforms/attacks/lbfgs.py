"""L-BFGS: Szegedy, Zaremba, Sutskever, Bruna, Erhan, Goodfellow & Fergus, "Intriguing properties
of neural networks", ICLR 2014."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    AttackResult, bisect_const, check_budget, check_inputs, check_range, fit_budget, is_adversarial, predict, runner_up,
    zero_iterations,
)


def lbfgs(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    initial_const: float = 1e-2,
    search_steps: int = 6,
    steps: int = 20,
    memory: int = 10,
    rmse: float | None = None,
    target: torch.Tensor | None = None,
) -> AttackResult:
    """Box-constrained L-BFGS, L2: ``min ||x' - x||_2^2 + c * CE(model(x'), t)`` s.t. ``x' in [0, 1]^D``.

    The paper's formulation, with the squared L2 distance and the constant on the loss term, so
    that "the smallest c whose minimizer is adversarial" is the smallest perturbation. ``t`` is
    ``target``, or untargeted the clean runner-up class (the nearest class; success is then any
    class but the label). Per sample, c starts at ``initial_const``, grows 10x until a first
    success and is then bisected, ``search_steps`` times in all; each minimization restarts from
    the clean image. The smallest successful result over the search is returned; samples never
    adversarial keep the minimizer of the largest c tried.

    The minimizer is a batched projected L-BFGS (two-loop recursion with ``memory`` pairs per
    sample, variables at a bound whose gradient points outwards held fixed, projected Armijo
    backtracking), a simpler relative of L-BFGS-B (Byrd, Lu, Nocedal & Zhu 1995); each sample
    keeps its own history and stops on its own (projected gradient under 1e-5, relative
    decrease under 1e-9, or a failed line search), after ``steps`` iterations at most (SciPy's
    L-BFGS-B as used by Foolbox runs up to 15,000; 20 here for throughput).

    RMSE budget, by search: each minimizer is scaled into the ``rmse`` ball and quantized
    (:func:`fit_budget`) before success is judged, so the search over c only accepts results
    within budget, and the returned images always are.

    Args:
        model: classifier on [0, 1] input, in eval mode.
        images: float32 (N, C, H, W) in [0, 1], on the uint8 grid.
        labels: int64 (N,) classes to move away from (untargeted).
        initial_const: first c.
        search_steps: minimizations per sample (values of c tried).
        steps: L-BFGS iterations per minimization.
        memory: curvature pairs kept (SciPy's maxcor).
        rmse: optional RMSE budget in [0, 1] units.
        target: int64 (N,) classes to move towards; makes the attack targeted.

    Returns:
        :class:`AttackResult`; ``iterations`` counts L-BFGS iterations over the whole search.
    """
    check_inputs(images, labels, target)
    check_range("initial_const", initial_const, 0.0, lo_open=True)
    check_range("search_steps", search_steps, 1)
    check_range("steps", steps, 1)
    check_range("memory", memory, 1)
    check_budget(None, rmse)
    n = images.shape[0]
    dev = images.device
    iters = zero_iterations(images)
    if n == 0:
        return AttackResult(images.clone(), iters)
    clean = images.detach()
    cls = runner_up(model, clean, labels) if target is None else target
    lower = torch.zeros(n, device=dev)
    upper = torch.full((n,), float("inf"), device=dev)
    const = torch.full((n,), float(initial_const), device=dev)
    best_l2 = torch.full((n,), float("inf"), device=dev)
    best = clean.clone()
    for _ in range(search_steps):
        x, spent = _minimize(model, clean, cls, const, steps, memory)
        iters += spent
        cand = fit_budget(x, clean, rmse=rmse)
        ok = is_adversarial(predict(model, cand), labels, target)
        l2 = (cand - clean).flatten(1).pow(2).sum(dim=1)
        take = (ok & (l2 < best_l2)) | (~ok & ~torch.isfinite(best_l2))  # failures keep the latest c
        best_l2 = torch.where(ok & take, l2, best_l2)
        best = torch.where(take.view(-1, 1, 1, 1), cand, best)
        const, lower, upper = bisect_const(const, lower, upper, ok)
    return AttackResult(best, iters)


def _objective(
    model: torch.nn.Module, x: torch.Tensor, clean: torch.Tensor, cls: torch.Tensor, const: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample objective (n,) and its gradient (n, D) at flat ``x`` (n, D)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x.view(-1, *clean.shape[1:]))
        f = (x - clean.flatten(1)).pow(2).sum(dim=1) + const * F.cross_entropy(logits, cls, reduction="none")
        (g,) = torch.autograd.grad(f.sum(), x)
    return f.detach(), g


def _minimize(
    model: torch.nn.Module, clean: torch.Tensor, cls: torch.Tensor, const: torch.Tensor, steps: int, memory: int,
    *, pgtol: float = 1e-5, rel_tol: float = 1e-9, max_backtracks: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched projected L-BFGS from ``clean``; returns the minimizers (N, C, H, W) and iterations (N,)."""
    n = clean.shape[0]
    dev = clean.device
    x = clean.flatten(1).clone()
    f, g = _objective(model, x, clean, cls, const)
    d_ = x.shape[1]
    s_hist = torch.zeros(n, memory, d_, device=dev)
    y_hist = torch.zeros(n, memory, d_, device=dev)
    rho = torch.zeros(n, memory, device=dev)
    gamma = torch.ones(n, device=dev)
    spent = torch.zeros(n, dtype=torch.int64, device=dev)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    for k in range(steps):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xi, gi = x[idx], g[idx]
        free = ~(((xi <= 0) & (gi > 0)) | ((xi >= 1) & (gi < 0)))
        pg = gi * free
        conv = pg.abs().amax(dim=1) < pgtol
        if bool(conv.any()):
            active[idx[conv]] = False
            keep = ~conv
            idx, xi, gi, free, pg = idx[keep], xi[keep], gi[keep], free[keep], pg[keep]
            if idx.numel() == 0:
                break
        # Two-loop recursion over the valid history (slots with rho = 0 contribute nothing).
        si, yi, ri = s_hist[idx], y_hist[idx], rho[idx]
        slots = [(k - 1 - j) % memory for j in range(min(k, memory))]  # newest first
        q = pg.clone()
        alphas = {}
        for j in slots:
            alphas[j] = ri[:, j] * (si[:, j] * q).sum(dim=1)
            q -= alphas[j][:, None] * yi[:, j]
        r = gamma[idx][:, None] * q
        for j in reversed(slots):
            beta = ri[:, j] * (yi[:, j] * r).sum(dim=1)
            r += si[:, j] * (alphas[j] - beta)[:, None]
        d = -r * free
        slope = (d * pg).sum(dim=1)
        bad = slope >= 0
        d = torch.where(bad[:, None], -pg, d)
        fresh = bad | (k == 0)
        a = torch.where(fresh, (1.0 / pg.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0), torch.ones_like(slope))
        # Projected Armijo backtracking, per sample.
        x_new, f_new, g_new = xi.clone(), f[idx].clone(), gi.clone()
        pending = torch.ones(idx.numel(), dtype=torch.bool, device=dev)
        for _ in range(max_backtracks):
            p = pending.nonzero().squeeze(1)
            if p.numel() == 0:
                break
            xt = (xi[p] + a[p, None] * d[p]).clamp(0.0, 1.0)
            ft, gt = _objective(model, xt, clean[idx[p]], cls[idx[p]], const[idx[p]])
            accept = ft <= f[idx[p]] + 1e-4 * (gi[p] * (xt - xi[p])).sum(dim=1)
            pa = p[accept]
            x_new[pa], f_new[pa], g_new[pa] = xt[accept], ft[accept], gt[accept]
            pending[pa] = False
            a[p[~accept]] *= 0.5
        moved = ~pending
        active[idx[pending]] = False  # no acceptable step: stuck at a (local) minimum
        s = x_new - xi
        y = g_new - gi
        sy = (s * y).sum(dim=1)
        valid = moved & (sy > 1e-10)
        slot = k % memory
        s_hist[idx, slot] = torch.where(valid[:, None], s, torch.zeros_like(s))
        y_hist[idx, slot] = torch.where(valid[:, None], y, torch.zeros_like(y))
        rho[idx, slot] = torch.where(valid, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))
        gamma[idx] = torch.where(valid, sy / (y * y).sum(dim=1).clamp_min(1e-20), gamma[idx])
        f_old = f[idx]
        scale = torch.maximum(torch.maximum(f_old.abs(), f_new.abs()), torch.ones_like(f_new))
        small = (f_old - f_new) <= rel_tol * scale
        active[idx[moved & small]] = False
        x[idx], f[idx], g[idx] = x_new, f_new, g_new
        spent[idx[moved]] += 1
    return x.view_as(clean), spent
