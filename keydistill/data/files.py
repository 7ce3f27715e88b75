"""Your own data: train, validation and test files in TSV, CSV, JSON lines or Parquet, read with the `datasets`
library's local loaders (as transformers' run_glue reads its --train_file), described as a `FileTask`.

    from keydistill.data import load_files
    data = load_files(train="train.csv", test="test.csv", text_columns=["premise", "hypothesis"])
    data.task.label_names, data.train[0]          # ('contradiction', 'entailment', 'neutral'), Example(...)

Columns: one or two text columns (a single sentence or a pair) and a label column. Labels: classes when they
are names, booleans or integers (sorted, unless label_names gives the order), scores for regression when they
are floats (or regression=True). Splits: without a validation file, a seeded slice of train by the GLUE rule
(keydistill.data.examples.hold_out); without a test file, no test split.

Bad input raises DataError naming the file, the line (the row, for Parquet) and the column; bad rows are
dropped and counted only with skip_bad_rows=True.
"""

from __future__ import annotations

import csv
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from keydistill.data.examples import VAL_RULE, DataError, Example, LabelledTask, RowErrors, TaskData, hold_out
from keydistill.data.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS

# File extension -> the `datasets` loader that reads it.
FORMATS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class FileTask(LabelledTask):
    """A task read from files: what GlueTask says of a GLUE task, for your own data."""

    name: str  # names the run folder (runs/<name>)
    text_columns: tuple[str, ...]  # one column: single sentences; two: sentence pairs
    label_column: str
    label_names: tuple[str, ...]  # the classes in class-index order; empty for regression
    metrics: tuple[str, ...]  # the first one selects the best checkpoint
    test_splits: tuple[str, ...] = ("test",)  # () without a test file


def check_file(path: str) -> str:
    """The `datasets` loader of a file; DataError for a missing file or an unknown extension."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    loader = FORMATS.get(Path(path).suffix.lower())
    if loader is None:
        raise DataError(f"{path}: unknown extension {Path(path).suffix!r}; use one of {', '.join(FORMATS)}")
    return loader


@dataclass
class Table:
    """A file's columns as lists of values, and how its rows are named in messages."""

    path: str
    columns: dict[str, list]

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values()), []))

    @property
    def header(self) -> str:
        """Where the column names are: line 1 of a TSV or CSV file."""
        return f"{self.path}:1" if FORMATS[Path(self.path).suffix.lower()] == "csv" else self.path

    def line(self, row: int) -> int:
        """The line of a 0-based data row (a header line precedes a TSV or CSV file's rows); Parquet: its row."""
        return row + (2 if FORMATS[Path(self.path).suffix.lower()] == "csv" else 1)

    def where(self, row: int, column: str) -> str:
        """file:line and column of a 0-based data row."""
        place = f"row {row + 1}" if self.path.lower().endswith(".parquet") else str(self.line(row))
        return f"{self.path}:{place}: column {column!r}"

    def require(self, names: Sequence[str], flag: str) -> None:
        missing = [c for c in names if c not in self.columns]
        if missing:
            raise DataError(f"{self.header}: no column {missing[0]!r} ({flag}); the columns are {list(self.columns)}")


def read_table(path: str) -> Table:
    """A file read by the `datasets` loader its extension names; DataError when it cannot be read or is empty."""
    import datasets

    loader = check_file(path)
    options = {}
    if loader == "csv":
        # na_filter off: a text "NA" or "null" stays a text; an empty field stays "" and is reported as empty.
        options = {"na_filter": False}
        if path.lower().endswith(".tsv"):  # the GLUE format: tab-separated, no quoting
            options.update(sep="\t", quoting=csv.QUOTE_NONE)
    bars, verbosity = not datasets.utils.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a bad file is our one-line error, not its log
    try:
        # A private cache per read: a file rewritten in place is never answered from a stale cache.
        with tempfile.TemporaryDirectory() as cache:
            table = datasets.load_dataset(loader, data_files=path, split="train", cache_dir=cache, **options)
            columns = table.to_dict()
    except Exception as e:  # the loaders raise many types (pyarrow, pandas, datasets); each is bad input here
        if _holds_no_rows(path, loader):  # `datasets` fails on a file with no rows instead of returning none
            raise DataError(f"{path}: no rows") from None
        raise DataError(f"{path}: cannot be read as {Path(path).suffix} ({_root_cause(e)})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
    result = Table(path, columns)
    if not result.rows:
        raise DataError(f"{path}: no rows")
    return result


def _root_cause(error: BaseException) -> str:
    """The error behind an error, on one line: `datasets` wraps the parser's own message in a general one."""
    while error.__cause__ is not None:
        error = error.__cause__
    return " ".join(str(error).split()) or type(error).__name__


def _holds_no_rows(path: str, loader: str) -> bool:
    """A text file with no line past its header (TSV, CSV) or none at all (JSON lines)."""
    if loader == "parquet":
        return False
    with open(path, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    return lines <= (1 if loader == "csv" else 0)


# ----------------------------------------------------------------------------------------------------------
# Labels: their kind (names, booleans, integers or numbers), and class names
# ----------------------------------------------------------------------------------------------------------

_INTEGER = re.compile(r"[+-]?\d+")


def label_kind(value) -> str | None:
    """'bool', 'int', 'float' or 'str' for a label value ('int' and 'float' for the numbers a CSV's text
    holds); None for a missing one."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    text = str(value).strip()
    if not text:
        return None
    if _INTEGER.fullmatch(text):
        return "int"
    try:
        float(text)
    except ValueError:
        return "str"
    return "float"


def class_name(value, kind: str) -> str:
    """A class label as its name: integers without leading zeros, booleans as JSON writes them."""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "int":
        return str(int(str(value).strip()))
    return str(value).strip()


_GROUP = {"int": "number", "float": "number", "str": "name", "bool": "boolean"}


@dataclass
class Labels:
    """How a task's label column is read: scores, or classes and their names."""

    regression: bool
    names: tuple[str, ...] = ()
    group: str | None = "number"  # what the training labels are (numbers, names, booleans); None: any
    example: str = ""  # one training label and its line, for the message on a label of another kind
    source: str = "the labels of the training file"  # where the names come from, for messages

    def parse(self, value, where: str) -> float | int:
        """The class index or score of a label value; DataError (a bad row) otherwise."""
        kind = label_kind(value)
        if kind is None:
            raise DataError(f"{where}: missing label")
        if self.group is not None and _GROUP[kind] != self.group:
            raise DataError(
                f"{where}: label {value!r} is a {_GROUP[kind]}, but the training labels are {self.group}s "
                f"({self.example}): labels of mixed kinds"
            )
        if self.regression:
            if kind not in ("int", "float"):
                raise DataError(f"{where}: label {value!r} is not a number (a regression label)")
            score = float(value)
            # nan or inf would make the loss NaN and the correlations 0 without a word
            if not math.isfinite(score):
                raise DataError(f"{where}: label {value!r} is not a finite number")
            return score
        name = class_name(value, kind)
        if name not in self.names:
            raise DataError(f"{where}: label {name!r} is not among {self.source} {list(self.names)}")
        return self.names.index(name)


def infer_labels(table: Table, column: str, regression: bool, label_names: Sequence[str] | None) -> Labels:
    """The label set of the training file. Its labels' kind is that of most of them (a row of another kind is
    a bad row when read); numbers that are not all integers, or regression=True, make a regression task;
    otherwise the classes are sorted, unless label_names gives their order."""
    values = table.columns[column]
    kinds = [label_kind(v) for v in values]
    groups = [_GROUP[k] for k in kinds if k is not None]
    if not groups:
        raise DataError(f"{table.where(0, column)}: missing label (the column has no labels)")
    group = "number" if regression else max(("number", "name", "boolean"), key=groups.count)
    first = next((i for i, k in enumerate(kinds) if k is not None and _GROUP[k] == group), None)
    example = f"e.g. {values[first]!r} on {table.where(first, column)}" if first is not None else "none found"
    if regression or (group == "number" and "float" in kinds):
        return Labels(True, group="number", example=example)
    found = {class_name(v, k) for v, k in zip(values, kinds) if k is not None and _GROUP[k] == group}
    if len(found) < 2:
        raise DataError(
            f"{table.path}: only one class ({next(iter(found))!r}) in column {column!r}; a classifier needs at "
            "least two (labels with decimals, or --regression, make a regression task)"
        )
    if label_names:
        names = tuple(label_names)
        if len(set(names)) != len(names):
            raise DataError(f"--label-names {','.join(names)}: a name appears twice")
    else:
        names = tuple(sorted(found, key=int) if group == "number" else sorted(found))
    return Labels(False, names, group, example, "--label-names" if label_names else Labels.source)


# ----------------------------------------------------------------------------------------------------------
# Columns and rows
# ----------------------------------------------------------------------------------------------------------


def _is_text_column(values: list) -> bool:
    """A column of texts: strings, not all of them numbers (an id or a score column is not a text)."""
    present = [v for v in values if v is not None and str(v).strip()]
    return bool(present) and all(isinstance(v, str) for v in present) and any(label_kind(v) == "str" for v in present)


def infer_text_columns(table: Table, label_column: str) -> tuple[str, ...]:
    """The one or two text columns besides the label column; DataError when there are none or more."""
    texts = [c for c, values in table.columns.items() if c != label_column and _is_text_column(values)]
    if len(texts) in (1, 2):
        return tuple(texts)
    found = f"text columns {texts}" if texts else "no text column"
    raise DataError(
        f"{table.header}: found {found} besides the label column {label_column!r}; "
        "name one or two with --text-columns (e.g. --text-columns premise,hypothesis)"
    )


def read_examples(table: Table, text_columns: Sequence[str], label_column: str, labels: Labels | None, errors) -> list:
    """The table's rows as Examples; a row with an empty text or a bad label is a bad row. labels=None reads
    the texts only (labels None)."""
    examples = []
    for row in range(table.rows):
        try:
            texts = tuple(_text(table, row, c) for c in text_columns)
            label = labels.parse(table.columns[label_column][row], table.where(row, label_column)) if labels else None
        except DataError as e:
            errors.bad_row(str(e))
            continue
        examples.append(Example(texts, label))
    if not examples:
        raise DataError(f"{table.path}: no usable rows")
    return examples


def _text(table: Table, row: int, column: str) -> str:
    value = table.columns[column][row]
    if value is None or not str(value).strip():
        raise DataError(f"{table.where(row, column)}: empty text")
    return str(value)


def task_metrics(label_names: Sequence[str]) -> tuple[str, ...]:
    """Pearson and Spearman for a regression task (no names); accuracy and macro-F1, and MCC for two classes."""
    if not label_names:
        return REGRESSION_METRICS
    return CLASSIFICATION_METRICS + (("mcc",) if len(label_names) == 2 else ())


# ----------------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------------


def load_files(
    train: str,
    validation: str | None = None,
    test: str | None = None,
    *,
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    regression: bool = False,
    name: str | None = None,
    val_size: int | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    skip_bad_rows: bool = False,
) -> TaskData:
    """Your own files as a task's splits (TaskData: .task is a FileTask, .train, .val, .test examples).

    Without `validation`, val is a seeded slice of train (val_size rows; default 10% with floor 100 and cap
    1000), drawn before max_train_samples caps train. Without `test`, .test is empty. max_eval_samples caps val
    and test (their first rows). name: the task's name (default: the training file's stem).
    """
    for path in (train, validation, test):
        if path is not None:
            check_file(path)  # every file's existence and format, before the first is read
    errors = RowErrors(skip_bad_rows)
    table = read_table(train)
    table.require([label_column], "--label-column")
    if text_columns:
        table.require(text_columns, "--text-columns")
        text_columns = tuple(text_columns)
    else:
        text_columns = infer_text_columns(table, label_column)
    labels = infer_labels(table, label_column, regression, label_names)
    examples = read_examples(table, text_columns, label_column, labels, errors)
    splits = {}
    for split, path in (("val", validation), ("test", test)):
        if path is not None:
            other = read_table(path)
            other.require([*text_columns, label_column], "the training file's columns")
            splits[split] = read_examples(other, text_columns, label_column, labels, errors)[slice(max_eval_samples)]
    task = FileTask(
        name or Path(train).stem,
        text_columns,
        label_column,
        labels.names,
        task_metrics(labels.names),
        ("test",) if test else (),
    )
    if validation:
        train_rows, val = examples[slice(max_train_samples)], splits["val"]
    else:
        train_rows, val = hold_out(examples, val_size, seed, max_train_samples, task.name)
        val = val[slice(max_eval_samples)]
    origin = f"val from {validation}" if validation else f"val held out of {train}{'' if val_size else ', ' + VAL_RULE}"
    test_origin = f"test from {test}" if test else "no test file: no test stage, validation is reported"
    tests = {"test": splits["test"]} if test else {}
    return TaskData(task, train_rows, val, tests, errors.skipped, origin, test_origin)


def read_for_model(
    path: str, label_names: Sequence[str], *, text_columns: Sequence[str] | None = None, label_column: str = "label"
) -> tuple[FileTask, list[Example], list[int]]:
    """A file to predict on (keydistill.predict): (its task as the model sees it, its examples, their lines).

    The labels are read when the file has the label column, as the model's class ids by its label names
    (label_names; one name, LABEL_0, is a regression model's score); a label the model does not have is an
    error naming its line. No row is ever dropped."""
    table = read_table(path)
    if text_columns:
        table.require(text_columns, "--text-columns")
    text_columns = tuple(text_columns) if text_columns else infer_text_columns(table, label_column)
    regression = len(label_names) <= 1
    names = () if regression else tuple(label_names)
    labels = (
        Labels(regression, names, group=None, source="the model's labels") if label_column in table.columns else None
    )
    examples = read_examples(table, text_columns, label_column, labels, RowErrors(skip=False, hint=""))
    task = FileTask(Path(path).stem, text_columns, label_column if labels else "", names, task_metrics(names))
    return task, examples, [table.line(row) for row in range(table.rows)]
