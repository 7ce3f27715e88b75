"""A task's metrics from scikit-learn and scipy; the first of a task's metrics selects the best checkpoint and
is the student's share of the teacher."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn import metrics as skm

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")  # own data; two classes add "mcc"
REGRESSION_METRICS = ("pearson", "spearman")


def compute_metrics(task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics (task.metrics, in order). predictions: class indices, or scores for regression."""
    funcs = {
        "accuracy": lambda: skm.accuracy_score(labels, predictions),
        "f1": lambda: skm.f1_score(labels, predictions),
        "macro_f1": lambda: skm.f1_score(labels, predictions, average="macro", zero_division=0),
        "mcc": lambda: skm.matthews_corrcoef(labels, predictions),
        "pearson": lambda: stats.pearsonr(predictions, labels)[0],
        "spearman": lambda: stats.spearmanr(predictions, labels)[0],
    }
    # A constant prediction has no correlation (nan, with a warning); count it as 0 so model selection
    # stays well-defined.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return {name: float(np.nan_to_num(funcs[name]())) for name in task.metrics}
