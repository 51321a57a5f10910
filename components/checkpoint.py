"""Checkpoints of a training, so that a stage killed mid-training (a preempted GPU node, an evicted pod) resumes
where it stopped instead of at epoch 0.

Every training a stage runs (`engine.train` with `checkpoint=`) saves `<stage output>/checkpoints/<desc>.pt` every
`TrainParams.checkpoint_every` epochs (0: never) and after its last epoch: the model, the optimizer and scheduler,
the random number generators (the torch.Generator that draws the batches and augmentations, a perturbation's
`generator`, torch's global CPU and CUDA generators), the epochs done and the history so far. A training started
with a checkpoint present resumes from it; one whose checkpoint says it finished returns at once with the weights
and history it ended with. So a stage of several trainings (MeCa's enhancement rounds) resumes at the training it
was in: one file per training call (each `desc` is unique within its stage), the finished ones skipped.

A checkpoint is used only by the training it belongs to: it records a key (`training_key`) of everything that
decides the training (its parameters except `checkpoint_every`, `desc`, the data, labels and weights, the initial
weights, the loss function and perturbation with their parameters); a checkpoint with another key is ignored with a
message, and the training starts from epoch 0 and overwrites it. A checkpoint that cannot be read is ignored too.

The checkpoints/ folder is no output: `stages.recorded` removes it once the stage's outputs and stage.json are
written (a stage function called on its own leaves it behind; nothing reads it but a rerun into the same folder).

On a cluster the output folder is a local folder of the pod, uploaded to the task's artifact URI only when the
task succeeds: a checkpoint written there dies with the pod. So a KFP task mirrors its checkpoints to the object
store (`mirrored`, set up by `components.runner.run_task`): each save is also uploaded to an S3 prefix derived from
the task's inputs, and a training whose local checkpoint is missing downloads it from there. The mirror is best
effort: a store that refuses or fails costs the mirror (one message), never the training.

Files are written atomically (`artifacts.atomic_path`, then an atomic S3 publish) and read with
`torch.load(weights_only=True)`: tensors, dicts, lists, numbers and strings only, no code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import BaseModel

from components.data import atomic_path

FOLDER = "checkpoints"  # inside a stage's output folder
FORMAT = 1  # changes when what a checkpoint holds changes; part of the key

_mirror: dict = {"prefix": None, "store": None}  # the S3 prefix this process mirrors checkpoints to (`mirrored`)


def path(folder: Path, desc: str) -> Path:
    """The checkpoint of the training `desc` of the stage writing into `folder`."""
    return Path(folder) / FOLDER / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', desc).strip('-') or 'train'}.pt"


def _say(text: str) -> None:
    print(f"unpoison: {text}", file=sys.stderr, flush=True)


# --- the key: which training a checkpoint belongs to ------------------------------------------------------------

def _update(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}:{t.numel()};".encode())
    h.update(t.view(torch.uint8).numpy())


def _describe(fn) -> dict | None:
    """A loss function or perturbation: its qualified name and the plain values its closure holds (its parameters,
    e.g. bounded_ascent's ceiling, a pydantic parameter section as its dump); generators and tensors are left out."""
    if fn is None:
        return None
    values = []
    for cell in getattr(fn, "__closure__", None) or ():
        v = cell.cell_contents
        if isinstance(v, (bool, int, float, str, type(None))):
            values.append(v)
        elif isinstance(v, BaseModel):
            values.append(v.model_dump(mode="json"))
    return {"name": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}",
            "closure": values}


def training_key(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                 params, *, desc: str, loss_fn, perturb, frozen_norm: bool) -> str:
    """sha256 of what decides a training: call it before the first step (the weights are the initial ones)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "desc": desc, "params": params.model_dump(exclude={"checkpoint_every"}),
                         "samples": len(labels), "frozen_norm": frozen_norm, "loss_fn": _describe(loss_fn),
                         "perturb": _describe(perturb)}, sort_keys=True, default=str).encode())
    for t in (images, labels, *(() if weights is None else (weights,))):
        _update(h, t)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _update(h, t)
    return h.hexdigest()


# --- save, load, discard ------------------------------------------------------------------------------------------

def save(state: dict, file: Path) -> None:
    """Write `state` to `file` atomically, and to the mirror when one is set."""
    with atomic_path(file) as tmp:
        torch.save(state, tmp)
    store, prefix = _mirror["store"], _mirror["prefix"]
    if prefix is not None:
        try:
            store.put_file(file, f"{prefix}/{Path(file).name}")
        except Exception as e:  # noqa: BLE001 - the mirror is best effort: training goes on without it
            _say(f"cannot mirror checkpoints to {prefix} ({e}); a retried task will start this stage afresh")
            _mirror["prefix"] = None


def load(file: Path, key: str, desc: str) -> dict | None:
    """The checkpoint of the training whose key is `key`, or None (no checkpoint, an unreadable one, another
    training's: each but the first said on stderr). Tensors come back on the CPU."""
    file = Path(file)
    store, prefix = _mirror["store"], _mirror["prefix"]
    if not file.exists() and prefix is not None:
        uri = f"{prefix}/{file.name}"
        try:
            if store.exists(uri):
                store.get_file(uri, file)
        except Exception as e:  # noqa: BLE001
            _say(f"{desc}: cannot fetch the checkpoint {uri} ({e}); training from the start")
    if not file.exists():
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: start afresh, it is overwritten
        _say(f"{desc}: cannot read the checkpoint '{file}' ({type(e).__name__}: {str(e)[:200]}); training from the "
             f"start and replacing it")
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        _say(f"{desc}: ignoring the checkpoint '{file}': it belongs to another training (other parameters, data, "
             f"initial weights or loss); training from the start and replacing it")
        return None
    if state["complete"]:
        _say(f"{desc}: finished before its stage was interrupted: weights and history from '{file}'")
    else:
        _say(f"{desc}: resuming after epoch {state['epoch']} of {state['epochs']} from '{file}'")
    return state


def discard(folder: Path) -> None:
    """Remove the checkpoints of the stage writing into `folder`, and their mirror (best effort)."""
    shutil.rmtree(Path(folder) / FOLDER, ignore_errors=True)
    store, prefix = _mirror["store"], _mirror["prefix"]
    if prefix is not None:
        try:
            for uri in store.list(prefix):
                store.remove(uri)
        except Exception as e:  # noqa: BLE001
            _say(f"cannot remove the mirrored checkpoints under {prefix} ({e}); remove them by hand")


@contextlib.contextmanager
def mirrored(prefix: str | None, store=None) -> Iterator[None]:
    """Mirror every checkpoint saved, loaded or discarded in this block to the S3 folder `prefix`
    (s3://bucket/key), through `store` (default: `Store.from_env()`); None: no mirror."""
    if prefix is not None and store is None:
        from components.store import Store

        try:
            store = Store.from_env()
        except Exception as e:  # noqa: BLE001
            _say(f"cannot mirror checkpoints to {prefix} ({e}); a retried task will start its stage afresh")
            prefix = None
    before = dict(_mirror)
    _mirror.update(prefix=prefix.rstrip("/") if prefix else None, store=store)
    try:
        yield
    finally:
        _mirror.update(before)
