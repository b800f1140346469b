"""Outputs recorded, not guessed (issue 23): which file is whose is what the run log says, however
--output_dir or --input_dir is spelled, however alike the names, however a run ended."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import threading
import zlib
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import (
    all_records,
    assert_invariant,
    bare_backend,
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
    start_fake,
    wait_for,
    write,
)

LOG = "infer_mp.runlog.jsonl"


# -- what is on disk, and what the run log says of it ---------------------------------------------


def texts(out: Path) -> dict[str, str | None]:
    """The text of every output JSON under out (conftest.outputs: hidden names too, not what is
    staged), by path relative to it."""
    return {name: content.get("text") for name, content in outputs(out).items()}


def latest_by_name(out: Path) -> dict[str, dict]:
    """Each input's last whole record, by the input's file name (however its folder was spelled)."""
    return {Path(key).name: record for key, record in latest_records(out).items()}


def listed(record: dict | None) -> set[str]:
    """The files (relative to the output folder) that a record lists: outputs and extras."""
    record = record or {}
    return {os.path.normpath(rel) for key in ("outputs", "extra_outputs") for rel in record.get(key) or []}


def unlisted_outputs(out: Path) -> list[str]:
    """Output JSON files that the last record of the input they hold the text of does not list:
    stale copies under an old name, or pages an older version had."""
    latest = latest_by_name(out)
    return [name for name, content in outputs(out).items()
            if name not in listed(latest.get(Path(content["input_path"]).name))]


def shared_outputs(out: Path) -> set[str]:
    """Files that the last done records of two inputs both list."""
    owners: dict[str, set[str]] = defaultdict(set)
    for key, record in latest_records(out).items():
        if record["status"] == "done":
            for rel in listed(record):
                owners[rel].add(key)
    return {rel for rel, keys in owners.items() if len(keys) > 1}


def assert_recorded_outputs_kept(out: Path, name: str, record: dict, text: str | None = None) -> None:
    """Every file the record of input `name` lists is there (and, for its JSON, holds `text`)."""
    for rel in listed(record):
        assert (out / rel).is_file(), f"{rel} of {name} is gone"
        if text is not None and rel.endswith(".json"):
            assert json.loads((out / rel).read_text())["text"] == text, f"{rel} of {name} was overwritten"


def run_from_inside(src: Path, *extra: str):
    """A run from inside the input folder, with the output folder spelled `../out`."""
    return run_cli(*fake_args(Path("."), Path("../out"), *extra), cwd=src)


def quiet_run(src: Path, out: Path, tmp_path: Path, *extra: str):
    """A run, and whether any of its processes imported the pipeline (a worker started)."""
    imports = tmp_path / "imports.log"
    imports.unlink(missing_ok=True)
    run = run_fake(src, out, *extra, env={"FAKE_PIPELINE_IMPORT_LOG": str(imports)})
    return run, imports.exists()


KILLER = """\
import os, signal
NAMES = set(os.environ.get("KILL_ON_DELETE", "").split(","))
MARKER = os.environ.get("KILL_MARKER", "")

def _armed(call):
    def wrapper(path, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) in NAMES:
            import multiprocessing
            if multiprocessing.parent_process() is None:  # the coordinator, not a worker
                open(MARKER, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return call(path, *args, **kwargs)
    return wrapper

for _name in ("unlink", "remove", "rename", "replace"):
    setattr(os, _name, _armed(getattr(os, _name)))
"""


def kill_on_delete(folder: Path, names: list[str]) -> tuple[dict[str, str], Path]:
    """Environment whose coordinator is killed (kill -9) the moment it deletes, or moves away,
    a file of one of these names (a sitecustomize first on PYTHONPATH); and the marker file it
    leaves when it did."""
    write(folder / "sitecustomize.py", KILLER)
    marker = folder / "killed"
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "KILL_ON_DELETE": ",".join(names), "KILL_MARKER": str(marker)}, marker


# -- 1. an output folder spelled with `..` --------------------------------------------------------


@pytest.mark.parametrize("name, content", [("a.png", "ZAP"), ("a.pdf", pdf_bytes(["ZAP", "good"]))],
                         ids=["image", "document"])
def test_a_done_input_that_fails_under_overwrite_is_then_a_standing_failure(dirs, name, content):
    """Done, then failed on the same file under --overwrite with other options: later plain
    runs counted it "skipped (already done)" from the older done record, so the failure was
    never said again and --dry_run counted 0 failed before."""
    src, out = dirs
    write(src / name, content)
    assert run_fake(src, out).code == 0
    texts = {path.name: json.loads(path.read_text())["text"] for path in out.glob("*.json")}
    failing = run_fake(src, out, "--overwrite", "--pipeline_arg", "raise_on=ZAP", "--max_page_error_rate", "0")
    assert failing.code == 1, failing.stderr
    dry = run_fake(src, out, "--dry_run")
    assert dry.code == 0 and "0 already done (skipped), 1 failed before and unchanged" in dry.stdout, dry.stdout
    again = run_fake(src, out)
    assert again.code == 0 and "0 skipped (already done), 1 failed before (not retried)" in again.stderr, again.stderr
    assert {path.name: json.loads(path.read_text())["text"] for path in out.glob("*.json")} == texts  # kept
    retried = run_fake(src, out, "--retry_failed")
    assert retried.code == 0 and "1 done" in retried.stderr, retried.stderr


@pytest.mark.parametrize("pages_per_task", ["1", "100"])
def test_retry_failed_reads_a_document_page_that_failed_under_overwrite_again(dirs, pages_per_task):
    """Review: a document done, then its page 1 failed under --overwrite: --retry_failed
    counted page 1 done by the earlier record (its file still there) and recorded the document
    done, 0 pages read, exit 0, though the page failed under these options."""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["one", "two ZAP", "three"]))
    flags = ("--pages_per_task", pages_per_task)
    assert run_fake(src, out, *flags).code == 0
    zap = ("--pipeline_arg", "raise_on=ZAP", *flags)
    assert run_fake(src, out, "--overwrite", *zap).code == 1
    again = run_fake(src, out, "--retry_failed", *zap)
    assert again.code == 1 and "page 1 of 3 failed" in again.stderr, again.stderr
    assert json.loads((out / "doc_1.json").read_text())["text"] == "two ZAP"  # the earlier text is kept
    fixed = run_fake(src, out, "--retry_failed", *flags)
    assert fixed.code == 0 and "1 done" in fixed.stderr, fixed.stderr
    assert_invariant(src, out)


@pytest.mark.parametrize("name, content", [("i.png", "ZAP SCORES:0.5,0.6"),
                                           ("d.pdf", pdf_bytes(["alpha", "ZAP SCORES:0.5,0.6", "gamma"]))],
                         ids=["image", "document"])
def test_a_weak_pages_kept_text_survives_an_overwrite_pass_that_fails_it(dirs, name, content):
    """Review (older than the ledger's last changes): a weak page's text, kept under
    --min_page_score, was deleted by an --overwrite pass that failed that page; a failing
    --retry_failed pass kept it, as a done page's text is kept."""
    src, out = dirs
    write(src / name, content)
    gate = ("--min_page_score", "0.9")
    assert run_fake(src, out, *gate).code == 1
    kept = {path.name: json.loads(path.read_text())["text"] for path in out.glob("*.json")}
    assert run_fake(src, out, *gate, "--overwrite", "--pipeline_arg", "raise_on=ZAP").code == 1
    assert {path.name: json.loads(path.read_text())["text"] for path in out.glob("*.json")} == kept
    assert_invariant(src, out)
    again = run_fake(src, out, *gate, "--retry_failed")
    assert again.code == 1 and "Traceback" not in again.stderr, again.stderr  # (weak again: it stays)
    assert {path.name for path in out.glob("*.json")} == set(kept)


def test_dotdot_output_dir_a_new_input_does_not_overwrite_a_gone_inputs_output(dirs, tmp_path):
    src, out = dirs
    write(src / "a.jpg", "JPG")
    assert run_from_inside(src).code == 0
    assert texts(out) == {"a.json": "JPG"}
    (src / "a.jpg").rename(tmp_path / "a.jpg")  # processed scan moved away: its text is kept
    write(src / "a.png", "PNG")
    run = run_from_inside(src)
    assert run.code == 0, run.stderr
    found = texts(out)
    assert found.pop("a.json") == "JPG"
    assert list(found.values()) == ["PNG"]  # under another name
    assert not shared_outputs(out) and not unlisted_outputs(out)


def test_dotdot_output_dir_a_document_never_deletes_or_overwrites_a_gone_inputs_page_name(dirs, tmp_path):
    src, out = dirs
    write(src / "doc_5.png", "GONE")  # alone: named doc_5.json, as page 5 of a doc.pdf would be
    assert run_from_inside(src).code == 0
    gone = latest_by_name(out)["doc_5.png"]
    assert listed(gone) == {"doc_5.json"}
    (src / "doc_5.png").rename(tmp_path / "doc_5.png")
    for pages in (8, 3):  # doc.pdf arrives with 8 pages, then is shortened to 3
        write(src / "doc.pdf", pdf_bytes([f"page {i} of {pages}" for i in range(pages)]))
        run = run_from_inside(src)
        assert run.code == 0, run.stderr
        assert_recorded_outputs_kept(out, "doc_5.png", gone, "GONE")
        assert not shared_outputs(out)
        doc = [c for c in outputs(out).values() if Path(c["input_path"]).name == "doc.pdf"]
        assert sorted((c["page_index"], c["page_count"]) for c in doc) == [(i, pages) for i in range(pages)]


# -- 2. names that share an underscore prefix with another input's stem ------------------------


def test_an_old_name_beside_an_input_with_a_shorter_stem_is_retired(dirs):
    src, out = dirs
    write(src / "scan.png", "SCAN")
    write(src / "scan_a.jpg", "JPG")
    assert run_fake(src, out).code == 0
    write(src / "scan_a.png", "PNG")  # scan_a.jpg's output now has another name
    run = run_fake(src, out)
    assert run.code == 0, run.stderr
    assert not unlisted_outputs(out)
    assert sorted(texts(out).values()) == ["JPG", "PNG", "SCAN"]  # one file each: no stale copy


def test_pages_of_a_shortened_document_beside_an_input_with_a_shorter_stem_are_retired(dirs):
    src, out = dirs
    write(src / "scan.png", "SCAN")
    doc = write(src / "scan_batch.pdf", pdf_bytes(["page a", "page b", "page c"]))
    assert run_fake(src, out).code == 0
    doc.write_bytes(pdf_bytes(["page NEW"]))
    run = run_fake(src, out)
    assert run.code == 0, run.stderr
    assert not (out / "scan_batch_1.json").exists() and not (out / "scan_batch_2.json").exists()
    assert not unlisted_outputs(out)
    pages = [c for c in outputs(out).values() if Path(c["input_path"]).name == "scan_batch.pdf"]
    assert [(c["page_index"], c["page_count"]) for c in pages] == [(0, 1)]


# -- 3. a kill between an input's new record and the retirement of its old files ----------------


@pytest.mark.parametrize("left", ["nothing left", "old pages copied back", "killed while retiring"])
def test_pages_a_shorter_version_lacks_do_not_outlive_the_next_run(dirs, tmp_path, left):
    src, out = dirs
    doc = write(src / "doc.pdf", pdf_bytes([f"page {i}" for i in range(6)]))
    assert run_fake(src, out).code == 0
    old = {name: (out / name).read_bytes() for name in page_files(out)}
    assert len(old) == 6
    doc.write_bytes(pdf_bytes(["page new 0", "page new 1", "page new 2"]))
    if left == "killed while retiring":
        env, marker = kill_on_delete(tmp_path / "hook", sorted(old)[3:])
        assert run_fake(src, out, env=env).code == -signal.SIGKILL
        assert marker.exists()
    else:
        assert run_fake(src, out).code == 0
    if left == "old pages copied back":  # as if the kill came before the deletions
        for name, data in old.items():
            if not (out / name).exists():
                (out / name).write_bytes(data)
    run = run_fake(src, out)
    assert run.code == 0, run.stderr
    pages = sorted((c["page_index"], c["page_count"]) for c in outputs(out).values())
    assert pages == [(0, 3), (1, 3), (2, 3)]
    assert not unlisted_outputs(out)


# -- 4. an input whose output name looks like a temporary ---------------------------------------


def test_an_output_named_like_a_temporary_is_not_deleted_on_reruns(dirs, tmp_path):
    src, out = dirs
    write(src / ".scan.20240101.tmp.png", "HIDDEN")  # selected: the default pattern takes hidden names
    for number in range(3):
        run, started = quiet_run(src, out, tmp_path)
        assert run.code == 0, run.stderr
        assert list(texts(out).values()) == ["HIDDEN"], f"after run {number + 1}"
        assert not unlisted_outputs(out)
    assert not started and "0 input(s) to do" in run.stderr


# -- 5. a subfolder of the output folder that links elsewhere -----------------------------------


@pytest.mark.parametrize("ending", ["crashed page", "kill -9"])
def test_nothing_outside_the_output_folder_is_deleted_through_a_linked_subfolder(dirs, tmp_path, ending):
    src, out = dirs
    elsewhere = tmp_path / "elsewhere"
    names = ("doc_7.json", "notes.txt", ".doc_0.json.4242.tmp.json")  # a page's name, none, a temporary's
    precious = [write(elsewhere / name, "precious") for name in names]
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    write(src / "sub" / "ok.png", "fine")
    args = ("--recursive", "--max_attempts", "1")
    if ending == "crashed page":  # the worker dies on the document's only page
        write(src / "sub" / "doc.pdf", pdf_bytes(["CRASH"]))
        assert "Traceback" not in run_fake(src, out, *args).stderr
    else:  # the coordinator is killed while the worker is on the document
        write(src / "sub" / "doc.pdf", pdf_bytes(["page 0"]))
        init = tmp_path / "init.log"
        process = start_fake(src, out, *args, env={"FAKE_PIPELINE_DELAY": "60", "FAKE_PIPELINE_INIT_LOG": str(init)})
        wait_for(init.exists)
        process.kill()
        process.communicate(timeout=60)
    for extra in (("--retry_failed",), ()):
        assert "Traceback" not in run_fake(src, out, *args, *extra).stderr
    assert [p.read_text() if p.exists() else None for p in precious] == ["precious"] * len(precious)


def test_a_subfolder_swapped_for_a_link_during_a_run_is_not_written_through(dirs, tmp_path):
    """Review finding: the output folders were checked once per run, so a subfolder replaced by
    a link to elsewhere after its first file was placed took the rest of the run's files (and
    the next run counted them as done, through the link). Each placement checks it now."""
    src, out = dirs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i in range(4):
        write(src / "sub" / f"s{i}.png", f"scan {i}")
    process = start_fake(src, out, "--recursive", "--batch_size", "1", "--instances_per_device", "1",
                         env={"FAKE_PIPELINE_DELAY": "0.5"})
    wait_for((out / "sub" / "s0.json").exists)
    (out / "sub").rename(out / "sub.real")
    (out / "sub").symlink_to(elsewhere)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == [], stderr
    assert "leads outside --output_dir (a link?)" in stderr and "Traceback" not in stderr


# -- 6. --save pictures of a gone input ----------------------------------------------------------


def test_shortening_a_document_keeps_the_pictures_of_a_gone_input(dirs, tmp_path):
    src, out = dirs
    doc = write(src / "a.pdf", pdf_bytes(["page 0", "page 1", "page 2"]))
    write(src / "a_1.pdf", pdf_bytes(["another document"]))
    assert run_fake(src, out, "--save", "img").code == 0
    gone = latest_by_name(out)["a_1.pdf"]
    assert any(rel.endswith(".png") for rel in listed(gone))
    (src / "a_1.pdf").rename(tmp_path / "a_1.pdf")
    doc.write_bytes(pdf_bytes(["page new"]))
    run = run_fake(src, out, "--save", "img")
    assert run.code == 0, run.stderr
    for record in (gone, latest_by_name(out)["a_1.pdf"]):  # its last done record, then and now
        assert_recorded_outputs_kept(out, "a_1.pdf", record)


# -- 7. exit codes: a failure recorded for the first time fails that run -----------------------


def failed_lines(stderr: str, name: str) -> list[str]:
    return [line for line in stderr.splitlines() if "FAILED" in line and name in line]


def test_a_plain_rerun_that_first_records_a_document_as_failed_exits_1(dirs):
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["RAISE", *(f"page {i}" for i in range(1, 6))]))
    args = ("--pages_per_task", "1", "--instances_per_device", "1")
    process = start_fake(src, out, *args, env={"FAKE_PIPELINE_DELAY": "4"})
    wait_for(lambda: any(r.get("failed_pages") for r in all_records(out)))
    process.send_signal(signal.SIGTERM)  # page 0 recorded failed, the document not finished
    process.communicate(timeout=60)
    assert len(page_files(out)) < 5, "the stopped run finished the document: no first failure left to record"
    run = run_fake(src, out, *args)
    assert run.code == 1, run.stderr
    assert failed_lines(run.stderr, "doc.pdf")
    again = run_fake(src, out, *args)
    assert again.code == 0, again.stderr  # a failure of an earlier run: reported once
    assert not failed_lines(again.stderr, "doc.pdf")


STOPPED_FAILURES = {  # an input that fails, and the options it fails under
    "image": ("a.png", "RAISE", ()),
    "document": ("a.pdf", pdf_bytes(["RAISE", "good"]), ()),
    "weak image": ("a.png", "SCORES:0.2", ("--min_page_score", "0.5")),  # (failed, its text kept)
    "weak document": ("a.pdf", pdf_bytes(["page 0 SCORES:0.9", "page 1 SCORES:0.2"]), ("--min_page_score", "0.5")),
}


@pytest.mark.parametrize("kind, stop, no_op_first", [
    ("image", signal.SIGTERM, False), ("image", signal.SIGKILL, False), ("document", signal.SIGTERM, False),
    ("weak image", signal.SIGTERM, False), ("weak document", signal.SIGKILL, False), ("image", signal.SIGTERM, True)])
def test_a_failure_recorded_by_a_run_that_was_then_stopped_is_reported_by_the_next_run(dirs, tmp_path, kind, stop,
                                                                                        no_op_first):
    """The run that recorded the failure ended by a signal (143, or a kill -9): it never exited 1
    for it, so it is news to the next plain run (exit 1, named; not tried again, a weak image's
    text kept), and only then a failure that stands. (A no-op run before it, which writes only
    its closing line, has a generation of its own: its exit 0 says nothing of a later run's.)"""
    src, out = dirs
    name, content, extra = STOPPED_FAILURES[kind]
    if no_op_first:
        write(src / "fine.png", "fine")
        assert run_fake(src, out).code == 0 and run_fake(src, out).code == 0
    bad = write(src / name, content)
    write(src / "z.png", "WAIT")  # still running when the failure is recorded
    gate = tmp_path / "gate"
    env = {"FAKE_PIPELINE_WAIT_FILE": str(gate)}
    process = start_fake(src, out, "--instances_per_device", "2", *extra, env=env)
    wait_for(lambda: any(a_failure(r) for r in all_records(out)))
    process.signal_group(stop)
    if stop == signal.SIGTERM:  # (and again, not to wait STOP_GRACE_SECONDS for z.png: stopped the same way)
        process.wait_for_stderr("starting no new inputs")
        process.signal_group(stop)
    process.communicate(timeout=60)
    recorded = [r for r in all_records(out) if r["input"].endswith(bad.name)]
    gate.touch()
    run = run_fake(src, out, *extra, env=env)
    assert run.code == 1 and failed_lines(run.stderr, bad.name), run.stderr
    assert "failed before" not in run.stderr
    records = [r for r in all_records(out) if r["input"].endswith(bad.name)]
    assert records[:len(recorded)] == recorded and len(records) == len(recorded) + 1
    assert records[-1]["device"] is None and records[-1]["outputs"] == recorded[-1]["outputs"]  # not tried again
    for field in ("failed_pages", "weak_pages", "weak", "options", "error"):  # recorded again as it was
        assert records[-1].get(field) == recorded[-1].get(field), field
    again = run_fake(src, out, *extra, env=env)
    assert again.code == 0 and "1 failed before" in again.stderr and not failed_lines(again.stderr, bad.name)
    assert_invariant(src, out)


@pytest.mark.parametrize("kind", ["document", "weak image"])
def test_a_failure_reaches_the_run_log_when_it_is_said(dirs, tmp_path, kind):
    """A document's failed pages, or a weak image, were said (FAILED) and then stayed in the log's
    buffer while other inputs ran: a kill -9 lost them, and the next run read the input again."""
    src, out = dirs
    name, content, extra = STOPPED_FAILURES[kind]
    bad = write(src / name, content)
    write(src / "z.png", "WAIT")
    process = start_fake(src, out, "--instances_per_device", "2", *extra,
                         env={"FAKE_PIPELINE_WAIT_FILE": str(tmp_path / "gate")})
    process.wait_for_stderr(f"FAILED {bad}")
    wait_for(lambda: any(a_failure(r) and "range" not in r for r in all_records(out)), timeout=10)


def test_a_run_line_with_an_input_field_added_by_hand_is_passed_over(dirs):
    src, out = dirs
    write(src / "a.png", "fine")
    assert run_fake(src, out).code == 0
    log = out / LOG
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({**line, "input": "see ticket 12"} if "run" in line else line) + "\n"
                           for line in lines))
    run = run_fake(src, out)
    assert run.code == 0 and "0 input(s) to do, 1 already done" in run.stderr, run.stderr


@pytest.mark.parametrize("value", ["by hand", None, 3, {}])
def test_an_input_record_with_a_run_field_added_by_hand_is_still_its_record(dirs, value):
    src, out = dirs
    write(src / "a.png", "fine")
    assert run_fake(src, out).code == 0
    log = out / LOG
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({**line, "run": value} if "input" in line else line) + "\n" for line in lines))
    run = run_fake(src, out)
    assert run.code == 0 and "0 input(s) to do, 1 already done" in run.stderr, run.stderr


def a_failure(record: dict) -> bool:
    return record.get("status") == "failed" or bool(record.get("failed_pages"))


def failed_run_of_a_version_without_generations(src: Path, out: Path) -> list[dict]:
    """A run with a failure, its log's lines as a version before generations on closing lines
    wrote them."""
    make_inputs(src, 3)
    write(src / "bad.png", "RAISE")
    assert run_fake(src, out).code == 1
    lines = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    return [{key: value for key, value in line.items() if key != "gen" or "run" not in line} for line in lines]


@pytest.mark.parametrize("compacted", [False, True])
def test_failures_in_a_run_log_of_a_version_without_generations_on_its_run_lines_stand(dirs, compacted):
    """Closing lines of earlier versions have no generation: every failure before them counts as
    reported, as it did then, compacted or not."""
    src, out = dirs
    lines = failed_run_of_a_version_without_generations(src, out)
    log = out / LOG
    padding = [{**r, "time": "2000-01-01T00:00:00+00:00"} for r in lines if "input" in r] * 300 if compacted else []
    log.write_text("".join(json.dumps(line) + "\n" for line in padding + lines))
    for _ in range(2):  # (the second after the compaction)
        run = run_fake(src, out)
        assert run.code == 0 and "1 failed before" in run.stderr, run.stderr
    assert len(log.read_text().splitlines()) < len(padding) or not compacted


def test_a_failure_after_the_last_closing_line_of_a_version_without_generations_is_reported_once(dirs):
    """docs/runs.md: in a log of a version before generations, a failure recorded after its
    last closing line (that version's last run was stopped) is reported once more."""
    src, out = dirs
    lines = failed_run_of_a_version_without_generations(src, out)
    log = out / LOG
    failed = [line for line in lines if line.get("status") == "failed"]
    closing = [line for line in lines if "run" in line]
    assert len(failed) == 1 and len(closing) == 1
    lines = [line for line in lines if line not in failed and line not in closing] + closing + failed
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = run_fake(src, out)
    assert run.code == 1 and f"FAILED {src / 'bad.png'}" in run.stderr, run.stderr
    run = run_fake(src, out)
    assert run.code == 0 and "1 failed before" in run.stderr and "FAILED" not in run.stderr, run.stderr


# -- 8. the input folder reached through a link --------------------------------------------------


def test_the_input_folder_through_a_link_holds_the_same_inputs(dirs, tmp_path):
    src, out = dirs
    image = write(src / "a.png", "old text")
    link = tmp_path / "link"
    link.symlink_to(src)
    assert run_fake(src, out).code == 0
    run, started = quiet_run(link, out, tmp_path)
    assert run.code == 0 and not started, run.stderr
    assert texts(out) == {"a.json": "old text"}
    image.write_text("new text, and longer")
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    run = run_fake(link, out)
    assert run.code == 0, run.stderr
    assert texts(out) == {"a.json": "new text, and longer"}


# -- 10. the run log stays bounded under no-op reruns --------------------------------------------


def test_run_lines_of_no_op_reruns_are_compacted(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 3)
    assert run_fake(src, out).code == 0
    log = out / LOG
    lines = log.read_text().splitlines()
    run_line = next(line for line in reversed(lines) if "run" in json.loads(line))
    log.write_text("".join(line + "\n" for line in lines + [run_line] * 1500))  # 1,500 cron ticks
    before = outputs(out)
    run, started = quiet_run(src, out, tmp_path)
    assert run.code == 0 and not started, run.stderr
    assert len(log.read_text().splitlines()) < 100
    run, started = quiet_run(src, out, tmp_path)  # the records survived compaction
    assert run.code == 0 and not started and "0 input(s) to do" in run.stderr
    assert outputs(out) == before


# -- 11. run logs written by today's version keep working ---------------------------------------

TODAYS_FIELDS = ("time", "input", "status", "pages", "outputs", "extra_outputs", "device", "attempts", "seconds",
                 "error", "size", "mtime_ns", "page_count", "range", "failed_pages")


def test_a_run_log_in_todays_format_counts_its_inputs_done(dirs, tmp_path):
    src, out = dirs
    make_inputs(src, 2, pdf_pages=2)
    assert run_fake(src, out).code == 0
    log = out / LOG
    kept = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if "input" in record and record.get("status") in ("done", "failed"):  # today's statuses
            kept.append({key: record[key] for key in TODAYS_FIELDS if key in record})
        elif "run" in record:
            kept.append({"time": record["time"], "run": record["run"]})
    log.write_text("".join(json.dumps(record) + "\n" for record in kept))
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.json")}
    run, started = quiet_run(src, out, tmp_path)
    assert run.code == 0 and not started, run.stderr
    assert "0 input(s) to do" in run.stderr
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.json")} == before


# -- merging shards without trusting clocks; case-insensitive filesystems -------------------------


def test_a_shard_machine_whose_clock_was_ahead_does_not_outvote_a_later_run(dirs):
    """Records merge by generation (one more each run), not by wall-clock strings: a shard's
    record dated in the future must not make a later run's record of the same input lose."""
    src, out = dirs
    write(src / "a.png", "version 1")
    assert run_fake(src, out, "--shard", "0/1").code == 0
    shard_log = out / "infer_mp.shard-0-of-1.runlog.jsonl"
    lines = [json.loads(line) for line in shard_log.read_text().splitlines()]
    shard_log.write_text("".join(json.dumps({**line, "time": "2099-01-01T00:00:00+00:00"}) + "\n" for line in lines))
    write(src / "a.png", "version 2, longer")
    assert run_fake(src, out).code == 0  # redoes the changed file
    again = run_fake(src, out, env={"FAKE_PIPELINE_IMPORT_LOG": str(out.parent / "imports")})
    assert again.code == 0 and "0 input(s) to do" in again.stderr, again.stderr
    assert not (out.parent / "imports").exists()
    assert texts(out) == {"a.json": "version 2, longer"}


def test_names_that_differ_only_by_case_clash_on_a_case_insensitive_filesystem(tmp_path):
    import infer_mp

    paths = sorted(str(tmp_path / name) for name in ("Scan.png", "scan.jpg", "doc.pdf", "DOC_1.png"))
    sensitive = [t.out_base for t in infer_mp.plan_tasks(tmp_path, tmp_path / "out", paths)]
    folded = [t.out_base for t in infer_mp.plan_tasks(tmp_path, tmp_path / "out", paths, folded=True)]
    assert sensitive == ["DOC_1", "Scan", "doc", "scan"]
    assert folded == ["DOC_1.png", "Scan.png", "doc.pdf", "scan.jpg"]
    assert infer_mp.case_insensitive(tmp_path) is False  # (Linux filesystems here are case-sensitive)
    assert not list(tmp_path.iterdir())  # the probe leaves nothing


def test_a_linked_output_subfolder_is_refused_and_named(dirs, tmp_path):
    src, out = dirs
    write(src / "sub" / "a.png", "text")
    write(src / "b.png", "text")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    run = run_fake(src, out, "--recursive")
    assert run.code == 1 and "leads outside --output_dir" in run.stderr and "sub/a.png" in run.stderr
    assert not list(elsewhere.iterdir()) and (out / "b.json").is_file()
    again = run_fake(src, out, "--recursive")  # still linked: refused again, and said (exit 1)
    assert again.code == 1 and "sub/a.png" in again.stderr and "failed before" not in again.stderr
    (out / "sub").unlink()  # the folder's fault, not the input's: once fixed, a plain rerun does it
    fixed = run_fake(src, out, "--recursive")
    assert fixed.code == 0, fixed.stderr
    assert texts(out) == {"b.json": "text", "sub/a.json": "text"}


# -- found by a hostile review of the ledger ------------------------------------------------------


def test_a_supersedes_record_is_in_the_file_before_any_old_file_is_deleted(tmp_path, monkeypatch):
    """A kill between retiring old files and writing the record that supersedes them would
    leave the last record on disk listing deleted files."""
    import infer_mp

    out = tmp_path / "out"
    write(out / "a.json", "old name")
    config = make_config(output_dir=out, run_log=out / LOG)
    task = infer_mp.plan_tasks(tmp_path, out, [str(tmp_path / "a.jpg")])[0]
    ledger = infer_mp.Ledger.read(config)
    ledger.open(config.run_log)
    ledger.write(task, "done", outputs=[str(out / "a.json")])
    ledger.log.flush()
    seen = []
    real_unlink = os.unlink
    monkeypatch.setattr(infer_mp.os, "unlink", lambda path: (seen.append((out / LOG).read_text()), real_unlink(path)))
    ledger.write(task, "done", outputs=[str(out / "a.jpg.json")])
    assert not (out / "a.json").exists() and len(seen) == 1 and "a.jpg.json" in seen[0]


def test_a_file_another_input_placed_since_is_not_complete(tmp_path):
    """J's done record lists a.json; K placed a.json later (killed before its own record):
    the file holds K's text, so J is not done."""
    import infer_mp

    out = tmp_path / "out"
    write(out / "a.json", "K's text")
    write(tmp_path / "a.bmp", "J")
    j, k = str(tmp_path / "a.bmp"), str(tmp_path / "a.png")
    size, mtime = (tmp_path / "a.bmp").stat().st_size, (tmp_path / "a.bmp").stat().st_mtime_ns
    done = {"time": "t", "gen": 1, "input": j, "status": "done", "outputs": ["a.json"], "size": size, "mtime_ns": mtime}
    placing = {"time": "t", "gen": 2, "input": k, "status": "placing", "outputs": ["a.json"]}
    (out / LOG).write_text(json.dumps(done) + "\n")
    config = make_config(output_dir=out, run_log=out / LOG)
    task = infer_mp.plan_tasks(tmp_path, out, [j])[0]
    task = infer_mp.Task(task.index, task.path, task.rel, task.out_dir, "a", (size, mtime))
    ledger = infer_mp.Ledger.read(config)
    assert infer_mp.is_complete(task, ledger.latest[j], ledger)
    with (out / LOG).open("a") as log:
        log.write(json.dumps(placing) + "\n")
    ledger = infer_mp.Ledger.read(config)
    assert not infer_mp.is_complete(task, ledger.latest[j], ledger)


def test_an_input_or_the_run_log_is_never_overwritten_by_an_output(tmp_path):
    out = tmp_path / "out"
    write(out / "scans" / "a_vis.png", "an input, not a picture")
    write(out / "scans" / "scans" / "a.png", "text")  # -> out/scans/a.json, out/scans/a_vis.png
    run = run_cli(*fake_args(out / "scans", out, "--recursive", "--save", "img"))
    assert run.code == 1 and "is an input or a run log" in run.stderr, run.stderr
    assert (out / "scans" / "a_vis.png").read_text() == "an input, not a picture"
    src = tmp_path / "in"
    write(src / "scan.png", "text")
    run = run_cli(*fake_args(src, tmp_path / "out2", "--run_log", str(tmp_path / "out2" / "scan.json")))
    assert run.code == 2 and "an output's name" in run.stderr  # (refused before anything is written)
    assert not (tmp_path / "out2" / "scan.json").exists()


def test_an_input_folder_named_like_the_staging_folder_is_refused(dirs):
    src, out = dirs
    write(src / ".infer_mp.staging" / "a.png", "text")
    write(src / "b.png", "text")
    run = run_fake(src, out, "--recursive")
    assert run.code == 1 and "are infer_mp.py's own" in run.stderr and (out / "b.json").is_file()


def test_a_worker_that_dies_while_renaming_is_charged_to_what_it_was_renaming():
    """Review finding: a worker holds the input whose files it is renaming and, behind it, its
    next batch (see Backend._idle). If renaming kills it (a stalled disk past --task_timeout,
    the OOM killer), the input being renamed dies alone and is charged; the batch behind it was
    not begun and goes back uncharged. (Charging neither looped for ever.)"""
    import infer_mp
    backend = bare_backend()
    spec = infer_mp.WorkerSpec(0, "cpu", 1)
    renaming, behind = (infer_mp.Task(i, f"/in/{i}.png", f"{i}.png", "/out", str(i)) for i in (1, 2))
    for attempt in (1, 2):
        worker = infer_mp.WorkerHandle(spec, 0.0, ready=True)
        worker.held = {1: renaming, 2: behind}
        worker.placing = {1: infer_mp.TaskDone(renaming, spec, "/out/.infer_mp.staging/w", "0-", ["1.json"], {}, 0.1,
                                               attempt)}
        backend.handed.update({1: attempt, 2: 1})
        events = list(backend._requeue_or_fail(worker, "timed out", replaced=True))
        assert backend.handed[2] == 0  # the batch behind: handed back, as never begun
    failed = [e for e in events if isinstance(e, infer_mp.TaskFailed)]
    assert [e.task.index for e in failed] == [1] and "2 times while running this input alone" in failed[0].error
    assert [task.index for task in backend.pending].count(2) == 2  # handed back after each death


def test_a_batch_placing_line_attributes_each_of_its_files(dirs):
    """One `placing` line per batch names each input's new files. A run killed after the
    renames and before the done records leaves files that the next run attributes from that
    line, input by input: every one of them is retired (no record holds it), and the inputs
    still there are redone; without the line, the files of inputs gone since would stay,
    nobody's."""
    src, out = dirs
    make_inputs(src, 4)
    assert run_fake(src, out, "--batch_size", "4", "--instances_per_device", "1").code == 0
    placing = [r for r in map(json.loads, (out / LOG).read_text().splitlines()) if r.get("status") == "placing"]
    assert len(placing) == 1
    assert sorted(entry[1] for entry in placing[0]["placing"]) == [[f"p0{i}.json"] for i in range(4)]
    (out / LOG).write_text(json.dumps(placing[0]) + "\n")  # as that kill leaves it
    (src / "p01.png").unlink()
    (src / "p02.png").unlink()
    run = run_fake(src, out)
    assert run.code == 0, run.stderr
    assert "2 input(s) to do" in run.stderr and "retired 4 stale output file(s)" in run.stderr, run.stderr
    assert page_files(out) == ["p00.json", "p03.json"]


@pytest.mark.parametrize("line", [
    {"time": "2026-12-02T00:00:00+00:00", "gen": 1, "status": "done", "outputs": [5], "placing": "ENTRIES"},
    {"time": "2026-12-02T00:00:00+00:00", "gen": 1, "input": 5, "status": "placing", "placing": "ENTRIES"},
])
def test_a_malformed_line_that_carries_a_placing_list_is_passed_over(dirs, line):
    """Review finding: only a `placing` line without an `input` is a batch's; any other line
    that is not a record is passed over, even with a `placing` list in it, and deletes nothing."""
    src, out = dirs
    make_inputs(src, 1)
    user = write(out / "user.json", "the user's own file")
    line = {**line, "placing": [[str(src / "gone.png"), ["user.json"], []]]}
    (out / LOG).write_text(json.dumps(line) + "\n")
    run = run_fake(src, out)
    assert run.code == 0 and "retired" not in run.stderr, run.stderr
    assert user.read_text() == "the user's own file"


@pytest.mark.parametrize("options", [(), ("--retry_failed",), ("--dry_run",)])
def test_hand_edited_fields_that_no_set_can_hold_are_passed_over(dirs, options):
    """Review finding: a record whose `status` is a list (or a `placing` line whose `shard` is)
    stopped every run with a traceback, --dry_run too; so did `options` or `weak_pages` of
    the wrong shape once a document's pages were weighed. Each is passed over like any
    hand-edited field: the record as not one, a shard as unknown, options as unknown."""
    src, out = dirs
    src.mkdir()
    out.mkdir()
    lines = []
    for name, field, value in [("a.pdf", "status", [1]), ("b.pdf", "options", [1]), ("c.pdf", "weak_pages", [[1]]),
                               ("d.png", "options", {})]:
        path = src / name
        if name.endswith(".pdf"):
            path.write_bytes(pdf_bytes([f"{name} p0 SCORES:0.5", f"{name} p1 SCORES:0.99"]))
            files = [f"{path.stem}_0.json", f"{path.stem}_1.json"]
            extra = {"page_count": 2, "weak_pages": [0], "page_quality": {"0": {"lines": 1, "score": 0.5, "low": 1.0}}}
        else:
            write(path, f"{name} SCORES:0.5")
            files, extra = [f"{path.stem}.json"], {"weak": True, "quality": {"lines": 1, "score": 0.5, "low": 1.0}}
        for file in files:
            write(out / file, "{}")
        status = path.stat()
        lines.append({"time": "2026-12-04T00:00:00+00:00", "gen": 1, "input": str(path), "status": "done",
                      "outputs": files, "extra_outputs": [], "size": status.st_size, "mtime_ns": status.st_mtime_ns,
                      "options": "x", **extra, field: value})
    lines.append({"time": "2026-12-04T00:00:00+00:00", "gen": 1, "status": "placing", "shard": [1],
                  "placing": [[str(src / "a.pdf"), ["a_0.json"], []]]})
    (out / LOG).write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = run_fake(src, out, "--min_page_score", "0.9", *options)
    assert "Traceback" not in run.stderr and run.code in (0, 1), run.stderr


@pytest.mark.parametrize("target", [".", ".infer_mp.staging"])
def test_a_subfolder_linked_to_another_place_in_the_output_folder_is_not_written_through(dirs, target):
    """Review finding: `out/sub -> .` put sub/a.png's text in a.json, which a.png's record
    held (a.png then skipped for ever); `out/sub -> .infer_mp.staging` had outputs renamed into
    the staging folder and wiped with it, every run. Such a folder is refused, like one that
    leads outside."""
    src, out = dirs
    write(src / "a.png", "top a")
    write(src / "sub" / "a.png", "sub a")
    write(src / "sub" / "b.png", "sub b")
    out.mkdir()
    (out / ".infer_mp.staging").mkdir()
    (out / "sub").symlink_to(target)
    for extra in ((), ("--retry_failed",)):
        run = run_fake(src, out, "--recursive", *extra)
        assert "Traceback" not in run.stderr and "is a link to" in run.stderr, run.stderr
    assert texts(out) == {"a.json": "top a"}


def free_a_name(src: Path, out: Path, away: Path) -> None:
    """a.png done as a.json, then moved away and its a.json deleted by hand; then a new a.jpg,
    which may take the freed name."""
    write(src / "a.png", "PNG")
    assert run_fake(src, out).code == 0
    (src / "a.png").rename(away / "a.png")
    (out / "a.json").unlink()
    write(src / "a.jpg", "JPG")


def test_compaction_keeps_the_placing_that_took_a_name_from_a_gone_inputs_record(dirs, tmp_path):
    """a.jpg took a.json, a name gone a.png's record lists; then a.bmp came and a.jpg moved to
    a.jpg.json, a.json retired. Compaction dropped a.jpg's placing of a.json (superseded by a.jpg's
    own later record), so a.png's record held a.json again: a file listed but not there."""
    src, out = dirs
    free_a_name(src, out, tmp_path)
    assert run_fake(src, out).code == 0
    write(src / "a.bmp", "BMP")
    assert run_fake(src, out).code == 0
    with open(out / LOG, "a") as log:  # (long enough to be compacted by the next run)
        log.writelines(json.dumps({"time": "2026-01-01T00:00:00+00:00", "gen": 1, "run": {"exit_code": 0}}) + "\n"
                       for _ in range(1100))
    assert run_fake(src, out).code == 0
    assert len((out / LOG).read_text().splitlines()) < 50  # compacted
    assert_invariant(src, out, gone=("a.png",))


def test_a_name_freed_by_a_gone_input_stays_with_the_input_that_took_it(dirs, tmp_path):
    """a.png done as a.json, then moved away and its a.json deleted by hand: a new a.jpg takes
    the free name. The gone input's record still lists a.json, but a.jpg placed it last: a
    rerun leaves it a.jpg's (no flip to a.jpg.json leaving a.jpg's text under a.png's name)."""
    src, out = dirs
    free_a_name(src, out, tmp_path)
    for _ in range(2):
        run = run_fake(src, out)
        assert run.code == 0, run.stderr
        assert texts(out) == {"a.json": "JPG"}
        assert listed(latest_by_name(out)["a.jpg"]) == {"a.json"}


def placing_worker(root: Path):
    """A worker with only what placing files needs (see PipelineWorker.place)."""
    import infer_mp
    worker = object.__new__(infer_mp.PipelineWorker)
    worker.processed, worker.started_mb = 0, None
    worker.options = SimpleNamespace(root=str(root), retire_reason=lambda processed, started_mb: None)
    return worker


def test_an_output_subfolder_deleted_during_a_run_is_made_again(tmp_path):
    """Review finding: `rm -r out/sub` while a run writes there failed every later input of
    that folder ("cannot place output: No such file or directory"), run after run."""
    import infer_mp

    out = tmp_path / "out"
    staged = write(out / ".infer_mp.staging" / "w" / "0-a.json", '{"text": "A"}')
    moves = {0: (None, [(str(staged), str(out / "sub" / "deep" / "a.json"))])}
    assert placing_worker(out).place(moves) == [infer_mp.Placed([0], {})]
    assert json.loads((out / "sub" / "deep" / "a.json").read_text()) == {"text": "A"}


@pytest.mark.parametrize("inside", [False, True])
def test_a_linked_folder_on_the_way_is_not_written_through_nor_made_again(tmp_path, inside):
    """A link anywhere on the way to the folder (not only its last part) is refused, and no
    folder is made at the link's end."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    target = out / "other" if inside else elsewhere
    target.mkdir(parents=True)
    out.mkdir(exist_ok=True)
    (out / "sub").symlink_to(target)
    staged = write(out / ".infer_mp.staging" / "w" / "0-a.json", "{}")
    moves = {0: (None, [(str(staged), str(out / "sub" / "deep" / "a.json"))])}
    [placed] = placing_worker(out).place(moves)
    assert placed.indexes == [] and 0 in placed.errors
    assert list(target.iterdir()) == [] and staged.exists()


def test_a_freed_name_left_behind_by_its_taker_is_retired(dirs, tmp_path):
    """Review finding: a.jpg took the name a.json that a gone a.png freed; a new a.bmp then
    moves a.jpg to a.jpg.json. a.json held a.jpg's text under a.png's record for good: a
    record no longer holds a file another input placed since, so it is retired."""
    src, out = dirs
    free_a_name(src, out, tmp_path)
    assert run_fake(src, out).code == 0
    write(src / "a.bmp", "BMP")
    run = run_fake(src, out)
    assert run.code == 0, run.stderr
    assert sorted(texts(out).values()) == ["BMP", "JPG"] and "a.json" not in texts(out)
    assert_invariant(src, out, gone=("a.png",))


def test_the_staging_folder_removed_during_a_run_is_made_again(tmp_path):
    """Review finding: `rm -r OUTPUT/.infer_mp.staging` mid-run failed every later input for
    good ("cannot save output: FileNotFoundError"). Each task makes its worker's folder again."""
    import infer_mp
    staging = infer_mp.Staging(str(tmp_path / "out" / ".infer_mp.staging" / "w"))
    assert staging.place_for((), "a")[0] == staging.folder
    shutil.rmtree(tmp_path / "out" / ".infer_mp.staging")
    folder, prefix = staging.place_for((), "a")
    (Path(folder) / f"{prefix}a.json").write_text("{}")


def test_a_hand_edited_page_count_costs_nothing(tmp_path):
    """Review finding: a record saying page_count 10**12 made start-up build that list."""
    import infer_mp
    record = {"page_count": 10**12, "outputs": ["d_0.json"], "failed_pages": [5]}
    assert infer_mp.output_pages(record) is None
    assert infer_mp.output_pages({"range": [0, 10**12], "outputs": []}) is None
    assert infer_mp.output_pages({"page_count": 3, "outputs": ["a", "b"], "failed_pages": [1, 7]}) == [0, 2]


def test_a_task_whose_staged_files_vanished_is_done_again_not_failed():
    """Its files were removed before they were renamed (`rm -r` of the staging folder): the
    input is not at fault, so it goes back to the queue (up to --max_attempts handings)."""
    import errno

    import infer_mp
    backend = bare_backend()
    spec = infer_mp.WorkerSpec(0, "cpu", 1)
    task = infer_mp.Task(1, "/in/a.png", "a.png", "/out", "a")
    events = []
    for handed in (1, 2):
        worker = infer_mp.WorkerHandle(spec, 0.0, ready=True)
        worker.held = {1: task}
        worker.placing = {1: infer_mp.TaskDone(task, spec, "/out/.infer_mp.staging/w", "0-", ["a.json"], {}, 0.1, 1)}
        backend.handed[1] = handed
        events = list(backend._handle(worker, infer_mp.Placed([], {1: (errno.ENOENT, "No such file or directory")})))
        if handed == 1:
            assert events == [] and list(backend.pending) == [task]
    assert [type(event) for event in events] == [infer_mp.TaskFailed]


@pytest.mark.parametrize("through_a_link", [False, True])
def test_the_tools_own_files_in_an_input_folder_are_never_inputs(tmp_path, through_a_link):
    """--input_dir out/in --recursive --save img, with out/in/in/a.png: its picture lands at
    out/in/a_vis.png, inside the input folder. The next plain rerun took the picture for a new
    input (a_vis.json, a_vis_vis.png). Now it is passed over, by the records (also with the input
    folder spelled through a link); it is never deleted, and once a.png changes, its new picture
    replaces it."""
    out = tmp_path / "out"
    write(out / "in" / "in" / "a.png", "A1")
    src = out / "in"
    if through_a_link:
        (tmp_path / "link").symlink_to(src)
        src = tmp_path / "link"
    flags = ("--recursive", "--save", "img")
    first = run_fake(src, out, *flags)
    assert first.code == 0 and (src / "a_vis.png").is_file(), first.stderr
    again = run_fake(src, out, *flags)
    assert again.code == 0 and "0 done" in again.stderr and "1 skipped" in again.stderr, again.stderr
    assert not (src / "a_vis.json").exists() and not (src / "a_vis_vis.png").exists()
    assert_invariant(out / "in", out)  # (the input paths recorded are the real ones)
    write(src / "in" / "a.png", "A2")
    changed = run_fake(src, out, *flags)
    assert changed.code == 0 and "1 done" in changed.stderr, changed.stderr
    assert sorted(p.name for p in src.glob("*_vis*")) == ["a_vis.png"] and texts(out) == {"in/a.json": "A2"}


@pytest.mark.parametrize("file_first", [True, False])
def test_an_output_file_never_takes_a_mirrored_folders_name(tmp_path, file_first):
    """--recursive, x.png beside a subfolder x.json/ holding y.png: x.png's x.json and the
    folder out/x.json/ clashed; whichever came second failed as the input's fault, and no plain
    rerun tried it again. Now x.png writes x.png.json; an x.json that an earlier run wrote where
    the folder goes is a folder error, tried again once x.png's new output has retired it."""
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / ("x.png" if file_first else "x.json/y.png"), "first")
    assert run_fake(src, out, "--recursive").code == 0
    write(src / ("x.json/y.png" if file_first else "x.png"), "second")
    both = run_fake(src, out, "--recursive")
    assert both.code == (1 if file_first else 0) and "Traceback" not in both.stderr, both.stderr
    again = run_fake(src, out, "--recursive")
    assert again.code == 0 and "failed before" not in again.stderr, again.stderr
    assert (out / "x.png.json").is_file() and (out / "x.json" / "y.json").is_file()
    assert_invariant(src, out)


def test_a_gone_subfolders_output_folder_keeps_its_name_from_a_file(tmp_path):
    """x.png beside a subfolder x.json/: x.png writes x.png.json. Once the subfolder is gone from
    the inputs, its output folder out/x.json/ (kept: its files are its inputs' finished pages)
    was no longer reserved: x.png was redone as x.json and failed "Is a directory", as its own
    fault, for good. The ledger's records hold that folder's name now."""
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "x.png", "file")
    write(src / "x.json" / "y.png", "folder")
    assert run_fake(src, out, "--recursive").code == 0
    shutil.rmtree(src / "x.json")
    again = run_fake(src, out, "--recursive")
    assert again.code == 0 and "1 skipped" in again.stderr and "FAILED" not in again.stderr, again.stderr
    assert json.loads((out / "x.png.json").read_text())["text"] == "file"
    assert json.loads((out / "x.json" / "y.json").read_text())["text"] == "folder"


def test_a_new_subfolder_named_like_a_gone_inputs_output_keeps_that_text(tmp_path):
    """docs/runs.md: a new subfolder x.json/ where x.png, moved away, left out/x.json: its
    inputs fail at every run, and the gone input's finished text is never deleted; once it is
    moved, the next run does the subfolder."""
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "x.png", "gone")
    assert run_fake(src, out, "--recursive").code == 0
    (src / "x.png").unlink()
    write(src / "x.json" / "y.png", "new")
    for _ in range(2):
        run = run_fake(src, out, "--recursive")
        assert run.code == 1 and "a file is where this output folder goes" in run.stderr, run.stderr
        assert json.loads((out / "x.json").read_text())["text"] == "gone"
    (out / "x.json").rename(tmp_path / "kept.json")
    run = run_fake(src, out, "--recursive")
    assert run.code == 0 and "1 done" in run.stderr, run.stderr
    assert json.loads((out / "x.json" / "y.json").read_text())["text"] == "new"


def test_a_folder_where_an_output_goes_is_the_folders_fault_and_tried_again(dirs):
    """A folder made where an input's JSON goes: the input failed "Is a directory" as its own
    fault, and no plain rerun tried it again once the folder was moved away."""
    src, out = dirs
    write(src / "a.png", "A")
    (out / "a.json").mkdir(parents=True)
    blocked = run_fake(src, out)
    assert blocked.code == 1 and "is a folder: move or rename it" in blocked.stderr, blocked.stderr
    (out / "a.json").rmdir()
    again = run_fake(src, out)
    assert again.code == 0 and "1 done" in again.stderr, again.stderr
    assert json.loads((out / "a.json").read_text())["text"] == "A"
    assert_invariant(src, out)


@pytest.mark.parametrize("pages_per_task", ["1", "100"])
def test_a_folder_where_a_page_goes_is_the_folders_fault_and_that_page_tried_again(dirs, pages_per_task):
    """A folder where page 1 of doc.pdf goes: that page failed, and once the folder was moved
    away no plain rerun tried it again ("failed before, not retried"); the page stayed missing
    until --retry_failed. Now the next plain run does that page, and only it."""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["page zero", "page one", "page two"]))
    (out / "doc_1.json").mkdir(parents=True)
    blocked = run_fake(src, out, "--pages_per_task", pages_per_task)
    assert blocked.code == 1 and "is a folder: move or rename it" in blocked.stderr, blocked.stderr
    kept = (out / "doc_0.json").stat().st_mtime_ns
    (out / "doc_1.json").rmdir()
    again = run_fake(src, out, "--pages_per_task", pages_per_task)
    assert again.code == 0 and "1 page(s)" in again.stderr and "not retried" not in again.stderr, again.stderr
    assert json.loads((out / "doc_1.json").read_text())["text"] == "page one"
    assert (out / "doc_0.json").stat().st_mtime_ns == kept
    assert_invariant(src, out)
    assert "0 input(s) to do" in run_fake(src, out).stderr


@pytest.mark.parametrize("pages_per_task", ["1", "100"])
def test_a_page_failed_for_its_own_reason_is_not_redone_while_a_folder_blocks_another(dirs, pages_per_task):
    """Page 0 of doc.pdf cannot be read, and a folder blocks page 1: every plain rerun did
    page 0 again too (the record's failed pages were retried together) while the folder
    stayed. Now only page 1 is tried again; page 0's failure stands, said once."""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["page RAISE zero", "page one", "page two"]))
    (out / "doc_1.json").mkdir(parents=True)
    assert run_fake(src, out, "--pages_per_task", pages_per_task).code == 1
    blocked = run_fake(src, out, "--pages_per_task", pages_per_task)
    assert blocked.code == 1 and "1 page(s)" in blocked.stderr.splitlines()[0], blocked.stderr
    assert run_fake(src, out, "--pages_per_task", pages_per_task).code == 1
    record = next(iter(latest_records(out).values()))
    assert record["failed_pages"] == [0, 1] and record["retry"] == [1], record
    assert record["error"].count("cannot decode page 0") == 1, record  # (it grew at every run)
    (out / "doc_1.json").rmdir()
    again = run_fake(src, out, "--pages_per_task", pages_per_task)
    assert again.code == 0 and "1 page(s)" in again.stderr.splitlines()[0], again.stderr
    assert json.loads((out / "doc_1.json").read_text())["text"] == "page one"
    record = next(iter(latest_records(out).values()))
    assert record["failed_pages"] == [0] and "retry" not in record, record
    assert record["error"] == "page 0: ValueError: cannot decode page 0 of doc.pdf", record
    assert "0 input(s) to do" in run_fake(src, out).stderr
    assert_invariant(src, out)


def test_a_document_record_of_the_version_before_says_retry_true_for_all_its_failed_pages():
    import infer_mp

    assert infer_mp.folder_fault_pages({"failed_pages": [0, 1], "retry": True}) == {0, 1}
    assert infer_mp.folder_fault_pages({"failed_pages": [0, 1], "retry": [1]}) == {1}
    assert infer_mp.folder_fault_pages({"failed_pages": [0, 1]}) == set()
    assert infer_mp.folder_fault_pages({"failed_pages": [0, 1], "retry": [[1], {}, 1]}) == {1}  # (hand-edited)


def test_a_standing_page_keeps_its_own_part_of_a_joined_error():
    import infer_mp

    reason = infer_mp.failed_reason
    joined = {"failed_pages": [0, 1, 3], "error": "page 0: see page 1: x; page 1: b; page 3: c; page 5: weak, 0.2"}
    assert [reason(joined, page) for page in (0, 1, 3)] == ["see page 1: x", "b", "c"]
    assert reason({"failed_pages": [2, 5], "error": "page 2: a"}, 5) == "page 2: a"  # (not named: all of it)
    assert reason({"failed_pages": [1], "error": "ValueError: one"}, 1) == "ValueError: one"
    assert reason({"failed_pages": [5], "error": None}, 5) == "failed"


def test_a_weak_page_stays_weak_when_its_document_is_resumed(dirs):
    """--min_page_score: page 0 weak, page 1 blocked by a folder. Once the folder was gone, the
    plain rerun did page 1 and recorded the document done, its weak page forgotten: no
    --retry_failed ever redid it. (The same after a kill: see the weak page's range record.)"""
    src, out = dirs
    write(src / "doc.pdf", pdf_bytes(["page SCORES:0.2 zero", "page one", "page two"]))
    (out / "doc_1.json").mkdir(parents=True)
    assert run_fake(src, out, "--min_page_score", "0.5").code == 1
    (out / "doc_1.json").rmdir()
    again = run_fake(src, out, "--min_page_score", "0.5")
    assert again.code == 0 and "1 failed before" in again.stderr, again.stderr  # (weak before: not news)
    record = next(iter(latest_records(out).values()))
    assert record["status"] == "failed" and record["weak_pages"] == [0] and (out / "doc_1.json").is_file()
    retried = run_fake(src, out, "--min_page_score", "0.5", "--retry_failed")
    assert "1 input(s) to do" in retried.stderr and "page 0" in retried.stderr, retried.stderr


def test_subfolders_named_like_one_json_in_every_case_are_one_claim():
    """Three subfolders x.json, x.JSON and x.Json beside x.png: a traceback (IndexError) on every
    run, as the folders' own claims were renamed; on a case-insensitive filesystem an endless
    loop. On a case-sensitive one only x.json is x.png's JSON's name."""
    import infer_mp

    folders = {"x.json", "x.JSON", "x.Json"}
    assert infer_mp.output_bases(["x.png"], False, folders) == ["x.png"]
    assert infer_mp.output_bases(["x.png"], True, folders) == ["x.png"]
    assert infer_mp.output_bases(["x.png"], False, {"x.JSON"}) == ["x"]
    assert infer_mp.output_bases(["a.png", "a.png.png"], False, {"a.png.json", "a.json"}) == ["a.png~1", "a.png.png"]


# -- found by review (session 12) ------------------------------------------------------------------


def drop_last_done_record(log: Path, name: str) -> None:
    """The run log as a kill -9 leaves it when the input's last done record was still in the
    write buffer (LOG_FLUSH_SECONDS): its `placing` record and its files are there, the record not."""
    lines = log.read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if f'/{name}"' in line and '"status": "done"' in line)
    log.write_text("".join(lines[:last] + lines[last + 1:]))


def shard1_left_a_json(src: Path, out: Path) -> None:
    """A killed run of shard 1 left a.json for a.png, deleted since: a leftover for shard 1 to
    retire, under a name that another input may take."""
    write(src / "a.png", "gone")
    assert run_fake(src, out, "--shard", "1/2").code == 0
    drop_last_done_record(out / "infer_mp.shard-1-of-2.runlog.jsonl", "a.png")
    (src / "a.png").unlink()


def test_a_version_placed_over_a_done_one_and_killed_before_its_record_is_redone(dirs):
    """Killed after a changed input's new text was renamed over its output, before its record
    reached the file: the output held the new text under the old version's done record, so the
    old version, put back (a backup restored with its times), was taken as done."""
    src, out = dirs
    image = write(src / "a.png", "version 1")
    assert run_fake(src, out).code == 0
    first = image.stat()
    write(image, "version 2")
    assert run_fake(src, out).code == 0
    drop_last_done_record(out / LOG, "a.png")
    write(image, "version 1")
    os.utime(image, ns=(first.st_atime_ns, first.st_mtime_ns))
    run = run_fake(src, out)
    assert run.code == 0 and "1 already done" not in run.stderr, run.stderr
    assert texts(out) == {"a.json": "version 1"}
    assert_invariant(src, out)


@pytest.mark.parametrize("compacted", [False, True])
def test_pages_placed_over_a_done_document_and_killed_before_their_records_are_redone(dirs, tmp_path, compacted):
    """The same for a document's pages: the earlier version's done record, of the file as it is
    again, kept the pages a killed run of the other version had placed under their names. And
    compacting the log kept only the input's last `placing` line, so the pages placed before it
    counted as the old version's again."""
    src, out = dirs
    document = write(src / "d.pdf", pdf_bytes(["one", "two"]))
    assert run_fake(src, out, "--pages_per_task", "1").code == 0
    first = document.stat()
    write(document, pdf_bytes(["ONE", "TWO"]))
    assert run_fake(src, out, "--pages_per_task", "1").code == 0
    log = out / LOG
    lines = log.read_text().splitlines(keepends=True)  # the second run's records of d.pdf, lost to a kill -9
    second = max(json.loads(line).get("gen", 0) for line in lines)
    log.write_text("".join(line for line in lines if not (json.loads(line).get("gen") == second
                                                           and json.loads(line).get("input", "").endswith("d.pdf"))))
    write(document, pdf_bytes(["one", "two"]))
    os.utime(document, ns=(first.st_atime_ns, first.st_mtime_ns))
    if compacted:
        os.link(log, tmp_path / "backup.jsonl")  # (a run log with a second name is compacted first: has_second_name)
        assert run_fake(src, out, "--pages_per_task", "1", "--retry_failed").code == 0  # (compacts, selects nothing)
    assert run_fake(src, out, "--pages_per_task", "1").code == 0
    assert [content["text"] for content in outputs(out).values()] == ["one", "two"]


def test_the_tools_json_in_an_input_folder_inside_the_output_folder_is_never_an_input(tmp_path):
    """With --input_glob_pattern '**/*' every file is matched: the JSON the tool placed beside
    the scans was OCR'd as an input, and once the scan changed its new JSON could not replace
    that "input", so the scan failed at every run."""
    out = tmp_path / "out"
    write(out / "scans" / "scans" / "a.png", "A")
    args = fake_args(out / "scans", out, "--input_glob_pattern", "**/*")
    for _ in range(2):
        assert run_cli(*args).code == 0
    assert sorted(texts(out)) == ["scans/a.json"]
    write(out / "scans" / "scans" / "a.png", "A2")
    for _ in range(2):
        run = run_cli(*args)
        assert run.code == 0, run.stderr
    assert texts(out) == {"scans/a.json": "A2"}


def test_a_shard_retires_what_a_killed_run_placed_for_an_input_gone_since(dirs):
    """A file placed for an input before its record was written, the input then deleted: a run
    over all inputs retired it, but a shard run finishes half-done work only for its own inputs,
    and a gone input is in no shard, so no shard run ever did."""
    src, out = dirs
    for name in ("h.png", "i.png", "j.png", "k.png"):
        write(src / name, name)
    shard = "0/2"
    mine = [name for name in ("h.png", "i.png", "j.png", "k.png")
            if zlib.crc32(name.encode()) % 2 == 0]
    assert run_fake(src, out, "--shard", shard).code == 0
    log = out / "infer_mp.shard-0-of-2.runlog.jsonl"
    drop_last_done_record(log, mine[0])
    (src / mine[0]).unlink()
    assert run_fake(src, out, "--shard", shard).code == 0
    assert not (out / mine[0].replace(".png", ".json")).exists()


def test_dry_run_lists_what_the_run_would_delete_first(dirs):
    """A killed run's file for an input gone since: the run deletes it as it starts, and
    --dry_run, which said nothing of it, now lists it (and deletes nothing)."""
    src, out = dirs
    write(src / "a.png", "A")
    write(src / "b.png", "B")
    assert run_fake(src, out).code == 0
    drop_last_done_record(out / LOG, "a.png")
    (src / "a.png").unlink()
    plan = run_fake(src, out, "--dry_run")
    [line] = [line for line in plan.stdout.splitlines() if line.startswith("first deleted: ")]
    assert line.startswith("first deleted: 1 file(s) that earlier runs placed") and line.endswith(": a.json"), line
    assert (out / "a.json").is_file()
    assert run_fake(src, out).code == 0 and not (out / "a.json").exists()
    assert "first deleted" not in run_fake(src, out, "--dry_run").stdout


def test_an_output_folder_emptied_by_retiring_is_removed_and_takes_no_name(dirs):
    """A subfolder's input changed and failed: its old JSON was retired, its emptied output
    folder left, and an image of the folder's name added later got that name as its output,
    where a folder is: it failed at every run."""
    src, out = dirs
    write(src / "x.json" / "q.png", "Q")
    assert run_fake(src, out, "--recursive").code == 0
    write(src / "x.json" / "q.png", "Q2 RAISE")
    assert run_fake(src, out, "--recursive").code == 1
    assert not (out / "x.json").exists()
    shutil.rmtree(src / "x.json")
    write(src / "x.png", "X")
    run = run_fake(src, out, "--recursive")
    assert run.code == 0, run.stderr
    assert texts(out) == {"x.json": "X"}


def test_the_tools_files_in_an_input_folder_held_by_no_record_are_still_not_inputs(tmp_path):
    """A changed scan failed: its JSON was retired, its picture beside the scans kept (it is
    never deleted there), and the next run took that picture, held by no record now, for a scan."""
    out = tmp_path / "out"
    scan = write(out / "scans" / "scans" / "a.png", "A")
    args = fake_args(out / "scans", out, "--recursive", "--save", "img")
    assert run_cli(*args).code == 0
    write(scan, "A2 RAISE")
    assert run_cli(*args).code == 1
    run = run_cli(*args)
    assert run.code == 0 and "0 done" in run.stderr, run.stderr
    assert sorted(path.name for path in out.rglob("*_vis*")) == ["a_vis.png"]


def test_a_shard_leaves_alone_what_a_running_shard_placed_for_an_input_gone_since(dirs, tmp_path):
    """A shard retired a file that another shard, still running, had just placed for an input
    deleted since (its done record still in the log's buffer): that record then listed a file
    that was gone, for good."""
    src, out = dirs
    names = [f"{stem}.png" for stem in "abcdefghij"]
    first, waiting = [name for name in names if zlib.crc32(name.encode()) % 2 == 1][:2]
    write(src / first, "hello")
    write(src / waiting, "WAIT")
    go = tmp_path / "go"
    busy = start_fake(src, out, "--shard", "1/2", env={"FAKE_PIPELINE_WAIT_FILE": str(go)})
    output = out / first.replace(".png", ".json")
    wait_for(output.exists, 60)
    (src / first).unlink()
    assert run_fake(src, out, "--shard", "0/2").code == 0
    go.touch()
    busy.communicate(timeout=60)
    assert busy.returncode == 0
    assert output.is_file()
    assert run_fake(src, out).code == 0
    assert_invariant(src, out, gone=(first,))


def test_a_shard_retires_its_own_killed_runs_leftover_while_another_shard_runs(dirs, tmp_path):
    """Shards that always run at once (one cron line per machine, all at the same minute): a
    file that a killed run of shard 1 placed for an input deleted since was left while any
    other shard ran, so it was never retired. Only shard 1's runs placed it (its log says so):
    shard 1 retires it, whatever other shard is running."""
    src, out = dirs
    names = [f"{stem}.png" for stem in "abcdefghij"]
    gone = [name for name in names if zlib.crc32(name.encode()) % 2 == 1][0]
    waiting = [name for name in names if zlib.crc32(name.encode()) % 2 == 0][0]
    write(src / waiting, "WAIT")
    go = tmp_path / "go"
    busy = start_fake(src, out, "--shard", "0/2", env={"FAKE_PIPELINE_WAIT_FILE": str(go)})
    busy.wait_for_stderr("input(s) to do")
    write(src / gone, "hello")
    assert run_fake(src, out, "--shard", "1/2").code == 0
    drop_last_done_record(out / "infer_mp.shard-1-of-2.runlog.jsonl", gone)
    (src / gone).unlink()
    run = run_fake(src, out, "--shard", "1/2")
    assert run.code == 0, run.stderr
    assert not (out / gone.replace(".png", ".json")).exists()
    go.touch()
    busy.communicate(timeout=60)
    assert busy.returncode == 0, busy.stderr_text()
    assert_invariant(src, out, gone=(gone,))


@pytest.mark.parametrize("killed", ["all inputs", "3 shards"])
def test_a_leftover_of_a_run_that_cannot_be_running_now_is_retired_while_shards_overlap(dirs, killed):
    """A killed run over all inputs, or of a shard of another count, left g.json for g.png, gone
    since. Neither kind of run can be running beside a shard (the locks refuse it), yet every
    shard left it while another shard ran: with shards that always overlap, it stayed."""
    src, out = dirs
    write(src / "g.png", "gone")
    shard = ("--shard", f"{zlib.crc32(b'g.png') % 3}/3") if killed == "3 shards" else ()
    assert run_fake(src, out, *shard).code == 0
    log = out / (f"infer_mp.shard-{shard[1].replace('/', '-of-')}.runlog.jsonl" if shard else LOG)
    drop_last_done_record(log, "g.png")
    (src / "g.png").unlink()
    with open(out / ".infer_mp.shard-1-of-2.lock", "a+") as lock:  # shard 1 is running (as lock_held sees it)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = run_fake(src, out, "--shard", "0/2")
    assert run.code == 0, run.stderr
    assert not (out / "g.json").exists()
    assert_invariant(src, out, gone=("g.png",))


def test_retiring_a_gone_inputs_leftover_spares_a_name_another_shard_placed_since(dirs, tmp_path):
    """A killed run of shard 1 left a.json for a.png, deleted since; shard 0, running, placed
    a.jpg's text under that freed name, its record still in its log's buffer. Shard 1, retiring
    a.png's leftover, must not delete the file a.jpg's record is about to list."""
    src, out = dirs
    assert [zlib.crc32(name.encode()) % 2 for name in ("a.png", "b.png", "a.jpg", "h.png")] == [1, 1, 0, 0]
    shard1_left_a_json(src, out)
    write(src / "b.png", "WAIT")
    go1, go0 = tmp_path / "go1", tmp_path / "go0"
    shard1 = start_fake(src, out, "--shard", "1/2", env={"FAKE_PIPELINE_WAIT_FILE": str(go1)})
    shard1.wait_for_stderr("input(s) to do")
    write(src / "a.jpg", "a jpg")
    write(src / "h.png", "WAIT")
    shard0 = start_fake(src, out, "--shard", "0/2", env={"FAKE_PIPELINE_WAIT_FILE": str(go0)})
    wait_for(lambda: texts(out).get("a.json") == "a jpg", 60)
    go1.touch()
    shard1.communicate(timeout=60)
    assert shard1.returncode == 0, shard1.stderr_text()
    run = run_fake(src, out, "--shard", "1/2")
    assert run.code == 0, run.stderr
    assert texts(out).get("a.json") == "a jpg"
    go0.touch()
    shard0.communicate(timeout=60)
    assert shard0.returncode == 0, shard0.stderr_text()
    assert texts(out).get("a.json") == "a jpg"
    assert_invariant(src, out, gone=("a.png",))


@pytest.mark.parametrize("neighbour", ["still running", "finished"])
def test_a_file_another_shard_placed_after_this_run_read_the_logs_is_not_retired(dirs, tmp_path, monkeypatch,
                                                                                 neighbour):
    """Shard 1 read the logs; then shard 0 placed a.jpg's text under a.json, a name that a.png,
    gone since, left behind in a killed run of shard 1; then shard 1 retired a.png's leftover by
    the logs as it had read them, deleting shard 0's new file (its done record then listed a
    missing file). It reads what the other shards wrote meanwhile before it deletes anything."""
    import infer_mp

    src, out = dirs
    shard1_left_a_json(src, out)
    write(src / "a.jpg", "WAIT a jpg")
    go = tmp_path / "go"
    env = {"FAKE_PIPELINE_WAIT_FILE": str(go)}
    shard0 = start_fake(src, out, "--shard", "0/2", env=env) if neighbour == "still running" else None
    if shard0:
        shard0.wait_for_stderr("input(s) to do")
    reconcile = infer_mp.Ledger.reconcile

    def shard0_places_first(ledger, others):  # (between this run's reading of the logs and its retiring)
        go.touch()
        if shard0:
            wait_for(lambda: texts(out).get("a.json") == "WAIT a jpg", 60)
        else:
            assert run_fake(src, out, "--shard", "0/2", env=env).code == 0
        reconcile(ledger, others)

    monkeypatch.setattr(infer_mp.Ledger, "reconcile", shard0_places_first)
    assert infer_mp.main(fake_args(src, out, "--shard", "1/2")) == 0
    if shard0:
        shard0.communicate(timeout=60)
        assert shard0.returncode == 0, shard0.stderr_text()
    assert texts(out).get("a.json") == "WAIT a jpg"
    assert_invariant(src, out, gone=("a.png",))


def test_no_shard_places_a_file_between_another_shards_last_look_at_the_logs_and_its_unlink(dirs, tmp_path,
                                                                                           monkeypatch):
    """Shard 1, retiring a.png's leftover a.json (a.png gone since), read the other shards'
    logs once more, found nothing new, and deleted the file; in between, shard 0 had placed
    a.jpg's text under that freed name, and its done record then listed a missing file. The
    read and the unlink now happen in the shards' placing turn, which shard 0 waits for."""
    import infer_mp

    src, out = dirs
    shard1_left_a_json(src, out)
    write(src / "a.jpg", "WAIT a jpg")
    go = tmp_path / "go"
    shard0 = start_fake(src, out, "--shard", "0/2", env={"FAKE_PIPELINE_WAIT_FILE": str(go)})
    shard0.wait_for_stderr("input(s) to do")
    catch_up = infer_mp.Ledger.catch_up

    def shard0_places_meanwhile(ledger):  # (after this run's last look, before its unlink)
        catch_up(ledger)
        if not go.exists():
            go.touch()
            with contextlib.suppress(AssertionError):  # (shard 0 waits for the turn: it places later)
                wait_for(lambda: texts(out).get("a.json") == "WAIT a jpg", 3)

    monkeypatch.setattr(infer_mp.Ledger, "catch_up", shard0_places_meanwhile)
    assert infer_mp.main(fake_args(src, out, "--shard", "1/2")) == 0
    shard0.communicate(timeout=60)
    assert shard0.returncode == 0, shard0.stderr_text()
    assert texts(out).get("a.json") == "WAIT a jpg"
    assert_invariant(src, out, gone=("a.png",))


def gone_leftovers(src: Path, out: Path, names: list[str]) -> None:
    """Shard 0 did these inputs, was killed before their done records reached its log, and the
    inputs were deleted since: their files are leftovers for shard 0 to retire."""
    assert {zlib.crc32(name.encode()) % 2 for name in names} == {0}
    for name in names:
        write(src / name, name)
    assert run_fake(src, out, "--shard", "0/2").code == 0
    for name in names:
        drop_last_done_record(out / "infer_mp.shard-0-of-2.runlog.jsonl", name)
        (src / name).unlink()


def counted_placing_waits(monkeypatch, before=None) -> list[float]:
    """The waits of this process's tries for the shards' placing turn, in order, each after
    `before(number of the try)` if given."""
    import infer_mp

    waits: list[float] = []
    take_lock = infer_mp.take_lock

    def counted(handle, mode, seconds=infer_mp.LOCK_WAIT_SECONDS):
        if os.path.basename(handle.name) != infer_mp.PLACING_LOCK:
            return take_lock(handle, mode, seconds)
        waits.append(seconds)
        if before:
            before(len(waits))
        return take_lock(handle, mode, seconds)

    monkeypatch.setattr(infer_mp, "take_lock", counted)
    return waits


def test_a_placing_turn_held_by_a_stopped_shard_costs_one_wait_and_puts_retiring_off(dirs, monkeypatch):
    """A shard stopped while it holds the placing turn (Slurm suspends with SIGSTOP) must not
    stop the others, nor cost them PLACING_LOCK_SECONDS per input; nor may they retire files
    without the turn (between their last look at the logs and the unlink, the stopped shard,
    resumed, may place one): they put retiring off to a later run, and place what no other
    input had."""
    import infer_mp

    src, out = dirs
    gone = [f"g{number}.png" for number in range(3)]
    gone_leftovers(src, out, gone)
    write(src / "g7.png", "kept")
    monkeypatch.setattr(infer_mp, "PLACING_LOCK_SECONDS", 0.2)
    waits = counted_placing_waits(monkeypatch)
    with open(out / infer_mp.PLACING_LOCK, "a+") as stopped_shard:
        fcntl.flock(stopped_shard, fcntl.LOCK_EX)
        assert infer_mp.main(fake_args(src, out, "--shard", "0/2")) == 0
    assert waits == [0.2, infer_mp.LOCK_WAIT_SECONDS], waits
    assert sorted(texts(out)) == ["g0.json", "g1.json", "g2.json", "g7.json"]
    assert run_fake(src, out, "--shard", "0/2").code == 0
    assert sorted(texts(out)) == ["g7.json"]
    assert_invariant(src, out, gone=gone)


def test_a_hard_linked_log_gets_a_file_of_its_own_while_retiring_is_put_off(dirs, tmp_path, monkeypatch):
    """A backup made with `cp -al` shares the shard's log: the run gives the log a file of its own
    before it appends, also when it puts retiring off; and then keeps every line of it (a
    compacted copy had lost the lines that said a shortened PDF's last page was still to retire,
    so that it stayed for good)."""
    import infer_mp

    src, out = dirs
    assert zlib.crc32(b"d0.pdf") % 2 == 0
    write(src / "d0.pdf", pdf_bytes(["page a", "page b", "page c"]))
    assert run_fake(src, out, "--shard", "0/2").code == 0
    write(src / "d0.pdf", pdf_bytes(["page a", "page b"]))
    log, backup = out / "infer_mp.shard-0-of-2.runlog.jsonl", tmp_path / "backup.jsonl"
    monkeypatch.setattr(infer_mp, "PLACING_LOCK_SECONDS", 0.2)
    with open(out / infer_mp.PLACING_LOCK, "a+") as stopped_shard:
        fcntl.flock(stopped_shard, fcntl.LOCK_EX)
        assert infer_mp.main(fake_args(src, out, "--shard", "0/2")) == 0  # (d0_2.json: retiring put off)
        os.link(log, backup)
        kept = backup.read_bytes()
        assert infer_mp.main(fake_args(src, out, "--shard", "0/2")) == 0
    assert backup.read_bytes() == kept
    assert "d0_2.json" in texts(out)
    assert run_fake(src, out, "--shard", "0/2").code == 0
    assert sorted(texts(out)) == ["d0_0.json", "d0_1.json"]
    assert_invariant(src, out)


def test_after_a_missed_turn_a_turn_held_for_a_moment_is_waited_for(dirs, monkeypatch):
    """Once a shard had missed the turn, it tried it without waiting: a healthy shard holding it
    for its usual moment made this one refuse a name (exit 1, "a shard stopped?")."""
    import infer_mp

    src, out = dirs
    gone_leftovers(src, out, ["g0.png"])
    shard1_left_a_json(src, out)
    write(src / "a.jpg", "a jpg")
    monkeypatch.setattr(infer_mp, "PLACING_LOCK_SECONDS", 0.2)
    other = open(out / infer_mp.PLACING_LOCK, "a+")
    fcntl.flock(other, fcntl.LOCK_EX)  # held past the wait of the first try, then for a moment

    def before(number):
        if number == 2:
            fcntl.flock(other, fcntl.LOCK_UN)
            fcntl.flock(other, fcntl.LOCK_EX)
            threading.Timer(0.05, fcntl.flock, (other, fcntl.LOCK_UN)).start()

    waits = counted_placing_waits(monkeypatch, before)
    with other, open(out / ".infer_mp.shard-1-of-2.lock", "a+") as shard1:
        fcntl.flock(shard1, fcntl.LOCK_EX)  # shard 1 is running (as lock_held sees it)
        assert infer_mp.main(fake_args(src, out, "--shard", "0/2")) == 0
    assert len(waits) >= 2 and waits[1] == infer_mp.LOCK_WAIT_SECONDS, waits
    assert texts(out).get("a.json") == "a jpg"


def test_without_the_placing_turn_a_shard_takes_no_name_that_was_another_inputs(dirs, monkeypatch):
    """Shard 1, stopped past PLACING_LOCK_SECONDS in its placing turn just before it deletes
    a.json (the leftover of a.png, gone since), resumes and deletes it: shard 0, which went on
    without the turn, had placed a.jpg's text under that freed name meanwhile, and its done
    record then listed a missing file. Without the turn, a shard leaves such a name alone
    (that input fails, and the next run places it); names nobody else had, it places."""
    import infer_mp

    src, out = dirs
    shard1_left_a_json(src, out)
    write(src / "a.jpg", "a jpg")
    write(src / "g7.png", "g7")
    monkeypatch.setattr(infer_mp, "PLACING_LOCK_SECONDS", 0.2)
    with open(out / ".infer_mp.shard-1-of-2.lock", "a+") as shard1, open(out / infer_mp.PLACING_LOCK, "a+") as turn:
        fcntl.flock(shard1, fcntl.LOCK_EX)  # shard 1 is running (as lock_held sees it), stopped in its turn
        fcntl.flock(turn, fcntl.LOCK_EX)
        assert infer_mp.main(fake_args(src, out, "--shard", "0/2")) == 1
    assert texts(out) == {"a.json": "gone", "g7.json": "g7"}
    assert run_fake(src, out, "--shard", "1/2").code == 0  # (shard 1 retires a.png's leftover)
    run = run_fake(src, out, "--shard", "0/2")
    assert run.code == 0, run.stderr
    assert texts(out) == {"a.json": "a jpg", "g7.json": "g7"}
    assert_invariant(src, out, gone=("a.png",))


def test_a_placing_lock_that_cannot_be_opened_is_said_before_a_shard_does_anything(dirs):
    """A folder where the shards' placing lock goes (a hand-made one): each shard's run ended in
    a traceback as it came to retire a file."""
    src, out = dirs
    gone_leftovers(src, out, ["g0.png"])
    write(src / "g1.png", "g1")
    lock = out / ".infer_mp.placing.lock"
    lock.unlink()  # (the first run made it)
    lock.mkdir()
    before = texts(out)
    run = run_fake(src, out, "--shard", "0/2")
    assert run.code == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"cannot write the shards' placing lock {str(lock)!r}: Is a directory" in run.stderr
    assert texts(out) == before
    assert run_fake(src, out, "--shard", "0/2", "--dry_run").code == 0
    lock.rmdir()
    assert run_fake(src, out, "--shard", "0/2").code == 0
    assert texts(out) == {"g1.json": "g1"}
    assert_invariant(src, out, gone=("g0.png",))


def test_reading_another_shards_new_lines_leaves_this_runs_generation_as_it_is(tmp_path):
    """A shard that started after this run writes a higher generation: taken in mid-run (see
    Ledger.catch_up), it raised this run's own, so that its closing line no longer vouched for the
    failures it had recorded before (they were reported again by the next run)."""
    import infer_mp

    out = tmp_path / "out"
    out.mkdir()
    other = out / "infer_mp.shard-0-of-2.runlog.jsonl"
    other.write_text(json.dumps({"time": "t", "gen": 1, "input": "/in/a.png", "status": "done", "outputs": []}) + "\n")
    config = make_config(output_dir=out, run_log=out / "infer_mp.shard-1-of-2.runlog.jsonl", shard=(1, 2))
    ledger = infer_mp.Ledger.read(config)
    ledger.beside = [other]
    ledger.open(config.run_log, config.shard)
    assert ledger.generation == 2
    with open(other, "a") as log:
        log.write(json.dumps({"time": "t", "gen": 7, "input": "/in/c.png", "status": "done", "outputs": []}) + "\n")
    ledger.catch_up()
    assert "/in/c.png" in ledger.latest and ledger.generation == 2


def test_a_shards_log_compacted_since_this_run_read_it_is_read_again_whole(tmp_path):
    """Another shard's run compacted its log (a new, shorter file) after this run read it, then
    placed a file: this run's look at that log (see Ledger.catch_up) must read the new file from
    its start. Read from where the old file ended, it found nothing, and the file placed
    meanwhile counted as a leftover that this run could retire."""
    import infer_mp

    out = tmp_path / "out"
    out.mkdir()
    other = out / "infer_mp.shard-0-of-2.runlog.jsonl"
    done = [json.dumps({"time": "t", "gen": 1, "input": f"/in/{n}.png", "status": "done", "outputs": [f"{n}.json"]})
            for n in range(20)]
    other.write_text("\n".join(done) + "\n")
    config = make_config(output_dir=out, run_log=out / "infer_mp.shard-1-of-2.runlog.jsonl", shard=(1, 2))
    ledger = infer_mp.Ledger.read(config)
    ledger.beside = [other]
    ledger.open(config.run_log, config.shard)
    placing = {"time": "t", "gen": 2, "status": "placing", "shard": "s0of2", "placing": [["/in/x.png", ["x.json"], []]]}
    compacted = out / "compacted"
    compacted.write_text(done[-1] + "\n" + json.dumps(placing) + "\n")
    os.replace(compacted, other)
    ledger.catch_up()
    assert ledger.placed_meanwhile == {"x.json"}
    assert ledger.placements["x.json"][1] == "/in/x.png"


def test_a_file_placed_again_for_the_same_input_after_this_run_read_the_logs_is_not_retired(dirs, tmp_path,
                                                                                            monkeypatch):
    """A killed run of shard 1 left a.json for a.png, then gone; shard 0 read the logs (shard 1
    not running: a.png's leftover is its to retire); meanwhile a.png came back and shard 1 placed
    a.json for it again. Shard 0 saw that placing, of the same input, and deleted the finished
    output of a current input."""
    import infer_mp

    src, out = dirs
    write(src / "a.png", "old")
    assert run_fake(src, out, "--shard", "1/2").code == 0
    drop_last_done_record(out / "infer_mp.shard-1-of-2.runlog.jsonl", "a.png")
    (src / "a.png").unlink()
    reconcile, started = infer_mp.Ledger.reconcile, []

    def shard1_places_first(ledger, others):
        write(src / "a.png", "new")
        write(src / "p.png", "WAIT")  # (shard 1 keeps running, a.png's done record in its buffer)
        started.append(start_fake(src, out, "--shard", "1/2", env={"FAKE_PIPELINE_WAIT_FILE": str(tmp_path / "go")}))
        wait_for(lambda: texts(out).get("a.json") == "new", 60)
        reconcile(ledger, others)

    monkeypatch.setattr(infer_mp.Ledger, "reconcile", shard1_places_first)
    assert infer_mp.main(fake_args(src, out, "--shard", "0/2")) == 0
    (tmp_path / "go").touch()
    started[0].communicate(timeout=60)
    assert started[0].returncode == 0, started[0].stderr_text()
    assert texts(out).get("a.json") == "new"
    assert_invariant(src, out)


def test_a_compacted_logs_line_of_leftovers_says_which_run_wrote_it(dirs):
    """Compaction rewrote the files it could not retire as a `placing` line without `shard`: the
    whole log then counted as an older version's, perhaps running, and shards that overlap left
    a killed run's leftovers in it for good."""
    src, out = dirs
    write(src / "stuck.png", "stuck")
    assert run_fake(src, out).code == 0
    drop_last_done_record(out / LOG, "stuck.png")
    (src / "stuck.png").unlink()
    (out / "stuck.json").unlink()
    (out / "stuck.json").mkdir()  # (it cannot be retired: a folder is there now)
    with open(out / LOG, "a") as log:
        log.writelines(json.dumps({"time": "2026-01-01T00:00:00+00:00", "gen": 1, "run": {"exit_code": 0}}) + "\n"
                       for _ in range(1100))
    assert run_fake(src, out).code == 0
    placing = [json.loads(line) for line in (out / LOG).read_text().splitlines() if '"placing"' in line]
    assert placing and all(line.get("shard") == "all" for line in placing), placing


@pytest.mark.parametrize("last", ["0/2", "all"])
def test_two_shards_never_place_one_name_for_two_inputs(dirs, tmp_path, last):
    """Shard 1 listed and read a.png; a.png was then deleted and a.jpg added; shard 0, started
    after, named a.jpg a.json and finished; shard 1 then renamed a.png's text over it. Every later
    run took a.jpg for done, its a.json holding a deleted input's text (review 3). The later
    placing now sees the earlier one and leaves the name alone: its input is named afresh."""
    src, out, busy, go = *dirs, tmp_path / "busy.log", tmp_path / "go"
    assert [zlib.crc32(name.encode()) % 2 for name in ("a.png", "a.jpg")] == [1, 0]
    write(src / "a.png", "WAIT a png")
    shard1 = start_fake(src, out, "--shard", "1/2", env={"FAKE_PIPELINE_WAIT_FILE": str(go),
                                                           "FAKE_PIPELINE_BUSY_LOG": str(busy)})
    wait_for(lambda: busy.exists() and "a.png" in busy.read_text(), 60)
    (src / "a.png").unlink()
    write(src / "a.jpg", "a jpg")
    assert run_fake(src, out, "--shard", "0/2").code == 0
    go.touch()
    shard1.communicate(timeout=60)
    assert "another shard placed it" in shard1.stderr_text(), shard1.stderr_text()
    run = run_fake(src, out, *(("--shard", last) if last != "all" else ()))
    assert run.code == 0, run.stderr
    [output] = latest_by_name(out)["a.jpg"]["outputs"]
    assert texts(out)[output] == "a jpg"
    assert_invariant(src, out, gone=("a.png",))


def test_the_latest_placing_of_a_file_counts_whatever_order_the_logs_are_read_in():
    """The run logs are read one after the other (the shards', then this run's own): an older
    `placing` line read later took the place of a newer one, so a record counted as done for a
    file that another input had placed since."""
    import infer_mp

    ledger = infer_mp.Ledger("/out")

    def record(generation: int, log: int, key: str, status: str) -> dict:
        entry = {"time": "t", "gen": generation, "input": key, "status": status, "outputs": ["a.json"],
                 "extra_outputs": []}
        ledger.add(entry, (generation, "", log, 0))
        return entry

    record(3, 0, "/in/b.png", "placing")  # (a newer placing, in the log read first)
    record(1, 1, "/in/a.png", "placing")
    done = record(2, 1, "/in/a.png", "done")
    assert ledger.placed_since("a.json", done) == "/in/b.png"


def test_pages_of_a_version_that_failed_do_not_count_for_the_done_one_after_compaction(dirs, tmp_path):
    """A newer version failed on one page, its good pages placed over the done version's;
    compacting dropped those pages' placing line (a whole record, the failed one, followed it),
    so the done version put back counted as done, over the newer version's text."""
    src, out = dirs
    document = write(src / "d.pdf", pdf_bytes(["one v1", "two v1"]))
    assert run_fake(src, out).code == 0
    first = document.stat()
    write(document, pdf_bytes(["one v2", "two v2", "three RAISE"]))
    assert run_fake(src, out).code == 1
    os.link(out / LOG, tmp_path / "backup.jsonl")  # (compacted by the next run: see has_second_name)
    assert run_fake(src, out).code == 0  # (its failure stands)
    write(document, pdf_bytes(["one v1", "two v1"]))
    os.utime(document, ns=(first.st_atime_ns, first.st_mtime_ns))
    assert run_fake(src, out).code == 0
    assert [content["text"] for content in outputs(out).values()] == ["one v1", "two v1"]


@pytest.mark.parametrize("compacted", [False, True])
def test_a_picture_placed_where_a_scan_that_is_gone_was_is_not_taken_for_that_scan(tmp_path, compacted):
    """With the input folder inside the output folder, a scan there was done and removed, and
    a picture the tool placed later took its path: the records knew that path as an input, so
    the picture was OCR'd as that scan, and the picture's own scan then failed at every change.
    (Compacting the log dropped the placing line that said the picture came later.)"""
    out = tmp_path / "out"
    user_scan = write(out / "scans" / "a_vis.png", "user scan X")
    args = fake_args(out / "scans", out, "--recursive", "--save", "img")
    assert run_cli(*args).code == 0
    user_scan.unlink()
    scan = write(out / "scans" / "scans" / "a.png", "scan a v1")
    assert run_cli(*args).code == 0 and (out / "scans" / "a_vis.png").is_file()
    if compacted:
        os.link(out / LOG, tmp_path / "backup.jsonl")  # (compacted by the next run: see has_second_name)
        assert run_cli(*args).code == 0
    again = run_cli(*args)
    assert again.code == 0 and "0 done" in again.stderr, again.stderr
    write(scan, "scan a v2")
    changed = run_cli(*args)
    assert changed.code == 0 and "1 done" in changed.stderr, changed.stderr
    assert texts(out)["scans/a.json"] == "scan a v2"


@pytest.mark.parametrize("kind", ["weak image", "document"])
def test_a_failure_whose_kept_text_was_deleted_by_hand_is_redone(dirs, kind):
    """A weak image's text, or a failed document's good page, deleted by hand: the failure stood,
    and the file was never made again (an output deleted by hand is redone, as for a done input)."""
    src, out = dirs
    name, content, extra = STOPPED_FAILURES[kind]
    write(src / name, content)
    assert run_fake(src, out, *extra).code == 1
    kept = out / ("a.json" if kind == "weak image" else "a_1.json")
    kept.unlink()
    run = run_fake(src, out, *extra)
    assert kept.is_file() and "1 page(s)" in run.stderr.splitlines()[0], run.stderr
    assert run.code == (1 if kind == "weak image" else 0), run.stderr  # (a weak image is weak again: news)
    assert_invariant(src, out)


def test_shards_side_by_side_place_a_file_that_every_inputs_writer_adds(dirs):
    """Review: a writer that adds a file under one name for every input (PaddleX's markdown
    images are named by their box; the fake's side_files: imgs/logo.png), shards running side
    by side, inputs unchanged: the second shard to place it failed its input ("another shard
    placed it ... since this run listed the inputs"). One run over all inputs places it for
    each in turn; so do shards now. A page's JSON name is still checked (the test above)."""
    src, out = dirs
    names = [f"a{i}.png" for i in range(1, 9)]
    for name in names:
        write(src / name, f"img {name}")
    assert {zlib.crc32(name.encode()) % 2 for name in names} == {0, 1}  # (both shards have some)
    flags = ("--save", "markdown", "--pipeline_arg", "side_files=1")
    first = start_fake(src, out, *flags, "--shard", "1/2", env={"FAKE_PIPELINE_DELAY": "0.4"})
    log = out / "infer_mp.shard-1-of-2.runlog.jsonl"
    wait_for(lambda: holds(log, b'"placing"'))
    second = run_fake(src, out, *flags, "--shard", "0/2")
    first.communicate(timeout=120)
    assert second.code == 0 and "FAILED" not in second.stderr, second.stderr
    assert first.returncode == 0
    assert_invariant(src, out)


def test_an_input_subfolder_named_like_a_run_log_is_an_output_folder_not_a_log(dirs):
    """Review: `--recursive` over `in/infer_mp.x.runlog.jsonl/a.png` made the output folder
    `out/infer_mp.x.runlog.jsonl/`, which every later run took for a shard's run log: exit 2,
    `cannot read the run log …: Is a directory`, for good."""
    src, out = dirs
    write(src / "infer_mp.x.runlog.jsonl" / "a.png", "A")
    write(src / "b.png", "B")
    assert run_fake(src, out, "--recursive").code == 0
    write(src / "infer_mp.x.runlog.jsonl" / "a.png", "A2")
    again = run_fake(src, out, "--recursive")
    assert again.code == 0 and "1 done" in again.stderr, again.stderr
    assert_invariant(src, out)


def test_a_killed_shards_staged_files_are_cleared_by_a_shard_of_another_count(dirs):
    """Review: a killed `--shard 0/2` run's staging folder was kept by every run of another
    count, cleared only by a `0/2` run or one over all inputs: a job that moved to `/3` kept it
    for good. No run of another count runs beside a shard; only its own count's other shards
    may be writing there."""
    src, out = dirs
    write(src / "a.png", "A")
    left = write(out / ".infer_mp.staging" / "s0of2-1-0" / "a.json", "a killed shard's")
    beside = write(out / ".infer_mp.staging" / "s1of3-1-0" / "b.json", "a shard of this count's")
    assert run_fake(src, out, "--shard", "0/3").code == 0
    assert not left.parent.exists() and beside.exists()


def test_pages_a_shorter_version_lacks_are_retired_for_an_input_named_like_bookkeeping(dirs):
    """Review: `.infer_mp.d.pdf`'s pages are placed as `.infer_mp.d_N.json`, and the ledger
    never deleted a name starting `.infer_mp` (its lock files' prefix): cut to one page, its
    old pages 1 and 2 stayed, with the old version's text, listed by no record. A lock file
    that a hand-edited record names is still never deleted."""
    src, out = dirs
    write(src / ".infer_mp.d.pdf", pdf_bytes(["page A", "page B", "page C"]))
    assert run_fake(src, out).code == 0
    write(src / ".infer_mp.d.pdf", pdf_bytes(["page X"]))
    assert run_fake(src, out).code == 0
    assert sorted(p.name for p in out.glob(".infer_mp.d_*.json")) == [".infer_mp.d_0.json"]
    assert_invariant(src, out)
    log = out / LOG
    record = json.loads(log.read_text().splitlines()[-2])
    log.write_text(log.read_text() + json.dumps({**record, "outputs": [".infer_mp.lock"], "gen": 99}) + "\n")
    assert run_fake(src, out).code == 0 and (out / ".infer_mp.lock").exists()
