"""Image decoding and the two data contracts.

* Model side: float32 NCHW tensors in [0, 1] on any device (attacks, saliency, metrics).
* Codec side: uint8 HWC RGB arrays in, ``bytes`` out.

:func:`to_tensor` and :func:`to_uint8` are the one pair of helpers that convert between them.
"""
from __future__ import annotations

import io
import re
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "DecodeError",
    "decode_image",
    "resize_and_crop",
    "to_tensor",
    "to_uint8",
    "DEFAULT_MAX_PIXELS",
]

#: Pillow's own default decompression-bomb threshold (89.5 Mpx).
DEFAULT_MAX_PIXELS = 89_478_485


class DecodeError(ValueError):
    """An input that is not a usable image; the message says why."""


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 HWC RGB. Alpha, a PNG's tRNS and a GIF's transparent color
    included, is composited over white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Integer samples in float32, at half float64's memory (a 16-bit photo at the pixel limit
        # took 2 GB): it holds every 16-bit value exactly, and a / 257 is never within its
        # rounding error of a half, so every 8-bit result is float64's.
        arr = np.asarray(img, dtype=np.float64 if mode == "F" else np.float32)
        if mode == "F":
            # Float images carry no range convention; [0, 1] data is scaled up, the rest clipped.
            scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
            arr = np.nan_to_num(arr) * scale
        elif mode == "I" and img.format != "PPM" and np.max(arr, initial=0) <= 255 and np.min(arr, initial=0) >= 0:
            pass  # 32-bit container holding 8-bit values (Pillow gives a PGM's wider samples at 0..65535)
        else:
            arr /= 257.0  # 16-bit -> 8-bit
        gray = np.clip(np.rint(arr, out=arr), 0, 255, out=arr).astype(np.uint8)
        if mode != "F" and "transparency" in img.info:  # a 16-bit PNG's tRNS: the one transparent value
            gray[np.asarray(img) == img.info["transparency"]] = 255
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("P", "1", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode != "RGB":
        img = img.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(img)


#: Resizing the whole image first is kept while its result stays within this many times the
#: target square; beyond (a thin strip brought up to the target size: 1x3000 px at 256 would make
#: a 256x768000 intermediate), only the center region is resampled.
_FULL_RESIZE_MAX_RATIO = 16


def resize_and_crop(image: np.ndarray, *, resize: int, crop: int) -> np.ndarray:
    """Resize the shorter side to ``resize`` (bicubic, antialiased), then center-crop ``crop`` x ``crop``.

    ``image`` is uint8 HWC RGB. ``resize=0`` skips resizing unless the image is smaller than the
    crop, in which case its shorter side is brought up to ``crop``. An image that already is
    ``crop`` x ``crop`` is returned unchanged: re-resizing a pre-cropped (for instance adversarial)
    image would destroy exactly the pixels we want to study.

    Memory stays bounded by the input and the crop: when upscaling would make an intermediate
    larger than the input and than ``_FULL_RESIZE_MAX_RATIO`` target squares (aspect ratios beyond
    16:1), only the crop's region is resampled (Pillow's ``resize(box=...)``, same scale), which
    agrees with resize-then-crop to within 2 levels; all other images take resize-then-crop.
    """
    h, w = image.shape[:2]
    if (h, w) == (crop, crop):
        return image
    target = resize if resize else max(crop, min(h, w))
    if min(h, w) != target:
        if h <= w:
            nh, nw = target, max(1, int(round(w * target / h)))
        else:
            nh, nw = max(1, int(round(h * target / w))), target
        top = int(round((nh - crop) / 2.0))
        left = int(round((nw - crop) / 2.0))
        if nh * nw > max(h * w, _FULL_RESIZE_MAX_RATIO * target * target):
            sx, sy = w / nw, h / nh
            box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
            return np.asarray(Image.fromarray(image).resize((crop, crop), Image.Resampling.BICUBIC, box=box))
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))
        h, w = nh, nw
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    return np.ascontiguousarray(image[top : top + crop, left : left + crop])


_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")
_PILLOW_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")
_pillow_limit_lock = threading.Lock()


def _reason(e: Exception) -> str:
    """``Type: message`` without object addresses (Pillow names its ``<_io.BytesIO object at
    0x...>``), so the same input gives the same reason in every run."""
    text = _ADDRESS.sub("", str(e)).strip() or ("out of memory" if isinstance(e, MemoryError) else "(no message)")
    return f"{type(e).__name__}: {text}"


def _allow_in_pillow(max_pixels: int) -> None:
    """Raise Pillow's process-wide bomb limit (``Image.MAX_IMAGE_PIXELS``, whose hard error fires at
    twice it) to ``max_pixels`` when that is higher, so the configured limit governs. Never lowers
    it, and leaves a disabled (None) limit alone."""
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= max_pixels:
        return
    with _pillow_limit_lock:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _bomb_error(pixels: int | None, max_pixels: int, size: tuple[int, int] | None = None) -> DecodeError:
    """The one wording of a decompression bomb, whichever check caught it (ours from the header,
    or Pillow's own hard error, which gives the pixel count but not the size)."""
    what = "the image" if pixels is None else f"{pixels} pixels" + (f" ({size[0]}x{size[1]})" if size else "")
    return DecodeError(f"decompression bomb: {what} exceed the limit of {max_pixels} (--max-pixels)")


def _bomb(e: Image.DecompressionBombError, max_pixels: int) -> DecodeError:
    """Pillow's own hard error, reworded to cite the configured limit."""
    m = _PILLOW_BOMB_PIXELS.search(str(e))
    return _bomb_error(int(m.group(1)) if m else None, max_pixels)


def decode_image(
    data: bytes,
    *,
    resize: int = 256,
    crop: int = 224,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode encoded image bytes to a uint8 (crop, crop, 3) RGB array.

    EXIF orientation is applied; any Pillow mode becomes RGB (grayscale, palette, CMYK, 16-bit,
    alpha over white). Raises :class:`DecodeError` with a reason for empty, truncated or
    non-image data and for images over ``max_pixels`` (decompression bombs), which are rejected
    from the header alone, before any pixel is decoded. ``crop=0`` skips resizing and cropping.
    A ``max_pixels`` above Pillow's own limit raises that (process-wide) limit to it.
    """
    if not data:
        raise DecodeError("empty image data")
    _allow_in_pillow(max_pixels)
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's warning; its hard error (2x its limit, never
        # below max_pixels) is still caught below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise _bomb(e, max_pixels) from None
        except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError from plugins
            raise DecodeError(f"not a decodable image ({_reason(e)})") from None
        w, h = img.size
        if w * h > max_pixels:
            raise _bomb_error(w * h, max_pixels, (w, h))
        if w == 0 or h == 0:
            raise DecodeError(f"image has no pixels ({w}x{h})")
        try:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # keeps img.format, which _to_rgb reads
            rgb = _to_rgb(img)
        except Image.DecompressionBombError as e:
            raise _bomb(e, max_pixels) from None
        except Exception as e:
            raise DecodeError(f"corrupt or truncated image ({_reason(e)})") from None
    if crop:
        rgb = resize_and_crop(rgb, resize=resize, crop=crop)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def squash(image: np.ndarray, size: int) -> np.ndarray:
    """The whole image resized to ``size`` x ``size`` (bicubic, antialiased; the aspect ratio is
    not kept): how a saliency model sees all of an image of any size at its input size."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def to_tensor(
    images: Sequence[np.ndarray] | np.ndarray, device: torch.device | str | None = None
) -> torch.Tensor:
    """uint8 HWC arrays (a sequence, or one NHWC array) -> float32 NCHW tensor in [0, 1]."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        batch = images
    else:
        if len(images) == 0:
            return torch.empty((0, 3, 0, 0), dtype=torch.float32, device=device)
        batch = np.stack([np.asarray(im) for im in images])
    if batch.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {batch.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float32 NCHW tensor in [0, 1] -> uint8 NHWC numpy array (rounded to nearest, clipped)."""
    if x.ndim != 4:
        raise ValueError(f"expected an NCHW tensor, got shape {tuple(x.shape)}")
    q = torch.round(x.detach().clamp(0, 1) * 255.0).to(torch.uint8)
    return q.permute(0, 2, 3, 1).contiguous().cpu().numpy()
