"""What MeCa's identification inside the suspect label would leave in the pool with another guard, or with the whole
label suspect (issue "MeCa must remove the Blend, SIG and Trojan backdoors too"). A research tool, not a stage: it
reads a finished MeCa run folder (the warm-up, early, enhanced and first clean models, the Eq. 3 scores,
identification's split) and counts, with the folder's ground truth, the poison and the clean target-class samples in
the first and second pass's pools. The second pass uses the run's own first clean model, trained on the run's first pool, so the
other rows are an approximation: a first model trained on another pool would vouch differently.

    .venv/bin/python scripts/meca_inside_label.py runs/benchmark/meca-sig-cpu-<time>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components import artifacts, engine, stages  # noqa: E402
from components.artifacts import SAMPLE_SCHEMA, SCORE_SCHEMA, SPLIT_SCHEMA  # noqa: E402
from components.defenses import meca  # noqa: E402

GUARDS = (0.0, 0.1, 0.2, 0.3, 0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished MeCa run folder of an injected attack")
    run = ap.parse_args(argv).run
    x, y = stages.tensors(stages.load_dataset(run / "poison" / "dataset.npz"))
    labels = y.numpy()
    truth = artifacts.read_table(run / "poison" / "samples.parquet", SAMPLE_SCHEMA)
    poison = truth["is_poison"]
    target = json.loads((run / "metrics.json").read_text())["attack"]["target"]
    clean_target = ~poison & (truth["true_label"] == target)
    predicted, enhanced_loss, warm_loss, early_loss = meca.views(
        x, y, *(artifacts.load_model(run / m)[0] for m in ("enhance/model", "warmup", "early")))
    kl = artifacts.read_table(run / "score" / "scores.parquet", {**SCORE_SCHEMA, "kl": pa.float64()})["kl"]
    first_predicted = engine.predict(artifacts.load_model(run / "first_train")[0], x).argmax(1).numpy()
    label = meca.suspect_label(predicted, labels, "loss_vote", warm_loss)
    run_first = artifacts.read_table(run / "identify" / "split.parquet", SPLIT_SCHEMA)["pool"] == "clean"
    print(f"suspect label {label}; the run's first pool: poison {int((run_first & poison).sum())}, clean target "
          f"{int((run_first & clean_target).sum())} of {int(clean_target.sum())}")
    whole = np.where(labels == label, labels, predicted)  # as if the enhanced model fitted every sample of the label
    for name, seen in (("line 12 inside the label", predicted), ("whole label suspect", whole)):
        for guard in GUARDS:
            params = meca.MecaParams(guard=guard)
            first, _, _ = meca.identify(seen, labels, kl, warm_loss, early_loss, enhanced_loss, params)
            _, low = meca.suspect_and_guard(predicted, labels, warm_loss, early_loss, params)
            second = meca.vouched(first, labels, label, first_predicted, low)
            print(f"{name:25s} guard {guard:.1f}: first pool poison {int((first & poison).sum()):4d}, clean target "
                  f"{int((first & clean_target).sum()):5d}; second pool poison {int((second & poison).sum()):4d}, "
                  f"clean target {int((second & clean_target).sum()):5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
