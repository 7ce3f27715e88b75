"""What `python -m keydistill.predict` reads: one text, or a tab-separated pair, per line; a GLUE TSV file by
its task's columns (told apart by its header, and by the model's label names where tasks share one); or a
CSV, JSON lines or Parquet file (a TSV file too, given --text-columns or --label-column) by its columns, as
training reads them (keydistill.data.files). A bad input line is an error naming file:line; no line is ever
dropped."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Sequence

from keydistill.data import TASKS, DataError, FileTask, GlueTask, RowErrors, decode_line, get_task, read_glue_tsv
from keydistill.data.files import FORMATS, read_for_model

MAX_REPORTED_ERRORS = 20


@dataclass
class InputRows:
    texts: list[tuple[str, ...]]
    lines: list[int]  # the line of each row in its file
    labels: list | None = None  # gold labels (class indices or scores), when the file has them
    task: GlueTask | FileTask | None = None  # the GLUE task whose columns were read, or the file's own


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
                errors.append(
                    f"{name}:{number}: expected one text or two tab-separated texts, found {len(fields)} fields"
                )
            elif not all(field.strip() for field in fields):
                errors.append(f"{name}:{number}: empty text" + (" (an empty line)" if not text.strip() else ""))
            else:
                rows.append(tuple(fields))
                lines.append(number)
    if errors:
        more = len(errors) - MAX_REPORTED_ERRORS
        raise DataError(
            "\n".join(errors[:MAX_REPORTED_ERRORS] + ([f"... and {more} more bad lines"] if more > 0 else []))
        )
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
    if isinstance(task, FileTask):  # read by the model's own label names
        return task.label_names == (() if len(names) <= 1 else names)
    if task.is_regression:
        return names in ((), ("LABEL_0",))
    return names in (task.label_names, task.label_values)


def read_glue(task: GlueTask, path: str, labelled: bool) -> InputRows:
    """A GLUE TSV file read by its task's columns (keydistill.data.read_glue_tsv), labels when asked."""
    # predict has no --skip-bad-rows: the error does not suggest it
    examples = read_glue_tsv(task, path, RowErrors(skip=False, hint=""), labelled=labelled)
    first = 1 if task.headerless_columns is not None else 2  # read_glue_tsv keeps every data line, or raises
    return InputRows(
        [e.texts for e in examples],
        list(range(first, first + len(examples))),
        [e.label for e in examples] if labelled else None,
        task,
    )


def read_inputs(
    source: str,
    task_name: str | None = None,
    fmt: str = "auto",
    label_names: Sequence[str] | None = None,
    *,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
) -> InputRows:
    """Rows to predict from a file, or "-" for stdin, in the given format (auto, plain or glue).
    label_names (the model's) tell apart the GLUE tasks that share a header (detect_task), and map a CSV, JSON
    lines or Parquet file's labels to the model's classes; text_columns and label_column name such a file's
    columns (by default: the one or two text columns besides "label")."""
    if source != "-":
        if not os.path.isfile(source):
            raise DataError(f"{source}: file not found")
        if _read_by_columns(source, fmt, text_columns, label_column):
            return read_columns(source, label_names or (), text_columns, label_column or "label")
        return _read_file(source, source, task_name, fmt, label_names)
    with tempfile.NamedTemporaryFile(suffix=".tsv") as tmp:  # stdin, kept so the GLUE reader can open it
        tmp.write(sys.stdin.buffer.read())
        tmp.flush()
        try:
            return _read_file(tmp.name, "<stdin>", task_name, fmt, label_names)
        except DataError as e:
            raise DataError(str(e).replace(tmp.name, "<stdin>")) from None


def _read_by_columns(path: str, fmt: str, text_columns, label_column) -> bool:
    """Whether a file is read by its columns: a CSV, JSON lines or Parquet file, or a TSV file whose columns
    are named (a TSV file otherwise is a GLUE file or plain lines)."""
    extension = os.path.splitext(path)[1].lower()
    if fmt == "plain" or extension not in FORMATS:
        return False
    return extension != ".tsv" or bool(text_columns or label_column)


def read_columns(
    path: str, label_names: Sequence[str], text_columns: Sequence[str] | None, label_column: str
) -> InputRows:
    """A file read by its columns, as training reads it; its labels (when it has the label column) as the
    model's classes."""
    task, examples, lines = read_for_model(path, label_names, text_columns=text_columns, label_column=label_column)
    labelled = bool(task.label_column)
    what = f"labels {task.label_column}" if labelled else f"no labels (no column {label_column!r})"
    print(f"reading {path} by its columns: texts {', '.join(task.text_columns)}, {what}", file=sys.stderr)
    labels = [e.label for e in examples] if labelled else None
    return InputRows([e.texts for e in examples], lines, labels, task if labelled else None)


def _read_file(
    path: str, name: str, task_name: str | None, fmt: str, label_names: Sequence[str] | None = None
) -> InputRows:
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
    print(
        f"reading {name} as {_described(task, labelled, first)}; --format plain reads it line by line", file=sys.stderr
    )
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
    labels = (
        f"labels not read: the header fits {' and '.join(candidates)}, --task says which" if candidates else "no labels"
    )
    return f"a GLUE file by its columns {columns} (those of {', '.join(t.name for t in sharing)}; {labels})"
