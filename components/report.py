"""The run report: metrics.json rendered as Markdown, with PNG plots (score histograms as MeCa's Fig. 4, and
ACC/ASR per epoch)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import markdown as md
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def score_histogram(values: np.ndarray, is_poison: np.ndarray | None, name: str, path: Path) -> None:
    """The score's distribution, clean and poisoned apart when ground truth is known (MeCa's Fig. 4). Samples the
    score leaves NaN (it scores part of the set, as BSD's OSS distance) are left out."""
    scored = ~np.isnan(np.asarray(values, dtype=np.float64))
    values, is_poison = values[scored], (is_poison[scored] if is_poison is not None else None)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    finite = values[np.isfinite(values)]
    bins = np.histogram_bin_edges(finite, bins=50) if len(finite) else 10
    if is_poison is None:
        ax.hist(values, bins=bins, alpha=0.8, label="all samples")
        ax.set_ylabel("samples")
    else:
        for part, label in ((~is_poison, "clean"), (is_poison, "poisoned")):
            if part.any():
                ax.hist(values[part], bins=bins, alpha=0.6, label=label, density=True)
        ax.set_ylabel("density")
    if len(finite) and np.histogram(finite, bins=bins)[0].max() > len(finite) / 2:
        ax.set_yscale("log")  # most of the mass in one bin (LfD's weights, a saturated loss): show the tails
    ax.set_xlabel(name)
    ax.set_title(f"{name} per training sample")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves(histories: dict[str, list[dict]], path: Path, starts: dict[str, int] | None = None) -> None:
    """ACC and ASR per epoch of every model; a model that continues another (ABL's fine-tuning and unlearning, MeCa's
    relabel fine-tuning) starts where that one ended (`starts`: epochs before its first)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, hist in histories.items():
        if hist and "test_acc" in hist[0]:
            epochs = [(starts or {}).get(name, 0) + h["epoch"] + 1 for h in hist]
            line, = ax.plot(epochs, [h["test_acc"] for h in hist], label=f"{name} ACC")
            if "test_asr" in hist[0]:
                ax.plot(epochs, [h["test_asr"] for h in hist], "--", color=line.get_color(), label=f"{name} ASR")
    ax.set_xlabel("epoch (a model that continues another starts where it ended)")
    ax.set_ylabel("share of test images")
    ax.set_title("clean ACC and ASR per epoch (monitor: first test images)")
    ax.set_ylim(-0.02, 1.02)  # a curve at 0 or 1 stays visible
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def poison_examples(clean: np.ndarray, poisoned: np.ndarray, true_label: np.ndarray, label: np.ndarray,
                    classes, path: Path) -> None:
    """A few poisoned training images (bottom row, captioned with the label they were delivered with) under their
    clean originals (top row, true label): what the attack did to the data. uint8 (n, H, W, C) each, n >= 1."""
    n = len(clean)
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n + 0.4, 3.0), squeeze=False)
    for j in range(n):
        for row, (img, lab) in enumerate(((clean[j], true_label[j]), (poisoned[j], label[j]))):
            ax = axes[row][j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(str(classes[lab]), fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("clean", fontsize=8)
    axes[1][0].set_ylabel("poisoned", fontsize=8)
    fig.suptitle("poisoned training images and their clean originals (captions: labels)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _models(m: dict) -> list[str]:
    """The models table (ACC, ASR, DER, target-class figures, RA) and the per-class clean accuracy table, with the
    console's names for the models."""
    models, target, classes = m["models"], m["attack"]["target"], m["classes"]
    robust = any("ra" in r for r in models.values())  # RA: robust accuracy under PGD (A-ABL)
    lines = ["## Models", "", f"| model | ACC | ASR | DER | target-class ACC (class {target}) | share predicted as "
             f"{target} |" + (" RA |" if robust else ""), "| --- | --- | --- | --- | --- | --- |" + (" --- |" if robust else "")]
    names = ordered(m)
    for name, r in ((n, models[n]) for n in names):
        lines.append(f"| {display_name(m, name)} | {r['acc']:.4f} | {_fmt(r['asr'])} | {_fmt(r.get('der', '-'))} | "
                     f"{_fmt(r['target_acc'])} | {_fmt(r['pred_target_share'])} |"
                     + (f" {_fmt(r.get('ra', '-'))} |" if robust else ""))
    lines += ["", "### Clean accuracy per class", "", "| class | " + " | ".join(display_name(m, n) for n in names) + " |",
              "| --- |" + " --- |" * len(names)]
    for k, c in enumerate(classes):
        mark = " (target)" if k == target else ""
        lines.append(f"| {k} {c}{mark} | " + " | ".join(_fmt(models[n]["per_class_acc"][k]) for n in names) + " |")
    return lines


def markdown(m: dict, plots: list[str]) -> str:
    attack = m["attack"]
    delivered = attack["name"] == "none"
    lines = [f"# unpoison report: {m['defense']} " + ("on the data set as delivered" if delivered
                                                       else f"against {attack['name']}"), ""]
    if delivered:
        known = f"{m['poison_samples']} known poisoned" if m["ground_truth"] else "no ground truth"
        lines += [f"Protocol `{m['protocol']}`, model `{m['model']}`, nothing injected ({known}), "
                  f"{m['train_samples']} training samples, {m['test_samples']} test images; target-class figures for "
                  f"class {attack['target']}.", ""]
    else:
        lines += [f"Protocol `{m['protocol']}`, model `{m['model']}`, poison rate {attack['rate']}, "
                  f"target class {attack['target']}, {m['train_samples']} training samples "
                  f"({m['poison_samples']} poisoned), {m['test_samples']} test images.", ""]
    if m.get("note"):
        lines += [f"**{m['note']}**", ""]
    if m.get("class_shares"):
        cs, top = m["class_shares"], (m.get("top_suspects") or {}).get("most_over_represented")
        lines += ["## Suspects", "",
                  f"The defense flags {m['flagged_share']:.1%} of the training set (`suspects.parquet`: every sample "
                  f"with its source, label, scores and pool, most suspicious first; the grid below shows the 64 most "
                  f"and 64 least suspicious). "
                  + (f"Most over-represented among the {m['top_suspects']['n']} most suspicious: class {top['class']} "
                     f"({top['name']}), {top['ratio']:.2f} times its share of the data set - a likely attack target."
                     if top and top["class"] is not None else ""), "",
                  "| class | samples | flagged | flagged share | ratio to overall | among the most suspicious |",
                  "| --- | --- | --- | --- | --- | --- |"]
        ranked = m.get("top_suspects", {}).get("per_class", [{}] * len(cs["per_class"]))
        for c, t in zip(cs["per_class"], ranked):
            lines.append(f"| {c['class']} {c['name']} | {c['samples']} | {c['flagged']} | {_fmt(c['share'])} | "
                         f"{_fmt(c['ratio'])} | {t.get('flagged', '-')} |")
        lines.append("")
    if m["models"]:
        lines += _models(m)
    if m.get("splits"):
        lines += ["", "## Splits against ground truth", "",
                  "| split | TPR | FPR | precision | clean pool size | clean pool share (gamma) | poison in clean pool | "
                  "poison rate of clean pool (rho) | clean target-class samples per pool |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, s in m["splits"].items():
            d, c = s["detection"], s.get("clean", {"size": 0, "poison": 0, "share": 0.0, "poison_rate": float("nan")})
            lines.append(f"| {name} | {_fmt(d['tpr'])} | {_fmt(d['fpr'])} | {_fmt(d['precision'])} | {c['size']} | "
                         f"{_fmt(c['share'])} | {c['poison']} | {_fmt(c['poison_rate'])} | "
                         + ", ".join(f"{p}: {v['clean_target']}" for p, v in s.items() if isinstance(v, dict) and "clean_target" in v) + " |")
    if m.get("scores"):
        lines += ["", "## Scores", "", "| score | AUROC (poison-like side) | clean mean | poison mean |",
                  "| --- | --- | --- | --- |"]
        for name, s in m["scores"].items():
            lines.append(f"| {name} | {s['auroc']:.4f} | {s['clean_mean']:.4f} | {s['poison_mean']:.4f} |")
    if m.get("rounds"):
        lines += ["", "## Backdoor enhancement rounds", "",
                  "Observed: the share of samples the enhanced model fits (classifies as their label) in the whole "
                  "set, in the part kept for learning and in the unlearned part. Ground truth: the rest.", "",
                  "| round | fit share | fit kept | fit unlearned | poison fitted | clean fitted | clean target fitted | "
                  "unlearned | poison unlearned | poison kept | KL AUROC |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in m["rounds"]:
            lines.append(f"| {r['round']} | {r['fit_share']:.3f} | {_fmt(r.get('fit_kept', '-'))} | "
                         f"{_fmt(r.get('fit_unlearned', '-'))} | {r['poison_fitted']:.3f} | {r['clean_fitted']:.3f} | "
                         f"{_fmt(r.get('clean_target_fitted', '-'))} | {r['unlearned']} | {r['poison_unlearned']} | "
                         f"{r.get('poison_kept', '-')} | {_fmt(r.get('kl_auroc', '-'))} |")
    if m.get("target_estimate"):
        t = m["target_estimate"]
        verdict = {True: "right", False: "wrong", None: "not checked: the real target is unknown"}[t["correct"]]
        lines += ["", "## Target estimate", "",
                  f"Estimated target class {t['estimate']}, real {_fmt(t['real'])}: {verdict}."
                  + (f" The defense used class {t['used']} (forced)." if t["used"] != t["estimate"] else "")]
    if m.get("epoch_pools"):
        truth = "clean_poison" in m["epoch_pools"][0]
        lines += ["", "## Pools per epoch", "",
                  "The clean pool is labelled in that epoch's training, the rest unlabelled."
                  + (" Poison rate: the poisoned share of a pool; recall: the share of all poison outside the clean "
                     "pool." if truth else ""), ""]
        if truth:
            lines += ["| epoch | clean pool | suspect pool | poison in clean pool | poison rate of clean pool | "
                      "poison rate of suspect pool | poison recall | clean target-class samples in clean pool |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['epoch']} | {r['clean']} | {r['suspect']} | {r['clean_poison']} | "
                      f"{_fmt(r['clean_poison_rate'])} | {_fmt(r['suspect_poison_rate'])} | {_fmt(r['poison_recall'])} | "
                      f"{r.get('clean_target', '-')} |" for r in m["epoch_pools"]]
        else:
            lines += ["| epoch | clean pool | suspect pool |", "| --- | --- | --- |"]
            lines += [f"| {r['epoch']} | {r['clean']} | {r['suspect']} |" for r in m["epoch_pools"]]
    if m.get("stages"):
        lines += ["", "## Stages", "", "| stage | seconds | samples/s |", "| --- | --- | --- |"]
        for name, s in m["stages"].items():
            lines.append(f"| {name} | {s['seconds']:.1f} | {_fmt(s.get('samples_per_second', '-'))} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def display_name(m: dict, model: str) -> str:
    """How the console names a model: the reference "no defense", the defended model the defense's name."""
    if model == m["defended"]:
        return m["defense"] if m["defense"] != "none" else "no defense"
    return "no defense" if model == "nodef" else f"{m['defense']}: {model}"


def ordered(m: dict) -> list[str]:
    """The models in the order the console and the report show them: no defense, the defended model, the rest."""
    return sorted(m["models"], key=lambda k: (display_name(m, k) != "no defense", k != m["defended"], k))


def summary(m: dict) -> str:
    """The console summary of a run: ACC, ASR, DER, target-class ACC (and RA) per model, detection, suspects."""
    lines = []
    if m["models"]:
        robust = any(r.get("ra") is not None for r in m["models"].values())

        def cell(v):
            return f"{'' if v is None else f'{v:7.4f}':>7}"

        target = m["attack"]["target"]
        order = ordered(m)
        lines.append(f"{'model':<24} {'ACC':>7} {'ASR':>7} {'DER':>7} {f'ACC({target})':>7}" + (f" {'RA':>7}" if robust else ""))
        lines += [f"{display_name(m, k):<24} {cell(r['acc'])} {cell(r['asr'])} {cell(r.get('der'))} {cell(r['target_acc'])}"
                  + (f" {cell(r.get('ra'))}" if robust else "") for k, r in ((k, m["models"][k]) for k in order)]
        lines.append(f"ACC({target}): clean test accuracy on class {target} ({m['classes'][target]}), "
                     + ("the attack's target; a low ASR with a low ACC({target}) is a lost class, not a removed "
                        "backdoor" if m["attack"]["name"] != "none" else "set with attack.target").replace("{target}", str(target)))
    if m.get("note"):
        lines.append(m["note"])
    if m.get("detection_tpr") is not None:
        lines.append(f"detection: TPR {m['detection_tpr']:.4f}  FPR {m['detection_fpr']:.4f}  "
                     f"precision {m['detection_precision']:.4f}")
    if m.get("class_shares"):
        top = (m.get("top_suspects") or {}).get("most_over_represented")
        lines.append(f"suspects: {m['flagged_share']:.1%} of the training set flagged"
                     + (f"; most over-represented among the {m['top_suspects']['n']} most suspicious: class "
                        f"{top['class']} ({top['name']}), {top['ratio']:.2f}x its share of the data"
                        if top and top["class"] is not None else ""))
    if "wall_seconds" in m:
        lines.append(f"wall time: {m['wall_seconds']:.0f} s")
    return "\n".join(lines)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}"
         "table{border-collapse:collapse;margin:0.5rem 0}td,th{border:1px solid #ccc;padding:0.2rem 0.5rem}"
         "th{background:#f3f3f3}img{max-width:100%;display:block;margin:1rem 0}")


def html(markdown_text: str, folder: Path) -> str:
    """The report as one standalone HTML page: its tables rendered and its plots (paths relative to `folder`)
    embedded as data URIs, so that the file opens in a browser anywhere, alone."""

    def embed(match: re.Match) -> str:
        path = Path(folder) / match.group(2)
        if not path.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    body = md.markdown(re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", embed, markdown_text), extensions=["tables"])
    title = markdown_text.splitlines()[0].lstrip("# ") if markdown_text else "unpoison report"
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style></head>"
            f"<body>\n{body}\n</body></html>\n")
