"""How a defense is declared: its stages, what feeds each, its parameter section, GPU or not, and how it is evaluated.

A defense module declares one `Defense`. The local runner executes its `plan`, the KFP builder turns the same plan
into a pipeline, and evaluation, tracking, rerun, the CLI and the benchmark read it; none of them lists the stages of
a particular defense. Every plan starts with the data stage, `poison` (an attack is injected) or `ingest` (the data
set as delivered, `--attack none`), which a declaration names `data`, and ends with `evaluate`.

An input reference is `"<stage>"` (the stage's output folder) or `"<stage>/<path inside it>"`. A stage's keyword
parameters come from the run configuration through `params(cfg)`, which may read only the configuration keys listed
in `reads`: a KFP task receives exactly those, so they are its cache key, and reading another key is an error here
and under KFP alike (`ConfigView`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from pydantic import BaseModel

from components import stages
from components.errors import UnpoisonError

DATA = "data"  # how a declaration names the data stage's output


def _no_params(cfg) -> dict:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str  # run folder, KFP task, MLflow child run
    fn: Callable[..., dict]  # stage function: fn(**inputs, out=<folder>, **params(cfg)) -> summary dict
    inputs: Mapping[str, Any] = field(default_factory=dict)  # fn argument -> "<stage>" or "<stage>/<path>" (or a
    # mapping of such references, passed to fn as a dict of paths)
    params: Callable[[Any], dict] = _no_params  # fn's keyword parameters from the run configuration
    reads: tuple[str, ...] = ()  # the configuration keys `params` reads
    gpu: bool = True  # ask for a GPU node on a cluster
    kind: Literal["model", "dataset"] = "dataset"  # the KFP artifact type of the output folder
    monitor: bool = False  # pass `monitor`: per-epoch ACC/ASR on test images, for the report's curves, and each
    # epoch's record to live tracking (`run_stage`'s on_epoch)

    @property
    def upstream(self) -> tuple[str, ...]:
        """The stages whose outputs this one reads, in order of first use."""
        refs = [r for ref in self.inputs.values() for r in (ref.values() if isinstance(ref, Mapping) else [ref])]
        return tuple(dict.fromkeys(ref.split("/", 1)[0] for ref in refs))


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measures: every value names a stage output as an input reference does."""

    models: Mapping[str, str]  # model name (report, MLflow) -> model folder
    defended: str  # the model the defense delivers: headline ACC/ASR, the model MLflow serves
    reference: str | None = None  # the no-defense model DER compares against
    scores: tuple[str, ...] = ()  # score tables
    directions: Mapping[str, int] = field(default_factory=dict)  # score column -> -1 low = poison-like, +1 high
    splits: Mapping[str, str] = field(default_factory=dict)  # split name -> split table
    detection: str | None = None  # the split whose non-clean pools are the defense's suspects
    suspicion: str | None = None  # the score column that ranks the suspects (suspects.parquet, the grid)
    rounds: str | None = None  # MeCa's per-round enhancement table
    epoch_pools: str | None = None  # a training's pools per epoch (artifacts.EPOCH_POOLS_SCHEMA; BSD's final training)
    target_estimate: str | None = None  # a JSON whose `target` is the defense's estimate of the attack target (BSD)
    robust: tuple[str, ...] = ()  # models that also get RA, robust accuracy under PGD
    ra: Callable[[Any], dict] | None = None  # RA's PGD {"eps", "step", "steps"} from the configuration
    reads: tuple[str, ...] = ()  # configuration keys `ra` reads

    def stages(self) -> tuple[str, ...]:
        refs = [*self.models.values(), *self.scores, *self.splits.values(),
                *(ref for ref in (self.rounds, self.epoch_pools, self.target_estimate) if ref)]
        return tuple(dict.fromkeys(ref.split("/", 1)[0] for ref in refs))

    def spec(self) -> dict:
        """The plain-data part, as `stages.evaluate` takes it (and a KFP task as a constant)."""
        return {"models": dict(self.models), "defended": self.defended, "reference": self.reference,
                "scores": list(self.scores), "directions": dict(self.directions), "splits": dict(self.splits),
                "detection": self.detection, "suspicion": self.suspicion, "rounds": self.rounds,
                "robust": list(self.robust),
                # only when set: the evaluation constants of the defenses without them stay as they were
                **{k: v for k, v in (("epoch_pools", self.epoch_pools),
                                     ("target_estimate", self.target_estimate)) if v}}


@dataclass(frozen=True)
class Defense:
    name: str
    description: str
    stages: tuple[Stage, ...]
    evaluation: Evaluation
    section: str | None = None  # its parameter section in the run configuration
    params: type[BaseModel] | None = None  # the section's typed parameters

    def __post_init__(self):
        seen = {DATA}
        for st in self.stages:
            missing = [s for s in st.upstream if s not in seen]
            if missing or st.name in seen or st.name in ("poison", "ingest", "evaluate", "truth"):
                raise ValueError(f"defense '{self.name}': stage '{st.name}' reads {missing or 'nothing unknown'} "
                                 f"before any stage writes it, or reuses a reserved or earlier name")
            seen.add(st.name)
        unknown = [s for s in self.evaluation.stages() if s not in seen]
        if unknown:
            raise ValueError(f"defense '{self.name}': evaluation reads unknown stage(s) {unknown}")

    def plan(self, delivered: bool) -> tuple[Stage, ...]:
        """Every stage in execution order: the data stage, the defense's stages, evaluation."""
        return (data_stage(delivered), *self.stages, evaluate_stage(self))

    def stage_names(self, delivered: bool = False) -> list[str]:
        return [s.name for s in self.plan(delivered)]

    def stage(self, name: str, delivered: bool = False) -> Stage:
        for st in self.plan(delivered):
            if st.name == name:
                return st
        raise UnpoisonError(f"defense '{self.name}' has no stage '{name}'; its stages are: "
                            f"{', '.join(self.stage_names(delivered))}")

    def downstream(self, name: str, delivered: bool = False) -> list[str]:
        """`name` and every stage that reads, directly or not, what it writes, in execution order."""
        data = data_stage(delivered).name
        hit = {name}
        for st in self.plan(delivered):
            if any((data if s == DATA else s) in hit for s in st.upstream):
                hit.add(st.name)
        return [s for s in self.stage_names(delivered) if s in hit]


def data_stage(delivered: bool) -> Stage:
    """The first stage: `poison` injects the configured attack, `ingest` takes the data set as delivered. Not a GPU
    stage: the poison task of a pipeline gets a GPU only for an attack that trains a model, which is known when the
    run is submitted (pipelines/kfp_pipelines.py, POISON_GPUS)."""
    fn = stages.ingest if delivered else stages.poison
    return Stage(fn.__name__, fn, params=lambda c: {"data": c.data, "attack": c.attack, "train_limit": c.train_limit},
                 reads=("data", "attack", "train_limit"), gpu=False)


def evaluate_stage(defense: Defense) -> Stage:
    """The last stage: evaluation of every model, score and split the declaration names."""
    ev = defense.evaluation
    inputs = {DATA: DATA, **{s: s for s in ev.stages()}}
    reads = ("data", "protocol", "model", *ev.reads)
    return Stage("evaluate", stages.evaluate, inputs={"dirs": inputs},  # type: ignore[dict-item]
                 params=lambda c: {"data": c.data, "spec": ev.spec(), "ra": ev.ra(c) if ev.ra else None,
                                   "info": {"defense": defense.name, "protocol": c.protocol, "model": c.model}},
                 reads=reads)


class ConfigView:
    """The run configuration as a stage sees it: only the keys it declared in `reads`."""

    def __init__(self, cfg, reads: tuple[str, ...], stage: str):
        self._cfg, self._reads, self._stage = cfg, set(reads), stage

    def __getattr__(self, key: str):
        if key not in self._reads:
            raise RuntimeError(f"stage '{self._stage}' reads configuration key '{key}' but declares only "
                               f"{sorted(self._reads)}; add it to the stage's `reads`")
        return getattr(self._cfg, key)


def resolve(ref: str, dirs: Mapping[str, Path], data_name: str) -> Path:
    head, _, rest = ref.partition("/")
    folder = Path(dirs[data_name if head == DATA else head])
    return folder / rest if rest else folder


def per_epoch(monitor: stages.Monitor | None, report: Callable[[dict], None] | None):
    """The callback a stage's training calls after each epoch (`engine.EpochCallback`): the monitor's test figures
    into the epoch's record, then `report(record)` with the whole record, as history.json keeps it (live tracking)."""
    if report is None:
        return monitor

    def on_epoch(epoch: int, model, record: dict) -> None:
        if monitor is not None:
            monitor(epoch, model, record)
        report(record)

    return on_epoch


def run_stage(st: Stage, cfg, out: Path, dirs: Mapping[str, Path], data_name: str, *,
              on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Run one declared stage into `out` on the upstream folders in `dirs` (stage name -> folder); returns the
    stage record (`stages.recorded`). The same call runs a stage locally and inside a KFP component. `on_epoch`
    hears each epoch's record as the epoch ends, in the stages that keep a per-epoch history (`monitor`)."""
    view = ConfigView(cfg, st.reads, st.name)
    kwargs = dict(st.params(view))
    for arg, ref in st.inputs.items():
        kwargs[arg] = ({k: resolve(v, dirs, data_name) for k, v in ref.items()} if isinstance(ref, Mapping)
                       else resolve(ref, dirs, data_name))
    if "dirs" in kwargs:  # evaluation also reads the ground truth: apart under KFP, in the data folder locally
        kwargs["dirs"] = {**kwargs["dirs"], "truth": Path(dirs.get("truth", dirs[data_name]))}
    if st.monitor:  # no curves without a test split: a folder's training images are no test set
        dataset = resolve(f"{DATA}/dataset.npz", dirs, data_name)
        monitor = (stages.Monitor(cfg.data, resolve(f"{DATA}/attack.json", dirs, data_name),
                                  stages.monitor_size(stages.dataset_size(dataset)))
                   if stages.has_test_split(cfg.data) else None)
        kwargs["monitor"] = per_epoch(monitor, on_epoch)
    return stages.recorded(st.name, st.fn, out, **kwargs)
