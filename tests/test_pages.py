"""Documents as pages: page ranges as tasks, balance, resume at the page, a bad page costs a page."""

from __future__ import annotations

import json
import signal
from collections import deque
from pathlib import Path

import pytest

import infer_mp
from conftest import (
    FAKE,
    all_records,
    assert_invariant,
    bare_backend,
    injected,
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

RENDERED = ("input_path", "page_index", "page_count", "image_sha1", "text")  # what a page's rendering decides


def document(count: int, marks: dict[int, str] | None = None) -> bytes:
    """A real PDF of `count` pages, page i showing `page i` and any steering word in `marks`."""
    return pdf_bytes([f"page {i} {(marks or {}).get(i, '')}".strip() for i in range(count)])


def ranges_done(run_log_path: Path) -> list[list[int]]:
    """The page ranges a run log records done so far (read while the run writes it; none
    while it is not there: a first run's check that the log can be written makes it, then
    removes it, before its workers start)."""
    try:
        text = run_log_path.read_text()
    except FileNotFoundError:
        return []
    records = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
    return [r["range"] for r in records if "range" in r and r.get("status") == "done"]


def page_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def task(index: int, name: str, pages: int | None = None) -> infer_mp.Task:
    return infer_mp.Task(index, f"/in/{name}", name, "/out", name.rsplit(".", 1)[0], page_count=pages)


# -- the plan -----------------------------------------------------------------------------------


def test_page_ranges_are_even_and_follow_the_gaps():
    assert list(infer_mp.page_ranges(list(range(24)), 6)) == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert list(infer_mp.page_ranges(list(range(10)), 3)) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert list(infer_mp.page_ranges([0, 1, 2, 5, 6, 7, 8], 4)) == [(0, 3), (5, 9)]


def test_ranges_are_sized_to_keep_every_worker_busy_and_dispatched_longest_first():
    image, book, small = task(0, "a.png"), task(1, "book.pdf", 24), task(2, "small.pdf", 3)
    tasks = infer_mp.split_documents([image, small, book], {}, workers=4, pages_per_task=10, first_index=100)
    assert [t.pages for t in tasks] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24), None, None]
    # (28 pages on 4 workers: ranges of 4, two rounds at least)
    assert [t.path for t in tasks[-2:]] == ["/in/small.pdf", "/in/a.png"]  # whole, longest first
    assert len({t.index for t in tasks}) == len(tasks) and min(t.index for t in tasks[:6]) == 100
    many = [task(i, f"p{i}.png") for i in range(1000)] + [task(1000, "book.pdf", 95), task(1001, "s.pdf", 7)]
    tasks = infer_mp.split_documents(many, {}, workers=4, pages_per_task=10, first_index=2000)
    assert [t.weight for t in tasks[:11]] == [10, 10, 10, 10, 10, 9, 9, 9, 9, 9, 7]  # --pages_per_task caps them
    assert infer_mp.split_documents([book], {}, workers=4, pages_per_task=0, first_index=5)[0].pages is None
    left = infer_mp.Coverage(outputs={p: f"/out/book_{p}.json" for p in range(0, 20)}, failed={21: "x"})
    # the pages left, 20, 22 and 23 (21 failed before): fewer than 2 per worker, so one a range
    assert [t.pages for t in infer_mp.split_documents([book], {1: left}, 4, 10, 5)] == [(20, 21), (22, 23), (23, 24)]


# -- outputs ------------------------------------------------------------------------------------


def test_a_split_run_writes_what_a_whole_file_run_writes(tmp_path):
    src = tmp_path / "in"
    write(src / "book.pdf", document(7))
    write(src / "scan.tif", tiff_bytes(5))
    write(src / "photo.png", "photo")
    runs = {}
    for name, pages_per_task in (("whole", "0"), ("split", "2")):
        out = tmp_path / name
        run = run_fake(src, out, "--instances_per_device", "2", "--pages_per_task", pages_per_task)
        assert run.code == 0, run.stderr
        runs[name] = {file: {key: result.get(key) for key in RENDERED} for file, result in outputs(out).items()}
    assert sorted(runs["split"]) == sorted(runs["whole"]) == sorted(
        [f"book_{i}.json" for i in range(7)] + [f"scan_{i}.json" for i in range(5)] + ["photo.json"])
    assert runs["split"] == runs["whole"]  # same pages, rendered alike, same page_index and page_count
    assert len({runs["split"][f"book_{i}.json"]["image_sha1"] for i in range(7)}) == 7
    records = run_log(tmp_path / "split")
    ranges = sorted(tuple(r["range"]) for r in records if r["input"].endswith("book.pdf") and "range" in r)
    # At most --pages_per_task 2, as even as can be: (0, 1), (1, 3), (3, 5), (5, 7); one of them
    # less its first page, which went alone first (this pipeline may read documents itself).
    assert [page for start, stop in ranges for page in range(start, stop)] == list(range(7))
    assert len(ranges) == 5 and max(stop - start for start, stop in ranges) == 2
    [book] = [r for r in records if r["input"].endswith("book.pdf") and "range" not in r]
    assert book["status"] == "done" and book["outputs"] == [f"book_{i}.json" for i in range(7)]
    assert book["page_count"] == 7
    assert_invariant(src, tmp_path / "split")


# -- balance ------------------------------------------------------------------------------------


def test_one_document_is_split_over_every_worker(tmp_path):
    """A 24-page document on 4 workers: in page ranges of at most a quarter of it, which every
    worker takes a share of, as it would its pages as single files. (What that gains in time is
    measured by `examples/benchmark.py --big_pdf`: one PDF against the same pages as images.)"""
    src, log = tmp_path / "in", tmp_path / "pages.log"
    write(src / "book.pdf", document(24))
    env = {"FAKE_PIPELINE_DELAY": "0.1", "FAKE_PIPELINE_PAGE_LOG": str(log), "FAKE_PIPELINE_PRELOAD": "1",
           "FAKE_PIPELINE_BARRIER": f"{tmp_path / 'ready'}:4"}  # all 4 ready before the first range
    run = run_fake(src, tmp_path / "out", "--instances_per_device", "4", env=env)
    assert run.code == 0, run.stderr
    entries = page_log(log)
    assert sorted(e["page_index"] for e in entries) == list(range(24))  # each page once
    assert len({e["pid"] for e in entries}) == 4
    ranges = [r["range"] for r in run_log(tmp_path / "out") if "range" in r]
    assert len(ranges) >= 4 and max(stop - start for start, stop in ranges) <= 6


def test_a_document_queued_after_many_images_goes_first(tmp_path):
    """Longest first: a document last in input order is the first task a worker gets, so that
    no worker is left idle at the end while another reads the document."""
    src, log = tmp_path / "in", tmp_path / "pages.log"
    for i in range(12):
        write(src / f"a{i:02d}.png", f"image {i}")
    write(src / "z.pdf", document(4))  # last in input order; 16 pages on 2 workers: whole (ranges of 4)
    env = {"FAKE_PIPELINE_PRELOAD": "1", "FAKE_PIPELINE_PAGE_LOG": str(log)}
    run = run_fake(src, tmp_path / "out", "--instances_per_device", "2", env=env)
    assert run.code == 0, run.stderr
    first: dict[int, dict] = {}
    for entry in sorted(page_log(log), key=lambda e: e["start"]):
        first.setdefault(entry["pid"], entry)
    assert any(entry["input"].endswith("z.pdf") for entry in first.values()), first


# -- resume at the page -------------------------------------------------------------------------


def test_kill_9_in_the_middle_of_a_document_redoes_only_the_pages_not_recorded(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "book.pdf", document(40, {21: "WAIT"}))  # its range, pages 20-23, waits for `go`
    go = tmp_path / "go"
    env = {"FAKE_PIPELINE_PRELOAD": "1", "FAKE_PIPELINE_WAIT_FILE": str(go)}
    process = start_fake(src, out, "--instances_per_device", "2", "--pages_per_task", "4", env=env)
    log = out / "infer_mp.runlog.jsonl"
    # Every range but the one that waits, and one its worker may hold queued: 9 of the 11 at least
    # (the first page goes alone, then the rest of its range).
    wait_for(lambda: len(ranges_done(log)) >= 9)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {page for r in run_log(out) if r["status"] == "done" for page in range(*r["range"])}
    assert len(done) in (32, 36) and not done & {20, 21, 22, 23}
    go.touch()
    pages = tmp_path / "rerun.log"
    run = run_fake(src, out, "--instances_per_device", "2", "--pages_per_task", "4",
                   env={**env, "FAKE_PIPELINE_PAGE_LOG": str(pages)})
    assert run.code == 0, run.stderr
    assert f"{40 - len(done)} page(s)" in run.stderr  # the total, known before any worker starts
    assert sorted(e["page_index"] for e in page_log(pages)) == sorted(set(range(40)) - done)
    assert page_files(out) == sorted(f"book_{i}.json" for i in range(40))
    book = latest_records(out)[str(src / "book.pdf")]
    assert book["status"] == "done" and len(book["outputs"]) == 40 and "range" not in book
    assert_invariant(src, out)
    again = run_fake(src, out)
    assert again.code == 0 and "0 input(s) to do" in again.stderr


def test_an_unreadable_pdf_fails_named_before_any_worker_and_progress_counts_pages(tmp_path):
    src, out, imports = tmp_path / "in", tmp_path / "out", tmp_path / "imports"
    write(src / "broken.pdf", "not a PDF at all")
    run = run_fake(src, out, env={"FAKE_PIPELINE_IMPORT_LOG": str(imports)})
    assert run.code == 1 and f"FAILED {src / 'broken.pdf'}: cannot be opened as a PDF" in run.stderr
    assert not imports.exists()  # no worker was started for it
    write(src / "book.pdf", document(6))
    run = run_fake(src, out, "--progress_interval", "0.1", env={"FAKE_PIPELINE_DELAY": "0.2"})
    assert run.code == 0, run.stderr  # the broken file's failure stands; the book is done
    assert "6 page(s)" in run.stderr and "progress: " in run.stderr and "/6 pages" in run.stderr


# -- a bad page costs a page --------------------------------------------------------------------


def test_a_page_that_raises_fails_alone_and_retry_failed_redoes_only_it(tmp_path):
    src, out, pages = tmp_path / "in", tmp_path / "out", tmp_path / "pages.log"
    write(src / "book.pdf", document(6, {3: "RAISE"}))
    run = run_fake(src, out, "--pages_per_task", "2")
    assert run.code == 1
    assert f"FAILED {src / 'book.pdf'}: page 3 of 6 failed (page 3: ValueError" in run.stderr
    assert page_files(out) == [f"book_{i}.json" for i in (0, 1, 2, 4, 5)]
    book = latest_records(out)[str(src / "book.pdf")]
    assert book["status"] == "failed" and book["failed_pages"] == [3] and len(book["outputs"]) == 5
    assert "(1 failed)" in run.stderr  # pages, in the summary
    assert_invariant(src, out)
    again = run_fake(src, out, env={"FAKE_PIPELINE_PAGE_LOG": str(pages)})
    assert again.code == 0 and "1 failed before (not retried)" in again.stderr and not page_log(pages)
    retry = run_fake(src, out, "--retry_failed", env={"FAKE_PIPELINE_PAGE_LOG": str(pages)})
    assert retry.code == 1 and "1 input(s) to do, 0 already done; 1 page(s)" in retry.stderr
    assert [r["range"] for r in run_log(out) if "range" in r][-1] == [3, 4]  # page 3 alone (it raises again)
    assert page_files(out) == [f"book_{i}.json" for i in (0, 1, 2, 4, 5)]
    tolerant = run_fake(src, tmp_path / "tolerant", "--max_page_error_rate", "0.2")
    assert tolerant.code == 1 and "within --max_page_error_rate 0.2" in tolerant.stderr
    book = latest_records(tmp_path / "tolerant")[str(src / "book.pdf")]
    assert book["status"] == "done" and book["failed_pages"] == [3]
    again = run_fake(src, tmp_path / "tolerant")  # done within the rate: counted done again, not failed
    assert again.code == 0 and "0 input(s) to do, 1 already done" in again.stderr
    retry = run_fake(src, tmp_path / "tolerant", "--retry_failed")
    assert retry.code == 1 and "1 input(s) to do, 0 already done; 1 page(s)" in retry.stderr


def test_a_page_that_kills_its_worker_or_hangs_costs_only_itself(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "book.pdf", document(6, {1: "CRASH", 4: "HANG"}))
    run = run_fake(src, out, "--pages_per_task", "3", "--instances_per_device", "2", "--max_attempts", "1",
                   "--task_timeout", "1", env={"FAKE_PIPELINE_PRELOAD": "1"})
    assert run.code == 1, run.stderr
    assert page_files(out) == [f"book_{i}.json" for i in (0, 2, 3, 5)]
    book = latest_records(out)[str(src / "book.pdf")]
    assert book["status"] == "failed" and book["failed_pages"] == [1, 4]
    assert "page 1: worker was killed by SIGKILL" in book["error"] and "page 4: worker timed out" in book["error"]
    assert_invariant(src, out)


def test_compaction_keeps_the_ranges_of_a_document_not_finished(tmp_path):
    log = tmp_path / "infer_mp.runlog.jsonl"
    record = {"input": "/in/book.pdf", "status": "done", "outputs": [], "page_count": 4, "size": 1, "mtime_ns": 1}
    lines = [{**record, "time": "2026-01-01T00:00:00", "range": [0, 2], "outputs": ["book_0.json", "book_1.json"]},
             {**record, "time": "2026-01-01T00:00:01", "outputs": [f"book_{i}.json" for i in range(4)]},
             {**record, "time": "2026-01-02T00:00:00", "range": [0, 2], "outputs": ["book_0.json", "book_1.json"]},
             {**record, "time": "2026-01-02T00:00:01", "range": [2, 4], "status": "failed", "failed_pages": [3],
              "outputs": ["book_2.json"], "error": "page 3: x"}]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = make_config(output_dir=tmp_path, run_log=log)
    infer_mp.Ledger.read(config).compact(log)
    kept = [json.loads(line) for line in log.read_text().splitlines()]
    assert kept == lines[1:]  # the range the whole record supersedes goes; the later ones stay
    ledger = infer_mp.Ledger.read(config)
    assert [r["time"] for r in ledger.unfinished_ranges("/in/book.pdf")] == [line["time"] for line in lines[2:]]
    assert [r["time"] for r in ledger.held("/in/book.pdf")] == [line["time"] for line in lines[1:]]


def test_a_shorter_version_leaves_no_page_of_the_old_one_even_one_placed_without_a_record(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "book.pdf", document(10))
    assert run_fake(src, out, "--pages_per_task", "4").code == 0
    stray = write(out / "book_11.json", json.dumps({"input_path": str(src / "book.pdf"), "page_index": 11}))
    placing = {"time": "2026-01-01T00:00:00", "gen": 1, "input": str(src / "book.pdf"), "status": "placing",
               "outputs": ["book_11.json"], "extra_outputs": []}
    with (out / "infer_mp.runlog.jsonl").open("a") as log:  # what a kill between a range's rename and its
        log.write(json.dumps(placing) + "\n")               # record leaves of a longer version
    users = write(out / "book_12.json", "{}")  # no record names it: not the tool's to delete
    write(src / "book.pdf", pdf_bytes(["new 0", "new 1", "new 2"]))
    run = run_fake(src, out, "--pages_per_task", "4")
    assert run.code == 0, run.stderr
    assert page_files(out) == ["book_0.json", "book_1.json", "book_12.json", "book_2.json"] and not stray.exists()
    users.unlink()
    assert [outputs(out)[f"book_{i}.json"]["text"] for i in range(3)] == ["new 0", "new 1", "new 2"]
    assert_invariant(src, out)


@pytest.mark.parametrize("pipeline, most", [("SelfReadingPipeline", 54 + 30), ("WindowedPipeline", 54)])
def test_a_pipeline_that_reads_documents_itself_reads_each_at_most_once_more(tmp_path, pipeline, most):
    """Issue 28: a pipeline class that reads PDFs itself got a whole document for each page
    range (246 pages predicted for 54 saved here). Now the first range that comes back with
    pages outside it makes the other documents' ranges whole documents (one extra whole read at
    most), and a predict() that takes `page_windows` reads only the range's pages."""
    src, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "pages.jsonl"
    for name, count in (("a.pdf", 24), ("b.pdf", 30)):
        write(src / name, pdf_bytes([f"{name} page {i}" for i in range(count)]))
    run = run_cli("--pipeline", FAKE.replace("FakePipeline", pipeline), "--input_dir", str(src), "--device", "cpu",
                  "--output_dir", str(out), "--instances_per_device", "4", env={"FAKE_PIPELINE_PAGE_LOG": str(log)})
    assert run.code == 0, run.stderr
    assert len(page_log(log)) <= most, run.stderr
    found = {name: result["text"] for name, result in outputs(out).items()}
    assert found == {f"{stem}_{i}.json": f"{stem}.pdf page {i}" for stem, count in (("a", 24), ("b", 30))
                     for i in range(count)}
    assert run.stderr.count("reads documents itself") == (pipeline == "SelfReadingPipeline")


def test_a_probe_page_that_hangs_does_not_hold_the_other_documents_back(monkeypatch):
    """Review finding: while one range's first page shows whether the pipeline reads only its
    pages, other ranges wait; a page that hangs there held every other document for ever (no
    --task_timeout). Past PROBE_PATIENCE_SECONDS the other ranges go out anyway."""
    backend = bare_backend()
    spec = infer_mp.WorkerSpec(0, "cpu", 1)
    ranges = [infer_mp.Task(i, f"/in/{name}.pdf", f"{name}.pdf", "/out", name, page_count=8, pages=(0, 4))
              for i, name in enumerate("ab")]
    backend.pending = deque(ranges)
    backend.ranges = {0, 1}
    backend.fresh = iter(range(10, 20))
    now = [1000.0]
    monkeypatch.setattr(infer_mp.time, "monotonic", lambda: now[0])
    probe = backend._next()
    assert probe.pages == (0, 1) and probe.path == "/in/a.pdf"
    backend.workers = {0: infer_mp.WorkerHandle(spec, 0.0, ready=True)}
    backend.workers[0].held = {probe.index: probe}
    assert backend._next() is None  # only whole inputs may go beside the probe: there are none
    now[0] += infer_mp.PROBE_PATIENCE_SECONDS + 1
    assert backend._next().pages == (1, 4)  # the probe's page hangs: the rest goes out
    assert backend._next().path == "/in/b.pdf"


# -- pixels: a decompression bomb costs only itself --------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width x height (its header), with no pixel data: what a worker
    would have to decode is known from the first 33 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_an_image_past_the_pixel_limit_fails_alone_before_it_is_decoded(tmp_path):
    """A 30000 x 30000 PNG (900 MP: a worker decoding one went to 5.4 GB) fails, named, with the
    flag that raises the limit; the other inputs are done; raising the limit lets it through.
    --dry_run names it too (it listed it as to do, as if it would be read)."""
    src, out, busy = tmp_path / "in", tmp_path / "out", tmp_path / "busy.jsonl"
    make_inputs(src, 2)
    write(src / "bomb.png", png_header(30000, 30000))
    plan = run_fake(src, out, "--dry_run")  # says so before the run
    assert "bomb.png -> fails: 30000 x 30000 pixels (900 MP) is more than --max_image_pixels" in plan.stdout
    run = run_fake(src, out, "--batch_size", "3", env={"FAKE_PIPELINE_BUSY_LOG": str(busy)})
    assert run.code == 1, run.stderr
    [failed] = [line for line in run.stderr.splitlines() if "FAILED" in line]
    assert "bomb.png" in failed and "30000 x 30000 pixels (900 MP)" in failed and "--max_image_pixels" in failed
    assert page_files(out) == ["p00.json", "p01.json"]
    assert not any("bomb.png" in line for line in busy.read_text().splitlines())  # never handed to predict()
    again = run_fake(src, out, "--retry_failed", "--max_image_pixels", "0")  # no limit: the pipeline reads it
    assert again.code == 0, again.stderr
    assert page_files(out) == ["bomb.json", "p00.json", "p01.json"]


def test_dry_run_names_an_image_past_the_pixel_limit_reported_again_as_such(tmp_path):
    """Failed for its size in a run that was then stopped: the next run reports it again from its
    record, and --dry_run said it would fail for its size instead."""
    src, out, gate = tmp_path / "in", tmp_path / "out", tmp_path / "gate"
    write(src / "bomb.png", png_header(30000, 30000))
    write(src / "z.png", "WAIT")
    process = start_fake(src, out, "--instances_per_device", "2", env={"FAKE_PIPELINE_WAIT_FILE": str(gate)})
    wait_for(lambda: any(r.get("status") == "failed" for r in all_records(out)))
    process.signal_group(signal.SIGTERM)
    process.wait_for_stderr("starting no new inputs")
    gate.touch()  # (z.png, in progress, ends: the stop's grace period is not waited out)
    process.communicate(timeout=60)
    assert process.returncode == 143, process.stderr_text()
    plan = run_fake(src, out, "--dry_run")
    assert "bomb.png -> reported again (failed in a run that was stopped): " in plan.stdout, plan.stdout


def test_pdf_pages_render_under_the_pixel_limit_and_tiff_frames_past_it_fail(tmp_path):
    """A 60 x 40 pt PDF page renders at 120 x 80 (PaddleX's scale 2); under a limit of 2,400
    pixels, at 60 x 40 instead. A TIFF's 60 x 60 frames, past that limit, fail, named."""
    src = tmp_path / "in"
    write(src / "doc.pdf", pdf_bytes(["page one", "page two"]))
    write(src / "scan.tif", tiff_bytes(2, size=(60, 60)))
    env = {"FAKE_PIPELINE_PRELOAD": "1"}
    assert run_fake(src, tmp_path / "plain", env=env).code == 0
    assert outputs(tmp_path / "plain")["doc_0.json"]["image_shape"] == [80, 120]
    run = run_fake(src, tmp_path / "capped", "--max_image_pixels", "2400", env=env)
    assert run.code == 1, run.stderr
    assert [r["image_shape"] for r in outputs(tmp_path / "capped").values()] == [[40, 60], [40, 60]]
    [failed] = [line for line in run.stderr.splitlines() if "FAILED" in line]
    assert "scan.tif" in failed and "frame 0: 60 x 60 pixels" in failed and "--max_image_pixels 2,400" in failed
    ranges = run_fake(src, tmp_path / "ranges", "--max_image_pixels", "2400", "--pages_per_task", "1", env=env)
    assert ranges.code == 1 and "frame 1: 60 x 60 pixels" in ranges.stderr, ranges.stderr  # each range's frame
    assert [r["image_shape"] for r in outputs(tmp_path / "ranges").values()] == [[40, 60], [40, 60]]


def test_a_tiff_frame_past_the_limit_fails_as_one_page_and_pillows_own_limit_never_refuses(tmp_path):
    """Whole or in ranges, only the big frame of a TIFF fails (the document within
    --max_page_error_rate); with the limit raised it is read, even past Pillow's own limit
    (made 1,000 pixels here, as its 179 MP meets a huge scan), which would refuse it."""
    from PIL import Image

    src = tmp_path / "in"
    frames = [Image.new("L", size, 255) for size in ((20, 20), (60, 60), (20, 20))]
    src.mkdir()
    frames[0].save(src / "scan.tif", save_all=True, append_images=frames[1:])
    env = {**injected(), "PILLOW_MAX_IMAGE_PIXELS": "1000", "FAKE_PIPELINE_PRELOAD": "1"}
    for pages_per_task in ("0", "1"):
        out = tmp_path / f"out{pages_per_task}"
        run = run_fake(src, out, "--max_image_pixels", "2400", "--max_page_error_rate", "0.34", "--pages_per_task",
                       pages_per_task, env=env)
        assert run.code == 1 and "page 1 of 3 failed" in run.stderr, run.stderr
        assert "frame 1: 60 x 60 pixels" in run.stderr
        assert page_files(out) == ["scan_0.json", "scan_2.json"] and "Traceback" not in run.stderr
        again = run_fake(src, out, "--retry_failed", "--max_image_pixels", "0", "--pages_per_task", pages_per_task,
                         env=env)
        assert again.code == 0, again.stderr
        assert page_files(out) == ["scan_0.json", "scan_1.json", "scan_2.json"]


def test_a_pdf_page_past_the_limit_even_at_the_smallest_scale_is_named_as_the_run_log_names_it(tmp_path):
    """PaddleX's own refusal said "Page 1: ... maximum allowed 20." of page 0 (it counts from
    1, the run log and output names from 0) and did not name the flag that sets the limit."""
    src = tmp_path / "in"
    write(src / "doc.pdf", pdf_bytes(["page one", "page two"]))  # 60 x 40 pt: 6 x 4 pixels at scale 0.1
    run = run_fake(src, tmp_path / "out", "--max_image_pixels", "20", env={"FAKE_PIPELINE_PRELOAD": "1"})
    assert run.code == 1, run.stderr
    [failed] = [line for line in run.stderr.splitlines() if "FAILED" in line]
    assert "page 0: 6 x 4 pixels even at PaddleX's smallest PDF scale" in failed, failed
    assert "--max_image_pixels 20" in failed and "Page 1" not in failed and "Traceback" not in run.stderr


def test_a_failed_document_begun_again_by_a_stopped_run_goes_on_from_there(dirs):
    """Torture finding (seed 4002 --wide): doc.pdf failed a page (its pages named doc.pdf_N then,
    beside a doc.png since deleted); an --overwrite run then did two of its pages again under
    today's names, doc_N, and was stopped. The next plain run took the document as failed
    before, not to retry, and left both sets: its records listed pages 0 and 1 twice, and the
    old names stayed. A document begun again since its failure goes on from there: the pages
    done stay, the failed one stays failed (not retried), the rest is done, the old names go."""
    src, out = dirs
    write(src / "doc.pdf", document(4, {3: "RAISE"}))
    write(src / "doc_0.png", "an image named like a page")
    assert run_fake(src, out, "--pages_per_task", "1").code == 1
    assert (out / "doc.pdf_0.json").exists()
    (src / "doc_0.png").unlink()
    log = out / "infer_mp.runlog.jsonl"
    failed = log.read_text()
    old_names = {name: (out / name).read_bytes() for name in page_files(out) if name.startswith("doc.pdf_")}
    assert run_fake(src, out, "--pages_per_task", "1", "--overwrite").code == 1
    lines = log.read_text()[len(failed):].splitlines(keepends=True)
    ranges = [line for line in lines if '"range": [0, 1]' in line or '"range": [1, 2]' in line]
    placing = [line for line in lines if '"status": "placing"' in line][:2]
    assert len(ranges) == 2
    log.write_text(failed + "".join(line for line in lines if line in ranges or line in placing))  # (stopped then)
    (out / "doc_2.json").unlink()
    for name, content in old_names.items():  # (a stopped run retires nothing)
        (out / name).write_bytes(content)
    plain = run_fake(src, out, "--pages_per_task", "1")
    assert plain.code == 0, plain.stderr
    assert page_files(out) == ["doc_0.json", "doc_0.png.json", "doc_1.json", "doc_2.json"], page_files(out)
    record = latest_records(out)[str(src / "doc.pdf")]
    assert "range" not in record and record["outputs"] == ["doc_0.json", "doc_1.json", "doc_2.json"]
    assert record["failed_pages"] == [3]
    assert_invariant(src, out, gone=("doc_0.png",))
