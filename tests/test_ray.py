"""The Ray backend: the same contract as the local one, on a local Ray cluster the tests start.

Most tests use one cluster started with `ray start --head` (an "existing cluster", as on a
real fleet); one real-OCR run lets infer_mp.py start its own local cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    OFFLINE_OCR,
    ROOT,
    assert_text_matches,
    make_config,
    make_inputs,
    outputs,
    page_files,
    run_cli,
    run_fake,
    run_log,
    start_fake,
    temporaries,
    wait_for,
    write,
)

# Only the tests that run Ray need it installed; the others (refusals, planning) run anywhere.
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="the Ray backend needs: pip install -r requirements-ray.txt")
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command, wherever pip put it

# A cluster without token authentication, and no inherited address: every run says where to go.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({k: v for k, v in RAY_ENV.items() if v})
    return env


@pytest.fixture(scope="module")
def cluster() -> str:
    """A 2-CPU Ray cluster, as `ray start --head` makes one; its address."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the Ray backend needs: pip install -r requirements-ray.txt")
    port = free_port()
    head = subprocess.Popen(
        [*RAY_CLI, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
         "--include-dashboard", "false", "--disable-usage-stats"],
        env=ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: cluster_answers(address) or head.poll() is not None, timeout=120)
        assert head.poll() is None, "ray start --head failed"
        yield address
    finally:  # (a graceful `ray stop` takes half a minute; the whole session is thrown away)
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def cluster_answers(address: str) -> bool:
    status = subprocess.run([*RAY_CLI, "status", "--address", address],
                            env=ray_env(), capture_output=True, text=True)
    return status.returncode == 0


def on_ray(src: Path, out: Path, address: str | None, *extra: str, env: dict | None = None, **kwargs):
    where = ["--ray_address", address] if address else []
    return run_fake(src, out, "--backend", "ray", *where, *extra, env={**RAY_ENV, **(env or {})}, **kwargs)


def start_on_ray(src: Path, out: Path, address: str, *extra: str) -> subprocess.Popen:
    """The same run in the background, for tests that kill or signal something mid-run."""
    return start_fake(src, out, "--backend", "ray", "--ray_address", address, *extra, env=RAY_ENV)


def comparable(results: dict[str, dict]) -> dict[str, tuple]:
    """What a page's JSON says about its input, without which process or device made it."""
    return {name: (r["input_path"], r.get("page_index"), r["text"], r.get("image_sha1")) for name, r in results.items()}


def test_without_ray_installed_says_how_to_install(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 1)
    write(tmp_path / "shadow" / "ray.py", "raise ImportError('No module named ray')\n")
    run = run_fake(src, out, "--backend", "ray", env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert run.code == 2
    assert "requirements-ray.txt" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_ray_address_needs_the_ray_backend(dirs):
    src, out = dirs
    make_inputs(src, 1)
    run = run_fake(src, out, "--ray_address", "auto")
    assert run.code == 2 and "--backend ray" in run.stderr


@needs_ray
def test_unreachable_cluster_is_one_line_and_exit_3(dirs):
    src, out = dirs
    make_inputs(src, 1)
    run = on_ray(src, out, f"127.0.0.1:{free_port()}", timeout=60)  # (one that waited for ever fails here)
    assert run.code == 3, run.stderr
    assert "cannot reach the Ray cluster" in run.stderr and "Traceback" not in run.stderr
    assert page_files(out) == [] if out.exists() else True


def test_same_outputs_and_run_log_as_local_and_backends_resume_each_other(cluster, tmp_path):
    src = tmp_path / "in"
    make_inputs(src, 6, pdf_pages=3)
    write(src / "sub" / "p00.png", "nested, same name")
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert run_fake(src, local, "--input_glob_pattern", "**/*").code == 0
    run = on_ray(src, remote, cluster, "--input_glob_pattern", "**/*", "--instances_per_device", "2",
                 "--batch_size", "2", "--pipeline_arg", "delay=0.3", "--pages_per_task", "1")
    assert run.code == 0, run.stderr
    assert comparable(outputs(remote)) == comparable(outputs(local))  # the PDF's pages too, done as ranges
    assert "read whole" not in run.stderr  # each actor rendered only its range
    assert len({r["pid"] for r in outputs(remote).values()}) == 2  # two actors shared the work
    records = run_log(remote)
    assert sorted(r["range"] for r in records if "range" in r) == [[0, 1], [1, 2], [2, 3]]
    records = [r for r in records if "range" not in r]
    assert sorted(r["status"] for r in records) == ["done"] * 8
    assert all(r["device"].startswith("cpu@") for r in records)
    assert "on the Ray cluster at" in run.stderr
    # Switch backends: the local backend sees Ray's work as done, and the other way round.
    write(src / "new.png", "added later")
    again = run_fake(src, remote, "--input_glob_pattern", "**/*")
    assert again.code == 0 and "1 input(s) to do, 8 already done" in again.stderr
    write(src / "newer.png", "added even later")
    last = on_ray(src, remote, cluster, "--input_glob_pattern", "**/*")
    assert last.code == 0 and "1 input(s) to do, 9 already done" in last.stderr
    assert len(page_files(remote)) == 12


def test_an_actor_killed_mid_run_loses_nothing_and_writes_nothing_twice(cluster, dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 12)
    busy, gate = tmp_path / "busy.jsonl", tmp_path / "gate"
    process = start_on_ray(src, out, cluster, "--instances_per_device", "2", "--pipeline_arg", f"busy_log={busy}",
                           "--pipeline_arg", f"gate={gate}")
    wait_for(lambda: busy.exists() and len(busy.read_text().splitlines()) == 2)  # both actors hold an input
    victim = json.loads(busy.read_text().splitlines()[0])
    os.kill(victim["pid"], signal.SIGKILL)
    process.wait_for_stderr("go back to the queue")
    gate.touch()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "died" in stderr
    assert page_files(out) == [f"p{i:02d}.json" for i in range(12)] and temporaries(out) == []
    records = run_log(out)
    assert sorted(r["input"] for r in records) == sorted(str(src / f"p{i:02d}.png") for i in range(12))
    assert all(r["status"] == "done" for r in records)
    results = outputs(out)
    assert all(results[Path(name).stem + ".json"]["pid"] != victim["pid"] for name in victim["inputs"])


def test_crashing_raising_and_hanging_inputs_fail_alone(cluster, dirs):
    src, out = dirs
    make_inputs(src, 4)
    write(src / "crash.png", "CRASH")
    write(src / "raise.png", "RAISE")
    write(src / "hang.png", "HANG")
    run = on_ray(src, out, cluster, "--instances_per_device", "2", "--batch_size", "3", "--max_attempts", "2",
                 "--task_timeout", "3")
    assert run.code == 1, run.stderr
    failed = {Path(r["input"]).name: r for r in run_log(out) if r["status"] == "failed"}
    assert sorted(failed) == ["crash.png", "hang.png", "raise.png"]
    # its first batch (with hang.png and p00.png) died uncharged; then it died twice alone
    assert failed["crash.png"]["attempts"] == 3 and "died" in failed["crash.png"]["error"]
    assert "2 times while running this input alone" in failed["crash.png"]["error"]
    assert "timed out" in failed["hang.png"]["error"]
    assert "cannot decode" in failed["raise.png"]["error"]
    assert page_files(out) == [f"p{i:02d}.json" for i in range(4)]
    assert "Traceback" not in run.stderr


def test_an_actor_lost_while_starting_is_replaced_only_while_inputs_wait_for_it(cluster, dirs, tmp_path):
    """One input, two actors; one dies as it starts. The other takes the input (3 s, time enough
    for a new actor to load), so no new actor is started only to be stopped (a real pipeline's
    load takes a minute)."""
    src, out = dirs
    make_inputs(src, 1)
    started = tmp_path / "started.jsonl"
    run = on_ray(src, out, cluster, "--instances_per_device", "2", "--pipeline_arg", f"init_log={started}",
                 "--pipeline_arg", f"crash_once={tmp_path / 'crashed'}", "--pipeline_arg", "delay=3")
    assert run.code == 0, run.stderr
    assert "while starting" in run.stderr and "replacement" not in run.stderr and (tmp_path / "crashed").exists()
    assert len(started.read_text().splitlines()) == 1, run.stderr  # the survivor only
    assert page_files(out) == ["p00.json"] and temporaries(out) == []


def test_a_slot_left_vacant_is_not_started_after_the_run_gave_up_on_placement(cluster, dirs, tmp_path):
    """One input, two actors; one dies as it starts, and its slot stays empty (the other is to
    take the input), but the other never starts within --start_timeout: the run ends there
    (exit 3), starting no actor in the empty slot only to give up on it at once."""
    src, out = dirs
    make_inputs(src, 1)
    run = on_ray(src, out, cluster, "--instances_per_device", "2", "--start_timeout", "8",
                 "--pipeline_arg", f"crash_once={tmp_path / 'crashed'}", "--pipeline_arg", "start_delay=60")
    assert run.code == 3, run.stderr
    assert "while starting" in run.stderr and (tmp_path / "crashed").exists()
    assert run.stderr.count("not started within 8 s") == 1, run.stderr  # the survivor's slot only


def test_batches_reported_in_time_are_not_timed_out_by_a_coordinator_that_was_busy(cluster, dirs, tmp_path):
    """Two actors finish in time while the coordinator is held (SIGSTOP) past --task_timeout;
    ray.wait reads one finished call a round, so the other's result waited while its actor
    counted as overdue: it is read first."""
    src, out = dirs
    make_inputs(src, 2)
    busy, gate = tmp_path / "busy.jsonl", tmp_path / "gate"
    process = start_on_ray(src, out, cluster, "--instances_per_device", "2", "--task_timeout", "2",
                           "--pipeline_arg", f"busy_log={busy}", "--pipeline_arg", f"gate={gate}")
    wait_for(lambda: busy.exists() and len(busy.read_text().splitlines()) == 2, timeout=120)
    os.kill(process.pid, signal.SIGSTOP)
    try:
        gate.touch()
        time.sleep(3.5)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "timed out" not in stderr, stderr
    assert [(r["status"], r["attempts"]) for r in run_log(out)] == [("done", 1)] * 2


def test_resources_no_node_has_are_refused_before_any_work(cluster, dirs):
    src, out = dirs
    make_inputs(src, 2)
    for extra in (["--cpu_threads", "8"], ["--device", "gpu:0"]):
        run = on_ray(src, out, cluster, *extra)
        assert run.code == 3, run.stderr
        assert "no node of the Ray cluster" in run.stderr and "Traceback" not in run.stderr
        assert page_files(out) == [] if out.exists() else True


def test_dry_run_names_the_cluster_and_starts_no_actor(cluster, dirs):
    src, out = dirs
    make_inputs(src, 3)
    run = on_ray(src, out, cluster, "--dry_run", "--instances_per_device", "2")
    assert run.code == 0, run.stderr
    assert "2 worker(s) on cpu x2, 1 CPU thread(s) each" in run.stdout
    assert "Ray cluster at" in run.stdout and "2 CPU(s)" in run.stdout
    assert not out.exists()


@needs_ray
def test_real_ocr_on_a_local_cluster_started_for_the_run(tmp_path):
    """No address: infer_mp.py starts a local Ray cluster, runs the offline OCR pipeline on
    it, and stops it."""
    truth = json.loads((ROOT / "examples" / "truth.json").read_text())
    out = tmp_path / "out"
    run = run_cli("--pipeline", OFFLINE_OCR, "--input_dir", str(ROOT / "examples" / "inputs"), "--device", "cpu",
                  "--output_dir", str(out), "--backend", "ray", env=RAY_ENV, timeout=300)
    assert run.code == 0, run.stderr
    assert "started locally for this run" in run.stderr
    assert_text_matches(out, truth)
    assert all(r["device"].startswith("cpu@") for r in run_log(out))


def test_actors_beyond_free_resources_wait_and_the_others_do_the_work(cluster, dirs):
    src, out = dirs
    make_inputs(src, 5)
    run = on_ray(src, out, cluster, "--instances_per_device", "3", "--cpu_threads", "2")  # room for one
    assert run.code == 0, run.stderr
    assert page_files(out) == [f"p{i:02d}.json" for i in range(5)]
    assert len({r["pid"] for r in outputs(out).values()}) == 1


def test_a_cluster_busy_with_another_job_is_exit_3_not_a_hang(cluster, tmp_path):
    src, busy = tmp_path / "in", tmp_path / "busy.jsonl"
    make_inputs(src, 8)
    first = start_on_ray(src, tmp_path / "first", cluster, "--instances_per_device", "2", "--pipeline_arg",
                         f"busy_log={busy}", "--pipeline_arg", f"gate={tmp_path / 'never'}")
    wait_for(lambda: busy.exists() and len(busy.read_text().splitlines()) == 2)  # its actors hold both CPUs
    run = on_ray(src, tmp_path / "second", cluster, "--start_timeout", "3")
    first.stop()
    assert run.code == 3, run.stderr
    assert "not started within 3 s: no node had 2 CPU free" in run.stderr
    assert "8 not processed (no worker could run)" in run.stderr


def test_recycling_replaces_actors_between_batches(cluster, dirs):
    src, out = dirs
    make_inputs(src, 6)
    run = on_ray(src, out, cluster, "--max_items_per_worker", "2")
    assert run.code == 0, run.stderr
    assert page_files(out) == [f"p{i:02d}.json" for i in range(6)]
    assert len({r["pid"] for r in outputs(out).values()}) == 3
    assert all(r["attempts"] == 1 for r in run_log(out))


class FakeCluster:
    """What plan_ray_workers reads from a RayCluster: its nodes."""

    def __init__(self, *nodes: tuple[float, float]):
        import infer_mp

        self.nodes = [infer_mp.RayNode(f"10.0.0.{i}", cpus, gpus) for i, (cpus, gpus) in enumerate(nodes)]
        self.instances_per_device = 1

    def describe(self) -> str:
        return "Ray cluster at test"


def ray_config(device: str, instances: int, threads: int | None = None):
    return make_config(device=device, instances_per_device=instances, cpu_threads=threads, backend="ray")


def test_devices_map_onto_cluster_resources():
    import infer_mp

    gpus = FakeCluster((16, 0), (32, 8))
    plan = infer_mp.plan_ray_workers(ray_config("gpu:0,1,2,3", 2), gpus)
    assert len(plan) == 8 and {s.device for s in plan} == {"gpu"}
    assert infer_mp.ray_resources(plan[0], 2) == {"num_cpus": 1.0, "num_gpus": 0.5}  # two actors share a GPU
    assert infer_mp.ray_resources(plan[0], 1) == {"num_cpus": 1.0, "num_gpus": 1.0}
    cpus = infer_mp.plan_ray_workers(ray_config("cpu", 4), gpus)
    assert [s.cpu_threads for s in cpus] == [8] * 4  # the largest node's 32 cores among 4 instances
    with pytest.raises(infer_mp.ClusterError, match="no node of the Ray cluster at test has what one worker needs"):
        infer_mp.plan_ray_workers(ray_config("gpu:0", 1), FakeCluster((64, 0)))
    with pytest.raises(infer_mp.UsageError, match="runs on cpu or gpu"):
        infer_mp.plan_ray_workers(ray_config("xpu:0", 1), gpus)


@needs_ray
def test_a_node_lost_mid_run_has_its_inputs_retried_on_another(monkeypatch, dirs):
    """Two worker nodes (Ray's own test cluster: separate raylets on this machine); one is
    removed mid-run, killing the actor on it. Its inputs are done on the other node."""
    from ray.cluster_utils import Cluster

    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name, raising=False)
    src, out = dirs
    make_inputs(src, 10)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        doomed = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        process = start_on_ray(src, out, cluster.address, "--instances_per_device", "2", "--cpu_threads", "1",
                               "--pipeline_arg", "delay=0.5")
        wait_for(lambda: len(page_files(out)) >= 2 if out.exists() else False)
        cluster.remove_node(doomed, allow_graceful=False)
        _, stderr = process.communicate(timeout=180)
    finally:
        cluster.shutdown()
    assert process.returncode == 0, stderr
    assert "died" in stderr and "go back to the queue" in stderr
    assert page_files(out) == [f"p{i:02d}.json" for i in range(10)] and temporaries(out) == []
    assert sorted(r["status"] for r in run_log(out)) == ["done"] * 10


def test_ctrl_c_twice_stops_a_ray_run_at_once(cluster, dirs):
    src, out = dirs
    make_inputs(src, 2)
    write(src / "hang.png", "HANG")
    process = start_on_ray(src, out, cluster, "--instances_per_device", "2")
    wait_for(lambda: len(page_files(out)) >= 2 if out.exists() else False)
    process.send_signal(signal.SIGINT)
    process.wait_for_stderr("starting no new inputs")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "second signal: stopping now" in stderr and "grace over" not in stderr  # hang.png's actor is not waited for
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert "replacement" not in stderr


def test_a_malformed_start_timeout_is_a_usage_error(dirs):
    src, out = dirs
    make_inputs(src, 1)
    run = on_ray(src, out, None, "--start_timeout", "soon")
    assert run.code == 2 and "--start_timeout" in run.stderr and "Traceback" not in run.stderr
