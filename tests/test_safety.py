"""Data safety: nothing finished is lost, nothing stale or foreign is left (issue 19)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

import infer_mp
from conftest import (
    FAKE,
    SCRIPT,
    all_records,
    assert_invariant,
    fake_args,
    holds,
    latest_records,
    make_config,
    make_inputs,
    outputs,
    page_files,
    pdf_bytes,
    run_cli,
    run_fake,
    run_log,
    start_fake,
    tiff_bytes,
    wait_for,
    write,
)

# -- cleanup deletes only what the input itself wrote ---------------------------------------------


def test_a_crash_deletes_no_output_of_an_input_with_a_longer_name(dirs):
    src, out = dirs
    write(src / "scan.png", "CRASH")
    write(src / "scan_1.png", "one")
    write(src / "scan_2.png", "two")
    write(src / "b.pdf", pdf_bytes(["page", "page"]))
    write(src / "b_1.pdf", pdf_bytes(["CRASH"]))
    assert run_fake(src, out, "--max_attempts", "1").code == 1
    assert_invariant(src, out)
    assert run_fake(src, out, "--retry_failed", "--max_attempts", "1").code == 1
    assert page_files(out) == ["b_0.json", "b_1.json", "scan_1.json", "scan_2.json"]
    assert_invariant(src, out)


def shard_of(name: str, count: int) -> int:
    return zlib.crc32(os.fsencode(name)) % count


def test_a_shard_removes_only_its_own_stale_staging(dirs):
    """Shards share the staging folder: one must not delete what another is writing right now.
    What a killed run over all inputs left is nobody's now (no such run works beside a shard):
    it went only with the next run over all inputs, which shards that always run may never see.
    What an older version left beside the outputs is nobody's the ledger knows: it stays."""
    src, out = dirs
    write(src / "x.png", "mine")
    write(src / "x_1.png", "the other shard's")
    assert (shard_of("x.png", 2), shard_of("x_1.png", 2)) == (0, 1)
    staging = out / ".infer_mp.staging"
    theirs = write(staging / "s1of2-12345-abcdef" / "0" / "x_1.json", "{}")  # being written by shard 1's worker
    mine = write(staging / "s0of2-999-abcdef" / "0" / "x.json", "{}")  # left by a killed shard-0 run
    killed = write(staging / "all-998-abcdef" / "0" / "x.json", "{}")  # left by a killed run over all inputs
    unknown = write(out / ".x.json.12345.tmp.json", "{}")
    assert run_fake(src, out, "--shard", "0/2").code == 0
    assert theirs.exists() and not mine.exists() and not killed.exists()
    assert run_fake(src, out).code == 0  # a run over all inputs has the folder alone
    assert not theirs.exists() and not staging.exists() and unknown.exists()
    killed = write(staging / "s1of2-997-abcdef" / "0" / "x_1.json", "{}")
    for name in ("x.png", "x_1.png"):
        (src / name).unlink()
    run = run_fake(src, out, "--shard", "1/2")  # (torture, seed 505: a run with no inputs left it)
    assert run.code == 0 and "no inputs" in run.stderr and not killed.exists()


def test_a_shard_whose_share_is_empty_says_so(dirs):
    """It said "nothing matches * in 'in' (in shard 1/2)", as if the folder were empty."""
    src, out = dirs
    write(src / "x.png", "mine")
    other = 1 - shard_of("x.png", 2)
    run = run_fake(src, out, f"--shard={other}/2")
    assert run.code == 0 and f"no inputs in shard {other}/2: the 1 input(s) found all fall to other shards" \
        in run.stderr and "nothing matches" not in run.stderr, run.stderr


def test_a_shard_that_finds_nothing_leaves_the_folder_and_the_others_locks(dirs, tmp_path):
    """Shard 0 made the output folder and found no inputs: it removed the folder's lock files
    as its own leftovers, shard 1's too while shard 1 held them, and shard 1 then stopped,
    exit 74, as if the folder had been deleted (its --run_log elsewhere: only locks there)."""
    src, out = dirs
    names = [name for name in (f"p{n}.png" for n in range(40)) if shard_of(name, 2) == 1][:2]
    for name in names:
        write(src / name, "WAIT")
    listing, gate, busy = tmp_path / "list", tmp_path / "gate", tmp_path / "busy.jsonl"
    os.mkfifo(listing)
    first = start_fake(src, out, "--shard", "0/2", "--input_list", str(listing), "--run_log", str(tmp_path / "0.jsonl"))
    wait_for(lambda: (out / ".infer_mp.shard-0-of-2.lock").exists())  # it made the folder; now it reads the list
    second = start_fake(src, out, "--shard", "1/2", "--run_log", str(tmp_path / "1.jsonl"),
                        env={"FAKE_PIPELINE_WAIT_FILE": str(gate), "FAKE_PIPELINE_BUSY_LOG": str(busy)})
    wait_for(busy.exists)
    listing.write_text("")  # shard 0's list: empty
    first.communicate(timeout=60)
    assert first.returncode == 0 and "no inputs" in first.stderr_text(), first.stderr_text()
    gate.touch()
    second.communicate(timeout=60)
    assert second.returncode == 0 and "2 done" in second.stderr_text(), second.stderr_text()


REMOVER = """
import fcntl, os, sys, time
path, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
    except OSError:
        pass
"""


def test_a_lock_file_removed_again_and_again_as_the_run_starts_is_exit_75_not_a_traceback(dirs):
    """Review: a run over all inputs that found nothing removes its lock files, each unlinked
    while it holds it; a run starting then reopens one it locked after it was unlinked, but
    after its last try it kept the closed file: a traceback (ValueError), or a run without
    its run log's lock."""
    src, out = dirs
    make_inputs(src, 1)
    out.mkdir()
    remover = subprocess.Popen([sys.executable, "-c", REMOVER, str(out / ".infer_mp.lock"), "4"])
    try:
        run = run_fake(src, out)
    finally:
        remover.wait(60)
    assert run.code in (0, 75) and "Traceback" not in run.stderr, run.stderr
    if run.code == 75:
        assert "is removing its lock files" in run.stderr and run_fake(src, out).code == 0


# -- the run log: bounded, keyed on the file, one truth for all shards ------------------------------


def test_a_run_that_finds_no_inputs_adds_its_line_to_a_run_log_that_is_there(dirs, tmp_path):
    """Every run appends one line about itself: a cron tick over an emptied input folder
    added none. A first run with a misspelt path still leaves nothing behind."""
    src, out = dirs
    write(src / "a.png", "A")
    assert run_fake(src, out).code == 0
    (src / "a.png").unlink()
    runs = len(run_log(out, runs=True))
    empty = run_fake(src, out)
    assert empty.code == 0 and "no inputs" in empty.stderr, empty.stderr
    closing = run_log(out, runs=True)
    assert len(closing) == runs + 1 and closing[-1]["run"]["done"] == 0 and closing[-1]["run"]["exit_code"] == 0
    assert (out / "a.json").exists()
    fresh = tmp_path / "fresh"
    assert run_fake(src, fresh).code == 0 and not fresh.exists()


def test_a_rerun_with_nothing_to_do_adds_one_line_and_starts_no_worker(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 3, pdf_pages=2)
    assert run_fake(src, out).code == 0
    log = out / "infer_mp.runlog.jsonl"
    before = log.read_text().splitlines()
    imports = tmp_path / "imports.log"
    run = run_fake(src, out, env={"FAKE_PIPELINE_IMPORT_LOG": str(imports)})
    assert run.code == 0 and "4 skipped" in run.stderr
    after = log.read_text().splitlines()
    assert after[:len(before)] == before and len(after) == len(before) + 1
    assert json.loads(after[-1])["run"]["skipped"] == 4
    assert not imports.exists()  # no worker process, no pipeline import


def test_a_mostly_superseded_run_log_is_compacted(dirs):
    src, out = dirs
    make_inputs(src, 3)
    write(src / "bad.png", "RAISE")
    assert run_fake(src, out).code == 1
    log = out / "infer_mp.runlog.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    inputs = [r for r in records if "input" in r]
    padding = [{**r, "time": "2000-01-01T00:00:00+00:00"} for r in inputs] * 300  # old, superseded
    log.write_text("".join(json.dumps(r) + "\n" for r in padding + records))
    run = run_fake(src, out)
    assert run.code == 0 and "3 skipped" in run.stderr and "1 failed before" in run.stderr
    lines = log.read_text().splitlines()
    assert len(lines) <= len(records) + 1
    assert {json.loads(line)["input"] for line in lines if "input" in line} == {r["input"] for r in inputs}
    assert not [p for p in out.iterdir() if p.name.endswith(".compact")]
    assert_invariant(src, out)
    again = run_fake(src, out)  # the failure stands after the compaction too: its run said it (exit 1)
    assert again.code == 0 and "1 failed before" in again.stderr, again.stderr


def test_a_run_log_is_compacted_from_1000_lines_not_before(dirs):
    """docs/runs.md, Bounded log: compacted at the start of a run once it has at least 1,000
    lines and more than three per input."""
    src, out = dirs
    write(src / "a.png", "A")
    assert run_fake(src, out).code == 0
    log = out / "infer_mp.runlog.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1] + [lines[-1]] * (999 - len(lines) + 1)))  # no-op reruns' lines
    assert run_fake(src, out).code == 0 and len(log.read_text().splitlines()) == 1000  # 999 read: kept
    assert run_fake(src, out).code == 0 and len(log.read_text().splitlines()) < 10  # 1,000 read: compacted


def test_a_changed_input_is_done_again(dirs):
    src, out = dirs
    make_inputs(src, 2)
    assert run_fake(src, out).code == 0
    changed = src / "p01.png"
    changed.write_text("new text, same name")
    run = run_fake(src, out)
    assert run.code == 0 and "1 skipped" in run.stderr
    assert json.loads((out / "p01.json").read_text())["text"] == "new text, same name"
    record = run_log(out)[-1]
    stat = changed.stat()
    assert (record["size"], record["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same size, newer
    assert "1 done" in run_fake(src, out).stderr


def test_a_failure_is_reported_once(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 2)
    bad = write(src / "bad.png", "RAISE")
    assert run_fake(src, out).code == 1
    imports = tmp_path / "imports.log"
    again = run_fake(src, out, env={"FAKE_PIPELINE_IMPORT_LOG": str(imports)})
    assert again.code == 0, again.stderr
    assert "1 failed before" in again.stderr and "--retry_failed retries them" in again.stderr
    assert not imports.exists()
    retried = run_fake(src, out, "--retry_failed", env={"FAKE_PIPELINE_IMPORT_LOG": str(imports)})
    assert retried.code == 1 and imports.exists()  # asked for: retried in a worker, fails again
    assert run_log(out)[-1].items() >= {"input": str(bad), "status": "failed", "device": "cpu", "attempts": 1}.items()
    bad.write_text("RAISE, but edited")  # changed since it failed: a plain rerun retries it
    run = run_fake(src, out)
    assert run.code == 1 and "1 failed" in run.stderr


def test_a_failure_said_before_a_full_disk_stopped_the_run_is_said_again_once(dirs):
    """README: a run stopped by a full disk (exit 74) exits 74, never 1, though it printed a
    FAILED line: the next plain run says that failure again and exits 1, later ones 0."""
    src, out = dirs
    make_inputs(src, 6)
    bad = write(src / "a.png", "RAISE")
    full = run_fake(src, out, env={"FAKE_PIPELINE_ENOSPC_AFTER": "2"})
    assert full.code == 74 and f"FAILED {bad}" in full.stderr, full.stderr
    again = run_fake(src, out)
    assert again.code == 1 and f"FAILED {bad}" in again.stderr, again.stderr
    later = run_fake(src, out)
    assert later.code == 0 and "1 failed before (not retried)" in later.stderr, later.stderr


def test_a_listed_file_that_was_missing_is_retried_when_it_is_back(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 1)
    listing = write(tmp_path / "list.txt", f"{src / 'p00.png'}\n{src / 'late.png'}\n")
    first = run_fake(src, out, "--input_list", str(listing))
    assert first.code == 1 and "late.png: no such file" in first.stderr
    early = write(tmp_path / "late.png", "arrived")
    os.utime(early, (1_000_000_000, 1_000_000_000))  # moved in with an old modification time
    early.rename(src / "late.png")
    run = run_fake(src, out, "--input_list", str(listing))
    assert run.code == 0 and "1 done" in run.stderr, run.stderr


def test_shards_share_one_truth(dirs):
    src, out = dirs
    make_inputs(src, 8)
    for index in range(2):
        assert run_fake(src, out, "--shard", f"{index}/2").code == 0
    run = run_fake(src, out)
    assert run.code == 0 and "0 input(s) to do" in run.stderr and "8 skipped" in run.stderr
    run = run_fake(src, out, "--shard", "0/3")
    assert run.code == 0 and "0 input(s) to do" in run.stderr
    assert_invariant(src, out)


def hold(path: Path, mode: int):
    handle = open(path, "a+")
    fcntl.flock(handle, mode | fcntl.LOCK_NB)
    return handle


def test_a_shard_starting_while_another_shard_probes_its_lock_is_not_refused(tmp_path):
    """A shard sees whether another of its count is running by taking that one's lock for an
    instant (lock_held), and whether shards of another count are, by taking theirs: a shard
    starting in that instant was refused (exit 75) although no such run was going on. A lock
    held that briefly is waited for."""
    out = tmp_path / "out"
    out.mkdir()
    config = make_config(output_dir=out, shard=(1, 2), lock_file=infer_mp.folder_lock(out, (1, 2)),
                         run_log=out / "infer_mp.shard-1-of-2.runlog.jsonl")
    probe = hold(config.lock_file, fcntl.LOCK_EX)  # as another shard's lock_held takes it
    timer = threading.Timer(0.05, probe.close)
    timer.start()
    try:
        infer_mp.RunLock(config).release()
    finally:
        timer.join()
    with hold(config.lock_file, fcntl.LOCK_EX), pytest.raises(infer_mp.RunLocked):  # a run of it: refused
        infer_mp.RunLock(config)
    other_count = hold(out / ".infer_mp.shards-of-3.lock", fcntl.LOCK_EX)  # (left by shards of 3, gone now)
    timer = threading.Timer(0.05, other_count.close)  # as a shard of our count starting beside us takes it
    timer.start()
    try:
        infer_mp.RunLock(config).release()
    finally:
        timer.join()


def test_runs_that_would_overlap_are_refused_before_any_worker(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 2)
    out.mkdir()
    imports = tmp_path / "imports.log"
    env = {"FAKE_PIPELINE_IMPORT_LOG": str(imports)}
    with hold(out / ".infer_mp.lock", fcntl.LOCK_EX):  # a run over all inputs
        run = run_fake(src, out, env=env)
        assert run.code == 75 and "another infer_mp.py run" in run.stderr
        assert run_fake(src, out, "--shard", "0/2", env=env).code == 75
    with hold(out / ".infer_mp.lock", fcntl.LOCK_SH), hold(out / ".infer_mp.shards-of-2.lock", fcntl.LOCK_SH):
        run = run_fake(src, out, env=env)  # shard runs are going on
        assert run.code == 75
        run = run_fake(src, out, "--shard", "0/3", env=env)
        assert run.code == 75 and "another count (2)" in run.stderr
        assert run_fake(src, out, "--shard", "1/2").code == 0  # a shard of the same count runs beside them
    assert not imports.exists()  # the refused runs imported nothing, started no worker


# -- stale outputs -----------------------------------------------------------------------------------


def test_outputs_under_an_old_name_are_retired(dirs):
    src, out = dirs
    write(src / "a.jpg", "jpeg text")
    write(src / "keep.png", "moved away later")
    assert run_fake(src, out).code == 0 and (out / "a.json").exists()
    (src / "keep.png").rename(dirs[0].parent / "keep.png")  # processed scans moved away: text kept
    write(src / "a.png", "png text")
    run = run_fake(src, out)
    assert run.code == 0 and "retired 1 stale output" in run.stderr
    assert page_files(out) == ["a.jpg.json", "a.png.json", "keep.json"]
    assert_invariant(src, out, gone=("keep.png",))


def test_the_run_log_cannot_make_it_delete_outside_the_output_folder(dirs, tmp_path):
    src, out = dirs
    write(src / "a.jpg", "jpeg text")
    assert run_fake(src, out).code == 0
    victim = write(tmp_path / "precious.json", "{}")
    unlisted = write(out / "someone_elses.json", "{}")
    log = out / "infer_mp.runlog.jsonl"
    record = run_log(out)[0]
    record["outputs"] = ["../precious.json", str(victim), "infer_mp.runlog.jsonl", ".infer_mp.lock", "."]
    with log.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    (out / "link").symlink_to(tmp_path)
    record["outputs"] = ["link/precious.json"]
    with log.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    assert run_fake(src, out).code == 0
    assert victim.exists() and log.exists() and unlisted.exists() and (out / ".infer_mp.lock").exists()


# -- write failures and signals --------------------------------------------------------------------


def test_a_run_log_that_cannot_be_written_stops_like_an_output(dirs, faulty_disk):
    src, out = dirs
    make_inputs(src, 3)
    faulty_disk.fill(4096)  # the run log's disk is full
    run = run_fake(src, out, "--run_log", str(faulty_disk.path / "log.jsonl"), env=faulty_disk.env("ENOSPC", 4096))
    assert run.code == 74, run.stderr
    assert "cannot write the run log" in run.stderr and "inputs: " in run.stderr and "0 failed" in run.stderr
    run = run_fake(src, out, "--run_log", str(faulty_disk.path / "log.jsonl"))  # room made
    assert run.code == 0 and "3 done" in run.stderr


def test_a_run_log_that_is_not_a_file_is_refused(dirs):
    src, out = dirs
    make_inputs(src, 1)
    run = run_fake(src, out, "--run_log", "/dev/zero")  # reading it would never end
    assert run.code == 2 and "--run_log" in run.stderr and "not a regular file" in run.stderr


OTHER_LOGS = {
    "cron": lambda n: f"2026-12-0{n % 9 + 1} 03:00 ocr tick {n}\n",
    "json": lambda n: json.dumps({"time": "2026-01-01T00:00:00Z", "level": "info", "msg": f"request {n}"}) + "\n",
    "run": lambda n: json.dumps({"time": "2026-01-01T00:00:00Z", "run": n, "input": "x"}) + "\n",
    "run dict": lambda n: json.dumps({"time": "2026-01-01T00:00:00Z", "level": "info", "run": {"x": n}}) + "\n",
}


@pytest.mark.parametrize("kind, dry", [("cron", False), ("cron", True), ("json", False), ("run", False),
                                       ("run dict", True)])
def test_a_run_log_that_holds_something_else_is_refused_and_kept(dirs, tmp_path, kind, dry):
    """--run_log ocr-cron.log (the cron job's own log): compaction kept only its JSON lines,
    so 1,200 lines of someone's log were wiped; a short one got records appended. So were the
    lines of another tool's JSON log (logrus, pino, Docker: a `time` in each)."""
    src, out = dirs
    make_inputs(src, 2)
    cron_log = tmp_path / "ocr-cron.log"
    cron_log.write_text("".join(map(OTHER_LOGS[kind], range(1200))))
    before = cron_log.read_bytes()
    run = run_fake(src, out, "--run_log", str(cron_log), *(["--dry_run"] if dry else []))
    assert run.code == 2 and "--run_log" in run.stderr and "holds something else" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert cron_log.read_bytes() == before and not any(out.rglob("*.json"))


@pytest.mark.parametrize("first", [b"", b'{"ti', b'{"time": "2026-12-0'])
def test_a_run_log_whose_first_line_a_kill_cut_short_is_still_a_run_log(dirs, tmp_path, first):
    src, out = dirs
    make_inputs(src, 2)
    log = tmp_path / "run.jsonl"
    log.write_bytes(first)
    run = run_fake(src, out, "--run_log", str(log))
    assert run.code == 0 and "2 done" in run.stderr, run.stderr


@pytest.mark.parametrize("where", ["in/a.png", "out/.infer_mp.lock", "out/.infer_mp.staging",
                                   "out/.infer_mp.staging/log.jsonl", "out/.infer_mp.shard-0-of-2.lock",
                                   "logs/.other.jsonl.log.lock", "out/a.json", "out/a.md"])
def test_a_run_log_that_is_an_input_or_the_tools_own_file_is_refused(tmp_path, where):
    """--run_log naming an input was appended to (the scan grew run-log lines), naming the lock
    file was overwritten with a pid at every start (no resume), naming the staging folder failed
    every input, and a log inside it was deleted with it at the end of each run."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 2)
    before = {path.name: path.read_bytes() for path in src.iterdir()}
    run = run_fake(src, out, "--run_log", str(tmp_path / where))
    assert run.code == 2 and "--run_log" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert {path.name: path.read_bytes() for path in src.iterdir()} == before  # (no lock file beside it either)
    assert not out.exists() or not any(out.rglob("*.json"))


def test_a_run_log_reached_through_a_link_is_one_log_under_one_lock(dirs, tmp_path):
    """--run_log link.jsonl (link -> real.jsonl): its lock was taken beside the link, so a run
    naming real.jsonl appended to the same log at the same time; a link to a log not yet there
    was deleted, the log written in its place and an empty real.jsonl left."""
    src, out = dirs
    make_inputs(src, 2)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "link.jsonl").symlink_to("real.jsonl")
    with hold(logs / ".real.jsonl.log.lock", fcntl.LOCK_EX):  # a run naming real.jsonl
        run = run_fake(src, out, "--run_log", str(logs / "link.jsonl"))
        assert run.code == 75 and "run log" in run.stderr, run.stderr
    assert run_fake(src, out, "--run_log", str(logs / "link.jsonl")).code == 0
    assert (logs / "link.jsonl").is_symlink() and len((logs / "real.jsonl").read_text().splitlines()) >= 2
    again = run_fake(src, out, "--run_log", str(logs / "real.jsonl"))
    assert again.code == 0 and "2 skipped" in again.stderr, again.stderr


@pytest.mark.parametrize("spelled", ["default", "given"])
def test_a_run_log_with_a_second_name_gets_a_file_of_its_own(dirs, tmp_path, spelled):
    """A run log hard-linked elsewhere (`cp -al out backup`, rsnapshot; or a second --run_log
    name) was appended to under both names, each name with a lock of its own: the backup's copy
    changed, and two runs could append to one file. The run gives it a file of its own first."""
    src, out = dirs
    make_inputs(src, 1)
    log = out / "infer_mp.runlog.jsonl" if spelled == "default" else tmp_path / "a.jsonl"
    extra = () if spelled == "default" else ("--run_log", str(log))
    assert run_fake(src, out, *extra).code == 0
    other = tmp_path / "backup.jsonl"
    os.link(log, other)
    before = other.read_bytes()
    write(src / "new.png", "new")
    run = run_fake(src, out, *extra)
    assert run.code == 0 and "1 done" in run.stderr and "1 skipped" in run.stderr, run.stderr
    assert other.read_bytes() == before and not os.path.samefile(log, other)
    assert "0 input(s) to do" in run_fake(src, out, *extra).stderr


def test_a_shard_with_a_run_log_the_other_shards_do_not_read_is_told(dirs, tmp_path):
    """Shards read each other's logs in --output_dir by their pattern when they start, and by
    their default names as they run: a shard given another --run_log ran unseen, and another
    shard could delete its file as a leftover."""
    src, out = dirs
    write(src / "a.png", "A")
    note = "is not where the other shards look"
    for log, told in [(tmp_path / "shard0.jsonl", True), (out / "shard0.jsonl", True),
                      (out / "infer_mp.zero.runlog.jsonl", True), (out / "infer_mp.shard-0-of-2.runlog.jsonl", False),
                      (None, False)]:
        run = run_fake(src, out, "--shard", "0/2", *(("--run_log", str(log)) if log else ()))
        assert run.code == 0 and (note in run.stderr) == told, (log, run.stderr)
    assert note not in run_fake(src, out, "--run_log", str(tmp_path / "all.jsonl")).stderr  # (no shard: one log)


def test_a_run_log_where_a_subfolders_outputs_go_is_refused(tmp_path):
    """--recursive --run_log out/sub, beside inputs in/sub/: every run failed in/sub/b.png as
    'a file is where this output folder goes', for good, blaming an earlier output."""
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "a.png", "A")
    write(src / "sub" / "b.png", "B")
    run = run_fake(src, out, "--recursive", "--run_log", str(out / "sub"))
    assert run.code == 2 and "--run_log" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (out / "sub").exists() and not (out / "a.json").exists()


@pytest.mark.parametrize("listed", [False, True])
def test_an_input_that_is_a_link_to_the_run_log_is_not_an_input(tmp_path, listed):
    """in/b.png -> ../log.jsonl with --run_log log.jsonl: the log was taken for a scan, and
    redone by every run (the log grows)."""
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "a.png", "A")
    log = tmp_path / "log.jsonl"
    log.write_text("")
    (src / "b.png").symlink_to(log)
    (tmp_path / "list.txt").write_text(f"{src / 'a.png'}\n{src / 'b.png'}\n")
    how = ("--input_list", str(tmp_path / "list.txt")) if listed else ("--input_dir", str(src))
    args = ["--pipeline", FAKE, *how, "--device", "cpu", "--output_dir", str(out), "--run_log", str(log)]
    first = run_cli(*args)
    assert first.code == 0 and "1 done" in first.stderr and "1 ignored" in first.stderr, first.stderr
    assert not (out / "b.json").exists()
    again = run_cli(*args)
    assert again.code == 0 and "0 input(s) to do" in again.stderr, again.stderr


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_run_log_that_links_to_an_input_never_changes_it(tmp_path, link):
    """--run_log run.jsonl, a link (symbolic or hard) to an input: the input was appended to."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 1)
    scan = next(src.iterdir())
    before = scan.read_bytes()
    (tmp_path / "run.jsonl").symlink_to(scan) if link == "symbolic" else os.link(scan, tmp_path / "run.jsonl")
    run = run_fake(src, out, "--run_log", str(tmp_path / "run.jsonl"))
    if link == "symbolic":  # (a hard link says nothing of what else the file is: it gets a file of its own)
        assert run.code == 2 and "--run_log" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert scan.read_bytes() == before


def test_a_record_naming_an_input_as_a_picture_never_overwrites_it(tmp_path):
    """Inputs inside the output folder, mirrored back into it (--recursive --save img): a scan
    lies where in/a.png's picture goes. A hand-edited record listing that scan as a.png's
    picture made the next run overwrite the scan with the picture."""
    out = tmp_path / "out"
    src = out / "in"
    write(src / "in" / "a.png", "A")
    write(src / "a_vis.png", "REAL SCAN")
    flags = ("--recursive", "--save", "img")
    assert run_fake(src, out, *flags).code == 1  # (a.png's picture would replace an input: it fails)
    log = out / "infer_mp.runlog.jsonl"
    record = {"time": "2030-01-01T00:00:00+00:00", "gen": 99, "input": str(src / "in" / "a.png"), "status": "done",
              "pages": 1, "outputs": ["in/a.json"], "extra_outputs": ["in/a_vis.png"]}
    with log.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    write(src / "in" / "a.png", "A2")
    run = run_fake(src, out, *flags)
    assert "Traceback" not in run.stderr, run.stderr
    assert (src / "a_vis.png").read_text() == "REAL SCAN"


def test_inputs_in_the_staging_folder_are_refused_not_deleted(tmp_path):
    """--input_dir out/.infer_mp.staging: the run emptied the staging folder at its start, so
    it deleted its inputs, then failed them (exit 1)."""
    out = tmp_path / "out"
    staging = out / ".infer_mp.staging"
    make_inputs(staging, 2)
    before = sorted(path.name for path in staging.iterdir())
    for src in (staging, staging / ".." / ".infer_mp.staging"):
        run = run_fake(src, out)
        assert run.code == 2 and "--input_dir" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert sorted(path.name for path in staging.iterdir()) == before


def test_a_run_log_write_error_of_any_kind_is_an_environment_stop(tmp_path):
    log = infer_mp.RunLog(tmp_path / "log.jsonl", tmp_path)

    class Broken:
        def write(self, data):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    log.handle = Broken()
    task = infer_mp.Task(0, str(tmp_path / "a.png"), "a.png", str(tmp_path), "a")
    with pytest.raises(infer_mp.OutputFailed, match="Input/output error"):
        log.write(task, infer_mp.DONE)


def test_the_signal_handler_only_sets_flags(capsys):
    stop = infer_mp.Stopper()
    stop._on_signal(signal.SIGTERM, None)
    assert stop.requested and capsys.readouterr().err == ""
    assert "SIGTERM: starting no new inputs" in stop.announcement()
    assert stop.announcement() is None  # said once


def test_a_stop_that_came_as_the_work_ended_changes_nothing():
    """A SIGTERM after the last input was done, before the dispatch loop saw it: the run said
    nothing of it, left nothing undone, and exited 143."""
    stop = infer_mp.Stopper()
    stop._on_signal(signal.SIGTERM, None)
    report = infer_mp.Report(0, 0, 0, None, infer_mp.Progress(0, 0, 3600))
    assert report.exit_code(stop) == infer_mp.ExitCode.OK
    stop.announcement()  # (taken in by the loop: it stops the work)
    assert report.exit_code(stop) == infer_mp.ExitCode.TERMINATED


def test_the_stop_line_names_both_ways_to_stop_at_once():
    """After a SIGTERM it said "press Ctrl-C again", to a run that no terminal may hold."""
    stop = infer_mp.Stopper()
    stop._on_signal(signal.SIGTERM, None)
    assert stop.announcement().endswith("(a second Ctrl-C or SIGTERM stops now)")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_ignored_when_the_run_started_stays_ignored(tmp_path, signum):
    """`nohup` or a script's `cmd &` starts a run with SIGINT ignored: it was ignored until the
    dispatch began and then stopped the run. SIGTERM still stops it cleanly (docs/runs.md)."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 4)
    busy = tmp_path / "busy.jsonl"
    command = [sys.executable, str(SCRIPT), *fake_args(src, out)]
    env = {**os.environ, "FAKE_PIPELINE_BUSY_LOG": str(busy), "FAKE_PIPELINE_DELAY": "0.5"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(busy.exists, 60)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    if signum == signal.SIGTERM:
        assert process.returncode == 143 and "not processed (interrupted)" in stderr, stderr
        assert "Traceback" not in stderr and len(outputs(out)) < 4
        return
    assert process.returncode == 0 and "SIGINT" not in stderr, stderr
    assert len(outputs(out)) == 4


# -- starts and crashes ----------------------------------------------------------------------------


def test_a_start_that_never_finishes_does_not_hang_the_run(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 2)
    env = {"FAKE_PIPELINE_STARTS": str(tmp_path / "starts"), "FAKE_PIPELINE_HANG_STARTS": "1"}
    run = run_fake(src, out, "--start_timeout", "2", env=env, timeout=60)
    assert run.code == 3, run.stderr
    assert "did not start within 2 s (--start_timeout)" in run.stderr and "2 not processed" in run.stderr


def test_a_start_later_than_its_timeout_counts_as_failed_even_between_polls(dirs):
    """A start of 0.6 s against --start_timeout 0.2: the coordinator wakes at the timeout, not
    at its next one-second poll, by which time the worker has reported ready."""
    src, out = dirs
    make_inputs(src, 1)
    run = run_fake(src, out, "--start_timeout", "0.2", env={"FAKE_PIPELINE_START_DELAY": "0.6"}, timeout=60)
    assert run.code == 3, run.stderr
    assert "did not start within 0.2 s (--start_timeout)" in run.stderr and "1 not processed" in run.stderr
    assert not page_files(out)


def test_a_batch_reported_in_time_is_not_timed_out_by_a_coordinator_that_was_busy(dirs, tmp_path):
    """The coordinator is held (SIGSTOP, as a slow disk or a swapped-out process holds it) while
    the worker reports its batch in time; it wakes past the batch's --task_timeout. The report
    restarts the clock: the files' placing is the coordinator's time, not the worker's."""
    src, out = dirs
    make_inputs(src, 1)
    busy, gate = tmp_path / "busy.jsonl", tmp_path / "gate"
    process = start_fake(src, out, "--task_timeout", "2",
                         env={"FAKE_PIPELINE_BUSY_LOG": str(busy), "FAKE_PIPELINE_GATE": str(gate)})
    wait_for(busy.exists)
    os.kill(process.pid, signal.SIGSTOP)
    try:
        gate.touch()  # the batch ends at once, its report waits in the pipe
        time.sleep(3)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and "timed out" not in stderr, stderr
    assert [(r["status"], r["attempts"]) for r in run_log(out)] == [("done", 1)]
    assert_invariant(src, out)


def test_a_worker_past_its_deadline_whose_report_waits_unread_is_not_killed():
    """Two workers past their batches' --task_timeout; one's report came in time, while the
    coordinator was busy, and waits in its pipe: that one is read first, only the other is
    killed."""
    killed = []
    backend = infer_mp.LocalBackend.__new__(infer_mp.LocalBackend)
    backend.start_timeout, backend.task_timeout = None, 1.0
    workers, pipes = {}, []
    for slot in range(2):
        ours, theirs = multiprocessing.Pipe()
        pipes.append(theirs)
        workers[slot] = infer_mp.LocalWorker(
            spec=slot, started_at=0.0, ready=True, held={0: SimpleNamespace(weight=1)},
            busy_since=time.monotonic() - 5, process=SimpleNamespace(kill=lambda slot=slot: killed.append(slot)),
            conn=ours)
    backend.workers = workers
    pipes[0].send("report")
    backend._kill_overdue_workers()
    assert killed == [1] and workers[0].timed_out is None and workers[1].timed_out == 1.0


@pytest.mark.parametrize("word, reason", [("SEVER", "closed its pipe to the coordinator"),
                                          ("DETACH", "timed out (no result within 3 s"),
                                          ("FORKCRASH", "was killed by SIGKILL"),
                                          ("SEVERFORK", "closed its pipe to the coordinator"),
                                          ("HALFSEND", "was killed by SIGKILL")])
def test_a_worker_cut_off_from_the_coordinator_is_lost_not_waited_for(dirs, tmp_path, word, reason):
    """A library in the worker closes the descriptors it inherited, then hangs: SEVER, its pipe
    to the coordinator, which then polled readable for ever (the coordinator spun); DETACH, its
    sentinel's, which then read as an exit, and the join that followed waited for ever (it is a
    hang like any other now: --task_timeout ends it). A process the pipeline forked (a
    fork-based pool's) holds copies of the worker's pipes: FORKCRASH, the worker is killed (the
    OOM killer) and neither pipe tells; SEVERFORK, it closes its pipe and hangs, and no sentinel
    comes after its kill; HALFSEND, the worker is killed as it sends a message, whose rest the
    coordinator waited for (no stop could end that wait). Each run went on for ever, whatever
    --task_timeout said; now each worker is lost, and its input charged as for a crash."""
    src, out = dirs
    make_inputs(src, 1)
    write(src / "x.png", word)
    pids = tmp_path / "helpers"
    try:
        run = run_fake(src, out, "--max_attempts", "1", "--task_timeout", "3", timeout=45,
                       env={"FAKE_PIPELINE_HELPER_PIDS": str(pids)})
    finally:
        for pid in pids.read_text().split() if pids.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert run.code == 1 and reason in run.stderr, run.stderr
    assert {Path(r["input"]).name: r["status"] for r in run_log(out)} == {"p00.png": "done", "x.png": "failed"}
    assert_invariant(src, out)


def run_held(src: Path, out: Path, tmp_path: Path, *options: str, env: dict | None = None) -> tuple[int, str]:
    """(exit code, stderr) of a run whose workers the fake pipeline holds at their exit once
    killed (UNKILLABLE, FAKE_PIPELINE_HOLD_AT_IMPORT): in the background, as a held worker keeps
    the run's stdout open; the helpers that hold them are ended after. Skipped where a process
    may not trace its parent."""
    pids = tmp_path / "helpers"
    run = start_fake(src, out, *options, env={"FAKE_PIPELINE_HELPER_PIDS": str(pids), **(env or {})})
    try:
        exit_code = run.wait(60)
    finally:
        for pid in pids.read_text().split() if pids.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    if "ptrace not permitted" in run.stderr_text():
        pytest.skip("this machine does not let a process trace its parent (the fake's hold needs it)")
    return exit_code, run.stderr_text()


STUCK_LINE = "did not exit within 10 s of its SIGKILL (stuck in the kernel"


@pytest.mark.parametrize("word, options, code, done", [
    ("UNKILLABLE", (), 0, {"p00.png": "done", "x.png": "done"}),
    ("UNKILLABLE HANG", ("--task_timeout", "2", "--max_attempts", "1"), 1, {"p00.png": "done", "x.png": "failed"}),
])
def test_a_worker_stuck_after_its_kill_does_not_hold_the_run(dirs, tmp_path, word, options, code, done):
    """A worker inside a GPU driver call, or on a hung network filesystem, when its SIGKILL
    comes does not exit until that call returns, which may be never. UNKILLABLE holds the worker
    so: killed at the run's end (idle), the run waited for it for ever, and Python's exit too;
    killed for its --task_timeout (HANG), its input was never handed back, and the run went on for
    ever. Now it is let go of after KILL_WAIT_SECONDS (10 s), said in one line, and the run ends."""
    src, out = dirs
    make_inputs(src, 1)
    write(src / "x.png", word)
    started = time.monotonic()
    exit_code, stderr = run_held(src, out, tmp_path, *options)
    assert exit_code == code and STUCK_LINE in stderr, stderr
    assert time.monotonic() - started < 40
    assert {Path(r["input"]).name: r["status"] for r in run_log(out)} == done
    assert_invariant(src, out)


def test_a_warm_worker_stuck_after_its_kill_does_not_hold_a_refused_run(dirs, tmp_path):
    """The same for a worker started warm (see WarmPool) and killed as the run is refused (a GPU
    asked for on a machine without one): the refusal waited for it, and Python's exit too."""
    src, out = dirs
    make_inputs(src, 1)
    exit_code, stderr = run_held(src, out, tmp_path, "--device", "gpu:0", env={"FAKE_PIPELINE_HOLD_AT_IMPORT": "1"})
    assert exit_code == 2 and STUCK_LINE in stderr, stderr


def test_a_worker_stuck_after_a_failed_start_does_not_hold_the_others(dirs, tmp_path):
    """Review finding: a worker whose pipeline could not start (a CUDA OOM) was killed and
    waited for inside the coordinator's loop; stuck, it held every other worker without work
    for 10 s. It is now let go of while the others go on: no gap of seconds between pages."""
    src, out = dirs
    make_inputs(src, 12)
    pages = tmp_path / "pages"
    env = {"FAKE_PIPELINE_HOLD_AT_IMPORT": "1", "FAKE_PIPELINE_STARTS": str(tmp_path / "starts"),
           "FAKE_PIPELINE_FAIL_STARTS": "2", "FAKE_PIPELINE_DELAY": "0.5", "FAKE_PIPELINE_PAGE_LOG": str(pages)}
    exit_code, stderr = run_held(src, out, tmp_path, "--instances_per_device", "2", env=env)
    assert exit_code == 0 and "could not start its pipeline" in stderr and STUCK_LINE in stderr, stderr
    starts = sorted(json.loads(line)["start"] for line in pages.read_text().splitlines())
    assert len(starts) == 12 and max(b - a for a, b in zip(starts, starts[1:])) < 5, starts
    assert_invariant(src, out)


def test_a_run_whose_stderr_reader_is_gone_ends_though_a_worker_is_stuck(dirs, tmp_path):
    """Review finding: `| head -n 2` on stderr; the line that says a worker is let go of met a
    closed pipe, and the exception that followed took the run past its exit, into Python's,
    which waited for the stuck worker for ever."""
    src, out = dirs
    make_inputs(src, 1)
    write(src / "x.png", "UNKILLABLE HANG")
    pids = tmp_path / "helpers"
    env = {**os.environ, "FAKE_PIPELINE_HELPER_PIDS": str(pids)}
    run = subprocess.Popen([sys.executable, str(SCRIPT), *fake_args(src, out, "--task_timeout", "2",
                            "--max_attempts", "1")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert b"ready" in run.stderr.readline() + run.stderr.readline()
        run.stderr.close()  # (as `head -n 2` does)
        exit_code = run.wait(60)
    finally:
        run.kill()
        for pid in pids.read_text().split() if pids.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert exit_code != 0


def test_a_message_whose_rest_did_not_come_is_the_end_of_its_workers_pipe(dirs):
    """HALFSTALL: the worker sends the start of a message, and nothing more for 5.5 s: the
    coordinator's read gives up after RECEIVE_TIMEOUT_SECONDS (5 s), and the worker is cut off.
    What it sent next was read from the middle of the first message: an UnpicklingError, and
    the run died with a traceback. The pipe is not read again."""
    src, out = dirs
    make_inputs(src, 1)
    write(src / "x.png", "HALFSTALL")
    run = run_fake(src, out, "--max_attempts", "1", timeout=60)
    assert run.code == 1 and "closed its pipe to the coordinator" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert {Path(r["input"]).name: r["status"] for r in run_log(out)} == {"p00.png": "done", "x.png": "failed"}
    assert_invariant(src, out)


def test_an_input_handed_back_goes_to_a_live_worker_not_one_killed_for_its_ended_pipes(dirs, tmp_path):
    """Worker A reads z.png, then a library in it closes its pipes (its sentinel's among them).
    Meanwhile worker B dies holding [a.png, b.png] (a batch: neither is charged, each goes back
    alone). A was cut off then, and killed 1 s later: a.png, sent to it, was charged with its
    kill (failed, under --max_attempts 1). A is not killed now (only an ended message pipe cuts
    a worker off), and a.png is done."""
    src, out = dirs
    write(src / "a.png", "fine")
    write(src / "b.png", "DOOM")
    write(src / "z.png", "UNPIPE")
    run = run_fake(src, out, "--instances_per_device", "2", "--batch_size", "2", "--max_attempts", "1",
                   timeout=90, env={"FAKE_PIPELINE_BARRIER": f"{tmp_path / 'barrier'}:2"})
    assert run.code == 1, run.stderr
    assert {Path(r["input"]).name: r["status"] for r in latest_records(out).values()} == {
        "a.png": "done", "b.png": "failed", "z.png": "done"}, run.stderr
    assert_invariant(src, out)


def test_a_pipeline_that_closes_its_sentinel_as_it_is_built_works_and_its_death_is_seen(dirs):
    """Its sentinel ends as it starts: it was counted a failed start (a Ready read later made its
    slot start again for ever, before that). The worker can still report: it does its inputs,
    and its death is seen by its exit status."""
    src, out = dirs
    make_inputs(src, 1)
    write(src / "crash.png", "CRASH")
    run = run_fake(src, out, "--pipeline_arg", "close_pipes=1", "--max_attempts", "1", timeout=60)
    assert run.code == 1 and "was killed by SIGKILL" in run.stderr, run.stderr
    assert {Path(r["input"]).name: r["status"] for r in latest_records(out).values()} == {
        "p00.png": "done", "crash.png": "failed"}, run.stderr
    assert_invariant(src, out)


def test_a_pipeline_that_closes_its_sentinel_as_it_is_built_is_not_held_idle(dirs):
    """Each new worker's sentinel ends as its pipeline is built, and the worker was given no
    batch for 1 s after that: with a worker per input, 1 s an input (10 s here, against about
    2 s without close_pipes). (A bound on seconds, generous: the difference is fivefold.)"""
    src, out = dirs
    make_inputs(src, 10)
    started = time.monotonic()
    run = run_fake(src, out, "--max_items_per_worker", "1", "--pipeline_arg", "close_pipes=1", timeout=120)
    assert run.code == 0, run.stderr
    assert time.monotonic() - started < 8, run.stderr
    assert_invariant(src, out)


@pytest.mark.parametrize("delay", ["0.4", "1.0"])
def test_what_a_worker_reports_after_its_sentinel_ended_is_read_while_it_lives(dirs, delay):
    """The library in the worker closes its sentinel 0.6 s into a.png (UNPIPE) and the worker
    goes on. Its pipe was no longer read, and the worker was killed 1 s later: what it reported
    meanwhile (a.png at 1 s; or b.png, sent to it after a.png at 0.4 s) was read only after its
    death, given a `placing` line and a move to a dead process, and the input charged with
    the kill (failed, under --max_attempts 1)."""
    src, out = dirs
    write(src / "a.png", "UNPIPE")
    write(src / "b.png", "fine")
    run = run_fake(src, out, "--max_attempts", "1", timeout=60, env={"FAKE_PIPELINE_DELAY": delay})
    assert run.code == 0, run.stderr
    assert {Path(r["input"]).name: r["status"] for r in latest_records(out).values()} == {
        "a.png": "done", "b.png": "done"}, run.stderr
    placed = [r["input"] for r in all_records(out, placing=True) if r["status"] == "placing"]
    assert sorted(placed) == [str(src / "a.png"), str(src / "b.png")]  # (a dead worker is told nothing)
    assert_invariant(src, out)


def test_a_batch_reported_during_a_stops_wait_for_renames_is_not_placed():
    """A stop waits for the renames it asked for (see Backend._renaming); a batch reported
    meanwhile is not told where to go: its worker would be killed mid-rename at the wait's end,
    leaving files in place with no record."""
    ours, theirs = multiprocessing.Pipe()
    backend = infer_mp.LocalBackend.__new__(infer_mp.LocalBackend)
    backend.renaming_since, backend.handed = time.monotonic(), defaultdict(int)
    worker = infer_mp.LocalWorker(spec=0, started_at=0.0, ready=True, held={0: SimpleNamespace(weight=1, index=0)},
                                  process=None, conn=ours)
    report = infer_mp.Saved(0, "/nowhere", "p", ["p.json"], [], 0.1, {}, [None])
    assert list(backend._handle(worker, infer_mp.Reports([report]))) == []
    assert not worker.placing and 0 in worker.held and not theirs.poll()


def test_a_worker_that_cannot_be_written_to_is_cut_off_not_waited_for():
    """Review: a message to a live worker that could not be written was passed over, as for a
    dead one: the worker waited for its moves, the coordinator for its answer, for ever (an
    injected full disk's write error on the pipe). It is cut off now (killed after
    SEVERED_WAIT_SECONDS, what it held requeued); a dead one's sentinel says it as before."""
    def refuse(message):
        raise OSError(errno.ENOSPC, "No space left on device")

    backend = infer_mp.LocalBackend.__new__(infer_mp.LocalBackend)
    for send, message in ((backend._send, []), (backend._send_moves, {})):
        worker = infer_mp.LocalWorker(spec=0, started_at=0.0, ready=True, process=None,
                                      conn=SimpleNamespace(send=refuse))
        send(worker, message)
        assert worker.cut_off_at is not None


def test_a_stops_wait_for_renames_ends_on_time():
    """The loop waited for messages up to POLL_SECONDS (1 s) at a time, so a stop's 2 s wait
    for renames (see Backend._renaming) could end up to 1 s late: it waits only what is left."""
    backend = infer_mp.LocalBackend.__new__(infer_mp.LocalBackend)
    backend.workers, backend.task_timeout, backend.start_timeout = {}, None, None
    backend.renaming_since = time.monotonic() - (infer_mp.RENAME_WAIT_SECONDS - 0.25)
    assert backend._wait_seconds() <= 0.25
    backend.renaming_since = time.monotonic() - infer_mp.RENAME_WAIT_SECONDS
    assert backend._wait_seconds() == 0


def test_a_pipeline_whose_import_blocks_does_not_hang_a_run_given_options(dirs, tmp_path):
    """The warm worker checks the options; when its import blocks past --start_timeout, the
    coordinator checked them itself, importing the module, and blocked for good."""
    src, out = dirs
    make_inputs(src, 2)
    (tmp_path / "blocks.py").write_text("import time\ntime.sleep(600)\n\nclass Pipeline:\n    pass\n")
    run = run_cli("--pipeline", f"{tmp_path / 'blocks.py'}:Pipeline", "--device", "cpu", "--input_dir", str(src),
                  "--output_dir", str(out), "--pipeline_arg", "language=fr", "--start_timeout", "2", timeout=90)
    assert run.code == 3, run.stderr
    assert "did not start within 2 s (--start_timeout)" in run.stderr and "Traceback" not in run.stderr


def test_a_replacement_that_fails_to_start_is_tried_again(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 12)
    env = {"FAKE_PIPELINE_STARTS": str(tmp_path / "starts"), "FAKE_PIPELINE_FAIL_STARTS": "2"}
    run = run_fake(src, out, "--max_items_per_worker", "3", env=env)
    assert run.code == 0, run.stderr
    assert "fake pipeline start 2 fails" in run.stderr and "starting another (try 2 of 3)" in run.stderr
    assert len(page_files(out)) == 12
    assert_invariant(src, out)


def test_a_hung_replacement_is_tried_again(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 4)
    env = {"FAKE_PIPELINE_STARTS": str(tmp_path / "starts"), "FAKE_PIPELINE_HANG_STARTS": "2"}
    run = run_fake(src, out, "--max_items_per_worker", "2", "--start_timeout", "2", env=env, timeout=60)
    assert run.code == 0, run.stderr
    assert "did not start within 2 s" in run.stderr and len(page_files(out)) == 4


def test_a_crash_is_charged_to_the_input_that_causes_it(dirs):
    src, out = dirs
    make_inputs(src, 3)
    write(src / "p01x.png", "CRASH")
    run = run_fake(src, out, "--batch_size", "4", "--max_attempts", "1")
    assert run.code == 1, run.stderr
    status = {Path(r["input"]).name: r["status"] for r in run_log(out)}
    assert status == {"p00.png": "done", "p01.png": "done", "p01x.png": "failed", "p02.png": "done"}
    assert_invariant(src, out)


def test_a_hung_batch_is_charged_to_the_input_that_hangs(dirs):
    src, out = dirs
    make_inputs(src, 3)
    write(src / "p01x.png", "HANG")
    run = run_fake(src, out, "--batch_size", "4", "--max_attempts", "1", "--task_timeout", "1", timeout=60)
    assert run.code == 1, run.stderr
    failed = [Path(r["input"]).name for r in run_log(out) if r["status"] == "failed"]
    assert failed == ["p01x.png"] and len(page_files(out)) == 3


# -- the invariant, however a run ends ----------------------------------------------------------------

LOOKALIKES = {  # names that share stems and page-like suffixes, some of them failing
    "scan.png": "CRASH", "scan_1.png": "one", "scan_2.png": "two", "scan_1.pdf": pdf_bytes(["page", "page"]),
    "b.pdf": pdf_bytes(["page", "page", "page"]), "b_1.pdf": pdf_bytes(["RAISE"]), "b_01.png": "not a page of b",
    "c.tif": tiff_bytes(1), "c_0_1.png": "zero one", "d.png": "HANG", "d_0.png": "dee",
}


@pytest.mark.parametrize("ending", ["finished", "sigterm", "kill -9"])
def test_every_done_output_exists_and_every_output_has_one_input(dirs, ending):
    src, out = dirs
    for name, content in LOOKALIKES.items():
        write(src / name, content)
    args = ("--batch_size", "3", "--instances_per_device", "2", "--max_attempts", "1", "--task_timeout", "1")
    preload = {"FAKE_PIPELINE_PRELOAD": "1"}  # PaddleX's sampler imported at start: no PDF times out importing it
    if ending == "finished":
        assert run_fake(src, out, *args, env=preload, timeout=120).code == 1
    else:
        process = start_fake(src, out, *args, env={"FAKE_PIPELINE_DELAY": "0.3", **preload})
        wait_for(lambda: len(page_files(out)) >= 3)
        process.send_signal(signal.SIGTERM) if ending == "sigterm" else process.kill()
        process.communicate(timeout=60)
    assert_invariant(src, out, killed=ending == "kill -9")  # its staging folder: removed by the next run
    failing = {"scan.png", "b_1.pdf", "d.png"}
    failed_before = {Path(r["input"]).name for r in latest_records(out).values() if r["status"] == "failed"}
    rest = run_fake(src, out, *args, env=preload, timeout=120)  # exit 1 exactly when it finds a new failure
    assert rest.code == (0 if failed_before == failing else 1), rest.stderr
    assert_invariant(src, out)
    retried = run_fake(src, out, *args, "--retry_failed", env=preload, timeout=120)
    assert retried.code == 1 and retried.stderr.count("FAILED") == 3, retried.stderr  # the same three fail again
    assert_invariant(src, out)
    again = run_fake(src, out, *args, env=preload, timeout=120)
    assert again.code == 0 and "0 input(s) to do" in again.stderr and "3 failed before" in again.stderr, again.stderr
    done = {Path(r["input"]).name for r in latest_records(out).values() if r["status"] == "done"}
    assert done == set(LOOKALIKES) - failing


# -- review findings: partial selections, shrinking inputs, hand-edited logs -----------------------


def test_a_list_of_new_files_does_not_take_a_finished_output_name(dirs, tmp_path):
    src, out = dirs
    write(src / "a.jpg", "JPG")
    jpg_list = write(tmp_path / "jpg.txt", f"{src / 'a.jpg'}\n")
    assert run_fake(src, out, "--input_list", str(jpg_list)).code == 0
    write(src / "a.png", "PNG")
    png_list = write(tmp_path / "png.txt", f"{src / 'a.png'}\n")  # what `find -newer` gives
    assert run_fake(src, out, "--input_list", str(png_list)).code == 0
    assert json.loads((out / "a.json").read_text())["text"] == "JPG"
    assert json.loads((out / "a.png.json").read_text())["text"] == "PNG"
    assert_invariant(src, out)


def test_a_moved_away_input_keeps_its_output(dirs, tmp_path):
    src, out = dirs
    write(src / "a.jpg", "JPG")
    assert run_fake(src, out).code == 0
    (src / "a.jpg").rename(tmp_path / "a.jpg")
    write(src / "a.png", "CRASH")
    assert run_fake(src, out, "--max_attempts", "1").code == 1
    assert json.loads((out / "a.json").read_text())["text"] == "JPG"


def test_a_shorter_new_version_leaves_no_old_page(dirs):
    src, out = dirs
    doc = write(src / "b.pdf", pdf_bytes(["page a", "page b", "page c"]))
    assert run_fake(src, out).code == 0
    doc.write_bytes(pdf_bytes(["page NEW"]))
    run = run_fake(src, out)
    assert run.code == 0 and "retired 2 stale output" in run.stderr
    assert page_files(out) == ["b_0.json"]
    assert_invariant(src, out)


def test_a_changed_input_that_fails_keeps_no_old_text(dirs):
    src, out = dirs
    changed = write(src / "a.png", "hello")
    assert run_fake(src, out).code == 0
    changed.write_text("RAISE now")
    assert run_fake(src, out).code == 1
    assert page_files(out) == []
    assert_invariant(src, out)


def test_a_stop_during_overwrite_keeps_the_finished_pages(dirs, tmp_path):
    src, out = dirs
    write(src / "d.pdf", pdf_bytes(["page 1", "page 2"]))
    assert run_fake(src, out).code == 0
    before = outputs(out)
    busy = tmp_path / "busy.jsonl"
    process = start_fake(src, out, "--overwrite", env={"FAKE_PIPELINE_BUSY_LOG": str(busy),
                                                       "FAKE_PIPELINE_GATE": str(tmp_path / "never")})
    wait_for(busy.exists)  # the worker holds the document's pages, and will not let go
    process.send_signal(signal.SIGTERM)
    process.wait_for_stderr("starting no new inputs")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "1 not processed (interrupted)" in stderr, stderr
    assert outputs(out) == before
    assert_invariant(src, out)


def test_hand_edited_records_are_passed_over(dirs):
    src, out = dirs
    make_inputs(src, 2)
    assert run_fake(src, out).code == 0
    log = out / "infer_mp.runlog.jsonl"
    for listed in (5, [5], [{"a": 1}]):
        record = {"time": "2030-01-01T00:00:00+00:00", "input": str(src / "p01.png"), "status": "done",
                  "outputs": listed}
        with log.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    run = run_fake(src, out)
    assert run.code == 0 and "Traceback" not in run.stderr and "2 skipped" in run.stderr


def test_a_listed_file_that_stays_missing_fails_once(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 1)
    listing = write(tmp_path / "list.txt", f"{src / 'p00.png'}\n{src / 'gone.png'}\n")
    assert run_fake(src, out, "--input_list", str(listing)).code == 1
    imports = tmp_path / "imports.log"
    run = run_fake(src, out, "--input_list", str(listing), env={"FAKE_PIPELINE_IMPORT_LOG": str(imports)})
    assert run.code == 0 and "1 failed before" in run.stderr and not imports.exists()


def test_retirement_never_deletes_an_input(tmp_path):
    out = tmp_path / "out"
    src = out / "scans"  # inputs inside the output folder, as docs/usage.md allows
    write(src / "a.png", "A")
    write(src / "b.png", "B")
    assert run_fake(src, out).code == 0
    record = {**run_log(out)[0], "time": "2030-01-01T00:00:00+00:00",
              "outputs": ["scans/b.png", "scans/a.png", "a.json"]}
    record["input"] = str(src / "a.png")
    with (out / "infer_mp.runlog.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    run = run_fake(src, out, "--overwrite")
    assert run.code == 0 and "2 done" in run.stderr, run.stderr
    assert (src / "a.png").read_text() == "A" and (src / "b.png").read_text() == "B"
    assert_invariant(src, out)


def test_a_failed_replacement_start_is_tried_again_even_with_one_attempt(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 12)
    env = {"FAKE_PIPELINE_STARTS": str(tmp_path / "starts"), "FAKE_PIPELINE_FAIL_STARTS": "2"}
    run = run_fake(src, out, "--max_items_per_worker", "3", "--max_attempts", "1", env=env)
    assert run.code == 0, run.stderr
    assert "start 2 fails (FAKE_PIPELINE_FAIL_STARTS)" in run.stderr  # the first replacement's start failed
    assert len((tmp_path / "starts").read_text().splitlines()) == 5  # 4 workers of 3 inputs each, 1 failed start
    assert len(page_files(out)) == 12 and {r["attempts"] for r in run_log(out)} == {1}


def test_a_file_changed_before_an_upgrade_is_redone(dirs):
    """An earlier version logged no size/mtime, and a `skipped` line per rerun, dated after a
    change it did not see: the change still counts."""
    src, out = dirs
    changed = write(src / "a.png", "new text")
    os.utime(changed, (1_700_000_100, 1_700_000_100))
    write(out / "a.json", json.dumps({"input_path": str(changed), "text": "old text"}))
    old = {"input": str(changed), "outputs": ["a.json"], "extra_outputs": [], "pages": 1, "error": None}
    lines = [{**old, "time": "2023-11-14T22:13:20+00:00", "status": "done"},  # 1,700,000,000: before the change
             {**old, "time": "2023-11-14T22:20:00+00:00", "status": "skipped"}]  # after it
    (out / "infer_mp.runlog.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = run_fake(src, out)
    assert run.code == 0 and "1 done" in run.stderr
    assert json.loads((out / "a.json").read_text())["text"] == "new text"


def test_a_record_of_a_version_without_size_counts_unchanged_if_the_file_is_not_newer(dirs):
    """docs/runs.md, Resume: a record written before size and mtime_ns existed (and before
    generations) counts as unchanged if the file is not newer than the record."""
    src, out = dirs
    kept = write(src / "a.png", "text")
    os.utime(kept, (1_700_000_000, 1_700_000_000))  # 2023-11-14T22:13:20: before the record
    write(out / "a.json", json.dumps({"input_path": str(kept), "text": "text"}))
    old = {"time": "2023-11-14T22:20:00+00:00", "input": str(kept), "status": "done", "pages": 1,
           "outputs": ["a.json"], "extra_outputs": [], "error": None}
    (out / "infer_mp.runlog.jsonl").write_text(json.dumps(old) + "\n")
    run = run_fake(src, out)
    assert run.code == 0 and "1 skipped" in run.stderr and "note:" not in run.stderr, run.stderr


def test_worker_counts_and_limits_are_not_pipeline_options(dirs):
    """docs/runs.md, Another pipeline: a rerun with other --instances_per_device, --cpu_threads
    or limits says nothing of another pipeline."""
    src, out = dirs
    make_inputs(src, 2)
    assert run_fake(src, out).code == 0
    run = run_fake(src, out, "--instances_per_device", "2", "--cpu_threads", "1", "--batch_size", "2",
                   "--task_timeout", "60", "--max_attempts", "1")
    assert run.code == 0 and "2 skipped" in run.stderr and "another --pipeline" not in run.stderr, run.stderr
    other = run_fake(src, out, "--pipeline_arg", "score_shift=0.1")  # (the check can fail)
    assert "note: 2 input(s) skipped (already done) come from a run with another --pipeline" in other.stderr


def test_runs_sharing_a_run_log_of_their_own_exclude_each_other(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 2)
    log = tmp_path / "logs" / "shared.jsonl"
    log.parent.mkdir()
    with hold(log.parent / ".shared.jsonl.log.lock", fcntl.LOCK_EX):  # a run into another folder
        run = run_fake(src, out, "--run_log", str(log))
        assert run.code == 75 and run.stderr.rstrip().endswith("give this run a --run_log of its own"), run.stderr
    assert run_fake(src, out, "--run_log", str(log)).code == 0


def test_one_run_log_for_two_output_folders_is_refused(dirs, tmp_path):
    """--run_log shared.jsonl for out/ and out2/: out2's records were taken for out's, so when
    a.png changed and out was redone, out2/a.json kept the old text for good, exit 0."""
    src, out = dirs
    out2, log = tmp_path / "out2", tmp_path / "shared.jsonl"
    write(src / "a.png", "v1")
    assert run_fake(src, out, "--run_log", str(log)).code == 0
    before = log.read_bytes()
    run = run_fake(src, out2, "--run_log", str(log))
    assert run.code == 2 and "holds the records of another output folder" in run.stderr, run.stderr
    assert log.read_bytes() == before and not out2.exists()
    closing = log.read_bytes().splitlines(keepends=True)[-1]
    log.write_bytes(log.read_bytes() + closing * 1100)  # many no-op reruns: compacted, it still says whose it is
    assert run_fake(src, out, "--run_log", str(log)).code == 0 and len(log.read_bytes().splitlines()) < 10
    assert run_fake(src, out2, "--run_log", str(log)).code == 2
    out.rename(tmp_path / "moved")  # the folder moved: the log goes with it
    assert run_fake(src, tmp_path / "moved", "--run_log", str(log)).code == 0
    (tmp_path / "moved").rename(tmp_path / "again")
    (tmp_path / "moved").mkdir()  # another folder where it was (`mv moved again; mkdir moved`): refused, as the
    assert run_fake(src, tmp_path / "again", "--run_log", str(log)).code == 2  # log cannot tell it from a second one


def test_one_run_log_for_two_output_folders_is_refused_after_a_killed_first_run(dirs, tmp_path):
    """Review: the first run into out/ was killed before its closing line: out2/ took its
    records for its own. Its `placing` lines name the folder too."""
    src, out = dirs
    log = tmp_path / "shared.jsonl"
    write(src / "a.png", "A")
    write(src / "b.png", "WAIT")
    first = start_fake(src, out, "--run_log", str(log), env={"FAKE_PIPELINE_WAIT_FILE": str(tmp_path / "gate")})
    wait_for(lambda: (out / "a.json").exists())
    first.signal_group(signal.SIGKILL)
    first.communicate(timeout=60)
    run = run_fake(src, tmp_path / "out2", "--run_log", str(log))
    assert run.code == 2 and "holds the records of another output folder" in run.stderr, run.stderr


@pytest.mark.parametrize("how", ["a subfolder's", "given by another folder's run", "default-named, given",
                                 "given, then renamed in the folder", "given, its folder gone"])
def test_another_folders_run_log_inside_the_output_folder_is_refused(dirs, tmp_path, how):
    """Review: a run log inside --output_dir was taken for the folder's own, whatever folder its
    lines named: out/sub's log given to a run into out (or out2's, given inside out with
    --run_log: under a run log's name every run into out reads it; under the default name, over
    out's own) had its a.jpg -> a.json taken for out's, and out/a.json, the user's own file, was
    retired once a.png came. (The third: out2 had a log of that name too, which a first fix took
    for the sign of a copy; the last two, a second fix took the log for one that came with its
    folder: renamed, it was not where it was written; and out2 gone, for out2 moved.)"""
    src, out = dirs
    write(src / "a.jpg", "A")
    extra: tuple[str, ...] = ()
    if how == "a subfolder's":
        log = out / "sub" / "infer_mp.runlog.jsonl"
        extra = ("--run_log", str(log))
        assert run_fake(src, out / "sub").code == 0
    else:
        log = out / ("infer_mp.v2.runlog.jsonl" if how == "given by another folder's run" else "infer_mp.runlog.jsonl")
        assert run_fake(src, tmp_path / "out2").code == 0  # (its own log, by the default name)
        assert run_fake(src, tmp_path / "out2", "--overwrite", "--run_log", str(log)).code == 0
        if how == "given, then renamed in the folder":
            log = log.rename(out / "infer_mp.from2.runlog.jsonl")
        elif how == "given, its folder gone":
            shutil.rmtree(tmp_path / "out2")
    user = write(out / "a.json", "the user's own file")
    write(src / "a.png", "A2")
    before = log.read_bytes()
    run = run_fake(src, out, *extra)
    assert run.code == 2 and "holds the records of another output folder" in run.stderr, run.stderr
    assert user.read_text() == "the user's own file" and log.read_bytes() == before


@pytest.mark.parametrize("flow", ["cp -r", "cp -r; rm its log", "mv; mkdir", "into a subfolder", "up from a subfolder",
                                  "mv; ln -s"])
def test_an_output_folder_copied_or_moved_keeps_its_run_log(dirs, tmp_path, flow):
    """A folder copied (`cp -r out copy`, its log with it) or moved goes on in its new place, the
    old one kept, emptied or made again. Review: a folder moved and linked from its old place
    (`mv out disk2/out; ln -s disk2/out out`) was refused for good, its --run_log naming the old
    spelling, compared as text; a first fix refused `mv out out2; mkdir out` and the others, as
    the old place had no log where the moved one is."""
    src, out = dirs
    write(src / "a.png", "A")
    outside = ("--run_log", str(tmp_path / "logs" / "run.jsonl")) if flow == "mv; ln -s" else ()
    assert run_fake(src, out, *outside).code == 0
    new = tmp_path / "new"
    if flow.startswith("cp -r"):
        shutil.copytree(out, new)
        if flow.endswith("rm its log"):
            (out / "infer_mp.runlog.jsonl").unlink()
    elif flow in ("into a subfolder", "up from a subfolder"):
        new = out / "v1"
        new.mkdir()
        for item in [*out.glob("*.json"), out / "infer_mp.runlog.jsonl"]:
            item.rename(new / item.name)
        if flow == "up from a subfolder":  # a run there, then its files moved up, the subfolder left empty
            assert run_fake(src, new).code == 0
            for item in [*new.glob("*.json"), new / "infer_mp.runlog.jsonl"]:
                item.rename(out / item.name)
            new = out
    else:
        out.rename(new)
        if flow == "mv; mkdir":
            out.mkdir()
        else:
            out.symlink_to(new)
    write(src / "a.png", "A2")
    run = run_fake(src, new, *outside)
    assert run.code == 0 and "1 done" in run.stderr, run.stderr
    assert json.loads((new / "a.json").read_text())["text"] == "A2"
    if flow == "mv; ln -s":
        run = run_fake(src, out, *outside)
        assert run.code == 0 and "1 skipped" in run.stderr, run.stderr


@pytest.mark.parametrize("shard", [None, "1/2"])
def test_a_run_log_named_like_the_folders_lock_is_not_refused_as_locked(dirs, shard):
    """--run_log out/infer_mp: its lock, `.infer_mp.lock`, was the folder's own, so every run was
    refused (exit 75) as if another run used the log; a shard's log named for its shard's lock too."""
    src, out = dirs
    make_inputs(src, 8)
    name = "infer_mp" if shard is None else "infer_mp.shard-1-of-2"
    extra = ("--run_log", str(out / name)) + (("--shard", shard) if shard else ())
    first = run_fake(src, out, *extra)
    assert first.code == 0 and " 0 done" not in first.stderr, first.stderr
    again = run_fake(src, out, *extra)
    assert again.code == 0 and " already done" in again.stderr and "0 input(s) to do" in again.stderr, again.stderr


def test_an_unwritable_run_log_is_refused_before_any_worker(dirs, faulty_disk, tmp_path):
    src, out = dirs
    make_inputs(src, 1)
    imports = tmp_path / "imports.log"
    run = run_fake(src, out, "--run_log", str(faulty_disk.path / "log.jsonl"),
                   env={**faulty_disk.env("EROFS"), "FAKE_PIPELINE_IMPORT_LOG": str(imports)})
    assert run.code == 2 and "cannot write the run log" in run.stderr and "Read-only file system" in run.stderr
    assert not imports.exists()


# -- second review -------------------------------------------------------------------------------


def test_a_renamed_input_never_shares_a_name_and_names_stay_put(dirs, tmp_path):
    src, out = dirs
    write(src / "doc.tif", tiff_bytes(1))
    assert run_fake(src, out).code == 0
    (src / "doc.tif").rename(tmp_path / "doc.tif")  # moved away: doc_0.json stays its
    write(src / "doc.pdf", pdf_bytes(["page PDF"]))
    write(src / "doc.pdf_0.png", "IMG")
    assert run_fake(src, out).code == 0
    first = page_files(out)
    run = run_fake(src, out)
    assert run.code == 0 and "0 input(s) to do" in run.stderr and page_files(out) == first
    assert json.loads((out / "doc_0.json").read_text())["text"] == "frame 0"  # the TIFF's
    assert_invariant(src, out, gone=("doc.tif",))


def test_a_deleted_output_subfolder_is_no_crash(dirs, tmp_path):
    src, out = dirs
    write(src / "sub" / "doc.tif", tiff_bytes(1))
    assert run_fake(src, out, "--recursive").code == 0
    (src / "sub" / "doc.tif").rename(tmp_path / "doc.tif")
    write(src / "sub" / "doc.pdf", pdf_bytes(["page PDF"]))
    shutil.rmtree(out / "sub")
    run = run_fake(src, out, "--recursive")
    assert run.code == 0 and "1 done" in run.stderr and "Traceback" not in run.stderr
    assert_invariant(src, out, gone=("doc.tif",))


def test_odd_records_are_no_crash(dirs):
    src, out = dirs
    make_inputs(src, 1)
    assert run_fake(src, out).code == 0
    record = {**run_log(out)[0], "time": "2030-01-01T00:00:00+00:00", "outputs": None, "extra_outputs": None}
    with (out / "infer_mp.runlog.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n" + "[" * 200000 + "\n")
    run = run_fake(src, out)
    assert run.code == 0 and "1 done" in run.stderr and "Traceback" not in run.stderr  # redone: its record says nothing
    assert_invariant(src, out)


def test_a_run_log_named_from_another_folder_is_locked(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 1)
    out.mkdir()
    with hold(out / ".infer_mp.runlog.jsonl.log.lock", fcntl.LOCK_EX):  # a run into `out` is going on
        run = run_fake(src, tmp_path / "out2", "--run_log", str(out / "infer_mp.runlog.jsonl"))
        assert run.code == 75 and "run log" in run.stderr


def test_a_rerun_with_another_pipeline_or_options_says_what_it_skips(dirs):
    """A rerun into a finished folder with another --pipeline_arg skips what is done, as any
    rerun does; it said nothing, and a user took the old text for the new options'."""
    src, out = dirs
    make_inputs(src, 2)
    write(src / "bad.png", "RAISE")
    assert run_fake(src, out, "--pipeline_arg", "score_shift=0", "--pipeline_arg", "delay=0").code == 1
    spelled = os.path.relpath(FAKE, src.parent)  # the same file, spelled from another folder; another order
    same = run_cli("--pipeline", spelled, "--input_dir", "in", "--device", "cpu", "--output_dir", "out",
                   "--pipeline_arg", "delay=0", "--pipeline_arg", "score_shift=0", cwd=src.parent)
    assert same.code == 0 and "note:" not in same.stderr, same.stderr
    for extra in ((), ("--dry_run",)):
        other = run_fake(src, out, "--pipeline_arg", "score_shift=0.1", *extra)
        assert other.code == 0, other.stderr
        assert ("note: 2 input(s) skipped (already done) and 1 input(s) failed before (not retried) come from a "
                "run with another --pipeline") in other.stderr
        assert "--overwrite redoes every input, --retry_failed the failed ones" in other.stderr, other.stderr
    redone = run_fake(src, out, "--pipeline_arg", "score_shift=0.1", "--overwrite")
    assert redone.code == 1 and "note:" not in redone.stderr
    assert "note:" not in run_fake(src, out, "--pipeline_arg", "score_shift=0.1").stderr


@pytest.mark.parametrize("good, kind", [(0, "image"), (1, "image"), (0, "document")])
def test_every_input_failing_the_same_way_is_said_to_look_like_the_pipelines_fault(dirs, good, kind):
    """A wrong option fails every input with one error, each recorded as that input's failure,
    which a plain rerun does not retry: the summary says so, and what to do, when all failed
    alike (not when some input was done)."""
    src, out = dirs
    for name in ("a", "b10", "c"):  # ("cannot decode input a.png", "... b10.png", ...)
        write(src / f"{name}.png", "RAISE") if kind == "image" else write(src / f"{name}.pdf", pdf_bytes(["RAISE"] * 2))
    make_inputs(src, good)
    run = run_fake(src, out)
    hint = "all 3 failed inputs failed the same way (such as "
    assert run.code == 1 and (hint in run.stderr) == (not good), run.stderr
    assert "fix it and rerun with --retry_failed" in run.stderr or good


def test_the_options_digest_takes_the_pipeline_however_it_is_spelled(tmp_path):
    tag = infer_mp.options_tag
    assert tag(make_config(pipeline="PaddleOCR")) == tag(make_config(pipeline="paddleocr:PaddleOCR"))
    assert tag(make_config(pipeline="PaddleOCR")) != tag(make_config(pipeline="PPStructureV3"))
    (tmp_path / "link").symlink_to(Path(FAKE.rpartition(":")[0]).parent)
    linked = f"{tmp_path}/link/fake_pipeline.py:FakePipeline"
    assert tag(make_config(pipeline=FAKE)) == tag(make_config(pipeline=linked))


@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_an_output_folder_deleted_or_moved_mid_run_is_never_written_by_that_run_again(dirs, tmp_path, how):
    """`rm -rf out` while a run works: a second run locked the new out/ (exit 0, not 75), and
    the first one then placed its older text over the second's, with no record of it."""
    src, out = dirs
    write(src / "a.png", "A")
    write(src / "z.png", "old WAIT")
    gate = tmp_path / "gate"
    env = {"FAKE_PIPELINE_WAIT_FILE": str(gate)}
    first = start_fake(src, out, env=env)
    wait_for(lambda: (out / "a.json").exists())
    if how == "deleted":
        shutil.rmtree(out)
    else:
        out.rename(tmp_path / "moved")
    write(src / "z.png", "new")
    second = run_fake(src, out)
    assert second.code == 0 and "2 done" in second.stderr, second.stderr
    gate.touch()
    first.communicate(timeout=60)
    assert first.returncode == 74, first.stderr_text()
    assert "or its lock file, was deleted or moved while this run used it" in first.stderr_text()
    assert json.loads((out / "z.json").read_text())["text"] == "new"
    assert_invariant(src, out)
    assert run_fake(src, out).code == 0 and (out / "infer_mp.runlog.jsonl").exists()


@pytest.mark.parametrize("name, content", [("a.png", "RAISE"), ("a.pdf", pdf_bytes(["RAISE", "good"]))],
                         ids=["image", "document"])
def test_a_failure_reported_again_by_a_run_with_other_options_keeps_its_own(dirs, tmp_path, name, content):
    """Failed under options A in a run that was stopped, reported again by a run with B: it
    failed under A, and a later run with A does not count it as another pipeline's (a
    document's record took B's)."""
    src, out = dirs
    write(src / name, content)
    write(src / "z.png", "WAIT")
    gate = tmp_path / "gate"
    env = {"FAKE_PIPELINE_WAIT_FILE": str(gate)}
    first = ("--pipeline_arg", "raise_on=NOTHING")
    process = start_fake(src, out, *first, env=env)
    wait_for(lambda: holds(out / "infer_mp.runlog.jsonl", b'"status": "failed"'))
    process.signal_group(signal.SIGKILL)
    process.communicate(timeout=60)
    gate.touch()
    assert run_fake(src, out, "--pipeline_arg", "score_shift=0.1", env=env).code == 1
    back = run_fake(src, out, *first, env=env)
    assert back.code == 0 and "note: 1 input(s) skipped" in back.stderr, back.stderr  # z.png's, not a.png's
    assert_invariant(src, out)
