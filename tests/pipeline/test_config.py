"""The job configuration: values a spec cannot check alone are checked against the model."""
import pytest

from tests.pipeline.conftest import tiny_config


def test_attack_target_must_be_a_class_of_the_model(tmp_path):
    # the tiny model has 10 classes: class 9 is one, class 10 is not
    assert tiny_config([str(tmp_path)], tmp_path / "out", attacks=("fgsm:target=9",)).attacks[1].params["target"] == 9
    with pytest.raises(ValueError, match=r"'fgsm:target=10'.*target must be a class index >= 0 and < 10"):
        tiny_config([str(tmp_path)], tmp_path / "out", attacks=("fgsm:target=10",))
    with pytest.raises(ValueError, match=r"'pgd:target=5000,bpda=jpeg:quality=50'.*< 10"):
        tiny_config([str(tmp_path)], tmp_path / "out", attacks=("pgd:target=5000,bpda=jpeg:quality=50",))


def test_match_names_a_defense_with_several_parameters_however_written():
    """`jpeg:match=` takes the matched defense's parameters separated by ';', in any order, defaults
    filled in; a bare name that fits several defenses says how to name one."""
    from pipeline.config import parse_defenses
    from pipeline.encode import resolve_matches

    two = ("aug_msroi:q_low=20", "aug_msroi:q_low=40,q_high=60")
    got = resolve_matches(parse_defenses(two + ("jpeg:match=aug_msroi:q_high=60;q_low=40",)))
    assert got == {"jpeg:match=aug_msroi:q_high=60;q_low=40": "aug_msroi:q_low=40,q_high=60"}
    assert resolve_matches(parse_defenses(("aug_msroi", "jpeg:match=aug_msroi:q_low=30"))) == {
        "jpeg:match=aug_msroi:q_low=30": "aug_msroi"}
    with pytest.raises(ValueError, match="ambiguous .* separated by ';' \\(quoted in a shell\\), e.g. 'jpeg:match=aug_msroi:q_low=20'"):
        parse_defenses(two + ("jpeg:match=aug_msroi",))
    with pytest.raises(ValueError, match="no defense 'aug_msroi:q_low=31' in this run to match"):
        parse_defenses(("aug_msroi", "jpeg:match=aug_msroi:q_low=31"))


def test_a_separate_map_model_is_checked_on_its_own_device(tmp_path):
    """A nightly config may give the map model its own device; a CUDA device this machine lacks
    is an error before the run (it used to fail in the map stage, after the attacks)."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.evaluate import check_models

    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    maps = ModelConfig(name="tests.tiny:build", batch_size=4, device=missing)
    cfg = tiny_config([str(tmp_path)], tmp_path / "out", defenses=("aug_msroi",), map_model=maps)
    with pytest.raises(ValueError, match=f"--device {missing}: this machine has"):
        check_models(cfg, devices_here=True)
    assert len(check_models(cfg, devices_here=False)) == 1  # elsewhere (Dataflow): checked on the CPU only


def test_nightly_input_options_crop_and_resize_zero_mean_zero(tmp_path):
    """`crop: 0` (images at their own size) and `resize: 0` used to fall back to the model's."""
    from pipeline.nightly import NightlyConfig
    from tests.pipeline.test_nightly import config

    native = NightlyConfig.from_dict(config(tmp_path, attacks=[], input_options={"crop": 0})).evaluate_config("2026-01-01")
    assert native.native and (native.input.crop, native.input.resize) == (0, 0)
    no_resize = NightlyConfig.from_dict(config(tmp_path, input_options={"resize": 0, "crop": 64}))
    assert no_resize.evaluate_config("2026-01-01").input.resize == 0


def test_spec_key_of_a_bpda_attack_through_a_match_with_parameters():
    """A ``bpda=`` through ``jpeg:match=`` of a defense with parameters has a key of its values,
    however the matched defense's parameters are ordered (it was the text, unparsed)."""
    from pipeline.config import spec_key

    key = spec_key("fgsm:bpda=jpeg:match=aug_msroi:q_low=20;q_high=60", "attack")
    assert key == spec_key("fgsm:eps=8/255,bpda=jpeg:match=aug_msroi:q_high=60;q_low=20", "attack")
    bpda = dict(key[1])["bpda"]
    assert bpda[0] == "jpeg" and dict(dict(bpda[1])["match"][1])["q_high"] == 60
