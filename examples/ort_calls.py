"""Where one OCR worker's time goes inside ONNX Runtime: every session.run() of the detector and
the recognizer timed, by input shape, beside each page's whole predict().

    python examples/ort_calls.py --device gpu:0 --pages 16                 # as an infer_mp.py worker
    python examples/ort_calls.py --device gpu:0 \
        --engine_config '{"provider_options": {"cudnn_conv_algo_search": "HEURISTIC"}}'   # PaddleX's own batches
    python examples/ort_calls.py --device cpu --model v4 --threads 2

The pipeline is built as an infer_mp.py worker builds it (infer_mp.create_pipeline: the planned
engine config, the recognizer patches), on the benchmark's dense pages of 20 lines with known
text, in this one process. `--padding` pads the recognizer's batches as a worker does for OpenVINO
(width steps) or for CUDA (one shape), also where it would not (options of your own). The first page's
calls include each model's first run; the figures count the pages after it. A recognizer call
on an input shape this process has not run before is "new", else "seen": their difference is
what a new shape costs (OpenVINO plans each one once). A call whose shape differs from the call
before it is "changed", else "same": their difference is what ONNX Runtime's CUDA provider
spends setting its convolutions up again (1.4-2.3 s a call for PP-OCRv6 on an H200).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from benchmark import word_recall, write_pages  # noqa: E402

import infer_mp  # noqa: E402

CLASSES = {"v4": "OfflineOCR", "v6": "OfflineOCRv6"}
PADDINGS = {"steps": infer_mp.WIDTH_STEPS, "one_shape": infer_mp.ONE_SHAPE}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or gpu:N (default cpu)")
    parser.add_argument("--model", choices=CLASSES, default="v6", help="PP-OCRv6_small (default) or PP-OCRv4 mobile")
    parser.add_argument("--pages", type=int, default=16, help="dense pages (default 16)")
    parser.add_argument("--threads", type=int, default=None,
                        help="the worker's CPU threads (default: the available cores, as for 1 instance)")
    parser.add_argument("--engine_config", type=json.loads, default=None, help="as infer_mp.py's --engine_config")
    parser.add_argument("--padding", choices=list(PADDINGS), default=None,
                        help="pad recognizer batches so (default: as a worker would)")
    parser.add_argument("--json", help="also write the figures, and each page's text, to this file")
    args = parser.parse_args(argv)
    if args.pages < 2:
        parser.error("--pages must be at least 2 (the first page is counted apart)")
    return args


class CallLog:
    """Wraps onnxruntime.InferenceSession.run: (model, input shape, seconds) for every call."""

    def __init__(self) -> None:
        import onnxruntime

        self.calls: list[tuple[str, tuple, float]] = []
        whole = onnxruntime.InferenceSession.run

        def run(session, output_names, feeds, *rest, **kwargs):
            started = time.perf_counter()
            try:
                return whole(session, output_names, feeds, *rest, **kwargs)
            finally:
                shape = tuple(next(iter(feeds.values())).shape) if feeds else ()
                self.calls.append((model_of(session), shape, time.perf_counter() - started))

        onnxruntime.InferenceSession.run = run


def model_of(session) -> str:
    path = str(getattr(session, "_model_path", ""))
    return "det" if "_det" in path else "rec" if "_rec" in path else Path(path).parent.name or "?"


def build(args: argparse.Namespace):
    threads = args.threads or infer_mp.available_cores()
    ref = infer_mp.PipelineRef(str(HERE / "offline_ocr.py"), CLASSES[args.model], is_file=True)
    init_kwargs = {"engine": "onnxruntime", **({"engine_config": args.engine_config} if args.engine_config else {})}
    pipeline = infer_mp.create_pipeline(ref, infer_mp.WorkerSpec(0, args.device, threads), init_kwargs)
    if args.padding:
        infer_mp.install_recognizer_speedups(PADDINGS[args.padding])
        if infer_mp.recognizer_padding_installed() != PADDINGS[args.padding]:
            raise SystemExit(f"ort_calls.py: --padding {args.padding}: the worker already pads in "
                             f"{infer_mp.recognizer_padding_installed()} here; give --engine_config with "
                             "provider_options of your own to leave the batches to --padding")
    return pipeline, infer_mp.describe_engine(init_kwargs), threads


def mean_ms(values: list[float]) -> str:
    return f"{1000 * statistics.mean(values):.1f}" if values else "-"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
    log = CallLog()
    started = time.perf_counter()
    pipeline, engine, threads = build(args)
    load_seconds = time.perf_counter() - started
    texts: dict[str, str] = {}
    pages = write_pages(Path(tempfile.mkdtemp(prefix="infer_mp-ort-calls-")), args.pages, mixed=False, texts=texts)
    seen: set[tuple] = set()
    last: tuple | None = None  # the previous recognizer call's input shape
    rows, recalls, read = [], [], {}
    for page in pages:
        first_call = len(log.calls)
        began = time.perf_counter()
        results = list(pipeline.predict(str(page)))
        whole = time.perf_counter() - began
        calls = log.calls[first_call:]
        new = [s for m, shape, s in calls if m == "rec" and shape not in seen]
        old = [s for m, shape, s in calls if m == "rec" and shape in seen]
        seen.update(shape for m, shape, _ in calls if m == "rec")
        changed, same = [], []
        for model, shape, seconds in calls:
            if model == "rec":
                (same if shape == last else changed).append(seconds)
                last = shape
        rows.append({"whole": whole, "det": sum(s for m, _, s in calls if m == "det"),
                     "rec": sum(s for m, _, s in calls if m == "rec"), "rec_new": new, "rec_seen": old,
                     "rec_changed": changed, "rec_same": same,
                     "rec_calls": sum(1 for m, _, _ in calls if m == "rec")})
        read[page.name] = [t for r in results for t in (r.get("rec_texts") or [])]
        recalls.append(word_recall(texts[page.name], read[page.name]) or 0.0)
    after = rows[1:]
    figures = {
        "device": args.device, "model": args.model, "engine": engine, "threads": threads,
        "padding": infer_mp.recognizer_padding_installed(), "pages": len(pages), "load_s": round(load_seconds, 2),
        "first_page_s": round(rows[0]["whole"], 3),
        "pages_per_s_after_first": round(len(after) / sum(r["whole"] for r in after), 3),
        "per_page_ms": {k: round(1000 * statistics.mean(r[k] for r in after), 1) for k in ("whole", "det", "rec")},
        "outside_ort_ms": round(1000 * statistics.mean(r["whole"] - r["det"] - r["rec"] for r in after), 1),
        "rec_calls_per_page": round(statistics.mean(r["rec_calls"] for r in after), 2),
        "rec_new_shape_calls": sum(len(r["rec_new"]) for r in after),
        "rec_new_ms": mean_ms([s for r in after for s in r["rec_new"]]),
        "rec_seen_ms": mean_ms([s for r in after for s in r["rec_seen"]]),
        "rec_shape_changes": sum(len(r["rec_changed"]) for r in after),
        "rec_changed_ms": mean_ms([s for r in after for s in r["rec_changed"]]),
        "rec_same_ms": mean_ms([s for r in after for s in r["rec_same"]]),
        "word_recall": round(statistics.mean(recalls), 4),
    }
    print(json.dumps(figures))
    if args.json:
        Path(args.json).write_text(json.dumps({**figures, "texts": read}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
