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
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from components import artifacts, checkpoint, store, tracking
from components.config import validate
from components.defenses import get
from components.defenses.base import run_stage
from components.errors import USER_ERROR_EXIT, USER_ERROR_FILE, UnpoisonError


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


def run_task(defense: str, stage: str, delivered: bool, given: dict, upstream: list[str], slots: list,
             out: str, out_uri: str | None = None) -> dict | None:
    """A declared stage of a KFP task (`guarded`): its record, or None when it stopped on a user error. With the
    output's `out_uri`, its trainings' checkpoints are mirrored to the object store (`checkpoint_prefix`)."""
    dirs = {name: Path(a.path) for name, a in zip(upstream, slots) if a is not None}
    task = {"defense": defense, "stage": stage, "delivered": delivered, "given": given,
            "inputs": {name: a.uri for name, a in zip(upstream, slots) if a is not None}}

    def run():
        d = get(defense)
        st = d.stage(stage, delivered)
        cfg = config_from(defense, given, (*st.reads, *(("data",) if st.monitor else ())))
        with checkpoint.mirrored(checkpoint_prefix(out_uri, task)):
            return run_stage(st, cfg, Path(out), dirs, d.plan(delivered)[0].name)

    return guarded(stage, [out], dirs.values(), run)


def record(defense: str, delivered: bool, run_name: str, config: dict, stage_dirs: dict[str, tuple[str, str]], *,
           uri: str | None = None, tags: dict) -> str:
    """Record a run in MLflow (local engine or KFP): its stages, the defended model when its stage is among
    `stage_dirs` (stage -> (folder, artifact URI)), and the training data set with its content hash."""
    d = get(defense)
    defended = d.evaluation.models[d.evaluation.defended]
    data = Path(stage_dirs[d.plan(delivered)[0].name][0])
    return tracking.record_pipeline_run(
        run_name, defense, config, stage_dirs, uri=uri, tags=tags,
        final_model=defended if defended.split("/")[0] in stage_dirs else None,
        dataset={"name": "train", "source": config["data"],
                 "digest": artifacts.read_json(data / "dataset.json")["dataset_hash"]})


def track_run(run_id: str, defense: str, delivered: bool, given: dict, upstream: list[str], slots: list) -> str:
    """Record a KFP run in MLflow from its stage artifacts (every parameter of the pipeline is in `given`). When a
    stage stopped on a user error, fail the run instead, with its message and exit code USER_ERROR_EXIT: this
    task is never retried, so the run fails once and shows why."""
    error = user_error(a.path for a in slots if a is not None)
    if error is not None:
        print(f"unpoison: error: stage {error['stage']} stopped: {error['error']}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT)
    d = get(defense)
    config = {k: v for k, v in given.items() if k != "section"}
    config["train_limit"] = config["train_limit"] or None
    if d.section:
        config[d.section] = given["section"]
    stage_dirs = {name: (a.path, a.uri) for name, a in zip(upstream, slots) if a is not None}
    return record(defense, delivered, run_id, config, stage_dirs, tags={"unpoison.kfp_run_id": run_id})
