"""Data safety: nothing finished is lost, nothing stale or foreign is left (issue 19)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from conftest import assert_invariant, page_files, run_fake, run_log, write


# -- cleanup deletes only what the input itself wrote ---------------------------------------------


def test_a_crash_deletes_no_output_of_an_input_with_a_longer_name(dirs):
    src, out = dirs
    write(src / "scan.png", "CRASH")
    write(src / "scan_1.png", "one")
    write(src / "scan_2.png", "two")
    write(src / "b.pdf", "page\npage\n")
    write(src / "b_1.pdf", "CRASH")
    assert run_fake(src, out, "--max_attempts", "1").code == 1
    assert_invariant(src, out)
    assert run_fake(src, out, "--retry_failed", "--max_attempts", "1").code == 1
    assert page_files(out) == ["b_0.json", "b_1.json", "scan_1.json", "scan_2.json"]
    assert_invariant(src, out)


def shard_of(name: str, count: int) -> int:
    return zlib.crc32(os.fsencode(name)) % count


def test_a_shard_removes_only_its_own_stale_temporaries(dirs):
    """Shards share output folders: one must not delete what another is writing right now."""
    src, out = dirs
    write(src / "x.png", "mine")
    write(src / "x_1.png", "the other shard's")
    assert (shard_of("x.png", 2), shard_of("x_1.png", 2)) == (0, 1)
    theirs = write(out / ".x_1.json.12345.tmp.json", "{}")  # being written by shard 1's worker
    theirs_tagged = write(out / ".x_1.json.s1of2-12345-abcdef.tmp.json", "{}")
    mine = write(out / ".x.json.s0of2-999-abcdef.tmp.json", "{}")  # left by a killed shard-0 run
    assert run_fake(src, out, "--shard", "0/2").code == 0
    assert theirs.exists() and theirs_tagged.exists() and not mine.exists()
    assert run_fake(src, out).code == 0  # a run over all inputs has the folder alone
    assert not theirs.exists() and not theirs_tagged.exists()
