"""Pages with known text, for the bundled example and the tests.

``python examples/samples.py DIR`` writes two images and a two-page PDF into DIR, plus
``truth.json``: each output JSON name (as infer_mp.py names it) with the lines on that page.
The font is the one Pillow bundles, so the pages are the same on every machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 28
LINE_HEIGHT = 52
MARGIN = 40
PAGE_WIDTH = 760

SAMPLE_PAGES: dict[str, list[list[str]]] = {
    "invoice.png": [["INVOICE 2041", "Harbor Supply Company", "Total due 318.40 EUR"]],
    "letter.jpg": [["Dear Customer", "Your order ships on Monday", "Thank you"]],
    "report.pdf": [
        ["Quarterly Report", "Revenue grew 12 percent"],
        ["Page Two", "Costs fell in March"],
    ],
}


def render_page(lines: list[str]) -> Image.Image:
    """Black text on white, one line per row: easy for OCR, small enough for fast tests."""
    font = ImageFont.load_default(size=FONT_SIZE)
    image = Image.new("RGB", (PAGE_WIDTH, 2 * MARGIN + LINE_HEIGHT * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + row * LINE_HEIGHT), line, fill="black", font=font)
    return image


def write_document(path: Path, pages: list[list[str]]) -> None:
    """An image file for one page; a multi-page PDF (rendered images) for several."""
    images = [render_page(lines) for lines in pages]
    if path.suffix.lower() == ".pdf":
        images[0].save(path, save_all=True, append_images=images[1:], resolution=150)
    else:
        images[0].save(path)


def expected_outputs(name: str, pages: list[list[str]]) -> dict[str, list[str]]:
    """Output JSON name -> lines, following infer_mp.py's naming (pages of a PDF get `_N`)."""
    stem = Path(name).stem
    if Path(name).suffix.lower() == ".pdf":
        return {f"{stem}_{index}.json": lines for index, lines in enumerate(pages)}
    return {f"{stem}.json": pages[0]}


def write_samples(directory: Path) -> dict[str, list[str]]:
    directory.mkdir(parents=True, exist_ok=True)
    truth: dict[str, list[str]] = {}
    for name, pages in SAMPLE_PAGES.items():
        write_document(directory / name, pages)
        truth.update(expected_outputs(name, pages))
    return truth


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "inputs")
    truth = write_samples(target)
    (target.parent / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    print(f"wrote {len(SAMPLE_PAGES)} documents ({len(truth)} pages) to {target}")
