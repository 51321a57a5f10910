"""The demo's command (`make demo`: `unpoison run meca --attack badnets --data sample --set train.epochs=20`), in a
short form, run twice on one machine gives the same figures: the first thing a user runs must not change between two
runs."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import main

SHORT = ["train_limit=400", "train.epochs=1", "meca.rounds=2", "meca.finetune_epochs=1"]


@pytest.mark.slow
def test_the_demo_command_gives_the_same_figures_twice(tmp_path, capsys):
    figures = []
    for name in ("first", "second"):
        argv = ["run", "meca", "--attack", "badnets", "--data", "sample", "--out", str(tmp_path), "--name", name,
                "--no-mlflow", "--set", *SHORT]
        assert main(argv) == 0
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        figures.append({"models": m["models"], "detection": {k: v for k, v in m.items() if k.startswith("detection")},
                        "splits": m.get("splits")})
    printed = capsys.readouterr().out
    assert printed.count("meca: relabelled") == 2  # the results table, once per run
    assert figures[0]["models"] and figures[0]["detection"]
    assert figures[0] == figures[1]
