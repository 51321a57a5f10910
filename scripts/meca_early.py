"""How well MeCa's guard holds the poison on the early model's loss against the warm-up's (issue "MeCa must remove the
Blend, SIG and Trojan backdoors too"). A research tool, not a stage: it reads a MeCa run folder of an injected attack
(its warm-up model, and its early model; a folder from before the `early` stage gets one trained here, the
protocol's training cut to `meca.early_share` of its epochs, as the stage does) and counts, with the folder's ground
truth, the poison and the clean samples of the target label below the guard at several quantiles on each loss and on
either (the default's guard), and the within-label AUROC of each loss.

    .venv/bin/python scripts/meca_early.py runs/benchmark/meca-trojan-cpu-<time>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components import artifacts, scores, stages  # noqa: E402
from components.artifacts import SAMPLE_SCHEMA  # noqa: E402
from components.config import RunConfig  # noqa: E402
from components.defenses import meca  # noqa: E402

QUANTILES = (0.1, 0.2, 0.3, 0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a MeCa run folder of an injected attack (its warm-up finished)")
    run = ap.parse_args(argv).run
    cfg = RunConfig.model_validate(json.loads((run / "config.json").read_text())["config"])
    data = run / "poison" / "dataset.npz"
    early = run / "early"
    if not (early / "model.json").exists():
        early = run / "early-measured"  # beside the run's own stages, never in their place
        train = cfg.train.model_copy(update={"seed": cfg.seed, "epochs": meca.early_epochs(cfg.train, cfg.meca)})
        stages.train(data, early, params=train, model_name=cfg.model, desc="early model")
    x, y = stages.tensors(stages.load_dataset(data))
    labels = y.numpy()
    truth = artifacts.read_table(run / "poison" / "samples.parquet", SAMPLE_SCHEMA)
    poison, target = truth["is_poison"], cfg.attack.target
    own = labels == target
    losses = {name: scores.sample_loss(artifacts.load_model(folder)[0], x, y, batch_size=cfg.meca.score_batch)
              for name, folder in (("warm-up", run / "warmup"), ("early", early))}
    for name, loss in losses.items():
        print(f"{name} model: within-label AUROC of the loss {roc_auc_score(poison[own], -loss[own]):.3f}")
    for q in QUANTILES:
        held = {name: meca.low_loss(loss, labels, target, q) for name, loss in losses.items()}
        held["either"] = held["warm-up"] | held["early"]
        print(f"guard {q:.1f}: " + "; ".join(f"{name} holds {int((h & poison).sum())} of {int(poison.sum())} poison, "
                                             f"{int((h & ~poison).sum())} of {int((own & ~poison).sum())} clean"
                                             for name, h in held.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
