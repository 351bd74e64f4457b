import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

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
    with pytest.raises(ValueError):
        metrics.ssim(ta, ta[:, :, :32])
