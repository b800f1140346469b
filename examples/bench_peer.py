"""The CPU peer a user picks instead of PaddleOCR, for examples/benchmark.py --engines:
rapidocr-openvino on the same pages, one JSON per page. Runs in its own virtual environment
(its opencv-python would replace PaddleX's opencv-contrib-python):

    VENV/bin/python examples/bench_peer.py OUT_DIR FILE...
"""

import json
import os
import sys
from pathlib import Path

from rapidocr_openvino import RapidOCR


def main() -> None:
    out_dir, files = sys.argv[1], sys.argv[2:]
    os.makedirs(out_dir, exist_ok=True)
    engine = RapidOCR()
    for path in files:
        result, _ = engine(path)
        texts = [line[1] for line in result or []]
        with open(os.path.join(out_dir, Path(path).stem + ".json"), "w", encoding="utf-8") as handle:
            json.dump({"input_path": path, "rec_texts": texts}, handle, ensure_ascii=False)


if __name__ == "__main__":
    main()
