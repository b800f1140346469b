"""Unattended runs: run log, resume, crash recovery, timeouts, recycling, signals, the lock."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import infer_mp
from conftest import (
    SCRIPT,
    assert_invariant,
    fake_args,
    holds,
    injected,
    make_inputs,
    outputs,
    page_files,
    pdf_bytes,
    run_fake,
    run_log,
    start_fake,
    temporaries,
    wait_for,
    write,
)


def last_status(out: Path) -> dict[str, str]:
    return {record["input"]: record["status"] for record in run_log(out)}


def comparable(out: Path) -> dict[str, tuple]:
    """Outputs without what differs between runs of the fake pipeline (pid, batch)."""
    return {name: (r["input_path"], r["page_index"], r["text"]) for name, r in outputs(out).items()}


# -- run log and resume ------------------------------------------------------------------------


def test_run_log_records_every_input(dirs):
    src, out = dirs
    make_inputs(src, 2, pdf_pages=3)
    write(src / "bad.png", "RAISE")
    assert run_fake(src, out).code == 1
    records = {Path(r["input"]).name: r for r in run_log(out)}
    assert set(records) == {"p00.png", "p01.png", "doc.pdf", "bad.png"}
    doc = records["doc.pdf"]
    assert doc["status"] == "done" and doc["pages"] == 3
    assert doc["outputs"] == ["doc_0.json", "doc_1.json", "doc_2.json"]
    assert doc["device"] == "cpu" and doc["attempts"] == 1 and doc["error"] is None
    assert isinstance(doc["seconds"], float) and doc["time"]
    bad = records["bad.png"]
    assert bad["status"] == "failed" and bad["pages"] == 0 and "cannot decode" in bad["error"]


def test_rerun_skips_what_is_done_and_redoes_the_rest(dirs):
    src, out = dirs
    make_inputs(src, 4, pdf_pages=2)
    write(src / "bad.png", "RAISE")
    assert run_fake(src, out).code == 1
    first = comparable(out)
    (out / "p01.json").unlink()  # deleted by hand: must be redone
    write(src / "bad.png", "fixed now")  # the failed input is redone too
    run = run_fake(src, out)
    assert run.code == 0, run.stderr
    new = [r for r in run_log(out)[6:]]
    assert Counter(r["status"] for r in new) == {"done": 2}  # what was skipped adds no line
    assert {Path(r["input"]).name for r in new if r["status"] == "done"} == {"p01.png", "bad.png"}
    assert "4 skipped" in run.stderr
    assert comparable(out) == {**first, "bad.json": (str(src / "bad.png"), None, "fixed now")}


def test_retry_failed_retries_only_failures(dirs):
    src, out = dirs
    make_inputs(src, 3)
    write(src / "bad.png", "RAISE")
    assert run_fake(src, out).code == 1
    (out / "p00.json").unlink()
    write(src / "bad.png", "fixed")
    run = run_fake(src, out, "--retry_failed")
    assert run.code == 0, run.stderr
    assert sorted(page_files(out)) == ["bad.json", "p01.json", "p02.json"]  # p00 not retried
    assert "1 not selected" in run.stderr


def test_overwrite_redoes_everything(dirs):
    src, out = dirs
    make_inputs(src, 3)
    assert run_fake(src, out).code == 0
    run = run_fake(src, out, "--overwrite")
    assert run.code == 0
    assert Counter(r["status"] for r in run_log(out)) == {"done": 6}


def test_overwrite_and_retry_failed_exclude_each_other(dirs):
    src, out = dirs
    make_inputs(src, 1)
    run = run_fake(src, out, "--overwrite", "--retry_failed")
    assert run.code == 2 and "not allowed with" in run.stderr


def test_run_log_path_can_be_moved(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 2)
    log = tmp_path / "logs" / "run.jsonl"
    assert run_fake(src, out, "--run_log", str(log)).code == 0
    assert not (out / "infer_mp.runlog.jsonl").exists()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r.get("status") for r in lines] == ["placing", "done"] * 2 + [None]  # two inputs and the run's own line
    run = run_fake(src, out, "--run_log", str(log))
    assert "2 skipped" in run.stderr


def test_a_torn_last_line_is_passed_over(dirs):
    src, out = dirs
    make_inputs(src, 3)
    assert run_fake(src, out).code == 0
    log = out / "infer_mp.runlog.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:4]) + lines[4][:25])  # as a kill -9 mid-write would leave it
    run = run_fake(src, out)  # (each input: its `placing` record, then its done record)
    assert run.code == 0 and "2 skipped" in run.stderr
    text = log.read_text()
    assert text.splitlines()[4] == lines[4][:25].rstrip("\n")
    for line in text.splitlines()[5:]:
        json.loads(line)


def test_killed_run_then_rerun_equals_a_clean_run(tmp_path):
    src, out, clean = tmp_path / "in", tmp_path / "out", tmp_path / "clean"
    make_inputs(src, 12, pdf_pages=4)
    assert run_fake(src, clean, "--batch_size", "2").code == 0
    process = start_fake(src, out, "--instances_per_device", "2", "--batch_size", "2",
                         env={"FAKE_PIPELINE_DELAY": "0.2"})
    wait_for(lambda: len(page_files(out)) >= 5)
    process.kill()  # kill -9 of the coordinator; the kernel takes its workers down with it
    process.communicate()
    run = run_fake(src, out, "--batch_size", "2")
    assert run.code == 0, run.stderr
    assert comparable(out) == comparable(clean)
    assert not temporaries(out)
    assert set(last_status(out).values()) <= {"done", "skipped"}


# -- crash recovery, timeouts, start-up failures ----------------------------------------------------


def test_crash_requeues_without_losing_or_repeating(dirs):
    src, out = dirs
    make_inputs(src, 6)
    write(src / "poison.png", "CRASH")
    run = run_fake(src, out, "--batch_size", "3", "--instances_per_device", "2", "--max_attempts", "2")
    assert run.code == 1, run.stderr
    records = run_log(out)
    done = Counter(Path(r["input"]).name for r in records if r["status"] == "done")
    assert done == {f"p{i:02d}.png": 1 for i in range(6)}
    [poison] = [r for r in records if r["status"] == "failed"]
    assert poison["input"].endswith("poison.png") and poison["attempts"] == 2  # sorted last: a batch of its own
    assert "killed by SIGKILL, 2 times while running this input alone" in poison["error"]
    assert not temporaries(out)


def test_no_replacement_is_started_once_no_input_is_left(dirs, tmp_path):
    """The last input kills its worker at its last attempt: nothing is left to do, so no new
    worker loads the pipeline (a real one takes up to a minute) only to be stopped."""
    src, out = dirs
    write(src / "poison.png", "CRASH")
    starts = tmp_path / "starts"
    run = run_fake(src, out, "--max_attempts", "2", env={"FAKE_PIPELINE_STARTS": str(starts)})
    assert run.code == 1, run.stderr
    assert len(starts.read_text().splitlines()) == 2  # the first worker, and one replacement
    assert run.stderr.count("starting a replacement") == 1, run.stderr


def test_a_slot_left_empty_for_want_of_inputs_takes_work_that_comes_back(dirs, tmp_path):
    """Worker 0 is recycled while worker 1 holds the last batch: its slot stays empty. Then the
    batch crashes and comes back to the queue, and worker 1's replacements fail to start:
    slot 0 must start again and finish it (it stayed empty: exit 3, 2 inputs not processed)."""
    src, out = dirs
    for name in ("a1", "a2", "a3"):
        write(src / f"{name}.png", name)
    write(src / "x1.png", "WAIT x1")
    write(src / "x2.png", "CRASH x2")
    write(src / "x3.png", "x3")
    gate, starts = tmp_path / "gate", tmp_path / "starts"
    env = {"FAKE_PIPELINE_STARTS": str(starts), "FAKE_PIPELINE_FAIL_STARTS": "3,4,5",
           "FAKE_PIPELINE_WAIT_FILE": str(gate)}
    process = start_fake(src, out, "--instances_per_device", "2", "--batch_size", "3", "--max_items_per_worker",
                         "3", "--max_attempts", "2", env=env)
    wait_for(lambda: {"a1.json", "a2.json", "a3.json"} <= set(page_files(out)))
    time.sleep(1)  # (worker 0 retires: nothing left to give a replacement)
    gate.touch()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    status = {Path(k).name: v for k, v in last_status(out).items()}
    assert status == {"a1.png": "done", "a2.png": "done", "a3.png": "done", "x1.png": "done", "x2.png": "failed",
                      "x3.png": "done"}, stderr


def reaped_not(pid: int) -> bool:
    """Is this process of the run still there, or not yet reaped by the coordinator?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_input_that_comes_back_alone_starts_one_vacant_slot_not_all(dirs, tmp_path):
    """Four slots, one input each: three retire with nothing left, then the fourth's worker
    is killed and its input comes back alone. One worker is started for it, not three."""
    src, out = dirs
    write(src / "a_w.png", "WAIT w")
    for name in ("f1", "f2", "f3"):
        write(src / f"{name}.png", name)
    gate, starts, busy = tmp_path / "gate", tmp_path / "starts", tmp_path / "busy"
    env = {"FAKE_PIPELINE_STARTS": str(starts), "FAKE_PIPELINE_WAIT_FILE": str(gate),
           "FAKE_PIPELINE_BUSY_LOG": str(busy)}
    process = start_fake(src, out, "--instances_per_device", "4", "--max_items_per_worker", "1", env=env)
    wait_for(lambda: busy.exists() and len(busy.read_text().splitlines()) == 4)
    calls = [json.loads(line) for line in busy.read_text().splitlines()]
    wait_for(lambda: not any(reaped_not(call["pid"]) for call in calls if "a_w" not in str(call["inputs"])))
    [waiting] = [call for call in calls if "a_w" in str(call["inputs"])]  # (the three retired, reaped)
    os.kill(waiting["pid"], signal.SIGKILL)
    process.wait_for_stderr("was killed by SIGKILL")
    wait_for(lambda: len(starts.read_text().splitlines()) >= 5)
    time.sleep(2)  # (time for more starts, were they made)
    gate.touch()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert len(starts.read_text().splitlines()) == 5, stderr  # four, and one for the input that came back


def test_hung_input_times_out_and_the_run_goes_on(dirs):
    src, out = dirs
    make_inputs(src, 4)
    write(src / "hang.png", "HANG")
    run = run_fake(src, out, "--task_timeout", "1", "--max_attempts", "2", "--batch_size", "2")
    assert run.code == 1, run.stderr
    status = {Path(k).name: v for k, v in last_status(out).items()}
    assert status == {**{f"p{i:02d}.png": "done" for i in range(4)}, "hang.png": "failed"}
    assert "timed out" in run.stderr and "--task_timeout" in run.stderr


def test_startup_failure_ends_promptly_with_the_cause(dirs):
    src, out = dirs
    make_inputs(src, 3)
    run = run_fake(src, out, "--instances_per_device", "2", env={"FAKE_PIPELINE_FAIL_INIT": "1"},
                   timeout=60)  # (a run that waited instead would fail here: no timing measured)
    assert run.code == 3
    assert "could not start its pipeline: RuntimeError: fake pipeline refuses" in run.stderr
    assert "3 not processed (no worker could run)" in run.stderr


# -- recycling ---------------------------------------------------------------------------------


def test_recycling_after_n_items(dirs):
    src, out = dirs
    make_inputs(src, 7)
    run = run_fake(src, out, "--max_items_per_worker", "2")
    assert run.code == 0, run.stderr
    results = outputs(out)
    assert len(results) == 7
    assert len({r["pid"] for r in results.values()}) == 4  # 2 + 2 + 2 + 1
    assert Counter(r["status"] for r in run_log(out)) == {"done": 7}
    assert {r["attempts"] for r in run_log(out)} == {1}  # a recycle is not a crash
    assert "go back to the queue" not in run.stderr


def test_recycling_on_memory(tmp_path):
    """A limit 50 MB above the most a worker holds on plain inputs: plain inputs never reach it,
    and each input that keeps more than that limit makes its worker retire (a fresh one for the
    next)."""
    make_inputs(tmp_path / "plain", 4)
    assert run_fake(tmp_path / "plain", tmp_path / "measured").code == 0
    most = max(r["resident_mb"] for r in outputs(tmp_path / "measured").values())
    limit = str(most + 50)
    run = run_fake(tmp_path / "plain", tmp_path / "control", "--max_worker_memory_mb", limit)
    assert run.code == 0 and len({r["pid"] for r in outputs(tmp_path / "control").values()}) == 1, run.stderr
    for i in range(4):
        write(tmp_path / "growing" / f"big{i}.png", "GROW")
    run = run_fake(tmp_path / "growing", tmp_path / "out", "--max_worker_memory_mb", limit,
                   env={"FAKE_PIPELINE_GROW_MB": str(most + 100)})
    assert run.code == 0, run.stderr
    assert len({r["pid"] for r in outputs(tmp_path / "out").values()}) == 4
    assert {r["attempts"] for r in run_log(tmp_path / "out")} == {1}


def test_by_default_a_worker_that_leaks_is_recycled_before_the_machine_runs_out(tmp_path):
    """No flag: a worker is recycled past 80% of the machine's memory shared among the workers.
    On a machine made to say it has just that much for a worker on plain inputs and 50 MB more,
    plain inputs never reach it and every input that leaks more makes its worker retire; the
    summary says the limit, where it comes from and how often it acted."""
    make_inputs(tmp_path / "plain", 4)
    assert run_fake(tmp_path / "plain", tmp_path / "measured").code == 0
    most = max(r["resident_mb"] for r in outputs(tmp_path / "measured").values())
    machine = {**injected(), "FAKE_MEMORY_MB": str(math.ceil((most + 50) / infer_mp.MEMORY_SHARE))}
    run = run_fake(tmp_path / "plain", tmp_path / "control", env=machine)
    assert run.code == 0 and len({r["pid"] for r in outputs(tmp_path / "control").values()}) == 1, run.stderr
    assert re.search(r"memory: a worker is recycled past [0-9,]+ MB resident \(default: 80% of [0-9,]+ MB over "
                     r"1 worker\(s\); --max_worker_memory_mb sets it\): 0 time\(s\)", run.stderr), run.stderr
    for i in range(4):
        write(tmp_path / "leaking" / f"big{i}.png", "GROW")
    run = run_fake(tmp_path / "leaking", tmp_path / "out", env={**machine, "FAKE_PIPELINE_GROW_MB": str(most + 100)})
    assert run.code == 0, run.stderr
    assert len({r["pid"] for r in outputs(tmp_path / "out").values()}) == 4
    assert re.search(r"memory: .*: [34] time\(s\) in this run", run.stderr), run.stderr
    small = {**injected(), "FAKE_MEMORY_MB": "10"}  # a limit below what a fresh worker holds: no use reloading
    make_inputs(tmp_path / "many", 12)
    run = run_fake(tmp_path / "many", tmp_path / "small", "--instances_per_device", "2", env=small)
    # (no restart: at most the 2 planned starts; under load the first may finish all 12 before the second is ready)
    assert run.code == 0 and re.search(r"on [12] worker start\(s\)", run.stderr), run.stderr
    assert ": 0 time(s) in this run" in run.stderr, run.stderr
    off = run_fake(tmp_path / "leaking", tmp_path / "off", "--max_worker_memory_mb", "0",
                   env={**machine, "FAKE_PIPELINE_GROW_MB": "10"})
    assert off.code == 0 and "memory:" not in off.stderr
    assert len({r["pid"] for r in outputs(tmp_path / "off").values()}) == 1


# -- progress and summary ---------------------------------------------------------------------


def test_progress_lines_and_summary_when_not_a_terminal(dirs):
    src, out = dirs
    make_inputs(src, 6)
    run = run_fake(src, out, "--progress_interval", "0.2", env={"FAKE_PIPELINE_DELAY": "0.3"})
    assert run.code == 0
    assert "progress: " in run.stderr and "/6 inputs" in run.stderr
    [summary] = [line for line in run.stderr.splitlines() if "inputs: " in line]
    assert "6 done, 0 failed, 0 skipped" in summary and "pages/s" in summary and "per device: cpu" in summary


def test_progress_lines_go_on_while_an_input_hangs_and_name_it(dirs, tmp_path):
    """Without --task_timeout an input may hang for ever: the progress lines went silent as soon
    as nothing finished. They go on, and name the input held longest once it has taken more than
    an interval."""
    src, out = dirs
    make_inputs(src, 1)
    process = start_fake(src, out, "--progress_interval", "0.5", env={"FAKE_PIPELINE_GATE": str(tmp_path / "never")})
    process.wait_for_stderr("ready")
    process.wait_for_stderr(f"{src / 'p00.png'} in progress for ", timeout=30)
    lines = [line for line in process.stderr_text().splitlines() if "progress: 0/1 pages" in line]
    assert lines and "0/1 inputs" in lines[-1], process.stderr_text()
    make_inputs(src / "two", 2)
    process = start_fake(src / "two", out / "two", "--progress_interval", "0.5", "--batch_size", "2",
                         env={"FAKE_PIPELINE_GATE": str(tmp_path / "never")})
    process.wait_for_stderr(f"{src / 'two' / 'p00.png'} (and 1 more input(s) in its batch) in progress for ",
                            timeout=30)


def test_progress_bar_on_a_terminal(dirs):
    pytest.importorskip("tqdm")
    import fcntl
    import pty
    import struct
    import termios

    src, out = dirs
    make_inputs(src, 3)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen([sys.executable, str(SCRIPT), *fake_args(src, out)], stderr=follower,
                               stdout=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(60) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "3/3" in text and "page/s" in text  # the bar counts pages


# -- signals and the lock -----------------------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_a_rerun_finishes(dirs, signum, code):
    src, out = dirs
    make_inputs(src, 10, pdf_pages=3)
    process = start_fake(src, out, "--instances_per_device", "2", env={"FAKE_PIPELINE_DELAY": "0.5"})
    wait_for(lambda: len(page_files(out)) >= 2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "starting no new inputs" in stderr and "inputs: " in stderr and "not processed (interrupted)" in stderr
    assert "Traceback" not in stderr
    assert_invariant(src, out)
    run = run_fake(src, out)
    assert run.code == 0 and len(page_files(out)) == 13


def test_second_ctrl_c_stops_at_once(dirs):
    src, out = dirs
    make_inputs(src, 2)
    write(src / "hang.png", "HANG")  # would hold the run for the whole grace period
    process = start_fake(src, out, "--instances_per_device", "2")
    wait_for(lambda: len(page_files(out)) >= 2)
    process.send_signal(signal.SIGINT)
    process.wait_for_stderr("starting no new inputs")  # (two sent at once may reach it as one: the kernel merges)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "starting no new inputs" in stderr and "second signal: stopping now" in stderr
    assert "grace over" not in stderr and "Traceback" not in stderr
    assert_invariant(src, out)


def test_a_stop_at_once_waits_for_the_renames_it_has_asked_for(dirs):
    """A second Ctrl-C as a page range is reported: the coordinator writes its `placing` line
    and tells the worker to rename; stopping then, it killed the worker mid-rename, and left a
    page in place that no record listed (until the next run). It waits for the worker's
    reply (milliseconds), so the page is recorded done."""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes([f"page {i}" for i in range(8)]))
    process = start_fake(src, out, "--pages_per_task", "1", env={"FAKE_PIPELINE_DELAY": "0.3"})
    log = out / "infer_mp.runlog.jsonl"
    wait_for(lambda: holds(log, b'"range"'))  # a page done: the next one under way
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)  # (not at once: the kernel would merge the two)
    process.send_signal(signal.SIGINT)  # while the page is read (0.3 s): the loop wakes on its report
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "second signal: stopping now" in stderr, stderr
    assert_invariant(src, out)  # every page in place is recorded


@pytest.mark.parametrize("to_the_group", [False, True])
def test_after_a_first_signal_the_inputs_in_progress_finish_and_are_done(dirs, tmp_path, to_the_group):
    """SIGTERM to the coordinator, or Ctrl-C in a terminal (SIGINT to the whole process group,
    workers included): the inputs the workers hold finish, are recorded done, and nothing
    else starts; exit 143 / 130; the rerun does the rest."""
    src, out = dirs
    make_inputs(src, 8)
    busy, gate = tmp_path / "busy.jsonl", tmp_path / "gate"
    process = start_fake(src, out, "--instances_per_device", "2", "--batch_size", "2",
                         env={"FAKE_PIPELINE_BUSY_LOG": str(busy), "FAKE_PIPELINE_GATE": str(gate)})
    wait_for(lambda: busy.exists() and len(busy.read_text().splitlines()) == 2)  # both workers hold a batch
    if to_the_group:
        process.signal_group(signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    process.wait_for_stderr("starting no new inputs")
    gate.touch()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (130 if to_the_group else 143), stderr
    held = sorted(Path(name).name for line in busy.read_text().splitlines() for name in json.loads(line)["inputs"])
    assert len(held) == 4 and sorted(Path(r["input"]).name for r in run_log(out)) == held
    assert {r["status"] for r in run_log(out)} == {"done"} and "4 not processed (interrupted)" in stderr
    assert page_files(out) == sorted(name.replace(".png", ".json") for name in held)
    assert "Traceback" not in stderr and process.stdout_text() == ""
    run = run_fake(src, out)
    assert run.code == 0 and "4 input(s) to do, 4 already done" in run.stderr and len(page_files(out)) == 8


def test_a_second_run_on_the_same_output_dir_is_refused(dirs):
    src, out = dirs
    make_inputs(src, 6)
    first = start_fake(src, out, env={"FAKE_PIPELINE_DELAY": "0.5"})
    wait_for(lambda: len(page_files(out)) >= 1)
    second = run_fake(src, out)
    assert second.code == 75
    assert "another infer_mp.py run" in second.stderr and str(first.pid) in second.stderr
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert len(page_files(out)) == 6


def test_worker_killed_from_outside_mid_batch(dirs, tmp_path):
    """kill -9 of a worker (as the OOM killer would) while it holds a batch: that batch is
    redone by another worker, once, and nothing is lost."""
    src, out = dirs
    make_inputs(src, 10)
    busy, gate = tmp_path / "busy.jsonl", tmp_path / "gate"
    process = start_fake(src, out, "--instances_per_device", "2", "--batch_size", "3",
                         env={"FAKE_PIPELINE_BUSY_LOG": str(busy), "FAKE_PIPELINE_GATE": str(gate)})
    wait_for(lambda: busy.exists() and len(busy.read_text().splitlines()) == 2)  # both hold a batch
    victim = json.loads(busy.read_text().splitlines()[0])
    os.kill(victim["pid"], signal.SIGKILL)
    process.wait_for_stderr("was killed by SIGKILL")
    gate.touch()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "starting a replacement" in stderr
    done = Counter(Path(r["input"]).name for r in run_log(out) if r["status"] == "done")
    assert done == {f"p{i:02d}.png": 1 for i in range(10)}
    results = outputs(out)
    assert all(results[Path(name).stem + ".json"]["pid"] != victim["pid"] for name in victim["inputs"])
    assert len(page_files(out)) == 10 and not temporaries(out)


def test_orchestration_benchmark_runs(tmp_path):
    """The benchmark script itself (no timing asserted): a tiny dispatch-cost run."""
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "examples" / "benchmark.py"), "--orchestration", "300",
                           "--rounds", "1", "--work_dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "bare-write floor" in done.stdout and "infer_mp.py, 2 instances" in done.stdout


def test_a_job_s_own_cgroup_memory_limit_is_the_machine_s_memory(monkeypatch, tmp_path):
    """Under Slurm or `systemd-run -p MemoryMax`, the job's own cgroup holds the limit, not
    the root's files: the default recycling limit is a share of that."""
    root = tmp_path / "sys" / "fs" / "cgroup"
    write(root / "memory.max", "max\n")
    write(root / "job.slice" / "memory.max", f"{2 * 2**30}\n")
    write(tmp_path / "meminfo", "MemTotal:       65536000 kB\n")
    write(tmp_path / "cgroup", "0::/job.slice\n")
    monkeypatch.setattr(infer_mp, "CGROUP_V2_MEMORY_MAX", str(root / "memory.max"))
    monkeypatch.setattr(infer_mp, "CGROUP_V1_MEMORY_LIMIT", str(tmp_path / "none" / "memory" / "memory.limit"))
    monkeypatch.setattr(infer_mp, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(infer_mp, "PROC_CGROUP", str(tmp_path / "cgroup"))
    assert infer_mp.machine_memory_mb() == 2048
    write(tmp_path / "cgroup", "4:cpu,memory:/slurm/job_42\n")
    write(tmp_path / "none" / "memory" / "slurm" / "job_42" / "memory.limit", f"{3 * 2**30}\n")
    assert infer_mp.machine_memory_mb() == 3072
