"""The README's promises about stopping and failing, each checked as a user would meet it:
no worker outlives a killed coordinator, the run log's closing line says how a run ended,
lists and documents at their edges, and stdout left free for the user's pipes."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

from conftest import (
    ROOT,
    make_inputs,
    page_files,
    pdf_bytes,
    run_fake,
    run_log,
    start_fake,
    wait_for,
    write,
)


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_9_of_the_coordinator_leaves_no_worker_behind(dirs, tmp_path):
    """Workers that hold a batch which would never end are gone soon after the coordinator
    is killed (SIGKILL: it can do nothing about it); the rerun does everything."""
    src, out = dirs
    make_inputs(src, 6)
    busy = tmp_path / "busy.jsonl"
    process = start_fake(src, out, "--instances_per_device", "2",
                         env={"FAKE_PIPELINE_BUSY_LOG": str(busy), "FAKE_PIPELINE_GATE": str(tmp_path / "never")})
    wait_for(lambda: busy.exists() and len(busy.read_text().splitlines()) == 2)
    workers = [json.loads(line)["pid"] for line in busy.read_text().splitlines()]
    assert all(alive(pid) for pid in workers)
    process.kill()
    process.wait()
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=30)
    run = run_fake(src, out)
    assert run.code == 0 and "6 input(s) to do" in run.stderr and len(page_files(out)) == 6


def closing_line(out: Path) -> dict:
    return run_log(out, runs=True)[-1]["run"]


def test_the_closing_line_says_how_each_run_ended(dirs, tmp_path):
    """What docs/runs.md's jq recipe reads from each run's closing line, for runs that end in
    each way: exit_code as the process exited, and the counts."""
    recipe = (ROOT / "docs" / "runs.md").read_text(encoding="utf-8")
    read = set(re.findall(r"\.run\.(\w+)", recipe))
    assert {"exit_code", "done", "failed"} <= read
    src, out = dirs
    make_inputs(src, 3)
    write(src / "bad.png", "RAISE")
    first = run_fake(src, out)
    assert first.code == 1
    assert closing_line(out).items() >= {"exit_code": 1, "done": 3, "failed": 1, "unprocessed": 0}.items()
    again = run_fake(src, out)
    assert again.code == 0
    assert closing_line(out).items() >= {"exit_code": 0, "done": 0, "failed": 0, "unprocessed": 0}.items()
    make_inputs(src / "more", 4)
    process = start_fake(src / "more", out / "more", env={"FAKE_PIPELINE_GATE": str(tmp_path / "never")})
    process.wait_for_stderr("ready")
    process.send_signal(signal.SIGTERM)
    process.wait_for_stderr("starting no new inputs")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 143
    stopped = closing_line(out / "more")
    assert stopped["exit_code"] == 143 and stopped["done"] == 0 and stopped["unprocessed"] == 4
    assert read <= set(stopped)  # every field the recipe reads is there


def test_an_input_list_with_blank_lines_repeats_and_folders(tmp_path):
    """Blank lines passed over, a path listed twice (spelled two ways) done once, a folder a
    failed input (named, exit 1), as docs/usage.md says."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 2)
    (src / "folder").mkdir()
    listing = write(tmp_path / "list.txt", "\n".join(["", str(src / "p00.png"), "   ", str(src / "p01.png"), "",
                                                      str(src / "p00.png"), f"{src}/./p01.png", str(src / "folder"),
                                                      ""]))
    run = run_fake(src, out, "--input_list", str(listing))
    assert run.code == 1, run.stderr
    assert page_files(out) == ["p00.json", "p01.json"]
    records = run_log(out)
    assert sorted((Path(r["input"]).name, r["status"]) for r in records) == [
        ("folder", "failed"), ("p00.png", "done"), ("p01.png", "done")]
    assert [line for line in run.stderr.splitlines() if "FAILED" in line] == [
        line for line in run.stderr.splitlines() if "FAILED" in line and str(src / "folder") in line]
    assert run.stdout == ""


def test_a_pdf_with_no_pages_fails_alone_and_named(dirs):
    src, out = dirs
    make_inputs(src, 1)
    write(src / "empty.pdf", pdf_bytes([]))
    run = run_fake(src, out)
    assert run.code == 1, run.stderr
    failed = [line for line in run.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "empty.pdf" in failed[0] and "Traceback" not in run.stderr
    assert page_files(out) == ["p00.json"]
    assert run.stdout == ""
