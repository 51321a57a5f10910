"""The local runner: a defense's declared stages in one process, into one run folder; MLflow records the run live
(components/tracking.py): its parent run opens before the first stage, each stage logs its child run while it runs
(each epoch as it ends), and the parent run ends FINISHED with the run's summary, or FAILED with the failing stage's
error when a stage raises (the error is raised again).

A run writes into `<out>/<name>.partial/` and is renamed to `<out>/<name>/` only when every stage has finished,
so a folder without the suffix always holds a complete run. A rerun (`rerun`) reads the stages upstream of
the one it reruns from the earlier run's folders and writes only what it executes.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from components import artifacts, runner, tracking
from components.attacks import from_params
from components.config import RunConfig
from components.data import load_images
from components.defenses import get
from components.defenses.base import DATA, Defense
from components.errors import UnpoisonError
from components.models import MODELS

ROOT_FILES = {"evaluate/metrics.json": "metrics.json", "evaluate/suspects.parquet": "suspects.parquet",
              "evaluate/plots/suspects.png": "suspects.png", "evaluate/report.html": "report.html"}


def validate(defense: str, cfg: RunConfig) -> Defense:
    """Fail fast, before anything is written: defense, model, data, attack and target."""
    d = get(defense)
    if cfg.model not in MODELS:
        raise UnpoisonError(f"unknown model '{cfg.model}'; choose one of: {', '.join(MODELS)}")
    train = load_images(cfg.data, "train")
    from_params(cfg.attack, train.num_classes)
    return d


def execute(defense: Defense, cfg: RunConfig, run_dir: Path, names: list[str], dirs: dict[str, Path],
            parent: tracking.Run | None = None) -> dict:
    """Run the named stages of the defense's plan in order into run_dir/<stage>, reading upstream outputs from
    `dirs` (stage -> folder, updated as stages finish), each logged live as a child run of `parent` (if any).
    Returns each executed stage's wall time and throughput."""
    delivered = cfg.attack.name == "none"
    plan = [s for s in defense.plan(delivered) if s.name in names]
    data_name = defense.plan(delivered)[0].name
    timings = {}
    for i, st in enumerate(plan, 1):
        print(f"stage {i}/{len(plan)} {st.name}: started", flush=True)
        record = runner.run_tracked(parent, st, cfg, run_dir / st.name, dirs, data_name)
        dirs[st.name] = run_dir / st.name
        timings[st.name] = {"seconds": record["seconds"],
                            **{k: v for k, v in record["result"].items() if k == "samples_per_second"}}
        print(f"stage {i}/{len(plan)} {st.name}: {record['seconds']:.0f} s", flush=True)
    return timings


def _finish(run_dir: Path, timings: dict) -> None:
    """Copy the run's headline files to its root: metrics (with the stage timings), report, suspects."""
    for src, dst in ROOT_FILES.items():
        if (run_dir / src).exists():
            shutil.copy(run_dir / src, run_dir / dst)
    if (run_dir / "metrics.json").exists():
        m = artifacts.read_json(run_dir / "metrics.json")
        m["stages"] = timings
        m["wall_seconds"] = sum(t["seconds"] for t in timings.values())
        artifacts.write_json(m, run_dir / "metrics.json")
    if (run_dir / "evaluate" / "report.md").exists():  # the report's plots live under evaluate/
        text = (run_dir / "evaluate" / "report.md").read_text().replace("](plots/", "](evaluate/plots/")
        (run_dir / "report.md").write_text(text)


def _open(defense: Defense, cfg: RunConfig, name: str, uri: str | None, tags: dict) -> tracking.Run | None:
    """The run's MLflow parent run, opened before its first stage (None without `uri`)."""
    return tracking.open_run(name, defense.name, cfg.model_dump(), uri=uri, tags=tags) if uri else None


def _track(parent: tracking.Run | None, defense: Defense, cfg: RunConfig, dirs: dict[str, Path]) -> None:
    """Finish the parent run, on the stage folders where the run left them."""
    if parent is not None:
        runner.finish(parent, defense.name, cfg.attack.name == "none", cfg.model_dump(),
                      {s: (str(d), str(d)) for s, d in dirs.items()})


def _new_run_dir(out_root: Path, name: str, numbered: bool = False) -> Path:
    """Create `<out_root>/<name>.partial/` for a new run, exclusively: a folder of that name, finished or partial,
    belongs to another run (one in progress, or one stopped before its end, whose outputs are kept). With `numbered`
    (a name the tool made from the time, to the second) a clash takes the next free `<name>-2`, `-3`, ...: two runs
    started in the same second get two folders. Otherwise the clash is an error naming the folder."""
    for n in range(1, 1000 if numbered else 2):
        candidate = name if n == 1 else f"{name}-{n}"
        final_dir, run_dir = Path(out_root) / candidate, Path(out_root) / f"{candidate}.partial"
        if final_dir.exists():
            continue
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            continue
        return run_dir
    raise UnpoisonError(f"run folder '{Path(out_root) / name}' or '{name}.partial' beside it already exists (a run of "
                        f"that name finished, is in progress or stopped before its end); pass another --name or "
                        f"remove the folder")


def run(defense: str, cfg: RunConfig, out_root: Path, *, mlflow_uri: str | None, name: str | None = None) -> Path:
    d = validate(defense, cfg)
    run_dir = _new_run_dir(out_root, name or f"{defense}-{cfg.attack.name}-{datetime.now():%Y%m%d-%H%M%S}",
                           numbered=name is None)
    name = run_dir.name.removesuffix(".partial")
    artifacts.write_json({"defense": defense, "config": cfg.model_dump()}, run_dir / "config.json")
    parent = _open(d, cfg, name, mlflow_uri, {"unpoison.engine": "local"})
    with tracking.fail_on_error(parent):
        dirs: dict[str, Path] = {}
        timings = execute(d, cfg, run_dir, d.stage_names(cfg.attack.name == "none"), dirs, parent)
        _finish(run_dir, timings)
        final_dir = run_dir.with_name(name)
        run_dir.rename(final_dir)
        _track(parent, d, cfg, {s: final_dir / s for s in dirs})
    return final_dir


def rerun(defense: str, cfg: RunConfig, earlier: dict[str, Path], stage: str, out_root: Path, *, downstream: bool,
          mlflow_uri: str | None, name: str) -> Path:
    """Rerun `stage` (and with `downstream` every stage after it that depends on it) with `cfg`, reading every
    other input from the earlier run's stage folders `earlier`, into the run folder `name` (made from the time by
    `unpoison rerun`, so numbered on a clash: `_new_run_dir`). Nothing upstream executes."""
    d = get(defense)
    delivered = cfg.attack.name == "none"
    d.stage(stage, delivered)  # an unknown stage fails here, naming the defense's stages
    names = d.downstream(stage, delivered) if downstream else [stage]
    data_name = d.plan(delivered)[0].name
    needed = {data_name if u == DATA else u for st in d.plan(delivered) if st.name in names for u in st.upstream}
    lacking = sorted(needed - set(names) - set(earlier))
    if lacking:
        raise UnpoisonError(f"the earlier run has no output for stage(s) {', '.join(lacking)}; rerun from an earlier "
                            f"stage or with --downstream")
    run_dir = _new_run_dir(out_root, name, numbered=True)
    name = run_dir.name.removesuffix(".partial")
    artifacts.write_json({"defense": defense, "config": cfg.model_dump(), "rerun": {"stage": stage,
                          "downstream": downstream, "inputs": {s: str(p) for s, p in earlier.items()}}},
                         run_dir / "config.json")
    dirs = {s: Path(p) for s, p in earlier.items() if s not in names}
    parent = _open(d, cfg, name, mlflow_uri, {"unpoison.engine": "local", "unpoison.rerun_of": stage})
    with tracking.fail_on_error(parent):
        timings = execute(d, cfg, run_dir, names, dirs, parent)
        _finish(run_dir, timings)
        final_dir = run_dir.with_name(name)
        run_dir.rename(final_dir)
        _track(parent, d, cfg, {s: (final_dir / s if s in names else p) for s, p in dirs.items()})
    return final_dir
