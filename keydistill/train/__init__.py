"""`python -m keydistill.train`: teacher -> student -> distillation -> test, one module per stage.

Stages (each resumable with --resume; finished stages are skipped):
1. teacher   load --teacher-checkpoint (its bottleneck and tokenizer are authoritative), or build from
             --teacher and train it:
             finetune: fine-tune the encoder with a plain head, then fit the bottleneck on top;
             frozen:   the DKVB recipe, the pretrained encoder stays frozen.
             Fitting the bottleneck runs on cached encoder outputs (the encoder no longer changes):
             k-means key init, EMA passes over the keys, then values and head trained with the keys fixed.
2. student   student_from_teacher (embeddings + every other layer, keys carried / fresh / none; a fresh or
             key-less student's decoder is fitted on its own outputs first), then distillation:
             alpha * KD + (1 - alpha) * task + feature loss (+ layer-by-layer loss, --hidden-weight; MiniLM's
             attention and value-relation transfer, --attention-weight, --value-relation-weight) +
             commitment, with the teacher's logits, sentence features (and layer outputs) computed once
             per example (no grad) and cached; --augment N adds teacher-labelled perturbed copies of the
             training rows (keydistill.augment).
3. test      the best student and the teacher on the test split(s): GLUE's labelled dev split(s), or your
             --test-file (none without one: validation is reported); the student's fidelity.

The data (a GLUE task or your own files) comes from keydistill.data. Outputs in --output-dir: config.json,
metrics.json, training_curves.png, teacher/ and student/ (save_pretrained folders with the tokenizer),
progress.json and checkpoints/ (atomic safetensors, what --resume reads), tensorboard/ with --report-to
tensorboard; a summary on stdout and a last line naming what was written. A folder that holds a run is
refused unless --resume or --overwrite-output-dir.

Modules: config (settings, command line, validation), context (data, teacher resolution, the output folder
and its never-overwrite check), features (batches, cached encoder outputs), loop (the shared training loop),
state (TrainState: where a stage's training stands, also the checkpoint record), checkpointer (validate, save
the latest and best checkpoints, resume from them), averaging (--weight-average), teacher, student, targets
(the student's transfer set and the teacher's targets on it), evaluate, distributed (torchrun), job (the
whole run and the command-line wrapper).
"""

from keydistill.train.config import ConfigError, RunError, TrainConfig, build_parser, parse_config, validate
from keydistill.train.job import main, run_all, run_cli

__all__ = [
    "TrainConfig",
    "build_parser",
    "parse_config",
    "validate",
    "run_all",
    "run_cli",
    "main",
    "RunError",
    "ConfigError",
]
