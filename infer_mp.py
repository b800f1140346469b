#!/usr/bin/env python3
"""infer_mp.py: multi-device batch OCR with PaddleOCR / PaddleX pipelines.

A drop-in replacement for the `infer_mp.py` example in PaddleOCR's "Parallel Inference in
Pipeline" guide: the same flags with the same defaults, plus one or many devices (CPU
included), collision-free outputs, failure isolation and clear exit codes.

    python infer_mp.py --pipeline PPStructureV3 --input_dir scans/ \
        --device gpu:0,1,2,3 --instances_per_device 2 --batch_size 4 --output_dir out/

The file reads top to bottom in the order data flows:
CLI -> devices -> pipeline -> inputs -> dispatch -> worker -> output -> report.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import enum
import importlib
import importlib.util
import inspect
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Iterable, Iterator

PROG = "infer_mp.py"

# File types PaddleX's image batch sampler reads (paddlex ImageBatchSampler.IMG_SUFFIX + PDF).
IMAGE_SUFFIXES = frozenset(
    ".bmp .dib .jpeg .jpg .png .webp .pbm .pgm .ppm .pnm .sr .ras .tif .tiff".split()
)
# Inputs whose results carry a page index, so their outputs are named `{stem}_{page}.json`.
PAGED_SUFFIXES = frozenset({".pdf", ".tif", ".tiff"})
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES | PAGED_SUFFIXES
DEFAULT_GLOB_PATTERN = "*"
NOT_PIPELINES = ("Client", "Error", "Options", "Model")  # paddleocr exports that are not pipelines
MAX_ATTEMPTS = 3  # times an input may be in a worker that dies before it counts as failed
POLL_SECONDS = 1.0  # how often the coordinator wakes with nothing to read
PROGRESS_SECONDS = 30.0  # interval between progress lines
STOP_GRACE_SECONDS = 10.0  # time a worker gets to exit after "stop" before it is killed
PADDLEX_LOG_LEVEL = "WARNING"  # in workers: PaddleX's per-model INFO lines, times N workers, are noise


class ExitCode(enum.IntEnum):
    """Process exit codes; documented in --help and the README."""

    OK = 0  # every input was processed
    INPUTS_FAILED = 1  # the run finished, but some inputs failed (named on stderr)
    USAGE = 2  # bad command line or environment; nothing was processed
    NO_WORKERS = 3  # no worker could create its pipeline; nothing more could be processed
    INTERRUPTED = 130  # Ctrl-C


class UsageError(Exception):
    """A mistake the user can fix (flag, path, device, pipeline): one line, exit code 2."""


def say(message: str) -> None:
    """One line for the user, on stderr, so that stdout stays clean for pipes."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# CLI -> Config
# ---------------------------------------------------------------------------------------------

EPILOG = """\
exit codes:
  0    every input was processed
  1    the run finished, but some inputs failed (each is named on stderr)
  2    usage error (flag, path, device, pipeline); nothing was processed
  3    no worker could create its pipeline
  130  interrupted (Ctrl-C)

outputs: one JSON per page under --output_dir, mirroring each input's folder relative to
--input_dir: `{stem}.json` for an image, `{stem}_{page}.json` for a PDF or TIFF page. Inputs whose
names would collide in one folder (a.jpg beside a.png) use their full file name instead
(`a.jpg.json`, `a.png.json`).
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and the fix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        say(f"error: {message} (see --help)")
        sys.exit(ExitCode.USAGE)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Batch OCR over a folder of images and PDFs on one or many devices.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The seed script's flags: same names, meanings and defaults.
    parser.add_argument(
        "--pipeline",
        required=True,
        help="PaddleOCR pipeline class, e.g. 'PaddleOCR', 'PPStructureV3', 'DocPreprocessor'; "
        "or your own class as 'package.module:Class' or 'path/to/file.py:Class'.",
    )
    parser.add_argument("--input_dir", required=True, help="Input directory.")
    parser.add_argument(
        "--device",
        required=True,
        help="Devices to run on: 'cpu', 'gpu', 'gpu:0', 'gpu:0,1,2,3' (PaddleX syntax).",
    )
    parser.add_argument("--output_dir", default="output", help="Output directory (default: output).")
    parser.add_argument(
        "--instances_per_device",
        type=positive_int,
        default=1,
        help="Number of pipeline instances (worker processes) per device (default: 1).",
    )
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=1,
        help="Inputs passed to each predict() call by each instance (default: 1).",
    )
    parser.add_argument(
        "--input_glob_pattern",
        default=DEFAULT_GLOB_PATTERN,
        help="Pattern, relative to --input_dir, of the files to process (default: '*': "
        "the images and PDFs at the top of --input_dir). '**/*.jpg' recurses.",
    )
    # Our additions.
    parser.add_argument(
        "--cpu_threads",
        type=positive_int,
        default=None,
        help="CPU threads per instance. Default on CPU: the available cores divided among the "
        "instances, so that they do not oversubscribe the machine.",
    )
    return parser


@dataclass(frozen=True)
class Config:
    """The validated command line."""

    pipeline: str
    input_dir: Path
    output_dir: Path
    device: str
    instances_per_device: int
    batch_size: int
    input_glob_pattern: str
    cpu_threads: int | None


def parse_config(argv: list[str] | None) -> Config:
    args = build_parser().parse_args(argv)
    input_dir = Path(args.input_dir)
    if not input_dir.exists():
        raise UsageError(f"the input directory does not exist: {str(input_dir)!r}")
    if not input_dir.is_dir():
        raise UsageError(f"--input_dir is not a directory: {str(input_dir)!r}")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir exists and is not a directory: {str(output_dir)!r}")
    return Config(
        pipeline=args.pipeline.strip(),
        input_dir=input_dir.absolute(),
        output_dir=output_dir.absolute(),
        device=args.device,
        instances_per_device=args.instances_per_device,
        batch_size=args.batch_size,
        input_glob_pattern=args.input_glob_pattern,
        cpu_threads=args.cpu_threads,
    )


# ---------------------------------------------------------------------------------------------
# Devices -> worker plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: where it runs and with how many CPU threads."""

    slot: int
    device: str
    cpu_threads: int | None


def available_cores() -> int:
    """Cores this process may use (respects taskset and container CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_device_arg(text: str) -> tuple[str, list[int] | None]:
    """PaddleX's `parse_device`, with its bare asserts turned into a message and a fix."""
    from paddlex.utils.device import SUPPORTED_DEVICE_TYPE, parse_device

    cleaned = text.strip().replace(" ", "")
    hint = "use e.g. 'cpu', 'gpu', 'gpu:0' or 'gpu:0,1,2,3'"
    if ":" in cleaned and "" in cleaned.split(":", 1)[1].split(","):
        raise UsageError(f"malformed --device {text!r}: empty device id ({hint})")
    device_type = cleaned.split(":", 1)[0].lower()
    if device_type not in SUPPORTED_DEVICE_TYPE:
        raise UsageError(
            f"unsupported device type {device_type!r} in --device {text!r}; "
            f"supported: {', '.join(SUPPORTED_DEVICE_TYPE)} ({hint})"
        )
    try:
        return parse_device(cleaned)
    except (ValueError, AssertionError) as error:
        detail = f": {error}" if str(error) else ""
        raise UsageError(f"malformed --device {text!r}{detail} ({hint})") from None


def import_paddle_quietly() -> Any:
    """Import paddle without its ccache UserWarning on the user's terminal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle
    return paddle


def count_devices(paddle: Any, device_type: str) -> tuple[bool, int]:
    """(is this Paddle build able to use `device_type`, how many such devices are visible)."""
    if device_type in ("gpu", "dcu", "iluvatar_gpu"):
        compiled = paddle.device.is_compiled_with_cuda() or paddle.device.is_compiled_with_rocm()
        return compiled, paddle.device.cuda.device_count() if compiled else 0
    if device_type == "xpu":
        compiled = paddle.device.is_compiled_with_xpu()
        return compiled, paddle.device.xpu.device_count() if compiled else 0
    visible = paddle.device.get_available_custom_device() or []
    count = sum(1 for name in visible if name.split(":")[0] == device_type)
    return count > 0, count


def check_devices_present(device_type: str, device_ids: list[int]) -> None:
    """Refuse an absent accelerator up front: PaddleX would only warn and fall back to CPU."""
    if device_type == "cpu":
        return
    paddle = import_paddle_quietly()
    compiled, count = count_devices(paddle, device_type)
    if not compiled:
        raise UsageError(
            f"--device asks for {device_type.upper()}, but this Paddle build cannot use it "
            f"(paddle {paddle.__version__}); install the {device_type} build of paddlepaddle "
            "(see README, 'GPU install'), or use --device cpu"
        )
    missing = [i for i in device_ids if i >= count]
    if missing:
        raise UsageError(
            f"--device asks for {device_type}:{','.join(map(str, missing))}, but only {count} "
            f"{device_type} device(s) are visible (ids 0..{count - 1}; check CUDA_VISIBLE_DEVICES)"
        )


def plan_workers(config: Config) -> list[WorkerSpec]:
    """One spec per (device, instance); on CPU, split the cores among the instances."""
    from paddlex.utils.device import constr_device

    device_type, device_ids = parse_device_arg(config.device)
    instances = config.instances_per_device
    if device_type == "cpu":
        threads = config.cpu_threads or max(1, available_cores() // instances)
        return [WorkerSpec(slot, "cpu", threads) for slot in range(instances)]
    device_ids = device_ids or [0]
    check_devices_present(device_type, device_ids)
    devices = [constr_device(device_type, [i]) for i in device_ids for _ in range(instances)]
    return [WorkerSpec(slot, device, config.cpu_threads) for slot, device in enumerate(devices)]


def describe_plan(plan: list[WorkerSpec]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for spec in plan:
        counts[spec.device] += 1
    devices = ", ".join(f"{device} x{n}" for device, n in counts.items())
    threads = {spec.cpu_threads for spec in plan} - {None}
    thread_text = f", {threads.pop()} CPU thread(s) each" if len(threads) == 1 else ""
    return f"{len(plan)} worker(s) on {devices}{thread_text}"


# ---------------------------------------------------------------------------------------------
# Pipeline: resolved in the coordinator without importing it, loaded in each worker
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineRef:
    """Where the pipeline class lives: a module name or a .py file, and the class name."""

    module: str
    name: str
    is_file: bool = False


def top_level_names(source_path: str) -> set[str] | None:
    """Names a module defines at top level, read without running it (None if unreadable)."""
    try:
        tree = ast.parse(Path(source_path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def paddleocr_exports() -> list[str] | None:
    """The class names in `paddleocr.__all__`, read from its source: importing costs seconds."""
    spec = importlib.util.find_spec("paddleocr")
    if spec is None or spec.origin is None:
        return None
    try:
        tree = ast.parse(Path(spec.origin).read_bytes())
    except (OSError, SyntaxError):
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            try:
                names = ast.literal_eval(node.value)
            except ValueError:
                return []
            return [n for n in names if n[:1].isupper() and not n.endswith(NOT_PIPELINES)]
    return []


def unknown_name_error(name: str, where: str, known: Iterable[str]) -> UsageError:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return UsageError(f"no pipeline class {name!r} in {where}{hint}")


def resolve_pipeline(text: str) -> PipelineRef:
    """Check --pipeline before any worker starts, with close matches for a typo."""
    if ":" not in text:
        exports = paddleocr_exports()
        if exports is None:
            raise UsageError("paddleocr is not installed: run pip install -r requirements.txt")
        if exports and text not in exports:
            raise unknown_name_error(text, "paddleocr", exports)
        return PipelineRef("paddleocr", text)
    module, name = text.rsplit(":", 1)
    if not module or not name.isidentifier():
        raise UsageError(f"--pipeline {text!r}: expected 'module:Class' or 'file.py:Class'")
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module).absolute()
        if not path.is_file():
            raise UsageError(f"--pipeline {text!r}: no such file {str(path)!r}")
        source = str(path)
        ref = PipelineRef(source, name, is_file=True)
    else:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as error:
            raise UsageError(f"--pipeline {text!r}: cannot find module {module!r}: {error}") from None
        if spec is None:
            raise UsageError(f"--pipeline {text!r}: no module named {module!r} (is it on PYTHONPATH?)")
        source = spec.origin or ""
        ref = PipelineRef(module, name)
    names = top_level_names(source) if source.endswith(".py") else None
    if names is not None and name not in names:
        raise unknown_name_error(name, module, names)
    return ref


def load_pipeline_class(ref: PipelineRef) -> type:
    """Import the class (in a worker). A file's folder goes on sys.path for its own imports."""
    if ref.is_file:
        folder = str(Path(ref.module).parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_name = f"_infer_mp_user_{Path(ref.module).stem}"
        spec = importlib.util.spec_from_file_location(module_name, ref.module)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(ref.module)
    if not hasattr(module, ref.name):
        raise AttributeError(f"module {ref.module!r} has no attribute {ref.name!r}")
    return getattr(module, ref.name)


def accepts_keyword(cls: type, keyword: str) -> bool:
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in parameters)


def create_pipeline(ref: PipelineRef, spec: WorkerSpec) -> Any:
    cls = load_pipeline_class(ref)
    logging.getLogger("paddlex").setLevel(PADDLEX_LOG_LEVEL)  # set up when paddlex was imported
    kwargs: dict[str, Any] = {"device": spec.device}
    if spec.cpu_threads is not None and accepts_keyword(cls, "cpu_threads"):
        kwargs["cpu_threads"] = spec.cpu_threads
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Inputs -> tasks, with collision-free output names decided up front
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One input file and where its pages go. `index` is its place in the sorted input list."""

    index: int
    path: str  # absolute path handed to predict()
    rel: str  # path relative to --input_dir, for messages
    out_dir: str  # folder of its JSON files
    out_base: str  # outputs are {out_base}.json, or {out_base}_{page}.json for pages

    def output_path(self, page_index: int | None) -> str:
        name = self.out_base if page_index is None else f"{self.out_base}_{page_index}"
        return os.path.join(self.out_dir, name + ".json")


@dataclass
class InputSelection:
    paths: list[Path]
    skipped: int  # matches that were directories or (with the default pattern) unreadable types


def find_inputs(input_dir: Path, pattern: str) -> InputSelection:
    """Files matching the pattern, sorted. Directories are never inputs, and with the default
    pattern only the types the pipeline reads are taken; everything passed over is counted."""
    try:
        matches = list(input_dir.glob(pattern))
    except (ValueError, NotImplementedError) as error:
        raise UsageError(f"bad --input_glob_pattern {pattern!r}: {error} (use a pattern relative to --input_dir)") from None
    paths, skipped = set(), 0
    for path in matches:
        if ".." in path.relative_to(input_dir).parts:
            raise UsageError(f"--input_glob_pattern {pattern!r} reaches outside --input_dir")
        readable = pattern != DEFAULT_GLOB_PATTERN or path.suffix.lower() in SUPPORTED_SUFFIXES
        if path.is_file() and readable:
            paths.add(path)
        else:
            skipped += 1
    return InputSelection(sorted(paths), skipped)


PAGE_NAME = re.compile(r"(.+)_(0|[1-9][0-9]*)")


def colliding(claims: dict[int, tuple[str, bool]]) -> set[int]:
    """Ids whose output names overlap. A claim is (base, paged): an image writes `base.json`,
    a paged input `base_N.json` for every N, so image `a_3` collides with paged `a`."""
    owners: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for key, claim in claims.items():
        owners[claim].append(key)
    clashes = {key for keys in owners.values() if len(keys) > 1 for key in keys}
    for key, (base, paged) in claims.items():
        match = None if paged else PAGE_NAME.fullmatch(base)
        if match and (match.group(1), True) in owners:
            clashes.add(key)
            clashes.update(owners[(match.group(1), True)])
    return clashes


def output_bases(names: list[str]) -> list[str]:
    """Seed names (the stem) where unique in a folder; otherwise the full file name; in the
    rare case that still collides, the full name plus `~N`. Deterministic for a given set."""
    paged = [Path(n).suffix.lower() in PAGED_SUFFIXES for n in names]
    claims = {i: (Path(n).stem, paged[i]) for i, n in enumerate(names)}
    for i in colliding(claims):
        claims[i] = (names[i], paged[i])
    extra = 1
    while clashes := colliding(claims):
        for i in sorted(clashes)[1:]:
            claims[i] = (f"{names[i]}~{extra}", paged[i])
        extra += 1
    return [claims[i][0] for i in range(len(names))]


def plan_tasks(input_dir: Path, output_dir: Path, paths: list[Path]) -> list[Task]:
    """Give every input its output folder (mirroring --input_dir) and a unique base name."""
    folders: dict[Path, list[int]] = defaultdict(list)
    rels = [path.relative_to(input_dir) for path in paths]
    for i, rel in enumerate(rels):
        folders[rel.parent].append(i)
    bases: dict[int, str] = {}
    for members in folders.values():
        for i, base in zip(members, output_bases([rels[i].name for i in members])):
            bases[i] = base
    return [
        Task(i, str(path), str(rels[i]), str(output_dir / rels[i].parent), bases[i])
        for i, path in enumerate(paths)
    ]


# ---------------------------------------------------------------------------------------------
# Dispatch: the seam between the coordinator and whatever runs the workers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerStarted:
    spec: WorkerSpec
    seconds: float


@dataclass(frozen=True)
class WorkerFailedToStart:
    spec: WorkerSpec
    error: str


@dataclass(frozen=True)
class WorkerLost:
    spec: WorkerSpec
    reason: str
    requeued: int


@dataclass(frozen=True)
class TaskDone:
    task: Task
    spec: WorkerSpec
    outputs: list[str]
    seconds: float


@dataclass(frozen=True)
class TaskFailed:
    task: Task
    spec: WorkerSpec
    error: str


Event = WorkerStarted | WorkerFailedToStart | WorkerLost | TaskDone | TaskFailed


@dataclass
class WorkerHandle:
    """The coordinator's view of one worker process and the tasks it holds."""

    spec: WorkerSpec
    process: multiprocessing.process.BaseProcess
    conn: Connection
    started_at: float
    ready: bool = False
    held: dict[int, Task] = field(default_factory=dict)


class LocalBackend:
    """Worker processes on this machine, one per WorkerSpec, each with its own pipe.

    The coordinator hands out batches and remembers what each worker holds until the worker
    reports it, so a worker that dies gives its inputs back instead of losing them.
    """

    def __init__(self, pipeline: PipelineRef, batch_size: int, max_attempts: int = MAX_ATTEMPTS):
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.context = multiprocessing.get_context("spawn")  # Paddle and fork do not mix

    def run(self, tasks: list[Task], plan: list[WorkerSpec]) -> Iterator[Event]:
        pending: deque[Task] = deque(tasks)
        attempts: dict[int, int] = defaultdict(int)
        workers = {spec.slot: self._start(spec) for spec in plan}
        try:
            while workers and (pending or any(w.held for w in workers.values())):
                for worker in workers.values():
                    self._feed(worker, pending, attempts)
                handles = {w.conn: w for w in workers.values()}
                sentinels = {w.process.sentinel: w for w in workers.values()}
                for ready in wait([*handles, *sentinels], timeout=POLL_SECONDS):
                    if ready in handles:
                        message = self._read(handles[ready])
                        if message is not None:
                            yield from self._handle(handles[ready], message, workers)
                    elif workers.get(sentinels[ready].spec.slot) is sentinels[ready]:
                        yield from self._lost(sentinels[ready], workers, pending, attempts)
        finally:
            self._shutdown(workers.values())

    def _start(self, spec: WorkerSpec) -> WorkerHandle:
        parent, child = self.context.Pipe()
        process = self.context.Process(
            target=worker_main,
            args=(spec, self.pipeline, child),
            name=f"infer_mp-worker-{spec.slot}",
            daemon=True,
        )
        # Workers inherit SIG_IGN for Ctrl-C: the coordinator alone decides how to stop.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        child.close()
        return WorkerHandle(spec, process, parent, time.monotonic())

    def _feed(self, worker: WorkerHandle, pending: deque[Task], attempts: dict[int, int]) -> None:
        """Keep each ready worker one batch ahead, so it never waits for the next one.
        An input that was in a worker that died goes alone, so it cannot take others down."""
        while worker.ready and pending and len(worker.held) <= self.batch_size:
            batch = [pending.popleft()]
            if not attempts[batch[0].index]:
                while pending and len(batch) < self.batch_size and not attempts[pending[0].index]:
                    batch.append(pending.popleft())
            worker.held.update((task.index, task) for task in batch)
            try:
                worker.conn.send(("batch", batch))
            except OSError:
                return  # it died; its sentinel fires next and its held inputs are requeued

    @staticmethod
    def _read(worker: WorkerHandle) -> tuple | None:
        """The worker's next message, or None once it is gone (its sentinel reports that)."""
        try:
            return worker.conn.recv()
        except (EOFError, OSError):
            return None

    def _handle(self, worker: WorkerHandle, message: tuple, workers: dict[int, WorkerHandle]) -> Iterator[Event]:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            yield WorkerStarted(worker.spec, time.monotonic() - worker.started_at)
        elif kind == "init_failed":
            del workers[worker.spec.slot]
            self._shutdown([worker])
            yield WorkerFailedToStart(worker.spec, message[1])
        elif kind == "done":
            _, index, outputs, seconds = message
            yield TaskDone(worker.held.pop(index), worker.spec, outputs, seconds)
        elif kind == "failed":
            _, index, error = message
            yield TaskFailed(worker.held.pop(index), worker.spec, error)

    def _lost(
        self,
        worker: WorkerHandle,
        workers: dict[int, WorkerHandle],
        pending: deque[Task],
        attempts: dict[int, int],
    ) -> Iterator[Event]:
        """A worker died: read what it managed to report, requeue the rest, replace it."""
        while worker.conn.poll() and (message := self._read(worker)) is not None:
            yield from self._handle(worker, message, workers)
            if workers.get(worker.spec.slot) is not worker:  # it had reported an init failure
                return
        worker.process.join()
        reason = exit_reason(worker.process.exitcode)
        del workers[worker.spec.slot]
        if not worker.ready:
            yield WorkerFailedToStart(worker.spec, f"worker process {reason} while starting")
            return
        requeue = []
        for task in worker.held.values():
            attempts[task.index] += 1
            if attempts[task.index] >= self.max_attempts:
                yield TaskFailed(
                    task, worker.spec, f"worker {reason} {attempts[task.index]} times on this input"
                )
            else:
                requeue.append(task)
        pending.extendleft(reversed(requeue))
        yield WorkerLost(worker.spec, reason, len(requeue))
        workers[worker.spec.slot] = self._start(worker.spec)

    def _shutdown(self, workers: Iterable[WorkerHandle]) -> None:
        workers = list(workers)
        for worker in workers:
            try:
                worker.conn.send(("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()


def exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# ---------------------------------------------------------------------------------------------
# Worker: runs in its own process; builds the pipeline once, then predicts batch after batch
# ---------------------------------------------------------------------------------------------


def worker_main(spec: WorkerSpec, pipeline_ref: PipelineRef, conn: Connection) -> None:
    """Entry point of a worker process (spawned, so nothing is inherited but the arguments)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline = create_pipeline(pipeline_ref, spec)
    except BaseException as error:  # report any failure, then exit: the coordinator decides
        conn.send(("init_failed", one_line(error)))
        return
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the coordinator is gone
        if message[0] == "stop":
            return
        for report in process_batch(pipeline, message[1]):
            conn.send(report)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {text}"


def predict_pages(pipeline: Any, tasks: list[Task]) -> dict[int, list[Any]]:
    """Run one predict() call for the batch and group the page results by task."""
    by_path = {task.path: task.index for task in tasks}
    pages: dict[int, list[Any]] = defaultdict(list)
    for result in pipeline.predict([task.path for task in tasks]):
        source = str(result["input_path"])
        index = by_path.get(source)
        if index is None:
            index = by_path.get(os.path.abspath(source))
        if index is None:
            raise RuntimeError(f"pipeline returned a result for an unknown input {source!r}")
        pages[index].append(result)
    return pages


def process_batch(pipeline: Any, tasks: list[Task]) -> Iterator[tuple]:
    """Predict a batch and save its pages. If the batch raises, predict each input alone,
    so that a corrupt file costs only itself. Yields one report per task."""
    started = time.monotonic()
    try:
        pages = predict_pages(pipeline, tasks)
    except Exception as error:
        if len(tasks) > 1:
            for task in tasks:
                yield from process_batch(pipeline, [task])
        else:
            yield ("failed", tasks[0].index, one_line(error))
        return
    seconds = (time.monotonic() - started) / len(tasks)
    for task in tasks:
        results = pages.get(task.index)
        if not results:
            yield ("failed", task.index, "no result: not a readable image or PDF for this pipeline")
            continue
        try:
            outputs = [save_page(task, result) for result in results]
        except Exception as error:
            yield ("failed", task.index, f"cannot save output: {one_line(error)}")
        else:
            yield ("done", task.index, outputs, seconds)


# ---------------------------------------------------------------------------------------------
# Output: one JSON per page, written atomically
# ---------------------------------------------------------------------------------------------


def temporary_path(final: str) -> str:
    """A hidden name beside the final one; ends in .json because save_to_json requires it."""
    folder, name = os.path.split(final)
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp.json")


def save_page(task: Task, result: Any) -> str:
    """Write with the result's own save_to_json to a temporary file, then rename: a killed
    run never leaves a truncated JSON under a final name."""
    page_index = result.get("page_index") if hasattr(result, "get") else None
    final = task.output_path(page_index)
    os.makedirs(task.out_dir, exist_ok=True)
    temporary = temporary_path(final)
    try:
        result.save_to_json(temporary)
        os.replace(temporary, final)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return final


# ---------------------------------------------------------------------------------------------
# Report: progress, failures, summary and the exit code, all from the same events
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    total: int
    skipped: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    pages: int = 0
    pages_by_device: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_progress: float = field(default_factory=time.monotonic)

    def handle(self, event: Event) -> None:
        if isinstance(event, WorkerFailedToStart):
            say(f"worker {event.spec.slot} ({event.spec.device}) could not start its pipeline: {event.error}")
        elif isinstance(event, WorkerLost):
            say(f"worker {event.spec.slot} ({event.spec.device}) {event.reason}; "
                f"{event.requeued} input(s) go back to the queue; starting a replacement")
        elif isinstance(event, TaskDone):
            self.done += 1
            self.pages += len(event.outputs)
            self.pages_by_device[event.spec.device] += len(event.outputs)
        elif isinstance(event, TaskFailed):
            self.failed += 1
            say(f"FAILED {event.task.path}: {event.error}")
        self.maybe_progress()

    def maybe_progress(self) -> None:
        now = time.monotonic()
        if now - self.last_progress >= PROGRESS_SECONDS:
            self.last_progress = now
            finished = self.done + self.failed
            say(f"progress: {finished}/{self.total} inputs, {self.failed} failed, "
                f"{self.pages} pages, {self.pages / (now - self.started):.2f} pages/s")

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.pages / elapsed if elapsed > 0 else 0.0
        per_device = ", ".join(
            f"{device} {pages / elapsed:.2f}" for device, pages in sorted(self.pages_by_device.items())
        )
        unprocessed = f", {self.unprocessed} not processed (no worker could run)" if self.unprocessed else ""
        text = (f"{self.done} input(s) done, {self.failed} failed{unprocessed}, {self.skipped} skipped; "
                f"{self.pages} page(s) in {elapsed:.1f} s ({rate:.2f} pages/s")
        return text + (f"; per device: {per_device})" if per_device else ")")

    @property
    def unprocessed(self) -> int:
        return self.total - self.done - self.failed

    def exit_code(self) -> ExitCode:
        if self.unprocessed:
            return ExitCode.NO_WORKERS
        return ExitCode.INPUTS_FAILED if self.failed else ExitCode.OK


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def run(config: Config) -> ExitCode:
    pipeline = resolve_pipeline(config.pipeline)
    plan = plan_workers(config)
    selection = find_inputs(config.input_dir, config.input_glob_pattern)
    tasks = plan_tasks(config.input_dir, config.output_dir, selection.paths)
    try:
        config.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --output_dir {str(config.output_dir)!r}: {error.strerror}") from None
    report = Report(total=len(tasks), skipped=selection.skipped)
    if not tasks:
        say(f"no input files match {config.input_glob_pattern!r} in {str(config.input_dir)!r}; nothing to do")
        return ExitCode.OK
    say(f"{len(tasks)} input(s), {describe_plan(plan)}, batch size {config.batch_size} -> {config.output_dir}")
    backend = LocalBackend(pipeline, config.batch_size)
    for event in backend.run(tasks, plan):
        report.handle(event)
    say(report.summary())
    return report.exit_code()


def main(argv: list[str] | None = None) -> int:
    try:
        return int(run(parse_config(argv)))
    except UsageError as error:
        say(f"error: {error}")
        return int(ExitCode.USAGE)
    except KeyboardInterrupt:
        say("interrupted")
        return int(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
