"""The local runner: each defense as a sequence of stage functions in one process; MLflow records the finished run
(a parent run, one child run per stage).

A run writes into `<out>/<name>.partial/` and is renamed to `<out>/<name>/` only when every stage has finished,
so a folder without the suffix always holds a complete run.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from components import artifacts, stages, tracking
from components.attacks import build_attack
from components.config import RunConfig
from components.data import load_images
from components.defenses import meca
from components.errors import UnpoisonError
from components.models import MODELS

DEFENSES = ("none", "meca", "a-abl", "adv-train")


class Stages:
    """Calls stage functions into the run folder (each records stage.json), collecting wall times."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.timings = run_dir, {}

    def __call__(self, name: str, fn, *args, **kwargs) -> Path:
        out = self.run_dir / name
        record = stages.recorded(name, fn, out, *args, **kwargs)
        self.timings[name] = {"seconds": record["seconds"],
                              **{k: v for k, v in record["result"].items() if k == "samples_per_second"}}
        return out


def validate(defense: str, cfg: RunConfig) -> None:
    """Fail fast, before anything is written: defense, model, data, attack and target."""
    if defense not in DEFENSES:
        raise UnpoisonError(f"unknown defense '{defense}'; choose one of: {', '.join(DEFENSES)}")
    if cfg.model not in MODELS:
        raise UnpoisonError(f"unknown model '{cfg.model}'; choose one of: {', '.join(MODELS)}")
    train = load_images(cfg.data, "train")
    load_images(cfg.data, "test")
    build_attack(cfg.attack.name, target=cfg.attack.target, rate=cfg.attack.rate, seed=cfg.attack.seed,
                 num_classes=train.num_classes, **cfg.attack.params)


def run(defense: str, cfg: RunConfig, out_root: Path, *, mlflow_uri: str | None, name: str | None = None) -> Path:
    validate(defense, cfg)
    name = name or f"{defense}-{cfg.attack.name}-{datetime.now():%Y%m%d-%H%M%S}"
    final_dir = Path(out_root) / name
    if final_dir.exists():
        raise UnpoisonError(f"run folder '{final_dir}' already exists; pass another --name or remove it")
    run_dir = Path(out_root) / f"{name}.partial"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    artifacts.write_json({"defense": defense, "config": cfg.model_dump()}, run_dir / "config.json")
    st = Stages(run_dir)
    PIPELINES[defense](st, cfg, run_dir)
    m = artifacts.read_json(run_dir / "evaluate" / "metrics.json")
    m["stages"] = st.timings
    m["wall_seconds"] = sum(t["seconds"] for t in st.timings.values())
    artifacts.write_json(m, run_dir / "metrics.json")
    shutil.copy(run_dir / "evaluate" / "report.md", run_dir / "report.md")
    run_dir.rename(final_dir)
    if mlflow_uri:
        tracking.record_pipeline_run(name, defense, cfg.model_dump(),
                                     {s: (str(final_dir / s), str(final_dir / s)) for s in st.timings},
                                     uri=mlflow_uri, tags={"unpoison.engine": "local"})
    return final_dir


def _info(defense: str, cfg: RunConfig, st: Stages) -> dict:
    return {"defense": defense, "protocol": cfg.protocol, "model": cfg.model, "stages": dict(st.timings)}


def pipeline_none(st: Stages, cfg: RunConfig, run_dir: Path) -> None:
    """No defense: plain training on the poisoned set with the same engine (the reference for DER)."""
    poisoned = st("poison", stages.poison, cfg.data, cfg.attack, train_limit=cfg.train_limit)
    monitor = stages.Monitor(cfg.data, poisoned / "attack.json")
    model = st("train", stages.train, poisoned / "dataset.npz", params=cfg.train.model_copy(update={"seed": cfg.seed}),
               model_name=cfg.model, monitor=monitor, desc="no defense")
    st("evaluate", stages.evaluate_defense, data=cfg.data, defense="none", info=_info("none", cfg, st),
       dirs={"poison": poisoned, "train": model})


def pipeline_meca(st: Stages, cfg: RunConfig, run_dir: Path) -> None:
    """MeCa: warm-up (= the no-defense training), KL scoring, partition, enhancement, identification, clean
    training, relabel and fine-tune, evaluation."""
    p, seed = cfg.meca, cfg.seed
    train_params = cfg.train.model_copy(update={"seed": seed})
    poisoned = st("poison", stages.poison, cfg.data, cfg.attack, train_limit=cfg.train_limit)
    data = poisoned / "dataset.npz"
    monitor = stages.Monitor(cfg.data, poisoned / "attack.json")
    warm = st("warmup", stages.train, data, params=train_params, model_name=cfg.model, monitor=monitor, desc="warm-up")
    scored = st("score", stages.score_kl, data, warm, params=p, seed=seed)
    part = st("partition", stages.partition_meca, scored / "scores.parquet", params=p)
    enhanced = st("enhance", stages.enhance_meca, data, warm, part / "split.parquet", params=p, base=train_params,
                  seed=seed)
    ident = st("identify", stages.identify_clean, data, enhanced / "model")
    final = cfg.final_params().model_copy(update={"seed": seed})
    clean = st("final_train", stages.train, data, params=final, model_name=cfg.model,
               split=ident / "split.parquet", monitor=monitor, desc="clean model")
    relabelled = st("relabel_finetune", stages.relabel_finetune, data, ident / "split.parquet", clean,
                    params=meca.finetune_params(train_params, p), monitor=monitor)
    st("evaluate", stages.evaluate_defense, data=cfg.data, defense="meca", info=_info("meca", cfg, st),
       dirs={"poison": poisoned, "warmup": warm, "score": scored, "partition": part, "enhance": enhanced,
             "identify": ident, "final_train": clean, "relabel_finetune": relabelled})


def pipeline_aabl(st: Stages, cfg: RunConfig, run_dir: Path) -> None:
    """A-ABL: naive training (stage 1, also the no-defense reference), iFGSM + SCE scoring and Otsu split (stage 2),
    PGD adversarial training from scratch on the vulnerable part (stage 3), evaluation with robust accuracy."""
    poisoned = st("poison", stages.poison, cfg.data, cfg.attack, train_limit=cfg.train_limit)
    data = poisoned / "dataset.npz"
    monitor = stages.Monitor(cfg.data, poisoned / "attack.json")
    warm = st("warmup", stages.train, data, params=cfg.aabl_warmup_params(), model_name=cfg.model, monitor=monitor,
              desc="warm-up")
    scored = st("score", stages.score_adv_sce, data, warm, params=cfg.aabl)
    part = st("partition", stages.partition_otsu, scored / "scores.parquet", params=cfg.aabl)
    robust = st("final_train", stages.train, data, params=cfg.aabl_final_params(), model_name=cfg.model,
                split=part / "split.parquet", adversarial=cfg.aabl, monitor=monitor, desc="adversarial training")
    st("evaluate", stages.evaluate_defense, data=cfg.data, defense="a-abl", info=_info("a-abl", cfg, st), pgd=cfg.aabl,
       dirs={"poison": poisoned, "warmup": warm, "score": scored, "partition": part, "final_train": robust})


def pipeline_adv_train(st: Stages, cfg: RunConfig, run_dir: Path) -> None:
    """A-ABL's "Adv. Train" baseline: PGD adversarial training on the whole poisoned set, beside the naive model."""
    poisoned = st("poison", stages.poison, cfg.data, cfg.attack, train_limit=cfg.train_limit)
    data = poisoned / "dataset.npz"
    monitor = stages.Monitor(cfg.data, poisoned / "attack.json")
    warm = st("warmup", stages.train, data, params=cfg.aabl_warmup_params(), model_name=cfg.model, monitor=monitor,
              desc="naive training")
    robust = st("final_train", stages.train, data, params=cfg.aabl_final_params(), model_name=cfg.model,
                adversarial=cfg.aabl, monitor=monitor, desc="adversarial training")
    st("evaluate", stages.evaluate_defense, data=cfg.data, defense="adv-train", info=_info("adv-train", cfg, st),
       pgd=cfg.aabl, dirs={"poison": poisoned, "warmup": warm, "final_train": robust})


PIPELINES = {"none": pipeline_none, "meca": pipeline_meca, "a-abl": pipeline_aabl, "adv-train": pipeline_adv_train}
