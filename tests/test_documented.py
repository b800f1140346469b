"""Promises of the README and docs/ that an audit found untested, or tested only so weakly that
the code could break them and every test still pass (each was checked by breaking it). Each
test names the line it holds the code to."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import (
    all_records,
    assert_invariant,
    holds,
    injected,
    make_inputs,
    page_files,
    pdf_bytes,
    run_fake,
    run_log,
    start_fake,
    wait_for,
    write,
)

LOG = "infer_mp.runlog.jsonl"


def text_of(out: Path, name: str) -> str:
    return json.loads((out / name).read_text())["text"]


def files_and_bytes(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def pad_log(out: Path, lines: int = 1100) -> Path:
    """The closing line repeated, as no-op reruns add it: the next run that may compacts."""
    log = out / LOG
    closing = log.read_bytes().splitlines(keepends=True)[-1]
    log.write_bytes(log.read_bytes() + closing * lines)
    return log


# -- names, shards and resume -----------------------------------------------------------------


@pytest.mark.parametrize("names, expected", [
    ({"a.jpg": "JPG", "a.png": "PNG"}, {"a.jpg.json": "JPG", "a.png.json": "PNG"}),
    ({"f.pdf": ["page 0", "page 1"], "f_1.png": "ONE"},
     {"f.pdf_0.json": "page 0", "f.pdf_1.json": "page 1", "f_1.png.json": "ONE"}),
])
def test_shards_name_outputs_over_the_whole_input_set(dirs, names, expected):
    """docs/clusters.md: "Output names are planned over the whole input set first, so they are
    the same as an unsharded run." Twins that fall to different shards: named by each shard's
    share alone, the second shard wrote its input's text over the first one's, exit 0."""
    src, out = dirs
    for name, content in names.items():
        write(src / name, pdf_bytes(content) if isinstance(content, list) else content)
    for shard in ("0/2", "1/2"):
        run = run_fake(src, out, "--shard", shard)
        assert run.code == 0 and "1 input(s) to do" in run.stderr, run.stderr  # (one twin per shard)
    assert {name: text_of(out, name) for name in page_files(out)} == expected
    assert_invariant(src, out)


def test_a_done_listed_input_missing_for_one_run_keeps_its_text(dirs, tmp_path):
    """docs/runs.md: "An unchanged input that fails again ... keeps its outputs, and so does a
    listed input that is missing"; when it is back unchanged, it counts as done."""
    src, out = dirs
    a = write(src / "a.png", "A")
    write(src / "b.png", "B")
    listing = write(tmp_path / "list.txt", f"{src / 'a.png'}\n{src / 'b.png'}\n")
    assert run_fake(src, out, "--input_list", str(listing)).code == 0
    a.rename(tmp_path / "a.png")  # (a rename keeps the modification time)
    run = run_fake(src, out, "--input_list", str(listing))
    assert run.code == 1 and f"FAILED {src / 'a.png'}: no such file" in run.stderr, run.stderr
    assert "retired" not in run.stderr and text_of(out, "a.json") == "A"
    (tmp_path / "a.png").rename(a)
    back = run_fake(src, out, "--input_list", str(listing))
    assert back.code == 0 and "0 input(s) to do, 2 already done" in back.stderr, back.stderr
    assert page_files(out) == ["a.json", "b.json"]
    assert_invariant(src, out)


@pytest.mark.parametrize("pages_per_task", ["2", "0"])
def test_a_page_of_a_done_document_deleted_by_hand_is_redone_alone(dirs, pages_per_task):
    """docs/runs.md, What happens when: "an output JSON deleted by hand | its input counts as
    not done and is redone on the next run; nothing else is"."""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes([f"page {i}" for i in range(6)]))
    write(src / "a.png", "A")
    assert run_fake(src, out, "--pages_per_task", pages_per_task).code == 0
    before = {name: (out / name).stat().st_mtime_ns for name in page_files(out) if name != "doc_3.json"}
    (out / "doc_3.json").unlink()
    run = run_fake(src, out, "--pages_per_task", pages_per_task)
    assert run.code == 0 and "1 input(s) to do, 1 already done; 1 page(s)" in run.stderr, run.stderr
    assert text_of(out, "doc_3.json") == "page 3"
    assert {name: (out / name).stat().st_mtime_ns for name in page_files(out) if name != "doc_3.json"} == before
    assert_invariant(src, out)


def test_a_document_changed_after_a_kill_mid_way_is_done_again_from_its_first_page(dirs, tmp_path):
    """docs/big-documents.md: "A changed file is done again from the start": the page ranges a
    killed run recorded for the old version hold nothing of the new one."""
    src, out = dirs
    doc = write(src / "book.pdf", pdf_bytes(["v1 page 0", "v1 page 1", "v1 page 2 WAIT", "v1 page 3"]))
    env = {"FAKE_PIPELINE_PRELOAD": "1", "FAKE_PIPELINE_WAIT_FILE": str(tmp_path / "never")}
    process = start_fake(src, out, "--pages_per_task", "2", env=env)
    wait_for(lambda: holds(out / LOG, b'"range"'))
    process.signal_group(signal.SIGKILL)
    process.wait(60)
    doc.write_bytes(pdf_bytes(["v2 page 0", "v2 page 1", "v2 page 2", "v2 page 3"]))
    run = run_fake(src, out, "--pages_per_task", "2", env={"FAKE_PIPELINE_PRELOAD": "1"})
    assert run.code == 0, run.stderr
    assert {name: text_of(out, name) for name in page_files(out)} == {f"book_{i}.json": f"v2 page {i}"
                                                                      for i in range(4)}
    assert_invariant(src, out)


def test_a_page_range_begun_after_a_documents_whole_record_is_superseded_not_kept(dirs):
    """docs/runs.md: every file under the output folder belongs to one current record, and a
    file a run placed under a name the input no longer has is retired. A run killed mid-way
    through a document it had to rename (a gone input then held the old name of one page) left
    a range record of one page under the new name; with the old name back, the document counted
    as done by its older whole record, and that range's file stayed, listed as its page 0 too
    (torture, seed 2413 with --shards)."""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["page 0", "page 1"]))
    assert run_fake(src, out).code == 0
    log = out / LOG
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    [whole] = [line for line in lines if line.get("status") == "done" and "range" not in line]
    generation = max(line.get("gen", 0) for line in lines) + 1
    renamed = "doc.pdf_0.json"
    write(out / renamed, (out / "doc_0.json").read_text())
    placing = {"time": whole["time"], "gen": generation, "status": "placing", "shard": "all",
               "placing": [[whole["input"], [renamed], []]], "output_dir": str(out.resolve())}
    begun = {**whole, "gen": generation, "pages": 1, "outputs": [renamed], "range": [0, 1]}
    log.write_text(log.read_text() + json.dumps(placing) + "\n" + json.dumps(begun) + "\n")
    run = run_fake(src, out)
    assert run.code == 0, run.stderr
    assert page_files(out) == ["doc_0.json", "doc_1.json"], run.stderr
    assert_invariant(src, out)


def test_a_new_text_with_the_old_modification_time_is_a_change_when_its_size_differs(dirs):
    """docs/runs.md: an input is done when its file "has not changed since (same size and
    modification time ...)": a new text with the old time (an archive's whole seconds) is
    still a change when its size differs."""
    src, out = dirs
    a = write(src / "a.png", "short")
    assert run_fake(src, out).code == 0
    status = a.stat()
    a.write_text("a much longer new text")
    os.utime(a, ns=(status.st_atime_ns, status.st_mtime_ns))
    run = run_fake(src, out)
    assert run.code == 0 and "1 done" in run.stderr, run.stderr
    assert text_of(out, "a.json") == "a much longer new text"
    assert_invariant(src, out)


def test_retry_failed_leaves_new_inputs_to_a_plain_run(dirs):
    """README: `--retry_failed` "Only retry the inputs whose last run-log record is `failed`,
    or lists weak pages": a scan added since is not read by the retry's (other) pipeline."""
    src, out = dirs
    write(src / "bad.png", "RAISE")
    make_inputs(src, 1)
    assert run_fake(src, out).code == 1
    write(src / "new.png", "N")
    retry = run_fake(src, out, "--retry_failed")
    assert retry.code == 1 and "1 not selected" in retry.stderr, retry.stderr  # (bad.png fails again)
    assert not (out / "new.json").exists()
    assert not [r for r in all_records(out) if r["input"].endswith("new.png")]
    plain = run_fake(src, out)
    assert plain.code == 0 and "1 done" in plain.stderr and text_of(out, "new.json") == "N", plain.stderr


# -- the run log: compaction and failures ---------------------------------------------------


def test_dry_run_writes_nothing_even_where_a_run_would_compact(dirs, tmp_path):
    """README: `--dry_run` "writes nothing"; docs/runs.md: it "takes no lock (it writes
    nothing)". A compaction by a dry run would replace the log under a running run, whose
    later records would go to the old file."""
    src, out = dirs
    write(src / "a.png", "A")
    assert run_fake(src, out).code == 0
    log = pad_log(out)
    write(out / ".infer_mp.staging" / "all-1-0" / "z.json", "a killed run's staged file")
    backup = tmp_path / "backup.jsonl"
    os.link(log, backup)  # (a second name: a run would compact it too, into a file of its own)
    before = files_and_bytes(out)
    plan = run_fake(src, out, "--dry_run")
    assert plan.code == 0, plan.stderr
    assert files_and_bytes(out) == before and os.path.samefile(log, backup)


def test_compaction_keeps_the_done_text_of_an_input_that_failed_since(dirs):
    """docs/runs.md: compacted "with each input's last record (and its last `done`, if a
    failure came after ...)": the text kept for a standing failure keeps its owner."""
    src, out = dirs
    write(src / "a.png", "ZAP")
    assert run_fake(src, out).code == 0
    assert run_fake(src, out, "--overwrite", "--pipeline_arg", "raise_on=ZAP").code == 1
    log = pad_log(out)
    for _ in range(2):
        run = run_fake(src, out)
        assert run.code == 0 and "1 failed before" in run.stderr, run.stderr
        assert len(log.read_bytes().splitlines()) < 20 and text_of(out, "a.json") == "ZAP"
        assert_invariant(src, out)
    write(src / "a.png", "CHANGED RAISE")  # a changed file that fails: its old text goes
    run = run_fake(src, out)
    assert run.code == 1 and "retired 1" in run.stderr and not page_files(out), run.stderr


def test_compaction_needs_more_than_three_lines_per_input(dirs):
    """docs/runs.md: compacted when the log "has at least 1,000 lines ... and more than three
    per input it describes"."""
    src, out = dirs
    make_inputs(src, 350)
    assert run_fake(src, out).code == 0
    log = out / LOG
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines + [lines[-1]] * (1049 - len(lines))))  # 1,049: not above 3 x 350
    for expected in (1050, 1051):
        assert run_fake(src, out).code == 0
        assert len(log.read_bytes().splitlines()) == expected  # not compacted, though 1,000 lines
    assert run_fake(src, out).code == 0  # it read 1,051
    assert len(log.read_bytes().splitlines()) < 400
    assert_invariant(src, out)


KILL_AT_COMPACTION = """\
import os, signal
_replace = os.replace

def replace(source, target, *args, **kwargs):
    if os.fsdecode(source).endswith(".compact"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(source, target, *args, **kwargs)

os.replace = replace
"""


def test_a_kill_during_compaction_leaves_the_old_log_whole_and_the_next_run_cleans_up(dirs, tmp_path):
    """docs/runs.md: the log is compacted "to a temporary file, fsynced, then renamed over the
    log, so a kill leaves the old log or the new one"; the next run removes the temporary."""
    src, out = dirs
    make_inputs(src, 2)
    assert run_fake(src, out).code == 0
    log = pad_log(out)
    before = log.read_bytes()
    write(tmp_path / "hook" / "sitecustomize.py", KILL_AT_COMPACTION)
    path = os.pathsep.join(filter(None, [str(tmp_path / "hook"), os.environ.get("PYTHONPATH")]))
    killed = run_fake(src, out, env={"PYTHONPATH": path})
    assert killed.code == -signal.SIGKILL, killed.stderr
    assert log.read_bytes() == before and list(out.glob(f".{LOG}.*.compact"))  # the old log, whole
    run = run_fake(src, out)
    assert run.code == 0 and "0 input(s) to do, 2 already done" in run.stderr, run.stderr
    assert not list(out.glob(f".{LOG}.*.compact")) and len(log.read_bytes().splitlines()) < 20
    assert_invariant(src, out)


def test_a_failure_a_shard_reported_stands_for_other_runs(dirs):
    """docs/runs.md: a failure is reported once ("Reported means the run that recorded the
    failure finished, with exit 1"), and "every run reads all the run logs": a failure a shard
    reported is not reported again by a run over all inputs, nor by another shard count."""
    src, out = dirs
    write(src / "a.png", "RAISE")
    write(src / "b.png", "B")
    assert sorted(run_fake(src, out, "--shard", f"{i}/2").code for i in range(2)) == [0, 1]
    for extra in ((), ("--shard", "0/3"), ("--shard", "1/3"), ("--shard", "2/3")):
        run = run_fake(src, out, *extra)
        assert run.code == 0 and "FAILED" not in run.stderr, run.stderr
    assert "1 failed before" in run_fake(src, out).stderr


def test_a_signal_once_the_work_is_over_keeps_its_exit_1(tmp_path):
    """docs/runs.md: Ctrl-C or SIGTERM once the work is over "changes nothing: the run ends as it
    would have", with "the work's" exit code: 1 where an input failed, and a closing line that
    says so, so the next run does not report the failure again."""
    for name in ("SIGINT", "SIGTERM"):
        src, out = tmp_path / name / "in", tmp_path / name / "out"
        make_inputs(src, 1)
        write(src / "bad.png", "RAISE")
        run = run_fake(src, out, env={**injected(), "SIGNAL_ON_STDERR": f"{name}:inputs: 1 done"})
        assert run.code == 1 and "Traceback" not in run.stderr, run.stderr
        assert run_log(out, runs=True)[-1]["run"]["exit_code"] == 1
        again = run_fake(src, out)
        assert again.code == 0 and "1 failed before" in again.stderr and "FAILED" not in again.stderr


def test_a_failure_said_by_a_run_with_no_worker_left_is_reported_by_the_next_run(dirs, tmp_path):
    """docs/runs.md: a run stopped before its end ("no worker left: exit ... 3") printed its
    FAILED lines but never exited 1 for them, so the next plain run reports them, once."""
    src, out = dirs
    write(src / "a.png", "RAISE")
    make_inputs(src, 4)
    env = {"FAKE_PIPELINE_STARTS": str(tmp_path / "starts"), "FAKE_PIPELINE_FAIL_STARTS": "2,3,4"}
    run = run_fake(src, out, "--max_items_per_worker", "1", env=env)
    assert run.code == 3 and f"FAILED {src / 'a.png'}" in run.stderr, run.stderr
    assert run_log(out, runs=True)[-1]["run"]["exit_code"] == 3
    reported = run_fake(src, out)
    assert reported.code == 1 and f"FAILED {src / 'a.png'}" in reported.stderr, reported.stderr
    last = run_fake(src, out)
    assert last.code == 0 and "1 failed before" in last.stderr and "FAILED" not in last.stderr, last.stderr


def test_by_default_an_input_that_kills_its_worker_three_times_is_failed(dirs):
    """README: "an input that kills workers 3 times is failed" (`--max_attempts` 3)."""
    src, out = dirs
    write(src / "poison.png", "CRASH")
    run = run_fake(src, out)
    assert run.code == 1, run.stderr
    [failed] = [r for r in run_log(out) if r["status"] == "failed"]
    assert failed["attempts"] == 3 and "3 times while running this input alone" in failed["error"]


def test_a_changed_document_that_cannot_be_opened_retires_its_old_pages_before_any_worker(dirs, tmp_path):
    """docs/runs.md: "when a changed input fails (for any reason), its old file's outputs" are
    retired; a document that cannot be opened fails "when the run starts, before any worker"."""
    src, out = dirs
    doc = write(src / "doc.pdf", pdf_bytes(["page 0", "page 1", "page 2"]))
    assert run_fake(src, out).code == 0 and len(page_files(out)) == 3
    doc.write_bytes(b"garbage, not a PDF any more")
    imports = tmp_path / "imports"
    run = run_fake(src, out, env={"FAKE_PIPELINE_IMPORT_LOG": str(imports)})
    assert run.code == 1 and "cannot be opened as a PDF" in run.stderr, run.stderr
    assert "retired 3 stale output" in run.stderr and page_files(out) == [] and not imports.exists()
    assert_invariant(src, out)


# -- the lock --------------------------------------------------------------------------------


@pytest.mark.parametrize("second", [(), ("--shard", "0/2")])
def test_a_refused_run_touches_nothing(dirs, tmp_path, second):
    """README: a second run on the same output folder "exits at once with code 75 and touches
    nothing": not the first run's staged files, not the run log."""
    src, out = dirs
    write(src / "a.png", "A")
    write(src / "z.png", "WAIT")
    gate = tmp_path / "gate"
    first = start_fake(src, out, env={"FAKE_PIPELINE_WAIT_FILE": str(gate)})
    wait_for(lambda: (out / "a.json").exists())
    sentinel = write(out / ".infer_mp.staging" / "all-1-0" / "z.json", "staged by the first run")
    log = out / LOG
    before = log.read_bytes()
    refused = run_fake(src, out, *second)
    assert refused.code == 75, refused.stderr
    assert sentinel.read_text() == "staged by the first run" and log.read_bytes() == before
    gate.touch()
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert_invariant(src, out)


def test_a_file_no_run_log_names_at_an_outputs_name_is_overwritten_and_a_gone_inputs_is_not(dirs, tmp_path):
    """docs/runs.md: a file of the user's own under an output's name, which no run log names, is
    overwritten by that output (as by the seed's script); a gone input's output there is not:
    the new input takes its full file name."""
    src, out = dirs
    write(out / "a.json", "the user's own")
    write(src / "a.png", "A")
    assert run_fake(src, out).code == 0
    assert json.loads((out / "a.json").read_text())["text"] == "A"
    (src / "a.png").rename(tmp_path / "a.png")
    write(src / "a.jpg", "J")
    assert run_fake(src, out).code == 0
    assert json.loads((out / "a.json").read_text())["text"] == "A"
    assert json.loads((out / "a.jpg.json").read_text())["text"] == "J"
    assert_invariant(src, out, gone=("a.png",))
