"""PaddleX's ONNX Runtime engine (with OpenVINO) on the same offline models: same text, planned
threads, and clear refusals before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import infer_mp
from conftest import OFFLINE_OCR, outputs, run_cli

pytest.importorskip("onnxruntime")
pytest.importorskip("rapidocr_onnxruntime", reason="pip install --no-deps -r examples/requirements-models.txt")


def texts(out: Path) -> dict[str, list[str]]:
    return {name: result["rec_texts"] for name, result in outputs(out).items()}


def run_engine(src: Path, out: Path, *engine: str):
    return run_cli("--pipeline", OFFLINE_OCR, "--input_dir", str(src), "--device", "cpu", "--output_dir", str(out),
                   "--instances_per_device", "2", *engine)


def test_onnxruntime_text_equals_the_paddle_engine(tmp_path):
    from samples import write_samples

    src = tmp_path / "in"
    write_samples(src)
    runs = {
        "paddle": run_engine(src, tmp_path / "paddle"),
        "ort": run_engine(src, tmp_path / "ort", "--engine", "onnxruntime"),
    }
    import onnxruntime

    if "OpenVINOExecutionProvider" in onnxruntime.get_available_providers():
        runs["openvino"] = run_engine(src, tmp_path / "openvino", "--engine", "onnxruntime", "--engine_config",
                                      json.dumps({"providers": ["OpenVINOExecutionProvider"]}))
    for name, run in runs.items():
        assert run.code == 0, (name, run.stderr)
    assert "engine: onnxruntime (CPUExecutionProvider)" in runs["ort"].stderr
    reference = texts(tmp_path / "paddle")
    assert len(reference) == 4
    for name in runs:
        assert texts(tmp_path / name) == reference, name
    if "openvino" in runs:
        assert "engine: onnxruntime (OpenVINOExecutionProvider" in runs["openvino"].stderr


def test_missing_provider_is_refused_before_workers_start(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"x")
    run = run_engine(src, tmp_path / "out", "--engine", "onnxruntime", "--engine_config",
                     '{"providers": ["TensorrtExecutionProvider"]}')
    assert run.code == 2 and "TensorrtExecutionProvider not available" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def config(**pipeline_kwargs) -> infer_mp.Config:
    return infer_mp.Config(pipeline="P", input_dir=Path("."), output_dir=Path("out"), device="cpu",
                           instances_per_device=1, batch_size=1, input_glob_patterns=("*",), cpu_threads=None,
                           run_log=Path("log"), lock_file=Path("lock"), pipeline_kwargs=pipeline_kwargs)


def test_two_onnxruntime_builds_are_refused(monkeypatch):
    versions = {"onnxruntime": "1.32.0", "onnxruntime-openvino": "1.24.1"}
    monkeypatch.setattr(infer_mp, "installed_version", versions.get)
    with pytest.raises(infer_mp.UsageError, match="share the module onnxruntime"):
        infer_mp.check_engine(config(engine="onnxruntime"), "cpu")


def test_no_onnxruntime_is_refused(monkeypatch):
    monkeypatch.setattr(infer_mp, "installed_version", lambda name: None)
    with pytest.raises(infer_mp.UsageError, match="requirements-onnx.txt"):
        infer_mp.check_engine(config(engine="onnxruntime"), "cpu")


class Takes:
    def __init__(self, device=None, cpu_threads=None, engine=None, engine_config=None):
        pass


def test_threads_are_planned_for_onnxruntime():
    spec = infer_mp.WorkerSpec(0, "cpu", 3)
    assert infer_mp.planned_engine_config(Takes, spec, {"engine": "onnxruntime"}) == {"intra_op_num_threads": 3}
    openvino = {"engine": "onnxruntime", "engine_config": {"providers": ["OpenVINOExecutionProvider"]}}
    assert infer_mp.planned_engine_config(Takes, spec, openvino) == {
        "providers": ["OpenVINOExecutionProvider"], "intra_op_num_threads": 3,
        "provider_options": {"num_of_threads": 3, "load_config": json.dumps(infer_mp.OPENVINO_CPU_CONFIG)}}
    mine = {"engine": "onnxruntime", "engine_config": {"intra_op_num_threads": 1}}
    assert infer_mp.planned_engine_config(Takes, spec, mine) == {"intra_op_num_threads": 1}
    assert infer_mp.planned_engine_config(Takes, spec, {"engine": "paddle"}) is None
