"""Page quality on real degradations: what the run log's figures say of clean and spoiled pages.

    python examples/quality.py                    # 8 clean pages and their degradations, Paddle engine
    python examples/quality.py --pages 4 --extra --engine onnxruntime
    python examples/quality.py --pages 4 --cascade --extra --engine onnxruntime

Renders dense pages of 20 lines of known text (seeded), then the same pages blurred (2 and 4 px),
at 8% contrast, with light and heavy noise, rotated 90 and 180 degrees, plus blank pages and pages of random
static; runs infer_mp.py over them once with the offline PP-OCRv4 models (examples/offline_ocr.py)
and reports, per kind of page, the mean recognition scores the run log records, the word recall
against the known text, and how many pages each threshold of `--min_page_score` flags. The goal
of a threshold: every rotated or unreadable page flagged, no clean page flagged, blank pages
reported blank and never weak.

With --cascade it measures a second pass for the weak pages only, on the same pages: the fast
setting alone (OfflineOCR), the strong one on every page (UprightOCR: each page read four ways
round, the best reading kept), and the cascade (the fast setting with --min_page_score, then
--retry_failed with the strong one, which replaces a weak reading only when it reads better):
whole runs' time, word recall, pages still weak.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchmark import WORDS, word_recall  # noqa: E402

from samples import render_page  # noqa: E402

PIPELINE = f"{HERE / 'offline_ocr.py'}:OfflineOCR"
STRONG = f"{HERE / 'offline_ocr.py'}:UprightOCR"  # reads each page four ways round
CASCADE_GATE = "0.95"  # --min_page_score of the cascade's first pass: the README's recommendation
THRESHOLDS = (0.8, 0.85, 0.9, 0.95, 0.97, 0.98)
READ_WELL = 0.9  # a page whose word recall is at least this was read well; under it, it should be flagged


def degrade(kind: str, page):
    """The page as a scanner might spoil it."""
    from PIL import Image, ImageFilter

    if kind.startswith("blur"):
        return page.filter(ImageFilter.GaussianBlur(int(kind.split()[1])))
    if kind == "low contrast 8%":
        gray = page.convert("L")
        return gray.point(lambda value: 255 - round((255 - value) * 0.08)).convert("RGB")
    if kind.startswith("noise"):
        rng = random.Random(11)
        noisy = page.convert("L")
        pixels = noisy.load()
        for _ in range(noisy.width * noisy.height // (6 if kind == "noise, heavy" else 40)):
            x, y = rng.randrange(noisy.width), rng.randrange(noisy.height)
            pixels[x, y] = rng.choice((0, 255))
        return noisy.convert("RGB")
    if kind == "rotated 90":
        return page.rotate(90, expand=True, fillcolor="white")
    if kind == "rotated 180":
        return page.rotate(180, fillcolor="white")
    if kind == "blank":
        return Image.new("RGB", page.size, "white")
    if kind == "static":
        rng = random.Random(13)
        return Image.frombytes("L", page.size, bytes(rng.getrandbits(8) for _ in range(page.width * page.height))
                               ).convert("RGB")
    return page


KINDS = ("clean", "blur 2 px", "blur 4 px", "low contrast 8%", "noise, light", "noise, heavy", "rotated 90",
         "rotated 180", "blank", "static")


def write_set(folder: Path, pages: int, clean: int = 0) -> dict[str, tuple[str, str]]:
    """file name -> (kind, known text): `pages` clean pages each also spoiled every way, and
    `clean` more clean pages."""
    rng = random.Random(7)
    truth = {}
    for i in range(pages + clean):
        text = [" ".join(rng.choice(WORDS) for _ in range(5)) + f" {rng.randint(10, 9999)}" for _ in range(20)]
        page = render_page(text)
        for k, kind in enumerate(KINDS if i < pages else KINDS[:1]):
            name = f"p{i:02d}-{k}.png"
            degrade(kind, page).save(folder / name)
            truth[name] = (kind, "" if kind in ("blank", "static") else " ".join(text))
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8, help="clean pages (each also degraded 9 ways; default 8)")
    parser.add_argument("--work_dir", help="where pages and outputs go (default: a new temporary folder)")
    parser.add_argument("--cascade", action="store_true", help="measure fast, strong and fast-then-strong-on-weak")
    parser.add_argument("--pipeline", default=PIPELINE, help="the pipeline measured (default: OfflineOCR, PP-OCRv4)")
    parser.add_argument("--clean", type=int, default=0, help="more clean pages, for a mix nearer a real batch's")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more infer_mp.py flags, last")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="infer_mp-quality-"))
    pages, out = work / "pages", work / "out"
    pages.mkdir(parents=True, exist_ok=True)
    truth = write_set(pages, args.pages, args.clean)
    if args.cascade:
        return cascade(pages, work, truth, args.extra)
    print(f"running {len(truth)} pages with {args.pipeline} {' '.join(args.extra)}", file=sys.stderr)
    seconds = infer(pages, out, args.pipeline, "--overwrite", *args.extra)
    records = {}
    for line in (out / "infer_mp.runlog.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("status") == "done":
            records[Path(record["input"]).name] = record
    by_kind: dict[str, list[tuple[dict, float | None]]] = defaultdict(list)
    for name, (kind, known) in truth.items():
        figure = records[name].get("quality") or {}
        read = json.loads((out / name.replace(".png", ".json")).read_text()).get("rec_texts", [])
        by_kind[kind].append((figure, word_recall(known, read)))
    print(f"\n{len(truth)} pages ({args.pages} clean pages and each degraded 9 ways, {args.clean} more clean), "
          f"{args.pipeline.rpartition(':')[2]}, flags: {' '.join(args.extra) or '(Paddle engine)'}; whole run "
          f"{seconds:.1f} s\n")
    print("| page | mean score (min-max) | word recall | blank | flagged weak at " +
          " | ".join(f"{t:g}" for t in THRESHOLDS) + " |")
    print("| --- " * (4 + len(THRESHOLDS)) + "|")
    for kind in KINDS:
        rows = by_kind[kind]
        scores = [f["score"] for f, _ in rows if f.get("lines")]
        recalls = [r for _, r in rows if r is not None]
        span = f"{min(scores):.3f}-{max(scores):.3f}" if scores else "no text"
        recall = f"{sum(recalls) / len(recalls):.3f}" if recalls else "-"
        blank = sum(bool(f.get("blank")) for f, _ in rows)
        flagged = [sum(weak(f, t) for f, _ in rows) for t in THRESHOLDS]
        print(f"| {kind} | {span} | {recall} | {blank}/{len(rows)} | " + " | ".join(f"{n}/{len(rows)}" for n in flagged)
              + " |")
    pages = [(figure, recall) for rows in by_kind.values() for figure, recall in rows if not figure.get("blank")]
    bad = [figure for figure, recall in pages if recall is None or recall < READ_WELL]
    good = [figure for figure, recall in pages if recall is not None and recall >= READ_WELL]
    blank = sum(bool(figure.get("blank")) for rows in by_kind.values() for figure, _ in rows)
    print(f"\nRead well: word recall at least {READ_WELL:g} ({len(good)} pages); read badly: under it, or no known "
          f"text (static) ({len(bad)} pages); blank pages apart ({blank}, never weak).\n")
    print("| --min_page_score | read badly, flagged | read well, flagged |\n| --- | --- | --- |")
    for threshold in THRESHOLDS:
        print(f"| {threshold:g} | {sum(weak(f, threshold) for f in bad)}/{len(bad)} | "
              f"{sum(weak(f, threshold) for f in good)}/{len(good)} |")


def infer(pages: Path, out: Path, pipeline: str, *flags: str) -> float:
    """One whole run of infer_mp.py (workers' start included): its seconds."""
    command = [sys.executable, str(HERE.parent / "infer_mp.py"), "--pipeline", pipeline, "--input_dir", str(pages),
               "--device", "cpu", "--instances_per_device", "2", "--output_dir", str(out), *flags]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.exit(f"infer_mp.py exited {done.returncode}:\n{done.stderr}")
    return seconds


def outcome(out: Path, truth: dict[str, tuple[str, str]]) -> tuple[float, int, int]:
    """(mean word recall over the pages with known text, pages still weak at CASCADE_GATE,
    weak readings a second pass replaced) of an output folder."""
    recalls = []
    for name, (_, known) in truth.items():
        content = json.loads((out / name.replace(".png", ".json")).read_text())
        if (recall := word_recall(known, content.get("rec_texts", []))) is not None:
            recalls.append(recall)
    latest = {}
    for line in (out / "infer_mp.runlog.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("status") in ("done", "failed"):
            latest[record["input"]] = record.get("quality") or {}
    weak_pages = sum(weak(figure, float(CASCADE_GATE)) for figure in latest.values())
    return sum(recalls) / len(recalls), weak_pages, sum("pass" in figure for figure in latest.values())


def cascade(pages: Path, work: Path, truth: dict[str, tuple[str, str]], extra: list[str]) -> None:
    """The fast setting alone, the strong one alone, and the cascade, on the same pages."""
    rows = []
    gate = ("--min_page_score", CASCADE_GATE)
    for label, passes in (("fast alone (OfflineOCR)", [(PIPELINE, gate)]),
                          ("strong alone (UprightOCR)", [(STRONG, gate)]),
                          ("cascade: fast, then strong on the weak pages", [(PIPELINE, gate),
                                                                             (STRONG, (*gate, "--retry_failed"))])):
        out = work / "cascade"
        shutil.rmtree(out, ignore_errors=True)
        seconds = [infer(pages, out, pipeline, *flags, *extra) for pipeline, flags in passes]
        recall, weak_left, second = outcome(out, truth)
        rows.append((label, seconds, recall, weak_left, second))
        print(f"{label}: {sum(seconds):.1f} s", file=sys.stderr)
    clean = sum(kind == "clean" for kind, _ in truth.values())
    print(f"\n{len(truth)} pages ({clean} clean, {len(truth) - clean} spoiled 9 ways), flags: "
          f"{' '.join(extra) or '(Paddle engine)'}; whole runs, 2 workers\n")
    print("| setting | seconds (per pass) | word recall | weak pages left | weak readings replaced by a second pass |")
    print("| --- | --- | --- | --- | --- |")
    for label, seconds, recall, weak_left, second in rows:
        per_pass = " + ".join(f"{s:.1f}" for s in seconds)
        print(f"| {label} | {sum(seconds):.1f}" + (f" ({per_pass})" if len(seconds) > 1 else "")
              + f" | {recall:.4f} | {weak_left} | {second} |")


def weak(figure: dict, threshold: float) -> bool:
    """As infer_mp.py's weak_reason: a low mean score, or no text on a page that is not blank."""
    if not figure or figure.get("blank"):
        return False
    return figure["lines"] == 0 or figure["score"] < threshold


if __name__ == "__main__":
    main()
