"""The `semjpeg` command: help, clear one-line errors, the shard job, the attack job's product."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from jobs.__main__ import main
from tests.shards import good_members, write_tar

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_help_lists_the_jobs():
    r = run_cli("--help")
    assert r.returncode == 0
    for job in ("demo", "evaluate", "attack", "shard"):
        assert job in r.stdout
    assert "apitools" not in r.stderr


def test_parsing_the_command_line_imports_neither_torch_nor_beam():
    """Jobs import their heavy modules when they run: `--help` is quick, and a local Dask cluster
    starts before the job process spends seconds importing torch and Beam."""
    code = ("import sys; from jobs.__main__ import build_parser; build_parser()[0].parse_known_args("
            "['evaluate', '--input', 'x', '--output', 'y']); "
            "print(sorted(m for m in ('torch', 'apache_beam', 'distributed', 'pyarrow') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attack", "nope"], "unknown attack 'nope'"),
        (["--attack", "fgsm:eps"], "malformed attack spec"),
        (["--attack", "fgsm:epz=1"], "unknown parameter 'epz' for attack 'fgsm'; valid: eps"),
        (["--defense", "jpeg:quality=0"], "must be in 1..100"),
        (["--attack", "fgsm:eps=-1"], "bad value in attack spec 'fgsm:eps=-1': eps must be in [0.0, 1.0], got -1.0"),
        (["--attack", "fgsm:target=1000"], "target must be a class index >= 0 and < 1000"),
        (["--attack", "igsm:steps=-3"], "steps must be in [1, inf), got -3"),
        (["--defense", "aug_msroi:activation_noise=nan"], "activation_noise must be a finite number >= 0, got nan"),
        (["--defense", "zip"], "unknown defense 'zip'"),
        (["--model", "alexnetz"], "unknown model 'alexnetz'"),
        (["--device", "cuda:x"], "device must be auto, cpu or cuda[:N], got 'cuda:x'"),
        (["--runner", "FnApiRunner", "--no_such_beam_flag", "1"], "unrecognized arguments: --no_such_beam_flag"),
    ],
)
def test_bad_configuration_is_one_clear_line(tmp_path, capsys, extra, message):
    write_tar(tmp_path / "a.tar", [("k.png", b"x")])
    code = main(["evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("semjpeg evaluate: error:")
    assert not (tmp_path / "out").exists()


def test_missing_input_is_one_clear_line(tmp_path):
    r = run_cli("evaluate", "--input", str(tmp_path / "nothing-*.tar"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"semjpeg evaluate: error: no input matches {tmp_path}/nothing-*.tar"]


def test_demo_help_names_the_photos_folder_not_a_function():
    r = run_cli("demo", "--help")
    assert r.returncode == 0
    assert "photos_folder" not in r.stdout and "semjpeg/demo-photos" in r.stdout, r.stdout


def test_verbose_logs_no_import_noise(tmp_path):
    """-v logs the job's progress, not Beam's import-time notes about BigQuery clients it never uses."""
    r = run_cli("-v", "evaluate", "--input", str(tmp_path / "nothing-*.tar"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "bigquery" not in r.stderr.lower(), r.stderr


def test_the_shard_job_imports_neither_torch_nor_beam(tmp_path, photos):
    """Packing files into tars needs neither (it used to import torch: 745 MB to pack 8 files)."""
    from tests.shards import encode

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/a.png").write_bytes(encode(photos[0]))
    code = ("import sys; from jobs.__main__ import main; "
            f"assert main(['shard', '--input', {str(tmp_path / 'imgs')!r}, '--output', {str(tmp_path / 's/p')!r}]) == 0; "
            "print(sorted(m for m in ('torch', 'apache_beam', 'distributed') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]" and (tmp_path / "s/p-00000.tar").exists()


def test_shard_job_packs_dev_images(tmp_path, dev_dir):
    sub = tmp_path / "imgs"
    sub.mkdir()
    names = sorted(p.name for p in dev_dir.glob("*.JPEG"))[:5]
    for n in names:
        (sub / n).write_bytes((dev_dir / n).read_bytes())
    assert main(["shard", "--input", str(sub), "--output", str(tmp_path / "s/dev"), "--per-shard", "2",
                 "--labels", str(dev_dir / "labels.csv")]) == 0
    shards = sorted((tmp_path / "s").glob("dev-*.tar"))
    assert [s.name for s in shards] == ["dev-00000.tar", "dev-00001.tar", "dev-00002.tar"]
    with tarfile.open(shards[0]) as tf:
        got = tf.getnames()
        first = names[0].rsplit(".", 1)[0]
        assert got[:3] == [f"{first}.jpeg", f"{first}.cls", f"{first}.json"]
        assert tf.extractfile(f"{first}.jpeg").read() == (dev_dir / names[0]).read_bytes()
        assert tf.extractfile(f"{first}.cls").read() == b"0"  # tench


def test_a_repack_with_fewer_shards_removes_the_earlier_packs_extra_shards(tmp_path, photos, caplog):
    """A glob over the prefix used to read the stale shards too: the same images counted twice."""
    from tests.shards import encode

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(encode(photos[i % len(photos)]))
    prefix = tmp_path / "s[1]" / "p"  # glob characters in the folder name
    other = tmp_path / "s[1]" / "p-notes.tar"
    assert main(["shard", "--input", str(tmp_path / "imgs"), "--output", str(prefix), "--per-shard", "1"]) == 0
    other.write_bytes(b"not ours")
    assert main(["shard", "--input", str(tmp_path / "imgs"), "--output", str(prefix), "--per-shard", "3"]) == 0
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["p-00000.tar", "p-00001.tar", "p-notes.tar"]
    assert "removed 2 shard(s) left under" in caplog.text and "p-00002.tar, p-00003.tar" in caplog.text


def test_attack_job_writes_a_reusable_adversarial_set(tmp_path, photos):
    write_tar(tmp_path / "a.tar", good_members(photos)[:5])
    out = tmp_path / "adv"
    code = main(["attack", "--input", str(tmp_path / "a.tar"), "--output", str(out), "--attack", "fgsm:eps=8/255",
                 "--model", "tests.tiny:build", "--batch-size", "2", "--runner", "FnApiRunner"])
    assert code == 0 and (out / "_SUCCESS").exists()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["clean", "fgsm-eps=8_255"]
    shard = out / "shards/fgsm-eps=8_255/shard-00000.tar"
    with tarfile.open(shard) as tf:
        names = tf.getnames()
        assert names == ["good_jpg.png", "good_jpg.cls", "good_jpg.json", "good_png.png", "good_png.cls", "good_png.json"]
        from transforms.jpeg import decode_rgb

        adv = decode_rgb(tf.extractfile("good_jpg.png").read())
    # Re-read as input: labels and keys carried over, pixels not resized again.
    again = tmp_path / "again"
    assert main(["evaluate", "--input", str(shard), "--output", str(again), "--model", "tests.tiny:build",
                 "--runner", "FnApiRunner"]) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(sorted((again / "metadata").glob("*.parquet"))).to_pylist()
    assert sorted((r["key"], r["label"]) for r in rows) == [("good_jpg", 1), ("good_png", 2)]
    with tarfile.open(again / "shards/clean/none/shard-00000.tar") as tf:
        assert np.array_equal(decode_rgb(tf.extractfile("good_jpg.png").read()), adv)


@pytest.mark.parametrize("flags, message", [(["--defense", "jpeg"], "losslessly"),
                                           (["--save-maps"], "classifier); --save-maps is for evaluate"),
                                           (["--map-precision", "bf16"], "classifier); --map-precision is for"),
                                           (["--map-precision", "fp32"], None),
                                           (["--map-compile"], "classifier); --map-compile is for"),
                                           (["--map-model", "tests.tiny:build"], "classifier); --map-model is for"),
                                           (["--map-weights", "w.pt", "--save-maps"],
                                            "classifier); --save-maps, --map-weights are for evaluate and defend")])
def test_attack_job_rejects_defenses_and_maps(tmp_path, capsys, flags, message):
    write_tar(tmp_path / "a.tar", [("k.png", b"x")])
    code = main(["attack", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "o"),
                 "--attack", "fgsm", *flags])
    err = capsys.readouterr().err
    if message is None:  # the map options' own defaults are not refused
        assert "no saliency maps" not in err and "losslessly" not in err
        return
    assert code == 2 and message in err and not (tmp_path / "o").exists()



def test_memory_format_reaches_the_run_and_a_bad_one_is_refused(tmp_path, capsys, photos):
    import json

    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    common = ["--input", str(tmp_path / "a.tar"), "--model", "tests.tiny:build", "--runner", "FnApiRunner"]
    assert main(["evaluate", *common, "--output", str(tmp_path / "o"), "--memory-format", "contiguous"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["config"]["memory_format"] == "contiguous"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", *common, "--output", str(tmp_path / "p"), "--memory-format", "nhwc"])
    assert e.value.code == 2 and "invalid choice: 'nhwc'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def one_error_line(capsys, job: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"semjpeg {job}: error:"), err
    return err[0]


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_a_location_without_its_fsspec_package_is_one_line(tmp_path, capsys, photos):
    """Outputs (and the report's run and history, the nightly config) on s3:// without s3fs
    were an ImportError traceback with status 1; inputs already said it in one line."""
    from tests.shards import encode

    write_tar(tmp_path / "a.tar", good_members(photos)[:1])
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/a.png").write_bytes(encode(photos[0]))
    html = str(tmp_path / "r.html")
    for job, args, url in [
        ("defend", ["--input", str(tmp_path / "a.tar"), "--output", "s3://b/out", "--model", "tests.tiny:build",
                    "--runner", "FnApiRunner"], "s3://b/out"),
        ("shard", ["--input", str(tmp_path / "imgs"), "--output", "s3://b/p"], "s3://b/p-00000.tar"),
        ("report", ["--run", str(tmp_path), "--output", "s3://b/r.html"], "s3://b/r.html"),
        ("report", ["--run", "s3://b/run", "--output", html], "s3://b/run"),
        ("nightly", ["--config", "s3://b/nightly.yaml"], "s3://b/nightly.yaml"),
    ]:
        assert main([job, *args]) == 2, (job, args)
        assert f"{url}" in (err := one_error_line(capsys, job)) and "s3fs" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "imgs"]


def test_the_working_folder_is_never_an_output(tmp_path, capsys, monkeypatch):
    write_tar(tmp_path / "a.tar", [("k.png", b"x")])
    work = tmp_path / "emptycwd"
    work.mkdir()
    monkeypatch.chdir(work)
    for output in (".", "..", str(work)):
        code = main(["defend", "--input", "../a.tar", "--output", output, "--defense", "jpeg:quality=50",
                     "--model", "tests.tiny:build", "--runner", "FnApiRunner"])
        assert code == 2 and "current folder or one of its parents" in one_error_line(capsys, "defend")
    assert work.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "emptycwd"]


def test_a_rerun_never_removes_its_own_input(tmp_path, capsys, photos):
    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    out = tmp_path / "adv"
    tiny = ["--model", "tests.tiny:build", "--runner", "FnApiRunner"]
    assert main(["attack", "--input", str(tmp_path / "a.tar"), "--output", str(out), "--attack", "fgsm", *tiny]) == 0
    capsys.readouterr()
    adv = out / "shards/fgsm/shard-00000.tar"
    code = main(["defend", "--input", str(out / "shards/fgsm/*.tar"), "--output", str(out), *tiny])
    assert code == 2 and f"output {out} holds the input {adv}" in one_error_line(capsys, "defend")
    assert adv.exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "cannot read the weights {w}: FileNotFoundError"),
    ("garbage", "the weights {w} are not a torch state dict (torch.load: only state dicts are loaded"),
    ("other model's", "cannot build model 'tests.tiny:build' with the weights {w}: RuntimeError: Error(s) in loading"),
    ("factory signature", "cannot build model 'tests.tiny:takes_no_weights': TypeError: takes_no_weights() takes 0"),
    ("map model without CAM", "map model 'tests.tiny:build_without_cam' draws no saliency maps"),
])
def test_a_model_that_cannot_load_is_one_line_before_any_work(tmp_path, capsys, photos, case, message):
    """Checked once in the job, before the pipeline: these used to fail in every worker with a
    traceback of 170 to 200 lines and exit 1."""
    import torch

    write_tar(tmp_path / "a.tar", good_members(photos)[:1])
    w = tmp_path / "w.pt"
    model = ["--model", "tests.tiny:build", "--weights", str(w)]
    if case == "garbage":
        w.write_bytes(b"not a checkpoint\n")
    elif case == "other model's":
        torch.save({"fc.weight": torch.zeros(3, 3)}, w)
    elif case == "factory signature":
        model = ["--model", "tests.tiny:takes_no_weights"]
    elif case == "map model without CAM":
        model = ["--model", "tests.tiny:build", "--map-model", "tests.tiny:build_without_cam"]
    code = main(["evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "out"), *model,
                 "--defense", "aug_msroi", "--runner", "FnApiRunner"])
    assert code == 2 and message.format(w=w) in one_error_line(capsys, "evaluate")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.staging-*"))


def test_a_map_model_without_weights_names_map_weights(tmp_path, capsys):
    """The map model's weights are --map-weights: the line said --weights, which sets the
    classifier's (and loaded into it, fails on another model's keys)."""
    write_tar(tmp_path / "a.tar", [("k.png", b"x")])
    code = main(["evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "out"),
                 "--model", "tests.tiny:build", "--map-model", "resnet18", "--defense", "aug_msroi"])
    assert code == 2 and "model 'resnet18' needs --map-weights (a state-dict" in one_error_line(capsys, "evaluate")
    code = main(["evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "out"),
                 "--model", "resnet18"])
    assert code == 2 and "model 'resnet18' needs --weights (a state-dict" in one_error_line(capsys, "evaluate")
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]


@pytest.mark.parametrize("runner", ["FnApiRunner", "fnapirunner", "Direct"])
def test_a_cuda_device_this_machine_lacks_is_one_line_before_any_work(tmp_path, capsys, photos, runner):
    """Beam takes its runners' names in any case and without "Runner"; so does this check."""
    import torch

    write_tar(tmp_path / "a.tar", good_members(photos)[:1])
    device = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"  # one past the last
    code = main(["evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "out"),
                 "--device", device, "--model", "tests.tiny:build", "--runner", runner])
    assert code == 2 and f"--device {device}: this machine has" in one_error_line(capsys, "evaluate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]


def test_a_run_id_with_a_slash_is_refused_before_anything_is_written(tmp_path, capsys):
    write_tar(tmp_path / "a.tar", [("k.png", b"x")])
    code = main(["evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "out"),
                 "--run-id", "x/y", "--model", "tests.tiny:build"])
    assert code == 2 and "run id must be" in one_error_line(capsys, "evaluate")
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]


def test_outputs_under_a_plain_file_are_one_clear_line(tmp_path, capsys, photos):
    from tests.shards import encode

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/a.png").write_bytes(encode(photos[0]))
    (tmp_path / "afile").write_text("not a folder")
    assert main(["shard", "--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "afile/p")]) == 2
    assert "a file stands where a parent folder should be" in one_error_line(capsys, "shard")
    (tmp_path / "run").mkdir()  # the output is checked once the run is known to be one
    (tmp_path / "run/summary.json").write_text("{}")
    assert main(["report", "--run", str(tmp_path / "run"), "--output", str(tmp_path / "afile/r.html")]) == 2
    assert "a file stands where a parent folder should be" in one_error_line(capsys, "report")


@pytest.mark.parametrize("job, extra", [("evaluate", ["--attack", "fgsm"]), ("attack", ["--attack", "fgsm"]),
                                        ("defend", [])])
def test_a_run_that_processed_nothing_exits_4_with_its_outputs(tmp_path, capsys, job, extra):
    write_tar(tmp_path / "a.tar", [("k1.jpg", b"not an image"), ("k2.png", b"")])
    out = tmp_path / "out"
    code = main([job, "--input", str(tmp_path / "a.tar"), "--output", str(out), *extra,
                 "--model", "tests.tiny:build", "--runner", "FnApiRunner"])
    err = one_error_line(capsys, job)
    assert code == 4 and err.endswith(f"no input was processed: 2 errors (see {out}/errors)")
    assert (out / "_SUCCESS").exists() and list((out / "errors").glob("*.parquet"))


def test_a_run_over_inputs_without_images_says_so(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "empty.parquet")
    code = main(["defend", "--input", str(tmp_path / "empty.parquet"), "--output", str(tmp_path / "out"),
                 "--defense", "jpeg:quality=50", "--model", "tests.tiny:build", "--runner", "FnApiRunner"])
    err = one_error_line(capsys, "defend")
    assert code == 4 and err.endswith("no input was processed: the inputs hold no images (no samples, no errors)")


def test_bad_beam_option_values_are_one_line_not_beams_usage(tmp_path):
    write_tar(tmp_path / "a.tar", [("k.png", b"x")])
    r = run_cli("evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "out"),
                "--model", "tests.tiny:build", "--direct_num_workers", "abc", "--no_such_flag", "1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "semjpeg evaluate: error: bad pipeline option: argument --direct_num_workers: invalid int value: 'abc'"]


@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_while_the_dask_workers_start_is_a_clean_stop(tmp_path, photos, sig, code, word):
    """Ctrl-C reaches the whole process group, the Dask workers' fork server too, which was
    still importing in a job's first seconds: it died, and the job waited for workers that never
    came and ended in tracebacks. Now: 130 and one line, soon. The same for SIGTERM sent to the
    group (``timeout``, ``kill -- -PGID``; systemd signals the whole cgroup): the server died of
    it, and the nannies logged a traceback for every worker they could no longer start. Sent as
    the job itself imported torch and Beam, the signal also raised its exception where that did
    harm (pipeline.signals._unsafe): as the main thread held Python's import lock (the cluster's
    event loop then waited for it forever, and the job with it: about one run in 30), or in
    code built from a string (``python -m`` then died of SIGINT after its line: one in 15)."""
    import os
    import signal
    import time

    write_tar(tmp_path / "a.tar", good_members(photos))
    p = subprocess.Popen([sys.executable, "-m", "jobs", "defend", "--input", str(tmp_path / "a.tar"),
                          "--output", str(tmp_path / "out"), "--defense", "jpeg", "--model", "tests.tiny:build",
                          "--runner", "DaskRunner", "--dask_workers", "2", "--dask_wait_timeout", "60"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # The signal as soon as the fork server exists, while it and the job import torch and Beam.
        # (A fixed sleep of 1.5 s sent it before the server started whenever the machine was busy.)
        deadline = time.monotonic() + 120
        while not _forkserver_in_group(p.pid) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.poll() is None and _forkserver_in_group(p.pid), "no fork server started"
        os.killpg(p.pid, getattr(signal, sig))
        # A hang guard shorter than --dask_wait_timeout: waiting for workers that never come (the
        # bug) fails the test.
        _, err = p.communicate(timeout=50)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code and err.strip().splitlines() == [f"semjpeg defend: {word}; the previous output is untouched"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.tar"]


def _forkserver_in_group(pgid: int) -> bool:
    """Whether a multiprocessing fork server runs in process group ``pgid`` (Linux's /proc)."""
    import os

    if not os.path.isdir("/proc/self"):
        pytest.skip("finds the Dask workers' fork server through Linux's /proc")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                group = int(f.read().rsplit(")", 1)[1].split()[2])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                forkserver = b"multiprocessing.forkserver" in f.read()
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if group == pgid and forkserver:
            return True
    return False


def test_unknown_runner_lists_the_valid_ones_before_any_output(tmp_path, capsys):
    write_tar(tmp_path / "a.tar", [("k.png", b"x")])
    code = main(["evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "out"),
                 "--model", "tests.tiny:build", "--runner", "NoSuchRunner"])
    err = one_error_line(capsys, "evaluate")
    assert code == 2 and "unknown runner 'NoSuchRunner'; valid: " in err and "DaskRunner" in err
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]


@pytest.mark.parametrize("sig, code, word, runner, launcher", [
    ("SIGTERM", 143, "terminated", ["FnApiRunner"], False),
    ("SIGINT", 130, "interrupted", ["FnApiRunner"], False),
    ("SIGINT", 130, "interrupted", ["DaskRunner", "--dask_workers", "2"], False),
    # Its threads were left running torch: the interpreter's teardown ended it by SIGABRT (134).
    ("SIGTERM", 143, "terminated", ["DirectRunner", "--direct_running_mode", "multi_threading",
                                    "--direct_num_workers", "2"], False),
    ("SIGTERM", 143, "terminated", ["FnApiRunner"], True),  # a cancelled Flex Template launch
    ("SIGTERM", 143, "terminated", ["DirectRunner", "--direct_running_mode", "multi_threading",
                                    "--direct_num_workers", "2"], True),
])
def test_a_signal_mid_run_stops_cleanly_with_one_line(tmp_path, photos, sig, code, word, runner, launcher):
    """kill/timeout/systemd (SIGTERM) and Ctrl-C (SIGINT) during the pipeline, sent to the whole
    process group as a terminal does (Dask workers included): the staging folder is removed, the
    previous output is untouched, one line and 128 + the signal's number. The Flex Template's
    launcher ran the job without the command's signal handling: a traceback, status 1."""
    import os
    import shlex
    import signal
    import time

    write_tar(tmp_path / "a.tar", good_members(photos) * 30)  # 120 images x a slow attack
    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_text("earlier-run\n")
    (out / "summary.json").write_text("{}")  # a finished earlier run
    # The threads' case needs the real model: the tiny one's threads are rarely inside torch's C++.
    model = [] if "multi_threading" in runner else ["--model", "tests.tiny:build", "--resize", "72", "--crop", "64"]
    args = ["--input", str(tmp_path / "a.tar"), "--output", str(out), "--attack", "igsm:eps=8/255,steps=2000",
            "--defense", "jpeg", *model, "--batch-size", "2", "--runner", *runner]
    command = ([str(ROOT / "deploy/flex-template/launch.py"), "--job=evaluate", f"--args={shlex.join(args)}"]
               if launcher else ["-m", "jobs", "evaluate", *args])
    p = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.staging-*")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert p.poll() is None, p.communicate()[1]
        # inside the pipeline's stages (the threads' case: attacking, past the model's loading)
        time.sleep(1.0 if runner == ["FnApiRunner"] else 6.0 if "multi_threading" in runner else 3.0)
        os.killpg(p.pid, getattr(signal, sig))
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code, err
    assert err.strip().splitlines() == [f"semjpeg evaluate: {word}; the previous output is untouched"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.tar", "out"]
    assert sorted(x.name for x in out.iterdir()) == ["_SUCCESS", "summary.json"]


def test_the_demo_photos_folder_keeps_the_photos_only(tmp_path):
    """The folder is the demo's input, and folders are read with their subfolders: a folder put
    there (or a link to one) made its images demo inputs."""
    import os

    from jobs.demo import PHOTOS, write_photos

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/x.png").write_bytes(b"x")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "sub").mkdir()
    (photos / "sub/x.png").write_bytes(b"x")
    os.symlink(tmp_path / "sub", photos / "linked", target_is_directory=True)
    (photos / "stray.png").write_bytes(b"x")
    assert write_photos(str(photos)) == len(PHOTOS)
    assert sorted(p.name for p in photos.iterdir()) == sorted(PHOTOS)
    assert (tmp_path / "sub/x.png").exists()  # a link's target is not the demo's


@pytest.mark.parametrize("runner_options, cli, started, passed", [
    # The config's count: one worker, not one per core.
    ({"dask_workers": 1}, ["--runner", "DaskRunner"], [1], ["--runner", "DaskRunner", "--dask_client_address", "tcp://local:1"]),
    # The config's cluster: none started here.
    ({"dask_client_address": "tcp://h:1"}, ["--runner", "DaskRunner"], [], ["--runner", "DaskRunner"]),
    # The config's runner, started early like the command line's, the count added.
    ({}, [], [3], ["--dask_workers", "3", "--dask_client_address", "tcp://local:1"]),
    # The command line's runner wins: no cluster.
    ({"dask_workers": 1}, ["--runner", "FnApiRunner"], [], ["--runner", "FnApiRunner"]),
])
def test_nightly_early_dask_cluster_follows_the_configs_runner_options(tmp_path, monkeypatch, runner_options, cli,
                                                                        started, passed):
    """The early local cluster looked at the command line alone: a config's `dask_workers: 1`
    under `--runner DaskRunner` became a cluster of one worker per core (the added count came
    after the config's and won), and its `dask_client_address` a local cluster."""
    import yaml

    from pipeline import dask_cluster, nightly
    from tests.pipeline.test_nightly import config

    class Cluster:
        scheduler_address = "tcp://local:1"

    class Stop(Exception):
        pass

    def run_nightly(cfg, date, argv):  # the Beam flags the night would run with; no run
        argvs.append(argv)
        raise Stop()

    counts, argvs = [], []
    monkeypatch.setattr(dask_cluster, "default_worker_count", lambda: 3)
    monkeypatch.setattr(dask_cluster, "start_local_cluster", lambda n, wait: counts.append(n) or Cluster())
    monkeypatch.setattr(dask_cluster, "close_cluster", lambda cluster: None)
    monkeypatch.setattr(nightly, "run_nightly", run_nightly)
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, runner="DaskRunner", runner_options=runner_options)))
    with pytest.raises(Stop):
        main(["nightly", "--config", str(path), *cli])
    assert counts == started and argvs == [passed]


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_previous_output(tmp_path, photos):
    """A write that finds no room (a full disk, a quota, a file-size limit: `ulimit -f`, whose
    SIGXFSZ Python ignores, so the write fails with EFBIG) ended in the runner's traceback of
    dozens of lines; now one line naming the error, status 1, the staging folder removed."""
    import resource

    write_tar(tmp_path / "a.tar", good_members(photos))
    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_text("earlier-run\n")
    (out / "summary.json").write_text("{}")  # a finished earlier run

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    r = subprocess.run([sys.executable, "-m", "jobs", "evaluate", "--input", str(tmp_path / "a.tar"),
                        "--output", str(out), "--model", "tests.tiny:build", "--attack", "fgsm", "--defense", "none"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == ["semjpeg evaluate: error: a write failed: [Errno 27] File too large; "
                                             "the previous output is untouched"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.tar", "out"]
    assert sorted(x.name for x in out.iterdir()) == ["_SUCCESS", "summary.json"]


def test_nothing_processed_counts_its_errors_in_words():
    from jobs.common import nothing_processed

    assert nothing_processed({"samples": 0, "errors": {"decode": 1}}, "o/") == (
        "no input was processed: 1 error (see o/errors)")
    assert nothing_processed({"samples": 0, "errors": {"decode": 1, "read": 2}}, "o") == (
        "no input was processed: 3 errors (see o/errors)")
    assert nothing_processed({"samples": 1, "errors": {"decode": 1}}, "o") is None


def test_a_template_launch_only_submits(tmp_path, capsys, photos):
    """Under a Flex Template launch (``--template_location``) the job starts once the launcher
    has exited: the launcher neither waits nor reads a summary (it read none yet, or an earlier
    run's). The FnApiRunner ignores the option and runs the job in place."""
    write_tar(tmp_path / "a.tar", good_members(photos)[:2])
    out = tmp_path / "o"
    code = main(["defend", "--input", str(tmp_path / "a.tar"), "--output", str(out), "--defense", "jpeg",
                 "--model", "tests.tiny:build", "--runner", "FnApiRunner", f"--template_location={tmp_path / 'job'}"])
    printed = capsys.readouterr().out
    assert code == 0 and printed.strip() == f"submitted: the job writes {out} when it runs"
    assert (out / "_SUCCESS").exists()


def test_an_interrupt_that_an_import_swallowed_stops_the_job_at_the_next_checkpoint():
    """A Ctrl-C or SIGTERM landing in a library's ``try: import ... except: pass`` while a job
    imported torch and Beam was lost: the job ran to its end, status 0. The command's handlers
    record what they raised, and the evaluate pipeline checks before it runs."""
    import os
    import signal

    from pipeline.signals import Terminated, check_interrupted, stop_tracking, track_interrupts

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        track_interrupts()
        check_interrupted()  # nothing received: nothing raised
        for sig, raised in ((signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)):
            try:
                os.kill(os.getpid(), sig)  # the handler runs in this thread, before kill returns
            except BaseException:  # a bare except, as some libraries' import guards have
                pass
            with pytest.raises(raised):
                check_interrupted()
            check_interrupted()  # raised once
        # Once the command's job is over (or in a process that called main itself, such as this
        # one), a signal is not recorded: a later run in the process is not stopped by it.
        stop_tracking()
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass
        check_interrupted()
    finally:
        stop_tracking()
        for s, h in saved.items():
            signal.signal(s, h)
