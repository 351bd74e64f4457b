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
import types
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
        # Rates only: their order (MSROI's one pass against Aug-MSROI's five) is the benchmark's to
        # show, not a test's to assert; on a loaded machine MSROI once timed at 4.3 img/s, the gated
        # map at 12.0.
        assert all(cpu[f"{k}_images_per_s"] > 0 for k in ("msroi", "aug_msroi", "aug_msroi_gated"))
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
    assert denoise["entropy_coding_images_per_s"] > 0 and enc["entropy_headers_images_per_s"] > 0
    assert "entropy_coding_images_per_s_batch_256" not in denoise  # CUDA only
    assert denoise["gated_files_clean_share_images_per_s"] > 0 and denoise["gated_files_igsm_share_images_per_s"] > 0
    two = out["encoder_cpu_2_procs"]
    assert two["procs"] == 2 and two["requantize_images_per_s"] == pytest.approx(
        2 * two["per_process_requantize_images_per_s"], rel=0.01)
    assert all(two[f"gated_{k}_images_per_s"] > 0 for k in ("clean_share", "igsm_share", "clean_share_prepared",
                                                             "igsm_share_prepared"))
    assert two["requantize_prepared_images_per_s"] > 0
    assert all(two[f"{k}_device_files_images_per_s"] > 0 for k in ("requantize", "gated_clean_share",
                                                                    "gated_igsm_share"))
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
    (["bench/scale.py", "--n", "16", "--base", "16"], "--base must be between 0 and --n (16), got 16"),
    (["bench/table_overhead.py", "--n", "0"], "--n: must be a positive integer, got 0"),
    (["bench/adaptive.py", "--n", "-3"], "--n: must be a positive integer, got -3"),
    (["bench/map_ablation.py", "--n", "0"], "--n: must be a positive integer, got 0"),
    (["bench/semantic_grid.py", "--n", "-1"], "--n: must be a positive integer, got -1"),
    (["bench/memory_format.py", "--batch", "0"], "--batch: must be a positive integer, got 0"),
    (["bench/inference_graph.py", "--repeat", "0"], "--repeat: must be a positive integer, got 0"),
    (["bench/allocator.py", "--rounds", "-2"], "--rounds: must be a positive integer, got -2"),
    (["bench/defend.py", "--batch", "two"], "--batch: 'two' is not an integer"),
    (["bench/defend.py", "--compile", "bf16", "--device", "cpu"], "--compile: bf16 is timed on CUDA only"),
    (["bench/map_compile_probe.py", "--device", "gpu"], "--device: 'gpu' is not cpu, cuda or cuda:N"),
    (["bench/aug_msroi_params.py", "--grid", "gaussian:0.05"], "'gaussian:0.05' is not noise:input:activation"),
    (["bench/attacks.py", "--only", "fgsm,bogus,"], "--only: unknown attack(s) 'bogus', ''"),
    (["bench/rate_accuracy.py", "--run", "no/such/run"], "is not a semjpeg run"),
    (["bench/rate_accuracy.py", "--run", "README.md"], "is not a semjpeg run"),
])
def test_bad_bench_arguments_are_one_line_errors(argv, message):
    # They were accepted and gave NaN, empty results, a traceback, or (--compile) nothing at all.
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    # argparse's usage, then the one line that says what is wrong
    assert r.stderr.rstrip().splitlines()[-1].startswith(f"{Path(argv[0]).name}: error: "), r.stderr[-2000:]
    assert message in r.stderr.rstrip().splitlines()[-1] and r.stderr.count("error:") == 1, r.stderr[-2000:]
    assert r.stdout == ""


def test_rate_accuracy_without_the_metric_says_there_is_no_plot(tmp_path):
    # A run without labels has no top-1 (the default metric): --plot gave a TypeError traceback
    # from writing None.
    row = {"attack_spec": "fgsm:eps=4/255", "attack": "fgsm", "defense": "jpeg", "defense_spec": "jpeg:quality=50",
           "n": 2, "top1": None, "agree_clean": 0.5, "bytes": 900.0, "bpp": 1.8, "psnr": 30.0, "ssim": 0.9,
           "identical": 0}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"table": [row]}))
    plot = tmp_path / "plot.png"
    argv = [sys.executable, "bench/rate_accuracy.py", "--run", str(tmp_path / "run"), "--plot", str(plot)]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip() == f"no plot: no defended row of {tmp_path / 'run'} has a top1 value (--metric)"
    assert "| fgsm:eps=4/255 | jpeg:quality=50 | 2 | – | 0.500 |" in r.stdout and not plot.exists()
    r = subprocess.run([*argv, "--metric", "agree_clean"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and plot.read_bytes().startswith(b"\x89PNG"), r.stderr[-2000:]


@pytest.mark.parametrize("script", ["bench/pipeline.py", "bench/scale.py"])
def test_more_dev_images_than_there_are_is_an_error_not_a_smaller_count(script):
    if not (DEV / "labels.csv").exists():
        pytest.skip(f"shared dev images not found at {DEV} (set SEMJPEG_SHARED)")
    env = dict(os.environ, SEMJPEG_SHARED=str(DEV.parents[1]))
    r = subprocess.run([sys.executable, script, "--n", "100000"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 1 and "asked for 100000 dev images" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_adaptive_bench_keeps_the_jobs_output_off_stdout(monkeypatch, capfd):
    # The job's table and "wrote OUT" came out on stdout among the bench's JSON lines. The job is
    # replaced by one that prints as it does and writes a one-row summary.json.
    if not (DEV / "labels.csv").exists():
        pytest.skip(f"shared dev images not found at {DEV} (set SEMJPEG_SHARED)")
    row = {"attack_spec": "igsm:eps=4/255,steps=10", "defense_spec": "aug_msroi", "n": 2, "top1": 0.5,
           "agree_clean": 0.5, "bytes": 9000.0, "psnr": 33.0}

    def evaluate(argv: list[str]) -> int:
        out = Path(argv[argv.index("--output") + 1])
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"table": [row]}))
        print(f"a table\nwrote {out}")
        return 0

    job = types.ModuleType("jobs.__main__")
    job.main = evaluate
    monkeypatch.setitem(sys.modules, "jobs.__main__", job)
    monkeypatch.syspath_prepend(str(ROOT))  # bench/adaptive.py rewrites sys.path when imported
    monkeypatch.setattr(sys, "argv", ["bench/adaptive.py", "--n", "2"])
    from bench import adaptive

    adaptive.main()
    out, err = capfd.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r.get("bench") for r in records] == [None, "adaptive"], out
    assert records[0]["defense"] == "aug_msroi" and records[1]["images"] == 2
    assert "a table" in err and "wrote " in err


def test_adaptive_bench_with_the_papers_step_count_runs_its_attack_once(monkeypatch):
    # --steps 10 made the control the paper's attack itself: the run refused the spec given twice.
    from pipeline.config import parse_attacks

    monkeypatch.syspath_prepend(str(ROOT))  # bench/adaptive.py rewrites sys.path when imported
    from bench import adaptive

    assert adaptive.attacks(10)[:2] == ["igsm:eps=4/255,steps=10", "igsm:eps=4/255,steps=10,bpda=jpeg:quality=50"]
    assert adaptive.attacks(30)[:2] == ["igsm:eps=4/255,steps=10", "igsm:eps=4/255,steps=30"]
    for steps in (10, 30):
        assert len(parse_attacks(adaptive.attacks(steps))) == len(adaptive.attacks(steps)) + 1  # and clean


def test_compile_variants_the_cuda_run_would_skip_are_errors(monkeypatch):
    # On CUDA a compiled variant is timed beside its eager run: one left out of --cuda-variants
    # was skipped without a word. Checked without a GPU through the function main() calls.
    monkeypatch.syspath_prepend(str(ROOT))  # bench/defend.py rewrites sys.path when imported
    from bench.defend import compile_variant_error

    assert compile_variant_error(["cuda"], ["fp32"], ["bf16_channels_last"]).startswith(
        "--compile: fp32 is not among --cuda-variants (bf16_channels_last)")
    assert "bf16_channels_last is not among" in compile_variant_error(["cpu", "cuda"], [], ["fp32"])  # the default
    assert "is timed on CUDA only" in compile_variant_error(["cpu"], ["bf16"], ["fp32"])
    for devices, compile, variants in ((["cuda"], ["fp32", "bf16"], ["fp32", "bf16"]), (["cpu"], [], ["fp32"]),
                                       (["cpu"], ["channels_last"], ["fp32"]), (["cuda"], None, ["fp32"])):
        assert compile_variant_error(devices, compile, variants) is None
