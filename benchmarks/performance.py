"""Performance benchmarks: the training engine and the scores against the common way, measured in one process.

- train-throughput: on the same model, the same poisoned data and the same initial weights, a fixed number of
  training steps with (a) the engine (`components.engine.train`: uint8 tensors, batch-wise augmentation, channels_last,
  the machine's threads; on a GPU also the data set on the device, bf16 autocast and torch.compile) and (b) a baseline
  written the common way: a torchvision-style Dataset with PIL transforms, a DataLoader with workers, fp32, NCHW.
  Beside the ratio, what bounds it: FLOPs per training image, the GFLOP/s of each and of the machine's GEMM (the
  ratio ceiling), and on a CPU the engine's time share in convolutions and their GFLOP/s (torch.profiler).
- score-throughput: MeCa's perturbation KL (Eq. 3) and A-ABL's iFGSM + SCE against plain forward passes
  (`engine.predict`) on the same model and images; each also as a share of the engine's training throughput.
- scaling: time per epoch and peak memory of the engine at 5k, 10k, 20k and 50k samples (small CNN), each size in a
  fresh subprocess so that its peak RSS is its own; the growth exponent of each (1 = linear).

Records are appended to benchmarks/results/performance.json (keys `benchmark`, `model`, `engine_img_s`,
`baseline_img_s`, `ratio`, `device`, `machine`, ...) and the Markdown table beside it is rewritten from the newest
record of each kind. Run: `make benchmark-perf`, or `.venv/bin/python benchmarks/performance.py --help`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

from components import engine, scores
from components.attacks import build_attack
from components.config import TrainParams
from components.data import load_images
from components.models import build_model
from pipelines.benchmark import machine

RESULTS = Path(__file__).resolve().parent / "results" / "performance.json"
SCALING_SIZES = (5000, 10000, 20000, 50000)


# --- the baseline: the common way ---------------------------------------------------------------------------------

class PILDataset(Dataset):
    """One PIL image per sample and per-sample transforms, as the torchvision CIFAR10 data set serves them."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.transform = T.Compose([T.RandomHorizontalFlip(), T.ToTensor()])  # flip: the CPU protocol's augmentation

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def baseline_train(model, images: np.ndarray, labels: np.ndarray, p: TrainParams, steps: int, warmup: int,
                   device: torch.device, workers: int) -> float:
    """Images/s of `steps` SGD steps after `warmup` steps: DataLoader with workers, fp32, NCHW, no autocast."""
    loader = DataLoader(PILDataset(images, labels), batch_size=p.batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.nesterov,
                          weight_decay=p.weight_decay)
    batches = iter(loader)
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps * p.batch_size / (time.perf_counter() - t0)


def engine_train(model, x: torch.Tensor, y: torch.Tensor, p: TrainParams, steps: int, warmup: int,
                 device: torch.device) -> float:
    """Images/s of `steps` engine steps (one epoch over steps * batch images), after a warm-up run of `warmup` steps
    on a copy of the model (oneDNN primitives, CUDA kernels and the compiled graph are built there)."""
    engine.train(copy.deepcopy(model), x[: warmup * p.batch_size], y[: warmup * p.batch_size], p, device=device,
                 desc="warm-up")
    n = steps * p.batch_size
    _sync(device)
    t0 = time.perf_counter()
    engine.train(model, x[:n], y[:n], p, device=device, desc="engine")
    _sync(device)
    return n / (time.perf_counter() - t0)


def train_flops_per_image(model, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """FLOPs of one training step (forward and backward) per image, as torch's FlopCounterMode counts them: the
    convolutions and matrix products, which are nearly all of the arithmetic (element-wise ops are not counted);
    the total, and the convolutions' part of it."""
    model = copy.deepcopy(model).to(device).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(engine.to_float(x.to(device))), y.to(device)).backward()
    conv = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    return counter.get_total_flops() / len(y), conv / len(y)


def conv_time_share(model, x: torch.Tensor, y: torch.Tensor, p: TrainParams) -> tuple[float, float]:
    """Where the engine's CPU training time goes: the share of it spent in convolutions (forward and backward), and
    the seconds per image they take, from torch.profiler's self times over one engine run on x."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.train(model, x, y, p, device=torch.device("cpu"), desc="profile")
    events = prof.key_averages()
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    return conv / sum(e.self_cpu_time_total for e in events), conv / 1e6 / len(y)


def gemm_flop_s(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """The machine's measured ceiling: FLOP/s of a large square matrix product (best of `repeats`), the most
    efficient kernel the BLAS has. No training step, whose convolutions run on the same FMA units, can sustain more."""
    a, b = (torch.rand(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    return max(_timed(lambda: a @ b, 2 * n**3, device) for _ in range(repeats))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return n / (time.perf_counter() - t0)


# --- benchmarks -----------------------------------------------------------------------------------------------------

def poisoned_tensors(data: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n training images of `data` poisoned with BadNets (5 %), repeated if the set holds fewer than n."""
    ds = load_images(data, "train")
    res = build_attack("badnets", target=0, rate=0.05, seed=0, num_classes=ds.num_classes).poison(ds)
    reps = math.ceil(n / len(ds))
    images = np.concatenate([res.dataset.images] * reps)[:n]
    labels = np.concatenate([res.dataset.labels] * reps)[:n]
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def train_throughput(model_name: str, x, y, args, device) -> dict:
    p = TrainParams(epochs=1, batch_size=args.batch, lr=0.01, schedule="constant", augment="flip",
                    compile=args.compile if args.compile is not None else device.type == "cuda")
    torch.manual_seed(0)
    model = build_model(model_name, 10)
    # the GEMM ceiling in the engine's arithmetic: bf16 where it autocasts (a GPU), else fp32
    gemm_dtype = torch.bfloat16 if device.type == "cuda" and p.bf16 else torch.float32
    results = {"engine": [], "baseline": [], "gemm": []}
    for _ in range(args.repeats):  # interleaved, so that a load spike on a shared machine hits all three
        results["engine"].append(engine_train(copy.deepcopy(model), x, y, p, args.steps, 2, device))
        results["baseline"].append(baseline_train(copy.deepcopy(model), x.numpy(), y.numpy(), p, args.steps, 2,
                                                  device, engine.machine_threads()))
        results["gemm"].append(gemm_flop_s(device, gemm_dtype))
    eng, base, gemm = max(results["engine"]), max(results["baseline"]), max(results["gemm"])
    flops, conv_flops = train_flops_per_image(model, x[: args.batch], y[: args.batch], device)
    # Roofline bound: an engine at the GEMM rate would be gemm / (base * flops) times the baseline. Where the baseline
    # already runs at more than half that rate, no fp32 engine can be 2x faster without doing less arithmetic.
    profiled = {}
    if device.type == "cpu":  # the profiler's CPU self times are the kernels' times only on a CPU
        # If everything but the convolutions took no time, the engine would reach ratio / share; where the
        # convolutions already run near the GEMM rate, that is the most any engine of the same arithmetic can reach.
        n = args.steps * p.batch_size
        share, conv_s_per_img = conv_time_share(copy.deepcopy(model), x[:n], y[:n], p)
        profiled = {"conv_flops_per_image": conv_flops, "engine_conv_share": share,
                    "engine_conv_gflop_s": conv_flops / conv_s_per_img / 1e9, "ratio_convs_only": eng / base / share}
    return {"benchmark": "train-throughput", "model": model_name, "engine_img_s": eng, "baseline_img_s": base,
            "ratio": eng / base, "flops_per_image": flops, "engine_gflop_s": eng * flops / 1e9,
            "baseline_gflop_s": base * flops / 1e9, "gemm_gflop_s": gemm / 1e9, "gemm_dtype": str(gemm_dtype)[6:],
            "ratio_ceiling": gemm / (base * flops), **profiled,
            "steps": args.steps, "batch_size": args.batch, "repeats": args.repeats,
            "engine_settings": {"channels_last": p.channels_last, "bf16": p.bf16 and device.type == "cuda",
                                "compile": p.compile, "threads": torch.get_num_threads()}}


def score_throughput(model_name: str, x, y, train_img_s: float, args, device) -> list[dict]:
    """Scores against plain forward passes on the same model and images (best of `repeats`)."""
    n = args.steps * args.batch
    torch.manual_seed(0)
    model = engine.prepare(build_model(model_name, 10), TrainParams(), device)
    xs, ys = x[:n], y[:n]
    runs = {"forward": lambda: engine.predict(model, xs, batch_size=args.score_batch, device=device),
            "meca_kl": lambda: scores.meca_kl(model, xs, ys, eps=0.1, patch=8, seed=0, batch_size=args.score_batch,
                                              device=device),
            "adv_sce": lambda: scores.adv_sce(model, xs, ys, eps=2 / 255, step=2 / 255, steps=5,
                                              batch_size=args.score_batch, device=device)}
    runs["forward"]()  # warm-up
    best = {k: 0.0 for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            best[k] = max(best[k], _timed(fn, n, device))
    return [{"benchmark": "score-throughput", "model": model_name, "score": k, "engine_img_s": best[k],
             "baseline_img_s": best["forward"], "ratio": best[k] / best["forward"], "train_img_s": train_img_s,
             "share_of_train": best[k] / train_img_s, "images": n, "batch_size": args.score_batch}
            for k in ("meca_kl", "adv_sce")]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss, which Linux carries over exec from the
    parent, so that a child started by a large parent reports the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on BSD-likes too


def scaling_one(npz: str) -> None:
    """Subprocess body: one warm-up of two batches, then one timed epoch; prints a JSON line."""
    rss_start = peak_rss_mb()
    with np.load(npz) as f:
        x, y = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])
    p = TrainParams(epochs=1, augment="flip")
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    engine.train(copy.deepcopy(model), x[: 2 * p.batch_size], y[: 2 * p.batch_size], p, device=torch.device("cpu"))
    rss_loaded = peak_rss_mb()
    t0 = time.perf_counter()
    engine.train(model, x, y, p, device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    print(json.dumps({"samples": len(y), "epoch_seconds": seconds, "img_s": len(y) / seconds,
                      "data_mb": x.numel() / 2**20, "rss_start_mb": rss_start,
                      "rss_before_epoch_mb": rss_loaded, "peak_rss_mb": peak_rss_mb()}))


def scaling(data: str, sizes: tuple[int, ...]) -> list[dict]:
    x, y = poisoned_tensors(data, max(sizes))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            npz = Path(tmp) / f"{n}.npz"
            np.savez(npz, images=x[:n].numpy(), labels=y[:n].numpy())
            proc = subprocess.run([sys.executable, __file__, "--scaling-one", str(npz)], capture_output=True,
                                  text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            out.append({"benchmark": "scaling", "model": "small_cnn", **r})
            print(f"scaling  {n:>6} samples: {r['epoch_seconds']:.1f} s/epoch ({r['img_s']:.0f} img/s), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    lo, hi = out[0], out[-1]
    size_ratio = hi["samples"] / lo["samples"]
    for r in out:
        r["time_growth_exponent"] = math.log(hi["epoch_seconds"] / lo["epoch_seconds"]) / math.log(size_ratio)
        r["memory_growth_mb_per_10k"] = ((hi["peak_rss_mb"] - lo["peak_rss_mb"])
                                         / (hi["samples"] - lo["samples"]) * 10000)
    return out


# --- results --------------------------------------------------------------------------------------------------------

def _key(r: dict) -> tuple:
    return r["benchmark"], r["model"], r.get("score", ""), r.get("samples", 0), r["device"]


def _settings(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["engine_settings"].items())


def _opt(r: dict, key: str, scale: float = 1.0, digits: int = 0) -> str:
    """A column that older records (or GPU records) lack ("-" there)."""
    return f"{r[key] * scale:.{digits}f}" if r.get(key) is not None else "-"


# Per benchmark: the section heading and its columns (header, cell of a record).
SECTIONS = {
    "train-throughput": ("Training throughput (engine vs DataLoader + PIL baseline, same model, data and weights)", [
        ("model", lambda r: r["model"]), ("device", lambda r: r["device"]),
        ("engine img/s", lambda r: f"{r['engine_img_s']:.0f}"), ("baseline img/s", lambda r: f"{r['baseline_img_s']:.0f}"),
        ("ratio", lambda r: f"{r['ratio']:.2f}"), ("GFLOP/img", lambda r: _opt(r, "flops_per_image", 1e-9, 3)),
        ("GFLOP/s engine", lambda r: _opt(r, "engine_gflop_s")), ("GFLOP/s baseline", lambda r: _opt(r, "baseline_gflop_s")),
        ("GFLOP/s GEMM", lambda r: _opt(r, "gemm_gflop_s")), ("ratio ceiling", lambda r: _opt(r, "ratio_ceiling", 1, 2)),
        ("conv share of engine time", lambda r: _opt(r, "engine_conv_share", 1, 2)),
        ("GFLOP/s engine conv", lambda r: _opt(r, "engine_conv_gflop_s")),
        ("ratio, convs only", lambda r: _opt(r, "ratio_convs_only", 1, 2)),
        ("steps x batch", lambda r: f"{r['steps']} x {r['batch_size']}"),
        ("engine settings", _settings), ("machine", lambda r: r["machine"]), ("date", lambda r: r["date"])]),
    "score-throughput": ("Scoring throughput (against plain forward passes, and as a share of engine training)", [
        ("model", lambda r: r["model"]), ("device", lambda r: r["device"]), ("score", lambda r: r["score"]),
        ("score img/s", lambda r: f"{r['engine_img_s']:.0f}"), ("forward img/s", lambda r: f"{r['baseline_img_s']:.0f}"),
        ("score / forward", lambda r: f"{r['ratio']:.2f}"), ("score / train", lambda r: f"{r['share_of_train']:.2f}"),
        ("machine", lambda r: r["machine"]), ("date", lambda r: r["date"])]),
    "scaling": ("Scaling (small CNN, one epoch, CPU, each size in a fresh process)", [
        ("samples", lambda r: str(r["samples"])), ("s / epoch", lambda r: f"{r['epoch_seconds']:.1f}"),
        ("img/s", lambda r: f"{r['img_s']:.0f}"), ("data MB", lambda r: f"{r['data_mb']:.0f}"),
        ("peak RSS MB", lambda r: f"{r['peak_rss_mb']:.0f}"),
        ("time growth exponent", lambda r: f"{r['time_growth_exponent']:.2f}"),
        ("MB per 10k samples", lambda r: f"{r['memory_growth_mb_per_10k']:.0f}"), ("date", lambda r: r["date"])]),
}


def markdown(records: list[dict]) -> str:
    latest = {}
    for r in records:
        latest[_key(r)] = r
    rows = sorted(latest.values(), key=_key)
    lines = ["# Performance", "", "Newest record of each kind from `performance.json`; produced by `make benchmark-perf`."]
    for benchmark, (heading, columns) in SECTIONS.items():
        lines += ["", f"## {heading}", "", "| " + " | ".join(h for h, _ in columns) + " |",
                  "| " + " | ".join("---" for _ in columns) + " |"]
        lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows if r["benchmark"] == benchmark]
    if not any(r["device"] == "cuda" for r in rows):
        lines += ["", "## GPU", "", "Pending: no GPU was lent to the sessions that produced these figures. On a GPU "
                  "machine, `make benchmark-perf` adds ResNet-18 training images/s and its ratio over the baseline on "
                  "the same GPU, and `make benchmark-paper` the wall time of the full MeCa paper protocol."]
    return "\n".join(lines) + "\n"


def save(new: list[dict], device: torch.device, path: Path) -> None:
    """Append to `path` (JSON list) and rewrite the Markdown beside it; each written whole, then renamed."""
    stamp = {"device": device.type, "machine": machine(), "date": date.today().isoformat()}
    records = json.loads(path.read_text()) if path.exists() else []
    records += [{**r, **stamp} for r in new]
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, json.dumps(records, indent=1, sort_keys=True) + "\n"),
                         (path.with_suffix(".md"), markdown(records))):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--scaling-one":
        return scaling_one(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", default="train,score,scaling", help="any of train, score, scaling")
    parser.add_argument("--models", default="small_cnn,resnet18")
    parser.add_argument("--data", default="sample", help="training images (the scaling sizes above it repeat them)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--score-batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile in the engine (default: on a GPU only)")
    parser.add_argument("--sizes", default=",".join(map(str, SCALING_SIZES)))
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to append to")
    args = parser.parse_args()
    which = set(args.benchmarks.split(","))
    device = engine.default_device()
    engine.use_machine_threads()
    print(f"device: {device}, {machine()}, {torch.get_num_threads()} threads", flush=True)
    new = []
    if which & {"train", "score"}:
        x, y = poisoned_tensors(args.data, (args.steps + 2) * args.batch)
        for name in args.models.split(","):
            t = train_throughput(name, x, y, args, device)
            print(f"train    {name:<10} engine {t['engine_img_s']:8.1f} img/s  baseline {t['baseline_img_s']:8.1f} "
                  f"img/s  ratio {t['ratio']:.2f}  ({t['flops_per_image'] / 1e9:.3f} GFLOP/img: engine "
                  f"{t['engine_gflop_s']:.0f}, baseline {t['baseline_gflop_s']:.0f}, {t['gemm_dtype']} GEMM "
                  f"{t['gemm_gflop_s']:.0f} GFLOP/s; ratio ceiling {t['ratio_ceiling']:.2f})", flush=True)
            if "engine_conv_share" in t:
                print(f"         {name:<10} convolutions {t['engine_conv_share']:.0%} of the engine's time at "
                      f"{t['engine_conv_gflop_s']:.0f} GFLOP/s; ratio if nothing else took time "
                      f"{t['ratio_convs_only']:.2f}", flush=True)
            if "train" in which:
                new.append(t)
            if "score" in which:
                for r in score_throughput(name, x, y, t["engine_img_s"], args, device):
                    print(f"score    {name:<10} {r['score']:<8} {r['engine_img_s']:8.1f} img/s  forward "
                          f"{r['baseline_img_s']:8.1f} img/s  score/forward {r['ratio']:.2f}  "
                          f"score/train {r['share_of_train']:.2f}", flush=True)
                    new.append(r)
    if "scaling" in which:
        new += scaling(args.data, tuple(int(s) for s in args.sizes.split(",")))
        print(f"scaling  time growth exponent {new[-1]['time_growth_exponent']:.2f} (1 = linear), memory "
              f"{new[-1]['memory_growth_mb_per_10k']:.0f} MB per 10k samples", flush=True)
    save(new, device, args.results)
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
