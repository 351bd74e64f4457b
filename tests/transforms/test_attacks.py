"""Attacks on the tiny CNN: the shared checks for every attack, budgets, specs, and ART oracles.

The real-model checks (DeepFool and C&W success on dev images) are in test_attacks_real.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from transforms import metrics
from transforms.attacks import ATTACKS, CLEAN, AttackResult, parse_attack, run_attack
from transforms.attacks._common import fit_budget
from transforms.seeds import seed_tensor

#: Cheap settings per attack for the tiny model (paper defaults otherwise).
FAST = {
    "fgsm": {},
    "igsm": {},
    "bim": {},
    "pgd": {},
    "mifgsm": {},
    "ga": {},
    "deepfool": {"max_iter": 10},
    "jsma": {"gamma": 0.02, "pairs": 8},
    "lbfgs": {"steps": 5, "search_steps": 3},
    "cw": {"steps": 20, "binary_search_steps": 3},
}
NAMES = sorted(ATTACKS)
SEEDS = seed_tensor([11, 22, 33, 44])


def test_registry_lists_every_attack():
    assert set(FAST) == set(ATTACKS)
    assert {"pgd", "mifgsm", "ga", "deepfool", "jsma", "lbfgs", "cw"} <= set(ATTACKS)
    assert ATTACKS["bim"] is ATTACKS["igsm"]


def _run(name, model, x, labels, *, target=None, seeds=SEEDS, **kw) -> AttackResult:
    params = {**FAST[name], **kw}
    fn = ATTACKS[name]
    if name == "pgd":
        params["seeds"] = seeds[: x.shape[0]]
    return fn(model, x, labels, target=target, **params)


def _labels(model, x):
    with torch.no_grad():
        logits = model(x)
    return logits.argmax(1), logits.argmin(1)


def _on_grid(x: torch.Tensor) -> bool:
    return bool(torch.equal(torch.round(x * 255) / 255, x))


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize("name", NAMES)
def test_contract(name, targeted, tiny_model, batch):
    """No input mutation; dtype, shape and device kept; uint8 grid in [0, 1]; int64 iterations."""
    labels, least = _labels(tiny_model, batch)
    x = batch.clone()
    lab = labels.clone()
    tgt = least.clone() if targeted else None
    r = _run(name, tiny_model, x, lab, target=tgt)
    assert torch.equal(x, batch) and torch.equal(lab, labels)
    assert tgt is None or torch.equal(tgt, least)
    assert isinstance(r, AttackResult)
    assert r.images.dtype == torch.float32 and r.images.shape == batch.shape and r.images.device == batch.device
    assert r.images.is_contiguous()
    assert r.iterations.dtype == torch.int64 and r.iterations.shape == (4,)
    assert float(r.images.min()) >= 0 and float(r.images.max()) <= 1 and _on_grid(r.images)
    assert not r.images.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name, tiny_model):
    x = torch.empty(0, 3, 64, 64)
    labels = torch.empty(0, dtype=torch.int64)
    r = _run(name, tiny_model, x, labels, seeds=torch.empty(0, dtype=torch.int64))
    assert r.images.shape == (0, 3, 64, 64) and r.iterations.shape == (0,)
    r = _run(name, tiny_model, x, labels, target=labels, seeds=torch.empty(0, dtype=torch.int64), rmse=0.02)
    assert r.images.shape == (0, 3, 64, 64)


@pytest.mark.parametrize("budget", [0.02, 0.005])
@pytest.mark.parametrize("name", NAMES)
def test_rmse_budget_holds_after_quantization(name, budget, tiny_model, batch):
    labels, least = _labels(tiny_model, batch)
    for target in (None, least):
        r = _run(name, tiny_model, batch, labels, target=target, rmse=budget)
        got = metrics.rmse(r.images.double(), batch.double())
        assert float(got.max()) <= budget, (name, got.tolist())


@pytest.mark.parametrize("name", ["fgsm", "igsm", "bim", "pgd", "mifgsm"])
@pytest.mark.parametrize("eps", [4 / 255, 0.03])
def test_eps_budget(name, eps, tiny_model, batch):
    labels, _ = _labels(tiny_model, batch)
    r = _run(name, tiny_model, batch, labels, eps=eps)
    assert float(metrics.linf(r.images, batch).max()) <= eps + 1e-7
    r = _run(name, tiny_model, batch, labels, eps=eps, rmse=0.004)
    assert float(metrics.linf(r.images, batch).max()) <= eps + 1e-7
    assert float(metrics.rmse(r.images.double(), batch.double()).max()) <= 0.004


@pytest.mark.parametrize("name", ["fgsm", "igsm", "pgd", "mifgsm"])
def test_zero_eps_is_a_budget_that_leaves_the_images_clean(name, tiny_model, batch):
    """eps=0 is in the documented range: the spec parses (pgd's default step, 2.5 * eps / steps,
    is then 0, which is no reason to refuse) and the attack returns the clean images."""
    parse_attack(f"{name}:eps=0")
    labels, _ = _labels(tiny_model, batch)
    r = _run(name, tiny_model, batch, labels, eps=0.0)
    assert torch.equal(r.images, batch)


@pytest.mark.parametrize("name", NAMES)
def test_batch_result_equals_per_sample_result(name, tiny_model, batch):
    labels, least = _labels(tiny_model, batch)
    for target in (None, least):
        whole = _run(name, tiny_model, batch, labels, target=target)
        for i in range(batch.shape[0]):
            one = _run(name, tiny_model, batch[i : i + 1], labels[i : i + 1],
                       target=None if target is None else target[i : i + 1], seeds=SEEDS[i : i + 1])
            # Equal up to float rounding, which a sign step can amplify: convolutions batched by 4
            # and by 1 round differently on some CPUs, and a gradient component near zero then
            # flips its sign and that pixel's path (seen: PGD, 59 of 12,288 values 6 levels
            # apart). Seeds or samples mixed across the batch would move most pixels.
            far = (one.images[0] - whole.images[i]).abs() > 1 / 255 + 1e-6
            assert float(far.float().mean()) <= 0.01, (name, i, int(far.sum()))


def _margin(model, x, cls):
    with torch.no_grad():
        z = model(x)
    own = z.gather(1, cls[:, None]).squeeze(1)
    other = z.scatter(1, cls[:, None], float("-inf")).amax(1)
    return own - other


@pytest.mark.parametrize("name", NAMES)
def test_targeted_mode_moves_towards_the_target(name, tiny_model, batch):
    labels, least = _labels(tiny_model, batch)
    r = _run(name, tiny_model, batch, labels, target=least)
    before, after = _margin(tiny_model, batch, least), _margin(tiny_model, r.images, least)
    assert bool((after > before).all()), (name, before.tolist(), after.tolist())
    # ...and towards the target rather than anywhere: the untargeted attack gains less on it.
    free = _run(name, tiny_model, batch, labels)
    assert float((after - before).mean()) > float((_margin(tiny_model, free.images, least) - before).mean())


@pytest.mark.parametrize("name", ["pgd", "deepfool", "lbfgs", "cw", "mifgsm", "igsm"])
def test_untargeted_attacks_fool_the_tiny_model(name, tiny_model, batch):
    labels, _ = _labels(tiny_model, batch)
    kw = {
        "pgd": {"eps": 32 / 255}, "mifgsm": {"eps": 32 / 255}, "igsm": {"eps": 32 / 255},
        "deepfool": {"max_iter": 50}, "lbfgs": {"search_steps": 6}, "cw": {"binary_search_steps": 6},
    }[name]
    r = _run(name, tiny_model, batch, labels, **kw)
    with torch.no_grad():
        pred = tiny_model(r.images).argmax(1)
    assert bool((pred != labels).all()), name


def test_pgd_random_start_is_seeded_per_sample(tiny_model, batch):
    labels, _ = _labels(tiny_model, batch)
    a = ATTACKS["pgd"](tiny_model, batch, labels, steps=1, seeds=SEEDS)
    b = ATTACKS["pgd"](tiny_model, batch, labels, steps=1, seeds=SEEDS)
    c = ATTACKS["pgd"](tiny_model, batch, labels, steps=1, seeds=SEEDS + 1)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    # A permuted batch gives each sample the same result.
    p = torch.tensor([2, 0, 3, 1])
    d = ATTACKS["pgd"](tiny_model, batch[p], labels[p], steps=1, seeds=SEEDS[p])
    assert float((d.images - a.images[p]).abs().max()) <= 1 / 255 + 1e-6


def test_minimal_attacks_keep_failures():
    """A model no attack can move: the early-stopping attacks return every sample, clean or
    scaled, never a hole."""

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([5.0, 0.0, 0.0]).expand(x.shape[0], 3) + 0 * x.flatten(1)[:, :1]

    x = torch.rand(3, 3, 8, 8).mul(255).round().div(255)
    labels = torch.zeros(3, dtype=torch.int64)
    for name in ("deepfool", "cw", "lbfgs", "jsma"):
        r = ATTACKS[name](Constant(), x, labels, **{**FAST[name], "rmse": 0.05})
        assert r.images.shape == x.shape and torch.isfinite(r.images).all()
        assert float(metrics.rmse(r.images.double(), x.double()).max()) <= 0.05


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
def test_cw_stops_early_on_samples_adversarial_from_the_start(targeted, tiny_model, batch):
    """A sample already adversarial (misclassified with --attack-labels label, or a target it
    already has) sits at loss 0, the minimum: early abort stops it like any stalled sample instead
    of running every Adam step of every search step (and reporting them as iterations)."""
    pred, _ = _labels(tiny_model, batch)
    labels = pred if targeted else (pred + 1) % 10
    r = ATTACKS["cw"](tiny_model, batch, labels, steps=100, binary_search_steps=2,
                      target=pred if targeted else None)
    assert torch.equal(r.images, batch)
    assert bool((r.iterations < 2 * 100).all()), r.iterations.tolist()


def test_ga_search_leaves_samples_adversarial_from_the_start_clean(tiny_model, batch):
    """GA's search for the shortest adversarial step: a sample already adversarial (misclassified
    with --attack-labels label, or already at its target) needs a step of 0 and is returned clean,
    as the other minimal attacks return it (Foolbox does not run on it). The bisection never tried
    0 and stored 1/2**search_steps of the full step. The full step (no search) is unchanged."""
    pred, _ = _labels(tiny_model, batch)
    labels = torch.where(torch.arange(4) % 2 == 1, (pred + 1) % 10, pred)  # 1 and 3 misclassified
    r = ATTACKS["ga"](tiny_model, batch, labels, search_steps=4)
    assert torch.equal(r.images[1::2], batch[1::2])
    alone = ATTACKS["ga"](tiny_model, batch[0::2], labels[0::2], search_steps=4)
    assert torch.equal(r.images[0::2], alone.images) and not torch.equal(alone.images, batch[0::2])
    assert torch.equal(ATTACKS["ga"](tiny_model, batch, labels, search_steps=4, target=pred).images, batch)
    full = ATTACKS["ga"](tiny_model, batch, labels)
    assert float(metrics.rmse(full.images, batch).min()) > 0.018


# --------------------------------------------------------------------------- fit_budget


@pytest.mark.parametrize("rmse", [0.001, 0.0035, 0.02, 0.1])
def test_fit_budget_never_exceeds_and_stays_close(rmse):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (16, 3, 32, 32), generator=g).float() / 255
    scales = torch.logspace(-3, 0, 16).view(-1, 1, 1, 1)
    adv = clean + scales * torch.randn(clean.shape, generator=g) * 0.2
    q = fit_budget(adv, clean, rmse=rmse)
    assert _on_grid(q) and float(q.min()) >= 0 and float(q.max()) <= 1
    got = metrics.rmse(q.double(), clean.double())
    assert float(got.max()) <= rmse
    want = metrics.rmse(adv.clamp(0, 1).double(), clean.double())
    over = want > rmse * 1.2
    if rmse * 255 >= 1:  # budgets of at least a level are filled closely when the input exceeds them
        assert bool((got[over] >= 0.9 * rmse).all()), got[over].tolist()
    with_eps = fit_budget(adv, clean, rmse=rmse, eps=3 / 255)
    assert float(metrics.linf(with_eps, clean).max()) <= 3 / 255 + 1e-7
    assert float(metrics.rmse(with_eps.double(), clean.double()).max()) <= rmse


def test_fit_budget_rounding_that_would_overshoot_is_shrunk():
    # Every coordinate at 0.51 levels rounds up to a whole level: RMSE doubles unless shrunk.
    clean = torch.full((2, 3, 8, 8), 100 / 255)
    adv = clean + 0.51 / 255
    budget = 0.6 / 255
    q = fit_budget(adv, clean, rmse=budget)
    assert float(metrics.rmse(q.double(), clean.double()).max()) <= budget
    assert float(metrics.rmse(q, clean).max()) > 0.3 / 255  # not simply truncated to nothing


# --------------------------------------------------------------------------- specs and validation


@pytest.mark.parametrize(
    "text, params",
    [
        ("pgd:norm=2,rmse=0.02,steps=3,step_size=0.005,random_start=false",
         {"norm": "2", "rmse": 0.02, "steps": 3, "step_size": 0.005, "random_start": False}),
        ("pgd:eps=8/255,target=least_likely", {"eps": 8 / 255, "target": "least_likely"}),
        ("mifgsm:eps=16/255,steps=10,mu=1.0,rmse=0.02", {"eps": 16 / 255, "steps": 10, "mu": 1.0, "rmse": 0.02}),
        ("ga:rmse=0.02,search_steps=4,target=3", {"rmse": 0.02, "search_steps": 4, "target": 3}),
        ("deepfool:norm=inf,overshoot=0.02,max_iter=50,candidates=10,rmse=0.02",
         {"norm": "inf", "overshoot": 0.02, "max_iter": 50, "candidates": 10, "rmse": 0.02}),
        ("jsma:theta=-1,gamma=0.1,candidates=32,pairs=4,rmse=0.02,target=random",
         {"theta": -1.0, "gamma": 0.1, "candidates": 32, "pairs": 4, "rmse": 0.02, "target": "random"}),
        ("lbfgs:initial_const=0.01,search_steps=5,steps=20,memory=5,rmse=0.02",
         {"initial_const": 0.01, "search_steps": 5, "steps": 20, "memory": 5, "rmse": 0.02}),
        ("cw:confidence=0,initial_const=1e-3,binary_search_steps=9,steps=100,lr=0.01,abort_early=no,rmse=0.02",
         {"confidence": 0.0, "initial_const": 1e-3, "binary_search_steps": 9, "steps": 100, "lr": 0.01,
          "abort_early": False, "rmse": 0.02}),
        ("fgsm:eps=4/255,rmse=0.02", {"eps": 4 / 255, "rmse": 0.02}),
        ("igsm:eps=4/255,rmse=0.02,steps=3", {"eps": 4 / 255, "rmse": 0.02, "steps": 3}),
        ("bim:eps=4/255", {"eps": 4 / 255}),
    ],
)
def test_spec_parsing(text, params):
    spec = parse_attack(text)
    assert dict(spec.params) == params
    assert spec.name == text.split(":")[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("pgdx", "unknown attack 'pgdx'.*valid: bim, clean|unknown attack 'pgdx'.*valid: bim, cw"),
        ("pgd:epz=1", "unknown parameter 'epz' for attack 'pgd'; valid: norm, eps, rmse, steps"),
        ("pgd:norm=1", "expected one of inf, 2"),
        ("deepfool:max_iter=2.5", "expected an integer"),
        ("cw:seeds=1", "unknown parameter 'seeds'"),
        ("jsma:theta=abc", "bad value for 'theta'"),
        ("igsm:steps=99999999999999999999", r"bad value in attack spec .*steps must be an integer of magnitude below 2\*\*63"),
    ],
)
def test_spec_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_attack(text)


@pytest.mark.parametrize(
    "name, kw, message",
    [
        ("fgsm", {"eps": 1.5}, r"eps must be in \[0.0, 1.0\], got 1.5"),
        ("fgsm", {"rmse": 0.0}, r"rmse must be in \(0.0, 1.0\], got 0.0"),
        ("igsm", {"steps": 0}, "steps must be .*got 0"),
        ("pgd", {"norm": "2"}, "pgd with norm=2 is bounded by rmse"),
        ("pgd", {"steps": -3}, "steps must be .*got -3"),
        ("pgd", {"eps": 0.0, "step_size": 0.0}, r"step_size must be in \(0.0, inf\), got 0.0"),
        ("mifgsm", {"mu": -1.0}, "mu must be .*got -1.0"),
        ("ga", {"rmse": 2.0}, "rmse must be .*got 2.0"),
        ("deepfool", {"overshoot": -0.1}, "overshoot must be .*got -0.1"),
        ("deepfool", {"candidates": 1}, "candidates must be .*got 1"),
        ("deepfool", {"norm": "1"}, "norm must be '2' or 'inf', got '1'"),
        ("jsma", {"theta": 0.0}, "theta must be non-zero"),
        ("jsma", {"gamma": 0.0}, r"gamma must be in \(0.0, 1.0\], got 0.0"),
        ("lbfgs", {"initial_const": -1.0}, "initial_const must be .*got -1.0"),
        ("cw", {"lr": 0.0}, "lr must be .*got 0.0"),
        ("cw", {"binary_search_steps": 0}, "binary_search_steps must be .*got 0"),
        # beyond int64: an OverflowError traceback from torch, and from a spec as well
        ("pgd", {"steps": 10**20}, r"steps must be an integer of magnitude below 2\*\*63, got 100000000000000000000"),
        ("igsm", {"steps": 2**63}, r"steps must be an integer of magnitude below 2\*\*63"),
        ("deepfool", {"max_iter": -(2**70)}, r"max_iter must be an integer of magnitude below 2\*\*63"),
    ],
)
def test_bad_values_name_the_value(name, kw, message, tiny_model, batch):
    with pytest.raises(ValueError, match=message):
        ATTACKS[name](tiny_model, batch[:1], torch.zeros(1, dtype=torch.int64), **kw)


def test_every_param_is_keyword_only_and_annotated():
    import inspect
    import typing

    for name, fn in ATTACKS.items():
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        kinds = [p.kind for p in list(sig.parameters.values())[3:]]
        assert all(k is inspect.Parameter.KEYWORD_ONLY for k in kinds), name
        for p in list(sig.parameters.values())[3:]:
            assert p.name in hints and p.default is not inspect.Parameter.empty, (name, p.name)
        assert "rmse" in sig.parameters and "target" in sig.parameters, name


@pytest.mark.parametrize("name", NAMES)
def test_run_attack_with_spec_targets_and_seeds(name, tiny_model, batch):
    labels, _ = _labels(tiny_model, batch)
    with torch.no_grad():
        clean_logits = tiny_model(batch)
    extra = ",".join(f"{k}={v}" for k, v in FAST[name].items())
    spec = parse_attack(f"{name}:target=least_likely,rmse=0.02" + (f",{extra}" if extra else ""))
    result, target = run_attack(spec, tiny_model, batch, labels, clean_logits=clean_logits, seeds=SEEDS)
    assert torch.equal(target, clean_logits.argmin(1))
    assert float(metrics.rmse(result.images.double(), batch.double()).max()) <= 0.02
    clean, none = run_attack(parse_attack(CLEAN), tiny_model, batch, labels, clean_logits=clean_logits)
    assert torch.equal(clean.images, batch) and none is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_device_kept(name, tiny_model, batch):
    model = tiny_model.to("cuda")
    try:
        labels, least = _labels(model, batch.cuda())
        r = _run(name, model, batch.cuda(), labels, target=least, rmse=0.02, seeds=SEEDS)
        assert r.images.device.type == "cuda" and r.iterations.device.type == "cuda"
        cpu = _run(name, tiny_model.to("cpu"), batch, labels.cpu(), target=least.cpu(), rmse=0.02, seeds=SEEDS)
        assert float((cpu.images - r.images.cpu()).abs().mean()) < 2 / 255
    finally:
        tiny_model.to("cpu")


# --------------------------------------------------------------------------- ART oracles


def _art(model, shape, classes):
    pytest.importorskip("art")
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(shape[1:]), nb_classes=classes,
        clip_values=(0.0, 1.0), device_type="cpu",
    )


def _levels_apart(ours: torch.Tensor, theirs) -> float:
    theirs = torch.round(torch.as_tensor(theirs).clamp(0, 1) * 255)
    return float((torch.round(ours * 255) - theirs).abs().max())


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize("eps", [4 / 255, 8 / 255])
def test_fgsm_matches_art(eps, targeted, tiny_model, batch):
    FastGradientMethod = pytest.importorskip("art.attacks.evasion").FastGradientMethod

    labels, least = _labels(tiny_model, batch)
    y = least if targeted else labels
    art = FastGradientMethod(_art(tiny_model, batch.shape, 10), norm="inf", eps=eps, targeted=targeted, batch_size=4)
    theirs = art.generate(batch.numpy(), y=y.numpy())
    ours = ATTACKS["fgsm"](tiny_model, batch, labels, eps=eps, target=least if targeted else None)
    assert _levels_apart(ours.images, theirs) <= 1


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
def test_pgd_linf_without_random_start_matches_art(targeted, tiny_model, batch):
    ProjectedGradientDescent = pytest.importorskip("art.attacks.evasion").ProjectedGradientDescent

    labels, least = _labels(tiny_model, batch)
    eps, step, steps = 8 / 255, 2 / 255, 10
    art = ProjectedGradientDescent(
        _art(tiny_model, batch.shape, 10), norm="inf", eps=eps, eps_step=step, max_iter=steps,
        targeted=targeted, num_random_init=0, batch_size=4, verbose=False,
    )
    theirs = art.generate(batch.numpy(), y=(least if targeted else labels).numpy())
    ours = ATTACKS["pgd"](tiny_model, batch, labels, eps=eps, step_size=step, steps=steps, random_start=False,
                          target=least if targeted else None)
    assert _levels_apart(ours.images, theirs) <= 1


def test_pgd_l2_without_random_start_matches_art(tiny_model, batch):
    ProjectedGradientDescent = pytest.importorskip("art.attacks.evasion").ProjectedGradientDescent

    labels, _ = _labels(tiny_model, batch)
    rmse, step, steps = 0.02, 0.005, 10
    root = math.sqrt(batch[0].numel())
    art = ProjectedGradientDescent(
        _art(tiny_model, batch.shape, 10), norm=2, eps=rmse * root, eps_step=step * root, max_iter=steps,
        num_random_init=0, batch_size=4, verbose=False,
    )
    theirs = art.generate(batch.numpy(), y=labels.numpy())
    ours = ATTACKS["pgd"](tiny_model, batch, labels, norm="2", rmse=rmse, step_size=step, steps=steps,
                          random_start=False)
    assert _levels_apart(ours.images, theirs) <= 1


def test_mifgsm_matches_art(tiny_model, batch):
    MomentumIterativeMethod = pytest.importorskip("art.attacks.evasion").MomentumIterativeMethod

    labels, _ = _labels(tiny_model, batch)
    eps, steps = 16 / 255, 10
    art = MomentumIterativeMethod(_art(tiny_model, batch.shape, 10), norm="inf", eps=eps, eps_step=eps / steps,
                                  decay=1.0, max_iter=steps, batch_size=4, verbose=False)
    theirs = art.generate(batch.numpy(), y=labels.numpy())
    ours = ATTACKS["mifgsm"](tiny_model, batch, labels, eps=eps, steps=steps, mu=1.0)
    assert _levels_apart(ours.images, theirs) <= 1
