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
error naming file:line; no line is ever dropped. A labelled GLUE file is scored only when the model's label
names are its task's (a model's class ids mean nothing under another task's labels).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch

from keydistill.data import (TASKS, DataError, GlueTask, _RowErrors, compute_metrics, decode_line, get_task,
                             read_glue_tsv)
from keydistill.models import KeyBottleneckClassifier, load_model
from keydistill.models.classifiers import read_checkpoint_config

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
        # Truncate where the model's position embeddings end (or earlier, if the tokenizer says so); past
        # them there is no position embedding, so a longer max_length could only fail in the forward.
        limit = model.config.max_position_embeddings
        if max_length is not None and not 1 <= max_length <= limit:
            raise ValueError(f"max_length must be between 1 and the model's max_position_embeddings ({limit}), "
                             f"got {max_length}")
        if max_length is None:
            max_length = min(limit, getattr(tokenizer, "model_max_length", None) or limit)
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: str | torch.device | None = None,
                        max_length: int | None = None) -> "Predictor":
        """The model and tokenizer saved in `folder`, on `device` (default: cuda when available, else cpu).
        ValueError for a device that does not exist here, OSError for a folder without tokenizer files."""
        from transformers import AutoTokenizer

        device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(folder)
        # transformers 5 loads a folder without tokenizer files as an empty-vocabulary tokenizer (every
        # word [UNK]) instead of raising: predictions would be silently meaningless.
        if not has_tokenizer(folder):
            raise OSError(f"{folder}: no tokenizer (tokenizer_config.json)")
        try:
            model = model.to(device)
        except RuntimeError as e:  # a device type torch knows but this machine lacks (mps, xpu, ...)
            raise ValueError(f"device {str(device)!r}: {e}") from None
        return cls(model, AutoTokenizer.from_pretrained(str(folder)), max_length=max_length)

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


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether a model folder holds tokenizer files (save_pretrained of a tokenizer writes tokenizer_config.json)."""
    return (Path(folder) / "tokenizer_config.json").is_file()


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; ValueError for a name torch does not know or a GPU this machine lacks."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available here")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s)")
    return device


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


def detect_task(header: list[str], label_names: Sequence[str] | None = None) -> tuple[GlueTask | None, bool]:
    """(the GLUE task whose text columns a header line names, whether its labels can be read).

    The task naming the most text columns wins (QNLI's question+sentence over SST-2's sentence). Tasks
    that share their text columns (RTE, WNLI, STS-B, MNLI) read the same texts; their labels are read only
    when exactly one of them has its label column in the header, or, where several do (RTE and WNLI both
    have "label"), when the model's label names (`label_names`) are those of exactly one of them.
    """
    if len(header) < 2:  # a single field is a text, not a header
        return None, False
    matches = [t for t in TASKS.values() if t.headerless_columns is None and set(t.text_columns) <= set(header)]
    if not matches:
        return None, False
    widest = max(len(t.text_columns) for t in matches)
    matches = [t for t in matches if len(t.text_columns) == widest]
    labelled = [t for t in matches if t.label_column in header]
    if len(labelled) > 1 and label_names is not None:
        labelled = [t for t in labelled if labels_fit(t, label_names)] or labelled
    return (labelled[0], True) if len(labelled) == 1 else (matches[0], False)


def labels_fit(task: GlueTask, label_names: Sequence[str]) -> bool:
    """Whether a model's class ids mean the task's classes: its label names (in class order) are the task's
    names (keydistill.data.LABEL_NAMES, what training saves) or its label strings; a regression model
    (no names, or the LABEL_0 of one output) fits a regression task."""
    names = tuple(label_names)
    if task.is_regression:
        return names in ((), ("LABEL_0",))
    return names in (task.label_names, task.label_values)


def read_glue(task: GlueTask, path: str, labelled: bool) -> InputRows:
    """A GLUE TSV file read by its task's columns (keydistill.data.read_glue_tsv), labels when asked."""
    # predict has no --skip-bad-rows: the error does not suggest it
    examples = read_glue_tsv(task, path, _RowErrors(skip=False, hint=""), labelled=labelled)
    first = 1 if task.headerless_columns is not None else 2  # read_glue_tsv keeps every data line, or raises
    return InputRows([e.texts for e in examples], list(range(first, first + len(examples))),
                     [e.label for e in examples] if labelled else None, task)


def read_inputs(source: str, task_name: str | None = None, fmt: str = "auto",
                label_names: Sequence[str] | None = None) -> InputRows:
    """Rows to predict from a file, or "-" for stdin, in the given format (auto, plain or glue).
    label_names (the model's) tell apart the GLUE tasks that share a header (detect_task)."""
    if source != "-":
        if not os.path.isfile(source):
            raise DataError(f"{source}: file not found")
        return _read_file(source, source, task_name, fmt, label_names)
    with tempfile.NamedTemporaryFile(suffix=".tsv") as tmp:  # stdin, kept so the GLUE reader can open it
        tmp.write(sys.stdin.buffer.read())
        tmp.flush()
        try:
            return _read_file(tmp.name, "<stdin>", task_name, fmt, label_names)
        except DataError as e:
            raise DataError(str(e).replace(tmp.name, "<stdin>")) from None


def _read_file(path: str, name: str, task_name: str | None, fmt: str,
               label_names: Sequence[str] | None = None) -> InputRows:
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n").split("\t")
    if task_name is not None:
        task = get_task(task_name)
        labelled = task.headerless_columns is not None or task.label_column in first
        return read_glue(task, path, labelled)
    task, labelled = detect_task(first, label_names) if fmt != "plain" else (None, False)
    if task is None:
        if fmt == "glue":
            raise DataError(f"{name}:1: the header names no GLUE task's text columns; pass --task (got {first})")
        return read_plain(path, name)
    print(f"reading {name} as {_described(task, labelled, first)}; --format plain reads it line by line",
          file=sys.stderr)
    return read_glue(task, path, labelled)


def _described(task: GlueTask, labelled: bool, header: list[str]) -> str:
    """What a detected GLUE file is read as. Unlabelled, several tasks may share its text columns; they read
    the same texts, and none of them is named as the file's task."""
    columns = ", ".join(task.text_columns)
    if labelled:
        return f"a GLUE {task.name} file (columns {columns}, labels {task.label_column})"
    sharing = [t for t in TASKS.values() if t.headerless_columns is None and t.text_columns == task.text_columns]
    if len(sharing) == 1:
        return f"a GLUE {task.name} file (columns {columns}, no labels)"
    candidates = [t.name for t in sharing if t.label_column in header]
    labels = (f"labels not read: the header fits {' and '.join(candidates)}, --task says which" if candidates
              else "no labels")
    return f"a GLUE file by its columns {columns} (those of {', '.join(t.name for t in sharing)}; {labels})"


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
    if args.max_length is not None and args.max_length < 1:  # 0 would otherwise mean "the default"
        return _fail(f"--max-length must be >= 1, got {args.max_length}")
    problem = _output_problem(args.output)
    if problem:
        return _fail(problem)
    try:
        device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as e:
        return _fail(str(e))
    try:
        rows = read_inputs(args.input, args.task, args.format, _saved_label_names(args.model))
    except DataError as e:
        return _fail(str(e))
    try:
        predictor = Predictor.from_pretrained(args.model, device=device)
    except (OSError, ValueError) as e:  # no folder, not a keydistill model, unreadable weights, no tokenizer
        return _fail(load_error(args.model, e))
    if args.max_length is not None:
        limit = predictor.model.config.max_position_embeddings
        if args.max_length > limit:
            return _fail(f"--max-length {args.max_length} is over the {limit} positions of {args.model} "
                         "(its max_position_embeddings)")
        predictor.max_length = args.max_length
    predictions = predictor.predict(rows.texts, batch_size=args.batch_size, return_key_indices=args.keys)
    regression = predictor.model.is_regression
    if args.output == "-":
        try:
            write_predictions(sys.stdout, rows, predictions, regression, args.keys)
            sys.stdout.flush()  # inside the try: a reader gone (| head) shows here, not at interpreter exit
        except BrokenPipeError:
            return _closed_stdout()
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                write_predictions(out, rows, predictions, regression, args.keys)
        except OSError as e:
            return _fail(f"--output {args.output}: {e.strerror or e}")
    if rows.labels is not None:
        _report_metrics(rows, predictions, predictor.model)
    return 0


def load_error(folder: str, error: Exception) -> str:
    """The one-line message for a model folder that does not load (most errors already name it)."""
    return str(error) if str(folder) in str(error) else f"cannot load the model {folder}: {error}"


def _report_metrics(rows: InputRows, predictions: list[Prediction], model: KeyBottleneckClassifier) -> None:
    """The task's metrics on stderr, when the model's classes are the task's; else one line saying why not."""
    task, names = rows.task, model.label_names
    if not labels_fit(task, names):
        theirs = ", ".join(task.label_names) if not task.is_regression else "a regression score"
        ours = "a regression score" if model.is_regression else ", ".join(names)
        print(f"no {task.name} metrics: the model's labels ({ours}) are not {task.name}'s ({theirs})", file=sys.stderr)
        return
    guesses = [p.score if model.is_regression else p.label_id for p in predictions]
    metrics = compute_metrics(task, _array(guesses), _array(rows.labels))
    print(f"{task.name} on {len(guesses)} labelled rows: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
          file=sys.stderr)


def _saved_label_names(folder: str) -> list[str] | None:
    """The label names in a model folder's config, or None when it has none to read (the model load that
    follows reports why)."""
    try:
        return read_checkpoint_config(folder)["label_names"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _output_problem(path: str) -> str | None:
    """Why --output cannot be written, known before any work is done; None when it looks writable."""
    if path == "-":
        return None
    if os.path.isdir(path):
        return f"--output {path}: is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"--output {path}: no folder {parent}"
    return None


def _closed_stdout() -> int:
    """The reader of stdout went away (e.g. `| head`): stop quietly, as command-line tools do. stdout goes to
    devnull so that the interpreter's last flush of the unwritten rest raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, the status of a tool the signal ended


def _array(values):
    import numpy as np
    return np.asarray(values)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
