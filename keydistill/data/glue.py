"""The GLUE task table (columns, label values, metrics, test files) and loading a GLUE task: local TSV
folders (keydistill.data.tsv) or the hub dataset nyu-mll/glue.

Splits: "train" is GLUE's train minus a seeded held-out slice that becomes "val"; "test" is GLUE's labelled
dev split (GLUE's own test labels are not public). MNLI has two test splits, matched and mismatched.
"""

from __future__ import annotations

from dataclasses import dataclass

from keydistill.data.examples import VAL_RULE, DataError, Example, LabelledTask, TaskData, hold_out
from keydistill.data.recipes import RECIPES, Recipe
from keydistill.data.tsv import load_local


@dataclass(frozen=True)
class GlueTask(LabelledTask):
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

    @property
    def label_names(self) -> tuple[str, ...]:
        """What each class means, in class-index order (e.g. negative, positive); empty for regression.
        Saved with a trained model (its config's id2label), so predictions name their labels."""
        return LABEL_NAMES[self.name]

    @property
    def recipe(self) -> Recipe:
        """The keydistill.train settings this task runs with unless a flag says otherwise (data.recipes)."""
        return RECIPES[self.name]

    @property
    def test_splits(self) -> tuple[str, ...]:
        """Names of the test splits: "test", or "test_matched" and "test_mismatched" for MNLI."""
        if len(self.test_files) == 1:
            return ("test",)
        return tuple("test_" + f.split("_", 1)[1] for f in self.test_files)


_BINARY = ("0", "1")
_ENTAIL2 = ("entailment", "not_entailment")


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
        ),
        GlueTask("sst2", "SST-2", ("sentence",), "label", ("sentence",), _BINARY, ("accuracy",)),
        GlueTask(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            ("sentence1", "sentence2"),
            _BINARY,
            ("f1", "accuracy"),
        ),
        GlueTask(
            "qqp",
            "QQP",
            ("question1", "question2"),
            "is_duplicate",
            ("question1", "question2"),
            _BINARY,
            ("accuracy", "f1"),
        ),
        GlueTask(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            ("sentence1", "sentence2"),
            (),
            ("pearson", "spearman"),
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
        ),
        GlueTask(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            "label",
            ("question", "sentence"),
            _ENTAIL2,
            ("accuracy",),
        ),
        GlueTask(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            "label",
            ("sentence1", "sentence2"),
            _ENTAIL2,
            ("accuracy",),
        ),
        GlueTask(
            "wnli",
            "WNLI",
            ("sentence1", "sentence2"),
            "label",
            ("sentence1", "sentence2"),
            _BINARY,
            ("accuracy",),
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
    train, val = hold_out(train, val_size, seed, max_train_samples, task.name)
    cap = slice(max_eval_samples)
    origin = f"val held out of GLUE train{'' if val_size else ', ' + VAL_RULE}"
    test = {name: rows[cap] for name, rows in test.items()}
    return TaskData(task, train, val[cap], test, skipped, origin, "test is GLUE dev")
