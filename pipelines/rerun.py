"""`unpoison rerun`: one stage of an earlier run, again, on that run's recorded input artifacts.

The earlier run is found in MLflow (its name, KFP run id or MLflow run id); its parent run holds the artifact URI of
every stage output (tags `unpoison.artifact.<stage>`) and its configuration (`config.json`). A one-stage pipeline
brings the inputs in with `dsl.importer`, so nothing upstream is recomputed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from components import artifacts, tracking
from components.stages import MONITOR_SIZE
from components.config import load_config
from components.errors import UnpoisonError


def find_run(client, experiment: str, ref: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        for tag in ("unpoison.run", "unpoison.kfp_run_id"):
            runs = client.search_runs([exp.experiment_id], f"tags.`{tag}` = '{ref}' and tags.`unpoison.defense` != ''")
            parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
            if parents:
                return parents[0]
    try:
        return client.get_run(ref)
    except Exception:
        raise UnpoisonError(f"no recorded run '{ref}' in {client.tracking_uri}; pass the run folder name, KFP run id "
                            f"or MLflow run id, and --mlflow-uri where it was recorded") from None


def main(args) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines import kfp_pipelines as kp

    if args.stage not in kp.RERUN_INPUTS:
        raise UnpoisonError(f"stage '{args.stage}' cannot be rerun alone yet; choose one of: "
                            f"{', '.join(kp.RERUN_INPUTS)}")
    uri = args.mlflow_uri or tracking.default_uri(args.out)
    client = MlflowClient(uri)
    run = find_run(client, tracking.EXPERIMENT, args.run)
    inputs = {}
    for param, stage in kp.RERUN_INPUTS[args.stage].items():
        tag = f"unpoison.artifact.{stage}"
        if tag not in run.data.tags:
            raise UnpoisonError(f"run '{args.run}' recorded no artifact for stage '{stage}'; rerun needs a run of a "
                                f"defense that has it (e.g. meca)")
        inputs[param] = run.data.tags[tag]
    with tempfile.TemporaryDirectory() as tmp:
        earlier = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", tmp)).read_text())
        base = Path(tmp) / "earlier.yaml"
        base.write_text(yaml.safe_dump(earlier["config"]))
        from pipelines.cli import _overrides

        cfg = load_config(earlier["config"].get("protocol", "cpu"), _overrides(args.set), [base])
    arguments = kp.without_none({**inputs, "train": cfg.train.model_copy(update={"seed": cfg.seed}).model_dump(),
                                 "final": cfg.final, "model": cfg.model, "data": cfg.data})
    pipeline = kp.PIPELINES[f"rerun-{args.stage}"]
    if args.host:
        import kfp

        submitted = kfp.Client(host=args.host).create_run_from_pipeline_func(
            pipeline, arguments=arguments, experiment_name=args.experiment, enable_caching=True)
        print(f"run id: {submitted.run_id}\nrun: {args.host.rstrip('/')}/#/runs/details/{submitted.run_id}")
        return
    model_dir, log = kp.run_local(pipeline, arguments, args.out / "kfp-local")
    history = artifacts.read_json(model_dir / "history.json")
    print(f"executed: {', '.join(log.executed) or 'nothing'}; from cache: {', '.join(log.cached) or 'nothing'}")
    if history and "test_acc" in history[-1]:
        print(f"{args.stage}: ACC {history[-1]['test_acc']:.4f}  ASR {history[-1]['test_asr']:.4f} "
              f"(last epoch, on the first {MONITOR_SIZE} test images)")
    print(f"model: {model_dir}")
