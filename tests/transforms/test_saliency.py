"""CAM, MSROI and Aug-MSROI: hand computations, determinism, batch == per-sample, hygiene."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import tiny
from transforms.models import Classifier
from transforms.saliency import (
    NOISES,
    aug_msroi,
    aug_msroi_stability,
    class_activation_maps,
    compile_plain_passes,
    has_compiled_passes,
    msroi,
    msroi_rank_weights,
)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _norm(m: torch.Tensor) -> torch.Tensor:
    lo = m.amin(dim=(-2, -1), keepdim=True)
    hi = m.amax(dim=(-2, -1), keepdim=True)
    return (m - lo) / (hi - lo)


# --------------------------------------------------------------------------- CAM


def test_cam_equals_hand_computation(tiny_model, batch):
    classes = torch.tensor([[0, 3], [1, 2], [9, 9], [5, 4]])
    cams = class_activation_maps(tiny_model, batch, classes)
    with torch.no_grad():
        f = tiny_model.features(batch)  # (N, D, h, w)
    w = tiny_model.fc.weight
    assert cams.shape == (4, 2, *f.shape[2:]) and cams.dtype == torch.float32
    for i in range(4):
        for j in range(2):
            hand = (w[classes[i, j]][:, None, None] * f[i]).sum(dim=0)
            torch.testing.assert_close(cams[i, j], hand, rtol=1e-5, atol=1e-5)
    # The spatial mean of a CAM is the logit without bias.
    logits = tiny_model(batch)
    torch.testing.assert_close(cams.mean(dim=(2, 3)), logits.gather(1, classes) - tiny_model.fc.bias[classes],
                               rtol=1e-4, atol=1e-4)


def test_cam_one_dimensional_classes(tiny_model, batch):
    assert class_activation_maps(tiny_model, batch, torch.tensor([0, 1, 2, 3])).shape[:2] == (4, 1)


def test_cam_rejects_models_without_cam(batch):
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    model = Classifier(body, None, mean=(0.5,) * 3, std=(0.5,) * 3, name="flat", class_names=("a",) * 10,
                       input_size=64).eval()
    for fn in (lambda: class_activation_maps(model, batch, torch.zeros(4, 1, dtype=torch.long)),
               lambda: msroi(model, batch), lambda: aug_msroi(model, batch)):
        with pytest.raises(ValueError, match="class activation maps"):
            fn()


def test_cam_rejects_bad_classes(tiny_model, batch):
    with pytest.raises(ValueError, match="class indices"):
        class_activation_maps(tiny_model, batch, torch.full((4, 1), 10))


# --------------------------------------------------------------------------- MSROI


def test_rank_weights_match_the_authors():
    assert msroi_rank_weights(5) == pytest.approx([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1.2 / 16])
    assert msroi_rank_weights(1) == pytest.approx([1.2])
    assert msroi_rank_weights(3) == pytest.approx([1 / 2, 1 / 4, 1.2 / 4])
    with pytest.raises(ValueError, match="^k must be >= 1, got 0$"):
        msroi_rank_weights(0)


def _hand_msroi(model, images, classes):
    cams = class_activation_maps(model, images, classes)
    w = torch.tensor(msroi_rank_weights(classes.shape[1]))
    roi = _norm((w[None, :, None, None] * _norm(cams)).sum(dim=1))
    up = F.interpolate(roi[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return up


@pytest.mark.parametrize("k", [1, 3, 5])
def test_msroi_is_rank_weighted_sum_of_normalized_cams(tiny_model, batch, k):
    top = tiny_model(batch).topk(k, dim=1).indices
    out = msroi(tiny_model, batch, top_k=k)
    torch.testing.assert_close(out, _hand_msroi(tiny_model, batch, top), rtol=1e-5, atol=1e-5)
    assert out.shape == (4, 64, 64) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and out.max() > 0.9


def test_msroi_threshold_selects_classes_by_total_activation(tiny_model, batch):
    with torch.no_grad():
        score = tiny_model(batch) - tiny_model.fc.bias  # total activation = CAM mean
    # A threshold no class reaches keeps the top class only.
    top1 = score.argmax(dim=1, keepdim=True)
    torch.testing.assert_close(msroi(tiny_model, batch, threshold=1e9),
                               _hand_msroi(tiny_model, batch, top1), rtol=1e-5, atol=1e-5)
    # One passed by every class keeps all of them, ranked by total activation.
    order = score.argsort(dim=1, descending=True)
    torch.testing.assert_close(msroi(tiny_model, batch, threshold=-1e9),
                               _hand_msroi(tiny_model, batch, order), rtol=1e-5, atol=1e-5)
    # Per sample: different samples may keep different numbers of classes.
    t = float(score.sort(dim=1, descending=True).values[:, 2].median())
    out = msroi(tiny_model, batch, threshold=t)
    for i in range(4):
        keep = order[i][score[i][order[i]] > t][None] if (score[i] > t).any() else order[i, :1][None]
        torch.testing.assert_close(out[i : i + 1], _hand_msroi(tiny_model, batch[i : i + 1], keep),
                                   rtol=1e-5, atol=1e-5)


def test_msroi_contract(tiny_model, batch):
    before = batch.clone()
    out = msroi(tiny_model, batch)
    assert torch.equal(batch, before)
    torch.testing.assert_close(out, torch.cat([msroi(tiny_model, batch[i : i + 1]) for i in range(4)]),
                               rtol=1e-5, atol=1e-5)
    assert msroi(tiny_model, batch[:0]).shape == (0, 64, 64)
    flat = msroi(tiny_model, torch.full((2, 3, 64, 64), 0.5))
    assert torch.isfinite(flat).all() and flat.min() >= 0 and flat.max() <= 1
    with pytest.raises(ValueError, match="top_k"):
        msroi(tiny_model, batch, top_k=0)


def test_msroi_constant_map_gives_zeros_not_nan():
    # A model whose features are constant: every CAM is flat.
    model = tiny.build()
    with torch.no_grad():
        for p in model.body.parameters():
            p.zero_()
    out = msroi(model, torch.rand(2, 3, 64, 64))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(aug_msroi(model, torch.rand(2, 3, 64, 64), activation_noise=0.0, input_noise=0.0),
                       torch.zeros(2, 64, 64))


def test_eval_mode_required_and_not_switched(batch):
    model = tiny.build().train()
    with pytest.raises(ValueError, match="eval mode"):
        msroi(model, batch)
    with pytest.raises(ValueError, match="eval mode"):
        aug_msroi(model, batch)
    assert model.training


def test_eval_mode_required_of_every_layer(batch):
    """A model in eval mode with one batch norm left training (a factory's partial eval, say):
    its batch statistics mixed the perturbed images of a pass (the map of an image depended on
    its batch) and every pass updated its running statistics. Rejected like a model in training."""
    t = tiny.build()
    body = nn.Sequential(t.body[0], nn.BatchNorm2d(8), nn.ReLU(), t.body[2], nn.ReLU())
    model = Classifier(body, t.fc, mean=(0.5,) * 3, std=(0.25,) * 3, name="bn", class_names=t.class_names,
                       input_size=64).eval()
    model.body[1].train()
    stats = model.body[1].running_mean.clone()
    for fn in (msroi, aug_msroi, class_activation_maps):
        with pytest.raises(ValueError, match=r"eval mode.*'body\.1'"):
            fn(model, batch, *([torch.zeros(4, dtype=torch.int64)] if fn is class_activation_maps else []))
    assert model.body[1].training and not model.training
    assert torch.equal(model.body[1].running_mean, stats) and _hooks(model) == 0


def test_cams_are_float32_under_autocast(tiny_model, batch):
    classes = torch.tensor([[0, 3], [1, 2], [9, 9], [5, 4]])
    want = class_activation_maps(tiny_model, batch, classes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = class_activation_maps(tiny_model, batch, classes)
    assert got.dtype == torch.float32  # the einsum ran in bfloat16
    # The features come from the network in bfloat16 (about 3 digits); the weighted sum is float32.
    assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())


# --------------------------------------------------------------------------- Aug-MSROI


SEEDS = torch.tensor([11, 22, 33, 44])


def test_aug_msroi_deterministic_and_batch_equals_per_sample(tiny_model, batch):
    a = aug_msroi(tiny_model, batch, seeds=SEEDS)
    b = aug_msroi(tiny_model, batch, seeds=SEEDS)
    assert torch.equal(a, b)  # byte-identical reruns
    per = torch.cat([aug_msroi(tiny_model, batch[i : i + 1], seeds=SEEDS[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(a, per, rtol=1e-5, atol=1e-5)
    # Reordered batch: each sample keeps its own noise.
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(aug_msroi(tiny_model, batch[perm], seeds=SEEDS[perm]), a[perm],
                               rtol=1e-5, atol=1e-5)
    assert a.shape == (4, 64, 64) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, aug_msroi(tiny_model, batch, seeds=SEEDS + 1))
    assert not torch.allclose(a, msroi(tiny_model, batch))


def test_aug_msroi_without_seeds_is_per_sample(tiny_model, batch):
    a = aug_msroi(tiny_model, batch)
    per = torch.cat([aug_msroi(tiny_model, batch[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(a, per, rtol=1e-5, atol=1e-5)


def test_aug_msroi_chunks_match_one_pass(tiny_model, batch):
    torch.testing.assert_close(aug_msroi(tiny_model, batch, seeds=SEEDS, max_batch=5),
                               aug_msroi(tiny_model, batch, seeds=SEEDS, max_batch=None),
                               rtol=1e-5, atol=1e-5)


def test_aug_msroi_runs_in_cache_sized_passes_on_the_cpu_by_default(tiny_model, batch):
    """``max_batch="auto"``: CPU_PASS perturbed images per forward pass on the CPU (whole
    samples), the same maps as one pass of all of them."""
    from transforms.saliency import CPU_PASS

    sizes = []
    handle = tiny_model.fc.register_forward_hook(lambda m, a, out: sizes.append(out.shape[0]))
    try:
        images = batch.repeat(3, 1, 1, 1)  # 12 images, 3 x 5 = 15 perturbed per pass of 16
        seeds = torch.arange(12)
        auto = aug_msroi(tiny_model, images, seeds=seeds)
        assert sizes == [CPU_PASS // 5 * 5] * (12 // (CPU_PASS // 5)) and sum(sizes) == 60
        sizes.clear()
        whole = aug_msroi(tiny_model, images, seeds=seeds, max_batch=None)
        assert sizes == [60]
    finally:
        handle.remove()
    torch.testing.assert_close(auto, whole, rtol=1e-5, atol=1e-5)


def test_aug_msroi_without_noise_is_msroi(tiny_model, batch):
    out = aug_msroi(tiny_model, batch, input_noise=0.0, activation_noise=0.0, samples=3)
    torch.testing.assert_close(out, msroi(tiny_model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise", sorted(NOISES))
def test_aug_msroi_noise_kinds(tiny_model, batch, noise):
    out = aug_msroi(tiny_model, batch, noise=noise, seeds=SEEDS, input_noise=0.1, activation_noise=0.5)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_noise_distributions_have_unit_variance():
    for name, draw in NOISES.items():
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(200_000, dtype=dtype)
            z = draw(out, torch.Generator().manual_seed(0))
            assert z.data_ptr() == out.data_ptr() and z.dtype == dtype  # filled in place
            assert abs(float(z.float().mean())) < 0.01 and abs(float(z.float().std()) - 1) < 0.01, (name, dtype)


def test_noise_pool_draws_in_the_autocast_dtype():
    from transforms.saliency import _NoisePool

    def pool():
        return _NoisePool(torch.tensor([3, 4]), 2, torch.device("cpu"), NOISES["gaussian"])

    plain = pool().take(1000)
    assert plain.dtype == torch.float32 and plain.shape == (4, 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = pool().take(1000)
    assert low.dtype == torch.bfloat16  # the activations' dtype: no conversion per layer
    # Rows are per-sample draws: sample 0's rows do not depend on the other samples of the batch.
    alone = _NoisePool(torch.tensor([3]), 2, torch.device("cpu"), NOISES["gaussian"]).take(1000)
    assert torch.equal(alone, plain[:2]) and not torch.equal(plain[:2], plain[2:])


def test_cpu_noise_pool_takes_windows_of_one_table_at_per_sample_offsets():
    """On the CPU a take gives each row a window of the fixed table, at an offset drawn from its
    sample's generator: rows are the table's i.i.d. values, and each sample's rows depend on its
    seed alone."""
    from transforms.saliency import _TABLE_SIZE, _NoisePool, _noise_table

    pool = _NoisePool(torch.tensor([3, 4]), 2, torch.device("cpu"), NOISES["gaussian"])
    rows = [pool.take(1000), pool.take(5000)]
    table = _noise_table(NOISES["gaussian"], torch.float32, _TABLE_SIZE)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    for m, got in zip((1000, 5000), rows):
        offsets = torch.cat([torch.randint(0, _TABLE_SIZE - m + 1, (2,), generator=g) for g in gens])
        assert torch.equal(got, torch.stack([table[o : o + m] for o in offsets.tolist()]))
    assert abs(float(table.mean())) < 1e-3 and abs(float(table.std()) - 1) < 1e-3
    # A window longer than half the table comes from a longer one.
    big = _NoisePool(torch.tensor([5]), 1, torch.device("cpu"), NOISES["uniform"]).take(_TABLE_SIZE // 2 + 1)
    assert big.shape == (1, _TABLE_SIZE // 2 + 1) and float(big.abs().max()) <= 3 ** 0.5


def test_aug_msroi_leaves_model_and_input_untouched(batch):
    model = tiny.build()
    state = copy.deepcopy(model.state_dict())
    before = batch.clone()
    aug_msroi(model, batch, seeds=SEEDS)
    assert _hooks(model) == 0 and not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(batch, before)


def test_aug_msroi_removes_hooks_on_error(batch):
    model = tiny.build()

    def boom(module, args):
        raise RuntimeError("boom")

    own = model.fc.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        aug_msroi(model, batch, seeds=SEEDS)
    assert _hooks(model) == 1  # only the test's own
    own.remove()
    assert _hooks(model) == 0


def test_aug_msroi_constant_and_empty(tiny_model):
    flat = aug_msroi(tiny_model, torch.full((3, 3, 64, 64), 0.25), seeds=torch.arange(3))
    assert torch.isfinite(flat).all() and flat.min() >= 0 and flat.max() <= 1
    assert aug_msroi(tiny_model, torch.zeros(0, 3, 64, 64)).shape == (0, 64, 64)


def test_stability_is_the_share_of_perturbed_passes_keeping_the_clean_class(tiny_model, batch):
    """The same perturbed passes draw the map (the Aug-MSROI map of the same noise) and vote;
    checked against the logits the passes themselves produced."""
    # The photos, and the same photos pushed just past the tiny model's decision boundary (the
    # place an attack leaves an image): small noise moves the latter's prediction, not the former's.
    x = torch.cat([batch, tiny.near_boundary(tiny_model, batch, past=1.02)])
    seeds = torch.arange(8)
    outs = []
    handle = tiny_model.fc.register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
    try:
        maps, stab = aug_msroi_stability(tiny_model, x, seeds=seeds, samples=4, max_batch=None)
    finally:
        handle.remove()
    assert [o.shape[0] for o in outs] == [32, 8]  # 8 images x 4 perturbations, then the clean pass
    votes = outs[0].argmax(1).view(8, 4) == outs[1].argmax(1)[:, None]
    torch.testing.assert_close(stab, votes.float().mean(1))
    assert torch.equal(stab[:4], torch.ones(4)) and (stab[4:] < 0.7).all()
    torch.testing.assert_close(maps, aug_msroi(tiny_model, x, seeds=seeds, samples=4, activation_noise=0.0),
                               rtol=1e-5, atol=1e-5)
    # Batched equals per sample; without noise every prediction stays.
    per = [aug_msroi_stability(tiny_model, x[i : i + 1], seeds=seeds[i : i + 1], samples=4)[1] for i in range(8)]
    torch.testing.assert_close(torch.cat(per), stab)
    assert torch.equal(aug_msroi_stability(tiny_model, x, input_noise=0.0)[1], torch.ones(8))
    empty = aug_msroi_stability(tiny_model, torch.zeros(0, 3, 64, 64))
    assert empty[0].shape == (0, 64, 64) and empty[1].shape == (0,)
    with pytest.raises(ValueError, match="samples"):
        aug_msroi_stability(tiny_model, batch, samples=0)


def test_a_pass_the_noise_drove_to_nan_keeps_no_class(batch):
    """Noise this large (a valid, finite scale) overflows float32 inside the network and the
    perturbed logits are NaN; argmax reads NaN as the largest value, so every such pass voted
    for class 0 and an image of class 0 read as perfectly stable, never flagged."""
    model = tiny.build()
    with torch.no_grad():
        model.fc.bias[0] += 1e3  # every image's own class is 0
    assert (model(batch).argmax(1) == 0).all()
    maps, stab = aug_msroi_stability(model, batch, input_noise=1e36, seeds=torch.arange(4))
    assert torch.equal(stab, torch.zeros(4))
    assert torch.isfinite(maps).all()


def test_aug_msroi_rejects_bad_parameters(tiny_model, batch):
    for kw, match in (({"samples": 0}, "samples"), ({"noise": "laplace"}, "laplace"),
                      ({"input_noise": -0.1}, "input_noise"), ({"activation_noise": float("nan")}, "activation"),
                      ({"seeds": torch.arange(3)}, "seeds"), ({"max_batch": 0}, "max_batch"),
                      ({"max_batch": "all"}, "max_batch must be an integer >= 1, None or 'auto'")):
        with pytest.raises(ValueError, match=match):
            aug_msroi(tiny_model, batch, **kw)


def test_other_threads_forward_is_not_perturbed(tiny_model, batch):
    """A model shared by threads: a forward on another thread while hooks are in place is clean."""
    import threading

    big = batch.repeat_interleave(5, dim=0)  # the size of aug_msroi's own batch: only the thread differs
    with torch.no_grad():
        clean = tiny_model(big)
    seen = []
    started = threading.Event()

    def other():
        started.wait()
        with torch.no_grad():
            seen.append(tiny_model(big))

    t = threading.Thread(target=other)

    def late(module, args):  # runs inside aug_msroi's forward, hooks in place
        if not started.is_set():
            started.set()
            t.join()

    handle = tiny_model.fc.register_forward_pre_hook(late)
    try:
        t.start()
        aug_msroi(tiny_model, batch, seeds=SEEDS)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], clean)


def test_autocast_and_channels_last(batch):
    model = tiny.build()
    ref = aug_msroi(model, batch, seeds=SEEDS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = aug_msroi(model, batch, seeds=SEEDS)
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and low.min() >= 0 and low.max() <= 1
    assert torch.corrcoef(torch.stack([low.flatten(), ref.flatten()]))[0, 1] > 0.8
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xcl = batch.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(aug_msroi(cl, xcl, seeds=SEEDS, activation_noise=0.0),
                               aug_msroi(model, batch, seeds=SEEDS, activation_noise=0.0), rtol=1e-4, atol=1e-4)
    out = aug_msroi(cl, xcl, seeds=SEEDS)
    assert torch.equal(out, aug_msroi(cl, xcl, seeds=SEEDS)) and out.min() >= 0 and out.max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_contract(batch):
    model = tiny.build().cuda()
    out = aug_msroi(model, batch.cuda(), seeds=SEEDS)
    assert out.device.type == "cuda" and out.shape == (4, 64, 64)
    per = torch.cat([aug_msroi(model, batch[i : i + 1].cuda(), seeds=SEEDS[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(out, per, rtol=1e-4, atol=1e-4)
    # CPU images, CUDA model: the work runs on the model's device, the result comes back.
    assert aug_msroi(model, batch, seeds=SEEDS).device.type == "cpu"


# --------------------------------------------------------------------------- EfficientNet-Lite0


def test_real_model_maps(real_model, photos):
    from transforms.images import resize_and_crop, to_tensor

    x = to_tensor([resize_and_crop(p, resize=224, crop=224) for p in photos[:2]])
    m = msroi(real_model, x)
    a = aug_msroi(real_model, x, seeds=torch.tensor([1, 2]), samples=2)
    for out in (m, a):
        assert out.shape == (2, 224, 224) and torch.isfinite(out).all()
        assert out.min() >= 0 and out.max() <= 1 and float(out.std()) > 0.05
    assert _hooks(real_model) == 0
    cams = class_activation_maps(real_model, x, torch.tensor([[1], [2]]))
    assert cams.shape == (2, 1, 7, 7)


class _CountingBackend:
    """A torch.compile backend that runs the captured graph eagerly and counts its calls."""

    def __init__(self):
        self.compiles = self.calls = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


def test_compiled_plain_passes_serve_the_passes_without_activation_noise(batch):
    from transforms.defenses import gated_maps

    model, eager = tiny.build(), tiny.build()
    backend = _CountingBackend()
    assert compile_plain_passes(model, backend=backend) is model
    seeds = torch.arange(len(batch))
    torch.testing.assert_close(msroi(model, batch), msroi(eager, batch))
    assert backend.calls == 1
    # The gated defense's map stage: the unperturbed pass, S passes with input noise and the JPEG
    # check's pass all go through the compiled graph; same maps and scores.
    calls = backend.calls
    got = gated_maps(model, batch, jpeg_quality=50, seeds=seeds, activation_noise=0.0, max_batch=None)
    want = gated_maps(eager, batch, jpeg_quality=50, seeds=seeds, activation_noise=0.0, max_batch=None)
    assert backend.calls - calls == 3
    torch.testing.assert_close(got[0], want[0])
    for k in ("stability", "jpeg_stability"):
        torch.testing.assert_close(got[1][k], want[1][k])
    # Passes with activation noise stay eager (their noise comes from hooks) and are unchanged.
    calls = backend.calls
    torch.testing.assert_close(aug_msroi(model, batch, seeds=seeds), aug_msroi(eager, batch, seeds=seeds),
                               atol=0, rtol=0)
    assert backend.calls == calls and _hooks(model) == 0
    # A deep copy runs eagerly: with its classifier zeroed, its maps are flat (all zero), which
    # the original's graph would not give.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.fc.weight.zero_()
    assert msroi(twin, batch).abs().max() == 0 and backend.calls == calls
    with pytest.raises(ValueError, match="class activation maps"):
        compile_plain_passes(tiny.build_without_cam())


def test_a_compiled_pass_out_of_device_memory_stays_compiled(batch):
    """Out of GPU memory is the batch's size, not the compiler's: the error goes to the map stage,
    which runs the batch again image by image, and the model keeps its compiled passes. It
    dropped them for good, so one batch too large left a GPU worker eager from then on."""
    def out_of_memory(gm, example_inputs):
        def run(*args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        return run

    model = compile_plain_passes(tiny.build(), backend=out_of_memory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: nothing is dropped
        with pytest.raises(torch.cuda.OutOfMemoryError):
            msroi(model, batch)
    assert has_compiled_passes(model)

def test_inductor_compiled_maps_match_eager(batch):
    # The real compiler (the C++ backend on the CPU): rounding-level differences at most. A
    # compiler that fails falls back to eager with a warning, and eager maps match eager ones:
    # the warning is an error here, and the graph must have been compiled and kept.
    from torch._dynamo.testing import CompileCounterWithBackend

    inductor = CompileCounterWithBackend("inductor")
    model, eager = compile_plain_passes(tiny.build(), backend=inductor), tiny.build()
    seeds = torch.arange(len(batch))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = aug_msroi_stability(model, batch, seeds=seeds, max_batch=None)
        want = aug_msroi_stability(eager, batch, seeds=seeds, max_batch=None)
    assert inductor.frame_count >= 1 and has_compiled_passes(model)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], want[1])


def test_a_failing_compiler_falls_back_to_eager(batch):
    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    model, eager = compile_plain_passes(tiny.build(), backend=broken), tiny.build()
    with pytest.warns(RuntimeWarning, match="compiled map pass failed.*no C compiler here"):
        got = msroi(model, batch)
    torch.testing.assert_close(got, msroi(eager, batch), atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the model now runs eagerly without warning again
        torch.testing.assert_close(msroi(model, batch), got, atol=0, rtol=0)
