"""`unpoison rerun`: one stage of an earlier run again (and with --downstream every stage after it that depends on it),
on the earlier run's recorded outputs of every other stage, with changed parameters.

The earlier run is a run folder of the local engine, or a run recorded in MLflow (its name, KFP run id or MLflow run
id): its parent run holds the artifact URI of every stage output (tags `unpoison.artifact.<stage>`) and its
configuration (`config.json`). The local engine reads those outputs where they are; under kfp.local or on a cluster
a pipeline built from the declaration brings them in with `dsl.importer`, so nothing upstream is recomputed.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

from components import artifacts, tracking
from components.config import load_config, parse_overrides
from components.defenses import get
from components.errors import UnpoisonError
from components.stages import MONITOR_SIZE


def find_run(client, experiment: str, ref: str):
    """The parent run named `ref` (run name or KFP run id), else the MLflow run with id `ref`."""
    quoted = _filter_string(ref)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        for tag in ("unpoison.run", "unpoison.kfp_run_id"):
            runs = client.search_runs([exp.experiment_id], f"tags.`{tag}` = {quoted} and tags.`unpoison.defense` != ''")
            parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
            if parents:
                return parents[0]
    try:
        return client.get_run(ref)
    except Exception:
        raise UnpoisonError(f"no recorded run '{ref}' in {client.tracking_uri}; pass a run folder, or the run name, KFP "
                            f"run id or MLflow run id, and --mlflow-uri where it was recorded") from None


def _filter_string(value: str) -> str:
    """`value` as a string literal of MLflow's search syntax, which has no escapes: in single quotes, or in double
    quotes when it holds a single quote. One holding both quotes, or a backslash, cannot be written: an error."""
    for quote in ("'", '"'):
        if quote not in value and "\\" not in value:
            return f"{quote}{value}{quote}"
    raise UnpoisonError(f"run reference {value!r} holds both kinds of quote or a backslash, which an MLflow search "
                        f"cannot match; pass the run's folder, its MLflow run id or its KFP run id instead")


def earlier_run(ref: str, uri: str) -> tuple[dict, dict[str, str], str]:
    """(recorded {"defense", "config"}, stage -> output folder or URI, the engine that ran it) of an earlier run."""
    folder = Path(ref)
    if (folder / "config.json").is_file():  # a run folder of the local engine
        recorded = artifacts.read_json(folder / "config.json")
        outputs = dict(recorded.get("rerun", {}).get("inputs", {}))  # a rerun's folder: what it read from before
        outputs.update({p.name: str(p.resolve()) for p in folder.iterdir() if (p / "stage.json").is_file()})
        return recorded, outputs, "local"
    client = tracking._client(uri)
    run = find_run(client, tracking.EXPERIMENT, ref)
    with tempfile.TemporaryDirectory() as tmp:
        recorded = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", tmp)).read_text())
    prefix = "unpoison.artifact."
    outputs = {k.removeprefix(prefix): v for k, v in run.data.tags.items() if k.startswith(prefix)}
    return recorded, outputs, run.data.tags.get("unpoison.engine", "kfp-local")


def main(args) -> None:
    from pipelines import kfp_pipelines as kp
    from pipelines import local

    uri = args.mlflow_uri or tracking.default_uri(args.out)
    recorded, outputs, engine = earlier_run(args.run, uri)
    defense = get(recorded["defense"])
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "earlier.yaml"
        base.write_text(yaml.safe_dump(recorded["config"]))
        cfg = load_config(recorded["config"].get("protocol", "cpu"), parse_overrides(args.set), [base])
    delivered = cfg.attack.name == "none"
    defense.stage(args.stage, delivered)  # an unknown stage fails here, naming the defense's stages
    execute = defense.downstream(args.stage, delivered) if args.downstream else [args.stage]
    engine = "kfp" if args.host else (args.engine or engine)
    image = kp.stage_image(args.image, args.allow_tag) if engine == "kfp" else None  # before anything is sent
    name = f"{Path(args.run).name}-rerun-{args.stage}-{datetime.now():%Y%m%d-%H%M%S}"
    if engine == "local":
        missing = [s for s, p in outputs.items() if "://" in p]
        if missing:
            raise UnpoisonError(f"the outputs of run '{args.run}' are in an object store ({outputs[missing[0]]}); "
                                f"rerun it where they are: --engine kfp-local, or --host <KFP API> for the cluster")
        run_dir = local.rerun(defense.name, cfg, {s: Path(p) for s, p in outputs.items()}, args.stage, args.out,
                              downstream=args.downstream, mlflow_uri=None if args.no_mlflow else uri, name=name)
        print(f"executed: {', '.join(execute)}; read from the earlier run: "
              f"{', '.join(s for s in outputs if s not in execute) or 'nothing'}")
        _print_result(run_dir, args.stage)
        return
    imported = {s: p for s, p in outputs.items() if s not in execute}
    if "truth" not in imported:  # a local run keeps the ground truth in its data stage's folder
        data = defense.plan(delivered)[0].name
        if data in imported:
            imported["truth"] = imported[data]
    pipeline = kp.build(defense.name, delivered=delivered, execute=execute, imported=imported, image=image)
    data_stage = defense.plan(delivered)[0].name  # the data's fingerprint only matters when its stage reruns
    arguments = kp.arguments(cfg, defense.name, data_hash=None if data_stage in execute else "")
    if engine == "kfp":
        import kfp

        submitted = kfp.Client(host=args.host).create_run_from_pipeline_func(
            pipeline, arguments=arguments, experiment_name=args.experiment,
            enable_caching=False if args.no_cache else None)
        print(f"run id: {submitted.run_id}\nrun: {args.host.rstrip('/')}/#/runs/details/{submitted.run_id}")
        return
    out_dir, log = kp.run_local(pipeline, arguments, args.out / "kfp-local", mlflow_uri=None if args.no_mlflow else uri,
                                cache=not args.no_cache)
    print(f"executed: {', '.join(log.executed) or 'nothing'}; from cache: {', '.join(log.cached) or 'nothing'}")
    _print_result(out_dir.parent, args.stage, out_dir)


def _print_result(run_dir: Path, stage: str, out: Path | None = None) -> None:
    from components import report

    out = out or run_dir / stage
    for metrics in (run_dir / "metrics.json", out / "metrics.json"):
        if metrics.is_file():  # evaluation ran (--downstream)
            print(report.summary(artifacts.read_json(metrics)))
            break
    if (out / "stage.json").is_file():
        result = artifacts.read_json(out / "stage.json")["result"]
        print(f"{stage}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    history = out / "history.json"
    if history.is_file() and (h := artifacts.read_json(history)) and "test_acc" in h[-1]:
        asr = f"  ASR {h[-1]['test_asr']:.4f}" if "test_asr" in h[-1] else ""
        print(f"{stage}: ACC {h[-1]['test_acc']:.4f}{asr} (last epoch, on the monitor's first test images, "
              f"at most {MONITOR_SIZE})")
    print(f"output: {out}")
