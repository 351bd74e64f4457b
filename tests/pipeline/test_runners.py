"""The same job on FnApiRunner and on DirectRunner with two worker processes; model loads."""
from __future__ import annotations

import contextlib
import gc
import os
import re
import weakref
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import model_handlers
from pipeline.evaluate import run_evaluate
from tests.pipeline.conftest import tiny_config
from tests.shards import good_members, write_tar

ROOT = Path(__file__).resolve().parents[2]


def rows(out):
    table = pq.read_table(sorted((out / "metadata").glob("*.parquet"))).drop_columns(["attack_seconds"])
    return sorted(table.to_pylist(), key=lambda r: (r["key"], r["attack_spec"], r["defense_spec"]))


def same(x, y) -> bool:
    """Equal, floats within 1e-4 relative (batch composition may differ between runners)."""
    if isinstance(x, float) and isinstance(y, float):
        return x == y or abs(x - y) <= 1e-4 * max(abs(x), abs(y), 1e-6)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    return x == y


def test_multiprocess_runner_matches_fnapi_and_loads_model_once_per_process(tmp_path, photos, monkeypatch):
    for i in range(3):
        write_tar(tmp_path / f"s{i}.tar", good_members(photos, prefix=f"s{i}"))
    inputs = [str(tmp_path / "s*.tar")]
    log = tmp_path / "loads.txt"
    monkeypatch.setenv("SEMJPEG_TEST_LOAD_LOG", str(log))
    # This process's shared models are weakly held: one an earlier test left in a cycle that the
    # collector has not freed yet would be reused here, and the run would load nothing.
    monkeypatch.setattr(model_handlers, "_SHARED", weakref.WeakValueDictionary())
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # worker processes import tests.tiny

    run_evaluate(tiny_config(inputs, tmp_path / "fn", run_id="r"), PipelineOptions(["--runner", "FnApiRunner"]))
    fn_loads = Counter(log.read_text().split())
    log.unlink()
    mp = PipelineOptions(["--runner", "DirectRunner", "--direct_num_workers", "2",
                          "--direct_running_mode", "multi_processing"])
    run_evaluate(tiny_config(inputs, tmp_path / "mp", run_id="r"), mp)
    mp_loads = Counter(log.read_text().split())

    # Two model stages (attack, classify) share one load per process, however many batches.
    assert list(fn_loads.values()) == [1]
    assert len(mp_loads) <= 2 and all(n == 1 for n in mp_loads.values())
    a, b = rows(tmp_path / "fn"), rows(tmp_path / "mp")
    assert len(a) == 3 * 7 * 4 and same(a, b)


def test_dask_runner_with_two_workers_matches_fnapi(tmp_path, photos, monkeypatch):
    """The jobs' path: the cluster starts before the pipeline is built (its address is passed on,
    the runner waits for the two workers) and is gone once the block ends."""
    from distributed import Client

    from pipeline.dask_cluster import early_local_cluster
    from pipeline.runners import pipeline_options

    for i in range(3):
        write_tar(tmp_path / f"s{i}.tar", good_members(photos, prefix=f"s{i}"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # Dask worker processes import tests.tiny
    inputs = [str(tmp_path / "s*.tar")]
    run_evaluate(tiny_config(inputs, tmp_path / "fn", run_id="r"), PipelineOptions(["--runner", "FnApiRunner"]))
    with early_local_cluster(["--runner", "DaskRunner", "--dask_workers", "2"]) as argv:
        address = argv[argv.index("--dask_client_address") + 1]
        summary = run_evaluate(tiny_config(inputs, tmp_path / "dask", run_id="r"), pipeline_options(argv))
        with Client(address, timeout=30) as client:
            parents = set(client.run(os.getppid).values())
            frozen = list(client.run(gc.get_freeze_count).values())
    # Both workers forked from one server that imported the pipeline once (not from this process),
    # and froze the collector's view of it (torch alone is over 100,000 objects).
    assert len(parents) == 1 and os.getpid() not in parents
    assert len(frozen) == 2 and min(frozen) > 100_000
    a, b = rows(tmp_path / "fn"), rows(tmp_path / "dask")
    assert len(a) == 3 * 7 * 4 and same(a, b)  # every last partial batch included
    assert summary["samples"] == 21 and (tmp_path / "dask" / "_SUCCESS").exists()
    shards = sorted(p.relative_to(tmp_path / "dask") for p in (tmp_path / "dask").rglob("*.tar"))
    assert shards == sorted(p.relative_to(tmp_path / "fn") for p in (tmp_path / "fn").rglob("*.tar"))
    with pytest.raises(OSError):
        Client(address, timeout=1)


@pytest.mark.parametrize("count", [["--dask_workers", "1"], []])
def test_dask_runner_starts_and_closes_its_own_cluster(tmp_path, photos, monkeypatch, count):
    """Without an address (the nightly job's runner options), the runner starts the cluster itself:
    ``--dask_workers`` single-threaded workers, one per CPU core without it (never Beam's default
    cluster), and its scratch space goes with it."""
    import tempfile

    import pipeline.runners as runners

    write_tar(tmp_path / "a.tar", good_members(photos))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(runners, "default_worker_count", lambda: 1)  # one core's worth
    started, start, counts = [], runners.start_local_cluster, []
    monkeypatch.setattr(runners, "start_local_cluster",
                        lambda n: counts.append(n) or started.append(start(n)) or started[-1])
    summary = run_evaluate(tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", run_id="r"),
                           runners.pipeline_options(["--runner", "DaskRunner", *count]))
    assert summary["samples"] == 7 and counts == [1] and started[0].status.name == "closed"
    assert not [p.name for p in scratch.iterdir() if p.name.startswith(("dask-scratch", "semjpeg-dask"))]


def test_a_local_cluster_starts_quietly_when_port_8787_is_taken():
    """The scheduler's HTTP server (health and metrics routes, no dashboard) took Dask's port
    8787 and printed a UserWarning on stderr when another cluster or `dask scheduler` had it."""
    import socket
    import warnings

    from pipeline.dask_cluster import close_cluster, start_local_cluster

    holder = socket.socket()
    with contextlib.suppress(OSError):  # or something else already holds it: as good
        holder.bind(("", 8787))
        holder.listen()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cluster = start_local_cluster(1, wait=False)
            close_cluster(cluster)
    finally:
        holder.close()
    assert not [str(w.message) for w in caught if "already in use" in str(w.message)]


def test_early_local_cluster_only_for_dask_runs_without_an_address(monkeypatch):
    from pipeline import dask_cluster
    from pipeline.dask_cluster import early_local_cluster

    for argv in (["--runner", "FnApiRunner"], ["--runner", "DataflowRunner", "--dask_workers", "2"],
                 ["--runner", "DaskRunner", "--dask_workers", "2", "--dask_client_address", "tcp://h:1"],
                 ["--runner", "DaskRunner", "--dask_workers", "0"]):
        with early_local_cluster(argv) as out:
            assert out == argv
    # No count: one worker per CPU core, started early like --dask_workers N, and the count passed
    # on so that the runner waits for them.
    monkeypatch.setattr(dask_cluster, "default_worker_count", lambda: 1)
    with early_local_cluster(["--runner=dask"]) as out:
        assert out[:3] == ["--runner=dask", "--dask_workers", "1"] and out[3] == "--dask_client_address"


def test_malformed_dask_workers_is_reported_once(capsys):
    """The early parse leaves a bad value to Beam's parsing (one line), printing nothing itself."""
    from pipeline.dask_cluster import early_local_cluster
    from pipeline.runners import pipeline_options

    argv = ["--runner", "DaskRunner", "--dask_workers", "abc"]
    with early_local_cluster(argv) as out:
        assert out == argv
        with pytest.raises(ValueError, match=r"^bad pipeline option: argument --dask_workers: invalid int value: 'abc'$"):
            pipeline_options(out)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flags, message", [
    (["--dask_workers", "0"], "argument --dask_workers: must be at least 1, got 0"),
    (["--dask_workers", "-1"], "argument --dask_workers: must be at least 1, got -1"),
    (["--dask_wait_timeout", "0"], "argument --dask_wait_timeout: must be a number of seconds > 0, got 0"),
    (["--dask_wait_timeout", "soon"], "argument --dask_wait_timeout: invalid number of seconds: 'soon'"),
    # Beam dropped these (Dask's default instead), or handed them to Dask's client, which failed
    # with a traceback once the scheduler had answered.
    (["--dask_connection_timeout", "0"], "argument --dask_connection_timeout: must be a whole number of seconds > 0, got 0"),
    (["--dask_connection_timeout", "-5"], "argument --dask_connection_timeout: must be a whole number of seconds > 0, got -5"),
    (["--dask_connection_timeout", "2.5"], "argument --dask_connection_timeout: must be a whole number of seconds > 0, got 2.5"),
])
def test_dask_counts_and_timeouts_are_checked_when_options_are_parsed(tmp_path, flags, message):
    from pipeline.nightly import NightlyConfig
    from pipeline.runners import pipeline_options
    from tests.pipeline.test_nightly import config

    with pytest.raises(ValueError, match=f"^bad pipeline option: {message}$"):
        pipeline_options(["--runner", "DaskRunner", *flags])
    # A nightly config fails when it is validated, not at night.
    options = {flags[0][2:]: int(flags[1]) if flags[1].lstrip("-").isdigit() else flags[1]}
    with pytest.raises(ValueError, match=f"nightly.yaml: runner_options: bad pipeline option: {message}"):
        NightlyConfig.from_dict(config(tmp_path, runner="DaskRunner", runner_options=options), "nightly.yaml")


def _silent_server():
    """A TCP server that accepts connections and never answers (an HTTP server waiting for a
    request line reads the same to Dask)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []

    def serve():
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=serve, daemon=True).start()
    return server, accepted


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("where", ["silent", "nothing"])
@pytest.mark.parametrize("count", [[], ["--dask_workers", "2"]])
def test_dask_scheduler_that_does_not_answer_is_a_one_line_error_before_any_output(tmp_path, photos, where, count):
    """Beam's client waited forever on a server that is not Dask's, and where nothing listens it
    ended in a long traceback (after --dask_wait_timeout with --dask_workers)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.runners import pipeline_options

    write_tar(tmp_path / "a.tar", good_members(photos))
    server, accepted = _silent_server() if where == "silent" else (None, [])
    port = server.getsockname()[1] if server else _free_port()
    address = f"tcp://127.0.0.1:{port}"
    options = pipeline_options(["--runner", "DaskRunner", f"--dask_client_address={address}",
                                "--dask_connection_timeout", "1", *count])
    config = tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", run_id="r")
    try:
        # A hang fails the test instead of hanging it, and so does Dask's default connect timeout
        # (30 s) used in place of the 1 s given: the job would take longer than this wait.
        pool = ThreadPoolExecutor(1)
        job = pool.submit(run_evaluate, config, options)
        pool.shutdown(wait=False)
        reason = "no Dask answer within 2 s" if server else "no connection within 1 s"
        with pytest.raises(ValueError, match=f"^cannot reach the Dask scheduler at {address}: {reason}"):
            job.result(timeout=30)
    finally:
        if server:
            server.close()
            for conn in accepted:
                conn.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]  # no staging folder, no output


@pytest.mark.parametrize("content, reason", [
    (None, "cannot read the Dask scheduler file {path}: .*No such file"),
    ('{"type": "Scheduler"}', "cannot read the Dask scheduler file {path}: it names no scheduler address"),
    ('{"address": "{address}"}', "cannot reach the Dask scheduler at {address}: no connection within 1 s"),
])
def test_a_dask_scheduler_file_that_leads_nowhere_is_a_one_line_error_before_any_output(tmp_path, photos, content,
                                                                                        reason):
    """Beam's --dask_scheduler_file: Dask's client waited forever for a file that was not there,
    and one naming a scheduler that is gone ended in a traceback."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.runners import pipeline_options

    write_tar(tmp_path / "a.tar", good_members(photos))
    path, address = tmp_path / "scheduler.json", f"tcp://127.0.0.1:{_free_port()}"
    if content is not None:
        path.write_text(content.replace("{address}", address))
    options = pipeline_options(["--runner", "DaskRunner", "--dask_scheduler_file", str(path),
                                "--dask_connection_timeout", "1"])
    pool = ThreadPoolExecutor(1)  # a hang fails the test instead of hanging it
    job = pool.submit(run_evaluate, tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", run_id="r"), options)
    pool.shutdown(wait=False)
    with pytest.raises(ValueError, match="^" + reason.format(path=re.escape(str(path)), address=address)):
        job.result(timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"] + (["scheduler.json"] if content else [])


def test_dask_cluster_with_too_few_workers_says_it_waits_then_gives_up(tmp_path, photos, monkeypatch, caplog):
    import logging

    from pipeline import dask_cluster
    from pipeline.runners import pipeline_options

    write_tar(tmp_path / "a.tar", good_members(photos))
    monkeypatch.setattr(dask_cluster, "WARN_AFTER", 1.0)
    with dask_cluster.start_local_cluster(1) as cluster:
        address = cluster.scheduler_address
        options = pipeline_options(["--runner", "DaskRunner", "--dask_client_address", address,
                                    "--dask_workers", "2", "--dask_wait_timeout", "2.5"])
        with caplog.at_level(logging.INFO, logger="pipeline.dask_cluster"):
            with pytest.raises(ValueError, match=f"^the Dask cluster at {address} has 1 of 2 workers after 2.5 s "
                                                 r"\(--dask_workers 2; --dask_wait_timeout to wait longer\)$"):
                run_evaluate(tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", run_id="r"), options)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pipeline.dask_cluster"]
    waiting = f"waiting for the Dask cluster at {address}: 1 of 2 workers"
    assert [level for level, m in said if m.startswith(waiting)] == ["INFO", "WARNING"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]



def test_dask_workers_that_keep_dying_end_the_job_with_one_line_status_1(tmp_path, photos, monkeypatch, capsys):
    """Dask retries a task whose worker died on three more workers, then raised KilledWorker:
    the job ended in a traceback."""
    from jobs.__main__ import main

    write_tar(tmp_path / "a.tar", good_members(photos))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    code = main(["evaluate", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "out"),
                 "--model", "tests.tiny:build_worker_killer", "--resize", "72", "--crop", "64", "--run-id", "r",
                 "--runner", "DaskRunner", "--dask_workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert re.fullmatch(r"semjpeg evaluate: error: Dask workers at tcp://127\.0\.0\.1:\d+ died running the pipeline: "
                        r"4 in a row died in the same task \(killed, or out of memory\?\); see the workers' logs; "
                        r"the previous output is untouched", err[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]  # no output, no staging folder


_CLUSTER_SCRIPT = """
import sys, time
from distributed import LocalCluster
if __name__ == "__main__":
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                           host="127.0.0.1", preload=sys.argv[1:])
    print(cluster.scheduler_address, flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def _cluster_process(tmp_path, *preload):
    """A LocalCluster of one worker process, in a process of its own (so that it can die)."""
    import subprocess
    import sys

    script = tmp_path / "cluster.py"
    script.write_text(_CLUSTER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), *preload], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:")
        yield proc, address
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_dask_scheduler_that_goes_away_mid_run_is_a_one_line_error(tmp_path, photos, monkeypatch):
    """Dask cancels the futures of a client that lost its scheduler, and Beam's wait returned as
    if the run had finished: the job then said that OUT/summary.json was missing (status 2) and
    left its staging folder behind."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.dask_cluster import DaskRunError
    from pipeline.runners import pipeline_options

    write_tar(tmp_path / "a.tar", good_members(photos))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    config = tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", run_id="r")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, name="tests.tiny:build_scheduler_killer"))
    with _cluster_process(tmp_path) as (proc, address):
        options = pipeline_options(["--runner", "DaskRunner", "--dask_client_address", address])
        pool = ThreadPoolExecutor(1)  # a hang fails the test instead of hanging it
        job = pool.submit(run_evaluate, config, options)
        pool.shutdown(wait=False)
        with pytest.raises(DaskRunError, match=f"^the Dask scheduler at {address} went away during the run "):
            job.result(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "cluster.py"]


def test_dask_workers_without_the_package_are_a_one_line_error_before_the_run(tmp_path, photos):
    """A worker that cannot unpickle a task closes itself: the run waited forever for workers."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.runners import pipeline_options

    write_tar(tmp_path / "a.tar", good_members(photos))
    block = tmp_path / "no_semjpeg.py"
    block.write_text("import sys\n"
                     "class Block:\n"
                     "    def find_spec(self, name, path=None, target=None):\n"
                     "        if name.partition('.')[0] in ('pipeline', 'transforms', 'tests'):\n"
                     "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
                     "sys.meta_path.insert(0, Block())\n")
    with _cluster_process(tmp_path, str(block)) as (proc, address):
        options = pipeline_options(["--runner", "DaskRunner", "--dask_client_address", address,
                                    "--dask_workers", "1"])
        pool = ThreadPoolExecutor(1)  # a hang fails the test instead of hanging it
        job = pool.submit(run_evaluate, tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", run_id="r"), options)
        pool.shutdown(wait=False)
        with pytest.raises(ValueError, match=f"^the Dask workers at {address} cannot import pipeline.runners "
                                             r"\(No module named 'pipeline'\): install semjpeg where they run$"):
            job.result(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "cluster.py", "no_semjpeg.py"]


def test_a_dask_cluster_left_without_workers_mid_run_gives_up_after_the_wait_timeout(monkeypatch):
    """Dask waits forever for workers to run the remaining tasks."""
    from distributed import Client, LocalCluster

    from pipeline import runners

    monkeypatch.setattr(runners, "POLL", 0.2)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        client = Client(cluster)
        beam_result = type("Result", (), {"client": client, "futures": [client.submit(sum, [1, 2])],
                                          "wait_until_finish": lambda self, duration=None: None})()
        # On a thread, with a generous hang guard (not a timing): a wait that never gives up fails.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            waited = pool.submit(runners._DaskResult(beam_result, None, cluster.scheduler_address, 1.0).wait_until_finish)
            with pytest.raises(runners.DaskRunError, match=f"^the Dask cluster at {cluster.scheduler_address} has had "
                                                           r"no workers for 1 s during the run \(--dask_wait_timeout\)$"):
                waited.result(timeout=120)
        assert client.status == "closed"

def test_group_by_key_merges_partitions_before_its_shuffle():
    """A Flatten of many stages' outputs has many partitions; the shuffle after it needs not."""
    import dask
    import dask.bag as db

    from pipeline.runners import _GroupByKey

    items = [(k % 3, k) for k in range(40)]
    bag = db.from_sequence(items, npartitions=10)
    grouped = _GroupByKey(None, bag_kwargs={"npartitions": 2}).apply(bag)
    assert grouped.npartitions == 2
    with dask.config.set(scheduler="sync"):
        got = {k: sorted(v) for k, v in grouped.compute()}
    assert got == {r: [k for k in range(40) if k % 3 == r] for r in range(3)}
    assert _GroupByKey(None, bag_kwargs={}).apply(bag).npartitions == 10


def test_evaluate_graph_has_a_single_side_input(tmp_path, photos):
    """Beam's Dask runner computes every side input as its own nested job, rerunning all that
    feeds it: with more than one side input the attacks would run once per side input."""
    import apache_beam as beam
    from apache_beam.pipeline import PipelineVisitor

    from pipeline.evaluate import build_evaluate
    from pipeline.io import OutputDir, expand_inputs

    write_tar(tmp_path / "a.tar", good_members(photos))
    config = tiny_config([str(tmp_path / "a.tar")], tmp_path / "out", defenses=("jpeg:quality=50", "aug_msroi"))
    p = beam.Pipeline(options=PipelineOptions(["--runner", "FnApiRunner"]))
    build_evaluate(p, config, expand_inputs(config.input.paths, "auto", 100), OutputDir(config.output, "r"))

    side_inputs = []

    class Count(PipelineVisitor):
        def visit_transform(self, node):
            side_inputs.extend([node.full_label] * len(node.side_inputs))

    p.visit(Count())
    assert side_inputs == ["Finalize"]


def test_pipeline_options_errors_are_one_line_values():
    from apache_beam.options.pipeline_options import StandardOptions

    from pipeline import runners

    # A nightly config's runner_options: {direct_num_workers: {a: 1}} arrives like this.
    with pytest.raises(ValueError, match=r"^bad pipeline option: argument --direct_num_workers: invalid int value"):
        runners.pipeline_options(["--direct_num_workers", "{'a': 1}"])
    with pytest.raises(ValueError, match=r"unknown runner 'NoSuchRunner'; valid: .*DaskRunner.*FnApiRunner"):
        runners.pipeline_options(["--runner=NoSuchRunner"])
    for name in ("DaskRunner", "dask", "--runner=DaskRunner"):
        argv = [name] if name.startswith("--") else ["--runner", name]
        assert runners.pipeline_options(argv).view_as(StandardOptions).runner == "pipeline.runners.DaskRunner"
    for name in ("DataflowRunner", "FnApiRunner", "apache_beam.runners.direct.DirectRunner"):
        assert runners.pipeline_options(["--runner", name]).view_as(StandardOptions).runner == name
    # Beam's names in any case, "Runner" optional, are spelled as Beam's class: the run's checks
    # (a CUDA device here, a model shared in process, the progress line) go by that name.
    for name, canonical in (("direct", "DirectRunner"), ("fnapirunner", "FnApiRunner"), ("FnApi", "FnApiRunner"),
                            ("--runner=DATAFLOW", "DataflowRunner")):
        argv = [name] if name.startswith("--") else ["--runner", name]
        assert runners.pipeline_options(argv).view_as(StandardOptions).runner == canonical


def test_local_worker_processes_log_at_the_jobs_verbosity(monkeypatch):
    """The worker processes of --direct_running_mode multi_processing log at INFO on the job's
    stderr by default: 53 lines of channels and options in a 12-image run without -v. They follow
    the job's level instead; remote runners' workers keep their own default, as does a level given."""
    import logging

    from apache_beam.options.pipeline_options import WorkerOptions

    from pipeline import runners

    def level(*argv):
        return runners.pipeline_options(list(argv)).view_as(WorkerOptions).default_sdk_harness_log_level

    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    assert level("--runner", "DirectRunner", "--direct_running_mode", "multi_processing") == "WARNING"
    assert level() == "WARNING"
    assert level("--runner", "DataflowRunner") is None
    assert level("--runner", "DirectRunner", "--default_sdk_harness_log_level", "DEBUG") == "DEBUG"
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)  # -v
    assert level("--runner", "DirectRunner") == "INFO"


def test_a_cluster_of_your_own_gets_twice_as_many_partitions_as_it_has_workers(monkeypatch):
    """Without --dask_workers, a run on an existing cluster was split into 2 partitions whatever
    its size: on a cluster of 3 workers, one had no work."""
    from apache_beam.runners.dask import dask_runner

    from pipeline import runners

    seen = {}

    def run_pipeline(self, pipeline, options):
        seen["npartitions"] = options.view_as(dask_runner.DaskOptions).npartitions
        return None

    monkeypatch.setattr(runners, "check_scheduler", lambda *a, **k: None)
    monkeypatch.setattr(runners, "check_workers_import", lambda *a, **k: 3)
    monkeypatch.setattr(dask_runner.DaskRunner, "run_pipeline", run_pipeline)
    for flags, expected in (([], 6), (["--dask_npartitions", "5"], 5)):
        options = runners.pipeline_options(["--runner", "DaskRunner", "--dask_client_address", "tcp://127.0.0.1:1",
                                            *flags])
        runners.DaskRunner().run_pipeline(None, options)
        assert seen["npartitions"] == expected


def test_semjpegs_dask_options_are_not_handed_to_other_runners_workers():
    """Beam hands every option that has a value to the worker processes of any runner, whose
    parsers do not know ours: ``--dask_wait_timeout=300.0`` (a default) made each multi-process
    worker log "Discarding unparseable args". Unset, it still means 300 s on Dask."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.dask_cluster import WAIT_TIMEOUT
    from pipeline.runners import DaskPipelineOptions

    options = PipelineOptions(["--runner", "DirectRunner"])
    assert "dask_wait_timeout" not in options.get_all_options(drop_default=True)
    assert options.view_as(DaskPipelineOptions).dask_wait_timeout is None and WAIT_TIMEOUT == 300
    assert PipelineOptions(["--dask_wait_timeout", "5"]).view_as(DaskPipelineOptions).dask_wait_timeout == 5
