"""deploy/: the files parse, and Beam's option parser accepts the documented options."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.nightly import NightlyConfig
from pipeline.runners import pipeline_options

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    lines, cur = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cur = f"{cur} {line[:-1]}" if line.endswith("\\") else f"{cur} {line}"
        if not line.endswith("\\"):
            word, _, rest = cur.strip().partition(" ")
            lines.append((word.upper(), rest))
            cur = ""
    return lines


@pytest.mark.parametrize("name", ["Dockerfile", "flex-template/Dockerfile"])
def test_dockerfiles_parse(name):
    ins = dockerfile_instructions(DEPLOY / name)
    known = {"FROM", "ARG", "RUN", "COPY", "ENV", "WORKDIR", "ENTRYPOINT", "CMD", "LABEL", "USER", "ADD"}
    assert {w for w, _ in ins} <= known
    assert ins[0][0] in ("FROM", "ARG") and any(w == "FROM" for w, _ in ins)
    for word, rest in ins:
        if word == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (DEPLOY.parent / src).exists(), f"{name} copies missing {src}"
    if name == "Dockerfile":
        assert ("ENTRYPOINT", '["/opt/apache/beam/boot"]') in ins
        # The weights check (and the workers) run outside the copied sources, which would shadow
        # the installed package: what is checked is what pip installed.
        copied_to = next(rest for word, rest in ins if word == "WORKDIR")
        check = next(i for i, (word, rest) in enumerate(ins) if word == "RUN" and "build_model" in rest)
        workdir = [rest for word, rest in ins[:check] if word == "WORKDIR"][-1]
        assert workdir != copied_to and not workdir.startswith(copied_to.rstrip("/") + "/")
        assert [rest for word, rest in ins if word == "WORKDIR"][-1] == workdir


def _pinned(name: str, package: str) -> str | None:
    """The version of ``package`` a Dockerfile's pip installs pin (ARGs resolved), or None."""
    ins = dockerfile_instructions(DEPLOY / name)
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    for word, rest in ins:
        if word == "RUN" and "pip install" in rest:
            m = re.search(rf'"?{re.escape(package)}(?:\[[^\]]*\])?==([^"\s]+)', rest)
            if m:
                return re.sub(r"\$\{(\w+)\}", lambda v: args[v.group(1)], m.group(1))
    return None


def test_the_launcher_and_the_worker_image_install_the_same_beam_and_torch():
    """A job is submitted with the launcher's Beam and runs in the worker image's: Dataflow needs
    them equal (and pipeline/runners.py patches one Beam version's Dask runner). The launcher
    took whatever Beam and torchvision were newest when it was built (a torchvision for a newer
    torch replaces the CPU torch)."""
    for package in ("apache-beam", "torch", "torchvision"):
        worker, launcher = _pinned("Dockerfile", package), _pinned("flex-template/Dockerfile", package)
        assert worker and worker == launcher, (package, worker, launcher)


def _launcher():
    spec = importlib.util.spec_from_file_location("flex_launch", DEPLOY / "flex-template/launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flex_template_metadata_and_launcher():
    meta = json.loads((DEPLOY / "flex-template/metadata.json").read_text())
    assert meta["name"] and {p["name"] for p in meta["parameters"]} == {"job", "config", "date", "args"}
    job = next(p for p in meta["parameters"] if p["name"] == "job")
    for p in meta["parameters"]:
        for rx in p.get("regexes", []):
            re.compile(rx)
    # Every job the template offers is one the launcher runs.
    offered = [j for j in _launcher().JOBS if re.fullmatch(job["regexes"][0], j)]
    assert offered == list(_launcher().JOBS)


@pytest.mark.parametrize("params, expected", [
    (["--config=gs://b/n.yaml"], ["nightly", "--config=gs://b/n.yaml"]),
    (["--job=nightly", "--config=gs://b/n.yaml", "--date=2026-11-27", "--region=us-central1"],
     ["nightly", "--config=gs://b/n.yaml", "--date=2026-11-27", "--region=us-central1"]),
    (["--job=defend", "--args=--input 'gs://b/in/*.tar' --output gs://b/out --defense aug_msroi:q_low=20",
      "--project=p"],
     ["defend", "--input", "gs://b/in/*.tar", "--output", "gs://b/out", "--defense", "aug_msroi:q_low=20",
      "--project=p"]),
])
def test_flex_template_launcher_command_lines(params, expected):
    from jobs.__main__ import build_parser

    argv = _launcher().job_argv(params)
    assert argv == expected
    parser, _ = build_parser()
    args, beam_argv = parser.parse_known_args(argv)  # the CLI accepts what the launcher builds
    assert args.job == expected[0]
    assert pipeline_options(beam_argv).get_all_options()["project"] in (None, "p")


@pytest.mark.parametrize("params, message", [
    (["--job=evaluate", "--config=gs://b/n.yaml"], "nightly job's parameters"),
    (["--job=defend"], "needs args"),
    (["--job=nightly"], "needs the config"),
    (["--config=c", "--args=--input x"], "not args"),
    (["--job=shard", "--args=--input x"], "unknown job"),
    (["--config=a", "--config=b"], "given twice"),
])
def test_flex_template_launcher_refuses_parameters_that_do_not_fit(params, message):
    with pytest.raises(ValueError, match=message):
        _launcher().job_argv(params)


def test_flex_template_launch_passes_its_template_location_to_the_job():
    """Dataflow runs the launcher with ``--template_location`` and starts the job from the graph
    Beam writes there once the launcher has exited: the job's options must carry it (the jobs then
    only submit: tests/pipeline/test_nightly.py, a launch's night)."""
    from pipeline.evaluate import submit_only

    argv = _launcher().job_argv(["--config=gs://b/n.yaml", "--region=us-central1",
                                 "--template_location=gs://b/staging/template_launches/1/job_object"])
    assert argv[-1] == "--template_location=gs://b/staging/template_launches/1/job_object"
    assert submit_only(pipeline_options(argv[2:])) and not submit_only(pipeline_options(argv[2:-1]))


# `gcloud dataflow flex-template build`'s flags (gcloud reference): there is no --dockerfile.
GCLOUD_FLEX_BUILD_FLAGS = {
    "--sdk-language", "--image", "--env", "--flex-template-base-image", "--image-gcr-path", "--go-binary-path",
    "--jar", "--py-path", "--yaml-pipeline-path", "--yaml-image", "--additional-experiments",
    "--additional-user-labels", "--cloud-build-service-account", "--dataflow-kms-key", "--disable-public-ips",
    "--enable-streaming-engine", "--gcs-log-dir", "--image-repository-cert-path",
    "--image-repository-password-secret-id", "--image-repository-username-secret-id", "--max-workers",
    "--metadata-file", "--network", "--num-workers", "--print-only", "--service-account-email",
    "--staging-location", "--subnetwork", "--temp-location", "--worker-machine-type", "--worker-region",
    "--worker-zone", "--project",
}


def test_flex_template_build_commands_use_flags_gcloud_has():
    """The launcher Dockerfile's build instructions: gcloud refused --dockerfile, and its
    --image-gcr-path form needs --py-path and --env and builds its own image from a base image
    (which would not hold the package): the image is built with docker and given as --image."""
    text = (DEPLOY / "flex-template/Dockerfile").read_text()
    comment = " ".join(l.lstrip("# ").rstrip("\\ ") for l in text.splitlines() if l.startswith("#"))
    build = comment[comment.index("gcloud dataflow flex-template build"):].split(".json", 1)[1]
    build = build.split("(", 1)[0]
    flags = set(re.findall(r"(?<!\S)(--[a-z-]+)", build))
    assert flags <= GCLOUD_FLEX_BUILD_FLAGS, flags - GCLOUD_FLEX_BUILD_FLAGS
    assert "--image" in flags and "--metadata-file" in flags
    image = re.search(r"--image[ =](\S+)", build).group(1)
    assert f"docker build -f deploy/flex-template/Dockerfile -t {image} ." in comment
    assert f"docker push {image}" in comment


def test_crontab_reports_a_non_zero_status():
    """cron ignores exit statuses and mails only what a job prints; the example sent everything
    to its log, so a regression (status 3) went unnoticed. A failed night prints one line."""
    import subprocess

    text = (DEPLOY / "scheduling/crontab").read_text()
    assert re.search(r"^MAILTO=\S+", text, re.M)
    (line,) = [l for l in text.splitlines() if l and not l.startswith("#") and "semjpeg nightly" in l]
    job, redirect = line.split(None, 5)[5].split(" >> ", 1)
    assert "semjpeg nightly" in job
    log = redirect.split()[0]
    for status, printed in ((3, True), (0, False)):  # the nightly job stands in as (exit N)
        run = subprocess.run(["sh", "-c", f"(exit {status}) >> " + redirect.replace(log, "/dev/null", 1)],
                             capture_output=True, text=True)
        assert (f"status {status}" in run.stdout) == printed and bool(run.stdout) == printed


def test_gpu_options_accepted_by_beam():
    argv = [l.strip() for l in (DEPLOY / "dataflow-gpu.args").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    opts = pipeline_options(argv).get_all_options()
    assert opts["dataflow_service_options"] == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    assert opts["experiments"] == ["no_use_multiple_sdk_containers"] and opts["machine_type"] == "g2-standard-8"
    with pytest.raises(ValueError, match="unrecognized"):
        pipeline_options(argv + ["--worker_acelerator=x"])


def test_example_nightly_config_validates():
    cfg = NightlyConfig.from_yaml((DEPLOY / "nightly.example.yaml").read_text(), "nightly.example.yaml")
    argv = cfg.beam_argv()
    assert argv[:2] == ["--runner", "DataflowRunner"] and "--sdk_container_image" in argv


def test_scheduling_examples_parse():
    ast.parse((DEPLOY / "scheduling/airflow_dag.py").read_text())
    body = (DEPLOY / "scheduling/cloud-scheduler.sh").read_text()
    payload = re.search(r"--message-body=\"(.*)\"$", body, re.M).group(1).replace('\\"', '"')
    payload = payload.replace("$TEMPLATE", "gs://t").replace("$CONFIG", "gs://c")
    assert json.loads(payload)["launchParameter"]["parameters"]["job"] == "nightly"
    crons = [l for l in (DEPLOY / "scheduling/crontab").read_text().splitlines()
             if l and not l.startswith("#") and not re.match(r"[A-Z_]+=", l)]  # not MAILTO=...
    assert crons and all(len(l.split()) > 5 and "semjpeg nightly" in l for l in crons)
    assert yaml.safe_load((DEPLOY / "nightly.example.yaml").read_text())["runner"] == "DataflowRunner"


ROOT = DEPLOY.parent


def _setup_kwargs(monkeypatch) -> dict:
    """setup.py's arguments, as setuptools would get them (run from the project's folder)."""
    import runpy

    import setuptools

    got = {}
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    runpy.run_path(str(ROOT / "setup.py"))
    return got


def _requirement_closure(requirements: list[str]) -> set[str]:
    """Distributions a plain ``pip install`` of ``requirements`` brings (those installed here),
    extras named in a requirement followed, other extras not."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            deps = requires(req.name) or []
        except PackageNotFoundError:
            continue
        for text in deps:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(dep)
    return {name for name, _ in seen}


def test_a_plain_install_brings_every_package_the_code_imports(monkeypatch):
    """Every third-party module that transforms/, pipeline/ and jobs/ import (at the top or in a
    function) comes with ``pip install semjpeg``, extras aside: pipeline.runners imports Beam's
    Dask runner (hence dask) for every job's options, and an install without it failed every
    pipeline job, the demo and the Flex Template launcher included, with ModuleNotFoundError.
    Test-only packages (pytest, ART, Foolbox) stay out of the code."""
    import sys
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    kw = _setup_kwargs(monkeypatch)
    plain = _requirement_closure(kw["install_requires"])
    own = {p.split(".")[0] for p in kw["packages"]}
    imported = {}
    for pkg in sorted(own):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    imported.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    dists = packages_distributions()
    missing = {}
    for module, where in imported.items():
        if module in own or module in sys.stdlib_module_names or module == "__future__":
            continue
        provided_by = {canonicalize_name(d) for d in dists.get(module, [])}
        assert provided_by, f"{module} (imported by {where}) is not installed here"
        if not provided_by & plain:
            missing[module] = where
    assert not missing, f"imported but not in setup.py's install_requires: {missing}"


def test_the_sdist_and_the_wheel_hold_the_package_and_nothing_else(tmp_path):
    """What ``--setup_file`` stages for Dataflow's workers (Beam runs ``setup.py sdist``) and what
    ``pip`` installs: every module and data file of the three packages, none of tests/, bench/
    or deploy/ (setuptools' default put the one test file at the top of tests/ in the sdist,
    which cannot run without the rest of the suite)."""
    import shutil
    import subprocess
    import sys
    import tarfile
    import zipfile

    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("transforms", "pipeline", "jobs", "tests", "bench", "deploy"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE", "NOTICE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    package = {str(p.relative_to(src)) for name in ("transforms", "pipeline", "jobs")
               for p in (src / name).rglob("*") if p.is_file()}
    assert {"transforms/imagenet_classes.txt", "transforms/imagenet_classes.LICENSE"} <= package
    run = dict(cwd=src, capture_output=True, text=True, timeout=120)
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], **run)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), "."], **run)
    assert r.returncode == 0, r.stderr[-2000:]
    (sdist,), (wheel,) = (tmp_path / "dist").glob("*.tar.gz"), (tmp_path / "dist").glob("*.whl")
    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n and tar.getmember(n).isfile()}
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n for n in names if ".dist-info/" not in n}
    assert package <= in_sdist and in_wheel == package
    assert {"setup.py", "pyproject.toml", "README.md", "LICENSE", "NOTICE"} <= in_sdist
    # The licence and the third-party notice travel with every install.
    assert {n.rsplit("/", 1)[1] for n in names if ".dist-info/licenses/" in n} >= {"LICENSE", "NOTICE"}
    assert not {n for n in in_sdist if n.split("/")[0] in ("tests", "bench", "deploy")}


def test_every_torch_the_requirements_admit_has_the_apis_the_models_call(monkeypatch):
    """transforms.models.PointwiseConv2d.forward, on every CPU batch of every model, calls
    ``torch.compiler.is_compiling()`` (not in torch 2.1 and 2.2: AttributeError) and
    ``torch.is_autocast_enabled("cpu")`` (a device argument since torch 2.4; before, a TypeError):
    ``torch>=2.1`` let pip keep a torch 2.1-2.3 that fails there. torchvision 0.19 is torch 2.4's."""
    from packaging.requirements import Requirement

    reqs = {r.name: r.specifier for r in map(Requirement, _setup_kwargs(monkeypatch)["install_requires"])}
    assert "2.4.0" in reqs["torch"] and "2.3.1" not in reqs["torch"]
    assert "0.19.0" in reqs["torchvision"] and "0.18.1" not in reqs["torchvision"]
