"""The task and splits a run's settings name: its own files (train_file), or a GLUE task.

Takes a TrainConfig, or any object with its data fields (the export check passes the settings a run saved in
its config.json), so that training and whatever reads a run's rows later draw the very same splits.
"""

from __future__ import annotations

from keydistill.data.examples import TaskData
from keydistill.data.files import load_files
from keydistill.data.glue import get_task, load_task


def load_data(settings) -> TaskData:
    """The run's task and splits: your own files (settings.train_file), or a GLUE task; without its test split
    when settings.test is false (--no-test)."""
    common = {
        "val_size": settings.val_size,
        "seed": settings.seed,
        "max_train_samples": settings.max_train_samples,
        "max_eval_samples": settings.max_eval_samples,
        "skip_bad_rows": settings.skip_bad_rows,
    }
    data = _load(settings, common)
    return data if settings.test or not data.test else data.without_test()


def _load(settings, common: dict) -> TaskData:
    if not settings.train_file:
        return load_task(get_task(settings.task), settings.data_dir, **common)
    return load_files(
        settings.train_file,
        settings.validation_file,
        settings.test_file,
        text_columns=comma_list(settings.text_columns),
        label_column=settings.label_column,
        label_names=comma_list(settings.label_names),
        regression=settings.regression,
        name=settings.task,
        **common,
    )


def comma_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",")] if text else None
