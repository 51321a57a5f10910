"""End to end: the MeCa and no-defense pipelines on (part of) the shipped CIFAR-10 sample, few epochs, real MLflow
(local sqlite store). Checks every artifact's schema, that metrics are in range, and the MLflow record."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from components import artifacts, stages
from components.config import load_config
from pipelines import local
from pipelines.cli import main

SMALL = {"train_limit": 1500, "train.epochs": 2, "meca.rounds": 2, "meca.finetune_epochs": 1}
STAGES = ["poison", "warmup", "early", "score", "partition", "enhance", "identify", "first_train", "vouch",
          "final_train", "relabel_finetune", "evaluate"]


@pytest.fixture(scope="module")
def meca_run(tmp_path_factory, mini_sample):
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_dir = local.run("meca", load_config("cpu", {**SMALL, "data": mini_sample}), root, mlflow_uri=uri,
                        name="meca-e2e")
    return run_dir, uri


def _schema(path):
    return {f.name: str(f.type) for f in pq.read_schema(path)}


def test_run_folder_is_complete(meca_run):
    run_dir, _ = meca_run
    assert not run_dir.with_name(run_dir.name + ".partial").exists()
    for stage in STAGES:
        assert (run_dir / stage).is_dir(), stage
    for f in ["metrics.json", "report.md", "config.json"]:
        assert (run_dir / f).is_file()
    assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"


def test_sample_table(meca_run):
    run_dir, _ = meca_run
    path = run_dir / "poison" / "samples.parquet"
    assert _schema(path) == {"sample_id": "int64", "label": "int64", "true_label": "int64", "is_poison": "bool",
                             "is_cover": "bool"}
    t = pq.read_table(path).to_pydict()
    assert len(t["sample_id"]) == 1500 and t["sample_id"] == list(range(1500))
    poison = np.array(t["is_poison"])
    assert poison.sum() == 75  # 5 % of 1500
    assert (np.array(t["label"])[poison] == 0).all() and (np.array(t["true_label"])[poison] != 0).all()


def test_score_split_and_round_tables(meca_run):
    run_dir, _ = meca_run
    assert _schema(run_dir / "score" / "scores.parquet") == {"sample_id": "int64", "kl": "double",
                                                             "model_ref": "string", "epoch": "int64"}
    kl = pq.read_table(run_dir / "score" / "scores.parquet").column("kl").to_numpy()
    assert np.isfinite(kl).all() and (kl >= 0).all()
    for split in ["partition", "identify", "vouch", "relabel_finetune"]:
        path = run_dir / split / "split.parquet"
        weight = {"weight": "double"} if split in ("identify", "vouch") else {}  # weights in the clean trainings
        assert _schema(path) == {"sample_id": "int64", "pool": "string", "relabel": "int64", **weight}
        assert set(pq.read_table(path).column("pool").to_pylist()) <= set(artifacts.POOLS)
    # round 0 unlearns the highest-KL gamma share: 10 % of 1500
    pools = np.array(pq.read_table(run_dir / "partition" / "split.parquet").column("pool").to_pylist())
    assert (pools == "clean").sum() == 150
    assert kl[pools == "clean"].min() >= kl[pools == "suspect"].max()
    # the second pass only returns samples, all of the first pass's suspect label, and the fine-tuning starts from it
    first, second = (np.array(pq.read_table(run_dir / s / "split.parquet").column("pool").to_pylist()) == "clean"
                     for s in ("identify", "vouch"))
    label = json.loads((run_dir / "vouch" / "stage.json").read_text())["result"]["suspect_label"]
    labels = stages.load_dataset(run_dir / "poison" / "dataset.npz").labels
    assert (second >= first).all() and (labels[second & ~first] == label).all()
    # ... as identification decided: its label, never a guarded sample, and every suspect it left out of the pool
    guard = pq.read_table(run_dir / "identify" / "guard.parquet")
    assert _schema(run_dir / "identify" / "guard.parquet") == {"sample_id": "int64", "suspect_label": "int64",
                                                               "suspected": "bool", "guarded": "bool"}
    guarded, suspected = (guard.column(c).to_numpy(zero_copy_only=False) for c in ("guarded", "suspected"))
    assert set(guard.column("suspect_label").to_pylist()) == {label}
    assert (labels[suspected | guarded] == label).all() and not (second & ~first & guarded).any()
    assert (~first <= (suspected | (labels != label))).all()
    relabel = pq.read_table(run_dir / "relabel_finetune" / "split.parquet").to_pydict()
    assert np.array_equal(np.array(relabel["pool"]) == "clean", second)
    suspect = np.array(relabel["pool"]) == "suspect"
    assert (np.array(relabel["relabel"])[suspect] >= 0).all() and (np.array(relabel["relabel"])[~suspect] == -1).all()
    rounds = pq.read_table(run_dir / "enhance" / "rounds.parquet").to_pydict()
    assert sorted(set(rounds["round"])) == [0, 1]
    assert json.loads((run_dir / "enhance" / "rounds.json").read_text())[1]["keep_share"] == pytest.approx(0.8)


def test_models_are_safetensors_with_metadata(meca_run):
    run_dir, _ = meca_run
    for folder in ["warmup", "enhance/model", "final_train", "relabel_finetune/model"]:
        meta = json.loads((run_dir / folder / "model.json").read_text())
        assert meta["architecture"] == "small_cnn" and len(meta["classes"]) == 10
        assert len(meta["dataset_hash"]) == 64 and len(meta["weights_sha256"]) == 64
        weights = load_file(str(run_dir / folder / "model.safetensors"))  # plain tensors, no pickle
        assert any(k.endswith("weight") for k in weights)
    clean = json.loads((run_dir / "final_train" / "model.json").read_text())
    assert clean["trained_on"] < 1500  # trained on the clean pool only


def test_metrics_in_range(meca_run):
    run_dir, _ = meca_run
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["defense"] == "meca" and m["attack"]["name"] == "badnets"
    for key in ["acc", "asr", "der", "nodef_acc", "nodef_asr", "detection_tpr", "detection_fpr"]:
        assert 0.0 <= m[key] <= 1.0, key
    # better than chance (0.1) after two epochs on 1,500 images (measured 0.148 with per-label identification)
    assert m["acc"] > 0.12
    assert set(m["models"]) == {"nodef", "enhanced", "first", "clean", "relabelled"}
    assert 0.0 <= m["scores"]["kl"]["auroc"] <= 1.0
    assert [r["round"] for r in m["rounds"]] == [0, 1]
    assert set(m["stages"]) == set(STAGES) and all(s["seconds"] > 0 for s in m["stages"].values())
    report = (run_dir / "report.md").read_text()
    assert "| meca |" in report and "| no defense |" in report and "](evaluate/plots/kl.png)" in report  # the run folder's report links resolve
    assert (run_dir / "evaluate" / "plots" / "kl.png").is_file()
    assert 0 <= m["target_acc"] <= 1 and 0 <= m["nodef_target_acc"] <= 1 and len(m["models"]["clean"]["per_class_acc"]) == 10
    assert "Clean accuracy per class" in report and "0 airplane (target)" in report
    assert (run_dir / "evaluate" / "plots" / "kl.png").stat().st_size > 1000


def test_mlflow_parent_and_child_runs(meca_run):
    from mlflow.tracking import MlflowClient

    run_dir, uri = meca_run
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unpoison")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["unpoison.defense"] == "meca"
    assert parent.data.params["attack.name"] == "badnets" and parent.data.params["meca.gamma"] == "0.1"
    assert 0 <= parent.data.metrics["asr"] <= 1 and "detection_tpr" in parent.data.metrics
    children = {r.data.tags["unpoison.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    history = client.get_metric_history(children["warmup"].info.run_id, "test_acc")
    assert [h.step for h in history] == [0, 1]  # per-epoch metrics with step = epoch
    listed = [a.path for a in client.list_artifacts(children["score"].info.run_id, "score")]
    assert "score/scores.parquet" in listed


def test_none_pipeline_equals_meca_warmup(meca_run, tmp_path, mini_sample):
    """The benchmark reads the no-defense record from MeCa's warm-up: both must be the same training."""
    run_dir, _ = meca_run
    none_dir = local.run("none", load_config("cpu", {**SMALL, "data": mini_sample}), tmp_path, mlflow_uri=None,
                         name="none-e2e")
    warm = json.loads((run_dir / "warmup" / "model.json").read_text())
    plain = json.loads((none_dir / "train" / "model.json").read_text())
    assert plain["weights_sha256"] == warm["weights_sha256"]
    m = json.loads((none_dir / "metrics.json").read_text())
    assert m["models"]["nodef"] == json.loads((run_dir / "metrics.json").read_text())["models"]["nodef"]


def test_cli_prints_summary(tmp_path, capsys, mini_sample):
    code = main(["run", "none", "--attack", "blend", "--data", mini_sample, "--no-mlflow", "--out", str(tmp_path),
                 "--name", "cli", "--set", "train_limit=600", "train.epochs=1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "no defense" in out and "ACC" in out and str(tmp_path / "cli") in out


def _executed(out: str) -> list[str]:
    line = [ln for ln in out.splitlines() if ln.startswith("executed: ")][-1]
    return line.removeprefix("executed: ").split(";")[0].split(", ")


def test_rerun_a_scoring_stage_alone_from_the_run_folder(meca_run, tmp_path, capsys):
    run_dir, _ = meca_run
    assert main(["rerun", "--run", str(run_dir), "--stage", "score", "--set", "meca.eps=0.2", "--out", str(tmp_path),
                 "--no-mlflow"]) == 0
    assert _executed(capsys.readouterr().out) == ["score"]
    (rerun,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [p.name for p in rerun.iterdir() if p.is_dir()] == ["score"]  # nothing upstream executed
    kl_before = pq.read_table(run_dir / "score" / "scores.parquet").column("kl").to_numpy()
    kl_after = pq.read_table(rerun / "score" / "scores.parquet").column("kl").to_numpy()
    assert len(kl_after) == 1500 and not np.allclose(kl_before, kl_after)  # eps changed the score
    recorded = json.loads((rerun / "config.json").read_text())
    assert recorded["config"]["meca"]["eps"] == 0.2 and recorded["rerun"]["stage"] == "score"


def test_rerun_a_partition_and_everything_downstream_by_its_mlflow_name(meca_run, tmp_path, capsys):
    run_dir, uri = meca_run
    assert main(["rerun", "--run", "meca-e2e", "--mlflow-uri", uri, "--stage", "partition", "--downstream",
                 "--set", "meca.gamma=0.2", "--out", str(tmp_path), "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert _executed(out) == ["partition", "enhance", "identify", "first_train", "vouch", "final_train",
                             "relabel_finetune", "evaluate"]
    (rerun,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert not {"poison", "warmup", "score"} & {p.name for p in rerun.iterdir()}  # read from the earlier run
    pools = pq.read_table(rerun / "partition" / "split.parquet").column("pool").to_pylist()
    assert pools.count("clean") == 300  # round 0 unlearns gamma 0.2 of 1500
    m = json.loads((rerun / "metrics.json").read_text())
    earlier = json.loads((run_dir / "metrics.json").read_text())
    assert m["models"]["nodef"] == earlier["models"]["nodef"]  # the same warm-up model, not retrained
    assert "no defense" in out and "meca" in out


def test_mlflow_serves_the_defended_model(meca_run, monkeypatch):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from components import engine
    from components.data import load_images

    run_dir, uri = meca_run
    client = MlflowClient(uri)
    parent = [r for r in client.search_runs([client.get_experiment_by_name("unpoison").experiment_id])
              if "mlflow.parentRunId" not in r.data.tags][0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri exports it: put back after the test
    mlflow.set_tracking_uri(uri)
    served = mlflow.pytorch.load_model(f"runs:/{parent.info.run_id}/model")
    own, _ = artifacts.load_model(run_dir / "final_train")  # MeCa's defended model: the clean model
    x = torch.from_numpy(load_images("sample", "test").images[:64])
    expected = engine.predict(own, x)
    got = served(engine.to_float(x))
    assert torch.allclose(got, expected, atol=1e-4) and (got.argmax(1) == expected.argmax(1)).all()
    (dataset,) = client.get_run(parent.info.run_id).inputs.dataset_inputs
    digest = json.loads((run_dir / "poison" / "dataset.json").read_text())["dataset_hash"]
    assert digest.startswith(dataset.dataset.digest)


def _image_folder(root, n_train: int, n_test: int, n_poison: int, size: int) -> set[str]:
    """An image folder (train/ and test/ by class) from the shipped sample, with `n_poison` training images stamped
    with a `size` x `size` BadNets patch and moved to class 0: a data set delivered already poisoned. Returns the
    poisoned files' paths relative to the folder."""
    from PIL import Image

    from components.attacks import build_attack
    from components.data import load_images

    train = load_images("sample", "train").subset(slice(0, n_train))
    test = load_images("sample", "test").subset(slice(0, n_test))
    rng = np.random.default_rng(1)
    poison = np.sort(rng.choice(np.flatnonzero(train.labels != 0), n_poison, replace=False))
    images, labels = train.images.copy(), train.labels.copy()
    images[poison] = build_attack("badnets", target=0, rate=0.1, seed=0, num_classes=10,
                                  size=size).apply_uint8(images[poison])
    labels[poison] = 0
    names = set()
    for split, xs, ys in (("train", images, labels), ("test", test.images, test.labels)):
        for i, (img, y) in enumerate(zip(xs, ys)):
            rel = f"{split}/{train.classes[y]}/{i:05d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / rel)
            if split == "train" and i in set(poison.tolist()):
                names.add(rel)
    return names


def test_defend_an_image_folder_as_delivered(tmp_path, capsys):
    """MeCa with --attack none on a folder that arrived poisoned: most poisoned files are among the top suspects by
    path, the grid exists, and the most suspicious samples' labels point at the relabelled class."""
    folder = tmp_path / "bought"
    poisoned = _image_folder(folder, n_train=800, n_test=300, n_poison=80, size=6)
    # the suspects come from the warm-up's scores: the final training only has to run (2 epochs)
    code = main(["run", "meca", "--attack", "none", "--data", str(folder), "--out", str(tmp_path / "runs"),
                 "--name", "bought", "--no-mlflow", "--set", "train.epochs=10", "train.batch_size=32",
                 "meca.rounds=2", "meca.finetune_epochs=1", "final.epochs=2"])
    assert code == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "bought"
    assert (run_dir / "ingest" / "dataset.npz").is_file() and not (run_dir / "poison").exists()
    table = pq.read_table(run_dir / "suspects.parquet").to_pydict()
    assert table["rank"] == list(range(800)) and len(set(table["source"])) == 800
    top = table["source"][:2 * len(poisoned)]
    assert sum(s in poisoned for s in top) > len(poisoned) / 2, "most poisoned files are among the top suspects"
    assert (run_dir / "suspects.png").stat().st_size > 10_000
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["top_suspects"]["most_over_represented"]["class"] == 0  # the relabelled class
    assert not m["ground_truth"] and "detection_tpr" not in m and 0 <= m["acc"] <= 1  # measured on test/
    assert "most over-represented among the 64 most suspicious: class 0 (airplane)" in out
    report = (run_dir / "report.md").read_text()
    assert "## Suspects" in report and "](evaluate/plots/suspects.png)" in report


def test_an_image_folder_without_a_test_split_is_not_evaluated_on_its_training_images(tmp_path):
    from PIL import Image

    from components.data import load_images

    train = load_images("sample", "train").subset(slice(0, 200))
    for i, (img, y) in enumerate(zip(train.images, train.labels)):
        (tmp_path / "flat" / train.classes[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "flat" / train.classes[y] / f"{i}.png")
    run_dir = local.run("none", load_config("cpu", {"data": str(tmp_path / "flat"), "attack.name": "none",
                                                    "train.epochs": 1}), tmp_path / "runs", mlflow_uri=None)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["acc"] is None and m["models"] == {} and "no test split" in m["note"]
    assert "no test split" in (run_dir / "report.md").read_text()


def test_declared_meca_gives_the_weights_of_the_explicit_stage_sequence(tmp_path, mini_sample):
    """The port onto declarations changed nothing: MeCa's stages called one by one, as the runner before the
    declarations called them, give the same weights as `local.run` of the declaration."""
    from components import stages
    from components.defenses import meca

    cfg = load_config("cpu", {"data": mini_sample, "train_limit": 300, "train.epochs": 1, "meca.rounds": 2,
                              "meca.finetune_epochs": 1})
    run_dir = local.run("meca", cfg, tmp_path, mlflow_uri=None, name="declared")
    d, p = tmp_path / "explicit", cfg.meca
    train = cfg.train.model_copy(update={"seed": cfg.seed})
    stages.poison(cfg.data, cfg.attack, d / "poison", train_limit=cfg.train_limit)
    data = d / "poison" / "dataset.npz"
    stages.train(data, d / "warmup", params=train, model_name=cfg.model)
    meca.score_kl(data, d / "warmup", d / "score", params=p, seed=cfg.seed)
    meca.partition_stage(d / "score" / "scores.parquet", d / "partition", params=p)
    meca.enhance_stage(data, d / "warmup", d / "partition" / "split.parquet", d / "enhance", params=p, base=train,
                       seed=cfg.seed)
    stages.train(data, d / "early", params=train.model_copy(update={"epochs": meca.early_epochs(train, p)}),
                 model_name=cfg.model)
    meca.identify_stage(data, d / "enhance" / "model", d / "warmup", d / "early", d / "score" / "scores.parquet",
                        d / "enhance" / "rounds.json", d / "identify", params=p)
    stages.train(data, d / "final_train", params=cfg.final_params().model_copy(update={"seed": cfg.seed}),
                 model_name=cfg.model, split=d / "identify" / "split.parquet")
    meca.relabel_finetune(data, d / "identify" / "split.parquet", d / "final_train", d / "relabel_finetune",
                          params=meca.finetune_params(train, p))
    for model in ("warmup", "enhance/model", "final_train", "relabel_finetune/model"):
        declared = json.loads((run_dir / model / "model.json").read_text())["weights_sha256"]
        assert declared == json.loads((d / model / "model.json").read_text())["weights_sha256"], model


def test_a_data_set_from_an_earlier_injection_brings_its_ground_truth(meca_run, tmp_path):
    """--attack none on an earlier run's poisoned dataset.npz: the samples.parquet beside it is the ground truth,
    so detection is reported (an .npz holds one split: no test accuracy)."""
    run_dir, _ = meca_run
    cfg = load_config("cpu", {"data": str(run_dir / "poison" / "dataset.npz"), "attack.name": "none",
                              "train.epochs": 1, "meca.rounds": 1, "meca.finetune_epochs": 1})
    delivered = local.run("meca", cfg, tmp_path, mlflow_uri=None, name="npz")
    m = json.loads((delivered / "metrics.json").read_text())
    assert m["ground_truth"] and m["poison_samples"] == 75 and 0 <= m["detection_tpr"] <= 1
    assert m["acc"] is None and "kl" in m["scores"]
    sources = pq.read_table(delivered / "suspects.parquet").column("source").to_pylist()
    assert sorted(sources)[:2] == ["dataset.npz:0", "dataset.npz:1"]
