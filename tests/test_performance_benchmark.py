"""The performance benchmark harness (benchmarks/performance.py) runs end to end at a tiny size and writes well-formed
records. Speed itself is never asserted here: the benchmark prints measured ratios, the tests check correctness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "performance.py"


def test_benchmark_writes_train_score_and_scaling_records(tmp_path):
    results = tmp_path / "perf.json"
    args = ["--models", "small_cnn", "--steps", "2", "--batch", "16", "--score-batch", "16", "--repeats", "1",
            "--sizes", "64,128", "--results", str(results)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(results.read_text())
    by = {}
    for r in records:
        by.setdefault(r["benchmark"], []).append(r)
        assert {"benchmark", "model", "device", "machine", "date"} <= set(r)
    (train,) = by["train-throughput"]
    assert train["model"] == "small_cnn" and train["engine_img_s"] > 0 and train["baseline_img_s"] > 0
    assert train["ratio"] == train["engine_img_s"] / train["baseline_img_s"]
    # the roofline figures: the small CNN's training step, counted by hand (DESIGN.md's widths 32/64/128): six 3x3
    # convolutions at 32, 16 and 8 pixels and the head, forward 2 FLOPs per MAC, backward twice that except for the
    # first convolution's input gradient, which is not needed
    convs = [(3, 32, 32), (32, 32, 32), (32, 64, 16), (64, 64, 16), (64, 128, 8), (128, 128, 8)]
    macs = [c_in * c_out * 9 * size * size for c_in, c_out, size in convs] + [128 * 10]
    assert train["flops_per_image"] == 2 * sum(macs) * 3 - 2 * macs[0]
    assert train["engine_gflop_s"] == pytest.approx(train["engine_img_s"] * train["flops_per_image"] / 1e9)
    assert train["gemm_gflop_s"] > 0 and train["gemm_dtype"] == "float32"
    assert train["ratio_ceiling"] == pytest.approx(train["gemm_gflop_s"] / train["baseline_gflop_s"])
    assert train["conv_flops_per_image"] == 2 * sum(macs[:-1]) * 3 - 2 * macs[0]
    assert 0 < train["engine_conv_share"] < 1 and train["engine_conv_gflop_s"] > 0
    assert train["ratio_convs_only"] == pytest.approx(train["ratio"] / train["engine_conv_share"])
    assert {r["score"] for r in by["score-throughput"]} == {"meca_kl", "adv_sce"}
    for r in by["score-throughput"]:
        assert r["ratio"] == r["engine_img_s"] / r["baseline_img_s"]
        assert r["share_of_train"] == r["engine_img_s"] / train["engine_img_s"]
    assert [r["samples"] for r in by["scaling"]] == [64, 128]
    for r in by["scaling"]:
        assert r["epoch_seconds"] > 0 and r["peak_rss_mb"] >= r["rss_start_mb"] > 0
        assert r["data_mb"] == r["samples"] * 32 * 32 * 3 / 2**20
    md = results.with_suffix(".md").read_text()
    for heading in ("## Training throughput", "## Scoring throughput", "## Scaling"):
        assert heading in md
    assert "| small_cnn | cpu |" in md
    # a second run appends; the table shows the newest record of each kind
    proc = subprocess.run([sys.executable, str(SCRIPT), *args[:-4], "--benchmarks", "train", "--results", str(results)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads(results.read_text())) == len(records) + 1
    assert results.with_suffix(".md").read_text().count("| small_cnn | cpu |") == 1 + 2  # train row + two score rows
