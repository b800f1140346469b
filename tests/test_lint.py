"""The linter's settings (.ci/ruff.toml) hold for the script, the tests and the examples: line
length, unused names, import order, common bug patterns. ruff comes with requirements-dev.txt."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(ROOT / ".ci" / "ruff.toml"),
                          "--output-format", "concise", "infer_mp.py", "tests", "examples"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
