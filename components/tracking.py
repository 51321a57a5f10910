"""MLflow tracking of pipeline runs, live: one parent run per pipeline run, one child run per stage.

A run opens its parent run before its first stage (`open_run`: tags, parameters, config.json; status RUNNING). Each
stage logs its own child run while it runs (`stage_run`): at its start the configuration it reads as parameters,
then each epoch's metrics as the epoch ends (step = epoch), at its end its summary and its output files as
artifacts, status FINISHED; a stage that raises ends FAILED, its error in the tag `unpoison.error`, the epochs logged
so far kept. At the end `finish_run` logs the run's summary metrics, the deployed model and the training data set on
the parent and marks it FINISHED; a run that fails is marked FAILED (`fail_run`, the failing stage and its error in
`unpoison.error`). A stage that did not execute in the run (served from KFP's cache, or read from an earlier run by a
rerun) gets its child run at the end, from its output folder: each holds a `stage.json` (result, wall time,
execution id) and maybe a `history.json` (per epoch); it is tagged `unpoison.cached_from` with the run that produced
it. `record_pipeline_run` records a finished run that way in one call.

The local runner (pipelines/local.py) does all of this in its process. Under KFP every task is a process of its own
(components/runner.py): the first task opens the parent run, tagged `unpoison.kfp_run_id`, the stage tasks find it
by that tag (`kfp_run`), `track` finishes it, and the exit handler's task (`close_kfp_run`) fails it when the
pipeline did not succeed and closes child runs that a killed pod left RUNNING.

Parameter and metric names are the same for every defense, so runs compare side by side in the MLflow UI. Without a
tracking URI (given, or MLFLOW_TRACKING_URI) nothing is logged. What a stage logs while it runs is best effort, as
the checkpoints' mirror: an MLflow server that fails then costs that stage's live record (one message on stderr, the
stage is logged at the end instead), never its training. The library and the stage functions never import MLflow:
a stage hears of tracking only as a per-epoch callback.

The parent run can also carry the deployed model in the `mlflow.pytorch` flavor (so `mlflow.pytorch.load_model`
serves it without this package) and the training data set as an MLflow dataset input whose digest is its content hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
    experiment = _client(uri).get_experiment_by_name(EXPERIMENT)
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


# --- live tracking: the parent run, the stages' child runs --------------------------------------------------------

ERROR_TAG = "unpoison.error"
MAX_ERROR = 5000  # characters of an error message kept in its tag
DANGLING = "its process ended without closing its run (killed, evicted or timed out)"


@dataclass(frozen=True)
class Run:
    """An open parent run: the tracking URI it lives in, its MLflow run id, the pipeline run's name."""

    uri: str
    run_id: str
    name: str


def _client(uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        return MlflowClient(uri)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """MLflow creates a new sqlite store's tables when a client first opens it, with no lock: two commands starting at
    once on a fresh store (two benchmarks into one runs/ folder) fail with "table ... already exists". Opening it under
    an exclusive lock beside the database makes the second wait until the tables are there. Other stores: no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:MAX_ERROR]


def _metrics(numeric: dict, step: int = 0) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, step) for k, v in numeric.items()]


def _params(tree: dict) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:500]) for k, v in flatten(tree).items()]


def open_run(run_name: str, defense: str, config: dict, *, uri: str | None = None,
             tags: dict | None = None) -> Run | None:
    """Open the parent run of a pipeline run, status RUNNING: tags `unpoison.run`, `unpoison.defense`,
    `unpoison.attack` and `tags`, the configuration as parameters and as config.json (what `unpoison rerun` starts
    from). None without a tracking URI (`uri`, else MLFLOW_TRACKING_URI)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    client = _client(uri)
    run = client.create_run(_experiment(client, uri), run_name=run_name,
                            tags={"unpoison.run": run_name, "unpoison.defense": defense,
                                  "unpoison.attack": config.get("attack", {}).get("name", ""), **(tags or {})})
    client.log_batch(run.info.run_id, params=_params({"defense": defense, **config}))
    client.log_dict(run.info.run_id, {"defense": defense, "config": config}, "config.json")
    return Run(uri, run.info.run_id, run_name)


def kfp_run(kfp_run_id: str, *, uri: str | None = None) -> Run | None:
    """The parent run that the first task of the KFP run `kfp_run_id` opened (tag `unpoison.kfp_run_id`), or None:
    no tracking URI, no run id, or no such run."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not kfp_run_id or "'" in kfp_run_id:
        return None
    client = _client(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.`unpoison.kfp_run_id` = '{kfp_run_id}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return Run(uri, parents[0].info.run_id, parents[0].data.tags.get("unpoison.run", kfp_run_id)) if parents else None


def _children(client, parent: Run) -> list:
    """The child runs of `parent`, oldest first."""
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    return list(client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'",
                                   order_by=["attributes.start_time ASC"]))


def _close_dangling(client, children: list) -> None:
    """End KILLED the child runs still RUNNING once their stage is over: a killed pod (an eviction, a preempted
    node, a timeout) never closed its run."""
    for child in children:
        if child.info.status == "RUNNING":
            client.set_tag(child.info.run_id, ERROR_TAG, DANGLING)
            client.set_terminated(child.info.run_id, "KILLED")


def _log_outputs(client, run_id: str, stage: str, folder: Path, logged: frozenset = frozenset(),
                 series: frozenset = frozenset()) -> None:
    """A stage's output folder on its child run: the epochs of history.json not `logged` yet (step = epoch), the
    summary of stage.json with the wall time (under `stage.<name>` where a per-epoch series, in history.json or
    `series`, has the name, so that no series starts with a summary point), the execution id as tag
    `unpoison.execution_id`, and every file but the data sets as artifacts under `<stage>/`."""
    from mlflow.entities import RunTag

    record = json.loads((folder / "stage.json").read_text())
    history = json.loads((folder / "history.json").read_text()) if (folder / "history.json").exists() else []
    for h in history:
        if h["epoch"] not in logged:
            client.log_batch(run_id, metrics=_metrics(_numeric({k: v for k, v in h.items() if k != "epoch"}),
                                                      step=h["epoch"]))
    series = set(series) | {k for h in history for k in h}
    summary = {f"stage.{k}" if k in series else k: v
               for k, v in _numeric({**record["result"], "seconds": record["seconds"]}).items()}
    client.log_batch(run_id, metrics=_metrics(summary), tags=[RunTag("unpoison.execution_id", record["execution_id"])])
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix != ".npz":  # data sets stay in the run folder / object store
            rel = f.parent.relative_to(folder)
            client.log_artifact(run_id, str(f), f"{stage}/{rel}" if str(rel) != "." else stage)


class _StageRun:
    """A stage's child run while the stage runs (`stage_run`). Best effort: the first call MLflow fails is said on
    stderr and ends the live record (`finish_run` then logs the stage from its output folder, and closes this run)."""

    def __init__(self, parent: Run, stage: str, params: dict):
        self.client, self.stage, self.run_id = _client(parent.uri), stage, None
        self.logged: set[int] = set()
        self.series: set[str] = set()

        def start():
            experiment_id = self.client.get_run(parent.run_id).info.experiment_id
            tags = {"mlflow.parentRunId": parent.run_id, "unpoison.run": parent.name, "unpoison.stage": stage}
            self.run_id = self.client.create_run(experiment_id, run_name=stage, tags=tags).info.run_id
            self.client.log_batch(self.run_id, params=_params(params))

        self._quietly("open its run", start)

    def _quietly(self, what: str, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - tracking is best effort while a stage runs
            print(f"unpoison: mlflow: stage {self.stage}: cannot {what} ({_error(e)[:300]}); the stage goes on "
                  f"without its live record", file=sys.stderr, flush=True)
            self.run_id = None

    def log_epoch(self, record: dict) -> None:
        """One epoch's record (as history.json holds it) as metrics at step = epoch."""
        if self.run_id is None:
            return
        values = _numeric({k: v for k, v in record.items() if k != "epoch"})
        self._quietly(f"log epoch {record['epoch']}",
                      lambda: self.client.log_batch(self.run_id, metrics=_metrics(values, step=record["epoch"])))
        self.logged.add(record["epoch"])
        self.series.update(values)

    def end(self, status: str, folder: Path | None = None, error: str | None = None) -> None:
        if self.run_id is None:
            return

        def close():
            if error is not None:
                self.client.set_tag(self.run_id, ERROR_TAG, error)
            if folder is not None and (Path(folder) / "stage.json").exists():
                _log_outputs(self.client, self.run_id, self.stage, Path(folder), frozenset(self.logged),
                             frozenset(self.series))
            self.client.set_terminated(self.run_id, status)

        self._quietly("close its run", close)


@contextlib.contextmanager
def stage_run(parent: Run | None, stage: str, *, params: dict | None = None,
              folder: Path | None = None) -> Iterator[Callable[[dict], None] | None]:
    """The child run of `stage` under `parent` while the stage runs in this block: `params` (the configuration it
    reads) at the start; yields `log_epoch(record)`, which logs one epoch's record (a history.json entry) as metrics
    at step = epoch when the stage's training calls it; when the block ends, the stage's output `folder`
    (`_log_outputs`) and status FINISHED. A block that raises ends the run FAILED (KILLED when interrupted) with the
    error in the tag `unpoison.error`, the epochs logged so far kept, and re-raises. Yields None without a parent."""
    if parent is None:
        yield None
        return
    run = _StageRun(parent, stage, params or {})
    try:
        yield run.log_epoch
    except BaseException as e:
        run.end("FAILED" if isinstance(e, Exception) else "KILLED", error=_error(e))
        raise
    run.end("FINISHED", folder=folder)


def finish_run(parent: Run | None, stage_dirs: dict[str, tuple[str, str]], *, final_model: str | None = None,
               dataset: dict | None = None, input_shape: tuple[int, int, int] = (3, 32, 32)) -> str:
    """Finish the parent run of a pipeline run whose stages all ended: `stage_dirs` maps stage -> (output folder,
    artifact URI), kept as the parent's tags `unpoison.artifact.<stage>` (where `unpoison rerun` reads them). A stage
    that did not execute in this run (no child run of it holds its execution id: served from KFP's cache, or read
    from an earlier run) gets its child run here, tagged `unpoison.cached_from` with the run that produced it. Then
    the run's wall time and evaluation summary as metrics, the data set and the model, and status FINISHED. Returns
    the parent run id ('' without a parent run).

    `final_model`, "stage" or "stage/sub/folder" (e.g. "final_train", "relabel_finetune/model"), names the folder of
    the deployed model: the parent run then holds it as the MLflow model `model` and its URI (models:/<model id>) in
    the tag `unpoison.model_uri`. `mlflow.pytorch.load_model` takes that URI or runs:/<parent run id>/model and gives
    an nn.Module with the predictions of `artifacts.load_model(folder)[0].eval()`: a torch.export graph (pt2, no
    pickle), traced in eval mode and always in it (its `.eval()` raises; do not call it). Images are (C, H, W) =
    `input_shape` unless a stage folder holds a dataset.npz. `dataset`, {"name", "source", "digest"}, logs the
    training data set as a dataset input (context "training") with its content hash as digest."""
    if parent is None:
        return ""
    import mlflow

    client = _client(parent.uri)
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    children = _children(client, parent)
    _close_dangling(client, children)
    executed = {c.data.tags["unpoison.execution_id"]: c.info.run_id for c in children
                if c.info.status == "FINISHED" and "unpoison.execution_id" in c.data.tags}
    wall = 0.0
    for stage, (folder, artifact_uri) in stage_dirs.items():
        folder = Path(folder)
        client.set_tag(parent.run_id, f"unpoison.artifact.{stage}", artifact_uri)
        if not (folder / "stage.json").exists():  # an output apart from its stage's (the ground truth)
            continue
        record = json.loads((folder / "stage.json").read_text())
        wall += record["seconds"]
        run_id = executed.get(record["execution_id"])
        if run_id is None:
            tags = {"mlflow.parentRunId": parent.run_id, "unpoison.run": parent.name, "unpoison.stage": stage}
            producer = _producer(client, experiment_id, record["execution_id"])
            if producer is not None:
                tags["unpoison.cached_from"] = producer
            run_id = client.create_run(experiment_id, run_name=stage, tags=tags).info.run_id
            _log_outputs(client, run_id, stage, folder)
            client.set_terminated(run_id, "FINISHED")
        client.set_tag(run_id, "unpoison.artifact_uri", artifact_uri)
    summary = {"wall_seconds": wall}
    evaluation = Path(stage_dirs["evaluate"][0]) if "evaluate" in stage_dirs else None
    if evaluation is not None and (evaluation / "metrics.json").exists():
        m = json.loads((evaluation / "metrics.json").read_text())
        summary.update(_numeric({k: m[k] for k in SUMMARY_KEYS if m.get(k) is not None}))
        for name, r in m.get("models", {}).items():
            summary.update(_numeric({f"{name}_acc": r["acc"], f"{name}_asr": r["asr"],
                                     f"{name}_target_acc": r["target_acc"]}))
    client.log_batch(parent.run_id, metrics=_metrics(summary))
    if dataset is not None or final_model is not None:
        with _fluent_uri(parent.uri), mlflow.start_run(run_id=parent.run_id):
            if dataset is not None:
                _log_dataset(dataset)
            if final_model is not None:
                stage, _, sub = final_model.partition("/")
                folder = Path(stage_dirs[stage][0]) / sub
                mlflow.set_tag("unpoison.model_uri", _log_model(folder, _image_shape(stage_dirs, input_shape)))
    client.set_terminated(parent.run_id, "FINISHED")
    return parent.run_id


def fail_run(parent: Run | None, error: str, status: str = "FAILED") -> None:
    """End the parent run `status` (FAILED; KILLED when interrupted or cancelled) with the tag `unpoison.error`: each
    stage whose child run failed and its error, else `error`. Child runs still RUNNING end KILLED."""
    if parent is None:
        return
    client = _client(parent.uri)
    children = _children(client, parent)
    _close_dangling(client, children)
    failed = {c.data.tags.get("unpoison.stage", "?"): c.data.tags.get(ERROR_TAG, "") for c in children
              if c.info.status == "FAILED"}  # a stage retried: its last error
    message = "; ".join(f"stage {stage}: {e}" for stage, e in failed.items()) or error
    client.set_tag(parent.run_id, ERROR_TAG, message[:MAX_ERROR])
    client.set_terminated(parent.run_id, status)


@contextlib.contextmanager
def fail_on_error(parent: Run | None) -> Iterator[None]:
    """End the parent run FAILED (KILLED when interrupted) when the block raises (`fail_run`), and re-raise."""
    try:
        yield
    except BaseException as e:
        if parent is not None:
            try:
                fail_run(parent, _error(e), "FAILED" if isinstance(e, Exception) else "KILLED")
            except Exception as failed:  # noqa: BLE001 - the run's own error is the one to raise
                print(f"unpoison: mlflow: cannot mark run {parent.run_id} failed ({_error(failed)[:300]})",
                      file=sys.stderr, flush=True)
        raise


def close_kfp_run(kfp_run_id: str, state: str, message: str | None = None, *, uri: str | None = None) -> None:
    """The exit handler's task of KFP run `kfp_run_id`, once every other task ended: when the pipeline did not
    succeed (`state` FAILED, or CANCELLED) and its parent run is still RUNNING, end it FAILED (KILLED when cancelled)
    naming the failing stage and its error (`fail_run`; else KFP's `message`); in any case end KILLED the child runs a
    killed pod left RUNNING. A parent run `track` already ended (FINISHED, or FAILED on a user error) keeps its
    status."""
    parent = kfp_run(kfp_run_id, uri=uri)
    if parent is None:
        return
    client = _client(parent.uri)
    if state == "SUCCEEDED" or client.get_run(parent.run_id).info.status != "RUNNING":
        _close_dangling(client, _children(client, parent))
        return
    fail_run(parent, message or f"the pipeline run ended {state}", "KILLED" if state == "CANCELLED" else "FAILED")


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (mlflow.start_run, mlflow.pytorch.log_model) on `uri` for the block. MLflow 3's
    set_tracking_uri also exports MLFLOW_TRACKING_URI into this process's environment, which every later subprocess
    (a kfp.local task) would inherit, tracking into a server that may be gone or another run's store: the variable
    is put back as it was."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def record_pipeline_run(run_name: str, defense: str, config: dict, stage_dirs: dict[str, tuple[str, str]], *,
                        uri: str | None = None, tags: dict | None = None, final_model: str | None = None,
                        dataset: dict | None = None, input_shape: tuple[int, int, int] = (3, 32, 32)) -> str:
    """Record a finished pipeline run in one call, from its stage folders (`open_run`, then `finish_run`: every
    stage's child run from its output folder). Returns the parent run id, or '' without a tracking URI."""
    parent = open_run(run_name, defense, config, uri=uri, tags=tags)
    with fail_on_error(parent):
        return finish_run(parent, stage_dirs, final_model=final_model, dataset=dataset, input_shape=input_shape)
