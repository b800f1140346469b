"""Crash torture: change the input folder at random, run infer_mp.py (killing the coordinator or
a worker at a random instant, or not), and check after every run that each output belongs to
exactly one input's record and holds that input's current text.

    python tests/torture.py --rounds 200 --seed 7 [--keep DIR] [--shards]

With --shards every round runs shards 0/2 and 1/2 at once, each killed or not on its own, and so
does the last round: shards that always overlap must leave the folder as a run over all inputs does.

The changes follow from the seed alone; the kills land at random instants, so a seed that failed
may need a few tries to fail again. Every input's content embeds a unique version ("v17 scan.png",
"v18 doc.pdf p2"), so that stale text is told from current.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import held_outputs, pdf_bytes, start_fake, write  # noqa: E402

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

    def __post_init__(self) -> None:
        self.src, self.out = self.root / "in", self.root / "out"

    def key(self, rel: str) -> str:
        """An input as the run log and the outputs name it."""
        return str(self.src / rel)


# -- changes to the inputs: each returns what it did, or None when it does not apply -------------


def put(w: World, rel: str, pages: int = 1) -> str:
    """Give `rel` new content (a PDF: of `pages` pages); it is an input again if it was gone."""
    w.version += 1
    if rel.endswith(".pdf"):
        w.inputs[rel] = tuple(f"v{w.version} {rel} p{i}" for i in range(pages))
        write(w.src / rel, pdf_bytes(list(w.inputs[rel])))
    else:
        w.inputs[rel] = f"v{w.version} {rel}"
        write(w.src / rel, w.inputs[rel])
    w.gone.pop(rel, None)
    return f"{rel} (v{w.version}{f', {pages} pages' if rel.endswith('.pdf') else ''})"


def forget(w: World, rel: str) -> None:
    """`rel` is no input any more: note its outputs, which must stay as they are."""
    w.inputs.pop(rel)
    w.gone[rel] = {name: (w.out / name).read_bytes() for name, data in json_outputs(w.out).items()
                   if isinstance(data, dict) and data.get("input_path") == w.key(rel)}


def pick(w: World) -> str | None:
    return w.rng.choice(sorted(w.inputs)) if w.inputs else None


def free(w: World, stem: str, suffixes: tuple[str, ...]) -> str | None:
    name = stem + w.rng.choice(suffixes)
    return name if stem and name not in w.inputs else None


def add(w: World) -> str | None:
    rel = free(w, w.rng.choice(STEMS), (*IMAGES, *TYPES))
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
    doc_1.png beside doc.pdf; scan.png beside scan_a.png."""
    rel = pick(w)
    if rel is None:
        return None
    stem = Path(rel).stem
    twin = free(w, w.rng.choice([stem, f"{stem}_{w.rng.choice(TAILS)}", stem.rpartition("_")[0]]), TYPES)
    return twin and f"add {put(w, twin, w.rng.randint(1, 3))} beside {rel}"


def rename(w: World) -> str | None:
    rel = pick(w)
    new = rel and free(w, w.rng.choice(STEMS) + w.rng.choice(("", *(f"_{t}" for t in TAILS))), (Path(rel).suffix,))
    if not new:
        return None
    (w.src / rel).rename(w.src / new)
    w.inputs[new] = w.inputs[rel]
    w.gone.pop(new, None)
    forget(w, rel)
    return f"rename {rel} -> {new}"


def delete(w: World) -> str | None:
    rel = pick(w)
    if rel:
        (w.src / rel).unlink()
        forget(w, rel)
    return rel and f"delete {rel}"


GROWING = {add: 4, add_twin: 4}
STEADY = {change: 4, rename: 2, delete: 2}


def mutate(w: World) -> list[str]:
    """One to three changes (with MAX_INPUTS inputs, none that adds one)."""
    moves = STEADY if len(w.inputs) >= MAX_INPUTS else {**GROWING, **STEADY}
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


def plan_kill(rng: random.Random, pages: int, delay: float) -> tuple[str, int, float]:
    """Whom to kill ("none", "coordinator", "worker"), once the run has logged how many more
    lines, and how many seconds after: a third at any instant from the start (the first output
    comes after ~1.5 s), the rest once work is under way."""
    target = rng.choices(("none", "coordinator", "worker"), (3, 5, 2))[0]
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
    plans = [(plan_kill(rng, pages, delay) if kill else ("none", 0, 0.0), rng.random()) for _ in shards]
    outcomes = []
    with contextlib.ExitStack() as stack:
        runs = []
        for shard in shards:
            extra, log = (("--shard", shard), f"infer_mp.shard-{shard.replace('/', '-of-')}.runlog.jsonl") \
                if shard else ((), "infer_mp.runlog.jsonl")
            runs.append((stack.enter_context(Run(w, [*flags, *extra], delay, log)), " ".join([*flags, *extra])))
        for (run, named), plan in zip(runs, plans):
            outcomes.append(end_run(run, f"run {named}, delay {delay} s", *plan))
    return Outcome("; ".join(outcome.what for outcome in outcomes), killed=any(o.killed for o in outcomes),
                   problem=next((o.problem for o in outcomes if o.problem), None))


def end_run(run: Run, what: str, kill: tuple[str, int, float], choice: float) -> Outcome:
    """Kill its coordinator or a worker as planned (see plan_kill), and wait for its end."""
    target, records, at = kill
    when = f"{at:.2f} s after {f'{records} new record(s)' if records else 'its start'}"
    if target != "none" and run.running_after(records, at):
        if target == "coordinator":
            run.kill_coordinator()
            return Outcome(f"{what}, coordinator killed {when}", killed=True)
        worker = run.kill_worker(choice)
        what += f", worker {worker} killed {when}" if worker else f", no worker left to kill {when}"
    try:
        _, stderr = run.process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return Outcome(f"{what}, hung", killed=True, problem=f"the run did not end in {RUN_TIMEOUT} s")
    code = run.process.returncode
    return Outcome(f"{what} -> exit {code}", problem=code and f"the run exited {code}:\n{stderr.strip()[-1500:]}")


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
        return repr(content) if page is None else f"nothing (an image has no page {page})"
    if isinstance(page, int) and 0 <= page < len(content):
        return repr(content[page])
    return f"nothing (page {page} of a {len(content)}-page PDF)"


def owner_problems(w: World, held: dict[str, set[str]]) -> list[Problem]:
    """(a): every file but the run logs is listed by exactly one input's record."""
    owners: dict[str, list[str]] = {}
    for key, names in held.items():
        for name in names:
            owners.setdefault(name, []).append(os.path.relpath(key, w.src))
    return [(name, f"(a) listed by {len(owners.get(name, []))} input(s)' records {owners.get(name, [])}")
            for name in (str(p.relative_to(w.out)) for p in visible(w.out, "*"))
            if not (name.startswith("infer_mp") and name.endswith(".runlog.jsonl")) and len(owners.get(name, [])) != 1]


def content_problems(w: World, held: dict[str, set[str]], outputs: dict[str, dict]) -> list[Problem]:
    """(b) an input's output holds its current text and is listed by its record; (e) a deleted
    input's is as it was, and still listed."""
    problems = []
    for name, data in outputs.items():
        rel = os.path.relpath(data["input_path"], w.src) if "input_path" in data else None
        listed = name in held.get(str(data.get("input_path")), ())
        if rel in w.inputs:
            want = expected_text(w.inputs[rel], data.get("page_index"))
            if repr(data.get("text")) != want:
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


def completeness_problems(w: World, held: dict[str, set[str]], outputs: dict[str, dict]) -> list[Problem]:
    """(f): after a run that ended by itself, every input's record lists each of its pages."""
    problems = []
    for rel, content in sorted(w.inputs.items()):
        pages = sorted(str(outputs.get(name, {}).get("page_index", "?")) for name in held.get(w.key(rel), ()))
        want = sorted(str(i) for i in range(len(content))) if isinstance(content, tuple) else ["None"]
        if pages != want:
            problems.append((rel, f"(f) its record lists pages {pages}, not {want}"))
    return problems


def check(w: World, full: bool) -> list[Problem]:
    """(c) every file a record lists exists; when `full` (the run ended by itself), (a)-(f)."""
    held = held_outputs(w.out)
    problems = [(name, f"(c) listed by {key}'s record but missing") for key, names in held.items()
                for name in sorted(names) if not (w.out / name).is_file()]
    if full:
        outputs = json_outputs(w.out)
        problems += owner_problems(w, held) + content_problems(w, held, outputs)
        problems += leftover_problems(w) + completeness_problems(w, held, outputs)
    return problems


def describe(w: World, seed: int, round_: int, problems: list[Problem]) -> str:
    lines = [f"torture: invariant violated: seed {seed}, round {round_} (folders in {w.root})"]
    for name in dict.fromkeys(name for name, _ in problems):
        lines += [f"  {name or 'the run'}:", *(f"    {problem}" for at, problem in problems if at == name)]
        if name and (w.out / name).is_file():
            lines.append(f"    content: {(w.out / name).read_text(errors='replace')[:400]}")
    lines.append("inputs now: " + "; ".join(f"{rel} = {content!r}" for rel, content in sorted(w.inputs.items())))
    return "\n".join([*lines, "history:", *("  " + line for line in w.history)])


def torture(seed: int, rounds: int, root: Path, say=print, shards: bool = False) -> None:
    """`rounds` rounds of change, run (maybe killed) and check in `root`, then one run to the
    end with no change and no kill; raises Violation with the story so far."""
    w = World(root.resolve(), random.Random(seed), shards=shards)
    w.src.mkdir(parents=True, exist_ok=True)
    for round_ in range(rounds + 1):
        changes = mutate(w) if round_ < rounds else []
        outcome = run_round(w, kill=round_ < rounds)
        w.history.append(f"round {round_}: {'; '.join(changes) or 'no change'} | {outcome.what}")
        say(w.history[-1])
        problems = [("", outcome.problem)] if outcome.problem else []
        problems += check(w, full=not outcome.killed)
        if problems:
            raise Violation(describe(w, seed, round_, problems))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--keep", type=Path, help="leave the input and output folders in KEEP/seed-N")
    parser.add_argument("--shards", action="store_true", help="every run: shards 0/2 and 1/2 at once")
    args = parser.parse_args()
    root = args.keep / f"seed-{args.seed}" if args.keep else Path(tempfile.mkdtemp(prefix="torture-"))
    shutil.rmtree(root, ignore_errors=True)
    started = time.monotonic()
    try:
        torture(args.seed, args.rounds, root, shards=args.shards)
        print(f"torture: seed {args.seed}, {args.rounds} rounds: invariant held ({time.monotonic() - started:.0f} s)")
        return 0
    except Violation as violation:
        print(f"{violation}\n{'' if args.keep else '(folders removed: --keep DIR keeps them)'}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
