import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import peak_growth_kib
from transforms.images import DecodeError, decode_image, resize_and_crop, to_tensor, to_uint8


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rgb(photos):
    return Image.fromarray(photos[0]).resize((120, 90))


def test_decode_rgb_png_resizes_and_crops(rgb):
    out = decode_image(encode(rgb), resize=72, crop=64)
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1", "YCbCr"])
def test_any_mode_becomes_rgb(rgb, mode):
    if mode == "I;16":
        arr = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr)
        fmt = "PNG"
    else:
        img = rgb.convert(mode)
        fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "PNG"
    out = decode_image(encode(img, fmt), resize=72, crop=64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16", "1", "LA"):  # gray stays gray
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_sixteen_bit_scaled_not_clipped():
    arr = np.full((64, 64), 65535, dtype=np.uint16)
    arr[:32] = 0
    out = decode_image(encode(Image.fromarray(arr)), crop=0)
    assert out[0, 0, 0] == 0 and out[-1, 0, 0] == 255


def test_alpha_composited_over_white():
    img = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    out = decode_image(encode(img), crop=0)
    assert (out == 255).all()


@pytest.mark.parametrize("mode, key", [("P", 0), ("L", 0), ("RGB", (0, 0, 0)), ("I;16", 0)])
def test_png_transparent_color_composited_over_white(mode, key):
    """A tRNS chunk is alpha in every PNG color type, not only in palette ones: the left half is
    opaque (value 1), the right half the transparent color."""
    img = Image.new(mode, (8, 4), key)
    img.paste(Image.new(mode, (4, 4), (1, 1, 1) if mode == "RGB" else 1), (0, 0))
    if mode == "P":
        img.putpalette([0, 0, 0, 1, 1, 1])
    out = decode_image(encode(img, transparency=key), crop=0)
    assert (out[:, 4:] == 255).all()
    assert (out[:, :4] <= 1).all()


def test_sixteen_bit_pgm_scaled_whatever_its_values():
    """A 16-bit PGM (Pillow's mode I, samples at 0..65535) is scaled as a 16-bit PNG is, also when
    it is dark: its values all at or below 255 made it read as 8-bit, 257 times brighter than the
    same image with one value above 255."""
    def pgm(values):
        return b"P5 2 2 65535\n" + np.array(values, ">u2").tobytes()

    assert decode_image(pgm([0, 100, 200, 255]), crop=0)[..., 0].ravel().tolist() == [0, 0, 1, 1]
    assert decode_image(pgm([0, 100, 200, 256]), crop=0)[..., 0].ravel().tolist() == [0, 0, 1, 1]
    png = encode(Image.fromarray(np.array([[0, 100], [200, 255]], np.uint16)))
    assert decode_image(png, crop=0)[..., 0].ravel().tolist() == [0, 0, 1, 1]


def test_exif_orientation_applied():
    img = Image.new("RGB", (80, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 40, 40))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), crop=0)
    assert out.shape[:2] == (80, 40)  # portrait after transpose
    assert out[:40].mean() > 200 and out[40:].mean() < 50  # white half now on top


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty"), (b"not an image at all", "not a decodable image"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "not a decodable")],
)
def test_bad_bytes_raise_decode_error(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def test_truncated_image_raises(rgb):
    data = encode(rgb, "JPEG", quality=90)
    with pytest.raises(DecodeError, match="truncated|corrupt|not a decodable"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_rejected_from_header():
    data = encode(Image.new("L", (5000, 5000)))
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(data, max_pixels=1_000_000)
    huge = encode(Image.new("1", (20000, 10000)))  # 200 Mpx, over Pillow's own hard limit too
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(huge)


def test_crop_size_input_passes_through_unchanged():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode(Image.fromarray(arr))), arr)


def test_resize_and_crop_shapes():
    img = np.zeros((30, 100, 3), np.uint8)
    assert resize_and_crop(img, resize=72, crop=64).shape == (64, 64, 3)
    assert resize_and_crop(img, resize=0, crop=16).shape == (16, 16, 3)
    assert resize_and_crop(np.zeros((10, 12, 3), np.uint8), resize=0, crop=16).shape == (16, 16, 3)


def test_tensor_round_trip(photos):
    x = to_tensor(photos)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 64, 64)
    assert 0 <= x.min() and x.max() <= 1
    assert np.array_equal(to_uint8(x), np.stack(photos))
    assert to_tensor([]).shape[0] == 0


def _full_resize_then_crop(img: np.ndarray, target: int, crop: int) -> np.ndarray:
    """The reference: the whole image resized (shorter side = target), then center-cropped."""
    h, w = img.shape[:2]
    nh, nw = (target, round(w * target / h)) if h <= w else (round(h * target / w), target)
    big = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BICUBIC))
    top, left = round((nh - crop) / 2), round((nw - crop) / 2)
    return big[top : top + crop, left : left + crop]


@pytest.mark.parametrize("shape", [(90, 120), (40, 150), (300, 70), (50, 50), (500, 400)])
def test_normal_images_are_resized_then_cropped_exactly(shape):
    img = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert np.array_equal(resize_and_crop(img, resize=72, crop=64), _full_resize_then_crop(img, 72, 64))


def test_thin_strips_resample_only_the_crop_region():
    """A 6x400 strip brought up to 72 would be a 72x4800 intermediate; only the crop is resampled,
    within 2 levels of resize-then-crop."""
    rng = np.random.default_rng(2)
    for shape in [(6, 400), (400, 6), (1, 300)]:
        img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        out = resize_and_crop(img, resize=72, crop=64)
        ref = _full_resize_then_crop(img, 72, 64)
        assert out.shape == (64, 64, 3) and np.abs(out.astype(int) - ref).max() <= 2, shape


def test_thin_image_decodes_in_bounded_memory():
    """A 1x3000 PNG (under 100 bytes) at resize 256 used to build a 256x768000 intermediate (GBs)."""
    code = (
        "import io, resource, numpy as np\n"
        "from PIL import Image\n"
        "from transforms.images import decode_image\n"
        "buf = io.BytesIO(); Image.new('RGB', (1, 3000), (10, 200, 30)).save(buf, 'PNG')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = decode_image(buf.getvalue(), resize=256, crop=224)\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "assert out.shape == (224, 224, 3) and (out == (10, 200, 30)).all(), out[0, 0]\n"
        "print(grown)\n"
    )
    grown = peak_growth_kib(code)
    assert grown < 50_000, f"peak memory grew by {grown} KiB"


def test_16_bit_image_decodes_in_bounded_memory():
    """A 16-bit 3000x3000 PNG (24 kB) was scaled to 8 bits in float64: 24 bytes a pixel (205 MiB;
    2 GB for a 16-bit photo at the default pixel limit). Its pixels come out the same."""
    code = (
        "import io, resource, numpy as np\n"
        "from PIL import Image\n"
        "from transforms.images import decode_image\n"
        "buf = io.BytesIO(); Image.fromarray(np.full((3000, 3000), 40000, np.uint16)).save(buf, 'PNG')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = decode_image(buf.getvalue(), crop=0)\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "assert out.shape == (3000, 3000, 3) and (out == 156).all(), out[0, 0]\n"
        "print(grown)\n"
    )
    grown = peak_growth_kib(code)
    assert grown < 120_000, f"peak memory grew by {grown} KiB"


def test_configured_pixel_limit_governs_over_pillows(monkeypatch):
    """Pillow refuses images over twice its own process-wide limit; --max-pixels above it wins, and
    messages cite the configured limit, not Pillow's."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's hard error now at 2000 px
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)))  # 4096 px
    assert decode_image(data, crop=0, max_pixels=5000).shape == (64, 64, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DecodeError, match=r"^decompression bomb: 4096 pixels \(64x64\) exceed the limit of 3000 \(--max-pixels\)$") as e:
        decode_image(data, crop=0, max_pixels=3000)
    assert "2000" not in str(e.value)
    huge = encode(Image.new("1", (20000, 10000)))  # over Pillow's default hard limit (178956970)
    monkeypatch.undo()
    with pytest.raises(DecodeError, match=r"^decompression bomb: 200000000 pixels exceed the limit of 1000000 \(--max-pixels\)$"):
        decode_image(huge, max_pixels=1_000_000)


def test_reasons_are_the_same_in_every_run():
    with pytest.raises(DecodeError) as e:
        decode_image(b"not an image at all")
    assert "0x" not in str(e.value) and str(e.value) == (
        "not a decodable image (UnidentifiedImageError: cannot identify image file <_io.BytesIO object>)")


# ---- colour profiles: pixels as stored, a non-sRGB profile carried into the written files ----

def _icc(data: bytes):
    with Image.open(io.BytesIO(data)) as im:
        return im.info.get("icc_profile")


def test_only_rgb_profiles_that_are_not_srgb_are_carried():
    import struct

    from tests.shards import srgb_profile, wide_gamut_profile
    from transforms.images import carried_profile

    wide = wide_gamut_profile()
    assert carried_profile(wide) == wide
    assert carried_profile(wide, "P") == wide and carried_profile(wide, "RGBA") == wide
    assert carried_profile(None) is None and carried_profile(b"") is None
    assert carried_profile(srgb_profile()) is None  # what a file without a profile means anyway
    assert carried_profile(wide, "CMYK") is None  # CMYK pixels are converted, not in that space
    gray = wide[:16] + b"GRAY" + wide[20:]
    assert carried_profile(gray) is None  # the written files are RGB
    link = wide[:12] + b"link" + wide[16:]
    assert carried_profile(link) is None
    damaged = wide[:128] + struct.pack(">I", 9) + b"\xff" * 300  # nine tags pointing nowhere
    assert carried_profile(damaged) is None
    assert carried_profile(wide[:100]) is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_decode_returns_the_profile_to_carry(rgb, fmt):
    from tests.shards import srgb_profile, wide_gamut_profile
    from transforms.images import decode_image_profile

    wide = wide_gamut_profile()
    pixels, profile = decode_image_profile(encode(rgb, fmt, icc_profile=wide), resize=72, crop=64)
    assert profile == wide
    np.testing.assert_array_equal(pixels, decode_image(encode(rgb, fmt), resize=72, crop=64))  # no conversion
    assert decode_image_profile(encode(rgb, fmt, icc_profile=srgb_profile()), resize=72, crop=64)[1] is None
    assert decode_image_profile(encode(rgb, fmt), resize=72, crop=64)[1] is None
    cmyk = encode(rgb.convert("CMYK"), "JPEG", icc_profile=wide)
    assert decode_image_profile(cmyk, resize=72, crop=64)[1] is None


@pytest.mark.parametrize("size", [0, 70_000, 200_000])  # one APP2 segment, two, four
def test_a_profile_embedded_in_a_jpeg_keeps_its_pixels_and_decoders(photos, size):
    import shutil
    import subprocess

    from tests.shards import wide_gamut_profile
    from transforms.images import with_colour_profile
    from transforms.jpeg import decode_rgb, encode_jpeg

    wide = wide_gamut_profile(size)
    plain = encode_jpeg(photos[1], 60)
    data = with_colour_profile(plain, "jpg", wide)
    assert _icc(data) == wide
    segments = -(-len(wide) // 65519)  # 65,519 profile bytes per APP2 segment: 18 of header each
    assert len(data) - len(plain) == len(wide) + 18 * segments
    assert data[:2] == b"\xff\xd8" and data[2:4] == b"\xff\xe0"  # JFIF's APP0 stays first
    np.testing.assert_array_equal(decode_rgb(data), decode_rgb(plain))
    with Image.open(io.BytesIO(data)) as im:
        assert im.info.get("jfif") and not im.info.get("progressive")
    djpeg = shutil.which("djpeg")
    if djpeg:
        ppm = subprocess.run([djpeg, "-ppm"], input=data, capture_output=True, check=True).stdout
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ppm)).convert("RGB")), decode_rgb(plain))
    with pytest.raises(ValueError, match="already holds"):
        with_colour_profile(data, "jpg", wide)
    assert with_colour_profile(plain, "jpg", None) is plain


def test_a_profile_embedded_in_a_png_keeps_its_pixels(photos):
    from tests.shards import wide_gamut_profile
    from transforms.images import with_colour_profile
    from transforms.jpeg import encode_png

    wide = wide_gamut_profile()
    plain = encode_png(photos[0])
    data = with_colour_profile(plain, "png", wide)
    assert _icc(data) == wide
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # every chunk's CRC checked
        np.testing.assert_array_equal(np.asarray(im), photos[0])
    with pytest.raises(ValueError, match="already holds"):
        with_colour_profile(data, "png", wide)
    with pytest.raises(ValueError, match="not a PNG"):
        with_colour_profile(b"GIF89a" + plain[6:], "png", wide)


def _with_repeated_scan(times: int) -> bytes:
    """A flat progressive JPEG with its shortest scan (a few bytes of end-of-band runs) repeated:
    libjpeg warns of the bogus progression and decodes every copy, each a pass over the image."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 130, 140)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    scans, i = [], 2
    while data[i + 1] != 0xD9:
        length = 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] != 0xDA:
            i += length
            continue
        j = i + length
        while data[j] != 0xFF or data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7:
            j += 1
        scans.append(data[i:j])
        i = j
    shortest = min(scans, key=len)
    return data[:-2] + shortest * times + data[-2:]


def test_a_jpeg_of_too_many_scans_is_rejected_before_decoding():
    """A 1.2 MB JPEG of 9000x9000 pixels, under the pixel limit, that repeats one scan 20,000
    times took 51 s to decode; Pillow sets no scan limit."""
    assert decode_image(_with_repeated_scan(900), resize=0, crop=0).shape == (64, 64, 3)
    with pytest.raises(DecodeError, match=r"^a JPEG of 1010 scans, over 1000 \(a progressive JPEG has about 10;"):
        decode_image(_with_repeated_scan(1000), resize=0, crop=0)


def test_bytes_after_a_jpeg_are_not_counted_as_its_scans():
    """A 0xFF 0xDA pair is a scan only with a scan header libjpeg accepts (its length 6 + 2 x its
    1 to 4 components): data appended after the image (a motion photo's video; 80 MB of random
    bytes hold about 1,300 such pairs) rejected a JPEG Pillow decodes, as 'a JPEG of 1301 scans'."""
    from transforms.images import MAX_JPEG_SCANS

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG")
    trailer = b"\xff\xda\x00\x00" * (MAX_JPEG_SCANS + 300)
    assert decode_image(buf.getvalue() + trailer, resize=0, crop=0).shape == (48, 64, 3)


def test_a_profile_too_large_for_a_png_reader_is_not_carried(photos):
    """Pillow reads a PNG's iCCP profile of at most 1 MiB (PngImagePlugin.MAX_TEXT_CHUNK): a
    photo with a larger profile had its attack-run PNGs and ``none`` files written unreadable, by
    semjpeg itself too ('Decompressed data too large'), and a profile over a JPEG's 255 APP2
    segments failed every JPEG defense of its image."""
    from tests.shards import wide_gamut_profile
    from transforms.images import carried_profile, decode_image_profile, with_colour_profile
    from transforms.jpeg import encode_png

    fits, over = wide_gamut_profile(900_000), wide_gamut_profile(1_100_000)
    assert carried_profile(fits) == fits and carried_profile(over) is None
    for profile in (fits, over):
        pixels, carried = decode_image_profile(encode(Image.fromarray(photos[0]), "JPEG", icc_profile=profile),
                                               resize=0, crop=0)
        written = with_colour_profile(encode_png(pixels), "png", carried)
        np.testing.assert_array_equal(decode_image(written, resize=0, crop=0), pixels)
