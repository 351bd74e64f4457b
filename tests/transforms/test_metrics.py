import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tests.conftest import peak_growth_kib
from transforms import metrics


@pytest.fixture
def pair(photos):
    rng = np.random.default_rng(1)
    a = np.stack(photos)
    b = np.clip(a.astype(int) + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
    ta = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
    tb = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255
    return a, b, ta, tb


def test_ssim_and_psnr_match_scikit_image(pair):
    a, b, ta, tb = pair
    ours_ssim, ours_psnr = metrics.ssim(ta, tb), metrics.psnr(ta, tb)
    for i in range(len(a)):
        ref = structural_similarity(a[i] / 255, b[i] / 255, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1, channel_axis=-1)
        assert ours_ssim[i].item() == pytest.approx(ref, abs=1e-5)
        assert ours_psnr[i].item() == pytest.approx(peak_signal_noise_ratio(a[i], b[i]), abs=1e-3)


def test_norms(pair):
    _, _, ta, tb = pair
    d = (ta - tb).flatten(1)
    assert torch.allclose(metrics.linf(ta, tb), d.abs().max(1).values)
    assert torch.allclose(metrics.rmse(ta, tb), d.pow(2).mean(1).sqrt())
    assert torch.allclose(metrics.l2(ta, tb), d.norm(dim=1))


def test_identical_and_empty(pair):
    _, _, ta, _ = pair
    assert math.isinf(metrics.psnr(ta, ta)[0].item())
    assert metrics.ssim(ta, ta)[0].item() == pytest.approx(1.0)
    assert metrics.ssim(ta[:0], ta[:0]).shape == (0,)
    with pytest.raises(ValueError, match=r"^expected two NCHW tensors of one shape, got \(\d+, 3, 64, 64\) and \(\d+, 3, 32, 64\)$"):
        metrics.ssim(ta, ta[:, :, :32])


def test_ssim_of_images_measured_by_tiles_matches_scikit_image():
    """Images over 512 px on a side are measured in overlapping tiles, remainders included."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (530, 777, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    ta, tb = (torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255 for x in (a, b))
    ref = structural_similarity(a / 255, b / 255, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1, channel_axis=-1)
    assert metrics.ssim(ta, tb).item() == pytest.approx(ref, abs=1e-6)
    assert metrics.ssim(ta[:, :, :, :300], tb[:, :, :, :300]).item() == pytest.approx(
        structural_similarity(a[:, :300] / 255, b[:, :300] / 255, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1, channel_axis=-1), abs=1e-6)


def test_ssim_of_a_thin_strip_takes_bounded_memory():
    """SSIM's blur was one dense band matrix per side: an 11x8000 image (defend --crop 0 keeps
    it) built an 8000x8000 band (750 MiB; 11x40000 took more than the machine had)."""
    code = (
        "import resource, torch\n"
        "from transforms import metrics\n"
        "a = torch.rand(1, 3, 11, 8000, generator=torch.Generator().manual_seed(0))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "s = metrics.ssim(a, (a + 0.01).clamp(0, 1))\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "assert 0 < s.item() < 1, s\n"
        "print(grown)\n"
    )
    grown = peak_growth_kib(code)
    assert grown < 50_000, f"peak memory grew by {grown} KiB"
