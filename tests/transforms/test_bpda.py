"""BPDA (adaptive) attacks: the defense end to end on a batch, the straight-through model, specs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transforms.attacks import ATTACKS, ThroughDefense, parse_attack, run_attack
from transforms.attacks.bpda import split_bpda
from transforms.defenses import apply_defense, defend_images, encode_batch, parse_defense
from transforms.images import to_tensor, to_uint8
from transforms.jpeg import decode_rgb
from transforms.saliency import aug_msroi


def test_defend_images_is_what_the_stored_file_decodes_to(tiny_model, batch):
    spec = parse_defense("jpeg:quality=30")
    got = defend_images(spec, batch)
    pixels = to_uint8(batch)
    want = to_tensor([decode_rgb(apply_defense(spec, p).data) for p in pixels])
    assert torch.equal(got, want)
    assert not torch.equal(got, batch)  # JPEG at quality 30 changes the pixels


def test_defend_images_semantic_and_rate_matched(tiny_model, batch):
    sem = parse_defense("aug_msroi:q_low=10,q_high=60")
    got = defend_images(sem, batch, model=tiny_model)
    maps = aug_msroi(tiny_model, batch).numpy()  # content-seeded, as defend_images draws them
    files = [apply_defense(sem, p, saliency=m) for p, m in zip(to_uint8(batch), maps)]
    assert torch.equal(got, to_tensor([decode_rgb(f.data) for f in files]))
    matched = encode_batch(parse_defense("jpeg:match=aug_msroi"), to_uint8(batch), matched=[len(f.data) for f in files])
    assert all(len(m.data) <= len(f.data) for m, f in zip(matched, files))
    with pytest.raises(ValueError, match="needs a model"):
        defend_images(sem, batch)
    with pytest.raises(ValueError, match="sizes"):
        encode_batch(parse_defense("jpeg:match=aug_msroi"), to_uint8(batch))


def test_through_defense_forward_is_defended_backward_is_identity(tiny_model, batch):
    spec = parse_defense("jpeg:quality=20")
    wrapped = ThroughDefense(tiny_model, lambda x: defend_images(spec, x))
    defended = defend_images(spec, batch)
    labels = torch.arange(batch.shape[0])
    x = batch.clone().requires_grad_(True)
    loss = F.cross_entropy(wrapped(x), labels, reduction="sum")
    (g_wrapped,) = torch.autograd.grad(loss, x)
    y = defended.clone().requires_grad_(True)
    ref_logits = tiny_model(y)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(ref_logits, labels, reduction="sum"), y)
    assert torch.allclose(wrapped(batch), ref_logits, atol=1e-6)  # the classifier sees the decoded files
    assert torch.allclose(g_wrapped, g_ref, atol=1e-6)  # the gradient at the defended image, passed straight
    assert wrapped.calls == 2
    with pytest.raises(ValueError, match="shape"):
        ThroughDefense(tiny_model, lambda x: x[:, :, :8])(batch)


@pytest.mark.parametrize("attack", ["fgsm:eps=8/255", "igsm:eps=8/255,steps=3", "deepfool:max_iter=5"])
def test_a_bpda_spec_attacks_the_classifier_behind_the_defense(attack, tiny_model, batch):
    with torch.no_grad():
        logits = tiny_model(batch)
    labels = logits.argmax(1)
    defense = "jpeg:quality=20"
    spec = parse_attack(f"{attack},bpda={defense}")
    adaptive, _ = run_attack(spec, tiny_model, batch, labels, clean_logits=logits)
    plain_spec = parse_attack(attack)
    plain, _ = run_attack(plain_spec, tiny_model, batch, labels, clean_logits=logits)
    d = parse_defense(defense)
    wrapped = ThroughDefense(tiny_model, lambda x: defend_images(d, x))
    direct = ATTACKS[spec.name](wrapped, batch, labels, **plain_spec.params)
    assert torch.equal(adaptive.images, direct.images)  # the spec is the wrapped model, nothing else
    assert not torch.equal(adaptive.images, plain.images)
    if "eps" in plain_spec.params:  # the budget is measured on the stored image, as without BPDA
        assert float((adaptive.images - batch).abs().max()) <= plain_spec.params["eps"] + 1e-6


@pytest.mark.parametrize(
    "text, base, defense",
    [
        ("fgsm:eps=4/255", "fgsm:eps=4/255", None),
        ("fgsm:eps=4/255,bpda=jpeg:quality=50", "fgsm:eps=4/255", "jpeg:quality=50"),
        ("igsm:bpda=aug_msroi:levels=3;q_low=20,steps=5", "igsm:steps=5", "aug_msroi:levels=3,q_low=20"),
        ("pgd:bpda=jpeg", "pgd", "jpeg"),
        # a match= naming a defense with parameters takes the rest, its ';' kept as a run's --defense has it
        ("fgsm:bpda=jpeg:match=aug_msroi:q_low=20;q_high=60,eps=4/255", "fgsm:eps=4/255",
         "jpeg:match=aug_msroi:q_low=20;q_high=60"),
        ("fgsm:bpda=jpeg:subsampling=4:4:4;match=aug_msroi", "fgsm", "jpeg:subsampling=4:4:4,match=aug_msroi"),
        ("clean", "clean", None),
    ],
)
def test_split_bpda(text, base, defense):
    assert split_bpda(text) == (base, defense)


def test_bpda_specs_parse_and_keep_their_text():
    spec = parse_attack("igsm:eps=4/255,steps=10,bpda=aug_msroi:levels=3;q_low=20")
    assert spec.name == "igsm"
    assert spec.params["bpda"] == "aug_msroi:levels=3,q_low=20"
    assert spec.params["steps"] == 10
    assert spec.text == "igsm:eps=4/255,steps=10,bpda=aug_msroi:levels=3;q_low=20"
    assert parse_attack("fgsm:bpda=jpeg:quality=50").folder != parse_attack("fgsm:bpda=jpeg:quality=60").folder
    assert parse_attack("fgsm:bpda=jpeg:match=aug_msroi").params["bpda"] == "jpeg:match=aug_msroi"


def test_bpda_through_a_rate_matched_jpeg_of_a_defense_with_parameters(tiny_model, batch):
    """``bpda=jpeg:match=aug_msroi:q_low=20;q_high=60`` is the JPEG rate-matched to that Aug-MSROI,
    as ``--defense 'jpeg:match=aug_msroi:q_low=20;q_high=60'`` is; the ';' between the matched
    defense's parameters split them off into the JPEG's (an unknown parameter 'q_high')."""
    from transforms.defenses import matched_defense

    spec = parse_attack("fgsm:eps=8/255,bpda=jpeg:match=aug_msroi:q_low=20;q_high=60")
    ref = matched_defense(parse_defense(spec.params["bpda"]))
    assert (ref.name, dict(ref.params)) == ("aug_msroi", {"q_low": 20, "q_high": 60})
    with torch.no_grad():
        logits = tiny_model(batch)
    labels = logits.argmax(1)
    got, _ = run_attack(spec, tiny_model, batch, labels, clean_logits=logits)
    d = parse_defense("jpeg:match=aug_msroi:q_low=20;q_high=60")
    wrapped = ThroughDefense(tiny_model, lambda x: defend_images(d, x, model=tiny_model))
    assert torch.equal(got.images, ATTACKS["fgsm"](wrapped, batch, labels, eps=8 / 255).images)


@pytest.mark.parametrize(
    "text, message",
    [
        ("fgsm:bpda=bogus", "unknown defense 'bogus'"),
        ("fgsm:bpda=jpeg:quality=500", "must be in 1..100"),
        ("fgsm:bpda=aug_msroi:samples=0", "samples"),
        ("fgsm:bpda=", "empty bpda"),
        ("fgsm:bpda=jpeg,bpda=none", "given twice"),
        ("fgsm:bpda=jpeg:match=jpeg:match=aug_msroi", "itself rate-matched"),
        ("fgsm:bpda=jpeg:match=bogus", "unknown defense .bogus."),
        ("fgsm:epz=1,bpda=jpeg", "unknown parameter .epz. for attack .fgsm.; valid: eps, rmse, target, bpda"),
    ],
)
def test_bad_bpda_specs_fail_before_work(text, message):
    with pytest.raises(ValueError, match=message):
        parse_attack(text)


def test_bpda_through_aug_msroi_uses_its_maps(tiny_model, batch):
    """Through a semantic defense the forward pass computes the map of every iterate."""
    with torch.no_grad():
        logits = tiny_model(batch)
    labels = logits.argmax(1)
    spec = parse_attack("fgsm:eps=8/255,bpda=aug_msroi:q_low=5;q_high=95;samples=2")
    a, _ = run_attack(spec, tiny_model, batch, labels, clean_logits=logits)
    b, _ = run_attack(spec, tiny_model, batch, labels, clean_logits=logits)
    assert torch.equal(a.images, b.images)  # content-seeded map noise: reruns agree
    flat = parse_attack("fgsm:eps=8/255,bpda=jpeg:quality=5")
    c, _ = run_attack(flat, tiny_model, batch, labels, clean_logits=logits)
    assert not torch.equal(a.images, c.images)
    assert np.isfinite(a.images.numpy()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("defense", ["jpeg:quality=30", "aug_msroi"])
def test_bpda_on_cuda_keeps_the_device(defense, batch):
    from tests import tiny

    model = tiny.build().to("cuda")
    x = batch.cuda()
    with torch.no_grad():
        logits = model(x)
    spec = parse_attack(f"igsm:eps=8/255,steps=3,bpda={defense}")
    r, _ = run_attack(spec, model, x, logits.argmax(1), clean_logits=logits)
    assert r.images.device.type == "cuda"
    cpu_model = tiny.build()
    cpu, _ = run_attack(spec, cpu_model, batch, logits.argmax(1).cpu(), clean_logits=logits.cpu())
    assert float((cpu.images - r.images.cpu()).abs().mean()) < 2 / 255
