"""Caching benchmark: the MeCa pipeline under kfp.local twice with identical parameters, then a one-stage rerun.

Prints the wall time of each, the second/first ratio (target <= 0.1) and which tasks each executed; appends a record
to benchmarks/results/caching.json. Run: `.venv/bin/python benchmarks/caching.py [--set key=value ...]`.
"""

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

from components.config import load_config, parse_overrides
from pipelines import kfp_pipelines as kp
from pipelines.benchmark import machine

RESULTS = Path(__file__).resolve().parent / "results" / "caching.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="extend", nargs="+", default=["train_limit=2000", "train.epochs=2",
                                                                      "meca.rounds=2", "meca.finetune_epochs=1"])
    args = parser.parse_args()
    cfg = load_config("cpu", parse_overrides(args.set))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        times, logs = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            _, log = kp.run_local(kp.build("meca"), kp.arguments(cfg, "meca"), root)
            times.append(time.perf_counter() - t0)
            logs.append(log)
        # one-stage rerun of final training, every other input imported from the first run's task folders
        first = next(d for d in sorted(root.iterdir()) if d.name.startswith("unpoison-meca"))
        imported = {"poison": str(first / "poison" / "dataset"), "truth": str(first / "poison" / "truth"),
                    "identify": str(first / "identify" / "out")}
        rerun = kp.build("meca", execute=["final_train"], imported=imported)
        rerun_args = kp.arguments(load_config("cpu", {**parse_overrides(args.set), "final.lr": 0.05}), "meca")
        t0 = time.perf_counter()
        _, rerun_log = kp.run_local(rerun, rerun_args, root)
        rerun_seconds = time.perf_counter() - t0
    record = {"benchmark": "kfp-local-caching", "config": args.set, "first_seconds": times[0],
              "second_seconds": times[1], "ratio": times[1] / times[0], "first_executed": logs[0].executed,
              "second_executed": logs[1].executed, "second_cached": logs[1].cached,
              "rerun_seconds": rerun_seconds, "rerun_executed": rerun_log.executed, "machine": machine(),
              "python": platform.python_version(), "date": date.today().isoformat()}
    print(f"first run {times[0]:.1f} s, identical second run {times[1]:.1f} s: ratio {record['ratio']:.3f} "
          f"(target <= 0.1)")
    print(f"second run executed {logs[1].executed} and took {len(logs[1].cached)} stages from the cache")
    print(f"one-stage rerun of final_train: {rerun_seconds:.1f} s, executed {rerun_log.executed}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(old + [record], indent=2) + "\n")


if __name__ == "__main__":
    main()
