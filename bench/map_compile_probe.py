"""Probe: how far could a compiled network take the Aug-MSROI map stage?

Times EfficientNet-Lite0's features at ``--batch`` forward images (default 1280 = 256 images x 5
perturbations) in bf16 autocast + channels_last: eager and ``torch.compile``d, plain and with
activation noise at the input of every conv/linear layer (``x + 0.2 * rms(x) * randn_like(x)``:
the project's relative scale, but unseeded fresh noise per layer, unlike ``aug_msroi``'s seeded
per-sample pool). ``aug_images_per_s_at_S5`` is the forward rate / 5, the map stage's ceiling at
the default S = 5. Not the production path: a measurement of what compiling would buy.

    python bench/map_compile_probe.py [--device cuda] [--batch 1280] [--iters 10] [--no-compile]

Prints one JSON line (and each variant to stderr as it comes).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench._common import emit, positive_int, torch_device  # noqa: E402


class Noisy(nn.Module):
    """``inner`` with Gaussian noise of ``scale`` times the per-sample RMS added to its input."""

    def __init__(self, inner: nn.Module, scale: float = 0.2):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        dims = tuple(range(1, x.ndim))
        rms = x.float().pow(2).mean(dim=dims, keepdim=True).sqrt()
        return self.inner(x + (self.scale * rms).to(x.dtype) * torch.randn_like(x))


def noisy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for mod in list(m.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                setattr(mod, name, Noisy(child))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=positive_int, default=1280, help="forward images per call")
    ap.add_argument("--iters", type=positive_int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="eager variants only (a CPU smoke run)")
    args = ap.parse_args()
    from transforms.models import build_model

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # its own GPU
    torch.backends.cudnn.benchmark = True
    base = build_model("efficientnet_lite0", device=device).eval().to(memory_format=torch.channels_last)
    x = torch.rand(args.batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)

    def rate(f) -> dict:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            t0 = time.perf_counter()
            f(x)  # compiles, autotunes
            sync()
            first = time.perf_counter() - t0
            f(x)
            sync()
            t = time.perf_counter()
            for _ in range(args.iters):
                f(x)
            sync()
        fwd = args.batch * args.iters / (time.perf_counter() - t)
        return {"forward_images_per_s": round(fwd), "aug_images_per_s_at_S5": round(fwd / 5),
                "first_call_s": round(first, 1)}

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "batch": args.batch}
    nz = noisy(base)
    variants = [("eager_plain", base.features), ("eager_noisy", nz.features)]
    if not args.no_compile:
        variants += [("compiled_plain", torch.compile(base.features)), ("compiled_noisy", torch.compile(nz.features))]
    for name, f in variants:
        try:
            out[name] = rate(f)
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the others still run
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"# {name}: {out[name]}", file=sys.stderr, flush=True)
    emit(out)


if __name__ == "__main__":
    main()
