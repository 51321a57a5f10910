"""One function per pipeline stage: local paths and typed params in, local files out, a summary dict back.

Nothing here knows about KFP, MLflow or S3: the local runner, the CLI and (later) the KFP components call these
same functions. A defense stage never reads the ground-truth columns of the sample table; only `evaluate` does.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from components import artifacts, engine, metrics, scores
from components.artifacts import ROUNDS_SCHEMA, SAMPLE_SCHEMA, SCORE_SCHEMA, SPLIT_SCHEMA
from components.attacks import attack_from_spec, build_attack
from components.config import AablParams, AttackParams, MecaParams, TrainParams
from components.data import ImageSet, load_images, save_npz
from components.defenses import aabl, meca
from components.errors import UnpoisonError
from components.models import build_model

MONITOR_SIZE = 2000  # test images used for the per-epoch ACC/ASR curves (the final figures use the whole test set)


def _tensors(ds: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ds.images), torch.from_numpy(ds.labels)


def load_dataset(path: Path) -> ImageSet:
    return load_images(Path(path))


def _model_meta(model_name: str, ds: ImageSet, params: TrainParams | None, history: list[dict], **extra) -> dict:
    return {"architecture": model_name, "classes": list(ds.classes), "normalization": "inside the model",
            "input": "float NCHW in [0, 1]", "dataset_hash": ds.content_hash,
            "train_params": params.model_dump() if params else None,
            "epochs": sum(1 for _ in history), **extra}


def _model_ref(folder: Path) -> str:
    return artifacts.read_json(Path(folder) / "model.json")["weights_sha256"][:16]


def recorded(stage: str, fn, out, *args, **kwargs) -> dict:
    """Run stage function `fn` into folder `out`, then write and return out/stage.json: the stage's result, its wall
    time and a unique execution id (so that a result served from a cache can be traced to the execution that made
    it)."""
    out = Path(out)
    t0 = time.perf_counter()
    result = fn(*args, out=out, **kwargs)
    seconds = time.perf_counter() - t0
    record = {"stage": stage, "result": result, "seconds": seconds, "execution_id": uuid.uuid4().hex,
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    artifacts.write_json(record, out / "stage.json")
    return record


# --- poison injection -------------------------------------------------------------------------------------------

def poison(data: str, attack: AttackParams, out: Path, *, train_limit: int | None = None,
           truth: Path | None = None) -> dict:
    """Poison the training split of `data`: out/dataset.npz, out/attack.json (the spec that triggers the test set),
    out/dataset.json (content hashes), and the sample table with ground truth in truth/samples.parquet (truth
    defaults to out; the KFP component keeps it in an artifact of its own that only evaluation reads)."""
    clean = load_images(data, "train")
    if train_limit is not None and train_limit < len(clean):
        clean = clean.subset(slice(0, train_limit))
    atk = build_attack(attack.name, target=attack.target, rate=attack.rate, seed=attack.seed,
                       num_classes=clean.num_classes, **attack.params)
    res = atk.poison(clean)
    out = Path(out)
    save_npz(res.dataset, out / "dataset.npz")
    artifacts.write_table({"sample_id": np.arange(len(clean)), "label": res.dataset.labels,
                           "true_label": res.true_label, "is_poison": res.is_poison, "is_cover": res.is_cover},
                          Path(truth or out) / "samples.parquet", SAMPLE_SCHEMA)
    artifacts.write_json(atk.spec(), out / "attack.json")
    artifacts.write_json({"source": str(data), "clean_hash": clean.content_hash,
                          "dataset_hash": res.dataset.content_hash}, out / "dataset.json")
    return {"samples": len(clean), "poison": int(res.is_poison.sum()), "cover": int(res.is_cover.sum())}


# --- training (warm-up, no defense, final, fine-tune) -----------------------------------------------------------

class Monitor:
    """Per-epoch ACC and ASR on the first MONITOR_SIZE test images, for the report's curves only."""

    def __init__(self, data: str, attack_json: Path, size: int = MONITOR_SIZE):
        test = load_images(data, "test")
        test = test.subset(slice(0, min(size, len(test))))
        atk = attack_from_spec(artifacts.read_json(attack_json))
        trig, self.target = atk.test_inputs(test)
        self.x, self.y, self.trig = torch.from_numpy(test.images), test.labels, torch.from_numpy(trig)

    def __call__(self, epoch: int, model, record: dict) -> None:
        record["test_acc"] = float((engine.predict(model, self.x).argmax(1).numpy() == self.y).mean())
        if len(self.trig):  # no trigger without an attack
            record["test_asr"] = float((engine.predict(model, self.trig).argmax(1).numpy() == self.target).mean())
        model.train()


def train(dataset: Path, out: Path, *, params: TrainParams, model_name: str, split: Path | None = None,
          init: Path | None = None, relabel: bool = False, monitor: Monitor | None = None, desc: str = "train",
          adversarial: AablParams | None = None) -> dict:
    """Train a model on the data set, or on its `clean` pool when `split` is given (with the split's relabels when
    `relabel`), from scratch or from the model in `init`; with `adversarial`, PGD adversarial training (A-ABL stage 3,
    Eq. 1) with its eps, step and steps. Writes out/model.safetensors, model.json, history.json."""
    ds = load_dataset(dataset)
    x, y = _tensors(ds)
    if split is not None:
        table = artifacts.read_table(split, SPLIT_SCHEMA)
        use = table["pool"] == "clean"
        if relabel:
            relabels = table["relabel"]
            use = use | (relabels >= 0)
            y = torch.where(torch.from_numpy(relabels >= 0), torch.from_numpy(relabels.astype(np.int64)), y)
        if not use.any():
            raise UnpoisonError(f"split '{split}' has no sample to train on; check the partition parameters")
        x, y = x[torch.from_numpy(use)], y[torch.from_numpy(use)]
    torch.manual_seed(params.seed)
    if init is not None:
        model, meta = artifacts.load_model(init)
        model_name = meta["architecture"]
        if meta["dataset_hash"] != ds.content_hash:
            raise UnpoisonError(f"model '{init}' was trained on another data set; fine-tune with a model of this run")
    else:
        model = build_model(model_name, ds.num_classes)
    perturb = aabl.pgd(adversarial, params.seed) if adversarial is not None else None
    history = engine.train(model, x, y, params, perturb=perturb, on_epoch=monitor, desc=desc)
    out = Path(out)
    artifacts.write_json(history, out / "history.json")
    init_ref = _model_ref(init) if init is not None else None
    adv = {"eps": adversarial.adv_eps, "step": adversarial.adv_step, "steps": adversarial.adv_steps} if adversarial else None
    artifacts.save_model(model, _model_meta(model_name, ds, params, history, trained_on=len(y), init=init_ref,
                                            adversarial=adv), out)
    return {"samples": len(y), "samples_per_second": len(y) * len(history) / max(1e-9, sum(h["seconds"] for h in history)),
            **({"train_acc": history[-1]["train_acc"], "train_loss": history[-1]["loss"]} if history else {})}


# --- perturbation scoring and partitioning ----------------------------------------------------------------------

def score_kl(dataset: Path, model: Path, out: Path, *, params: MecaParams, seed: int) -> dict:
    """MeCa Eq. 3 per sample with the given model: out/scores.parquet (column `kl`)."""
    ds = load_dataset(dataset)
    net, meta = artifacts.load_model(model)
    t0 = time.perf_counter()
    kl = scores.meca_kl(net, *_tensors(ds), eps=params.eps, patch=params.patch, seed=seed, batch_size=params.score_batch)
    seconds = time.perf_counter() - t0
    artifacts.write_table({"sample_id": np.arange(len(ds)), "kl": kl, "model_ref": [_model_ref(model)] * len(ds),
                           "epoch": np.full(len(ds), meta["epochs"])}, Path(out) / "scores.parquet", SCORE_SCHEMA)
    return {"samples": len(ds), "samples_per_second": len(ds) / seconds}


def _write_split(clean: np.ndarray, path: Path, relabel: np.ndarray | None = None) -> None:
    artifacts.write_table({"sample_id": np.arange(len(clean)), "pool": np.where(clean, "clean", "suspect").tolist(),
                           "relabel": relabel if relabel is not None else np.full(len(clean), -1)}, path, SPLIT_SCHEMA)


def partition_meca(score_table: Path, out: Path, *, params: MecaParams) -> dict:
    """MeCa round 0: the (1 - p) share with the highest KL is D_c, the clean pool to unlearn; the rest is suspect."""
    kl = artifacts.read_table(score_table, {**SCORE_SCHEMA, "kl": pa.float64()})["kl"]
    kept = meca.partition(kl, 0, params.gamma)
    _write_split(~kept, Path(out) / "split.parquet")
    return {"samples": len(kl), "clean": int((~kept).sum()), "suspect": int(kept.sum())}


def score_adv_sce(dataset: Path, model: Path, out: Path, *, params: AablParams) -> dict:
    """A-ABL stage 2 (section 5.2): out/scores.parquet with `adv_sce` (SCE of the iFGSM adversarial example) and
    `sce` (the natural SCE, for the report's natural vs adversarial histograms, Figs. 4 and 9)."""
    ds = load_dataset(dataset)
    net, meta = artifacts.load_model(model)
    t0 = time.perf_counter()
    natural, adversarial = aabl.score(net, *_tensors(ds), params)
    seconds = time.perf_counter() - t0
    artifacts.write_table({"sample_id": np.arange(len(ds)), "adv_sce": adversarial, "sce": natural,
                           "model_ref": [_model_ref(model)] * len(ds), "epoch": np.full(len(ds), meta["epochs"])},
                          Path(out) / "scores.parquet", SCORE_SCHEMA)
    return {"samples": len(ds), "samples_per_second": len(ds) / seconds}


def partition_otsu(score_table: Path, out: Path, *, params: AablParams) -> dict:
    """A-ABL section 5.2: Otsu's threshold on `adv_sce`; the vulnerable part above it is the clean pool (D_vul), the
    robust part is suspect (isolated). Returns the threshold and gamma = |D_vul| / |D| (Table 1)."""
    adv = artifacts.read_table(score_table, {**SCORE_SCHEMA, "adv_sce": pa.float64()})["adv_sce"]
    vulnerable, threshold = aabl.partition(adv, params)
    _write_split(vulnerable, Path(out) / "split.parquet")
    return {"samples": len(adv), "clean": int(vulnerable.sum()), "suspect": int((~vulnerable).sum()),
            "threshold": threshold, "gamma": float(vulnerable.mean())}


# --- backdoor enhancement and identification --------------------------------------------------------------------

def enhance_meca(dataset: Path, model: Path, split: Path, out: Path, *, params: MecaParams, base: TrainParams,
                 seed: int) -> dict:
    """MeCa Algorithm 2, lines 2-10: out/model (the enhanced model), out/rounds.parquet (per round and sample: KL,
    kept, fitted), out/rounds.json (what the defender observes per round)."""
    ds = load_dataset(dataset)
    x, y = _tensors(ds)
    net, meta = artifacts.load_model(model)
    kept0 = artifacts.read_table(split, SPLIT_SCHEMA)["pool"] == "suspect"
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    rounds = meca.enhance(net, x, y, kept0, params, base, seed=seed)
    seconds = time.perf_counter() - t0
    n = len(ds)
    cols = {"sample_id": np.tile(np.arange(n), len(rounds)),
            "round": np.repeat([r["round"] for r in rounds], n),
            "kl": np.concatenate([r["kl"] if r["kl"] is not None else np.full(n, np.nan) for r in rounds]),
            "kept": np.concatenate([r["kept"] for r in rounds]),
            "fitted": np.concatenate([r["fitted"] for r in rounds])}
    out = Path(out)
    artifacts.write_table(cols, out / "rounds.parquet", ROUNDS_SCHEMA)
    observed = [{"round": r["round"], "keep_share": r["keep_share"], "fit_share": r["fit_share"]} for r in rounds]
    artifacts.write_json(observed, out / "rounds.json")
    artifacts.save_model(net, {**meta, "enhanced": params.model_dump(), "epochs": meta["epochs"] + params.rounds}, out / "model")
    return {"samples": n, "samples_per_second": n * params.rounds / seconds,
            **{f"fit_share_r{r['round']}": r["fit_share"] for r in observed}}


def identify_clean(dataset: Path, model: Path, out: Path) -> dict:
    """MeCa Algorithm 2, line 12: clean = misclassified by the enhanced model. out/split.parquet and
    out/scores.parquet (`enhanced_loss`: the enhanced model's cross-entropy; high = clean-like)."""
    ds = load_dataset(dataset)
    x, y = _tensors(ds)
    net, meta = artifacts.load_model(model)
    logits = engine.predict(net, x)
    clean = (logits.argmax(1) != y).numpy()
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
    out = Path(out)
    artifacts.write_table({"sample_id": np.arange(len(ds)), "enhanced_loss": loss,
                           "model_ref": [_model_ref(model)] * len(ds), "epoch": np.full(len(ds), meta["epochs"])},
                          out / "scores.parquet", SCORE_SCHEMA)
    _write_split(clean, out / "split.parquet")
    return {"samples": len(ds), "clean": int(clean.sum()), "suspect": int((~clean).sum())}


def relabel_finetune(dataset: Path, split: Path, model: Path, out: Path, *, params: TrainParams,
                     monitor: Monitor | None = None) -> dict:
    """MeCa section 4.2.4, Eq. 12: relabel the suspect pool with the clean model, then fine-tune the clean model
    on the clean pool plus the relabelled samples. out/split.parquet (with `relabel`) and out/model."""
    ds = load_dataset(dataset)
    net, _ = artifacts.load_model(model)
    table = artifacts.read_table(split, SPLIT_SCHEMA)
    suspect = table["pool"] == "suspect"
    predicted = meca.relabel(net, torch.from_numpy(ds.images))
    relabels = np.where(suspect, predicted, -1)
    out = Path(out)
    _write_split(~suspect, out / "split.parquet", relabels)
    result = train(dataset, out / "model", params=params, model_name="from init", split=out / "split.parquet", init=model,
                   relabel=True, monitor=monitor, desc="fine-tune")
    return {**result, "relabelled": int(suspect.sum()),
            "relabel_changed": int((suspect & (predicted != ds.labels)).sum())}


# --- evaluation -------------------------------------------------------------------------------------------------

def evaluate(out: Path, *, data: str, attack_json: Path, samples: Path, models: dict[str, Path], defended: str,
             reference: str | None = None, score_tables: tuple[Path, ...] = (), splits: dict[str, Path] | None = None,
             detection_split: str | None = None, rounds: Path | None = None, info: dict | None = None,
             robust: tuple[str, ...] = (), pgd: AablParams | None = None) -> dict:
    """ACC/ASR of every model on the whole test set, DER of each against `reference` (the no-defense model),
    detection quality of every score and split. Writes out/metrics.json, out/report.md and out/plots/*.png.
    The headline `acc`, `asr`, `der` are those of the model named `defended`, `detection_*` of `detection_split`;
    the models named in `robust` also get RA, robust accuracy under `pgd`'s ra_eps, ra_step, ra_steps."""
    from components import evaluation, report

    out = Path(out)
    test = load_images(data, "test")
    atk = attack_from_spec(artifacts.read_json(attack_json))
    trig, target = atk.test_inputs(test)
    table = artifacts.read_table(samples, SAMPLE_SCHEMA)
    x, trig_x = torch.from_numpy(test.images), torch.from_numpy(trig)
    m = {**(info or {}), "attack": atk.spec(), "classes": list(test.classes), "train_samples": len(table["sample_id"]),
         "poison_samples": int(table["is_poison"].sum()), "test_samples": len(test),
         "models": {name: evaluation.model_metrics(d, x, test.labels, trig_x, target, atk.target) for name, d in models.items()}}
    p = pgd or AablParams()
    for name in robust:
        m["models"][name]["ra"] = evaluation.robust_accuracy(models[name], x, test.labels, eps=p.ra_eps,
                                                             step=p.ra_step, steps=p.ra_steps)
    if reference is not None:
        ref = m["models"][reference]
        m["nodef_acc"], m["nodef_asr"], m["nodef_target_acc"] = ref["acc"], ref["asr"], ref["target_acc"]
        for name, r in m["models"].items():
            if name != reference:
                r["der"] = metrics.der(ref["acc"], ref["asr"], r["acc"], r["asr"])
    m["scores"] = {}
    plots = []
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for path in score_tables:
        m["scores"].update(evaluation.score_metrics(path, table["is_poison"]))
        cols = artifacts.read_table(path, SCORE_SCHEMA)
        for col in cols:
            if col not in SCORE_SCHEMA:
                report.score_histogram(cols[col], table["is_poison"][cols["sample_id"]], col, out / "plots" / f"{col}.png")
                plots.append(f"plots/{col}.png")
    m["splits"] = {name: evaluation.split_metrics(p, table, atk.target) for name, p in (splits or {}).items()}
    if rounds is not None:
        m["rounds"] = evaluation.round_metrics(rounds, table)
    histories = {name: artifacts.read_json(Path(d) / "history.json") for name, d in models.items()
                 if (Path(d) / "history.json").exists()}
    if histories:
        report.curves(histories, out / "plots" / "curves.png")
        plots.append("plots/curves.png")
    head = m["models"][defended]
    m["defended"] = defended
    m.update({"acc": head["acc"], "asr": head["asr"], "der": head.get("der"), "target_acc": head["target_acc"],
              "pred_target_share": head["pred_target_share"], **({"ra": head["ra"]} if "ra" in head else {})})
    if detection_split is not None:
        last = m["splits"][detection_split]["detection"]
        m.update({"detection_tpr": last["tpr"], "detection_fpr": last["fpr"], "detection_precision": last["precision"],
                  "flagged_share": 1 - m["splits"][detection_split].get("clean", {"share": 0.0})["share"]})
    artifacts.write_json(m, out / "metrics.json")
    with artifacts.atomic_path(out / "report.md") as tmp:
        tmp.write_text(report.markdown(m, plots))
    return {"acc": m["acc"], "target_acc": m["target_acc"], **({"asr": m["asr"]} if m["asr"] is not None else {}),
            **({"der": m["der"]} if m["der"] is not None else {}),
            **({"ra": m["ra"]} if "ra" in m else {})}


def evaluate_defense(out: Path, *, data: str, defense: str, dirs: dict[str, Path], info: dict | None = None,
                     pgd: AablParams | None = None) -> dict:
    """`evaluate` wired to a defense's stage output folders (`dirs`: stage -> folder; `truth` defaults to the poison
    stage's folder). The one place that knows which folder holds which model, score and split."""
    d = {k: Path(v) for k, v in dirs.items()}
    common = {"data": data, "attack_json": d["poison"] / "attack.json",
              "samples": d.get("truth", d["poison"]) / "samples.parquet", "info": {**(info or {}), "defense": defense}}
    if defense == "none":
        return evaluate(out, models={"nodef": d["train"]}, defended="nodef", **common)
    if defense == "meca":
        return evaluate(out, models={"nodef": d["warmup"], "enhanced": d["enhance"] / "model", "clean": d["final_train"],
                                     "relabelled": d["relabel_finetune"] / "model"},
                        defended="clean", reference="nodef",
                        score_tables=(d["score"] / "scores.parquet", d["identify"] / "scores.parquet"),
                        splits={"round0": d["partition"] / "split.parquet", "identify": d["identify"] / "split.parquet",
                                "relabel": d["relabel_finetune"] / "split.parquet"},
                        detection_split="identify", rounds=d["enhance"] / "rounds.parquet", **common)
    if defense == "a-abl":
        return evaluate(out, models={"nodef": d["warmup"], "clean": d["final_train"]}, defended="clean",
                        reference="nodef", score_tables=(d["score"] / "scores.parquet",),
                        splits={"otsu": d["partition"] / "split.parquet"}, detection_split="otsu",
                        robust=("nodef", "clean"), pgd=pgd, **common)
    if defense == "adv-train":
        return evaluate(out, models={"nodef": d["warmup"], "adv_train": d["final_train"]}, defended="adv_train",
                        reference="nodef", robust=("nodef", "adv_train"), pgd=pgd, **common)
    raise UnpoisonError(f"no evaluation layout for defense '{defense}'; add one to stages.evaluate_defense")
