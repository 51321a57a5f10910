"""The benchmark matrix: a protocol run for defenses x attacks, written to benchmarks/results/<protocol>-reference.json
(a list of records) with a Markdown table beside it. Attack `none` runs every defense on the clean data set: what
a defense costs when nothing is poisoned (the "no attack" row of the seeds' tables).

When a defense's reference model (its warm-up) is trained by the same stage function on the same inputs with the
same parameters as the no-defense training (MeCa's always; A-ABL's when the protocol gives its stage 1 no
overrides, as the CPU protocol does; a test checks that both give the same model), the `none` record of an attack
is read from that run instead of training the same model twice.
"""

from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path

from components import artifacts, metrics, tracking
from components.config import load_config, parse_overrides
from components.defenses import get
from components.errors import UnpoisonError
from pipelines import local

KEYS = ("defense", "attack", "protocol", "acc", "asr", "der", "detection_tpr", "detection_fpr", "wall_seconds",
        "machine")


def reference_stage(defense: str) -> str | None:
    """The stage that trains a defense's reference (no-defense) model, if it has one."""
    ev = get(defense).evaluation
    return ev.models[ev.reference].split("/")[0] if ev.reference is not None else None


def warmup_is_nodef(defense: str, cfg) -> bool:
    """Whether the defense's reference stage trains exactly the no-defense model: the same stage function on the
    same inputs with the same parameters (all but the progress bar's label)."""
    ref = reference_stage(defense)
    if ref is None:
        return False
    st, plain = get(defense).stage(ref), get("none").stages[0]

    def params(s):
        return {k: v for k, v in s.params(cfg).items() if k != "desc"}

    return st.fn is plain.fn and dict(st.inputs) == dict(plain.inputs) and params(st) == params(plain)


def machine() -> str:
    from components.engine import machine

    return machine()


def records_from_run(m: dict, run: str, include_none: bool, variant: dict | None = None) -> list[dict]:
    """The run's records; `variant`, {"variant": name, "settings": {...}}, marks a held-out setting's records."""
    base = {"protocol": m["protocol"], "attack": m["attack"]["name"], "model": m["model"], "machine": machine(),
            "date": date.today().isoformat(), "run": run, "train_samples": m["train_samples"],
            "test_samples": m["test_samples"], "poison_samples": m["poison_samples"], **(variant or {})}
    out = []
    if m["defense"] == "none" or include_none:
        ref = m["models"]["nodef"]
        stages = m["stages"]
        data_stage = "ingest" if m["attack"]["name"] == "none" else "poison"
        train_stage = stages["train" if m["defense"] == "none" else reference_stage(m["defense"])]
        out.append({**base, "defense": "none", "acc": ref["acc"], "asr": ref["asr"], "der": None,
                    "target_acc": ref["target_acc"], "pred_target_share": ref["pred_target_share"],
                    "per_class_acc": ref["per_class_acc"],
                    **({"ra": ref["ra"]} if "ra" in ref else {}),
                    "detection_tpr": None, "detection_fpr": None,
                    "wall_seconds": stages[data_stage]["seconds"] + train_stage["seconds"],
                    **({"source": f"warm-up stage of the {m['defense']} run"} if m["defense"] != "none" else {})})
    if m["defense"] != "none":
        relabelled = m["models"].get("relabelled", {})
        head = m["models"][m["defended"]]
        out.append({**base, "defense": m["defense"], "acc": m["acc"], "asr": m["asr"], "der": m["der"],
                    "target_acc": m["target_acc"], "nodef_target_acc": m.get("nodef_target_acc"),
                    "pred_target_share": m["pred_target_share"], "per_class_acc": head["per_class_acc"],
                    "flagged_share": m.get("flagged_share"),
                    "detection_tpr": m.get("detection_tpr"), "detection_fpr": m.get("detection_fpr"),
                    "detection_precision": m.get("detection_precision"), "wall_seconds": m["wall_seconds"],
                    "nodef_acc": m.get("nodef_acc"), "nodef_asr": m.get("nodef_asr"),
                    "acc_relabel": relabelled.get("acc"), "asr_relabel": relabelled.get("asr"),
                    "der_relabel": relabelled.get("der"), **robust_keys(m)})
    return out


def robust_keys(m: dict) -> dict:
    """RA of the defended and the no-defense model (A-ABL), and of the split whose pools are the detection the share
    kept as clean and its poison rate (A-ABL's gamma and rho_vul)."""
    out = {}
    if "ra" in m:
        out.update(ra=m["ra"], nodef_ra=m["models"]["nodef"].get("ra"))
    detection = get(m["defense"]).evaluation.detection
    if detection is not None and "clean" in m.get("splits", {}).get(detection, {}):
        kept = m["splits"][detection]["clean"]
        out.update(gamma=kept["share"], rho_vul=kept["poison_rate"], clean_target=kept.get("clean_target"))
    return out


def with_reference(records: list[dict]) -> list[dict]:
    """A defense whose run trains no no-defense model (ABL, LfD) gets its DER and no-defense figures from the `none`
    record of the same attack and protocol: the same poisoned set, trained by the same stage with the same seed."""
    plain = {(r["attack"], r["protocol"], r.get("variant")): r for r in records if r["defense"] == "none"}
    out = []
    for r in records:
        ref = plain.get((r["attack"], r["protocol"], r.get("variant")))
        if r["defense"] != "none" and ref is not None and ("reference" in r or r.get("nodef_acc") is None):
            r = {**r, "nodef_acc": ref["acc"], "nodef_asr": ref["asr"], "nodef_target_acc": ref.get("target_acc"),
                 "der": metrics.der(ref["acc"], ref["asr"], r["acc"], r["asr"]),
                 "reference": f"the none record of this file (run {ref['run']})"}
        out.append(r)
    return out


def merge(path: Path, new: list[dict]) -> list[dict]:
    """Replace records of the same (defense, attack, protocol, variant); keep the others."""
    old = json.loads(path.read_text()) if path.exists() else []

    def key(r):
        return r["defense"], r["attack"], r["protocol"], r.get("variant") or ""

    keys = {key(r) for r in new}
    kept = [r for r in old if key(r) not in keys]
    order = {"none": 0}
    records = sorted(kept + new, key=lambda r: (r["protocol"], r.get("variant") or "", r["attack"],
                                                order.get(r["defense"], 1), r["defense"]))
    return with_reference(records)


def table(records: list[dict]) -> str:
    def f(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = ["| attack | defense | ACC | ASR | DER | target ACC | RA | TPR | FPR | ACC relabel | ASR relabel | gamma | "
             "rho_vul | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        attack = f"{r['attack']} ({r['variant']})" if r.get("variant") else r["attack"]
        lines.append(f"| {attack} | {r['defense']} | {f(r['acc'])} | {f(r['asr'])} | {f(r['der'])} | "
                     f"{f(r.get('target_acc'))} | "
                     f"{f(r.get('ra'))} | {f(r['detection_tpr'])} | {f(r['detection_fpr'])} | "
                     f"{f(r.get('acc_relabel'))} | {f(r.get('asr_relabel'))} | {f(r.get('gamma'))} | "
                     f"{f(r.get('rho_vul'))} | {r['wall_seconds']:.0f} |")
    machines = sorted({r["machine"] for r in records})
    held_out = sorted({(r["variant"], json.dumps(r["settings"], sort_keys=True)) for r in records if r.get("variant")})
    notes = "".join(f"\n- {name}: held-out setting {settings}" for name, settings in held_out)
    return ("\n".join(lines) + "\n\nMachine: " + "; ".join(machines) + "\n"
            + (f"\nVariants (attack (name)), settings no default was tuned on:\n{notes}\n" if notes else ""))


def main(args) -> None:
    """The matrix: here, one run after another (`--engine local`), or the matrix pipeline under kfp.local or on a
    cluster (pipelines/matrix.py). Attacks x rates (`matrix.settings`): a setting other than the protocol's attack
    is a variant, its label the change (unless --variant names the held-out setting)."""
    from pipelines import matrix_results as matrix

    if not args.data and not getattr(args, "fetch", None):
        raise UnpoisonError("pass --data: the CIFAR-10 set to run the matrix on (sample, a folder, "
                            "s3://bucket/prefix/)")
    if getattr(args, "engine", "local") != "local" or getattr(args, "fetch", None):
        from pipelines.matrix import main as kfp_matrix

        return kfp_matrix(args)
    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()]
    for d in defenses:
        get(d)  # an unknown defense fails before any run, naming the registry
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.protocol}-reference.json"
    uri = tracking.default_uri(args.runs)
    variant = None
    if args.variant:
        if not args.set:
            raise UnpoisonError(f"--variant {args.variant} names a held-out setting: give it with --set KEY=VALUE ...")
        variant = {"variant": args.variant, "settings": parse_overrides(args.set)}
    overrides = parse_overrides(args.set, data=args.data)
    cells = matrix.settings(args.protocol, matrix.parse_attacks(args.attacks),
                            matrix.parse_rates(getattr(args, "rates", None)), overrides, args.config)
    done = []
    for cell in cells:
        tag = cell["variant"].replace("=", "").replace(",", "-")  # the run folder's name
        attack = cell["attack"]["name"] + (f"-{tag}" if tag and not args.variant else "")
        cfg = load_config(args.protocol, {**overrides, "attack.name": cell["attack"]["name"]}, args.config)
        cfg = cfg.model_copy(update={"attack": type(cfg.attack)(**cell["attack"])})
        if not args.variant:
            variant = {"variant": cell["variant"], "settings": cell["settings"]} if cell["variant"] else None
        sharer = next((d for d in defenses if d != "none" and warmup_is_nodef(d, cfg)), None) if "none" in defenses else None
        runs = [d for d in defenses if not (d == "none" and sharer)]
        for defense in runs:
            label = f"-{args.variant}" if args.variant else ""
            run_dir = local.run(defense, cfg, args.runs, mlflow_uri=uri,
                                name=f"{defense}-{attack}{label}-{args.protocol}-{date.today():%Y%m%d}-{os.getpid()}")
            m = artifacts.read_json(run_dir / "metrics.json")
            new = records_from_run(m, run_dir.name, include_none=defense == sharer, variant=variant)
            done += new
            records = merge(path, new)
            artifacts.write_json(records, path)
            with artifacts.atomic_path(path.with_suffix(".md")) as tmp:
                tmp.write_text(f"# {args.protocol} reference protocol\n\n" + table(records))
            for r in new:
                asr = "-" if r["asr"] is None else f"{r['asr']:.4f}"
                print(f"{r['attack']:<8} {args.variant or ''} {r['defense']:<6} ACC {r['acc']:.4f} ASR {asr} target ACC {r['target_acc']:.4f} "
                      f"wall {r['wall_seconds']:.0f} s", flush=True)
    records = merge(path, [])
    files = matrix.write_results(records, args.out, path.stem, title=f"{args.protocol} reference protocol")
    runs = {r["run"] for r in done}  # this command's cells, with the DER their file's `none` records give them
    matrix.log_mlflow([r for r in records if r["run"] in runs], list(files.values()),
                      f"matrix-{args.protocol}-{date.today():%Y%m%d}-{os.getpid()}", uri=uri)
    print(f"results: {path} (table {path.with_suffix('.md')}, plot {path.with_suffix('.png')})")
