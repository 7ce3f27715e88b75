"""The one module that knows data formats: GLUE tasks and your own files in, tokenised batches out.

    from keydistill.data import load_files, load_task, CustomDataset
    data = load_files(train="train.csv", test="test.csv")   # your own data (keydistill.data.files)
    data = load_task("rte", "../shared/data/glue")           # a GLUE task (keydistill.data.glue)

Both return TaskData: .task (what the task is: label names, regression or not, metrics), .train, .val and
.test (lists of Example). CustomDataset tokenises examples for the models; Collator pads a batch.

Parts: examples (Example, TaskData, the validation slice, bad-row handling), glue (the GLUE task table and its
loading), tsv (GLUE's TSV files and their quirks), recipes (the GLUE tasks' training settings), files (your own
TSV, CSV, JSON lines and Parquet files), metrics, dataset (CustomDataset and batching: the one part that needs
PyTorch, imported on first use).

Bad data raises DataError naming the file, line and column; the command lines print it without a traceback.
Bad rows are only ever skipped behind an explicit skip_bad_rows=True, and the count is returned.
"""

from keydistill.data.examples import (
    SKIP_HINT,
    VAL_CAP,
    VAL_FLOOR,
    VAL_SHARE,
    DataError,
    Example,
    RowErrors,
    TaskData,
    default_val_size,
)
from keydistill.data.files import FORMATS, FileTask, load_files
from keydistill.data.glue import LABEL_NAMES, TASKS, GlueTask, get_task, load_hub, load_task
from keydistill.data.metrics import compute_metrics
from keydistill.data.tsv import decode_line, load_local, read_glue_tsv

_RowErrors = RowErrors  # the name keydistill.predict and older code import

# The tokenised datasets and batching need PyTorch; they are imported on first use (PEP 562) so that reading
# data files, the task table and the metrics (what serving an ONNX file uses) never import it.
_FROM_DATASET = ("Collator", "CustomDataset", "count_truncated", "eval_batches", "length_bucketed_batches")


def __getattr__(name: str):
    if name in _FROM_DATASET:
        from keydistill.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'keydistill.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM_DATASET))


__all__ = [
    "Collator",
    "CustomDataset",
    "DataError",
    "Example",
    "FileTask",
    "FORMATS",
    "GlueTask",
    "LABEL_NAMES",
    "RowErrors",
    "SKIP_HINT",
    "TASKS",
    "TaskData",
    "VAL_CAP",
    "VAL_FLOOR",
    "VAL_SHARE",
    "compute_metrics",
    "count_truncated",
    "decode_line",
    "default_val_size",
    "eval_batches",
    "get_task",
    "length_bucketed_batches",
    "load_files",
    "load_hub",
    "load_local",
    "load_task",
    "read_glue_tsv",
]
