"""`iropt batch` and `iropt tune` on a real Ray cluster, and calibration shards as Ray tasks.

The module starts one local cluster on 127.0.0.1 (a head node and a second node, separate
raylet processes, one CPU each), runs every test against it through `--address`, and stops it
at the end. A worker process running a model is killed mid-batch: Ray retries the task and the
ledger still holds each model exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from test_calibration import _two_layer_model
from test_calibration_merge import _assert_same, _feeds, assert_sharded_equals_serial

from iropt.app.cli import main
from iropt.compress.calibration import collect_statistics, collect_statistics_parallel
from iropt.io.load import load_model
from iropt.io.save import save_model
from iropt.verify.runtime import reference_runner

# Ray turns a loopback address given to ray.init() into the machine's own IP, which a cluster
# bound to 127.0.0.1 does not listen on, unless it runs in its single-machine mode (read when
# ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="Ray is in the dev extra: pip install -e '.[dev]'")
# One cluster for the module: every test here runs in the same pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("ray_cluster")

GOLDEN = Path(__file__).resolve().parents[1] / "golden_models"
BATCH_MODELS = ("conv_bn", "mlp", "resnet", "digits_cnn")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    # Everything Ray writes (sessions, logs, the "current cluster" address file) goes to a
    # temp dir of its own, short because Ray's Unix socket paths live under it (107-byte limit).
    temp = tempfile.mkdtemp(prefix="iropt-ray-", dir="/tmp")
    (Path(temp) / "ray").mkdir()
    saved = {key: os.environ.get(key) for key in ("RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_TMPDIR=temp, RAY_USAGE_STATS_ENABLED="0")
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_driver(ray_cluster: Any) -> Iterator[Any]:
    """This process connected to the cluster: `iropt batch/tune` use the connection they find,
    and the workers that imported iropt once serve every test (a new job starts new workers,
    seconds each on a small machine)."""
    ray.init(address=ray_cluster.address, log_to_driver=False, include_dashboard=False)
    try:
        yield ray_cluster
    finally:
        ray.shutdown()


def _golden_args(names: tuple[str, ...]) -> list[str]:
    return [str(GOLDEN / f"{name}.onnx") for name in names]


def _ledger(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]


def _assert_matches_golden(output: Path, name: str) -> None:
    with np.load(GOLDEN / f"{name}.inputs.npz") as data:
        feed = {key: data[key] for key in data.files}
    with np.load(GOLDEN / f"{name}.outputs.npz") as data:
        expected = {key: data[key] for key in data.files}
    got = reference_runner(load_model(output)).run(feed)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5)


def test_batch_of_golden_models_isolates_a_broken_one_and_reruns_nothing(
    ray_cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model at all")
    out = tmp_path / "out"
    args = ["batch", "default", *_golden_args(BATCH_MODELS), str(broken), "-o", str(out),
            "--address", ray_cluster.address]
    assert main(args) == 1  # one model failed; the others are done
    rows = {row["name"]: row for row in _ledger(out)}
    assert set(rows) == {*BATCH_MODELS, "broken"}
    assert rows["broken"]["status"] == "bad_input" and "not a readable ONNX model" in rows["broken"]["error"]
    for name in BATCH_MODELS:
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["nodes_after"] <= row["nodes_before"]
        assert row["latency_ms_before"] > 0 and row["latency_ratio"] > 0
        assert row["verification"].startswith("passed")
        _assert_matches_golden(Path(row["output"]), name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ran"] == 5 and summary["statuses"] == {"ok": 4, "bad_input": 1}
    table = capsys.readouterr().out
    assert "resnet" in table and "bad_input" in table and "verification" in table

    # The same batch again: every model is in the ledger with the same key, nothing runs.
    assert main([*args, "-q"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ran"] == 0 and summary["skipped"] == 5
    assert len(_ledger(out)) == 5
    # A different schedule is different work.
    assert main(["batch", "cleanup", *_golden_args(("mlp",)), "-o", str(out), "--address",
                 ray_cluster.address, "--no-latency", "-q"]) == 0
    assert json.loads((out / "summary.json").read_text())["ran"] == 1


def _raylet_pids(cluster: Any) -> set[int]:
    nodes = [cluster.head_node, *cluster.worker_nodes]
    return {process.process.pid for node in nodes for process in node.all_processes["raylet"]}


def _task_workers(parents: set[int]) -> list[int]:
    """Worker processes of this cluster's raylets now running a batch task (Ray titles a worker
    with the name of its task: `ray::iropt-batch:MODEL`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0]
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent in parents and title.startswith(b"ray::iropt-batch:"):
            found.append(int(entry.name))
    return found


def test_a_worker_killed_mid_batch_is_retried_and_every_model_completes_once(
    ray_driver: Any, tmp_path: Path
) -> None:
    ray_cluster = ray_driver
    killed: list[int] = []
    parents = _raylet_pids(ray_cluster)
    done = threading.Event()

    def kill_first_task_worker() -> None:
        while not done.is_set():
            pids = _task_workers(parents)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_task_worker)
    killer.start()
    out = tmp_path / "out"
    try:
        code = main(["batch", "default", *_golden_args(BATCH_MODELS), "-o", str(out), "--address",
                     ray_cluster.address, "--no-latency", "--retries", "2", "-q"])
    finally:
        done.set()
        killer.join()
    assert killed, "no batch task was seen running"
    assert code == 0
    rows = _ledger(out)
    assert sorted(row["name"] for row in rows) == sorted(BATCH_MODELS)  # each model exactly once
    assert len({row["key"] for row in rows}) == len(BATCH_MODELS)
    assert all(row["status"] == "ok" for row in rows)
    assert all(not row["worker"].endswith(f":{killed[0]}") for row in rows)
    for row in rows:
        _assert_matches_golden(Path(row["output"]), row["name"])


def test_calibration_shards_run_as_ray_tasks_and_merge_to_the_serial_statistics(ray_driver: Any) -> None:
    # With this process connected, parallel_map sends each shard to the cluster as a task.
    assert ray.is_initialized()
    assert_sharded_equals_serial(_feeds(8), (3, 6))


def test_parallel_calibration_reads_the_data_in_waves_of_shards_and_merges_to_the_serial_statistics(
    ray_driver: Any,
) -> None:
    # Ten batches in shards of two: five shards, sent two at a time (the cluster's two CPUs).
    feeds = _feeds(10)
    seen: list[dict[str, np.ndarray]] = []
    model = _two_layer_model()
    serial = collect_statistics(model, ["x", "h", "r"], feeds, reference_runner)
    parallel = collect_statistics_parallel(model, ["x", "h", "r"], feeds, reference_runner, shard_batches=2,
                                           on_batch=seen.append)
    for name in ("x", "h", "r"):
        _assert_same(parallel[name], serial[name])
    assert [batch["x"].tobytes() for batch in seen] == [feed["x"].tobytes() for feed in feeds]


def test_quantize_under_ray_calibrates_in_shards_to_the_model_a_serial_run_makes(
    ray_driver: Any, tmp_path: Path
) -> None:
    model = tmp_path / "two_layer.onnx"
    save_model(_two_layer_model(), model)
    rng = np.random.default_rng(6)
    # 64 rows in batches of 4: 16 batches, two shards; values on a 1/64 grid, so each shard
    # sees the very values a serial run sees.
    np.savez(tmp_path / "calibration.npz", x=(rng.integers(-64, 64, size=(64, 4)) / 64).astype(np.float32))
    schedule = tmp_path / "int8.opt"
    schedule.write_text("quantize(batch_size=4, placement=\"rules\")\n")
    args = [str(schedule), str(model), "--calibration", str(tmp_path / "calibration.npz"), "--no-verify", "-q"]
    assert main(["run", *args, "-o", str(tmp_path / "ray.onnx")]) == 0
    # The same run in a process of its own, not connected to Ray: serial calibration.
    script = Path(sys.executable).with_name("iropt")
    subprocess.run([str(script), "run", *args, "-o", str(tmp_path / "serial.onnx")], check=True)
    parallel, serial = (onnx.load(str(tmp_path / name)) for name in ("ray.onnx", "serial.onnx"))
    quantized = [t for t in parallel.graph.initializer if "scale" in t.name]
    assert quantized, "the pass quantized nothing"
    assert [t.SerializeToString() for t in parallel.graph.initializer] == [
        t.SerializeToString() for t in serial.graph.initializer
    ]


def test_sensitivity_trials_run_as_ray_tasks_and_score_as_in_process(ray_driver: Any) -> None:
    """Independent trials on the emulation model go to the cluster (each worker builds the
    session once) and come back in order with the scores the in-process session gives."""
    from test_quant_sensitivity_emulation import _golden, _Setup

    from iropt.compress.quant.trials import EmulatedTrials

    model, feeds = _golden("resnet")
    setup = _Setup(model, feeds, "ort")
    reference = [reference_runner(model).run(feeds)]
    trials = EmulatedTrials(setup.emulation, reference_runner, [feeds], "cosine")
    chosen = [set(setup.keys), set(setup.keys[:2]), {setup.keys[-1]}, set()]
    remote = trials.scores(chosen, reference)
    assert trials.sessions == 0 and trials.runs == len(chosen)  # no session opened in this process
    local = [trials.score(quantized, reference) for quantized in chosen]
    assert remote == pytest.approx(local, rel=1e-9, abs=1e-9)
    assert local[-1] == pytest.approx(1.0) and min(local) < 1.0


SPACE = """
[schedules]
exact = "default"
int8 = "{int8}"

[options]
"quantize.method" = ["minmax", "percentile"]
"quantize.percentile" = {{ low = 99.0, high = 99.999 }}
"""


def test_tune_finds_a_schedule_that_iropt_run_reproduces(ray_driver: Any, tmp_path: Path) -> None:
    ray_cluster = ray_driver
    space = tmp_path / "space.toml"
    space.write_text(SPACE.format(int8=GOLDEN / "int8_ort.opt"))
    out = tmp_path / "tune"
    model = GOLDEN / "digits_cnn.onnx"
    calib = str(GOLDEN / "digits_cnn.calib.npz")
    code = main(["tune", str(model), "--space", str(space), "-o", str(out), "--objective", "latency",
                 "--constraint", "cosine>=0.99", "--trials", "4", "--search", "optuna", "--calibration", calib,
                 "--address", ray_cluster.address, "-q"])
    assert code == 0
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 4
    assert {t["schedule"] for t in trials} <= {"exact", "int8"}
    assert all(t["latency"] > 0 and "metric" in t for t in trials)
    pareto = json.loads((out / "pareto.json").read_text())
    best = pareto["best"]
    assert best["feasible"] and best["metric"] >= 0.99
    assert best["trial"] in {t["trial"] for t in pareto["front"]}
    assert all(not t["feasible"] or t["latency"] >= best["latency"] for t in trials)
    assert (out / "pareto.svg").read_text().startswith("<svg")
    # The best schedule, run by `iropt run`, gives the trial's model byte for byte.
    again = tmp_path / "again.onnx"
    assert main(["run", str(out / "best.opt"), str(model), "-o", str(again), "--calibration", calib, "-q"]) == 0
    assert hashlib.sha256(again.read_bytes()).hexdigest() == best["output_sha256"]
