"""Which files are inputs and where their outputs go: the output folder however it is spelled,
--recursive, and lists placed by a rule that does not depend on the rest of the list."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import infer_mp
from conftest import FAKE, page_files, pdf_bytes, run_cli, run_fake, tiff_bytes, write

# -- the output folder is never input ------------------------------------------------------------


@pytest.fixture
def scans_with_outputs(tmp_path: Path) -> Path:
    """scans/ with two inputs and, inside it, an output folder ocr/ holding what a run writes
    (JSON, a visualization PNG, a mirrored subfolder)."""
    scans = tmp_path / "scans"
    write(scans / "a.png")
    write(scans / "sub" / "b.png")
    for rel in ("a.json", "a_vis.png", "sub/b.json", "sub/b_vis.png"):
        write(scans / "ocr" / rel)
    return scans


SPELLINGS = {  # (input folder, output folder) relative to tmp_path; every one is scans/ and scans/ocr/
    "plain": ("scans", "scans/ocr"),
    "dotdot": ("scans", "scans/sub/../ocr"),
    "linked input": ("scans-link", "scans/ocr"),
    "linked output": ("scans", "ocr-link"),
    "output through a linked folder": ("scans", "scans-link/ocr"),
}


@pytest.mark.parametrize("patterns", [("**/*",), ("**/*.png", "*"), ("*/*", "*/*/*")],
                         ids=["walk", "walk-names", "pathlib"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_output_folder_is_never_input_however_spelled(scans_with_outputs, tmp_path, spelling, patterns):
    os.symlink("scans", tmp_path / "scans-link")
    os.symlink("scans/ocr", tmp_path / "ocr-link")
    input_dir, output_dir = (str(Path(tmp_path, p).absolute()) for p in SPELLINGS[spelling])
    selection = infer_mp.glob_inputs(input_dir, patterns, output_dir)
    rels = [os.path.relpath(p, input_dir) for p in selection.paths]
    assert rels == (["a.png", "sub/b.png"] if "*/*" not in patterns else ["sub/b.png"])


def test_a_rerun_with_the_output_folder_spelled_with_dotdot_takes_none_of_its_outputs(tmp_path):
    scans = tmp_path / "scans"
    write(scans / "a.png")
    write(scans / "sub" / "b.png")
    out = scans / "sub" / ".." / "ocr"
    for _ in range(2):
        run = run_fake(scans, out, "--input_glob_pattern", "**/*")
        assert run.code == 0, run.stderr
    assert page_files(scans / "ocr") == ["a.json", "sub/b.json"]  # no ocr/ocr/...
    assert "2 skipped" in run.stderr and "FAILED" not in run.stderr


@pytest.mark.parametrize("output", ["in", "in/sub/..", "in-link"])
def test_the_output_folder_as_the_input_folder_is_a_usage_error(tmp_path, output):
    write(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "sub").mkdir()
    os.symlink("in", tmp_path / "in-link")
    run = run_fake(tmp_path / "in", Path(tmp_path, output))
    assert run.code == 2, run.stderr
    assert "--output_dir is --input_dir" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_an_input_folder_inside_the_output_folder_is_read(tmp_path):
    """Only what is below the output folder is passed over, not an input folder that lies in it."""
    out = tmp_path / "out"
    write(out / "scans" / "a.png")
    selection = infer_mp.glob_inputs(str(out / "scans"), ("*",), str(out))
    assert selection.paths == [str(out / "scans" / "a.png")]


# -- --recursive ----------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Inputs at three depths, other files beside them, a linked folder and a link loop."""
    src = tmp_path / "in"
    for rel in ("a.JPG", "notes.txt", "x/b.png", "x/readme.md", "x/y/c.PDF", "x/y/d.Tiff"):
        write(src / rel, pdf_bytes([rel]) if rel.endswith(".PDF") else tiff_bytes(1) if rel.endswith(".Tiff") else rel)
    write(tmp_path / "elsewhere" / "e.png")
    os.symlink(tmp_path / "elsewhere", src / "linked")
    os.symlink("..", src / "x" / "up")
    return src


def test_recursive_takes_the_readable_types_from_every_subfolder_and_ignores_the_rest(tree):
    out = tree / "ocr"  # inside the input folder, with pictures that are of a readable type
    for _ in range(2):
        run = run_fake(tree, out, "--recursive", "--save", "img")
        assert run.code == 0, run.stderr
    assert page_files(out) == ["a.json", "x/b.json", "x/y/c_0.json", "x/y/d_0.json"]
    assert "4 skipped (already done), 4 ignored" in run.stderr  # notes.txt, readme.md, linked/, up/
    assert "FAILED" not in run.stderr


def test_recursive_with_patterns_matches_each_name_in_every_subfolder(tree, tmp_path):
    selection = infer_mp.glob_inputs(str(tree), ("*.PDF", "*.md"), str(tmp_path / "out"), recursive=True)
    assert [os.path.relpath(p, tree) for p in selection.paths] == ["x/readme.md", "x/y/c.PDF"]


@pytest.mark.parametrize("args, fragment", [
    (["--input_glob_pattern", "x/*.png"], "'x/*.png' has a folder part"),
    (["--input_glob_pattern", "**/*.png"], "'**/*.png' has a folder part"),
    (["--input_glob_pattern", "*.png", "--input_glob_pattern", "**"], "'**' has a folder part"),
    (["--input_list", "-"], "with --input_list, leave it out"),
])
def test_recursive_refuses_what_it_cannot_mean(tree, tmp_path, args, fragment):
    run = run_fake(tree, tmp_path / "out", "--recursive", *args)
    assert run.code == 2, run.stderr
    assert fragment in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_recursive_with_nothing_readable_says_where_it_looked(tmp_path):
    write(tmp_path / "in" / "sub" / "notes.txt")
    run = run_fake(tmp_path / "in", tmp_path / "out", "--recursive")
    assert run.code == 0, run.stderr
    assert "or its subfolders" in run.stderr


def test_help_explains_recursive():
    run = run_fake(Path("."), Path("out"), "--help")
    assert run.code == 0 and "--recursive" in run.stdout and "every subfolder" in run.stdout


# -- lists map stably -----------------------------------------------------------------------------


def run_list(source: str, cwd: Path):
    """A run of the test pipeline on a list, with no --input_dir, writing into cwd/out."""
    return run_cli("--pipeline", FAKE, "--device", "cpu", "--input_list", source, "--output_dir", "out", cwd=cwd)


def listed(tmp_path: Path, *paths: str | Path, input_dir: Path | None = None,
           output: str = "out") -> infer_mp.InputSelection:
    """read_input_list on these paths, run from tmp_path, and the relative paths it places them at."""
    (tmp_path / "list").write_text("".join(f"{p}\n" for p in paths))
    return infer_mp.read_input_list(str(tmp_path / "list"), None if input_dir is None else str(input_dir),
                                     str(tmp_path / output))


def placed(selection: infer_mp.InputSelection) -> list[str]:
    return [task.rel for task in infer_mp.plan_tasks(selection.root, "/out", selection.paths)]


def test_two_lists_never_share_an_output(tmp_path):
    """x/a.png in one run and y/a.png in another: each keeps its own folder, as if listed together."""
    write(tmp_path / "x" / "a.png", "X")
    write(tmp_path / "y" / "a.png", "Y")
    for folder in ("x", "y"):
        (tmp_path / f"{folder}.list").write_text(f"{folder}/a.png\n")
        run = run_list(f"{folder}.list", cwd=tmp_path)
        assert run.code == 0, run.stderr
    assert page_files(tmp_path / "out") == ["x/a.json", "y/a.json"]
    assert "X" in (tmp_path / "out" / "x" / "a.json").read_text()
    assert "Y" in (tmp_path / "out" / "y" / "a.json").read_text()


def test_a_listed_path_is_placed_by_itself_relative_to_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere" / "b.png"
    write(tmp_path / "in" / "deep" / "a.png")
    write(elsewhere)
    alone = placed(listed(tmp_path, "in/deep/a.png"))
    assert alone == ["in/deep/a.png"]  # not 'a.png', the common folder of a one-path list
    assert placed(listed(tmp_path, tmp_path / "in" / "deep" / "a.png")) == alone  # however it is spelled
    both = placed(listed(tmp_path, "in/deep/a.png", elsewhere))
    assert sorted(both) == sorted(alone + [os.path.join("_outside", str(elsewhere)[1:])])


def test_dotdot_in_a_listed_path_is_resolved_as_the_filesystem_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "real" / "a.png", "beside the link's target")
    (tmp_path / "real" / "sub").mkdir()
    os.symlink("real/sub", tmp_path / "link")
    write(tmp_path / "a.png", "beside the link")
    selection = listed(tmp_path, "link/../a.png")
    assert selection.paths == [str(tmp_path / "real" / "a.png")] and placed(selection) == ["real/a.png"]


@pytest.mark.parametrize("input_dir", ["scans-link", "scans/sub/.."])
def test_with_input_dir_a_listed_path_below_it_is_mirrored_however_either_is_spelled(tmp_path, monkeypatch, input_dir):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "scans" / "x" / "a.png")
    (tmp_path / "scans" / "sub").mkdir()
    os.symlink("scans", tmp_path / "scans-link")
    selection = listed(tmp_path, "scans/x/a.png", input_dir=Path(tmp_path, input_dir).absolute())
    assert placed(selection) == ["x/a.png"]  # not _outside/...
    assert os.path.samefile(selection.paths[0], tmp_path / "scans" / "x" / "a.png")


@pytest.mark.parametrize("input_dir, listing", [("scans", "scans"), ("scans", "scans-link/"), (None, ".")])
def test_folders_in_a_list_the_root_and_the_output_folder_too_are_ignored(tmp_path, monkeypatch, input_dir, listing):
    """`find scans -newer stamp -print0` lists scans itself: the whole run stopped, exit 2,
    "cannot place '_outside/...'"."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "scans" / "a.png")
    os.symlink("scans", tmp_path / "scans-link")
    (tmp_path / "out").mkdir()  # ... and `find .` lists the output folder: ignored, as what is in it is
    (tmp_path / "scans" / "sub").mkdir()  # ... and a subfolder: not an input either (it failed, exit 1)
    selection = listed(tmp_path, listing, "scans/a.png", "out", "./out/", "scans/sub",
                       input_dir=None if input_dir is None else (tmp_path / input_dir).absolute())
    assert placed(selection) == ["a.png" if input_dir else "scans/a.png"] and selection.ignored == 3


def test_a_listed_path_under_a_folder_named_outside_cannot_be_placed(tmp_path):
    write(tmp_path / "_outside" / "tmp" / "a.png")
    (tmp_path / "list").write_text("_outside/tmp/a.png\n")
    run = run_list("list", cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert "cannot place '_outside/tmp/a.png'" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("output", ["ocr", "scans/../ocr", "ocr-link"])
def test_a_listed_path_in_the_output_folder_is_ignored(tmp_path, monkeypatch, output):
    """`find . -name '*.png'` also finds the --save img pictures of an earlier run."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "scans" / "a.png")
    write(tmp_path / "ocr" / "scans" / "a_vis.png")
    os.symlink("ocr", tmp_path / "ocr-link")
    selection = listed(tmp_path, "scans/a.png", "ocr/scans/a_vis.png", output=output)
    assert placed(selection) == ["scans/a.png"] and selection.ignored == 1


def test_a_listed_path_in_an_input_folder_inside_the_output_folder_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "out" / "scans" / "a.png")
    selection = listed(tmp_path, "out/scans/a.png", input_dir=tmp_path / "out" / "scans")
    assert placed(selection) == ["a.png"]


def test_a_list_of_outputs_only_says_so(tmp_path):
    write(tmp_path / "out" / "a_vis.png")
    (tmp_path / "list").write_text("out/a_vis.png\n")
    run = run_list("list", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert ("no inputs: the list 'list': none of its paths is an input (folders, or files in the output folder); "
            "nothing to do") in run.stderr
    assert not (tmp_path / "out" / "out").exists()
