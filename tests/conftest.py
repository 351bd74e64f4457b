"""Shared fixtures: the tiny CNN, small real images, the shared dev set (skipped when absent)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEMJPEG_SHARED", ROOT.parent / "shared"))
DEV = SHARED / "data" / "imagenet-dev"


def peak_growth_kib(code: str) -> int:
    """Run ``code``, Python that prints how many KiB its peak resident memory grew (``ru_maxrss``
    around what it measures), in a fresh interpreter from the repository; that number."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


@pytest.fixture(scope="session")
def tiny_model():
    return tiny.build()


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Four real photographs from scikit-image, uint8 64x64x3 (one of them grayscale at source)."""
    import skimage.data

    from transforms.images import resize_and_crop

    out = []
    for name in ("astronaut", "chelsea", "coffee", "camera"):
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append(resize_and_crop(img, resize=72, crop=64))
    return out


@pytest.fixture(scope="session")
def batch(photos) -> torch.Tensor:
    from transforms.images import to_tensor

    return to_tensor(photos)


def dev_rows() -> list[dict]:
    if not (DEV / "labels.csv").exists():
        pytest.skip(f"shared dev images not found at {DEV} (set SEMJPEG_SHARED)")
    with open(DEV / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def dev_dir() -> Path:
    dev_rows()
    return DEV


@pytest.fixture(scope="session")
def real_model():
    from transforms.models import build_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return build_model("efficientnet_lite0")


@pytest.fixture
def read_only():
    """Make folders read-only for the test: ``read_only(path)``. Root writes through permission
    bits, so there the folder is made immutable (``chattr +i``) instead; skips when neither takes.
    Everything is made writable again afterwards (so pytest can remove it)."""
    import shutil
    import subprocess

    done = []

    def make(path: Path) -> None:
        path.chmod(0o555)
        done.append(path)
        if os.access(path, os.W_OK) and shutil.which("chattr"):
            subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if os.access(path, os.W_OK):
            pytest.skip("cannot make a folder read-only here (root without chattr +i)")

    yield make
    for path in done:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        if path.exists():
            path.chmod(0o755)
