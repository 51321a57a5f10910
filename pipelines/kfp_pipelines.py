"""The defenses as KFP pipelines, their compilation, and their local execution under kfp.local.

Pipeline parameters are the CLI's configuration (`RunConfig`): `data`, `protocol`, `train_limit`, `model`, `seed`,
`attack`, `train`, `final`, `meca` and `aabl` (the last five as dicts). Every training and scoring task asks for a GPU node
(`on_gpu`); every task reads the S3 and MLflow credentials from Kubernetes Secrets as environment variables.
"""


import logging
import os
import re
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Dataset

from components import kfp_components as c
from components.config import RunConfig

COMPILED = Path(__file__).resolve().parent / "compiled"
S3_SECRET = "unpoison-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, S3_ENDPOINT
MLFLOW_SECRET = "unpoison-mlflow"  # key MLFLOW_TRACKING_URI
GPU_NODE_SELECTOR = os.environ.get("UNPOISON_GPU_NODE_SELECTOR", "")  # "label=value", read at compile time


def without_none(tree):
    """Pipeline parameter defaults cannot hold None: leave such keys out (the typed params default them to None)."""
    if isinstance(tree, dict):
        return {k: without_none(v) for k, v in tree.items() if v is not None}
    return tree


DEFAULTS = without_none(RunConfig().model_dump())


def with_secrets(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The object store and MLflow credentials as env vars from Secrets (never component inputs)."""
    keys = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT"]
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={k: k for k in keys})
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET, optional=True,  # without it: no tracking
                                 secret_key_to_env={"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
    return task


def on_gpu(task: dsl.PipelineTask, *, cpu: str = "4", memory: str = "16Gi") -> dsl.PipelineTask:
    """A training or scoring task: one NVIDIA GPU, its toleration, the optional node selector, CPU and memory
    requests, retries with backoff, secrets as env, caching on."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    if GPU_NODE_SELECTOR:
        key, _, value = GPU_NODE_SELECTOR.partition("=")
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    return on_cpu(task, cpu=cpu, memory=memory)


def on_cpu(task: dsl.PipelineTask, *, cpu: str = "2", memory: str = "8Gi") -> dsl.PipelineTask:
    task.set_cpu_request(cpu).set_memory_request(memory)
    task.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2)
    task.set_caching_options(enable_caching=True)
    return with_secrets(task)


def _track(defense: str, params: dict, stage_outputs: dict):
    """The last task: record the run in MLflow (`params`: the pipeline's parameters)."""
    p = dict(params)
    p["model_name"], p["train_params"] = p.pop("model"), p.pop("train")
    task = c.track(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, defense=defense, **p, **stage_outputs)
    with_secrets(task).set_caching_options(enable_caching=False)  # bookkeeping: runs every time
    task.set_cpu_request("1").set_memory_request("2Gi")
    return task


def _evaluate_and_track(defense: str, params: dict, poisoned: dsl.PipelineTask, stage_outputs: dict):
    """The last two tasks of every defense: evaluation (the only task that reads the ground truth), then tracking.
    `params`: the pipeline's parameters; `stage_outputs`: stage name -> its output artifact."""
    dataset = poisoned.outputs["poisoned"]
    evaluated = on_gpu(c.evaluate(data=params["data"], defense=defense, protocol=params["protocol"],
                                  model_name=params["model"], poison=dataset, truth=poisoned.outputs["truth"],
                                  aabl=params["aabl"], **stage_outputs))
    _track(defense, params, {"poison": dataset, "evaluate": evaluated.outputs["metrics"], **stage_outputs})
    return evaluated.outputs["metrics"]


@dsl.pipeline(name="unpoison-none", description="No defense: plain training on the poisoned set (DER's reference).")
def none_pipeline(data: str = DEFAULTS["data"], protocol: str = "cpu", train_limit: int = 10000,
                  model: str = DEFAULTS["model"], seed: int = 0, attack: dict = DEFAULTS["attack"],
                  train: dict = DEFAULTS["train"], final: dict = {}, meca: dict = DEFAULTS["meca"],
                  aabl: dict = DEFAULTS["aabl"]) -> dsl.Metrics:
    params = dict(locals())  # the pipeline's parameters, for evaluation and tracking
    poisoned = on_cpu(c.poison(data=data, attack=attack, train_limit=train_limit))
    trained = on_gpu(c.train(dataset=poisoned.outputs["poisoned"], params=train, overrides={}, model_name=model,
                             monitor_data=data, stage="train"))
    return _evaluate_and_track("none", params, poisoned, {"train": trained.outputs["model"]})


@dsl.pipeline(name="unpoison-meca", description="MeCa (paper 000): perturbation scoring, partition, backdoor "
                                                 "enhancement, clean training, relabel and fine-tune.")
def meca_pipeline(data: str = DEFAULTS["data"], protocol: str = "cpu", train_limit: int = 10000,
                  model: str = DEFAULTS["model"], seed: int = 0, attack: dict = DEFAULTS["attack"],
                  train: dict = DEFAULTS["train"], final: dict = {}, meca: dict = DEFAULTS["meca"],
                  aabl: dict = DEFAULTS["aabl"]) -> dsl.Metrics:
    params = dict(locals())  # the pipeline's parameters, for evaluation and tracking
    poisoned = on_cpu(c.poison(data=data, attack=attack, train_limit=train_limit))
    dataset = poisoned.outputs["poisoned"]
    warm = on_gpu(c.train(dataset=dataset, params=train, overrides={}, model_name=model, monitor_data=data, stage="warmup"))
    scored = on_gpu(c.score_kl(dataset=dataset, model=warm.outputs["model"], meca=meca, seed=seed))
    part = on_cpu(c.partition_meca(scores=scored.outputs["scores"], meca=meca))
    enhanced = on_gpu(c.enhance_meca(dataset=dataset, model=warm.outputs["model"], split=part.outputs["split"],
                                     meca=meca, train=train, seed=seed))
    ident = on_gpu(c.identify_clean(dataset=dataset, enhanced=enhanced.outputs["enhanced"]))
    clean = on_gpu(c.train(dataset=dataset, split=ident.outputs["split"], params=train, overrides=final,
                           model_name=model,
                           monitor_data=data, stage="final_train"))
    fine = on_gpu(c.relabel_finetune(dataset=dataset, split=ident.outputs["split"], model=clean.outputs["model"],
                                     train=train, meca=meca, monitor_data=data))
    stage_outputs = {"warmup": warm.outputs["model"], "score": scored.outputs["scores"], "partition": part.outputs["split"],
                     "enhance": enhanced.outputs["enhanced"], "identify": ident.outputs["split"],
                     "final_train": clean.outputs["model"], "relabel_finetune": fine.outputs["finetuned"]}
    return _evaluate_and_track("meca", params, poisoned, stage_outputs)


@dsl.pipeline(name="unpoison-a-abl", description="A-ABL (paper 001): naive training, iFGSM + SCE scoring, Otsu split, "
                                                  "PGD adversarial training on the vulnerable part.")
def aabl_pipeline(data: str = DEFAULTS["data"], protocol: str = "cpu", train_limit: int = 10000,
                  model: str = DEFAULTS["model"], seed: int = 0, attack: dict = DEFAULTS["attack"],
                  train: dict = DEFAULTS["train"], final: dict = {}, meca: dict = DEFAULTS["meca"],
                  aabl: dict = DEFAULTS["aabl"]) -> dsl.Metrics:
    params = dict(locals())  # the pipeline's parameters, for evaluation and tracking
    poisoned = on_cpu(c.poison(data=data, attack=attack, train_limit=train_limit))
    dataset = poisoned.outputs["poisoned"]
    common = dict(dataset=dataset, train=train, final=final, aabl=aabl, model_name=model, monitor_data=data)
    warm = on_gpu(c.train_aabl(stage="warmup", **common))
    scored = on_gpu(c.score_adv_sce(dataset=dataset, model=warm.outputs["model"], aabl=aabl))
    part = on_cpu(c.partition_otsu(scores=scored.outputs["scores"], aabl=aabl))
    robust = on_gpu(c.train_aabl(stage="final_train", split=part.outputs["split"], **common))
    stage_outputs = {"warmup": warm.outputs["model"], "score": scored.outputs["scores"],
                     "partition": part.outputs["split"], "final_train": robust.outputs["model"]}
    return _evaluate_and_track("a-abl", params, poisoned, stage_outputs)


@dsl.pipeline(name="unpoison-adv-train", description="A-ABL's Adv. Train baseline: PGD adversarial training on the "
                                                      "whole poisoned set, beside naive training.")
def adv_train_pipeline(data: str = DEFAULTS["data"], protocol: str = "cpu", train_limit: int = 10000,
                       model: str = DEFAULTS["model"], seed: int = 0, attack: dict = DEFAULTS["attack"],
                       train: dict = DEFAULTS["train"], final: dict = {}, meca: dict = DEFAULTS["meca"],
                       aabl: dict = DEFAULTS["aabl"]) -> dsl.Metrics:
    params = dict(locals())  # the pipeline's parameters, for evaluation and tracking
    poisoned = on_cpu(c.poison(data=data, attack=attack, train_limit=train_limit))
    dataset = poisoned.outputs["poisoned"]
    common = dict(dataset=dataset, train=train, final=final, aabl=aabl, model_name=model, monitor_data=data)
    warm = on_gpu(c.train_aabl(stage="warmup", **common))
    robust = on_gpu(c.train_aabl(stage="final_train", **common))
    stage_outputs = {"warmup": warm.outputs["model"], "final_train": robust.outputs["model"]}
    return _evaluate_and_track("adv-train", params, poisoned, stage_outputs)


@dsl.pipeline(name="unpoison-rerun-final-train",
              description="Rerun MeCa's final training alone on an earlier run's data set and split.")
def rerun_final_train(dataset_uri: str, split_uri: str, train: dict = DEFAULTS["train"], final: dict = {},
                      model: str = DEFAULTS["model"], data: str = DEFAULTS["data"]) -> dsl.Model:
    dataset = dsl.importer(artifact_uri=dataset_uri, artifact_class=Dataset, reimport=False)
    split = dsl.importer(artifact_uri=split_uri, artifact_class=Dataset, reimport=False)
    task = on_gpu(c.train(dataset=dataset.output, split=split.output, params=train, overrides=final, model_name=model,
                          monitor_data=data, stage="final_train"))
    return task.outputs["model"]


PIPELINES = {"none": none_pipeline, "meca": meca_pipeline, "a-abl": aabl_pipeline, "adv-train": adv_train_pipeline,
             "rerun-final_train": rerun_final_train}
# Which stage of an earlier run feeds each importer of a rerun pipeline.
RERUN_INPUTS = {"final_train": {"dataset_uri": "poison", "split_uri": "identify"}}


def arguments(cfg: RunConfig) -> dict:
    """Pipeline arguments from a validated configuration (the seed goes into the training params, as locally)."""
    return without_none({"data": cfg.data, "protocol": cfg.protocol, "train_limit": cfg.train_limit or 0,
                     "model": cfg.model, "seed": cfg.seed, "attack": cfg.attack.model_dump(),
                     "train": cfg.train.model_copy(update={"seed": cfg.seed}).model_dump(), "final": cfg.final,
                     "meca": cfg.meca.model_dump(), "aabl": cfg.aabl.model_dump()})


def compile_all(folder: Path = COMPILED) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, fn in PIPELINES.items():
        path = folder / f"{name}.yaml"
        compiler.Compiler().compile(fn, str(path))
        out.append(path)
    return out


class TaskLog(logging.Handler):
    """Collects the tasks kfp.local served from its cache (from its log) and, after the run, those it executed (the
    task folders of the new pipeline run folder: an executed task writes there, a cached one does not)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.executed, self.cached = [], []

    def emit(self, record):
        msg = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # kfp.local colours task names
        if m := re.search(r"Task '?([\w-]+)'? cache hit", msg):
            self.cached.append(m.group(1))


def run_local(pipeline, arguments: dict, root: Path, *, mlflow_uri: str | None = None) -> tuple[Path, TaskLog]:
    """Run a pipeline under kfp.local.SubprocessRunner(use_venv=False) with caching on (cache in root/.kfp_cache).
    Returns the folder of the pipeline's output artifact and the task log."""
    from kfp import local

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=True,
               cache_root=str(root / ".kfp_cache"))
    log = TaskLog()
    logger = logging.getLogger()
    old_level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    try:
        task = pipeline(**arguments)
    finally:
        logger.removeHandler(log)
        logger.setLevel(old_level)
        if mlflow_uri:
            os.environ.pop("MLFLOW_TRACKING_URI") if saved is None else os.environ.update(MLFLOW_TRACKING_URI=saved)
    new = [d for d in root.iterdir() if d not in before and d.is_dir() and not d.name.startswith(".")]
    log.executed = sorted(t.name for d in new for t in d.iterdir() if t.is_dir())
    return Path(task.output.path), log
