"""Pictures of saliency maps: heatmaps (uint8 HWC RGB out)."""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["heatmap"]


@functools.lru_cache(maxsize=4)
def _lut(cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def heatmap(saliency: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """(H, W) map in [0, 1] -> uint8 (H, W, 3) colour image (matplotlib colormap)."""
    s = np.nan_to_num(np.asarray(saliency, dtype=np.float32))
    idx = np.clip(np.rint(s * 255), 0, 255).astype(np.uint8)
    return _lut(cmap)[idx]
