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
