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
