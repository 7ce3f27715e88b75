"""GLUE's TSV files and their quirks: no quoting (sentences hold bare '"'), a header row except CoLA's, a
byte-order mark on MRPC's header, and file:line:column errors for every malformed row."""

from __future__ import annotations

import math
import os
from typing import Iterator

from keydistill.data.examples import DataError, Example, RowErrors

_BOM = b"\xef\xbb\xbf"


def decode_line(raw: bytes, number: int, name: str) -> str:
    """One line of a file as text, without its line ending; DataError naming name:line:column otherwise.

    Line 1 loses a UTF-8 byte-order mark (MRPC's header starts with one). It is cut off before decoding, so
    the error's offsets index the bytes that were decoded. The column counts characters, as an editor shows
    them (the invisible mark not among them), not bytes: "café \\xff" is column 6.
    """
    body = raw[len(_BOM) :] if number == 1 and raw.startswith(_BOM) else raw
    try:
        return body.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        column = len(body[: e.start].decode("utf-8")) + 1  # everything before the error decodes
        raise DataError(f"{name}:{number}:{column}: undecodable bytes (not UTF-8): {body[e.start : e.end]!r}") from None


def _decoded_lines(path: str, errors: RowErrors) -> Iterator[tuple[int, str | None]]:
    """(1-based line number, text) per line; text is None for a line that is not valid UTF-8 and was skipped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, decode_line(raw, number, path)
            except DataError as e:
                errors.bad_row(str(e))
                yield number, None


def _parse_label(task, value: str, where: str) -> float | int:
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise DataError(f"{where}: label {value!r} is not a number") from None
        # float() takes "nan" and "inf"; such a label makes the loss NaN and the correlations 0 without a word
        if not math.isfinite(score):
            raise DataError(f"{where}: label {value!r} is not a finite number")
        return score
    if value not in task.label_values:
        raise DataError(f"{where}: label {value!r} is not in the label set {list(task.label_values)} of {task.name}")
    return task.label_values.index(value)


def _split_fields(text: str) -> list[str]:
    """A row's tab-separated fields. Quoting is off, so a tab is the only separator and nothing else is
    special (csv.reader would add only a 131,072-character field limit and errors on a bare carriage return).
    An empty line has no fields, not one empty field: it is a bad row even in a one-column file."""
    return text.split("\t") if text else []


def _field_column(fields: list[str], index: int) -> int:
    """The 1-based character column where field `index` of a row starts (past the earlier fields and tabs)."""
    return sum(len(f) + 1 for f in fields[:index]) + 1


def _field_count_column(text: str, fields: list[str], expected: int) -> int:
    """The 1-based character column of the first extra field, or, for too few fields, the end of the line,
    where the next field's tab is missing."""
    return _field_column(fields, expected) if len(fields) > expected else len(text) + 1


def read_glue_tsv(task, path: str, errors: RowErrors, *, labelled: bool = True) -> list[Example]:
    """Examples from one GLUE TSV file of `task` (a GlueTask). Quoting is off: GLUE sentences contain bare '"'.

    labelled=False reads only the text columns (e.g. GLUE's unlabelled test files, for prediction); the
    examples' labels are then None.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected the GLUE TSV layout <data-dir>/{task.folder}/<split>.tsv)")
    lines = _decoded_lines(path, errors)
    header = task.headerless_columns
    if header is None:
        number, text = next(lines, (1, ""))
        if text is None:
            raise DataError(f"{path}:1: the header row is not valid UTF-8")
        header = tuple(text.split("\t"))
    wanted = (*task.text_columns, task.label_column) if labelled else task.text_columns
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {missing}; the header has {list(header)}")
    positions = [header.index(c) for c in wanted]
    examples = []
    for number, text in lines:
        if text is None:
            continue  # an undecodable line, already counted as skipped
        fields = _split_fields(text)
        if len(fields) != len(header):
            column = _field_count_column(text, fields, len(header))
            errors.bad_row(
                f"{path}:{number}:{column}: expected {len(header)} tab-separated fields, found {len(fields)}"
            )
            continue
        if not labelled:
            examples.append(Example(tuple(fields[p] for p in positions), None))
            continue
        *texts, label = (fields[p] for p in positions)
        where = f"{path}:{number}:{_field_column(fields, positions[-1])} (column {task.label_column!r})"
        try:
            examples.append(Example(tuple(texts), _parse_label(task, label, where)))
        except DataError as e:
            errors.bad_row(str(e))
    if not examples:
        raise DataError(f"{path}: no usable rows (empty split)")
    return examples


def load_local(task, data_dir: str, skip_bad_rows: bool = False):
    """(train examples, {test split: examples}, skipped row count) from a folder in the GLUE TSV layout."""
    errors = RowErrors(skip_bad_rows)
    folder = os.path.join(data_dir, task.folder)
    train = read_glue_tsv(task, os.path.join(folder, "train.tsv"), errors)
    test = {
        split: read_glue_tsv(task, os.path.join(folder, f + ".tsv"), errors)
        for split, f in zip(task.test_splits, task.test_files)
    }
    return train, test, errors.skipped
