"""One measured process of examples/benchmark.py: the baselines that infer_mp.py is compared with.

    python examples/bench_worker.py bare OUT_DIR --threads 1 FILE...       # one pipeline, a plain loop
    python examples/bench_worker.py builtin OUT_DIR --threads 8 INPUT_DIR  # PaddleOCR's predict(dir)

Both use the same offline models as infer_mp.py's example pipelines (PP-OCRv4 mobile, or
PP-OCRv6_small with --pipeline v6) and write one JSON per page, so that every row of the benchmark does the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_ocr import OfflineOCR, OfflineOCRv6  # noqa: E402

PIPELINES = {"v4": OfflineOCR, "v6": OfflineOCRv6}


def save(result, out_dir: str) -> None:
    stem = Path(result["input_path"]).stem
    page = result.get("page_index")
    name = f"{stem}.json" if page is None else f"{stem}_{page}.json"
    result.save_to_json(os.path.join(out_dir, name))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["bare", "builtin"])
    parser.add_argument("out_dir")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", default="paddle_static")
    parser.add_argument("--engine_config", type=json.loads, default=None)
    parser.add_argument("--pipeline", choices=PIPELINES, default="v4", help="PP-OCRv4 mobile or PP-OCRv6_small")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    pipeline = PIPELINES[args.pipeline](device=args.device, cpu_threads=args.threads, engine=args.engine,
                                        engine_config=args.engine_config)
    if args.mode == "bare":
        for path in args.inputs:
            for result in pipeline.predict(os.path.abspath(path)):
                save(result, args.out_dir)
    else:  # PaddleOCR's own way: the whole folder in one call (its multi-device if several)
        for result in pipeline.predict(os.path.abspath(args.inputs[0])):
            save(result, args.out_dir)


if __name__ == "__main__":
    main()
