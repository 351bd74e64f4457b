import numpy as np
import pytest

from transforms.defenses import apply_defense, map_request, match_target, parse_defense
from transforms.jpeg import decode_rgb


def test_semantic_specs_parse_and_share_maps():
    a = parse_defense("aug_msroi:q_low=20,q_high=60,levels=4")
    b = parse_defense("aug_msroi:method=mosaic")
    c = parse_defense("aug_msroi:activation_noise=0.1")
    assert map_request(a) == map_request(b) != map_request(c)  # encoding params do not change the map
    assert map_request(parse_defense("msroi:q_low=10"))[0] == "msroi:top_k=5,threshold=None"
    assert map_request(parse_defense("jpeg:quality=50")) is None
    assert match_target(parse_defense("jpeg:match=aug_msroi")) == "aug_msroi"


@pytest.mark.parametrize(
    "text, message",
    [
        ("aug_msroi:q_low=80,q_high=40", "must not exceed"),
        ("aug_msroi:q_high=101", "1..100"),
        ("aug_msroi:levels=0", "levels"),
        ("aug_msroi:samples=0", "samples"),
        ("aug_msroi:input_noise=-1", "input_noise"),
        ("aug_msroi:noise=pink", "expected one of gaussian, uniform"),
        ("aug_msroi:method=magic", "expected one of requantize, mosaic"),
        ("aug_msroi:saliency=1", "unknown parameter 'saliency'"),
        ("jpeg:quality=50,match=aug_msroi", "give one of quality, bytes or match"),
        ("jpeg:bytes=0", "bytes"),
    ],
)
def test_invalid_parameters_fail_before_work(text, message):
    with pytest.raises(ValueError, match=message):
        parse_defense(text)


def test_semantic_defense_uses_the_map(photos):
    img = photos[0]
    sal = np.zeros(img.shape[:2], np.float32)
    sal[:32] = 1.0  # top half salient
    enc = apply_defense(parse_defense("aug_msroi"), img, saliency=sal)
    assert enc.ext == "jpg" and enc.data[:2] == b"\xff\xd8"
    assert enc.info["quality_levels"] == {30: 8, 70: 8}  # 4x4 blocks of 16 px: 2 rows each
    out = decode_rgb(enc.data).astype(float)
    err = (out - img) ** 2
    assert err[:32].mean() < err[32:].mean()  # salient half kept better
    with pytest.raises(ValueError, match="saliency map"):
        apply_defense(parse_defense("msroi"), img)


def test_rate_controlled_jpeg(photos):
    img = photos[1]
    ref = apply_defense(parse_defense("jpeg:quality=60"), img)
    matched = apply_defense(parse_defense("jpeg:match=x"), img, matched_bytes=len(ref.data))
    assert len(matched.data) <= len(ref.data) and matched.info["quality"] >= 55
    fixed = apply_defense(parse_defense("jpeg:bytes=900"), img)
    assert len(fixed.data) <= 900 and fixed.info["target_bytes"] == 900
    sem = apply_defense(parse_defense("aug_msroi:bytes=1200"), img, saliency=np.full((64, 64), 0.5, np.float32))
    assert len(sem.data) <= 1200 and sem.info["target_bytes"] == 1200
