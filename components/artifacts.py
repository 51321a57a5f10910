"""Artifact files: Parquet tables with checked schemas, models as safetensors + JSON, JSON documents.

Every write is atomic (`atomic_path`: a temporary file in the same folder, fsynced, then `os.replace`), so a later
stage never reads half an artifact as if it were complete. Reads check what they can: a damaged Parquet table or
model weights that no longer match their recorded sha256 stop with an `UnpoisonError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from components.data import atomic_path  # the project's one atomic-write helper; re-exported here
from components.errors import UnpoisonError
from components.models import build_composite, build_model

# Column -> Arrow type of each table kind (DESIGN.md, Artifacts). Score tables add one float column per score.
SAMPLE_SCHEMA = {"sample_id": pa.int64(), "label": pa.int64(), "true_label": pa.int64(), "is_poison": pa.bool_(),
                 "is_cover": pa.bool_()}
SOURCES_SCHEMA = {"sample_id": pa.int64(), "source": pa.string(), "label": pa.int64()}  # where each sample came from
SCORE_SCHEMA = {"sample_id": pa.int64(), "model_ref": pa.string(), "epoch": pa.int64()}
SPLIT_SCHEMA = {"sample_id": pa.int64(), "pool": pa.string(), "relabel": pa.int64()}
ROUNDS_SCHEMA = {"sample_id": pa.int64(), "round": pa.int64(), "kl": pa.float64(), "kept": pa.bool_(),
                 "fitted": pa.bool_()}  # MeCa's enhancement, one row per round and sample
GUARD_SCHEMA = {"sample_id": pa.int64(), "suspect_label": pa.int64(), "suspected": pa.bool_(),
                "guarded": pa.bool_()}  # MeCa's identification decision, read by its second pass (`vouch`)
EPOCH_POOLS_SCHEMA = {"epoch": pa.int64(), "sample_id": pa.int64(), "clean": pa.bool_()}  # a training's pools, one
# row per epoch and sample (BSD's final training re-partitions every epoch)
POOLS = ("clean", "suspect", "dropped")


def write_json(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UnpoisonError(f"'{path}' does not exist; run the stage that writes it first")
    return json.loads(path.read_text())


def write_table(columns: dict[str, np.ndarray | list], path: Path, schema: dict[str, pa.DataType]) -> None:
    """Write a Parquet table; `schema` names required columns and their types, extra columns are float64 scores."""
    missing = [c for c in schema if c not in columns]
    if missing:
        raise ValueError(f"table for {path.name} lacks columns {missing}")
    fields = [pa.field(c, schema.get(c, pa.float64())) for c in columns]
    table = pa.table({c: pa.array(columns[c], type=f.type) for c, f in zip(columns, fields)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path: Path, schema: dict[str, pa.DataType]) -> dict[str, np.ndarray]:
    """Read a Parquet table and check it has the columns of `schema`; returns numpy columns."""
    path = Path(path)
    if not path.exists():
        raise UnpoisonError(f"table '{path}' does not exist; run the stage that writes it first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:  # pyarrow raises ArrowInvalid, or a bare OSError, for bad content
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno is not None):
            raise  # the system refused (memory, permissions, I/O): not the file's content
        reason = " ".join(str(e).replace(f"'{path}'", "it").split())
        raise UnpoisonError(f"table '{path}' is not a readable Parquet file ({reason[:200]}); it was damaged or cut "
                            f"short after it was written: run the stage that wrote it again") from e
    missing = [c for c in schema if c not in table.column_names]
    if missing:
        raise UnpoisonError(f"table '{path}' lacks columns {missing} (has {table.column_names}); "
                            f"regenerate it with the stage that writes this table")
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def save_model(model: torch.nn.Module, meta: dict, folder: Path) -> None:
    """safetensors weights + model.json (architecture, classes, data set hash, training params)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    write_json({**meta, "weights_sha256": digest}, folder / "model.json")  # written last: its presence marks the model complete


def load_model(folder: Path) -> tuple[torch.nn.Module, dict]:
    """The model in `folder` and its model.json, after checking the weights against their recorded sha256.

    A folder whose model.json has a `composite` entry holds ABM's composite (components/models.py, AntiBackdoorModel):
    both networks' weights in its model.safetensors, delta, gamma and A in model.json; it loads as one module, so
    evaluation, the report and MLflow measure and serve the composite, not its teacher.

    A damaged weights file can still parse (a changed byte inside a tensor): without the check it would load and
    silently give another model.
    """
    folder = Path(folder)
    if not (folder / "model.json").exists() or not (folder / "model.safetensors").exists():
        raise UnpoisonError(f"no complete model in '{folder}' (model.json + model.safetensors); "
                            f"run the training stage that writes it")
    meta = read_json(folder / "model.json")
    model = (build_composite(meta["composite"], len(meta["classes"])) if meta.get("composite")
             else build_model(meta["architecture"], len(meta["classes"])))
    weights = (folder / "model.safetensors").read_bytes()
    actual, expected = hashlib.sha256(weights).hexdigest(), meta.get("weights_sha256")
    if actual != expected:
        raise UnpoisonError(f"the weights in '{folder}' are not the ones model.json records (model.safetensors has "
                            f"sha256 {actual}, model.json records {expected or 'none'}); they were changed or damaged "
                            f"after they were written: run the stage that wrote this model again")
    model.load_state_dict(load_safetensors(weights))
    return model, meta
