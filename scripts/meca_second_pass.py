"""MeCa with a second identification pass, measured on a finished run folder (issue "MeCa must remove the Blend, SIG
and Trojan backdoors too", item 4). A research tool, not a stage: MeCa's pipeline does not run it.

The first pass is the run's own identification (`identify/split.parquet`): of the suspect label (the one the enhanced
model predicts most) a fifth of the fitted samples returns, weighted, and the clean model (`final_train`) learns the
label from them. The second pass (`meca.vouched`) returns every suspect of that label the clean model predicts as the
label, and weighs the label's returned samples (those the enhanced model fits) again, so that the label weighs as
much as the median other label (`meca.balance_weights`). It reads what a defender has: the delivered labels, the
first pass's pool, the enhanced model's fit (enhance/rounds.parquet) and the clean model's predictions; the ground
truth, where the run has it, is only printed.

The script copies the run folder without its final training and later stages into --out, writes the second pass's
pool there as identify/split.parquet and prints the command that trains and evaluates the final model on it:

    .venv/bin/python scripts/meca_second_pass.py runs/meca-badnets runs/meca-badnets-pass2
    .venv/bin/unpoison rerun --run runs/meca-badnets-pass2 --stage final_train --downstream --no-mlflow
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components import artifacts, engine, stages  # noqa: E402
from components.artifacts import ROUNDS_SCHEMA, SAMPLE_SCHEMA, SPLIT_SCHEMA  # noqa: E402
from components.defenses import meca  # noqa: E402
from components.errors import UnpoisonError  # noqa: E402

LATER = ("final_train", "relabel_finetune", "evaluate")  # the stages the rerun trains and evaluates again


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished MeCa run folder (per_label identification)")
    ap.add_argument("out", type=Path, help="where the copy with the second pass's pool goes (replaced)")
    args = ap.parse_args(argv)
    run = args.run
    label = artifacts.read_json(run / "identify" / "stage.json")["result"]["over_fitted_label"]
    if label < 0:
        raise UnpoisonError(f"run '{run}' identified with meca.identify=paper: no suspect label to vouch for")
    data = next(run / d / "dataset.npz" for d in ("poison", "ingest") if (run / d / "dataset.npz").exists())
    x, y = stages.tensors(stages.load_dataset(data))
    labels = y.numpy()
    first = artifacts.read_table(run / "identify" / "split.parquet", SPLIT_SCHEMA)["pool"] == "clean"
    net, _ = artifacts.load_model(run / "final_train")
    clean = meca.vouched(first, labels, label, engine.predict(net, x).argmax(1).numpy())
    rounds = artifacts.read_table(run / "enhance" / "rounds.parquet", ROUNDS_SCHEMA)
    fitted = rounds["fitted"][rounds["round"] == rounds["round"].max()]  # by the enhanced model, its last round
    back = np.flatnonzero(clean & (labels == label) & fitted)  # returned, as in `identify`
    weight = meca.balance_weights(clean, labels, label, back)
    print(f"suspect label {label}: first pass {int(first.sum())} clean, {int((first & (labels == label)).sum())} of "
          f"the label; second pass {int(clean.sum())} clean, {int((clean & (labels == label)).sum())} of the label, "
          f"{len(back)} returned at weight {weight[back].max() if len(back) else 0:.2f}")
    truth = data.parent / "samples.parquet"
    if truth.exists():  # ground truth, for the diagnosis only
        poison = artifacts.read_table(truth, SAMPLE_SCHEMA)["is_poison"]
        print(f"ground truth: poison in the clean pool {int((first & poison).sum())} after the first pass, "
              f"{int((clean & poison).sum())} after the second")
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(run, args.out, ignore=shutil.ignore_patterns(*LATER))
    stages.write_split(clean, args.out / "identify" / "split.parquet", weight=weight)
    print(f"next: unpoison rerun --run {args.out} --stage final_train --downstream --no-mlflow")
    return 0


if __name__ == "__main__":
    sys.exit(main())
