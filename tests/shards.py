"""Building small WebDataset / Parquet / folder fixtures, hostile members included."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def encode(img: Image.Image | np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def good_members(photos: list[np.ndarray], prefix: str = "good") -> list[tuple[str, bytes]]:
    """Well-formed samples in assorted formats and modes; labels 0..9 (the tiny model's classes)."""
    a, b, c, d = photos
    members = [
        (f"{prefix}_jpg.jpg", encode(a, "JPEG", quality=90)), (f"{prefix}_jpg.cls", b"1"),
        (f"{prefix}_jpg.json", b'{"origin": "astronaut"}'),
        (f"{prefix}_png.png", encode(b)), (f"{prefix}_png.cls", b"2"),
        (f"{prefix}_gray.png", encode(Image.fromarray(c).convert("L"))), (f"{prefix}_gray.cls", b"3"),
        (f"{prefix}_cmyk.jpg", encode(Image.fromarray(d).convert("CMYK"), "JPEG")), (f"{prefix}_cmyk.cls", b"4"),
        (f"{prefix}_rgba.png", encode(Image.fromarray(a).convert("RGBA"))),
        (f"{prefix}_16bit.png", encode(Image.fromarray(np.asarray(Image.fromarray(b).convert("L"), np.uint16) * 257))),
        (f"{prefix}_nolabel.webp", encode(c, "WEBP")),
    ]
    return members


GOOD_KEYS = ["good_jpg", "good_png", "good_gray", "good_cmyk", "good_rgba", "good_16bit", "good_nolabel"]


def hostile_members(photos: list[np.ndarray]) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """Bad samples and the (stage, reason pattern) each must be reported with, by key or member."""
    jpg = encode(photos[0], "JPEG", quality=90)
    members = [
        ("bad_truncated.jpg", jpg[: len(jpg) // 3]),
        ("bad_empty.jpg", b""),
        ("bad_text.jpg", b"this is not an image"),
        ("bad_label.png", encode(photos[1])), ("bad_label.cls", b"cat"),
        ("bad_range.png", encode(photos[1])), ("bad_range.cls", b"12"),
        ("bad_bomb.png", encode(Image.new("1", (20000, 10000)))),
        ("../evil.jpg", jpg),
        ("/abs/evil.jpg", jpg),
        ("bad_noimage.cls", b"1"),
    ]
    expect = {
        "bad_truncated": ("decode", "truncated|corrupt|not a decodable"),
        "bad_empty": ("decode", "empty"),
        "bad_text": ("decode", "not a decodable"),
        "bad_label": ("decode", "unreadable label 'cat'"),
        "bad_range": ("decode", "out of range"),
        "bad_bomb": ("decode", "decompression bomb"),
        "../evil.jpg": ("read", "unsafe member name"),
        "/abs/evil.jpg": ("read", "unsafe member name"),
        "bad_noimage": ("read", "no image member"),
    }
    return members, expect


def cut_tar(path: Path, members: list[tuple[str, bytes]], cut_member: int) -> Path:
    """A tar cut short in the middle of member ``cut_member``'s data."""
    write_tar(path, members)
    data = path.read_bytes()
    offset = 0
    for i, (_, payload) in enumerate(members):
        header_end = offset + 512
        if i == cut_member:
            path.write_bytes(data[: header_end + len(payload) // 2])
            return path
        offset = header_end + (len(payload) + 511) // 512 * 512
    raise IndexError(cut_member)


def wide_gamut_profile(extra: int = 0) -> bytes:
    """A valid RGB ICC profile that is not sRGB: Pillow's sRGB profile with its red and green
    primaries swapped (each colour renders far from its sRGB self). ``extra`` bytes of padding
    after the tags make it as large as a test needs."""
    import struct

    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    tags = {}
    for i in range(struct.unpack(">I", data[128:132])[0]):
        sig, off, size = struct.unpack(">4sII", data[132 + 12 * i:144 + 12 * i])
        tags[sig] = (off, size)
    (r, n), (g, _) = tags[b"rXYZ"], tags[b"gXYZ"]
    data[r:r + n], data[g:g + n] = data[g:g + n], data[r:r + n]
    data += b"\0" * extra
    data[0:4] = struct.pack(">I", len(data))
    data[84:100] = b"\0" * 16  # no profile ID (it would no longer match)
    return bytes(data)


def srgb_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
