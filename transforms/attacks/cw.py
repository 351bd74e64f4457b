"""C&W L2: Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017."""
from __future__ import annotations

import torch

from ._common import AttackResult, bisect_const, check_budget, check_inputs, check_range, fit_budget, zero_iterations


def cw(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    confidence: float = 0.0,
    initial_const: float = 1e-3,
    binary_search_steps: int = 9,
    steps: int = 100,
    lr: float = 0.01,
    abort_early: bool = True,
    rmse: float | None = None,
    target: torch.Tensor | None = None,
) -> AttackResult:
    """Carlini-Wagner L2 with a binary search over the constant c.

    Minimizes ``||x' - x||_2^2 + c * f(x')`` over ``x' = (tanh(w) + 1) / 2`` with Adam, where
    ``f = max(z_l - max_{i != l} z_i, -confidence)`` untargeted (l = label) and
    ``f = max(max_{i != t} z_i - z_t, -confidence)`` targeted (t = target), on logits z. Per sample,
    c starts at ``initial_const`` and is bisected (times 10 until a first success) over
    ``binary_search_steps`` outer steps, each restarting from the clean image; the smallest
    successful perturbation over all of them is returned. The paper's defaults: confidence 0,
    9 search steps, lr 0.01, c0 1e-3, early abort; the paper runs up to 10,000 Adam steps per
    search step, ``steps`` defaults to 100 here for throughput.

    Quantization is in the loop: every forward pass classifies the image actually stored (on the
    uint8 grid, within budget), with the gradient passed straight through the rounding (as in
    BPDA, Athalye et al. 2018), so success is judged after quantization at no extra cost. A sample
    stops its search step when its loss stalls (checked every ``max(10, steps // 10)``); samples never
    adversarial keep the evaluated image with the smallest margin loss (their best attempt).

    RMSE budget, by projection: each evaluated image is scaled into the ``rmse`` ball before it is
    rounded (:func:`fit_budget`), so every image C&W records is within budget.

    Args:
        model: classifier on [0, 1] input, in eval mode.
        images: float32 (N, C, H, W) in [0, 1], on the uint8 grid.
        labels: int64 (N,) classes to move away from (untargeted).
        confidence: margin kappa on logits.
        initial_const: first c.
        binary_search_steps: outer steps over c.
        steps: Adam steps per outer step.
        lr: Adam learning rate (in tanh space).
        abort_early: stop a search step for a sample whose loss stopped falling.
        rmse: optional RMSE budget in [0, 1] units.
        target: int64 (N,) classes to move towards; makes the attack targeted.

    Returns:
        :class:`AttackResult`; ``iterations`` counts Adam steps over all search steps.
    """
    check_inputs(images, labels, target)
    check_range("confidence", confidence, 0.0)
    check_range("initial_const", initial_const, 0.0, lo_open=True)
    check_range("binary_search_steps", binary_search_steps, 1)
    check_range("steps", steps, 1)
    check_range("lr", lr, 0.0, lo_open=True)
    check_budget(None, rmse)
    n = images.shape[0]
    dev = images.device
    iters = zero_iterations(images)
    if n == 0:
        return AttackResult(images.clone(), iters)
    clean = images.detach()
    cls = labels if target is None else target
    w0 = torch.atanh((clean * 2 - 1) * (1 - 1e-6))
    lower = torch.zeros(n, device=dev)
    upper = torch.full((n,), float("inf"), device=dev)
    const = torch.full((n,), float(initial_const), device=dev)
    best_l2 = torch.full((n,), float("inf"), device=dev)
    best_adv = clean.clone()
    fallback_margin = torch.full((n,), float("inf"), device=dev)
    b1, b2, adam_eps = 0.9, 0.999, 1e-8
    check_every = max(10, steps // 10)  # the paper: every tenth of the steps
    for _ in range(binary_search_steps):
        w = w0.clone()
        m = torch.zeros_like(w)
        v = torch.zeros_like(w)
        t = torch.zeros(n, device=dev)
        prev = torch.full((n,), float("inf"), device=dev)
        succeeded = torch.zeros(n, dtype=torch.bool, device=dev)
        active = torch.ones(n, dtype=torch.bool, device=dev)
        for it in range(steps):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            c0 = clean[idx]
            with torch.enable_grad():
                wa = w[idx].requires_grad_(True)
                xf = (torch.tanh(wa) + 1) / 2
                q = fit_budget(xf, c0, rmse=rmse)
                xq = xf + (q - xf).detach()  # the stored image, gradient straight through the rounding
                logits = model(xq)
                l2 = (xq - c0).flatten(1).pow(2).sum(dim=1)
                own = logits.gather(1, cls[idx, None]).squeeze(1)
                other = logits.scatter(1, cls[idx, None], float("-inf")).amax(dim=1)
                margin = other - own if target is None else own - other  # > 0: adversarial
                loss = l2 + const[idx] * (confidence - margin).clamp_min(0.0)
                (g,) = torch.autograd.grad(loss.sum(), wa)
            # Adam, with a step count per sample (samples stop at different times).
            t[idx] += 1
            mi = b1 * m[idx] + (1 - b1) * g
            vi = b2 * v[idx] + (1 - b2) * g * g
            m[idx], v[idx] = mi, vi
            ti = t[idx].view(-1, 1, 1, 1)
            w[idx] = w[idx] - lr * (mi / (1 - b1**ti)) / ((vi / (1 - b2**ti)).sqrt() + adam_eps)
            iters[idx] += 1
            # Bookkeeping on the image just classified (on the grid, within budget).
            margin, l2, loss = margin.detach(), l2.detach(), loss.detach()
            ok = margin >= confidence
            ok &= margin > 0  # ties on the argmax are not adversarial
            succeeded[idx] |= ok
            improve = ok & (l2 < best_l2[idx])
            best_l2[idx] = torch.where(improve, l2, best_l2[idx])
            closer = ~torch.isfinite(best_l2[idx]) & (-margin < fallback_margin[idx])
            fallback_margin[idx] = torch.where(closer, -margin, fallback_margin[idx])
            keep = (improve | closer).view(-1, 1, 1, 1)
            best_adv[idx] = torch.where(keep, q, best_adv[idx])
            if abort_early and (it + 1) % check_every == 0:
                stalled = loss >= prev[idx] * 0.9999  # >=: a loss of 0 (adversarial, unmoved) is stalled too
                prev[idx] = loss
                active[idx[stalled]] = False
        const, lower, upper = bisect_const(const, lower, upper, succeeded)
    return AttackResult(best_adv, iters)
