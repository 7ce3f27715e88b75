"""Predictions on raw text: `Predictor` in Python, `python -m keydistill.predict` on the command line.

    from keydistill.predict import Predictor
    predictor = Predictor.from_pretrained("runs/sst2/student")
    predictor.predict(["a gripping film", ("a premise", "a hypothesis")], batch_size=32)

tokenises with the folder's tokenizer, pads each batch only to its longest member (inputs are sorted by
length, so batches waste little), runs the model without gradients (ops backend "auto"), and returns one
Prediction per input, in input order: the label name and its probability, or the score of a regression
model; with return_key_indices=True also the key each bottleneck head chose.

Command line: `python -m keydistill.predict FOLDER --input FILE|-` reads one text, or a tab-separated pair,
per line (or a GLUE TSV file by its task's columns) and writes a TSV of predictions. A bad input line is an
error naming file:line; no line is ever dropped.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import torch

from keydistill.data import (TASKS, DataError, GlueTask, _RowErrors, compute_metrics, decode_line, get_task,
                             read_glue_tsv)
from keydistill.models import KeyBottleneckClassifier, load_model

Text = Union[str, Sequence[str]]  # one text, or a (first, second) pair


@dataclass
class Prediction:
    label: str | None  # the class name (the model's config.id2label); None for a regression model
    score: float  # the probability of that class, or the regression output
    label_id: int | None  # the class index; None for a regression model
    key_indices: list[list[int]] | None = None  # [kept positions][heads]: with return_key_indices=True


class Predictor:
    """A model, its tokenizer and a truncation length: predictions on raw text."""

    def __init__(self, model: KeyBottleneckClassifier, tokenizer, *, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        # Truncate where the model's position embeddings end (or earlier, if the tokenizer says so).
        limit = model.config.max_position_embeddings
        self.max_length = max_length or min(limit, getattr(tokenizer, "model_max_length", None) or limit)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: str | torch.device | None = None,
                        max_length: int | None = None) -> "Predictor":
        """The model and tokenizer saved in `folder`, on `device` (default: cuda when available, else cpu)."""
        from transformers import AutoTokenizer

        model = load_model(folder)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), AutoTokenizer.from_pretrained(str(folder)), max_length=max_length)

    def predict(self, inputs: Text | Iterable[Text], *, batch_size: int = 32,
                return_key_indices: bool = False) -> list[Prediction]:
        """One Prediction per input, in input order. inputs: a text, or an iterable of texts and
        (first, second) pairs, which may be mixed."""
        texts = [_as_texts(item, i) for i, item in enumerate([inputs] if isinstance(inputs, str) else inputs)]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results: list[Prediction | None] = [None] * len(texts)
        for arity in (1, 2):  # the tokenizer takes single texts and pairs in separate calls
            where = [i for i, t in enumerate(texts) if len(t) == arity]
            if not where:
                continue
            columns = [[texts[i][c] for i in where] for c in range(arity)]
            encoded = self.tokenizer(*columns, truncation=True, max_length=self.max_length)
            order = sorted(range(len(where)), key=lambda j: len(encoded["input_ids"][j]))
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = self._padded(encoded, chunk)
                for j, prediction in zip(chunk, self._predict_batch(batch, return_key_indices)):
                    results[where[j]] = prediction
        return results

    def _padded(self, encoded, rows: list[int]) -> dict[str, torch.Tensor]:
        """The rows' token ids padded on the right to their longest, with attention mask and token types."""
        ids = [encoded["input_ids"][j] for j in rows]
        types = [encoded["token_type_ids"][j] for j in rows] if "token_type_ids" in encoded else [[0] * len(x) for x in ids]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        return {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
                "token_type_ids": torch.tensor([t + [0] * (width - len(t)) for t in types])}

    @torch.inference_mode()
    def _predict_batch(self, batch: dict[str, torch.Tensor], with_keys: bool) -> list[Prediction]:
        device = self.model.device
        out = self.model(**{k: v.to(device) for k, v in batch.items()})
        logits = out.logits.float().cpu()
        keys = _keys_per_row(out) if with_keys else [None] * len(logits)
        if self.model.is_regression:
            return [Prediction(None, float(row[0]), None, k) for row, k in zip(logits, keys)]
        probs, ids = logits.softmax(-1).max(-1)
        names = self.model.label_names
        return [Prediction(names[int(i)], float(p), int(i), k) for p, i, k in zip(probs, ids, keys)]


def _as_texts(item, position: int) -> tuple[str, ...]:
    if isinstance(item, str):
        return (item,)
    if isinstance(item, (tuple, list)) and len(item) in (1, 2) and all(isinstance(t, str) for t in item):
        return tuple(item)
    raise TypeError(f"input {position}: expected a text or a (first, second) pair of texts, got {item!r}")


def _keys_per_row(out) -> list[list[list[int]] | None]:
    """The key indices [N, H] of a batch split by row: [kept positions of the row][heads]."""
    if out.key_indices is None:  # a plain head: no keys
        return [None] * len(out.logits)
    counts = out.positions.sum(1).tolist()
    return [rows.tolist() for rows in out.key_indices.cpu().split(counts)]


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

MAX_REPORTED_ERRORS = 20


@dataclass
class InputRows:
    texts: list[tuple[str, ...]]
    lines: list[int]  # the line of each row in its file
    labels: list | None = None  # gold labels (class indices or scores), when a GLUE file has them
    task: GlueTask | None = None  # the GLUE task whose columns were read


def read_plain(path: str, name: str) -> InputRows:
    """One text, or two tab-separated texts (a pair), per line. Every bad line is reported as name:line."""
    rows, lines, errors = [], [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:  # drops a byte-order mark on the first line
                text = decode_line(raw, number, name)
            except DataError as e:
                errors.append(str(e))
                continue
            fields = text.split("\t")
            if len(fields) > 2:
                errors.append(f"{name}:{number}: expected one text or two tab-separated texts, found {len(fields)} fields")
            elif not all(field.strip() for field in fields):
                errors.append(f"{name}:{number}: empty text" + (" (an empty line)" if not text.strip() else ""))
            else:
                rows.append(tuple(fields))
                lines.append(number)
    if errors:
        more = len(errors) - MAX_REPORTED_ERRORS
        raise DataError("\n".join(errors[:MAX_REPORTED_ERRORS] + ([f"... and {more} more bad lines"] if more > 0 else [])))
    if not rows:
        raise DataError(f"{name}: no input lines")
    return InputRows(rows, lines)


def detect_task(header: list[str]) -> tuple[GlueTask | None, bool]:
    """(the GLUE task whose text columns a header line names, whether its labels can be read).

    The task naming the most text columns wins (QNLI's question+sentence over SST-2's sentence). Tasks
    that share their text columns (RTE, WNLI, STS-B, MNLI) read the same texts; their labels are read only
    when exactly one of them has its label column in the header.
    """
    if len(header) < 2:  # a single field is a text, not a header
        return None, False
    matches = [t for t in TASKS.values() if t.headerless_columns is None and set(t.text_columns) <= set(header)]
    if not matches:
        return None, False
    widest = max(len(t.text_columns) for t in matches)
    matches = [t for t in matches if len(t.text_columns) == widest]
    labelled = [t for t in matches if t.label_column in header]
    return (labelled[0], True) if len(labelled) == 1 else (matches[0], False)


def read_glue(task: GlueTask, path: str, labelled: bool) -> InputRows:
    """A GLUE TSV file read by its task's columns (keydistill.data.read_glue_tsv), labels when asked."""
    examples = read_glue_tsv(task, path, _RowErrors(skip=False), labelled=labelled)
    first = 1 if task.headerless_columns is not None else 2  # read_glue_tsv keeps every data line, or raises
    return InputRows([e.texts for e in examples], list(range(first, first + len(examples))),
                     [e.label for e in examples] if labelled else None, task)


def read_inputs(source: str, task_name: str | None = None, fmt: str = "auto") -> InputRows:
    """Rows to predict from a file, or "-" for stdin, in the given format (auto, plain or glue)."""
    if source != "-":
        if not os.path.isfile(source):
            raise DataError(f"{source}: file not found")
        return _read_file(source, source, task_name, fmt)
    with tempfile.NamedTemporaryFile(suffix=".tsv") as tmp:  # stdin, kept so the GLUE reader can open it
        tmp.write(sys.stdin.buffer.read())
        tmp.flush()
        try:
            return _read_file(tmp.name, "<stdin>", task_name, fmt)
        except DataError as e:
            raise DataError(str(e).replace(tmp.name, "<stdin>")) from None


def _read_file(path: str, name: str, task_name: str | None, fmt: str) -> InputRows:
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n").split("\t")
    if task_name is not None:
        task = get_task(task_name)
        labelled = task.headerless_columns is not None or task.label_column in first
        return read_glue(task, path, labelled)
    task, labelled = detect_task(first) if fmt != "plain" else (None, False)
    if task is None:
        if fmt == "glue":
            raise DataError(f"{name}:1: the header names no GLUE task's text columns; pass --task (got {first})")
        return read_plain(path, name)
    print(f"reading {name} as a GLUE {task.name} file (columns {', '.join(task.text_columns)}"
          f"{', labels ' + task.label_column if labelled else ''}); --format plain reads it line by line",
          file=sys.stderr)
    return read_glue(task, path, labelled)


def format_keys(keys: list[list[int]] | None) -> str:
    """Heads joined by ',', kept positions by ' ' (one position with cls pooling)."""
    return "" if keys is None else " ".join(",".join(map(str, heads)) for heads in keys)


def write_predictions(out, rows: InputRows, predictions: list[Prediction], regression: bool, keys: bool) -> None:
    columns = ["line"] + ([] if regression else ["label"]) + ["score"] + (["key_indices"] if keys else [])
    out.write("\t".join(columns) + "\n")
    for line, p in zip(rows.lines, predictions):
        fields = [str(line)] + ([] if regression else [p.label]) + [f"{p.score:.6f}"]
        out.write("\t".join(fields + ([format_keys(p.key_indices)] if keys else [])) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keydistill.predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", help="a model folder written by keydistill (e.g. runs/sst2/student)")
    parser.add_argument("--input", default="-", help="one text or tab-separated pair per line, or a GLUE TSV file; - is stdin")
    parser.add_argument("--output", default="-", help="where the TSV of predictions goes; - is stdout")
    parser.add_argument("--format", default="auto", choices=("auto", "plain", "glue"),
                        help="auto: a first line naming a GLUE task's text columns makes a GLUE file, else plain lines")
    parser.add_argument("--task", choices=tuple(TASKS), help="read the input as this GLUE task's TSV file (its columns)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example after truncation; default: the model's limit")
    parser.add_argument("--keys", action="store_true", help="add the key index each bottleneck head chose")
    parser.add_argument("--device", default=None, help="cpu, cuda, ...; default: cuda when available")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        rows = read_inputs(args.input, args.task, args.format)
    except DataError as e:
        return _fail(str(e))
    try:
        predictor = Predictor.from_pretrained(args.model, device=args.device, max_length=args.max_length)
    except (OSError, ValueError) as e:  # no folder, not a keydistill model, no tokenizer
        return _fail(f"cannot load the model {args.model}: {e}")
    predictions = predictor.predict(rows.texts, batch_size=args.batch_size, return_key_indices=args.keys)
    regression = predictor.model.is_regression
    if args.output == "-":
        write_predictions(sys.stdout, rows, predictions, regression, args.keys)
    else:
        with open(args.output, "w", encoding="utf-8") as out:
            write_predictions(out, rows, predictions, regression, args.keys)
    if rows.labels is not None and rows.task.num_labels == predictor.model.num_labels:
        guesses = [p.score if regression else p.label_id for p in predictions]
        metrics = compute_metrics(rows.task, _array(guesses), _array(rows.labels))
        print(f"{rows.task.name} on {len(guesses)} labelled rows: "
              + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), file=sys.stderr)
    return 0


def _array(values):
    import numpy as np
    return np.asarray(values)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
