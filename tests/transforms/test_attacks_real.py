"""Attacks on the real model (EfficientNet-Lite0) and a handful of dev images: the slower checks.

Each test runs on at most four correctly classified images of the shared dev set (skipped when the
set is absent) and takes seconds to tens of seconds on two CPU cores. DeepFool and C&W are checked
against Foolbox's implementations (a test-only dependency; ART's DeepFool takes minutes per image
at this size, see ``bench/attacks.py``).
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import DEV, dev_rows
from transforms import metrics
from transforms.attacks import ATTACKS, parse_attack, run_attack


@pytest.fixture(scope="module")
def dev4(real_model):
    """Up to four correctly classified dev images among the first eight: (images, labels)."""
    from transforms.images import decode_image, to_tensor

    rows = sorted(dev_rows(), key=lambda r: r["file"])[:8]
    x = to_tensor([decode_image((DEV / r["file"]).read_bytes()) for r in rows])
    truth = torch.tensor([int(r["label"]) for r in rows])
    with torch.no_grad():
        pred = real_model(x).argmax(1)
    keep = (pred == truth).nonzero().squeeze(1)[:4]
    assert keep.numel() >= 3, "the dev set should start with correctly classified images"
    return x[keep], truth[keep]


def _success(model, adv, labels, target=None):
    with torch.no_grad():
        pred = model(adv).argmax(1)
    ok = pred != labels if target is None else pred == target
    return float(ok.float().mean())


@pytest.mark.parametrize(
    "name, kw, max_rmse",
    [
        ("lbfgs", {"steps": 10, "search_steps": 3, "initial_const": 0.1}, 0.005),
        ("jsma", {"theta": 0.1, "pairs": 32, "candidates": 128, "rmse": 0.02}, 0.02),
    ],
)
def test_minimal_attacks_fool_correctly_classified_dev_images(name, kw, max_rmse, real_model, dev4):
    x, labels = dev4
    r = ATTACKS[name](real_model, x, labels, **kw)
    assert _success(real_model, r.images, labels) >= 0.95
    got = metrics.rmse(r.images.double(), x.double())
    assert float(got.max()) <= max_rmse, got.tolist()
    assert torch.equal(torch.round(r.images * 255) / 255, r.images)


#: Factors tried on a reference's perturbation until its uint8 rounding is adversarial.
SCALES = (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)


def _reference_on_grid(model, x, adv, labels):
    """RMSE of a reference's float result once it lives on the uint8 grid, as ours must.

    Rounding alone undoes most of a minimal attack's sub-level perturbation (Foolbox's DeepFool
    results, rounded, fool nothing), so each reference perturbation is scaled by the smallest
    factor in :data:`SCALES` whose rounding is adversarial: the smallest stored image it yields.
    """
    best = torch.full((len(x),), float("nan"), dtype=torch.float64)
    for s in SCALES:
        a = torch.round((x + s * (adv - x)).clamp(0, 1) * 255) / 255
        with torch.no_grad():
            ok = model(a).argmax(1) != labels
        best = torch.where(ok & best.isnan(), metrics.rmse(a.double(), x.double()), best)
    return best


@pytest.mark.parametrize(
    "name, kw",
    [
        ("deepfool", {"candidates": 10, "overshoot": 0.02, "max_iter": 50}),  # the paper's settings
        ("cw", {"binary_search_steps": 2, "steps": 10, "initial_const": 1.0, "lr": 0.01, "confidence": 0.0}),
    ],
)
def test_minimal_attacks_beat_foolbox_on_the_grid(name, kw, real_model, dev4):
    """Success >= 95% on correctly classified dev images, and a mean perturbation no larger than
    Foolbox's with the same settings on the same images."""
    fb = pytest.importorskip("foolbox")
    x, labels = dev4
    ours = ATTACKS[name](real_model, x, labels, **kw)
    assert torch.equal(torch.round(ours.images * 255) / 255, ours.images)
    assert _success(real_model, ours.images, labels) >= 0.95
    if name == "deepfool":
        ref = fb.attacks.L2DeepFoolAttack(steps=kw["max_iter"], candidates=kw["candidates"], overshoot=kw["overshoot"])
    else:
        ref = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=kw["binary_search_steps"], steps=kw["steps"],
                                               stepsize=kw["lr"], confidence=kw["confidence"],
                                               initial_const=kw["initial_const"])
    _, theirs, _ = ref(fb.PyTorchModel(real_model, bounds=(0, 1)), x, labels, epsilons=None)
    theirs_rmse = _reference_on_grid(real_model, x, theirs, labels)
    ours_rmse = metrics.rmse(ours.images.double(), x.double())
    assert not theirs_rmse.isnan().any(), theirs_rmse.tolist()
    assert float(ours_rmse.mean()) <= float(theirs_rmse.mean()), (ours_rmse.tolist(), theirs_rmse.tolist())


def test_targeted_pgd_reaches_the_least_likely_class(real_model, dev4):
    x, labels = dev4
    with torch.no_grad():
        logits = real_model(x)
    spec = parse_attack("pgd:eps=8/255,target=least_likely")
    result, target = run_attack(spec, real_model, x, labels, clean_logits=logits,
                                seeds=torch.arange(len(x), dtype=torch.int64))
    assert torch.equal(target, logits.argmin(1))
    assert _success(real_model, result.images, labels, target) >= 0.75
    assert float(metrics.linf(result.images, x).max()) <= 8 / 255 + 1e-7


def test_gradient_attack_at_the_paper_budget(real_model, dev4):
    x, labels = dev4
    r = ATTACKS["ga"](real_model, x, labels, rmse=0.02)
    got = metrics.rmse(r.images.double(), x.double())
    assert float(got.max()) <= 0.02 and float(got.min()) > 0.018  # uses the budget, never exceeds it
    assert _success(real_model, r.images, labels) >= 0.75


def test_bpda_defeats_jpeg_where_the_plain_attack_is_undone(real_model, dev4):
    """IGSM (eps 4/255, 30 steps) against JPEG at quality 50: the plain attack's perturbation is
    partly undone by the codec; the same attack differentiating through it (BPDA) fools every image."""
    from transforms.defenses import defend_images, parse_defense

    x, labels = dev4
    jpeg = parse_defense("jpeg:quality=50")

    def agree(spec):
        r, _ = run_attack(parse_attack(spec), real_model, x, labels, clean_logits=real_model(x).detach())
        with torch.no_grad():
            return float((real_model(defend_images(jpeg, r.images)).argmax(1) == labels).float().mean())

    plain = agree("igsm:eps=4/255,steps=30")
    adaptive = agree("igsm:eps=4/255,steps=30,bpda=jpeg:quality=50")
    assert adaptive == 0.0 < plain, (plain, adaptive)


def test_stability_flags_igsm_images_far_more_often_than_clean_ones(real_model):
    """The gate of ``aug_msroi_gated``: on the first 16 dev images, the stored (uint8) IGSM images'
    predictions move under the map's input noise, and under the stable images' JPEG, far more often
    than the clean images' (on the 500 dev images: 68% and 86% of IGSM images flagged against 19% and
    6% of clean ones)."""
    from transforms.images import decode_image, to_tensor, to_uint8
    from transforms.defenses import jpeg_stability
    from transforms.saliency import aug_msroi_stability

    rows = sorted(dev_rows(), key=lambda r: r["file"])[:16]
    x = to_tensor([decode_image((DEV / r["file"]).read_bytes()) for r in rows])
    with torch.no_grad():
        logits = real_model(x)
    r, _ = run_attack(parse_attack("igsm:eps=4/255,steps=10"), real_model, x, logits.argmax(1), clean_logits=logits)
    adv = to_tensor(to_uint8(r.images))
    seeds = torch.arange(16)
    clean_flags = int((aug_msroi_stability(real_model, x, seeds=seeds)[1] < 0.7).sum())
    adv_flags = int((aug_msroi_stability(real_model, adv, seeds=seeds)[1] < 0.7).sum())
    assert adv_flags >= clean_flags + 5 and clean_flags <= 5, (clean_flags, adv_flags)
    clean_jpeg = int((jpeg_stability(real_model, x) < 0.55).sum())
    adv_jpeg = int((jpeg_stability(real_model, adv) < 0.55).sum())
    assert adv_jpeg >= clean_jpeg + 8 and clean_jpeg <= 3, (clean_jpeg, adv_jpeg)
