"""The ASR a model trained without any poison shows: the share of triggered non-target test images it calls the target
(issue "MeCa must remove the Blend, SIG and Trojan backdoors too"). A defense cannot go below it, so an ASR bound near
it is a bound on the clean model's confusions, not on the backdoor. A research tool: it reads a model trained on an
unpoisoned set (e.g. the warm-up of a `none` cell, `runs/benchmark/meca-none-cpu-<time>/warmup`) and attack specs as
the poison stage writes them (`<run>/poison/attack.json`), and prints each one's ASR on the test split of --data.

    .venv/bin/python scripts/asr_floor.py runs/benchmark/meca-none-cpu-<time>/warmup \
        runs/benchmark/meca-trojan-target3-cpu-<time>/poison/attack.json --data ../shared/datasets/cifar10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components import evaluation  # noqa: E402
from components.attacks import attack_from_spec  # noqa: E402
from components.data import load_images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a model folder trained without poison")
    ap.add_argument("attacks", type=Path, nargs="+", help="attack.json files of the poison stage")
    ap.add_argument("--data", default="sample", help="the data set whose test split to trigger")
    args = ap.parse_args(argv)
    test = load_images(args.data, "test")
    test_x = torch.from_numpy(test.images)
    for path in args.attacks:
        atk = attack_from_spec(json.loads(path.read_text()))
        trig, target = atk.test_inputs(test)
        m = evaluation.model_metrics(args.model, test_x, test.labels, torch.from_numpy(trig), target, atk.target)
        print(f"{path}: {atk.spec()['name']} -> class {atk.target}: ASR {m['asr']:.4f} ({len(target)} triggered test "
              f"images); the model's clean ACC {m['acc']:.4f}, on the target class {m['target_acc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
