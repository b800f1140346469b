"""Feeding and tuning a batch: patterns, lists, shards, dry runs, pipeline options, --save."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import infer_mp
from conftest import (
    FAKE,
    ROOT,
    SCRIPT,
    assert_invariant,
    fake_args,
    injected,
    outputs,
    page_files,
    pdf_bytes,
    run_cli,
    run_log,
    start_fake,
    tiff_bytes,
    wait_for,
    write,
)

STRICT = f"{ROOT / 'tests' / 'fake_pipeline.py'}:StrictPipeline"


def run_fake(*args: str, pipeline: str = FAKE, **kwargs):
    return run_cli("--pipeline", pipeline, "--device", "cpu", *args, **kwargs)


# -- selection ------------------------------------------------------------------------------------


def test_default_selection_takes_readable_types_in_any_case_and_counts_the_rest(dirs):
    src, out = dirs
    for name in ("a.JPG", "b.Png", "e.webp", "notes.txt", "data.json"):
        write(src / name)
    write(src / "c.pdf", pdf_bytes(["c"]))
    write(src / "d.TIFF", tiff_bytes(1))
    (src / "folder.jpg").mkdir()
    write(src / "sub" / "deep.png")
    run = run_fake("--input_dir", str(src), "--output_dir", str(out))
    assert run.code == 0, run.stderr
    assert page_files(out) == ["a.json", "b.json", "c_0.json", "d_0.json", "e.json"]
    assert "4 ignored" in run.stderr  # notes.txt, data.json, folder.jpg/ and sub/


def test_several_patterns_and_recursion(dirs):
    src, out = dirs
    for rel in ("a.jpg", "b.png", "x/c.jpg", "x/y/d.jpg"):
        write(src / rel)
    write(src / "x" / "y" / "e.pdf", pdf_bytes(["e"]))
    run = run_fake("--input_dir", str(src), "--output_dir", str(out),
                   "--input_glob_pattern", "*.png", "--input_glob_pattern", "**/*.jpg")
    assert run.code == 0, run.stderr
    assert page_files(out) == ["a.json", "b.json", "x/c.json", "x/y/d.json"]


# -- lists ----------------------------------------------------------------------------------------


def test_input_list_from_stdin_with_a_missing_file(tmp_path):
    src, out = tmp_path / "scans", tmp_path / "out"
    listed = [write(src / "a" / "one.png"), write(src / "b" / "two.png")]
    text = "\n".join([*map(str, listed), str(src / "gone.png"), ""])
    done = subprocess.run([sys.executable, str(SCRIPT), "--pipeline", FAKE, "--device", "cpu",
                           "--input_list", "-", "--output_dir", str(out)],
                          input=text, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert page_files(out) == ["scans/a/one.json", "scans/b/two.json"]  # mirrored below the current folder
    assert f"FAILED {src / 'gone.png'}: no such file" in done.stderr
    assert "Traceback" not in done.stderr
    failed = [r for r in run_log(out) if r["status"] == "failed"]
    assert [Path(r["input"]).name for r in failed] == ["gone.png"]


def test_input_list_file_nul_separated_and_relative_paths(tmp_path):
    write(tmp_path / "in" / "a b.png")
    write(tmp_path / "in" / "c.png")
    (tmp_path / "list").write_bytes(b"in/a b.png\0in/c.png\0")
    run = run_fake("--input_list", "list", "--output_dir", "out", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert page_files(tmp_path / "out") == ["in/a b.json", "in/c.json"]


def test_input_list_with_input_dir_mirrors_it_and_places_outsiders(tmp_path):
    inside = write(tmp_path / "in" / "x" / "a.png")
    outside = write(tmp_path / "elsewhere" / "b.png")
    (tmp_path / "list").write_text(f"{inside}\n{outside}\n")
    run = run_fake("--input_list", str(tmp_path / "list"), "--input_dir", str(tmp_path / "in"),
                   "--output_dir", str(tmp_path / "out"))
    assert run.code == 0, run.stderr
    outside_rel = os.path.join("_outside", *outside.parent.parts[1:], "b.json")
    assert page_files(tmp_path / "out") == sorted(["x/a.json", outside_rel])


def test_input_list_and_pattern_together_is_a_usage_error(tmp_path):
    (tmp_path / "list").write_text("a.png\n")
    run = run_fake("--input_list", str(tmp_path / "list"), "--input_glob_pattern", "*.png")
    assert run.code == 2 and "leave it out" in run.stderr


def test_neither_dir_nor_list_is_a_usage_error():
    run = run_fake()
    assert run.code == 2 and "--input_dir" in run.stderr and "--input_list" in run.stderr


# -- shards ---------------------------------------------------------------------------------------


def test_shards_cover_the_inputs_exactly_once(dirs):
    src, out = dirs
    for i in range(30):
        write(src / f"s{i:02d}.png", str(i))
    seen: list[str] = []
    for index in range(3):
        run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--shard", f"{index}/3")
        assert run.code == 0, run.stderr
        log = out / f"infer_mp.shard-{index}-of-3.runlog.jsonl"
        seen += [r["input"] for r in map(json.loads, log.read_text().splitlines()) if r.get("status") == "done"]
    assert sorted(seen) == sorted(str(p) for p in src.iterdir())
    assert len(page_files(out)) == 30


def test_a_new_input_does_not_move_the_others_between_shards(dirs):
    src, _ = dirs
    paths = [write(src / f"s{i:02d}.png") for i in range(20)]
    before = {t.path: infer_mp.in_shard(t, (1, 4)) for t in infer_mp.plan_tasks(src, Path("/o"), paths)}
    paths.append(write(src / "new.png"))
    after = {t.path: infer_mp.in_shard(t, (1, 4)) for t in infer_mp.plan_tasks(src, Path("/o"), paths)}
    assert all(after[p] == v for p, v in before.items())


@pytest.mark.parametrize("value", ["3/3", "1/0", "a/b", "1", "-1/2"])
def test_bad_shard(dirs, value):
    src, out = dirs
    write(src / "a.png")
    run = run_fake("--input_dir", str(src), "--shard", value)
    assert run.code == 2 and "--shard" in run.stderr


# -- dry run --------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_touches_nothing(dirs):
    src, out = dirs
    write(src / "a.png")
    write(src / "doc.pdf", pdf_bytes(["page", "page"]))
    run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--instances_per_device", "2",
                   "--dry_run", env={"FAKE_PIPELINE_FAIL_INIT": "1"})  # no model is loaded
    assert run.code == 0, run.stderr
    assert "2 worker(s) on cpu x2" in run.stdout and "2 to do, 0 already done" in run.stdout
    assert f"{src / 'doc.pdf'} -> doc_{{page}}.json" in run.stdout
    assert not out.exists()
    assert run_fake("--input_dir", str(src), "--output_dir", str(out)).code == 0
    write(src / "b.png")
    run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--dry_run")
    assert "1 to do, 2 already done" in run.stdout


def test_dry_run_says_when_another_run_holds_the_output_folder(dirs, tmp_path):
    """It listed the inputs to do and exited 0 while the run it stood for would exit 75."""
    src, out = dirs
    write(src / "a.png", "WAIT")
    busy = start_fake(src, out, env={"FAKE_PIPELINE_WAIT_FILE": str(tmp_path / "go")})
    wait_for(lambda: "1 input(s) to do" in busy.stderr_text(), 60)
    plan = run_fake("--input_dir", str(src), "--output_dir", str(out), "--dry_run")
    assert plan.code == 0 and "another infer_mp.py run is using --output_dir now" in plan.stderr, plan.stderr
    (tmp_path / "go").touch()
    busy.communicate(timeout=60)
    quiet = run_fake("--input_dir", str(src), "--output_dir", str(out), "--dry_run")
    assert "another infer_mp.py run" not in quiet.stderr
    for held, mode, shard, refused in [(".infer_mp.lock", fcntl.LOCK_EX, "0/2", True),  # a run over all inputs
                                       (".infer_mp.lock", fcntl.LOCK_SH, "0/2", False),  # ... shards of 2: fine
                                       (".infer_mp.shards-of-2.lock", fcntl.LOCK_SH, "0/3", True)]:
        with open(out / held, "a+") as lock:
            fcntl.flock(lock, mode | fcntl.LOCK_NB)
            plan = run_fake("--input_dir", str(src), "--output_dir", str(out), "--dry_run", "--shard", shard)
            real = run_fake("--input_dir", str(src), "--output_dir", str(out), "--shard", shard)
        assert ("another infer_mp.py run is using" in plan.stderr) == refused == (real.code == 75), (held, shard)


def test_dry_run_shows_the_limits_the_run_would_work_under(dirs):
    """Worker recycling (memory, inputs), the pixel limit and the hang timeout, defaults included:
    a user tuning them sees them before the run, not only in its summary."""
    src, out = dirs
    write(src / "a.png")
    run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--dry_run")
    [limits] = [line for line in run.stdout.splitlines() if line.startswith("limits: ")]
    assert re.search(r"recycled past [0-9,]+ MB resident \(default: 80% of", limits), limits
    assert f"images past {infer_mp.DEFAULT_MAX_IMAGE_PIXELS:,} pixels fail" in limits
    assert "no time limit on a page (--task_timeout)" in limits
    run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--dry_run", "--max_worker_memory_mb", "0",
                   "--max_items_per_worker", "5", "--max_image_pixels", "0", "--task_timeout", "30")
    [limits] = [line for line in run.stdout.splitlines() if line.startswith("limits: ")]
    assert limits == ("limits: no memory limit on workers (--max_worker_memory_mb); a worker is recycled after 5 "
                      "input(s) (--max_items_per_worker); no pixel limit (--max_image_pixels 0); a page may take "
                      "30 s (--task_timeout)")


# -- pipeline options -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("true", True), ("False", False), ("null", None), ("None", None), ("12", 12), ("0.5", 0.5),
    ("0123", "0123"), ("PP-OCRv4_mobile_det", "PP-OCRv4_mobile_det"), ('{"a": [1, 2]}', {"a": [1, 2]}),
    ('"quoted"', "quoted"), ("", ""), ("nan", "nan"),
])
def test_typed_values(text, value):
    assert infer_mp.parse_value(text) == value


def test_options_reach_the_constructor_and_predict(dirs, tmp_path):
    src, out = dirs
    write(src / "a.png")
    config = write(tmp_path / "pipeline.yaml", "pipeline_name: OCR\n")
    run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--paddlex_config", str(config),
                   "--pipeline_arg", "use_doc_unwarping=false", "--pipeline_arg", "limit=960",
                   "--engine", "paddle_static", "--engine_config", '{"run_mode": "mkldnn"}',
                   "--enable_mkldnn", "true", "--predict_arg", "text_rec_score_thresh=0.5")
    assert run.code == 0, run.stderr
    result = outputs(out)["a.json"]
    assert result["options"] == {"paddlex_config": str(config), "use_doc_unwarping": False, "limit": 960,
                                 "engine": "paddle_static", "engine_config": {"run_mode": "mkldnn"},
                                 "enable_mkldnn": True}
    assert result["predict_options"] == {"text_rec_score_thresh": 0.5}


@pytest.mark.parametrize("args, fragment", [
    (["--pipeline_arg", "langauge=fr"], "did you mean 'language'"),
    (["--predict_arg", "flavour=x"], "did you mean 'flavor'"),
    (["--pipeline_arg", "device=gpu:0"], "--device"),
    (["--pipeline_arg", "novalue"], "NAME=VALUE"),
    (["--enable_mkldnn", "maybe"], "true or false"),
    (["--engine_config", "[1]"], "JSON object"),
    (["--paddlex_config", "missing.yaml"], "no such file"),
    (["--save", "pdf"], "markdown, img"),
])
def test_misspelled_or_bad_options_fail_before_workers_start(dirs, args, fragment):
    src, out = dirs
    write(src / "a.png")
    run = run_fake("--input_dir", str(src), "--output_dir", str(out), *args, pipeline=STRICT)
    assert run.code == 2, run.stderr
    assert fragment in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_warm_worker_checks_the_options_and_the_coordinator_never_imports_the_pipeline(dirs, tmp_path):
    """The coordinator imported the pipeline (PaddleOCR: a second of CPU) to check the options,
    and the workers waited for it to build theirs; the warm worker checks them instead."""
    src, out = dirs
    write(src / "a.png")
    for args, code in ((["--pipeline_arg", "language=fr"], 0), (["--pipeline_arg", "langauge=fr"], 2)):
        imports = tmp_path / f"imports-{code}"
        run = run_fake("--input_dir", str(src), "--output_dir", str(out / str(code)), *args, pipeline=STRICT,
                       env={"FAKE_PIPELINE_IMPORT_LOG": str(imports)})
        assert run.code == code, run.stderr
        assert len(set(imports.read_text().split())) == 1  # the one worker's process alone
    assert "did you mean 'language'" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_paddleocr_checks_its_own_options(dirs):
    """PaddleOCR's pipelines take engine options through **kwargs; PaddleOCR's check runs first."""
    src, out = dirs
    write(src / "a.png")
    run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--pipeline_arg", "use_doc_unwrping=false",
                   pipeline="PaddleOCR")
    assert run.code == 2 and "did you mean 'use_doc_unwarping'" in run.stderr
    run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--engine", "tensorflow",
                   pipeline="PaddleOCR")
    assert run.code == 2 and "Invalid engine: tensorflow" in run.stderr


# -- other outputs --------------------------------------------------------------------------------


def test_save_markdown_and_images_beside_the_json(dirs):
    src, out = dirs
    write(src / "a.png", "alpha")
    write(src / "doc.pdf", pdf_bytes(["page 0", "page 1"]))
    run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--save", "markdown,img")
    assert run.code == 0, run.stderr
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.suffix != ".jsonl")
    assert names == ["a.json", "a.md", "a_vis.png", "doc_0.json", "doc_0.md", "doc_0_vis.png",
                     "doc_1.json", "doc_1.md", "doc_1_vis.png"]
    assert (out / "a.md").read_text() == "# alpha\n" and (out / "doc_1.md").read_text() == "# page 1\n"
    record = next(r for r in run_log(out) if r["input"].endswith("a.png"))
    assert record["extra_outputs"] == ["a.md", "a_vis.png"]


def test_save_a_form_the_results_lack_is_said_once(dirs):
    src, out = dirs
    for i in range(3):
        write(src / f"p{i}.png")
    run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--save", "markdown",
                   "--instances_per_device", "2", pipeline=STRICT)
    assert run.code == 0, run.stderr
    assert run.stderr.count("no markdown form") == 1
    assert page_files(out) == ["p0.json", "p1.json", "p2.json"]


def test_output_dir_inside_input_dir_is_never_an_input(tmp_path):
    src = tmp_path / "scans"
    write(src / "a.png", "A")
    write(src / "sub" / "b.png", "B")
    out = src / "ocr"
    for _ in range(2):
        run = run_fake("--input_dir", str(src), "--output_dir", str(out), "--input_glob_pattern", "**/*")
        assert run.code == 0, run.stderr
    assert page_files(out) == ["a.json", "sub/b.json"]
    assert "2 skipped" in run.stderr and "FAILED" not in run.stderr


def test_a_subfolder_that_cannot_be_listed_is_named_and_exits_1_at_every_run(tmp_path):
    """It was passed over without a word, exit 0: its scans were never read, and never said."""
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "a.png")
    write(src / "locked" / "b.png")
    env = {**injected(), "UNLISTABLE": str(src / "locked")}
    for attempt in ("first", "no-op rerun"):
        run = run_cli(*fake_args(src, out), "--recursive", env=env)
        assert run.code == 1, (attempt, run.stderr)
        assert f"FAILED {src / 'locked'}/: cannot list this folder (Permission denied)" in run.stderr, attempt
        assert "Traceback" not in run.stderr
    assert sorted(outputs(out)) == ["a.json"]
    plan = run_cli(*fake_args(src, out), "--recursive", "--dry_run", env=env)
    assert plan.code == 0 and f"FAILED {src / 'locked'}/" in plan.stderr
    readable = run_cli(*fake_args(src, out), "--recursive")
    assert readable.code == 0 and sorted(outputs(out)) == ["a.json", "locked/b.json"]


def test_the_run_logs_lock_in_the_input_folder_is_not_an_input(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "a.png")
    for _ in range(2):  # (the lock is there from the first run on)
        run = run_cli(*fake_args(src, out), "--run_log", str(src / "run.jsonl"), "--input_glob_pattern", "**/*")
        assert run.code == 0, run.stderr
    assert sorted(outputs(out)) == ["a.json"]


def test_a_file_name_with_a_newline_or_an_escape_sequence_is_one_line_that_cannot_drive_the_terminal(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    names = ["fail\nme.png", "x\x1b[2J\x1b[31mred.png", "byte\udcffname.png"]
    for name in names:
        write(src / name, "RAISE")
    plan = run_cli(*fake_args(src, out), "--dry_run")
    assert "fail\\nme.png -> fail\\nme.json" in plan.stdout and "\x1b" not in plan.stdout
    run = run_cli(*fake_args(src, out))
    assert run.code == 1
    failed = [line for line in run.stderr.splitlines() if line.startswith("infer_mp.py: FAILED")]
    assert len(failed) == 3 and "\x1b" not in run.stderr, run.stderr
    assert {line.split(": ")[1].rpartition("/")[2] for line in failed} == {
        "fail\\nme.png", "x\\x1b[2J\\x1b[31mred.png", "byte\\xffname.png"}


@pytest.mark.parametrize("paged", [False, True])
def test_an_output_name_of_255_bytes_is_placed(dirs, paged):
    """Review: a 250-byte stem's output, `L…L.json`, is 255 bytes, a name a file may have; the
    worker staged it as `0-L…L.json` (257 bytes): ENAMETOOLONG, the input failed, and stood."""
    src, out = dirs
    stem = "L" * (248 if paged else 250)  # (a document's page: `L…L_0.json`)
    if paged:
        write(src / f"{stem}.pdf", pdf_bytes(["page 0"]))
    else:
        write(src / f"{stem}.png", "long")
    run = run_fake("--input_dir", str(src), "--output_dir", str(out))
    assert run.code == 0, run.stderr
    assert (out / (f"{stem}_0.json" if paged else f"{stem}.json")).is_file()
    assert_invariant(src, out)
