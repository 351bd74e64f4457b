import io

import numpy as np
import pytest
from PIL import Image

from transforms.defenses import apply_defense, parse_defense
from transforms.jpeg import decode_rgb, encode_jpeg, encode_png


def test_jpeg_is_baseline_420_and_quality_orders_size(photos):
    img = photos[0]
    small, big = encode_jpeg(img, 20), encode_jpeg(img, 90)
    assert len(small) < len(big)
    with Image.open(io.BytesIO(big)) as im:
        assert im.format == "JPEG" and not im.info.get("progressive")
        from PIL import JpegImagePlugin

        assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
    assert decode_rgb(big).shape == img.shape


def test_png_is_lossless(photos):
    assert np.array_equal(decode_rgb(encode_png(photos[1])), photos[1])


@pytest.mark.parametrize("q", [0, 101])
def test_quality_out_of_range(photos, q):
    with pytest.raises(ValueError, match="quality"):
        encode_jpeg(photos[0], q)
    with pytest.raises(ValueError, match="quality"):
        parse_defense(f"jpeg:quality={q}")


def test_defense_registry(photos):
    enc = apply_defense(parse_defense("jpeg:quality=40,subsampling=4:4:4"), photos[2])
    assert enc.ext == "jpg" and enc.data[:2] == b"\xff\xd8"
    assert apply_defense(parse_defense("none"), photos[2]).ext == "png"
    with pytest.raises(ValueError, match="unknown defense 'gzip'.*valid: .*jpeg.*none"):
        parse_defense("gzip")
    with pytest.raises(ValueError, match="uint8"):
        encode_jpeg(photos[0].astype(np.float32), 50)  # noqa


@pytest.mark.parametrize("quality,subsampling", [(100, "4:4:4"), (95, "4:4:4"), (85, "4:4:4"), (100, "4:2:0")])
def test_optimized_near_lossless_busy_images_encode(quality, subsampling):
    # Noise at high quality compresses to more than the buffer Pillow gives libjpeg for an
    # optimized scan (1-2 bytes per pixel): it once failed with "Suspension not allowed here".
    # Below quality 90 the encoder retries with a larger buffer; from 90 it starts with one.
    from PIL import ImageFile

    noise = np.random.default_rng(quality).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    maxblock = ImageFile.MAXBLOCK
    plain, optimized = encode_jpeg(noise, quality, subsampling), encode_jpeg(noise, quality, subsampling, optimize=True)
    assert len(optimized) < len(plain) and np.array_equal(decode_rgb(optimized), decode_rgb(plain))
    assert ImageFile.MAXBLOCK == maxblock


def test_jpeg_defense_at_quality_100_and_a_large_byte_target_on_noise():
    noise = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    top = apply_defense(parse_defense("jpeg:quality=100,subsampling=4:4:4"), noise)
    assert top.data[:2] == b"\xff\xd8" and decode_rgb(top.data).shape == noise.shape
    matched = apply_defense(parse_defense(f"jpeg:bytes={len(top.data)},subsampling=4:4:4"), noise)
    assert len(matched.data) <= len(top.data) and decode_rgb(matched.data).shape == noise.shape


def test_png_is_not_held_to_jpegs_side_limit():
    """The lossless `none` defense refused an image wider than 65,500 px with JPEG's message."""

    from transforms.jpeg import JPEG_MAX_DIMENSION

    wide = np.zeros((2, JPEG_MAX_DIMENSION + 1, 3), np.uint8)
    wide[1, -1] = (1, 2, 3)
    assert np.array_equal(decode_rgb(encode_png(wide)), wide)
    with pytest.raises(ValueError, match="libjpeg's limit"):
        encode_jpeg(wide)
    with pytest.raises(ValueError, match="HxWx3"):
        encode_png(np.zeros((0, 4, 3), np.uint8))
