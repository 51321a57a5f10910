"""MLflow tracking for pipeline runs: one parent run per pipeline run, one child run per stage.

Parameter and metric names are the same for every defense, so runs compare side by side in the MLflow UI.
A thin wrapper: the library and the stage functions never import MLflow.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


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


class Tracker:
    """Logs to MLflow at `uri`; `Tracker(None)` logs nothing (for --no-mlflow)."""

    def __init__(self, uri: str | None, experiment: str = "unpoison"):
        self.enabled = uri is not None
        if self.enabled:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            import mlflow

            self.mlflow = mlflow
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(experiment)

    @contextmanager
    def run(self, name: str, *, nested: bool = False, tags: dict | None = None):
        if not self.enabled:
            yield None
            return
        with self.mlflow.start_run(run_name=name, nested=nested, tags=tags) as r:
            yield r

    def params(self, params: dict) -> None:
        if self.enabled:
            self.mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})

    def metrics(self, values: dict, step: int | None = None) -> None:
        if self.enabled:
            numeric = {k: float(v) for k, v in flatten(values).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
            self.mlflow.log_metrics(numeric, step=step)

    def history(self, history: list[dict]) -> None:
        """Per-epoch metrics with step = epoch."""
        for h in history:
            self.metrics({k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])

    def artifacts_file(self, file: Path, path: str | None = None) -> None:
        if self.enabled:
            self.mlflow.log_artifact(str(file), artifact_path=path or None)
