"""MLflow tracking of pipeline runs: one parent run per pipeline run, one child run per stage.

The same function records a run of the local runner and of a KFP pipeline (its last task), from the stage output
folders: each holds a `stage.json` (result, wall time, execution id) and maybe a `history.json` (per epoch).
Parameter and metric names are the same for every defense, so runs compare side by side in the MLflow UI. A stage
whose execution id was already recorded was served from a cache: its child run is tagged `unpoison.cached_from`
with the run that produced it. The library and the stage functions never import MLflow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

EXPERIMENT = os.environ.get("UNPOISON_MLFLOW_EXPERIMENT", "unpoison")
SUMMARY_KEYS = ("acc", "asr", "der", "nodef_acc", "nodef_asr", "detection_tpr", "detection_fpr",
                "detection_precision")


def default_uri(root: Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _numeric(values: dict) -> dict:
    return {k: float(v) for k, v in flatten(values).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def _producer(client, experiment_id: str, execution_id: str) -> str | None:
    """The pipeline run whose stage execution first produced `execution_id`, if one was recorded."""
    runs = client.search_runs([experiment_id], f"tags.`unpoison.execution_id` = '{execution_id}'")
    first = [r for r in runs if "unpoison.cached_from" not in r.data.tags]
    return first[0].data.tags.get("unpoison.run") if first else None


def record_pipeline_run(run_name: str, defense: str, config: dict, stage_dirs: dict[str, tuple[str, str]], *,
                        uri: str | None = None, tags: dict | None = None) -> str:
    """Log a finished pipeline run. `stage_dirs` maps stage -> (local folder, artifact URI). Returns the parent
    run id, or '' when no tracking URI is given or set in MLFLOW_TRACKING_URI."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return ""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(EXPERIMENT)
    client = MlflowClient(uri)
    base_tags = {"unpoison.run": run_name, "unpoison.defense": defense,
                 "unpoison.attack": config.get("attack", {}).get("name", ""), **(tags or {})}
    with mlflow.start_run(run_name=run_name, tags=base_tags) as parent:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten({"defense": defense, **config}).items()})
        mlflow.log_dict({"defense": defense, "config": config}, "config.json")  # what `unpoison rerun` starts from
        wall = 0.0
        for stage, (folder, artifact_uri) in stage_dirs.items():
            folder = Path(folder)
            record = json.loads((folder / "stage.json").read_text())
            wall += record["seconds"]
            child_tags = {"unpoison.run": run_name, "unpoison.stage": stage,
                          "unpoison.execution_id": record["execution_id"], "unpoison.artifact_uri": artifact_uri}
            producer = _producer(client, experiment.experiment_id, record["execution_id"])
            if producer is not None:
                child_tags["unpoison.cached_from"] = producer
            mlflow.set_tag(f"unpoison.artifact.{stage}", artifact_uri)
            with mlflow.start_run(run_name=stage, nested=True, tags=child_tags):
                mlflow.log_metrics(_numeric({**record["result"], "seconds": record["seconds"]}))
                history = folder / "history.json"
                for h in json.loads(history.read_text()) if history.exists() else []:
                    mlflow.log_metrics(_numeric({k: v for k, v in h.items() if k != "epoch"}), step=h["epoch"])
                for f in sorted(folder.rglob("*")):
                    if f.is_file() and f.suffix != ".npz":  # data sets stay in the run folder / object store
                        rel = f.parent.relative_to(folder)
                        mlflow.log_artifact(str(f), artifact_path=f"{stage}/{rel}" if str(rel) != "." else stage)
        mlflow.log_metric("wall_seconds", wall)
        evaluation = Path(stage_dirs["evaluate"][0]) if "evaluate" in stage_dirs else None
        if evaluation is not None and (evaluation / "metrics.json").exists():
            m = json.loads((evaluation / "metrics.json").read_text())
            mlflow.log_metrics(_numeric({k: m[k] for k in SUMMARY_KEYS if m.get(k) is not None}))
            for name, r in m.get("models", {}).items():
                mlflow.log_metrics(_numeric({f"{name}_acc": r["acc"], f"{name}_asr": r["asr"]}))
    return parent.info.run_id
