"""The stage functions as KFP components: the only module of the library that imports kfp.
(No `from __future__ import annotations` here: KFP reads the real annotation objects.)

Each component is a few lines: typed artifacts in and out, a call to one stage function through
`stages.recorded`, which also writes `stage.json` (params, result, wall time, a unique execution id) into the
component's main output so that tracking can tell a fresh execution from one served by the cache.
Components are lightweight Python components on the stage image, with the package preinstalled
(`install_kfp_package=False`) and every import inside the function body, so the same component runs in a pod and
under `kfp.local.SubprocessRunner(use_venv=False)`. Artifacts are folders.
"""


import os

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

STAGE_IMAGE = os.environ.get("UNPOISON_STAGE_IMAGE", "ghcr.io/unpoison/unpoison-stage:0.1.0")


def component(fn):
    return dsl.component(fn, base_image=STAGE_IMAGE, install_kfp_package=False)


@component
def poison(data: str, attack: dict, train_limit: int, poisoned: Output[Dataset], truth: Output[Dataset]):
    """Poison injection: the poisoned set (dataset.npz, attack.json) and, apart, the ground-truth sample table."""
    from components import stages
    from components.config import AttackParams

    stages.recorded("poison", stages.poison, poisoned.path, data, AttackParams(**attack),
                    train_limit=train_limit or None, truth=truth.path)


@component
def train(dataset: Input[Dataset], params: dict, overrides: dict, model_name: str, monitor_data: str, stage: str,
          model: Output[Model], split: Input[Dataset] = None):
    """Warm-up / no-defense training on the whole set, or final training (params with the `final` overrides) on a
    split's clean pool."""
    from pathlib import Path

    from components import stages
    from components.config import TrainParams, final_params

    data = Path(dataset.path)
    monitor = stages.Monitor(monitor_data, data / "attack.json") if monitor_data else None
    stages.recorded(stage, stages.train, model.path, data / "dataset.npz",
                    params=final_params(TrainParams(**params), overrides),
                    model_name=model_name, split=Path(split.path) / "split.parquet" if split else None,
                    monitor=monitor)


@component
def score_kl(dataset: Input[Dataset], model: Input[Model], meca: dict, seed: int, scores: Output[Dataset]):
    """MeCa perturbation scoring (Eq. 3)."""
    from pathlib import Path

    from components import stages
    from components.config import MecaParams

    stages.recorded("score", stages.score_kl, scores.path, Path(dataset.path) / "dataset.npz", model.path,
                    params=MecaParams(**meca), seed=seed)


@component
def partition_meca(scores: Input[Dataset], meca: dict, split: Output[Dataset]):
    """MeCa round-0 partition by rate."""
    from pathlib import Path

    from components import stages
    from components.config import MecaParams

    stages.recorded("partition", stages.partition_meca, split.path, Path(scores.path) / "scores.parquet",
                    params=MecaParams(**meca))


@component
def enhance_meca(dataset: Input[Dataset], model: Input[Model], split: Input[Dataset], meca: dict, train: dict,
                 seed: int, enhanced: Output[Model]):
    """MeCa backdoor enhancement (Algorithm 2)."""
    from pathlib import Path

    from components import stages
    from components.config import MecaParams, TrainParams

    stages.recorded("enhance", stages.enhance_meca, enhanced.path, Path(dataset.path) / "dataset.npz", model.path,
                    Path(split.path) / "split.parquet", params=MecaParams(**meca), base=TrainParams(**train),
                    seed=seed)


@component
def train_aabl(dataset: Input[Dataset], train: dict, final: dict, aabl: dict, model_name: str, monitor_data: str,
               stage: str, model: Output[Model], split: Input[Dataset] = None):
    """A-ABL training: stage 1 (`warmup`: train with aabl.warmup) or stage 3 (`final_train`: PGD adversarial training
    with final and aabl.final, on the split's clean pool when a split is given)."""
    from pathlib import Path

    from components import stages
    from components.config import AablParams, TrainParams, aabl_params

    data, p = Path(dataset.path), AablParams(**aabl)
    monitor = stages.Monitor(monitor_data, data / "attack.json") if monitor_data else None
    stages.recorded(stage, stages.train, model.path, data / "dataset.npz",
                    params=aabl_params(TrainParams(**train), final, p, stage), model_name=model_name,
                    split=Path(split.path) / "split.parquet" if split else None, monitor=monitor,
                    adversarial=p if stage == "final_train" else None)


@component
def score_adv_sce(dataset: Input[Dataset], model: Input[Model], aabl: dict, scores: Output[Dataset]):
    """A-ABL stage 2: SCE of each sample's iFGSM adversarial example (and its natural SCE)."""
    from pathlib import Path

    from components import stages
    from components.config import AablParams

    stages.recorded("score", stages.score_adv_sce, scores.path, Path(dataset.path) / "dataset.npz", model.path,
                    params=AablParams(**aabl))


@component
def partition_otsu(scores: Input[Dataset], aabl: dict, split: Output[Dataset]):
    """A-ABL stage 2: Otsu's threshold on the adversarial SCE; the vulnerable part is kept."""
    from pathlib import Path

    from components import stages
    from components.config import AablParams

    stages.recorded("partition", stages.partition_otsu, split.path, Path(scores.path) / "scores.parquet",
                    params=AablParams(**aabl))


@component
def identify_clean(dataset: Input[Dataset], enhanced: Input[Model], split: Output[Dataset]):
    """MeCa: clean = misclassified by the enhanced model."""
    from pathlib import Path

    from components import stages

    stages.recorded("identify", stages.identify_clean, split.path, Path(dataset.path) / "dataset.npz",
                    Path(enhanced.path) / "model")


@component
def relabel_finetune(dataset: Input[Dataset], split: Input[Dataset], model: Input[Model], train: dict, meca: dict,
                     monitor_data: str, finetuned: Output[Model]):
    """MeCa relabel and fine-tune (section 4.2.4)."""
    from pathlib import Path

    from components import stages
    from components.config import MecaParams, TrainParams
    from components.defenses import meca as method

    data = Path(dataset.path)
    monitor = stages.Monitor(monitor_data, data / "attack.json") if monitor_data else None
    stages.recorded("relabel_finetune", stages.relabel_finetune, finetuned.path, data / "dataset.npz",
                    Path(split.path) / "split.parquet", model.path,
                    params=method.finetune_params(TrainParams(**train), MecaParams(**meca)), monitor=monitor)


@component
def evaluate(data: str, defense: str, protocol: str, model_name: str, poison: Input[Dataset],
             truth: Input[Dataset], metrics: Output[Metrics], report: Output[Markdown],
             train: Input[Model] = None, warmup: Input[Model] = None, score: Input[Dataset] = None,
             partition: Input[Dataset] = None, enhance: Input[Model] = None, identify: Input[Dataset] = None,
             final_train: Input[Model] = None, relabel_finetune: Input[Model] = None, aabl: dict = {}):
    """ACC, ASR, DER, detection (and RA for A-ABL) and the report; the only component that reads the ground truth."""
    import shutil
    from pathlib import Path

    from components import stages
    from components.config import AablParams

    given = {"poison": poison, "truth": truth, "train": train, "warmup": warmup, "score": score,
             "partition": partition, "enhance": enhance, "identify": identify, "final_train": final_train,
             "relabel_finetune": relabel_finetune}
    record = stages.recorded("evaluate", stages.evaluate_defense, metrics.path, data=data, defense=defense,
                             dirs={k: a.path for k, a in given.items() if a is not None},
                             info={"protocol": protocol, "model": model_name}, pgd=AablParams(**aabl))
    shutil.copy(Path(metrics.path) / "report.md", report.path)
    for key, value in record["result"].items():
        metrics.log_metric(key, value)


@component
def track(run_id: str, defense: str, protocol: str, data: str, train_limit: int, model_name: str, seed: int,
          attack: dict, train_params: dict, final: dict, meca: dict, aabl: dict, poison: Input[Dataset],
          evaluate: Input[Metrics],
          train: Input[Model] = None, warmup: Input[Model] = None, score: Input[Dataset] = None,
          partition: Input[Dataset] = None, enhance: Input[Model] = None, identify: Input[Dataset] = None,
          final_train: Input[Model] = None, relabel_finetune: Input[Model] = None) -> str:
    """Record the pipeline run in MLflow when MLFLOW_TRACKING_URI is set: a parent run tagged with the KFP run id,
    one child run per stage, a stage served from the cache tagged with the run that produced it. Never cached.
    Returns the MLflow parent run id ('' without MLflow)."""
    from components import tracking

    given = {"poison": poison, "train": train, "warmup": warmup, "score": score, "partition": partition,
             "enhance": enhance, "identify": identify, "final_train": final_train,
             "relabel_finetune": relabel_finetune, "evaluate": evaluate}
    config = {"protocol": protocol, "data": data, "train_limit": train_limit or None, "model": model_name,
              "seed": seed, "attack": attack, "train": train_params, "final": final, "meca": meca, "aabl": aabl}
    return tracking.record_pipeline_run(run_id, defense, config,
                                        {k: (a.path, a.uri) for k, a in given.items() if a is not None},
                                        tags={"unpoison.kfp_run_id": run_id})
