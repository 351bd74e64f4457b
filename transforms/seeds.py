"""Per-sample seeds: the run seed and the sample's identity, hashed, so a retried bundle (or a
sample arriving in a different batch) draws exactly the same random numbers."""
from __future__ import annotations

import hashlib

import torch

__all__ = ["sample_seed", "pixel_digest", "seed_tensor", "per_sample_uniform"]


def sample_seed(*parts: object) -> int:
    """A non-negative 63-bit seed from any printable parts (run seed, key, stage, spec)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def pixel_digest(image) -> str:
    """A digest of an image's pixels and shape (uint8 HWC array): what seeds a defense's noise,
    so a defense is a function of the pixels, whatever the sample is called or where it came from."""
    import numpy as np

    a = np.ascontiguousarray(image)
    h = hashlib.sha256(repr((a.shape, str(a.dtype))).encode())
    h.update(a.tobytes())
    return h.hexdigest()[:32]


def seed_tensor(seeds: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(seeds, dtype=torch.int64, device=device)


def _per_sample(seeds: torch.Tensor, shape: tuple[int, ...], device, draw) -> torch.Tensor:
    out = []
    for s in seeds.tolist():  # one CPU generator per sample; values identical on every device
        g = torch.Generator().manual_seed(int(s))
        out.append(draw(shape, g))
    if not out:
        return torch.empty((0, *shape), device=device)
    return torch.stack(out).to(device)


def per_sample_uniform(seeds: torch.Tensor, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """Uniform [0, 1) noise (N, *shape), sample i drawn from its own seed."""
    return _per_sample(seeds, shape, device, lambda sh, g: torch.rand(sh, generator=g))
