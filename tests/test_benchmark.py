"""The benchmark's record file: a held-out variant's records stand apart from the protocol's."""

from __future__ import annotations

import argparse
import json

import pytest

from components.errors import UnpoisonError
from pipelines import benchmark


def _record(defense, acc, asr, variant=None, **extra):
    return {"defense": defense, "attack": "blend", "protocol": "cpu", "acc": acc, "asr": asr, "der": None,
            "run": f"{defense}-{variant}", "machine": "m", "target_acc": 0.7, "detection_tpr": None,
            "detection_fpr": None, "wall_seconds": 1.0,
            **({"variant": variant, "settings": {"attack.target": 3}} if variant else {}), **extra}


def test_a_variant_neither_replaces_nor_borrows_from_the_protocol_records(tmp_path):
    path = tmp_path / "cpu-reference.json"
    path.write_text(json.dumps(benchmark.merge(path, [_record("none", 0.76, 1.0), _record("lfd", 0.70, 0.9)])))
    records = benchmark.merge(path, [_record("none", 0.74, 0.98, "target3"), _record("lfd", 0.72, 0.05, "target3")])
    assert len(records) == 4
    held_out = next(r for r in records if r["defense"] == "lfd" and r.get("variant") == "target3")
    assert held_out["nodef_acc"] == 0.74 and held_out["reference"].endswith("(run none-target3)")
    protocol = next(r for r in records if r["defense"] == "lfd" and not r.get("variant"))
    assert protocol["nodef_acc"] == 0.76
    table = benchmark.table(records)
    assert "| blend (target3) | lfd |" in table and "| blend | lfd |" in table
    assert 'target3: held-out setting {"attack.target": 3}' in table


def test_a_variant_needs_its_settings(tmp_path):
    args = argparse.Namespace(defenses="meca", attacks="blend", out=tmp_path, protocol="cpu", set=[], config=None,
                              variant="target3", data="sample", runs=tmp_path / "runs")
    with pytest.raises(UnpoisonError, match="--set"):
        benchmark.main(args)
