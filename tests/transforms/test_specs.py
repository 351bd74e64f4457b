import pickle
from typing import Literal

import pytest

from transforms.specs import Spec, parse_spec, parse_value, safe_name


def attack(model, images, labels, *, eps: float = 0.1, steps: int = 3, mode: Literal["a", "b"] = "a",
           flag: bool = False, target=None, seeds=None):
    pass


REG = {"attack": attack}


def test_parse_fraction_and_types():
    s = parse_spec("attack:eps=4/255,steps=7,mode=b,flag=true", REG)
    assert s.name == "attack" and s.params == {"eps": 4 / 255, "steps": 7, "mode": "b", "flag": True}
    assert s.text == "attack:eps=4/255,steps=7,mode=b,flag=true"


def test_name_case_and_no_params():
    assert parse_spec("ATTACK", REG).params == {}


@pytest.mark.parametrize(
    "text, msg",
    [
        ("nope:eps=1", "unknown spec 'nope'.*valid: attack"),
        ("attack:bogus=1", "unknown parameter 'bogus'.*valid: eps, steps, mode, flag, target"),
        ("attack:eps", "expected k=v"),
        ("attack:eps=abc", "bad value for 'eps'"),
        ("attack:steps=2.5", "expected an integer"),
        ("attack:mode=c", "expected one of a, b"),
        ("attack:eps=1,eps=2", "given twice"),
        ("attack:seeds=1", "unknown parameter 'seeds'"),
        ("", "empty"),
    ],
)
def test_errors_name_the_problem(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_spec(text, REG)


def test_parse_value_union_and_none():
    ann = int | Literal["random", "least_likely"] | None
    assert parse_value("3", ann) == 3
    assert parse_value("random", ann) == "random"
    assert parse_value("none", ann) is None


def test_spec_pickles_and_has_safe_folder():
    s = parse_spec("attack:eps=4/255", REG)
    assert pickle.loads(pickle.dumps(s)) == s
    assert s.folder == "attack-eps=4_255"
    assert safe_name("jpeg:quality=50") != safe_name("jpeg:quality=60")
    for text in ("a:b=../../x", "../..", "x y*?"):
        name = safe_name(text)
        assert "/" not in name and name not in (".", "..") and " " not in name
