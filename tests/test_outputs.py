"""Output naming: seed names where possible, never two inputs on one file, folders mirrored."""

from __future__ import annotations

from pathlib import Path

import pytest

import infer_mp


@pytest.mark.parametrize(
    "names, bases",
    [
        (["a.jpg", "b.png"], ["a", "b"]),  # the seed's names when nothing collides
        (["a.jpg", "a.png"], ["a.jpg", "a.png"]),  # same stem: full names
        (["a.pdf", "a.jpg"], ["a", "a"]),  # a_0.json vs a.json: no collision
        (["a.pdf", "a.tif"], ["a.pdf", "a.tif"]),  # both paged with one stem
        (["a.pdf", "a_1.png"], ["a.pdf", "a_1.png"]),  # a_1.json would be written twice
        (["a.pdf", "a_01.png"], ["a", "a_01"]),  # pages are a_1, never a_01
        (["a.pdf", "a_x.png"], ["a", "a_x"]),
        (["a_1.pdf", "a.pdf"], ["a_1", "a"]),  # a_1_0 vs a_0
        (["A.jpg", "a.jpg"], ["A", "a"]),
    ],
)
def test_output_bases(names, bases):
    assert infer_mp.output_bases(names) == bases


def test_pathological_names_still_unique():
    names = ["a.jpg", "a.png", "a.jpg.png"]  # full name of a.jpg equals the stem of a.jpg.png
    bases = infer_mp.output_bases(names)
    assert len(set(bases)) == 3
    assert infer_mp.output_bases(names) == bases  # deterministic


def test_tasks_mirror_folders_and_never_share_a_file(tmp_path):
    root = tmp_path / "in"
    rels = ["a.jpg", "a.png", "x/a.png", "y/a.png", "x/b.pdf", "x/b_0.jpg", "y/deep/c.tiff"]
    paths = [root / rel for rel in rels]
    tasks = infer_mp.plan_tasks(root, tmp_path / "out", paths)
    assert [t.rel for t in tasks] == rels
    produced = [t.output_path(None) for t in tasks if not t.path.endswith((".pdf", ".tiff"))]
    produced += [t.output_path(page) for t in tasks if t.path.endswith((".pdf", ".tiff")) for page in range(3)]
    assert len(produced) == len(set(produced))
    by_rel = {t.rel: t for t in tasks}
    assert by_rel["x/a.png"].output_path(None) == str(tmp_path / "out" / "x" / "a.json")
    assert by_rel["y/a.png"].output_path(None) == str(tmp_path / "out" / "y" / "a.json")
    assert by_rel["a.jpg"].output_path(None) == str(tmp_path / "out" / "a.jpg.json")
    assert by_rel["y/deep/c.tiff"].output_path(0) == str(tmp_path / "out" / "y" / "deep" / "c_0.json")


def test_a_worker_stages_every_file_and_leaves_nothing_when_saving_fails(tmp_path):
    """PaddleX's save_to_json needs a `.json` name; a writer's side files (markdown's images)
    are staged too, in a folder of the task's own; a failed save leaves nothing behind."""
    class Result(dict):
        def save_to_json(self, path):
            assert path.endswith(".json")
            Path(path).write_text("{}")

        def save_to_markdown(self, path):
            Path(path).write_text("# md")
            (Path(path).parent / "imgs").mkdir(exist_ok=True)
            (Path(path).parent / "imgs" / "fig.jpg").write_text("jpg")

    task = infer_mp.plan_tasks(tmp_path, tmp_path / "out", [str(tmp_path / "doc.pdf")])[0]
    staging = infer_mp.Staging(str(tmp_path / "staging"))
    results = [Result(page_index=0), Result(page_index=1)]
    folder, prefix, pages, extras = infer_mp.save_results(task, results, ("markdown",), staging)
    assert pages == ["doc_0.json", "doc_1.json"] and not prefix
    assert extras == {"doc_0.md": 0, "doc_1.md": 1, "imgs/fig.jpg": None}  # (a writer's own: pages may share it)
    files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    assert files == sorted([*pages, *extras])
    folder, prefix, pages, extras = infer_mp.save_results(task, results, (), staging)
    assert folder == str(tmp_path / "staging") and prefix and not extras
    assert sorted(p.name for p in Path(folder).iterdir() if p.is_file()) == [prefix + name for name in pages]

    class Broken(Result):
        def save_to_json(self, path):
            if path.endswith("_1.json"):
                raise OSError(28, "No space left on device")
            super().save_to_json(path)

    for formats in ((), ("markdown",)):
        with pytest.raises(OSError):
            infer_mp.save_results(task, [Broken(page_index=0), Broken(page_index=1)], formats, staging)
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == ["0", *(prefix + name for name in pages)]
