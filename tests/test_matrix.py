"""The benchmark matrix as one KFP pipeline (pipelines/matrix.py): the compiled spec (the fan-out and its parallelism,
a GPU on every training and scoring task in it, one poison task per attack setting, the shared no-defense training,
the collecting task), `unpoison benchmark --engine kfp` against the compiled spec, and a 2 x 2 matrix end to end
under kfp.local (kfp 2.17's local runner runs dsl.ParallelFor and dsl.Collected), its collected table checked
against every cell's own metrics; `--engine kfp --wait` (a fake KFP client) and `--fetch RUN_ID` merging what
`collect` logged to a real `mlflow server` (conftest's `mlflow_server`) into --out."""

import json

import pyarrow.parquet as pq
import pytest
import yaml
from kfp import compiler

from components.config import load_config
from components.defenses import get
from pipelines import kfp_pipelines as kp
from pipelines import matrix
from pipelines import matrix_results as mr
from pipelines.benchmark import table
from pipelines.cli import main

DIGEST = "registry.example/stage@sha256:" + "a" * 64
GPU = {"resourceType": "nvidia.com/gpu", "resourceCount": "1"}


def _compile(pipeline, tmp_path) -> tuple[dict, dict]:
    compiler.Compiler().compile(pipeline, str(tmp_path / "matrix.yaml"))
    spec, platform = yaml.safe_load_all((tmp_path / "matrix.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _container(spec: dict, task: dict) -> dict:
    return spec["deploymentSpec"]["executors"][spec["components"][task["componentRef"]["name"]]["executorLabel"]][
        "container"]


def _loop(spec: dict) -> tuple[str, dict, dict]:
    """The loop task of the root DAG, and the tasks of its body."""
    (name,) = [n for n, t in spec["root"]["dag"]["tasks"].items() if "parameterIterator" in t]
    task = spec["root"]["dag"]["tasks"][name]
    return name, task, spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cfg = load_config("cpu", {})
    cells = mr.settings("cpu", mr.parse_attacks("badnets,blend:alpha=0.1"), [0.05, 0.1], {})
    defenses = ["none", "meca", "abl"]
    spec, executors = _compile(matrix.build(defenses, cfg, cells, parallelism=3), tmp_path_factory.mktemp("spec"))
    return defenses, cells, spec, executors


def test_the_matrix_fans_out_over_the_attack_settings_with_its_parallelism(compiled):
    defenses, cells, spec, _ = compiled
    name, loop, _ = _loop(spec)
    assert set(spec["root"]["dag"]["tasks"]) == {name, "collect"}
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--cells"
    # the cells parameter: attacks x rates, a setting other than the protocol's labelled as a variant
    default = spec["root"]["inputDefinitions"]["parameters"]["cells"]["defaultValue"]
    assert [(c["attack"]["name"], c["attack"]["rate"], c["variant"]) for c in default] == [
        ("badnets", 0.05, ""), ("badnets", 0.1, "rate=0.1"), ("blend", 0.05, "alpha=0.1"),
        ("blend", 0.1, "rate=0.1,alpha=0.1")]
    # the shared configuration and each defense's own section, no attack (it comes from the loop item)
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "data", "protocol", "train_limit", "model", "seed", "train", "final", "meca", "abl", "data_hash",
        "poison_gpus", "cells"}
    # neither badnets nor blend trains a model: their poison tasks take no GPU
    assert spec["root"]["inputDefinitions"]["parameters"]["poison_gpus"]["defaultValue"] == "0"


def test_one_poison_task_and_one_no_defense_training_per_attack_setting(compiled):
    defenses, _, spec, executors = compiled
    _, _, body = _loop(spec)
    programs = {n: _container(spec, t)["command"][-1] for n, t in body.items()}
    assert [n for n, p in programs.items() if "import data_task" in p] == ["poison"]
    assert body["poison"]["inputs"]["parameters"]["attack"]["componentInputParameter"] == \
        "pipelinechannel--cells-loop-item"
    # MeCa's warm-up is the no-defense training: it reads `train`, runs no warm-up of its own; ABL's differs
    assert "train" in body and "meca-warmup" not in body and "abl-warmup" in body
    assert body["meca-score"]["inputs"]["artifacts"]["in1"]["taskOutputArtifact"]["producerTask"] == "train"
    # every defense's stages from its declaration, each defense's data stage the shared poison task
    for d in defenses:
        plan = get(d).plan(False)
        own = {f"{d}-{s.name}".replace("_", "-") for s in plan[1:]} - {"meca-warmup", "none-train"}
        assert own <= set(body), d
        assert body[f"{d}-evaluate"]["inputs"]["artifacts"]["in0"]["taskOutputArtifact"]["producerTask"] == "poison"


def test_every_training_and_scoring_task_in_the_fan_out_asks_for_a_gpu(compiled):
    defenses, _, spec, executors = compiled
    _, loop, body = _loop(spec)
    # the poison task's GPU count reaches the loop's group (kfp_pipelines.on_poison_node)
    assert "pipelinechannel--poison_gpus" in spec["components"][loop["componentRef"]["name"]]["inputDefinitions"][
        "parameters"]
    gpu = {"train"} | {f"{d}-{s.name}".replace("_", "-") for d in defenses for s in get(d).plan(False) if s.gpu}
    for name, task in body.items():
        resources = _container(spec, task)["resources"]
        k8s = executors[spec["components"][task["componentRef"]["name"]]["executorLabel"]]
        if name in gpu or name == "poison":
            count = "{{$.inputs.parameters['pipelinechannel--poison_gpus']}}" if name == "poison" else "1"
            assert {k: resources["accelerator"][k] for k in GPU} == {**GPU, "resourceCount": count}, name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
            assert task["retryPolicy"]["maxRetryCount"] == 2
        else:  # CPU stages, the cells' records
            assert "accelerator" not in resources, name
        assert task["cachingOptions"]["enableCache"] is True, name
    assert {n for n in body if n.endswith("-cell")} == {f"{d}-cell" for d in defenses}


def test_the_collecting_task_receives_every_defenses_cells(compiled):
    defenses, _, spec, executors = compiled
    name, _, _ = _loop(spec)
    collect = spec["root"]["dag"]["tasks"]["collect"]
    assert collect["dependentTasks"] == [name]
    assert not collect.get("cachingOptions", {}).get("enableCache") and "retryPolicy" not in collect
    artifacts = collect["inputs"]["artifacts"]
    assert {k: v["taskOutputArtifact"]["producerTask"] for k, v in artifacts.items()} == \
        {f"in{i}": name for i in range(len(defenses))}
    assert [artifacts[f"in{i}"]["taskOutputArtifact"]["outputArtifactKey"] for i in range(len(defenses))] == \
        [f"pipelinechannel--{d}-cell-records" for d in defenses]
    inputs = spec["components"][collect["componentRef"]["name"]]["inputDefinitions"]["artifacts"]
    assert inputs["in0"]["isArtifactList"] is True


def test_bad_matrices_are_clear_errors(tmp_path, capsys):
    cfg = load_config("cpu", {})
    cells = mr.settings("cpu", [("badnets", {})], None, {})
    with pytest.raises(Exception, match="negative"):
        matrix.build(["none"], cfg, cells, parallelism=-1)
    with pytest.raises(Exception, match="twice"):
        matrix.build(["none", "none"], cfg, cells)
    with pytest.raises(Exception, match="KEY=VALUE"):
        mr.parse_attacks("blend:alpha")
    assert main(["benchmark", "--engine", "kfp", "--defenses", "none", "--attacks", "badnets", "--data",
                 "sample"]) == 2
    assert "--host" in capsys.readouterr().err
    assert main(["benchmark", "--engine", "kfp-local", "--defenses", "none", "--attacks", "none", "--data",
                 "sample", "--runs", str(tmp_path)]) == 2
    assert "--engine local" in capsys.readouterr().err


class FakeClient:
    """Stands in for kfp.Client: records what submit would send, contacts nothing; the run it answers with has the
    id `run_id`, and reports `states` one poll after another (the last one from then on)."""
    submitted = []
    run_id = "fake-run"
    states = ["RUNNING"]
    polls = 0

    def __init__(self, host):
        self.host = host

    def create_run_from_pipeline_func(self, pipeline, **kwargs):
        FakeClient.submitted.append((pipeline, kwargs))
        return type("Run", (), {"run_id": FakeClient.run_id})()

    def get_run(self, run_id):
        assert run_id == FakeClient.run_id
        FakeClient.polls += 1
        return type("Run", (), {"run_id": run_id, "state": FakeClient.states[min(FakeClient.polls,
                                                                                 len(FakeClient.states)) - 1]})()


@pytest.fixture
def fake_kfp(monkeypatch):
    """kfp.Client replaced by FakeClient, fresh; --wait looks at the run's state without sleeping."""
    import kfp

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setattr(matrix, "POLL_S", 0)
    FakeClient.submitted, FakeClient.run_id, FakeClient.states, FakeClient.polls = [], "fake-run", ["RUNNING"], 0
    return FakeClient


def test_benchmark_engine_kfp_submits_the_compiled_matrix(fake_kfp, tmp_path, capsys):
    assert main(["benchmark", "--engine", "kfp", "--host", "http://kfp.example", "--defenses", "none,meca",
                 "--attacks", "badnets,blend", "--rates", "0.05,0.1", "--data", "sample", "--parallelism", "2",
                 "--image", DIGEST, "--set", "train.epochs=3"]) == 0
    assert "run id: fake-run" in capsys.readouterr().out
    (pipeline, kwargs), = FakeClient.submitted
    spec, executors = _compile(pipeline, tmp_path)
    _, loop, body = _loop(spec)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 2
    assert [n for n in body if n == "poison"] == ["poison"] and "meca-warmup" not in body
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {DIGEST}
    args = kwargs["arguments"]
    assert [(c["attack"]["name"], c["attack"]["rate"]) for c in args["cells"]] == [
        ("badnets", 0.05), ("badnets", 0.1), ("blend", 0.05), ("blend", 0.1)]
    assert args["train"]["epochs"] == 3 and "attack" not in args and args["data_hash"]
    assert set(args) == set(spec["root"]["inputDefinitions"]["parameters"])
    assert kwargs["experiment_name"] == "unpoison" and kwargs["enable_caching"] is None
    assert args["poison_gpus"] == "0"  # neither attack trains a model


def test_a_matrix_with_an_attack_that_trains_a_model_gives_its_poison_tasks_a_gpu():
    """One count for the whole matrix (pipelines/matrix.py): lc trains its surrogate, so every poison task gets one."""
    cfg = load_config("cpu", {})
    cells = mr.settings("cpu", mr.parse_attacks("badnets,lc"), None, {})
    assert matrix.arguments(cfg, ["none"], cells, data_hash="")["poison_gpus"] == "1"
    assert matrix.arguments(cfg, ["none"], cells[:1], data_hash="")["poison_gpus"] == "0"


def _record(defense, attack, acc, asr, variant=None):
    return {"defense": defense, "attack": attack, "protocol": "cpu", "acc": acc, "asr": asr, "der": None,
            "run": f"{defense}-{attack}", "machine": "m", "target_acc": 0.7, "detection_tpr": None,
            "detection_fpr": None, "wall_seconds": 1.0,
            **({"variant": variant, "settings": {"attack.rate": 0.1}} if variant else {})}


def test_results_table_parquet_and_plot(tmp_path):
    records = [_record("none", "badnets", 0.76, 0.9), _record("meca", "badnets", 0.71, 0.05),
               _record("none", "blend", 0.75, 0.99, "rate=0.1"), _record("meca", "blend", 0.74, 0.02, "rate=0.1")]
    paths = mr.write_results(records, tmp_path, "results")
    header = [h.strip() for h in table(records).splitlines()[0].strip("|").split("|")]
    parquet = pq.read_table(paths["parquet"])
    assert parquet.column_names == header  # the columns of cpu-reference.md
    assert parquet.column("attack").to_pylist() == ["badnets", "badnets", "blend (rate=0.1)", "blend (rate=0.1)"]
    assert paths["png"].stat().st_size > 5000 and "![ACC against ASR](results.png)" in paths["md"].read_text()
    assert json.loads(paths["json"].read_text()) == records
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_a_2x2_matrix_runs_under_kfp_local_and_collects_every_cell(tmp_path, capsys, mini_sample):
    """none and adv-train (whose warm-up is the shared no-defense training) x badnets and blend, tiny settings."""
    import builtins
    import logging

    from mlflow.tracking import MlflowClient

    out, runs = tmp_path / "results", tmp_path / "runs"
    original_print, original_handlers = builtins.print, logging.getLogger().handlers[:]
    assert main(["benchmark", "--engine", "kfp-local", "--defenses", "none,adv-train", "--attacks", "badnets,blend",
                 "--data", mini_sample, "--out", str(out), "--runs", str(runs), "--parallelism", "2",
                 "--set", "train_limit=300", "train.epochs=1", "aabl.final.epochs=1", "aabl.adv_steps=1",
                 "aabl.ra_steps=1"]) == 0
    printed = capsys.readouterr().out
    # kfp.local's indented print (swapped per task, raced by the parallel iterations) does not outlive the run
    assert builtins.print is original_print
    assert logging.getLogger().handlers == original_handlers  # nor does a task's log handler on a stream since closed
    records = json.loads((out / "cpu-reference.json").read_text())
    assert sorted((r["defense"], r["attack"]) for r in records) == [
        ("adv-train", "badnets"), ("adv-train", "blend"), ("none", "badnets"), ("none", "blend")]
    # the collected table equals the cells' own metrics: every evaluate task's metrics.json, by defense and attack
    (run,) = [d for d in (runs / "kfp-local").iterdir() if d.name.startswith("unpoison-matrix-")]
    evaluated = {}
    for metrics in run.rglob("metrics.json"):
        m = json.loads(metrics.read_text())
        if "stages" not in m:  # an evaluate task's output (a cell task's copy carries the stage times)
            head = m["models"]["nodef"] if m["defense"] == "none" else m
            evaluated[(m["defense"], m["attack"]["name"])] = (head["acc"], head["asr"])
    assert {(r["defense"], r["attack"]): (r["acc"], r["asr"]) for r in records} == evaluated
    assert all(r["machine"] != "unknown" and r["wall_seconds"] > 0 and r["engine"] == "kfp" for r in records)
    collected = json.loads(next(run.rglob("collect/results/results.json")).read_text())
    assert collected == records
    assert pq.read_table(out / "cpu-reference.parquet").num_rows == 4 and (out / "cpu-reference.png").is_file()
    assert "| badnets | adv-train |" in (out / "cpu-reference.md").read_text() and "results:" in printed
    # one poison task and one no-defense training per attack: adv-train's warm-up is the shared `train`
    client = MlflowClient(f"sqlite:///{(runs / 'mlflow.db').resolve()}")
    found = client.search_runs([client.get_experiment_by_name("unpoison").experiment_id],
                               "tags.`unpoison.matrix` = 'true'")
    (parent,) = found
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["unpoison.defense"] + "/" + c.data.tags["unpoison.attack"] for c in children) == [
        "adv-train/badnets", "adv-train/blend", "none/badnets", "none/blend"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "results.parquet", "results.md", "results.png"} <= artifacts


# --- `--engine kfp --wait` and `--fetch`: the results of a cluster's run, from the MLflow run its `collect` logged ---

SUBMIT = ["benchmark", "--engine", "kfp", "--host", "http://kfp.example", "--defenses", "none,meca", "--attacks",
          "badnets", "--data", "sample", "--image", DIGEST, "--wait"]


def _collected(uri: str, kfp_run_id: str, records: list[dict], folder, monkeypatch) -> None:
    """What the `collect` task of KFP run `kfp_run_id` leaves in MLflow at `uri`: its cells' records.json (one
    folder per cell, as the cell tasks write them) through `collect_cells`, in a pod whose KFP_RUN_ID is the run's."""
    cells = []
    for i, r in enumerate(records):
        cells.append(folder / f"cell{i}")
        cells[-1].mkdir(parents=True)
        (cells[-1] / "records.json").write_text(json.dumps([r]))
    with monkeypatch.context() as m:
        m.setenv("KFP_RUN_ID", kfp_run_id)
        mr.collect_cells(cells, folder / "results", mlflow_uri=uri)


def _new_records() -> list[dict]:
    return [{**r, "engine": "kfp", "run": f"{KFP_ID}/{r['defense']}-{r['attack']}"} for r in (
        _record("none", "badnets", 0.76, 0.9), _record("meca", "badnets", 0.72, 0.04),
        _record("none", "blend", 0.75, 0.99, "rate=0.1"), _record("meca", "blend", 0.74, 0.02, "rate=0.1"))]


KFP_ID = "3f1c2a9e-0b7d-4c55-9a61-5d2e8f0c1b47"


def _results(out) -> dict:
    return {(r["defense"], r["attack"], r.get("variant") or ""): r
            for r in json.loads((out / "cpu-reference.json").read_text())}


def _assert_merged(out, new: list[dict]) -> None:
    """`new` in out/cpu-reference.json, beside the other cell already there (abl on sig), in place of the older
    record of its own cell (meca on badnets); the table, Parquet and plot rewritten from them."""
    got = _results(out)
    assert set(got) == {("none", "badnets", ""), ("meca", "badnets", ""), ("none", "blend", "rate=0.1"),
                        ("meca", "blend", "rate=0.1"), ("abl", "sig", "")}
    assert got[("abl", "sig", "")]["acc"] == 0.6 and got[("abl", "sig", "")]["run"] == "abl-sig"  # kept
    assert got[("meca", "badnets", "")]["acc"] == 0.72 and got[("meca", "badnets", "")]["run"] == \
        f"{KFP_ID}/meca-badnets"  # replaced
    assert all(got[(r["defense"], r["attack"], r.get("variant") or "")]["acc"] == r["acc"] for r in new)
    assert got[("meca", "badnets", "")]["der"] is not None  # DER from the none record of the same attack
    assert pq.read_table(out / "cpu-reference.parquet").num_rows == 5
    md = (out / "cpu-reference.md").read_text()
    assert "| blend (rate=0.1) | meca | 0.7400 |" in md and "| sig | abl |" in md and "cpu-reference.png" in md
    assert (out / "cpu-reference.png").stat().st_size > 5000
    assert not [p for p in out.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def _existing(out) -> None:
    """out/cpu-reference.json before the merge: another cell (abl on sig) and an older run of meca on badnets."""
    out.mkdir(parents=True)
    mr.write_results([_record("abl", "sig", 0.6, 0.1), _record("meca", "badnets", 0.5, 0.5)], out, "cpu-reference")


def test_fetch_merges_a_finished_matrix_runs_results_from_mlflow(mlflow_server, tmp_path, monkeypatch, capsys):
    new = _new_records()
    _collected(mlflow_server, KFP_ID, new, tmp_path / "collect", monkeypatch)
    out = tmp_path / "results"
    _existing(out)
    assert main(["benchmark", "--engine", "kfp", "--fetch", KFP_ID, "--mlflow-uri", mlflow_server,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    _assert_merged(out, new)
    assert f"results: {out / 'cpu-reference.json'}" in printed and "blend (rate=0.1)" in printed
    # the records as collect wrote them: MLflow's copy is the same file
    fetched = _results(out)
    assert fetched[("meca", "blend", "rate=0.1")]["engine"] == "kfp"
    # fetched twice: the same file (the run's records replace themselves)
    before = (out / "cpu-reference.json").read_text()
    assert main(["benchmark", "--fetch", KFP_ID, "--mlflow-uri", mlflow_server, "--out", str(out)]) == 0
    assert (out / "cpu-reference.json").read_text() == before


def test_fetch_of_an_unknown_run_or_another_protocol_is_a_clear_error(mlflow_server, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    assert main(["benchmark", "--engine", "kfp", "--fetch", "no-such-run", "--mlflow-uri", mlflow_server,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no-such-run" in err and mlflow_server in err and "check the run id" in err
    assert not out.exists()
    # a run of the CPU protocol is not merged into another protocol's file
    _collected(mlflow_server, "cpu-run", _new_records()[:2], tmp_path / "collect", monkeypatch)
    assert main(["benchmark", "--engine", "kfp", "--fetch", "cpu-run", "--mlflow-uri", mlflow_server,
                 "--protocol", "paper", "--out", str(out)]) == 2
    assert "--protocol cpu" in capsys.readouterr().err and not out.exists()
    # a collect task that stopped half-way left its run RUNNING, without results
    from components import tracking

    client = tracking._client(mlflow_server)
    client.create_run(tracking._experiment(client, mlflow_server), run_name="matrix-stopped",
                      tags={"unpoison.matrix": "true", "unpoison.kfp_run_id": "stopped-run"})
    assert main(["benchmark", "--engine", "kfp", "--fetch", "stopped-run", "--mlflow-uri", mlflow_server,
                 "--out", str(out)]) == 2
    assert "'stopped-run'" in (err := capsys.readouterr().err) and "RUNNING, not FINISHED" in err
    assert not out.exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["benchmark", "--engine", "kfp", "--fetch", "cpu-run", "--out", str(out)]) == 2
    assert "--mlflow-uri" in capsys.readouterr().err and not out.exists()


def test_wait_merges_the_results_once_the_run_succeeded(fake_kfp, mlflow_server, tmp_path, monkeypatch, capsys):
    new = _new_records()
    _collected(mlflow_server, KFP_ID, new, tmp_path / "collect", monkeypatch)
    out = tmp_path / "results"
    _existing(out)
    fake_kfp.run_id, fake_kfp.states = KFP_ID, ["PENDING", "RUNNING", "SUCCEEDED"]
    assert main([*SUBMIT, "--mlflow-uri", mlflow_server, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert fake_kfp.polls == 3 and len(fake_kfp.submitted) == 1
    assert f"run id: {KFP_ID}" in printed and "state: SUCCEEDED" in printed
    _assert_merged(out, new)


def test_wait_on_a_failed_run_merges_nothing(fake_kfp, mlflow_server, tmp_path, monkeypatch, capsys):
    # even with a matrix run of it in MLflow (collect ran, a later task failed), a failed run is not merged
    _collected(mlflow_server, "failed-run", _new_records(), tmp_path / "collect", monkeypatch)
    out = tmp_path / "results"
    _existing(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fake_kfp.run_id, fake_kfp.states = "failed-run", ["RUNNING", "FAILED"]
    assert main([*SUBMIT, "--mlflow-uri", mlflow_server, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "KFP run failed-run ended FAILED" in err and "nothing merged" in err
    assert "http://kfp.example/#/runs/details/failed-run" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_wait_needs_an_mlflow_uri_before_submitting_and_stops_at_its_timeout(fake_kfp, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "results"
    assert main([*SUBMIT, "--out", str(out)]) == 2
    assert "--mlflow-uri" in capsys.readouterr().err and fake_kfp.submitted == []
    # still running at --timeout: a clear error that names the way to merge later; nothing written
    fake_kfp.run_id, fake_kfp.states = "slow-run", ["RUNNING"]
    assert main([*SUBMIT, "--mlflow-uri", "http://mlflow.example", "--timeout", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "slow-run is still RUNNING" in err and "--fetch slow-run" in err
    assert fake_kfp.polls == 1 and not out.exists()
