"""Which delivered label do a model's most poison-like samples carry? The label a defender could suspect before any
enhancement (issue "MeCa must remove the Blend, SIG and Trojan backdoors too"; BSD's target estimate, section 4.1.1).
A research tool, not a stage.

For a run folder it counts the delivered labels of the samples with the lowest loss on `--model` (BSD's vote,
`bsd.estimate_target`) and, where the folder has MeCa's Eq. 3 score of that model, the lowest KL, at several shares;
the poisoned samples among them are printed where the folder has the ground truth. Without a run folder at --run,
--attack (with --data and --set) poisons the protocol's training set and trains the warm-up model there first, as
scripts/meca_rounds.py does, and scores it with Eq. 3:

    .venv/bin/python scripts/label_vote.py --run runs/vote-sig --attack sig --data ../shared/datasets/cifar10
    .venv/bin/python scripts/label_vote.py --run runs/benchmark/<bsd run> --model altruistic
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from components import artifacts, stages  # noqa: E402
from components.artifacts import SAMPLE_SCHEMA, SCORE_SCHEMA  # noqa: E402
from components.config import load_config, parse_overrides  # noqa: E402
from components.defenses import bsd, meca  # noqa: E402
from components.scores import sample_loss  # noqa: E402
from meca_rounds import warm  # noqa: E402

SHARES = (0.01, 0.02, 0.05, 0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder, or where to make one (with --attack)")
    ap.add_argument("--model", default="warmup", help="the folder's model to vote with (BSD's g: altruistic)")
    ap.add_argument("--attack", help="poison and train the warm-up into --run first (CPU protocol)")
    ap.add_argument("--data", default="sample")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run settings, e.g. attack.target=3")
    args = ap.parse_args()
    run = args.run
    if args.attack:
        cfg = load_config("cpu", {**parse_overrides(args.set), "attack.name": args.attack, "data": args.data})
        warm(cfg, run)
        if not (run / "score" / "scores.parquet").exists():
            meca.score_kl(run / "poison" / "dataset.npz", run / "warmup", run / "score", params=cfg.meca, seed=cfg.seed)
    data = next(run / d / "dataset.npz" for d in ("poison", "ingest") if (run / d / "dataset.npz").exists())
    x, y = stages.tensors(stages.load_dataset(data))
    labels = y.numpy()
    net, _ = artifacts.load_model(run / args.model)
    views = {"loss": sample_loss(net, x, y)}
    if args.model == "warmup" and (run / "score" / "scores.parquet").exists():
        views["kl"] = artifacts.read_table(run / "score" / "scores.parquet", {**SCORE_SCHEMA, "kl": pa.float64()})["kl"]
    truth = run / "poison" / "samples.parquet"
    poison = artifacts.read_table(truth, SAMPLE_SCHEMA)["is_poison"] if truth.exists() else None
    for name, score in views.items():
        order = np.argsort(score, kind="stable")
        for share in SHARES:
            label, votes = bsd.estimate_target(score, labels, share, int(labels.max()) + 1)
            among = "" if poison is None else f", poison among them {int(poison[order[:votes.sum()]].sum())}"
            print(f"lowest {name} {share:.0%}: label {label} ({votes[label]} of {votes.sum()}{among}); votes "
                  f"{votes.tolist()}")


if __name__ == "__main__":
    main()
