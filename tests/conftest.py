"""Shared helpers: run infer_mp.py as a user would, in a subprocess, and read what it wrote."""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "infer_mp.py"
FAKE = f"{ROOT / 'tests' / 'fake_pipeline.py'}:FakePipeline"
OFFLINE_OCR = f"{ROOT / 'examples' / 'offline_ocr.py'}:OfflineOCR"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))


def pytest_configure(config: pytest.Config) -> None:
    """Long real-OCR runs are marked slow and left out unless asked for: `pytest -m slow`.
    (Kept here rather than in a pytest.ini, so the project's top level stays as asked.)"""
    config.addinivalue_line("markers", "slow: long real-OCR runs; run them with `python -m pytest -m slow`")
    if not config.option.markexpr:
        config.option.markexpr = "not slow"


TEST_TIMEOUT_SECONDS = 300  # a hung test fails alone, named, instead of holding CI until it is killed


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test gets a timeout (pytest-timeout), unless it names its own."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_SECONDS))


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120) -> Run:
    full_env = {**os.environ, "PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK": "True", **(env or {})}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, errors="surrogateescape", timeout=timeout,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def make_config(**overrides):
    """A validated command line, in process, for the tests of planning and device checks."""
    import infer_mp

    values = dict(pipeline="P", input_dir=Path("."), output_dir=Path("out"), device="cpu",
                  instances_per_device=1, batch_size=1, input_glob_patterns=("*",), cpu_threads=None,
                  run_log=Path("out/log.jsonl"), lock_file=Path("out/.lock"))
    values.update(overrides)
    return infer_mp.Config(**values)


def bare_backend():
    """A Backend with no worker started, for tests of its bookkeeping (queue, handings, deaths)."""
    from types import SimpleNamespace

    import infer_mp
    config = SimpleNamespace(batch_size=1, max_attempts=2, task_timeout=None, start_timeout=60.0)
    return infer_mp.Backend(infer_mp.WorkerOptions(pipeline=None), config)


def fake_args(src: Path, out: Path, *extra: str) -> list[str]:
    """The command line of a run of the model-free test pipeline on src -> out, on the CPU."""
    return ["--pipeline", FAKE, "--input_dir", str(src), "--device", "cpu", "--output_dir", str(out), *extra]


def run_fake(src: Path, out: Path, *extra: str, env: dict | None = None, **kwargs) -> Run:
    return run_cli(*fake_args(src, out, *extra), env=env, **kwargs)


def listen_to_stops() -> None:
    """In a child, before it runs: Ctrl-C and SIGTERM at their defaults, as a terminal starts a
    command (a pytest-xdist worker ignores SIGINT, which its children would inherit, and
    infer_mp.py leaves a stop signal ignored that was ignored when it started)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


class Background(subprocess.Popen):
    """A run of infer_mp.py in the background, in a process group of its own (as a terminal
    starts a command: os.killpg is the terminal's Ctrl-C), its stdout and stderr in files that a
    test can watch while it runs (wait_for_stderr). Killed, with whatever it started, when the
    test ends however it ends (see stop_background_runs)."""

    running: list[Background] = []

    def __init__(self, command: list[str], env: dict):
        self.logs = Path(tempfile.mkdtemp(prefix="infer_mp-test-"))
        with open(self.logs / "stdout", "wb") as stdout, open(self.logs / "stderr", "wb") as stderr:
            super().__init__(command, env=env, stdout=stdout, stderr=stderr, start_new_session=True,
                             preexec_fn=listen_to_stops)
        Background.running.append(self)

    def stdout_text(self) -> str:
        return (self.logs / "stdout").read_text(encoding="utf-8", errors="surrogateescape")

    def stderr_text(self) -> str:
        return (self.logs / "stderr").read_text(encoding="utf-8", errors="surrogateescape")

    def communicate(self, input=None, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end; (stdout, stderr) as text."""
        self.wait(timeout)
        return self.stdout_text(), self.stderr_text()

    def wait_for_stderr(self, text: str, timeout: float = 60.0) -> None:
        """Until `text` is on its stderr (a state the run has reached, not a time)."""
        wait_for(lambda: text in self.stderr_text() or self.poll() is not None, timeout)
        assert text in self.stderr_text(), f"{text!r} not said; stderr:\n{self.stderr_text()}"

    def signal_group(self, signum: int) -> None:
        """The signal to the whole process group, as a terminal sends Ctrl-C."""
        os.killpg(self.pid, signum)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.wait(60)
        shutil.rmtree(self.logs, ignore_errors=True)


ENVIRONMENT_AT_START = dict(os.environ)


@pytest.fixture(autouse=True)
def restore_environment():
    """What a test imports into this process does not reach later tests' runs: PaddleX, on
    import, sets LD_LIBRARY_PATH, AISTUDIO_LOG and Qt's paths in os.environ, which every
    run_cli after it would pass on."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def stop_background_runs():
    """No run a test started in the background outlives the test, whether it passed or not."""
    yield
    while Background.running:
        Background.running.pop().stop()


def start_fake(src: Path, out: Path, *extra: str, env: dict | None = None) -> Background:
    """The same run in the background, for tests that signal or race it."""
    return Background([sys.executable, str(SCRIPT), *fake_args(src, out, *extra)], {**os.environ, **(env or {})})


# A stand-in for the `paddle` module: only the device queries infer_mp.py makes, answered as a
# Paddle build with CUDA (and GPUS visible GPUs) or without it (GPUS None) would answer them.
FAKE_PADDLE = """\
import types

GPUS = {gpus!r}
__version__ = "0.0.0-fake"
device = types.SimpleNamespace(
    is_compiled_with_cuda=lambda: GPUS is not None,
    is_compiled_with_rocm=lambda: False,
    is_compiled_with_xpu=lambda: False,
    get_available_custom_device=lambda: [],
    cuda=types.SimpleNamespace(device_count=lambda: GPUS or 0),
)
"""


def fake_paddle(gpus: int | None) -> types.ModuleType:
    """The same stand-in, in this process (for infer_mp.import_paddle_quietly)."""
    module = types.ModuleType("paddle")
    exec(FAKE_PADDLE.format(gpus=gpus), module.__dict__)
    return module


def fake_onnxruntime(monkeypatch, available: list[str]) -> types.ModuleType:
    """An `onnxruntime` whose build has `available` providers, so that no test depends on the
    install; its sessions are made with InferenceSession(providers, cuda_options) and report
    them as ONNX Runtime's do."""
    module = types.ModuleType("onnxruntime")
    module.get_available_providers = lambda: list(available)

    class InferenceSession:
        def __init__(self, providers: list[str], cuda_options: dict | None = None):
            self.providers, self.cuda_options = providers, cuda_options

        def get_providers(self) -> list[str]:
            return self.providers

        def get_provider_options(self) -> dict:
            return {"CUDAExecutionProvider": self.cuda_options} if self.cuda_options else {}

    module.InferenceSession = InferenceSession
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    return module


def fake_paddle_env(folder: Path, gpus: int | None) -> dict[str, str]:
    """Environment for run_cli whose `import paddle` (coordinator and workers) finds the stand-in
    above, first on PYTHONPATH, so device checks see the same devices on every machine, GPU
    or not: gpus=None is a CPU-only build, gpus=N a CUDA build with N GPUs."""
    write(folder / "paddle" / "__init__.py", FAKE_PADDLE.format(gpus=gpus))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def pdf_escape(text: str) -> bytes:
    """`text` as the inside of a PDF literal string: backslash and parentheses escaped, line
    breaks written as escapes, Latin-1 (what Helvetica's standard encoding can show)."""
    for char, escaped in (("\\", "\\\\"), ("(", "\\("), (")", "\\)"), ("\r", "\\r"), ("\n", "\\n")):
        text = text.replace(char, escaped)
    return text.encode("latin-1", "replace")


def pdf_bytes(pages: list[str], size: tuple[int, int] = (60, 40)) -> bytes:
    """A minimal valid PDF, written by hand: one page of `size` points per string, showing it in
    the standard Helvetica font. The content streams are not compressed, so the file's bytes
    contain each page's text (what the fake pipeline's steering words are looked for in)."""
    width, height = size
    count = len(pages)
    font = 3 + 2 * count
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [%s] /Count %d >>"
               % (b" ".join(b"%d 0 R" % (3 + 2 * i) for i in range(count)), count)]
    for i, text in enumerate(pages):
        stream = b"BT /F1 8 Tf 2 %d Td (%s) Tj ET" % (max(2, height // 2 - 3), pdf_escape(text))
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Resources << /Font << /F1 %d 0 R >> >> "
                       b"/Contents %d 0 R >>" % (width, height, font, 4 + 2 * i))
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    data = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(data))
        data += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(data)
    data += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    data += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    data += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(data)


def tiff_bytes(count: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A real multi-page TIFF of `count` gray frames, each a different gray level (so that the
    frames render, and hash, differently)."""
    from PIL import Image

    frames = [Image.new("L", size, 255 - (i * 37) % 256) for i in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def make_inputs(src: Path, count: int, pdf_pages: int = 0) -> None:
    """`count` images p00.png, p01.png, ... (text files: the fake pipeline reads no pixels) and,
    with `pdf_pages`, a real PDF doc.pdf of that many pages."""
    for i in range(count):
        write(src / f"p{i:02d}.png", f"image {i}")
    if pdf_pages:
        write(src / "doc.pdf", pdf_bytes([f"page {i}" for i in range(pdf_pages)]))


def holds(path: Path, data: bytes) -> bool:
    """Does the file hold these bytes now? False while it is not there (a first run's check that
    its run log can be written makes the file, then removes it, before its workers start)."""
    try:
        return data in path.read_bytes()
    except FileNotFoundError:
        return False


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def write(path: Path, content: str | bytes = "content") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def outputs(folder: Path) -> dict[str, dict]:
    """Every JSON under folder, by path relative to it."""
    return {
        str(p.relative_to(folder)): json.loads(p.read_text(encoding="utf-8"))
        for p in sorted(folder.rglob("*.json")) if not staged(p.relative_to(folder))
    }


def staged(path: Path) -> bool:
    """In the staging folder (a relative path): written by a worker, not placed (see infer_mp.Ledger)."""
    return path.parts[0] == ".infer_mp.staging"


def page_files(folder: Path) -> list[str]:
    """The output JSON files (not the run log, the lock, hidden temporaries, or a folder named
    like one)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.json")
                  if not p.name.startswith(".") and not staged(p.relative_to(folder)) and p.is_file())


def temporaries(folder: Path) -> list[str]:
    """Files a worker wrote that were never placed: in the staging folder (see infer_mp.Ledger),
    or hidden temporaries beside the outputs (older versions)."""
    staged = [p for p in (folder / ".infer_mp.staging").rglob("*") if p.is_file()]
    return sorted(str(p.relative_to(folder)) for p in [*staged, *folder.rglob(".*.tmp.json")])


def run_log(folder: Path, runs: bool = False) -> list[dict]:
    """The run log's input records in order (with `runs`, also each run's closing line); not
    the `placing` records that precede a task's files (see infer_mp.Ledger)."""
    path = folder / "infer_mp.runlog.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r for r in records if (runs or "input" in r) and r.get("status") != "placing"]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(input folder, output folder) for one run."""
    return tmp_path / "in", tmp_path / "out"


def run_log_paths(folder: Path) -> list[Path]:
    """Every run log in the folder, the default one last (it wins a tie, as infer_mp.py reads)."""
    return sorted((log for log in folder.glob("infer_mp*.runlog.jsonl") if log.is_file()),  # (not a folder so named)
                  key=lambda log: (log.name == "infer_mp.runlog.jsonl", log.name))


def well_formed(record: object) -> bool:
    """An input record as infer_mp.py writes them (hand-edited ones are passed over, there too)."""
    return (isinstance(record, dict) and isinstance(record.get("input"), str)
            and all(isinstance(files, list) and all(isinstance(f, str) for f in files)
                    for files in (record.get("outputs"), record.get("extra_outputs") or [])))


def all_records(folder: Path, placing: bool = False) -> list[dict]:
    """Every input record of every run log in the folder (all shards), in the ledger's order:
    by generation ("gen", one more each run), records without one (older versions) first, by
    time; then by log and line. Each gets "_order"; `placing` records are left out, unless
    `placing` (then a batch's line gives one per input, as infer_mp.read_records does)."""
    records = []
    for index, log in enumerate(run_log_paths(folder)):
        lines = log.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        for number, line in enumerate(lines):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # a torn or hand-made line, as infer_mp.py passes over
                continue
            entries = [record]
            if placing and isinstance(record, dict) and isinstance(record.get("placing"), list):
                entries = [{**record, "input": entry[0], "outputs": entry[1], "extra_outputs": entry[2]}
                           for entry in record["placing"] if isinstance(entry, list) and len(entry) == 3]
            for entry in entries:
                if well_formed(entry) and (placing or entry.get("status") != "placing"):
                    gen = entry.get("gen") or 0
                    entry["_order"] = (gen, "" if gen else entry["time"], index, number)
                    records.append(entry)
    return sorted(records, key=lambda record: record["_order"])


def latest_records(folder: Path) -> dict[str, dict]:
    """The last whole record of each input (not a document's page-range records) over every
    run log in the folder (all shards)."""
    return {record["input"]: record for record in all_records(folder) if "range" not in record}


def held_outputs(folder: Path) -> dict[str, set[str]]:
    """The files each input's current records hold: those its last whole record lists (a done
    input's, or the good pages of a document with failed pages), those of its last done (or
    weak) record while the failure after it is of the same file version (or of a file that was not there),
    and those of the page ranges recorded since (a document a run did not finish); less the
    files that another input recorded or placed since (a name a gone input freed, taken by
    another; a compacted log may keep only the `placing` line that took it)."""
    records = all_records(folder)
    latest = latest_records(folder)
    last_done = {r["input"]: r for r in records  # (or a weak one: failed, its text kept)
                 if "range" not in r and (r["status"] == "done" or r.get("weak") is True or r.get("weak_pages"))}
    held: dict[str, set[str]] = {}
    for key, record in latest.items():
        held[key] = set(record["outputs"]) | set(record.get("extra_outputs") or [])
        done = last_done.get(key)
        if done is not None and done is not record and (
                record.get("size") is None
                or (record.get("size"), record.get("mtime_ns")) == (done.get("size"), done.get("mtime_ns"))):
            held[key] |= set(done["outputs"]) | set(done.get("extra_outputs") or [])
    for record in records:
        key = record["input"]
        if "range" in record and (key not in latest or record["_order"] > latest[key]["_order"]):
            held.setdefault(key, set()).update(record["outputs"], record.get("extra_outputs") or [])
    last_listed = {rel: record["input"] for record in all_records(folder, placing=True)
                   for rel in [*record["outputs"], *(record.get("extra_outputs") or [])]}
    return {key: {rel for rel in files if last_listed.get(rel, key) == key} for key, files in held.items()}


def assert_invariant(src: Path, out: Path, gone: tuple[str, ...] = (), killed: bool = False) -> None:
    """What must hold after any run, however it ended: every file a record holds exists (a
    current input's holds its own text), and every output JSON was written for exactly one
    current input (the one the fake pipeline names in it), from its current content (an
    image's), and that input holds it (see held_outputs). `gone`: names of inputs moved away on
    purpose, whose outputs are kept.
    `killed`: the run was just killed (kill -9), or could not write its run log: a task's files
    placed before its done record was written are not held yet, and its staging folder is left
    to the next run; the rest holds."""
    held = held_outputs(out)
    for key, names in held.items():
        for name in names:
            assert (out / name).is_file(), f"{name} of {key} is recorded done but missing"
            if name.endswith(".json") and Path(key).is_file() and not killed:  # (a current input's: its own text)
                source = json.loads((out / name).read_text(encoding="utf-8")).get("input_path") or ""
                assert src not in Path(source).parents or os.path.realpath(source) == os.path.realpath(key), \
                    f"{name}, which {key}'s record holds, has {source}'s text"
    for name in page_files(out):
        content = json.loads((out / name).read_text(encoding="utf-8"))
        source = Path(content["input_path"])
        if source.name in gone:
            continue
        assert source.is_file() and src in source.parents, f"{name} belongs to no current input"
        if content.get("page_index") is None and "text" in content:
            current = source.read_bytes().decode("utf-8", "replace")
            assert content["text"] == current, f"{name} holds an older version of {source.name}"
        if not killed:
            assert name in held.get(str(source), set()), f"{name} is not an output {source.name} is recorded with"
    if not killed:
        assert not temporaries(out)


def injected() -> dict[str, str]:
    """The environment that puts tests/injected/sitecustomize.py into every process of a run
    (it does nothing until one of its variables is set too)."""
    folder = str(ROOT / "tests" / "injected")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))}


class FaultyDisk:
    """A folder that fails as a full, read-only or forbidden disk would, in the runs given
    env(...) (see tests/injected/sitecustomize.py): no root and no mount, so these tests run
    the same on every machine, as root or not."""

    def __init__(self, path: Path):
        self.path = path

    def env(self, error: str, capacity: int | None = None, after: Path | None = None) -> dict[str, str]:
        """error: "ENOSPC" (full past `capacity` bytes), "EROFS" or "EACCES"; `after`: only
        once that file exists."""
        settings = {"folder": str(self.path), "error": error, "capacity": capacity,
                    "after": str(after) if after else None}
        return {**injected(), "FAULTY_DISK": json.dumps(settings)}

    def fill(self, size: int) -> None:
        write(self.path / "filler", b"\0" * size)


@pytest.fixture
def faulty_disk(tmp_path) -> FaultyDisk:
    (tmp_path / "disk").mkdir()
    return FaultyDisk(tmp_path / "disk")


MIN_SIMILARITY = 0.95  # real OCR against known text: character-level, whitespace removed


def similarity(expected: list[str], recognized: list[str]) -> float:
    truth, seen = "".join("".join(expected).split()), "".join("".join(recognized).split())
    return difflib.SequenceMatcher(None, truth, seen, autojunk=False).ratio()


def assert_text_matches(out: Path, truth: dict[str, list[str]]) -> None:
    results = outputs(out)
    assert sorted(results) == sorted(truth)
    for name, lines in truth.items():
        score = similarity(lines, results[name]["rec_texts"])
        assert score >= MIN_SIMILARITY, (name, lines, results[name]["rec_texts"], score)
