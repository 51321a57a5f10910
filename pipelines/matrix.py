"""The benchmark matrix (defenses x attacks x poison rates) as one KFP pipeline, fanned out over the cluster; its
results table, its plot and its MLflow record, for every engine of `unpoison benchmark`.

What fans out. A KFP pipeline is a static graph: a `dsl.ParallelFor` runs the same body for every item, and cannot
pick another sub-DAG per item. The defenses differ in their stages, so they are fixed when the pipeline is built
(`build(defenses, ...)`: the CLI builds it from the declarations of the defenses asked for); the attack settings do
not (every defense reads its attack as one dict), so they are what the loop iterates over: the pipeline parameter
`cells` is the list of attack settings, one per attack and poison rate (`settings`: the attack's name, its params,
its rate; with the variant label that keeps its records apart from the protocol's, `variant`). The loop body holds,
once, the prefix every defense of that attack shares, and each defense's own stages, built from its declaration
(`kfp_pipelines.stage_task`, as its own pipeline builds them):

- `poison`: the poisoned set, one task per attack setting, read by every defense's stages (data flow, not only the
  cache: it is computed once per attack setting even with caching off);
- `train`: the no-defense training (the `none` defense's stage), when `none` is asked for or a defense's reference
  stage trains exactly that model with these settings (`benchmark.warmup_is_nodef`: MeCa's warm-up always, A-ABL's
  when its stage 1 has no overrides); such a defense reads it in place of its own stage. The choice is made when the
  pipeline is built, from the configuration whose values become the pipeline parameters' defaults: a run that
  changes `train` or a defense's section should rebuild the pipeline (the CLI always does).
- `<defense>-<stage>`: the defense's stages, `<defense>-evaluate` last, then `<defense>-cell`: the cell's records
  (`cell_records`: the records of `benchmark.records_from_run`, its stages' wall time, the machine its GPU stages
  ran on).

After the loop, `collect` receives every defense's cell records over all iterations (`dsl.Collected`, one list per
defense) and writes one results table (`results.json` in the `benchmarks/results` record format, `results.parquet`
and `results.md` with the columns of `cpu-reference.md`, and the plot `results.png`), and logs one MLflow parent run
whose child runs are the cells, the table and the plot its artifacts. `collect` is never cached (it records the run
in MLflow) nor retried; it fails the run, once, naming each cell whose stage stopped on a user error.

Parallelism. `dsl.ParallelFor(parallelism=...)` takes a compile-time int in kfp 2.17 (`ParallelFor.__init__` compares
it with 0; it compiles to `iteratorPolicy.parallelismLimit` of the loop task), never a pipeline parameter: so it is
an argument of `build` (`unpoison benchmark --parallelism N`), 0 for no limit. It caps the attack settings in flight;
each runs its defenses side by side, so a matrix holds at most N x (its GPU tasks that can run at once in one
iteration: the shared training and each defense's first GPU stage) GPUs. Every training and scoring task in the
body asks for one GPU (`kfp_pipelines.on_gpu`), as in the defenses' own pipelines; the poison task one when an
attack of the matrix trains a model (`kfp_pipelines.on_poison_node`). That count is the matrix's pipeline parameter
`poison_gpus`, not each cell's: in kfp 2.17 a loop item's field read by a resource setting does not reach the loop's
group (the compiled loop lacks that input, and kfp.local fails on it).

No live MLflow tracking of the stages: the defenses' pipelines open their parent run first (`track-start`) and
their stages log child runs into it; here the MLflow record is the matrix's, children the cells, made at the end
by `collect` (a cell's stages are in its run folder, its KFP artifacts).

kfp.local (kfp 2.17.0) runs this pipeline: its `SubprocessRunner` and `DockerRunner` both go through
`kfp.local.pipeline_orchestrator`, which hands a pipeline with control flow to
`kfp.local.orchestrator.enhanced_dag_orchestrator`: `dsl.ParallelFor` over a pipeline parameter (items and their
dict fields, `item.attack`), its parallelism limit (`iteratorPolicy.parallelismLimit`, but in threads of the local
process and never more than 2 at once: `ParallelExecutor.conservative_max`), and `dsl.Collected` of artifacts,
given to the consumer as a list in iteration order. tests/test_matrix.py runs a 2 x 2 matrix that way.

Variants. A setting other than the protocol's attack (another rate, other params) is a held-out setting in the
records' sense (`benchmark.merge`): its label (`rate=0.1`, `size=5`) and settings (`attack.rate`: 0.1) keep its
records apart from the protocol's, in the tables as `badnets (rate=0.1)`.

The plot (`plot`): ACC against ASR, one panel per defense, one marker per cell (colour: the attack setting), the
no-defense point of the same attack setting beside it (hollow, joined by a line): down and to the right is a
backdoor removed at no cost. A cell without ASR (attack `none`, the clean data set) has no point.
"""

import inspect  # no `from __future__ import annotations`: KFP reads the components' real annotations
import os
from pathlib import Path
from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Output

from components import kfp_components as c
from components.defenses import get
from components.errors import UnpoisonError
from pipelines import kfp_pipelines as kp
from pipelines.matrix_results import merge_results, parse_attacks, parse_rates, settings, summary_line

CELLS = "cells"  # the pipeline parameter: the attack settings the loop iterates over
POLL_S = 10  # --wait: seconds between two looks at the run's state
# --wait: the states a run ends in (kfp_server_api's V2beta1RuntimeState; kfp.Client.wait_for_run_completion knows
# no CANCELED, and would wait for a cancelled run until its timeout)
FINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "ERROR", "CANCELED"}


# --- the pipeline --------------------------------------------------------------------------------------------------

@c.component
def cell(defense: str, variant: str, settings: dict, gpu_stages: list, upstream: list, records: Output[Dataset],
         in0: Input[Artifact] = None, in1: Input[Artifact] = None, in2: Input[Artifact] = None,
         in3: Input[Artifact] = None, in4: Input[Artifact] = None, in5: Input[Artifact] = None,
         in6: Input[Artifact] = None, in7: Input[Artifact] = None, in8: Input[Artifact] = None,
         in9: Input[Artifact] = None, in10: Input[Artifact] = None, in11: Input[Artifact] = None,
         in12: Input[Artifact] = None, in13: Input[Artifact] = None, in14: Input[Artifact] = None,
         in15: Input[Artifact] = None):
    """A cell's records (benchmark format) from its stages' outputs (`upstream[i]` names slot `in<i>`)."""
    from pathlib import Path

    from pipelines.matrix_results import cell_records

    slots = [in0, in1, in2, in3, in4, in5, in6, in7, in8, in9, in10, in11, in12, in13, in14, in15]
    dirs = {name: Path(a.path) for name, a in zip(upstream, slots) if a is not None}
    cell_records(defense, variant, settings, gpu_stages, dirs, Path(records.path))


@c.component
def collect(defenses: list, results: Output[Dataset], table: Output[Markdown],
            in0: Input[List[Artifact]] = None, in1: Input[List[Artifact]] = None, in2: Input[List[Artifact]] = None,
            in3: Input[List[Artifact]] = None, in4: Input[List[Artifact]] = None, in5: Input[List[Artifact]] = None,
            in6: Input[List[Artifact]] = None, in7: Input[List[Artifact]] = None, in8: Input[List[Artifact]] = None,
            in9: Input[List[Artifact]] = None, in10: Input[List[Artifact]] = None, in11: Input[List[Artifact]] = None,
            in12: Input[List[Artifact]] = None, in13: Input[List[Artifact]] = None, in14: Input[List[Artifact]] = None,
            in15: Input[List[Artifact]] = None):
    """Every cell's records (`in<i>`: defense i's cells, dsl.Collected) into one results table, its plot and one
    MLflow parent run whose children are the cells; never cached."""
    import shutil
    from pathlib import Path

    from pipelines.matrix_results import collect_cells

    slots = [in0, in1, in2, in3, in4, in5, in6, in7, in8, in9, in10, in11, in12, in13, in14, in15]
    folders = [Path(a.path) for lst in slots[:len(defenses)] for a in (lst or [])]
    collect_cells(folders, Path(results.path))
    shutil.copy(Path(results.path) / "results.md", table.path)


def shared_training(defenses: list[str], cfg) -> list[str]:
    """The defenses that read the shared no-defense training in place of a stage of theirs."""
    from pipelines.benchmark import warmup_is_nodef

    return [d for d in defenses if d == "none" or warmup_is_nodef(d, cfg)]


def parameters(defenses: list[str]) -> list[str]:
    """The matrix pipeline's parameters: the shared configuration but `attack`, each defense's section, the data's
    fingerprint, the poison tasks' GPU count and the attack settings."""
    sections = [get(d).section for d in defenses if get(d).section]
    return [*(k for k in kp.CONFIG_KEYS if k != "attack"), *dict.fromkeys(sections), kp.DATA_HASH, kp.POISON_GPUS,
            CELLS]


def build(defenses: list[str], cfg, cells: list[dict], *, parallelism: int = 0, image: str | None = None):
    """The matrix pipeline for `defenses` (module docstring), its parameters' defaults the configuration `cfg` and
    the attack settings `cells` (`settings`). `parallelism` caps the attack settings in flight (0: no cap); `image`
    replaces the stage image on every task (`kfp_pipelines.stage_image` checks it)."""
    if not defenses or len(defenses) > c.SLOTS:
        raise UnpoisonError(f"a matrix takes 1 to {c.SLOTS} defenses, not {len(defenses)}; pass fewer to --defenses")
    if len(set(defenses)) < len(defenses):
        raise UnpoisonError(f"--defenses names a defense twice ({','.join(defenses)}); name each once")
    if parallelism < 0:
        raise UnpoisonError(f"--parallelism {parallelism} is negative; pass the most cells to run at once, 0: all")
    if any(s["attack"]["name"] == "none" for s in cells):
        raise UnpoisonError("attack 'none' (the data set as delivered) takes another first stage (`ingest`) than the "
                            "matrix's cells (`poison`); run it with --engine local, or leave it out of --attacks")
    sharers = shared_training(defenses, cfg)
    names = parameters(defenses)
    defaults = {**kp.DEFAULTS, **{k: v for k, v in kp.arguments(cfg, "none", data_hash="").items()},
                **{get(d).section: kp.without_none(getattr(cfg, get(d).section).model_dump())
                   for d in defenses if get(d).section}, kp.POISON_GPUS: _poison_gpus(cells), CELLS: cells}

    def body(*args):
        p = dict(zip(names, args))
        tasks, records = [], []
        with dsl.ParallelFor(p[CELLS], parallelism=parallelism) as item:
            p = {**p, "attack": item.attack}
            poison = kp._named(c.poison, "poison", "Poison injection: the attack setting's poisoned set")(
                data=p["data"], attack=p["attack"], train_limit=p["train_limit"], data_hash=p[kp.DATA_HASH])
            kp.on_poison_node(poison, p[kp.POISON_GPUS])
            shared = {"poison": poison.outputs["dataset"], "truth": poison.outputs["truth"]}
            tasks.append(poison)
            nodef = None
            if sharers:
                plain = get("none")
                nodef = kp.stage_task(plain, plain.stage("train"), p, shared, False, name="train")
                tasks.append(nodef)
            for name in defenses:
                d = get(name)
                reference = "train" if name == "none" else _reference_stage(name)
                outputs = dict(shared)
                for st in d.plan(False)[1:]:
                    if name in sharers and st.name == reference:
                        outputs[st.name] = nodef.outputs["out"]
                        continue
                    task = kp.stage_task(d, st, p, outputs, False, name=f"{name}-{st.name}")
                    tasks.append(task)
                    outputs[st.name] = task.outputs["metrics" if st.name == "evaluate" else "out"]
                stages = d.stage_names(False)
                rec = kp.on_cpu(kp._named(cell, f"{name}-cell", cell.component_spec.description)(
                    defense=name, variant=item.variant, settings=item.settings,
                    gpu_stages=[s.name for s in d.plan(False) if s.gpu], **kp._slots(outputs, stages)),
                    cpu="1", memory="2Gi")
                tasks.append(rec)
                records.append(rec.outputs["records"])
        done = collect(defenses=defenses, **{f"in{i}": dsl.Collected(r) for i, r in enumerate(records)})
        kp.with_secrets(done).set_caching_options(enable_caching=False)
        done.set_cpu_request("1").set_memory_request("2Gi")
        tasks.append(done)
        if image:
            for task in tasks:
                task.set_container_image(image)

    body.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[n],
                           annotation=type(defaults[n])) for n in names])
    body.__name__ = "matrix_pipeline"
    pipeline = dsl.pipeline(name="unpoison-matrix", description=f"The benchmark matrix: {', '.join(defenses)} x "
                            f"{len(cells)} attack setting(s), fanned out over the attack settings")(body)
    pipeline.result = ("collect", "results")  # kfp_pipelines.run_local reads it
    return pipeline


def _poison_gpus(cells: list[dict]) -> str:
    """The poison tasks' GPU count: one if an attack setting's attack trains a model (module docstring)."""
    return kp.poison_gpus(*(s["attack"]["name"] for s in cells))


def _reference_stage(defense: str) -> str | None:
    from pipelines.benchmark import reference_stage

    return reference_stage(defense)


def arguments(cfg, defenses: list[str], cells: list[dict], data_hash: str | None = None) -> dict:
    """The matrix pipeline's arguments from a validated configuration (`kfp_pipelines.arguments`, its sections, the
    attack settings)."""
    tree = kp.arguments(cfg, "none", data_hash=data_hash)
    tree.pop("attack")
    for d in defenses:
        if get(d).section:
            tree[get(d).section] = kp.without_none(getattr(cfg, get(d).section).model_dump())
    return {**tree, kp.POISON_GPUS: _poison_gpus(cells), CELLS: cells}


# --- `unpoison benchmark --engine kfp-local|kfp` ----------------------------------------------------------------------

def _parse(args) -> tuple[list[str], list[dict], object]:
    """Defenses, attack settings and the configuration of a benchmark command, all validated."""
    from components.config import load_config, parse_overrides

    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()]
    for d in defenses:
        get(d)  # an unknown defense fails before any run, naming the registry
    rates = parse_rates(getattr(args, "rates", None))
    overrides = parse_overrides(args.set, data=args.data)
    cells = settings(args.protocol, parse_attacks(args.attacks), rates, overrides, args.config)
    first = cells[0]["attack"]
    cfg = load_config(args.protocol, {**overrides, "attack.name": first["name"]}, args.config)
    return defenses, cells, cfg


def main(args) -> None:
    """`unpoison benchmark --engine kfp-local|kfp`: the matrix pipeline under kfp.local, its records merged into
    <out>/<protocol>-reference.json (with .md, .parquet, .png beside it), or submitted to the KFP API at --host."""
    from components import tracking

    if args.variant:
        raise UnpoisonError("--variant is for --engine local; the matrix labels each attack setting that departs from "
                            "the protocol's itself (e.g. badnets (rate=0.1)): pass --rates or NAME:KEY=VALUE")
    if getattr(args, "fetch", None):
        return fetch(args, args.fetch)
    defenses, cells, cfg = _parse(args)
    if args.engine == "kfp":
        return submit(args, defenses, cells, cfg)
    pipeline = build(defenses, cfg, cells, parallelism=args.parallelism)
    uri = tracking.default_uri(args.runs)
    args.runs.mkdir(parents=True, exist_ok=True)
    tracking._experiment(tracking._client(uri), uri)  # the store's tables, before tasks in parallel open it at once
    folder, log = kp.run_local(pipeline, arguments(cfg, defenses, cells), args.runs / "kfp-local", mlflow_uri=uri,
                               cache=not args.no_cache)
    from components import artifacts

    new = artifacts.read_json(folder / "results.json")
    path = merge_results(args.out, args.protocol, new)
    for r in new:
        print(summary_line(r), flush=True)
    print(f"from cache: {', '.join(sorted(set(log.cached))) or 'nothing'}")
    print(f"results: {path}\nmatrix run: {folder}\n{tracking.ui_hint(uri)}")


def submit(args, defenses: list[str], cells: list[dict], cfg) -> None:
    """Submit the matrix to the KFP API at --host, as `unpoison submit` submits a defense."""
    import kfp

    if not args.host:
        raise UnpoisonError("--engine kfp submits the matrix to a cluster: pass --host, the KFP API endpoint, e.g. "
                            "http://localhost:8080")
    if args.wait and not (args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise UnpoisonError("--wait merges the matrix's results from MLflow once the run ends: pass --mlflow-uri "
                            "(the server the cluster's unpoison-mlflow Secret names) or set MLFLOW_TRACKING_URI")
    image = kp.stage_image(args.image, args.allow_tag)
    pipeline = build(defenses, cfg, cells, parallelism=args.parallelism, image=image)
    try:
        values = arguments(cfg, defenses, cells, data_hash=args.data_hash)
    except UnpoisonError as e:
        raise UnpoisonError(f"cannot fingerprint --data {cfg.data} from this machine for the cache key ({e}); or "
                            f"pass --data-hash with a string that changes when the data does") from None
    try:
        client = kfp.Client(host=args.host)
        run = client.create_run_from_pipeline_func(pipeline, arguments=values, experiment_name=args.experiment,
                                                   enable_caching=False if args.no_cache else None,
                                                   run_name=args.name, service_account=args.service_account)
    except Exception as e:  # kfp raises urllib3 / kfp_server_api errors of many kinds
        raise UnpoisonError(f"the KFP API at {args.host} did not accept the run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); check --host (e.g. kubectl port-forward "
                            f"svc/ml-pipeline-ui 8080:80 -n kubeflow) and that KFP is running") from None
    print(f"matrix: {len(defenses)} defense(s) x {len(cells)} attack setting(s), parallelism "
          f"{args.parallelism or 'unlimited'}")
    print(f"run id: {run.run_id}\nrun: {args.host.rstrip('/')}/#/runs/details/{run.run_id}")
    print("results: the `collect` task's `results` artifact (results.json in the benchmarks/results format, .md, "
          ".parquet, results.png) and the MLflow run `matrix-<run id>`; with --wait (or later with --fetch RUN_ID) "
          "and an MLflow URI they are merged into --out")
    if args.wait:
        state = wait(client, args.host, run.run_id, args.timeout)
        print(f"state: {state}", flush=True)
        if state != "SUCCEEDED":
            raise UnpoisonError(f"KFP run {run.run_id} ended {state}: nothing merged into {args.out}; see its failed "
                                f"task's logs at {args.host.rstrip('/')}/#/runs/details/{run.run_id}, fix, and run "
                                f"the matrix again (its finished cells come from KFP's cache)")
        fetch(args, run.run_id)


def wait(client, host: str, run_id: str, timeout: float) -> str:
    """The state a KFP run ends in (FINAL_STATES, upper case), looked at every POLL_S seconds for at most `timeout`
    seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            state = str(client.get_run(run_id).state or "").upper()
        except Exception as e:  # kfp raises urllib3 / kfp_server_api errors of many kinds
            raise UnpoisonError(f"lost the KFP API at {host} while waiting for run {run_id} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160] if str(e) else ''}); the run goes on: once it has "
                                f"finished, merge its results with --fetch {run_id}") from None
        state = state.rsplit(".", 1)[-1]  # an enum's str (V2beta1RuntimeState.SUCCEEDED) or its value
        if state in FINAL_STATES:
            return state
        if time.monotonic() >= deadline:
            raise UnpoisonError(f"KFP run {run_id} is still {state or 'not started'} after --timeout {timeout:g} s; "
                                f"once it has finished, merge its results with --fetch {run_id}")
        time.sleep(POLL_S)


def fetch(args, kfp_run_id: str) -> None:
    """Merge the records of a finished matrix run into --out: its results.json, from the MLflow parent run that
    `collect` logged (tag unpoison.kfp_run_id)."""
    from components import artifacts, tracking

    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UnpoisonError("--fetch reads the matrix's results from MLflow: pass --mlflow-uri (the server the "
                            "cluster's unpoison-mlflow Secret names) or set MLFLOW_TRACKING_URI")
    client = tracking._client(uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`unpoison.kfp_run_id` = '{kfp_run_id}' and "
                              "tags.`unpoison.matrix` = 'true'") if experiment and "'" not in kfp_run_id else []
    if not runs:
        raise UnpoisonError(f"no matrix run of KFP run '{kfp_run_id}' in MLflow at {uri}; check the run id, that "
                            f"the run succeeded and that its pods track to this server")
    done = [r for r in runs if r.info.status == "FINISHED"]  # newest first
    if not done:
        raise UnpoisonError(f"the matrix run of KFP run '{kfp_run_id}' in MLflow at {uri} is {runs[0].info.status}, "
                            f"not FINISHED: its collect task did not end; wait for the KFP run to finish (or retry "
                            f"it), then --fetch again")
    try:
        local = Path(client.download_artifacts(done[0].info.run_id, "results.json"))
    except Exception as e:  # MlflowException, an object store's error, ...
        raise UnpoisonError(f"cannot read results.json of the matrix run {done[0].info.run_id} (KFP run "
                            f"'{kfp_run_id}') from MLflow at {uri} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}); check that this machine reaches "
                            f"the server's artifact store") from None
    new = artifacts.read_json(local)
    protocols = sorted({r["protocol"] for r in new})
    if protocols and protocols != [args.protocol]:
        raise UnpoisonError(f"KFP run '{kfp_run_id}' ran protocol {', '.join(protocols)}, not --protocol "
                            f"{args.protocol}: pass --protocol {protocols[0]} to merge into "
                            f"{protocols[0]}-reference.json")
    path = merge_results(args.out, args.protocol, new)
    for r in new:
        print(summary_line(r), flush=True)
    print(f"results: {path}")
