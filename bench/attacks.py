"""Attack throughput beside ART and Foolbox, and every attack at the paper's RMSE budget.

Throughput (default): images/s of each attack on EfficientNet-Lite0 and the same dev images and
batch size, beside ART's implementation of the same attack with the same settings where ART has
one (FGSM, PGD, MI-FGSM, DeepFool, JSMA, C&W L2), beside Foolbox's (FGSM, PGD, DeepFool, C&W L2),
and beside a plain hand-written torch loop for FGSM and PGD. Each timing is the best of
``--repeats`` (one run for the slow attacks). ART's DeepFool takes over ten minutes per image at
224x224 on two cores, so it runs on ``--art-slow-n`` images (default 1) and its images/s comes
from those. Success is judged on the uint8 grid (references' outputs rounded; ``*_float_*`` judge
them unrounded), labels are the clean predictions. Timed runs are interleaved (the load of a
shared machine drifts). One JSON line per attack:

    {"attack", "settings", "n", "batch", "{ours,art,fb,loop}_ips", "art_n", "vs_art", "vs_fb",
     "vs_loop", "{ours,art,fb,loop}_{success,rmse,l2}", "{art,fb}_float_{success,rmse,l2}"}

Targets: vs_art >= 5 for DeepFool, C&W and JSMA; vs_loop >= 0.9 for FGSM and PGD.

Budget (``--budget``): success rate and mean RMSE of every attack at ``rmse=0.02`` (the paper's
protocol) on ``--n`` dev images (default 32), through ``run_attack`` as the pipeline calls it, and
the targeted success of ``pgd:eps=8/255,target=least_likely``. One JSON line per spec.

    python bench/attacks.py [--quick] [--n 4] [--batch 4] [--repeats 2] [--only deepfool,cw]
    python bench/attacks.py --budget [--n 32] [--batch 8]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from _common import dev_files, emit, positive_int

# Settings shared by ours and ART's; --quick shrinks the expensive ones for both alike.
FULL = {
    "fgsm": {"eps": 4 / 255},
    "pgd": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10},
    "mifgsm": {"eps": 16 / 255, "steps": 10, "mu": 1.0},
    "deepfool": {"candidates": 10, "max_iter": 50, "overshoot": 0.02},
    "jsma": {"theta": 1.0, "gamma": 0.005},
    "cw": {"binary_search_steps": 3, "steps": 20, "initial_const": 0.1, "lr": 0.01, "confidence": 0.0},
    "ga": {"rmse": 0.02},
    "lbfgs": {"search_steps": 3, "steps": 10, "initial_const": 0.1},
}
QUICK = {
    **FULL,
    "deepfool": {"candidates": 4, "max_iter": 50, "overshoot": 0.02},
    "jsma": {"theta": 1.0, "gamma": 0.002},
    "cw": {"binary_search_steps": 2, "steps": 5, "initial_const": 0.1, "lr": 0.01, "confidence": 0.0},
    "lbfgs": {"search_steps": 2, "steps": 5, "initial_const": 0.1},
}

BUDGET_SPECS = [
    "fgsm:rmse=0.02",
    "igsm:rmse=0.02",
    "pgd:rmse=0.02",
    "pgd:norm=2,rmse=0.02",
    "mifgsm:rmse=0.02",
    "ga:rmse=0.02",
    "deepfool:rmse=0.02",
    "jsma:rmse=0.02",
    "jsma:rmse=0.02,theta=1",
    "lbfgs:rmse=0.02,search_steps=4,steps=10,initial_const=0.1",
    "cw:rmse=0.02,binary_search_steps=3,steps=20,initial_const=0.1",
    "pgd:eps=8/255,target=least_likely",
]


def load(n: int):
    from transforms.images import decode_image, to_tensor

    files = dev_files(n)
    return to_tensor([decode_image(p.read_bytes()) for p, _ in files]), torch.tensor([lab for _, lab in files])


def timed(fn, repeats: int):
    """(best seconds, last result) over ``repeats`` runs."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def batched(fn, x: torch.Tensor, batch: int, *tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch], *(t[i : i + batch] for t in tensors)) for i in range(0, len(x), batch)])


# --------------------------------------------------------------------------- plain torch loops


def loop_fgsm(model, x, y, *, eps):
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    return torch.round((x + eps * g.sign()).clamp(0, 1) * 255) / 255


def loop_pgd(model, x, y, noise, *, eps, step_size, steps):
    adv = (x + eps * noise).clamp(0, 1)
    for _ in range(steps):
        a = adv.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(a), y, reduction="sum"), a)
        adv = torch.min(torch.max(adv + step_size * g.sign(), x - eps), x + eps).clamp(0, 1)
    return torch.round(adv * 255) / 255


# --------------------------------------------------------------------------- ART


def art_attack(name: str, classifier, s: dict, batch: int):
    """ART's attack with our settings, or None where ART has none."""
    from art.attacks import evasion as ev

    if name == "fgsm":
        return ev.FastGradientMethod(classifier, norm=np.inf, eps=s["eps"], batch_size=batch)
    if name == "pgd":
        return ev.ProjectedGradientDescent(classifier, norm=np.inf, eps=s["eps"], eps_step=s["step_size"],
                                           max_iter=s["steps"], num_random_init=1, batch_size=batch, verbose=False)
    if name == "mifgsm":
        return ev.MomentumIterativeMethod(classifier, norm=np.inf, eps=s["eps"], eps_step=s["eps"] / s["steps"],
                                          decay=s["mu"], max_iter=s["steps"], batch_size=batch, verbose=False)
    if name == "deepfool":
        return ev.DeepFool(classifier, max_iter=s["max_iter"], epsilon=s["overshoot"], nb_grads=s["candidates"],
                           batch_size=batch, verbose=False)
    if name == "jsma":
        return ev.SaliencyMapMethod(classifier, theta=s["theta"], gamma=s["gamma"], batch_size=batch, verbose=False)
    if name == "cw":
        return ev.CarliniL2Method(classifier, confidence=s["confidence"], targeted=False, learning_rate=s["lr"],
                                  binary_search_steps=s["binary_search_steps"], max_iter=s["steps"],
                                  initial_const=s["initial_const"], batch_size=batch, verbose=False)
    return None


# --------------------------------------------------------------------------- Foolbox


def fb_attack(name: str, fmodel, s: dict):
    """A function (x, y) -> adversarial images running Foolbox's attack with our settings, or None."""
    try:
        import foolbox as fb
    except ImportError:
        return None
    if name == "fgsm":
        attack, eps = fb.attacks.LinfFastGradientAttack(random_start=False), s["eps"]
    elif name == "pgd":
        attack = fb.attacks.LinfPGD(abs_stepsize=s["step_size"], steps=s["steps"], random_start=True)
        eps = s["eps"]
    elif name == "deepfool":
        attack = fb.attacks.L2DeepFoolAttack(steps=s["max_iter"], candidates=s["candidates"], overshoot=s["overshoot"])
        eps = None
    elif name == "cw":
        attack = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=s["binary_search_steps"], steps=s["steps"],
                                                  stepsize=s["lr"], confidence=s["confidence"],
                                                  initial_const=s["initial_const"])
        eps = None
    else:
        return None
    return lambda xb, yb: attack(fmodel, xb, yb, epsilons=eps)[1]


#: Attacks whose ART version runs on --art-slow-n images only.
ART_SLOW = ("deepfool",)


def throughput(args) -> None:
    from art.estimators.classification import PyTorchClassifier

    from transforms import metrics
    from transforms.attacks import ATTACKS
    from transforms.models import build_model
    from transforms.seeds import per_sample_uniform, seed_tensor

    model = build_model("efficientnet_lite0")
    x, _ = load(args.n)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    runner_up = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    seeds = seed_tensor(list(range(len(x))))
    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                   nb_classes=1000, clip_values=(0.0, 1.0), device_type="cpu")
    classifier.predict(x[:1].numpy())  # ART's own first-call set-up, out of the timings
    fmodel = None
    try:
        import foolbox

        fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    except ImportError:
        pass
    table = QUICK if args.quick else FULL
    names = args.only.split(",") if args.only else list(table)

    def judge(adv: torch.Tensor, target: torch.Tensor | None, q: bool = True) -> tuple[float, float, float]:
        adv = torch.round(adv.clamp(0, 1) * 255) / 255 if q else adv.float()
        m = len(adv)  # a reference may have run on the first m images only
        with torch.no_grad():
            pred = torch.cat([model(adv[i : i + args.batch]).argmax(1) for i in range(0, m, args.batch)])
        ok = pred != y[:m] if target is None else pred == target[:m]
        return (float(ok.float().mean()), float(metrics.rmse(adv, x[:m]).mean()), float(metrics.l2(adv, x[:m]).mean()))

    # Warm up (oneDNN primitive creation, allocator) so the first attack timed pays no set-up.
    xw = x[: args.batch].clone().requires_grad_(True)
    torch.autograd.grad(model(xw).sum(), xw)

    for name in names:
        s = table[name]
        # JSMA runs targeted at the clean runner-up in both (ART's JSMA has no untargeted mode
        # of its own: it draws random targets); everything else untargeted.
        target = runner_up if name == "jsma" else None
        fn = ATTACKS[name]

        def ours_batch(xb, yb, tb, sb):
            kw = {**s, **({"seeds": sb} if name == "pgd" else {})}
            return fn(model, xb, yb, target=tb if target is not None else None, **kw).images

        runs = {"ours": lambda: batched(ours_batch, x, args.batch, y, runner_up, seeds)}
        if name == "fgsm":
            loop = lambda xb, yb: loop_fgsm(model, xb, yb, eps=s["eps"])  # noqa: E731
            runs["loop"] = lambda: batched(loop, x, args.batch, y)
        elif name == "pgd":
            def loop(xb, yb, sb):
                noise = per_sample_uniform(sb, tuple(xb.shape[1:])) * 2 - 1
                return loop_pgd(model, xb, yb, noise, eps=s["eps"], step_size=s["step_size"], steps=s["steps"])
            runs["loop"] = lambda: batched(loop, x, args.batch, y, seeds)
        art = None if args.no_art else art_attack(name, classifier, s, args.batch)
        art_n = min(len(x), args.art_slow_n) if name in ART_SLOW else len(x)
        if art is not None:
            yy = (runner_up if target is not None else y).numpy()[:art_n]
            onehot = np.eye(1000, dtype=np.float32)[yy]
            runs["art"] = lambda: torch.from_numpy(art.generate(x[:art_n].numpy(), y=onehot))
        fb_run = None if args.no_fb or fmodel is None or target is not None else fb_attack(name, fmodel, s)
        if fb_run is not None:
            runs["fb"] = lambda: batched(fb_run, x, args.batch, y)
        # Interleaved repeats, best time of each: the machine's load drifts between runs.
        heavy = name in ("deepfool", "jsma", "cw", "lbfgs")
        best, out = {}, {}
        for r in range(1 if heavy else args.repeats):
            for key, fn_run in runs.items():
                t, out[key] = timed(fn_run, 1)
                best[key] = min(best.get(key, float("inf")), t)
        rec = {"attack": name, "settings": s, "n": len(x), "batch": args.batch}
        for key in runs:
            rec[f"{key}_ips"] = len(out[key]) / best[key]
            rec[f"{key}_success"], rec[f"{key}_rmse"], rec[f"{key}_l2"] = judge(out[key], target)
        for ref in ("art", "fb"):
            if ref in runs:
                rec[f"vs_{ref}"] = rec["ours_ips"] / rec[f"{ref}_ips"]
                # References return floats; judged unrounded too (their own view of success and size).
                (rec[f"{ref}_float_success"], rec[f"{ref}_float_rmse"],
                 rec[f"{ref}_float_l2"]) = judge(out[ref], target, q=False)
        if "art" in runs:
            rec["art_n"] = art_n
        if "loop" in runs:
            rec["vs_loop"] = rec["ours_ips"] / rec["loop_ips"]
        emit(rec)


def budget(args) -> None:
    from transforms import metrics
    from transforms.attacks import parse_attack, run_attack
    from transforms.models import build_model
    from transforms.seeds import sample_seed, seed_tensor

    model = build_model("efficientnet_lite0")
    x, _ = load(args.n)
    specs = args.only.split(";") if args.only else BUDGET_SPECS
    for text in specs:
        spec = parse_attack(text)
        oks, rm, its, t0 = [], [], [], time.perf_counter()
        for i in range(0, len(x), args.batch):
            xb = x[i : i + args.batch]
            with torch.no_grad():
                clean_logits = model(xb)
            labels = clean_logits.argmax(1)
            seeds = seed_tensor([sample_seed(0, j, spec.text) for j in range(i, i + len(xb))])
            result, target = run_attack(spec, model, xb, labels, clean_logits=clean_logits, seeds=seeds)
            with torch.no_grad():
                pred = model(result.images).argmax(1)
            oks.append(pred != labels if target is None else pred == target)
            rm.append(metrics.rmse(result.images.double(), xb.double()))
            its.append(result.iterations)
        ok, rm, its = torch.cat(oks), torch.cat(rm), torch.cat(its)
        emit({"spec": spec.text, "n": len(x), "success": float(ok.float().mean()), "rmse_mean": float(rm.mean()),
              "rmse_max": float(rm.max()), "rmse_mean_successful": float(rm[ok].mean()) if ok.any() else None,
              "iterations_mean": float(its.float().mean()), "seconds": round(time.perf_counter() - t0, 1)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small run: 2 images, cheap settings")
    p.add_argument("--budget", action="store_true", help="success and RMSE of every attack at rmse=0.02")
    p.add_argument("--n", type=positive_int, default=None, help="dev images (default 4; 32 with --budget; 2 with --quick)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size (default 4; 8 with --budget)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timings are the best of this many runs")
    p.add_argument("--only", default="", help="comma-separated attacks (throughput) or ;-separated specs (budget)")
    p.add_argument("--no-art", action="store_true", help="skip ART")
    p.add_argument("--no-fb", action="store_true", help="skip Foolbox")
    p.add_argument("--art-slow-n", type=positive_int, default=1, help=f"images for ART's {', '.join(ART_SLOW)}")
    p.add_argument("--threads", type=positive_int, default=2)
    args = p.parse_args()
    if args.only and args.budget:
        from transforms.attacks import parse_attack

        for text in args.only.split(";"):
            try:
                parse_attack(text)
            except ValueError as e:
                p.error(f"--only: {e}")
    elif args.only:
        table = QUICK if args.quick else FULL
        unknown = [name for name in args.only.split(",") if name not in table]
        if unknown:
            p.error(f"--only: unknown attack(s) {', '.join(map(repr, unknown))}; valid: {', '.join(table)}")
    torch.set_num_threads(args.threads)
    if args.budget:
        args.n = args.n or (4 if args.quick else 32)
        args.batch = args.batch or 8
        budget(args)
        return
    args.n = args.n or (2 if args.quick else 4)
    args.batch = args.batch or (2 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 2)
    throughput(args)


if __name__ == "__main__":
    main()
