"""A model-free pipeline with PaddleOCR's predict()/result interface, for orchestration tests.

An input's bytes steer it: a file containing ``RAISE`` makes predict() raise, ``CRASH`` kills
the worker process, ``HANG`` never returns, ``GROW`` keeps 100 MB more resident memory, and
``EMPTY`` yields no result (as PaddleX does for a type it cannot read).
``FAKE_PIPELINE_DELAY`` (seconds), or the constructor option ``delay`` (which reaches Ray
actors on any node, as environment variables may not), makes every input take that long;
``FAKE_PIPELINE_INIT_LOG`` or the option ``init_log`` names a file where each instance logs
its pid, device and threads;
``FAKE_PIPELINE_STARTS`` names a file counting constructor calls, and
``FAKE_PIPELINE_FAIL_STARTS`` / ``FAKE_PIPELINE_HANG_STARTS`` (e.g. "2,3") make those calls raise / block;
``FAKE_PIPELINE_IMPORT_LOG`` names a file where every process that imports this module logs its pid;
``FAKE_PIPELINE_ENOSPC_AFTER=N`` makes each worker's saves fail with ENOSPC after N files.
A ``.pdf``/``.tif``/``.tiff`` yields one page per line that starts with ``page``, at least
one; any other input one result without a page index. Each result records which process made
it, so the tests can see the work spread over workers.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import time
from pathlib import Path

PAGED = {".pdf", ".tif", ".tiff"}
INIT_LOG = os.environ.get("FAKE_PIPELINE_INIT_LOG")
if os.environ.get("FAKE_PIPELINE_IMPORT_LOG"):  # which processes imported the pipeline at all
    with open(os.environ["FAKE_PIPELINE_IMPORT_LOG"], "a", encoding="utf-8") as _log:
        _log.write(f"{os.getpid()}\n")
_held_memory: list[bytearray] = []


_saved = 0


class FakeResult(dict):
    def save_to_json(self, save_path: str) -> None:
        global _saved
        if not save_path.endswith(".json"):
            raise ValueError("FakeResult needs a .json path")
        limit = os.environ.get("FAKE_PIPELINE_ENOSPC_AFTER")
        if limit is not None and _saved >= int(limit):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), save_path)
        _saved += 1
        with open(save_path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(self)))

    def save_to_markdown(self, save_path: str) -> None:
        if not save_path.endswith(".md"):
            raise ValueError("FakeResult needs a .md path")
        Path(save_path).write_text(f"# {self['text']}\n", encoding="utf-8")

    @property
    def img(self) -> dict:
        from PIL import Image

        return {"vis": Image.new("RGB", (8, 8), "white")}


class PlainResult(FakeResult):
    """A result with JSON only, like pipelines whose results have no markdown or image form."""

    save_to_markdown = None  # type: ignore[assignment]
    img = None  # type: ignore[assignment]


def count_start() -> int:
    """This constructor call's number in the test (1, 2, ...), counted in FAKE_PIPELINE_STARTS."""
    path = os.environ.get("FAKE_PIPELINE_STARTS")
    if not path:
        return 0
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        number = len(handle.read().splitlines()) + 1
        handle.write(f"{os.getpid()}\n")
    return number


class FakePipeline:
    result_type = FakeResult

    def __init__(self, device: str | None = None, cpu_threads: int | None = None, **options):
        if os.environ.get("FAKE_PIPELINE_FAIL_INIT"):
            raise RuntimeError("fake pipeline refuses to start (FAKE_PIPELINE_FAIL_INIT)")
        start = count_start()
        if str(start) in os.environ.get("FAKE_PIPELINE_FAIL_STARTS", "").split(","):
            raise RuntimeError(f"fake pipeline start {start} fails (FAKE_PIPELINE_FAIL_STARTS)")
        if str(start) in os.environ.get("FAKE_PIPELINE_HANG_STARTS", "").split(","):
            time.sleep(3600)
        self.device = device
        self.cpu_threads = cpu_threads
        self.options = options
        self.delay = float(options.get("delay", os.environ.get("FAKE_PIPELINE_DELAY", "0")))
        init_log = options.get("init_log", INIT_LOG)
        if init_log:
            with open(init_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "device": device, "cpu_threads": cpu_threads}) + "\n")

    def predict(self, inputs, **predict_options):
        if isinstance(inputs, str):
            inputs = [inputs]
        results = []
        for path in inputs:
            data = Path(path).read_bytes()
            if b"CRASH" in data:
                os.kill(os.getpid(), signal.SIGKILL)
            if b"RAISE" in data:
                raise ValueError(f"cannot decode input {os.path.basename(path)}")
            if b"HANG" in data:
                time.sleep(3600)
            if b"GROW" in data:
                _held_memory.append(bytearray(os.urandom(1)) * (100 * 2**20))
            if b"EMPTY" in data:
                continue
            if self.delay:
                time.sleep(self.delay)
            common = {"input_path": path, "device": self.device, "pid": os.getpid(),
                      "cpu_threads": self.cpu_threads, "batch": len(inputs), "options": self.options,
                      "predict_options": predict_options, "text": data.decode("utf-8", "replace")}
            if Path(path).suffix.lower() in PAGED:
                lines = [line for line in data.splitlines() if line.startswith(b"page")]
                for index in range(max(1, len(lines))):
                    results.append(self.result_type(common, page_index=index))
            else:
                results.append(self.result_type(common, page_index=None))
        return results


class StrictPipeline(FakePipeline):
    """Explicit options only, so that a misspelled one can be caught before workers start."""

    result_type = PlainResult

    def __init__(self, device: str | None = None, cpu_threads: int | None = None, language: str = "en"):
        super().__init__(device, cpu_threads, language=language)

    def predict(self, inputs, *, flavor: str | None = None):
        return super().predict(inputs, flavor=flavor)
