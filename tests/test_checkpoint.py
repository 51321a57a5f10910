"""Checkpoint and resume (issue 17, item 1): a stage killed mid-training and run again into the same output folder
ends with the weights of an uninterrupted run, bit for bit (on the CPU); a checkpoint of another training is not
used; a KFP task mirrors its checkpoints to the object store, so a new pod resumes too (components/checkpoint.py).

The kill tests run each stage in a fresh process that SIGKILLs itself right after its n-th checkpoint is saved (a
preempted node gives no warning either), run the stage again into the same folder in another process, and compare
with an uninterrupted run in a third. The processes are pinned to one core: on a busy machine two OpenMP threads
that wait for each other make a tiny model's epoch ten times slower (a run with the machine's 2 threads compares
bit for bit too, only slower).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from components import artifacts, checkpoint, engine, runner
from components.defenses import meca
from components.params import TrainParams
from components.store import Store

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")

# stage -> (the checkpoint save after which the killed process dies, the checkpoints it leaves, what the rerun must
# say it resumed)
KILLS = {
    "train": (1, ["warm-up.pt"], ["warm-up: resuming after epoch 1 of 3"]),
    "adversarial": (1, ["adversarial-training.pt"],  # PGD's own generator restored too
                    ["adversarial training: resuming after epoch 1 of 2"]),
    "enhance": (2, ["learn-r1.pt", "unlearn-r0.pt"],  # MeCa: three trainings, one file each
                ["unlearn r0: finished before", "learn r1: resuming after epoch 1 of 2"]),
}

# Runs the named stages of KILLS into <root>/<stage>; with a kill count, dies by SIGKILL after that many saves.
# Stage "inputs": a poisoned 200-image sample, a one-epoch warm-up model and a MeCa round-0 split of it.
CHILD = r"""
import json, os, signal, sys
if hasattr(os, "sched_setaffinity"):  # one core, before torch starts its threads
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import numpy as np
from pathlib import Path
from components import checkpoint, stages
from components.defenses import aabl, meca
from components.params import AttackParams, TrainParams

args = json.loads(sys.argv[1])
inputs, root = Path(args["inputs"]), Path(args["root"])
dataset = inputs / "data" / "dataset.npz"
if args["stages"] == ["inputs"]:
    stages.poison("sample", AttackParams(), inputs / "data", train_limit=200)
    stages.train(dataset, inputs / "warmup", model_name="resnet_s", desc="warm-up",
                 params=TrainParams(epochs=1, batch_size=50, lr=0.05, augment="none"))
    clean = np.random.default_rng(0).random(200) < 0.1  # MeCa's round 0: the clean pool is unlearned, the rest kept
    stages.write_split(clean, inputs / "split.parquet")
    sys.exit(0)
saves = []
if args["kill_after"]:
    original = checkpoint.save

    def save(state, file):
        original(state, file)
        saves.append(file)
        if len(saves) == args["kill_after"]:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save = save
small = dict(batch_size=50, lr=0.05, seed=3)
calls = {
    "train": lambda out: stages.train(dataset, out, model_name="resnet_s", desc="warm-up", params=TrainParams(
        epochs=3, augment="crop_flip", schedule="onecycle", **small)),
    "adversarial": lambda out: aabl.adversarial_train(dataset, out, model_name="resnet_s", params=TrainParams(
        epochs=2, augment="flip", **small), aabl=aabl.AablParams(adv_steps=2)),
    "enhance": lambda out: meca.enhance_stage(dataset, inputs / "warmup", inputs / "split.parquet", out, seed=3,
                                              params=meca.MecaParams(rounds=2, learn_epochs=2, round0_learn=False,
                                                                     stop="rounds"),
                                              base=TrainParams(augment="flip", **small)),
}
with checkpoint.mirrored(args["mirror"]):
    for stage in args["stages"]:
        stages.recorded(stage, calls[stage], root / stage)
"""


def child(inputs: Path, root: Path, names, kill_after: int = 0, mirror: str | None = None):
    arg = json.dumps({"inputs": str(inputs), "root": str(root), "stages": list(names), "kill_after": kill_after,
                      "mirror": mirror})
    return subprocess.run([sys.executable, "-c", CHILD, arg], cwd=REPO, capture_output=True, text=True, timeout=300)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ between {a} and {b}, e.g. {differ[:3]}"


def losses(folder: Path) -> list[tuple]:
    return [(h["epoch"], h["loss"], h["train_acc"], h["lr"]) for h in artifacts.read_json(folder / "history.json")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    made = child(root, root, ["inputs"])
    assert made.returncode == 0, made.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict:
    """Every stage of KILLS uninterrupted (one process), killed (one process each) and rerun into the folders of
    the killed ones (one process)."""
    whole, resumed = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("resumed")
    done = child(inputs, whole, KILLS)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = {name: child(inputs, resumed, [name], kill_after=n) for name, (n, _, _) in KILLS.items()}
    checkpoints = {name: sorted(p.name for p in (resumed / name / checkpoint.FOLDER).glob("*.pt")) for name in KILLS}
    finished = {name: (resumed / name / "stage.json").exists() for name in KILLS}
    again = child(inputs, resumed, KILLS)
    assert again.returncode == 0, again.stderr[-3000:]
    return {"whole": whole, "resumed": resumed, "killed": killed, "checkpoints": checkpoints, "finished": finished,
            "again": again}


@pytest.mark.slow
@pytest.mark.parametrize("name", KILLS)
def test_a_stage_killed_mid_training_resumes_to_the_weights_of_an_uninterrupted_run(runs, name):
    killed = runs["killed"][name]
    assert killed.returncode == -9, f"the {name} process was to die by SIGKILL: {killed.stderr[-2000:]}"
    assert runs["checkpoints"][name] == KILLS[name][1] and not runs["finished"][name]
    for said in KILLS[name][2]:
        assert said in runs["again"].stderr, f"the rerun did not resume {name}: {runs['again'].stderr[-2000:]}"
    whole, resumed = runs["whole"] / name, runs["resumed"] / name
    model = "model" if name == "enhance" else ""
    assert_same_weights(whole / model, resumed / model)
    if name == "enhance":
        for col in ("kl", "kept", "fitted", "round"):
            a = artifacts.read_table(whole / "rounds.parquet", artifacts.ROUNDS_SCHEMA)[col]
            b = artifacts.read_table(resumed / "rounds.parquet", artifacts.ROUNDS_SCHEMA)[col]
            np.testing.assert_array_equal(a, b, err_msg=col)
    else:
        assert losses(whole) == losses(resumed)  # the history too: resumed epochs are the uninterrupted ones
    assert not (resumed / checkpoint.FOLDER).exists(), "a finished stage keeps no checkpoints"
    assert (resumed / "stage.json").exists()


@pytest.mark.slow
def test_a_new_pod_resumes_from_the_checkpoint_mirrored_to_the_object_store(inputs, runs, s3_server, s3_bucket,
                                                                           tmp_path):
    """A KFP task's output folder dies with its pod: the rerun starts in an empty folder and fetches the checkpoint
    that the killed attempt mirrored to S3."""
    mirror = f"s3://{s3_bucket}/unpoison/checkpoints/task"
    killed = child(inputs, tmp_path / "pod1", ["train"], kill_after=1, mirror=mirror)
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = Store.from_env()
    assert store.list(mirror) == [f"{mirror}/warm-up.pt"]
    again = child(inputs, tmp_path / "pod2", ["train"], mirror=mirror)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "warm-up: resuming after epoch 1 of 3" in again.stderr, again.stderr[-2000:]
    assert_same_weights(runs["whole"] / "train", tmp_path / "pod2" / "train")
    assert store.list(mirror) == [], "a finished stage removes its mirrored checkpoints"


# --- in process: which checkpoint a training uses ------------------------------------------------------------------

def tiny(**kw) -> TrainParams:
    return TrainParams(**{"epochs": 2, "batch_size": 16, "lr": 0.05, "augment": "flip", **kw})


def data(seed: int = 0, n: int = 48):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=g), torch.randint(0, 2, (n,), generator=g)


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def trained(p: TrainParams, ckpt: Path | None, x=None, y=None, **kw):
    model = TinyCNN()
    x, y = (x, y) if x is not None else data()
    history = engine.train(model, x, y, p, device=CPU, checkpoint=ckpt, **kw)
    return model.state_dict(), history


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_training_is_not_used(tmp_path, capfd):
    ckpt = tmp_path / "checkpoints" / "train.pt"
    trained(tiny(lr=0.2), ckpt)  # another training's finished checkpoint at the same place
    capfd.readouterr()
    got, history = trained(tiny(), ckpt)
    expected, expected_history = trained(tiny(), None)
    assert same(got, expected) and len(history) == 2
    assert [h["loss"] for h in history] == [h["loss"] for h in expected_history]
    assert "belongs to another training" in capfd.readouterr().err
    again, _ = trained(tiny(), ckpt)  # the checkpoint is now this training's own: a rerun takes it
    assert same(again, expected) and "finished before" in capfd.readouterr().err


@pytest.mark.parametrize("change", ["data", "labels", "desc", "loss parameter", "initial weights", "weights"])
def test_the_key_tells_trainings_apart(change, tmp_path):
    x, y = data()

    def key(x=x, y=y, desc="train", loss_fn=engine.bounded_ascent(5.0), seed=0, weights=None):
        torch.manual_seed(seed)
        return checkpoint.training_key(torch.nn.Linear(3, 2), x, y, weights, tiny(), desc=desc, loss_fn=loss_fn,
                                       perturb=None, frozen_norm=False)

    other = {"data": lambda: key(x=data(1)[0]), "labels": lambda: key(y=1 - y), "desc": lambda: key(desc="other"),
             "loss parameter": lambda: key(loss_fn=engine.bounded_ascent(4.0)),
             "initial weights": lambda: key(seed=1), "weights": lambda: key(weights=torch.ones(len(y)))}[change]
    assert key() == key()
    assert other() != key()


def test_the_interval_is_not_part_of_the_key_and_a_killed_training_resumes(tmp_path, capfd, monkeypatch):
    """An interrupted training (its checkpoint after epoch 2 of 4) resumes to the uninterrupted weights, also when the
    rerun saves at another interval."""
    ckpt = tmp_path / "train.pt"
    saved = []
    original = checkpoint.save

    class Killed(Exception):
        pass

    def save(state, file):
        original(state, file)
        saved.append(state["epoch"])
        if state["epoch"] == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", save)
        with pytest.raises(Killed):
            trained(tiny(epochs=4, checkpoint_every=2, schedule="onecycle", momentum=0.9), ckpt)
    assert saved == [2]
    capfd.readouterr()
    got, history = trained(tiny(epochs=4, checkpoint_every=3, schedule="onecycle", momentum=0.9), ckpt)
    assert "resuming after epoch 2 of 4" in capfd.readouterr().err
    expected, expected_history = trained(tiny(epochs=4, schedule="onecycle", momentum=0.9), None)
    assert same(got, expected)
    assert [h["loss"] for h in history] == [h["loss"] for h in expected_history]


def test_saves_every_n_epochs_and_after_the_last_and_none_at_zero(tmp_path, monkeypatch):
    saved = []
    original = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda state, file: (saved.append((state["epoch"], state["complete"])),
                                                                 original(state, file)))
    trained(tiny(epochs=5, checkpoint_every=2), tmp_path / "a.pt")
    trained(tiny(epochs=5, checkpoint_every=0), tmp_path / "b.pt")
    trained(tiny(epochs=5), None)  # no file given: no checkpoint
    assert saved == [(2, False), (4, False), (5, True)]
    assert not (tmp_path / "b.pt").exists()
    state = torch.load(tmp_path / "a.pt", weights_only=True)  # tensors, numbers, strings: loads without pickle code
    assert state["optimizer"] is None and len(state["history"]) == 5  # a finished training needs no optimizer


def test_a_damaged_checkpoint_is_ignored(tmp_path, capfd):
    ckpt = tmp_path / "train.pt"
    ckpt.write_bytes(b"not a checkpoint")
    got, _ = trained(tiny(), ckpt)
    assert "cannot read the checkpoint" in capfd.readouterr().err
    assert same(got, trained(tiny(), None)[0])


def test_a_kfp_task_mirrors_to_a_prefix_of_its_inputs_in_the_bucket_of_its_output():
    run1 = "minio://mlpipeline/v2/artifacts/unpoison-none/run1"

    def prefix(out_uri, lr=0.1, upstream=f"{run1}/poison/u1/dataset"):
        task = {"defense": "none", "stage": "train", "given": {"train": {"lr": lr}}, "inputs": {"poison": upstream}}
        return runner.checkpoint_prefix(out_uri, task)

    a = prefix(f"{run1}/train/u2/out")
    assert a.startswith(f"s3://mlpipeline/{runner.CHECKPOINTS}/") and len(a.rsplit("/", 1)[1]) == 32
    # submitted again: a new output URI, the same (cached) input: the same prefix, so the stage resumes
    assert prefix("minio://mlpipeline/v2/artifacts/unpoison-none/run2/train/u9/out") == a
    assert prefix(f"{run1}/train/u2/out", lr=0.2) != a
    assert prefix(f"{run1}/train/u2/out", upstream="minio://mlpipeline/v2/artifacts/x/run2/poison/u3/dataset") != a
    assert prefix("s3://bucket/pipelines/out").startswith("s3://bucket/")
    assert prefix("kfp-local/out") is None and prefix(None) is None and prefix("gs://b/out") is None


def test_meca_rounds_checkpoint_one_file_per_training(tmp_path):
    x, y = data(n=40)
    net = TinyCNN()
    kept0 = np.arange(40) % 3 > 0
    params = meca.MecaParams(rounds=2, learn_epochs=1, eps=0.1, patch=2, score_batch=64, round0_learn=False,
                             stop="rounds")  # the paper's rounds: no learning step in round 0, all rounds run
    meca.enhance(net, x, y, kept0, params, tiny(epochs=1, augment="none"), seed=0, checkpoints=tmp_path)
    assert sorted(p.name for p in (tmp_path / checkpoint.FOLDER).iterdir()) == [
        "learn-r1.pt", "unlearn-r0.pt", "unlearn-r1.pt"]
