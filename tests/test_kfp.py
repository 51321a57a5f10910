"""The KFP layer: compiled specs (GPU, tolerations, secrets, caching, the exit handler), the checked-in YAML,
submission (the image by digest, the data's fingerprint, the poison task's GPU) and --no-cache. The real kfp.local
runs are in test_kfp_cache.py (caching, MLflow records, one-stage reruns) and test_kfp_local.py (the CLI's engine, a
failing stage, A-ABL), apart so that pytest-xdist can run them on different workers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import load_config
from components.defenses import REGISTRY
from pipelines import kfp_pipelines as kp
from pipelines.cli import main

REPO = Path(__file__).resolve().parent.parent
BOOKKEEPING = {"track-start", "track", "track-exit"}  # the MLflow tasks: never cached, never retried
POISON_GPUS = "{{$.inputs.parameters['pipelinechannel--poison_gpus']}}"  # the poison task's GPU count, at run time


def _spec(name):
    pipeline, platform = yaml.safe_load_all((kp.COMPILED / f"{name}.yaml").read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_checked_in_yaml_is_current(tmp_path):
    compile_time = ("UNPOISON_STAGE_IMAGE", "UNPOISON_GPU_NODE_SELECTOR", "UNPOISON_GPU_CPU_LIMIT",
                    "UNPOISON_GPU_MEMORY_LIMIT", "UNPOISON_GPU_TIMEOUT")
    env = {k: v for k, v in os.environ.items() if k not in compile_time}
    subprocess.run([sys.executable, "-m", "pipelines.cli", "compile", "--out", str(tmp_path)], cwd=REPO, env=env,
                   check=True, capture_output=True)
    for fresh in sorted(tmp_path.glob("*.yaml")):
        checked_in = kp.COMPILED / fresh.name
        assert checked_in.exists(), f"{fresh.name} is not checked in; run `unpoison compile`"
        # compare the parsed specs: the header comment lists dict defaults in protobuf's unstable key order
        fresh_docs = list(yaml.safe_load_all(fresh.read_text()))
        assert fresh_docs == list(yaml.safe_load_all(checked_in.read_text())), \
            f"{fresh.name} is stale; run `unpoison compile`"
    assert {p.name for p in kp.COMPILED.glob("*.yaml")} == {p.name for p in tmp_path.glob("*.yaml")}


@pytest.mark.parametrize("name", [kp.pipeline_name(d, delivered) for d in REGISTRY for delivered in (False, True)])
def test_compiled_spec_asks_for_gpus_limits_timeouts_retries_secrets_and_caching(name):
    defense = REGISTRY[name.removesuffix("-delivered")]
    gpu_tasks = {s.name.replace("_", "-") for s in defense.plan(name.endswith("-delivered")) if s.gpu}
    pipeline, platform = _spec(name)
    tasks = kp.compiled_tasks(pipeline)
    executors = pipeline["deploymentSpec"]["executors"]
    stage_tasks = {s.replace("_", "-") for s in defense.stage_names(name.endswith("-delivered"))}
    assert set(tasks) == stage_tasks | BOOKKEEPING
    assert gpu_tasks and "evaluate" in gpu_tasks
    for task_name, task in tasks.items():
        executor = pipeline["components"][task["componentRef"]["name"]]["executorLabel"]
        resources = executors[executor]["container"]["resources"]
        k8s = platform[executor]
        secrets = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in k8s["secretAsEnv"]}
        assert secrets["unpoison-s3"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT"}
        assert secrets["unpoison-mlflow"] == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                              "MLFLOW_TRACKING_PASSWORD"}  # the env MLflow's client reads
        # optional key by key (the KFP driver sets it on each secretKeyRef): an older Secret holding only the URI
        # still starts the pods, and tracks to a server without authentication
        assert next(s for s in k8s["secretAsEnv"] if s["secretName"] == "unpoison-mlflow")["optional"] is True
        assert "cpuRequest" in resources and "memoryRequest" in resources
        if task_name in gpu_tasks or task_name == "poison":
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            # the poison task's count is the pipeline parameter `arguments` derives from the attack
            assert resources["accelerator"]["resourceCount"] == (POISON_GPUS if task_name == "poison" else "1")
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
            # the defaults README states: limits twice the requests, 6 h per attempt
            assert (resources["resourceCpuLimit"], resources["resourceMemoryLimit"]) == ("8", "32Gi"), task_name
            assert int(k8s["activeDeadlineSeconds"]) == 6 * 3600, task_name
            # Argo retries only within backoffMaxDuration of the first start: room for every attempt's timeout
            assert int(task["retryPolicy"]["backoffMaxDuration"].removesuffix("s")) >= 3 * 6 * 3600
        else:
            assert "accelerator" not in resources, task_name
        # every task knows its KFP run id from its pod's label, outside its cache key
        assert {"name": "KFP_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"} in k8s["fieldPathAsEnv"]
        if task_name in BOOKKEEPING:
            assert not task.get("cachingOptions", {}).get("enableCache"), "tracking must run every time"
            # a stage that stopped on a user error fails the run in track, once: never retried
            assert "retryPolicy" not in task, task_name
        else:
            assert task["cachingOptions"]["enableCache"] is True, task_name
            # an evicted or preempted stage is retried; a user error does not fail it (the runner's guard)
            assert task["retryPolicy"]["maxRetryCount"] == 2, task_name
            program = executors[executor]["container"]["command"][-1]
            assert "components.runner import data_task" in program or "components.runner import run_task" in program
    # track reads every stage's output, so a user error recorded by any stage reaches it
    track = tasks["track"]["inputs"]
    producers = {a["taskOutputArtifact"]["producerTask"] for a in track["artifacts"].values()}
    assert producers == stage_tasks
    assert set(track["parameters"]["upstream"]["runtimeValue"]["constant"]) == \
        set(defense.stage_names(name.endswith("-delivered"))) | {"truth"}
    # secrets are never component inputs
    for component in pipeline["components"].values():
        params = component.get("inputDefinitions", {}).get("parameters", {})
        assert not any("secret" in p.lower() or "key" in p.lower() for p in params)


@pytest.mark.parametrize("name", [kp.pipeline_name(d, delivered) for d in REGISTRY for delivered in (False, True)])
def test_an_exit_handler_closes_the_mlflow_run_whatever_fails(name):
    """The pipeline body runs inside dsl.ExitHandler: the exit task `track-exit` runs once every other task ended,
    failed or not, with the group's final status (and marks the MLflow parent run FAILED unless it succeeded)."""
    pipeline, _ = _spec(name)
    root = pipeline["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "track-exit"}
    exit_task = root["track-exit"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert exit_task["dependentTasks"] == ["exit-handler-1"]
    assert exit_task["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert pipeline["components"][exit_task["componentRef"]["name"]]["inputDefinitions"]["parameters"]["status"][
        "parameterType"] == "TASK_FINAL_STATUS"
    inside = pipeline["components"][root["exit-handler-1"]["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inside) == set(kp.compiled_tasks(pipeline)) - {"track-exit"}
    for task_name, task in inside.items():
        placeholders = [v for v in task["inputs"].get("parameters", {}).values()
                        if "{{$.pipeline_job" in str(v.get("runtimeValue", ""))]
        if task_name in BOOKKEEPING:
            assert placeholders, task_name  # the run id placeholder, a fallback beside KFP_RUN_ID
        else:
            # every stage opens its MLflow child run in the parent run `track-start` opened; the run id that
            # finds it is no parameter, which would change the stage's cache key in every run
            assert "track-start" in task["dependentTasks"] and not placeholders, task_name


def test_a_pipeline_takes_its_own_section_and_never_another_defenses():
    meca, _ = _spec("meca")
    aabl, _ = _spec("a-abl")
    none, _ = _spec("none")
    delivered, _ = _spec("none-delivered")
    shared = {"data", "protocol", "train_limit", "model", "seed", "attack", "train", "final", "data_hash"}
    assert set(meca["root"]["inputDefinitions"]["parameters"]) == shared | {"meca", "poison_gpus"}
    assert set(aabl["root"]["inputDefinitions"]["parameters"]) == shared | {"aabl", "poison_gpus"}
    assert set(none["root"]["inputDefinitions"]["parameters"]) == shared | {"poison_gpus"}
    assert set(delivered["root"]["inputDefinitions"]["parameters"]) == shared  # no poison task
    # each task binds only what its stage reads: the partition task sees meca, not train or final
    bound = kp.compiled_tasks(meca)["partition"]["inputs"]["parameters"]
    assert "section" in bound and not {"train", "final", "seed"} & set(bound)


def test_rerun_unknown_run_is_a_clear_error(tmp_path, capsys):
    code = main(["rerun", "--run", "nope", "--stage", "final_train", "--mlflow-uri",
                 f"sqlite:///{tmp_path / 'm.db'}", "--out", str(tmp_path)])
    assert code == 2
    assert "no recorded run 'nope'" in capsys.readouterr().err


def test_submit_to_unreachable_host_is_a_clear_error(capsys):
    code = main(["submit", "meca", "--host", "http://127.0.0.1:9", "--set", "train.epochs=1", "--image", DIGEST_IMAGE])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unpoison: error: the KFP API at http://127.0.0.1:9 did not accept the run")
    assert len(err.splitlines()) == 1


def test_submit_rejects_bad_config_before_contacting_kfp(capsys):
    assert main(["submit", "meca", "--host", "http://127.0.0.1:9", "--set", "attack.rate=2",
                 "--image", DIGEST_IMAGE]) == 2
    assert "attack.rate" in capsys.readouterr().err




# --------------------------------------------------------------------------------------------------
# cache keys: the image by digest, the data's fingerprint, --no-cache (no server: kfp.Client is a stand-in)

DIGEST_IMAGE = "registry.example/unpoison-stage@sha256:" + "0123456789abcdef" * 4


class FakeClient:
    """Stands in for kfp.Client: records what submit would send, contacts nothing."""
    submitted = []

    def __init__(self, host):
        self.host = host

    def create_run_from_pipeline_func(self, pipeline, **kwargs):
        FakeClient.submitted.append((pipeline, kwargs))
        return type("Run", (), {"run_id": "fake-run"})()


@pytest.fixture
def fake_client(monkeypatch):
    import kfp

    FakeClient.submitted = []
    monkeypatch.setattr(kfp, "Client", FakeClient)
    return FakeClient


def _compiled(pipeline, tmp_path) -> dict:
    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(tmp_path / "p.yaml"))
    return next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))


@pytest.mark.parametrize("image", [None, "registry.example/unpoison-stage:0.1.0", "registry.example/stage",
                                   "registry.example/stage@sha256:abc"])
def test_submit_refuses_a_mutable_tag_before_contacting_kfp(image, fake_client, monkeypatch, capsys):
    monkeypatch.setattr(kp.c, "STAGE_IMAGE", "ghcr.io/unpoison/unpoison-stage:0.1.0")  # the default: a tag
    argv = ["submit", "meca", "--host", "http://127.0.0.1:9", *(["--image", image] if image else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "is not pinned by digest" in err and "--image " in err and "@sha256:<digest>" in err
    assert "--allow-tag" in err and len(err.splitlines()) == 1
    assert fake_client.submitted == []


def test_submit_pins_the_digest_on_every_task_and_binds_the_data_hash(fake_client, tmp_path, capsys):
    from components.data import source_fingerprint

    assert main(["submit", "meca", "--host", "http://127.0.0.1:9", "--image", DIGEST_IMAGE]) == 0
    assert "run id: fake-run" in capsys.readouterr().out
    (pipeline, kwargs), = fake_client.submitted
    spec = _compiled(pipeline, tmp_path)
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {DIGEST_IMAGE}
    tasks = kp.compiled_tasks(spec)
    # bound to the pipeline parameter, through the exit handler's group
    assert tasks["poison"]["inputs"]["parameters"]["data_hash"] == {
        "componentInputParameter": "pipelinechannel--data_hash"}
    assert kwargs["arguments"]["data_hash"] == source_fingerprint("sample") != ""
    # caching as compiled: every stage cached, `track` never (True would switch it on for track too)
    assert kwargs["enable_caching"] is None
    assert tasks["poison"]["cachingOptions"]["enableCache"] is True and not tasks["track"].get("cachingOptions")


@pytest.mark.parametrize("attack,gpus", [("lc", "1"), ("input_aware", "1"), ("badnets", "0"), ("none", None)])
def test_the_poison_task_gets_a_gpu_for_an_attack_that_trains_a_model(attack, gpus, fake_client, tmp_path):
    """The submitted arguments hold the poison task's GPU count (its compiled resourceCount's placeholder); a data
    set as delivered has no poison task, and its ingest task no GPU."""
    assert main(["submit", "none", "--host", "http://127.0.0.1:9", "--image", DIGEST_IMAGE, "--attack", attack,
                 "--data-hash", "given"]) == 0
    (pipeline, kwargs), = fake_client.submitted
    spec = _compiled(pipeline, tmp_path)
    assert set(kwargs["arguments"]) == set(spec["root"]["inputDefinitions"]["parameters"])
    assert kwargs["arguments"].get("poison_gpus") == gpus
    data_task = kp.compiled_tasks(spec)["poison" if gpus else "ingest"]
    container = spec["deploymentSpec"]["executors"][spec["components"][data_task["componentRef"]["name"]][
        "executorLabel"]]["container"]
    if gpus:
        assert container["resources"]["accelerator"]["resourceCount"] == POISON_GPUS
        assert data_task["inputs"]["parameters"]["pipelinechannel--poison_gpus"] == {
            "componentInputParameter": "pipelinechannel--poison_gpus"}
        # which the exit handler's group receives from the pipeline (kfp_pipelines.on_poison_node)
        group = spec["components"][spec["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]]
        assert "pipelinechannel--poison_gpus" in group["inputDefinitions"]["parameters"]
    else:
        assert "accelerator" not in container["resources"]


def test_submit_with_allow_tag_and_no_cache(fake_client, tmp_path):
    tag = "registry.example/unpoison-stage:dev"
    assert main(["submit", "none", "--host", "http://127.0.0.1:9", "--image", tag, "--allow-tag", "--no-cache",
                 "--data-hash", "given", "--attack", "none"]) == 0
    (pipeline, kwargs), = fake_client.submitted
    spec = _compiled(pipeline, tmp_path)
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {tag}
    assert kp.compiled_tasks(spec)["ingest"]["inputs"]["parameters"]["data_hash"] == {
        "componentInputParameter": "pipelinechannel--data_hash"}  # the data-reading task of a delivered set
    assert kwargs["enable_caching"] is False and kwargs["arguments"]["data_hash"] == "given"


def test_checked_in_templates_bind_the_data_hash_to_the_data_task():
    for name in ("meca", "none-delivered"):
        pipeline, _ = _spec(name)
        data_task = "ingest" if name.endswith("-delivered") else "poison"
        for task_name, task in kp.compiled_tasks(pipeline).items():
            bound = task["inputs"].get("parameters", {})
            assert ("data_hash" in bound) == (task_name == data_task), task_name


def test_data_fingerprint_sees_changed_content_under_the_same_path(tmp_path):
    from components.data import source_fingerprint

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.png").write_bytes(b"one")
    first = source_fingerprint(tmp_path)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x").write_bytes(b"ignored")  # hidden names are not the data
    assert source_fingerprint(tmp_path) == first
    (tmp_path / "train" / "a.png").write_bytes(b"two")
    assert source_fingerprint(tmp_path) != first
    assert source_fingerprint(tmp_path / "train" / "a.png") != source_fingerprint(tmp_path)
    assert kp.arguments(load_config("cpu", {"data": str(tmp_path)}), "none")["data_hash"] == source_fingerprint(
        tmp_path)


@pytest.mark.parametrize("argv", [
    ["run", "none", "--engine", "kfp-local", "--no-mlflow"],
    ["run", "none", "--engine", "kfp-local", "--no-mlflow", "--no-cache"],
])
def test_no_cache_reaches_kfp_local(argv, tmp_path, monkeypatch):
    from kfp import local

    seen = {}

    class Stop(Exception):
        pass

    def init(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(local, "init", init)
    monkeypatch.setattr("pipelines.local.validate", lambda *a: None)  # no data read: the flag is what is tested
    with pytest.raises(Stop):
        main([*argv, "--out", str(tmp_path)])
    assert seen["enable_caching"] is ("--no-cache" not in argv)


def test_rerun_to_a_cluster_pins_the_image_and_passes_no_cache(fake_client, tmp_path, monkeypatch, capsys):
    from pipelines import rerun

    cfg = load_config("cpu", {"train.epochs": 1})
    recorded = {"defense": "meca", "config": cfg.model_dump(mode="json")}
    outputs = {s: f"s3://bucket/run/{s}" for s in ("poison", "truth", "warmup", "early", "score", "partition",
                                                    "enhance", "identify", "first_train", "vouch", "final_train",
                                                    "relabel_finetune", "evaluate")}
    monkeypatch.setattr(rerun, "earlier_run", lambda ref, uri: (recorded, outputs, "kfp"))
    base = ["rerun", "--run", "r1", "--stage", "final_train", "--host", "http://127.0.0.1:9", "--out", str(tmp_path)]
    assert main(base) == 2 and "is not pinned by digest" in capsys.readouterr().err
    assert main([*base, "--image", DIGEST_IMAGE, "--no-cache"]) == 0
    (pipeline, kwargs), = fake_client.submitted
    assert kwargs["enable_caching"] is False and kwargs["arguments"]["data_hash"] == ""  # poison is imported
    spec = _compiled(pipeline, tmp_path)
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()
            if "container" in e} == {DIGEST_IMAGE}


def test_a_stage_process_does_not_import_torchvision():
    # every kfp.local task (and every pod) is a new Python process: torchvision's import (torch._dynamo through its
    # ops) cost each one about 2 s for two attacks that use it, which import it where they need it
    code = ("import sys, components.kfp_components, components.runner, components.evaluation; "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"
