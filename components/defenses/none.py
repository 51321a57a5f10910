"""No defense: plain training on the (poisoned) data set with the same engine, the reference DER compares against."""

from __future__ import annotations

from components import stages
from components.defenses.base import DATA, Defense, Evaluation, Stage

DEFENSE = Defense(
    name="none",
    description="No defense: plain training on the poisoned set (DER's reference).",
    stages=(Stage("train", stages.train, {"dataset": f"{DATA}/dataset.npz"}, kind="model", monitor=True,
                  params=lambda c: {"params": c.train.model_copy(update={"seed": c.seed}), "model_name": c.model,
                                    "desc": "no defense"},
                  reads=("train", "seed", "model")),),
    evaluation=Evaluation(models={"nodef": "train"}, defended="nodef"),
)
