"""A model-free pipeline with PaddleOCR's predict()/result interface, for orchestration tests.

An input's bytes steer it: a file containing ``RAISE`` makes predict() raise, ``CRASH`` kills
the worker process, ``HANG`` never returns, ``SEVER`` closes the worker's pipe then hangs,
``DETACH`` closes the pipes it inherited (its multiprocessing sentinel's write end among them)
then hangs, ``UNPIPE`` closes them 0.6 s later and goes on (the option ``close_pipes`` closes
them as the pipeline is built), ``FORKCRASH`` forks a helper (see fork_helper) then kills the
worker, ``SEVERFORK`` closes its pipe to the coordinator, forks a helper (which then holds its
sentinel's pipe) and hangs, ``HALFSEND`` forks a helper, sends the start of a message and kills
the worker (as the OOM killer may, mid-send), ``HALFSTALL`` sends the start of one, then 5.5 s
later what looks like another, and hangs, ``DOOM`` kills the worker 1.2 s into the input,
``UNKILLABLE`` has the worker held at its exit, once killed, as one stuck in the kernel is (see
hold_at_exit), then goes on,
``GROW`` keeps 100 MB (``FAKE_PIPELINE_GROW_MB``) more resident memory, and
``EMPTY`` yields no result (as PaddleX does for a type it cannot read), and ``WAIT`` waits
until the file that ``FAKE_PIPELINE_WAIT_FILE`` names exists. ``SCORES:0.5,0.6`` gives the
result those recognition scores (``rec_scores``, as an OCR pipeline's), ``SCORES:-`` none (no
text found), and ``BLANK`` a page image of one colour (as the OCR pipelines keep it); the
option ``side_files`` has the markdown writer add ``imgs/logo.png`` and ``imgs/<page>_fig.png``
beside its file (as PaddleX's adds a page's images); the option ``score_shift`` adds to every
such score (up to 1; with ``shift_only``, only on inputs or pages with that word), and
``raise_on`` names one more word that raises, as a second pass with another pipeline might read
the same files better or fail.
``FAKE_PIPELINE_DELAY`` (seconds), or the constructor option ``delay`` (which reaches Ray
actors on any node, as environment variables may not), makes every input take that long;
``FAKE_PIPELINE_INIT_LOG`` or the option ``init_log`` names a file where each instance logs
its pid, device and threads;
``FAKE_PIPELINE_STARTS`` names a file counting constructor calls, and
``FAKE_PIPELINE_FAIL_STARTS`` / ``FAKE_PIPELINE_HANG_STARTS`` (e.g. "2,3") make those calls raise / block;
``FAKE_PIPELINE_START_DELAY`` (seconds), or the option ``start_delay`` (for Ray actors), makes every
constructor call take that long;
the option ``crash_once`` names a file: the first constructor call to create it kills its process;
``FAKE_PIPELINE_BARRIER=path:N`` makes N constructors wait for each other (see wait_for_each_other);
``FAKE_PIPELINE_IMPORT_LOG`` names a file where every process that imports this module logs its pid;
``FAKE_PIPELINE_HOLD_AT_IMPORT`` has every process that imports it held at its exit (as UNKILLABLE);
``FAKE_PIPELINE_ENOSPC_AFTER=N`` makes each worker's saves fail with ENOSPC after N files.
``FAKE_PIPELINE_BUSY_LOG`` names a file where each predict() call logs, as it starts, its pid
and inputs (a JSON line): a test waits for it to know that a batch is in a worker's hands;
``FAKE_PIPELINE_GATE`` names a file that every predict() call then waits for (up to 10 minutes)
before it reads its inputs: a test creates it when the batches may go on (both also as the
options ``busy_log`` and ``gate``, for Ray actors).
A real PDF or TIFF (a ``.pdf``/``.tif``/``.tiff`` whose bytes start with ``%PDF`` or a TIFF
magic) is read through PaddleX's own ``ImageBatchSampler`` (imported only then: PaddleX takes
seconds to import), so that whatever replaces ``ImageBatchSampler.sample`` at run time (a
window of pages) applies here exactly as in a real pipeline: one result per page the sampler
yields, with its ``page_index`` and ``page_count``, the SHA-1 of the rendered image, and the
page's own text (a PDF page's text by pypdfium2, a TIFF frame's ``frame N``). For such a file
the steering words act per page, on the page's text, and the delay is per page.
``FAKE_PIPELINE_PRELOAD`` (or the option ``preload``) imports the sampler in the constructor
instead, for tests whose --task_timeout leaves no time for the import.
``FAKE_PIPELINE_PAGE_LOG`` (or the option ``page_log``) names a file where every page (or
image) processed is logged as a JSON line: pid, input, page_index, start and end (time.time()).
A fake ``.pdf``/``.tif``/``.tiff`` that is a text file yields one page per line that starts
with ``page``, at least one; any other input one result without a page index. Each result
records which process made it, so the tests can see the work spread over workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import multiprocessing.resource_tracker
import os
import re
import signal
import struct
import threading
import time
from pathlib import Path

PAGED = {".pdf", ".tif", ".tiff"}
MAGIC = (b"%PDF", b"II*\0", b"MM\0*")  # a real PDF, a real TIFF (little- or big-endian)
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
            handle.write(json.dumps({k: v for k, v in self.items() if k != "doc_preprocessor_res"}))

    def save_to_markdown(self, save_path: str) -> None:
        if not save_path.endswith(".md"):
            raise ValueError("FakeResult needs a .md path")
        scores = (f"scores: {self['rec_scores']}\noptions: {self.get('options')}\n"  # (which reading it is)
                  if "rec_scores" in self else "")
        Path(save_path).write_text(f"# {self['text']}\n{scores}", encoding="utf-8")
        if (self.get("options") or {}).get("side_files"):  # as PaddleX's writer adds a page's images
            images = Path(save_path).parent / "imgs"
            images.mkdir(exist_ok=True)
            (images / "logo.png").write_text("shared by every page")
            (images / f"{Path(save_path).stem}_fig.png").write_text(f"# {self['text']}\n{scores}", encoding="utf-8")

    @property
    def img(self) -> dict:
        from PIL import Image

        return {"vis": Image.new("RGB", (8, 8), "white")}


class PlainResult(FakeResult):
    """A result with JSON only, like pipelines whose results have no markdown or image form."""

    save_to_markdown = None  # type: ignore[assignment]
    img = None  # type: ignore[assignment]


SCORES = re.compile(rb"SCORES:(-|[0-9.,]+)")


def quality_fields(text: bytes, shift: float = 0.0, only: bytes = b"") -> dict:
    """What an OCR pipeline's result says of a page's quality, as the steering words ask."""
    fields: dict = {}
    shift = shift if only in text else 0.0
    if (found := SCORES.search(text)) is not None:
        scores = found.group(1).decode()
        fields["rec_scores"] = [] if scores == "-" else [min(1.0, float(x) + shift) for x in scores.split(",") if x]
    if b"BLANK" in text:
        import numpy

        fields["doc_preprocessor_res"] = {"output_img": numpy.full((16, 16, 3), 255, dtype=numpy.uint8)}
    elif "rec_scores" in fields:
        import numpy

        fields["doc_preprocessor_res"] = {"output_img": numpy.random.default_rng(1).integers(0, 255, (16, 16, 3))}
    return fields


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


def wait_for_each_other(barrier: str) -> None:
    """``FAKE_PIPELINE_BARRIER=path:N``: each constructor logs its pid in path and waits until N
    have (at most a minute), so that N workers become ready together and a test's timings
    measure the dispatch, not how staggered the workers' start-ups were."""
    path, _, count = barrier.rpartition(":")
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(Path(path).read_text(encoding="utf-8").splitlines()) < int(count):
        time.sleep(0.02)


def resident_mb() -> int:
    """This process's resident memory (as infer_mp.py's recycling reads it), in MB."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


def log_busy(inputs: list[str], busy_log: str | None, gate: str | None) -> None:
    """FAKE_PIPELINE_BUSY_LOG, then FAKE_PIPELINE_GATE (see the module's docstring)."""
    if busy_log:
        with open(busy_log, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(json.dumps({"pid": os.getpid(), "inputs": list(inputs)}) + "\n")
    wait_for_file(gate)


def claimed(path: str) -> bool:
    """Did this call create the file (and no other before it)?"""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def wait_for_file(path: str | None) -> None:
    """Until the file exists (a test's go-ahead), or 10 minutes."""
    deadline = time.monotonic() + 600
    while path and not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def descriptors(kind: str) -> list[int]:
    """This process's descriptors of one kind (`socket:`, `pipe:`), its standard streams aside."""
    found = []
    for fd in map(int, os.listdir("/proc/self/fd")):
        with contextlib.suppress(OSError):  # (the listing's own descriptor is gone by now)
            if fd > 2 and os.readlink(f"/proc/self/fd/{fd}").startswith(kind):
                found.append(fd)
    return found


def close_inherited(kind: str) -> None:
    for fd in descriptors(kind):
        os.close(fd)


def send_raw(data: bytes) -> None:
    """Write bytes as they are into this worker's pipe to the coordinator (its one socket)."""
    for fd in descriptors("socket:"):
        os.write(fd, data)


def fork_helper() -> None:
    """Fork a process that holds this one's descriptors (as a fork-based pool's worker does),
    but for its standard streams and multiprocessing's resource tracker's pipe (a test's pipes
    must end with the run, and the tracker holds them until its pipe ends), for 60 s; its pid
    is added to the file FAKE_PIPELINE_HELPER_PIDS names, for the test to end it."""
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        tracker = getattr(multiprocessing.resource_tracker._resource_tracker, "_fd", None)
        if tracker is not None:
            os.close(tracker)
        time.sleep(60)
        os._exit(0)
    with open(os.environ["FAKE_PIPELINE_HELPER_PIDS"], "a") as pids:
        pids.write(f"{pid}\n")


PTRACE_CONT, PTRACE_SEIZE, PTRACE_O_TRACEEXIT, PTRACE_EVENT_EXIT = 7, 0x4206, 0x40, 6
PR_SET_PTRACER, PR_SET_PTRACER_ANY = 0x59616D61, ctypes.c_ulong(-1)  # (Yama: a child may trace its parent)
WAIT_ALL_THREADS = 0x40000000  # __WALL


def hold_at_exit() -> None:
    """Fork a helper that traces this process (ptrace) and holds it at its exit: a SIGKILL
    then leaves it there, not yet exited (as a process inside a GPU driver call, or on a hung
    network filesystem, is when its kill comes) until the helper ends; its pid goes to the file
    FAKE_PIPELINE_HELPER_PIDS names, for the test to end it. Any other stop it lets go on.
    Raises RuntimeError where tracing is not permitted."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0)  # (EINVAL without Yama: nothing to allow)
    traced, (answer, told) = os.getpid(), os.pipe()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        for fd in descriptors("socket:") + descriptors("pipe:"):  # (the worker's pipes are its own to hold)
            if fd != told:
                os.close(fd)
        seized = libc.ptrace(PTRACE_SEIZE, traced, None, PTRACE_O_TRACEEXIT) == 0
        os.write(told, b"1" if seized else b"0")
        while seized:
            _, status = os.waitpid(traced, WAIT_ALL_THREADS)
            if not os.WIFSTOPPED(status):
                break
            if status >> 16 == PTRACE_EVENT_EXIT:
                time.sleep(600)  # held
                break
            libc.ptrace(PTRACE_CONT, traced, None, os.WSTOPSIG(status) if status >> 16 == 0 else 0)
        os._exit(0)
    with open(os.environ["FAKE_PIPELINE_HELPER_PIDS"], "a") as pids:
        pids.write(f"{pid}\n")
    seized = os.read(answer, 1) == b"1"
    os.close(answer)
    os.close(told)
    if not seized:
        raise RuntimeError("ptrace not permitted here: UNKILLABLE cannot hold the worker")


if os.environ.get("FAKE_PIPELINE_HOLD_AT_IMPORT"):
    hold_at_exit()


class FakePipeline:
    result_type = FakeResult

    def __init__(self, device: str | None = None, cpu_threads: int | None = None, **options):
        if os.environ.get("FAKE_PIPELINE_FAIL_INIT"):
            raise RuntimeError("fake pipeline refuses to start (FAKE_PIPELINE_FAIL_INIT)")
        start = count_start()
        if options.get("crash_once") and claimed(options["crash_once"]):
            os._exit(1)  # the first constructor to claim the file dies as it starts
        if str(start) in os.environ.get("FAKE_PIPELINE_FAIL_STARTS", "").split(","):
            raise RuntimeError(f"fake pipeline start {start} fails (FAKE_PIPELINE_FAIL_STARTS)")
        if str(start) in os.environ.get("FAKE_PIPELINE_HANG_STARTS", "").split(","):
            time.sleep(3600)
        time.sleep(float(options.get("start_delay", os.environ.get("FAKE_PIPELINE_START_DELAY", "0"))))
        self.device = device
        self.cpu_threads = cpu_threads
        self.options = options
        self.delay = float(options.get("delay", os.environ.get("FAKE_PIPELINE_DELAY", "0")))
        self.page_log = options.get("page_log", os.environ.get("FAKE_PIPELINE_PAGE_LOG"))
        self.busy_log = options.get("busy_log", os.environ.get("FAKE_PIPELINE_BUSY_LOG"))
        self.gate = options.get("gate", os.environ.get("FAKE_PIPELINE_GATE"))
        self.score_shift = float(options.get("score_shift", 0.0))
        self.shift_only = str(options.get("shift_only", "")).encode()
        self.raise_on = str(options.get("raise_on", "")).encode()
        self._sampler = None
        if options.get("preload", os.environ.get("FAKE_PIPELINE_PRELOAD")):
            self.sampler()
        if os.environ.get("FAKE_PIPELINE_BARRIER"):
            wait_for_each_other(os.environ["FAKE_PIPELINE_BARRIER"])
        if options.get("close_pipes"):
            close_inherited("pipe:")
        init_log = options.get("init_log", INIT_LOG)
        if init_log:
            with open(init_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "device": device, "cpu_threads": cpu_threads}) + "\n")

    def sampler(self):
        """PaddleX's ImageBatchSampler, made once per instance (PaddleX imported on first use)."""
        if self._sampler is None:
            from paddlex.inference.common.batch_sampler.image_batch_sampler import ImageBatchSampler

            self._sampler = ImageBatchSampler(batch_size=1)
        return self._sampler

    def log_page(self, path: str, page_index: int | None, start: float) -> None:
        if not self.page_log:
            return
        line = json.dumps({"pid": os.getpid(), "input": path, "page_index": page_index,
                           "start": start, "end": time.time()})
        with open(self.page_log, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(line + "\n")

    def steer(self, text: bytes, what: str) -> bool:
        """Act on the steering words in `text` (an input's bytes or a page's text); False
        when it is to yield no result."""
        if b"FORKCRASH" in text:  # killed (the OOM killer) while a process it forked holds its pipes
            fork_helper()
        if b"UNKILLABLE" in text:
            hold_at_exit()
        if b"HALFSEND" in text:
            fork_helper()
            send_raw(struct.pack("!i", 1000) + b"\x80\x04")  # a length, then 2 bytes of 1000
            os.kill(os.getpid(), signal.SIGKILL)
        if b"HALFSTALL" in text:
            send_raw(struct.pack("!i", 1000) + b"\x80\x04")
            time.sleep(5.5)
            send_raw(struct.pack("!i", 4) + b"junk")
            time.sleep(3600)
        if b"CRASH" in text:
            os.kill(os.getpid(), signal.SIGKILL)
        if b"RAISE" in text or (self.raise_on and self.raise_on in text):
            raise ValueError(f"cannot decode {what}")
        if b"HANG" in text:
            time.sleep(3600)
        if b"SEVER" in text:  # a library that closes the descriptors it inherited, then hangs
            close_inherited("socket:")
            if b"SEVERFORK" in text:
                fork_helper()
            time.sleep(3600)
        if b"UNPIPE" in text:
            threading.Timer(0.6, close_inherited, ("pipe:",)).start()
        if b"DOOM" in text:
            time.sleep(1.2)
            os.kill(os.getpid(), signal.SIGKILL)
        if b"DETACH" in text:  # the same, for pipes: the coordinator's sentinel of this process reads closed
            close_inherited("pipe:")
            time.sleep(3600)
        if b"WAIT" in text:
            wait_for_file(os.environ.get("FAKE_PIPELINE_WAIT_FILE"))
        if b"GROW" in text:
            grow_mb = int(os.environ.get("FAKE_PIPELINE_GROW_MB", "100"))
            _held_memory.append(bytearray(os.urandom(1)) * (grow_mb * 2**20))
        if b"EMPTY" in text:
            return False
        if self.delay:
            time.sleep(self.delay)
        return True

    def predict(self, inputs, **predict_options):
        if isinstance(inputs, str):
            inputs = [inputs]
        log_busy(inputs, self.busy_log, self.gate)
        results = []
        for path in inputs:
            common = {"input_path": path, "device": self.device, "pid": os.getpid(), "resident_mb": resident_mb(),
                      "cpu_threads": self.cpu_threads, "batch": len(inputs), "options": self.options,
                      "predict_options": predict_options}
            with open(path, "rb") as handle:
                head = handle.read(4)
            if Path(path).suffix.lower() in PAGED and head.startswith(MAGIC):
                results += self.predict_pages(path, head.startswith(b"%PDF"), common)
                continue
            start = time.time()
            data = Path(path).read_bytes()
            if not self.steer(data, f"input {os.path.basename(path)}"):
                continue
            common["text"] = data.decode("utf-8", "replace")
            common.update(quality_fields(data, self.score_shift, self.shift_only))
            if Path(path).suffix.lower() in PAGED:  # a text file posing as a PDF or TIFF
                lines = [line for line in data.splitlines() if line.startswith(b"page")]
                for index in range(max(1, len(lines))):
                    results.append(self.result_type(common, page_index=index))
            else:
                results.append(self.result_type(common, page_index=None))
            self.log_page(path, None, start)
        return results

    def predict_pages(self, path: str, is_pdf: bool, common: dict) -> list:
        """One result per page that ImageBatchSampler.sample yields for `path` (looked up on
        the class at each call: infer_mp may replace it to render a window of the pages)."""
        import pypdfium2

        sampler = self.sampler()
        results = []
        document = pypdfium2.PdfDocument(path) if is_pdf else None  # for the pages' text
        batches = sampler.sample([path])
        try:
            start = time.time()
            for batch in batches:
                for i, image in enumerate(batch.instances):
                    page_index, page_count = batch.page_indexes[i], batch.page_counts[i]
                    if document is not None:
                        page = document[page_index]
                        textpage = page.get_textpage()
                        text = textpage.get_text_range()
                        textpage.close()
                        page.close()
                    else:
                        text = f"frame {page_index}"
                    if self.steer(text.encode("utf-8"), f"page {page_index} of {os.path.basename(path)}"):
                        digest = hashlib.sha1(image.tobytes())
                        digest.update(repr(image.shape).encode())
                        fields = {**common, **quality_fields(text.encode("utf-8"), self.score_shift, self.shift_only)}
                        results.append(self.result_type(fields, input_path=batch.input_paths[i], page_index=page_index,
                                                        page_count=page_count, image_sha1=digest.hexdigest(),
                                                        image_shape=list(image.shape[:2]),
                                                        text=text))
                    self.log_page(path, page_index, start)
                    start = time.time()
        finally:
            # A generator left suspended would keep PaddleX's pdfium_lock, which the sampler
            # holds while it yields PDF pages: the next PDF would then block for ever.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            if document is not None:
                document.close()
        return results


class StrictPipeline(FakePipeline):
    """Explicit options only, so that a misspelled one can be caught before workers start."""

    result_type = PlainResult

    def __init__(self, device: str | None = None, cpu_threads: int | None = None, language: str = "en"):
        super().__init__(device, cpu_threads, language=language)

    def predict(self, inputs, *, flavor: str | None = None):
        return super().predict(inputs, flavor=flavor)


class SelfReadingPipeline(FakePipeline):
    """Reads a PDF itself, with pypdfium2, not through PaddleX's page reader: every page of it,
    whatever page range infer_mp.py wants (as many users' own pipelines do)."""

    def predict(self, inputs, **predict_options):
        return [result for path in inputs for result in self.read_pages(path, None)]

    def read_pages(self, path: str, window: tuple[int, int] | None) -> list:
        import pypdfium2

        if not path.lower().endswith(".pdf"):
            return FakePipeline.predict(self, [path])
        document = pypdfium2.PdfDocument(path)
        try:
            count = len(document)
            results = []
            for index in range(*(window or (0, count))):
                start = time.time()
                page = document[index]
                textpage = page.get_textpage()
                text = textpage.get_text_range()
                textpage.close()
                page.close()
                fields = quality_fields(text.encode("utf-8"), self.score_shift, self.shift_only)
                results.append(self.result_type({"input_path": path, "pid": os.getpid(), "options": self.options,
                                                 **fields}, page_index=index, page_count=count, text=text))
                self.log_page(path, index, start)
            return results
        finally:
            document.close()


class WindowedPipeline(SelfReadingPipeline):
    """The same, told the pages to read: a predict() that takes `page_windows` (path -> [start,
    stop) of the pages wanted) reads only those (the documented way, see README)."""

    def predict(self, inputs, page_windows=None, **predict_options):
        return [result for path in inputs for result in self.read_pages(path, (page_windows or {}).get(path))]
