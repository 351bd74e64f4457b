"""Smoke runs of the benchmarks this suite can afford: they run and print the JSON they promise.

Timings are not asserted (speed targets live in the benchmarks themselves), only that each
figure is there and is a rate; a bench that breaks would otherwise go unnoticed until measured.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEV

ROOT = Path(__file__).resolve().parents[1]


def _bench(*argv: str) -> dict:
    env = dict(os.environ, SEMJPEG_SHARED=str(DEV.parents[1]))
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, r.stdout[-2000:]
    return json.loads(lines[0])


def test_defend_bench_quick():
    if not (DEV / "labels.csv").exists():
        pytest.skip(f"shared dev images not found at {DEV} (set SEMJPEG_SHARED)")
    out = _bench("bench/defend.py", "--quick", "--device", "cpu", "--encoder-procs", "2", "--compile")
    for layout in ("fp32", "channels_last"):
        cpu = out["map_cpu"][layout]
        assert cpu["aug_msroi_images_per_s"] > 0 and cpu["msroi_images_per_s"] > cpu["aug_msroi_images_per_s"]
        assert 0 < cpu["aug_msroi_gated_images_per_s"] < cpu["msroi_images_per_s"]
    # --compile: channels_last only (the CPU default); the device JPEG gives libjpeg's very scores.
    assert "compiled" not in out["map_cpu"]["fp32"]
    fused = out["map_cpu"]["channels_last"]["compiled"]
    assert all(fused[k] > 0 for k in ("msroi_images_per_s", "aug_msroi_gated_images_per_s",
                                      "jpeg_roundtrip_eager_images_per_s", "jpeg_roundtrip_compiled_images_per_s"))
    assert out["map_cpu"]["channels_last"]["jpeg_check_max_abs_diff_torch_vs_libjpeg"] == 0.0
    assert fused["max_abs_diff_vs_eager"]["stability"] <= 0.2
    assert out["kept_freed_memory"] is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    enc = out["encoder_cpu_one_process"]
    assert all(enc[k] > 0 for k in ("requantize_images_per_s", "mosaic_images_per_s", "uniform_q50_images_per_s",
                                    "gated_flagged_images_per_s", "gated_flagged_with_denoising_images_per_s"))
    assert sorted(enc["gated_encoder_images_per_s_by_flagged_share"]) == ["0.21", "0.68", "0.88"]
    assert 1000 < enc["requantize_mean_bytes"] < 50_000
    denoise = out["map_cpu"]["denoise"]
    assert denoise["torch_images_per_s"] > 0 and denoise["skimage_images_per_s"] > 0
    two = out["encoder_cpu_2_procs"]
    assert two["procs"] == 2 and two["requantize_images_per_s"] == pytest.approx(
        2 * two["per_process_requantize_images_per_s"], rel=0.01)
    assert all(two[f"gated_{k}_images_per_s"] > 0 for k in ("clean_share", "igsm_share", "clean_share_prepared",
                                                             "igsm_share_prepared"))
    assert two["requantize_prepared_images_per_s"] > 0
    assert enc["gated_flagged_prepared_images_per_s"] > 0 and enc["quality_grid_images_per_s"] > 0
    assert out["map_cpu"]["denoise"]["requantized_coefficients_images_per_s"] > 0


def test_map_compile_probe_eager_on_cpu():
    out = _bench("bench/map_compile_probe.py", "--device", "cpu", "--batch", "2", "--iters", "1", "--no-compile")
    assert out["device"] == "cpu" and out["batch"] == 2
    for name in ("eager_plain", "eager_noisy"):
        assert "error" not in out[name], out[name]
        assert out[name]["forward_images_per_s"] > 0
    assert "compiled_plain" not in out


def test_memory_format_bench_quick():
    out = _bench("bench/memory_format.py", "--quick")
    stages = out["results"]["1_threads"]
    assert set(stages) == {"forward", "forward_backward", "msroi", "aug_msroi"}
    for v in stages.values():
        assert v["contiguous_img_s"] > 0 and v["channels_last_img_s"] > 0
        assert v["speedup"] == pytest.approx(v["channels_last_img_s"] / v["contiguous_img_s"], rel=0.01)
    assert out["max_logit_difference"] < 1e-3 * out["logit_scale"]


def test_inference_graph_bench_quick():
    out = _bench("bench/inference_graph.py", "--quick")
    stages = out["results"]["1_threads"]
    assert set(stages) == {"forward", "forward_backward", "msroi", "aug_msroi"}
    for v in stages.values():
        assert all(v[f"{k}_img_s"] > 0 for k in ("as_loaded", "folded", "pointwise", "built"))
        assert v["built_speedup"] == pytest.approx(v["built_img_s"] / v["as_loaded_img_s"], rel=0.01)
    assert out["built_is_build_model"] is True
    assert all(d < 1e-3 * out["logit_scale"] for d in out["max_logit_difference"].values())


def test_allocator_bench_quick():
    out = _bench("bench/allocator.py", "--quick", "--threads", "1")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"  # elsewhere it changes nothing
    assert out["glibc_defaults"]["kept_freed_memory"] is False and out["keep_freed_memory"]["kept_freed_memory"] is glibc
    for setting in ("glibc_defaults", "keep_freed_memory"):
        for stage in ("forward", "forward_backward", "aug_msroi"):
            v = out[setting][stage]
            assert v["img_s"] > 0 and v["user_s"] >= 0 and v["system_s"] >= 0 and v["minor_faults"] >= 0


@pytest.mark.parametrize("argv,message", [
    (["bench/pipeline.py", "--repeats", "0"], "--repeats: must be a positive integer, got 0"),
    (["bench/scale.py", "--shards", "0"], "--shards: must be a positive integer, got 0"),
    (["bench/scale.py", "--base", "-1"], "--base: must be an integer >= 0, got -1"),
    (["bench/table_overhead.py", "--n", "0"], "--n: must be a positive integer, got 0"),
    (["bench/adaptive.py", "--n", "-3"], "--n: must be a positive integer, got -3"),
    (["bench/defend.py", "--batch", "two"], "--batch: 'two' is not an integer"),
    (["bench/attacks.py", "--only", "fgsm,bogus"], "--only: unknown attack(s) bogus"),
    (["bench/rate_accuracy.py", "--run", "no/such/run"], "is not a semjpeg run"),
])
def test_bad_bench_arguments_are_one_line_errors(argv, message):
    # They were accepted and gave NaN, empty results or a traceback.
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout == ""


def test_more_dev_images_than_there_are_is_an_error_not_a_smaller_count():
    if not (DEV / "labels.csv").exists():
        pytest.skip(f"shared dev images not found at {DEV} (set SEMJPEG_SHARED)")
    env = dict(os.environ, SEMJPEG_SHARED=str(DEV.parents[1]))
    r = subprocess.run([sys.executable, "bench/pipeline.py", "--n", "100000"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 1 and "asked for 100000 dev images" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
