"""One peer of infer_mp.py, at its own defaults, for examples/benchmark.py: reads the given
pages in one process and writes one JSON per page ({"input_path", "rec_texts"}). Each peer runs
in its own virtual environment (their opencv-python or ONNX Runtime would replace PaddleX's):

    VENV/bin/python examples/bench_peer.py PEER OUT_DIR FILE...

PEER is one of PEERS below; examples/benchmark.py --peers makes the environments.
"""

import json
import os
import sys
from pathlib import Path


def rapidocr_1(files):
    """rapidocr-openvino 1.4 (PP-OCRv4 mobile), the peer of examples/benchmark.py --engines."""
    from rapidocr_openvino import RapidOCR

    engine = RapidOCR()
    for path in files:
        result, _ = engine(path)
        yield path, [line[1] for line in result or []]


def rapidocr_3(files, backend):
    """rapidocr 3.10 (PP-OCRv6_small detection and recognition, its defaults) on a backend."""
    from rapidocr import EngineType, RapidOCR

    engine_type = EngineType(backend)
    engine = RapidOCR(params={f"{part}.engine_type": engine_type for part in ("Det", "Cls", "Rec")})
    for path in files:
        yield path, list(engine(path).txts or ())


def faster_paddle(files, size, window=4):
    """faster-paddle 1.0 (Rust + ONNX Runtime) with the bundled model of this size, pages in
    windows of its default batch_size (its multi-image recognition scheduling)."""
    from faster_paddle import OcrEngine

    engine = OcrEngine(model_size=size)
    for start in range(0, len(files), window):
        batch = files[start:start + window]
        images = [Path(path).read_bytes() for path in batch]
        for path, result in zip(batch, engine.ocr_batch(images, batch_size=window)):
            lines = sorted(result["bounds"].items(), key=lambda item: int(item[0]))
            yield path, [bound["text"] for _, bound in lines]


PEERS = {
    "rapidocr-openvino-1.4": rapidocr_1,
    "rapidocr-3.10-openvino": lambda files: rapidocr_3(files, "openvino"),
    "rapidocr-3.10-onnxruntime": lambda files: rapidocr_3(files, "onnxruntime"),
    "faster-paddle-small": lambda files: faster_paddle(files, "small"),
    "faster-paddle-tiny": lambda files: faster_paddle(files, "tiny"),
}


def main() -> None:
    peer, out_dir, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(out_dir, exist_ok=True)
    for path, texts in PEERS[peer](files):
        with open(os.path.join(out_dir, Path(path).stem + ".json"), "w", encoding="utf-8") as handle:
            json.dump({"input_path": path, "rec_texts": texts}, handle, ensure_ascii=False)


if __name__ == "__main__":
    main()
