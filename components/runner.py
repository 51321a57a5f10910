"""A declared stage run from artifact folders, as a KFP component runs it (and tracking of a KFP run).

The KFP components (components/kfp_components.py) are thin: they hand over the defense and stage names, the values
of the configuration keys the stage reads, and their input artifacts; this module rebuilds the configuration and
calls the same `run_stage` the local runner calls.
"""

from __future__ import annotations

from pathlib import Path

from components import artifacts, tracking
from components.config import validate
from components.defenses import get
from components.defenses.base import run_stage


def config_from(defense: str, given: dict, reads: tuple[str, ...]):
    """The run configuration from a task's parameters: the keys in `reads`, the rest at their defaults."""
    d = get(defense)
    tree = {k: v for k, v in given.items() if k in reads and k != "section"}
    if d.section in reads or "section" in reads:
        tree[d.section] = given["section"]
    if not tree.get("train_limit"):  # a pipeline parameter cannot be None: 0 means the whole training split
        tree.pop("train_limit", None)
    return validate(tree, tree.get("protocol", "custom"))


def run_task(defense: str, stage: str, delivered: bool, given: dict, upstream: list[str], slots: list, out: str) -> dict:
    d = get(defense)
    st = d.stage(stage, delivered)
    cfg = config_from(defense, given, (*st.reads, *(("data",) if st.monitor else ())))
    dirs = {name: Path(a.path) for name, a in zip(upstream, slots) if a is not None}
    return run_stage(st, cfg, Path(out), dirs, d.plan(delivered)[0].name)


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
    """Record a KFP run in MLflow from its stage artifacts (every parameter of the pipeline is in `given`)."""
    d = get(defense)
    config = {k: v for k, v in given.items() if k != "section"}
    config["train_limit"] = config["train_limit"] or None
    if d.section:
        config[d.section] = given["section"]
    stage_dirs = {name: (a.path, a.uri) for name, a in zip(upstream, slots) if a is not None}
    return record(defense, delivered, run_id, config, stage_dirs, tags={"unpoison.kfp_run_id": run_id})
