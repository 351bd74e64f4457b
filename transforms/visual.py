"""Pictures of saliency maps: heatmaps and overlays (uint8 HWC RGB out)."""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["heatmap", "overlay"]


@functools.lru_cache(maxsize=4)
def _lut(cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def heatmap(saliency: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """(H, W) map in [0, 1] -> uint8 (H, W, 3) colour image (matplotlib colormap)."""
    s = np.nan_to_num(np.asarray(saliency, dtype=np.float32))
    idx = np.clip(np.rint(s * 255), 0, 255).astype(np.uint8)
    return _lut(cmap)[idx]


def overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5, cmap: str = "inferno") -> np.ndarray:
    """The heatmap of ``saliency`` blended over a uint8 (H, W, 3) image."""
    if image.shape[:2] != np.asarray(saliency).shape:
        raise ValueError(f"map {np.asarray(saliency).shape} does not match image {image.shape[:2]}")
    blend = (1 - alpha) * image.astype(np.float32) + alpha * heatmap(saliency, cmap).astype(np.float32)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)
