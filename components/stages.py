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

from components import artifacts, checkpoint, engine, metrics, scores
from components.artifacts import SAMPLE_SCHEMA, SCORE_SCHEMA, SOURCES_SCHEMA, SPLIT_SCHEMA
from components.attacks import attack_from_spec, build_attack, from_params
from components.data import ImageSet, has_test_split, load_ground_truth, load_images, save_npz
from components.engine import LossFn, Perturb
from components.errors import UnpoisonError
from components.models import build_model
from components.params import AttackParams, TrainParams


TOP_SUSPECTS = 64  # the most suspicious samples whose labels point at a likely target (and fill the grid's left panel)
MONITOR_SIZE = 2000  # test images used for the per-epoch ACC/ASR curves (the final figures use the whole test set)
MONITOR_MIN = 200  # ... and the fewest, for a small training set (`monitor_size`)
POISON_EXAMPLES = 8  # poisoned training images the report shows beside their clean originals


def tensors(ds: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ds.images), torch.from_numpy(ds.labels)


def load_dataset(path: Path) -> ImageSet:
    return load_images(Path(path))


def dataset_size(path: Path) -> int:
    """How many samples a stage's dataset.npz holds, read from its labels alone (no image is decompressed)."""
    with np.load(Path(path)) as npz:
        return len(npz["labels"])


def _model_meta(model_name: str, ds: ImageSet, params: TrainParams | None, history: list[dict], **extra) -> dict:
    return {"architecture": model_name, "classes": list(ds.classes), "normalization": "inside the model",
            "input": "float NCHW in [0, 1]", "dataset_hash": ds.content_hash,
            "train_params": params.model_dump() if params else None,
            "epochs": sum(1 for _ in history), **extra}


def model_ref(folder: Path) -> str:
    return artifacts.read_json(Path(folder) / "model.json")["weights_sha256"][:16]


def write_scores(path: Path, columns: dict[str, np.ndarray], model: Path, meta: dict) -> None:
    """A score table: `sample_id`, the score columns, and the model that scored (`model_ref`, `epoch`)."""
    n = len(next(iter(columns.values())))
    artifacts.write_table({"sample_id": np.arange(n), **columns, "model_ref": [model_ref(model)] * n,
                           "epoch": np.full(n, meta["epochs"])}, path, SCORE_SCHEMA)


def loss_scores(dataset: Path, model: Path, out: Path, *, column: str, batch_size: int) -> dict:
    """Every sample's cross-entropy under `model` (eval mode, no augmentation) as score column `column` of
    out/scores.parquet: ABL's isolation loss, LfD's teacher loss."""
    ds = load_dataset(dataset)
    net, meta = artifacts.load_model(model)
    t0 = time.perf_counter()
    loss = scores.sample_loss(net, *tensors(ds), batch_size=batch_size)
    seconds = time.perf_counter() - t0
    write_scores(Path(out) / "scores.parquet", {column: loss}, model, meta)
    return {"samples": len(ds), "samples_per_second": len(ds) / seconds}


def write_split(clean: np.ndarray, path: Path, relabel: np.ndarray | None = None,
                weight: np.ndarray | None = None) -> None:
    """A split table: `clean` True -> pool clean, False -> suspect; `relabel` -1 where a sample keeps its label;
    `weight`, if given, each sample's weight when the clean pool trains (column `weight`)."""
    columns = {"sample_id": np.arange(len(clean)), "pool": np.where(clean, "clean", "suspect").tolist(),
               "relabel": relabel if relabel is not None else np.full(len(clean), -1)}
    schema = SPLIT_SCHEMA if weight is None else {**SPLIT_SCHEMA, "weight": pa.float64()}
    artifacts.write_table({**columns, **({"weight": weight} if weight is not None else {})}, path, schema)


def recorded(stage: str, fn, out, *args, **kwargs) -> dict:
    """Run stage function `fn` into folder `out`, then write and return out/stage.json: the stage's result, its wall
    time, the machine it ran on and a unique execution id (so that a result served from a cache can be traced to the
    execution that made it). Then remove the checkpoints of its trainings (out/checkpoints/, components/checkpoint.py):
    the outputs are complete. (A stage resumed from checkpoints records the wall time of its last attempt only.)"""
    out = Path(out)
    t0 = time.perf_counter()
    result = fn(*args, out=out, **kwargs)
    seconds = time.perf_counter() - t0
    record = {"stage": stage, "result": result, "seconds": seconds, "execution_id": uuid.uuid4().hex,
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": engine.machine()}  # where it ran: a KFP run's stages run on nodes of their own
    artifacts.write_json(record, out / "stage.json")
    checkpoint.discard(out)
    return record


# --- the data stage: poison injection, or the data set as delivered ----------------------------------------------

def _clean_train(data: str, train_limit: int | None) -> ImageSet:
    clean = load_images(data, "train")
    return clean.subset(slice(0, train_limit)) if train_limit is not None and train_limit < len(clean) else clean


def _write_data(ds: ImageSet, out: Path, spec: dict, info: dict, sources) -> None:
    save_npz(ds, out / "dataset.npz")
    artifacts.write_json(spec, out / "attack.json")
    artifacts.write_json(info, out / "dataset.json")
    artifacts.write_table({"sample_id": np.arange(len(ds)), "source": list(sources or [""] * len(ds)),
                           "label": ds.labels}, out / "sources.parquet", SOURCES_SCHEMA)


def poison(data: str, attack: AttackParams, out: Path, *, train_limit: int | None = None,
           truth: Path | None = None) -> dict:
    """Poison the training split of `data`: out/dataset.npz, out/attack.json (the spec that triggers the test set),
    out/dataset.json (content hashes), out/sources.parquet (where each sample came from), and the sample table with
    ground truth in truth/samples.parquet (truth defaults to out; the KFP component keeps it in an artifact of its
    own that only evaluation reads)."""
    clean = _clean_train(data, train_limit)
    atk = from_params(attack, clean.num_classes)
    res = atk.poison(clean)
    out = Path(out)
    _write_data(res.dataset, out, atk.spec(), {"source": str(data), "clean_hash": clean.content_hash,
                                               "dataset_hash": res.dataset.content_hash}, clean.sources)
    artifacts.write_table({"sample_id": np.arange(len(clean)), "label": res.dataset.labels,
                           "true_label": res.true_label, "is_poison": res.is_poison, "is_cover": res.is_cover},
                          Path(truth or out) / "samples.parquet", SAMPLE_SCHEMA)
    return {"samples": len(clean), "poison": int(res.is_poison.sum()), "cover": int(res.is_cover.sum())}


def ingest(data: str, attack: AttackParams, out: Path, *, train_limit: int | None = None,
           truth: Path | None = None) -> dict:
    """The data set as delivered (`--attack none`): nothing injected, labels as they are. Writes what `poison`
    writes; the sample table with ground truth only when the source carries it (an `is_poison` column in Parquet,
    or the samples.parquet of an earlier unpoison injection beside its dataset.npz). `attack.target` names the class
    whose accuracy is reported as target-class ACC."""
    ds = _clean_train(data, train_limit)
    spec = build_attack("none", target=attack.target, rate=attack.rate, seed=attack.seed,
                        num_classes=ds.num_classes).spec()
    out = Path(out)
    _write_data(ds, out, spec, {"source": str(data), "dataset_hash": ds.content_hash,
                                "test_split": has_test_split(data)}, ds.sources)
    gt = load_ground_truth(data, "train")
    if gt is not None:
        n = len(ds)
        artifacts.write_table({"sample_id": np.arange(n), "label": ds.labels, "true_label": gt["true_label"][:n],
                               "is_poison": gt["is_poison"][:n], "is_cover": np.zeros(n, bool)},
                              Path(truth or out) / "samples.parquet", SAMPLE_SCHEMA)
    return {"samples": len(ds), "ground_truth": gt is not None,
            **({"poison": int(gt["is_poison"][:len(ds)].sum())} if gt is not None else {})}


# --- training (warm-up, no defense, final, fine-tune) -----------------------------------------------------------

def monitor_size(train_samples: int) -> int:
    """How many test images the per-epoch curves use: a fifth of the training set's size, between MONITOR_MIN and
    MONITOR_SIZE. Their clean and triggered forward passes then cost at most about 2/5 of a forward pass per training
    sample, an eighth of an epoch's forward-backward passes: the CPU protocol's 10,000 images and the demo's 5,000 keep
    2,000 and 1,000 (the whole sample's test split), while a 600-image run no longer spends a third of its training
    time on its curves."""
    return min(MONITOR_SIZE, max(MONITOR_MIN, train_samples // 5))


class Monitor:
    """Per-epoch ACC and ASR on the first `size` test images (`monitor_size`), for the report's curves only."""

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
          init: Path | None = None, relabel: bool = False, weighted: bool = False, monitor: Monitor | None = None,
          desc: str = "train", perturb: Perturb | None = None, loss_fn: LossFn = engine.cross_entropy,
          meta: dict | None = None, checkpoints: Path | None = None) -> dict:
    """Train a model on the data set, or on its `clean` pool when `split` is given (with the split's relabels when
    `relabel`, each sample weighted by the split's `weight` column if it has one; on every sample, each weighted by
    that column, when `weighted`), from scratch or from
    the model in `init`; with `perturb`, on perturbed batches (adversarial training); `loss_fn` is the per-sample
    loss; `meta` joins model.json. Writes out/model.safetensors, model.json, history.json. The training checkpoints
    to `checkpoints` (the stage's output folder; default `out`)/checkpoints/<desc>.pt and resumes from there."""
    ds = load_dataset(dataset)
    x, y = tensors(ds)
    weights = None
    if split is not None and weighted:
        table = artifacts.read_table(split, {**SPLIT_SCHEMA, "weight": pa.float64()})
        if not np.array_equal(table["sample_id"], np.arange(len(y))):
            raise UnpoisonError(f"split '{split}' does not weight every sample of '{dataset}' in order; "
                                f"rerun the stage that wrote it on this data set")
        weights = torch.from_numpy(table["weight"].astype(np.float32))
    elif split is not None:
        table = artifacts.read_table(split, SPLIT_SCHEMA)
        use = table["pool"] == "clean"
        if relabel:
            relabels = table["relabel"]
            use = use | (relabels >= 0)
            y = torch.where(torch.from_numpy(relabels >= 0), torch.from_numpy(relabels.astype(np.int64)), y)
        if not use.any():
            raise UnpoisonError(f"split '{split}' has no sample to train on; check the partition parameters")
        x, y = x[torch.from_numpy(use)], y[torch.from_numpy(use)]
        if "weight" in table:  # a pool whose samples weigh differently (MeCa's per-label identification)
            weights = torch.from_numpy(table["weight"][use].astype(np.float32))
    torch.manual_seed(params.seed)
    if init is not None:
        model, init_meta = artifacts.load_model(init)
        model_name = init_meta["architecture"]
        if init_meta["dataset_hash"] != ds.content_hash:
            raise UnpoisonError(f"model '{init}' was trained on another data set; fine-tune with a model of this run")
    else:
        model = build_model(model_name, ds.num_classes)
    history = engine.train(model, x, y, params, loss_fn=loss_fn, weights=weights, perturb=perturb, on_epoch=monitor,
                           desc=desc, checkpoint=checkpoint.path(checkpoints or out, desc))
    out = Path(out)
    artifacts.write_json(history, out / "history.json")
    init_ref = model_ref(init) if init is not None else None
    artifacts.save_model(model, _model_meta(model_name, ds, params, history, trained_on=len(y), init=init_ref,
                                            **{"adversarial": None, **(meta or {})}), out)
    return {"samples": len(y), "samples_per_second": len(y) * len(history) / max(1e-9, sum(h["seconds"] for h in history)),
            **({"train_acc": history[-1]["train_acc"], "train_loss": history[-1]["loss"]} if history else {})}


# --- evaluation -------------------------------------------------------------------------------------------------

def curve_starts(models: dict[str, str], at) -> dict[str, int]:
    """For each model that continues another model of the run (model.json's `init`), the epochs trained before its
    first: the epochs of the chain of models it continues."""
    meta = {name: artifacts.read_json(at(ref) / "model.json") for name, ref in models.items()}
    by_ref = {m["weights_sha256"][:16]: name for name, m in meta.items()}
    trained = {name: len(artifacts.read_json(at(ref) / "history.json")) if (at(ref) / "history.json").exists() else 0
               for name, ref in models.items()}

    def start(name: str, seen: frozenset = frozenset()) -> int:
        parent = by_ref.get(meta[name].get("init") or "")
        if parent is None or parent in seen:
            return 0
        return start(parent, seen | {name}) + trained[parent]

    return {name: start(name) for name in models}


def poison_examples(data: str, data_dir: Path, train_set: ImageSet, table: dict, path: Path) -> bool:
    """The first POISON_EXAMPLES poisoned training samples beside their clean originals (report.poison_examples), when
    the clean training split of `data` is the one the data stage poisoned (its content hash is the recorded
    clean_hash); False, and no picture, when there is nothing to show."""
    from components import report

    idx = np.flatnonzero(table["is_poison"])[:POISON_EXAMPLES]
    info = Path(data_dir) / "dataset.json"
    clean_hash = artifacts.read_json(info).get("clean_hash") if info.exists() else None
    if len(idx) == 0 or clean_hash is None:  # nothing poisoned, or a data set as delivered: no clean originals
        return False
    clean = _clean_train(data, len(train_set))
    if len(clean) != len(train_set) or clean.content_hash != clean_hash:
        return False
    report.poison_examples(clean.images[idx], train_set.images[idx], table["true_label"][idx], train_set.labels[idx],
                           train_set.classes, path)
    return True


def evaluate(out: Path, *, data: str, dirs: dict[str, Path], spec: dict, ra: dict | None = None,
             info: dict | None = None) -> dict:
    """Evaluation of a defense run as its declaration's `spec` (components.defenses.base.Evaluation) names it:
    `dirs` maps each stage to its output folder, `data` and `truth` the data stage and the ground truth.

    ACC, ASR and target-class figures of every model on the whole test set (when the data has one), DER against
    the reference, RA of the robust models under PGD `ra`; with ground truth, detection quality of every score and
    split; the suspects (suspects.parquet, per-class shares, the grid of the most and least suspicious images).
    Writes out/metrics.json, out/report.md, out/report.html (standalone, the plots embedded), out/plots/*.png.
    The only stage that reads the ground truth."""
    from components import evaluation, report, suspects

    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)

    def at(ref: str) -> Path:
        head, _, rest = ref.partition("/")
        return Path(dirs[head]) / rest if rest else Path(dirs[head])

    atk = attack_from_spec(artifacts.read_json(Path(dirs["data"]) / "attack.json"))
    train_set = load_dataset(Path(dirs["data"]) / "dataset.npz")
    truth_path = Path(dirs["truth"]) / "samples.parquet"
    table = artifacts.read_table(truth_path, SAMPLE_SCHEMA) if truth_path.exists() else None
    m = {**(info or {}), "attack": atk.spec(), "classes": list(train_set.classes), "train_samples": len(train_set),
         "poison_samples": int(table["is_poison"].sum()) if table is not None else None,
         "ground_truth": table is not None, "defended": spec["defended"], "models": {}, "scores": {}, "splits": {}}
    plots = []
    if table is not None and poison_examples(data, Path(dirs["data"]), train_set, table, out / "plots" / "poison_examples.png"):
        plots.append("plots/poison_examples.png")
    if has_test_split(data):
        test = load_images(data, "test")
        trig, target = atk.test_inputs(test)
        x, trig_x = torch.from_numpy(test.images), torch.from_numpy(trig)
        m["test_samples"] = len(test)
        m["models"] = {name: evaluation.model_metrics(at(ref), x, test.labels, trig_x, target, atk.target)
                       for name, ref in spec["models"].items()}
        for name in spec["robust"]:
            m["models"][name]["ra"] = evaluation.robust_accuracy(at(spec["models"][name]), x, test.labels, **ra)
        if spec["reference"] is not None:
            ref = m["models"][spec["reference"]]
            m.update(nodef_acc=ref["acc"], nodef_asr=ref["asr"], nodef_target_acc=ref["target_acc"])
            for name, r in m["models"].items():
                if name != spec["reference"]:
                    r["der"] = metrics.der(ref["acc"], ref["asr"], r["acc"], r["asr"])
        head = m["models"][spec["defended"]]
        m.update({"acc": head["acc"], "asr": head["asr"], "der": head.get("der"), "target_acc": head["target_acc"],
                  "pred_target_share": head["pred_target_share"], **({"ra": head["ra"]} if "ra" in head else {})})
        histories = {name: artifacts.read_json(at(ref) / "history.json") for name, ref in spec["models"].items()
                     if (at(ref) / "history.json").exists()}
        if histories:
            report.curves(histories, out / "plots" / "curves.png", curve_starts(spec["models"], at))
            plots.append("plots/curves.png")
    else:  # a folder's training images are no test set: say so instead of measuring on them
        m.update(test_samples=0, acc=None, asr=None, der=None, target_acc=None,
                 note=f"'{data}' has no test split: no test accuracy measured; give it a test/ folder to measure one")
    score_cols = {}
    for ref in spec["scores"]:
        cols = artifacts.read_table(at(ref), SCORE_SCHEMA)
        score_cols.update({c: cols[c] for c in cols if c not in SCORE_SCHEMA})
        if table is not None:
            m["scores"].update(evaluation.score_metrics(at(ref), table["is_poison"], spec["directions"]))
    for col, values in score_cols.items():
        report.score_histogram(values, table["is_poison"] if table is not None else None, col,
                               out / "plots" / f"{col}.png")
        plots.append(f"plots/{col}.png")
    for ref in spec["splits"].values():  # per-sample values a split carries, such as LfD's weights
        cols = artifacts.read_table(at(ref), SPLIT_SCHEMA)
        for col in (c for c in cols if c not in SPLIT_SCHEMA):
            report.score_histogram(cols[col], table["is_poison"] if table is not None else None, col,
                                   out / "plots" / f"{col}.png")
            plots.append(f"plots/{col}.png")
    if table is not None:
        m["splits"] = {name: evaluation.split_metrics(at(ref), table, atk.target)
                       for name, ref in spec["splits"].items()}
        if spec["rounds"] is not None:
            m["rounds"] = evaluation.round_metrics(at(spec["rounds"]), table, atk.target)
    if spec.get("epoch_pools"):  # a training that re-partitions every epoch (BSD): its pools, epoch by epoch
        m["epoch_pools"] = evaluation.epoch_pool_metrics(at(spec["epoch_pools"]), table, atk.target)
    if spec.get("target_estimate"):  # the defense's estimate of the attack target against the real one
        est = artifacts.read_json(at(spec["target_estimate"]))
        poison_labels = table["label"][table["is_poison"]] if table is not None else np.zeros(0, np.int64)
        real = (atk.target if m["attack"]["name"] != "none" else
                int(np.bincount(poison_labels).argmax()) if len(poison_labels) else None)
        m["target_estimate"] = {"estimate": est.get("estimate", est["target"]), "used": est["target"], "real": real,
                                "correct": None if real is None else est.get("estimate", est["target"]) == real}
    if spec["detection"] is not None:
        pool = artifacts.read_table(at(spec["splits"][spec["detection"]]), SPLIT_SCHEMA)["pool"]
        flagged = pool != "clean"
        m["flagged_share"] = float(flagged.mean())
        m["class_shares"] = suspects.class_shares(train_set.labels, flagged, train_set.classes)
        if table is not None:
            d = m["splits"][spec["detection"]]["detection"]
            m.update(detection_tpr=d["tpr"], detection_fpr=d["fpr"], detection_precision=d["precision"])
        if spec["suspicion"] is not None:
            rank_by, direction = spec["suspicion"], spec["directions"][spec["suspicion"]]
            src = artifacts.read_table(Path(dirs["data"]) / "sources.parquet", SOURCES_SCHEMA)["source"]
            suspects.write_suspects(out / "suspects.parquet", sample_id=np.arange(len(train_set)), source=src,
                                    label=train_set.labels, pool=pool, scores=score_cols, rank_by=rank_by,
                                    direction=direction, classes=train_set.classes)
            order = suspects.suspicion_order(score_cols[rank_by], direction)
            top = np.zeros(len(order), bool)
            top[order[:TOP_SUSPECTS]] = True  # the grid's left panel: a defense may flag far more than the poison
            m["top_suspects"] = {"n": int(top.sum()), **suspects.class_shares(train_set.labels, top, train_set.classes)}
            suspects.suspect_grid(train_set.images, order, out / "plots" / "suspects.png", n=TOP_SUSPECTS,
                                  labels=train_set.labels,
                                  classes=train_set.classes,
                                  title=f"{(info or {}).get('defense', '')}: ranked by {rank_by} "
                                        f"(pool: {spec['detection']})")
            plots.insert(0, "plots/suspects.png")
    artifacts.write_json(m, out / "metrics.json")
    text = report.markdown(m, plots)
    with artifacts.atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    with artifacts.atomic_path(out / "report.html") as tmp:
        tmp.write_text(report.html(text, out))
    return {k: m[k] for k in ("acc", "target_acc", "asr", "der", "ra", "flagged_share") if m.get(k) is not None}
