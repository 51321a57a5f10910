"""What the matrix's tasks run, and its results, without KFP (a component's body imports no module that imports kfp:
in a task, KFP's runtime loads a `kfp.dsl` without its authoring API): the attack settings of a matrix, a cell's
records, the collected table (JSON records, Parquet, Markdown), its plot and its MLflow record. Used by every engine
of `unpoison benchmark` (pipelines/benchmark.py, pipelines/matrix.py, whose docstring has the design)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from components.errors import UnpoisonError

# the table's columns, as in benchmarks/results/<protocol>-reference.md (benchmark.table): header -> record key
COLUMNS = {"attack": "attack", "defense": "defense", "ACC": "acc", "ASR": "asr", "DER": "der",
           "target ACC": "target_acc", "RA": "ra", "TPR": "detection_tpr", "FPR": "detection_fpr",
           "ACC relabel": "acc_relabel", "ASR relabel": "asr_relabel", "gamma": "gamma", "rho_vul": "rho_vul",
           "wall s": "wall_seconds"}


# --- the matrix's cells --------------------------------------------------------------------------------------------

def parse_attacks(text: str) -> list[tuple[str, dict]]:
    """`badnets,blend:alpha=0.1:seed=3` -> [(badnets, {}), (blend, {alpha: 0.1, seed: 3})]: attack names, each with
    `:KEY=VALUE` params (values read as YAML)."""
    import yaml

    out = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        name, *pairs = word.split(":")
        params = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise UnpoisonError(f"attack '{word}': '{pair}' is not KEY=VALUE; write attacks as NAME or "
                                    f"NAME:KEY=VALUE:KEY=VALUE, e.g. blend:alpha=0.1")
            params[key.strip()] = yaml.safe_load(value)
        out.append((name.strip(), params))
    if not out:
        raise UnpoisonError("no attack given; pass --attacks with comma-separated names, e.g. badnets,blend")
    return out


def settings(protocol: str, attacks: list[tuple[str, dict]], rates: list[float] | None, overrides: dict,
             files=()) -> list[dict]:
    """The matrix's attack settings, attacks x rates (default: the configured rate): each {"attack": the attack's
    dict, "variant": "" or its label, "settings": {dotted key: value} where it departs from the protocol's}. The
    protocol's attack is the protocol file's and `files`' (not `overrides`'): a rate or params set on the command
    line make a variant. Every setting is validated here, before anything runs."""
    from components.config import load_config

    out = []
    for name, params in attacks:
        base = load_config(protocol, {"attack.name": name}, files).attack
        for rate in rates or [None]:
            extra = {**({"attack.rate": rate} if rate is not None else {}),
                     **{f"attack.params.{k}": v for k, v in params.items()}}
            attack = load_config(protocol, {**overrides, "attack.name": name, **extra}, files).attack
            if name != "none":  # an unknown param fails here, naming the attack's params
                from components.attacks import from_params

                from_params(attack, 10)
            changed = {f"attack.{k}": v for k, v in attack.model_dump().items()
                       if k not in ("name", "params") and v != getattr(base, k)}
            changed.update({f"attack.params.{k}": v for k, v in attack.params.items() if base.params.get(k) != v})
            label = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in changed.items())
            out.append({"attack": attack.model_dump(), "variant": label, "settings": changed})
    labels = [(s["attack"]["name"], s["variant"]) for s in out]
    if len(set(labels)) < len(labels):
        raise UnpoisonError(f"the matrix names an attack setting twice ({labels}); list each attack and rate once")
    return out


# --- what the cell and collect tasks run -------------------------------------------------------------------------

def cell_records(defense: str, variant: str, settings: dict, gpu_stages: list[str], dirs: dict[str, Path],
                 out: Path) -> None:
    """A cell's records into out/records.json, from its stages' output folders `dirs` (stage -> folder, evaluation's
    included): `benchmark.records_from_run` on the evaluation's metrics with every stage's wall time (a shared stage
    counts in every cell that reads it, as a run of the defense alone takes it), the machine its GPU stages ran on
    (their stage.json). A stage that stopped on a user error gives out/user_error.json instead."""
    from components import artifacts
    from components.errors import USER_ERROR_FILE
    from components.runner import kfp_run_id, user_error
    from pipelines.benchmark import records_from_run

    out.mkdir(parents=True, exist_ok=True)
    error = user_error(dirs.values())
    if error is not None:
        artifacts.write_json({**error, "defense": defense, "variant": variant}, out / USER_ERROR_FILE)
        artifacts.write_json([], out / "records.json")
        return
    m = artifacts.read_json(dirs["evaluate"] / "metrics.json")
    recorded = {name: artifacts.read_json(folder / "stage.json") for name, folder in dirs.items()
                if (folder / "stage.json").is_file()}
    m["stages"] = {name: {"seconds": r["seconds"]} for name, r in recorded.items()}
    m["wall_seconds"] = sum(r["seconds"] for r in recorded.values())
    machines = sorted({recorded[s].get("machine") or "unknown" for s in gpu_stages if s in recorded})
    run = f"{kfp_run_id() or 'kfp'}/{defense}-{m['attack']['name']}{('-' + variant) if variant else ''}"
    records = records_from_run(m, run, include_none=False,
                               variant={"variant": variant, "settings": settings} if variant else None)
    for r in records:
        r["machine"] = "; ".join(machines) or "unknown"
        r["engine"] = "kfp"
    artifacts.write_json(m, out / "metrics.json")
    artifacts.write_json(records, out / "records.json")


def collect_cells(folders: list[Path], out: Path, *, mlflow_uri: str | None = None, name: str | None = None) -> list:
    """Every cell folder's records (`cell_records`) into `out`: results.json (benchmark records), results.parquet
    and results.md (the columns of cpu-reference.md), results.png; then one MLflow parent run (when a tracking URI is
    set) with a child run per cell. A cell that stopped on a user error fails the task, naming every such cell, with
    exit code USER_ERROR_EXIT (never retried: the run fails once, and shows why)."""
    from components import artifacts
    from components.errors import USER_ERROR_EXIT, USER_ERROR_FILE
    from pipelines.benchmark import merge

    errors = [artifacts.read_json(f / USER_ERROR_FILE) for f in folders if (f / USER_ERROR_FILE).is_file()]
    if errors:
        for e in errors:
            print(f"unpoison: error: cell {e['defense']} {e.get('variant') or ''}: stage {e['stage']} stopped: "
                  f"{e['error']}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT)
    records = merge(out / "nothing.json", [r for f in folders for r in artifacts.read_json(f / "records.json")])
    files = write_results(records, out, "results")
    from components.runner import kfp_run_id

    rid = kfp_run_id()
    log_mlflow(records, list(files.values()), name or f"matrix-{rid or 'kfp'}", uri=mlflow_uri,
               tags={"unpoison.kfp_run_id": rid} if rid else None)
    return records


def label(r: dict) -> str:
    return f"{r['attack']} ({r['variant']})" if r.get("variant") else r["attack"]


def write_results(records: list[dict], folder: Path, stem: str, title: str = "Benchmark matrix") -> dict[str, Path]:
    """records -> folder/<stem>.json, .parquet, .md, .png (each written whole, then renamed into place)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components import artifacts
    from pipelines.benchmark import table

    folder.mkdir(parents=True, exist_ok=True)
    paths = {ext: folder / f"{stem}.{ext}" for ext in ("json", "parquet", "md", "png")}
    artifacts.write_json(records, paths["json"])
    columns = {head: [label(r) if key == "attack" else r.get(key) for r in records] for head, key in COLUMNS.items()}
    types = {head: pa.string() if head in ("attack", "defense") else pa.float64() for head in COLUMNS}
    with artifacts.atomic_path(paths["parquet"]) as tmp:
        pq.write_table(pa.table({h: pa.array(v, type=types[h]) for h, v in columns.items()}), tmp)
    with artifacts.atomic_path(paths["md"]) as tmp:
        tmp.write_text(f"# {title}\n\n" + table(records) + f"\n![ACC against ASR]({paths['png'].name})\n")
    plot(records, paths["png"])
    return paths


def plot(records: list[dict], path: Path) -> None:
    """ACC against ASR, one panel per defense, one marker per cell, the no-defense point beside it (module
    docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from components import artifacts

    defended = [r for r in records if r["defense"] != "none"]
    defenses = list(dict.fromkeys(r["defense"] for r in defended)) or ["none"]
    keys = list(dict.fromkeys(label(r) for r in records if r.get("asr") is not None))
    colours = {k: plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")(i % 20) for i, k in enumerate(keys)}
    plain = {label(r): r for r in records if r["defense"] == "none"}
    cols = min(len(defenses), 3)
    rows = -(-len(defenses) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, defense in zip(axes.flat, defenses):
        for r in (x for x in records if x["defense"] == defense and x.get("asr") is not None):
            ref = plain.get(label(r))
            if ref is not None and ref is not r and ref.get("asr") is not None:
                ax.plot([ref["asr"], r["asr"]], [ref["acc"], r["acc"]], color=colours[label(r)], lw=0.8, alpha=0.6)
                ax.scatter(ref["asr"], ref["acc"], facecolors="none", edgecolors=colours[label(r)], s=40)
            ax.scatter(r["asr"], r["acc"], color=colours[label(r)], s=40, label=label(r))
        ax.set_title(defense)
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(defenses):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("ACC (clean test)")
    for ax in axes[-1, :]:
        ax.set_xlabel("ASR (triggered test)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[k], label=k) for k in keys]
    handles.append(plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="grey",
                              label="no defense"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.suptitle("ACC against ASR per defense\nfilled: the defense; hollow: no defense on the same attack",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) // 5), 1, 0.92))
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def log_mlflow(records: list[dict], files: list[Path], name: str, *, uri: str | None = None,
               tags: dict | None = None) -> str:
    """One MLflow parent run for the matrix (the table, the records and the plot as artifacts), one child run per
    cell (its figures as metrics, its defense, attack and variant as tags). Returns the parent run id, '' without
    a tracking URI (`uri`, else MLFLOW_TRACKING_URI)."""
    from components import tracking

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return ""
    client = tracking._client(uri)
    experiment = tracking._experiment(client, uri)
    cells = sorted({(r["defense"], label(r)) for r in records})
    parent = client.create_run(experiment, run_name=name, tags={"unpoison.run": name, "unpoison.matrix": "true",
                                                                  **(tags or {})})
    pid = parent.info.run_id
    client.log_batch(pid, params=tracking._params({
        "defenses": ",".join(dict.fromkeys(r["defense"] for r in records)),
        "attacks": ",".join(dict.fromkeys(label(r) for r in records)),
        "protocol": ",".join(sorted({r["protocol"] for r in records})), "cells": len(cells)}))
    for r in records:
        child = client.create_run(experiment, run_name=f"{r['defense']}-{label(r)}",
                                  tags={"mlflow.parentRunId": pid, "unpoison.defense": r["defense"],
                                        "unpoison.attack": r["attack"], "unpoison.variant": r.get("variant") or "",
                                        "unpoison.cell_run": str(r.get("run", "")), "unpoison.machine": r["machine"]})
        figures = {k: r.get(k) for k in COLUMNS.values() if k not in ("attack", "defense")}
        client.log_batch(child.info.run_id, metrics=tracking._metrics(tracking._numeric(figures)))
        client.set_terminated(child.info.run_id, "FINISHED")
    for path in files:
        client.log_artifact(pid, str(path))
    client.set_terminated(pid, "FINISHED")
    return pid


def parse_rates(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UnpoisonError(f"--rates '{text}' is not a comma-separated list of shares, e.g. 0.01,0.05,0.1") from None



def summary_line(r: dict) -> str:
    asr = "-" if r["asr"] is None else f"{r['asr']:.4f}"
    acc = "-" if r["acc"] is None else f"{r['acc']:.4f}"
    return f"{label(r):<16} {r['defense']:<6} ACC {acc} ASR {asr} wall {r['wall_seconds']:.0f} s"



def merge_results(out: Path, protocol: str, new: list[dict]) -> Path:
    """Merge `new` records into out/<protocol>-reference.json and rewrite its table, Parquet and plot."""
    from pipelines.benchmark import merge

    path = out / f"{protocol}-reference.json"
    write_results(merge(path, new), out, path.stem, title=f"{protocol} reference protocol")
    return path


