"""The README's promises about stopping and failing, each checked as a user would meet it:
no worker outlives a killed coordinator, the run log's closing line says how a run ended,
lists and documents at their edges, and stdout left free for the user's pipes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    assert_invariant,
    injected,
    latest_records,
    make_inputs,
    page_files,
    pdf_bytes,
    run_fake,
    run_log,
    start_fake,
    tiff_bytes,
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
    assert closing_line(out).items() >= {"exit_code": 0, "done": 0, "failed": 0, "unprocessed": 0,
                                         "standing_failures": 1, "skipped": 3, "retired": 0,
                                         "output_dir": str(out.resolve())}.items()
    assert type(closing_line(out)["pid"]) is int
    write(src / "p00.jpg", "twin")  # p00.png's text goes to p00.png.json; p00.json is retired
    assert run_fake(src, out).code == 0
    assert closing_line(out).items() >= {"done": 2, "skipped": 2, "retired": 1}.items()
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
    """Blank lines passed over, a path listed twice (spelled two ways) done once, a folder not
    an input (ignored), a missing path a failed input (named, exit 1), as docs/usage.md says."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 2)
    (src / "folder").mkdir()
    listing = write(tmp_path / "list.txt", "\n".join(["", str(src / "p00.png"), "   ", str(src / "p01.png"), "",
                                                      str(src / "p00.png"), f"{src}/./p01.png", str(src / "folder"),
                                                      str(src / "missing.png"), ""]))
    run = run_fake(src, out, "--input_list", str(listing))
    assert run.code == 1 and "1 ignored" in run.stderr, run.stderr
    assert page_files(out) == ["p00.json", "p01.json"]
    records = run_log(out)
    assert sorted((Path(r["input"]).name, r["status"]) for r in records) == [
        ("missing.png", "failed"), ("p00.png", "done"), ("p01.png", "done")]
    assert [line for line in run.stderr.splitlines() if "FAILED" in line] == [
        line for line in run.stderr.splitlines() if "FAILED" in line and str(src / "missing.png") in line]


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


# -- page quality -------------------------------------------------------------------------------


def test_every_page_with_scores_gets_a_quality_figure_and_the_summary_names_the_weak(dirs):
    """Recognition scores give each page a figure in the run log (lines, mean score, share of
    low lines; a page without text says whether it is blank); the summary counts blank and
    weak pages and names the weakest; a pipeline without scores gets no figure."""
    src, out = dirs
    write(src / "clean.png", "SCORES:0.99,0.97")
    write(src / "rotated.png", "SCORES:0.5,0.4,0.9")
    write(src / "empty.png", "SCORES:- BLANK")
    write(src / "static.png", "SCORES:-")
    write(src / "plain.png", "no scores at all")
    write(src / "doc.pdf", pdf_bytes(["SCORES:0.98", "SCORES:0.3"]))
    run = run_fake(src, out, env={"FAKE_PIPELINE_PRELOAD": "1"})
    assert run.code == 0, run.stderr  # no gate: figures only
    quality = {Path(r["input"]).name: r.get("quality") or r.get("page_quality") for r in run_log(out)
               if "range" not in r}
    assert quality == {
        "clean.png": {"lines": 2, "score": 0.98, "low": 0.0},
        "rotated.png": {"lines": 3, "score": 0.6, "low": 0.667},
        "empty.png": {"lines": 0, "blank": True},
        "static.png": {"lines": 0, "blank": False},
        "plain.png": None,
        "doc.pdf": {"0": {"lines": 1, "score": 0.98, "low": 0.0}, "1": {"lines": 1, "score": 0.3, "low": 1.0}},
    }
    [line] = [line for line in run.stderr.splitlines() if "quality:" in line]
    assert "1 blank page(s), 3 weak page(s)" in line
    assert line.index("static.png") < line.index("doc.pdf page 1") < line.index("rotated.png")  # weakest first
    closing = run_log(out, runs=True)[-1]["run"]
    assert closing["blank_pages"] == 1 and closing["weak_pages"] == 3


def test_the_gate_fails_weak_pages_keeps_their_text_and_retry_failed_redoes_them(dirs, tmp_path):
    """--min_page_score: a weak page is a failed page (named, exit 1; a document's within
    --max_page_error_rate), its output kept and marked weak; a blank page is never weak; a
    plain rerun leaves them (failed before), --retry_failed redoes exactly them."""
    src, out = dirs
    write(src / "good.png", "SCORES:0.99")
    write(src / "weak.png", "SCORES:0.5")
    write(src / "empty.png", "SCORES:- BLANK")
    write(src / "doc.pdf", pdf_bytes(["SCORES:0.98", "SCORES:0.3", "SCORES:0.97"]))
    env = {"FAKE_PIPELINE_PRELOAD": "1"}
    run = run_fake(src, out, "--min_page_score", "0.9", env=env)
    assert run.code == 1, run.stderr
    failed = sorted(line for line in run.stderr.splitlines() if "FAILED" in line)
    assert len(failed) == 2 and "doc.pdf" in failed[0] and "1 weak page(s)" in failed[0]
    assert "page 1: mean recognition score 0.300 under --min_page_score 0.9" in failed[0]
    assert "weak.png: weak page: mean recognition score 0.500 under --min_page_score 0.9" in failed[1]
    assert "weak.json" in failed[1]
    records = {Path(r["input"]).name: r for r in run_log(out) if "range" not in r}
    assert records["weak.png"]["status"] == "failed" and records["weak.png"]["weak"] is True
    assert records["weak.png"]["outputs"] == ["weak.json"]
    assert records["doc.pdf"]["status"] == "failed" and records["doc.pdf"]["weak_pages"] == [1]
    assert records["doc.pdf"]["outputs"] == ["doc_0.json", "doc_1.json", "doc_2.json"]
    assert records["empty.png"]["status"] == "done" and records["good.png"]["status"] == "done"
    assert page_files(out) == ["doc_0.json", "doc_1.json", "doc_2.json", "empty.json", "good.json", "weak.json"]
    within = run_fake(src, tmp_path / "within", "--min_page_score", "0.9", "--max_page_error_rate", "0.34", env=env)
    assert "(within --max_page_error_rate 0.34)" in within.stderr and within.code == 1
    assert {Path(r["input"]).name: r["status"] for r in run_log(tmp_path / "within")
            if "range" not in r}["doc.pdf"] == "done"
    again = run_fake(src, out, "--min_page_score", "0.9", env=env)
    assert again.code == 0 and "2 failed before" in again.stderr, again.stderr
    write(src / "weak.png", "SCORES:0.95")  # (as a stronger pipeline would read it: a changed file is redone anyway)
    pages = tmp_path / "pages.log"
    retried = run_fake(src, out, "--min_page_score", "0.9", "--retry_failed",
                       env={**env, "FAKE_PIPELINE_PAGE_LOG": str(pages)})
    redone = sorted((Path(e["input"]).name, e["page_index"]) for e in map(json.loads, pages.read_text().splitlines()))
    assert redone == [("doc.pdf", 1), ("weak.png", None)], retried.stderr
    assert retried.code == 1 and "doc.pdf" in retried.stderr  # its page 1 is still weak
    assert page_files(out) == ["doc_0.json", "doc_1.json", "doc_2.json", "empty.json", "good.json", "weak.json"]


def test_retry_failed_redoes_weak_pages_of_a_document_done_within_the_error_rate(dirs, tmp_path):
    """A document done within --max_page_error_rate with a weak page: the summary said
    --retry_failed redoes it, but the document counted as done and was not selected."""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["SCORES:0.98", "SCORES:0.3", "SCORES:0.97"]))
    env = {"FAKE_PIPELINE_PRELOAD": "1"}
    flags = ("--min_page_score", "0.9", "--max_page_error_rate", "0.34")
    first = run_fake(src, out, *flags, env=env)
    assert "--retry_failed redoes" in first.stderr, first.stderr
    [record] = [r for r in run_log(out) if "range" not in r]
    assert record["status"] == "done" and record["weak_pages"] == [1]
    pages = tmp_path / "pages.log"
    retried = run_fake(src, out, *flags, "--retry_failed", env={**env, "FAKE_PIPELINE_PAGE_LOG": str(pages)})
    assert pages.is_file(), retried.stderr
    redone = [(Path(e["input"]).name, e["page_index"]) for e in map(json.loads, pages.read_text().splitlines())]
    assert redone == [("doc.pdf", 1)], retried.stderr
    assert page_files(out) == ["doc_0.json", "doc_1.json", "doc_2.json"]
    plain = run_fake(src, out, *flags, env={**env, "FAKE_PIPELINE_PAGE_LOG": str(tmp_path / "plain.log")})
    assert plain.code == 0 and not (tmp_path / "plain.log").exists(), plain.stderr


def test_retry_failed_redoes_a_weak_page_of_a_document_stopped_before_its_whole_record(dirs, tmp_path):
    """Review: killed after its page ranges' records and before the document's own, a document
    with a weak page in a range was "not selected" by --retry_failed (a failed page was)."""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["SCORES:0.98", "SCORES:0.3", "SCORES:0.97", "SCORES:0.99"]))
    env = {"FAKE_PIPELINE_PRELOAD": "1"}
    flags = ("--min_page_score", "0.9", "--max_page_error_rate", "0.34", "--pages_per_task", "2")
    run_fake(src, out, *flags, env=env)
    log = out / "infer_mp.runlog.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    whole = [i for i, line in enumerate(lines) if '"input"' in line and '"range"' not in line
             and '"status": "placing"' not in line]
    assert len(whole) == 1 and any('"weak_pages": [1]' in line for line in lines if '"range"' in line)
    log.write_text("".join(lines[:whole[0]]))  # (as a kill just before the document's record leaves it)
    cut = log.read_text()
    finished = run_fake(src, out, *flags, env=env)  # (the review: it said "1 weak page(s)" and exited 0)
    assert finished.code == 1 and "(1 failed)" in finished.stderr, finished.stderr
    assert run_fake(src, out, *flags, env=env).code == 0  # reported once
    log.write_text(cut)
    pages = tmp_path / "pages.log"
    retried = run_fake(src, out, *flags, "--retry_failed", env={**env, "FAKE_PIPELINE_PAGE_LOG": str(pages)})
    assert pages.is_file() and "not selected" not in retried.stderr.split("inputs:")[-1].split(",")[0], retried.stderr
    assert [json.loads(e)["page_index"] for e in pages.read_text().splitlines()] == [1], retried.stderr


def test_a_second_pass_replaces_a_weak_reading_only_with_a_better_one(dirs):
    """--retry_failed with other pipeline options redoes the weak pages; a new reading
    replaces a weak one only if its mean score is higher (a reading no better, or a failure,
    leaves the earlier file as it was, still weak), and the record says which pass made each
    page (`pass`, `by`); each pass leaves the invariant whole."""
    src, out = dirs
    write(src / "weak.png", "SCORES:0.5")
    write(src / "flaky.png", "SCORES:0.5 FLAKY")
    write(src / "doc.pdf", pdf_bytes(["SCORES:0.98", "SCORES:0.3", "SCORES:0.4 FLAKY"]))
    env = {"FAKE_PIPELINE_PRELOAD": "1"}
    gate = ("--min_page_score", "0.9")

    def shifted(shift: float, *more: str):
        return run_fake(src, out, *gate, "--retry_failed", "--pipeline_arg", f"score_shift={shift}", *more, env=env)

    def readings() -> dict[str, tuple[float, float | None]]:
        """Each page file: (its mean score, the score_shift of the pass that wrote it)."""
        found = {}
        for name in page_files(out):
            content = json.loads((out / name).read_text(encoding="utf-8"))
            scores = content["rec_scores"]
            found[name] = (round(sum(scores) / len(scores), 4), content["options"].get("score_shift"))
        return found

    def records() -> dict[str, dict]:
        return {Path(r["input"]).name: r for r in run_log(out) if "range" not in r}

    first = run_fake(src, out, *gate, env=env)
    assert first.code == 1, first.stderr
    before = readings()
    assert before == {"doc_0.json": (0.98, None), "doc_1.json": (0.3, None), "doc_2.json": (0.4, None),
                      "flaky.json": (0.5, None), "weak.json": (0.5, None)}

    worse = shifted(-0.2)
    assert worse.code == 1, worse.stderr
    assert readings() == before  # not one file replaced
    assert worse.stderr.count("read it no better") == 4, worse.stderr
    assert "weak.png: this pass read it no better (mean score 0.300, the earlier 0.500)" in worse.stderr
    assert records()["weak.png"]["quality"] == {"lines": 1, "score": 0.5, "low": 1.0}  # pass 1's, still weak
    assert records()["doc.pdf"]["weak_pages"] == [1, 2]
    assert_invariant(src, out)

    better = shifted(0.45, "--pipeline_arg", "raise_on=FLAKY")
    assert better.code == 1, better.stderr
    after = readings()
    assert after["weak.json"] == (0.95, 0.45) and after["doc_1.json"] == (0.75, 0.45)  # better: replaced
    assert after["flaky.json"] == before["flaky.json"] and after["doc_2.json"] == before["doc_2.json"]  # failed: kept
    assert after["doc_0.json"] == before["doc_0.json"]  # not weak: not redone
    weak, flaky, doc = (records()[name] for name in ("weak.png", "flaky.png", "doc.pdf"))
    assert weak["status"] == "done" and weak["quality"]["pass"] == 2 and "weak" not in weak
    assert weak["quality"]["by"].endswith("fake_pipeline.py:FakePipeline score_shift=0.45 raise_on=FLAKY")
    assert flaky["status"] == "failed" and flaky["weak"] and flaky["outputs"] == ["flaky.json"]
    assert "this pass failed it" in flaky["error"] and "pass" not in flaky["quality"]
    assert doc["weak_pages"] == [1, 2] and doc["outputs"] == ["doc_0.json", "doc_1.json", "doc_2.json"]
    assert doc["page_quality"]["1"]["pass"] == 2 and "pass" not in doc["page_quality"]["2"]
    assert doc["page_quality"]["0"] == {"lines": 1, "score": 0.98, "low": 0.0}  # kept from pass 1, with its figure
    assert_invariant(src, out)

    third = shifted(0.65)
    assert third.code == 0, third.stderr
    final = readings()
    assert final["doc_1.json"] == (0.95, 0.65) and final["doc_2.json"] == (1.0, 0.65)  # 0.75 and 0.4 beaten
    assert final["flaky.json"] == (1.0, 0.65) and final["weak.json"] == after["weak.json"]  # not weak: not redone
    doc = records()["doc.pdf"]
    assert doc["status"] == "done" and [doc["page_quality"][p].get("pass") for p in "012"] == [None, 3, 2]
    assert doc["page_quality"]["1"]["by"].endswith("score_shift=0.65")
    assert_invariant(src, out)


def test_a_kept_reading_keeps_its_files_and_its_weak_mark(dirs):
    """A weak reading that a second pass does not beat stays whole, --save files too, and
    stays weak without a gate in that run; a pass that fails it says why."""
    src, out = dirs
    write(src / "weak.png", "SCORES:0.5")
    write(src / "flaky.png", "SCORES:0.5 FLAKY")
    write(src / "doc.pdf", pdf_bytes(["SCORES:0.98", "SCORES:0.3"]))
    env = {"FAKE_PIPELINE_PRELOAD": "1"}
    first = run_fake(src, out, "--min_page_score", "0.9", "--save", "markdown", env=env)
    assert first.code == 1, first.stderr
    files = {path.name: path.read_bytes() for path in out.iterdir() if path.suffix in (".json", ".md")}
    assert sorted(files) == ["doc_0.json", "doc_0.md", "doc_1.json", "doc_1.md", "flaky.json", "flaky.md",
                             "weak.json", "weak.md"]
    again = run_fake(src, out, "--retry_failed", "--save", "markdown", "--pipeline_arg", "score_shift=-0.2",
                     "--pipeline_arg", "raise_on=FLAKY", env=env)  # (no gate in this run)
    assert again.code == 1, again.stderr
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.name in files} == files
    records = {Path(r["input"]).name: r for r in run_log(out) if "range" not in r}
    assert records["weak.png"]["outputs"] == ["weak.json"] and records["weak.png"]["extra_outputs"] == ["weak.md"]
    assert records["weak.png"]["status"] == "failed" and records["weak.png"]["weak"] is True
    assert "cannot decode" in records["flaky.png"]["error"]  # the pass's own reason
    assert records["doc.pdf"]["status"] == "failed" and records["doc.pdf"]["weak_pages"] == [1]
    assert records["doc.pdf"]["outputs"] == ["doc_0.json", "doc_1.json"]
    assert set(records["doc.pdf"]["extra_outputs"]) == {"doc_0.md", "doc_1.md"}
    assert_invariant(src, out)


def test_a_kept_reading_stays_when_its_page_has_a_new_name_since(dirs):
    """`b.png` read weak as `b.json`; then `b.jpg` is added, so b.png's page is `b.png.json`
    today: a pass that reads it no better leaves `b.json`, its weak text, held by b.png."""
    src, out = dirs
    write(src / "b.png", "SCORES:0.5")
    assert run_fake(src, out, "--min_page_score", "0.9").code == 1
    weak_text = (out / "b.json").read_bytes()
    write(src / "b.jpg", "SCORES:0.99")
    again = run_fake(src, out, "--min_page_score", "0.9", "--retry_failed", "--pipeline_arg", "score_shift=-0.2")
    assert again.code == 1, again.stderr
    assert (out / "b.json").read_bytes() == weak_text and not (out / "b.png.json").exists()
    records = {Path(r["input"]).name: r for r in run_log(out)}
    assert records["b.png"]["outputs"] == ["b.json"] and records["b.png"]["weak"] is True
    assert_invariant(src, out)
    better = run_fake(src, out, "--min_page_score", "0.9", "--retry_failed", "--pipeline_arg", "score_shift=0.45")
    assert better.code == 0, better.stderr
    assert not (out / "b.json").exists() and json.loads((out / "b.png.json").read_text())["rec_scores"] == [0.95]
    assert_invariant(src, out)


def test_weak_pages_read_again_stay_apart_when_the_pipeline_reads_documents_whole(dirs):
    """A pipeline that reads documents itself gets ranges merged back into one task; weak pages
    read again are not merged, so a kept page keeps its --save files too, beside one replaced."""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["SCORES:0.98", "SCORES:0.3", "SCORES:0.3 UP", "SCORES:0.4"]))
    flags = ("--pipeline", f"{ROOT / 'tests' / 'fake_pipeline.py'}:SelfReadingPipeline", "--min_page_score", "0.9",
             "--save", "markdown", "--pages_per_task", "1")
    assert run_fake(src, out, *flags).code == 1
    kept = (out / "doc_3.md").read_bytes(), (out / "doc_3.json").read_bytes()
    again = run_fake(src, out, *flags, "--retry_failed", "--pipeline_arg", "score_shift=0.65",
                     "--pipeline_arg", "shift_only=UP")
    assert again.code == 1, again.stderr
    assert ((out / "doc_3.md").read_bytes(), (out / "doc_3.json").read_bytes()) == kept  # (the first page read
    assert "scores: [0.95]" in (out / "doc_2.md").read_text() and "read it no better" in again.stderr  # alone is
    # the probe that finds the pipeline reads whole documents; pages 2 and 3 were then still queued)
    assert_invariant(src, out)


def test_a_second_pass_must_beat_the_reading_in_the_file_not_the_log(dirs):
    """Killed after a better reading was placed and before its record: the log still has the
    weak figure, the file the better reading, which a worse pass must not replace. (The run
    log is cut back to that instant.) A hand-edited figure of the wrong type does no harm."""
    src, out = dirs
    write(src / "weak.png", "SCORES:0.5")
    write(src / "doc.pdf", pdf_bytes(["SCORES:0.3"]))
    env = {"FAKE_PIPELINE_PRELOAD": "1"}
    assert run_fake(src, out, "--min_page_score", "0.9", env=env).code == 1
    log = out / "infer_mp.runlog.jsonl"
    weak_only = log.read_bytes()
    better = run_fake(src, out, "--min_page_score", "0.9", "--retry_failed", "--pipeline_arg", "score_shift=0.6",
                      env=env)
    assert better.code == 0, better.stderr
    placed = {name: (out / name).read_bytes() for name in ("weak.json", "doc_0.json")}
    log.write_bytes(weak_only)
    worse = run_fake(src, out, "--min_page_score", "0.9", "--retry_failed", "--pipeline_arg", "score_shift=0.1",
                     env=env)
    assert {name: (out / name).read_bytes() for name in placed} == placed, worse.stderr
    assert "the earlier 0.900" in worse.stderr and "the earlier 1.000" in worse.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for record in records:
        if record.get("page_quality"):
            record["page_quality"] = [1, 2]
    log.write_text("".join(json.dumps(record) + "\n" for record in records))
    edited = run_fake(src, out, "--min_page_score", "0.9", "--retry_failed", env=env)
    assert edited.code in (0, 1) and "Traceback" not in edited.stderr, edited.stderr
    assert_invariant(src, out)


def test_a_reading_placed_by_a_killed_pass_is_recorded_as_a_later_pass(dirs):
    """Killed after a second pass placed its better reading and before its record; the same
    command again read it no better, so the reading in the file stayed, but its record claimed
    the first reading (no `pass`, no `by`), though the file held the second pass's text."""
    src, out = dirs
    write(src / "weak.png", "SCORES:0.5,0.6")
    first = run_fake(src, out, "--min_page_score", "0.9")
    assert first.code == 1, first.stderr
    log = out / "infer_mp.runlog.jsonl"
    weak_only = log.read_bytes()
    second = ("--min_page_score", "0.9", "--retry_failed", "--pipeline_arg", "score_shift=0.4")
    assert run_fake(src, out, *second).code == 0
    unkilled = latest_records(out)[str(src / "weak.png")]["quality"]
    assert unkilled["pass"] == 2 and unkilled["by"]
    log.write_bytes(weak_only)  # (the run log as a kill between the rename and the record leaves it)
    again = run_fake(src, out, *second)
    assert again.code == 0, again.stderr
    record = latest_records(out)[str(src / "weak.png")]
    assert record["status"] == "done" and record["quality"]["score"] == unkilled["score"]
    assert record["quality"]["pass"] == 2 and record["quality"]["by"], record
    assert_invariant(src, out)


def scores_of(path: Path) -> list:
    """The recognition scores a page's JSON, or its markdown (which the fake writes them into), holds."""
    if path.suffix == ".json":
        return json.loads(path.read_text())["rec_scores"]
    return json.loads(path.read_text().split("scores: ")[1].splitlines()[0])


def test_a_replaced_weak_reading_takes_its_save_files_with_it(dirs):
    """Review finding: a document's weak page read better by a --retry_failed pass without
    --save kept the first reading's markdown in the document's record (a record's --save files
    stayed while any of its pages did), beside the new reading's JSON. --save files are recorded
    by page now (`extra_pages`): the replaced reading's go, the other pages' stay."""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["SCORES:0.99", "SCORES:0.5"]))
    gate = ("--min_page_score", "0.9", "--max_page_error_rate", "0.5")
    assert run_fake(src, out, *gate, "--save", "markdown").code == 1  # (a weak page)
    assert scores_of(out / "doc_1.md") == [0.5]
    again = run_fake(src, out, *gate, "--retry_failed", "--pipeline_arg", "score_shift=0.45")
    assert again.code == 0, again.stderr
    assert scores_of(out / "doc_1.json") == [0.95] and not (out / "doc_1.md").exists()
    assert scores_of(out / "doc_0.md") == [0.99]
    record = latest_records(out)[str(src / "doc.pdf")]
    assert record["extra_outputs"] == ["doc_0.md"] and record["extra_pages"] == [0], record
    assert_invariant(src, out)


def test_a_kept_reading_keeps_its_writers_files_and_the_others_pages_keep_theirs(dirs):
    """Review findings: the markdown writer's own files (a page's images, which name no page)
    of a new pass were placed over a kept reading's; and a kept reading's files of no page were
    recorded as its page's, so that reading that page better later deleted another page's image."""
    src, out = dirs
    write(src / "d.pdf", pdf_bytes(["p0 SCORES:0.99", "p1 SCORES:0.5", "p2 SCORES:0.6 X"]))
    flags = ("--min_page_score", "0.8", "--max_page_error_rate", "1", "--save", "markdown",
             "--pipeline_arg", "side_files=1")
    assert run_fake(src, out, *flags).code == 1
    first = {name: (out / name).read_text() for name in ["d_0.md", "d_1.md", "imgs/d_0_fig.png", "imgs/d_1_fig.png"]}
    again = run_fake(src, out, *flags, "--retry_failed", "--pipeline_arg", "score_shift=0.45",
                     "--pipeline_arg", "shift_only=X")  # page 2 read better, page 1 not
    assert again.code == 1 and "read it no better" in again.stderr, again.stderr
    assert {name: (out / name).read_text() for name in first} == first
    assert "score_shift" in (out / "imgs" / "d_2_fig.png").read_text()
    third = run_fake(src, out, *flags, "--retry_failed", "--pipeline_arg", "score_shift=0.45")  # page 1 better
    assert third.code == 0, third.stderr
    assert (out / "d_0.md").read_text() == first["d_0.md"]
    assert (out / "imgs" / "d_0_fig.png").read_text() == first["imgs/d_0_fig.png"]
    assert "score_shift" in (out / "d_1.md").read_text() and "score_shift" in (out / "imgs" / "d_1_fig.png").read_text()
    assert_invariant(src, out)


def test_a_kept_readings_record_lists_no_file_its_pass_did_not_place(dirs):
    """Review finding: page 1, read weak without --save, then read no better by a pass with
    --save markdown: that pass's files were not placed (the earlier reading stays, without
    any), but its writer's own files (`imgs/...`) were still listed by the records."""
    src, out = dirs
    write(src / "d.pdf", pdf_bytes(["p0 SCORES:0.99", "p1 SCORES:0.5"]))
    assert run_fake(src, out, "--min_page_score", "0.9").code == 1
    again = run_fake(src, out, "--min_page_score", "0.9", "--retry_failed", "--save", "markdown",
                     "--pipeline_arg", "side_files=1")
    assert again.code == 1 and "read it no better" in again.stderr, again.stderr
    assert not (out / "imgs").exists() and not (out / "d_1.md").exists()
    assert all(not r.get("extra_outputs") for r in run_log(out)), run_log(out)
    assert_invariant(src, out)


@pytest.mark.parametrize("edit", ["none", "bogus"])
def test_a_record_that_does_not_say_its_save_files_pages_is_read_by_their_names(dirs, edit):
    """Review findings: a record from before `extra_pages` (or one hand-edited to pages it does
    not have) kept a replaced reading's markdown beside the new JSON, or had a page's markdown
    deleted while that page stayed. Its --save files' pages are then read from their names."""
    src, out = dirs
    write(src / "d.pdf", pdf_bytes(["p0 SCORES:0.99", "p1 SCORES:0.5", "p2 SCORES:0.6"]))
    gate = ("--min_page_score", "0.8", "--max_page_error_rate", "1")
    assert run_fake(src, out, *gate, "--save", "markdown", "--pages_per_task", "3").code == 1
    log = out / "infer_mp.runlog.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for record in records:
        if "extra_pages" in record:
            if edit == "none":
                del record["extra_pages"]
            else:
                record["extra_pages"] = [99, -1, "1"][: len(record["extra_pages"])]  # (pages it has not)
    log.write_text("".join(json.dumps(record) + "\n" for record in records))
    again = run_fake(src, out, *gate, "--retry_failed", "--pipeline_arg", "score_shift=0.45")
    assert again.code == 0, again.stderr
    assert scores_of(out / "d_0.md") == [0.99] and scores_of(out / "d_1.json") == [0.95]
    assert not (out / "d_1.md").exists() and not (out / "d_2.md").exists()
    assert_invariant(src, out)


@pytest.mark.parametrize("save", [True, False])
def test_a_plain_run_keeps_a_better_reading_that_a_stopped_pass_placed(dirs, save):
    """Review finding: a --retry_failed pass killed after it placed a better reading of a
    document's weak page, before its record; the next plain run read that page again (its file
    was placed after its record) and put the weak reading back. A plain run does not read weak
    pages again: the better reading stays, with the --save files placed with it; those of the
    reading it replaced go. (The run log is cut back to that instant: the pass's `placing` lines
    kept, its records not.)"""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["SCORES:0.99", "SCORES:0.5"]))
    gate = ("--min_page_score", "0.9", "--max_page_error_rate", "0.5")
    assert run_fake(src, out, *gate, "--save", "markdown").code == 1  # (a weak page)
    log = out / "infer_mp.runlog.jsonl"
    weak_only = log.read_text()
    better = run_fake(src, out, *gate, "--retry_failed", "--pipeline_arg", "score_shift=0.45",
                      *(("--save", "markdown") if save else ()))
    assert better.code == 0, better.stderr
    placing = [line for line in log.read_text()[len(weak_only):].splitlines() if '"status": "placing"' in line]
    log.write_text(weak_only + "".join(line + "\n" for line in placing))
    plain = run_fake(src, out, *gate)
    assert plain.code == 0, plain.stderr
    assert scores_of(out / "doc_1.json") == [0.95], plain.stderr
    assert (scores_of(out / "doc_1.md") == [0.95]) if save else not (out / "doc_1.md").exists()
    assert scores_of(out / "doc_0.md") == [0.99]
    assert_invariant(src, out)


def test_on_a_case_insensitive_output_folder_names_differ_by_more_than_case(dirs):
    """`A.png` and `a.png` would write `A.json` and `a.json`, one file on SMB, APFS or NTFS: on
    an output folder that ignores case (probed at start; here made so for every process of the
    run), their names differ by more than case, and each holds its own input's text."""
    src, out = dirs
    write(src / "A.png", "upper")
    write(src / "a.png", "lower")
    write(src / "Doc.pdf", pdf_bytes(["one"]))
    write(src / "doc.tif", tiff_bytes(1))
    out.mkdir()
    run = run_fake(src, out, env={**injected(), "CASE_INSENSITIVE": str(out), "FAKE_PIPELINE_PRELOAD": "1"})
    assert run.code == 0, run.stderr
    names = page_files(out)
    assert len(names) == 4 and len({name.casefold() for name in names}) == 4, names
    texts = {json.loads((out / name).read_text())["input_path"]: name for name in names}
    assert {Path(path).name for path in texts} == {"A.png", "a.png", "Doc.pdf", "doc.tif"}
    assert json.loads((out / texts[str(src / "A.png")]).read_text())["text"] == "upper"
    assert json.loads((out / texts[str(src / "a.png")]).read_text())["text"] == "lower"
    plain = run_fake(src, out.parent / "plain")  # a folder that keeps case: the plain names
    assert plain.code == 0 and sorted(page_files(out.parent / "plain")) == ["A.json", "Doc_0.json", "a.json",
                                                                           "doc_0.json"]


@pytest.mark.parametrize("paged", [False, True])
def test_on_a_case_insensitive_output_folder_a_new_input_takes_no_gone_inputs_name(dirs, tmp_path, paged):
    """Review: `A.png` done as `A.json` and moved away, then `a.png` came: it was named `a.json`,
    which on SMB, APFS or NTFS is `A.json`, and overwrote the gone input's finished text. A new
    input takes no name another input placed last and still on disk: compared without case
    here, it is `a.png.json` (`a.pdf.json` pages after a gone `A.pdf`), as where case counts."""
    src, out = dirs
    suffix = ".pdf" if paged else ".png"
    out.mkdir()
    env = {**injected(), "CASE_INSENSITIVE": str(out), "FAKE_PIPELINE_PRELOAD": "1"}
    write(src / f"A{suffix}", pdf_bytes(["upper"]) if paged else "upper")
    assert run_fake(src, out, env=env).code == 0
    (src / f"A{suffix}").rename(tmp_path / f"A{suffix}")
    write(src / f"a{suffix}", pdf_bytes(["lower"]) if paged else "lower")
    run = run_fake(src, out, env=env)
    assert run.code == 0, run.stderr
    first = "A_0.json" if paged else "A.json"
    assert json.loads((out / first).read_text())["text"] == "upper"
    assert sorted(page_files(out)) == sorted([first, f"a{suffix}_0.json" if paged else f"a{suffix}.json"])
    assert_invariant(src, out, gone=(f"A{suffix}",))


def has_loaded(pid: int, library: str) -> bool:
    """The process has mapped this shared library (its `import` has begun)."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def wait_for_imports(process) -> None:
    """Until the run's own imports have begun (ctypes is among its first): Python's start-up
    before them is out of any script's reach."""
    deadline = time.monotonic() + 30
    while not has_loaded(process.pid, "_ctypes") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_starting_says_so_in_one_line(tmp_path, signum):
    """Ctrl-C while infer_mp.py imported its modules printed a traceback of the import it hit,
    and SIGTERM before the dispatch loop ended the run without a word (and without its code,
    143). Now, at each of these instants after its imports began (ctypes is among the first;
    Python's own start-up before them is out of any script's reach): one line that says so, the
    documented code, no traceback; then the next run does everything."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 3)
    name = signal.Signals(signum).name
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.35):
        process = start_fake(src, out)
        wait_for_imports(process)
        time.sleep(delay)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
        if process.returncode == 0:
            continue  # (it had finished)
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "(nothing)"
        assert "Traceback" not in stderr and process.returncode == 128 + signum, (delay, stderr)
        # (A run that got as far as its dispatch before the signal says so when it stops starting inputs.)
        said = name in last or (signum == signal.SIGINT and "interrupted" in last)
        assert said or f"{name}: starting no new inputs" in stderr, (delay, stderr)
    assert run_fake(src, out).code == 0
    assert_invariant(src, out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_summary_prints_changes_nothing(tmp_path, signum):
    """Every input done, then a Ctrl-C as the summary prints: the run exited 130 with a summary
    that said everything was done. The work was over; its code is the work's, 0."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 3)
    name = signal.Signals(signum).name
    run = run_fake(src, out, env={**injected(), "SIGNAL_ON_STDERR": f"{name}:inputs: 3 done"})
    assert run.code == 0 and "Traceback" not in run.stderr, run.stderr
    assert closing_line(out)["exit_code"] == 0
    assert_invariant(src, out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_summary_changes_nothing(tmp_path, signum):
    """The summary printed, then Ctrl-C or SIGTERM while Python shut down: the process was
    killed by the signal (a shell saw 130 or 143: "stopped, rerun"), though the work was over
    and its code was 0. Now the signal is ignored once main() has its code."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 2)
    assert run_fake(src, out).code == 0
    codes = []
    for delay in (0.0, 0.005, 0.02, 0.05, 0.1):
        process = start_fake(src, out)  # nothing to do: the summary, then Python's shutdown
        process.wait_for_stderr("inputs:")
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signum)
        codes.append(process.wait(60))
    assert codes == [0] * len(codes), codes


def test_a_signal_while_a_worker_starts_is_not_lost(monkeypatch):
    """The coordinator ignored Ctrl-C and SIGTERM while it started a worker (so that the worker
    inherited that): one sent then was dropped by the kernel, and the run went on to the end."""
    import os

    import infer_mp

    got = []

    class Starting:  # a worker process whose start the signal lands in
        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(infer_mp.SPAWN, "Process", Starting)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        infer_mp.spawn_worker(infer_mp.PipelineRef("module", "Class"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert got == [signal.SIGTERM]


def test_a_second_signal_after_the_stop_line_changes_nothing(tmp_path):
    """SIGTERM while starting, then another just after "stopped by SIGTERM" was printed: it
    raised again while Python shut down (a traceback, or killed by the signal instead of 143)."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 3)
    for delay in (0.02, 0.1, 0.3):
        process = start_fake(src, out, env={**injected(), "SIGNAL_ON_STDERR": "SIGTERM:stopped by SIGTERM"})
        wait_for_imports(process)
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        if process.returncode == 0:
            continue
        assert process.returncode == 143 and "Traceback" not in stderr, (delay, stderr)
        assert "ignored due to race" not in stderr, (delay, stderr)


SPAWN_AND_INTERRUPT = """\
import os, signal, sys, time
sys.path.insert(0, {root!r})
import infer_mp
if __name__ == "__main__":
    process, conn = infer_mp.spawn_worker(infer_mp.PipelineRef({fake!r}, "FakePipeline"))
    os.kill(process.pid, signal.SIGINT)
    time.sleep(1.0)
    print("alive" if process.is_alive() else f"ended {{process.exitcode}}")
    process.kill()
"""


def test_the_first_worker_starts_with_ctrl_c_held_back(tmp_path):
    """The first worker of a run (with it multiprocessing starts its resource tracker, which
    unblocks SIGINT and SIGTERM once up) began with both unblocked: a Ctrl-C in its first
    tenths of a second killed it, or printed a traceback of its start-up."""
    import subprocess
    import sys

    script = tmp_path / "spawn_and_interrupt.py"
    script.write_text(SPAWN_AND_INTERRUPT.format(root=str(ROOT), fake=str(ROOT / "tests" / "fake_pipeline.py")))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "alive" and "Traceback" not in run.stderr, (run.stdout, run.stderr)


def test_no_worker_outlives_main_whatever_path_it_ended_by(tmp_path):
    """A worker left alive when main() returned (a second Ctrl-C cut short the killing of the
    warm workers) made Python's exit wait for it forever: a worker ignores the SIGTERM that
    is all Python's exit sends it. main() now kills any that is left."""
    import infer_mp

    fake = infer_mp.PipelineRef(str(ROOT / "tests" / "fake_pipeline.py"), "FakePipeline")
    process, conn = infer_mp.spawn_worker(fake)
    try:
        assert process.is_alive()
        assert infer_mp.main(["--pipeline", "x", "--input_dir", str(tmp_path / "missing"), "--device", "cpu",
                              "--output_dir", str(tmp_path / "out")]) == 2
        process.join(10)
        assert not process.is_alive()
    finally:
        process.kill()
        conn.close()


def test_signals_after_the_first_while_starting_change_nothing():
    """SIGTERM, then Ctrl-C twice, before the dispatch loop: the later ones raised again inside
    the unwinding from the first, cutting short the killing of the workers."""
    import infer_mp

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(infer_mp.Terminated):
            infer_mp.raise_stop(signal.SIGTERM, None)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # (handled here, between two bytecodes, if at all)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_burst_of_signals_while_starting_never_hangs(tmp_path):
    """SIGTERM, SIGINT, SIGINT sent at once to the whole run (a terminal's impatient Ctrl-Cs
    after a `kill`) at instants across its start: it ended with one line and 130 or 143, but
    one run in three never ended at all (see the test above)."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 3)
    for delay in (0.1, 0.3, 0.5, 0.7, 0.9):
        process = start_fake(src, out, env={"FAKE_PIPELINE_DELAY": "0.2"})
        wait_for_imports(process)
        time.sleep(delay)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGINT):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode in (0, 130, 143) and "Traceback" not in stderr, (delay, stderr)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_an_error_line_prints_changes_nothing(tmp_path, signum):
    """A usage error's line being written (to a slow reader's pipe), then SIGTERM or Ctrl-C: the
    signal raised inside main()'s `except UserError`: two tracebacks and exit 1 (or killed by
    SIGINT). The run had its code, 2; a signal from then on changes nothing."""
    name = signal.Signals(signum).name
    run = run_fake(tmp_path / "missing", tmp_path / "out", env={**injected(), "SIGNAL_ON_STDERR": f"{name}:error:"})
    assert run.code == 2 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
