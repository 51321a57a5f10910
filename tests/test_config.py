"""Run configuration (protocol YAML, --set overrides, validation) and the CLI's handling of bad input.

Every CLI case here fails in validation, before any training, so no case writes a run folder.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from components.config import RunConfig, load_config, parse_value, set_path
from components.errors import UnpoisonError
from pipelines.cli import main, parser


# ---------------------------------------------------------------------------------------------- protocols


def test_cpu_protocol_matches_design():
    cfg = load_config("cpu")
    assert isinstance(cfg, RunConfig)
    assert cfg.protocol == "cpu"
    assert cfg.model == "small_cnn"
    assert cfg.train_limit == 10000
    t = cfg.train
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.schedule) == (10, 128, "sgd", 0.1, "onecycle")
    assert t.momentum == 0.9 and t.nesterov is True
    assert t.weight_decay == pytest.approx(5e-4)
    assert t.augment == "flip"
    assert cfg.attack.rate == pytest.approx(0.05)
    assert cfg.attack.target == 0
    assert cfg.attack.epochs == 5  # the training budget of lc, narcissus, adaptive_pgd, input_aware


def test_paper_protocol_uses_resnet18_with_crop_and_flip():
    cfg = load_config("paper")
    assert cfg.protocol == "paper" and cfg.model == "resnet18"
    assert cfg.train.augment == "crop_flip"
    assert cfg.train.epochs > load_config("cpu").train.epochs
    assert cfg.train_limit is None
    assert cfg.attack.epochs == 200  # Narcissus's reference trains its surrogate 200 epochs


def test_unknown_protocol_names_the_choices():
    with pytest.raises(UnpoisonError, match=r"unknown protocol 'gpu'.*cpu, paper"):
        load_config("gpu")


# ---------------------------------------------------------------------------------------------- overrides


def test_set_overrides_dotted_keys_with_yaml_values():
    cfg = load_config("cpu", {"train.milestones": parse_value("[5,8]"), "train.schedule": parse_value("step"),
                              "meca.gamma": parse_value("0.05"), "train.nesterov": parse_value("false"),
                              "attack.name": parse_value("blend"), "seed": parse_value("3")})
    assert cfg.train.milestones == [5, 8]
    assert cfg.train.schedule == "step"
    assert cfg.meca.gamma == pytest.approx(0.05)
    assert cfg.train.nesterov is False
    assert cfg.attack.name == "blend"
    assert cfg.seed == 3
    # untouched keys keep the protocol's values
    assert cfg.train.lr == 0.1 and cfg.train.epochs == 10


def test_parse_value_reads_yaml_scalars_and_lists():
    assert parse_value("0.1") == 0.1
    assert parse_value("true") is True
    assert parse_value("[50, 75]") == [50, 75]
    assert parse_value("blend") == "blend"
    assert parse_value("null") is None


def test_set_path_refuses_to_descend_into_a_value():
    tree = {"train": {"lr": 0.1}}
    set_path(tree, "train.epochs", 3)
    assert tree == {"train": {"lr": 0.1, "epochs": 3}}
    with pytest.raises(UnpoisonError, match=r"cannot set 'train.lr.x'.*'lr' is a value"):
        set_path(tree, "train.lr.x", 1)


def test_extra_yaml_file_is_merged_before_overrides(tmp_path):
    f = tmp_path / "extra.yaml"
    f.write_text("train: {epochs: 2, lr: 0.5}\nmeca: {rounds: 4}\n")
    cfg = load_config("cpu", {"train.lr": 0.01}, [f])
    assert cfg.train.epochs == 2
    assert cfg.meca.rounds == 4
    assert cfg.train.lr == 0.01  # --set wins over the file
    assert cfg.train.batch_size == 128  # the file does not wipe the rest of the section


def test_missing_extra_yaml_file_is_an_error(tmp_path):
    with pytest.raises(UnpoisonError, match="nope.yaml"):
        load_config("cpu", files=[tmp_path / "nope.yaml"])


@pytest.mark.parametrize("key", ["train.lrr", "nonsense", "meca.gama", "attack.rat"])
def test_unknown_key_is_an_error_naming_the_key(key):
    with pytest.raises(UnpoisonError, match=rf"unknown config key '{key}'"):
        load_config("cpu", {key: 1})


@pytest.mark.parametrize("rate", [0, 0.0, 1.5, -0.1, 1])
def test_poison_rate_outside_open_unit_interval_is_an_error(rate):
    with pytest.raises(UnpoisonError) as e:
        load_config("cpu", {"attack.rate": rate})
    msg = str(e.value)
    assert "attack.rate" in msg and str(rate) in msg and "(0, 1)" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("key,value", [("train.epochs", -1), ("train.lr", 0), ("train.schedule", "linear"),
                                       ("meca.gamma", 1.0), ("train.batch_size", "many"),
                                       ("attack.epochs", 0)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(UnpoisonError, match=rf"bad value for '{key}'"):
        load_config("cpu", {key: value})


# ---------------------------------------------------------------------------------------------- CLI: config


def test_cli_config_prints_resolved_yaml_with_overrides(capsys):
    assert main(["config", "--set", "train.milestones=[5,8]", "train.lr=0.05", "--attack", "blend"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["milestones"] == [5, 8]
    assert out["train"]["lr"] == 0.05
    assert out["attack"]["name"] == "blend"
    assert out["model"] == "small_cnn"


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("unpoison: error: ")
    return lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["config", "--set", "foo"], "'foo' is not key=value"),
    (["config", "--set", "=3"], "'=3' is not key=value"),
    (["config", "--set", "train.lrr=1"], "train.lrr"),
    (["config", "--set", "nonsense=1"], "nonsense"),
    (["config", "--set", "attack.rate=0"], "(0, 1)"),
    (["config", "--set", "attack.rate=1.5"], "1.5"),
    (["config", "--protocol", "gpu"], "unknown protocol 'gpu'"),
])
def test_cli_config_bad_input_exits_2_with_one_line(capsys, argv, needle):
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert needle in line


# ---------------------------------------------------------------------------------------------- CLI: run


def run_fails(capsys, tmp_path, monkeypatch, *args, mlflow=False) -> str:
    """`unpoison run ... --out tmp_path/out` must exit 2 with one line and write nothing (cwd = tmp_path)."""
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    argv = ["run", *args, "--out", str(out)] + ([] if mlflow else ["--no-mlflow"])
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return line


def test_cli_run_missing_data_path(capsys, tmp_path, monkeypatch):
    line = run_fails(capsys, tmp_path, monkeypatch, "meca", "--data", "does/not/exist")
    assert "does/not/exist" in line and "does not exist" in line


def test_cli_run_unknown_attack(capsys, tmp_path, monkeypatch):
    line = run_fails(capsys, tmp_path, monkeypatch, "meca", "--attack", "badnet")
    assert "unknown attack 'badnet'" in line and "badnets" in line


def test_cli_run_unknown_model(capsys, tmp_path, monkeypatch):
    line = run_fails(capsys, tmp_path, monkeypatch, "none", "--set", "model=vgg99")
    assert "unknown model 'vgg99'" in line and "small_cnn" in line


def test_cli_run_target_outside_classes(capsys, tmp_path, monkeypatch):
    line = run_fails(capsys, tmp_path, monkeypatch, "meca", "--set", "attack.target=10")
    assert "target class 10" in line and "0 to 9" in line


def test_cli_run_unknown_defense_writes_no_mlflow_database(capsys, tmp_path, monkeypatch):
    line = run_fails(capsys, tmp_path, monkeypatch, "foo", mlflow=True)
    assert "unknown defense 'foo'" in line and "meca" in line


def test_cli_run_wrong_schema_parquet(capsys, tmp_path, monkeypatch):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), bad)
    line = run_fails(capsys, tmp_path, monkeypatch, "meca", "--data", str(bad))
    assert "bad.parquet" in line and "['a', 'b']" in line


def test_cli_run_bad_override(capsys, tmp_path, monkeypatch):
    line = run_fails(capsys, tmp_path, monkeypatch, "meca", "--set", "train.lrr=1")
    assert "train.lrr" in line


def test_set_works_wherever_it_stands(capsys):
    from pipelines.cli import untangle

    assert untangle(["run", "--set", "train.epochs=3", "meca"]) == ["run", "--set", "train.epochs=3", "--", "meca"]
    assert untangle(["run", "meca", "--set", "a=1", "b=2"]) == ["run", "meca", "--set", "a=1", "b=2"]
    assert main(["config", "--set", "train.epochs=3", "meca.gamma=0.05", "--attack", "blend"]) == 0
    assert "epochs: 3" in capsys.readouterr().out
    parsed = parser().parse_args(untangle(["run", "--set", "train.epochs=3", "meca", "--attack", "sig"]))
    assert parsed.defense == "meca" and parsed.set == ["train.epochs=3"] and parsed.attack == "sig"
