"""The GLUE recipes: the keydistill.train settings each GLUE task runs with unless a flag says otherwise.

They are sized so that the six local GLUE tasks distil in an hour on a 2-core CPU. Each value carries its reason
in one line; the measurements behind them, with the commands that made them, are in docs/recipes.md. Own data
(--train-file) runs on the library defaults: no recipe applies.
"""

from __future__ import annotations

Recipe = tuple[tuple[str, object], ...]  # (TrainConfig field, value) pairs

# Sentence pairs need room: 64 tokens would cut many pairs short.
PAIRS: Recipe = (("max_length", 128),)
# The small tasks' students match the teacher layer by layer: it raised fidelity on every small task.
LAYERS: Recipe = (("hidden_weight", 5.0),)

RECIPES: dict[str, Recipe] = {
    "cola": (
        ("max_train_samples", None),  # a small task: every row
        ("teacher_epochs", 3),  # a small task: its epochs are cheap, the hour allows three
        ("epochs", 6),  # the task distillation hurts most: validation MCC still rose from 3 to 6 epochs
        ("soft_temperature", 1.0),  # lets the KD loss reach the student's encoder through the lookup ...
        ("straight_through", True),  # ... while the forward pass stays the hard lookup (best val MCC)
        *LAYERS,
    ),
    # The main job: every row, one epoch each (a second student epoch on fewer rows scored lower).
    "sst2": (("max_train_samples", None), ("epochs", 1)),
    # A small task whose student was still improving at 2 epochs: every row, 2 teacher and 4 student epochs.
    "mrpc": PAIRS + (("max_train_samples", None), ("teacher_epochs", 2), ("epochs", 4)) + LAYERS,
    "qqp": PAIRS,  # large: the default row cap and epochs
    # Small, still improving at 2 epochs, as MRPC.
    "stsb": PAIRS + (("max_train_samples", None), ("teacher_epochs", 2), ("epochs", 4)) + LAYERS,
    "mnli": PAIRS,  # large: the default row cap and epochs
    "qnli": PAIRS,  # large: the default row cap and epochs
    # A small task: every row, two epochs each.
    "rte": PAIRS + (("max_train_samples", None), ("teacher_epochs", 2), ("epochs", 2)) + LAYERS,
    # A tiny task: every row, three epochs each.
    "wnli": PAIRS + (("max_train_samples", None), ("teacher_epochs", 3), ("epochs", 3)) + LAYERS,
}
