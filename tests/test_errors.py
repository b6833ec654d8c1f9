"""One-line user errors: long values are cut, paths the user must copy are not."""

from __future__ import annotations

from sage_lightning.errors import one_line, shorten


def test_long_values_are_cut_to_their_start_and_length():
    line = shorten("unknown class [" + "x" * 1000 + "]: no close match")
    assert line == "unknown class [" + "x" * 39 + "...(1003 characters) no close match"


def test_paths_stay_whole_however_long():
    run = "/tmp/pytest-of-root/pytest-154/popen-gw0/test_a_restart_that_keeps_resu0/" + "deep/" * 20 + "run"
    for text in (f"resume with: sage fit --config {run}/config.yaml --ckpt_path last",
                 f"run folder {run!r} holds results.jsonl", f"checkpoint 'runs/{'x' * 120}/last.ckpt' is unreadable"):
        assert shorten(text) == text
    assert run in one_line(f"folder\n  - {run}\n")
