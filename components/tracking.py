"""MLflow tracking of pipeline runs: one parent run per pipeline run, one child run per stage.

The same function records a run of the local runner and of a KFP pipeline (its last task), from the stage output
folders: each holds a `stage.json` (result, wall time, execution id) and maybe a `history.json` (per epoch).
Parameter and metric names are the same for every defense, so runs compare side by side in the MLflow UI. A stage
whose execution id was already recorded was served from a cache: its child run is tagged `unpoison.cached_from`
with the run that produced it. The library and the stage functions never import MLflow.

The parent run can also carry the deployed model in the `mlflow.pytorch` flavor (so `mlflow.pytorch.load_model`
serves it without this package) and the training data set as an MLflow dataset input whose digest is its content hash.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

EXPERIMENT = os.environ.get("UNPOISON_MLFLOW_EXPERIMENT", "unpoison")
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# The runs table's columns, as an MLflow UI shared view (experiment tag mlflow.sharedViewState.<key>): the UI opens
# on it at <ui>/#/experiments/<id>/runs?viewStateShareKey=unpoison (`ui_link`); its plain default shows no metric.
VIEW_KEY = "unpoison"
VIEW_COLUMNS = ("acc", "asr", "der", "target_acc", "nodef_acc", "nodef_asr", "detection_tpr", "detection_fpr",
                "flagged_share", "wall_seconds")
SUMMARY_KEYS = ("acc", "asr", "der", "target_acc", "nodef_acc", "nodef_asr", "nodef_target_acc", "pred_target_share",
                "detection_tpr", "detection_fpr", "detection_precision", "flagged_share")


def default_uri(root: Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def _experiment(client, uri: str) -> str:
    """The experiment's id, created on first use: a model-training experiment (MLflow 3's UI opens it in the training
    runs view, not the GenAI one) whose artifacts, with a local sqlite store, sit beside the database
    (`<store folder>/mlartifacts`), not in ./mlruns of whatever folder the command runs in. A server's store keeps its
    own artifact root."""
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        experiment_id = found.experiment_id
        if found.tags.get(KIND_TAG) is None:
            client.set_experiment_tag(experiment_id, KIND_TAG, KIND)
    else:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(EXPERIMENT, artifact_location=location, tags={KIND_TAG: KIND})
    view = {"selectedColumns": ["attributes.`Dataset`", *(f"metrics.`{m}`" for m in VIEW_COLUMNS)]}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(view))
    return experiment_id


def ui_link(ui: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of the experiment with the unpoison columns (ACC, ASR, DER, detection)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def ui_hint(uri: str) -> str:
    """How to look at the runs of a tracking URI: the page of a server, or the command that serves a local store
    and the page it then shows (mlflow ui's default address)."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(uri).get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return f"mlflow: {uri} (no unpoison run recorded yet)"
    if uri.startswith(("http://", "https://")):
        return f"mlflow: {ui_link(uri, experiment.experiment_id)}"
    return (f"mlflow: {uri}; compare runs with `mlflow ui --backend-store-uri {uri}`, then open "
            f"{ui_link('http://127.0.0.1:5000', experiment.experiment_id)}")


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


def _image_shape(stage_dirs: dict[str, tuple[str, str]], default: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) of the run's images, read from the header of a stage's dataset.npz (no pixels decoded)."""
    for folder, _ in stage_dirs.values():
        path = Path(folder) / "dataset.npz"
        if path.exists():
            with zipfile.ZipFile(path) as z, z.open("images.npy") as f:  # as save_npz writes it
                major, _ = np.lib.format.read_magic(f)
                if major in (1, 2):
                    _, h, w, c = getattr(np.lib.format, f"read_array_header_{major}_0")(f)[0]
                    return c, h, w
    return default


def _log_model(folder: Path, input_shape: tuple[int, int, int]) -> str:
    """Log the model in `folder` (safetensors + model.json) to the active run as `model`, in the mlflow.pytorch
    flavor; returns its model URI. Saved as a torch.export program (pt2, MLflow 3's default): no pickle, so
    loading needs neither this package nor MLFLOW_ALLOW_PICKLE_DESERIALIZATION."""
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from components import artifacts

    net, meta = artifacts.load_model(folder)
    c, h, w = input_shape
    signature = ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w))]),
                               Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["classes"])))]))
    example = np.random.default_rng(0).random((2, c, h, w), dtype=np.float32)  # batch > 1: a dynamic batch axis
    info = mlflow.pytorch.log_model(net.eval(), name="model", signature=signature, input_example=example,
                                    serialization_format="pt2",  # pip_requirements: MLflow's inference takes 6 s
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                    metadata={"classes": meta["classes"], "architecture": meta["architecture"],
                                              "input": "float32 NCHW in [0, 1], normalized inside the model",
                                              "dataset_hash": meta.get("dataset_hash"),
                                              "weights_sha256": meta.get("weights_sha256")})
    return info.model_uri


def _log_dataset(dataset: dict) -> None:
    """The training data set as a dataset input: `source` resolved to a local, s3:// ... source, the content hash
    as digest (cut to MLflow's 36 characters; the whole hash goes to the input tag `unpoison.content_hash`)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

    with warnings.catch_warnings():  # a local path matches MLflow's "" and "file" sources alike: same class
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(dataset["source"]))
    ds = MetaDataset(source, name=dataset["name"], digest=dataset["digest"][:MAX_DATASET_DIGEST_SIZE])
    mlflow.log_input(ds, context="training", tags={"unpoison.content_hash": dataset["digest"]})


def record_pipeline_run(run_name: str, defense: str, config: dict, stage_dirs: dict[str, tuple[str, str]], *,
                        uri: str | None = None, tags: dict | None = None, final_model: str | None = None,
                        dataset: dict | None = None, input_shape: tuple[int, int, int] = (3, 32, 32)) -> str:
    """Log a finished pipeline run. `stage_dirs` maps stage -> (local folder, artifact URI). Returns the parent
    run id, or '' when no tracking URI is given or set in MLFLOW_TRACKING_URI.

    `final_model`, "stage" or "stage/sub/folder" (e.g. "final_train", "relabel_finetune/model"), names the folder of
    the deployed model: the parent run then holds it as the MLflow model `model` and its URI (models:/<model id>) in
    the tag `unpoison.model_uri`. `mlflow.pytorch.load_model` takes that URI or runs:/<parent run id>/model and gives
    an nn.Module with the predictions of `artifacts.load_model(folder)[0].eval()`: a torch.export graph (pt2, no
    pickle), traced in eval mode and always in it (its `.eval()` raises; do not call it). Images are (C, H, W) =
    `input_shape` unless a stage folder holds a dataset.npz. `dataset`, {"name", "source",
    "digest"}, logs the training data set as a dataset input (context "training") with its content hash as digest."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return ""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = mlflow.set_experiment(experiment_id=_experiment(client, uri))
    base_tags = {"unpoison.run": run_name, "unpoison.defense": defense,
                 "unpoison.attack": config.get("attack", {}).get("name", ""), **(tags or {})}
    with mlflow.start_run(run_name=run_name, tags=base_tags) as parent:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten({"defense": defense, **config}).items()})
        mlflow.log_dict({"defense": defense, "config": config}, "config.json")  # what `unpoison rerun` starts from
        wall = 0.0
        for stage, (folder, artifact_uri) in stage_dirs.items():
            folder = Path(folder)
            mlflow.set_tag(f"unpoison.artifact.{stage}", artifact_uri)
            if not (folder / "stage.json").exists():  # an output apart from its stage's (the ground truth)
                continue
            record = json.loads((folder / "stage.json").read_text())
            wall += record["seconds"]
            child_tags = {"unpoison.run": run_name, "unpoison.stage": stage,
                          "unpoison.execution_id": record["execution_id"], "unpoison.artifact_uri": artifact_uri}
            producer = _producer(client, experiment.experiment_id, record["execution_id"])
            if producer is not None:
                child_tags["unpoison.cached_from"] = producer
            with mlflow.start_run(run_name=stage, nested=True, tags=child_tags):
                history = json.loads((folder / "history.json").read_text()) if (folder / "history.json").exists() else []
                for h in history:
                    mlflow.log_metrics(_numeric({k: v for k, v in h.items() if k != "epoch"}), step=h["epoch"])
                # the stage's summary: under `stage.` where a per-epoch series has the name, so that no series starts
                # with a summary point at step 0
                series = {k for h in history for k in h}
                mlflow.log_metrics({f"stage.{k}" if k in series else k: v for k, v in
                                    _numeric({**record["result"], "seconds": record["seconds"]}).items()})
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
                mlflow.log_metrics(_numeric({f"{name}_acc": r["acc"], f"{name}_asr": r["asr"],
                                             f"{name}_target_acc": r["target_acc"]}))
        if dataset is not None:
            _log_dataset(dataset)
        if final_model is not None:
            stage, _, sub = final_model.partition("/")
            folder = Path(stage_dirs[stage][0]) / sub
            mlflow.set_tag("unpoison.model_uri", _log_model(folder, _image_shape(stage_dirs, input_shape)))
    return parent.info.run_id
