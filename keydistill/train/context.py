"""The run context: settings checked against the data and the teacher, the output folder, the datasets.

Everything a user can get wrong is found here, before the first training step: the settings (config.validate),
the data (file:line:column errors), a teacher checkpoint's bottleneck against the flags, and whether k-means
will see enough vectors for the keys asked for.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, BertConfig

from keydistill.board import Board
from keydistill.bottleneck import BottleneckConfig
from keydistill.checkpoint import write_json
from keydistill.data import CustomDataset, FileTask, GlueTask, TaskData
from keydistill.data.settings import load_data
from keydistill.models.classifiers import has_tokenizer, is_checkpoint, read_checkpoint_config
from keydistill.models.transfer import student_config_from_teacher
from keydistill.train import distributed
from keydistill.train.config import (
    BOTTLENECK_DEFAULTS,
    BOTTLENECK_PRESETS,
    ConfigError,
    TrainConfig,
    changed_settings,
    flag_of,
    validate,
)
from keydistill.train.distributed import Dist

# What a finished or interrupted run leaves in its output folder: a new run there is refused unless
# --overwrite-output-dir replaces it or --resume continues it.
RUN_OUTPUTS = (
    "checkpoints",
    "teacher",
    "student",
    "progress.json",
    "metrics.json",
    "training_curves.png",
    "tensorboard",
)


@dataclass
class Run:
    cfg: TrainConfig
    task: GlueTask | FileTask  # what the data is: label names, regression or not, metrics
    device: torch.device
    tokenizer: object
    teacher_bottleneck: BottleneckConfig  # the teacher's: a loaded checkpoint's own, or the settings'
    train: CustomDataset
    val: CustomDataset
    tests: dict[str, CustomDataset]
    progress: dict  # stage name -> result, for finished stages (progress.json)
    ranks: Dist = distributed.SINGLE  # this process's place among the data-parallel ranks
    train_examples: list = field(default_factory=list)  # run.train's texts and labels (for --augment)
    board: Board = field(default_factory=Board)  # --report-to tensorboard, live (a no-op otherwise)

    @property
    def ckpt_dir(self) -> Path:
        return self.cfg.out / "checkpoints"

    @property
    def pooling(self) -> str:
        return self.teacher_bottleneck.pooling

    def finish_stage(self, name: str, result: dict) -> None:
        self.progress[name] = result
        if self.ranks.main:
            write_json(self.cfg.out / "progress.json", self.progress)

    def autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def setup(cfg: TrainConfig) -> Run:
    """Check the settings, load and tokenise the data, check what depends on both, then prepare the folder."""
    validate(cfg)
    check_output_dir(cfg)
    teacher = resolve_teacher(cfg)
    ranks, device = distributed.init(cfg.device, cfg.dist_timeout)
    if ranks.active:
        distributed.quiet_unless_main(ranks)
        print(
            f"data parallel on {ranks.world} ranks: global batch = {cfg.batch_size} per rank x {ranks.world} ranks "
            f"x {cfg.grad_accum} accumulation = {cfg.batch_size * ranks.world * cfg.grad_accum} examples per step"
        )
    data = load_data(cfg)
    task = data.task
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer {teacher.tokenizer!r}: {e}") from None
    tokenizer.model_max_length = cfg.max_length  # saved with the models: predictions truncate as training did

    def dataset(examples):
        return CustomDataset(examples, tokenizer, cfg.max_length, regression=task.is_regression)

    train, val, tests = dataset(data.train), dataset(data.val), {k: dataset(v) for k, v in data.test.items()}
    report_rows(cfg, task, data, train, val, tests)
    check_inputs_fit(cfg, teacher, {"train": train, "val": val, **tests})
    check_kmeans_has_enough_vectors(cfg, teacher.bottleneck, train)
    progress = prepare_output_dir(cfg) if ranks.main else None
    distributed.barrier("output folder ready")  # the other ranks read what rank 0 prepared
    if progress is None:
        progress = read_progress(cfg)
    live = cfg.out / "tensorboard" if cfg.report_to == "tensorboard" and ranks.main else None
    return Run(
        cfg,
        task,
        device,
        tokenizer,
        teacher.bottleneck,
        train,
        val,
        tests,
        progress,
        ranks,
        data.train,
        Board(live, progress),
    )


def report_rows(cfg: TrainConfig, task: GlueTask | FileTask, data: TaskData, train, val, tests) -> None:
    """Where the rows went, and how many lost tokens to --max-length."""
    if data.skipped_rows:
        print(f"--skip-bad-rows: skipped {data.skipped_rows} malformed row(s)")
    splits = {"train": train, "val": val, **tests}
    print(f"{task.name}: " + ", ".join(f"{len(ds)} {name}" for name, ds in splits.items()) + f" ({data.origin})")
    truncated = {name: ds.truncated for name, ds in splits.items() if ds.truncated}
    if truncated:
        print(
            f"truncated at --max-length {cfg.max_length}: "
            + ", ".join(f"{n} of {len(splits[name])} {name}" for name, n in truncated.items())
        )


# ----------------------------------------------------------------------------------------------------------
# The teacher's bottleneck and tokenizer: a loaded checkpoint is the source of truth
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSource:
    """What the settings' teacher is, known before any work: read from its config only."""

    name: str  # the model name or checkpoint folder, for messages
    bottleneck: BottleneckConfig  # its bottleneck: a loaded checkpoint's own, or the settings'
    tokenizer: str  # where its tokenizer comes from
    positions: int  # its position embeddings: no input may be longer


def resolve_teacher(cfg: TrainConfig) -> TeacherSource:
    if not cfg.teacher_checkpoint:
        encoder = _teacher_encoder_config(cfg.teacher)
        check_teacher_fits(cfg, encoder, cfg.teacher)
        hidden = encoder.hidden_size
        bottleneck = cfg.teacher_bottleneck(hidden)
        try:
            bottleneck.key_dim_for(hidden)
        except ValueError as e:
            raise ConfigError(f"bottleneck on {cfg.teacher} (width {hidden}): {e}") from None
        return TeacherSource(cfg.teacher, bottleneck, cfg.tokenizer or cfg.teacher, encoder.max_position_embeddings)
    folder = Path(cfg.teacher_checkpoint)
    if not is_checkpoint(folder):
        raise ConfigError(f"--teacher-checkpoint {folder}: not a keydistill model folder (written by save_pretrained)")
    meta = read_checkpoint_config(folder)
    if meta["model_class"] != "BertWithKeyBottleneck" or meta["bottleneck"] is None:
        raise ConfigError(
            f"--teacher-checkpoint {folder}: holds a {meta['model_class']}"
            f"{' without a bottleneck' if meta['bottleneck'] is None else ''}, not a BERT teacher with keys"
        )
    encoder = BertConfig.from_dict(meta["encoder_config"])
    check_teacher_fits(cfg, encoder, str(folder))
    saved = BottleneckConfig.from_dict(meta["bottleneck"])
    conflicts = [
        f"{flag_of(k)} {getattr(cfg, k)} but the teacher has {getattr(saved, k)}"
        for k in BOTTLENECK_DEFAULTS
        if getattr(cfg, k) is not None and getattr(cfg, k) != getattr(saved, k)
    ]
    conflicts += [
        f"--bottleneck {cfg.bottleneck} sets {k}={v} but the teacher has {getattr(saved, k)}"
        for k, v in BOTTLENECK_PRESETS[cfg.bottleneck].items()
        if getattr(saved, k) != v
    ]
    if conflicts:
        raise ConfigError(
            f"--teacher-checkpoint {folder} is the source of truth for its bottleneck: "
            + "; ".join(conflicts)
            + " (drop the flag to use the teacher's)"
        )
    if not cfg.tokenizer and not has_tokenizer(folder):
        raise ConfigError(
            f"--teacher-checkpoint {folder} has no tokenizer (tokenizer_config.json); say which with --tokenizer"
        )
    return TeacherSource(str(folder), saved, cfg.tokenizer or str(folder), encoder.max_position_embeddings)


def _teacher_encoder_config(name: str):
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the teacher {name!r}: {e}") from None


def check_teacher_fits(cfg: TrainConfig, encoder, where: str) -> None:
    """What the teacher's shape decides, checked before any work (not after its stages have trained): the
    student's layers exist in it, and a DistilBERT can copy it."""
    n = encoder.num_hidden_layers
    layers = cfg.layers(n)
    if any(i >= n for i in layers):
        raise ConfigError(
            f"--student-layers {cfg.student_layers}: the teacher {where} has {n} layers, numbered 0 to {n - 1}"
        )
    try:
        student_config_from_teacher(encoder, len(layers))
    except ValueError as e:
        raise ConfigError(f"the teacher {where} cannot seed a DistilBERT student: {e}") from None


def check_inputs_fit(cfg: TrainConfig, teacher: TeacherSource, splits: dict[str, CustomDataset]) -> None:
    """No tokenised input may be longer than the teacher's position embeddings (it would fail in the middle of
    training). --max-length caps the inputs, so a cap above the positions is an error only when some input
    reaches past them."""
    over = {name: max(ds.lengths()) for name, ds in splits.items() if len(ds) and max(ds.lengths()) > teacher.positions}
    if over:
        raise ConfigError(
            f"--max-length {cfg.max_length} keeps inputs longer than the {teacher.positions} positions of "
            f"the teacher {teacher.name} ("
            + ", ".join(f"{name}: {n} tokens" for name, n in over.items())
            + f"); lower --max-length to {teacher.positions}"
        )


def check_kmeans_has_enough_vectors(cfg: TrainConfig, bottleneck: BottleneckConfig, train: CustomDataset) -> None:
    """k-means (a new teacher's keys, or fresh student keys) needs at least K vectors; known from the data."""
    if cfg.teacher_checkpoint and cfg.keys != "fresh":
        return
    per_example = "one per example" if bottleneck.pooling == "cls" else "one per token"
    available = len(train) if bottleneck.pooling == "cls" else sum(train.lengths())
    seen = min(available, cfg.kmeans_samples)
    if seen < bottleneck.num_keys:
        raise ConfigError(
            f"k-means needs at least num_keys={bottleneck.num_keys} vectors but will see {seen} "
            f"({available} from {len(train)} training rows, {per_example}, capped by --kmeans-samples "
            f"{cfg.kmeans_samples}); lower --num-keys or use more training rows"
        )


# ----------------------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------------------


def read_progress(cfg: TrainConfig) -> dict:
    """The finished stages of a resumed run (empty for a new one)."""
    progress = cfg.out / "progress.json"
    return json.loads(progress.read_text()) if cfg.resume and progress.exists() else {}


def previous_run(cfg: TrainConfig) -> list[str]:
    """What an earlier run left in the output folder (a --teacher-checkpoint inside it is not a leftover)."""
    keep = Path(cfg.teacher_checkpoint).resolve() if cfg.teacher_checkpoint else None
    return [name for name in RUN_OUTPUTS if (cfg.out / name).exists() and (cfg.out / name).resolve() != keep]


def check_output_dir(cfg: TrainConfig) -> None:
    """Never lose a run: a folder holding one is refused before any work, unless the flags say what to do;
    --resume only continues a run of the same settings."""
    found = [] if cfg.overwrite_output_dir else previous_run(cfg)
    changed = settings_changed_since(cfg) if found else {}
    if not found or (cfg.resume and not changed):
        return
    state = "a finished run" if "metrics.json" in found else "an interrupted run"
    if changed:
        raise ConfigError(
            f"--output-dir {cfg.out} holds {state} whose settings differ ("
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            + "): replace it with --overwrite-output-dir, or choose another --output-dir"
        )
    raise ConfigError(
        f"--output-dir {cfg.out} holds {state} ({', '.join(found)}): continue it with --resume, replace it "
        "with --overwrite-output-dir, or choose another --output-dir"
    )


def settings_changed_since(cfg: TrainConfig) -> dict[str, tuple]:
    """The settings in which cfg differs from the run saved in its output folder (none saved: none)."""
    saved = cfg.out / "config.json"
    return changed_settings(json.loads(saved.read_text()), cfg) if saved.exists() else {}


def prepare_output_dir(cfg: TrainConfig) -> dict:
    """Create the output folder; return the progress of a resumed run, or clear (and name) the run that
    --overwrite-output-dir replaces."""
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    if cfg.resume and saved.exists():  # of the same settings (check_output_dir)
        return read_progress(cfg)
    stale = previous_run(cfg)  # only with --overwrite-output-dir (check_output_dir)
    if stale:
        print(f"{out}: replacing the previous run's {', '.join(stale)} (--overwrite-output-dir)")
    for name in stale:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_json(saved, dataclasses.asdict(cfg))
    return {}
