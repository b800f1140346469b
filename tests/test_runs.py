"""Whole runs with the model-free test pipeline: outputs, batching, workers, failures."""

from __future__ import annotations

import json
import os

from conftest import FAKE, outputs, page_files, run_cli, run_fake, temporaries, write


def test_one_json_per_page_with_seed_names(dirs):
    src, out = dirs
    write(src / "scan1.jpg")
    write(src / "scan2.PNG")
    write(src / "doc.pdf", "page one\npage two\npage three\n")
    write(src / "notes.txt")
    (src / "folder.png").mkdir()
    run = run_fake(src, out)
    assert run.code == 0, run.stderr
    assert page_files(out) == ["doc_0.json", "doc_1.json", "doc_2.json", "scan1.json", "scan2.json"]
    results = outputs(out)
    assert [results[f"doc_{i}.json"]["page_index"] for i in range(3)] == [0, 1, 2]
    assert results["scan1.json"]["input_path"] == str(src / "scan1.jpg")
    assert "2 ignored" in run.stderr  # notes.txt and the directory


def test_colliding_names_get_distinct_files(dirs):
    src, out = dirs
    for rel in ("a.jpg", "a.png", "x/a.png", "y/a.png", "b.pdf", "b_1.png"):
        write(src / rel, rel)
    run = run_fake(src, out, "--input_glob_pattern", "**/*")
    assert run.code == 0, run.stderr
    results = outputs(out)
    assert sorted(results) == ["a.jpg.json", "a.png.json", "b.pdf_0.json", "b_1.png.json",
                               "x/a.json", "y/a.json"]
    for name, rel in [("a.jpg.json", "a.jpg"), ("a.png.json", "a.png"), ("x/a.json", "x/a.png"),
                      ("y/a.json", "y/a.png"), ("b_1.png.json", "b_1.png")]:
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
    cores = len(os.sched_getaffinity(0))
    run = run_fake(src, out, "--instances_per_device", "2", env={"FAKE_PIPELINE_DELAY": "0.3"})
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
    write(src / "doc.pdf", "page\npage\n")
    assert run_fake(src, out, "--instances_per_device", "2", "--batch_size", "2").code == 0
    assert not temporaries(out)
    for result in outputs(out).values():
        assert json.dumps(result)


def test_empty_selection_is_not_an_error(dirs):
    src, out = dirs
    src.mkdir()
    run = run_fake(src, out)
    assert run.code == 0
    assert "nothing to do" in run.stderr
