"""Image decoding and the two data contracts.

* Model side: float32 NCHW tensors in [0, 1] on any device (attacks, saliency, metrics).
* Codec side: uint8 HWC RGB arrays in, ``bytes`` out.

:func:`to_tensor` and :func:`to_uint8` are the one pair of helpers that convert between them.
"""
from __future__ import annotations

import functools
import io
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "DecodeError",
    "decode_image",
    "decode_image_profile",
    "with_colour_profile",
    "resize_and_crop",
    "to_tensor",
    "to_uint8",
    "DEFAULT_MAX_PIXELS",
]

#: Pillow's own default decompression-bomb threshold (89.5 Mpx).
DEFAULT_MAX_PIXELS = 89_478_485
#: The most scans a JPEG may have. libjpeg decodes every scan, and Pillow sets no limit (djpeg's
#: ``-maxscans``): a 1.2 MB JPEG of 9000x9000 pixels repeating one 14-byte scan 20,000 times took
#: 51 s to decode.
MAX_JPEG_SCANS = 1000
#: The start of every scan header libjpeg reads: the marker, its length and its 1 to 4 components.
_SOS_HEADERS = tuple(b"\xff\xda" + (6 + 2 * n).to_bytes(2, "big") + bytes([n]) for n in range(1, 5))


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

    The array of :func:`decode_image_profile`, without the colour profile.
    """
    return decode_image_profile(data, resize=resize, crop=crop, max_pixels=max_pixels)[0]


def decode_image_profile(
    data: bytes,
    *,
    resize: int = 256,
    crop: int = 224,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, bytes | None]:
    """Decode encoded image bytes to a uint8 (crop, crop, 3) RGB array, and the colour profile
    the pixels are in when it must travel with them (:func:`carried_profile`), else None.

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
        # In entropy-coded data 0xFF is always followed by 0x00 or a restart marker, and libjpeg
        # decodes a scan only after a header of length 6 + 2 x its 1 to 4 components: a 0xFF 0xDA
        # pair without one is chance (metadata, data appended after the image: a motion photo's
        # video), not a scan. Counted only when the pairs alone are over the limit.
        if (img.format in ("JPEG", "MPO") and data.count(b"\xff\xda") > MAX_JPEG_SCANS
                and (scans := sum(map(data.count, _SOS_HEADERS))) > MAX_JPEG_SCANS):
            raise DecodeError(f"a JPEG of {scans} scans, over {MAX_JPEG_SCANS} (a progressive JPEG has about 10; "
                              "each scan is a pass over the whole image, a cost in time the pixel limit does not bound)")
        try:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # keeps img.format, which _to_rgb reads
            profile = carried_profile(img.info.get("icc_profile"), img.mode)
            rgb = _to_rgb(img)
        except Image.DecompressionBombError as e:
            raise _bomb(e, max_pixels) from None
        except Exception as e:
            raise DecodeError(f"corrupt or truncated image ({_reason(e)})") from None
    if crop:
        rgb = resize_and_crop(rgb, resize=resize, crop=crop)
    return np.ascontiguousarray(rgb, dtype=np.uint8), profile


#: Modes whose pixels do not stay in their profile's RGB space once made RGB.
_NOT_RGB_MODES = frozenset({"CMYK", "LAB", "HSV", "YCbCr"})
#: ICC profile classes that describe no image's colours (device links, abstract, named colour).
_NOT_IMAGE_CLASSES = frozenset({b"link", b"abst", b"nmcl"})
#: An RGB profile is taken as sRGB when it maps every colour of a 16-level grid within this many
#: 8-bit levels of itself into sRGB (the sRGB IEC61966-2.1 profiles cameras embed: 1).
SRGB_TOLERANCE = 2
#: The largest profile carried: Pillow reads a PNG's ``iCCP`` profile of at most 1 MiB
#: (``PngImagePlugin.MAX_TEXT_CHUNK``), so a larger one made the written PNGs unreadable to it.
MAX_PROFILE_BYTES = 1 << 20


def carried_profile(profile: bytes | None, mode: str = "RGB") -> bytes | None:
    """The ICC profile to keep with an image's pixels in the files written from them, or None.

    Pixels are used as stored, as torchvision's loader uses them (no colour conversion); so that
    a colour-managed viewer shows a defended file as it showed its input, an input's RGB profile
    that is not sRGB (Adobe RGB, camera and display profiles) travels into the written files.
    None for no profile, for sRGB ones (what a file without a profile is taken to be: the bytes
    would buy nothing), for profiles of other colour spaces (CMYK, gray: the written files are
    RGB) or of ``mode`` s that are not RGB-like, for profiles LittleCMS cannot read (a damaged
    profile is dropped rather than copied into files that viewers may then reject), and for
    profiles over :data:`MAX_PROFILE_BYTES`."""
    if not profile or mode in _NOT_RGB_MODES or not 128 <= len(profile) <= MAX_PROFILE_BYTES:
        return None
    if profile[16:20] != b"RGB " or profile[12:16] in _NOT_IMAGE_CLASSES:
        return None
    return bytes(profile) if _is_srgb(bytes(profile)) is False else None


@functools.lru_cache(maxsize=64)
def _is_srgb(profile: bytes) -> bool | None:
    """True when ``profile`` renders as sRGB (:data:`SRGB_TOLERANCE`), False when not, None when
    LittleCMS cannot read it."""
    levels = np.arange(0, 256, 17, dtype=np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(64, 64, 3)
    try:
        from PIL import ImageCms
    except ImportError:  # Pillow built without LittleCMS: no profile can be checked
        return None
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        # Colorimetric: a v4 profile's perceptual tables map through its own reference medium.
        transform = ImageCms.buildTransform(src, _srgb_profile(), "RGB", "RGB",
                                            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
        out = np.asarray(ImageCms.applyTransform(Image.fromarray(grid), transform))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    return bool(np.abs(out.astype(np.int16) - grid).max() <= SRGB_TOLERANCE)


@functools.lru_cache(maxsize=1)
def _srgb_profile():
    from PIL import ImageCms

    return ImageCms.createProfile("sRGB")


_ICC_MARKER = b"ICC_PROFILE\0"
_ICC_CHUNK = 65535 - 2 - len(_ICC_MARKER) - 2  # an APP2 segment's payload after its header


def with_colour_profile(data: bytes, ext: str, profile: bytes | None) -> bytes:
    """``data`` (a JPEG or PNG file) with ``profile`` embedded: APP2 ``ICC_PROFILE`` segments
    after the JFIF header, or a PNG ``iCCP`` chunk after ``IHDR``. The image data is untouched
    (the same pixels decode); ``data`` as it is for no profile or another format. Raises
    ValueError for a file that already holds a profile or is not what ``ext`` says."""
    if not profile:
        return data
    if ext in ("jpg", "jpeg"):
        if data[:2] != b"\xff\xd8":
            raise ValueError("not a JPEG file: cannot embed its colour profile")
        chunks = [profile[i:i + _ICC_CHUNK] for i in range(0, len(profile), _ICC_CHUNK)]
        if len(chunks) > 255:
            raise ValueError(f"colour profile of {len(profile)} bytes is too large for a JPEG file")
        segments = b"".join(
            b"\xff\xe2" + struct.pack(">H", 2 + len(_ICC_MARKER) + 2 + len(c)) + _ICC_MARKER
            + bytes((n, len(chunks))) + c for n, c in enumerate(chunks, 1))
        at = 2
        while data[at:at + 2] in (b"\xff\xe0", b"\xff\xe2"):  # JFIF/JFXX headers first; an existing profile
            if data[at + 1] == 0xE2 and data[at + 4:at + 4 + len(_ICC_MARKER)] == _ICC_MARKER:
                raise ValueError("the JPEG file already holds a colour profile")
            at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
        return data[:at] + segments + data[at:]
    if ext == "png":
        if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
            raise ValueError("not a PNG file: cannot embed its colour profile")
        if b"iCCP" in data[:data.find(b"IDAT")]:
            raise ValueError("the PNG file already holds a colour profile")
        body = b"iCCP" + b"ICC profile\0\0" + zlib.compress(profile, 9)
        chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        at = 8 + 12 + struct.unpack(">I", data[8:12])[0]  # after IHDR
        return data[:at] + chunk + data[at:]
    return data


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
