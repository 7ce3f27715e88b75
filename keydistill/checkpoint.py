"""Atomic single-file training checkpoints (safetensors) and atomic JSON files.

A checkpoint holds everything a resumed run needs to continue bit for bit: the model's state dict
(parameters and buffers, e.g. the codebook's EMA state), the optimizer's state, the RNG states, and a JSON
record (position in the data, history, config). Every file is written to a temporary name and then
os.replace()d over the old one, so a kill -9 at any moment leaves either the old or the new file, never
a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from keydistill.errors import RunError

_RECORD = "record"  # safetensors metadata key holding the JSON record


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # durable before it becomes visible under the real name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # a full disk, above all: one line, not a traceback
        tmp.unlink(missing_ok=True)  # a torn temporary file only holds space
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RunError(
            f"cannot write {path}: {reason}. The file it replaces is intact: free space (or fix the folder) "
            "and run the same command with --resume to continue"
        ) from e


def write_json(path: str | Path, data) -> None:
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    record: dict,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model (+ optimizer and RNG states when an optimizer is given, + extra tensors under their own
    names, e.g. averaged weights) and a JSON record, atomically."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({k: v.detach().contiguous() for k, v in (extra or {}).items()})
    record = dict(record)
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, slots in state["state"].items():
            for name, value in slots.items():
                tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).contiguous()
        record["param_groups"] = state["param_groups"]
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
    _replace_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={_RECORD: json.dumps(record)}))


def read_record(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[_RECORD])


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Restore what save_checkpoint wrote (RNG states too when an optimizer is given; its extra tensors into
    the dict extra, when given); returns the record."""
    record = read_record(path)
    tensors = load_file(str(path))
    if extra is not None:
        extra.update({k: v for k, v in tensors.items() if not k.startswith(("model.", "optim.", "rng."))})
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    if optimizer is not None:
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                slots.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": slots, "param_groups": record["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        cuda_states = [tensors[k] for k in cuda_keys]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    return record
