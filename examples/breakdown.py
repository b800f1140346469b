"""Where the time of one infer_mp.py run goes, stage by stage, on the benchmark's dense pages.

    python examples/breakdown.py [--pages 8] [--threads 2]

In one process: imports, model load, then for each page the whole OCR predict (decode,
detection, crops, recognition) and JSON writing; then, apart, decode (OpenCV) and the detector
alone on the same page, so that recognition is the whole predict less those two. Then whole
infer_mp.py runs (1 instance, same threads) against whole bare-loop processes, interleaved:
the difference is the coordinator (imports and checks, spawning, dispatch, IPC, run log).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--engine", default="paddle_static", choices=["paddle_static", "onnxruntime"])
    parser.add_argument("--engine_config", type=json.loads, default=None,
                        help='e.g. \'{"providers": ["OpenVINOExecutionProvider"]}\'')
    args = parser.parse_args()
    from benchmark import write_pages

    work = Path(tempfile.mkdtemp(prefix="infer_mp-breakdown-"))
    pages = write_pages(work / "pages", args.pages, mixed=False)
    stages: dict[str, float] = {}

    started = time.perf_counter()
    import cv2

    from offline_ocr import OfflineOCR
    stages["start-up and imports (paddle, paddlex, paddleocr)"] = time.perf_counter() - started

    # The engine settings an infer_mp.py worker would use (its thread plan and, for OpenVINO,
    # its provider options), so that the stages and the bare loop measure the same thing.
    sys.path.insert(0, str(HERE.parent))
    import infer_mp

    given = {"engine": args.engine, **({"engine_config": args.engine_config} if args.engine_config else {})}
    engine_config = infer_mp.planned_engine_config(OfflineOCR, infer_mp.WorkerSpec(0, "cpu", args.threads), given)
    engine_config = engine_config or args.engine_config
    started = time.perf_counter()
    pipeline = OfflineOCR(device="cpu", cpu_threads=args.threads, engine=args.engine, engine_config=engine_config)
    stages["model load (detector + recognizer)"] = time.perf_counter() - started

    detector = pipeline.paddlex_pipeline.text_det_model
    decode = detect = whole = write = 0.0
    out = work / "out"
    out.mkdir()
    for page in pages:  # the whole predict() first, cold as in a run; then its parts again
        t0 = time.perf_counter()
        [result] = pipeline.predict(str(page))
        t1 = time.perf_counter()
        result.save_to_json(str(out / f"{page.stem}.json"))
        t2 = time.perf_counter()
        image = cv2.imread(str(page))
        t3 = time.perf_counter()
        list(detector(image))
        t4 = time.perf_counter()
        whole, write, decode, detect = whole + t1 - t0, write + t2 - t1, decode + t3 - t2, detect + t4 - t3
    stages["decode (OpenCV imread)"] = decode
    stages["text detection"] = detect
    stages["text recognition and the rest of predict()"] = whole - detect - decode
    stages["JSON writing"] = write
    in_process = sum(stages.values())  # decode + detection + recognition = the whole predict()

    # The coordinator's share: whole infer_mp.py runs against whole bare-loop processes with
    # the same pipeline and threads, interleaved, medians of 3.
    bare = [sys.executable, str(HERE / "bench_worker.py"), "bare", str(work / "bare-out"),
            *map(str, pages), "--threads", str(args.threads), "--engine", args.engine]
    if engine_config:
        bare += ["--engine_config", json.dumps(engine_config)]
    infer = [sys.executable, str(HERE.parent / "infer_mp.py"), "--pipeline", f"{HERE / 'offline_ocr.py'}:OfflineOCR",
             "--input_dir", str(work / "pages"), "--device", "cpu", "--cpu_threads", str(args.threads),
             "--output_dir", str(work / "infer_mp-out"), "--overwrite", "--engine", args.engine]
    if args.engine_config:
        infer += ["--engine_config", json.dumps(args.engine_config)]
    times: dict[str, list[float]] = {"bare": [], "infer": []}
    for _ in range(3):
        for name, command in (("bare", bare), ("infer", infer)):
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - started)
    bare_run, infer_run = statistics.median(times["bare"]), statistics.median(times["infer"])

    print(f"{len(pages)} dense pages, 1 instance x {args.threads} thread(s), engine {args.engine} "
          f"{json.dumps(args.engine_config) if args.engine_config else ''}\n")
    print("| stage (one process, in order) | seconds | share |\n| --- | --- | --- |")
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds:.2f} | {100 * seconds / in_process:.0f}% |")
    print(f"\ncoordinator, spawn, dispatch, IPC and run log: infer_mp.py whole run {infer_run:.1f} s vs the "
          f"bare loop {bare_run:.1f} s (medians of 3, interleaved): {infer_run - bare_run:+.1f} s")


if __name__ == "__main__":
    main()
