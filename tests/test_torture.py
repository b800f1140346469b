"""Crash torture, short: random input changes and kill -9s, the output invariant checked after
every run (see torture.py; a long sweep: `python tests/torture.py --rounds 200 --seed 7`).

Seed 1 meets, among others, a name that looks like another input's page (page_0.png beside
page.pdf, doc_1.jpg beside doc.pdf), so that inputs change output names while runs are killed."""

from __future__ import annotations

from torture import torture

SEED, ROUNDS = 1, 18


def test_outputs_stay_owned_and_current_through_random_changes_and_kills(tmp_path):
    torture(SEED, ROUNDS, tmp_path, say=lambda line: None)


def test_stops_failures_overwrites_and_subfolders_keep_the_outputs_owned_and_current(tmp_path):
    """--wide: seed 48 meets, among others, two or three double stops (SIGTERM twice: a run may
    end before its second one), an --overwrite run, failing inputs (an image, a PDF's page),
    inputs in subfolders under --recursive (subfolders renamed), and --save markdown."""
    torture(48, 12, tmp_path, say=lambda line: None, wide=True)


def test_shards_that_always_run_at_once_keep_the_outputs_owned_and_current(tmp_path):
    """Every run is shards 0/2 and 1/2 at once, each killed at random or not, the last one too:
    no run over all inputs ever tidies up after them."""
    torture(2, 10, tmp_path, say=lambda line: None, shards=True)
