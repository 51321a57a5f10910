"""The stage functions as KFP components: the only module of the library that imports kfp.
(No `from __future__ import annotations` here: KFP reads the real annotation objects.)

A few generic components run any declared stage of any defense (components/defenses/base.py): they receive the
defense and stage names, the configuration keys the stage declares it reads (only those are bound to pipeline
parameters, the others keep their constant defaults, so a task's cache key is what it reads; `section` is the
defense's own section), and the upstream stage outputs in numbered slots with their stage names in `upstream`. The pipeline
builder gives each task its stage's name. Each component calls one stage function through `stages.recorded`,
which writes `stage.json` (result, wall time, a unique execution id) into the output so that tracking can tell a
fresh execution from one served by the cache. Three bookkeeping components track the run in MLflow: `track_start`
opens its parent run, `track` finishes it, `track_exit` (the exit handler) fails it when a task failed; each stage
logs its own child run while it runs (components/runner.py). A stage that raises an UnpoisonError (bad
configuration or data) does not fail its task, so that KFP does not retry it; the run fails in `track`
(components/runner.py, `guarded`). Components are lightweight Python components on the stage image, with the
package preinstalled (`install_kfp_package=False`) and every import inside the function body, so the same component
runs in a pod and under `kfp.local.SubprocessRunner(use_venv=False)`. Artifacts are folders.

The data-reading component (`poison`, `ingest`) takes `data_hash`, the fingerprint of what `data` holds
(`components.data.source_fingerprint`, computed where the run is submitted), unused by the stage: as an input it is
part of the task's cache key, so changed data under the same path or prefix is read again, and every stage after it
gets a new input artifact. The image is `STAGE_IMAGE` unless the pipeline builder sets another on every task.
"""

import os

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

STAGE_IMAGE = os.environ.get("UNPOISON_STAGE_IMAGE", "ghcr.io/unpoison/unpoison-stage:0.1.0")
SLOTS = 16  # upstream inputs a generic component takes: more than any declared stage reads


def component(fn):
    return dsl.component(fn, base_image=STAGE_IMAGE, install_kfp_package=False)


@component
def poison(data: str, attack: dict, train_limit: int, dataset: Output[Dataset], truth: Output[Dataset],
           data_hash: str = ""):
    """Poison injection: the poisoned set (dataset.npz, attack.json, sources) and, apart, the ground-truth table."""
    from components.runner import data_task

    data_task("poison", data, attack, train_limit, dataset.path, truth.path)


@component
def ingest(data: str, attack: dict, train_limit: int, dataset: Output[Dataset], truth: Output[Dataset],
           data_hash: str = ""):
    """The data set as delivered: nothing injected; ground truth apart, when the source carries it."""
    from components.runner import data_task

    data_task("ingest", data, attack, train_limit, dataset.path, truth.path)


@component
def stage_dataset(defense: str, stage: str, delivered: bool, upstream: list, out: Output[Dataset],
                  data: str = "", protocol: str = "", train_limit: int = 0, model: str = "", seed: int = 0,
                  attack: dict = {}, train: dict = {}, final: dict = {}, section: dict = {},
                  in0: Input[Artifact] = None, in1: Input[Artifact] = None, in2: Input[Artifact] = None,
                  in3: Input[Artifact] = None, in4: Input[Artifact] = None, in5: Input[Artifact] = None,
                  in6: Input[Artifact] = None, in7: Input[Artifact] = None, in8: Input[Artifact] = None,
                  in9: Input[Artifact] = None, in10: Input[Artifact] = None, in11: Input[Artifact] = None,
                  in12: Input[Artifact] = None, in13: Input[Artifact] = None, in14: Input[Artifact] = None,
                  in15: Input[Artifact] = None):
    """A declared stage whose output is a data set, score table or split (`upstream[i]` names slot `in<i>`)."""
    from components.runner import run_task

    given = dict(data=data, protocol=protocol, train_limit=train_limit, model=model, seed=seed, attack=attack,
                 train=train, final=final, section=section)
    slots = [in0, in1, in2, in3, in4, in5, in6, in7, in8, in9, in10, in11, in12, in13, in14, in15]
    run_task(defense, stage, delivered, given, upstream, slots, out.path, out.uri)


@component
def stage_model(defense: str, stage: str, delivered: bool, upstream: list, out: Output[Model],
                data: str = "", protocol: str = "", train_limit: int = 0, model: str = "", seed: int = 0,
                attack: dict = {}, train: dict = {}, final: dict = {}, section: dict = {},
                in0: Input[Artifact] = None, in1: Input[Artifact] = None, in2: Input[Artifact] = None,
                in3: Input[Artifact] = None, in4: Input[Artifact] = None, in5: Input[Artifact] = None,
                in6: Input[Artifact] = None, in7: Input[Artifact] = None, in8: Input[Artifact] = None,
                in9: Input[Artifact] = None, in10: Input[Artifact] = None, in11: Input[Artifact] = None,
                in12: Input[Artifact] = None, in13: Input[Artifact] = None, in14: Input[Artifact] = None,
                in15: Input[Artifact] = None):
    """A declared stage whose output is a model (`upstream[i]` names slot `in<i>`)."""
    from components.runner import run_task

    given = dict(data=data, protocol=protocol, train_limit=train_limit, model=model, seed=seed, attack=attack,
                 train=train, final=final, section=section)
    slots = [in0, in1, in2, in3, in4, in5, in6, in7, in8, in9, in10, in11, in12, in13, in14, in15]
    run_task(defense, stage, delivered, given, upstream, slots, out.path, out.uri)


@component
def evaluate(defense: str, delivered: bool, upstream: list, metrics: Output[Metrics], report: Output[Markdown],
             data: str = "", protocol: str = "", train_limit: int = 0, model: str = "", seed: int = 0,
             attack: dict = {}, train: dict = {}, final: dict = {}, section: dict = {},
             in0: Input[Artifact] = None, in1: Input[Artifact] = None,
             in2: Input[Artifact] = None, in3: Input[Artifact] = None, in4: Input[Artifact] = None,
             in5: Input[Artifact] = None, in6: Input[Artifact] = None, in7: Input[Artifact] = None,
             in8: Input[Artifact] = None, in9: Input[Artifact] = None, in10: Input[Artifact] = None,
             in11: Input[Artifact] = None, in12: Input[Artifact] = None, in13: Input[Artifact] = None,
             in14: Input[Artifact] = None, in15: Input[Artifact] = None):
    """ACC, ASR, DER, target-class ACC, detection, suspects and the report; the only task that reads ground truth."""
    import shutil
    from pathlib import Path

    from components.runner import run_task

    given = dict(data=data, protocol=protocol, train_limit=train_limit, model=model, seed=seed, attack=attack,
                 train=train, final=final, section=section)
    slots = [in0, in1, in2, in3, in4, in5, in6, in7, in8, in9, in10, in11, in12, in13, in14, in15]
    record = run_task(defense, "evaluate", delivered, given, upstream, slots, metrics.path)
    if record is None:  # a stage stopped on a user error: no metrics; `track` fails the run with the message
        Path(report.path).write_text("No report: a stage stopped on a user error (see the `track` task).\n")
        return
    shutil.copy(Path(metrics.path) / "report.md", report.path)
    for key, value in record["result"].items():
        metrics.log_metric(key, value)


@component
def track_start(run_id: str, defense: str, data: str = "", protocol: str = "", train_limit: int = 0,
                model: str = "", seed: int = 0, attack: dict = {}, train: dict = {}, final: dict = {},
                section: dict = {}) -> str:
    """Open the MLflow parent run of this pipeline run (when MLFLOW_TRACKING_URI is set), status RUNNING, tagged with
    the KFP run id, so that every stage task logs its child run into it while it runs. Never cached. Returns the
    MLflow run id ('' without MLflow)."""
    from components.runner import open_kfp_run

    given = dict(data=data, protocol=protocol, train_limit=train_limit, model=model, seed=seed, attack=attack,
                 train=train, final=final, section=section)
    return open_kfp_run(run_id, defense, given)


@component
def track_exit(run_id: str, status: dsl.PipelineTaskFinalStatus):
    """The exit handler: runs when every other task has ended, failed or not; marks the MLflow parent run FAILED
    with the failing stage's error unless the pipeline succeeded, and closes the child runs of killed pods."""
    from components.runner import close_kfp_run

    close_kfp_run(run_id, status.state, status.error_message)


@component
def track(run_id: str, defense: str, delivered: bool, upstream: list,
          data: str = "", protocol: str = "", train_limit: int = 0, model: str = "", seed: int = 0,
          attack: dict = {}, train: dict = {}, final: dict = {}, section: dict = {},
          in0: Input[Artifact] = None, in1: Input[Artifact] = None, in2: Input[Artifact] = None,
          in3: Input[Artifact] = None, in4: Input[Artifact] = None, in5: Input[Artifact] = None,
          in6: Input[Artifact] = None, in7: Input[Artifact] = None, in8: Input[Artifact] = None,
          in9: Input[Artifact] = None, in10: Input[Artifact] = None, in11: Input[Artifact] = None,
          in12: Input[Artifact] = None, in13: Input[Artifact] = None, in14: Input[Artifact] = None,
          in15: Input[Artifact] = None) -> str:
    """Finish the pipeline's MLflow parent run when MLFLOW_TRACKING_URI is set: the evaluation summary, the model,
    the data set, a child run for each stage served from the cache (tagged with the run that produced it), status
    FINISHED; or fail the run on a stage's user error. Never cached. Returns the MLflow parent run id ('' without
    MLflow)."""
    from components.runner import track_run

    given = dict(data=data, protocol=protocol, train_limit=train_limit, model=model, seed=seed, attack=attack,
                 train=train, final=final, section=section)
    slots = [in0, in1, in2, in3, in4, in5, in6, in7, in8, in9, in10, in11, in12, in13, in14, in15]
    return track_run(run_id, defense, delivered, given, upstream, slots)
