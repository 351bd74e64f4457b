"""pipeline.allocator: freed tensor memory is reused, not faulted in again from the kernel."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# 100 MB tensors, allocated, written and freed again and again: one batch's activations.
PROBE = """
import json, resource, torch
from pipeline import allocator
if {via_model}:  # only what loading a stage's model does
    from pipeline.config import ModelConfig
    from pipeline.model_handlers import load_classifier
    load_classifier(ModelConfig(name="tests.tiny:build", device="cpu"), shared=False)
    applied = allocator._STATE.get("applied")
else:
    applied = allocator.keep_freed_memory()
for _ in range(10):  # the heap grows to its working size first (a few blocks fault in then)
    torch.empty(25_000_000).fill_(1.0)
faults = []  # per block: something else on the machine may disturb one, never most of them
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(25_000_000).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"applied": applied, "faults": sorted(faults)[len(faults) // 2]}}))
"""


def probe(system: str, via_model: bool = False) -> dict:
    env = dict(os.environ, SEMJPEG_SYSTEM_MALLOC=system)
    r = subprocess.run([sys.executable, "-c", PROBE.format(via_model=via_model)], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_tensors_are_reused_without_page_faults_unless_opted_out():
    kept, system = probe("0"), probe("1")
    assert kept["applied"] is True and system["applied"] is False
    # glibc's defaults map each 100 MB block afresh: the kernel faults every page in again
    # (24,000 per block with 4 KiB pages, 50 with 2 MiB ones); kept, the heap hands it back.
    # "faults" is the median block's count: a CI run once saw two of five kept blocks fault in.
    assert system["faults"] >= 40
    assert kept["faults"] * 10 < system["faults"]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_loading_a_model_for_a_stage_applies_it():
    loaded = probe("0", via_model=True)
    assert loaded["applied"] is True and loaded["faults"] * 10 < probe("1")["faults"]
