"""A declared stage run from artifact folders, as a KFP component runs it (and tracking of a KFP run).

The KFP components (components/kfp_components.py) are thin: they hand over the defense and stage names, the values
of the configuration keys the stage reads, and their input artifacts; this module rebuilds the configuration and
calls the same `run_stage` the local runner calls.

Retries and user errors. KFP 2.17 retries a failed task whatever made it fail: its RetryPolicy holds a count and a
backoff only (no exit-code filter), and the launcher that wraps a component exits 1 whatever the component's exit
code. A task failed by bad configuration or data would hold its GPU through every retry for the same error. So a
task never fails on an UnpoisonError (`guarded`): it records the error in its outputs and ends, later tasks pass
it on without running, and `track` (never retried, it reads every stage's output) fails the run with the message
and exit code USER_ERROR_EXIT. Whatever else ends a task fails it, and KFP retries it: an eviction, a preempted
node, the timeout, any other exception (a CUDA error), and an object store still unreachable or failing (5xx) after
the store's own retries (an UnpoisonError caused by such an error: the CLI reports it as one, KFP retries it).

Live MLflow tracking (components/tracking.py). Every task reads its KFP run id from the environment variable
KFP_RUN_ID (`kfp_run_id`): on a cluster the pod's label `pipeline/runid`, through the downward API; under kfp.local
`run_local` sets it. Not a task parameter: a parameter is part of a task's cache key, and one that changes with
every run would serve no stage from the cache. The pipeline's first task, `track_start`, opens the MLflow parent run
tagged with that id (`open_kfp_run`); each stage task finds it and logs its child run while it runs (`run_tracked`,
`data_task`); `track` finishes it (`track_run`), or fails it on a user error; the exit handler's task, `track_exit`,
fails it when any task failed and closes the child runs of killed pods (`close_kfp_run`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from components import artifacts, checkpoint, stages, store, tracking
from components.config import validate
from components.defenses import get
from components.defenses.base import Stage, run_stage
from components.errors import USER_ERROR_EXIT, USER_ERROR_FILE, UnpoisonError
from components.params import AttackParams


def config_from(defense: str, given: dict, reads: tuple[str, ...]):
    """The run configuration from a task's parameters: the keys in `reads`, the rest at their defaults."""
    d = get(defense)
    tree = {k: v for k, v in given.items() if k in reads and k != "section"}
    if d.section in reads or "section" in reads:
        tree[d.section] = given["section"]
    if not tree.get("train_limit"):  # a pipeline parameter cannot be None: 0 means the whole training split
        tree.pop("train_limit", None)
    return validate(tree, tree.get("protocol", "custom"))


def user_error(folders) -> dict | None:
    """The user error a task recorded in one of these artifact folders, if any."""
    for folder in folders:
        marker = Path(folder) / USER_ERROR_FILE
        if marker.is_file():
            return json.loads(marker.read_text())
    return None


def guarded(stage: str, outs: list, inputs, run) -> dict | None:
    """A task's stage (`run()`, which returns its record) that stops on a user error instead of failing the task:
    the UnpoisonError, or one an input already carries (the stage does not run then), goes into every output
    folder in `outs` as USER_ERROR_FILE, and the task ends with exit code 0, so KFP does not retry it (module
    docstring). Returns the record, or None when the stage stopped."""
    error = user_error(inputs)
    if error is None:
        try:
            return run()
        except UnpoisonError as e:
            if e.__cause__ is not None and store._transient(e.__cause__):
                raise  # the object store was unreachable or failed (5xx) past its own retries: KFP retries later
            error = {"stage": stage, "error": str(e)}
            print(f"unpoison: error: {e} (a user error: not retried; the run fails in track)", file=sys.stderr)
    for out in outs:  # every output must exist, or the launcher fails the task on the upload
        Path(out).mkdir(parents=True, exist_ok=True)
        artifacts.write_json(error, Path(out) / USER_ERROR_FILE)
    return None


CHECKPOINTS = "unpoison/checkpoints"  # key prefix of the mirrored checkpoints, in the bucket of the pipeline root


def checkpoint_prefix(out_uri: str | None, task: dict) -> str | None:
    """Where a KFP task mirrors its training checkpoints (components/checkpoint.py): s3://<bucket of its output
    URI>/unpoison/checkpoints/<sha256 of `task`>, or None when the output URI is not on S3 (kfp.local's folders,
    which outlive the process anyway).

    Not under the output URI: the launcher uploads the output folder only when the task succeeds, and whatever sits
    under an artifact's URI is downloaded with it by the tasks that read it. Keyed by `task` (defense, stage, the
    task's parameters and the URIs of its inputs: what KFP's cache key holds), not by the output URI: a retried
    attempt keeps its output URI (Argo retries the executor pod, the driver that chose the URI runs once), but a
    run submitted again after a pod that KFP did not retry gets new output URIs, while its upstream stages, served
    from the cache, keep theirs: so a resubmitted run resumes the interrupted stage too."""
    scheme, _, rest = (out_uri or "").partition("://")
    if scheme not in ("s3", "minio") or not rest.split("/", 1)[0]:  # KFP's default pipeline root: minio://mlpipeline/
        return None
    digest = hashlib.sha256(json.dumps(task, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return f"s3://{rest.split('/', 1)[0]}/{CHECKPOINTS}/{digest}"


def kfp_run_id(given: str = "") -> str:
    """This KFP run's id: KFP_RUN_ID (module docstring), else `given` (the run id placeholder a bookkeeping task
    takes; a stage task cannot, and without KFP_RUN_ID logs no live child run: `track` logs it afterwards)."""
    return os.environ.get("KFP_RUN_ID") or given


def stage_params(st: Stage, cfg) -> dict:
    """The configuration keys a stage reads, with their values: its child run's parameters."""
    tree = cfg.model_dump(mode="json")
    return {k: tree[k] for k in st.reads if k in tree}


def run_tracked(parent: tracking.Run | None, st: Stage, cfg, out: Path, dirs, data_name: str) -> dict:
    """`run_stage`, logged live as a child run of `parent` (none without one): parameters at the start, each epoch
    as it ends, the outputs at the end; FAILED with the error when the stage raises."""
    with tracking.stage_run(parent, st.name, params=stage_params(st, cfg), folder=out) as on_epoch:
        return run_stage(st, cfg, out, dirs, data_name, on_epoch=on_epoch)


def run_task(defense: str, stage: str, delivered: bool, given: dict, upstream: list[str], slots: list,
             out: str, out_uri: str | None = None) -> dict | None:
    """A declared stage of a KFP task (`guarded`), tracked live: its record, or None when it stopped on a user
    error. With the output's `out_uri`, its trainings' checkpoints are mirrored to the object store
    (`checkpoint_prefix`)."""
    dirs = {name: Path(a.path) for name, a in zip(upstream, slots) if a is not None}
    task = {"defense": defense, "stage": stage, "delivered": delivered, "given": given,
            "inputs": {name: a.uri for name, a in zip(upstream, slots) if a is not None}}

    def run():
        d = get(defense)
        st = d.stage(stage, delivered)
        cfg = config_from(defense, given, (*st.reads, *(("data",) if st.monitor else ())))
        with checkpoint.mirrored(checkpoint_prefix(out_uri, task)):
            return run_tracked(tracking.kfp_run(kfp_run_id()), st, cfg, Path(out), dirs, d.plan(delivered)[0].name)

    return guarded(stage, [out], dirs.values(), run)


def data_task(stage: str, data: str, attack: dict, train_limit: int, out: str, truth: str) -> dict | None:
    """The data stage of a KFP task, `poison` or `ingest` (`guarded`, tracked live): the data set into `out`, the
    ground truth apart into `truth`. `train_limit` 0 is the whole training split."""
    fn = stages.poison if stage == "poison" else stages.ingest

    def run():
        params = {"data": data, "attack": AttackParams(**attack), "train_limit": train_limit or None}
        logged = {**params, "attack": params["attack"].model_dump(mode="json")}
        with tracking.stage_run(tracking.kfp_run(kfp_run_id()), stage, params=logged, folder=Path(out)):
            return stages.recorded(stage, fn, out, params["data"], params["attack"],
                                   train_limit=params["train_limit"], truth=truth)

    return guarded(stage, [out, truth], [], run)


def finish(parent: tracking.Run | None, defense: str, delivered: bool, config: dict,
           stage_dirs: dict[str, tuple[str, str]]) -> str:
    """Finish a run's MLflow parent run (local engine or KFP): its stages (`stage_dirs`: stage -> (folder, artifact
    URI)), the defended model when its stage is among them, and the training data set with its content hash."""
    d = get(defense)
    defended = d.evaluation.models[d.evaluation.defended]
    data = Path(stage_dirs[d.plan(delivered)[0].name][0])
    return tracking.finish_run(
        parent, stage_dirs, final_model=defended if defended.split("/")[0] in stage_dirs else None,
        dataset={"name": "train", "source": config["data"],
                 "digest": artifacts.read_json(data / "dataset.json")["dataset_hash"]})


def _config(defense: str, given: dict) -> dict:
    """The run configuration as recorded, from a bookkeeping task's parameters (every pipeline parameter)."""
    d = get(defense)
    config = {k: v for k, v in given.items() if k != "section"}
    config["train_limit"] = config["train_limit"] or None
    if d.section:
        config[d.section] = given["section"]
    return config


def open_kfp_run(run_id: str, defense: str, given: dict) -> str:
    """Open the MLflow parent run of a KFP run, tagged `unpoison.kfp_run_id` (the first task). Returns its
    id ('' without MLflow)."""
    rid = kfp_run_id(run_id)
    parent = tracking.open_run(rid, defense, _config(defense, given), tags={"unpoison.kfp_run_id": rid})
    return parent.run_id if parent else ""


def track_run(run_id: str, defense: str, delivered: bool, given: dict, upstream: list[str], slots: list) -> str:
    """Finish the MLflow parent run of a KFP run from its stage artifacts (every parameter of the pipeline is in
    `given`; a parent the first task did not open is opened here). When a stage stopped on a user error, fail the run
    instead, with its message and exit code USER_ERROR_EXIT: this task is never retried, so the run fails once and
    shows why."""
    rid = kfp_run_id(run_id)
    error = user_error(a.path for a in slots if a is not None)
    if error is not None:
        message = f"stage {error['stage']} stopped: {error['error']}"
        print(f"unpoison: error: {message}", file=sys.stderr)
        tracking.fail_run(tracking.kfp_run(rid), message)
        raise SystemExit(USER_ERROR_EXIT)
    config = _config(defense, given)
    stage_dirs = {name: (a.path, a.uri) for name, a in zip(upstream, slots) if a is not None}
    parent = tracking.kfp_run(rid) or tracking.open_run(rid, defense, config, tags={"unpoison.kfp_run_id": rid})
    with tracking.fail_on_error(parent):
        return finish(parent, defense, delivered, config, stage_dirs)


def close_kfp_run(run_id: str, state: str, message: str | None) -> None:
    """The exit handler's task: fail the MLflow parent run of a KFP run that did not succeed
    (`tracking.close_kfp_run`)."""
    tracking.close_kfp_run(kfp_run_id(run_id), state, message)
