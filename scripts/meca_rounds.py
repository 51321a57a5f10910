"""MeCa's enhancement rounds, round by round, with ground truth: where the enhancement loses the poison and the target
class (issue "MeCa must remove the Blend, SIG and Trojan backdoors too", item 2). A research tool, not a defense.

For each attack it poisons the protocol's training set and trains the warm-up model once (kept in --out and reused),
then, for each variant of MeCa's settings, scores and partitions as the pipeline does and runs the enhancement for
--rounds rounds. After every round it prints what a defender observes (fit shares of the whole set, of the kept and of
the unlearned part, of the target label and of the others) and what identification would give if the enhancement
stopped there (identification calls clean every sample the enhanced model misclassifies): poison left in the clean
pool and clean target-class samples lost from it. Stopping after round e is the same as running e + 1 rounds, so one
long run shows every stopping point.

    .venv/bin/python scripts/meca_rounds.py --data ../shared/datasets/cifar10 --attacks blend,sig,trojan \\
        --variant current: --variant reference:round0_learn=true,unlearn_lr=0.005 --rounds 5 --out runs/meca-rounds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components import artifacts, stages  # noqa: E402
from components.artifacts import ROUNDS_SCHEMA, SAMPLE_SCHEMA  # noqa: E402
from components.config import load_config, parse_overrides  # noqa: E402
from components.defenses import meca  # noqa: E402


def warm(cfg, folder: Path) -> None:
    """The poisoned data set and the warm-up model (the no-defense training), made once per attack."""
    if not (folder / "poison" / "stage.json").exists():
        stages.recorded("poison", stages.poison, folder / "poison", cfg.data, cfg.attack, train_limit=cfg.train_limit)
    if not (folder / "warmup" / "stage.json").exists():
        stages.recorded("warmup", stages.train, folder / "warmup", folder / "poison" / "dataset.npz",
                        params=cfg.train.model_copy(update={"seed": cfg.seed}), model_name=cfg.model, desc="warm-up")


def variant(cfg, folder: Path, params: meca.MecaParams) -> list[dict]:
    """Score, partition and enhance with `params`; per round, the observed shares and the identification figures."""
    data, warmup = folder / "poison" / "dataset.npz", folder / "warmup"
    truth = artifacts.read_table(folder / "poison" / "samples.parquet", SAMPLE_SCHEMA)
    poison, target = truth["is_poison"], cfg.attack.target
    clean_target = ~poison & (truth["true_label"] == target)
    out = folder / "variants" / json.dumps(params.model_dump(exclude_defaults=True), sort_keys=True).replace('"', "")
    meca.score_kl(data, warmup, out / "score", params=params, seed=cfg.seed)
    meca.partition_stage(out / "score" / "scores.parquet", out / "partition", params=params)
    meca.enhance_stage(data, warmup, out / "partition" / "split.parquet", out / "enhance", params=params,
                       base=cfg.train.model_copy(update={"seed": cfg.seed}), seed=cfg.seed)
    table = artifacts.read_table(out / "enhance" / "rounds.parquet", ROUNDS_SCHEMA)
    observed = artifacts.read_json(out / "enhance" / "rounds.json")
    rows = []
    for obs in observed:
        sel = table["round"] == obs["round"]
        fitted = table["fitted"][sel]
        labels = np.asarray(obs["fit_by_label"])
        rows.append({**{k: obs[k] for k in ("round", "fit_share", "fit_kept", "fit_unlearned")},
                     "fit_target_label": float(labels[target]),
                     "fit_other_labels": float(np.delete(labels, target).mean()),
                     "poison_fitted": float(fitted[poison].mean()),
                     "poison_left_in_clean": int((~fitted & poison).sum()),
                     "clean_target_lost": int((fitted & clean_target).sum()),
                     "clean_pool": int((~fitted).sum())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--protocol", default="cpu")
    parser.add_argument("--attacks", default="badnets,blend,sig,trojan")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="MeCa settings to try (meca.* keys without the prefix); repeatable")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run settings, e.g. seed=1")
    parser.add_argument("--out", type=Path, default=Path("runs/meca-rounds"))
    args = parser.parse_args()
    variants = {}
    for v in args.variant or ["current:"]:
        name, _, settings = v.partition(":")
        variants[name] = {k: val for k, val in parse_overrides([s for s in settings.split(",") if s]).items()}
    summary = args.out / "summary.json"  # earlier invocations' results stay, a rerun of a cell replaces its entry
    results = artifacts.read_json(summary) if summary.exists() else []
    for attack in args.attacks.split(","):
        cfg = load_config(args.protocol, {**parse_overrides(args.set), "attack.name": attack, "data": args.data})
        folder = args.out / f"{attack}-t{cfg.attack.target}-s{cfg.seed}"
        warm(cfg, folder)
        for name, settings in variants.items():
            params = cfg.meca.model_copy(update={**settings, "rounds": args.rounds})
            params = meca.MecaParams.model_validate(params.model_dump())
            t0 = time.perf_counter()
            rows = variant(cfg, folder, params)
            print(f"\n{attack} {name} ({time.perf_counter() - t0:.0f} s): {json.dumps(settings)}")
            print(" | ".join(rows[0]))
            for r in rows:
                print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()))
            results = [r for r in results if (r["attack"], r["variant"]) != (attack, name)]
            results.append({"attack": attack, "variant": name, "settings": settings, "rounds": rows})
            artifacts.write_json(results, summary)


if __name__ == "__main__":
    main()
