#!/usr/bin/env python3
"""infer_mp.py: multi-device batch OCR with PaddleOCR / PaddleX pipelines.

A drop-in replacement for the `infer_mp.py` example in PaddleOCR's "Parallel Inference in
Pipeline" guide: the same flags with the same defaults, plus one or many devices (CPU
included), collision-free outputs, failure isolation and clear exit codes.

    python infer_mp.py --pipeline PPStructureV3 --input_dir scans/ \
        --device gpu:0,1,2,3 --instances_per_device 2 --batch_size 4 --output_dir out/

Runs are made to be left alone: a JSON Lines run log, resume, crash recovery, timeouts, worker
recycling, progress, clean stops on Ctrl-C/SIGTERM and one run per output folder at a time.

The file reads top to bottom in the order data flows; each section opens with a banner:

    CLI -> Config                 the flags, checked into one Config
    Devices -> worker plan        one WorkerSpec per instance: device, threads
    Pipeline                      resolved without importing it, made in each worker
    Engines                       ONNX Runtime with OpenVINO or CUDA: checked, planned per worker
    Inputs -> tasks               the input files, each a Task with its output names
    Ledger                        the run logs: what is done, every file placed, for which input
    Run log                       the ledger's file: JSON lines appended, flushed, compacted
    Selection                     what this run does (the rest is complete or a standing failure)
    Documents                     page counts, and page ranges as tasks of their own
    Dispatch (local, Ray)         the coordinator's side of the workers: queue, batches, deaths
    Worker                        a process (or Ray actor) with one pipeline, predicting batches
    Output                        a task's files, written into the worker's staging folder
    Report                        records, progress, summary and exit code, from the events
    main                          run(): lock, read the ledger, select, dispatch, report

The coordinator (one process) and its workers (a process or a Ray actor each) exchange small
named messages (the dataclasses at the top of the Dispatch section):

    coordinator                                      worker (PipelineWorker)
    [AskPlan(config)                       ----->    checks the options, plans with PaddleX's helpers
                                           <-----    Planned(plan | refused)]  (see WarmPool)
    Start(WorkerSpec, WorkerOptions)       ----->    builds the pipeline
                                           <-----    Ready(engine, token, reads_windows) | InitFailed(why)
    Batch([Task, ...])                     ----->    predicts, writes files into staging
                                           <-----    Reports([Saved(index, folder, prefix, outputs,
                                                        extras, seconds, failed_pages) | Failed(index,
                                                        why) | CannotWrite(index, why) | Note(text)
                                                        | OutsideWindow()])
    records a `placing` line, then
    Place({index: Moves})                  ----->    renames its files into place
                                           <-----    Placed([index, ...], {index: (errno, error)})
                                                     [+ Retiring(why): it then exits]

The coordinator turns these messages into events (TaskDone, TaskFailed, WorkerLost, ...) that
the Report records: a task's `done` record is written only after its files are in place.
"""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})  # Ctrl-C and `kill`: a clean stop (see Stopper)


def stopped_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM before main() has begun: nothing is done yet, so stop at once, saying
    so (Python would print a traceback of the import it was in, or end without a word). Set
    before the imports below, which take a tenth of a second."""
    os.write(2, f"infer_mp.py: stopped by {signal.Signals(signum).name} while starting; nothing was done\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":  # (a worker imports this file too: it ignores both, see spawn_worker)
    for _signum in STOP_SIGNALS:
        if signal.getsignal(_signum) is not signal.SIG_IGN:
            signal.signal(_signum, stopped_while_starting)

import argparse
import ast
import contextlib
import ctypes
import datetime
import difflib
import enum
import errno
import fcntl
import fnmatch
import gc
import glob
import importlib
import importlib.metadata
import importlib.util
import inspect
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.resource_tracker
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

PROG = "infer_mp.py"

# File types PaddleX's image batch sampler reads (paddlex ImageBatchSampler.IMG_SUFFIX + PDF).
IMAGE_SUFFIXES = frozenset(
    ".bmp .dib .jpeg .jpg .png .webp .pbm .pgm .ppm .pnm .sr .ras .tif .tiff".split()
)
# Inputs whose results carry a page index, so their outputs are named `{stem}_{page}.json`.
PAGED_SUFFIXES = frozenset({".pdf", ".tif", ".tiff"})
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES | PAGED_SUFFIXES
OUTPUT_SUFFIXES = frozenset({".json", ".md"})  # what the tool writes besides pictures (--save markdown)
PAGE_NUMBER = re.compile(r"0|[1-9][0-9]*")  # as PaddleX numbers pages: no sign, no leading zero
DEFAULT_GLOB_PATTERN = "*"
NOT_PIPELINES = ("Client", "Error", "Options", "Model")  # paddleocr exports that are not pipelines
DEFAULT_MAX_ATTEMPTS = 3  # times an input may be in a worker that dies before it is failed
# Seconds a worker may take to build its pipeline: generous, since big pipelines load a dozen
# models, from network disks, and TensorRT builds its engines on a first start (many minutes).
DEFAULT_START_TIMEOUT = 1800.0
START_TRIES = 3  # starts in a row a worker slot gets once the pipeline has started in the run
# Upper bounds of counts and times, so that a slip (an extra digit, `inf`) is one clear error:
# a plan is built per instance, a shard reads every other shard's log, and waits take at most
# what a poll() can (2,147,483 s).
MAX_INSTANCES_PER_DEVICE = 1024
MAX_SHARDS = 10_000
MAX_SECONDS = 1_000_000  # 11.6 days
MAX_NESTING = 100  # levels of lists and objects in a JSON value given on the command line
DEFAULT_PAGES_PER_TASK = 10  # pages of a document one task renders at most: see README, "Big documents"
# Pixels an image may have (width x height) before it is refused, and a PDF page rendered
# smaller: Pillow's error threshold (twice its warning at 89 MP), PaddleX's own PDF cap. A
# 30000 x 30000 PNG of 150 KB took a worker to 5.4 GB; large-format scans stay under it.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# Page quality, from the recognition scores (rec_scores) of the OCR pipelines' results. Measured
# (offline PP-OCRv4, 20-line pages): clean pages 0.992-0.994 mean, the same rotated 90 or 180
# degrees 0.51-0.56 (garbage text), blurred 4 px 0.958; see README, "Page quality".
WEAK_PAGE_SCORE = 0.95  # a page's mean score under this is counted weak in the summary
LOW_LINE_SCORE = 0.8  # a line under this is a low line: a page's figure gives their share
BLANK_PAGE_SPREAD = 8.0  # a page with no text whose pixels' standard deviation is under this is blank
WORST_PAGES_SHOWN = 5
DEFAULT_PROGRESS_SECONDS = 30.0  # interval between progress lines when stderr is not a terminal
RUN_LOG_NAME = "infer_mp.runlog.jsonl"  # in --output_dir unless --run_log says otherwise
LOCK_NAME = ".infer_mp.lock"  # in --output_dir: one run at a time (see RunLock)
SHARD_COUNT_LOCK = ".infer_mp.shards-of-{count}.lock"  # held shared by the shards of one count
RUN_LOG_LOCK = ".{name}.log.lock"  # beside the run log (never one of the names above, whatever the log's name)
LOCK_WAIT_SECONDS = 0.25  # a lock is tried this long before a run is refused: another's probe holds it an instant
LOCK_OPEN_TRIES = 10  # a lock file unlinked as it was locked is opened again (see RunLock._take)
PLACING_LOCK = ".infer_mp.placing.lock"  # in --output_dir: shards check and write their placing lines one at a time
PLACING_LOCK_SECONDS = 10.0  # ... waited for this long at most (a stopped shard holding it does not stop the others)
OUTSIDE_DIR = "_outside"  # outputs of listed inputs that are not below the mirrored folder
POLL_SECONDS = 1.0  # how often the coordinator wakes with nothing to read
PROBE_PATIENCE_SECONDS = 30.0  # a page range's probe page out longer: ranges go out anyway (Backend._next)
STOP_GRACE_SECONDS = 10.0  # after Ctrl-C/SIGTERM: time the inputs in progress get to finish
RENAME_WAIT_SECONDS = 2.0  # ... and past it (or a second signal), files being renamed into place
PR_SET_PDEATHSIG = 1  # Linux prctl option: signal this process when its parent dies


class ExitCode(enum.IntEnum):
    """Process exit codes, each with what it means: --help lists them from here."""

    OK = 0, "every input was processed"
    INPUTS_FAILED = 1, "the run finished, but some inputs or pages failed (each is named on stderr)"
    USAGE = 2, "usage error (flag, path, device, pipeline); nothing was processed"
    NO_WORKERS = 3, "no worker could create its pipeline; nothing more could be processed"
    OUTPUT_FAILED = 74, "writing outputs failed (disk full, read-only, output folder gone): stopped; fix it and rerun"
    LOCKED = 75, "another run is using --output_dir (try again later)"
    INTERRUPTED = 130, "interrupted (Ctrl-C, SIGINT)"
    TERMINATED = 143, "stopped by SIGTERM"

    def __new__(cls, value: int, meaning: str) -> ExitCode:
        code = int.__new__(cls, value)
        code._value_, code.meaning = value, meaning
        return code


class UserError(Exception):
    """A problem the user can fix: printed as one line, no traceback, with its exit code."""

    exit_code = ExitCode.USAGE


class UsageError(UserError):
    """A mistake in the command line or environment (flag, path, device, pipeline): exit 2."""


class RunLocked(UserError):
    """Another run holds the output folder."""

    exit_code = ExitCode.LOCKED


class OutputFailed(UserError):
    """The output filesystem failed under us (full, read-only, gone): no input is to blame."""

    exit_code = ExitCode.OUTPUT_FAILED


# Errors writing an output that are the environment's, not the input's: stop, do not fail inputs.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
# An output folder that is a link (or a file) where a folder should be, or a folder where an
# output file goes: refused, and the input recorded failed, but as the folder's fault: the next
# run tries it again (see select_work).
FOLDER_ERRNOS = frozenset({errno.EXDEV, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EBUSY})


def cannot_write(what: str, error: OSError) -> UserError:
    """A full disk is OutputFailed (74: free space, rerun); anything else that stops a write
    before the run starts (read-only, no permission, a file in the way) is a usage error."""
    message = f"cannot write {what}: {error.strerror}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputFailed(message)
    return UsageError(message)


def say(message: str) -> None:
    """One line for the user, on stderr, so that stdout stays clean for pipes."""
    print(f"{PROG}: {printable(message)}", file=sys.stderr, flush=True)


def printable(text: str, raw_bytes: bool = False) -> str:
    """`text` as one line that cannot drive the terminal: control characters (a newline or an
    escape sequence in a file name) written as `\\n`, `\\x1b`; bytes that are not UTF-8 as
    `\\xff`, unless `raw_bytes` (kept for a stream written with surrogateescape)."""
    return text if text.isprintable() else "".join(printable_character(c, raw_bytes) for c in text)


def printable_character(character: str, raw_bytes: bool) -> str:
    if character.isprintable():
        return character
    if "\udc80" <= character <= "\udcff":  # a byte that is not UTF-8, as surrogateescape decodes it
        return character if raw_bytes else f"\\x{ord(character) - 0xDC00:02x}"
    return character.encode("unicode_escape").decode("ascii")


# ---------------------------------------------------------------------------------------------
# CLI -> Config
# ---------------------------------------------------------------------------------------------

EPILOG = "exit codes:\n" + "".join(f"  {code.value:<4} {code.meaning}\n" for code in ExitCode) + """
resume: every run appends one JSON line per input it did, and one about itself, to the run log
(default OUTPUT_DIR/infer_mp.runlog.jsonl). Rerunning the same command skips inputs whose last
record is done, whose file has not changed (size, modification time) and whose outputs exist;
an input that failed and has not changed since is not retried (--retry_failed retries it).
A PDF or TIFF of more than --pages_per_task pages runs as page ranges: a rerun does only the
pages not done, and --retry_failed only the pages that failed.

outputs: one JSON per page under --output_dir, mirroring each input's folder relative to
--input_dir: `{stem}.json` for an image, `{stem}_{page}.json` for a PDF or TIFF page. Inputs whose
names would collide in one folder (a.jpg beside a.png) use their full file name instead
(`a.jpg.json`, `a.png.json`).
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and the fix."""

    argv: list[str] = []  # what it parses (see parse_config): the fix names the value given

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.endswith("expected one argument"):  # (argparse takes a value that starts with '-' for a flag)
            flag = message.removeprefix("argument ").split(":")[0].split("/")[-1]
            given = [value for name, value in zip(self.argv, self.argv[1:])  # (also as abbreviated: --out)
                     if name.startswith("--") and flag.startswith(name) and value.startswith("-")]
            if given:
                message += f"; a value that starts with '-' goes after '=', as {flag}={given[0]}"
        say(f"error: {message} (see --help)")
        sys.exit(ExitCode.USAGE)


def number(text: str, kind: type, expected: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def instance_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_INSTANCES_PER_DEVICE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_INSTANCES_PER_DEVICE}, got {value}")
    return value


def positive_float(text: str) -> float:
    value = number(text, float, "a number of seconds")
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_SECONDS:,} s, got {text}")
    return value


def whole_number(text: str) -> int:
    value = number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def fraction(text: str) -> float:
    value = number(text, float, "a fraction from 0 to 1")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1 (0.01 is 1%), got {text}")
    return value


def parse_value(text: str) -> Any:
    """A typed value from the command line: true/false, null/none, numbers, JSON lists and
    objects; anything else stays a string ('0123' and 'PP-OCRv4_mobile_det' included)."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    try:
        value = shallow_json(text)
    except ValueError:
        return text
    return value if not isinstance(value, float) or math.isfinite(value) else text


def shallow_json(text: str) -> Any:
    """json.loads, but a value nested deeper than MAX_NESTING is refused: a worker gets it
    pickled, and pickling one a few hundred levels deep fails (deeper still, so does parsing)."""
    too_deep = argparse.ArgumentTypeError(f"a JSON value nested deeper than {MAX_NESTING} levels, "
                                          f"got {text[:80]!r}{'...' if len(text) > 80 else ''}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    level = [(value, 1)]
    while level:  # (without recursion)
        item, depth = level.pop()
        if isinstance(item, (list, dict)):
            if depth > MAX_NESTING:
                raise too_deep
            level.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


def key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key.strip(), parse_value(value)


def boolean(text: str) -> bool:
    value = parse_value(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def json_object(text: str) -> dict:
    try:
        value = shallow_json(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text[:200]!r} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count) <= MAX_SHARDS):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N <= {MAX_SHARDS:,} (e.g. 0/4), got {text!r}")
    return int(index), int(count)


SAVE_FORMATS = ("markdown", "img")
BACKENDS = ("local", "ray")
# PaddleOCR's inference options, passed to the pipeline's constructor when given.
ENGINE_OPTIONS = {
    "engine": (str, "Inference engine: paddle, paddle_static, paddle_dynamic, onnxruntime, transformers."),
    "engine_config": (json_object, "Engine settings as a JSON object, e.g. '{\"run_mode\": \"mkldnn\"}'."),
    "enable_mkldnn": (boolean, "Use oneDNN on CPU (true/false)."),
    "precision": (str, "fp32 or fp16 (with TensorRT)."),
    "enable_hpi": (boolean, "PaddleX high-performance inference (needs the ultra-infer plugin)."),
    "use_tensorrt": (boolean, "Use TensorRT on GPU (true/false)."),
}


def save_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in SAVE_FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(SAVE_FORMATS)}, got {text!r}")
    return formats


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
    parser.add_argument(
        "--input_dir",
        help="Input directory (required unless --input_list is given).",
    )
    parser.add_argument(
        "--device",
        required=True,
        help="Devices to run on: 'cpu', 'gpu', 'gpu:0', 'gpu:0,1,2,3' (PaddleX syntax).",
    )
    parser.add_argument("--output_dir", default="output", help="Output directory (default: output).")
    parser.add_argument(
        "--instances_per_device",
        type=instance_count,
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
        action="append",
        default=None,
        help="Pattern, relative to --input_dir, of the files to process; may be given several "
        "times. Default '*': the images and PDFs at the top of --input_dir (with --recursive, in "
        "every subfolder). '**/*' recurses and takes every file, whatever its type.",
    )
    # Our additions.
    parser.add_argument(
        "--cpu_threads",
        type=positive_int,
        default=None,
        help="CPU threads per instance. Default on CPU: the available cores divided among the "
        "instances, so that they do not oversubscribe the machine.",
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--recursive",
        action="store_true",
        help="Take inputs from every subfolder of --input_dir too, outputs mirroring the tree: the "
        "images and PDFs (any case), or each --input_glob_pattern NAME ('*.pdf') in every subfolder. "
        "Symlinked folders are not followed; the output folder is never input.",
    )
    inputs.add_argument(
        "--input_list",
        help="File with one input path per line ('-' for standard input; NUL-separated if it "
        "contains a NUL, as from find -print0). Replaces --input_glob_pattern. Outputs mirror "
        "--input_dir, else the current folder; other paths go under OUTPUT_DIR/_outside/.",
    )
    inputs.add_argument(
        "--shard",
        type=shard,
        default=None,
        metavar="I/N",
        help="Process only shard I of N (0 <= I < N <= 10,000): a stable, disjoint share of the inputs, "
        "chosen by a hash of each input's relative path, for N machines or an array job.",
    )
    inputs.add_argument(
        "--dry_run",
        action="store_true",
        help="Print the plan (workers, threads, inputs to do and to skip) and exit; loads no model.",
    )
    options = parser.add_argument_group("pipeline options")
    options.add_argument(
        "--paddlex_config",
        help="PaddleX pipeline configuration file (YAML), passed to the pipeline as paddlex_config.",
    )
    options.add_argument(
        "--pipeline_arg",
        type=key_value,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Argument for the pipeline's constructor, e.g. use_doc_unwarping=false, "
        "text_det_limit_side_len=1216. Values are typed: true/false, null, numbers, JSON.",
    )
    options.add_argument(
        "--predict_arg",
        type=key_value,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Argument for every predict() call, e.g. text_rec_score_thresh=0.5.",
    )
    for name, (kind, text) in ENGINE_OPTIONS.items():
        options.add_argument(f"--{name}", type=kind, default=None, help=text)
    options.add_argument(
        "--save",
        type=save_formats,
        action="extend",
        default=None,
        metavar="FORMATS",
        help="Also save, where the results support it: 'markdown', 'img' (visualizations), or "
        "'markdown,img' (or --save given twice). JSON is always saved.",
    )
    cluster = parser.add_argument_group("backend")
    cluster.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="'local': worker processes on this machine (default). 'ray': one Ray actor per "
        "instance on a Ray cluster (pip install -r requirements-ray.txt; see README).",
    )
    cluster.add_argument(
        "--ray_address",
        default=None,
        metavar="ADDRESS",
        help="With --backend ray: the cluster to use, 'host:port', 'ray://host:port' or 'auto'. "
        "Default: $RAY_ADDRESS if set (as under `ray job submit`), else a local cluster started "
        "for this run.",
    )
    runs = parser.add_argument_group("unattended runs")
    runs.add_argument(
        "--run_log",
        default=None,
        help=f"JSON Lines run log, appended to by every run (default: OUTPUT_DIR/{RUN_LOG_NAME}).",
    )
    redo = runs.add_mutually_exclusive_group()
    redo.add_argument(
        "--overwrite",
        action="store_true",
        help="Redo every input, even those the run log says are done.",
    )
    redo.add_argument(
        "--retry_failed",
        action="store_true",
        help="Only retry the inputs whose last record in the run log is 'failed', changed or not (a plain "
        "rerun retries a failed input only once its file has changed); of a document, only its failed and weak "
        "pages. A new reading replaces a weak one only if its mean recognition score is higher (a second pass "
        "with a stronger --pipeline: README, 'Page quality').",
    )
    runs.add_argument(
        "--max_attempts",
        type=positive_int,
        default=DEFAULT_MAX_ATTEMPTS,
        help="An input is failed once a worker has died or timed out this many times while running it "
        f"alone; a batch that dies is retried one input at a time, uncharged (default: {DEFAULT_MAX_ATTEMPTS}).",
    )
    runs.add_argument(
        "--task_timeout",
        type=positive_float,
        default=None,
        help="Seconds a page (an image, or one page of a document) may take; a worker silent for longer "
        "than this times the pages it holds is killed and replaced, and its pages are retried as after a "
        "crash (default: no limit).",
    )
    runs.add_argument(
        "--start_timeout",
        type=positive_float,
        default=DEFAULT_START_TIMEOUT,
        help="Seconds a worker may take to start its pipeline before it is killed and counted as a "
        f"failed start (default: {DEFAULT_START_TIMEOUT:.0f}; on Ray, the time to wait for any actor).",
    )
    runs.add_argument(
        "--pages_per_task",
        type=whole_number,
        default=DEFAULT_PAGES_PER_TASK,
        help="A PDF or TIFF with more pages than this is split into page ranges that workers take like "
        "inputs (fewer pages per range when the run has too few pages for two ranges per worker); "
        "outputs are the same. "
        f"0: never split (default: {DEFAULT_PAGES_PER_TASK}).",
    )
    runs.add_argument(
        "--min_page_score",
        type=fraction,
        default=None,
        help="A page whose mean recognition score is under this, or that has no text although its image is "
        "not blank, is weak: it counts as a failed page (named, exit 1, within --max_page_error_rate for a "
        "document), its output is kept and marked weak in the run log, and --retry_failed redoes it "
        f"(with a stronger --pipeline, say). Pipelines with recognition scores only (default: off; "
        f"{WEAK_PAGE_SCORE:g} flagged every rotated, heavily blurred or noisy page and no clean one in "
        "README's 'Page quality' test).",
    )
    runs.add_argument(
        "--max_page_error_rate",
        type=fraction,
        default=0.0,
        help="A document whose failed pages are at most this fraction of its pages counts as done (its "
        "failed pages are still named, logged and make the exit code 1); above it, failed "
        "(default: 0, any failed page fails the document).",
    )
    runs.add_argument(
        "--max_image_pixels",
        type=whole_number,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="An image with more pixels (width x height) fails alone, named, before it is decoded; a PDF "
        "page is rendered smaller to stay under it. 0: no limit "
        f"(default: {DEFAULT_MAX_IMAGE_PIXELS:,}, Pillow's: a 13,000 x 13,000 scan).",
    )
    runs.add_argument(
        "--max_items_per_worker",
        type=positive_int,
        default=0,
        help="Restart a worker, between batches, after it has processed this many inputs.",
    )
    runs.add_argument(
        "--max_worker_memory_mb",
        type=whole_number,
        default=None,
        help="Restart a worker, between batches, once its resident memory passes this many MB; 0: never. "
        f"Default: {MEMORY_SHARE * 100:.0f}%% of this machine's memory (or its cgroup's limit) shared among the "
        "workers, so that workers whose memory grows over a long run are recycled before the machine "
        "runs out (said in the summary; Ray: never).",
    )
    runs.add_argument(
        "--progress_interval",
        type=positive_float,
        default=DEFAULT_PROGRESS_SECONDS,
        help="Seconds between progress lines when stderr is not a terminal (default: "
        f"{DEFAULT_PROGRESS_SECONDS:.0f}); on a terminal a progress bar is shown instead.",
    )
    return parser


@dataclass(frozen=True)
class Config:
    """The validated command line."""

    pipeline: str
    input_dir: Path | None
    output_dir: Path
    device: str
    instances_per_device: int
    batch_size: int
    input_glob_patterns: tuple[str, ...]
    cpu_threads: int | None
    run_log: Path
    lock_file: Path
    input_list: str | None = None
    recursive: bool = False
    shard: tuple[int, int] | None = None
    dry_run: bool = False
    pipeline_kwargs: dict = field(default_factory=dict)
    predict_kwargs: dict = field(default_factory=dict)
    save: tuple[str, ...] = ()
    overwrite: bool = False
    retry_failed: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    task_timeout: float | None = None
    pages_per_task: int = DEFAULT_PAGES_PER_TASK
    max_page_error_rate: float = 0.0
    min_page_score: float | None = None  # see weak_reason
    start_timeout: float = DEFAULT_START_TIMEOUT
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_items_per_worker: int = 0
    max_worker_memory_mb: int | None = None  # None: a share of the machine's memory (see memory_limit)
    progress_interval: float = DEFAULT_PROGRESS_SECONDS
    backend: str = "local"
    ray_address: str | None = None


def pipeline_kwargs(args: argparse.Namespace) -> dict:
    """Constructor arguments: --paddlex_config, the engine flags, then --pipeline_arg."""
    kwargs: dict[str, Any] = {}
    if args.paddlex_config:
        if not os.path.isfile(args.paddlex_config):
            raise UsageError(f"--paddlex_config: no such file {args.paddlex_config!r}")
        kwargs["paddlex_config"] = os.path.abspath(args.paddlex_config)
    for name in ENGINE_OPTIONS:
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    kwargs.update(args.pipeline_arg)
    if "device" in kwargs:
        raise UsageError("set the device with --device, not --pipeline_arg device=...")
    return kwargs


def retry_label(config: Config) -> str:
    """What made a --retry_failed pass's pages (see Report.this_pass): the pipeline and its options."""
    options = {**config.pipeline_kwargs, **config.predict_kwargs}
    return " ".join([config.pipeline, *(f"{key}={value}" for key, value in options.items())])


def options_tag(config: Config) -> str:
    """A short digest of what makes an input's text: the pipeline and its options, whatever
    their order on the command line and however its file is spelled (by its real path). Each
    record has it, so that a rerun with others says so (see select_work) instead of skipping
    what is done without a word."""
    module, _, name = config.pipeline.rpartition(":")  # (PaddleOCR is paddleocr:PaddleOCR; see resolve_pipeline)
    module = os.path.realpath(module) if module.endswith(".py") or "/" in module else module or "paddleocr"
    pipeline = f"{module}:{name}"
    described = json.dumps([pipeline, config.pipeline_kwargs, config.predict_kwargs], sort_keys=True, default=str)
    return f"{zlib.crc32(described.encode('utf-8', 'surrogateescape')):08x}"


def checked_run_log(spelled: Path, output_dir: Path) -> Path:
    """The run log's real path: a link is followed once, so that its lock, its compaction and
    every run see the one file. Refused where it is, or is named like, infer_mp.py's own files
    (a lock; the staging folder), an input (an image or PDF; one hard-linked to it gets a file
    of its own: see has_second_name) or an output in --output_dir; `.lock` in any case."""
    real = Path(os.path.realpath(spelled))
    suffixes = {spelled.suffix.lower(), real.suffix.lower()}
    if (bookkeeping(str(real), output_dir) or real.name.lower().endswith(".lock") or suffixes & SUPPORTED_SUFFIXES
            or (within(str(real), str(output_dir)) and suffixes & OUTPUT_SUFFIXES)):
        raise UsageError(f"--run_log {str(spelled)!r} names infer_mp.py's own files (a lock, names starting "
                         f"{BOOKKEEPING_PREFIX!r}), an image or PDF, or an output's name in --output_dir; give "
                         "a path of its own, e.g. run.jsonl")
    if real.exists() and not real.is_file():
        raise UsageError(f"--run_log {str(spelled)!r} is not a regular file; give a file path "
                         "(it is read and appended to)")
    return real


def a_run_log(path: Path) -> bool:
    """Is the file missing, empty, or a run log: its first line one of infer_mp.py's (an input's
    record, a `placing` line, a run's closing line; a JSON log of another tool, with a `time`
    too, is none), or one cut short by a kill (the start of one: every version's starts
    RECORD_START)?"""
    try:
        with open(path, "rb") as handle:
            first = handle.readline(RUN_LOG_PROBE_BYTES)
    except FileNotFoundError:
        return True
    except OSError as error:
        raise UsageError(f"cannot read the run log {str(path)!r}: {error.strerror}") from None
    try:
        line = json.loads(first)
    except (ValueError, RecursionError):
        cut = first.rstrip(b"\n")
        return first == b"" or (cut != b"" and (RECORD_START.startswith(cut) or cut.startswith(RECORD_START)))
    return type(line) is dict and "time" in line and (
        ("input" in line and line.get("status") in (*STATUSES, "skipped"))  # (skipped: see read_records)
        or (line.get("status") == PLACING and type(line.get("placing")) is list)
        or (type(line.get("run")) is dict and "exit_code" in line["run"]))


def shard_suffix(index: int, count: int) -> str:
    """What a shard's run log and lock are named with (see RUN_LOG_NAME, LOCK_NAME)."""
    return f".shard-{index}-of-{count}"


def default_run_log(output_dir: Path, shard: tuple[int, int] | None) -> Path:
    """The run log of a run over all inputs, or of one shard, where --run_log does not name one."""
    return output_dir / RUN_LOG_NAME.replace(".runlog", f"{shard_suffix(*shard) if shard else ''}.runlog")


def folder_lock(output_dir: Path, shard: tuple[int, int] | None) -> Path:
    """The output folder's lock file of a run over all inputs, or of one shard (see RunLock)."""
    return output_dir / LOCK_NAME.replace(".lock", f"{shard_suffix(*shard) if shard else ''}.lock")


def run_log_lock(run_log: Path) -> Path:
    """The lock file beside a run log (see RunLock)."""
    return run_log.with_name(RUN_LOG_LOCK.format(name=run_log.name))


def readable_folder(folder: Path) -> None:
    """Refuse an input folder that cannot be listed: a run would find nothing and say so, with
    exit 0, at every cron tick."""
    try:
        os.scandir(folder).close()
    except OSError as error:
        raise UsageError(f"cannot list --input_dir {str(folder)!r}: {error.strerror} (give the user running "
                         "infer_mp.py read access, e.g. chmod a+rx)") from None


def parse_config(argv: list[str] | None) -> Config:
    parser = build_parser()
    parser.argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    for flag in ("input_dir", "output_dir", "input_list", "run_log"):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():  # ('' would be the current folder)
            raise UsageError(f"--{flag} is empty (an unset shell variable?); give a path")
    if args.input_dir is None and args.input_list is None:
        raise UsageError("give --input_dir (a folder of inputs) or --input_list (a file of paths)")
    if args.input_list is not None and args.input_glob_pattern:
        raise UsageError("--input_glob_pattern selects files in --input_dir; with --input_list, leave it out")
    if args.recursive and args.input_list is not None:
        raise UsageError("--recursive walks the subfolders of --input_dir; with --input_list, leave it out")
    folder_patterns = [p for p in args.input_glob_pattern or [] if "/" in p or "**" in p or p in (".", "..")]
    if args.recursive and folder_patterns:
        raise UsageError(f"--recursive takes file-name patterns such as '*.pdf', matched in every subfolder; "
                         f"{folder_patterns[0]!r} has a folder part: leave out --recursive "
                         "(e.g. 'x/**/*.pdf' recurses below x)")
    input_dir = Path(args.input_dir) if args.input_dir is not None else None
    if input_dir is not None and not input_dir.exists():
        raise UsageError(f"the input directory does not exist: {str(input_dir)!r}")
    if input_dir is not None and not input_dir.is_dir():
        raise UsageError(f"--input_dir is not a directory: {str(input_dir)!r}")
    # (Any file that is not a folder: a pipe, as from <(find ...), too.)
    if args.input_list not in (None, "-") and not os.path.exists(args.input_list):
        raise UsageError(f"--input_list: no such file {args.input_list!r} (use '-' for standard input)")
    if args.input_list is not None and os.path.isdir(args.input_list):
        raise UsageError(f"--input_list {args.input_list!r} is a folder; give a file of paths, or use --input_dir")
    if input_dir is not None:
        readable_folder(input_dir)
    output_dir = Path(os.path.realpath(args.output_dir))  # one spelling for every output: see Ledger
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir exists and is not a directory: {args.output_dir!r}")
    if input_dir is not None and output_dir.exists() and os.path.samefile(input_dir, output_dir):
        raise UsageError(f"--output_dir is --input_dir ({str(input_dir)!r}): a rerun would take the outputs for "
                         "inputs; give an --output_dir outside it, or a folder inside it")
    if input_dir is not None and bookkeeping(os.path.realpath(input_dir), output_dir):
        raise UsageError(f"--input_dir {str(input_dir)!r} is inside infer_mp.py's own files in --output_dir "
                         f"(names starting {BOOKKEEPING_PREFIX!r}: its staging folder is emptied at every start); "
                         "move the inputs elsewhere")
    run_log = checked_run_log(Path(args.run_log) if args.run_log else default_run_log(output_dir, args.shard),
                              output_dir)
    if args.run_log and not a_run_log(run_log):  # (the default one is infer_mp.py's by its name)
        raise UsageError(f"--run_log {args.run_log!r} holds something else (its first line is not an infer_mp.py "
                         "record, and compacting would drop every such line); give a path of its own, e.g. run.jsonl")
    if args.shard and run_log != default_run_log(output_dir, args.shard):
        say(f"note: --run_log {args.run_log!r} is not where the other shards look for this shard's log (they read "
            f"{default_run_log(output_dir, args.shard).name} in --output_dir as they run): they may not see what it "
            "placed, and may delete a file of it that has the name of an input of theirs gone since; leave "
            "--run_log out (each shard has a log of its own)")
    given_inputs = sorted({name for name, _ in args.predict_arg} & {"input", PAGE_WINDOWS_KEYWORD})
    if given_inputs:
        raise UsageError(f"--predict_arg {given_inputs[0]}: infer_mp.py gives predict() its inputs (and a document's "
                         "pages) itself; leave it out")
    if args.ray_address is not None and args.backend != "ray":
        raise UsageError("--ray_address is for --backend ray; add --backend ray, or leave --ray_address out")
    if args.max_worker_memory_mb and resident_memory_mb() is None:  # (the default is off without it)
        raise UsageError("--max_worker_memory_mb needs /proc (Linux) or psutil: pip install psutil")
    if "img" in (args.save or ()) and offline_font() is None:
        say(f"note: --save img draws text with a font that PaddleX downloads when it has none (offline, each "
            f"picture's text half stays blank): pip install {FONT_PACKAGE} (in requirements.txt), or set "
            f"{FONT_VARIABLE} to a .ttf/.ttc file")
    return Config(
        pipeline=args.pipeline.strip(),
        input_dir=input_dir.absolute() if input_dir is not None else None,
        output_dir=output_dir,
        device=args.device,
        instances_per_device=args.instances_per_device,
        batch_size=args.batch_size,
        input_glob_patterns=tuple(args.input_glob_pattern or [DEFAULT_GLOB_PATTERN]),
        cpu_threads=args.cpu_threads,
        run_log=run_log,
        lock_file=folder_lock(output_dir, args.shard),
        input_list=args.input_list,
        recursive=args.recursive,
        shard=args.shard,
        dry_run=args.dry_run,
        pipeline_kwargs=pipeline_kwargs(args),
        predict_kwargs=dict(args.predict_arg),
        save=tuple(dict.fromkeys(args.save or ())),
        overwrite=args.overwrite,
        retry_failed=args.retry_failed,
        max_attempts=args.max_attempts,
        task_timeout=args.task_timeout,
        pages_per_task=args.pages_per_task,
        max_page_error_rate=args.max_page_error_rate,
        min_page_score=args.min_page_score,
        start_timeout=args.start_timeout,
        max_image_pixels=args.max_image_pixels,
        max_items_per_worker=args.max_items_per_worker,
        max_worker_memory_mb=args.max_worker_memory_mb,
        progress_interval=args.progress_interval,
        backend=args.backend,
        ray_address=args.ray_address,
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


# A container's CPU quota (`docker --cpus`, Kubernetes CPU limits), seen from inside it: the
# affinity mask still shows every core of the host, and threads beyond the quota are throttled.
CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # "max 100000" (no quota) or "200000 100000"
CGROUP_V1_CPU_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"  # -1: no quota
CGROUP_V1_CPU_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"
MEMINFO = "/proc/meminfo"  # "MemTotal:  24576000 kB"
PROC_CGROUP = "/proc/self/cgroup"  # "0::/user.slice/job.scope" (v2), "4:memory:/slurm/job_42" (v1)
CGROUP_V2_MEMORY_MAX = "/sys/fs/cgroup/memory.max"  # "max" (no limit) or bytes
CGROUP_V1_MEMORY_LIMIT = "/sys/fs/cgroup/memory/memory.limit_in_bytes"  # a huge number: no limit
MEMORY_SHARE = 0.8  # of the machine's memory, shared among the workers: the default recycling limit
MIN_GROWTH_TO_RECYCLE = 0.25  # a worker past the limit is recycled only if it grew this much since it started


def read_text(path: str) -> str | None:
    """A small system file's text, or None where it is absent or unreadable."""
    try:
        return Path(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time per period that this process's cgroup (v2, else v1) may use, or
    None without a quota (or without a readable one)."""
    cpu_max = read_text(CGROUP_V2_CPU_MAX)
    if cpu_max is not None:
        quota, _, period = cpu_max.strip().partition(" ")
    else:
        quota, period = read_text(CGROUP_V1_CPU_QUOTA) or "", read_text(CGROUP_V1_CPU_PERIOD) or ""
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max", or unreadable
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def machine_memory_mb() -> int | None:
    """Memory this process's machine has, capped by its cgroup's limit; None if unknown."""
    limits = []
    meminfo = read_text(MEMINFO) or ""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            with contextlib.suppress(ValueError, IndexError):
                limits.append(int(line.split()[1]) // 1024)
    for path in (*own_cgroup_files(CGROUP_V2_MEMORY_MAX, CGROUP_V1_MEMORY_LIMIT), CGROUP_V2_MEMORY_MAX,
                 CGROUP_V1_MEMORY_LIMIT):
        with contextlib.suppress(ValueError):  # "max", or no such file
            limits.append(int((read_text(path) or "").strip()) // 2**20)
    return min(limits) if limits else None


def own_cgroup_files(v2_file: str, v1_file: str) -> list[str]:
    """The same files of this process's own cgroup (a Slurm job's, a `systemd-run -p MemoryMax`
    unit's), whose limits the root's files do not show: from /proc/self/cgroup."""
    files = []
    for line in (read_text(PROC_CGROUP) or "").splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if path in ("", "/"):
            continue
        if number == "0" and not controllers:  # v2: "0::/path"
            root, name = os.path.split(v2_file)
            files.append(os.path.join(root, path.lstrip("/"), name))
        else:  # v1: "4:memory:/path", the v1 file's controller among them
            root, name = os.path.split(v1_file)
            root, controller = os.path.split(root)
            if controller in controllers.split(","):
                files.append(os.path.join(root, controller, path.lstrip("/"), name))
    return files


def memory_limit(config: Config, workers: int) -> tuple[int, str]:
    """The resident memory (MB) past which a worker is recycled, 0 for none, and where it comes
    from: --max_worker_memory_mb, else MEMORY_SHARE of the machine's memory over the workers
    on it (local backend; a Ray cluster's nodes are not this machine)."""
    if config.max_worker_memory_mb is not None:
        return config.max_worker_memory_mb, "--max_worker_memory_mb"
    total = machine_memory_mb()
    if config.backend != "local" or total is None or resident_memory_mb() is None:
        return 0, "no default here"
    return int(total * MEMORY_SHARE) // max(1, workers), (
        f"default: {MEMORY_SHARE:.0%} of {total:,} MB over {workers} worker(s); --max_worker_memory_mb sets it")


def available_cores() -> int:
    """Cores this process may use: its affinity (taskset, container CPU sets), capped by a
    cgroup CPU quota; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def parse_device_arg(text: str) -> tuple[str, list[int] | None]:
    """PaddleX's `parse_device`, with its bare asserts turned into a message and a fix. Its
    answer for the CPU is given without importing PaddleX, which takes a second: a no-op
    rerun, or a pipeline that does not import PaddleX, need not pay it."""
    cleaned = text.strip().replace(" ", "")
    if cleaned.lower() == "cpu":
        return "cpu", None
    if "," in cleaned and ":" not in cleaned:
        raise UsageError(f"malformed --device {text!r}: a list of devices is one type and its ids, as 'gpu:0,1'; "
                         "the CPU is one device ('cpu'; --instances_per_device gives it more workers)")
    from paddlex.utils.device import SUPPORTED_DEVICE_TYPE, parse_device

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
        device_type, ids = parse_device(cleaned)
    except (ValueError, AssertionError) as error:
        detail = f": {error}" if str(error) else ""
        raise UsageError(f"malformed --device {text!r}{detail} ({hint})") from None
    if ids and len(set(ids)) < len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise UsageError(f"--device {text!r} names {device_type}:{twice} twice; for more workers on one device, "
                         "give --instances_per_device")
    return device_type, ids


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


# Engines that run on Paddle itself (None: the pipeline's default, Paddle for PaddleOCR's);
# the others (onnxruntime, transformers) run without `paddle` installed.
PADDLE_ENGINES = (None, "paddle", "paddle_static", "paddle_dynamic")
GPU_FROM_PYPI = ("add --engine onnxruntime, after pip install -r requirements-gpu-onnx.txt (ONNX Runtime's CUDA "
                 "provider, no Paddle; README, 'GPU from PyPI')")
# The CUDA driver API, asked directly where Paddle is not the engine: libcuda is what every CUDA
# program (ONNX Runtime's CUDA provider too) starts through, and it honours CUDA_VISIBLE_DEVICES.
CUDA_DRIVER_LIBRARIES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
CUDA_SUCCESS, CUDA_ERROR_NO_DEVICE = 0, 100


def load_cuda_driver() -> tuple[Any, str]:
    """(the NVIDIA driver's CUDA library, "") or (None, why it cannot be loaded)."""
    failures = []
    for name in CUDA_DRIVER_LIBRARIES:
        try:
            return ctypes.CDLL(name), ""
        except OSError as error:
            failures.append(" ".join(str(error).split()))
    return None, f"no NVIDIA driver found ({failures[0]})"


def cuda_error_name(driver: Any, status: int) -> str:
    name = ctypes.c_char_p()
    with contextlib.suppress(AttributeError, OSError):
        if driver.cuGetErrorName(status, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
            return f"{name.value.decode(errors='replace')}, {status}"
    return f"CUDA error {status}"


def cuda_driver_devices() -> tuple[int | None, str]:
    """(the GPUs the NVIDIA driver shows this process, "") or (None, why the driver cannot be
    used). Initialises the driver (no GPU memory), as any CUDA program's first call does."""
    driver, why = load_cuda_driver()
    if driver is None:
        return None, why
    status = driver.cuInit(0)
    if status == CUDA_ERROR_NO_DEVICE:
        return 0, ""
    count = ctypes.c_int(0)
    if status == CUDA_SUCCESS:
        status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != CUDA_SUCCESS:
        return None, f"the NVIDIA driver could not start ({cuda_error_name(driver, status)})"
    return count.value, ""


def cuda_driver_version() -> tuple[int, int] | None:
    """The newest CUDA version the NVIDIA driver runs, as (major, minor), or None if unknown."""
    driver, _ = load_cuda_driver()
    version = ctypes.c_int(0)
    with contextlib.suppress(AttributeError, OSError):
        if driver is not None and driver.cuDriverGetVersion(ctypes.byref(version)) == CUDA_SUCCESS and version.value:
            return divmod(version.value, 1000)[0], version.value % 1000 // 10
    return None


def check_devices_present(device_type: str, device_ids: list[int], engine: str | None = None) -> None:
    """Refuse an absent accelerator up front: PaddleX would only warn and fall back to CPU.
    Paddle's engines count devices with Paddle; the others (ONNX Runtime) with the CUDA
    driver, so that they need no `paddle` installed."""
    if device_type == "cpu":
        return
    if engine not in PADDLE_ENGINES:
        if device_type != "gpu":
            raise UsageError(f"--engine {engine} runs on cpu or gpu, not {device_type!r} (PaddleX's {engine} "
                             "engine has no other devices); use --device cpu or gpu:N")
        count, why = cuda_driver_devices()
        if count is None:
            raise UsageError(f"--device asks for a GPU, but {why}; run on a machine with an NVIDIA GPU and its driver, "
                             "or use --device cpu")
        check_ids_visible(device_type, device_ids, count, "the NVIDIA driver")
        if engine == "onnxruntime" and (problem := cuda_driver_too_old()
                                        or cuda_provider_problem(min(device_ids, default=0), notice=say)):
            raise UsageError(problem)
        return
    try:
        paddle = import_paddle_quietly()
    except (ImportError, OSError) as error:  # not installed, or a build whose libraries are missing
        fixes = (f"install Paddle's GPU build from Paddle's own index (README, 'GPU install'), or {GPU_FROM_PYPI}"
                 if device_type == "gpu" else f"install the {device_type} build of paddlepaddle")
        raise UsageError(
            f"--device asks for {device_type.upper()} on Paddle's engine ({engine or 'the default'}), but paddle "
            f"cannot be imported ({one_line(error)}): {fixes}; or use --device cpu"
        ) from None
    compiled, count = count_devices(paddle, device_type)
    if not compiled:
        raise UsageError(
            f"--device asks for {device_type.upper()}, but this Paddle build cannot use it "
            f"(paddle {paddle.__version__}); install the {device_type} build of paddlepaddle "
            "(see README, 'GPU install')" + (f", or {GPU_FROM_PYPI}" if device_type == "gpu" else "")
            + ", or use --device cpu"
        )
    check_ids_visible(device_type, device_ids, count, "Paddle")


def check_ids_visible(device_type: str, device_ids: list[int], count: int, seen_by: str) -> None:
    missing = [i for i in device_ids if i >= count]
    if missing:
        visible = f"ids 0..{count - 1}" if count else "none"
        raise UsageError(
            f"--device asks for {device_type}:{','.join(map(str, missing))}, but only {count} "
            f"{device_type} device(s) are visible to {seen_by} ({visible}; check CUDA_VISIBLE_DEVICES)"
        )


def plan_workers(config: Config) -> list[WorkerSpec]:
    """One spec per (device, instance); on CPU, split the cores among the instances. On a
    GPU with ONNX Runtime, the cores are split among all the instances on the machine too:
    they are the CPU thread pools of each instance's sessions (see planned_gpu_config)."""
    device_type, device_ids = parse_device_arg(config.device)
    instances = config.instances_per_device
    if device_type == "cpu":
        threads = config.cpu_threads or max(1, available_cores() // instances)
        return [WorkerSpec(slot, "cpu", threads) for slot in range(instances)]
    from paddlex.utils.device import constr_device  # plain string helpers: they need no paddle

    device_ids = device_ids or [0]
    engine = config.pipeline_kwargs.get("engine")
    check_devices_present(device_type, device_ids, engine)
    devices = [constr_device(device_type, [i]) for i in device_ids for _ in range(instances)]
    threads = config.cpu_threads
    if threads is None and engine == "onnxruntime":
        threads = max(1, available_cores() // len(devices))
    return [WorkerSpec(slot, device, threads) for slot, device in enumerate(devices)]


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
        if text.endswith(".py") or "/" in text or os.sep in text:
            raise UsageError(f"--pipeline {text!r}: name the class after a colon, e.g. '{text}:MyPipeline'")
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
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, ref.module)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
    else:
        module = importlib.import_module(ref.module)
    if not hasattr(module, ref.name):
        raise AttributeError(f"module {ref.module!r} has no attribute {ref.name!r}")
    return getattr(module, ref.name)


def keyword_parameters(function: Any) -> tuple[set[str], bool]:
    """(names it takes by keyword, whether it also takes **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def accepts_keyword(cls: type, keyword: str) -> bool:
    names, any_keyword = keyword_parameters(cls)
    return keyword in names or any_keyword


def paddleocr_common_args_check() -> tuple[type, Any] | None:
    """PaddleOCR's own check of the options its pipelines take through **kwargs (engine,
    precision, ...): (the wrapper base class, the check), if this paddleocr has them."""
    try:
        from paddleocr._common_args import parse_common_args
        from paddleocr._pipelines.base import PaddleXPipelineWrapper
    except ImportError:
        return None
    return PaddleXPipelineWrapper, parse_common_args


def check_pipeline_options(ref: PipelineRef, init_kwargs: dict, predict_kwargs: dict) -> None:
    """Refuse a misspelled option before any pipeline is built, where the class tells us: its
    signatures, and for PaddleOCR pipelines PaddleOCR's own check. Imports the class (a warm
    worker does it: see WarmPool), and only when options are given."""
    if not init_kwargs and not predict_kwargs:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = load_pipeline_class(ref)
    except Exception as error:
        raise UsageError(f"cannot import --pipeline {ref.name!r}: {one_line(error)}") from None
    known: set[str] = set()
    for klass in cls.__mro__[:-1]:
        if "__init__" in vars(klass):
            known |= keyword_parameters(klass.__init__)[0] - {"self"}
    unknown = {name: value for name, value in init_kwargs.items() if name not in known}
    paddleocr_check = paddleocr_common_args_check()
    if unknown and paddleocr_check and issubclass(cls, paddleocr_check[0]):
        try:
            paddleocr_check[1](dict(unknown), default_enable_hpi=False)
        except ValueError as error:
            raise option_error("pipeline option", str(error), known | set(ENGINE_OPTIONS)) from None
    elif unknown and not keyword_parameters(cls)[1]:
        engine_flags = sorted(set(unknown) & set(ENGINE_OPTIONS))
        if engine_flags:
            raise UsageError(f"--{engine_flags[0]}: the pipeline class {ref.name!r} takes no {engine_flags[0]!r} "
                             "argument (PaddleOCR's pipelines do); leave it out")
        raise option_error("pipeline option", f"Unknown argument: {sorted(unknown)[0]}", known)
    names, any_keyword = keyword_parameters(getattr(cls, "predict", None))
    unknown_predict = sorted(set(predict_kwargs) - names)
    if unknown_predict and not any_keyword:
        raise option_error("--predict_arg", f"Unknown argument: {unknown_predict[0]}", names - {"self", "input"})


def option_error(what: str, message: str, known: Iterable[str]) -> UsageError:
    name = message.rsplit(":", 1)[-1].strip()
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return UsageError(f"{what}: {message}{hint}")


def paddlex_warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def quiet_paddlex_logs() -> None:
    """PaddleX's per-model INFO lines, times N workers, are noise: a filter on its logger, not a
    level, which PaddleX sets to INFO again when it is imported (by a pipeline, maybe late)."""
    logger = logging.getLogger("paddlex")
    if paddlex_warnings_only not in logger.filters:
        logger.addFilter(paddlex_warnings_only)


def create_pipeline(ref: PipelineRef, spec: WorkerSpec, init_kwargs: dict) -> Any:
    cls = load_pipeline_class(ref)
    if not callable(getattr(cls, "predict", None)):  # (before its models load, not at its first input)
        raise TypeError(f"{ref.name} has no predict() method: a pipeline class needs predict(input, **options), "
                        "as PaddleOCR's have")
    quiet_paddlex_logs()
    kwargs: dict[str, Any] = {"device": spec.device}
    if spec.cpu_threads is not None and accepts_keyword(cls, "cpu_threads"):
        kwargs["cpu_threads"] = spec.cpu_threads
    kwargs.update(init_kwargs)
    engine_config = planned_engine_config(cls, spec, init_kwargs)
    if engine_config is not None:
        kwargs["engine_config"] = engine_config
    pipeline = cls(**kwargs)
    install_recognizer_speedups(recognizer_padding(spec, init_kwargs, engine_config))
    return pipeline


# ---------------------------------------------------------------------------------------------
# Engines: ONNX Runtime with OpenVINO or CUDA, checked in the coordinator and planned per worker
# ---------------------------------------------------------------------------------------------


# Distributions that all install the module `onnxruntime`: the one installed last wins, silently.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-openvino", "onnxruntime-gpu", "onnxruntime-directml")


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_engine(config: Config, device_type: str) -> None:
    """--engine onnxruntime: exactly one ONNX Runtime build, with the providers asked for
    (PaddleX would only find out inside each worker)."""
    if config.pipeline_kwargs.get("engine") != "onnxruntime":
        return
    gpu = device_type == "gpu"
    installed = [f"{d} {v}" for d in ONNXRUNTIME_DISTRIBUTIONS if (v := installed_version(d))]
    if not installed:
        raise UsageError("--engine onnxruntime needs ONNX Runtime: pip install -r "
                         + ("requirements-gpu-onnx.txt (onnxruntime-gpu; README, 'GPU from PyPI')" if gpu
                            else "requirements-onnx.txt"))
    if len(installed) > 1:
        raise UsageError(
            f"{' and '.join(installed)} are all installed and share the module onnxruntime (the last "
            "installed wins, silently): uninstall all of them, then install only the one you want"
        )
    engine_config = config.pipeline_kwargs.get("engine_config") or {}
    options = engine_config.get("provider_options")
    listed = options if isinstance(options, list) else [options]
    if gpu and any(isinstance(o, dict) and "device_id" in o for o in listed):
        raise UsageError("--engine_config: leave device_id out of provider_options (it would put every instance on "
                         "that one GPU); --device gpu:N says which GPU each instance runs on")
    wanted = list(engine_config.get("providers") or [])
    if gpu and not wanted:
        wanted = [CUDA_PROVIDER]
    if not wanted:
        return
    available = onnxruntime_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        fix = (f"for GPUs: pip uninstall {installed[0].split()[0]}, then pip install -r requirements-gpu-onnx.txt "
               "(README, 'GPU from PyPI')" if CUDA_PROVIDER in missing
               else "for OpenVINO: pip install -r requirements-onnx.txt")
        raise UsageError(
            f"ONNX Runtime provider(s) {', '.join(missing)} not available in {installed[0]} (it has "
            f"{', '.join(available)}); {fix}"
        )


CUDA_PROVIDER = "CUDAExecutionProvider"
CUDA_PROVIDER_LIBRARY = "libonnxruntime_providers_cuda.so"  # in onnxruntime/capi/ of a CUDA build (Linux)
CUDA_BUILD_VERSION = re.compile(r"""^cuda_version\s*=\s*['"]([^'"]*)['"]""", re.MULTILINE)


def onnxruntime_folder() -> Path | None:
    """The installed `onnxruntime` package's folder, found without importing it."""
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("onnxruntime")
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
    return None


def cuda_provider_folder() -> Path | None:
    """The folder of the installed ONNX Runtime's CUDA provider library, if it has one."""
    folder = onnxruntime_folder()
    capi = folder / "capi" if folder is not None else None
    return capi if capi is not None and (capi / CUDA_PROVIDER_LIBRARY).is_file() else None


def onnxruntime_cuda_build(capi: Path) -> tuple[int, int] | None:
    """The CUDA version this ONNX Runtime build was made for (its build_and_package_info.py)."""
    found = CUDA_BUILD_VERSION.search(read_text(str(capi / "build_and_package_info.py")) or "")
    numbers = found.group(1).split(".")[:2] if found else []
    if not numbers or not all(n.isdigit() for n in numbers):
        return None
    return int(numbers[0]), int(numbers[1]) if len(numbers) > 1 else 0


def cuda_driver_too_old() -> str | None:
    """An NVIDIA driver older than the CUDA major version onnxruntime-gpu was built for: its CUDA
    provider would fail on every session, and ONNX Runtime would run them on the CPU."""
    capi = cuda_provider_folder()
    if capi is None:
        return None
    built, runs = onnxruntime_cuda_build(capi), cuda_driver_version()
    if built is None or runs is None or runs[0] >= built[0]:
        return None
    return (f"the NVIDIA driver runs CUDA up to {runs[0]}.{runs[1]}, but the installed onnxruntime-gpu is built for "
            f"CUDA {built[0]}.{built[1]}: update the driver, or install an onnxruntime-gpu built for CUDA {runs[0]} "
            "(README, 'GPU from PyPI'); or use --device cpu")


def cuda_provider_problem(device_id: int = 0, notice: Callable[[str], None] | None = None) -> str | None:
    """Why ONNX Runtime's CUDA provider cannot start here, or None: ONNX Runtime itself, in a
    child process (this Python, this environment, this process's sys.path, as a spawned
    worker has), loads its CUDA provider and runs one convolution on gpu:device_id (cuDNN is
    loaded at the first one). Its own words name the CUDA or cuDNN library that is missing or
    of the wrong version, where in a worker it would only warn and run every session on the
    CPU. Not in this process: the provider's library crashes a process that loads it outside
    ONNX Runtime (a segmentation fault with onnxruntime-gpu 1.31.1 on an H200); and the
    dynamic loader alone misses what ONNX Runtime loads later (cuDNN) and what the Python
    binary's own search path finds. None also where the installed ONNX Runtime, or the module
    onnxruntime (another build installed over it), has no CUDA provider (check_engine says
    so), or where the check could not finish (the workers' check still refuses a fallback):
    `notice` is told once the check is slow, and when it is given up."""
    capi = cuda_provider_folder()
    if capi is None or CUDA_PROVIDER not in onnxruntime_providers():
        return None
    probe = run_probe([sys.executable, "-c", CUDA_PROBE, str(device_id), json.dumps(sys.path)],
                      f"ONNX Runtime's CUDA provider on gpu:{device_id}", notice)
    if probe is None:
        return None
    if probe.returncode == 0 and CUDA_PROBE_OK in (line.strip() for line in probe.stdout.splitlines()):
        return None
    failure, loading = probe_failure(probe)
    if not loading:
        return (f"ONNX Runtime's CUDA provider could not run a test convolution on gpu:{device_id} ({failure}); "
                "README, 'GPU from PyPI'; or use --device cpu")
    built = onnxruntime_cuda_build(capi)
    cuda = f"CUDA {built[0]}.{built[1]}" if built else "the CUDA version"
    return (f"ONNX Runtime's CUDA provider cannot load here ({failure}): it needs the {cuda} and cuDNN libraries "
            "it was built for, where the dynamic loader finds them (a CUDA toolkit and cuDNN install, or "
            "LD_LIBRARY_PATH; README, 'GPU from PyPI'); or use --device cpu")


def run_probe(command: list[str], what: str,
              notice: Callable[[str], None] | None) -> subprocess.CompletedProcess | None:
    """A check's child process, run to its end; None if it cannot start, or is still running
    after CUDA_PROBE_TIMEOUT (killed). Past CUDA_PROBE_NOTICE_SECONDS, `notice` says why the
    run waits, so that a slow driver does not look like a hang."""
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, errors="replace")
    except OSError:
        return None
    try:
        try:
            out, err = child.communicate(timeout=CUDA_PROBE_NOTICE_SECONDS)
        except subprocess.TimeoutExpired:
            if notice:
                notice(f"checking {what} (a first CUDA start can take a while; up to {CUDA_PROBE_TIMEOUT:g} s)")
            out, err = child.communicate(timeout=CUDA_PROBE_TIMEOUT - CUDA_PROBE_NOTICE_SECONDS)
    except subprocess.TimeoutExpired:
        abandon(child)
        if notice:
            notice(f"the check of {what} did not finish in {CUDA_PROBE_TIMEOUT:g} s; going on (each worker "
                   "refuses to run on the CPU in its place)")
        return None
    except BaseException:  # Ctrl-C, SIGTERM: no check left running, holding a GPU
        abandon(child)
        raise
    return subprocess.CompletedProcess(command, child.returncode, out, err)


def abandon(child: subprocess.Popen) -> None:
    """Kill a check's process and leave it: its pipes are not read to their end (a process it
    started may hold them), and its end is waited for only briefly (one stuck in a driver's
    call dies only when the call returns)."""
    child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=CUDA_PROBE_REAP_SECONDS)
    for pipe in (child.stdout, child.stderr):
        pipe.close()


CUDA_PROBE_TIMEOUT = 120.0  # seconds: a CUDA context and cuDNN's first use take a few
CUDA_PROBE_NOTICE_SECONDS = 10.0  # ... and past this, the run says what it waits for
CUDA_PROBE_REAP_SECONDS = 5.0  # ... and a killed check's end is waited for this long
CUDA_PROBE_OK = "cuda provider ok"
# An ONNX model, y = Conv(x, w) with x and w 1x1x1x1 (opset 13): a convolution, so that cuDNN
# is loaded too. The child process prints CUDA_PROBE_OK where it ran on the CUDA provider.
CUDA_PROBE = f"""
import json, sys
sys.path[:] = json.loads(sys.argv[2])
import numpy, onnxruntime
model = bytes.fromhex(
    "080842040a00100d3a620a0f0a01780a01771201792204436f6e761201672a1208010801080108011001250000803f4201775a1b0a01"
    "7812160a14080112100a0208010a0208010a0208010a020801621b0a017912160a14080112100a0208010a0208010a0208010a020801")
session = onnxruntime.InferenceSession(model, providers=[("CUDAExecutionProvider", {{"device_id": int(sys.argv[1])}})])
if "CUDAExecutionProvider" not in session.get_providers():
    sys.exit(3)
session.run(None, {{"x": numpy.ones((1, 1, 1, 1), numpy.float32)}})
print("{CUDA_PROBE_OK}")
"""
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
ORT_LOAD_ERROR = re.compile(r"Failed to load library .+? with error: (.+)")  # ONNX Runtime's log, when it falls back
MISSING_LIBRARY = re.compile(r"cannot open shared object file|cuDNN is not available|undefined symbol|version `")
PROBE_SAID = 300  # characters of the probe's failure in the one-line refusal


def clipped(text: str) -> str:
    return text if len(text) <= PROBE_SAID else text[:PROBE_SAID] + " …"


def probe_failure(probe: subprocess.CompletedProcess) -> tuple[str, bool]:
    """What the CUDA probe's ONNX Runtime said went wrong (the loader's error it logged, else
    the error it raised, else how the process ended), and whether it is a library that could
    not be loaded."""
    lines = [line.strip() for line in ANSI_ESCAPE.sub("", probe.stderr).splitlines() if line.strip()]
    loader = next((m.group(1).strip() for line in lines if (m := ORT_LOAD_ERROR.search(line))), None)
    if loader is not None:
        return clipped(loader), True
    if probe.returncode > 0 and lines and probe.returncode != 3:
        return clipped(lines[-1]), bool(MISSING_LIBRARY.search(lines[-1]))
    if probe.returncode < 0:
        return f"the check's process ended by signal {-probe.returncode}", False
    if probe.returncode == 3:
        return "ONNX Runtime ran the check on the CPU, without saying why", True
    return f"the check's process ended with exit {probe.returncode}, saying nothing", False


OPENVINO_PROVIDER = "OpenVINOExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# OpenVINO's CPU settings for the OpenVINO execution provider, unless --engine_config sets
# provider_options: no pinning, which put two single-thread instances on one core; and
# bfloat16 only where the CPU computes it natively, as OpenVINO itself does by default but
# ONNX Runtime's provider does not (recognition 1.8x faster there). Elsewhere OpenVINO would
# emulate it, slower than float32.
OPENVINO_CPU_CONFIG = {"ENABLE_CPU_PINNING": "NO"}
OPENVINO_BF16_CONFIG = {"INFERENCE_PRECISION_HINT": "bf16"}
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # x86 flags in /proc/cpuinfo
CPUINFO = "/proc/cpuinfo"
CPU_PROVIDER_CONFIG = json.dumps({"providers": [CPU_PROVIDER]})  # what to pass to keep ONNX Runtime's own


def cpu_flags() -> set[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is absent or has none)."""
    for line in (read_text(CPUINFO) or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return set()


def openvino_options(threads: int | None) -> dict:
    """The OpenVINO provider's options: its own thread count (ONNX Runtime's
    `intra_op_num_threads` does not reach it) and the CPU settings above."""
    cpu = {**OPENVINO_CPU_CONFIG, **(OPENVINO_BF16_CONFIG if cpu_flags() & NATIVE_BF16_FLAGS else {})}
    options: dict[str, Any] = {"num_of_threads": threads} if threads is not None else {}
    return {**options, "load_config": json.dumps({"CPU": cpu})}


# PaddleX's CTC decoding copied each recognizer batch's scores (6 lines x ~120 steps x 18,710
# characters for PP-OCRv6: 50 MB) and scanned them twice; a worker decodes them in place, once,
# with the same texts and scores (installed by create_pipeline). Measured in docs/engines.md,
# "PP-OCRv6 beside its peers".
#
# OpenVINO plans each input shape it has not seen (PP-OCRv6_small's recognizer, 6 lines about
# 1,000 columns wide, 2 threads: about 30 ms more than the 65 ms of a shape seen before), and
# PaddleX gives nearly every recognizer batch a width of its own (125 new of 160 batches on 40
# pages). Where OpenVINO runs the recognizer with the options infer_mp.py sets (tunes_openvino),
# a worker pads each batch on to a multiple of REC_WIDTH_STEP columns, as PaddleX pads its
# shorter lines, unless the call or the pipeline's config asks for word boxes (PaddleX places
# them by the unpadded width): 1.15-1.2x pages/s for PP-OCRv6_small, the same text on its 800
# benchmark lines. Weaker models can read a line differently with more padding (PP-OCRv4
# mobile: word recall 0.9967 -> 0.9960 at float32), as with bf16; docs/engines.md has the
# figures and the way back.
REC_WIDTH_STEP = 32
WIDTH_STEPS = "width steps"
# ONNX Runtime's CUDA provider (1.31.1, cuDNN 9, on an H200) sets its convolutions up again
# whenever a recognizer call's input shape differs from the call before it: 1.4-2.3 s a call
# for PP-OCRv6_small, against 0.01 s for the same shape again; PaddleX's batches change shape
# at nearly every call (4 calls a dense page: 3.0 s a page, of which the detector, one shape
# for same-size pages, 4 ms). Where infer_mp.py sets the CUDA provider's options, a worker
# keeps the recognizer's input at one shape: every batch filled up to the recognizer's batch
# size with blank lines (their output dropped), and padded on to the widest width the worker
# has run so far, in steps of REC_WIDTH_STEP; unless word boxes are asked for, as for
# WIDTH_STEPS. A batch wider than ONE_SHAPE_MAX_WIDTH keeps its own width (in steps) and does
# not widen the others: much padding makes a recognizer drop spaces between words (PP-OCRv6,
# after one 3,200-column line widened every batch to it: 4 of 67 lines). A full line of an
# A4 page scanned at 300 dpi is about 2,000 columns at the recognizer's 48 rows. Measured in
# docs/install.md, "GPU from PyPI".
ONE_SHAPE = "one shape"
ONE_SHAPE_MAX_WIDTH = 2048
RECOGNIZER_PADDING_SAID = {  # in a worker's engine line
    WIDTH_STEPS: f"recognizer batches padded to widths in steps of {REC_WIDTH_STEP} where no word boxes are asked "
                 "for, as OpenVINO plans each new shape",
    ONE_SHAPE: "recognizer batches kept at one shape (full batches, the widest width so far) where no word boxes "
               "are asked for, as the CUDA provider sets up again at each new shape",
}


def install_recognizer_speedups(padding: str | None = None) -> None:
    """Patch this process's PaddleX recognizer, if the pipeline loaded it and it has the shape
    the patch was written for (PaddleX 3.x); otherwise leave it as it is: its CTC decoder, and
    with a padding (WIDTH_STEPS or ONE_SHAPE), where the pipeline has a recognizer, its batches."""
    processors = sys.modules.get("paddlex.inference.models.text_recognition.processors")
    decoder = getattr(processors, "CTCLabelDecode", None)
    if decoder is not None and hasattr(decoder, "decode") and not hasattr(decoder.__call__, "infer_mp"):
        decoder.__call__ = ctc_decode_without_copy(decoder.__call__)
    predictor = recognizer_class()
    if padding and predictor is not None and not hasattr(predictor.process, "infer_mp"):
        if live_instances(predictor):  # (not a detection-only pipeline)
            predictor.process = process_padded(predictor.process, one_shape=padding == ONE_SHAPE)


def recognizer_class() -> type | None:
    """PaddleX's text recognizer, if loaded and shaped as the patches expect."""
    module = sys.modules.get("paddlex.inference.models.text_recognition.predictor")
    predictor = getattr(module, "TextRecRunnerPredictor", None) or getattr(module, "TextRecPredictor", None)
    return predictor if predictor is not None and callable(getattr(predictor, "process", None)) else None


def process_padded(whole: Any, one_shape: bool = False) -> Any:
    def process(self: Any, batch_data: Any, return_word_box: bool = False, **kwargs: Any) -> Any:
        """PaddleX's recognition of a batch, its lines padded on to a width in steps of
        REC_WIDTH_STEP (with one_shape: see ONE_SHAPE); PaddleX's own widths where word boxes
        are asked for, by the call or by the pipeline's config (PaddleX places them by the
        unpadded width)."""
        batcher = getattr(self, "pre_tfs", {}).get("ToBatch")
        if return_word_box or getattr(self, "return_word_box", True) or batcher is None:
            return whole(self, batch_data, return_word_box, **kwargs)
        runner = getattr(self, "runner", None)
        self.pre_tfs["ToBatch"], self.runner = (one_shape_batches(self, batcher, runner) if one_shape else
                                                (lambda imgs: pad_to_width_step(batcher(imgs)), runner))
        try:
            return whole(self, batch_data, return_word_box, **kwargs)
        finally:
            self.pre_tfs["ToBatch"], self.runner = batcher, runner

    process.infer_mp = ONE_SHAPE if one_shape else WIDTH_STEPS  # type: ignore[attr-defined]
    return process


def one_shape_batches(self: Any, batcher: Any, runner: Any) -> tuple[Any, Any]:
    """The batcher and model of a PaddleX recognizer at its one shape (ONE_SHAPE), for one
    batch: the batch filled up with blank lines and widened to the widest width so far (up to
    ONE_SHAPE_MAX_WIDTH); the model's outputs for the blank lines dropped before PaddleX
    decodes them."""
    rows = getattr(getattr(self, "batch_sampler", None), "batch_size", None) or 1
    real: list[int] = []

    def to_batch(imgs: Any) -> list:
        batch = batcher(imgs)
        if not batch:
            return batch
        lines = batch[0]
        real.append(lines.shape[0])
        width = lines.shape[-1] + -lines.shape[-1] % REC_WIDTH_STEP
        if width <= ONE_SHAPE_MAX_WIDTH:
            width = self.infer_mp_width = max(getattr(self, "infer_mp_width", 0), width)
        return [pad_lines(lines, max(rows - lines.shape[0], 0), width - lines.shape[-1])]

    def run(*args: Any, **run_kwargs: Any) -> Any:
        outputs = runner(*args, **run_kwargs)
        if not real or real[-1] >= rows:
            return outputs
        return [out[:real[-1]] if getattr(out, "ndim", 0) and out.shape[0] == rows else out for out in outputs]

    return to_batch, run


def pad_to_width_step(batch: list) -> list:
    """PaddleX's recognizer batch ([lines x 3 x height x width], zero-padded on the right to
    its widest line) padded on with zeros to a width that is a multiple of REC_WIDTH_STEP."""
    if not batch:
        return batch
    lines = batch[0]
    extra = -lines.shape[-1] % REC_WIDTH_STEP
    return [pad_lines(lines, 0, extra)] if extra else batch


def pad_lines(lines: Any, rows: int, columns: int) -> Any:
    """A recognizer batch [lines x 3 x height x width] with `rows` blank lines after its own
    and `columns` blank columns on the right (zeros, as PaddleX pads its shorter lines)."""
    import numpy

    return numpy.pad(lines, [(0, rows)] + [(0, 0)] * (lines.ndim - 2) + [(0, columns)])


def recognizer_padding_installed() -> str | None:
    """WIDTH_STEPS or ONE_SHAPE, where this process's recognizer batches are padded."""
    predictor = recognizer_class()
    return getattr(predictor.process, "infer_mp", None) if predictor is not None else None


def ctc_decode_without_copy(whole: Any) -> Any:
    def decode(self: Any, pred: Any, return_word_box: bool = False, **kwargs: Any) -> tuple[list, list]:
        import numpy

        if return_word_box:  # (word boxes need PaddleX's own path)
            return whole(self, pred, return_word_box, **kwargs)
        scores = numpy.asarray(pred[0])
        best = scores.argmax(axis=-1)
        chosen = numpy.take_along_axis(scores, best[..., None], axis=-1)[..., 0]
        lines = self.decode(best, chosen, is_remove_duplicate=True)
        return [line[0] for line in lines], [line[1] for line in lines]

    decode.infer_mp = True  # type: ignore[attr-defined]
    return decode


def recognizer_padding(spec: WorkerSpec, init_kwargs: dict, planned: dict | None) -> str | None:
    """How a worker pads its recognizer's batches: WIDTH_STEPS where infer_mp.py sets up
    OpenVINO, ONE_SHAPE where it sets up ONNX Runtime's CUDA provider; else not at all."""
    if tunes_openvino(spec, init_kwargs, planned):
        return WIDTH_STEPS
    if tunes_cuda(spec, init_kwargs, planned):
        return ONE_SHAPE
    return None


def tunes_cuda(spec: WorkerSpec, init_kwargs: dict, planned: dict | None) -> bool:
    """infer_mp.py sets the CUDA provider's options, and CUDA runs the model: ONNX Runtime on
    gpu:N, CUDA first among the providers (PaddleX's own list, CUDA first, where none are
    given), and --engine_config gives no provider_options of its own."""
    given = init_kwargs.get("engine_config") or {}
    providers = (planned or {}).get("providers")
    return (planned is not None and spec.device.startswith("gpu") and init_kwargs.get("engine") == "onnxruntime"
            and (providers is None or providers[:1] == [CUDA_PROVIDER]) and given.get("provider_options") is None)


def tunes_openvino(spec: WorkerSpec, init_kwargs: dict, planned: dict | None) -> bool:
    """infer_mp.py sets OpenVINO's options, and OpenVINO runs the model: on the CPU, OpenVINO
    first among the planned providers (ONNX Runtime gives each node to the first that takes
    it), and --engine_config gives no provider_options of its own."""
    given = init_kwargs.get("engine_config") or {}
    providers = (planned or {}).get("providers") or []
    return (spec.device.startswith("cpu") and providers[:1] == [OPENVINO_PROVIDER]
            and given.get("provider_options") is None)


def onnxruntime_providers() -> list[str]:
    """The execution providers the installed ONNX Runtime build has."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import onnxruntime
    return onnxruntime.get_available_providers()


def providers_left_to_us(init_kwargs: dict) -> bool:
    """The user named neither providers nor their options: infer_mp.py may choose."""
    engine_config = init_kwargs.get("engine_config") or {}
    return engine_config.get("providers") is None and engine_config.get("provider_options") is None


def planned_engine_config(cls: type, spec: WorkerSpec, init_kwargs: dict) -> dict | None:
    """For ONNX Runtime on CPU: the OpenVINO provider where it is installed (2.3x ONNX
    Runtime's own CPU provider on 40 pages) unless the user chose providers; and the thread
    plan, as `intra_op_num_threads` and, wherever OpenVINO is among the providers, its
    `provider_options`, unless the user set them. PaddleOCR's `cpu_threads` only reaches the
    Paddle engine. On a GPU: see planned_gpu_config."""
    if init_kwargs.get("engine") != "onnxruntime" or not accepts_keyword(cls, "engine_config"):
        return None
    if spec.device.startswith("gpu"):
        return planned_gpu_config(spec, dict(init_kwargs.get("engine_config") or {}))
    if not spec.device.startswith("cpu"):
        return None
    engine_config = dict(init_kwargs.get("engine_config") or {})
    if providers_left_to_us(init_kwargs) and OPENVINO_PROVIDER in onnxruntime_providers():
        engine_config["providers"] = [OPENVINO_PROVIDER]
    if spec.cpu_threads is not None:
        engine_config.setdefault("intra_op_num_threads", spec.cpu_threads)
    providers = engine_config.get("providers") or []
    if OPENVINO_PROVIDER in providers and engine_config.get("provider_options") is None:
        engine_config["provider_options"] = [openvino_options(spec.cpu_threads) if p == OPENVINO_PROVIDER else {}
                                             for p in providers]
    return engine_config


# ONNX Runtime's CUDA provider options that infer_mp.py sets unless --engine_config gives
# provider_options: cuDNN's heuristic choice of convolution algorithms instead of ONNX
# Runtime's default exhaustive search, which is rerun for every new input shape (recognizer
# batches vary in width). Measured on an H200, 8 instances: 4.57 -> 7.34 pages/s (1.6x).
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}
CUDA_OPTIONS_BACK = json.dumps({"provider_options": {"cudnn_conv_algo_search": "EXHAUSTIVE"}})  # ONNX Runtime's own


def planned_gpu_config(spec: WorkerSpec, engine_config: dict) -> dict:
    """ONNX Runtime on gpu:N: each session's CPU thread pools sized by the plan (ONNX
    Runtime's default is every core, per session, in every instance), and CUDA_OPTIONS for
    the CUDA provider; what --engine_config sets wins (provider_options as a whole). The
    device_id stays PaddleX's: it adds gpu:N's id to the CUDA provider's options itself."""
    if spec.cpu_threads is not None:
        engine_config.setdefault("intra_op_num_threads", spec.cpu_threads)
        engine_config.setdefault("inter_op_num_threads", spec.cpu_threads)
    providers = engine_config.get("providers")
    if engine_config.get("provider_options") is None:
        if providers is None:  # PaddleX's own list, CUDA first: it gives a dict of options to CUDA
            engine_config["provider_options"] = dict(CUDA_OPTIONS)
        elif CUDA_PROVIDER in providers:
            engine_config["provider_options"] = [dict(CUDA_OPTIONS) if p == CUDA_PROVIDER else {} for p in providers]
    return engine_config


def onnxruntime_sessions() -> list[Any]:
    """The ONNX Runtime sessions alive in this process (a worker's: its pipeline's)."""
    onnxruntime = sys.modules.get("onnxruntime")
    return live_instances(onnxruntime.InferenceSession) if onnxruntime is not None else []


def live_instances(kind: type) -> list[Any]:
    """The objects of this class alive in this process (a worker's: what its pipeline built)."""
    return [o for o in gc.get_objects() if isinstance(o, kind)]


def describe_engine(init_kwargs: dict) -> str:
    """What a worker's pipeline really runs on: ONNX Runtime sessions and their providers, as
    the sessions report them (on a GPU, with its id and cuDNN search from their own provider
    options); else the engine asked for; else Paddle if it is loaded."""
    sessions = onnxruntime_sessions()
    providers = list(dict.fromkeys(p for session in sessions for p in session.get_providers()))
    if providers:
        why = provider_choice(init_kwargs, providers, sys.modules["onnxruntime"].get_available_providers())
        if padding := RECOGNIZER_PADDING_SAID.get(recognizer_padding_installed()):
            why = (f"{why}; " if why else "") + padding
        return f"onnxruntime ({', '.join(providers)}){cuda_settings(sessions)}" + (f" [{why}]" if why else "")
    if init_kwargs.get("engine"):
        return init_kwargs["engine"]
    return "paddle" if "paddle" in sys.modules else "the pipeline's own (not Paddle or ONNX Runtime)"


def cuda_settings(sessions: list[Any]) -> str:
    """' on GPU 0, cudnn_conv_algo_search HEURISTIC', as the sessions' CUDA providers have it."""
    options = [getattr(s, "get_provider_options", dict)().get(CUDA_PROVIDER) for s in sessions]
    options = [o for o in options if o]
    if not options:
        return ""
    gpus = ", ".join(dict.fromkeys(str(o.get("device_id", "?")) for o in options))
    search = ", ".join(dict.fromkeys(str(o.get("cudnn_conv_algo_search", "?")) for o in options))
    return f" on GPU {gpus}, cudnn_conv_algo_search {search}"


def provider_choice(init_kwargs: dict, running: list[str], available: list[str]) -> str | None:
    """Why PaddleX's ONNX Runtime engine runs these providers, where infer_mp.py chose them
    (see planned_engine_config) rather than the user."""
    if init_kwargs.get("engine") != "onnxruntime":
        return None
    if CUDA_PROVIDER in running:
        if (init_kwargs.get("engine_config") or {}).get("provider_options") is None:
            return (f"{CUDA_OPTIONS['cudnn_conv_algo_search']} set by default, 1.6x EXHAUSTIVE on an H200; "
                    f"--engine_config '{CUDA_OPTIONS_BACK}' for ONNX Runtime's own")
        return None
    if not providers_left_to_us(init_kwargs):
        return None
    if OPENVINO_PROVIDER in running:
        return f"OpenVINO chosen by default, as it is installed; --engine_config '{CPU_PROVIDER_CONFIG}' to change"
    if running == [CPU_PROVIDER] and OPENVINO_PROVIDER not in available:
        return ("ONNX Runtime's CPU provider, as OpenVINO is not installed; the faster OpenVINO "
                "provider is in requirements-onnx.txt")
    return None


def cpu_fallback(spec: WorkerSpec, init_kwargs: dict) -> str | None:
    """Why a worker whose pipeline was built for a GPU must not run: some of PaddleX's ONNX
    Runtime sessions run on the CPU provider alone (ONNX Runtime falls back to it, with only
    a warning, when its CUDA provider cannot start: a CUDA or cuDNN library missing), which
    would run the whole batch on the CPU for hours. None where the sessions use the GPU, or
    the user asked for the CPU provider alone."""
    if init_kwargs.get("engine") != "onnxruntime" or not spec.device.startswith("gpu"):
        return None
    wanted = (init_kwargs.get("engine_config") or {}).get("providers")
    if wanted is not None and set(wanted) <= {CPU_PROVIDER}:
        return None
    on_cpu = [s for s in onnxruntime_sessions() if set(s.get_providers()) <= {CPU_PROVIDER}]
    if not on_cpu:
        return None
    gpu = spec.device.partition(":")[2]
    cause = (cuda_provider_problem(int(gpu) if gpu.isdigit() else 0)
             or "ONNX Runtime's own warning above says why its CUDA provider did not start")
    return (f"{spec.device} was asked for, but ONNX Runtime put {len(on_cpu)} of this pipeline's session(s) on "
            f"{CPU_PROVIDER} alone, a silent fallback to the CPU; not starting: {cause}")


# ---------------------------------------------------------------------------------------------
# Inputs -> tasks, with collision-free output names decided up front
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One input file and where its pages go. `index` is its place in the sorted input list."""

    index: int
    path: str  # absolute, its folder's real path: the input's key in the ledger, handed to predict()
    rel: str  # path relative to --input_dir, for messages
    out_dir: str  # folder of its JSON files
    out_base: str  # outputs are {out_base}.json, or {out_base}_{page}.json for pages
    source: tuple[int, int] | None = None  # (size, mtime_ns) when selected: see unchanged()
    page_count: int | None = None  # a document's pages, read before dispatch (see count_pages)
    pages: tuple[int, int] | None = None  # a range of them, [start, stop): see split_documents
    alone: bool = False  # a weak page read again: a range never merged with others (see Reading)
    # A PDF or TIFF: its outputs are `{out_base}_{page}.json`, an image's `{out_base}.json`. (Set
    # once per Task made, not a property: it is asked for about five times a task.)
    paged: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "paged", os.path.splitext(self.path)[1].lower() in PAGED_SUFFIXES)

    @property
    def page_numbers(self) -> range:
        """The pages this task renders (none known for an image, or a document not counted)."""
        return range(*self.pages) if self.pages else range(self.page_count or 0)

    @property
    def weight(self) -> int:
        """Pages it renders, at least 1: what --task_timeout and the dispatch order weigh."""
        return len(self.page_numbers) or 1

    def output_path(self, page_index: int | str | None) -> str:
        name = self.out_base if page_index is None else f"{self.out_base}_{page_index}"
        return os.path.join(self.out_dir, name + ".json")

    def output_file(self, name: str) -> str:
        """One of its files, named relative to out_dir (os.path.join's result, faster)."""
        return f"{self.out_dir.rstrip(os.sep)}{os.sep}{name}"


@dataclass
class InputSelection:
    paths: list[str]  # absolute, sorted, unique; listed paths may not exist (they fail, named)
    root: str  # the folder the output folders mirror
    ignored: int = 0  # matches that were directories, other types, or a file already taken
    unlisted: tuple[tuple[str, str], ...] = ()  # (folder, why): folders of the inputs that could not be listed


def regular_file_status(path: str) -> os.stat_result | None:
    """os.stat of a regular file, symlinks followed; None if it is not one (or not there)."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    return status if stat.S_ISREG(status.st_mode) else None


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of a regular file, symlinks followed; None if it is not one."""
    status = regular_file_status(path)
    return (status.st_dev, status.st_ino) if status else None


def one_path_per_file(identities: dict[str, tuple[int, int] | None], root: str,
                      not_inputs: frozenset[tuple[int, int]] = frozenset(),
                      recorded: Callable[[str], list[str] | None] = lambda key: None) -> tuple[list[str], int]:
    """Sorted, with each file once: a symlink beside its target, or a file reached through a
    linked folder, is the same input. The first path in sorted order is kept, unless paths of
    the file are inputs of earlier runs (`recorded`: the outputs of an input's records, by
    input_key; None without records): those are kept, each with its own outputs, so that a link
    added beside a done input never takes its place (its outputs would then keep their old text
    when it changes); of one input's paths (through a linked folder), the one whose outputs the
    records list. Paths that are not files (listed but missing) are kept: they fail later,
    named. Files in `not_inputs` (the run log, which a link among the inputs may reach) are
    dropped."""
    kept, dropped = [], 0
    files: dict[tuple[int, int], list[str]] = defaultdict(list)
    for path in sorted(identities):
        identity = identities[path]
        if identity is None:
            kept.append(path)
        elif identity in not_inputs:
            dropped += 1
        else:
            files[identity].append(path)
    for paths in files.values():
        chosen = paths[:1]
        if len(paths) > 1:  # (rare: a realpath per path only here)
            by_key: dict[str, list[str]] = defaultdict(list)
            for path in paths:
                by_key[input_key(path)].append(path)
            chosen = sorted(recorded_path(spellings, outputs, root) for key, spellings in by_key.items()
                            if (outputs := recorded(key)) is not None) or chosen
        kept.extend(chosen)
        dropped += len(paths) - len(chosen)
    return sorted(kept), dropped


def recorded_path(paths: list[str], outputs: list[str], root: str) -> str:
    """Of an input's paths (sorted), the one whose output folder its records' outputs are in;
    else the first."""
    folders = {os.path.dirname(output) for output in outputs}
    return next((path for path in paths if os.path.dirname(relative_to_root(path, root)) in folders), paths[0])


def input_key(path: str) -> str:
    """The key of an input's records: its name in its folder's real path (see plan_tasks)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def path_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of whatever is at path, symlinks followed; None if nothing is."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    return status.st_dev, status.st_ino


def within(path: str, folder: str) -> bool:
    """Whether path is folder or lies below it; both absolute and spelled alike."""
    return path == folder or path.startswith(os.path.join(folder, ""))


@dataclass(frozen=True)
class OutputFolder:
    """The output folder as the filesystem sees it, however --output_dir spells it (`..`, a
    link, a link on the way): nothing in it is an input, or a rerun would take its own JSON and
    visualizations for inputs. A walk compares each folder's identity with it (the folder's
    stat is made anyway); other matches and listed paths compare their real folder."""

    identity: tuple[int, int] | None  # None while it does not exist: then nothing is in it
    real: str
    real_root: str  # the folder the inputs are taken from, when it lies inside the output folder

    @classmethod
    def of(cls, output_dir: str, root: str) -> OutputFolder:
        return cls(path_identity(output_dir), os.path.realpath(output_dir), os.path.realpath(root))

    def holds(self, real_folder: str) -> bool:
        """Whether a file in this (real) folder is in the output folder. An input folder that
        lies inside the output folder (`--input_dir out/scans --output_dir out`) still holds
        inputs."""
        if self.identity is None or not within(real_folder, self.real):
            return False
        return not (within(self.real_root, self.real) and within(real_folder, self.real_root))


def scan_matches(input_dir: str, pattern: str, skip: tuple[int, int] | None = None,
                 unlisted: list[tuple[str, str]] | None = None) -> list[tuple[str, tuple[int, int] | None]] | None:
    """The common patterns `NAME` and `**/NAME` (NAME without a slash) by a scandir walk, with
    each match's file identity: what pathlib's glob gives (`**` is zero or more folders,
    linked folders are not entered, unreadable ones passed over, hidden names match), at a
    fraction of its cost and without a stat per plain file (100,000 inputs: seconds of the
    coordinator's CPU). Folders a `**` walk enters are not matches (not counted as passed
    over); the folder whose identity is `skip` (the output folder) is not walked; a folder that
    cannot be listed is added to `unlisted`, with why. None for any other pattern: pathlib does
    those."""
    parts = pattern.split("/")
    recursive = len(parts) == 2 and parts[0] == "**"
    name = parts[-1]
    if not (len(parts) == 1 or recursive) or not name or "**" in name or name in (".", ".."):
        return None
    matches = re.compile(fnmatch.translate(name)).match
    found: list[tuple[str, tuple[int, int] | None]] = []
    folders = [input_dir]
    while folders:
        folder = folders.pop()
        try:
            status = os.stat(folder)
            if (status.st_dev, status.st_ino) == skip:
                continue
            with os.scandir(folder) as scan:
                entries = list(scan)
        except FileNotFoundError:  # (gone since it was listed)
            continue
        except OSError as error:
            if unlisted is not None:
                unlisted.append((folder, error.strerror or str(error)))
            continue
        for entry in entries:
            try:
                if recursive and entry.is_dir(follow_symlinks=False):  # walked into, so not passed over
                    folders.append(entry.path)
                elif matches(entry.name):
                    if entry.is_file(follow_symlinks=False):  # a plain file: its inode is in the listing
                        found.append((entry.path, (status.st_dev, entry.inode())))
                    else:
                        found.append((entry.path, file_identity(entry.path)))
            except OSError:  # gone or unreadable since it was listed
                continue
    return found


def glob_matches(input_dir: str, pattern: str, output: OutputFolder) -> list[tuple[str, tuple[int, int] | None]]:
    """What pathlib's glob matches for the patterns the walk does not do, with identities;
    matches in the output folder are left out (a real path per folder: rare patterns only)."""
    try:
        paths = [str(path) for path in Path(input_dir).glob(pattern)]
    except (ValueError, NotImplementedError) as error:
        raise UsageError(f"bad --input_glob_pattern {pattern!r}: {error} "
                         "(use a pattern relative to --input_dir)") from None
    if ".." in pattern and any(".." in path[len(input_dir):].split(os.sep) for path in paths):
        raise UsageError(f"--input_glob_pattern {pattern!r} reaches outside --input_dir")
    real_folders: dict[str, str] = {}
    matches = []
    for path in paths:
        folder = os.path.dirname(path)
        if folder not in real_folders:
            real_folders[folder] = os.path.realpath(folder)
        matches.append((path, None if output.holds(real_folders[folder]) else file_identity(path)))
    return matches


def glob_inputs(input_dir: str, patterns: tuple[str, ...], output_dir: str, recursive: bool = False,
                not_inputs: frozenset[tuple[int, int]] = frozenset(),
                recorded: Callable[[str], list[str] | None] = lambda key: None) -> InputSelection:
    """Files matching any pattern; `recursive` matches each (a NAME) in every subfolder.
    Directories are never inputs, nor is anything in the output folder (see OutputFolder), and
    with the default pattern only the types the pipeline reads are taken; everything passed
    over is counted. `**` does not descend into linked folders, so a link loop cannot trap it."""
    output = OutputFolder.of(output_dir, input_dir)
    identities: dict[str, tuple[int, int] | None] = {}
    ignored = 0
    unlisted: list[tuple[str, str]] = []
    only_readable = patterns == (DEFAULT_GLOB_PATTERN,)
    if recursive:
        patterns = tuple(f"**/{pattern}" for pattern in patterns)
    for pattern in patterns:
        matches = scan_matches(input_dir, pattern, output.identity, unlisted)
        if matches is None:
            matches = glob_matches(input_dir, pattern, output)
        for path, identity in matches:
            if path in identities:
                continue
            if identity is None or (only_readable and os.path.splitext(path)[1].lower() not in SUPPORTED_SUFFIXES):
                ignored += 1
            else:
                identities[path] = identity
    unique, duplicates = one_path_per_file(identities, input_dir, not_inputs, recorded)
    return InputSelection(unique, input_dir, ignored + duplicates, tuple(sorted(set(unlisted))))


def resolve_dots(path: str, cwd: str) -> str:
    """path made absolute against cwd and normalised, with `..` resolved as the filesystem does:
    `link/../a.png` is the a.png beside link's target, where os.path.abspath would take the
    one beside link. Only a path with `..` costs a realpath; other links stay as spelled."""
    parts = os.path.join(cwd, path).split(os.sep)
    if ".." not in parts:
        return os.path.normpath(os.sep.join(parts))
    last = len(parts) - 1 - parts[::-1].index("..")
    return os.path.normpath(os.path.join(os.path.realpath(os.sep.join(parts[:last + 1])), *parts[last + 1:]))


class ListedPaths:
    """Where listed paths go, by a rule that is the same in every run, whatever else the list
    holds: a path below the root (--input_dir, else the current folder) mirrors its place
    there, any other under `_outside/` followed by its absolute path. A path that reaches a
    folder of the root through another spelling (a link, the root's real path) is spelled
    through the root, as a walk of the root would list it. Paths in the output folder, and the
    root itself, are passed over (see OutputFolder). Real paths are taken once per folder."""

    def __init__(self, root: str, output_dir: str) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.output = OutputFolder.of(output_dir, root)
        self.real_folders: dict[str, str] = {}

    def place(self, path: str) -> str | None:
        """The path to use for a listed (absolute, normalised) path; None if it is not an input."""
        folder, name = os.path.split(path)
        real = self.real_folders.get(folder)
        if real is None:
            real = self.real_folders[folder] = os.path.realpath(folder)
        if self.output.holds(real) or path == self.root or os.path.join(real, name) == self.real_root:
            return None  # (the root itself: `find scans` lists scans)
        if not within(path, self.root) and within(real, self.real_root):
            path = os.path.normpath(os.path.join(self.root, os.path.relpath(real, self.real_root), name))
        rel = relative_to_root(path, self.root)
        if rel.startswith(OUTSIDE_DIR + os.sep) and within(path, self.root):
            raise UsageError(f"--input_list: cannot place {rel!r}: its outputs would go "
                             f"under {OUTSIDE_DIR}/, which holds those of listed paths outside {self.root!r}; "
                             "rename that folder, or give another --input_dir (or run from another folder)")
        return path


def read_input_list(source: str, input_dir: str | None, output_dir: str,
                    not_inputs: frozenset[tuple[int, int]] = frozenset(),
                    recorded: Callable[[str], list[str] | None] = lambda key: None) -> InputSelection:
    """Paths one per line (NUL-separated if the list holds a NUL), relative to the current
    folder, each placed by itself (see ListedPaths)."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read --input_list {source!r}: {error.strerror}") from None
    entries = data.split(b"\0") if b"\0" in data else data.splitlines()
    cwd = os.getcwd()
    listed = ListedPaths(resolve_dots(input_dir, cwd) if input_dir is not None else cwd, output_dir)
    unique = {resolve_dots(os.fsdecode(entry), cwd) for entry in entries if entry.strip()}
    placed = {listed.place(path) for path in sorted(unique)}
    identities = {path: file_identity(path) for path in placed if path is not None}
    for path in [path for path, identity in identities.items() if identity is None]:  # (not a file: rare)
        if os.path.isdir(path):  # (`find scans -newer stamp` lists scans, and its changed subfolders)
            del identities[path]
    ignored = len(unique) - len(identities)  # in the output folder, folders, two spellings of one path
    paths, duplicates = one_path_per_file(identities, listed.root, not_inputs, recorded)
    return InputSelection(paths, listed.root, ignored + duplicates)


def find_inputs(config: Config, recorded: Callable[[str], list[str] | None] = lambda key: None) -> InputSelection:
    """The inputs: never the run log nor a lock file, wherever they are (an --input_dir that
    holds the --run_log holds its lock too). `recorded`: which inputs have records (see
    one_path_per_file)."""
    input_dir = str(config.input_dir) if config.input_dir is not None else None
    own = [config.run_log, run_log_lock(config.run_log), config.lock_file]
    not_inputs = frozenset(filter(None, (file_identity(str(path)) for path in own)))
    if config.input_list is not None:
        return read_input_list(config.input_list, input_dir, str(config.output_dir), not_inputs, recorded)
    return glob_inputs(input_dir, config.input_glob_patterns, str(config.output_dir), config.recursive, not_inputs,
                       recorded)


def relative_to_root(path: str, root: str) -> str:
    """Where an input's outputs go below --output_dir; a listed path outside the root goes
    under `_outside/` followed by its absolute path."""
    prefix = root.rstrip(os.sep) + os.sep
    if path.startswith(prefix):
        return path[len(prefix):]
    return os.path.join(OUTSIDE_DIR, path.lstrip(os.sep))


def in_shard(task: Task, shard: tuple[int, int] | None) -> bool:
    """Stable and disjoint: a hash of the relative path, so every machine agrees whatever
    order it lists the inputs in, and adding inputs never moves the others."""
    if shard is None:
        return True
    index, count = shard
    return zlib.crc32(os.fsencode(task.rel)) % count == index


PAGE_NAME = re.compile(rf"(.+)_({PAGE_NUMBER.pattern})")


def colliding(claims: dict[int, tuple[str, bool]], folded: bool = False) -> set[int]:
    """Ids whose output names overlap. A claim is (base, paged): an image writes `base.json`,
    a paged input `base_N.json` for every N, so image `a_3` collides with paged `a`. With
    `folded` (a case-insensitive filesystem) `A` and `a` overlap too."""
    if folded:
        claims = {key: (base.casefold(), paged) for key, (base, paged) in claims.items()}
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


def output_bases(names: list[str], folded: bool = False, folders: Iterable[str] = ()) -> list[str]:
    """Seed names (the stem) where unique in a folder; otherwise the full file name; in the
    rare case that still collides, the full name plus `~N`. Deterministic for a given set.
    `folders`: names of the output folder's mirrored subfolders, which a JSON file must not take
    (`x.png` beside a subfolder `x.json/`: `x.png.json`)."""
    split = [os.path.splitext(n) for n in names]
    paged = [suffix.lower() in PAGED_SUFFIXES for _, suffix in split]
    claims = {i: (stem, paged[i]) for i, (stem, _) in enumerate(split)}
    # A subfolder named like a JSON file holds that name: a claim no input can move (negative).
    compared = [name.casefold() if folded else name for name in folders]  # (one folder per name as compared)
    taken = {name[:-len(".json")] for name in compared if name.endswith(".json")}
    claims.update({-1 - k: (stem, False) for k, stem in enumerate(sorted(taken))})
    for i in colliding(claims, folded):
        if i >= 0:
            claims[i] = (names[i], paged[i])
    extra = 1
    while clashes := colliding(claims, folded):
        movable = sorted(i for i in clashes if i >= 0)  # (the subfolders' claims stay)
        for i in movable[1:] if len(movable) == len(clashes) else movable:
            claims[i] = (f"{names[i]}~{extra}", paged[i])
        extra += 1
    return [claims[i][0] for i in range(len(names))]


def plan_tasks(root: str | Path, output_dir: str | Path, paths: list[str], folded: bool = False) -> list[Task]:
    """Give every input its output folder (mirroring `root`) and a unique base name, decided
    from the whole input set (all shards), so that two inputs never write one file, nor a file
    where a folder goes; `folded`: the output folder's filesystem ignores case, so names must
    differ by more than case."""
    root, output_dir = str(root), str(output_dir)
    rels = [relative_to_root(str(path), root) for path in paths]
    folders: dict[str, list[int]] = defaultdict(list)
    for i, rel in enumerate(rels):
        folders[os.path.dirname(rel)].append(i)
    subfolders: dict[str, set[str]] = defaultdict(set)  # folder -> names of its folders that hold inputs
    for folder in folders:
        parts = folder.split(os.sep) if folder else []
        for depth, part in enumerate(parts):
            subfolders[os.sep.join(parts[:depth])].add(part)
    tasks: list[Task | None] = [None] * len(paths)
    for folder, members in folders.items():
        out_dir = os.path.join(output_dir, folder) if folder else output_dir
        # An input's key: its name in its folder's real path, so that it is one input however
        # the folder is reached (a linked folder, `..`, another spelling); a linked file keeps
        # its own name. (One folder here: one relative folder is one folder of inputs.)
        real = os.path.join(os.path.realpath(os.path.dirname(str(paths[members[0]]))), "")
        bases = output_bases([os.path.basename(rels[i]) for i in members], folded, subfolders[folder])
        for i, base in zip(members, bases):
            tasks[i] = Task(i, real + os.path.basename(rels[i]), rels[i], out_dir, base)
    return tasks


# ---------------------------------------------------------------------------------------------
# Ledger: the run logs record what is done and every file the tool placed, for which input
# ---------------------------------------------------------------------------------------------

DONE, FAILED, PLACING = "done", "failed", "placing"
FOLDER_CLAIM = ""  # the holder of a name that an output folder takes (see Ledger.json_owners): no input
RECORD_START = b'{"time": '  # how every line of a run log starts (json.dumps, "time" first)
RUN_LOG_PROBE_BYTES = 1 << 20  # read of a run log's first line to tell it is one (see a_run_log)
RUN_LOG_PATTERN = "infer_mp*.runlog.jsonl"  # every shard's run log in --output_dir, by default name
BOOKKEEPING_PREFIX = ".infer_mp"  # the lock files, the staging folder: never outputs
STAGING_DIR = ".infer_mp.staging"  # in --output_dir: workers write here, and rename into place when told
BOOKKEEPING_SUFFIXES = (".lock", ".compact")  # lock files, a compaction's temporary: never an output
LOG_FLUSH_SECONDS = 1.0  # records not followed by a placement reach the run log's file within this
COMPACT_MIN_LINES = 1000  # a run log shorter than this is never compacted
COMPACT_RATIO = 3  # ... a longer one is, once it has this many lines per input it describes
STATUSES = (DONE, FAILED, PLACING)  # (a tuple: a hand-edited status may be a list, which no set takes)
ONLY_STRINGS = frozenset({str})
ONLY_INTS = frozenset({int})


def bookkeeping(path: str, root: str | Path) -> bool:
    """Is this path (real, or spelled under the output folder `root`) infer_mp.py's own there:
    its lock files, its staging folder or anything in it? (Never an input, a run log or an
    output folder: the staging folder is emptied at every start, a lock file rewritten.)"""
    root = str(root)
    return path != root and within(path, root) and os.path.relpath(path, root).startswith(BOOKKEEPING_PREFIX)


Moves = tuple[str | None, list[tuple[str, str | None]]]  # a task's (own staging folder, [(staged, final or None:
#                                                            removed, see Report.keep_earlier)])


def read_records(path: Path, start: tuple[int, int],
                 ends: dict[Path, tuple[int, int, int, int]]) -> Iterator[tuple[int, dict | None]]:
    """(line number, record) of every line; a run's closing line as it is; None for a line
    that is neither: a line cut short by a kill -9, a hand edit (its input then counts as not
    done), or a `skipped` line of an earlier version (it only repeated a done record, at a
    later time that would hide a change made before it). A batch's `placing` line gives a
    record per input, all with its line number. From `start` (an offset and its line's number,
    where an earlier reading ended: see Ledger.catch_up); `ends` gets where this one ended, before
    a last line still without its newline (being written: read again whole next time), the file's
    inode (a compaction replaces the file) and its size then."""
    offset, first = start
    number, line = first - 1, b"\n"
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            for number, line in enumerate(handle, first):
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    record = None
                if well_formed(record):
                    yield number, record
                elif (type(record) is dict and record.get("status") == PLACING and "input" not in record
                      and type(record.get("placing")) is list):
                    for entry in placing_records(record):
                        yield number, entry if well_formed(entry) else None
                elif (type(record) is dict and type(record.get("run")) is dict and "input" not in record
                      and type(record.get("gen", 0)) is int):
                    yield number, record
                else:
                    yield number, None
            whole = line.endswith(b"\n")
            size = handle.tell()
            ends[path] = (size - (0 if whole else len(line)), number + whole, os.fstat(handle.fileno()).st_ino, size)
    except FileNotFoundError:
        return
    except OSError as error:
        raise UsageError(f"cannot read the run log {str(path)!r}: {error.strerror}") from None


def well_formed(record: Any) -> bool:
    """Has it a record's shape? (Checked for a million lines at start-up: kept cheap.)"""
    if type(record) is not dict or type(record.get("input")) is not str or type(record.get("time")) is not str:
        return False
    outputs, extras = record.get("outputs") or [], record.get("extra_outputs") or []
    if not (record.get("status") in STATUSES and type(outputs) is list and type(extras) is list
            and set(map(type, outputs)) <= ONLY_STRINGS and set(map(type, extras)) <= ONLY_STRINGS):
        return False
    pages, failed, weak = record.get("range"), record.get("failed_pages") or [], record.get("weak_pages") or []
    return ((pages is None or (type(pages) is list and len(pages) == 2 and set(map(type, pages)) == ONLY_INTS))
            and type(failed) is list and set(map(type, failed)) <= ONLY_INTS and type(record.get("gen", 0)) is int
            and type(weak) is list and set(map(type, weak)) <= ONLY_INTS)


def placing_records(line: dict) -> Iterator[dict]:
    """A `placing` line's records, one per input: [input, outputs, extra outputs] each; with the
    run that wrote it (`shard`: see run_tag; none before 2026-12-03, or where a hand edit left
    something else: any run's, then)."""
    shard = line.get("shard")
    for entry in line["placing"]:
        if type(entry) is list and len(entry) == 3:
            yield {"time": line.get("time"), "gen": line.get("gen", 0), "input": entry[0], "status": PLACING,
                   "outputs": entry[1], "extra_outputs": entry[2], "shard": shard if type(shard) is str else None,
                   "output_dir": line.get("output_dir")}


def files_of(record: dict) -> list[str]:
    """The files a record lists (as recorded: relative to the output folder)."""
    return [*(record.get("outputs") or ()), *(record.get("extra_outputs") or ())]


def failed_on(done: dict | None, later: dict) -> bool:
    """Did `later`, a failure after `done`, fail on the very file `done` was made from (under
    --overwrite, or other options)? Then `done` no longer says the input is done: the failure
    stands. (A file that was not there, or a record without size, says nothing.)"""
    return (done is not None and later.get("size") is not None and later.get("mtime_ns") is not None
            and (later["size"], later["mtime_ns"]) == (done.get("size"), done.get("mtime_ns")))


def a_failure(record: dict) -> bool:
    """Does the record say the input, or some of its pages, failed?"""
    return record.get("status") == FAILED or bool(record.get("failed_pages"))


def same_version(done: dict, later: dict) -> bool:
    """Was `later` (a failure after `done`) made from the file `done` was made from? A file
    that was not there (a moved-away or mistyped listed path) says nothing against it."""
    if later.get("size") is None or "mtime_ns" not in later or "mtime_ns" not in done:
        return True
    return (later.get("size"), later.get("mtime_ns")) == (done.get("size"), done.get("mtime_ns"))


class Ledger:
    """Which files under --output_dir the tool placed, for which input, and which of them each
    input holds now: the run logs, read as a journal (SQLite's, git's index: written down
    before it is done). A task's files are written by its worker into a staging folder; the
    coordinator records their final names (a `placing` record), the worker renames them into
    place, then the coordinator writes the task's done record. So every file the tool ever placed is attributed to one
    input, and a file is deleted only when the ledger says the tool placed it for an input and
    no current record of any input lists it; a file nobody recorded stays where it is.

    What an input holds: the files of its last whole record (a failed document's good pages
    too), of its last done record while that is of the same file version, and of its page
    ranges recorded since. Records merge by generation (each run writes one more than the
    highest it read), not by machines' clocks; older records (no generation) by their time.
    Every path is relative to the output folder's real path, compared in one spelling."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.latest: dict[str, dict] = {}  # by input: its last whole record
        self.last_done: dict[str, dict] = {}  # ... its last done whole record, or weak one (failed, its text kept)
        self.ranges: dict[str, list[dict]] = defaultdict(list)  # ... its page ranges' records
        self.placed: dict[str, set[str]] = {}  # inputs with more than one record: every file ever placed
        self.generation = 0  # the highest read; this run writes the next
        self.lines = 0  # in this run's own log
        self.inputs = 0  # ... and the inputs it describes
        self.protected: set[str] = set()  # never deleted nor overwritten: inputs, run logs
        self.kept: set[str] = set()  # never deleted: what the tool placed in an input folder (see not_placed)
        self.inputs_inside: str | None = None  # the input folder, where it lies inside the root (see not_placed)
        self.leftovers: dict[str, list[str]] = {}  # placed, held by nobody, and not deletable
        self.placements: dict[str, tuple[tuple, str]] = {}  # file -> (order, input) of its last `placing` record
        self.retired = 0
        self.dry: list[str] | None = None  # --dry_run: the files retiring would delete, listed, not deleted
        self.log: RunLog | None = None
        self._holders: dict[str, set[str]] | None = None  # file -> inputs that hold it (built when needed)
        self._held: dict[str, set[str]] = {}  # input -> files it holds, as indexed in _holders
        self._written = itertools.count()
        self._folders: set[str] = set()  # output folders checked this run (see check_folder, prune)
        self._placing: list[list] = []  # [input, outputs, extras] of a batch's tasks: see prepare
        self.paths: list[Path] = []  # the logs read (see read), this run's own last
        self.own_index = 0  # this run's log among those read (see read)
        self.options = ""  # this run's pipeline and options, as each of its records says (see options_tag)
        self.finished: dict[tuple[int, int], int] = {}  # (log, generation) -> line: a run that exited 0 or 1
        self.writers: dict[int, set[str | None]] = defaultdict(set)  # log -> the runs whose placing lines it has
        self.tails: dict[int, tuple[Path, tuple[int, int, int, int]]] = {}  # other logs: where reading them ended
        self.placed_meanwhile: set[str] | None = None  # files that catch_up found placed since this run read
        self._placing_lock: Any = None  # a shard's run: see take_turn
        self._turn = False  # ... this run holds it
        self._turn_missed = ""  # ... why this run could not have it, the last time it tried
        self.put_off = False  # retiring put off for want of the turn: the log is not compacted (see choose_work)
        self.beside: list[Path] = []  # a shard's run: the logs the other shards of its count write (see catch_up)
        self.legacy: dict[int, int] = {}  # log -> line of its last closing line without a generation
        self.last_closing: dict[int, int] = {}  # log -> the line of its last closing line
        self.log_folder: dict[int, tuple[str, str | None]] = {}  # log -> (the output folder its last line that
        #                                                            names one names, where the log was then)
        self.still_ours: Callable[[], bool] = lambda: True  # is the root the folder this run locked? (see RunLock)

    # -- reading --------------------------------------------------------------------------

    @classmethod
    def read(cls, config: Config) -> Ledger:
        """Every run log in --output_dir (all shards) then this run's own, which wins a tie.
        (With the garbage collector paused: a million records are a million new dicts, and
        its passes over them cost more than reading them.)"""
        ledger = cls(config.output_dir)  # (the run log is a real path: see checked_run_log)
        ledger.options = options_tag(config)
        paths = [*sorted(p for p in config.output_dir.glob(RUN_LOG_PATTERN) if p != config.run_log and p.is_file()),
                 config.run_log]  # (not an output folder so named: an input subfolder `infer_mp.x.runlog.jsonl/`)
        ledger.protected.update(map(str, paths))
        with collector_paused():
            for index, path in enumerate(paths):
                ledger.read_log(path, index, own=path == config.run_log)
            gc.freeze()  # the ledger lives as long as the run: a million records, never garbage
        ledger.paths, ledger.own_index = paths, len(paths) - 1
        return ledger

    def read_log(self, path: Path, index: int, own: bool, start: tuple[int, int] = (0, 0)) -> None:
        inputs: set[str] = set()
        number = -1
        ends: dict[Path, tuple[int, int, int, int]] = {}
        for number, record in read_records(path, start, ends):
            if record is None:
                continue
            if "input" not in record:  # (see read_records)
                self.note_run(record, index, number)
                continue
            generation = record.get("gen", 0)
            self.add(record, (generation, "", index, number) if generation else (0, record["time"], index, number))
            if own:
                inputs.add(record["input"])
        if own:
            self.lines, self.inputs = number + 1, len(inputs)
        elif path in ends:
            self.tails[index] = (path, ends[path])

    def catch_up(self) -> None:
        """Read what the shards running beside this one have written to their logs since this
        run read them (a log that was not there then: all of it): a file that one of them placed
        meanwhile is its input's, not a leftover to retire (see retire)."""
        generation, known = self.generation, {path for path, _ in self.tails.values()}
        if self.placed_meanwhile is None:
            self.placed_meanwhile = set()
        for path in self.beside:
            if path not in known and path.exists():  # (a log of its own: its index below all others)
                self.read_log(path, -1 - len(self.tails), own=False)
        for index, (path, (offset, number, inode, size)) in list(self.tails.items()):
            try:
                status = os.stat(path)
            except OSError:
                continue
            if path not in self.beside or (status.st_ino, status.st_size) == (inode, size):
                continue  # (nothing new; a run over all inputs, or of another count, is not running)
            if status.st_ino != inode or status.st_size < offset:  # compacted since: read whole again
                offset = 0
            self.read_log(path, index, own=False, start=(offset, number))
        self.generation = generation  # (this run's records, and its closing line, keep the one it has)

    def add(self, record: dict, order: tuple) -> None:
        """One record, at its place in the merged order (see read_log)."""
        record["_order"] = order
        key, status = record["input"], record["status"]
        if order[0] > self.generation:  # (not max(): a call per record, 0.1 s over a million at start-up)
            self.generation = order[0]
        previous = self.latest.get(key)
        if status == PLACING or key in self.placed or previous is not None or key in self.ranges:
            self.placed_by(key).update(files_of(record))
        if status == PLACING:
            self.writers[order[2]].add(record.get("shard"))
            self.note_folder(record, order[2])
            if self.placed_meanwhile is not None:
                self.placed_meanwhile.update(files_of(record))
            for raw in files_of(record):  # (the logs are read one after the other: keep the latest)
                if raw not in self.placements or order > self.placements[raw][0]:
                    self.placements[raw] = (order, key)
            return
        if "range" in record:
            self.ranges[key].append(record)
        else:
            if previous is None or order >= previous["_order"]:
                self.latest[key] = record
            if status == DONE or record.get("weak") is True or record.get("weak_pages"):  # (text kept: see held)
                previous = self.last_done.get(key)
                if previous is None or order >= previous["_order"]:
                    self.last_done[key] = record
        if self._holders is not None:
            self._index(key)

    def note_run(self, line: dict, index: int, number: int) -> None:
        """A run's closing line: a run that finished reported the failures it recorded (see
        reported). One of a version before 2026-12-03, without a generation, vouches for every
        line before it. (Its generation counts as the records' do: a run that wrote nothing else
        has one of its own.)"""
        self.last_closing[index] = number
        self.note_folder(line["run"], index)
        if "gen" not in line:
            self.legacy[index] = number
            return
        self.generation = max(self.generation, line["gen"])
        if line["run"].get("exit_code") in (ExitCode.OK, ExitCode.INPUTS_FAILED):
            self.finished[index, line["gen"]] = number

    def note_folder(self, line: dict, index: int) -> None:
        """The output folder a `placing` line or a closing line names (since 2026-12-04), and
        where the log was as it was written (since 2026-12-05; None before)."""
        if type(folder := line.get("output_dir")) is str:
            self.log_folder[index] = folder, line.get("run_log") if type(line.get("run_log")) is str else None

    def check_output_folder(self) -> None:
        """Refuse a run log whose last line that names an output folder (a `placing` line, a
        closing line) names another: one log for two folders lets each take the other's records
        for its own (a stale text in one is never redone, a user's file in the other taken for
        an output, or retired). A log inside the folder is its folder's where it kept its place
        in it as the folder was copied or moved (`cp -r out out2`; `mv out out2; mkdir out`; the
        files moved into a subfolder, or up from one): where the log was written, relative to
        the folder it names, is where it is now, relative to this one. One from before
        2026-12-05 does not say where it was written: it is this folder's unless it names
        another that is still there and lies inside this one (a subfolder's own). A log outside
        is refused while the folder it names is there, and is not this one reached through a
        link (only this run's own log can be outside). (Not told apart by device and inode: a
        freed inode is handed to the next folder made, and a remount changes the device number.)"""
        for index, path in enumerate(self.paths):
            folder, written_at = self.log_folder.get(index, (None, None))
            if folder is None or os.path.realpath(folder) == self.root:
                continue
            if within(str(path), self.root):
                if written_at is not None:
                    if os.path.relpath(written_at, folder) == os.path.relpath(path, self.root):
                        continue
                elif not (within(folder, self.root) and os.path.isdir(folder)):
                    continue
                raise UsageError(f"the run log {str(path)!r} in --output_dir holds the records of another output "
                                 f"folder, {folder!r} (each output folder needs its own run log); move it into that "
                                 "folder, or out of this one")
            if os.path.isdir(folder):
                raise UsageError(f"--run_log {str(path)!r} holds the records of another output folder, {folder!r} "
                                 "(each output folder needs its own run log); give this run a --run_log of its own, "
                                 "or leave --run_log out")

    def reported(self, record: dict) -> bool:
        """Did the run that recorded this failure report it? One that finished did: with exit 1,
        or with 0 where the failure stood from an earlier run. One stopped by a signal, killed
        before its closing line, or stopped by a full disk did not: the next run reports it (see
        select_work), so that a cron job sees exit 1 for every failure once."""
        return self.reported_by(record) >= 0

    def reported_by(self, record: dict) -> int:
        """The line, in the record's log, of the closing line that says so (see reported); -1
        if none does."""
        _, _, index, number = record["_order"]
        legacy = self.legacy.get(index, -1)
        return legacy if number < legacy else self.finished.get((index, record.get("gen", 0)), -1)

    def placed_in_logs_of(self, runs: set[str], keys: set[str]) -> set[str]:
        """Those of `keys` for which a log that one of these `runs` (see run_tag) writes, or a
        version that did not say which run wrote it, has the last `placing` record of a file."""
        logs = {index for index, writers in self.writers.items()
                if index != self.own_index and (None in writers or writers & runs)}
        return {key for order, key in self.placements.values() if key in keys and order[2] in logs}

    def placed_by(self, key: str) -> set[str]:
        """Every file placed for the input, as recorded; started, the first time the input has
        a second record, from what it holds (its one record's files)."""
        placed = self.placed.get(key)
        if placed is None:
            placed = self.placed[key] = {rel for record in self.held(key) for rel in files_of(record)}
        return placed

    @property
    def worth_compacting(self) -> bool:
        return self.lines >= COMPACT_MIN_LINES and self.lines > COMPACT_RATIO * self.inputs

    # -- what each input holds --------------------------------------------------------------

    def unfinished_ranges(self, key: str) -> list[dict]:
        """Range records since the input's last whole record, in order: pages of a document
        that a run did, or failed, before it was stopped. (The whole record a finished document
        gets lists them all, and supersedes them.)"""
        records = self.ranges.get(key)
        if not records:
            return []
        latest = self.latest.get(key)
        return sorted((r for r in records if latest is None or r["_order"] > latest["_order"]),
                      key=itemgetter("_order"))

    def held(self, key: str) -> list[dict]:
        """The records whose files the input holds now (see the class)."""
        latest, done = self.latest.get(key), self.last_done.get(key)  # (no done record without a latest: see add)
        records = [] if latest is None else [latest]
        if done is not None and done is not latest and same_version(done, latest):
            records.insert(0, done)
        return records + self.unfinished_ranges(key)

    def placed_since(self, rel: str, record: dict) -> str | None:
        """The input whose task placed this file after `record` listed it, if one did (a run
        killed between the rename and that task's record): the file may hold that input's text
        now, or, the same input's, another version's. It is not `record`'s to count as done;
        another input's, it is not `record`'s to hold."""
        placement = self.placements.get(rel)
        return placement[1] if placement is not None and placement[0] > record["_order"] else None

    def placed_for_another(self, raw: str, key: str) -> bool:
        """Was this file placed last for another input? Then it is that input's to hold, or to
        retire (a shard's run may have placed it, its record not written yet)."""
        placement = self.placements.get(raw)
        return placement is not None and placement[1] != key

    def held_records(self) -> Iterator[tuple[str, dict]]:
        """(input, record) of every record that an input holds now (see held), over the whole
        ledger: a million inputs of one record each without a call of held() for each."""
        yield from self.latest.items()
        for key, done in self.last_done.items():
            if done is not (latest := self.latest[key]) and same_version(done, latest):
                yield key, done
        for key in self.ranges:
            yield from ((key, record) for record in self.unfinished_ranges(key))

    def json_owners(self, folders: set[str]) -> dict[str, dict[str, str]]:
        """Folder -> JSON name stem -> the input that placed that file last, of the files in
        these folders that current records hold (a gone input's record may still list a file
        that a later input placed under its freed name: the later one's). An output folder
        named like a JSON file (a subfolder's, which may be gone now) holds that name in its
        parent for no input (FOLDER_CLAIM): a file cannot go where a folder is."""
        wanted = {os.path.relpath(folder, self.root) if folder != self.root else "" for folder in folders}
        last: dict[str, tuple[dict, str, str]] = {}  # file as recorded -> (record, input, file as compared)
        for key, record in self.held_records():
            for raw in record.get("outputs") or ():
                if (raw.endswith(".json") and (rel := self.normal(raw))
                        and (rel.rpartition(os.sep)[0] in wanted or ".json" + os.sep in rel)
                        and (raw not in last or record["_order"] > last[raw][0]["_order"])):
                    last[raw] = (record, key, rel)
        owners: dict[str, dict[str, str]] = defaultdict(dict)
        for raw, (record, key, rel) in last.items():
            if (placer := self.placed_since(raw, record)) is not None:
                key = placer
            parts = rel.split(os.sep)
            for depth, part in enumerate(parts):
                if part.endswith(".json") and (head := os.path.join(self.root, *parts[:depth])) in folders:
                    if depth < len(parts) - 1:
                        owners[head][part[: -len(".json")]] = FOLDER_CLAIM
                    else:
                        owners[head].setdefault(part[: -len(".json")], key)
        return owners

    def held_files(self, key: str) -> set[str]:
        """The files the input's records hold, less those another input placed since (a name
        a gone input freed: see placed_since)."""
        return {rel for record in self.held(key) for raw in files_of(record)
                if (rel := self.normal(raw)) and self.placed_since(raw, record) in (None, key)}

    def keys(self) -> set[str]:
        return {*self.latest, *self.ranges}

    def recorded(self, key: str) -> list[str] | None:
        """The outputs this input's records list; None if no earlier run has a record of it
        (see one_path_per_file)."""
        if key not in self.latest and key not in self.ranges:
            return None
        records = [self.latest.get(key), self.last_done.get(key), *self.ranges.get(key, ())]
        return [output for record in records if record for output in record.get("outputs") or ()]

    def not_placed(self, selection: InputSelection) -> InputSelection:
        """The inputs less the files the tool placed, which an input folder inside the output
        folder can hold (`--input_dir out/scans --recursive --save img`: a picture lands beside
        its scan; with `--input_glob_pattern '**/*'` its JSON is matched too): passed over as
        not inputs, by the records (every file the tool placed, held or not), whatever their
        names, unless the records know them as inputs (see an_input: a hand-edited record listing
        a scan).
        They are never deleted (a scan may have been put in the place of an old picture); at a
        name that is a current input's output, they are that output, placed again when their
        input changes."""
        if not within(inputs := os.path.realpath(selection.root), self.root):
            return selection
        self.inputs_inside = inputs
        held = (raw for _, record in self.held_records() for raw in files_of(record))
        placed = {rel for raw in itertools.chain(self.placements, held) if (rel := self.normal(raw)) is not None}
        real: dict[str, str] = {}  # folder -> its real path (an input folder may be spelled through a link)
        spelled = set()
        for path in selection.paths:
            folder = os.path.dirname(path)
            if folder not in real:
                real[folder] = os.path.realpath(folder)
            found = os.path.join(real[folder], os.path.basename(path))
            if (rel := os.path.relpath(found, self.root)) in placed and not self.an_input(found, rel):
                spelled.add(path)
                self.kept.add(found)
        if not spelled:
            return selection
        return replace(selection, paths=[path for path in selection.paths if path not in spelled],
                       ignored=selection.ignored + len(spelled))

    def an_input(self, path: str, rel: str) -> bool:
        """Is this file (a real path, and relative to the root) an input by the records: it has
        records of its own, and no task placed a file there since (a picture put where a scan
        that is gone since was)?"""
        records = [record for record in [self.latest.get(path), *self.ranges.get(path, ())] if record]
        return bool(records) and self.placed_since(rel, max(records, key=itemgetter("_order"))) is None

    def holders(self) -> dict[str, set[str]]:
        """File -> the inputs whose current records hold it, over the whole ledger (built the
        first time a file may have to go; kept up to date as records are added)."""
        if self._holders is None:
            self._holders = defaultdict(set)
            for key in self.keys():
                self._index(key)
        return self._holders

    def _index(self, key: str) -> None:
        holders = self._holders
        for rel in self._held.get(key, ()):
            holders[rel].discard(key)
            if not holders[rel]:
                del holders[rel]
        self._held[key] = files = self.held_files(key)
        for rel in files:
            holders[rel].add(key)

    def normal(self, rel: str) -> str | None:
        """A recorded path in the one spelling (normalized, relative to the root); None if it
        leads outside the root (a hand edit), or is the root itself."""
        if rel.startswith(("/", ".")) or "/." in rel or "//" in rel or "\0" in rel:
            if "\0" in rel:
                return None
            full = os.path.normpath(os.path.join(self.root, rel))
            return full[len(self.root) + 1:] if within(full, self.root) and full != self.root else None
        return rel or None

    # -- deleting what nobody holds ---------------------------------------------------------

    def retire(self, key: str) -> None:
        """Delete the files the tool placed for this input that no current record of any input
        lists: old names, pages a shorter version lacks, a changed file's old text after it
        failed, what a killed run placed before its record."""
        placed = self.placed.get(key)
        if not placed:
            return
        latest = self.latest.get(key)
        if latest is not None and placed.issubset(files_of(latest)):  # (most often: it holds them all)
            del self.placed[key]
            return
        held = self.held_files(key)
        candidates = [raw for raw in placed if raw not in held]
        if candidates:
            if self.log is not None:  # the record that supersedes them in the file before they go
                self.log.flush()
            holders = self.holders()
            # A shard beside this run may have placed one of them since it read the logs: read
            # on, in the shards' placing turn, so that none can place one between that and the
            # unlink. Without the turn, nothing is retired (see put_off).
            ours = bool(self.beside) and self.dry is None and not self._turn
            if ours and not self.take_turn():
                self.put_off = True
                return
            try:
                if self.beside:
                    self.catch_up()
                for raw in candidates:
                    rel = self.normal(raw)
                    if rel is not None and (rel in held or rel in holders or self.placed_for_another(raw, key)
                                            or raw in (self.placed_meanwhile or ())):
                        continue
                    if rel is None or self.remove(rel):
                        placed.discard(raw)
                    else:
                        self.leftovers.setdefault(key, []).append(rel)
            finally:
                if ours:
                    self.end_turn()
        if all(raw in held for raw in placed):  # what it holds says the rest: see add()
            del self.placed[key]

    def remove(self, rel: str) -> bool:
        """Delete one placed file; True once it is gone. Only a regular file, really inside the
        root (no link on the way leads out), never bookkeeping (a hand-edited record may name a
        lock file: not by its `.infer_mp` prefix, which an input's outputs may have too), an
        input or a run log. A file that cannot be deleted stays, and is tried again on the next
        run. (--dry_run: listed.)"""
        path = os.path.join(self.root, rel)
        folder, name = os.path.split(path)
        if (name.endswith(BOOKKEEPING_SUFFIXES) or rel.split(os.sep, 1)[0] == STAGING_DIR
                or fnmatch.fnmatch(name, RUN_LOG_PATTERN)):
            return False
        real_folder = os.path.realpath(folder)
        real = os.path.join(real_folder, name)
        if not within(real_folder, self.root) or real in self.protected or real in self.kept or path in self.protected:
            return False
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            if self.dry is not None:
                self.dry.append(rel)
                return True
            self.check_still_ours()
            os.unlink(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        self.retired += 1
        self.prune(folder)
        return True

    def prune(self, folder: str) -> None:
        """Remove the output folders that retiring a file emptied, up to the root: an empty one
        would take the name of a later input's file (`x.json/` where x.png's JSON goes). Not one
        that this run has made ready for a placement (see check_folder; one it makes later, it
        makes again), nor an input folder."""
        while (folder != self.root and folder not in self._folders
               and not (self.inputs_inside and within(folder, self.inputs_inside))):
            try:
                os.rmdir(folder)
            except OSError:
                return
            folder = os.path.dirname(folder)

    def reconcile(self, others: set[str]) -> None:
        """At start, under the lock: finish what a killed run left half-done (files placed
        without a record, stale files a kill kept from being retired), for every input but
        `others` (those another shard's run may be placing now: see choose_work)."""
        for key in [key for key in self.placed if key not in others]:
            self.retire(key)
            if self.put_off:  # (the rest too: each try would wait for the turn)
                return

    # -- writing ----------------------------------------------------------------------------

    def open(self, path: Path, shard: tuple[int, int] | None = None) -> None:
        self.log = RunLog(path, Path(self.root), run_tag(shard))
        self.generation += 1

    def write(self, task: Task, status: str, **fields: Any) -> None:
        """An input's record (see RunLog.write), taken into the ledger; a whole record then
        retires what the input no longer holds. (After the record: a kill in between leaves
        a done input with its files, and the next run's reconcile retires them.)"""
        record = self.log.write(task, status, generation=self.generation, **{"options": self.options, **fields})
        if a_failure(record):  # in the file at once: a kill must not take a failure already said
            self.log.flush()
        self.add(record, (self.generation, "", math.inf, next(self._written)))
        if task.pages is None:
            self.retire(task.path)

    def prepare(self, task: Task, staged: str, prefix: str, pages: list[str], extras: list[str]) -> Moves:
        """Where a task's staged files go, recorded first; its worker renames them once the
        record is in the file (see Staged), so a kill at any instant leaves no file that the
        ledger cannot attribute, nor one whose text is not what its last record says (see
        placed_since). Raises OSError for a folder that lies outside the root, or a name that is
        an input or a run log; then the task fails and nothing is placed."""
        names = [*pages, *extras]
        finals = [task.output_file(name) for name in names]
        self.check_folder(task.out_dir)
        for folder in {os.path.dirname(final) for name, final in zip(extras, finals[len(pages):]) if os.sep in name}:
            self.check_folder(folder)  # (a page's JSON is named in out_dir; what a writer adds may not be)
        for path in finals:
            if path in self.protected:
                raise OSError(errno.EEXIST, f"{path!r} is an input or a run log; not overwritten")
        rels = [self.log.relative(path) for path in finals]
        if self.beside:
            self.check_not_taken(task, rels, len(pages))
        self._placing.append([task.path, rels[:len(pages)], rels[len(pages):]])
        renames = [(f"{staged}{os.sep}{prefix}{name}", final) for name, final in zip(names, finals)]
        return (None if prefix else staged), renames

    def record_placing(self) -> None:
        """One `placing` line for the files of a batch's tasks (see prepare), and the log
        flushed: in the file before any of them is renamed. In this run it matters only to
        what retire() may delete (see add)."""
        self.check_still_ours()
        if self._placing:
            self.log.write_placing(self._placing, self.generation)
            for key, outputs, extras in self._placing:
                self.placed_by(key).update(outputs, extras)
            self._placing = []
        self.log.flush()
        self.end_turn()

    def check_still_ours(self) -> None:
        """Stop (exit 74) before placing or deleting anything in an output folder that is no
        longer the one this run locked (see RunLock.still_ours)."""
        if not self.still_ours():
            raise OutputFailed(f"--output_dir {self.root!r}, or its lock file, was deleted or moved while this run "
                               "used it; placing and deleting nothing more in it")

    def check_not_taken(self, task: Task, rels: list[str], pages: int) -> None:
        """A shard's run: has another shard placed one of its page JSON names (the first `pages`
        of `rels`) for another input since this run read the logs? The inputs changed between
        the two runs' starts (a.png, listed by one, deleted; a.jpg, listed by the other, added),
        and each named its input a.json: the later rename would put a deleted input's text under
        a current one's name, and the logs could not say which came last. (Its --save files are
        named for its pages, so that covers them; what a writer adds beside them, under a name
        that other inputs' writers use too, is placed for each in turn, as by one run.) Checked
        in the shards' placing turn, held until the placing line is in the file (see
        record_placing). Without the turn, no name last placed for another input is taken at
        all: the shard that holds the turn may be about to retire that file (see retire).
        Raises OSError (EBUSY: the next run names the input afresh, see FOLDER_ERRNOS)."""
        turn = self.take_turn()
        self.catch_up()
        for number, rel in enumerate(rels):
            placement = self.placements.get(rel)
            if placement is None or placement[1] == task.path:
                continue
            if number < pages and rel in self.placed_meanwhile:  # (a set once catch_up has run)
                raise OSError(errno.EBUSY, f"{os.path.join(self.root, rel)!r}: another shard placed it for "
                              f"{placement[1]!r} since this run listed the inputs (they changed meanwhile); not "
                              "placed: the next run names this input afresh")
            if not turn:
                raise OSError(errno.EBUSY, f"{os.path.join(self.root, rel)!r}: it was placed for {placement[1]!r}, "
                              f"and the shards' placing turn ({PLACING_LOCK}) {self._turn_missed}: not placed, "
                              "as a shard may be retiring it; a later run that has the turn places it")

    def take_turn(self) -> bool:
        """A shard's run: the lock that the shards take in turn to check and write their placing
        lines (see check_not_taken), and to retire files (see retire). False if another shard
        holds it past PLACING_LOCK_SECONDS (a stopped one must not stop the others; from then on
        waited for LOCK_WAIT_SECONDS a try, until it is had again): see those two for what a
        shard then does without it."""
        if self._turn:
            return True
        seconds = LOCK_WAIT_SECONDS if self._turn_missed else PLACING_LOCK_SECONDS
        try:
            take_lock(self._placing_lock, fcntl.LOCK_EX, seconds)
        except OSError as error:
            self._turn_missed = (f"is held by another shard (waited for {seconds:g} s: a shard stopped?)"
                                 if isinstance(error, BlockingIOError) else f"cannot be had ({error.strerror})")
            return False
        self._turn, self._turn_missed = True, ""
        return True

    def open_turn(self) -> None:
        """A shard's run, as it starts: the shards' placing lock opened (see take_turn), so that
        one that cannot be is said before any work."""
        path = os.path.join(self.root, PLACING_LOCK)
        try:
            self._placing_lock = open(path, "a+")
        except OSError as error:
            raise cannot_write(f"the shards' placing lock {path!r}", error) from None

    def end_turn(self) -> None:
        if self._turn:
            fcntl.flock(self._placing_lock, fcntl.LOCK_UN)
            self._turn = False

    def check_folder(self, folder: str) -> None:
        """Create an output folder; refuse one whose real path leads out of the root (a linked
        subfolder): nothing is written, renamed or deleted outside --output_dir."""
        if folder in self._folders:
            return
        if bookkeeping(folder, self.root):
            raise OSError(errno.EINVAL, f"{folder!r}: names starting {BOOKKEEPING_PREFIX!r} are infer_mp.py's "
                          "own in --output_dir; rename that input folder")
        try:
            os.makedirs(folder, exist_ok=True)
        except FileExistsError:  # a file on the way: another input's output of an earlier run, retired
            # once that input is done again under a name of its own (see plan_tasks): a folder error
            raise OSError(errno.ENOTDIR, f"{folder!r}: a file is where this output folder goes (an earlier "
                          "output under that name?); not written there, tried again by the next run") from None
        real_output_folder(folder, self.root)
        self._folders.add(folder)

    def compact(self, path: Path, tag: str = "all") -> None:
        """Rewrite this run's own log with only what the ledger reads (each input's last whole
        record, its last done record, its page ranges since, the `placing` lines since, and a
        `placing` record for files it placed that could not be retired), atomically: a kill
        leaves the old log or the new one, never half of one. Run under the run lock, after
        reconcile, before this run appends. Of the closing `run` lines only the last is kept
        (it names the output folder: see check_output_folder): no-op reruns leave the log's size
        bounded. While retiring is put off (see put_off), every line is kept: the old lines say
        what is still to retire."""
        own = self.own_index
        wanted = set()
        for key in self.keys():
            for record in [self.latest.get(key), self.last_done.get(key), *self.unfinished_ranges(key)]:
                if record is not None and record["_order"][2] == own:
                    wanted.add(record["_order"][3])
                    if a_failure(record):  # and the closing line that says it was reported
                        wanted.add(self.reported_by(record))
        # The placing lines since a record that may count (see placed_since): the input's own,
        # or another input's that lists the file (a name a gone input freed); and those of a
        # file placed where an input was (see an_input).
        dropped = {}
        for raw, (order, key) in self.placements.items():
            anchor = self.last_done.get(key) or self.latest.get(key)
            if order[2] != own:
                continue
            if anchor is None or order > anchor["_order"] or os.path.join(self.root, raw) in self.latest:
                wanted.add(order[3])
            else:
                dropped[raw] = (order, key)
        for key, record in self.held_records() if dropped else ():
            for raw in files_of(record):
                if raw in dropped and dropped[raw][1] != key and record["_order"] < dropped[raw][0]:
                    wanted.add(dropped[raw][0][3])
        wanted.add(self.last_closing.get(own, -1))  # (which output folder the log is for: see check_output_folder)
        placing = [[key, rels, []] for key, rels in self.leftovers.items()]
        extra = [json.dumps({"time": utc_now(), "gen": self.generation, "status": PLACING, "shard": tag,
                             "placing": placing}).encode("ascii") + b"\n"] if self.leftovers else []
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.compact"):  # of a killed compaction
            with contextlib.suppress(OSError):
                leftover.unlink()
        temporary = path.with_name(f".{path.name}.{os.getpid()}.compact")
        try:
            with open(path, "rb") as reader, open(temporary, "wb") as writer:
                for number, line in enumerate(reader):
                    if number in wanted or self.put_off:
                        writer.write(line if line.endswith(b"\n") else line + b"\n")
                writer.writelines(extra)
                writer.flush()
                os.fsync(writer.fileno())
            shutil.copymode(path, temporary)  # (a log kept private stays so)
            os.replace(temporary, path)
            sync_folder(path.parent)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise cannot_write(f"the run log {str(path)!r} (compacting it)", error) from None


# ---------------------------------------------------------------------------------------------
# Run log: the ledger's file, one JSON line per record, appended, flushed, compacted
# ---------------------------------------------------------------------------------------------


class RunLog:
    """Append-only JSON Lines: the ledger's journal (see Ledger), and a line per run; written by
    the coordinator alone and flushed per line, so a kill loses at most the line being written."""

    def __init__(self, path: Path, output_dir: Path, tag: str = "all"):
        self.path, self.output_dir, self.tag = path, output_dir, tag  # tag: the run's (see run_tag)
        self.prefix = os.path.join(str(output_dir), "")
        self.flushed = time.monotonic()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(path, "ab")
            if self.handle.tell() > 0:  # start on a line of our own after a torn last line
                with open(path, "rb") as reader:
                    reader.seek(-1, os.SEEK_END)
                    if reader.read(1) != b"\n":
                        self.handle.write(b"\n")
                        self.handle.flush()
        except OSError as error:
            raise cannot_write(f"the run log {str(path)!r}", error) from None

    def write(self, task: Task, status: str, *, generation: int = 0, options: str = "", outputs: Iterable[str] = (),
              extras: Iterable[str] | dict[str, int | None] = (), device: str | None = None, attempts: int = 0,
              seconds: float = 0.0, error: str | None = None, failed_pages: dict[int, str] | None = None,
              retry: bool | list[int] = False, quality: dict | None = None, weak: dict[int, str] | None = None) -> dict:
        """An input's record, as written; for a document also its page count, the page each of
        its `extras` is of (where they are given as a dict: see extras_of), and the pages that
        failed (`error` then says why); for a page range of it, the range, as [start, stop).
        `quality`: an image's figure (see page_quality), or a document's {page: figure}; `weak`:
        the pages --min_page_score found weak ({None: why} for an image), whose files are kept;
        `retry`: the input (True) or the pages (a list) that failed for the output folder's fault."""
        outputs = [self.relative(o) for o in outputs]
        record = {
            "time": utc_now(),
            "gen": generation,
            "input": task.path,
            "status": status,
            "pages": len(outputs),
            "outputs": outputs,
            "extra_outputs": [self.relative(o) for o in extras],
            "device": device,
            "attempts": attempts,
            "seconds": round(seconds, 3),
            "error": error,
        }
        # None for a file that was not there: whatever is there next is a change.
        record["size"], record["mtime_ns"] = task.source or (None, None)
        if options:
            record["options"] = options
        if task.page_count is not None:
            record["page_count"] = task.page_count
        if task.pages is not None:
            record["range"] = list(task.pages)
        if task.paged and isinstance(extras, dict) and extras:
            record["extra_pages"] = list(extras.values())
        if retry:  # (see FOLDER_ERRNOS)
            record["retry"] = retry
        if failed_pages:
            record["failed_pages"] = sorted(failed_pages)
            record["error"] = error or "; ".join(f"page {page}: {failed_pages[page]}" for page in sorted(failed_pages))
        if weak and task.paged:
            record["weak_pages"] = sorted(weak)
            why = "; ".join(f"page {page}: weak, {weak[page]}" for page in sorted(weak))
            record["error"] = "; ".join(filter(None, [record["error"], why]))
        elif weak:
            record["weak"] = True
            record["error"] = f"weak page: {weak[None]}"
        if quality:
            record["page_quality" if task.paged else "quality"] = (
                {str(page): quality[page] for page in sorted(quality)} if task.paged else quality)
        self._append(record)
        return record

    def write_placing(self, entries: list[list], generation: int) -> None:
        """The files a batch's tasks are about to place: [input, outputs, extra outputs] each,
        relative to the output folder (see Ledger.prepare)."""
        self._append({"time": utc_now(), "gen": generation, "status": PLACING, "shard": self.tag, "placing": entries,
                      "output_dir": str(self.output_dir), "run_log": str(self.path)})

    def write_run(self, counts: dict[str, int], exit_code: int, generation: int) -> None:
        """One line per run, whatever it did (a cron tick with nothing to do adds only this):
        what it counted and how it ended; exit 0 or 1 says its failures were reported (see
        Ledger.reported). Resume passes it over: it names no input."""
        closing = {**counts, "exit_code": exit_code, "pid": os.getpid(), "output_dir": str(self.output_dir),
                   "run_log": str(self.path)}
        self._append({"time": utc_now(), "gen": generation, "run": closing})
        self.flush()

    def _append(self, record: dict) -> None:
        """Buffered; flushed before any file is placed (see Ledger.prepare) and at least every
        LOG_FLUSH_SECONDS otherwise: a kill loses only records whose work is then redone."""
        # ensure_ascii: a file name that is not UTF-8 still makes a valid, round-tripping line.
        try:
            self.handle.write(json.dumps(record).encode("ascii") + b"\n")
        except OSError as error:
            raise OutputFailed(f"cannot write the run log {str(self.path)!r}: {error.strerror}") from None
        if time.monotonic() - self.flushed > LOG_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """A failed write is the disk's fault, not an input's: stop as for an output (exit 74)."""
        try:
            self.handle.flush()
        except OSError as error:
            raise OutputFailed(f"cannot write the run log {str(self.path)!r}: {error.strerror}") from None
        self.flushed = time.monotonic()

    def relative(self, path: str) -> str:
        return path[len(self.prefix):] if path.startswith(self.prefix) else os.path.relpath(path, self.output_dir)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # (a full disk: the stop has been reported already)
            self.handle.close()


_clock: list = [None, ""]  # (the second, as text) last formatted: see utc_now


def utc_now() -> str:
    """A record's time: UTC, to the second (formatted once a second: a record per input)."""
    second = int(time.time())
    if second != _clock[0]:
        _clock[:] = second, datetime.datetime.fromtimestamp(second, datetime.timezone.utc).isoformat()
    return _clock[1]


def real_output_folder(folder: str, root: str) -> None:
    """Check that an output folder's real path is the folder itself: no link on the way (one
    that leads outside `root`, or to another folder inside it, where two folders' outputs
    would mix, or into the staging folder). Raises OSError naming the link."""
    real = os.path.realpath(folder)
    if not within(real, root):
        raise OSError(errno.EXDEV, f"{folder!r} leads outside --output_dir (a link?); not written there")
    if real != os.path.normpath(folder):
        raise OSError(errno.ELOOP, f"{folder!r} is a link to {real!r}, inside --output_dir; not written through "
                      "it (two folders' outputs would mix there)")


FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW  # one part of an output folder: no link


def open_output_folder(folder: str, root: str) -> int:
    """A descriptor of an output folder to rename into, opened one part at a time from the
    root, none of them through a link: the file lands in the folder checked (see
    real_output_folder), whatever link takes a name on the way meanwhile. A part deleted
    during the run (`rm -r` of a subfolder) is made again."""
    descriptor = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in os.path.relpath(folder, root).split(os.sep) if folder != root else ():
            try:
                inner = os.open(part, FOLDER_FLAGS, dir_fd=descriptor)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=descriptor)
                inner = os.open(part, FOLDER_FLAGS, dir_fd=descriptor)
            except OSError as error:
                if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                real_output_folder(folder, root)  # (names where the link leads)
                raise OSError(error.errno, f"{folder!r} has a link or a file on the way (at {part!r}); "
                              "not written through it") from None
            os.close(descriptor)
            descriptor = inner
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a crash after it must not bring the old file back)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def run_tag(shard: tuple[int, int] | None) -> str:
    """What this run's workers' staging folders are named after: its shard, or `all`."""
    return f"s{shard[0]}of{shard[1]}" if shard else "all"


def clear_staging(root: Path, shard: tuple[int, int] | None) -> None:
    """Remove what killed workers left in the staging folder: all of it for a run over all
    inputs (it holds the folder alone, see RunLock); for a shard, all but the other shards' of
    its count (they may be writing there right now; no run of another count, nor one over all
    inputs, runs beside it)."""
    staging = root / STAGING_DIR
    if shard is None:
        shutil.rmtree(staging, ignore_errors=True)
        return
    beside = tuple(run_tag((other, shard[1])) + "-" for other in range(shard[1]) if other != shard[0])
    with contextlib.suppress(OSError):
        for entry in os.scandir(staging):
            if not entry.name.startswith(beside):
                shutil.rmtree(entry.path, ignore_errors=True)


def case_insensitive(root: Path) -> bool:
    """Does the output folder's filesystem ignore case (SMB, APFS, NTFS, vfat)? Probed once,
    under the lock, by creating one name and looking for another."""
    probe = root / f"{BOOKKEEPING_PREFIX}.case-Probe-{os.getpid()}"
    try:
        probe.touch()
    except OSError:
        return False
    try:
        return os.path.exists(root / probe.name.lower())
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# ---------------------------------------------------------------------------------------------
# Selection: the ledger says what is complete; a rerun does only the rest
# ---------------------------------------------------------------------------------------------


def source_identity(path: str) -> tuple[int, int] | None:
    """(size, modification time in ns) of a regular file: what make and rsync judge a change by."""
    status = regular_file_status(path)
    return (status.st_size, status.st_mtime_ns) if status else None


def options_of(record: dict, default: str = "") -> str:
    """The pipeline and options a record was made with (see options_tag); `default` where it
    does not say (a version before 2026-12-03), or a hand edit left something else there."""
    options = record.get("options", default)
    return options if type(options) is str else default


def unchanged(task: Task, record: dict) -> bool:
    """Is the input still the file that `record` was made from? Its size and modification
    time, as recorded; a record from before they were recorded: not modified since its time."""
    if "mtime_ns" in record:  # None, None: it was not there; unchanged while it is still not
        return (record.get("size"), record.get("mtime_ns")) == (task.source or (None, None))
    if task.source is None:
        return False
    try:
        recorded = datetime.datetime.fromisoformat(str(record.get("time"))).timestamp()
    except ValueError:
        return False
    return task.source[1] // 10**9 < int(recorded)


def listed_pages(pages: range, failed: Iterable[int], files: int) -> list[int] | None:
    """The page each of a document task's `files` JSON files is of, in order: its `pages` that
    did not fail, as the tool lists them (see save_report). None where they are not one file a
    page (counted first: a hand-edited record may say 10**12 pages)."""
    failed = {page for page in failed if page in pages}
    if len(pages) - len(failed) != files:
        return None
    return [page for page in pages if page not in failed]


def output_pages(record: dict) -> list[int] | None:
    """The page each JSON file a document's record lists is of (see listed_pages): those of
    its range, or of the whole document (one whose pages were not counted: its first pages)."""
    outputs = record.get("outputs") or ()
    span = record.get("range") or [0, record.get("page_count", len(outputs))]
    if type(span[1]) is not int:
        return None
    return listed_pages(range(*span), record.get("failed_pages") or (), len(outputs))


def is_complete(task: Task, record: dict | None, ledger: Ledger) -> bool:
    """Done means: the log says so, the input has not changed since, AND every output it
    lists is there, under the name the input's page has today, and no task placed it since
    (see Ledger.placed_since). A crash between writing outputs and logging them resolves to "redo", never to "skip"."""
    if not record or record.get("status") != DONE or not unchanged(task, record):
        return False
    outputs = record.get("outputs") or []
    pages = output_pages(record) if task.paged else [None]
    return (bool(outputs) and pages is not None and len(pages) == len(outputs)
            and all(at_todays_name(task, page, ledger.root, rel) and ledger.placed_since(rel, record) is None
                    for page, rel in zip(pages, outputs)))


def at_todays_name(task: Task, page: int | None, root: str, rel: str) -> str | None:
    """The path of a recorded JSON file (`rel`, under `root`) if it is there, under the name
    the input's page has today; else None."""
    path = os.path.join(root, rel)
    if os.path.normpath(path) == os.path.normpath(task.output_path(page)) and os.path.isfile(path):
        return path
    return None


@dataclass(frozen=True)
class Reading:
    """A weak page's earlier result, which --retry_failed redoes: the new result replaces it only
    if it reads better (see better_reading); else this stays, with its --save files."""

    output: str  # its JSON file
    figure: dict  # its quality figure (see page_quality)
    extras: dict[str, int | None] = field(default_factory=dict)  # its --save files -> their page (see extras_of)


@dataclass
class Coverage:
    """What earlier runs left of a document that this run does: its pages done, whose files
    stay, and its pages failed, which stay failed unless --retry_failed (see select_work)."""

    outputs: dict[int, str] = field(default_factory=dict)  # page -> its JSON file
    extras: dict[str, int | None] = field(default_factory=dict)  # --save files of those pages -> their page
    failed: dict[int, str] = field(default_factory=dict)  # page -> why
    standing: set[int] = field(default_factory=set)  # ... failed in a finished run's whole record
    quality: dict[int, dict] = field(default_factory=dict)  # page -> figure, of the pages done
    weak: dict[int, Reading] = field(default_factory=dict)  # --retry_failed: weak pages redone
    weak_kept: set[int] = field(default_factory=set)  # weak pages done, not redone
    weak_standing: set[int] = field(default_factory=set)  # ... of those, weak in a finished run's whole record
    options: set[str] = field(default_factory=set)  # the records' options (see options_tag), of the pages it keeps


@dataclass
class WorkSelection:
    todo: list[Task]
    complete: list[tuple[Task, dict]]  # skipped this run, with their last record
    not_selected: int = 0  # --retry_failed: inputs that had not failed
    standing: list[tuple[Task, dict]] = field(default_factory=list)  # failed before, unchanged: not retried
    ledger: Ledger | None = None
    coverage: dict[int, Coverage] = field(default_factory=dict)  # by task index: documents begun earlier
    unreadable: dict[int, str] = field(default_factory=dict)  # by task index: why it cannot be done (read_documents)
    again: dict[int, dict] = field(default_factory=dict)  # by task index: a failure to report again (see reported)
    weak: dict[tuple[str, int | None], Reading] = field(default_factory=dict)  # (input, page): redone weak pages
    other_done: int = 0  # skipped, done with another pipeline or options (see options_tag)
    other_failed: int = 0  # ... failed before (not retried), failed with them


def select_work(tasks: list[Task], ledger: Ledger, config: Config) -> WorkSelection:
    """Complete inputs are skipped; one that failed and has not changed since is not retried
    (its failure stands, reported once: by this run if the run that recorded it was stopped,
    see Ledger.reported) unless --retry_failed; --overwrite redoes all. A document begun
    earlier is done from where it stopped: see Coverage."""
    selection = WorkSelection([], [], ledger=ledger)
    root = ledger.root
    for task in tasks:
        record, done = ledger.latest.get(task.path), ledger.last_done.get(task.path)
        # (The constructor, not dataclasses.replace: five times faster, for 100,000 inputs.)
        task = Task(task.index, task.path, task.rel, task.out_dir, task.out_base, source_identity(task.path))
        failed = record is not None and a_failure(record)
        news = failed and not ledger.reported(record)  # (recorded by a run that was stopped before it said so)
        unfinished = ledger.unfinished_ranges(task.path)
        failed_before = failed or any(r.get("failed_pages") for r in unfinished)
        weak_before = any(r and r.get("weak_pages") for r in [record, *unfinished])
        if config.overwrite:
            selection.todo.append(task)
            continue
        complete = is_complete(task, record, ledger) or (not (failed and failed_on(done, record))
                                                         and is_complete(task, done, ledger))
        complete = (complete and not news and not (task.paged and record is not None and record.get("retry"))
                    and not unfinished)  # (pages a later run began: its whole record then supersedes them)
        retried = config.retry_failed and (failed_before or weak_before)  # (a document done within
        if complete and not retried:                                         # --max_page_error_rate, too)
            selection.complete.append((task, done))
            selection.other_done += options_of(done, ledger.options) != ledger.options
            continue
        if config.retry_failed:
            if not retried:
                selection.not_selected += 1
                continue
        elif (failed_before and record is not None and not record.get("retry") and unchanged(task, record)
              and not unfinished  # (a later run began it again, --overwrite say: it goes on from there)
              and all(os.path.isfile(os.path.join(root, rel)) for rel in record.get("outputs") or ())):
            if not news:
                selection.standing.append((task, record))
                selection.other_failed += options_of(record, ledger.options) != ledger.options
                continue
            if not (task.paged and (record.get("failed_pages") or record.get("weak_pages"))):  # (see page_coverage)
                selection.again[task.index] = record
        selection.todo.append(task)
        held = ledger.held(task.path)
        if task.paged and held:
            coverage = selection.coverage[task.index] = page_coverage(task, held, ledger, config.retry_failed)
            selection.weak.update(((task.path, page), reading) for page, reading in coverage.weak.items())
        elif config.retry_failed and record and record.get("weak") and unchanged(task, record):
            reading = weak_reading(task, None, record, root)
            if reading is not None:
                selection.weak[task.path, None] = reading
    return selection


def weak_reading(task: Task, page: int | None, record: dict, root: str, rel: str | None = None) -> Reading | None:
    """The weak result of `task`'s page that `record` lists (its JSON `rel`, an image's only
    one), if its file is still there under today's name and the record has its figure."""
    outputs = record.get("outputs") or []
    rel = rel if rel is not None else (outputs[0] if len(outputs) == 1 else None)
    figure = page_figures(record).get(str(page)) if task.paged else record.get("quality")
    output = rel and (at_todays_name(task, page, root, rel) or moved_reading(root, rel))
    if not output or type(figure) is not dict:
        return None
    extras = {found: of for extra, of in extras_of(record, task.paged).items()
              if of in (None, page) and os.path.isfile(found := os.path.join(root, extra))}
    return Reading(output, figure_in_file(output, figure), extras)


def extras_of(record: dict, paged: bool = True) -> dict[str, int | None]:
    """A document record's --save files, as recorded, each with the page it is of: as the record
    says (`extra_pages`), else (a record from before 2026-12-05, a hand edit) as its name says
    (see named_page). None for an image's, and for what a writer added beside them (markdown's
    images, which pages may share): those go with the whole record, while any page of it stays."""
    extras = record.get("extra_outputs") or []
    if not paged:
        return dict.fromkeys(extras)
    outputs = record.get("outputs") or []
    stems = {output[: -len(".json")]: page for page, output in zip(output_pages(record) or (), outputs)}
    pages = record.get("extra_pages")
    if type(pages) is not list or len(pages) != len(extras):
        pages = [None] * len(extras)
    valid = set(stems.values())
    return {extra: page if type(page) is int and page in valid else named_page(extra, stems)
            for extra, page in zip(extras, pages)}


def named_page(extra: str, stems: dict[str, int]) -> int | None:
    """The page of a --save file by the name save_extras gave it, `X_N.md` or `X_N_key.png`
    beside the page's `X_N.json` (`stems`: X_N -> N, the record's own pages); None for another."""
    if extra.endswith(".md") and extra[: -len(".md")] in stems:
        return stems[extra[: -len(".md")]]
    cut = len(extra)
    while extra.endswith(".png") and (cut := extra.rfind("_", 0, cut)) > 0:
        if extra[:cut] in stems:
            return stems[extra[:cut]]
    return None


def moved_reading(root: str, rel: str) -> str | None:
    """A weak reading's file under a name the page no longer has (an input of the same stem
    added since): it is kept there, under its own name, unless a new reading beats it."""
    path = os.path.normpath(os.path.join(root, rel))
    return path if within(path, root) and os.path.isfile(path) else None


def page_figures(record: dict) -> dict:
    """A document record's quality figures by page number (as a string); {} where a hand edit
    left something else."""
    figures = record.get("page_quality")
    return figures if type(figures) is dict else {}


KILLED_PASS = "a --retry_failed run stopped before its record (its options unknown)"  # a figure's `by`


def figure_in_file(path: str, recorded: dict) -> dict:
    """The quality figure of the reading a page's JSON file holds: the recorded one, unless the
    file's own scores say otherwise (a run killed after placing a better reading, before its
    record): a second pass must beat what is there, not what the log last said; and what is
    there is a later pass's reading than the recorded one, by a run that did not say so."""
    try:
        with open(path, "rb") as handle:
            content = json.load(handle)
    except (OSError, ValueError, RecursionError):
        return recorded
    holder = content.get("res", content) if type(content) is dict else None
    found = page_quality(holder) if type(holder) is dict else None
    if found is None or reading_score(found) == reading_score(recorded):
        return recorded
    passes = recorded.get("pass", 1)
    return {**found, "pass": (passes if type(passes) is int else 1) + 1, "by": KILLED_PASS}


def page_coverage(task: Task, held: list[dict], ledger: Ledger, retry_failed: bool) -> Coverage:
    """The pages of `task` that its records of the file as it is now hold: done where the
    file is still there, under the page's name today, not placed again since (see
    Ledger.placed_since), and not failed by a later record (its file stays, held by the earlier
    record, but the page is to redo), else failed (not with --retry_failed). A weak page that
    this input placed again since (a --retry_failed pass stopped before its record) stays, with
    its new reading, in a plain run: it reads weak pages again only with --retry_failed. A
    page's --save files stay with it, those placed with its file (see extras_of); a writer's
    own files, which are of no page, while any page of their record stays."""
    coverage, root = Coverage(), ledger.root
    for record in held:
        if not unchanged(task, record):
            continue
        for page in set(record.get("failed_pages") or []) - folder_fault_pages(record):  # (none in its outputs)
            coverage.outputs.pop(page, None)  # failed since an earlier record held it (--overwrite): to redo
            if not retry_failed:
                coverage.failed[page] = failed_reason(record, page)
                coverage.options.add(options_of(record))
                if "range" not in record and ledger.reported(record):
                    coverage.standing.add(page)
        kept: dict[int, bool] = {}  # page -> placed again since (see the docstring)
        weak = record.get("weak_pages") or []  # (page numbers: see well_formed)
        redo = set(weak) if retry_failed else set()  # (see --min_page_score)
        figures = page_figures(record)
        for page, rel in zip(output_pages(record) or (), record.get("outputs") or ()):
            if page in redo:
                if reading := weak_reading(task, page, record, root, rel):
                    coverage.weak[page] = reading
                continue
            placer = ledger.placed_since(rel, record)
            again = placer == task.path and page in weak and not retry_failed
            if (placer is None or again) and (path := at_todays_name(task, page, root, rel)):
                kept[page] = again
                coverage.outputs[page] = path
                coverage.weak_kept.discard(page)
                coverage.weak_standing.discard(page)
                if page in weak:  # (it stays weak: a later page's run must not make it good)
                    coverage.weak_kept.add(page)
                    if "range" not in record and ledger.reported(record):
                        coverage.weak_standing.add(page)
                if type(figure := figures.get(str(page))) is dict:
                    coverage.quality[page] = figure
        if kept:
            for path in [path for path, page in coverage.extras.items() if page in kept]:  # (an earlier record's)
                del coverage.extras[path]
            for rel, page in extras_of(record).items():
                again = ledger.placed_since(rel, record) == task.path
                if page is not None and (page not in kept or again != kept[page]):
                    continue  # another page's, or another reading's than its page's file holds
                if os.path.isfile(path := os.path.join(root, rel)):
                    coverage.extras[path] = page
            coverage.options.add(options_of(record))
    for page in coverage.outputs:
        coverage.failed.pop(page, None)
        coverage.standing.discard(page)
        coverage.weak.pop(page, None)
    coverage.extras = {path: page for path, page in coverage.extras.items() if page is None or page in coverage.outputs}
    return coverage


def folder_fault_pages(record: dict) -> set:
    """A document record's pages that failed for the output folder's fault (FOLDER_ERRNOS),
    which the next plain run does again: those its `retry` lists; all its failed pages where
    it says `retry: true` (as versions before 2026-12-03 wrote)."""
    retry = record.get("retry")
    pages = retry if type(retry) is list else record.get("failed_pages") if retry else None
    return {page for page in pages if type(page) is int} if type(pages) is list else set()


def failed_reason(record: dict, page: int) -> str:
    """Why `record` says `page` failed: its error, or where that names several pages (Ledger.write
    joins "page N: why" in page order), the part for `page`; never the whole, which the
    document's next record would name under the page again, and again at every run."""
    error = record.get("error") if type(record.get("error")) is str else "failed"
    pages = sorted(record.get("failed_pages") or [])  # (ints: see well_formed)
    parts, marker = f"; {error}", f"; page {page}: "
    start = parts.find(marker)
    if page not in pages or not error.startswith(f"page {pages[0]}: ") or start < 0:
        return error
    start += len(marker)
    following = pages[pages.index(page) + 1:]
    end = parts.find(f"; page {following[0]}: ", start) if following else parts.find("; page ", start)
    return parts[start:end if end >= 0 else len(parts)]


def avoid_claimed_names(tasks: list[Task], ledger: Ledger, folded: bool = False) -> list[Task]:
    """An input must not take a name that another input placed last and that is still on
    disk: an input this run did not select (a list of new files, a narrower pattern, a scan
    moved away after processing). It uses its full file name instead (`~N` added if need be),
    as when two current inputs clash; the other's finished output stays as it is."""
    owners = ledger.json_owners({os.path.normpath(task.out_dir) for task in tasks})
    if not owners:
        return tasks
    if folded:  # (a case-insensitive filesystem: `a.json` is `A.json`)
        owners = {folder: {stem.casefold(): key for stem, key in stems.items()} for folder, stems in owners.items()}
    heads: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))  # folder -> head -> page stems
    for folder, stems in owners.items():
        for stem in stems:
            if (page := PAGE_NAME.fullmatch(stem)) is not None:
                heads[folder][page.group(1)].append(stem)

    def claimed(task: Task, base: str) -> bool:
        folder, base = os.path.normpath(task.out_dir), base.casefold() if folded else base
        stems = heads[folder].get(base, ()) if task.paged else (base,)
        return any(owners[folder].get(stem, task.path) != task.path
                   and os.path.lexists(os.path.join(folder, f"{stem}.json")) for stem in stems)

    folders: dict[str, dict[int, tuple[str, bool]]] = defaultdict(dict)  # the claims colliding() weighs
    for task in tasks:
        folders[os.path.normpath(task.out_dir)][task.index] = (task.out_base, task.paged)
    renamed = []
    for task in tasks:
        if os.path.normpath(task.out_dir) in owners and claimed(task, task.out_base):
            ours = folders[os.path.normpath(task.out_dir)]
            name, extra = os.path.basename(task.rel), 0
            base = name
            while claimed(task, base) or task.index in colliding({**ours, task.index: (base, task.paged)}, folded):
                extra += 1
                base = f"{name}~{extra}"
            ours[task.index] = (base, task.paged)
            task = replace(task, out_base=base)
        renamed.append(task)
    return renamed


def lock_held(path: Path, mode: int = fcntl.LOCK_EX) -> bool:
    """Does a run hold this lock file now (so that it cannot be taken in `mode`)? (Taken for an
    instant to see, if it is there; let go of as the file closes.)"""
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def take_lock(handle: Any, mode: int, seconds: float = LOCK_WAIT_SECONDS) -> None:
    """flock without blocking, tried again for `seconds`: a lock that another run's lock_held
    takes for an instant is not a run holding it. Raises OSError if it stays held."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def same_file(handle: Any, path: Path) -> bool:
    """Is the open file still the one at `path` (not unlinked, nor replaced)?"""
    try:
        held, there = os.fstat(handle.fileno()), os.stat(path)
    except (OSError, ValueError):  # (ValueError: a closed handle)
        return False
    return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def would_be_refused(config: Config) -> bool:
    """Would a run started now be refused its locks (exit 75)? For --dry_run, which takes none:
    each lock that RunLock would take, looked at for an instant, in the mode it would take it."""
    if config.shard is None:
        return lock_held(config.lock_file)
    return (lock_held(config.output_dir / LOCK_NAME, fcntl.LOCK_SH) or lock_held(config.lock_file)
            or any(map(lock_held, other_count_locks(config.output_dir, config.shard[1]))))


def other_count_locks(output_dir: Path, count: int) -> list[Path]:
    """The lock files of shard counts other than `count` (see RunLock._refuse_other_counts)."""
    own = SHARD_COUNT_LOCK.format(count=count)
    return [path for path in output_dir.glob(SHARD_COUNT_LOCK.format(count="*")) if path.name != own]


def shards_running(config: Config) -> set[str]:
    """The other shards of this count that hold their locks now (a run of each is under way),
    as their runs are tagged (see run_tag)."""
    index, count = config.shard
    return {run_tag((other, count)) for other in range(count)
            if other != index and lock_held(folder_lock(config.output_dir, (other, count)))}


class RunLock:
    """One run per output folder at a time (the cron case), with non-blocking flocks that the
    kernel releases when the process ends, however it ends. A run over all inputs holds the
    folder's lock alone; a shard holds it shared, with its own shard's lock alone and its
    shard count's shared, so shards of one count run side by side and nothing else does."""

    def __init__(self, config: Config):
        self.output_dir = config.output_dir
        self.handles: list[Any] = []
        try:
            self._take_folder(config)
            # The run log too: a run into another folder may name it with --run_log, and two runs
            # appending to one log, one of them compacting it, would lose lines.
            log_lock = run_log_lock(config.run_log)
            with contextlib.suppress(OSError):  # if this fails, taking the lock says why
                log_lock.parent.mkdir(parents=True, exist_ok=True)
            self._take(log_lock, fcntl.LOCK_EX, f"another infer_mp.py run is using the run log "
                       f"{str(config.run_log)!r} (each shard and each output folder needs its own --run_log), in",
                       f"the run log's lock beside {str(config.run_log)!r}", "give this run a --run_log of its own")
            # (no pid written in it: the run log's disk may be full)
        except BaseException:
            self.release()
            raise

    def still_ours(self) -> bool:
        """Is --output_dir still the folder this run locked? One deleted (`rm -rf out`) or moved
        away while the run works has no lock file of ours: another run may lock the new one,
        where this run's placing and retiring would overwrite or delete that run's files."""
        return self.folder_handle < len(self.handles) and same_file(self.handles[self.folder_handle], self.lock_path)

    def _take_folder(self, config: Config) -> None:
        """A shard's run: first the shared locks (see the class); then, any run, its own lock file."""
        self.lock_path = config.lock_file
        refusal = "another infer_mp.py run{holder} is using"
        if config.shard is not None:
            self._take(self.output_dir / LOCK_NAME, fcntl.LOCK_SH,
                       "an infer_mp.py run over all inputs{holder} is using")
            with contextlib.suppress(OSError):  # no pid of a run over all inputs is current now
                self.handles[-1].truncate(0)
            count = config.shard[1]
            self._take(self.output_dir / SHARD_COUNT_LOCK.format(count=count), fcntl.LOCK_SH, "")
            self._refuse_other_counts(count)
            refusal = f"another run of shard {config.shard[0]}/{count}{{holder}} is using"
        self._take(config.lock_file, fcntl.LOCK_EX, refusal)
        self.folder_handle = len(self.handles) - 1
        self._write_pid(self.handles[-1])

    def _take(self, path: Path, mode: int, refusal: str, where: str | None = None,
              instead: str = "use another --output_dir") -> None:
        """Lock the file at `path`: the one there once it is locked (a run that found nothing
        to do removes the lock files it created, unlinking each while it holds it: see
        remove_if_unused; then this opens the new one)."""
        for _ in range(LOCK_OPEN_TRIES):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(path, "a+", encoding="utf-8")
            except OSError as error:
                raise cannot_write(where or f"in --output_dir {str(self.output_dir)!r}", error) from None
            try:
                take_lock(handle, mode)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                raise RunLocked(refusal.format(holder=f" (pid {holder})" if holder else "") + f" --output_dir "
                                f"{str(self.output_dir)!r}; wait for it to finish, or {instead}") from None
            if same_file(handle, path):
                self.handles.append(handle)
                return
            handle.close()
        raise RunLocked(f"another infer_mp.py run is removing its lock files in --output_dir {str(self.output_dir)!r} "
                        "as this one starts; try again")

    def _refuse_other_counts(self, count: int) -> None:
        """Shards of another count split the inputs differently: they would overlap ours."""
        for path in other_count_locks(self.output_dir, count):
            with contextlib.suppress(OSError), open(path, "a+", encoding="utf-8") as handle:
                try:
                    take_lock(handle, fcntl.LOCK_EX)  # (a shard of our count starting takes it this way too)
                except OSError:
                    other = path.name.split("-of-")[-1].split(".")[0]
                    raise RunLocked(f"shards of another count ({other}) are using --output_dir "
                                    f"{str(self.output_dir)!r}; run all shards with one --shard I/N, or wait") from None

    def _write_pid(self, handle: Any) -> None:
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        except OSError as error:
            raise cannot_write(f"in --output_dir {str(self.output_dir)!r}", error) from None

    def release(self) -> None:
        for handle in self.handles:
            with contextlib.suppress(OSError):  # closing flushes; a full disk must not hide the cause
                handle.close()
        self.handles = []


# ---------------------------------------------------------------------------------------------
# Documents: page counts, read before any worker starts, and page ranges as tasks
# ---------------------------------------------------------------------------------------------


def count_pages(path: str) -> int | None:
    """A PDF's or TIFF's page count, read without rendering a page, by the libraries PaddleX
    reads them with (pypdfium2, Pillow); None if they are not installed. Raises ValueError
    saying why the file cannot be read: it then fails before any worker touches it."""
    if path.lower().endswith(".pdf"):
        try:
            import pypdfium2
        except ImportError:
            return None
        try:
            document = pypdfium2.PdfDocument(path)
        except Exception as error:  # PdfiumError mostly; whatever a hostile file raises, it is the file's
            why = " ".join(str(error).split())
            if "PDFium: Success" in why:  # what PDFium says of a document without a page tree
                why = "it has no pages"
            raise ValueError(f"cannot be opened as a PDF ({why})") from None
        try:
            count = len(document)
        finally:
            document.close()
    else:
        try:
            from PIL import Image
        except ImportError:
            return None
        try:
            with pillow_unlimited(), Image.open(path) as image:  # (headers only; see --max_image_pixels)
                count = getattr(image, "n_frames", 1)
        except Exception as error:  # Pillow's plugins raise many kinds for a malformed file
            raise ValueError(f"cannot be opened as a TIFF ({one_line(error)})") from None
    if count < 1:
        raise ValueError("has no pages")
    return count


def read_documents(work: WorkSelection) -> None:
    """Check every input to do is a file, and count each document's pages: the run's total is
    then known, and an unreadable file fails now, named (see WorkSelection.unreadable)."""
    counted = []
    for task in work.todo:
        reason = not_a_file(task.path)
        if reason is None and task.paged:
            try:
                task = replace(task, page_count=count_pages(task.path))
            except ValueError as error:
                reason = str(error)
        if reason is not None:
            work.unreadable[task.index] = reason
        counted.append(task)
    work.todo = counted


def not_a_file(path: str) -> str | None:
    """Why a path cannot be an input now, or None. Listed paths are not checked earlier."""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return "is a directory, not a file"
    return "no such file" if not os.path.lexists(path) else "not a regular file"


def pages_to_do(task: Task, coverage: Coverage | None) -> list[int]:
    """A document's pages that this run renders: those earlier runs did not finish or fail."""
    if coverage is None:
        return list(range(task.page_count or 0))
    return [p for p in range(task.page_count or 0) if p not in coverage.outputs and p not in coverage.failed]


RANGES_PER_WORKER = 2  # at least, when a run has few pages: see split_documents


def split_documents(todo: list[Task], coverage: dict[int, Coverage], workers: int, pages_per_task: int,
                    first_index: int) -> list[Task]:
    """The tasks to dispatch, longest first: an image, or a document whole if it is short and
    wholly to do, else its pages to do in ranges (each a task with its own index, from
    `first_index`). A range has at most --pages_per_task pages, and fewer when the run's pages
    would not give every worker RANGES_PER_WORKER ranges (24 pages on 4 workers: 8 ranges of
    3), so that a worker that starts late, or a slow page, does not hold up the end. Longest
    first, so that no worker is left at the end with a long task while the others idle. A weak
    page redone (see Reading) is a range of its own: its result is kept or not on its own."""
    total = sum(len(pages_to_do(t, coverage.get(t.index))) if t.page_count else 1 for t in todo)
    share = -(-total // (RANGES_PER_WORKER * max(1, workers)))
    size = max(1, min(pages_per_task, share)) if pages_per_task else math.inf
    fresh = itertools.count(first_index)
    tasks = []
    for task in todo:
        pages = pages_to_do(task, coverage.get(task.index)) if task.page_count else []
        weak = sorted(set(coverage[task.index].weak).intersection(pages)) if task.index in coverage else []
        if not task.page_count or (len(pages) == task.page_count and task.page_count <= size and not weak):
            tasks.append(task)
            continue
        for start, stop in page_ranges([page for page in pages if page not in weak], size):
            tasks.append(replace(task, index=next(fresh), pages=(start, stop)))
        tasks += [replace(task, index=next(fresh), pages=(page, page + 1), alone=True) for page in weak]
    tasks.sort(key=lambda task: -task.weight)  # (stable: in input order within a length)
    return tasks


def page_ranges(pages: list[int], size: float) -> Iterator[tuple[int, int]]:
    """Runs of consecutive pages, each cut into pieces of at most `size`, as even as can be."""
    runs: list[list[int]] = []
    for page in pages:
        if runs and page == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([page, page + 1])
    for start, stop in runs:
        pieces = max(1, math.ceil((stop - start) / size))
        for i in range(pieces):
            yield start + (stop - start) * i // pieces, start + (stop - start) * (i + 1) // pieces


# ---------------------------------------------------------------------------------------------
# Dispatch: the seam between the coordinator and whatever runs the workers
# ---------------------------------------------------------------------------------------------

# Messages between the coordinator and a worker (a process's pipe, or a Ray actor's calls and
# returns): see the map in the module's docstring.


@dataclass(frozen=True)
class AskPlan:
    """Coordinator -> a warm worker: check the pipeline's options, and plan the workers for
    this command line (see WarmPool)."""

    config: Config


@dataclass(frozen=True)
class Planned:
    """... its answer: the plan, or why the devices cannot be used (neither: it could not tell)."""

    plan: list[WorkerSpec] | None = None
    refused: str | None = None


@dataclass(frozen=True)
class Start:
    """Coordinator -> worker: build the pipeline on this device."""

    spec: WorkerSpec
    options: WorkerOptions


@dataclass(frozen=True)
class Ready:
    """Worker -> coordinator: the pipeline is built."""

    engine: str  # what it really runs on (see describe_engine)
    token: str  # names its staging folder (see Staging)
    reads_windows: bool  # its predict() takes page_windows (see reads_page_windows)
    where: str | None = None  # a Ray actor's device and node


@dataclass(frozen=True)
class InitFailed:
    """Worker -> coordinator: the pipeline could not be built (the coordinator decides)."""

    why: str


@dataclass(frozen=True)
class Batch:
    """Coordinator -> worker: predict these tasks and write their files into staging."""

    tasks: list[Task]


@dataclass(frozen=True)
class Saved:
    """A task's files are in the worker's staging folder (one report of Reports)."""

    index: int
    folder: str
    prefix: str  # what their names there start with (see save_results)
    outputs: list[str]
    extras: dict[str, int | None]  # name -> the page it is of (see save_results)
    seconds: float
    failed_pages: dict[int, str]
    quality: list[dict | None]  # per output, in order (see page_quality)


@dataclass(frozen=True)
class Failed:
    """A task failed: the input's fault (one report of Reports)."""

    index: int
    why: str


@dataclass(frozen=True)
class CannotWrite:
    """A task's files could not be written: the environment's fault (a full disk)."""

    index: int
    why: str


@dataclass(frozen=True)
class OutsideWindow:
    """A page range's predict() gave pages outside it: see Backend._whole_documents."""


@dataclass(frozen=True)
class Reports:
    """Worker -> coordinator, one per batch: a report per task, in order (and notes)."""

    items: list[Saved | Failed | CannotWrite | OutsideWindow | Note]


@dataclass(frozen=True)
class Place:
    """Coordinator -> worker, once it has recorded the `placing` line: rename these files."""

    moves: dict[int, Moves]


@dataclass(frozen=True)
class Placed:
    """Worker -> coordinator: the tasks whose files are in place, and the errors of the rest."""

    indexes: list[int]
    errors: dict[int, tuple[int, str]]  # index -> (errno, message)


@dataclass(frozen=True)
class Retiring:
    """Worker -> coordinator, after Placed: it is time to recycle it; it exits."""

    why: str
    for_memory: bool = False  # past --max_worker_memory_mb (or its default), not --max_items_per_worker


@dataclass(frozen=True)
class WorkerStarted:
    spec: WorkerSpec
    seconds: float
    engine: str  # what its pipeline really runs on


@dataclass(frozen=True)
class WorkerFailedToStart:
    spec: WorkerSpec
    error: str
    retry: str | None = None  # "2 of 3" when another start is tried in its slot


@dataclass(frozen=True)
class WorkerLost:
    spec: WorkerSpec
    reason: str
    requeued: int
    replaced: bool = True


@dataclass(frozen=True)
class WorkerRecycled:
    spec: WorkerSpec
    reason: Retiring


@dataclass(frozen=True)
class TaskDone:
    task: Task
    spec: WorkerSpec
    staged: str  # the folder its worker wrote its files into (see Staged)
    prefix: str  # ... and what their names there start with (see save_results)
    outputs: list[str]  # the page JSONs, as named under task.out_dir
    extras: dict[str, int | None]  # --save files -> the page each is of (see save_results)
    seconds: float
    attempts: int
    failed_pages: dict[int, str] = field(default_factory=dict)  # pages of a document that failed alone
    quality: list[dict | None] = field(default_factory=list)  # per output (see page_quality)


@dataclass
class Staged:
    """A worker's batch, saved in its staging folder. The coordinator records where each
    task's files go (see Ledger.prepare) and fills `moves`; the worker then renames them
    into place, and each task is done once it says so. A task left out of `moves` was
    refused (and recorded failed)."""

    spec: WorkerSpec
    done: list[TaskDone]
    moves: dict[int, Moves] = field(default_factory=dict)  # by task index


@dataclass(frozen=True)
class TaskFailed:
    task: Task
    spec: WorkerSpec | None  # None: failed before reaching a worker (e.g. no such file)
    error: str
    attempts: int = 0
    retry: bool = False  # the output folder's fault (FOLDER_ERRNOS): tried again on the next run


@dataclass(frozen=True)
class OutputError:
    """A worker could not write an output for a reason that is not the input's (disk full)."""

    text: str


@dataclass(frozen=True)
class Note:
    """Something the user should hear once, e.g. an output format the results lack."""

    text: str


@dataclass(frozen=True)
class Waiting:
    """The dispatch loop's pulse (about every POLL_SECONDS): the batch a worker has held longest
    and for how many seconds, if any, so that progress lines go on while one hangs."""

    longest: tuple[str, float] | None


Event = (WorkerStarted | WorkerFailedToStart | WorkerLost | WorkerRecycled | Staged | TaskDone | TaskFailed
         | OutputError | Note | Waiting)


class Stopper:
    """First SIGINT or SIGTERM: start nothing new and give the inputs in progress a grace
    period. Second: stop at once. Either way workers are killed, not left behind."""

    def __init__(self, grace: float = STOP_GRACE_SECONDS):
        self.grace = grace
        self.signum: int | None = None
        self.deadline = math.inf
        self.forced = False  # a second signal: stop now
        self.said = 0  # announcements made: the first signal's, then the second's
        self.closed = False  # see close()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def cut_short(self) -> bool:
        """Did the stop end the work? Only if the dispatch loop took it in (and said so); one that
        came as the loop ended, with nothing left to do, changed nothing (see close)."""
        return self.signum is not None and self.said > 0

    def install(self) -> None:
        """Each stop signal the run listens to (one ignored from the start, as by `nohup` or a
        shell's `&`, stays ignored: see the top of the file)."""
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._on_signal)

    def close(self) -> None:
        """The work is over (what is left is the run's closing line and summary, a moment): a
        signal from now on changes neither what the run did nor its exit code."""
        self.closed = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Sets flags only: the dispatch loop, which wakes at least every POLL_SECONDS, acts
        on them. (An exception raised here would be swallowed inside ray.wait.)"""
        if self.closed:
            return
        if self.signum is not None:
            self.deadline, self.forced = -math.inf, True
            return
        self.signum, self.deadline = signum, time.monotonic() + self.grace

    def announcement(self) -> str | None:
        """What to tell the user about a stop, once, from the dispatch loop (printing inside a
        signal handler can deadlock on the stream it interrupted)."""
        if self.signum is None:
            return None
        if self.said == 0:
            self.said = 1
            return (f"{signal.Signals(self.signum).name}: starting no new inputs; finishing those in progress "
                    f"for up to {self.grace:.0f} s (a second Ctrl-C or SIGTERM stops now)")
        if self.forced and self.said == 1:
            self.said = 2
            return "second signal: stopping now; the inputs in progress are left for the next run"
        return None

    def grace_over(self) -> str:
        return f"{self.grace:.0f} s of grace over: stopping; the inputs still in progress are left for the next run"


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker is told besides its device: the pipeline, its options, what to save,
    and when to retire between batches (0 = no limit)."""

    pipeline: PipelineRef
    init_kwargs: dict = field(default_factory=dict)
    predict_kwargs: dict = field(default_factory=dict)
    save: tuple[str, ...] = ()
    max_items: int = 0
    max_memory_mb: int = 0
    run_tag: str = "all"  # see run_tag()
    staging: str = STAGING_DIR  # the folder workers write into (see Staged)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # 0: no limit (see oversized)

    @property
    def root(self) -> str:
        """--output_dir, as its real path (the staging folder is in it)."""
        return os.path.dirname(self.staging)

    def retire_reason(self, processed: int, started_mb: int | None = None) -> Retiring | None:
        """Why a worker should be replaced after this batch: the items it did, or memory past
        the limit that it gained since its pipeline started (a fresh one would start as high:
        replacing a worker that has not grown would only reload it, batch after batch)."""
        if self.max_items and processed >= self.max_items:
            return Retiring(f"processed {processed} inputs (--max_items_per_worker {self.max_items})")
        if self.max_memory_mb:
            resident = resident_memory_mb()
            grown = resident is not None and resident > (started_mb or 0) * (1 + MIN_GROWTH_TO_RECYCLE)
            if resident is not None and resident > self.max_memory_mb and grown:
                return Retiring(f"resident memory {resident} MB, past {self.max_memory_mb} MB", for_memory=True)
        return None


@dataclass
class WorkerHandle:
    """The coordinator's view of one worker and the inputs it holds, whatever runs it."""

    spec: WorkerSpec
    started_at: float
    ready: bool = False
    held: dict[int, Task] = field(default_factory=dict)
    busy_since: float = 0.0
    retiring: Retiring | None = None  # why it said it will exit (recycling), if it did
    token: str | None = None  # names its staging folder (see Staging), from its Ready message
    placing: dict[int, TaskDone] = field(default_factory=dict)  # staged, told where to: see Staged
    timed_out: float | None = None  # the limit it passed, if it was killed for it


@dataclass(kw_only=True)
class LocalWorker(WorkerHandle):
    process: multiprocessing.process.BaseProcess
    conn: Connection
    cut_off_at: float | None = None  # when its pipe ended while it lived (see _unwatched)
    severed: bool = False  # ... and it was killed for it, as it can report nothing more
    sentinel_ended_at: float | None = None  # when its sentinel ended while it lived: not waited on since
    torn: bool = False  # a message of it was left half-read (see RECEIVE_TIMEOUT_SECONDS): never read again
    killed_at: float | None = None  # when the coordinator killed it (see KILL_WAIT_SECONDS)


SPAWN = multiprocessing.get_context("spawn")  # Paddle and fork do not mix
SEVERED_WAIT_SECONDS = 1.0  # a worker's pipe ended: this long for its exit, then it is killed
EXIT_POLL_SECONDS = 0.01  # ... its exit status looked at this often meanwhile
SENTINEL_HOLD_SECONDS = 0.1  # a worker's sentinel ended: no batch for it this long (it may be exiting)
RECEIVE_TIMEOUT_SECONDS = 5  # a message begun and not ended this long (its worker died sending it): the pipe's end
KILL_WAIT_SECONDS = 10.0  # a worker killed and not gone after this long is stuck in the kernel: let go of
WORKER_PROCESS_NAME = "infer_mp-worker"
let_go: list[multiprocessing.process.BaseProcess] = []  # workers stuck after their SIGKILL: never waited for again


def reap(processes: list[multiprocessing.process.BaseProcess], specs: dict | None = None) -> None:
    """Wait for killed worker processes to exit, up to KILL_WAIT_SECONDS for all of them, by
    their exit status (a process their pipeline forked may hold their sentinels); those still
    there then (or when a signal cuts the wait short) are stuck in the kernel (a GPU driver
    call, a hung network filesystem: SIGKILL acts when that returns) and are let go of, said
    once (`specs`: which worker each is): neither the run nor Python's exit waits for them
    (see exit_code_now)."""
    processes = [process for process in processes if process not in let_go]  # (waited for once)
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    try:
        while any(process.exitcode is None for process in processes) and time.monotonic() < deadline:
            time.sleep(EXIT_POLL_SECONDS)
    finally:
        for process in processes:
            if process.exitcode is not None:
                process.join()  # (at once: it has exited; and multiprocessing forgets it)
            elif process not in let_go:
                with contextlib.suppress(OSError):  # (stderr's reader gone: the run is ending anyway)
                    say(let_go_of(process, (specs or {}).get(process)))


def let_go_of(process: multiprocessing.process.BaseProcess, spec: WorkerSpec | None = None) -> str:
    """Never wait for this killed process again (see reap); the line that says so."""
    let_go.append(process)
    who = f"worker {spec.slot} ({spec.device}, pid {process.pid})" if spec else f"worker pid {process.pid}"
    return (f"{who} did not exit within {KILL_WAIT_SECONDS:g} s of its SIGKILL (stuck in the kernel: a GPU "
            "driver call, a hung network filesystem?); not waited for (it holds its memory until it exits)")


def spawn_worker(pipeline: PipelineRef) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    """Start a worker process; it imports the pipeline's libraries, then waits for its device."""
    parent, child = SPAWN.Pipe()
    process = SPAWN.Process(target=worker_main, args=(pipeline, child), name=WORKER_PROCESS_NAME, daemon=True)
    # Ctrl-C and SIGTERM are held back (blocked, not ignored: the kernel drops a signal sent
    # while it is ignored) while the worker starts: the coordinator then gets any that came,
    # and the worker, which inherits the mask, ignores both from its first line (worker_main):
    # the coordinator alone decides how to stop, and kills workers itself. The resource
    # tracker, which multiprocessing starts with the first process, is started first: it
    # unblocks both signals once it is up, so the first worker began with them unblocked.
    multiprocessing.resource_tracker.ensure_running()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    child.close()
    # A worker killed as it sends a message leaves half of it, and a process its pipeline
    # forked may hold the pipe open: the rest would be waited for for ever.
    with socket.socket(fileno=os.dup(parent.fileno())) as view:
        view.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", RECEIVE_TIMEOUT_SECONDS, 0))
    return process, parent


class WarmPool:
    """Worker processes started before the coordinator's checks, so that their slow imports
    (paddle, paddleocr: seconds) overlap the coordinator's own (PaddleX's device helpers: a
    second). A warm process only imports: it gets its device, and builds its pipeline, when
    the run is dispatched, after every check has passed; if a check fails, the pool is killed."""

    def __init__(self, pipeline: PipelineRef, count: int):
        self.pipeline = pipeline
        self.processes = [spawn_worker(pipeline) for _ in range(count)]
        self.plan_asked = False

    def ask_for_plan(self, config: Config) -> None:
        """Have the first warm worker check the pipeline's options and make the worker plan
        with PaddleX's device helpers: it imports the pipeline and PaddleX anyway, and the
        coordinator importing them too would take a second of CPU from the workers' own
        start-up, and hold back their pipelines' building until it is done."""
        if self.processes:
            with contextlib.suppress(OSError):
                self.processes[0][1].send(AskPlan(config))
                self.plan_asked = True

    def plan(self, config: Config) -> list[WorkerSpec]:
        """The plan the warm worker made once the options passed (waiting for it), or the
        check and plan made here if there is no warm worker or it could not answer."""
        if self.plan_asked:
            self.plan_asked = False
            answered = True
            try:  # bounded: a pipeline module whose import blocks must not hold the run
                conn = self.processes[0][1]
                answered = conn.poll(config.start_timeout)
                reply = conn.recv() if answered else None
            except (EOFError, OSError):
                reply = None
            if isinstance(reply, Planned) and reply.plan is not None:
                return reply.plan
            if isinstance(reply, Planned) and reply.refused is not None:
                raise UsageError(reply.refused)
            self._drop_first()  # it died, or could not plan: not a worker to hand out
            if not answered:  # its import blocks: the coordinator's would too, and the workers' start times out
                return plan_workers(config)
        check_pipeline_options(self.pipeline, config.pipeline_kwargs, config.predict_kwargs)
        return plan_workers(config)

    def _drop_first(self) -> None:
        process, conn = self.processes.pop(0)
        process.kill()
        reap([process])
        conn.close()

    def take(self) -> tuple[multiprocessing.process.BaseProcess, Connection] | None:
        return self.processes.pop(0) if self.processes else None

    def close(self) -> None:
        for process, _ in self.processes:
            process.kill()
        try:
            reap([process for process, _ in self.processes])
        finally:
            for _, conn in self.processes:
                conn.close()
            self.processes = []


def expected_workers(config: Config) -> int:
    """How many workers the plan will have, guessed without PaddleX (the device string's ids
    times the instances); a wrong guess costs only an idle process or a later start."""
    if config.backend != "local":
        return 0
    ids = config.device.split(":", 1)[1].split(",") if ":" in config.device else [""]
    return min(len(ids) * config.instances_per_device, 64)


def worker_options(pipeline: PipelineRef, config: Config, max_memory_mb: int) -> WorkerOptions:
    return WorkerOptions(
        pipeline, config.pipeline_kwargs, config.predict_kwargs, config.save,
        config.max_items_per_worker, max_memory_mb, run_tag(config.shard),
        str(config.output_dir / STAGING_DIR), config.max_image_pixels,
    )


class Backend:
    """What every backend shares: the queue, the attempts of each input, batching, timeouts,
    and what the workers' messages mean. A backend adds how workers start, get a batch, are
    waited on and are killed (`_start`, `_send`, `_wait`, `_kill`, `_shutdown`).

    The coordinator hands a batch to each idle worker and remembers what every worker holds
    until it reports each input, so a worker that dies gives its inputs back instead of
    losing them, and a replacement starts in its slot.
    """

    def __init__(self, options: WorkerOptions, config: Config):
        self.options = options
        self.batch_size = config.batch_size
        self.max_attempts = config.max_attempts
        self.task_timeout = config.task_timeout
        self.start_timeout: float | None = config.start_timeout
        self.pending: deque[Task] = deque()
        self.handed: dict[int, int] = defaultdict(int)  # times each input went to a worker
        self.charged: dict[int, int] = defaultdict(int)  # deaths while it ran alone: see _requeue_or_fail
        self.workers: dict[int, WorkerHandle] = {}
        self.notes: set[str] = set()  # said once per run, however many workers say them
        self.output_failed = False  # a worker could not write: finish what is running, start nothing
        self.stopping = False  # a signal or an output failure: no new starts either
        self.pipeline_works = False  # some worker of this run has started its pipeline
        self.start_failures: dict[int, int] = defaultdict(int)  # per slot, since it last had a worker up
        self.vacant: dict[int, WorkerSpec] = {}  # slots left empty while no input was left (see _lost)
        self.reads_windows: bool | None = None  # does the pipeline read only a range's pages? (see _next)
        self.probe: int | None = None  # the one page range out while that is not known
        self.probe_since = 0.0  # ... handed out then (see PROBE_PATIENCE_SECONDS)
        self.ranges: set[int] = set()  # the page ranges split_documents made (see _whole_documents)
        self.renaming_since: float | None = None  # a stop waits for renames since then (see _renaming)

    def run(self, tasks: list[Task], plan: list[WorkerSpec], stop: Stopper) -> Iterator[Event]:
        self.pending = deque(tasks)
        self.ranges = {task.index for task in tasks if task.pages is not None}
        self.fresh = itertools.count(max((task.index for task in tasks), default=0) + 1)  # see _requeue_or_fail
        self.workers = {spec.slot: self._start(spec) for spec in plan}
        pulse = time.monotonic()
        try:
            while (self.workers or self.vacant) and (self.pending or self._busy()):
                while (announcement := stop.announcement()) is not None:  # (two signals at once: both)
                    yield Note(announcement)
                self.stopping = stop.requested or self.output_failed
                if self.stopping:
                    if not self._busy():
                        break
                    if time.monotonic() > stop.deadline and not self._renaming():
                        if not stop.forced:
                            yield Note(stop.grace_over())
                        break
                else:
                    self._fill_vacant_slots()
                    for worker in list(self.workers.values()):
                        self._feed(worker)
                self._kill_overdue_workers()
                yield from self._wait(restart=not stop.requested)
                if time.monotonic() - pulse >= POLL_SECONDS:
                    pulse = time.monotonic()
                    yield Waiting(self._longest_held())
        finally:
            self._shutdown(list(self.workers.values()))

    def _renaming(self) -> bool:
        """Is a worker renaming files into place, told where by a `placing` record, and not yet
        past RENAME_WAIT_SECONDS of a stop's wait for it? Killed now, its files would be in
        place with no record until the next run; its Placed reply takes milliseconds."""
        if not any(worker.placing for worker in self.workers.values()):
            return False
        if self.renaming_since is None:
            self.renaming_since = time.monotonic()
        return time.monotonic() - self.renaming_since < RENAME_WAIT_SECONDS

    def _longest_held(self) -> tuple[str, float] | None:
        """(what, seconds) of the batch a worker has held longest, if any worker holds one:
        its input (and pages), or its first and how many more it has."""
        busy = [worker for worker in self.workers.values() if worker.held]
        if not busy:
            return None
        worker = min(busy, key=attrgetter("busy_since"))
        tasks = list(worker.held.values())
        first = tasks[0].path + (f" pages {tasks[0].pages[0]}-{tasks[0].pages[1] - 1}" if tasks[0].pages else "")
        more = f" (and {len(tasks) - 1} more input(s) in its batch)" if len(tasks) > 1 else ""
        return first + more, time.monotonic() - worker.busy_since

    def _start(self, spec: WorkerSpec) -> WorkerHandle:
        raise NotImplementedError

    def _send(self, worker: WorkerHandle, batch: list[Task]) -> None:
        raise NotImplementedError

    def _send_moves(self, worker: WorkerHandle, moves: dict[int, Moves]) -> None:
        """Tell a worker where its staged files go (see Staged); it answers Placed."""
        raise NotImplementedError

    def _wait(self, restart: bool) -> Iterator[Event]:
        """Wait up to POLL_SECONDS for workers' messages or deaths, and handle them."""
        raise NotImplementedError

    def _kill(self, worker: WorkerHandle) -> None:
        raise NotImplementedError

    def _shutdown(self, workers: list[WorkerHandle]) -> None:
        """Kill the workers. An idle one has reported everything it did, after renaming its
        files into place, so there is nothing to wait for (a Paddle teardown costs half a
        second); a busy one is only here after a stop's grace period: remove what it left."""
        raise NotImplementedError

    def _dismiss(self, worker: WorkerHandle) -> None:
        """Kill a worker that could not start, no longer one of self.workers."""
        self._shutdown([worker])

    def _busy(self) -> bool:
        return any(w.held for w in self.workers.values())

    def _idle(self, worker: WorkerHandle) -> bool:
        """Ready for a batch: it holds nothing, or only files it has been told where to put,
        which it renames before it starts the next batch (see Staged)."""
        return len(worker.held) == len(worker.placing)

    def _feed(self, worker: WorkerHandle) -> None:
        """Give an idle worker its next batch. An input that was in a worker that died goes
        alone, so that it cannot take others down with it again; so does a page range (it is
        a predict() call of its own: see predict_pages)."""
        if (not worker.ready or not self._idle(worker) or worker.retiring or worker.timed_out is not None
                or not self.pending):
            return
        first = self._next()
        if first is None:
            return
        batch = [first]
        if not self.handed[batch[0].index] and batch[0].pages is None:
            while (self.pending and len(batch) < self.batch_size and not self.handed[self.pending[0].index]
                   and self.pending[0].pages is None):
                batch.append(self.pending.popleft())
        for task in batch:
            self.handed[task.index] += 1
            worker.held[task.index] = task
        worker.busy_since = time.monotonic()
        self._send(worker, batch)

    def _next(self) -> Task | None:
        """The next task to hand out. While no page range has shown whether the pipeline reads
        only a range's pages, one page range is out at a time (the probe: one page), with whole
        inputs beside it: a pipeline that reads each document whole then pays one extra read,
        not one a range; one that does not, one page's wait for the other workers at start."""
        if self.reads_windows is not None or self.pending[0].pages is None:
            return self.pending.popleft()
        probe_out = any(self.probe in worker.held for worker in self.workers.values())
        if probe_out and time.monotonic() - self.probe_since > PROBE_PATIENCE_SECONDS:  # a page that hangs:
            self.reads_windows = True  # (assumed: pages outside a range still merge the rest)
            return self.pending.popleft()
        if not probe_out:  # (none yet, or it failed, or its worker died)
            task = self.pending[0]
            self.probe_since = time.monotonic()
            if len(task.page_numbers) == 1:
                self.probe = self.pending.popleft().index
                return task
            start, stop = task.pages
            self.pending[0] = replace(task, pages=(start + 1, stop))  # the probe: its first page alone
            self.probe = next(self.fresh)
            return replace(task, index=self.probe, pages=(start, start + 1))
        for position, task in enumerate(self.pending):
            if task.pages is None:
                del self.pending[position]
                return task
        return None

    def _whole_documents(self) -> None:
        """The pipeline reads a document whole whatever range it is given: the ranges of each
        document still in the queue, where they follow each other, become one task (the whole
        document where they cover it), so each document is read once more at most. (Pages
        retried one by one after a worker's death stay apart, as do weak pages read again.)"""
        runs: dict[str, list[Task]] = defaultdict(list)
        rest = []
        for task in self.pending:
            if task.index in self.ranges and not self.handed[task.index] and not task.alone:
                runs[task.path].append(task)
            else:
                rest.append(task)
        merged = []
        for tasks in runs.values():
            tasks.sort(key=attrgetter("pages"))
            run = tasks[0]
            for task in tasks[1:]:
                if task.pages[0] == run.pages[1]:
                    run = replace(run, pages=(run.pages[0], task.pages[1]))
                else:
                    merged.append(run)
                    run = task
            merged.append(run)
        whole = [replace(task, pages=None) if task.pages == (0, task.page_count) else task for task in merged]
        self.pending = deque(sorted(whole, key=attrgetter("weight"), reverse=True) + rest)

    def _fill_vacant_slots(self) -> None:
        """Slots whose worker is gone (see _restart) get workers again, as many as the inputs in
        the queue need beyond the workers that are idle or starting: a slot left empty for want
        of work starts again when inputs come back (a batch of a worker that died since), and
        no pipeline is loaded only to be stopped (each load takes memory and time)."""
        for slot in list(self.vacant)[:self._workers_wanted()]:
            self.workers[slot] = self._start(self.vacant.pop(slot))

    def _workers_wanted(self) -> int:
        """Inputs in the queue beyond the workers that are idle or starting."""
        free = sum(1 for worker in self.workers.values() if not worker.ready or self._idle(worker))
        return max(0, len(self.pending) - free)

    def _kill_overdue_workers(self) -> None:
        """--task_timeout: a worker gets that many seconds per page of its batch.
        --start_timeout: a worker gets that long to build its pipeline (a load that blocks
        would otherwise hold the run for ever); its death is then a failed start."""
        now = time.monotonic()
        for worker in self.workers.values():
            deadline = self._deadline(worker)
            if deadline is not None and now > deadline[0] and not self._has_news(worker):
                worker.timed_out = deadline[1]
                self._kill(worker)

    def _has_news(self, worker: WorkerHandle) -> bool:
        """Has the worker a message not yet read (sent in time, while the coordinator was busy)?
        It is read before the worker counts as overdue."""
        raise NotImplementedError

    def _deadline(self, worker: WorkerHandle) -> tuple[float, float] | None:
        """(when, limit in seconds) of the worker's start or batch timeout, if one runs."""
        if worker.timed_out is not None:
            return None
        if not worker.ready and self.start_timeout:
            return worker.started_at + self.start_timeout, self.start_timeout
        if self.task_timeout and worker.held:
            limit = self.task_timeout * sum(task.weight for task in worker.held.values())
            return worker.busy_since + limit, limit
        return None

    def _wait_seconds(self) -> float:
        """How long to wait for messages: POLL_SECONDS, or less where a timeout ends sooner
        (a worker ready just after its --start_timeout is still late), or a stop's wait for
        renames (see _renaming)."""
        deadlines = [deadline[0] for worker in self.workers.values() if (deadline := self._deadline(worker))]
        if self.renaming_since is not None:
            deadlines.append(self.renaming_since + RENAME_WAIT_SECONDS)
        return max(0.0, min([POLL_SECONDS, *(when - time.monotonic() for when in deadlines)]))

    def _handle(self, worker: WorkerHandle, message: Any) -> Iterator[Event]:
        """A worker's message (see the module's docstring) as events. Any message restarts the
        clock of --task_timeout: the time since then is the worker's, not the coordinator's
        (a batch's files wait for their moves, and the moves for the run log's write)."""
        worker.busy_since = time.monotonic()
        if isinstance(message, Ready):
            worker.ready, worker.token = True, message.token
            if message.reads_windows:
                self.reads_windows = True
            self.pipeline_works = True
            self.start_failures[worker.spec.slot] = 0
            yield WorkerStarted(worker.spec, time.monotonic() - worker.started_at, message.engine)
        elif isinstance(message, InitFailed):
            del self.workers[worker.spec.slot]
            self._dismiss(worker)
            yield from self._failed_start(worker.spec, message.why)
        elif isinstance(message, Reports):  # one message per batch: one report per input, in order
            if self.renaming_since is not None:  # a stop waits only for the renames asked for before
                return  # its wait (see _renaming): this batch stays staged, removed with its worker
            staged = Staged(worker.spec, [])
            for report in message.items:
                if isinstance(report, Saved):
                    staged.done.append(TaskDone(worker.held[report.index], worker.spec, report.folder, report.prefix,
                                                report.outputs, report.extras, report.seconds,
                                                self.handed[report.index], report.failed_pages, report.quality))
                else:
                    yield from self._handle(worker, report)
            if staged.done:
                yield staged  # the coordinator records the files' final names, then ...
            for done in staged.done:
                if done.task.index in staged.moves:
                    worker.placing[done.task.index] = done
                else:  # refused: recorded failed already
                    worker.held.pop(done.task.index)
            self._send_moves(worker, staged.moves)  # ... the worker renames them (always answers)
        elif isinstance(message, Placed):
            yield from self._placed(worker, message)
        elif isinstance(message, OutsideWindow):
            if self.reads_windows is not False:
                self.reads_windows = False
                self._whole_documents()
                yield Note("this pipeline reads documents itself, not through PaddleX's page reader: a page range "
                           "came back with pages outside it, so the other documents go whole, not in ranges (a "
                           f"predict() that takes `{PAGE_WINDOWS_KEYWORD}` reads only a range's pages; README, "
                           "'Big documents')")
        elif isinstance(message, Retiring):
            worker.retiring = message
        elif isinstance(message, CannotWrite):
            worker.held.pop(message.index)
            self.handed[message.index] -= 1  # not the input's fault: it stays to do
            self.output_failed = True
            yield OutputError(message.why)
        elif isinstance(message, Note) and message.text not in self.notes:
            self.notes.add(message.text)
            yield message
        elif isinstance(message, Failed):
            task = worker.held.pop(message.index)
            yield TaskFailed(task, worker.spec, message.why, self.handed[message.index])

    def _placed(self, worker: WorkerHandle, message: Placed) -> Iterator[Event]:
        """The tasks whose files the worker renamed into place are done; the others as why."""
        if self.probe in message.indexes and self.reads_windows is None:  # no page outside it came back
            self.reads_windows = True
        for index in message.indexes:
            worker.held.pop(index)
            yield worker.placing.pop(index)
        for index, (number, error) in message.errors.items():
            task = worker.held.pop(index)
            worker.placing.pop(index)
            if number in OUTPUT_ERRNOS:
                self.handed[index] -= 1  # not the input's fault: it stays to do
                self.output_failed = True
                yield OutputError(f"cannot place outputs in {task.out_dir!r}: {error}")
            elif number == errno.ENOENT and self.handed[index] < self.max_attempts:
                self.pending.appendleft(task)  # its staged files were removed (an `rm -r` of the
            else:                              # staging folder): done again
                yield TaskFailed(task, worker.spec, f"cannot place output: {error}", self.handed[index],
                                 retry=number in FOLDER_ERRNOS)

    def _discard_staged(self, worker: WorkerHandle) -> None:
        """A gone worker's staging folder: what it wrote for inputs it did not finish, or did not
        finish renaming (those are requeued). What it renamed, it reported before its end."""
        if worker.token:
            shutil.rmtree(os.path.join(self.options.staging, worker.token), ignore_errors=True)

    def _lost(self, worker: WorkerHandle, reason: str, restart: bool) -> Iterator[Event]:
        """A worker is gone (`reason`: how it went): requeue what it still held, and start a
        replacement in its slot (unless it never started, or we are stopping; while no input is
        left to give it, once one is: a pipeline's load can take a minute)."""
        del self.workers[worker.spec.slot]
        self._discard_staged(worker)
        if worker.retiring:  # it never started what it was sent after deciding to retire
            self._hand_back(list(worker.held.values()))
            yield WorkerRecycled(worker.spec, worker.retiring)
        elif not worker.ready:
            if worker.timed_out is not None:
                reason = f"did not start within {worker.timed_out:g} s (--start_timeout)"
            else:
                reason = f"the worker process {reason} while starting"
            yield from self._failed_start(worker.spec, reason)
            return
        else:
            if worker.timed_out is not None:
                reason = f"timed out (no result within {worker.timed_out:g} s, --task_timeout)"
            yield from self._requeue_or_fail(worker, reason, restart)
        if restart:
            self._restart(worker.spec)

    def _restart(self, spec: WorkerSpec) -> None:
        """The slot to be filled again, by _fill_vacant_slots: at once while inputs wait that
        no idle or starting worker will take; else once inputs come back to the queue."""
        self.vacant[spec.slot] = spec

    def _failed_start(self, spec: WorkerSpec, error: str) -> Iterator[Event]:
        """A worker could not start. Once the pipeline has started in this run, a failed start
        is likely passing (memory not yet freed, a busy disk): its slot tries again, up to
        START_TRIES times in a row. Before that, it is likely the pipeline's own fault
        (a bad model folder), and trying again would only repeat it."""
        self.start_failures[spec.slot] += 1
        tries = self.start_failures[spec.slot]
        again = self.pipeline_works and not self.stopping and tries < START_TRIES
        later = "" if self._workers_wanted() else ", once inputs come back to the queue"
        yield WorkerFailedToStart(spec, error, f"{tries + 1} of {START_TRIES}{later}" if again else None)
        if again:
            self._restart(spec)

    def _requeue_or_fail(self, worker: WorkerHandle, reason: str, replaced: bool) -> Iterator[Event]:
        """Charge a death to the input that caused it: one that died alone in its worker.
        When a batch of several dies, none is charged; each is retried alone (see _feed). The
        pages of a document or range that dies are retried one by one, uncharged, so that a
        page that kills its worker costs only itself."""
        requeue = []
        suspects = [worker.held[index] for index in worker.placing] or list(worker.held.values())
        # Dying while renaming those, it had not begun the batch sent behind them.
        unstarted = ([task for index, task in worker.held.items() if index not in worker.placing]
                     if worker.placing else [])
        self._hand_back(unstarted)
        alone = len(suspects) == 1
        for task in suspects:
            if len(task.page_numbers) > 1:
                requeue += [replace(task, index=next(self.fresh), pages=(page, page + 1)) for page in task.page_numbers]
                continue
            self.charged[task.index] += alone
            if self.charged[task.index] >= self.max_attempts:
                yield TaskFailed(task, worker.spec, f"worker {reason}, {self.charged[task.index]} times while "
                                 "running this input alone", self.handed[task.index])
            else:
                requeue.append(task)
        self.pending.extendleft(reversed(requeue))
        yield WorkerLost(worker.spec, reason, len(requeue) + len(unstarted), replaced and self._workers_wanted() > 0)

    def _hand_back(self, tasks: list[Task]) -> None:
        """Tasks sent to a worker that never began them: back to the front of the queue, as if
        never handed out (not the inputs' doing)."""
        for task in tasks:
            self.handed[task.index] -= 1
        self.pending.extendleft(reversed(tasks))


class LocalBackend(Backend):
    """Worker processes on this machine, one per WorkerSpec, each with its own pipe."""

    def __init__(self, options: WorkerOptions, config: Config, warm: WarmPool):
        super().__init__(options, config)
        self.warm = warm
        self.dismissed: list[LocalWorker] = []  # killed after a failed start: see _dismiss

    def _start(self, spec: WorkerSpec) -> LocalWorker:
        """A warm process if one is left (see WarmPool), else a new one, told its device."""
        process, conn = self.warm.take() or spawn_worker(self.options.pipeline)
        with contextlib.suppress(OSError):  # if it died, its sentinel tells
            conn.send(Start(spec, self.options))
        return LocalWorker(spec, time.monotonic(), process=process, conn=conn)

    def _send(self, worker: LocalWorker, batch: list[Task]) -> None:
        self._tell(worker, Batch(batch))

    def _send_moves(self, worker: LocalWorker, moves: dict[int, Moves]) -> None:
        self._tell(worker, Place(moves))

    @staticmethod
    def _tell(worker: LocalWorker, message: Any) -> None:
        """A message that cannot be written is the end of the worker's pipe: one that died is
        seen by its sentinel next; one alive is cut off (see _unwatched), as it would wait for
        the message for ever, and the coordinator for its answer."""
        try:
            worker.conn.send(message)
        except OSError:
            if worker.cut_off_at is None:
                worker.cut_off_at = time.monotonic()

    def _wait(self, restart: bool) -> Iterator[Event]:
        """A pipe or a sentinel that ends while its worker lives (it is exiting: its files close
        first; or a library in it closed them) is ready for ever: it is no longer waited on,
        and the worker's exit is looked for (see _unwatched). Ended, its pipe cuts the worker
        off; its sentinel does not: the worker goes on working, its death seen by its exit."""
        handles = {w.conn: w for w in self.workers.values() if w.cut_off_at is None}
        sentinels = {w.process.sentinel: w for w in self.workers.values() if w.sentinel_ended_at is None}
        for ready in wait([*handles, *sentinels], timeout=self._wait_seconds()):
            worker = handles.get(ready) or sentinels[ready]
            if self.workers.get(worker.spec.slot) is not worker:
                continue  # already replaced in this round
            if ready in handles and (message := self._read(worker)) is not None:
                yield from self._handle(worker, message)
            elif worker.process.exitcode is not None:
                yield from self._exited(worker, restart)
            elif ready in handles:
                worker.cut_off_at = time.monotonic()
            else:
                worker.sentinel_ended_at = time.monotonic()
        yield from self._unwatched(restart)

    def _unwatched(self, restart: bool) -> Iterator[Event]:
        """Exits that no pipe reports, looked for each round (waitpid, not waiting): a worker
        whose pipe or sentinel ended (see _wait), or one whose pipes a process its pipeline
        forked holds open (a fork-based pool's). One cut off and alive after
        SEVERED_WAIT_SECONDS is killed: it can report nothing more, and no timeout would end it.
        One killed and still there after KILL_WAIT_SECONDS is let go of (see reap): lost; one
        dismissed (see _dismiss), only let go of."""
        for worker in list(self.dismissed):
            if worker.process.exitcode is not None:
                worker.process.join()  # (at once: it has exited)
            elif self._stuck(worker):
                yield Note(let_go_of(worker.process, worker.spec))
            else:
                continue
            self.dismissed.remove(worker)
            self._discard_staged(worker)
            worker.conn.close()
        for worker in list(self.workers.values()):
            if self.workers.get(worker.spec.slot) is not worker:
                continue
            if worker.process.exitcode is not None:
                yield from self._exited(worker, restart)
            elif (worker.cut_off_at is not None and not worker.severed
                  and time.monotonic() - worker.cut_off_at > SEVERED_WAIT_SECONDS):
                worker.severed = True
                self._kill(worker)
            elif self._stuck(worker):
                yield Note(let_go_of(worker.process, worker.spec))
                yield from self._exited(worker, restart)

    @staticmethod
    def _stuck(worker: LocalWorker) -> bool:
        """Killed, and not gone KILL_WAIT_SECONDS later (its exit status is looked at first)."""
        return worker.killed_at is not None and time.monotonic() - worker.killed_at > KILL_WAIT_SECONDS

    def _wait_seconds(self) -> float:
        """As the base's; EXIT_POLL_SECONDS while a worker's exit is looked for (see _ending)."""
        seconds = super()._wait_seconds()
        return min(seconds, EXIT_POLL_SECONDS) if any(map(self._ending, self.workers.values())) else seconds

    @staticmethod
    def _ending(worker: LocalWorker) -> bool:
        """Is the worker cut off, or its sentinel ended less than SENTINEL_HOLD_SECONDS ago (its
        pipe's end, if it is exiting, is read in that time)? It may be exiting: not given a
        batch (its death would be charged to it), its exit looked for often."""
        ended = worker.sentinel_ended_at
        return worker.cut_off_at is not None or (ended is not None and time.monotonic() - ended < SENTINEL_HOLD_SECONDS)

    def _kill(self, worker: LocalWorker) -> None:
        worker.process.kill()
        if worker.killed_at is None:
            worker.killed_at = time.monotonic()

    def _idle(self, worker: LocalWorker) -> bool:
        return not self._ending(worker) and super()._idle(worker)

    def _has_news(self, worker: LocalWorker) -> bool:
        try:
            return worker.cut_off_at is None and worker.conn.poll()
        except OSError:
            return False

    @staticmethod
    def _read(worker: LocalWorker) -> tuple | None:
        """The worker's next message, or None once its pipe has ended: at its end, or inside a
        message whose rest did not come (then for good: what follows would be read from the
        middle of that message)."""
        if worker.torn:
            return None
        try:
            return worker.conn.recv()
        except EOFError:
            return None
        except OSError:
            worker.torn = True
            return None

    def _exited(self, worker: LocalWorker, restart: bool) -> Iterator[Event]:
        """A worker process exited, or was let go of (see _unwatched): read what it reported
        before it did, then count it lost."""
        while worker.conn.poll() and (message := self._read(worker)) is not None:
            yield from self._handle(worker, message)
            if self.workers.get(worker.spec.slot) is not worker:  # it reported an init failure
                return
        if worker.process.exitcode is not None:
            worker.process.join()  # (at once: it has exited)
        worker.conn.close()
        reason = exit_reason(worker.process.exitcode)
        if worker.severed:
            reason = "closed its pipe to the coordinator (killed)"
        elif worker.process.exitcode is None:
            reason = f"did not exit within {KILL_WAIT_SECONDS:g} s of its SIGKILL"
        yield from self._lost(worker, reason, restart)

    def _shutdown(self, workers: list[LocalWorker]) -> None:
        workers, self.dismissed = [*workers, *self.dismissed], []
        for worker in workers:
            worker.process.kill()
        try:
            reap([worker.process for worker in workers], {worker.process: worker.spec for worker in workers})
        finally:
            for worker in workers:
                self._discard_staged(worker)
                worker.conn.close()

    def _dismiss(self, worker: LocalWorker) -> None:
        """Killed, and its exit looked for each round (see _unwatched), not waited for here: it
        may be stuck in the kernel, and the run goes on meanwhile."""
        self._kill(worker)
        self.dismissed.append(worker)


# ---------------------------------------------------------------------------------------------
# Dispatch on a Ray cluster: the same coordinator, with actors instead of local processes
# ---------------------------------------------------------------------------------------------

RAY_CONNECT_TIMEOUT = 10.0  # seconds to reach a cluster's address before saying it cannot be reached
RAY_ENV_PREFIXES = ("PADDLE", "FLAGS_", "OMP_", "MKL_")  # passed on to actors on other nodes
RAY_KILL_WAIT = 10.0  # seconds to wait for killed actors to be gone before removing partial outputs
RAY_POLL_SECONDS = 0.1  # ray.wait runs no signal handler until it returns: wake often for Ctrl-C
RAY_NEWS_SECONDS = 1.0  # an overdue actor's finished call is looked for this long before it is killed
RAY_INSTALL = "pip install -r requirements-ray.txt (the same Ray version on every node of the cluster)"


class ClusterError(UserError):
    """The Ray cluster cannot be reached or cannot run any worker: exit 3, like no workers."""

    exit_code = ExitCode.NO_WORKERS


def import_ray() -> Any:
    """Ray is optional: imported only for --backend ray."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--backend ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def check_reachable(address: str) -> None:
    """Refuse an address nobody answers at: ray.init() would retry it for minutes."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray_address {address!r}: expected 'host:port', 'ray://host:port' or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT).close()
    except OSError as error:
        why = error.strerror or "timed out"
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({why}); is it running "
                           "(`ray status` on its head node)? Check --ray_address / $RAY_ADDRESS") from None


@dataclass(frozen=True)
class RayNode:
    address: str
    cpus: float
    gpus: float


class RayCluster:
    """The connection to a Ray cluster: an existing one, or a local one started for the run."""

    def __init__(self, address: str | None, instances_per_device: int, start_timeout: float):
        self.ray = import_ray()
        self.start_timeout = start_timeout
        self.instances_per_device = instances_per_device  # GPU actors ask for 1/this of a GPU
        # No address: a new local cluster ("local"), not whichever one `ray start` left running.
        self.address = address or os.environ.get("RAY_ADDRESS") or "local"
        check_reachable(self.address)
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.ray.init(address=self.address, logging_level=logging.ERROR, log_to_driver=False,
                              include_dashboard=False)
        except Exception as error:  # ConnectionError, AuthenticationError, start-up timeouts...
            raise ClusterError(
                f"cannot connect to the Ray cluster at {self.address!r}: {one_line(error)} (a cluster with "
                "token authentication needs RAY_AUTH_MODE=token and its token here, as `ray status` does)"
            ) from None
        finally:
            signal.signal(signal.SIGTERM, sigterm)  # ray.init installs its own (exit 15): ours is 143
        quiet_raylet_notices(self.ray)
        self.nodes = [
            RayNode(n.get("NodeManagerAddress", "?"), n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
            for n in self.ray.nodes() if n.get("Alive")
        ]
        self.actor_class = self.ray.remote(RayActor)
        self.warm: dict[int, Any] = {}  # slot -> an actor importing the pipeline's libraries
        self.search_path = [os.getcwd(), *sys.path]
        self.environment = actor_environment()

    def new_actor(self, spec: WorkerSpec, pipeline: PipelineRef) -> Any:
        return self.actor_class.options(
            **ray_resources(spec, self.instances_per_device), max_restarts=0, max_task_retries=0,
            runtime_env={"env_vars": self.environment} if self.environment else None,
        ).remote(pipeline, self.search_path)

    def warm_up(self, plan: list[WorkerSpec], pipeline: PipelineRef) -> None:
        """Create the actors now, so that they are placed and import Paddle while the
        coordinator checks and plans the inputs (as WarmPool does for local workers)."""
        self.warm = {spec.slot: self.new_actor(spec, pipeline) for spec in plan}

    def describe(self) -> str:
        cpus, gpus = sum(n.cpus for n in self.nodes), sum(n.gpus for n in self.nodes)
        where = "started locally for this run" if self.address == "local" else f"at {self.address}"
        return f"Ray cluster {where}: {len(self.nodes)} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s)"

    def close(self) -> None:
        """Disconnect; a local cluster stops, and with it every actor of this run."""
        with contextlib.suppress(Exception):
            for actor in self.warm.values():
                self.ray.kill(actor, no_restart=True)
            self.ray.shutdown()


def quiet_raylet_notices(ray: Any) -> None:
    """Ray prints its raylet's notices (a worker died, with a paragraph of advice) on the
    driver's stdout, which belongs to the user's pipes; each death is reported here in one
    line instead. (Ray has no switch for it: its printer is replaced, if it is still there.)"""
    with contextlib.suppress(AttributeError):
        ray._private.worker.print_to_stdstream = lambda data, ignore_prefix: None


def ray_resources(spec: WorkerSpec, instances_per_device: int) -> dict[str, float]:
    """What one actor asks the cluster for: its threads in CPUs, and a GPU, or a share of one
    when several instances are to share a GPU."""
    resources = {"num_cpus": float(spec.cpu_threads or 1)}
    if spec.device.startswith("gpu"):
        resources["num_gpus"] = 1.0 / instances_per_device
    return resources


def describe_resources(resources: dict[str, float]) -> str:
    return " and ".join(f"{v:g} {k.removeprefix('num_').upper()[:-1]}" for k, v in resources.items())


def fits(resources: dict[str, float], node: RayNode) -> bool:
    return node.cpus >= resources["num_cpus"] and node.gpus >= resources.get("num_gpus", 0.0)


def plan_ray_workers(config: Config, cluster: RayCluster) -> list[WorkerSpec]:
    """One actor per (device, instance). `gpu:0,1` asks Ray for two GPUs (the ids count GPUs;
    Ray chooses which, on which nodes); on CPU, each actor's threads default to the largest
    node's cores divided among the instances."""
    device_type, device_ids = parse_device_arg(config.device)
    instances = config.instances_per_device
    if device_type == "cpu":
        largest = max((n.cpus for n in cluster.nodes), default=1.0)
        threads = config.cpu_threads or max(1, int(largest) // instances)
        plan = [WorkerSpec(slot, "cpu", threads) for slot in range(instances)]
    elif device_type == "gpu":
        count = len(device_ids or [0]) * instances
        plan = [WorkerSpec(slot, "gpu", config.cpu_threads) for slot in range(count)]
    else:
        raise UsageError(f"--backend ray runs on cpu or gpu, not {device_type!r}; use the local backend")
    resources = ray_resources(plan[0], instances)
    if not any(fits(resources, node) for node in cluster.nodes):
        raise ClusterError(f"no node of the {cluster.describe()} has what one worker needs "
                           f"({describe_resources(resources)}); "
                           "lower --cpu_threads / raise --instances_per_device, or add such nodes")
    return plan


def actor_environment() -> dict[str, str]:
    """The Paddle/PaddleX settings of this shell, for actors started on other nodes."""
    return {k: v for k, v in os.environ.items() if k.startswith(RAY_ENV_PREFIXES)}


@dataclass(kw_only=True)
class RayWorker(WorkerHandle):
    actor: Any
    call: Any = None  # the ObjectRef of its pending start() or run_batch(), if any


class RayBackend(Backend):
    """One Ray actor per WorkerSpec, placed by the cluster's scheduler. Same queue, attempts,
    timeouts and recycling as local workers; an actor or node that dies gives its inputs back."""

    def __init__(self, options: WorkerOptions, config: Config, cluster: RayCluster):
        super().__init__(options, config)
        self.cluster = cluster
        self.start_timeout = None  # not per actor: waiting to be placed counts (_give_up_on_placement)
        self.planned: dict[int, WorkerSpec] = {}
        self.none_ready_since = time.monotonic()
        self.start_deaths: dict[int, int] = defaultdict(int)  # per slot: actors lost while starting

    def _start(self, spec: WorkerSpec) -> RayWorker:
        """The slot's warm actor if it has one (see RayCluster.warm_up), else a new one."""
        spec = self.planned.setdefault(spec.slot, spec)
        actor = self.cluster.warm.pop(spec.slot, None) or self.cluster.new_actor(spec, self.options.pipeline)
        return RayWorker(spec, time.monotonic(), actor=actor, call=actor.start.remote(spec, self.options))

    def _send(self, worker: RayWorker, batch: list[Task]) -> None:
        worker.call = worker.actor.run_batch.remote(batch)

    def _send_moves(self, worker: RayWorker, moves: dict[int, Moves]) -> None:
        worker.call = worker.actor.place.remote(moves)

    def _idle(self, worker: RayWorker) -> bool:
        return not worker.held  # one call at a time: its Placed reply first

    def _has_news(self, worker: RayWorker) -> bool:
        """(Asked only of an overdue actor: a finished call's news may be on its way to this
        process, whose Ray threads were held with it.)"""
        return worker.call is not None and bool(self.cluster.ray.wait([worker.call], timeout=RAY_NEWS_SECONDS)[0])

    def _wait(self, restart: bool) -> Iterator[Event]:
        ray = self.cluster.ray
        yield from self._give_up_on_placement()
        calls = {w.call: w for w in self.workers.values() if w.call is not None}
        if not calls:
            time.sleep(POLL_SECONDS)
            return
        finished, _ = ray.wait(list(calls), num_returns=1, timeout=RAY_POLL_SECONDS)
        for ref in finished:
            worker = calls[ref]
            worker.call = None
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as error:
                self._kill(worker)
                reason = f"died ({ray_error_reason(error)})"
                if not worker.ready and restart and self.start_deaths[worker.spec.slot] + 1 < self.max_attempts:
                    yield from self._restart_starting(worker, reason)
                else:
                    yield from self._lost(worker, reason, restart)
                continue
            for message in result if worker.ready else [result]:  # start() replies with one message
                if isinstance(message, Ready):
                    worker.spec = replace(worker.spec, device=message.where)
                yield from self._handle(worker, message)
            if worker.retiring and self.workers.get(worker.spec.slot) is worker:
                self._kill(worker)
                yield from self._lost(worker, "retired", restart)

    def _restart_starting(self, worker: RayWorker, reason: str) -> Iterator[Event]:
        """An actor lost before its pipeline was up (its node went away, it was pre-empted or
        killed while loading): the cluster's doing, not the pipeline's, so its slot gets a new
        actor, up to --max_attempts times, when inputs wait for it (see _restart). (A pipeline
        that raises is not retried.)"""
        self.start_deaths[worker.spec.slot] += 1
        del self.workers[worker.spec.slot]
        yield WorkerLost(worker.spec, f"{reason} while starting", 0, self._workers_wanted() > 0)
        self._restart(worker.spec)

    def _give_up_on_placement(self) -> Iterator[Event]:
        """Actors wait while the cluster's resources are in use; if no actor has been ready
        for the start timeout (none placed, or all lost and their replacements not placed),
        the run ends (exit 3) instead of waiting for ever. Slots left empty (see _restart) end
        with it: an actor started in one now would be given up on at once."""
        if any(w.ready for w in self.workers.values()):
            self.none_ready_since = time.monotonic()
            return
        timeout = self.cluster.start_timeout
        if time.monotonic() - self.none_ready_since < timeout:
            return
        self.vacant.clear()
        for worker in list(self.workers.values()):
            del self.workers[worker.spec.slot]
            self._kill(worker)
            wanted = describe_resources(ray_resources(worker.spec, self.cluster.instances_per_device))
            yield WorkerFailedToStart(worker.spec, f"not started within {timeout:g} s: no node had {wanted} "
                                      "free (see `ray status`), or the pipeline is still loading")

    def _kill(self, worker: RayWorker) -> None:
        with contextlib.suppress(Exception):
            self.cluster.ray.kill(worker.actor, no_restart=True)

    def _shutdown(self, workers: list[RayWorker]) -> None:
        """Kill the actors; before removing what busy ones left, wait (briefly) until their
        calls fail, that is, until they are really gone: ray.kill only asks."""
        for worker in workers:
            self._kill(worker)
        busy = [w.call for w in workers if w.held and w.call is not None]
        if busy:
            self.cluster.ray.wait(busy, num_returns=len(busy), timeout=RAY_KILL_WAIT)
        for worker in workers:
            self._discard_staged(worker)


def ray_error_reason(error: BaseException) -> str:
    """Ray's death notices run to paragraphs; keep the first sentence."""
    text = " ".join(str(error).split())
    return (text.split(". ")[0][:200] or type(error).__name__)


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


def die_with_parent() -> None:
    """Linux: have the kernel kill this worker if the coordinator dies (even by kill -9), so
    that no orphan keeps writing into the output folder of a later run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def resident_memory_mb() -> int | None:
    """This process's resident memory, from /proc (Linux) or psutil if installed."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss // 2**20


class PathAliases:
    """What the pipeline is given for each input: its path, or, for a name that is not valid
    UTF-8 (which OpenCV and PaddleX's JSON writer cannot take), a symlink with a plain name in
    a folder of the worker's staging folder (removed with it, however the worker ends)."""

    def __init__(self) -> None:
        self.folder: str | None = None
        self.parent: str | None = None  # the worker's staging folder, once it has one

    def __call__(self, task: Task) -> str:
        try:
            task.path.encode("utf-8")
            return task.path
        except UnicodeEncodeError:
            pass
        if self.folder is None:
            if self.parent is not None:
                os.makedirs(self.parent, exist_ok=True)
            self.folder = tempfile.mkdtemp(prefix="links-", dir=self.parent)
        suffix = Path(task.path).suffix.encode("utf-8", "replace").decode("utf-8")
        alias = os.path.join(self.folder, f"{task.index}{suffix}")
        if not os.path.lexists(alias):
            os.symlink(task.path, alias)
        return alias

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class PipelineWorker:
    """One pipeline instance and its batches: the body of a local worker process and of a Ray
    actor. Its results are the messages the coordinator reads (Backend._handle)."""

    def __init__(self, pipeline: PipelineRef, search_path: Iterable[str] = ()):
        """Import the pipeline's libraries at once (seconds), before the device is known; a
        failure here is reported by start()."""
        sys.path.extend(p for p in search_path if p not in sys.path and os.path.isdir(p))
        self.aliases = PathAliases()
        self.processed = 0
        self.started_mb: int | None = None  # its resident memory once its pipeline was built
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(BaseException):
                load_pipeline_class(pipeline)

    def start(self, spec: WorkerSpec, options: WorkerOptions) -> Ready | InitFailed:
        """Ready once the pipeline is built, or InitFailed."""
        self.options = options
        token = f"{options.run_tag}-{os.getpid()}-{os.urandom(3).hex()}"
        self.staging = Staging(os.path.join(options.staging, token))
        self.aliases.parent = self.staging.folder
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.pipeline = create_pipeline(options.pipeline, spec, options.init_kwargs)
        except BaseException as error:  # reported; the coordinator decides
            return InitFailed(one_line(error))
        use_offline_font()
        with contextlib.suppress(ImportError):
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None  # (Pillow's own limit would refuse a TIFF frame --max_image_pixels allows)
        self.started_mb = resident_memory_mb()
        fallback = cpu_fallback(spec, options.init_kwargs)
        if fallback is not None:  # a failed start, before any page: if every worker has it, exit 3
            return InitFailed(fallback)
        return Ready(describe_engine(options.init_kwargs), token, reads_page_windows(self.pipeline))

    def run_batch(self, batch: list[Task]) -> list[Reports]:
        """One Reports for the batch; the coordinator answers with where its files go (Place)."""
        self.processed += len(batch)
        return [Reports(list(process_batch(self.pipeline, batch, self.options, self.aliases, self.staging)))]

    def place(self, moves: dict[int, Moves]) -> list[Placed | Retiring]:
        """Rename the batch's staged files into place (see Staged): Placed, then Retiring if it
        is time to recycle."""
        placed, errors = [], {}
        folders: dict[str, int] = {}  # final folder -> its descriptor, checked each batch: a link
        try:                          # may replace it mid-run (see open_output_folder)
            for index, (folder, renames) in moves.items():
                try:
                    for staged, final in renames:
                        if final is None:  # a new reading that an earlier one beat (see keep_earlier)
                            with contextlib.suppress(OSError):
                                os.unlink(staged)
                            continue
                        parent, name = os.path.split(final)
                        if parent not in folders:
                            folders[parent] = open_output_folder(parent, self.options.root)
                        os.rename(staged, name, dst_dir_fd=folders[parent])  # (POSIX: replaces)
                except IsADirectoryError:
                    errors[index] = (errno.EISDIR, f"{final!r} is a folder: move or rename it; not placed, "
                                     "tried again by the next run")
                except OSError as error:
                    errors[index] = (error.errno, error.strerror or one_line(error))
                else:
                    placed.append(index)
                if folder is not None:  # a task's own folder (see Staging.place_for)
                    shutil.rmtree(folder, ignore_errors=True)
        finally:
            for descriptor in folders.values():
                os.close(descriptor)
        messages: list[Placed | Retiring] = [Placed(placed, errors)]
        retiring = self.options.retire_reason(self.processed, self.started_mb)
        if retiring:
            messages.append(retiring)
        return messages

    def close(self) -> None:
        self.aliases.close()


class RayActor(PipelineWorker):
    """A worker as a Ray actor: called by method instead of by pipe. Its Ready message also
    says where Ray placed it."""

    def start(self, spec: WorkerSpec, options: WorkerOptions) -> Ready | InitFailed:
        ray = sys.modules["ray"]
        gpus = ray.get_gpu_ids()
        # Ray shows the actor only its own GPU (CUDA_VISIBLE_DEVICES), so it is gpu:0 here.
        device = "gpu:0" if spec.device == "gpu" else spec.device
        where = f"{spec.device}{':' + ','.join(map(str, gpus)) if gpus else ''}@{ray.util.get_node_ip_address()}"
        reply = super().start(replace(spec, device=device), options)
        return replace(reply, where=where) if isinstance(reply, Ready) else reply


def worker_main(pipeline_ref: PipelineRef, conn: Connection) -> None:
    """Entry point of a worker process (spawned: nothing is inherited but the arguments).
    It imports the pipeline's libraries at once, then waits to be told its device."""
    for signum in STOP_SIGNALS:  # (a pending one is dropped: see spawn_worker)
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    die_with_parent()
    worker = PipelineWorker(pipeline_ref)
    try:
        message = conn.recv()
        if isinstance(message, AskPlan):  # see WarmPool.ask_for_plan
            conn.send(plan_in_worker(message.config, pipeline_ref))
            message = conn.recv()
        reply = worker.start(message.spec, message.options)
        conn.send(reply)
        if isinstance(reply, InitFailed):
            return  # the coordinator decides
        while isinstance(message := conn.recv(), (Batch, Place)):
            for reply in worker.run_batch(message.tasks) if isinstance(message, Batch) else worker.place(message.moves):
                conn.send(reply)
                if isinstance(reply, Retiring):
                    return
    except (EOFError, OSError):
        return  # the coordinator is gone
    finally:
        worker.close()


def plan_in_worker(config: Config, pipeline: PipelineRef) -> Planned:
    """The worker plan, or why the pipeline's options or the device cannot be used; neither
    lets the coordinator try itself (and show what went wrong)."""
    try:
        check_pipeline_options(pipeline, config.pipeline_kwargs, config.predict_kwargs)
        return Planned(plan=plan_workers(config))
    except UserError as error:
        return Planned(refused=str(error))
    except Exception:
        return Planned()


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {text}"


@dataclass
class PageReading:
    """What PaddleX's page reader, patched in a worker (install_page_windows), reads for the
    batch in progress: it is called by PaddleX, not by infer_mp.py, so it finds this here."""

    windows: dict[str, tuple[int, int]] = field(default_factory=dict)  # path given to predict() -> its pages
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # --max_image_pixels (see limit_pixels)


READING = PageReading()  # this worker's
PAGE_WINDOWS_KEYWORD = "page_windows"  # a predict() that takes it is given {path: (start, stop)}: see README


def reads_page_windows(pipeline: Any) -> bool:
    """Does the pipeline read only a page range's pages of a document? Yes if its predict()
    takes `page_windows` (the way for a class that reads documents itself), or is PaddleOCR's
    or PaddleX's own, which read them through PaddleX's page reader (see install_page_windows)."""
    predict = getattr(type(pipeline), "predict", None)
    return (PAGE_WINDOWS_KEYWORD in keyword_parameters(predict)[0]
            or getattr(predict, "__module__", "").partition(".")[0] in ("paddleocr", "paddlex"))


def predict_pages(pipeline: Any, tasks: list[Task], predict_kwargs: dict,
                  aliases: PathAliases) -> tuple[dict[int, list[Any]], int]:
    """Run one predict() call for the batch and group the page results by task; with the
    number of results dropped for lying outside a page range (see OutsideWindow)."""
    by_path = {aliases(task): task for task in tasks}
    windows = {path: task.pages for path, task in by_path.items() if task.pages is not None}
    if any(task.paged for task in tasks):  # (also for PDF pages' pixel cap: see limit_pixels)
        install_page_windows()
    READING.windows.update(windows)
    READING.windows.update({path: (0, task.page_count) for path, task in by_path.items()  # a whole TIFF too:
                            if task.pages is None and task.page_count and path.lower().endswith((".tif", ".tiff"))})
    pages: dict[int, list[Any]] = defaultdict(list)
    outside = 0
    if windows and PAGE_WINDOWS_KEYWORD in keyword_parameters(type(pipeline).predict)[0]:
        predict_kwargs = {**predict_kwargs, PAGE_WINDOWS_KEYWORD: windows}
    results = pipeline.predict(list(by_path), **predict_kwargs)
    try:
        for result in results:
            source = str(result["input_path"])
            task = by_path.get(source) or by_path.get(os.path.abspath(source))
            if task is None:
                raise RuntimeError(f"pipeline returned a result for an unknown input {source!r}")
            if task.pages is not None and page_index_of(result) not in task.page_numbers:
                outside += 1
                continue
            pages[task.index].append(result)
    finally:
        for path in by_path:
            READING.windows.pop(path, None)
        if hasattr(results, "close"):  # a generator left half-read holds PaddleX's PDF lock
            results.close()
    return pages, outside


def install_page_windows() -> None:
    """Make PaddleX's image sampler, which every PaddleX pipeline reads its inputs with,
    render only the pages in READING.windows of a document listed there, with its own readers
    (same scale and pixel cap, PDF forms filled), each page with its real path, page index
    and page count: the outputs are byte for byte those of a whole-file run."""
    from paddlex.inference.common.batch_sampler import image_batch_sampler as sampling

    sampler = sampling.ImageBatchSampler
    if getattr(sampler.sample, "page_windows", False):
        return
    whole_file = sampler.sample

    def sample(self: Any, inputs: Any) -> Iterator[Any]:
        limit_pixels(self)
        items = inputs if isinstance(inputs, list) else [inputs]
        if not any(isinstance(item, str) and item in READING.windows for item in items):
            yield from whole_file(self, inputs)
            return
        batch = sampling.ImgBatch()
        for item in items:
            if isinstance(item, str) and item in READING.windows:
                pages = window_pages(self, item, *READING.windows[item])
            else:
                pages = (page for part in whole_file(self, [item])
                         for page in zip(part.instances, part.input_paths, part.page_indexes, part.page_counts))
            for page in pages:
                batch.append(*page)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = sampling.ImgBatch()
        if len(batch) > 0:
            yield batch

    sample.page_windows = True  # type: ignore[attr-defined]
    sampler.sample = sample


def limit_pixels(sampler: Any) -> None:
    """--max_image_pixels for PaddleX's document readers: PDF pages rendered smaller to stay
    under it (PaddleX's own PDF cap, off by default), TIFF frames past it refused."""
    limit = READING.max_pixels or None
    backend = getattr(getattr(sampler, "pdf_reader", None), "_backend", None)
    if backend is not None and hasattr(backend, "_max_pixels"):
        backend._max_pixels = limit


def check_frame(size: tuple[int, int], index: int) -> None:
    """A TIFF frame past --max_image_pixels fails (its page alone), before it is converted."""
    width, height = size
    limit = READING.max_pixels
    if limit and width * height > limit:
        raise ValueError(pixels_refusal(f"frame {index}: {width} x {height} pixels", width * height, limit))


def window_pages(sampler: Any, path: str, start: int, stop: int) -> Iterator[tuple[Any, str, int, int]]:
    """(image, path, page index, page count) of pages [start, stop) of a PDF or TIFF, rendered
    as PaddleX's ImageBatchSampler.sample renders every page of it."""
    if path.lower().endswith(".pdf"):
        from paddlex.inference.utils.pdfium_lock import pdfium_lock

        document = sampler.pdf_reader.load(path)  # (takes the lock itself)
        with pdfium_lock:
            try:
                count = len(document)
                for index in range(start, min(stop, count)):
                    page = document[index]
                    try:
                        image = sampler.pdf_reader._backend._render_page(page, page_index=index + 1)
                    finally:
                        page.close()
                    yield image, path, index, count
            finally:
                document.close()
        return
    import cv2
    import numpy

    image = sampler.tiff_reader.load(path)
    try:
        count = getattr(image, "n_frames", 1)
        for index in range(start, min(stop, count)):
            image.seek(index)
            check_frame(image.size, index)
            yield cv2.cvtColor(numpy.array(image.convert("RGB")), cv2.COLOR_RGB2BGR), path, index, count
    finally:
        image.close()


def process_batch(pipeline: Any, tasks: list[Task], options: WorkerOptions, aliases: PathAliases,
                  staging: Staging) -> Iterator[tuple]:
    """Predict a batch and save its pages. If the batch raises, predict each input alone, and
    a document's pages one by one, so that a corrupt file costs only itself and a bad page
    only itself. Yields one report per task."""
    refused = {task.index: why for task in tasks if (why := oversized(task, options.max_image_pixels))}
    for task in tasks:
        if task.index in refused:
            yield Failed(task.index, refused[task.index])
    tasks = [task for task in tasks if task.index not in refused]
    if not tasks:
        return
    READING.max_pixels = options.max_image_pixels
    started = time.monotonic()
    try:
        pages, outside = predict_pages(pipeline, tasks, options.predict_kwargs, aliases)
    except Exception as error:
        if len(tasks) > 1:
            for task in tasks:
                yield from process_batch(pipeline, [task], options, aliases, staging)
        elif len(tasks[0].page_numbers) > 1:
            yield from process_page_by_page(pipeline, tasks[0], options, aliases, staging)
        else:
            yield Failed(tasks[0].index, reading_failure(error))
        return
    if outside:
        yield OutsideWindow()
    seconds = (time.monotonic() - started) / len(tasks)
    for task in tasks:
        yield from save_report(task, pages.get(task.index, []), {}, options, staging, seconds)


def oversized(task: Task, limit: int) -> str | None:
    """Why an image is refused before it is decoded: more pixels than --max_image_pixels, as its
    header says (Pillow reads only the header here). A PDF's pages are rendered smaller instead,
    a TIFF's frames checked as they are read, so that one fails as a page (see limit_pixels);
    a file Pillow cannot read is left to the pipeline, which says why."""
    if not limit or task.paged:
        return None
    width, height = image_size(task.path)
    if width * height <= limit:
        return None
    return pixels_refusal(f"{width} x {height} pixels", width * height, limit)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image (its first frame) from its header; (0, 0) if Pillow is
    absent or cannot read it (the pipeline will say why)."""
    try:
        from PIL import Image
    except ImportError:
        return 0, 0
    try:
        with pillow_unlimited(), Image.open(path) as image:
            return image.size
    except Exception:  # Pillow's plugins raise many kinds for a file they cannot read
        return 0, 0


@contextlib.contextmanager
def pillow_unlimited() -> Iterator[None]:
    """Pillow's own pixel limit off: it refuses to open a file past 179 MP (even with
    --max_image_pixels 0) and warns past 89 MP; infer_mp.py checks sizes itself, from headers."""
    try:
        from PIL import Image
    except ImportError:
        yield
        return
    ceiling, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = ceiling


def reading_failure(error: Exception) -> str:
    """Why an input or page failed, in one line. PaddleX's refusal of a PDF page past the pixel
    limit is said in infer_mp.py's words: PaddleX numbers the page from 1 (the run log and the
    output names from 0) and cannot name the flag that sets the limit."""
    if type(error).__name__ == "PDFRenderSizeError" and getattr(error, "pixel_count", None):
        return pixels_refusal(f"{error.width} x {error.height} pixels even at PaddleX's smallest PDF scale",
                              error.pixel_count, error.max_pixels)
    return one_line(error)


def pixels_refusal(what: str, pixels: int, limit: int) -> str:
    return (f"{what} ({pixels / 1e6:.3g} MP) is more than --max_image_pixels {limit:,}: decoding it would take "
            f"about {pixels * 3 / 2**30:.2g} GB; raise the limit to read it")


def process_page_by_page(pipeline: Any, task: Task, options: WorkerOptions, aliases: PathAliases,
                         staging: Staging) -> Iterator[tuple]:
    """A document or page range whose predict() raised: each of its pages alone."""
    started = time.monotonic()
    results, failed = [], {}
    for page in task.page_numbers:
        try:
            pages, outside = predict_pages(pipeline, [replace(task, pages=(page, page + 1))],
                                           options.predict_kwargs, aliases)
        except Exception as error:
            failed[page] = reading_failure(error)
            continue
        results += pages.get(task.index, [])
        if outside:
            yield OutsideWindow()
    yield from save_report(task, results, failed, options, staging, time.monotonic() - started)


def save_report(task: Task, results: list[Any], failed: dict[int, str], options: WorkerOptions,
                staging: Staging, seconds: float) -> Iterator[Saved | Failed | CannotWrite | Note]:
    """Save a task's results and say how it went: Saved with its files and the pages that
    failed (a document's page that gave no result fails), else Failed or CannotWrite."""
    if task.page_numbers:  # a counted document: one result per page of it, numbered as PaddleX does
        results = [result for result in results if page_index_of(result) in task.page_numbers]
    if task.paged and all(type(page_index_of(result)) is int for result in results):  # in page order: see
        results = sorted({page_index_of(r): r for r in results}.values(), key=page_index_of)  # output_pages
    got = {page_index_of(result) for result in results}
    failed.update({page: "no result for this page" for page in task.page_numbers
                   if page not in got and page not in failed})
    if not results:
        yield Failed(task.index, "; ".join(dict.fromkeys(failed.values()))
                     or "no result: not a readable image or PDF for this pipeline")
        return
    for save_format in options.save:
        if not can_save(results[0], save_format):
            yield Note(f"--save {save_format}: this pipeline's results have no {save_format} form; not saved")
    try:
        staged, prefix, outputs, extras = save_results(task, results, options.save, staging)
    except OSError as error:
        if error.errno in OUTPUT_ERRNOS:
            yield CannotWrite(task.index, f"{error.strerror} writing into {task.out_dir!r}")
        else:
            yield Failed(task.index, f"cannot save output: {one_line(error)}")
    except Exception as error:
        yield Failed(task.index, f"cannot save output: {one_line(error)}")
    else:
        yield Saved(task.index, staged, prefix, outputs, extras, seconds, failed, [page_quality(r) for r in results])


# ---------------------------------------------------------------------------------------------
# Output: every file of a task written into the worker's staging folder, placed by the ledger
# ---------------------------------------------------------------------------------------------


LONG_BASE_BYTES = 200  # an output name base longer than this is staged without a number prefix (see
#                        Staging): with it, its files' names (`_N_layout_det_res.png` added) could pass
#                        the 255 bytes a file name may have


class Staging:
    """A worker's own folder inside the output folder's staging folder (same filesystem, so
    the renames into place are atomic). A worker that dies leaves only this
    folder, removed by the coordinator."""

    def __init__(self, folder: str):
        self.folder = folder
        self.count = itertools.count()

    def place_for(self, formats: tuple[str, ...], base: str) -> tuple[str, str]:
        """(folder, prefix) for a task's files (named from `base`): a prefix unique in the
        worker's folder (one folder made per worker, not per task: 100,000 of them cost the
        coordinator seconds to remove), or, where a writer may add files of its own beside them
        (markdown's images), or the names are long (see LONG_BASE_BYTES), a folder of the task's
        own, under the final names."""
        number = next(self.count)
        if "markdown" in formats or len(os.fsencode(base)) > LONG_BASE_BYTES:
            folder = os.path.join(self.folder, str(number))
            os.makedirs(folder)
            return folder, ""
        try:  # (each time: an `rm -r` of it mid-run is made good; one mkdir, not makedirs's three calls)
            os.mkdir(self.folder)
        except FileExistsError:
            pass
        except FileNotFoundError:  # (the staging folder too)
            os.makedirs(self.folder, exist_ok=True)
        return self.folder, f"{number}-"


def save_results(task: Task, results: list[Any], formats: tuple[str, ...], staging: Staging
                 ) -> tuple[str, str, list[str], dict[str, int | None]]:
    """Every file of an input (its pages' JSON, and --save's, with whatever a writer adds
    beside them, such as markdown's images) staged: (the folder, the prefix of the names there,
    the JSON names, the other names with the page each is of: None for an image's, and for what
    a writer adds, which pages may share). Nothing is left there if writing fails."""
    folder, prefix = staging.place_for(formats, task.out_base)
    pages: list[str] = []
    extras: dict[str, int | None] = {}
    try:
        for result in results:
            index = page_index_of(result)
            page = index if task.paged else None
            name = os.path.basename(task.output_path(index))
            pages.append(name)
            result.save_to_json(os.path.join(folder, prefix + name))
            extras.update(dict.fromkeys(save_extras(folder, prefix, name[: -len(".json")], result, formats), page))
        if not prefix:
            written = {*pages, *extras}
            for parent, _, names in os.walk(folder):
                extras.update(dict.fromkeys(sorted(
                    rel for name in names
                    if (rel := os.path.relpath(os.path.join(parent, name), folder)) not in written)))
    except BaseException:
        if prefix:
            for name in [*pages, *extras]:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, prefix + name))
        else:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, prefix, pages, extras


def page_quality(result: Any) -> dict | None:
    """A page's quality figure, where its result has recognition scores (an OCR pipeline's
    `rec_scores`, or a structure pipeline's `overall_ocr_res`): text lines, their mean score
    and the share under LOW_LINE_SCORE; a page without text says whether its image is blank.
    None for a result without scores."""
    scores = recognition_scores(result)
    if scores is None:
        return None
    if not scores:
        return {"lines": 0, "blank": is_blank(page_image(result))}
    mean = sum(scores) / len(scores)
    low = sum(score < LOW_LINE_SCORE for score in scores) / len(scores)
    return {"lines": len(scores), "score": round(mean, 4), "low": round(low, 3)}


def recognition_scores(result: Any) -> list[float] | None:
    if not hasattr(result, "get"):
        return None
    for holder in (result, result.get("overall_ocr_res")):
        scores = holder.get("rec_scores") if hasattr(holder, "get") else None
        if scores is not None:
            try:
                return [float(score) for score in scores]
            except (TypeError, ValueError):
                return None
    return None


def page_image(result: Any) -> Any:
    """The page as the pipeline saw it (the OCR pipelines keep it with their preprocessing)."""
    holders = [result.get("doc_preprocessor_res"), (result.get("overall_ocr_res") or {}).get("doc_preprocessor_res")]
    for holder in holders:
        if hasattr(holder, "get") and holder.get("output_img") is not None:
            return holder.get("output_img")
    return None


def is_blank(image: Any) -> bool:
    """Nearly one colour (BLANK_PAGE_SPREAD): an empty page, not a page of static; False when unknown."""
    if image is None:
        return False
    try:
        import numpy

        return float(numpy.asarray(image, dtype=numpy.float32).std()) < BLANK_PAGE_SPREAD
    except Exception:
        return False


def weak_reason(figures: dict | None, threshold: float) -> str | None:
    """Why a page's figure makes it weak (a low mean score, or no text on a page that is not
    blank), or None."""
    if not figures or figures.get("blank"):
        return None
    if figures["lines"] == 0:
        return "no text on a page that is not blank"
    if figures["score"] < threshold:
        return f"mean recognition score {figures['score']:.3f} under --min_page_score {threshold:g}"
    return None


def reading_score(figure: Any) -> float:
    """A page's mean score, to compare two readings of it: 0 for a page without text."""
    score = figure.get("score") if type(figure) is dict and figure.get("lines") else 0.0
    return float(score) if type(score) in (int, float) else 0.0


def better_reading(new: dict | None, earlier: dict) -> bool:
    """Does a --retry_failed pass's reading replace the earlier, weak one? Only if its mean
    score is higher: a reading without scores (another kind of pipeline) cannot show it is."""
    return new is not None and reading_score(new) > reading_score(earlier)


def pages_read(done: Any) -> list[int | None] | None:
    """The pages a done task's outputs are of, in order (an image's: [None]); see listed_pages."""
    task = done.task
    return listed_pages(task.page_numbers, done.failed_pages, len(done.outputs)) if task.paged else [None]


def page_index_of(result: Any) -> int | None:
    return result.get("page_index") if hasattr(result, "get") else None


def can_save(result: Any, save_format: str) -> bool:
    if save_format == "markdown":
        return callable(getattr(result, "save_to_markdown", None))
    return isinstance(getattr(result, "img", None), dict)


FONT_VARIABLE = "PADDLE_PDX_LOCAL_FONT_FILE_PATH"  # PaddleX draws text (--save img) with this font file
FONT_PACKAGE = "noto-cjk-sans-otc==0.0.1"  # Noto Sans CJK (Latin, Chinese, Japanese, Korean; OFL), in requirements.txt


def offline_font() -> str | None:
    """The font PaddleX is to draw text with: the user's (FONT_VARIABLE), else FONT_PACKAGE's;
    None if neither is there (PaddleX then downloads its fonts at run time, once per page
    where there is no network, and draws no text)."""
    if os.environ.get(FONT_VARIABLE):
        return os.environ[FONT_VARIABLE]
    try:
        from noto_cjk_sans_otc import FONT_PATH
    except ImportError:
        return None
    return str(FONT_PATH)


def use_offline_font() -> None:
    """Give PaddleX's fonts, which it would download when first drawn with, the offline font
    (as FONT_VARIABLE would, without the warning PaddleX then prints in every worker), if
    PaddleX is loaded: after the pipeline is built, and before --save img draws (a pipeline
    may load PaddleX late)."""
    fonts, path = sys.modules.get("paddlex.utils.fonts"), offline_font()
    if fonts is None or path is None:
        return
    for font in vars(fonts).values():
        if isinstance(font, fonts.Font) and not getattr(font, "_local_path", None):
            font._local_path = path


def save_extras(folder: str, prefix: str, name: str, result: Any, formats: tuple[str, ...]) -> list[str]:
    """--save: markdown ({name}.md, by the result's save_to_markdown) and visualizations
    ({name}_{key}.png, from the result's `img` images), beside the JSON."""
    names = []
    if "markdown" in formats and can_save(result, "markdown"):
        names.append(f"{name}.md")
        result.save_to_markdown(os.path.join(folder, prefix + names[-1]))
    if "img" in formats and can_save(result, "img"):
        use_offline_font()
        for key, image in result.img.items():
            names.append(f"{name}_{key}.png")
            image.save(os.path.join(folder, prefix + names[-1]), format="PNG")
    return names


# ---------------------------------------------------------------------------------------------
# Report: run log, progress, failures, summary and exit code, all from the same events
# ---------------------------------------------------------------------------------------------


class Progress:
    """A bar on a terminal (tqdm, if installed); otherwise a line every `interval` seconds,
    which is what a cron log wants."""

    def __init__(self, total_pages: int, total_inputs: int, interval: float):
        self.total, self.inputs, self.interval = total_pages, total_inputs, interval
        self.last_line = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total_pages, unit="page", file=sys.stderr, dynamic_ncols=True)

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(f"{PROG}: {printable(message)}", file=sys.stderr)
        else:
            say(message)

    def update(self, pages: int, failed_pages: int, inputs: int, elapsed: float,
               longest: tuple[str, float] | None = None) -> None:
        """`pages` done and `failed_pages` of the run's pages; `inputs` finished; `longest`, the
        batch held longest (what, seconds; see Backend._longest_held), named once it has taken
        more than an interval."""
        if self.bar is not None:
            self.bar.n = min(pages + failed_pages, self.total)
            self.bar.set_postfix(failed=failed_pages, inputs=f"{inputs}/{self.inputs}", refresh=False)
            self.bar.refresh()
        elif self.interval and time.monotonic() - self.last_line >= self.interval:
            self.last_line = time.monotonic()
            rate = pages / elapsed if elapsed > 0 else 0.0
            slow = (f"; {longest[0]} in progress for {longest[1]:.0f} s" if longest and longest[1] >= self.interval
                    else "")
            say(f"progress: {pages + failed_pages}/{self.total} pages, {inputs}/{self.inputs} inputs, "
                f"{failed_pages} failed, {rate:.2f} pages/s{slow}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Document:
    """A PDF or TIFF of this run, done whole or in page ranges: what it has so far. Once every
    page it had to do has reported, it gets its whole record (Report.finish)."""

    task: Task  # the whole input
    left: int  # pages still to report in this run
    outputs: dict[int, str]  # page -> JSON: kept from earlier runs (see Coverage), then this run's
    extras: dict[str, int | None]  # --save file -> its page: the same
    failed: dict[int, str]  # page -> why: failed in an earlier run (not retried), then in this one
    standing: set[int] = field(default_factory=set)  # ... of those, failed in a finished run's whole record
    failed_now: int = 0
    seconds: float = 0.0
    attempts: int = 0
    device: str | None = None
    quality: dict[int, dict] = field(default_factory=dict)  # page -> figure: kept from earlier runs, then this run's
    weak: dict[int, str] = field(default_factory=dict)  # page -> why --min_page_score finds it weak (kept)
    weak_before: set[int] = field(default_factory=set)  # ... of those, found weak by an earlier run
    retry: set[int] = field(default_factory=set)  # pages failed for the output folder's fault: the next run does them


def describe_quality(figure: dict) -> str:
    if figure["lines"] == 0:
        return "no text"
    return f"score {figure['score']:.3f}, {figure['lines']} lines, {figure['low']:.0%} low"


def describe_weak_pages(weak: dict[int, str]) -> str:
    pages = sorted(weak)
    return (f"{len(pages)} weak page(s) (--min_page_score; their text is kept, --retry_failed redoes them): "
            + "; ".join(f"page {page}: {weak[page]}" for page in pages[:WORST_PAGES_SHOWN])
            + ("; ..." if len(pages) > WORST_PAGES_SHOWN else ""))


def describe_failed_pages(failed: dict[int, str], count: int) -> str:
    """"pages 3, 7 of 40 failed (page 3: ValueError: ...; ...)", page numbers as in the outputs."""
    pages = sorted(failed)
    shown = ", ".join(map(str, pages[:20])) + (f" and {len(pages) - 20} more" if len(pages) > 20 else "")
    reasons = "; ".join(f"page {page}: {failed[page]}" for page in pages[:3]) + ("; ..." if len(pages) > 3 else "")
    return f"page{'s' if len(pages) > 1 else ''} {shown} of {count} failed ({reasons})"


@dataclass
class Report:
    """Counts events, logs each finished input, and decides the exit code."""

    total: int  # inputs this run had to do
    skipped: int  # already complete
    ignored: int  # matched the pattern but not inputs (directories, other types)
    ledger: Ledger  # records each input and where its files go, retires what they supersede
    progress: Progress
    not_selected: int = 0
    standing: int = 0  # failed in an earlier run, unchanged since: not retried
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    pages: int = 0
    failed_pages: int = 0  # in this run: pages of documents, and images
    pages_by_device: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    output_error: str | None = None  # why writing outputs failed, if it did
    engines: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # workers per engine
    documents: dict[str, Document] = field(default_factory=dict)  # by input path
    max_page_error_rate: float = 0.0
    memory_limit: tuple[int, str] = (0, "")  # per worker, MB (0: none), and where it comes from
    recycled_for_memory: int = 0
    longest: tuple[str, float] | None = None  # the batch held longest (what, seconds), from Waiting
    blank_pages: int = 0
    weak_pages: list[tuple[str, dict]] = field(default_factory=list)  # (page, figure)
    min_page_score: float | None = None  # the gate: weak pages count as failed (see weak_reason)
    weak_readings: dict[tuple[str, int | None], Reading] = field(default_factory=dict)  # --retry_failed: to beat
    retry_by: str = ""  # --retry_failed: this pass's pipeline and options, said in its pages' figures
    kept: dict[int, dict[int | None, tuple[str, bool]]] = field(default_factory=dict)  # see keep_earlier
    failure_kinds: dict[str, str] = field(default_factory=dict)  # see note_failure
    failures_noted: int = 0

    def gated(self, quality: dict) -> dict:
        """The pages (keys of `quality`) that --min_page_score finds weak, and why."""
        if self.min_page_score is None:
            return {}
        return {page: why for page, figure in quality.items() if (why := weak_reason(figure, self.min_page_score))}

    def note_quality(self, page: str, figure: dict | None) -> None:
        """Count a page done in this run as blank or weak (see weak_reason), for the summary."""
        if not figure:
            return
        if figure.get("blank"):
            self.blank_pages += 1
        elif weak_reason(figure, WEAK_PAGE_SCORE):
            self.weak_pages.append((page, figure))

    def handle(self, event: Event) -> None:
        if isinstance(event, Waiting):
            self.longest = event.longest
        elif isinstance(event, Note):
            self.progress.say(event.text)
        elif isinstance(event, WorkerRecycled):
            self.recycled_for_memory += event.reason.for_memory
        elif isinstance(event, WorkerStarted):
            if event.engine not in self.engines:
                self.progress.say(f"worker {event.spec.slot} ({event.spec.device}) ready in {event.seconds:.1f} s; "
                                  f"engine: {event.engine}")
            self.engines[event.engine] += 1
        elif isinstance(event, OutputError):
            if self.output_error is None:
                self.output_error = event.text
                self.progress.say(f"error: {event.text}; starting no new inputs")
        elif isinstance(event, WorkerFailedToStart):
            self.progress.say(f"worker {event.spec.slot} ({event.spec.device}) could not start its pipeline: "
                              f"{event.error}" + (f"; starting another (try {event.retry})" if event.retry else ""))
        elif isinstance(event, WorkerLost):
            self.progress.say(f"worker {event.spec.slot} ({event.spec.device}) {event.reason}; "
                              f"{event.requeued} input(s) or page(s) go back to the queue"
                              + ("; starting a replacement" if event.replaced else ""))
        elif isinstance(event, Staged):
            self.staged(event)
        elif isinstance(event, TaskDone):
            self.task_done(event)
        elif isinstance(event, TaskFailed):
            self.task_failed(event)
        self.progress.update(self.pages, self.failed_pages, self.done + self.failed, self.elapsed, self.longest)

    def staged(self, event: Staged) -> None:
        """Record where a batch's staged files go (see Ledger.prepare), in the file before
        its worker renames them; a page whose earlier reading stays (see keep_earlier) has its
        new files discarded instead."""
        for done in event.done:
            kept = self.keep_earlier(done)
            kept_names = {os.path.basename(done.task.output_path(page)) for page in kept}
            names = [name for name in done.outputs if name not in kept_names]
            extras = [name for name, page in done.extras.items() if not self.kept_reads(done, kept, name, page)]
            discarded = [name for name in [*done.outputs, *done.extras] if name not in names and name not in extras]
            try:
                folder, renames = self.ledger.prepare(done.task, done.staged, done.prefix, names, extras)
                renames += [(f"{done.staged}{os.sep}{done.prefix}{name}", None) for name in discarded]
                event.moves[done.task.index] = folder, renames
            except OSError as error:
                if error.errno in OUTPUT_ERRNOS:
                    raise OutputFailed(f"cannot place outputs in {done.task.out_dir!r}: {error.strerror}") from None
                self.task_failed(TaskFailed(done.task, done.spec, f"cannot place output: {one_line(error)}",
                                            done.attempts, retry=error.errno in FOLDER_ERRNOS))
        self.ledger.record_placing()

    def kept_reads(self, done: TaskDone, kept: dict, name: str, page: int | None) -> bool:
        """Is this new --save file a kept earlier reading's to have (see keep_earlier), not placed
        then: one of a kept page; one of no page (a writer's own) where every page the task read
        is kept, or where a kept reading has a file of that name."""
        if page in kept:
            return True
        if page is not None or not kept:
            return False
        return (all(read in kept for read in pages_read(done) or ())
                or any(done.task.output_file(name) in self.weak_readings[done.task.path, read].extras for read in kept))

    def keep_earlier(self, done: TaskDone) -> dict[int | None, tuple[str, bool]]:
        """--retry_failed: the pages of a task where the earlier, weak reading stays, with why,
        and whether this pass failed them: this pass read them no better (see better_reading)
        or failed them. Noted in self.kept, and said once the task is done. A kept reading stays
        weak, unless this run's --min_page_score passes it."""
        if not self.weak_readings:
            return {}
        task = done.task
        figures = dict(zip(pages_read(done) or (), done.quality))
        kept: dict[int | None, tuple[str, bool]] = {}
        for page in task.page_numbers if task.paged else [None]:
            earlier = self.weak_readings.get((task.path, page))
            if earlier is None:
                continue
            if page in done.failed_pages or (page is None and not done.outputs):
                kept[page] = (f"this pass failed it ({done.failed_pages.get(page, 'no result')})", True)
            elif not better_reading(new := figures.get(page), earlier.figure):
                kept[page] = ("this pass read it no better (mean score "
                              + (f"{reading_score(new):.3f}" if new else "unknown: its pipeline gives no scores")
                              + f", the earlier {reading_score(earlier.figure):.3f})", False)
        if kept:
            self.kept[task.index] = kept
        return kept

    def this_pass(self, task: Task, page: int | None, figure: dict | None) -> dict | None:
        """A page's figure as recorded: a --retry_failed pass says it made it (`by`), and which
        reading it is where it replaced a weak one (`pass`, 2 or more)."""
        if figure is None or not self.retry_by:
            return figure
        earlier = self.weak_readings.get((task.path, page))
        if earlier is None:
            return {**figure, "by": self.retry_by}
        passes = earlier.figure.get("pass", 1)
        return {**figure, "pass": (passes if type(passes) is int else 1) + 1, "by": self.retry_by}

    def task_done(self, event: TaskDone) -> None:
        """The task's files are in place: its record."""
        task = event.task
        outputs = [task.output_file(name) for name in event.outputs]
        extras = [task.output_file(name) for name in event.extras]
        if task.path in self.documents:
            self.pages_done(event, outputs)
        else:
            figure = self.this_pass(task, None, event.quality[0] if event.quality else None)
            kept = self.kept.pop(task.index, {})
            weak = {}
            if None in kept:
                earlier, (why, this_failed) = self.weak_readings[task.path, None], kept[None]
                outputs, extras, figure = [earlier.output], list(earlier.extras), earlier.figure
                self.progress.say(f"{task.path}: {why}: its earlier reading is kept")
                weak = {None: why} if this_failed or self.min_page_score is None else {}  # (see keep_earlier)
            self.pages += len(outputs)
            self.pages_by_device[event.spec.device] += len(outputs)
            self.note_quality(task.path, figure)
            weak = weak or self.gated({None: figure})
            self.ledger.write(task, FAILED if weak else DONE, outputs=outputs, extras=extras,
                              device=event.spec.device, attempts=event.attempts, seconds=event.seconds,
                              quality=figure, weak=weak)
            if weak:
                self.progress.say(f"FAILED {task.path}: weak page: {weak[None]} (its text is kept in {outputs[0]!r}: "
                                  "--retry_failed redoes it)")
                self.failed += 1
                self.failed_pages += 1
            else:
                self.done += 1

    def task_failed(self, event: TaskFailed) -> None:
        task = event.task
        pages = list(task.page_numbers) if task.paged else [None]
        if event.spec and any((task.path, page) in self.weak_readings for page in pages):  # their readings stay
            failed = {page: event.error for page in pages}  # (an image's: None, for keep_earlier)
            done = TaskDone(task, event.spec, "", "", [], {}, 0.0, event.attempts, failed)
            self.keep_earlier(done)
            self.task_done(done)
        elif event.task.path in self.documents and event.task.page_numbers:
            self.pages_failed(event)
        else:
            self.input_failed(event.task, event.spec, event.attempts, event.error, event.retry)

    def input_failed(self, task: Task, spec: WorkerSpec | None, attempts: int, error: str, retry: bool = False
                     ) -> None:
        self.failed_pages += 1
        self.progress.say(f"FAILED {task.path}: {error}")
        self.ledger.write(task, FAILED, device=spec and spec.device, attempts=attempts, error=error, retry=retry)
        self.failed += 1
        self.note_failure(task, [error])

    def report_again(self, task: Task, record: dict) -> None:
        """A failure that a run stopped before it ended recorded (see Ledger.reported): said,
        counted and recorded again as it was, without a worker; a weak image keeps its text."""
        root, error = self.ledger.root, str(record.get("error") or "failed")
        weak = {None: error.removeprefix("weak page: ")} if record.get("weak") else None
        outputs = [os.path.join(root, rel) for rel in record.get("outputs") or ()]
        kept = f" (its text is kept in {outputs[0]!r}: --retry_failed redoes it)" if weak and outputs else ""
        self.progress.say(f"FAILED {task.path}: {error}{kept}")
        self.ledger.write(task, FAILED, outputs=outputs, extras=[os.path.join(root, rel) for rel in
                                                                 record.get("extra_outputs") or ()],
                          error=None if weak else error, quality=record.get("quality"), weak=weak,
                          options=options_of(record))
        self.failed += 1
        self.failed_pages += 1
        if not weak:  # (as a weak image read in this run: see summary)
            self.note_failure(task, [error])

    def note_failure(self, task: Task, errors: list[str]) -> None:
        """Its errors, less the input's name and numbers: where every input of a run failed the
        same way, the pipeline or an option is more likely at fault than the inputs (see summary)."""
        self.failures_noted += 1
        for error in errors:
            if len(self.failure_kinds) < 2:
                kind = re.sub(r"\d+", "#", error.replace(task.path, "").replace(os.path.basename(task.path), ""))
                self.failure_kinds.setdefault(kind, f"{task.path}: {error}")

    def pages_done(self, event: TaskDone, outputs: list[str]) -> None:
        """Some pages of a document, done (and perhaps some failed): a record for a range. A
        page whose earlier reading is kept (see keep_earlier) keeps that reading's --save files."""
        task, failed = event.task, dict(event.failed_pages)
        pages = listed_pages(task.page_numbers, failed, len(outputs)) or []
        files = dict(zip(pages, outputs))
        quality = {page: figure for page, figure in zip(pages, event.quality) if figure}
        quality = {page: self.this_pass(task, page, figure) for page, figure in quality.items()}
        kept = self.kept.pop(task.index, {})
        extras = {task.output_file(name): page for name, page in event.extras.items()
                  if not self.kept_reads(event, kept, name, page)}  # (as placed: see staged)
        for page, (why, _failed) in kept.items():
            earlier = self.weak_readings[task.path, page]
            failed.pop(page, None)
            files[page], quality[page] = earlier.output, earlier.figure
            extras.update(earlier.extras)
            self.progress.say(f"{task.path} page {page}: {why}: its earlier reading is kept")
        pages = sorted(files)
        outputs = [files[page] for page in pages]
        self.pages += len(outputs)
        self.pages_by_device[event.spec.device] += len(outputs)
        for page, figure in quality.items():
            self.note_quality(f"{task.path} page {page}", figure)
        weak = {**self.gated(quality), **{page: why for page, (why, this_failed) in kept.items()
                                          if this_failed or self.min_page_score is None}}
        if task.pages is not None:
            self.ledger.write(task, FAILED if failed or weak else DONE, outputs=outputs, extras=extras,
                              device=event.spec.device, attempts=event.attempts, seconds=event.seconds,
                              failed_pages=failed, quality=quality, weak=weak)
        document = self.documents[task.path]
        document.quality.update(quality)
        document.weak.update(weak)
        self.failed_pages += len(weak)
        document.outputs.update(zip(pages, outputs))
        for path in [path for path, page in document.extras.items() if page in files]:  # (read again: its files now)
            del document.extras[path]
        document.extras.update(extras)
        self.count_pages(document, task, event.spec, event.attempts, event.seconds, failed)

    def pages_failed(self, event: TaskFailed) -> None:
        """Every page of a range (or a document) failed: one record for them."""
        task = event.task
        failed = dict.fromkeys(task.page_numbers, event.error)
        if task.pages is not None:
            self.ledger.write(task, FAILED, device=event.spec and event.spec.device, attempts=event.attempts,
                              error=event.error, failed_pages=failed, retry=event.retry and sorted(failed))
        document = self.documents[task.path]
        if event.retry:
            document.retry.update(failed)
        self.count_pages(document, task, event.spec, event.attempts, 0.0, failed)

    def count_pages(self, document: Document, task: Task, spec: WorkerSpec | None, attempts: int,
                    seconds: float, failed: dict[int, str]) -> None:
        """`task`, a range or the whole document, has reported all its pages."""
        document.failed.update(failed)
        document.failed_now += len(failed)
        self.failed_pages += len(failed)
        document.left -= len(task.page_numbers)
        document.seconds += seconds
        document.attempts = max(document.attempts, attempts)
        document.device = document.device or (spec and spec.device)
        if document.left <= 0:
            self.finish(document)

    def finish(self, document: Document, options: str | None = None) -> None:
        """Every page of the document is done or failed: its whole record, which lists all
        its pages' files (earlier runs' too) and supersedes its ranges' records. Failed pages
        are named; past --max_page_error_rate the document counts as failed. `options`: those
        of the earlier runs that did every page (see options_tag), recorded instead of this run's."""
        task, failed, weak = document.task, document.failed, document.weak
        count = task.page_count or 0
        good = bool(document.outputs) and len(failed) + len(weak) <= self.max_page_error_rate * count
        outputs = [document.outputs[page] for page in sorted(document.outputs)]
        self.ledger.write(task, DONE if good else FAILED, outputs=outputs, extras=document.extras,
                          device=document.device, attempts=document.attempts, seconds=document.seconds,
                          failed_pages=failed, quality=document.quality, weak=weak, retry=sorted(document.retry),
                          **({"options": options} if options is not None else {}))
        del self.documents[task.path]
        if failed or weak:
            rate = f" (within --max_page_error_rate {self.max_page_error_rate:g})" if good else ""
            said = "; ".join(filter(None, [describe_failed_pages(failed, count) if failed else "",
                                           describe_weak_pages(weak) if weak else ""]))
            self.progress.say(f"{'' if good else 'FAILED '}{task.path}: {said}{rate}")
        # Pages a stopped run failed or found weak (range records) are recorded for the document
        # now: news (this run's own were counted as they came).
        first_time = len(set(failed) - document.standing)
        self.failed_pages += max(0, first_time - document.failed_now)
        self.failed_pages += len(document.weak_before & weak.keys() - document.standing)
        if good:
            self.done += 1
        elif first_time or weak.keys() - document.standing:
            self.failed += 1
            self.note_failure(task, [*failed.values(), *(f"weak: {why}" for why in weak.values())])
        else:  # only pages that failed in an earlier finished run, not retried: a standing failure
            self.standing += 1
            self.total -= 1

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def unprocessed(self) -> int:
        return self.total - self.done - self.failed

    def counts(self) -> dict[str, int]:
        """For the run log's line about this run."""
        return {"done": self.done, "failed": self.failed, "skipped": self.skipped, "unprocessed": self.unprocessed,
                "standing_failures": self.standing, "pages": self.pages, "failed_pages": self.failed_pages,
                "blank_pages": self.blank_pages, "weak_pages": len(self.weak_pages),
                "retired": self.retired}

    @property
    def retired(self) -> int:
        return self.ledger.retired

    def summary(self, stop: Stopper) -> list[str]:
        elapsed = self.elapsed
        rate = self.pages / elapsed if elapsed > 0 else 0.0
        counts = [f"{self.done} done", f"{self.failed} failed", f"{self.skipped} skipped (already done)"]
        if self.unprocessed:
            why = ("interrupted" if stop.requested else "writing outputs failed" if self.output_error
                   else "no worker could run")
            counts.append(f"{self.unprocessed} not processed ({why})")
        if self.standing:
            counts.append(f"{self.standing} failed before (not retried)")
        if self.not_selected:
            counts.append(f"{self.not_selected} not selected (--retry_failed)")
        counts.append(f"{self.ignored} ignored (not an input)")
        per_device = ", ".join(f"{d} {p / elapsed:.2f}" for d, p in sorted(self.pages_by_device.items()))
        failed_pages = f" ({self.failed_pages} failed)" if self.failed_pages else ""
        lines = [f"inputs: {', '.join(counts)}; {self.pages} page(s){failed_pages} in {elapsed:.1f} s, "
                 f"{rate:.2f} pages/s" + (f" (per device: {per_device})" if per_device else "")]
        if self.engines:
            lines.append("engines: " + ", ".join(f"{engine} on {n} worker start(s)"
                                                 for engine, n in self.engines.items()))
        if self.blank_pages or self.weak_pages:
            worst = ", ".join(f"{page} ({describe_quality(figure)})"
                              for page, figure in sorted(self.weak_pages, key=lambda weak: weak[1].get("score", 0.0))
                              [:WORST_PAGES_SHOWN])
            lines.append(f"quality: {self.blank_pages} blank page(s), {len(self.weak_pages)} weak page(s) (mean "
                         f"recognition score under {WEAK_PAGE_SCORE:g}, or no text on a page that is not blank)"
                         + (f"; weakest: {worst}" if worst else "") + "; each page's figure is in the run log")
        limit, source = self.memory_limit
        if limit:
            lines.append(f"memory: a worker is recycled past {limit:,} MB resident ({source}): "
                         f"{self.recycled_for_memory} time(s) in this run")
        if self.output_error:
            lines.append(f"stopped: {self.output_error}; fix that (free space, make it writable) "
                         "and rerun the same command to do the rest")
        if self.retired:
            lines.append(f"retired {self.retired} stale output file(s): earlier outputs of inputs done or failed "
                         "again that the new outputs do not replace (old names, pages no longer there, a changed "
                         "file's old text)")
        if self.standing:
            lines.append(f"{self.standing} input(s) failed in an earlier run and have not changed since: not retried "
                         "(a changed file is); --retry_failed retries them")
        if self.failed > 1 and not self.done and self.failures_noted == self.failed and len(self.failure_kinds) == 1:
            lines.append(f"all {self.failed} failed inputs failed the same way (such as "
                         f"{next(iter(self.failure_kinds.values()))}): if the pipeline or an option is at "
                         "fault, not the inputs, fix it and rerun with --retry_failed (a plain rerun does not retry "
                         "an unchanged file that failed)")
        if self.failed or self.failed_pages:
            lines.append(f"failed inputs are in the run log {str(self.ledger.log.path)!r} "
                         '(lines with "status": "failed"; a document\'s failed pages in "failed_pages"); '
                         "--retry_failed retries only them, and only a document's failed pages")
        return lines

    def exit_code(self, stop: Stopper) -> ExitCode:
        if stop.cut_short:
            return ExitCode.TERMINATED if stop.signum == signal.SIGTERM else ExitCode.INTERRUPTED
        if self.output_error:
            return ExitCode.OUTPUT_FAILED
        if self.unprocessed:
            return ExitCode.NO_WORKERS
        return ExitCode.INPUTS_FAILED if self.failed or self.failed_pages else ExitCode.OK


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: Path) -> list[Path]:
    """Create --output_dir if missing; the folders this created, outermost first."""
    created = [folder for folder in [output_dir, *output_dir.parents] if not folder.exists()][::-1]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cannot_write(f"--output_dir {str(output_dir)!r}", error) from None
    return created


def remove_if_unused(created: list[Path]) -> None:
    """A run that wrote nothing (a usage error found under the lock, no inputs) leaves no
    output folder behind that it created: only lock files are in it, none held (a lock file
    another run holds stays, and the folder with it). Not for a shard: its folder is its
    sibling shards' too (see run)."""
    if not created:
        return
    output_dir = created[-1]
    try:
        names = os.listdir(output_dir)
    except OSError:
        return
    if not all(name.startswith(".infer_mp") and name.endswith(".lock") for name in names):
        return
    for name in names:
        with contextlib.suppress(OSError), open(output_dir / name, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (held by another run: OSError, it stays)
            os.unlink(output_dir / name)  # while locked: a run that opened it since sees it go (see RunLock)
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # fails, as wanted, if anything else is in it


def run(config: Config) -> ExitCode:
    """Take the run lock first (a refused cron tick starts nothing), choose the work under it,
    and start workers only if there is any."""
    pipeline = resolve_pipeline(config.pipeline)
    if config.dry_run:
        return dry_run(config, pipeline)
    created = prepare_output_dir(config.output_dir)
    lock = RunLock(config)
    try:
        clear_staging(config.output_dir, config.shard)
        selection, tasks, work = choose_work(config, locked=True)
        work.ledger.still_ours = lock.still_ours
        say_unlisted(selection)
        code = run_selected(config, pipeline, selection, tasks, work)
        return ExitCode.INPUTS_FAILED if code == ExitCode.OK and selection.unlisted else code
    finally:
        ours = lock.still_ours()  # (else what is there now is another run's)
        if ours:
            clear_staging(config.output_dir, config.shard)
        lock.release()
        if ours and config.shard is None:
            remove_if_unused(created)


def run_selected(config: Config, pipeline: PipelineRef, selection: InputSelection, tasks: list[Task],
                 work: WorkSelection) -> ExitCode:
    if not tasks:
        parse_device_arg(config.device)
        say_no_inputs(config, selection)
        log_idle_run(config, work.ledger, ExitCode.INPUTS_FAILED if selection.unlisted else ExitCode.OK)
        return ExitCode.OK
    read_documents(work)
    if not any(needs_worker(task, work) for task in work.todo):  # nothing to do (or only files that
        # cannot be read): no worker, no model; a misspelt device still shows
        parse_device_arg(config.device)
        return dispatch(config, pipeline, [], tasks, work, selection.ignored)
    probe_run_log(config.run_log, config.output_dir)  # before a worker imports anything
    return start_and_dispatch(config, pipeline, tasks, work, selection.ignored)


def log_idle_run(config: Config, ledger: Ledger, code: ExitCode) -> None:
    """A run that found no inputs: its closing line, in a run log that is there already (a
    cron tick over an emptied input folder is on record; a first run with a misspelt path
    leaves nothing behind)."""
    if not config.run_log.exists():
        return
    ledger.open(config.run_log, config.shard)
    try:
        counts = Report(0, 0, 0, ledger, progress=None).counts()  # type: ignore[arg-type]  (all 0 but retired)
        ledger.log.write_run(counts, int(code), ledger.generation)
    finally:
        ledger.log.close()


def say_unlisted(selection: InputSelection) -> None:
    """A folder of the inputs that cannot be listed is named, as a failed input is, and makes
    the exit code 1: its files are unknown, so no record can stand for them."""
    for folder, why in selection.unlisted:
        say(f"FAILED {os.path.join(folder, '')}: cannot list this folder ({why}); its files are not inputs "
            "of this run (give the user running infer_mp.py read access, e.g. chmod a+rx)")


def needs_worker(task: Task, work: WorkSelection) -> bool:
    """Has this input to do anything a worker must do (it is readable, and if a document,
    has pages left that an earlier run did not finish)?"""
    if task.index in work.unreadable or task.index in work.again:
        return False
    return not task.page_count or bool(pages_to_do(task, work.coverage.get(task.index)))


def has_second_name(run_log: Path) -> bool:
    """A run log hard-linked elsewhere (a `cp -al` or rsnapshot backup of the output folder, or
    an input) would be appended to under both names, the other one's lock aside: compacting
    it first gives it a file of its own, and leaves the other name's as it was."""
    status = regular_file_status(str(run_log))
    return status is not None and status.st_nlink > 1


def probe_run_log(path: Path, output_dir: Path) -> None:
    """Refuse a run log that cannot be appended to now, rather than after workers started
    (leaving nothing behind: the run log is opened for good once every check has passed)."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        open(path, "ab").close()
    except OSError as error:
        raise cannot_write(f"the run log {str(path)!r}", error) from None
    if not existed:
        with contextlib.suppress(OSError):
            path.unlink()


def choose_work(config: Config, locked: bool) -> tuple[InputSelection, list[Task], WorkSelection]:
    """List and name every input (all shards: names are decided over the whole set), keep
    this shard's, and hold them against the run logs."""
    ledger = Ledger.read(config)
    ledger.check_output_folder()
    selection = find_inputs(config, ledger.recorded)
    folded = locked and case_insensitive(config.output_dir)
    selection = ledger.not_placed(selection)
    ledger.protected.update(selection.paths)  # never deleted
    planned = plan_tasks(selection.root, config.output_dir, selection.paths, folded)
    if any(within(folder, str(config.run_log)) for folder in {task.out_dir for task in planned}):  # (each once)
        raise UsageError(f"--run_log {str(config.run_log)!r} is where the outputs of a subfolder of the inputs "
                         "go; give a path of its own, e.g. run.jsonl")
    ledger.protected.update(task.path for task in planned)
    ledger.dry = None if locked else []  # (--dry_run: what finishing a killed run's work would delete, listed)
    ledger.reconcile(others_placing(config, planned, ledger))  # finish what a killed run left half-done
    # ... and keep the log short (not while retiring is put off), and its own (a hard-linked
    # backup's copy must not grow)
    if locked and (has_second_name(config.run_log) or (ledger.worth_compacting and not ledger.put_off)):
        probe_run_log(config.run_log, config.output_dir)  # (a read-only log is refused, not replaced)
        ledger.compact(config.run_log, run_tag(config.shard))
    planned = avoid_claimed_names(planned, ledger, folded)
    tasks = [task for task in planned if in_shard(task, config.shard)]
    return selection, tasks, select_work(tasks, ledger, config)


def others_placing(config: Config, planned: list[Task], ledger: Ledger) -> set[str]:
    """The inputs that another shard's run may be placing files for, whose records it may not
    have written yet: none without shards; the other shards' inputs; and while another shard
    runs, inputs gone since that another shard's log has placed files for (it may have listed
    them before they went). Those this shard's own log placed are its own: no other run
    places them, and this one retires them, whichever shards run beside it."""
    if config.shard is None:
        return set()
    index, count = config.shard
    ledger.beside = [default_run_log(config.output_dir, (other, count)) for other in range(count) if other != index]
    if ledger.dry is None:
        ledger.open_turn()
    others = {task.path for task in planned if not in_shard(task, config.shard)}
    if running := shards_running(config):
        others |= ledger.placed_in_logs_of(running, set(ledger.placed) - {task.path for task in planned})
    return others


def say_no_inputs(config: Config, selection: InputSelection) -> None:
    if config.shard and selection.paths:  # inputs, but none in this shard's share
        say(f"no inputs in shard {config.shard[0]}/{config.shard[1]}: the {len(selection.paths)} input(s) "
            "found all fall to other shards; nothing to do")
        return
    listed = ("none of its paths is an input (folders, or files in the output folder)" if selection.ignored
              else "it is empty")
    say("no inputs: " + (f"the list {config.input_list!r}: {listed}" if config.input_list is not None else
                         f"nothing matches {', '.join(config.input_glob_patterns)} in {str(config.input_dir)!r}"
                         + (" or its subfolders" if config.recursive else "")) + "; nothing to do")


def start_and_dispatch(config: Config, pipeline: PipelineRef, tasks: list[Task], work: WorkSelection,
                       ignored: int) -> ExitCode:
    """Start the workers (they import while the coordinator checks options, devices and the
    engine; see WarmPool), then dispatch."""
    warm = WarmPool(pipeline, expected_workers(config))
    warm.ask_for_plan(config)
    cluster = None
    try:
        if config.backend == "ray":
            cluster = RayCluster(config.ray_address, config.instances_per_device, config.start_timeout)
            plan = plan_ray_workers(config, cluster)
            cluster.warm_up(plan, pipeline)
            check_pipeline_options(pipeline, config.pipeline_kwargs, config.predict_kwargs)
        else:
            plan = warm.plan(config)  # the options checked, and the plan made, by a warm worker
        check_engine(config, plan[0].device.split(":")[0])
        return dispatch(config, pipeline, plan, tasks, work, ignored, warm, cluster)
    finally:
        warm.close()
        if cluster is not None:
            cluster.close()


def dry_run(config: Config, pipeline: PipelineRef) -> ExitCode:
    """--dry_run: no lock (it writes nothing), no worker, no model."""
    cluster = (RayCluster(config.ray_address, config.instances_per_device, config.start_timeout)
               if config.backend == "ray" else None)
    try:
        plan = plan_ray_workers(config, cluster) if cluster else plan_workers(config)
        check_pipeline_options(pipeline, config.pipeline_kwargs, config.predict_kwargs)
        check_engine(config, plan[0].device.split(":")[0])
        selection, tasks, work = choose_work(config, locked=False)
        say_unlisted(selection)
        if would_be_refused(config):
            say("note: another infer_mp.py run is using --output_dir now: a run started now would exit 75 "
                "(wait for it to finish)")
        read_documents(work)
        say_other_options(work)
        print_plan(config, pipeline, plan, len(selection.paths), work, selection.ignored, cluster)
        return ExitCode.OK
    finally:
        if cluster is not None:
            cluster.close()


def say_other_options(work: WorkSelection) -> None:
    """A rerun with another --pipeline or other options skips what earlier runs did, as any
    rerun does: said, so that nobody takes their text for this pipeline's."""
    counts = [f"{count} input(s) {what}" for count, what in [(work.other_done, "skipped (already done)"),
                                                           (work.other_failed, "failed before (not retried)")]
              if count]
    if counts:
        say(f"note: {' and '.join(counts)} come from a run with another --pipeline or other pipeline options, and "
            "are kept as they are (--overwrite redoes every input, --retry_failed the failed ones)")


def print_plan(config: Config, pipeline: PipelineRef, plan: list[WorkerSpec], planned: int,
               work: WorkSelection, ignored: int, cluster: RayCluster | None) -> None:
    """--dry_run: what a run would do, on stdout; nothing is written and no model is loaded."""
    shard = f" (shard {config.shard[0]}/{config.shard[1]} of {planned})" if config.shard else ""
    selected = len(work.todo) + len(work.complete) + work.not_selected + len(work.standing)
    lines = [
        f"pipeline: {pipeline.name} from {pipeline.module}",
        f"workers: {describe_plan(plan)}; batch size {config.batch_size}"
        + (f"; on the {cluster.describe()}" if cluster else ""),
        f"inputs: {selected} selected{shard}, {len(work.todo)} to do, {len(work.complete)} already done (skipped), "
        f"{len(work.standing)} failed before and unchanged (not retried without --retry_failed), "
        f"{work.not_selected} not selected (--retry_failed), {ignored} ignored (not an input)",
        f"output: {config.output_dir}; run log {config.run_log}",
    ]
    if stale := work.ledger.dry:
        lines.append(f"first deleted: {len(stale)} file(s) that earlier runs placed and no record holds now (a killed "
                     f"run's, an older version's): {', '.join(stale[:WORST_PAGES_SHOWN])}"
                     + (", ..." if len(stale) > WORST_PAGES_SHOWN else ""))
    engine = config.pipeline_kwargs.get("engine")
    providers = (config.pipeline_kwargs.get("engine_config") or {}).get("providers")
    lines.append(f"engine: {engine or 'the pipeline default'}"
                 + (f", providers {', '.join(providers)}" if providers else "")
                 + " (each worker reports what it really runs on when it starts)")
    if config.pipeline_kwargs or config.predict_kwargs:
        lines.append(f"options: pipeline {config.pipeline_kwargs}, predict {config.predict_kwargs}")
    lines.append(f"limits: {describe_limits(config, len(plan))}")
    lines.append("to do:")
    for task in work.todo:
        name = os.path.relpath(task.output_path("{page}" if task.paged else None), config.output_dir)
        if task.index in work.unreadable:
            name = f"fails: {work.unreadable[task.index]}"
        elif task.index in work.again:
            name = f"reported again (failed in a run that was stopped): {work.again[task.index].get('error')}"
        elif too_large := oversized(task, config.max_image_pixels):
            name = f"fails: {too_large}"
        elif task.page_count:
            left = len(pages_to_do(task, work.coverage.get(task.index)))
            name += f" ({task.page_count} pages" + (f", {left} left to do)" if left < task.page_count else ")")
        lines.append(printable(f"  {task.path} -> {name}", raw_bytes=True))
    sys.stdout.reconfigure(errors="surrogateescape")  # file names that are not UTF-8, as they are
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # `--dry_run | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def describe_limits(config: Config, workers: int) -> str:
    """The limits a run would work under, as --dry_run shows them: worker recycling, pixels,
    the hang timeout."""
    memory, source = memory_limit(config, workers)
    parts = [f"a worker is recycled past {memory:,} MB resident ({source})" if memory
             else f"no memory limit on workers ({source})"]
    if config.max_items_per_worker:
        parts.append(f"a worker is recycled after {config.max_items_per_worker} input(s) (--max_items_per_worker)")
    parts.append(f"images past {config.max_image_pixels:,} pixels fail, PDF pages are rendered smaller "
                 "(--max_image_pixels)" if config.max_image_pixels else "no pixel limit (--max_image_pixels 0)")
    parts.append(f"a page may take {config.task_timeout:g} s (--task_timeout)" if config.task_timeout
                 else "no time limit on a page (--task_timeout)")
    return "; ".join(parts)


def dispatch(config: Config, pipeline: PipelineRef, plan: list[WorkerSpec], tasks: list[Task], work: WorkSelection,
             ignored: int, warm: WarmPool | None = None, cluster: RayCluster | None = None) -> ExitCode:
    """Every check has passed: open the run log, and run."""
    work.ledger.open(config.run_log, config.shard)
    try:
        return dispatch_logged(config, pipeline, plan, work, ignored, warm, cluster)
    finally:
        work.ledger.log.close()


def dispatch_logged(config: Config, pipeline: PipelineRef, plan: list[WorkerSpec], work: WorkSelection,
                    ignored: int, warm: WarmPool | None, cluster: RayCluster | None) -> ExitCode:
    readable = [task for task in work.todo if task.index not in work.unreadable and task.index not in work.again]
    todo = split_documents([task for task in readable if needs_worker(task, work)], work.coverage, len(plan),
                           config.pages_per_task, 1 + max((task.index for task in work.todo), default=0))
    pages = sum(task.weight for task in todo) + len(work.unreadable)
    shard = f" (shard {config.shard[0]}/{config.shard[1]})" if config.shard else ""
    workers = f"; {describe_plan(plan)}, batch size {config.batch_size}" if plan else ""
    ranges = sum(task.pages is not None for task in todo)
    say(f"{len(work.todo)} input(s) to do{shard}, {len(work.complete)} already done; {pages} page(s)"
        + (f" ({ranges} page ranges of documents)" if ranges else "") + f"{workers} -> {config.output_dir}"
        + (f"; on the {cluster.describe()}" if cluster else ""))
    say_other_options(work)
    stop = Stopper()
    stop.install()
    progress = Progress(pages, len(work.todo), config.progress_interval)
    report = Report(len(work.todo), len(work.complete), ignored, work.ledger, progress, work.not_selected,
                    standing=len(work.standing), max_page_error_rate=config.max_page_error_rate,
                    min_page_score=config.min_page_score, weak_readings=work.weak,
                    retry_by=retry_label(config) if config.retry_failed else "")
    try:
        for task in work.todo:
            if task.index in work.unreadable:  # (a file there that cannot be read: the file's fault)
                report.handle(TaskFailed(task, None, work.unreadable[task.index]))
            elif task.index in work.again:
                report.report_again(task, work.again[task.index])
        for task in readable:
            if task.page_count:
                coverage = work.coverage.get(task.index) or Coverage()
                report.documents[task.path] = Document(
                    task, len(pages_to_do(task, coverage)), dict(coverage.outputs), dict(coverage.extras),
                    dict(coverage.failed), coverage.standing | coverage.weak_standing, quality=dict(coverage.quality),
                    weak={page: weak_reason(coverage.quality.get(page), config.min_page_score or 0.0)
                          or "by an earlier run's --min_page_score" for page in coverage.weak_kept},
                    weak_before=set(coverage.weak_kept))
        for document in [d for d in report.documents.values() if d.left == 0]:  # all done by earlier runs
            options = work.coverage[document.task.index].options
            report.finish(document, next(iter(options)) if len(options) == 1 else None)
        if todo:
            report.memory_limit = memory_limit(config, len(plan))
            options = worker_options(pipeline, config, report.memory_limit[0])
            backend = RayBackend(options, config, cluster) if cluster else LocalBackend(options, config, warm)
            events = backend.run(todo, plan, stop)
            with contextlib.closing(events):
                for event in events:
                    report.handle(event)
    except OutputFailed as error:
        report.output_error = str(error)
    finally:
        progress.close()
        stop.close()
    try:
        work.ledger.log.write_run(report.counts(), int(report.exit_code(stop)), work.ledger.generation)
    except OutputFailed as error:
        report.output_error = report.output_error or str(error)
    for line in report.summary(stop):
        say(line)
    return report.exit_code(stop)


class Terminated(BaseException):
    """SIGTERM before the dispatch loop handles signals itself (Stopper): unwinds as Ctrl-C's
    KeyboardInterrupt does, so that the lock and the workers are let go of."""


def raise_stop(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM before the dispatch loop: unwind. Later ones are ignored, so that
    they cannot cut short the unwinding (a second Ctrl-C while the workers were being killed
    left one alive, and Python's exit waited for it forever)."""
    for other in STOP_SIGNALS:  # (not SIG_IGN: Python raises OSError for one already pending then)
        signal.signal(other, stopping_already)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def stopping_already(signum: int, frame: Any) -> None:
    """A signal while the run unwinds from an earlier one: it changes nothing (see raise_stop)."""


def main(argv: list[str] | None = None) -> int:
    as_script = signal.getsignal(signal.SIGTERM) is stopped_while_starting  # (see the top)
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is stopped_while_starting:  # (not one ignored from the start)
            signal.signal(signum, raise_stop)
    try:
        try:
            return int(run(parse_config(argv)))
        finally:
            stop_listening(as_script)  # however it ended, it has ended: a signal from now on changes nothing
    except UserError as error:
        say(f"error: {error}")
        return int(error.exit_code)
    except KeyboardInterrupt:
        say("interrupted")
        return int(ExitCode.INTERRUPTED)
    except Terminated:
        say("stopped by SIGTERM")
        return int(ExitCode.TERMINATED)
    finally:
        kill_left_workers()


def kill_left_workers() -> None:
    """No worker outlives the run, whatever path it ended by: each ignores SIGTERM, which is
    all that Python's exit sends them before it waits for them."""
    left = [process for process in multiprocessing.active_children()
            if process.name == WORKER_PROCESS_NAME and process not in let_go]
    for process in left:
        process.kill()
    reap(left)


def exit_code_now(code: int) -> int:
    """The run's exit code; with a worker let go of (see reap), the process exits here:
    Python's own exit would wait for it (multiprocessing joins every child it started)."""
    if let_go:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def stop_listening(as_script: bool) -> None:
    """Stopping already, or done: a signal while Python shuts down must neither print a
    traceback nor kill the process before it exits with its code (run as a script only;
    Python puts the default handlers back as it shuts down, but leaves ignored signals be)."""
    if not as_script:
        return
    for signum in STOP_SIGNALS:
        while True:
            try:
                signal.signal(signum, signal.SIG_IGN)  # (which first runs the handler of one that came)
                break
            except (KeyboardInterrupt, Terminated):
                pass  # one that came before: the run's code is decided already


if __name__ == "__main__":
    try:
        status = main()
    except BaseException:  # (a bug, or stderr's reader gone: with a worker let go of, Python's exit would hang)
        if not let_go:
            raise
        with contextlib.suppress(BaseException):
            sys.excepthook(*sys.exc_info())
        status = 1
    sys.exit(exit_code_now(status))
