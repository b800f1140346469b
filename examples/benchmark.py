"""Throughput of infer_mp.py beside the ways it replaces, on the same pages, in one run.

    python examples/benchmark.py                      # real OCR, CPU: the table in docs/performance.md
    python examples/benchmark.py --orchestration 100000   # dispatch cost, model-free
    python examples/benchmark.py --engines --pages 40     # Paddle vs ONNX Runtime vs OpenVINO, and the peer
    python examples/benchmark.py --peers --pages 40       # PP-OCRv6: infer_mp.py vs rapidocr 3.10, faster-paddle
    python examples/benchmark.py --backends --pages 40    # the Ray backend against the local one
    python examples/benchmark.py --run_log_records 1000000  # start-up of a rerun over a long run log
    python examples/benchmark.py --orchestration 100000 --baseline old/infer_mp.py  # old and new, same rounds
    python examples/benchmark.py --big_pdf 300        # long PDFs: worker memory, balance, --pages_per_task

Every figure is a whole process (start-up and model load included), the median of --rounds
interleaved rounds (A B C A B C ...), on pages rendered with known text and the offline
PP-OCRv4 models of examples/offline_ocr.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from samples import render_page  # noqa: E402

PIPELINE = f"{HERE / 'offline_ocr.py'}:OfflineOCR"
FAKE = f"{ROOT / 'tests' / 'fake_pipeline.py'}:FakePipeline"
WORDS = ("invoice harbor supply total amount due order shipment delivery warehouse customer "
         "account balance payment reference quarter revenue costs march monday").split()
PADDLEOCR_DEFAULT_THREADS = 8


@dataclass
class Config:
    name: str
    commands: list[list[str]]  # run together; the row's time is until all have finished
    pages: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def write_pages(folder: Path, count: int, mixed: bool, texts: dict[str, str] | None = None) -> list[Path]:
    """Dense pages of 20 lines; with `mixed`, every other page has a single line, and the order
    is shuffled (seeded), so that fixed halves get unequal work as in a real backlog. `texts`,
    if given, receives each page's text by file name (not mixed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    paths = []
    for i in range(count):
        lines = 1 if mixed and i % 2 else 20
        text = [" ".join(rng.choice(WORDS) for _ in range(5)) + f" {rng.randint(10, 9999)}" for _ in range(lines)]
        paths.append(folder / f"page{i:03d}.png")
        render_page(text).save(paths[-1])
        if texts is not None:
            texts[paths[-1].name] = " ".join(text)
    if mixed:
        names = [p.name for p in paths]
        rng.shuffle(names)
        renamed = []
        for index, name in enumerate(names):
            target = folder / f"m{index:03d}.png"
            (folder / name).rename(target)
            renamed.append(target)
        paths = renamed
    return sorted(paths)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def ocr_configs(pages: list[Path], input_dir: Path, out: Path, device: str, grid: list[tuple[int, int]],
                label: str = "") -> list[Config]:
    n = len(pages)
    worker = str(HERE / "bench_worker.py")
    files = [str(p) for p in pages]
    halves = [files[i * n // cores():(i + 1) * n // cores()] for i in range(cores())]
    first_device = device.split(",")[0] if device != "cpu" else "cpu"
    configs = [
        Config(f"{label}bare loop (1 process, 1 thread)",
               [python(worker, "bare", str(out), *files, "--threads", "1", "--device", first_device)], n),
        Config(f"{label}PaddleOCR predict(dir), {PADDLEOCR_DEFAULT_THREADS} threads (its default)",
               [python(worker, "builtin", str(out), str(input_dir), "--threads", str(PADDLEOCR_DEFAULT_THREADS),
                       "--device", device)], n),
        Config(f"{label}PaddleOCR predict(dir), {cores()} threads (= cores)",
               [python(worker, "builtin", str(out), str(input_dir), "--threads", str(cores()), "--device", device)], n),
        Config(f"{label}partition limit ({cores()} bare 1-thread processes, fixed shares)",
               [python(worker, "bare", str(out), *half, "--threads", "1", "--device", first_device)
                for half in halves], n),
    ]
    for instances, threads in grid:
        configs.append(Config(
            f"{label}infer_mp.py {instances} instance(s) x {threads} thread(s)",
            [python(str(ROOT / "infer_mp.py"), "--pipeline", PIPELINE, "--input_dir", str(input_dir), "--device",
                    device, "--instances_per_device", str(instances), "--cpu_threads", str(threads),
                    "--output_dir", str(out), "--progress_interval", "3600")], n))
    return configs


def run_once(config: Config, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.sync()
    started = time.perf_counter()
    processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in config.commands]
    errors = [p.communicate()[1] for p in processes]
    seconds = time.perf_counter() - started
    for process, error in zip(processes, errors):
        if process.returncode != 0:
            raise SystemExit(f"{config.name} failed ({process.returncode}):\n{error.decode(errors='replace')[-2000:]}")
    produced = sum(1 for p in out.rglob("*.json"))
    if produced != config.pages:
        raise SystemExit(f"{config.name}: {produced} JSON files for {config.pages} pages")
    return seconds


def measure(configs: list[Config], rounds: int, out: Path) -> None:
    for round_index in range(rounds):
        for config in configs:  # interleaved: A B C A B C ...
            config.seconds.append(run_once(config, out))
            print(f"  round {round_index + 1}: {config.name}: {config.seconds[-1]:.1f} s", file=sys.stderr, flush=True)


def table(configs: list[Config], reference: Config) -> str:
    rows = ["| configuration | seconds | pages/s | vs built-in default |", "| --- | --- | --- | --- |"]
    for config in configs:
        rows.append(f"| {config.name} | {config.median:.1f} | {config.pages / config.median:.2f} | "
                    f"{reference.median / config.median:.2f}x |")
    return "\n".join(rows)


def versions() -> str:
    names = ("paddlepaddle", "paddlex", "paddleocr")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def header(what: str, rounds: int) -> str:
    return (f"{what}; {time.strftime('%Y-%m-%d')}; {platform.machine()}, {cores()} cores, Python "
            f"{platform.python_version()}, {versions()}; median of {rounds} interleaved rounds, whole processes")


def ocr_benchmark(args: argparse.Namespace, work: Path) -> None:
    dense = write_pages(work / "dense", args.pages, mixed=False)
    mixed = write_pages(work / "mixed", args.pages, mixed=True)
    out = work / "out"
    grid = [(1, cores()), (1, 1), (cores(), 1)] + ([(2, cores())] if cores() > 1 else [])
    configs = ocr_configs(dense, work / "dense", out, args.device, grid)
    print(f"measuring {len(configs)} configurations x {args.rounds} rounds on {len(dense)} pages ...", file=sys.stderr)
    measure(configs, args.rounds, out)
    by_name = {c.name: c for c in configs}
    bare, builtin_default, builtin_cores, partition = configs[:4]
    infer_runs = configs[4:]
    best = min(infer_runs, key=lambda c: c.median)
    one_instance = next(c for c in infer_runs if c.name.endswith("1 instance(s) x 1 thread(s)"))
    default_multi = next(c for c in infer_runs if c.name.endswith(f"{cores()} instance(s) x 1 thread(s)"))
    print("\n" + header(f"{len(dense)} dense pages (20 lines, {args.device})", args.rounds) + "\n")
    print(table(configs, builtin_default))

    mixed_grid = list(dict.fromkeys([(cores(), 1), (best_instances(best), best_threads(best))]))
    mixed_configs = [c for c in ocr_configs(mixed, work / "mixed", out, args.device, mixed_grid, "mixed: ")
                     if "partition" in c.name or "infer_mp" in c.name or "(its default)" in c.name]
    print("\nmeasuring the mixed set ...", file=sys.stderr)
    measure(mixed_configs, args.rounds, out)
    print("\n" + header(f"{len(mixed)} mixed pages (dense and one-line, shuffled)", args.rounds) + "\n")
    print(table(mixed_configs, mixed_configs[0]))
    mixed_partition = next(c for c in mixed_configs if "partition" in c.name)
    mixed_infer = min((c for c in mixed_configs if "infer_mp" in c.name), key=lambda c: c.median)
    checks = [
        ("infer_mp.py, 1 instance x 1 thread, vs the bare loop (1 thread)", bare.median / one_instance.median, 0.95),
        (f"infer_mp.py, best ({best.name.split('py ')[1]}), vs the partition limit",
         partition.median / best.median, 0.95),
        ("infer_mp.py, best, vs built-in at its default threads", builtin_default.median / best.median, 1.0),
        ("infer_mp.py, best, vs built-in at threads = cores", builtin_cores.median / best.median, 1.0),
        ("infer_mp.py, mixed set, vs the partition limit", mixed_partition.median / mixed_infer.median, 1.0),
        ("infer_mp.py, default multi-instance plan, vs the partition limit",
         partition.median / default_multi.median, 0.95),
    ]
    print("\n| target | ratio | goal |\n| --- | --- | --- |")
    for name, ratio, goal in checks:
        print(f"| {name} | {ratio:.2f}x | >= {goal:.2f}x {'(met)' if ratio >= goal else '(NOT met)'} |")
    del by_name


PEER_PACKAGE = "rapidocr-openvino==1.4.4"
OPENVINO = json.dumps({"providers": ["OpenVINOExecutionProvider"]})
# The peers of --peers on PP-OCRv6, each in a virtual environment of its own (packages pinned).
PEER_ENVIRONMENTS = {"rapidocr": ["rapidocr==3.10.0", "onnxruntime==1.32.0", "openvino==2026.4.1"],
                     "faster-paddle": ["faster-paddle==1.0.4"]}


def peer_python(venv: Path, packages: list[str] | None = None) -> Path:
    """A peer's own virtual environment, made if missing (its opencv-python or ONNX Runtime
    would replace PaddleX's)."""
    packages = packages or [PEER_PACKAGE]
    python_path = venv / "bin" / "python"
    if not python_path.exists():
        print(f"creating {venv} with {' '.join(packages)} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python_path), "-m", "pip", "install", "-q", *packages], check=True)
    return python_path


def engine_benchmark(args: argparse.Namespace, work: Path) -> None:
    """infer_mp.py on each engine at instances x threads of 1 x cores and cores x 1, beside
    the peer rapidocr-openvino, on the same dense pages."""
    pages = write_pages(work / "dense", args.pages, mixed=False)
    out = work / "out"
    engines = {"Paddle (paddle_static, oneDNN)": [],
               "ONNX Runtime (CPU provider)": ["--engine", "onnxruntime", "--engine_config",
                                               json.dumps({"providers": ["CPUExecutionProvider"]})],
               "ONNX Runtime + OpenVINO provider": ["--engine", "onnxruntime", "--engine_config", OPENVINO]}
    configs = []
    for label, extra in engines.items():
        for instances, threads in dict.fromkeys([(1, cores()), (cores(), 1)]):
            configs.append(Config(
                f"infer_mp.py, {label}, {instances} x {threads}",
                [python(str(ROOT / "infer_mp.py"), "--pipeline", PIPELINE, "--input_dir", str(work / "dense"),
                        "--device", "cpu", "--instances_per_device", str(instances), "--cpu_threads", str(threads),
                        "--output_dir", str(out), "--progress_interval", "3600", *extra)], len(pages)))
    if not args.no_peer:
        peer = peer_python(Path(args.peer_venv or work / "peer-venv"))
        configs.append(Config("rapidocr-openvino 1.4.4 (the peer), 1 process",
                              [[str(peer), str(HERE / "bench_peer.py"), "rapidocr-openvino-1.4", str(out),
                                *map(str, pages)]], len(pages)))
    print(f"measuring {len(configs)} configurations x {args.rounds} rounds on {len(pages)} pages ...", file=sys.stderr)
    measure(configs, args.rounds, out)
    paddle_best = min((c for c in configs if "Paddle (" in c.name), key=lambda c: c.median)
    print("\n" + header(f"{len(pages)} dense pages (20 lines), CPU engines", args.rounds) + "\n")
    print(table(configs, paddle_best).replace("vs built-in default", "vs best Paddle-engine run"))
    best = min((c for c in configs if c.name.startswith("infer_mp")), key=lambda c: c.median)
    print(f"\nbest infer_mp.py run: {best.name}: {paddle_best.median / best.median:.2f}x its best Paddle-engine run")
    peers = [c for c in configs if "peer" in c.name]
    if peers:
        print(f"best infer_mp.py run vs the peer: {peers[0].median / best.median:.2f}x the peer's throughput")


PIPELINE_V6 = f"{HERE / 'offline_ocr.py'}:OfflineOCRv6"


def word_recall(known: str, read: list[str]) -> float | None:
    """The share of the page's words (with repeats) that the reading has; None for a page
    without words (examples/quality.py uses it too)."""
    wanted = Counter(known.split())
    if not wanted:
        return None
    return sum((wanted & Counter(" ".join(read).split())).values()) / sum(wanted.values())


def mean_recall(out: Path, texts: dict[str, str]) -> float:
    """Mean word recall over the pages, from the JSON files of the last round's run."""
    recalls = []
    for path in out.rglob("*.json"):
        content = json.loads(path.read_text(encoding="utf-8"))
        recall = word_recall(texts[Path(content["input_path"]).name], content.get("rec_texts") or [])
        if recall is not None:
            recalls.append(recall)
    return sum(recalls) / len(recalls)


def infer_cpu(pipeline: str, input_dir: Path, out: Path, *flags: str, script: Path = ROOT / "infer_mp.py") -> list[str]:
    """An infer_mp.py run on the CPU, no progress lines."""
    return python(str(script), "--pipeline", pipeline, "--input_dir", str(input_dir), "--device", "cpu",
                  "--output_dir", str(out), "--progress_interval", "3600", *flags)


def infer_v6(input_dir: Path, out: Path, *flags: str, script: Path = ROOT / "infer_mp.py") -> list[str]:
    return infer_cpu(PIPELINE_V6, input_dir, out, "--engine", "onnxruntime", *flags, script=script)


def builtin_v6_config(threads: int) -> str:
    """PaddleOCR's predict with the engine settings infer_mp.py plans (OpenVINO provider, its
    threads and precision), so that the row differs from infer_mp.py's only in the runner."""
    sys.path.insert(0, str(ROOT))
    import infer_mp

    return json.dumps({"providers": [infer_mp.OPENVINO_PROVIDER], "intra_op_num_threads": threads,
                       "provider_options": [infer_mp.openvino_options(threads)]})


def peers_benchmark(args: argparse.Namespace, work: Path) -> None:
    """infer_mp.py on PP-OCRv6_small at its defaults (and at 2 instances; and PP-OCRv4 on the
    Paddle engine, which README command 1 ran before) beside the newest
    CPU peers on the same pages: rapidocr 3.10 on OpenVINO and ONNX Runtime (same v6 small
    models, plus its default text-line orientation model), faster-paddle 1.0.4 small (and tiny,
    another model), and PaddleOCR's own predict(dir); speed and word recall, whole processes."""
    texts: dict[str, str] = {}
    pages = write_pages(work / "dense", args.pages, mixed=False, texts=texts)
    files = [str(p) for p in pages]
    out = work / "out"
    venvs = Path(args.peer_venv or work / "peer-venvs")
    rapidocr = peer_python(venvs / "rapidocr", PEER_ENVIRONMENTS["rapidocr"])
    faster = peer_python(venvs / "faster-paddle", PEER_ENVIRONMENTS["faster-paddle"])
    peer = str(HERE / "bench_peer.py")
    n = len(pages)
    configs = [
        Config("infer_mp.py, PP-OCRv6_small, defaults (--engine onnxruntime: 1 instance x 2 threads)",
               [infer_v6(work / "dense", out)], n),
        Config("infer_mp.py, PP-OCRv6_small, 2 instances x 1 thread",
               [infer_v6(work / "dense", out, "--instances_per_device", str(cores()), "--cpu_threads", "1")], n),
        Config("infer_mp.py, PP-OCRv4 mobile, Paddle engine, 2 instances x 1 thread (README command 1 before)",
               [infer_cpu(PIPELINE, work / "dense", out, "--instances_per_device", str(cores()), "--cpu_threads",
                          "1")], n),
        Config("PaddleOCR predict(dir), PP-OCRv6_small, same engine settings, 1 process",
               [python(str(HERE / "bench_worker.py"), "builtin", str(out), str(work / "dense"), "--pipeline", "v6",
                       "--engine", "onnxruntime", "--threads", str(cores()),
                       "--engine_config", builtin_v6_config(cores()))], n),
        Config("rapidocr 3.10, OpenVINO, PP-OCRv6_small (its defaults), 1 process",
               [[str(rapidocr), peer, "rapidocr-3.10-openvino", str(out), *files]], n),
        Config("rapidocr 3.10, ONNX Runtime, PP-OCRv6_small (its defaults), 1 process",
               [[str(rapidocr), peer, "rapidocr-3.10-onnxruntime", str(out), *files]], n),
        Config("faster-paddle 1.0.4, PP-OCRv6 small, 1 process",
               [[str(faster), peer, "faster-paddle-small", str(out), *files]], n),
        Config("faster-paddle 1.0.4, PP-OCRv6 tiny (another model), 1 process",
               [[str(faster), peer, "faster-paddle-tiny", str(out), *files]], n),
    ]
    if args.baseline:  # (not a peer: an earlier infer_mp.py, for what a change gained)
        configs.append(Config(f"baseline {args.baseline}, PP-OCRv6_small, defaults",
                              [infer_v6(work / "dense", out, script=Path(args.baseline).resolve())], n))
    print(f"measuring {len(configs)} configurations x {args.rounds} rounds on {n} pages ...", file=sys.stderr)
    recalls = {}
    for round_index in range(args.rounds):
        for config in configs:  # interleaved: A B C A B C ...
            config.seconds.append(run_once(config, out))
            recalls[config.name] = mean_recall(out, texts)
            print(f"  round {round_index + 1}: {config.name}: {config.seconds[-1]:.1f} s", file=sys.stderr,
                  flush=True)
    print("\n" + header(f"{n} dense pages (20 lines), PP-OCRv6 on the CPU", args.rounds) + "\n")
    rows = ["| configuration | seconds | pages/s | word recall |", "| --- | --- | --- | --- |"]
    rows += [f"| {c.name} | {c.median:.1f} | {n / c.median:.2f} | {recalls[c.name]:.4f} |" for c in configs]
    print("\n".join(rows))
    default, two = configs[0], configs[1]
    small_peers = [c for c in configs[3:] if "another model" not in c.name and not c.name.startswith("baseline")]
    fastest = min(small_peers, key=lambda c: c.median)
    print(f"\nfastest peer on PP-OCRv6_small: {fastest.name}")
    if args.baseline:
        print(f"infer_mp.py at defaults vs the baseline: {configs[-1].median / default.median:.2f}x")
    for label, ours in (("defaults", default), ("2 instances", two)):
        ratio = fastest.median / ours.median
        recall_ok = recalls[ours.name] >= recalls[fastest.name]
        print(f"infer_mp.py at {label} vs the fastest peer: {ratio:.2f}x its pages/s (goal >= 1.20x: "
              f"{'met' if ratio >= 1.2 else 'NOT met'}); word recall {recalls[ours.name]:.4f} vs "
              f"{recalls[fastest.name]:.4f} ({'equal or better' if recall_ok else 'LOWER'})")
    for peer_config in small_peers:
        print(f"infer_mp.py, 1 instance, vs {peer_config.name}: {peer_config.median / default.median:.2f}x")


def start_ray_head(work: Path) -> tuple[subprocess.Popen, str]:
    """An existing Ray cluster, as on a fleet: `ray start --head --block` on this machine."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--port", str(port), "--num-cpus", str(cores()),
                             "--include-dashboard", "false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while subprocess.run([ray_cli, "status", "--address", address], capture_output=True).returncode != 0:
        if time.monotonic() > deadline or head.poll() is not None:
            raise SystemExit("ray start --head did not come up")
        time.sleep(1)
    return head, address


def backend_benchmark(args: argparse.Namespace, work: Path) -> None:
    """The Ray backend against the local one, same pages and plan: on a cluster that already
    runs (the fleet case), and on a local cluster each run starts and stops itself."""
    import signal

    os.environ["RAY_AUTH_MODE"] = "disabled"  # the benchmark's own throwaway clusters
    os.environ.pop("RAY_ADDRESS", None)
    pages = write_pages(work / "dense", args.pages, mixed=False)
    out = work / "out"
    head, address = start_ray_head(work)
    try:
        configs = []
        for instances, threads in [(cores(), 1)]:  # the best plan on CPU (see the tables above)
            base = python(str(ROOT / "infer_mp.py"), "--pipeline", PIPELINE, "--input_dir", str(work / "dense"),
                          "--device", "cpu", "--instances_per_device", str(instances), "--cpu_threads", str(threads),
                          "--output_dir", str(out), "--progress_interval", "3600", *args.extra)
            plan = f"{instances} x {threads}"
            configs += [
                Config(f"local backend, {plan}", [base], len(pages)),
                Config(f"Ray backend, existing cluster, {plan}",
                       [base + ["--backend", "ray", "--ray_address", address]],
                       len(pages)),
                Config(f"Ray backend, local cluster started by the run, {plan}", [base + ["--backend", "ray"]],
                       len(pages)),
            ]
        print(f"measuring {len(configs)} configurations x {args.rounds} rounds on {len(pages)} pages ...",
              file=sys.stderr)
        measure(configs, args.rounds, out)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait()
    extra = f", {' '.join(args.extra)}" if args.extra else ""
    print("\n" + header(f"{len(pages)} dense pages (20 lines), local vs Ray backend{extra}", args.rounds) + "\n")
    print("| configuration | seconds | pages/s | vs local, same plan |\n| --- | --- | --- | --- |")
    for index, config in enumerate(configs):
        local = configs[index - index % 3]
        print(f"| {config.name} | {config.median:.1f} | {config.pages / config.median:.2f} | "
              f"{local.median / config.median:.2f}x |")


def best_instances(config: Config) -> int:
    return int(config.name.split("py ")[1].split(" instance")[0])


def best_threads(config: Config) -> int:
    return int(config.name.split(" x ")[1].split(" thread")[0])


# -- orchestration ------------------------------------------------------------------------------

BARE_WRITER = """
import json, os, sys
paths = sys.argv[2:]
out = sys.argv[1]
for path in paths:
    rel = os.path.relpath(path, os.environ["BENCH_INPUT_DIR"])
    final = os.path.join(out, os.path.splitext(rel)[0] + ".json")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    temporary = os.path.join(os.path.dirname(final), "." + os.path.basename(final) + ".tmp.json")
    with open(temporary, "w") as handle:
        handle.write(json.dumps({"input_path": path, "page_index": None, "text": "x"}))
    os.replace(temporary, final)
"""


def tiny_png() -> bytes:
    """A valid 1 x 1 grey PNG (67 bytes), made without Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)  # 1 x 1, 8-bit grey
    pixels = zlib.compress(b"\0\x80")  # one row: no filter, grey 128
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def write_tiny_inputs(folder: Path, count: int, per_folder: int = 1000) -> list[str]:
    """`count` real 1 x 1 PNGs in nested folders. (Until 2026-12-03 they were one-letter text
    files named .png: Pillow, asked for an image's size by infer_mp.py's --max_image_pixels
    check, then tried every format it knows on each, about 0.2 ms of worker time an input that
    no real image costs.)"""
    marker = folder / f".complete-png-{count}"
    paths = [str(folder / f"d{i // per_folder:04d}" / f"s{i // 100 % 10}" / f"f{i:07d}.png") for i in range(count)]
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        image = tiny_png()
        for path in paths:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(image)
        marker.touch()
    return paths


def peak_memory_mb(process: subprocess.Popen, result: dict) -> None:
    """The coordinator's peak resident memory (VmHWM), read until it exits."""
    peak = 0
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) // 1024)
        except OSError:
            break
        time.sleep(0.2)
    result["peak_mb"] = peak


@dataclass
class Contender:
    """One row of a side-by-side benchmark: the floor (script None) or an infer_mp.py script."""

    name: str
    script: Path | None
    seconds: list[float] = field(default_factory=list)
    memory_mb: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def contenders(args: argparse.Namespace) -> list[Contender]:
    """With --baseline: that script, then this checkout's infer_mp.py (the new one); else it alone."""
    current = Contender("infer_mp.py", ROOT / "infer_mp.py")
    if not args.baseline:
        return [current]
    baseline = Path(args.baseline).resolve()
    if not baseline.is_file():
        raise SystemExit(f"--baseline {args.baseline}: no such file")
    return [Contender(f"baseline {args.baseline}", baseline), current]


def versus_baseline(scripts: list[Contender], what: str, higher_is_better: bool, goal: float) -> str:
    """The new script against the baseline: the ratio of the medians, each round's paired
    ratio (the same round saw the same machine load), and the goal."""
    baseline, new = scripts

    def ratio(old_seconds: float, new_seconds: float) -> float:
        return old_seconds / new_seconds if higher_is_better else new_seconds / old_seconds

    overall = ratio(baseline.median, new.median)
    rounds = ", ".join(f"{ratio(o, n):.2f}x" for o, n in zip(baseline.seconds, new.seconds))
    met = overall >= goal if higher_is_better else overall <= goal
    return (f"new vs baseline: {overall:.2f}x the {what} (rounds: {rounds}); goal "
            f"{'>=' if higher_is_better else '<='} {goal:.2f}x {'(met)' if met else '(NOT met)'}")


def load_note(before: float) -> str:
    """The machine's load over a benchmark: above the core count, other work shared it."""
    return (f"1-minute load average {before:.1f} before, {os.getloadavg()[0]:.1f} after, on {cores()} cores"
            f"{cpu_pressure()}")


def orchestration_benchmark(args: argparse.Namespace, work: Path) -> None:
    count = args.orchestration
    inputs = work / "tiny"
    paths = write_tiny_inputs(inputs, count)
    writer = work / "bare_writer.py"
    writer.write_text(BARE_WRITER)
    half = count // 2
    list_files = []
    for i, share in enumerate((paths[:half], paths[half:])):
        list_file = work / f"share{i}.txt"
        list_file.write_text("\n".join(share))
        list_files.append(list_file)
    env = {**os.environ, "BENCH_INPUT_DIR": str(inputs)}
    floor = Contender("floor", None)
    scripts = contenders(args)
    runs = [floor, *scripts]
    load = os.getloadavg()[0]
    for round_index in range(args.rounds):
        for index, run in enumerate(runs):  # interleaved: floor, baseline, new, floor, ...
            # A fresh folder per run; deleting 100,000 files between runs makes the disk's
            # timings swing far more than anything measured here.
            out = work / f"tiny-out-{index}-{round_index}"
            if run.script is None:
                commands = [["sh", "-c", f"xargs -a {lf} {sys.executable} {writer} {out}"] for lf in list_files]
            else:
                commands = [python(str(run.script), "--pipeline", FAKE, "--input_dir", str(inputs),
                                   "--input_glob_pattern", "**/*.png", "--device", "cpu", "--instances_per_device",
                                   "2", "--batch_size", "64", "--output_dir", str(out), "--progress_interval", "3600")]
            os.sync()
            started = time.perf_counter()
            processes = [subprocess.Popen(c, env=env, stderr=None if run.script is None else subprocess.DEVNULL)
                         for c in commands]
            result: dict = {}
            watcher = threading.Thread(target=peak_memory_mb, args=(processes[0], result))
            watcher.start()
            for process in processes:
                process.wait()
            run.seconds.append(time.perf_counter() - started)
            watcher.join()
            run.memory_mb.append(result.get("peak_mb", 0))
            failed = [p.returncode for p in processes if p.returncode != 0]
            if failed:
                raise SystemExit(f"{run.name} failed with {failed[0]}")
            produced = sum(1 for _ in out.rglob("*.json"))
            if produced != count:
                raise SystemExit(f"{run.name}: {produced} JSON files for {count} inputs")
            print(f"  round {round_index + 1}: {run.name}: {run.seconds[-1]:.1f} s", file=sys.stderr, flush=True)
    for round_index in range(args.rounds):
        for index in range(len(runs)):
            shutil.rmtree(work / f"tiny-out-{index}-{round_index}", ignore_errors=True)
    floor_rate = count / floor.median
    print("\n" + header(f"{count} tiny inputs in nested folders, model-free test pipeline", args.rounds) + "\n")
    print("| configuration | seconds | inputs/s | vs floor |\n| --- | --- | --- | --- |")
    print(f"| bare-write floor (2 processes, atomic JSON writes, no dispatch) | {floor.median:.1f} | "
          f"{floor_rate:.0f} | 1.00x |")
    for run in scripts:
        rate = count / run.median
        print(f"| {run.name}, 2 instances, batch 64 (dispatch, JSON, run log) | {run.median:.1f} | "
              f"{rate:.0f} | {rate / floor_rate:.2f}x |")
    print()
    for run in scripts:
        print(f"{run.name}: coordinator peak resident memory {max(run.memory_mb)} MB")
    if len(scripts) == 2:
        print(versus_baseline(scripts, "inputs/s", higher_is_better=True, goal=0.9))
    print(load_note(load))


def log_start_up(script: Path, log: Path, lines: list[bytes], inputs: Path, out: Path, count: int) -> float:
    """Seconds of one whole no-op rerun (everything done) of `script` with `lines` as the run log."""
    log.write_bytes(b"".join(lines))
    command = python(str(script), "--pipeline", FAKE, "--input_dir", str(inputs), "--device", "cpu",
                     "--output_dir", str(out))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or f"0 input(s) to do, {count} already done" not in done.stderr:
        raise SystemExit(f"{script}: the rerun did not find everything done: {done.stderr[-500:]}")
    return seconds


def run_log_benchmark(args: argparse.Namespace, work: Path) -> None:
    """A cron rerun with nothing to do, over 1,000 inputs, with run logs of growing length:
    the live records alone, a long history of other inputs (an archive of past scans), and the
    same inputs redone many times (compacted by the first rerun). With --baseline, each round
    runs the baseline script and this one on the same log, one after the other."""
    count, records = 1000, args.run_log_records
    inputs, out = work / "log-inputs", work / "log-out"
    shutil.rmtree(out, ignore_errors=True)
    for i in range(count):
        (inputs / f"f{i:04d}.png").parent.mkdir(parents=True, exist_ok=True)
        (inputs / f"f{i:04d}.png").write_text(f"image {i}")
    first = subprocess.run(python(str(ROOT / "infer_mp.py"), "--pipeline", FAKE, "--input_dir", str(inputs),
                                  "--device", "cpu", "--output_dir", str(out)), capture_output=True, text=True)
    if first.returncode != 0:
        raise SystemExit(first.stderr)
    log = out / "infer_mp.runlog.jsonl"
    # Done records only (not `placing` records or a run's closing line): the same bytes for
    # every script; an older one passes over fields it does not know (`gen`).
    live = [line for line in log.read_bytes().splitlines(keepends=True) if json.loads(line).get("status") == "done"]
    if len(live) != count:
        raise SystemExit(f"the first run wrote {len(live)} done records for {count} inputs")
    template = json.loads(live[0])
    old = {**template, "time": "2020-01-01T00:00:00+00:00"}
    archive = [json.dumps({**old, "input": f"/archive/{i:07d}.png", "outputs": [f"archive/{i:07d}.json"]}).encode()
               + b"\n" for i in range(records - count)]
    superseded = [json.dumps({**json.loads(line), "time": old["time"]}).encode() + b"\n" for line in live]
    redone = superseded * (records // count - 1)
    rows = [("live records only", live), (f"{records:,} records: {records - count:,} of inputs no longer "
            "there + the live ones", archive + live),
            (f"{records:,} records: the same {count:,} inputs redone {records // count} times (compacted on the run)",
             redone + live)]
    scripts = contenders(args)
    compare = len(scripts) == 2
    load = os.getloadavg()[0]
    print("\n" + header(f"a rerun with nothing to do over {count:,} inputs, by run-log length", args.rounds) + "\n")
    print("| run log | lines | script | seconds | vs live only, same script |"
          + (" new vs baseline |" if compare else "") + " lines after |\n| --- | --- | --- | --- | --- |"
          + (" --- |" if compare else "") + " --- |", flush=True)
    live_only: dict[str, float] = {}
    summary = []
    for name, lines in rows:
        runs = [Contender(script.name, script.script) for script in scripts]
        after = {}
        for round_index in range(args.rounds):
            # Interleaved, the order turned each round (baseline, new; new, baseline; ...): the
            # second of a pair runs after the first one's million-record process (memory, caches).
            for run in runs if round_index % 2 == 0 else runs[::-1]:
                run.seconds.append(log_start_up(run.script, log, lines, inputs, out, count))
                after[run.name] = sum(1 for _ in open(log, "rb"))
        for run in runs:
            live_only.setdefault(run.name, run.median)
            cells = [name, f"{len(lines):,}", run.name, f"{run.median:.2f}", f"{run.median / live_only[run.name]:.2f}x"]
            if compare:
                cells.append(f"{run.median / runs[0].median:.2f}x" if run is runs[1] else "")
            print("| " + " | ".join([*cells, f"{after[run.name]:,}"]) + " |", flush=True)
        if compare:
            summary.append(f"{name}: " + versus_baseline(runs, "seconds", higher_is_better=False, goal=1.0))
    print("\n" + "\n".join([*summary, load_note(load)]))


# -- big PDFs -----------------------------------------------------------------------------------

SWEEP_PAGES = 40
SWEEP = (1, 4, 10, 25, 0)
PDF_RESOLUTION = 144  # PaddleX renders PDF pages at zoom 2 (144 dpi): the same pixels as the PNG


def short_page_texts(count: int) -> list[list[str]]:
    """6 to 8 lines of WORDS per page (about 0.3 s of OCR each); page i is the same in every
    set, so a 10-page PDF is the first 10 pages of the 300-page one."""
    rng = random.Random(11)
    return [[" ".join(rng.choice(WORDS) for _ in range(4)) + f" {rng.randint(10, 9999)}"
             for _ in range(rng.randint(6, 8))] for _ in range(count)]


def cached_pdf(folder: Path, count: int) -> Path:
    """A `count`-page PDF alone in `folder` (written once, kept under --work_dir)."""
    path = folder / f"doc{count:04d}.pdf"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        first, *rest = [render_page(lines) for lines in short_page_texts(count)]
        temporary = folder / f".{path.name}.tmp"
        first.save(temporary, format="PDF", save_all=True, append_images=rest, resolution=PDF_RESOLUTION)
        os.replace(temporary, path)
    return path


def cached_pngs(folder: Path, count: int) -> list[Path]:
    """The same pages as `count` single-page PNG files."""
    marker = folder / f".complete-{count}"
    paths = [folder / f"p{i:04d}.png" for i in range(count)]
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for path, lines in zip(paths, short_page_texts(count)):
            render_page(lines).save(path)
        marker.touch()
    return paths


@dataclass
class TreeRun:
    seconds: float
    cpu_seconds: float  # coordinator + its reaped children (the workers), from wait4
    polled_cpu_seconds: float  # coordinator + workers, last /proc/<pid>/stat seen of each (a lower bound)
    worker_rss_mb: float  # largest VmRSS of any worker, polled every 0.1 s
    worker_hwm_mb: float  # largest VmHWM of any worker, last read before it exited
    coordinator_hwm_mb: float
    workers: int  # worker processes seen
    log_lines: int
    worker_cpu: tuple[float, ...] = ()  # each worker's CPU seconds, busiest first

    @property
    def split(self) -> str:
        """Each worker's CPU seconds, busiest first, and the busiest one's share of them all:
        the balance, whatever else shares the machine."""
        total = sum(self.worker_cpu) or 1
        return f"{' / '.join(f'{cpu:.0f}' for cpu in self.worker_cpu)} ({self.worker_cpu[0] / total:.0%})"


def proc_children(pid: int) -> list[int]:
    """Child processes of `pid`, from /proc/*/stat (the ppid field)."""
    children = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def proc_sample(pid: int) -> tuple[float, int, int] | None:
    """(CPU seconds, VmRSS kB, VmHWM kB) of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/status") as handle:
            status = {line.split(":")[0]: line.split()[1] for line in handle if line.startswith(("VmRSS", "VmHWM"))}
    except (OSError, IndexError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return cpu, int(status.get("VmRSS", 0)), int(status.get("VmHWM", 0))


def is_worker(pid: int) -> bool:
    """A spawned worker, not multiprocessing's resource tracker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read()
    except OSError:
        return False
    return b"spawn_main" in command and b"resource_tracker" not in command


def watch_tree(pid: int, stop: threading.Event, seen: dict) -> None:
    """Every 0.1 s until `stop`: the coordinator's and each worker's latest CPU seconds and the
    largest VmHWM and VmRSS seen (seen[pid] = [cpu, hwm, max rss]); a zombie has no Vm lines."""
    while not stop.is_set():
        for child in [pid] + [c for c in proc_children(pid) if c in seen or is_worker(c)]:
            sample = proc_sample(child)
            if sample is not None:
                cpu, rss, hwm = sample
                previous = seen.get(child, [0.0, 0, 0])
                seen[child] = [max(previous[0], cpu), max(previous[1], hwm), max(previous[2], rss)]
        stop.wait(0.1)


def run_tree(command: list[str], out: Path, expected: int, work: Path) -> TreeRun:
    """One whole infer_mp.py run: wall seconds, CPU seconds of the process tree, worker memory."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = work / "big-pdf-stderr.txt"
    os.sync()
    with open(log, "wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        seen: dict[int, list] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=watch_tree, args=(process.pid, stop, seen), daemon=True)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        watcher.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)}\nfailed ({process.returncode}):\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
    produced = sum(1 for _ in out.rglob("*.json"))
    if produced != expected:
        raise SystemExit(f"{' '.join(command)}\n{produced} page JSON files for {expected} pages")
    run_log = out / "infer_mp.runlog.jsonl"
    workers = [sample for pid, sample in seen.items() if pid != process.pid]
    return TreeRun(
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        polled_cpu_seconds=sum(sample[0] for sample in seen.values()),
        worker_rss_mb=max((sample[2] for sample in workers), default=0) / 1024,
        worker_hwm_mb=max((sample[1] for sample in workers), default=0) / 1024,
        coordinator_hwm_mb=seen.get(process.pid, [0, 0, 0])[1] / 1024,
        workers=len(workers),
        log_lines=sum(1 for _ in open(run_log, "rb")) if run_log.exists() else 0,
        worker_cpu=tuple(sorted((sample[0] for sample in workers), reverse=True)),
    )


@dataclass
class BigRow:
    name: str
    input_dir: Path
    pages: int
    pages_per_task: int | None  # None: the default
    runs: list[TreeRun] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in self.runs)

    def peak(self, attribute: str) -> float:
        return max(getattr(run, attribute) for run in self.runs)

    @property
    def typical(self) -> TreeRun:
        """The round whose wall seconds are the median (for figures that are not averaged)."""
        return sorted(self.runs, key=lambda run: run.seconds)[len(self.runs) // 2]

    @property
    def setting(self) -> str:
        return "default (10)" if self.pages_per_task is None else str(self.pages_per_task)


def expected_ranges(pages: int, pages_per_task: int | None, workers: int = 2) -> int:
    """Page-range tasks of one wholly-to-do document, by infer_mp.py's rule (1: not split)."""
    per_task = 10 if pages_per_task is None else pages_per_task
    if not per_task:
        return 1
    size = max(1, min(per_task, -(-pages // workers)))
    return 1 if pages <= size else math.ceil(pages / size)


def cpu_pressure() -> str:
    """The kernel's share of the last 5 minutes in which some task waited for a CPU, if it says."""
    try:
        with open("/proc/pressure/cpu") as handle:
            some = handle.readline().split()
    except OSError:
        return ""
    return f", CPU pressure {float(some[3].split('=')[1]):.0f}% (some, last 5 min)"


def big_pdf_benchmark(args: argparse.Namespace, work: Path) -> None:
    """Long PDFs: the largest worker's memory by page count, one PDF against the same pages as
    images, and --pages_per_task swept; every run 2 CPU instances, real OCR."""
    n = args.big_pdf
    inputs = work / "big-pdf-inputs"
    small = min(10, n)
    cached_pdf(inputs / f"pdf{small}", small)
    cached_pdf(inputs / f"pdf{n}", n)
    cached_pngs(inputs / f"png{n}", n)
    cached_pdf(inputs / f"pdf{SWEEP_PAGES}", SWEEP_PAGES)
    pdf_small = BigRow(f"{small}-page PDF", inputs / f"pdf{small}", small, None)
    pdf_big = BigRow(f"{n}-page PDF", inputs / f"pdf{n}", n, None)
    pdf_whole = BigRow(f"{n}-page PDF, whole file (old behaviour)", inputs / f"pdf{n}", n, 0)
    pngs = BigRow(f"{n} single-page PNG files", inputs / f"png{n}", n, None)
    sweep = [BigRow(f"{SWEEP_PAGES}-page PDF", inputs / f"pdf{SWEEP_PAGES}", SWEEP_PAGES, value) for value in SWEEP]
    rows = [pdf_small, pdf_big, pdf_whole, pngs, *sweep]
    out = work / "big-pdf-out"
    load_before = os.getloadavg()[0]
    print(f"measuring {len(rows)} runs x {args.rounds} rounds ({sum(r.pages for r in rows) * args.rounds} pages "
          "of real OCR) ...", file=sys.stderr)
    for round_index in range(args.rounds):
        for row in rows:  # interleaved: A B C A B C ...
            command = python(str(ROOT / "infer_mp.py"), "--pipeline", PIPELINE, "--input_dir", str(row.input_dir),
                             "--device", "cpu", "--instances_per_device", "2", "--output_dir", str(out),
                             "--progress_interval", "3600")
            if row.pages_per_task is not None:
                command += ["--pages_per_task", str(row.pages_per_task)]
            row.runs.append(run_tree(command, out, row.pages, work))
            last = row.runs[-1]
            print(f"  round {round_index + 1}: {row.name}, --pages_per_task {row.setting}: {last.seconds:.1f} s, "
                  f"CPU {last.cpu_seconds:.1f} s (polled {last.polled_cpu_seconds:.1f} s), worker peak "
                  f"{last.worker_rss_mb:.0f} MB RSS / {last.worker_hwm_mb:.0f} MB HWM, worker CPU s {last.split}, "
                  f"{last.log_lines} run-log lines", file=sys.stderr, flush=True)

    rounds = "ONE round: every figure a single run" if args.rounds == 1 else "seconds and CPU seconds: median"
    note = (f"2 instances x 1 thread on CPU; {rounds}; memory: the highest of the rounds; CPU s = coordinator + "
            f"workers (wait4); worker RSS polled every 0.1 s; 1-minute load average {load_before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after, on {cores()} cores{cpu_pressure()}: above {cores()}, other work "
            "shared the machine and wall seconds are inflated, CPU seconds are the steadier figure")
    print("\n" + header(f"long PDFs: worker memory by page count ({note})", args.rounds) + "\n")
    print("| input | --pages_per_task | page ranges | seconds | CPU s | largest worker peak RSS MB | its VmHWM MB "
          "| coordinator VmHWM MB | run-log lines |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in (pdf_small, pdf_big, pdf_whole):
        print(f"| {row.name} | {row.setting} | {expected_ranges(row.pages, row.pages_per_task)} | "
              f"{row.median('seconds'):.1f} | {row.median('cpu_seconds'):.1f} | {row.peak('worker_rss_mb'):.0f} | "
              f"{row.peak('worker_hwm_mb'):.0f} | {row.peak('coordinator_hwm_mb'):.0f} | {row.runs[0].log_lines} |")

    print("\n" + header(f"long PDFs: one {n}-page PDF against the same pages as images (the same runs as above "
                        "for the PDF rows)", args.rounds) + "\n")
    print("| input | --pages_per_task | seconds | CPU s | pages/s | vs whole file | each worker's CPU s "
          "(busiest's share) |\n| --- | --- | --- | --- | --- | --- | --- |")
    for row in (pdf_big, pngs, pdf_whole):
        seconds = row.median("seconds")
        print(f"| {row.name} | {row.setting} | {seconds:.1f} | {row.median('cpu_seconds'):.1f} | {n / seconds:.2f} | "
              f"{pdf_whole.median('seconds') / seconds:.2f}x | {row.typical.split} |")

    print("\n" + header(f"--pages_per_task on one {SWEEP_PAGES}-page PDF", args.rounds) + "\n")
    print("| --pages_per_task | page ranges | seconds | CPU s | pages/s | each worker's CPU s (busiest's share) | "
          "largest worker peak RSS MB | run-log lines |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in sweep:
        seconds = row.median("seconds")
        print(f"| {row.pages_per_task}{' (default)' if row.pages_per_task == 10 else ''} | "
              f"{expected_ranges(row.pages, row.pages_per_task)} | {seconds:.1f} | {row.median('cpu_seconds'):.1f} | "
              f"{row.pages / seconds:.2f} | {row.typical.split} | {row.peak('worker_rss_mb'):.0f} | "
              f"{row.runs[0].log_lines} |")
    short = [row for row in rows for run in row.runs if run.cpu_seconds < 0.9 * run.polled_cpu_seconds]
    if short:
        print(f"\nnote: wait4's CPU seconds fell short of the polled ones for {len(short)} run(s): workers not reaped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8, help="pages per set (default 8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, or e.g. gpu:0,1 on a GPU box")
    parser.add_argument("--orchestration", type=int, default=0, metavar="N",
                        help="instead: dispatch cost over N tiny inputs with the model-free pipeline")
    parser.add_argument("--engines", action="store_true",
                        help="instead: infer_mp.py on each CPU engine beside the peer rapidocr-openvino")
    parser.add_argument("--peers", action="store_true",
                        help="instead: infer_mp.py on PP-OCRv6_small beside rapidocr 3.10, faster-paddle and "
                        "PaddleOCR's predict (peers in virtual environments of their own, made under --peer_venv)")
    parser.add_argument("--backends", action="store_true",
                        help="instead: the Ray backend against the local one (needs requirements-ray.txt)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="with --backends: more infer_mp.py flags for every run, e.g. --engine onnxruntime")
    parser.add_argument("--peer_venv", help="virtual environment for the peer of --engines (created if missing); "
                        "with --peers, the folder of the peers' environments")
    parser.add_argument("--no_peer", action="store_true", help="--engines without the peer")
    parser.add_argument("--run_log_records", type=int, default=0, metavar="N",
                        help="instead: start-up of a rerun with nothing to do, with a run log of N records")
    parser.add_argument("--big_pdf", type=int, default=0, metavar="N",
                        help="instead: long PDFs (N pages) against images and whole-file runs, and a "
                        "--pages_per_task sweep: worker memory, balance, CPU seconds")
    parser.add_argument("--baseline", metavar="SCRIPT",
                        help="with --orchestration, --run_log_records or --peers: another infer_mp.py (e.g. an earlier "
                        "commit's) run in the same rounds, interleaved, beside this one, with a new-vs-baseline ratio")
    parser.add_argument("--work_dir", help="where inputs and outputs go (default: a new temporary folder, "
                        "named on stderr and kept)")
    args = parser.parse_args()
    os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
    if args.baseline and not (args.orchestration or args.run_log_records or args.peers):
        parser.error("--baseline goes with --orchestration, --run_log_records or --peers")
    # Resolved: infer_mp.py keys inputs on their folder's real path, and old and new must agree.
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="infer_mp-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", file=sys.stderr)
    if args.big_pdf:
        big_pdf_benchmark(args, work)
    elif args.orchestration:
        orchestration_benchmark(args, work)
    elif args.run_log_records:
        run_log_benchmark(args, work)
    elif args.backends:
        backend_benchmark(args, work)
    elif args.engines:
        engine_benchmark(args, work)
    elif args.peers:
        peers_benchmark(args, work)
    else:
        ocr_benchmark(args, work)


if __name__ == "__main__":
    main()
