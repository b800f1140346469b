"""Crash torture: change the input folder at random, run infer_mp.py (killing the coordinator or
a worker at a random instant, or not), and check after every run that each output belongs to
exactly one input's record and holds that input's current text.

    python tests/torture.py --rounds 200 --seed 7 [--keep DIR] [--shards] [--wide]

With --shards every round runs shards 0/2 and 1/2 at once, each killed or not on its own, and so
does the last round: shards that always overlap must leave the folder as a run over all inputs does.

With --wide the rounds also do what users do beside kill -9s (a seed's rounds without --wide are
unchanged): graceful stops (SIGTERM or Ctrl-C to the coordinator, or Ctrl-C to its process group
as a terminal sends it, sometimes twice: exit 143/130, or the work's own code if it was over);
failing inputs (an image whose content holds RAISE fails; a PDF with one such page fails that
page, its good pages kept), which change from failing to good and back; some runs with
--overwrite or --retry_failed, or --save markdown; inputs in subfolders under --recursive (every
run while a subfolder holds an input), moved between folders, a subfolder renamed or deleted.
What must hold, from README.md ("Exit codes", "Outputs") and docs/runs.md ("Run log and resume",
"Stopping", "What happens when...") and docs/big-documents.md ("A bad page costs a page"):
- a run stopped gracefully (130/143) leaves the full invariant but (f): "whatever an unfinished
  input had written is removed (so the output folder only ever holds complete inputs)"; an input
  it did not reach may keep its older version's outputs under its older record (as after a kill);
- a --retry_failed run does only the inputs whose last record failed: the same relief;
- a failed input's record lists its good pages (a failing image: none), each holding the current
  version's text; nothing of an older version under its names ("when a *changed* input fails
  (for any reason), its old file's outputs" are retired); (f) asks for its good pages only;
- exit code 1 only while a current input fails; a plain run that meets a version made failing
  this round, or an --overwrite run with any failing input, exits 1 ("Exit codes");
- --save markdown: its files are listed by the records too (extra_outputs), and each holds the
  text of its page's current version (or is a gone input's, unchanged);
- a graceful stop leaves no process of the run behind ("no worker left running").

The changes follow from the seed alone; the kills land at random instants, so a seed that failed
may need a few tries to fail again. Every input's content embeds a unique version ("v17 scan.png",
"v18 doc.pdf p2"), so that stale text is told from current.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import held_outputs, latest_records, pdf_bytes, start_fake, write  # noqa: E402

IMAGES = (".png", ".jpg")
TYPES = (*IMAGES, ".pdf")
STEMS = ("scan", "doc", "page", "a")
TAILS = ("a", "0", "1", "2")  # scan_a.png beside scan.png, doc_1.png beside doc.pdf
MAX_INPUTS = 8
RUN_TIMEOUT = 60.0
Content = str | tuple[str, ...]  # an image's text, or a PDF's page texts
Problem = tuple[str, str]  # (a file under out/, or an input, or "": what is wrong)


class Violation(AssertionError):
    pass


@dataclass
class World:
    """The folders, and what each input (by path relative to in/) holds now."""

    root: Path
    rng: random.Random
    inputs: dict[str, Content] = field(default_factory=dict)
    gone: dict[str, dict[str, bytes]] = field(default_factory=dict)  # deleted input -> its outputs then
    history: list[str] = field(default_factory=list)
    version: int = 0
    shards: bool = False  # every run is two shards at once (see run_round)
    wide: bool = False  # --wide: stops, failing inputs, --overwrite/--retry_failed, subfolders, --save
    versions: dict[str, list[Content]] = field(default_factory=dict)  # (wide) every content a path held
    fresh: set[str] = field(default_factory=set)  # (wide) inputs given new content this round

    def __post_init__(self) -> None:
        self.src, self.out = self.root / "in", self.root / "out"

    def key(self, rel: str) -> str:
        """An input as the run log and the outputs name it."""
        return str(self.src / rel)


# -- changes to the inputs: each returns what it did, or None when it does not apply -------------


FAIL = "RAISE"  # the fake pipeline's predict() raises on an input, or a PDF's page, holding it


def failing(content: Content) -> bool:
    return any(FAIL in text for text in ((content,) if isinstance(content, str) else content))


def put(w: World, rel: str, pages: int = 1, fail: bool | None = None) -> str:
    """Give `rel` new content (a PDF: of `pages` pages); it is an input again if it was gone.
    With --wide, a fifth of the versions fail (`fail` None) or as `fail` says: an image's text
    holds RAISE, or one page of a PDF's."""
    w.version += 1
    if w.wide and fail is None:
        fail = w.rng.random() < 0.2
    bad = w.rng.randrange(pages) if fail and rel.endswith(".pdf") else None
    mark = f" {FAIL}" if fail else ""
    if rel.endswith(".pdf"):
        w.inputs[rel] = tuple(f"v{w.version} {rel} p{i}{mark if i == bad else ''}" for i in range(pages))
        write(w.src / rel, pdf_bytes(list(w.inputs[rel])))
    else:
        w.inputs[rel] = f"v{w.version} {rel}{mark}"
        write(w.src / rel, w.inputs[rel])
    w.gone.pop(rel, None)
    if w.wide:
        w.versions.setdefault(rel, []).append(w.inputs[rel])
        w.fresh.add(rel)
    failed = (f", page {bad} fails" if bad is not None else ", fails") if fail else ""
    return f"{rel} (v{w.version}{f', {pages} pages' if rel.endswith('.pdf') else ''}{failed})"


def forget(w: World, rel: str) -> None:
    """`rel` is no input any more: note its outputs, which must stay as they are."""
    w.inputs.pop(rel)
    w.gone[rel] = {name: (w.out / name).read_bytes() for name, data in json_outputs(w.out).items()
                   if isinstance(data, dict) and data.get("input_path") == w.key(rel)}
    if w.wide:  # (its --save files too)
        w.gone[rel].update({name: (w.out / name).read_bytes() for name in held_outputs(w.out).get(w.key(rel), ())
                            if (w.out / name).is_file()})


def pick(w: World) -> str | None:
    return w.rng.choice(sorted(w.inputs)) if w.inputs else None


FOLDERS = ("", "", "", "sub", "x", "scan", "sub/deep")  # (wide) where an input goes ("scan/" beside scan.png)


def folder_of(rel: str) -> str:
    return str(Path(rel).parent) if "/" in rel else ""


def within(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def free(w: World, stem: str, suffixes: tuple[str, ...], folder: str = "") -> str | None:
    """`stem` and a suffix drawn from `suffixes`, in `folder`, when no input (nor a folder) has
    that name; None for an empty stem."""
    name = within(folder, stem + w.rng.choice(suffixes))
    return name if stem and name not in w.inputs and not (w.src / name).is_dir() else None


def add(w: World) -> str | None:
    """A new input (with --wide, in a folder drawn from FOLDERS)."""
    folder = w.rng.choice(FOLDERS) if w.wide else ""
    rel = free(w, w.rng.choice(STEMS), (*IMAGES, *TYPES), folder)
    return rel and "add " + put(w, rel, w.rng.randint(1, 6))


def change(w: World) -> str | None:
    """An image's new text, or a PDF rewritten longer or shorter."""
    rel = pick(w)
    if rel is None:
        return None
    counts = [n for n in range(1, 7) if not rel.endswith(".pdf") or n != len(w.inputs[rel])]
    return "rewrite " + put(w, rel, w.rng.choice(counts))


def add_twin(w: World) -> str | None:
    """A look-alike name: scan.jpg or scan.pdf beside scan.png; scan_a.png beside scan.png;
    doc_1.png beside doc.pdf; scan.png beside scan_a.png. In the folder of the input it is a twin of."""
    rel = pick(w)
    if rel is None:
        return None
    stem = Path(rel).stem
    twin = free(w, w.rng.choice([stem, f"{stem}_{w.rng.choice(TAILS)}", stem.rpartition("_")[0]]), TYPES,
                folder_of(rel))
    return twin and f"add {put(w, twin, w.rng.randint(1, 3))} beside {rel}"


def move(w: World, moves: dict[str, str]) -> None:
    """Inputs renamed (old -> new), on disk already."""
    for old, new in moves.items():
        w.inputs[new] = w.inputs[old]
        if w.wide:
            w.versions.setdefault(new, []).append(w.inputs[old])
        w.gone.pop(new, None)
    for old in moves:
        if old not in moves.values():
            forget(w, old)


def rename(w: World) -> str | None:
    """An input renamed in its folder (with --wide, three times in ten into one from FOLDERS)."""
    rel = pick(w)
    folder = w.rng.choice(FOLDERS) if w.wide and w.rng.random() < 0.3 else folder_of(rel or "")
    new = rel and free(w, w.rng.choice(STEMS) + w.rng.choice(("", *(f"_{t}" for t in TAILS))),
                       (Path(rel).suffix,), folder)
    if not new:
        return None
    (w.src / new).parent.mkdir(parents=True, exist_ok=True)
    (w.src / rel).rename(w.src / new)
    move(w, {rel: new})
    return f"rename {rel} -> {new}"


def delete(w: World) -> str | None:
    rel = pick(w)
    if rel:
        (w.src / rel).unlink()
        forget(w, rel)
    return rel and f"delete {rel}"


GROWING = {add: 4, add_twin: 4}
STEADY = {change: 4, rename: 2, delete: 2}

# -- --wide: subfolders, failing inputs ---------------------------------------------------------

RENAMED = ("sub", "x", "y", "scan", "sub/deep", "x/sub", "y/deep")  # what a subfolder is renamed to


def toggle(w: World) -> str | None:
    """A failing input rewritten good, or a good one failing (a PDF keeps its page count)."""
    rel = pick(w)
    if rel is None:
        return None
    content = w.inputs[rel]
    now = "mend" if failing(content) else "break"
    return f"{now} " + put(w, rel, len(content) if isinstance(content, tuple) else 1, fail=not failing(content))


def folders(w: World) -> list[str]:
    """The subfolders that hold an input (at any depth)."""
    found = set()
    for rel in w.inputs:
        parts = Path(rel).parts[:-1]
        found.update("/".join(parts[:n]) for n in range(1, len(parts) + 1))
    return sorted(found)


def rename_folder(w: World) -> str | None:
    if not (held := folders(w)):
        return None
    old, new = w.rng.choice(held), w.rng.choice(RENAMED)
    if (w.src / new).exists() or new == old or new.startswith(old + "/") or (w.src / new).parent.is_file():
        return None
    (w.src / new).parent.mkdir(parents=True, exist_ok=True)
    (w.src / old).rename(w.src / new)
    move(w, {rel: new + rel[len(old):] for rel in sorted(w.inputs) if rel.startswith(old + "/")})
    return f"rename folder {old}/ -> {new}/"


def delete_folder(w: World) -> str | None:
    if not (held := folders(w)):
        return None
    old = w.rng.choice(held)
    shutil.rmtree(w.src / old)
    for rel in sorted(w.inputs):
        if rel.startswith(old + "/"):
            forget(w, rel)
    return f"delete folder {old}/"


WIDE_GROWING = {add: 4, add_twin: 3}
WIDE_STEADY = {change: 4, toggle: 2, rename: 2, delete: 2, rename_folder: 1, delete_folder: 1}


def mutate(w: World) -> list[str]:
    """One to three changes (with MAX_INPUTS inputs, none that adds one)."""
    w.fresh.clear()
    growing, steady = (WIDE_GROWING, WIDE_STEADY) if w.wide else (GROWING, STEADY)
    moves = steady if len(w.inputs) >= MAX_INPUTS else {**growing, **steady}
    done = []
    for _ in range(w.rng.randint(1, 3)):
        while not (what := w.rng.choices(list(moves), list(moves.values()))[0](w)):
            pass
        done.append(what)
    return done


# -- processes -----------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, from /proc; None if there is none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process below `root`."""
    table = {int(e): s for e in os.listdir("/proc") if e.isdigit() and (s := proc_stat(int(e)))}
    found, parents = {}, [root]
    while parents:
        parent = parents.pop()
        for pid, (ppid, _, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                parents.append(pid)
    return found


def alive(pid: int, start: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[2] == start and stat[1] not in "ZX"


def is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Run:
    """infer_mp.py in the background; once left, every process it started is gone."""

    def __init__(self, w: World, flags: list[str], delay: float, log: str = "infer_mp.runlog.jsonl"):
        env = {"FAKE_PIPELINE_DELAY": str(delay), "PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK": "True"}
        self.log = w.out / log
        self.logged = self.log_lines()
        self.process = start_fake(w.src, w.out, *flags, env=env)
        self.seen: dict[int, int] = {}

    def log_lines(self) -> int:
        """(A run probes a log that is not there yet by creating it and removing it again: see
        infer_mp.probe_run_log.)"""
        try:
            return self.log.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def running_after(self, records: int, seconds: float) -> bool:
        """Wait until it has logged `records` more lines, then `seconds`; still running?"""
        deadline, scanned = None, 0.0
        while self.process.poll() is None and (deadline is None or time.monotonic() < deadline):
            if deadline is None and self.log_lines() >= self.logged + records:
                deadline = time.monotonic() + seconds
            if time.monotonic() - scanned > 0.1:  # (kill_coordinator looks again, the process stopped)
                self.seen.update(descendants(self.process.pid))
                scanned = time.monotonic()
            time.sleep(0.01)
        return self.process.poll() is None

    def kill_coordinator(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)  # it starts no process from now on
        self.seen.update(descendants(self.process.pid))
        self.process.kill()
        self.process.wait()

    def stop(self, signum: int, group: bool) -> None:
        """A graceful stop: the signal to the coordinator (`kill`), or to its process group (a
        terminal's Ctrl-C)."""
        self.seen.update(descendants(self.process.pid))
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.process.pid, signum)
            else:
                os.kill(self.process.pid, signum)

    def left_behind(self, seconds: float) -> list[int]:
        """Processes of the run still alive `seconds` after it ended."""
        deadline = time.monotonic() + seconds
        while (left := [pid for pid, start in self.seen.items() if alive(pid, start)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def kill_worker(self, choice: float) -> int | None:
        """SIGKILL one of its workers (not Python's resource tracker): the one `choice` (0-1) picks."""
        workers = sorted(pid for pid in descendants(self.process.pid) if is_worker(pid))
        victim = workers[int(choice * len(workers))] if workers else None
        if victim:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        return victim

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.kill_coordinator()
        self.process.communicate()
        deadline = time.monotonic() + 10
        while left := [pid for pid, start in self.seen.items() if alive(pid, start)]:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            assert time.monotonic() < deadline, f"processes left behind: {left}"
            time.sleep(0.02)


@dataclass
class Outcome:
    what: str
    killed: bool = False  # the coordinator: the run did not end by itself
    problem: str | None = None  # a run not killed must end, with exit code 0 (falsy: it did)
    partial: bool = False  # (wide) it ended well but did not do every input: stopped gracefully, --retry_failed


@dataclass
class Expect:
    """(wide) What a run's exit code may be, when it ends by itself: 1 only while a current input
    fails; 1 for sure where `must_fail` (a plain run meeting a version made failing this round,
    an --overwrite run with a failing input)."""

    may_fail: bool = False
    must_fail: bool = False


def plan_kill(rng: random.Random, pages: int, delay: float) -> tuple[str, int, float]:
    """Whom to kill ("none", "coordinator", "worker"), once the run has logged how many more
    lines, and how many seconds after: a third at any instant from the start (the first output
    comes after ~1.5 s), the rest once work is under way."""
    target = rng.choices(("none", "coordinator", "worker"), (3, 5, 2))[0]
    if rng.random() < 1 / 3:
        return target, 0, rng.uniform(0.5, 1.8 + pages * delay)
    return target, rng.randint(1, 3), rng.uniform(0, 2 * delay)


def plan_stop(rng: random.Random, pages: int, delay: float) -> tuple[str, int, float]:
    """(wide) plan_kill, or a graceful stop: "term" (SIGTERM to the coordinator), "int" (SIGINT
    to it), "ctrl-c" (SIGINT to its process group), each "...2" when a second one follows."""
    target = rng.choices(("none", "coordinator", "worker", "term", "int", "ctrl-c"), (3, 3, 2, 3, 1, 2))[0]
    if target in ("term", "int", "ctrl-c") and rng.random() < 0.3:
        target += "2"
    if rng.random() < 1 / 3:
        return target, 0, rng.uniform(0.5, 1.8 + pages * delay)
    return target, rng.randint(1, 3), rng.uniform(0, 2 * delay)


def run_round(w: World, kill: bool = True) -> Outcome:
    """One run, or with --shards two at once (shards 0/2 and 1/2), each maybe killed."""
    rng = w.rng
    flags = ["--batch_size", str(rng.choice((1, 2)))]
    flags += ["--instances_per_device", "2"] if rng.random() < 0.5 else []
    flags += ["--pages_per_task", "2"] if rng.random() < 0.5 else []
    delay = rng.choice((0.05, 0.1, 0.2))
    pages = sum(len(c) if isinstance(c, tuple) else 1 for c in w.inputs.values())
    shards = [f"{index}/2" for index in range(2)] if w.shards else [None]
    expect = None
    if w.wide:
        mode = rng.choices(("", "--overwrite", "--retry_failed"), (8, 1, 1))[0] if kill else ""
        flags += [mode] if mode else []
        flags += ["--save", "markdown"] if rng.random() < 0.3 else []
        flags += ["--recursive"] if folders(w) or rng.random() < 0.5 else []
        failing_now = [rel for rel, content in w.inputs.items() if failing(content)]
        # (Not with shards, where the input may be the other shard's; not on the last round, which
        # changed nothing; --retry_failed does no input whose last record is done.)
        must_fail = (mode == "--overwrite" and failing_now) or (not mode and set(failing_now) & w.fresh)
        expect = Expect(may_fail=bool(failing_now), must_fail=kill and not w.shards and bool(must_fail))
        plans = [(plan_stop(rng, pages, delay) if kill else ("none", 0, 0.0), rng.random()) for _ in shards]
    else:
        plans = [(plan_kill(rng, pages, delay) if kill else ("none", 0, 0.0), rng.random()) for _ in shards]
    outcomes = []
    with contextlib.ExitStack() as stack:
        runs = []
        for shard in shards:
            extra, log = (("--shard", shard), f"infer_mp.shard-{shard.replace('/', '-of-')}.runlog.jsonl") \
                if shard else ((), "infer_mp.runlog.jsonl")
            runs.append((stack.enter_context(Run(w, [*flags, *extra], delay, log)), " ".join([*flags, *extra])))
        for (run, named), plan in zip(runs, plans):
            outcomes.append(end_run(run, f"run {named}, delay {delay} s", *plan, expect=expect))
    if expect is not None and expect.must_fail and not any(o.killed or o.partial for o in outcomes) \
            and not any(o.problem for o in outcomes) and all(o.what.endswith("-> exit 0") for o in outcomes):
        outcomes.append(Outcome("", problem="the run exited 0, though an input failed in it (exit code 1 expected)"))
    partial = "--retry_failed" in flags
    return Outcome("; ".join(outcome.what for outcome in outcomes if outcome.what),
                   killed=any(o.killed for o in outcomes),
                   problem=next((o.problem for o in outcomes if o.problem), None),
                   partial=partial or any(o.partial for o in outcomes))


STOPS = {"term": (signal.SIGTERM, False, 143), "int": (signal.SIGINT, False, 130), "ctrl-c": (signal.SIGINT, True, 130)}


def end_run(run: Run, what: str, kill: tuple[str, int, float], choice: float, expect: Expect | None = None) -> Outcome:
    """Kill its coordinator or a worker as planned (see plan_kill), or stop it (see plan_stop),
    and wait for its end."""
    target, records, at = kill
    when = f"{at:.2f} s after {f'{records} new record(s)' if records else 'its start'}"
    stopped = None
    if target != "none" and run.running_after(records, at):
        if target == "coordinator":
            run.kill_coordinator()
            return Outcome(f"{what}, coordinator killed {when}", killed=True)
        if target.rstrip("2") in STOPS:
            stopped = STOPS[target.rstrip("2")]
            run.stop(*stopped[:2])
            what += f", {target.rstrip('2')} {when}"
            if target.endswith("2"):
                gap = choice * 1.5
                time.sleep(gap)
                if run.process.poll() is None:
                    run.stop(*stopped[:2])
                    what += f", again {gap:.2f} s later"
        else:
            worker = run.kill_worker(choice)
            what += f", worker {worker} killed {when}" if worker else f", no worker left to kill {when}"
    try:
        _, stderr = run.process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return Outcome(f"{what}, hung", killed=True, problem=f"the run did not end in {RUN_TIMEOUT} s")
    code = run.process.returncode
    what += f" -> exit {code}"
    if code == 3 and "worker" in target and "killed" in what and "while starting" in stderr:  # the only
        return Outcome(what, killed=expect is None, partial=True)  # worker(s), killed as they started (not retried)
    if expect is None:
        return Outcome(what, problem=code and f"the run exited {code}:\n{stderr.strip()[-1500:]}")
    if stopped and code == -stopped[0]:  # (during Python's own start-up, before the script's first line)
        return Outcome(what + " (stopped before its script ran)", killed=True)
    problem = None
    if stopped and code == stopped[2]:
        left = run.left_behind(3.0)
        problem = left and f"processes of the run alive 3 s after it stopped: {left}"
        return Outcome(what, problem=problem, partial=True)
    if code not in ((0, 1) if expect.may_fail else (0,)):
        problem = f"the run exited {code}{' (no current input fails)' if code == 1 else ''}:\n{stderr.strip()[-1500:]}"
    return Outcome(what, problem=problem)


# -- the invariant -------------------------------------------------------------------------------


def visible(out: Path, pattern: str) -> list[Path]:
    return sorted(p for p in out.rglob(pattern) if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(out).parts))


def json_outputs(out: Path) -> dict[str, dict]:
    """Every non-hidden JSON under out: its content ({} if it does not parse as an object)."""
    found = {}
    for path in visible(out, "*.json"):
        try:
            found[str(path.relative_to(out))] = dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            found[str(path.relative_to(out))] = {}
    return found


def expected_text(content: Content, page: object) -> str:
    """What an output of this page (None: an image's) of an input with this content must hold."""
    if isinstance(content, str):
        if FAIL in content:
            return f"nothing (the image fails: {content!r})"
        return repr(content) if page is None else f"nothing (an image has no page {page})"
    if isinstance(page, int) and 0 <= page < len(content):
        return f"nothing (page {page} fails: {content[page]!r})" if FAIL in content[page] else repr(content[page])
    return f"nothing (page {page} of a {len(content)}-page PDF)"


def pending(w: World) -> set[str]:
    """(wide) Inputs whose last whole record is not of their current file (or that have none): a
    run stopped before it reached them, or a --retry_failed run, left their older outputs."""
    latest = latest_records(w.out)
    found = set()
    for rel in w.inputs:
        stat, record = (w.src / rel).stat(), latest.get(w.key(rel))
        if record is None or (record.get("size"), record.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
            found.add(rel)
    return found


def allowed(w: World, rel: str, page: object, stale: set[str]) -> list[str]:
    """What an output of `rel`'s page may hold: its current version's text, or, where `rel` is
    pending (see pending), any of its versions'."""
    versions = w.versions.get(rel, []) if rel in stale else []
    return [expected_text(w.inputs[rel], page), *(expected_text(v, page) for v in versions)]


def owner_problems(w: World, held: dict[str, set[str]]) -> list[Problem]:
    """(a): every file but the run logs is listed by exactly one input's record."""
    owners: dict[str, list[str]] = {}
    for key, names in held.items():
        for name in names:
            owners.setdefault(name, []).append(os.path.relpath(key, w.src))
    return [(name, f"(a) listed by {len(owners.get(name, []))} input(s)' records {owners.get(name, [])}")
            for name in (str(p.relative_to(w.out)) for p in visible(w.out, "*"))
            if not (name.startswith("infer_mp") and name.endswith(".runlog.jsonl")) and len(owners.get(name, [])) != 1]


def content_problems(w: World, held: dict[str, set[str]], outputs: dict[str, dict],
                     stale: set[str] = frozenset()) -> list[Problem]:
    """(b) an input's output holds its current text (or, for an input in `stale`, one of its
    versions') and is listed by its record; (e) a deleted input's is as it was, and still listed."""
    problems = []
    for name, data in outputs.items():
        rel = os.path.relpath(data["input_path"], w.src) if "input_path" in data else None
        listed = name in held.get(str(data.get("input_path")), ())
        if rel in w.inputs:
            want = expected_text(w.inputs[rel], data.get("page_index"))
            if repr(data.get("text")) not in allowed(w, rel, data.get("page_index"), stale):
                problems.append((name, f"(b) of {rel}: holds {data.get('text')!r}, should hold {want}"))
            if not listed:
                problems.append((name, f"(b) of {rel}, whose record lists {sorted(held.get(w.key(rel), ()))}"))
        elif rel in w.gone:
            if w.gone[rel].get(name) != (w.out / name).read_bytes():
                problems.append((name, f"(e) of deleted {rel}, changed since (was: {w.gone[rel].get(name)!r})"))
            if not listed:
                problems.append((name, f"(e) of deleted {rel}, which its record does not list"))
        else:
            problems.append((name, f"(b) of no current or deleted input: {rel}"))
    return problems


def leftover_problems(w: World) -> list[Problem]:
    """(d): no temporary, no staged file."""
    return [(str(p.relative_to(w.out)), "(d) a temporary left behind") for p in w.out.rglob("*")
            if ".tmp" in p.name or (p.name == ".infer_mp.staging" and p.is_dir() and any(p.iterdir()))]


def markdown_problems(w: World, held: dict[str, set[str]], stale: set[str]) -> list[Problem]:
    """(wide) --save markdown's files: each holds its page's text (see content_problems); a
    deleted input's is as it was. (Whose it is: the record listing it, see owner_problems.)"""
    owner = {name: os.path.relpath(key, w.src) for key, names in held.items() for name in names}
    problems = []
    for path in visible(w.out, "*.md"):
        name = str(path.relative_to(w.out))
        rel = owner.get(name)
        if rel in w.inputs:
            page = None
            if isinstance(w.inputs[rel], tuple):
                found = re.search(r"_(\d+)\.md$", name)
                page = int(found.group(1)) if found else "?"
            text = path.read_text(encoding="utf-8", errors="replace")
            want = allowed(w, rel, page, stale)
            if not any(text == f"# {ast.literal_eval(option)}\n" for option in want if option.startswith(("'", '"'))):
                problems.append((name, f"(b) of {rel}: holds {text!r}, should hold # {want[0]}"))
        elif rel in w.gone and w.gone[rel].get(name) != path.read_bytes():
            problems.append((name, f"(e) of deleted {rel}, changed since (was: {w.gone[rel].get(name)!r})"))
    return problems


def completeness_problems(w: World, held: dict[str, set[str]], outputs: dict[str, dict]) -> list[Problem]:
    """(f): after a run that ended by itself, every input's record lists each of its pages (that
    does not fail)."""
    problems = []
    for rel, content in sorted(w.inputs.items()):
        pages = sorted(str(outputs.get(name, {}).get("page_index", "?")) for name in held.get(w.key(rel), ())
                       if name.endswith(".json"))
        want = sorted(str(i) for i in range(len(content)) if FAIL not in content[i]) if isinstance(content, tuple) \
            else [] if FAIL in content else ["None"]
        if pages != want:
            problems.append((rel, f"(f) its record lists pages {pages}, not {want}"))
    return problems


def check(w: World, full: bool, partial: bool = False) -> list[Problem]:
    """(c) every file a record lists exists; when `full` (the run ended by itself), (a)-(f);
    `partial` (wide: a graceful stop, --retry_failed): not (f), and the inputs the run did not
    redo may keep an older version's outputs (see pending)."""
    held = held_outputs(w.out)
    problems = [(name, f"(c) listed by {key}'s record but missing") for key, names in held.items()
                for name in sorted(names) if not (w.out / name).is_file()]
    if full:
        outputs = json_outputs(w.out)
        stale = pending(w) if partial else set()
        problems += owner_problems(w, held) + content_problems(w, held, outputs, stale)
        problems += leftover_problems(w) + ([] if partial else completeness_problems(w, held, outputs))
        problems += markdown_problems(w, held, stale) if w.wide else []
    return problems


def describe(w: World, seed: int, round_: int, problems: list[Problem]) -> str:
    lines = [f"torture: invariant violated: seed {seed}, round {round_} (folders in {w.root})"]
    for name in dict.fromkeys(name for name, _ in problems):
        lines += [f"  {name or 'the run'}:", *(f"    {problem}" for at, problem in problems if at == name)]
        if name and (w.out / name).is_file():
            lines.append(f"    content: {(w.out / name).read_text(errors='replace')[:400]}")
    lines.append("inputs now: " + "; ".join(f"{rel} = {content!r}" for rel, content in sorted(w.inputs.items())))
    return "\n".join([*lines, "history:", *("  " + line for line in w.history)])


def torture(seed: int, rounds: int, root: Path, say=print, shards: bool = False, wide: bool = False) -> None:
    """`rounds` rounds of change, run (maybe killed) and check in `root`, then one run to the
    end with no change and no kill; raises Violation with the story so far."""
    w = World(root.resolve(), random.Random(seed), shards=shards, wide=wide)
    w.src.mkdir(parents=True, exist_ok=True)
    for round_ in range(rounds + 1):
        changes = mutate(w) if round_ < rounds else []
        outcome = run_round(w, kill=round_ < rounds)
        w.history.append(f"round {round_}: {'; '.join(changes) or 'no change'} | {outcome.what}")
        say(w.history[-1])
        problems = [("", outcome.problem)] if outcome.problem else []
        problems += check(w, full=not outcome.killed, partial=outcome.partial)
        if problems:
            raise Violation(describe(w, seed, round_, problems))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--keep", type=Path, help="leave the input and output folders in KEEP/seed-N")
    parser.add_argument("--shards", action="store_true", help="every run: shards 0/2 and 1/2 at once")
    parser.add_argument("--wide", action="store_true", help="also graceful stops, failing inputs, --overwrite, "
                        "--retry_failed, subfolders under --recursive, --save markdown (see above)")
    args = parser.parse_args()
    root = args.keep / f"seed-{args.seed}" if args.keep else Path(tempfile.mkdtemp(prefix="torture-"))
    shutil.rmtree(root, ignore_errors=True)
    started = time.monotonic()
    try:
        torture(args.seed, args.rounds, root, shards=args.shards, wide=args.wide)
        wide = " (wide)" if args.wide else ""
        took = time.monotonic() - started
        print(f"torture: seed {args.seed}, {args.rounds} rounds{wide}: invariant held ({took:.0f} s)")
        return 0
    except Violation as violation:
        print(f"{violation}\n{'' if args.keep else '(folders removed: --keep DIR keeps them)'}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
