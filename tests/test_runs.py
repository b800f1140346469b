"""Whole runs with the model-free test pipeline: outputs, batching, workers, failures."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

import infer_mp
from conftest import FAKE, outputs, page_files, pdf_bytes, run_cli, run_fake, temporaries, tiff_bytes, write


def test_one_json_per_page_with_seed_names(dirs):
    src, out = dirs
    write(src / "scan1.jpg")
    write(src / "scan2.PNG")
    write(src / "doc.pdf", pdf_bytes(["page one", "page two", "page three"]))
    write(src / "notes.txt")
    (src / "folder.png").mkdir()
    run = run_fake(src, out)
    assert run.code == 0, run.stderr
    assert page_files(out) == ["doc_0.json", "doc_1.json", "doc_2.json", "scan1.json", "scan2.json"]
    results = outputs(out)
    assert [results[f"doc_{i}.json"]["page_index"] for i in range(3)] == [0, 1, 2]
    assert [results[f"doc_{i}.json"]["text"] for i in range(3)] == ["page one", "page two", "page three"]
    assert results["scan1.json"]["input_path"] == str(src / "scan1.jpg")
    assert "2 ignored" in run.stderr  # notes.txt and the directory


def test_colliding_names_get_distinct_files(dirs):
    src, out = dirs
    for rel in ("a.jpg", "a.png", "x/a.png", "y/a.png", "b.pdf", "b_1.png"):
        write(src / rel, pdf_bytes([rel]) if rel.endswith(".pdf") else rel)
    run = run_fake(src, out, "--input_glob_pattern", "**/*")
    assert run.code == 0, run.stderr
    results = outputs(out)
    assert sorted(results) == ["a.jpg.json", "a.png.json", "b.pdf_0.json", "b_1.png.json",
                               "x/a.json", "y/a.json"]
    for name, rel in [("a.jpg.json", "a.jpg"), ("a.png.json", "a.png"), ("x/a.json", "x/a.png"),
                      ("y/a.json", "y/a.png"), ("b_1.png.json", "b_1.png"), ("b.pdf_0.json", "b.pdf")]:
        assert results[name]["text"] == rel


def test_glob_pattern_selects_and_recurses(dirs):
    src, out = dirs
    write(src / "a.jpg")
    write(src / "b.png")
    write(src / "sub" / "c.jpg")
    run = run_fake(src, out, "--input_glob_pattern", "*.jpg")
    assert run.code == 0 and page_files(out) == ["a.json"]
    run = run_fake(src, out, "--input_glob_pattern", "**/*.jpg")
    assert run.code == 0 and page_files(out) == ["a.json", "sub/c.json"]


def test_default_output_dir_is_output(tmp_path):
    write(tmp_path / "in" / "a.jpg")
    run = run_cli("--pipeline", FAKE, "--input_dir", "in", "--device", "cpu", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert page_files(tmp_path / "output") == ["a.json"]


def test_two_cpu_instances_share_the_work_with_split_threads(dirs):
    src, out = dirs
    for i in range(8):
        write(src / f"p{i}.png")
    cores = infer_mp.available_cores()  # affinity, capped by a cgroup CPU quota (a `--cpus 2` container)
    barrier = {"FAKE_PIPELINE_BARRIER": f"{src.parent / 'ready'}:2", "FAKE_PIPELINE_DELAY": "0.3"}
    run = run_fake(src, out, "--instances_per_device", "2", env=barrier)  # both ready before the first input
    assert run.code == 0, run.stderr
    results = outputs(out).values()
    assert len(results) == 8
    assert len({r["pid"] for r in results}) == 2
    assert {r["cpu_threads"] for r in results} == {max(1, cores // 2)}
    assert {r["device"] for r in results} == {"cpu"}


def test_batches_reach_predict(dirs):
    src, out = dirs
    for i in range(6):
        write(src / f"p{i}.png")
    run = run_fake(src, out, "--batch_size", "3")
    assert run.code == 0, run.stderr
    assert {r["batch"] for r in outputs(out).values()} == {3}


def test_a_bad_input_costs_only_itself(dirs):
    src, out = dirs
    for i in range(5):
        write(src / f"good{i}.png")
    write(src / "corrupt.png", "RAISE")
    write(src / "unreadable.png", "EMPTY")
    run = run_fake(src, out, "--batch_size", "4")
    assert run.code == 1
    assert page_files(out) == [f"good{i}.json" for i in range(5)]
    failed = [line for line in run.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 2
    assert any(str(src / "corrupt.png") in line and "cannot decode" in line for line in failed)
    assert any(str(src / "unreadable.png") in line and "no result" in line for line in failed)
    assert "Traceback" not in run.stderr


def test_a_worker_that_dies_is_replaced_and_nothing_is_lost(dirs):
    src, out = dirs
    for i in range(6):
        write(src / f"good{i}.png")
    write(src / "poison.png", "CRASH")
    run = run_fake(src, out, "--batch_size", "3", "--instances_per_device", "2")
    assert run.code == 1, run.stderr
    assert page_files(out) == [f"good{i}.json" for i in range(6)]
    assert "was killed by SIGKILL" in run.stderr
    failed = [line for line in run.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "poison.png" in failed[0] and "3 times" in failed[0]


def test_no_worker_can_start(dirs):
    src, out = dirs
    write(src / "a.png")
    run = run_fake(src, out, "--instances_per_device", "2", env={"FAKE_PIPELINE_FAIL_INIT": "1"})
    assert run.code == 3
    assert run.stderr.count("could not start its pipeline") == 2
    assert "FAKE_PIPELINE_FAIL_INIT" in run.stderr
    assert "1 not processed" in run.stderr
    assert "Traceback" not in run.stderr


def test_no_temporary_files_are_left(dirs):
    src, out = dirs
    for i in range(10):
        write(src / f"p{i}.png")
    write(src / "doc.pdf", pdf_bytes(["page", "page"]))
    assert run_fake(src, out, "--instances_per_device", "2", "--batch_size", "2").code == 0
    assert not temporaries(out)
    named = {name: (Path(r["input_path"]).name, r["page_index"]) for name, r in outputs(out).items()}
    assert named == {**{f"p{i}.json": (f"p{i}.png", None) for i in range(10)},
                     "doc_0.json": ("doc.pdf", 0), "doc_1.json": ("doc.pdf", 1)}  # whole, each its own


def test_empty_selection_is_not_an_error(dirs):
    src, out = dirs
    src.mkdir()
    run = run_fake(src, out)
    assert run.code == 0
    assert "nothing to do" in run.stderr


@pytest.fixture
def kept_environ():
    """Importing PaddleX (and OpenCV) sets variables in os.environ: the runs of later tests must not see them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_the_fake_pipeline_reads_real_pdfs_and_tiffs_through_paddlexs_sampler(tmp_path, monkeypatch, kept_environ):
    from fake_pipeline import FakePipeline

    data = pdf_bytes(["one", "two", "three"])
    xref = int(data.rsplit(b"startxref\n", 1)[1].split()[0])
    assert data[xref:].startswith(b"xref\n")  # offsets right, not repaired by the reader
    offsets = [int(n) for n in re.findall(rb"(\d{10}) 00000 n \n", data)]
    assert [data[o:].split(b"\n", 1)[0] for o in offsets] == [b"%d 0 obj" % (i + 1) for i in range(len(offsets))]
    pdf, tif = write(tmp_path / "doc.pdf", data), write(tmp_path / "scan.tif", tiff_bytes(2))
    pipeline = FakePipeline()
    results = pipeline.predict([str(pdf), str(tif)])
    assert [(Path(r["input_path"]).name, r["page_index"], r["page_count"], r["text"]) for r in results] == [
        ("doc.pdf", 0, 3, "one"), ("doc.pdf", 1, 3, "two"), ("doc.pdf", 2, 3, "three"),
        ("scan.tif", 0, 2, "frame 0"), ("scan.tif", 1, 2, "frame 1")]
    assert len({r["image_sha1"] for r in results}) == 5
    pages = [(r["page_index"], r["text"], r["image_sha1"]) for r in results[:3]]

    # A page that raises while the sampler holds PaddleX's pdfium_lock (it does while it yields
    # a PDF's pages), the error kept (as a worker's report may keep it): the next PDF still reads.
    write(tmp_path / "bad.pdf", pdf_bytes(["fine", "RAISE"]))
    with pytest.raises(ValueError, match="page 1 of bad.pdf") as kept:
        pipeline.predict([str(tmp_path / "bad.pdf")])
    again: list = []
    reader = threading.Thread(target=lambda: again.extend(pipeline.predict([str(pdf)])), daemon=True)
    reader.start()
    reader.join(30)
    assert [(r["page_index"], r["text"], r["image_sha1"]) for r in again] == pages, "blocked on pdfium_lock"
    assert kept.value

    # ImageBatchSampler.sample replaced after the pipeline made its sampler (as infer_mp does
    # to hand a worker a window of a document's pages): the window is what is read.
    from paddlex.inference.common.batch_sampler.image_batch_sampler import ImageBatchSampler, ImgBatch

    original = ImageBatchSampler.sample

    def window(self, inputs):
        for batch in original(self, inputs):
            narrowed = ImgBatch()
            for item in zip(batch.instances, batch.input_paths, batch.page_indexes, batch.page_counts):
                if item[2] in (1, 2):
                    narrowed.append(*item)
            if len(narrowed):
                yield narrowed

    monkeypatch.setattr(ImageBatchSampler, "sample", window)
    assert [(r["page_index"], r["text"], r["image_sha1"]) for r in pipeline.predict([str(pdf)])] == pages[1:]
