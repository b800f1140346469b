"""Usage errors: one line naming the problem, exit code 2, before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest

import infer_mp
from conftest import FAKE, ROOT, SCRIPT, fake_paddle, fake_paddle_env, injected, make_config, run_cli, write


def assert_usage_error(run, *fragments: str) -> None:
    assert run.code == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr  # one line, no traceback
    assert lines[0].startswith("infer_mp.py: error:")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def one_input(tmp_path: Path) -> Path:
    write(tmp_path / "in" / "a.png")
    return tmp_path / "in"


@pytest.mark.parametrize(
    "device, fragment",
    [
        ("gpu:x", "malformed --device 'gpu:x'"),
        ("tpu:0", "unsupported device type 'tpu'"),
        ("gpu:0,,1", "empty device id"),
        ("gpu:", "empty device id"),
        ("cpu:0", "No Device ID should be specified for CPUs"),
        ("gpu:0:1", "malformed --device"),
    ],
)
def test_malformed_device_is_one_line_and_exit_2(one_input, tmp_path, device, fragment):
    run = run_cli("--pipeline", FAKE, "--input_dir", str(one_input), "--device", device,
                  "--output_dir", str(tmp_path / "out"))
    assert_usage_error(run, fragment)
    assert not (tmp_path / "out").exists()


def test_the_cpu_is_planned_without_importing_paddlex():
    """Importing PaddleX takes a second: a run on --device cpu paid it to plan its workers (a
    no-op rerun in the coordinator too), even with a pipeline that never imports it."""
    import subprocess
    import sys

    code = ("import sys, infer_mp\n"
            "cfg = infer_mp.parse_config(['--pipeline', 'x:Y', '--input_dir', 'examples', '--device', ' CPU '])\n"
            "assert infer_mp.parse_device_arg(' CPU ') == ('cpu', None)\n"
            "assert [s.device for s in infer_mp.plan_workers(cfg)] == ['cpu']\n"
            "assert 'paddlex' not in sys.modules, 'paddlex imported'")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


LATE_PADDLEX = """\
import logging, sys, tempfile
import infer_mp
infer_mp.quiet_paddlex_logs()  # as a worker does, before its pipeline may have loaded PaddleX
infer_mp.use_offline_font()
assert 'paddlex' not in sys.modules
import paddlex  # loaded late (in a pipeline's predict): it sets its logger to INFO again
from paddlex.utils import fonts
logging.getLogger('paddlex').info('an INFO line')
logging.getLogger('paddlex').warning('a WARNING line')
class Result:  # a result whose pictures PaddleX's fonts would draw
    img = {}
infer_mp.save_extras(tempfile.mkdtemp(), '', 'x', Result(), ('img',))
found = [f._local_path for f in vars(fonts).values() if isinstance(f, fonts.Font)]
assert found and set(found) == {infer_mp.offline_font()}, found
"""


def test_a_pipeline_that_loads_paddlex_late_gets_its_quiet_logs_and_offline_font():
    """Planning a CPU run loaded PaddleX in the worker, so its logger's level and fonts were
    set before any pipeline could load it later; now a pipeline may load it in predict()."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", LATE_PADDLEX], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "a WARNING line" in run.stderr and "an INFO line" not in run.stderr, run.stderr


def test_absent_gpu_stops_before_any_page(one_input, tmp_path):
    """A CPU build of Paddle (a stand-in, whatever this machine has): asking for a GPU must not
    silently fall back to the CPU."""
    run = run_cli("--pipeline", FAKE, "--input_dir", str(one_input), "--device", "gpu:0",
                  "--output_dir", str(tmp_path / "out"), env=fake_paddle_env(tmp_path / "paddle", gpus=None))
    assert_usage_error(run, "GPU", "cannot use it", "--device cpu")
    assert not (tmp_path / "out").exists()


def test_gpu_beyond_the_visible_ones_stops_before_any_page(one_input, tmp_path):
    run = run_cli("--pipeline", FAKE, "--input_dir", str(one_input), "--device", "gpu:0,2",
                  "--output_dir", str(tmp_path / "out"), env=fake_paddle_env(tmp_path / "paddle", gpus=2))
    assert_usage_error(run, "gpu:2", "only 2 gpu device(s)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "pipeline, fragments",
    [
        ("PPStructureV", ["'PPStructureV'", "did you mean 'PPStructureV3'"]),
        ("Nonsense", ["no pipeline class 'Nonsense' in paddleocr"]),
        (f"{ROOT / 'tests' / 'fake_pipeline.py'}:FakePipelin", ["did you mean 'FakePipeline'"]),
        ("tests/missing.py:Thing", ["no such file"]),
        ("no_such_module_xyz:Thing", ["no module named 'no_such_module_xyz'"]),
        ("json:NoSuchClass", ["no pipeline class 'NoSuchClass' in json"]),
    ],
)
def test_unknown_pipeline_fails_fast_with_close_matches(one_input, tmp_path, pipeline, fragments):
    run = run_cli("--pipeline", pipeline, "--input_dir", str(one_input), "--device", "cpu",
                  "--output_dir", str(tmp_path / "out"))
    assert_usage_error(run, *fragments)


def test_missing_input_dir(tmp_path):
    run = run_cli("--pipeline", FAKE, "--input_dir", str(tmp_path / "nope"), "--device", "cpu")
    assert_usage_error(run, "input directory does not exist")


def test_input_dir_is_a_file(tmp_path):
    path = write(tmp_path / "file.png")
    run = run_cli("--pipeline", FAKE, "--input_dir", str(path), "--device", "cpu")
    assert_usage_error(run, "is not a directory")


def test_output_dir_is_a_file(one_input, tmp_path):
    path = write(tmp_path / "out")
    run = run_cli("--pipeline", FAKE, "--input_dir", str(one_input), "--device", "cpu",
                  "--output_dir", str(path))
    assert_usage_error(run, "--output_dir exists and is not a directory")


@pytest.mark.parametrize("flag, value", [("--batch_size", "0"), ("--instances_per_device", "-1"),
                                         ("--batch_size", "two"), ("--cpu_threads", "0"),
                                         ("--pages_per_task", "-1"), ("--max_page_error_rate", "1.5")])
def test_bad_numbers(one_input, flag, value):
    run = run_cli("--pipeline", FAKE, "--input_dir", str(one_input), "--device", "cpu", flag, value)
    assert_usage_error(run, flag)


@pytest.mark.parametrize("depth", [600, 20_000])
def test_a_value_nested_too_deep_is_refused_not_a_traceback(one_input, tmp_path, depth):
    """Review: 1,000 levels gave a RecursionError traceback as it was parsed; 600 levels
    parsed, and the run's worker start gave one as it was pickled (--dry_run said nothing)."""
    run = run_cli("--pipeline", FAKE, "--device", "cpu", "--input_dir", str(one_input), "--output_dir",
                  str(tmp_path / "out"), "--pipeline_arg", "x=" + "[" * depth + "]" * depth, "--dry_run")
    assert_usage_error(run, "--pipeline_arg: a JSON value nested deeper than 100 levels")


def test_missing_required_flag():
    run = run_cli("--input_dir", ".", "--device", "cpu")
    assert_usage_error(run, "--pipeline")


def test_pattern_outside_input_dir(one_input, tmp_path):
    write(tmp_path / "outside.png")
    run = run_cli("--pipeline", FAKE, "--input_dir", str(one_input), "--device", "cpu",
                  "--input_glob_pattern", "../*.png")
    assert_usage_error(run, "reaches outside --input_dir")


def test_help_lists_every_seed_flag_and_exit_codes():
    run = run_cli("--help")
    assert run.code == 0
    for flag in ("--pipeline", "--input_dir", "--device", "--output_dir", "--instances_per_device",
                 "--batch_size", "--input_glob_pattern"):
        assert flag in run.stdout
    import infer_mp
    listed = run.stdout.split("exit codes:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert listed == [f"  {code.value:<4} {code.meaning}" for code in infer_mp.ExitCode]  # one list, the enum's


# -- the seed page's two example commands parse and reach the device check -------------------

SEED_COMMANDS = [
    ["--pipeline", "PPStructureV3", "--input_dir", "input_images/", "--device", "gpu:0,1,2,3",
     "--output_dir", "output"],
    ["--pipeline", "PPStructureV3", "--input_dir", "input_images/", "--device", "gpu:0,2",
     "--output_dir", "output", "--instances_per_device", "2", "--batch_size", "4",
     "--input_glob_pattern", "*.jpg"],
]


@pytest.mark.parametrize("argv", SEED_COMMANDS)
def test_seed_commands_are_valid(tmp_path, argv):
    """Every flag is accepted; with a CPU-only Paddle they stop only at the absent GPUs."""
    write(tmp_path / "input_images" / "x.jpg")
    run = run_cli(*argv, cwd=tmp_path, env=fake_paddle_env(tmp_path / "paddle", gpus=None))
    assert_usage_error(run, "GPU", "cannot use it")


SEED_WORKERS = ["4 worker(s) on gpu:0 x1, gpu:1 x1, gpu:2 x1, gpu:3 x1", "4 worker(s) on gpu:0 x2, gpu:2 x2"]


@pytest.mark.parametrize("argv, workers", list(zip(SEED_COMMANDS, SEED_WORKERS)))  # (a list: pytest 10 takes no zip)
def test_seed_commands_plan_their_gpus(tmp_path, argv, workers):
    """On a box with 4 GPUs (a stand-in Paddle) the same commands pass every check and plan one
    worker per GPU and instance; --dry_run loads no model."""
    write(tmp_path / "input_images" / "x.jpg")
    run = run_cli(*argv, "--dry_run", cwd=tmp_path, env=fake_paddle_env(tmp_path / "paddle", gpus=4))
    assert run.code == 0, run.stderr
    assert f"workers: {workers}" in run.stdout


def test_seed_defaults(tmp_path):
    config = infer_mp.parse_config(["--pipeline", "P", "--input_dir", str(tmp_path), "--device", "cpu"])
    assert (config.output_dir.name, config.instances_per_device, config.batch_size, config.input_glob_patterns) == (
        "output", 1, 1, ("*",))


@pytest.mark.parametrize("flags, formats", [((), ()), (("--save", "markdown", "--save", "img"), ("markdown", "img")),
                                             (("--save", "img,markdown", "--save", "img"), ("img", "markdown"))])
def test_save_given_twice_adds_up(tmp_path, flags, formats):
    """Review finding: `--save markdown --save img` kept only the last (no markdown written),
    though --input_glob_pattern adds up when repeated."""
    config = infer_mp.parse_config(["--pipeline", "P", "--input_dir", str(tmp_path), "--device", "cpu", *flags])
    assert config.save == formats


# -- device planning, in process --------------------------------------------------------------


config = make_config


@pytest.mark.parametrize("cores, instances, threads", [(2, 1, 2), (2, 2, 1), (8, 3, 2), (2, 4, 1)])
def test_cpu_threads_split_cores_among_instances(monkeypatch, cores, instances, threads):
    monkeypatch.setattr(infer_mp, "available_cores", lambda: cores)
    plan = infer_mp.plan_workers(config(instances_per_device=instances))
    assert [s.device for s in plan] == ["cpu"] * instances
    assert {s.cpu_threads for s in plan} == {threads}


def test_cpu_threads_given_by_user_win(monkeypatch):
    monkeypatch.setattr(infer_mp, "available_cores", lambda: 2)
    plan = infer_mp.plan_workers(config(instances_per_device=2, cpu_threads=4))
    assert {s.cpu_threads for s in plan} == {4}


def test_gpu_plan_one_worker_per_device_instance(monkeypatch):
    monkeypatch.setattr(infer_mp, "import_paddle_quietly", lambda: fake_paddle(4))
    plan = infer_mp.plan_workers(config(device="gpu:0,2", instances_per_device=2))
    assert [s.device for s in plan] == ["gpu:0", "gpu:0", "gpu:2", "gpu:2"]
    assert [s.slot for s in plan] == [0, 1, 2, 3]


@pytest.mark.parametrize("device", ["gpu", "gpu:0"])
def test_single_gpu_works(monkeypatch, device):
    monkeypatch.setattr(infer_mp, "import_paddle_quietly", lambda: fake_paddle(1))
    assert [s.device for s in infer_mp.plan_workers(config(device=device))] == ["gpu:0"]


def test_gpu_id_beyond_visible_devices_is_refused(monkeypatch):
    monkeypatch.setattr(infer_mp, "import_paddle_quietly", lambda: fake_paddle(2))
    with pytest.raises(infer_mp.UsageError, match=r"gpu:3.*only 2 gpu device"):
        infer_mp.plan_workers(config(device="gpu:0,3"))


def test_gpu_on_cpu_build_is_refused(monkeypatch):
    monkeypatch.setattr(infer_mp, "import_paddle_quietly", lambda: fake_paddle(None))
    with pytest.raises(infer_mp.UsageError, match="cannot use it"):
        infer_mp.plan_workers(config(device="gpu:0"))


def test_the_readme_has_every_section_the_script_cites_and_every_exit_code():
    """Messages say "README, 'GPU install'": a user who copied only the script opens the README
    and finds a heading of that name; its exit-code table has every code the script uses."""
    import re

    import infer_mp
    readme = (ROOT / "README.md").read_text()
    headings = [line.lstrip("#").strip() for line in readme.splitlines() if line.startswith("#")]
    cited = set()
    for path in [ROOT / "infer_mp.py", *ROOT.glob("requirements*.txt"), *ROOT.glob("examples/*.py")]:
        cited |= set(re.findall(r"""README, ['"]([^'"\n]+)['"]""", path.read_text()))
    assert cited >= {"GPU install", "GPU from PyPI", "Big documents", "Fast CPU engine", "GPU benchmark"}
    for name in cited:
        assert any(heading.startswith(name) for heading in headings), name
    table = set(re.findall(r"^\| (\d+) \|", readme, re.MULTILINE))
    assert table == {str(code.value) for code in infer_mp.ExitCode}


@pytest.mark.parametrize("flag", ["--input_dir", "--output_dir", "--input_list", "--run_log"])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(one_input, tmp_path, flag):
    """`--output_dir "$OUT"` with OUT unset: '' was the current folder, which got the outputs
    and the run log (and an empty --input_dir OCR'd the current folder)."""
    args = {"--input_dir": str(one_input), "--output_dir": str(tmp_path / "out"), flag: ""}
    if flag == "--input_list":
        del args["--input_dir"]
    run = run_cli("--pipeline", FAKE, "--device", "cpu", *[part for pair in args.items() for part in pair],
                  cwd=tmp_path)
    assert_usage_error(run, f"{flag} is empty")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("argv, fragment", [
    (["--batch_size", "-1"], "must be at least 1, got -1"),
    (["--shard", "-1/2"], "a value that starts with '-' goes after '=', as --shard=-1/2"),
    (["--shard=-1/2"], "expected I/N with 0 <= I < N"),
    (["--device", "gpu:0,0"], "names gpu:0 twice"),
    (["--pipeline", "my_pipeline.py"], "name the class after a colon, e.g. 'my_pipeline.py:MyPipeline'"),
    (["--predict_arg", "input=x.png"], "--predict_arg input: infer_mp.py gives predict() its inputs"),
    (["--predict_arg", "page_windows=1"], "--predict_arg page_windows"),
    (["--device", "cpu,cpu"], "the CPU is one device ('cpu'; --instances_per_device gives it more workers)"),
    (["--input_dir", "-in"], "a value that starts with '-' goes after '=', as --input_dir=-in"),
    (["--out", "-weird"], "a value that starts with '-' goes after '=', as --output_dir=-weird"),
    # A slip of the keyboard: a traceback (OverflowError in a poll) or a run that hung, eating
    # memory, even with --dry_run (a plan entry per instance; every other shard's log named).
    (["--start_timeout", "inf"], "--start_timeout: must be more than 0 and at most 1,000,000 s, got inf"),
    (["--start_timeout", "2147484", "--dry_run"], "at most 1,000,000 s, got 2147484"),
    (["--task_timeout", "nan"], "--task_timeout: must be more than 0"),
    (["--instances_per_device", "99999999999999999999", "--dry_run"], "must be at most 1024"),
    (["--shard", "0/10000000", "--dry_run"], "0 <= I < N <= 10,000"),
    (["--engine_config", "[" * 1000], "--engine_config: a JSON value nested deeper than 100 levels"),
    (["--predict_arg", "x=" + "[" * 101 + "]" * 101], "--predict_arg: a JSON value nested deeper than 100 levels"),
    (["--pipeline", "json:JSONDecoder", "--engine", "onnxruntime"],
     "--engine: the pipeline class 'JSONDecoder' takes no 'engine' argument"),
])
def test_refusals_name_the_range_or_the_fix(one_input, tmp_path, argv, fragment):
    options, extra = {"--pipeline": FAKE, "--device": "cpu"}, list(argv)
    for flag in options:
        if flag in extra:
            options[flag] = extra.pop(extra.index(flag) + 1)
            extra.remove(flag)
    run = run_cli(*[part for pair in options.items() for part in pair], "--input_dir", str(one_input),
                  "--output_dir", str(tmp_path / "out"), *extra, env=fake_paddle_env(tmp_path / "paddle", gpus=2))
    assert_usage_error(run, fragment)


def test_a_pipeline_class_without_predict_is_refused_before_any_input_fails(one_input, tmp_path):
    """It failed every input, each recorded as its own failure, which a plain rerun then did
    not retry: a fault of the pipeline, not of the inputs."""
    source = "class NoPredict:\n    def __init__(self, device=None):\n        pass\n"
    pipeline = write(tmp_path / "nopredict.py", source)
    run = run_cli("--pipeline", f"{pipeline}:NoPredict", "--input_dir", str(one_input), "--device", "cpu",
                  "--output_dir", str(tmp_path / "out"))
    assert run.code == 3, run.stderr
    assert "NoPredict has no predict() method" in run.stderr and "Traceback" not in run.stderr
    log = tmp_path / "out" / "infer_mp.runlog.jsonl"
    assert not log.exists() or '"status": "failed"' not in log.read_text()


def test_an_unlistable_input_dir_is_refused(one_input, tmp_path):
    """It said 'no inputs ... nothing to do' and exited 0, at every cron tick."""
    run = run_cli("--pipeline", FAKE, "--input_dir", str(one_input), "--device", "cpu",
                  "--output_dir", str(tmp_path / "out"), env={**injected(), "UNLISTABLE": str(one_input)})
    assert_usage_error(run, "cannot list --input_dir", "Permission denied", "chmod")


def test_an_input_list_may_be_a_pipe(one_input, tmp_path):
    """`--input_list <(find ...)` gives /dev/fd/N, a pipe: it was refused as 'no such file'."""
    import subprocess
    import sys

    run = subprocess.run(["bash", "-c", '"$0" "$1" --pipeline "$2" --device cpu --output_dir "$3" '
                                        '--input_list <(printf "%s\\n" "$4")',
                          sys.executable, str(SCRIPT), FAKE, str(tmp_path / "out"), str(one_input / "a.png")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert [path.name for path in (tmp_path / "out").rglob("*.json")] == ["a.json"], run.stderr
    folder = run_cli("--pipeline", FAKE, "--input_list", str(one_input), "--device", "cpu")
    assert_usage_error(folder, "is a folder; give a file of paths")
