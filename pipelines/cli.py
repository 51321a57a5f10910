"""The `unpoison` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from components.config import load_config, parse_value
from components.errors import UnpoisonError

DEFAULT_OUT = Path("runs")


def _overrides(pairs: list[str], **shortcuts) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UnpoisonError(f"--set '{pair}' is not key=value; write it as e.g. --set train.lr=0.05")
        out[key.strip()] = parse_value(value)
    out.update({k: v for k, v in shortcuts.items() if v is not None})
    return out


def _config(args):
    return load_config(args.protocol, _overrides(args.set, **{"attack.name": getattr(args, "attack", None),
                                                              "data": getattr(args, "data", None)}), args.config)


def summary_table(m: dict) -> str:
    rows = [("no defense", m.get("nodef_acc", m["acc"]), m.get("nodef_asr", m["asr"]), None)]
    if m["defense"] != "none":
        rows.append((m["defense"], m["acc"], m["asr"], m.get("der")))
        if "relabelled" in m["models"]:
            r = m["models"]["relabelled"]
            rows.append((f"{m['defense']} + relabel", r["acc"], r["asr"], r.get("der")))
    lines = [f"{'model':<18} {'ACC':>7} {'ASR':>7} {'DER':>7}"]
    lines += [f"{name:<18} {acc:7.4f} {asr:7.4f} {'' if der is None else f'{der:7.4f}':>7}" for name, acc, asr, der in rows]
    if m.get("detection_tpr") is not None:
        lines.append(f"detection: TPR {m['detection_tpr']:.4f}  FPR {m['detection_fpr']:.4f}  "
                     f"precision {m['detection_precision']:.4f}")
    lines.append(f"wall time: {m['wall_seconds']:.0f} s")
    return "\n".join(lines)


def cmd_run(args) -> None:
    from components import artifacts, tracking
    from pipelines import local

    cfg = _config(args)
    uri = None if args.no_mlflow else (args.mlflow_uri or tracking.default_uri(args.out))
    run_dir = local.run(args.defense, cfg, args.out, mlflow_uri=uri, name=args.name)
    m = artifacts.read_json(run_dir / "metrics.json")
    print(summary_table(m))
    print(f"run folder: {run_dir}\nreport: {run_dir / 'report.md'}")
    if uri:
        print(f"mlflow: {uri}")


def cmd_config(args) -> None:
    print(yaml.safe_dump(_config(args).model_dump(), sort_keys=False), end="")


def cmd_benchmark(args) -> None:
    from pipelines import benchmark

    benchmark.main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unpoison", description="Train clean classifiers on backdoor-poisoned data.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--protocol", default="cpu", help="cpu (reference, any machine) or paper (GPU)")
        sp.add_argument("--config", action="append", default=[], type=Path, help="extra YAML file(s) merged on top")
        sp.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set train.epochs=3 meca.gamma=0.05")

    r = sub.add_parser("run", help="run a defense pipeline locally")
    r.add_argument("defense", help="none or meca")
    r.add_argument("--attack", help="badnets, blend, sig or wanet (default: the protocol's)")
    r.add_argument("--data", help="'sample', a folder of Parquet shards, a cifar-10-batches-py folder, "
                                  "an image folder or an .npz file")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for run folders (default: runs)")
    r.add_argument("--name", help="run folder name (default: <defense>-<attack>-<time>)")
    r.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db)")
    r.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    common(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("config", help="print the resolved configuration")
    c.add_argument("--attack")
    c.add_argument("--data")
    common(c)
    c.set_defaults(func=cmd_config)

    b = sub.add_parser("benchmark", help="run a protocol for defenses x attacks and write benchmarks/results")
    b.add_argument("--defenses", default="none,meca")
    b.add_argument("--attacks", default="badnets,blend,sig,wanet")
    b.add_argument("--data", required=True, help="the full CIFAR-10 set (the CPU protocol takes shard 0)")
    b.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    b.add_argument("--runs", type=Path, default=Path("runs/benchmark"))
    common(b)
    b.set_defaults(func=cmd_benchmark)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except UnpoisonError as e:
        print(f"unpoison: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
