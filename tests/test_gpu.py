"""GPUs without Paddle (ONNX Runtime's CUDA provider), on a machine with no GPU: devices counted
with the CUDA driver, one-line refusals, no silent fallback to the CPU, planned GPU settings that
PaddleX really forwards, and the GPU benchmark's refusal and planning. Fakes stand in for the
driver, ONNX Runtime's sessions and the GPU, so these run the same on any machine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest

import infer_mp
from conftest import FAKE, ROOT, fake_onnxruntime, fake_paddle, make_config, run_cli, write

CUDA, CPU, TENSORRT = "CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"


def config(**overrides) -> infer_mp.Config:
    return make_config(**{"device": "gpu:0", **overrides})


ORT = {"engine": "onnxruntime"}


@pytest.fixture
def no_paddle(monkeypatch):
    """`import paddle` fails, as where only requirements-gpu-onnx.txt is installed."""

    def refuse():
        raise ImportError("No module named 'paddle'")

    monkeypatch.setattr(infer_mp, "import_paddle_quietly", refuse)


def driver_sees(monkeypatch, count: int | None, why: str = "", problem: str | None = None) -> None:
    monkeypatch.setattr(infer_mp, "cuda_driver_devices", lambda: (count, why))
    monkeypatch.setattr(infer_mp, "cuda_driver_too_old", lambda: None)
    monkeypatch.setattr(infer_mp, "cuda_provider_problem", lambda device_id=0, notice=None: problem)


# -- 2. device presence without Paddle ---------------------------------------------------------


def test_paddle_engine_on_a_gpu_without_paddle_names_both_fixes(tmp_path):
    """The default engine is Paddle's: with `import paddle` failing, one line and exit 2 that
    names Paddle's GPU build and the ONNX Runtime route, before any page (it was a traceback)."""
    write(tmp_path / "nopaddle" / "paddle" / "__init__.py", "raise ImportError(\"No module named 'paddle'\")\n")
    write(tmp_path / "in" / "a.png")
    path = os.pathsep.join(filter(None, [str(tmp_path / "nopaddle"), os.environ.get("PYTHONPATH")]))
    run = run_cli("--pipeline", FAKE, "--input_dir", str(tmp_path / "in"), "--device", "gpu:0",
                  "--output_dir", str(tmp_path / "out"), env={"PYTHONPATH": path})
    assert run.code == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer_mp.py: error:"), run.stderr
    for fragment in ("paddle cannot be imported", "'GPU install'", "--engine onnxruntime", "requirements-gpu-onnx.txt"):
        assert fragment in lines[0]
    assert not (tmp_path / "out").exists()


def test_onnxruntime_gpus_are_counted_by_the_driver_not_paddle(monkeypatch, no_paddle):
    driver_sees(monkeypatch, 2)
    monkeypatch.setattr(infer_mp, "available_cores", lambda: 16)
    plan = infer_mp.plan_workers(config(device="gpu:0,1", instances_per_device=4, pipeline_kwargs=ORT))
    assert [s.device for s in plan] == ["gpu:0"] * 4 + ["gpu:1"] * 4
    assert {s.cpu_threads for s in plan} == {2}  # 16 cores over the 8 instances on this machine


@pytest.mark.parametrize("count, why, device, fragments", [
    (None, "no NVIDIA driver found (libcuda.so.1: cannot open shared object file)", "gpu:0",
     ["asks for a GPU", "no NVIDIA driver found", "--device cpu"]),
    (0, "", "gpu", ["gpu:0",
                    "only 0 gpu device(s) are visible to the NVIDIA driver (none; check CUDA_VISIBLE_DEVICES)"]),
    (1, "", "gpu:0,1", ["gpu:1", "only 1 gpu device(s) are visible to the NVIDIA driver (ids 0..0"]),
])
def test_absent_gpu_without_paddle_is_one_usage_error(monkeypatch, no_paddle, count, why, device, fragments):
    driver_sees(monkeypatch, count, why)
    with pytest.raises(infer_mp.UsageError) as refused:
        infer_mp.plan_workers(config(device=device, pipeline_kwargs=ORT))
    for fragment in fragments:
        assert fragment in str(refused.value)


def test_a_cuda_provider_that_cannot_load_is_refused_at_planning(monkeypatch, no_paddle):
    driver_sees(monkeypatch, 1, problem="ONNX Runtime's CUDA provider cannot load here (libcudnn.so.9: ...)")
    with pytest.raises(infer_mp.UsageError, match="libcudnn.so.9"):
        infer_mp.plan_workers(config(pipeline_kwargs=ORT))


def test_onnxruntime_runs_on_cpu_or_gpu_only(monkeypatch, no_paddle):
    with pytest.raises(infer_mp.UsageError, match="runs on cpu or gpu, not 'xpu'"):
        infer_mp.plan_workers(config(device="xpu:0", pipeline_kwargs=ORT))


class FakeDriver:
    """libcuda's entry points as ctypes calls them: status codes, counts written through byref."""

    def __init__(self, init: int, count: int = 0):
        self.init, self.count = init, count

    def cuInit(self, flags):
        return self.init

    def cuDeviceGetCount(self, count):
        count._obj.value = self.count
        return 0

    def cuGetErrorName(self, status, name):
        name._obj.value = b"CUDA_ERROR_INSUFFICIENT_DRIVER"
        return 0

    def cuDriverGetVersion(self, version):
        version._obj.value = 12040
        return 0


@pytest.mark.parametrize("driver, expected", [
    (FakeDriver(0, 3), (3, "")),
    (FakeDriver(100), (0, "")),  # CUDA_ERROR_NO_DEVICE: CUDA_VISIBLE_DEVICES=-1, or no GPU
    (FakeDriver(35), (None, "the NVIDIA driver could not start (CUDA_ERROR_INSUFFICIENT_DRIVER, 35)")),
])
def test_driver_answers(monkeypatch, driver, expected):
    monkeypatch.setattr(infer_mp, "load_cuda_driver", lambda: (driver, ""))
    assert infer_mp.cuda_driver_devices() == expected


def test_no_driver_library(monkeypatch):
    monkeypatch.setattr(infer_mp, "CUDA_DRIVER_LIBRARIES", ("libcuda-absent-for-this-test.so.1",))
    count, why = infer_mp.cuda_driver_devices()
    assert count is None and why.startswith("no NVIDIA driver found (libcuda-absent-for-this-test.so.1")


def test_a_driver_older_than_the_build_is_refused(monkeypatch, tmp_path):
    """A CUDA 12 driver under onnxruntime-gpu built for CUDA 13: every session would fall back."""
    monkeypatch.setattr(infer_mp, "load_cuda_driver", lambda: (FakeDriver(0, 1), ""))
    assert infer_mp.cuda_driver_version() == (12, 4)
    monkeypatch.setattr(infer_mp, "onnxruntime_folder", lambda: tmp_path)
    assert infer_mp.cuda_driver_too_old() is None  # no CUDA provider here: check_engine says so
    write(tmp_path / "capi" / "libonnxruntime_providers_cuda.so", b"")
    write(tmp_path / "capi" / "build_and_package_info.py", "package_name = 'onnxruntime-gpu'\ncuda_version = '13.0'\n")
    refusal = infer_mp.cuda_driver_too_old()
    assert "runs CUDA up to 12.4, but the installed onnxruntime-gpu is built for CUDA 13.0" in refusal
    monkeypatch.setattr(infer_mp, "cuda_driver_version", lambda: (13, 1))
    assert infer_mp.cuda_driver_too_old() is None


FAKE_ONNXRUNTIME = """
import os, sys
MODE = os.environ["FAKE_ORT_MODE"]
LOAD_ERROR = ("\\x1b[1;31m2026-12-04 12:35:37 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
              "Failed to load library /My Projects/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: "
              "cannot open "
              "shared object file: No such file or directory\\n\\x1b[m")


class InferenceSession:
    def __init__(self, model, providers):
        (name, options), = providers
        with open(os.environ["FAKE_ORT_SEEN"], "w") as seen:
            seen.write(f"{name} {options['device_id']} {len(model)}")
        if MODE == "missing":
            print(LOAD_ERROR, file=sys.stderr)
        self.providers = ["CPUExecutionProvider"] if MODE in ("missing", "silent") else [name, "CPUExecutionProvider"]

    def get_providers(self):
        return self.providers

    def run(self, names, feeds):
        if MODE == "no_cudnn":
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : cuDNN is not available. Install cuDNN, update the "
                               "system library search path, or set enable_cudnn=0")
        if MODE == "crash":
            os.abort()
        if MODE == "slow_with_a_child":  # a process it started holds its pipes after it is killed
            import subprocess
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(25)"])
        if MODE.startswith("slow"):
            import time
            with open(os.environ["FAKE_ORT_SEEN"] + ".pid", "w") as pid:
                pid.write(str(os.getpid()))
            time.sleep(60)
        if MODE == "oom":
            raise RuntimeError("CUDA failure 2: out of memory" + " (details)" * 100)
        if MODE == "noisy":
            import atexit
            atexit.register(print, "goodbye from sitecustomize")
        return [feeds["x"]]
"""


@pytest.mark.parametrize("mode, said", [
    ("works", None),
    ("missing", "(libcublasLt.so.13: cannot open shared object file: No such file or directory)"),
    ("no_cudnn", "(RuntimeError: [ONNXRuntimeError] : 1 : FAIL : cuDNN is not available. Install cuDNN, update the "
                 "system library search path, or set enable_cudnn=0)"),
    ("silent", "(ONNX Runtime ran the check on the CPU, without saying why)"),
    ("crash", "could not run a test convolution on gpu:3 (the check's process ended by signal 6)"),
    ("oom", "could not run a test convolution on gpu:3 (RuntimeError: CUDA failure 2: out of memory (details)"),
    ("noisy", None),
])
def test_the_cuda_provider_is_checked_by_onnx_runtime_in_a_process_of_its_own(monkeypatch, tmp_path, mode, said):
    """The check loaded the provider's library into the coordinator with ctypes: outside ONNX
    Runtime its initializers crash the process (SIGSEGV on an H200, before any page). ONNX
    Runtime itself, in a child process, loads it and runs a convolution (cuDNN, which the
    library does not link, is loaded then); its words name what is missing."""
    write(tmp_path / "capi" / infer_mp.CUDA_PROVIDER_LIBRARY, b"not a shared library")
    write(tmp_path / "capi" / "build_and_package_info.py", "package_name = 'onnxruntime-gpu'\ncuda_version = '13.0'\n")
    write(tmp_path / "fake" / "onnxruntime" / "__init__.py", FAKE_ONNXRUNTIME)
    monkeypatch.setattr(infer_mp, "onnxruntime_folder", lambda: tmp_path)
    monkeypatch.setattr(infer_mp, "onnxruntime_providers", lambda: [CUDA, CPU])
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))  # (the child gets this process's sys.path, as a worker)
    monkeypatch.setenv("FAKE_ORT_MODE", mode)
    monkeypatch.setenv("FAKE_ORT_SEEN", str(tmp_path / "seen"))
    problem = infer_mp.cuda_provider_problem(3)
    assert (tmp_path / "seen").read_text() == "CUDAExecutionProvider 3 108"  # on gpu:3, the one-convolution model
    if said is None:
        assert problem is None
    elif said.startswith("could not run"):
        assert problem.startswith(f"ONNX Runtime's CUDA provider {said}") and len(problem) < 500, problem
        assert problem.endswith("); README, 'GPU from PyPI'; or use --device cpu")
    else:
        assert problem == (f"ONNX Runtime's CUDA provider cannot load here {said}: it needs the CUDA 13.0 and cuDNN "
                           "libraries it was built for, where the dynamic loader finds them (a CUDA toolkit and "
                           "cuDNN install, or LD_LIBRARY_PATH; README, 'GPU from PyPI'); or use --device cpu")
    monkeypatch.setattr(infer_mp, "onnxruntime_providers", lambda: [CPU])  # (another build over onnxruntime-gpu)
    assert infer_mp.cuda_provider_problem(3) is None  # check_engine names the mix


@pytest.mark.parametrize("mode", ["slow", "slow_with_a_child", "slow_unkillable"])
def test_a_slow_cuda_check_says_what_the_run_waits_for_and_ends(monkeypatch, tmp_path, mode):
    """A check that hangs (a driver stuck in a CUDA start) held the run for two minutes without
    a word. Past CUDA_PROBE_NOTICE_SECONDS the run says what it waits for; at CUDA_PROBE_TIMEOUT
    the check's process is killed and the run goes on (the workers still refuse a fallback),
    even where the kill does not take (a process stuck in a driver's call dies when it returns)."""
    if mode == "slow_unkillable":
        monkeypatch.setattr(subprocess.Popen, "kill", lambda self: None)
        monkeypatch.setattr(infer_mp, "CUDA_PROBE_REAP_SECONDS", 0.5, raising=False)
    write(tmp_path / "capi" / infer_mp.CUDA_PROVIDER_LIBRARY, b"not a shared library")
    write(tmp_path / "fake" / "onnxruntime" / "__init__.py", FAKE_ONNXRUNTIME)
    monkeypatch.setattr(infer_mp, "onnxruntime_folder", lambda: tmp_path)
    monkeypatch.setattr(infer_mp, "onnxruntime_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(infer_mp, "CUDA_PROBE_NOTICE_SECONDS", 1.0)
    monkeypatch.setattr(infer_mp, "CUDA_PROBE_TIMEOUT", 3.0)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_ORT_MODE", mode)
    monkeypatch.setenv("FAKE_ORT_SEEN", str(tmp_path / "seen"))
    said: list[str] = []
    started = time.monotonic()
    assert infer_mp.cuda_provider_problem(1, notice=said.append) is None
    assert time.monotonic() - started < 15  # (not the 60 s the fake sleeps, nor its child's 25 s)
    assert said == ["checking ONNX Runtime's CUDA provider on gpu:1 (a first CUDA start can take a while; up to "
                    "3 s)", "the check of ONNX Runtime's CUDA provider on gpu:1 did not finish in 3 s; going on "
                    "(each worker refuses to run on the CPU in its place)"]
    if mode == "slow_unkillable":
        os.kill(int((tmp_path / "seen.pid").read_text()), signal.SIGKILL)


def test_a_stop_during_the_cuda_check_ends_the_checks_process(monkeypatch, tmp_path):
    """Ctrl-C or SIGTERM while the check runs (raised in the coordinator as it waits): the
    check's process, which may hold a CUDA context, is killed, not left running or waited for."""
    write(tmp_path / "capi" / infer_mp.CUDA_PROVIDER_LIBRARY, b"not a shared library")
    write(tmp_path / "fake" / "onnxruntime" / "__init__.py", FAKE_ONNXRUNTIME)
    monkeypatch.setattr(infer_mp, "onnxruntime_folder", lambda: tmp_path)
    monkeypatch.setattr(infer_mp, "onnxruntime_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(infer_mp, "CUDA_PROBE_NOTICE_SECONDS", 1.0)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_ORT_MODE", "slow")
    monkeypatch.setenv("FAKE_ORT_SEEN", str(tmp_path / "seen"))

    def stopped(_: str) -> None:
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        infer_mp.cuda_provider_problem(0, notice=stopped)
    assert time.monotonic() - started < 30
    pid = int((tmp_path / "seen.pid").read_text())
    with pytest.raises(ProcessLookupError):  # (killed, and reaped)
        os.kill(pid, 0)


def test_the_probes_model_is_one_convolution():
    """The probe's model runs on ONNX Runtime's CPU provider here: y = Conv(x, w) = x."""
    onnxruntime = pytest.importorskip("onnxruntime")
    import numpy

    model = bytes.fromhex("".join(re.findall(r'"([0-9a-f]+)"', infer_mp.CUDA_PROBE)))
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert b"\x22\x04Conv" in model  # (NodeProto.op_type, field 4: "Conv")
    assert session.run(None, {"x": numpy.full((1, 1, 1, 1), 3.0, numpy.float32)})[0].tolist() == [[[[3.0]]]]


def test_no_cuda_provider_no_check(monkeypatch, tmp_path):
    monkeypatch.setattr(infer_mp, "onnxruntime_folder", lambda: tmp_path)
    assert infer_mp.cuda_provider_problem() is None


# -- check_engine on a GPU ---------------------------------------------------------------------


def test_gpu_without_onnxruntime_points_to_the_gpu_requirements(monkeypatch):
    monkeypatch.setattr(infer_mp, "installed_version", lambda name: None)
    with pytest.raises(infer_mp.UsageError, match="requirements-gpu-onnx.txt"):
        infer_mp.check_engine(config(pipeline_kwargs=ORT), "gpu")


def test_a_cpu_build_of_onnxruntime_on_a_gpu_says_how_to_swap_it(monkeypatch):
    monkeypatch.setattr(infer_mp, "installed_version", {"onnxruntime-openvino": "1.24.1"}.get)
    fake_onnxruntime(monkeypatch, ["OpenVINOExecutionProvider", CPU])
    with pytest.raises(infer_mp.UsageError) as refused:
        infer_mp.check_engine(config(pipeline_kwargs=ORT), "gpu")
    assert "CUDAExecutionProvider not available in onnxruntime-openvino 1.24.1" in str(refused.value)
    assert "pip uninstall onnxruntime-openvino, then pip install -r requirements-gpu-onnx.txt" in str(refused.value)


@pytest.mark.parametrize("options", [{"device_id": 0}, [{"device_id": 1}, {}]])
def test_device_id_in_provider_options_is_refused(monkeypatch, options):
    """PaddleX lets a provider_options device_id win over gpu:N: every instance on one GPU."""
    monkeypatch.setattr(infer_mp, "installed_version", {"onnxruntime-gpu": "1.31.1"}.get)
    fake_onnxruntime(monkeypatch, [CUDA, CPU])
    kwargs = {**ORT, "engine_config": {"provider_options": options}}
    with pytest.raises(infer_mp.UsageError, match="leave device_id out"):
        infer_mp.check_engine(config(pipeline_kwargs=kwargs), "gpu")


# -- 3. no silent fallback to the CPU ------------------------------------------------------------


def start_worker(monkeypatch, module, providers: list[list[str]], init_kwargs: dict, device: str = "gpu:0"):
    """A worker's start() on `device`. Its pipeline is made by infer_mp.py's create_pipeline,
    with the engine settings infer_mp.py plans, and holds one session per entry of `providers`;
    a session with the CUDA provider gets the CUDA options PaddleX's engine would give it: the
    planned provider_options and gpu:N's id. So what the ready report says comes from the plan."""

    class Pipeline:
        def __init__(self, device=None, cpu_threads=None, engine=None, engine_config=None):
            engine_config = engine_config or {}
            options = engine_config.get("provider_options") or {}
            if isinstance(options, list):  # one dict per provider listed
                options = dict(zip(engine_config.get("providers") or [], options)).get(CUDA) or {}
            cuda = {**options, "device_id": device.partition(":")[2] or "0"}
            self.sessions = [module.InferenceSession(p, cuda if CUDA in p else None) for p in providers]

        def predict(self, input, **options):
            return iter(())

    monkeypatch.setattr(infer_mp, "load_pipeline_class", lambda ref: Pipeline)
    worker = infer_mp.PipelineWorker(infer_mp.PipelineRef("json", "JSONDecoder"))
    options = infer_mp.WorkerOptions(infer_mp.PipelineRef("json", "JSONDecoder"), init_kwargs)
    return worker.start(infer_mp.WorkerSpec(0, device, 2), options)


def test_only_a_silent_fallback_to_the_cpu_stops_the_worker(monkeypatch):
    """ONNX Runtime put the recognizer on the CPU alone while gpu:0 was asked: the worker does
    not start (a failed start: exit 3 when every worker has it), and says why. Sessions on the
    GPU, the CPU asked for, or a pipeline's own sessions (not PaddleX's engine) start."""
    module = fake_onnxruntime(monkeypatch, [CUDA, CPU])
    said = "ONNX Runtime's CUDA provider cannot load here (libcublasLt.so.13: cannot open shared object file)"
    monkeypatch.setattr(infer_mp, "cuda_provider_problem", lambda device_id=0, notice=None: said)
    reply = start_worker(monkeypatch, module, [[CUDA, CPU], [CPU]], ORT)
    assert isinstance(reply, infer_mp.InitFailed)
    assert "gpu:0 was asked for" in reply.why and f"1 of this pipeline's session(s) on {CPU} alone" in reply.why
    assert "libcublasLt.so.13" in reply.why
    for providers, init_kwargs, device in [
        ([[CUDA, CPU], [CUDA, CPU]], ORT, "gpu:0"),
        ([[CPU]], {**ORT, "engine_config": {"providers": [CPU]}}, "gpu:0"),
        ([[CPU]], ORT, "cpu"),
        ([[CPU]], {}, "gpu:0"),
    ]:
        module = fake_onnxruntime(monkeypatch, [CUDA, CPU])  # a fresh module: the sessions above are not its
        assert isinstance(start_worker(monkeypatch, module, providers, init_kwargs, device), infer_mp.Ready), providers


def test_ready_report_names_the_gpu_and_the_cudnn_search(monkeypatch):
    module = fake_onnxruntime(monkeypatch, [CUDA, CPU])
    reply = start_worker(monkeypatch, module, [[CUDA, CPU], [CUDA, CPU]], ORT)
    assert reply.engine.startswith(f"onnxruntime ({CUDA}, {CPU}) on GPU 0, cudnn_conv_algo_search HEURISTIC [")
    assert "HEURISTIC set by default" in reply.engine and '"EXHAUSTIVE"' in reply.engine
    chosen = {**ORT, "engine_config": {"provider_options": {"cudnn_conv_algo_search": "DEFAULT"}}}
    assert "[" not in infer_mp.describe_engine(chosen)  # the user's choice: nothing to explain


# -- 4. planned GPU settings ---------------------------------------------------------------------


class Takes:
    def __init__(self, device=None, cpu_threads=None, engine=None, engine_config=None):
        pass

    def predict(self, input, **options):
        return iter(())


def plan(engine_config: dict | None = None, threads: int | None = 2, device: str = "gpu:1") -> dict | None:
    kwargs = {**ORT, **({"engine_config": engine_config} if engine_config is not None else {})}
    return infer_mp.planned_engine_config(Takes, infer_mp.WorkerSpec(0, device, threads), kwargs)


HEURISTIC = {"cudnn_conv_algo_search": "HEURISTIC"}


def test_gpu_instances_get_planned_threads_and_cuda_options():
    assert plan() == {"intra_op_num_threads": 2, "inter_op_num_threads": 2, "provider_options": HEURISTIC}
    assert plan({"providers": [CUDA, CPU]}) == {"providers": [CUDA, CPU], "intra_op_num_threads": 2,
                                                "inter_op_num_threads": 2, "provider_options": [HEURISTIC, {}]}
    assert plan(threads=None) == {"provider_options": HEURISTIC}  # e.g. on Ray: no thread plan


@pytest.mark.parametrize("engine_config", [
    {"provider_options": {"cudnn_conv_algo_search": "EXHAUSTIVE"}},
    {"providers": [CUDA, CPU], "provider_options": [{"arena_extend_strategy": "kSameAsRequested"}, {}]},
    {"providers": [TENSORRT, CPU]},  # no CUDA provider listed: nothing to add
    {"intra_op_num_threads": 6, "inter_op_num_threads": 1, "providers": [CPU]},
])
def test_gpu_settings_given_by_the_user_win(engine_config):
    planned = plan(engine_config)
    assert {k: planned[k] for k in engine_config} == engine_config
    assert "provider_options" not in planned or planned["provider_options"] == engine_config.get("provider_options")


def test_what_paddlex_forwards_keeps_its_device_id():
    """The planned config through PaddleX's own onnxruntime engine for gpu:1: validated (its
    config model refuses unknown keys), device_id 1 added to the CUDA provider's options, the
    threads set on the session options."""
    pytest.importorskip("paddlex")
    from paddlex.inference.models.engines.onnxruntime import ONNXRuntimeEngine
    from paddlex.inference.models.runners.onnxruntime_runner import ONNXRuntimeRunner

    for given, options in [(None, [{"device_id": 1, **HEURISTIC}, {}]),
                           ({"providers": [CUDA, CPU]}, [{"device_id": 1, **HEURISTIC}, {}])]:
        engine_config = ONNXRuntimeEngine().normalize_config(plan(given), model_name="PP-OCRv4_mobile_det",
                                                             device="gpu:1")
        runner = object.__new__(ONNXRuntimeRunner)
        runner._config = engine_config
        runner._ort = types.SimpleNamespace(get_available_providers=lambda: [CUDA, CPU])
        assert runner._resolve_providers() == ([CUDA, CPU], options)
        assert engine_config["intra_op_num_threads"] == engine_config["inter_op_num_threads"] == 2


def test_importing_paddlex_here_left_the_environment_of_later_runs_as_it_was():
    """(Runs after the test above, which imports PaddleX into this process.)"""
    import conftest

    changed = {k: v for k, v in os.environ.items()
               if conftest.ENVIRONMENT_AT_START.get(k) != v and k != "PYTEST_CURRENT_TEST"}  # (pytest's own)
    assert changed == {} and set(conftest.ENVIRONMENT_AT_START) <= set(os.environ)


@pytest.mark.parametrize("engine, cpu_threads, threads", [("onnxruntime", None, 2), ("onnxruntime", 5, 5),
                                                          (None, None, None)])
def test_gpu_thread_plan_splits_the_cores_among_all_instances(monkeypatch, engine, cpu_threads, threads):
    """16 cores, gpu:0 x 8: ONNX Runtime's pools get 2 threads each (its default: all 16, in every
    session of every instance); Paddle's engine on a GPU is left as it was."""
    driver_sees(monkeypatch, 1)
    monkeypatch.setattr(infer_mp, "available_cores", lambda: 16)
    monkeypatch.setattr(infer_mp, "import_paddle_quietly", lambda: fake_paddle(1))
    kwargs = {"engine": engine} if engine else {}
    plan_ = infer_mp.plan_workers(config(instances_per_device=8, cpu_threads=cpu_threads, pipeline_kwargs=kwargs))
    assert {s.cpu_threads for s in plan_} == {threads}


# -- 6. the GPU benchmark, without a GPU ---------------------------------------------------------


def test_benchmark_refuses_cleanly_without_a_gpu():
    """CUDA_VISIBLE_DEVICES=-1 hides every GPU from the driver, so this holds on a GPU box too."""
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "bench_gpu.py"), "--pages", "2"], capture_output=True,
                         text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_gpu.py: no GPU here"), run.stderr
    assert "README, 'GPU benchmark'" in lines[0]


@pytest.fixture
def bench():
    import bench_gpu  # examples/ is on sys.path (conftest)

    return bench_gpu


def test_benchmark_plans_its_sweep(bench, tmp_path):
    args = bench.parse_args(["--instances", "2,8", "--batch_sizes", "1,4", "--variant",
                             'exhaustive={"provider_options": {"cudnn_conv_algo_search": "EXHAUSTIVE"}}'])
    files = [tmp_path / "pages" / "page000.png"]
    settings = bench.plan_settings(args, [0, 1], tmp_path / "pages", tmp_path / "out", files)
    assert settings[0].instances is None and settings[0].gpus == [0]  # the bare loop, first GPU
    assert "--device" in settings[0].command and "gpu:0" in settings[0].command
    rows = [(s.instances, s.batch_size, "--engine_config" in s.command) for s in settings[1:]]
    assert rows == [(i, b, e) for e in (False, True) for i in (2, 8) for b in (1, 4)]
    for setting in settings[1:]:
        command = setting.command
        assert command[command.index("--device") + 1] == "gpu:0,1"
        assert command[command.index("--instances_per_device") + 1] == str(setting.instances)
        assert command[command.index("--engine") + 1] == "onnxruntime"
    assert json.loads(settings[-1].command[-1]) == {"provider_options": {"cudnn_conv_algo_search": "EXHAUSTIVE"}}


def test_benchmark_runs_pp_ocrv6_on_every_row(bench, tmp_path):
    """--model v6: infer_mp.py's rows run OfflineOCRv6, and so does the bare loop."""
    args = bench.parse_args(["--model", "v6", "--instances", "1,4", "--batch_sizes", "1"])
    settings = bench.plan_settings(args, [0], tmp_path / "pages", tmp_path / "out", [tmp_path / "pages" / "p.png"])
    bare, *rows = settings
    assert bare.command[bare.command.index("--pipeline") + 1] == "v6"
    assert [row.command[row.command.index("--pipeline") + 1] for row in rows] == [bench.PIPELINE_V6] * 2
    assert bench.PIPELINE_V6.endswith(":OfflineOCRv6")
    default = bench.plan_settings(bench.parse_args([]), [0], tmp_path, tmp_path / "out", [])
    assert default[0].command[default[0].command.index("--pipeline") + 1] == "v4"
    assert default[1].command[default[1].command.index("--pipeline") + 1] == bench.PIPELINE


def test_benchmark_scores_text_against_the_known_text(bench, tmp_path):
    truth = {"a.json": "total amount due 12", "b.json": "order shipment"}
    (tmp_path / "a.json").write_text(json.dumps({"rec_texts": ["total amount", "due 12"]}))
    read = bench.read_texts(tmp_path, truth)  # (b.json is missing: read as nothing)
    assert read == {"a.json": ["total amount", "due 12"], "b.json": []}
    assert bench.mean_recall(read, truth) == 0.5
    assert bench.similarity(read, truth) == 0.5


def test_a_failing_row_is_shown_and_the_sweep_goes_on(bench, tmp_path):
    """Every GPU run once crashed (SIGSEGV): the first failing row ended the whole benchmark,
    losing the bare loop measured before it."""
    truth = {"a.json": "total amount due 12"}
    crash = bench.Setting("crashes", [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                          [0], 1, 1)
    write_page = "import json, sys; json.dump({'rec_texts': ['total amount due 12']}, open(sys.argv[1], 'w'))"
    works = bench.Setting("works", [sys.executable, "-c", write_page, str(tmp_path / "out" / "a.json")], [0])
    for setting in (crash, works):
        bench.run_once(setting, tmp_path / "out", truth, 50)
    assert crash.failure == "exit 3, 0 of 1 pages: boom" and not crash.seconds
    assert works.failure is None and works.recall == [1.0]
    table = bench.table([works, crash], 1).splitlines()
    assert table[2].startswith("| works | 1 |") and "| 1.000 | 1.0000 |" in table[2]
    assert table[3].startswith("| crashes | 1 | failed: exit 3, 0 of 1 pages: boom |")
    assert table[3].count("|") == table[2].count("|")
    bench.run_once(works, tmp_path / "out", truth, 50)
    works.command = crash.command  # (a later round that fails: the row is failed, not a median of the others)
    bench.run_once(works, tmp_path / "out", truth, 50)
    assert works.failure and bench.table([works], 1).splitlines()[2].startswith("| works | 1 | failed: exit 3")


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "v6", "--engine", "paddle_static"], "--model v6"),
    (["--instances", "0"], "--instances"),
    (["--batch_sizes", "x"], "--batch_sizes"),
    (["--variant", "nojson"], "--variant"),
    (["--no_planned"], "leaves no rows"),
])
def test_benchmark_refuses_bad_arguments(bench, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exited:
        bench.parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_benchmark_devices_and_samples(bench, monkeypatch):
    assert bench.gpu_ids(None, 3) == [0, 1, 2]
    assert bench.gpu_ids("gpu:1", 3) == [1]
    with pytest.raises(SystemExit):
        bench.gpu_ids("gpu:3", 3)
    assert bench.parse_smi_line("0, 37, 1234") == (0, 37.0, 1234)
    assert bench.parse_smi_line("[N/A]") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert bench.nvml_index(1) == 3
