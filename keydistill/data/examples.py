"""What every data source produces: examples, the splits of a task, and the rules they share (the seeded
validation slice, bad-row handling, DataError)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import NamedTuple

from keydistill.errors import DataError  # noqa: F401  (re-exported: keydistill.data.DataError)


class Example(NamedTuple):
    texts: tuple[str, ...]  # one sentence or a pair
    label: float | int | None  # class index, or a score for regression; None when read without labels


@dataclass
class TaskData:
    task: object  # a GlueTask (keydistill.data.glue) or a FileTask (keydistill.data.files)
    train: list[Example]
    val: list[Example]
    test: dict[str, list[Example]]  # split name -> examples; the first is the primary test split (may be none)
    skipped_rows: int = 0  # bad rows dropped under skip_bad_rows=True
    val_origin: str = ""  # where val came from, for the run's log
    test_origin: str = ""  # where test came from, or why there is none

    @property
    def origin(self) -> str:
        return f"{self.val_origin}; {self.test_origin}"

    def without_test(self) -> TaskData:
        """The splits with the test split left out (--no-test): the run reports validation in its place."""
        return dataclasses.replace(self, test={}, test_origin="--no-test: no test stage, validation is reported")


SKIP_HINT = " (pass --skip-bad-rows to drop such rows and report their count)"


@dataclass
class RowErrors:
    """Raise on the first bad row, or count the bad rows when skipping is allowed."""

    skip: bool
    skipped: int = 0
    # Appended to the error: how the caller's command line drops bad rows ("" where it cannot, e.g. predict).
    hint: str = SKIP_HINT

    def bad_row(self, message: str) -> None:
        if not self.skip:
            raise DataError(message + self.hint)
        self.skipped += 1


# The validation slice held out of train when no size is given: a share of the task, with a floor (small
# tasks still get a usable validation signal) and a cap (large tasks keep their rows for training).
VAL_SHARE, VAL_FLOOR, VAL_CAP = 0.1, 100, 1000
VAL_RULE = "10% with floor 100 and cap 1000"


def default_val_size(train_rows: int) -> int:
    """10% of train, at least 100 and at most 1000 rows, and never more than half of train."""
    return min(max(round(VAL_SHARE * train_rows), VAL_FLOOR), VAL_CAP, train_rows // 2)


def hold_out(
    train: list[Example], val_size: int | None, seed: int, max_train_samples: int | None, name: str
) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded slice of val_size rows (default_val_size when None) held out of train. The slice
    is drawn before max_train_samples caps train, so it never depends on the cap."""
    if val_size is None:
        val_size = default_val_size(len(train))
    if val_size >= len(train):
        raise DataError(f"val_size={val_size} leaves no training rows: {name} train has {len(train)} rows")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    train_end = None if max_train_samples is None else val_size + max_train_samples
    return [train[i] for i in order[val_size:train_end]], [train[i] for i in order[:val_size]]


class LabelledTask:
    """What a task's label names say of it (GlueTask and FileTask): its class count, or a regression task."""

    label_names: tuple[str, ...]  # the classes in class-index order; empty for regression

    @property
    def num_labels(self) -> int:
        """Classes, or 1 for a regression task."""
        return len(self.label_names) or 1

    @property
    def is_regression(self) -> bool:
        return not self.label_names
