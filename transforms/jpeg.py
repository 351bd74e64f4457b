"""The codec boundary: uint8 HWC RGB arrays in, encoded ``bytes`` out (and back)."""
from __future__ import annotations

import io
import threading
from typing import Literal

import numpy as np
from PIL import Image, ImageFile

__all__ = ["encode_jpeg", "encode_png", "decode_rgb", "SUBSAMPLING"]

#: Pillow's names for chroma subsampling.
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}

Subsampling = Literal["4:4:4", "4:2:2", "4:2:0"]


#: libjpeg's largest image side (its JPEG_MAX_DIMENSION): no JPEG this project writes is larger.
JPEG_MAX_DIMENSION = 65500


def check_jpeg_size(height: int, width: int) -> None:
    """A clear error for an image side outside 1..:data:`JPEG_MAX_DIMENSION`."""
    if not 1 <= int(height) <= JPEG_MAX_DIMENSION or not 1 <= int(width) <= JPEG_MAX_DIMENSION:
        raise ValueError(f"a JPEG's height and width must be in 1..{JPEG_MAX_DIMENSION} (libjpeg's limit), "
                         f"got {height}x{width}")


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got {image.dtype} {image.shape}")


def _check_image(image: np.ndarray) -> None:
    _check_rgb(image)
    check_jpeg_size(*image.shape[:2])


def encode_jpeg(
    image: np.ndarray, quality: int = 75, subsampling: Subsampling = "4:2:0", *, optimize: bool = False
) -> bytes:
    """Baseline JPEG with the IJG quality scaling (libjpeg-turbo through Pillow), no metadata.

    ``optimize`` computes optimal Huffman tables: same pixels, a few percent fewer bytes."""
    _check_image(image)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if subsampling not in SUBSAMPLING:
        raise ValueError(f"subsampling must be one of {', '.join(SUBSAMPLING)}, got {subsampling!r}")
    pil = Image.fromarray(image)
    options = dict(format="JPEG", quality=int(quality), subsampling=SUBSAMPLING[subsampling], optimize=bool(optimize))
    if optimize and quality >= _ROOMY_QUALITY:
        return _save_roomy(pil, options)
    buf = io.BytesIO()
    try:
        pil.save(buf, **options)
    except OSError:
        if not optimize:
            raise
        return _save_roomy(pil, options)
    return buf.getvalue()


# With optimized Huffman tables libjpeg writes the whole scan at once into a buffer Pillow sizes at
# 1 byte per pixel (2 from quality 95): near-lossless settings on busy images (noise, strong
# attacks, 4:4:4) need more, and libjpeg fails with "Suspension not allowed here". From this
# quality on the buffer is sized for libjpeg's worst case up front; below it, only on failure.
_ROOMY_QUALITY = 90
_MAXBLOCK_LOCK = threading.Lock()


def _save_roomy(pil: Image.Image, options: dict) -> bytes:
    """Save with room for any scan: a block's 64 coefficients at up to 27 bits each is 3.4 times
    its samples."""
    w, h = pil.size
    with _MAXBLOCK_LOCK:  # Pillow reads the module's MAXBLOCK when it saves
        saved = ImageFile.MAXBLOCK
        ImageFile.MAXBLOCK = max(saved, 4 * 3 * h * w + (1 << 16))
        try:
            buf = io.BytesIO()
            pil.save(buf, **options)
        finally:
            ImageFile.MAXBLOCK = saved
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG (zlib level 6), of any size (JPEG's side limit is not PNG's)."""
    _check_rgb(image)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode stored bytes (JPEG or PNG) to uint8 HWC RGB at their own size."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
