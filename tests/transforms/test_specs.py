import pickle
import re
from typing import Literal

import pytest

from transforms.specs import parse_spec, parse_value, safe_name


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


# Every numeric parameter of every registered attack and defense, out of its range: the spec fails
# when it is parsed (before any work), with a message naming the parameter.
BAD_SPECS = [
    ("fgsm:eps=-1", "eps"), ("fgsm:eps=nan", "eps"), ("fgsm:rmse=-0.1", "rmse"), ("fgsm:rmse=inf", "rmse"),
    ("fgsm:target=-1", "target"),
    ("igsm:steps=-3", "steps"), ("bim:step_size=0", "step_size"), ("igsm:eps=2", "eps"),
    ("pgd:eps=nan", "eps"), ("pgd:steps=0", "steps"), ("pgd:step_size=inf", "step_size"), ("pgd:rmse=0", "rmse"),
    ("pgd:norm=2", "rmse"),
    ("mifgsm:mu=-1", "mu"), ("mifgsm:mu=inf", "mu"), ("mifgsm:steps=0", "steps"), ("mifgsm:eps=-0.1", "eps"),
    ("ga:rmse=0", "rmse"), ("ga:search_steps=-1", "search_steps"),
    ("deepfool:overshoot=nan", "overshoot"), ("deepfool:max_iter=0", "max_iter"),
    ("deepfool:candidates=1", "candidates"), ("deepfool:rmse=-1", "rmse"),
    ("jsma:theta=nan", "theta"), ("jsma:theta=0", "theta"), ("jsma:gamma=0", "gamma"), ("jsma:gamma=1.5", "gamma"),
    ("jsma:candidates=1", "candidates"), ("jsma:pairs=0", "pairs"),
    ("lbfgs:initial_const=0", "initial_const"), ("lbfgs:search_steps=0", "search_steps"),
    ("lbfgs:steps=0", "steps"), ("lbfgs:memory=0", "memory"),
    ("cw:confidence=-1", "confidence"), ("cw:confidence=inf", "confidence"), ("cw:initial_const=nan", "initial_const"),
    ("cw:binary_search_steps=0", "binary_search_steps"), ("cw:steps=0", "steps"), ("cw:lr=inf", "lr"),
    ("fgsm:eps=4/255,bpda=aug_msroi:activation_noise=nan", "activation_noise"),
    ("jpeg:quality=0", "quality"), ("jpeg:quality=101", "quality"), ("jpeg:bytes=0", "bytes"),
    ("msroi:top_k=0", "top_k"), ("msroi:threshold=nan", "threshold"), ("msroi:levels=0", "levels"),
    ("msroi:q_low=0", "q_low"), ("msroi:bytes=-5", "bytes"),
    ("aug_msroi:activation_noise=nan", "activation_noise"), ("aug_msroi:activation_noise=-0.1", "activation_noise"),
    ("aug_msroi:input_noise=inf", "input_noise"), ("aug_msroi:samples=0", "samples"),
    ("aug_msroi:threshold=-inf", "threshold"), ("aug_msroi:top_k=-2", "top_k"), ("aug_msroi:q_high=101", "q_high"),
    # A fraction beyond float's range is inf, as 1e400 is (it was an OverflowError traceback).
    ("fgsm:eps=1" + "0" * 400 + "/3", "eps"),
    # Finite in float64 but inf in the float32 the attacks compute in: NaN images (stored as
    # pixels far outside the budget) or a failed attack on every image.
    ("igsm:step_size=1e39", "step_size"), ("pgd:step_size=1e300", "step_size"),
    ("deepfool:overshoot=1e300", "overshoot"), ("mifgsm:mu=1e300", "mu"),
    ("lbfgs:initial_const=1e300", "initial_const"), ("cw:initial_const=1e300", "initial_const"),
    ("cw:lr=1e39", "lr"), ("cw:confidence=1e39", "confidence"),
    # Beyond the metadata's int64 target_bytes: the run did all its work, then failed writing it.
    (f"jpeg:bytes={2**63}", "bytes"), (f"aug_msroi:bytes={10**30}", "bytes"),
]


@pytest.mark.parametrize("text, param", BAD_SPECS)
def test_bad_values_fail_at_parse_time_naming_the_parameter(text, param):
    from transforms.attacks import ATTACKS, parse_attack
    from transforms.defenses import parse_defense

    parse = parse_attack if text.split(":")[0] in ATTACKS else parse_defense
    with pytest.raises(ValueError) as e:
        parse(text)
    assert repr(text) in str(e.value) and re.search(rf"\b{param}\b", str(e.value)), str(e.value)


def test_every_registered_spec_parses_with_its_defaults():
    """The attacks' values are checked on an empty batch without a model: each registered attack
    must check its parameters before touching either."""
    from transforms.attacks import ATTACKS, parse_attack
    from transforms.defenses import DEFENSES, parse_defense

    for name in ATTACKS:
        assert parse_attack(name).name == name
    for name in DEFENSES:
        assert parse_defense(name).name == name
