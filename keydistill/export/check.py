"""The int8 file against the float32 file on real rows of the task, both served as users serve them
(keydistill.predict.OnnxPredictor): how often their labels agree and, with gold labels, each metric of each.

The rows: a --check-file (any input `python -m keydistill.predict` reads, with --label-column and
--text-columns as there), else the validation rows of the run that wrote the model folder (the run's
config.json beside the folder names the task and its local files: a GLUE folder or your own files, the split
and seed), else none (the check is then skipped, and says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from keydistill.data import compute_metrics
from keydistill.data.settings import load_data
from keydistill.predict.inputs import InputRows, labels_fit, read_inputs
from keydistill.predict.onnx_predictor import OnnxPredictor
from keydistill.train.config import FIELDS


def check_rows(
    folder: str, check_file: str | None, label_names, text_columns=None, label_column: str | None = None
) -> tuple[InputRows | None, str]:
    """(the rows to check on, where they come from); DataError for a bad check file."""
    if check_file is not None:
        rows = read_inputs(check_file, None, "auto", label_names, text_columns=text_columns, label_column=label_column)
        return rows, check_file
    settings = _run_settings(Path(folder))
    if settings is None:
        return None, f"no run config.json beside {folder} naming local data (a GLUE folder or your files)"
    data = load_data(settings)
    lines = list(range(1, len(data.val) + 1))
    rows = InputRows([e.texts for e in data.val], lines, [e.label for e in data.val], data.task)
    return rows, f"the run's {data.task.name} validation rows"


# The settings load_data reads; a run saved before one of them existed ran at its default (TrainConfig's).
DATA_FIELDS = (
    "task", "data_dir", "val_size", "seed", "max_eval_samples", "skip_bad_rows", "train_file", "validation_file",
    "test_file", "text_columns", "label_column", "label_names", "regression", "test",
)  # fmt: skip


def _run_settings(folder: Path) -> SimpleNamespace | None:
    """The data settings saved beside a model folder, when they name local data that exists: a GLUE folder,
    or the run's own files. (Validation rows come before max_train_samples caps train: it is left out.)"""
    try:
        saved = json.loads((folder.parent / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or "task" not in saved:
        return None
    local = saved.get("train_file") or saved.get("data_dir")
    if not local or not Path(local).exists():
        return None
    return SimpleNamespace(
        **{name: saved.get(name, FIELDS[name].default) for name in DATA_FIELDS}, max_train_samples=None
    )


def compare(fp32: OnnxPredictor, int8: OnnxPredictor, rows: InputRows, batch_size: int = 32) -> dict:
    """rows, label_agreement (classes) or max_score_diff (regression), key_agreement (the share of
    lookups, row x kept position x head, that pick the same key: the lookup is exact, but int8 moves the
    encoder's queries), and with fitting gold labels metrics: {"fp32": {...}, "int8": {...}}."""
    ours, theirs = (p.predict(rows.texts, batch_size=batch_size, return_key_indices=True) for p in (fp32, int8))
    result: dict = {"rows": len(ours)}
    if ours and ours[0].key_indices is not None:
        pairs = [
            (a, b) for p, q in zip(ours, theirs) for x, y in zip(p.key_indices, q.key_indices) for a, b in zip(x, y)
        ]
        result["key_agreement"] = sum(a == b for a, b in pairs) / max(1, len(pairs))
    if fp32.is_regression:
        guesses = [np.array([p.score for p in ps]) for ps in (ours, theirs)]
        result["max_score_diff"] = float(np.abs(guesses[0] - guesses[1]).max())
    else:
        guesses = [np.array([p.label_id for p in ps]) for ps in (ours, theirs)]
        result["label_agreement"] = float((guesses[0] == guesses[1]).mean())
    if rows.labels is not None and labels_fit(rows.task, fp32.label_names):
        gold = np.asarray(rows.labels)
        result["metrics"] = {name: compute_metrics(rows.task, g, gold) for name, g in zip(("fp32", "int8"), guesses)}
    return result


def drops_past(result: dict, max_drop: float) -> list[str]:
    """What exceeds max_drop points: each metric's drop, or without gold labels the share of labels that
    changed (a bound on any accuracy drop)."""
    if "metrics" in result:
        fp32, int8 = result["metrics"]["fp32"], result["metrics"]["int8"]
        drops = {name: 100 * (fp32[name] - int8[name]) for name in fp32}
        return [f"{name} drops {d:.2f} points" for name, d in drops.items() if d > max_drop]
    changed = 100 * (1 - result.get("label_agreement", 1.0))
    return [f"{changed:.2f}% of the labels change"] if changed > max_drop else []


def describe(result: dict) -> str:
    parts = [f"{result['rows']} rows"]
    if "label_agreement" in result:
        parts.append(f"labels agree on {100 * result['label_agreement']:.2f}%")
    if "key_agreement" in result:
        parts.append(f"keys agree on {100 * result['key_agreement']:.2f}%")
    if "max_score_diff" in result:
        parts.append(f"max |score diff| {result['max_score_diff']:.4f}")
    for name, value in result.get("metrics", {}).get("fp32", {}).items():
        low = result["metrics"]["int8"][name]
        parts.append(f"{name} {100 * value:.2f} (float32) -> {100 * low:.2f} (int8), {100 * (low - value):+.2f} points")
    return "; ".join(parts)
