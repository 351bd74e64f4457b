from __future__ import annotations

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.config import EvaluateConfig, InputConfig, ModelConfig, parse_attacks, parse_defenses


@pytest.fixture
def fnapi():
    return PipelineOptions(["--runner", "FnApiRunner"])


def tiny_config(inputs, output, *, attacks=("fgsm:eps=4/255",), defenses=("jpeg:quality=50",), **kw) -> EvaluateConfig:
    inp = {k: kw.pop(k) for k in list(kw) if k in InputConfig.__dataclass_fields__}
    return EvaluateConfig(
        input=InputConfig(paths=tuple(inputs), resize=72, crop=64, **inp),
        output=str(output),
        model=ModelConfig(name="tests.tiny:build", batch_size=4, device="cpu"),
        attacks=parse_attacks(list(attacks)),
        defenses=parse_defenses(list(defenses)),
        **kw,
    )
