"""Stage 1, the teacher: load one, or fine-tune the encoder with a plain head and fit the bottleneck on top.

Fitting the bottleneck runs on cached encoder outputs (the encoder no longer changes): k-means key init,
EMA passes over the keys, then values and head trained with the keys fixed. The same recipe fits a fresh
student's decoder (stages.student), so both codebooks are made alike.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from keydistill.data import Collator, eval_batches, length_bucketed_batches
from keydistill.models import BertWithKeyBottleneck, load_model
from keydistill.train import distributed
from keydistill.train.config import RunError
from keydistill.train.evaluate import evaluator
from keydistill.train.features import FeatureDataset, batches_on, collate_features, encode, progress_bar
from keydistill.train.loop import fit, token_loss, trainable
from keydistill.train.state import Stage

if TYPE_CHECKING:
    from keydistill.train.context import Run


def teacher_stage(run: Run) -> tuple[BertWithKeyBottleneck, FeatureDataset]:
    """The trained teacher and its cached encoder outputs on the training split."""
    cfg = run.cfg
    folder = cfg.out / "teacher"
    if cfg.teacher_checkpoint or "teacher" in run.progress:
        teacher = load_model(cfg.teacher_checkpoint or folder).to(run.device)
        distributed.attach_codebook_sync(teacher, run.ranks)
        if teacher.num_labels != run.task.num_labels:
            raise RunError(
                f"{cfg.teacher_checkpoint or folder}: a teacher with {teacher.num_labels} label(s) cannot "
                f"teach {run.task.name}, which has {run.task.num_labels}"
            )
        return teacher, encode(run, teacher, run.train, "teacher outputs")
    torch.manual_seed(cfg.seed)
    try:
        teacher = BertWithKeyBottleneck.from_pretrained(
            cfg.teacher, num_labels=run.task.num_labels, bottleneck=run.teacher_bottleneck
        )
    except OSError as e:
        raise RunError(f"cannot load the teacher encoder {cfg.teacher!r}: {e}") from None
    teacher.to(run.device)
    distributed.attach_codebook_sync(teacher, run.ranks)
    collate = Collator(run.tokenizer.pad_token_id)
    if cfg.teacher_encoder == "finetune":
        plain = BertWithKeyBottleneck(teacher.config, None, run.task.num_labels, encoder=teacher.encoder).to(run.device)
        fit(
            run,
            Stage(
                "teacher_finetune",
                plain,
                trainable(plain, cfg),
                cfg.teacher_epochs,
                cfg.teacher_lr,
                run.train,
                collate,
                token_loss,
                evaluator(run, plain, run.val, collate),
            ),
        )
    teacher.encoder.requires_grad_(False)  # from here on the encoder is fixed: its outputs can be cached
    train_features = encode(run, teacher, run.train, "teacher outputs")
    fit_decoder(
        run, teacher, "teacher_bottleneck", train_features, encode(run, teacher, run.val, "teacher val outputs")
    )
    save_model(run, teacher, folder)
    run.finish_stage("teacher", {"folder": str(folder)})
    return teacher, train_features


def save_model(run: Run, model, folder) -> None:
    """A loadable model folder: weights, config with the task's label names, tokenizer (written by rank 0)."""
    if run.ranks.main:
        model.set_label_names(run.task.label_names)  # predictions name the task's classes (none for regression)
        model.save_pretrained(folder)
        run.tokenizer.save_pretrained(folder)


def fit_decoder(run: Run, model, name: str, train: FeatureDataset, val: FeatureDataset) -> None:
    """What follows a fixed encoder, fitted on its cached outputs: with a bottleneck, k-means keys and EMA
    passes, then values and head trained with the keys fixed; without one, the head alone."""
    cfg, bottleneck = run.cfg, model.bottleneck
    torch.manual_seed(cfg.seed + 2)  # dead-key restarts draw from it: same draws whether resumed or not
    if bottleneck is not None and name not in run.progress:
        h, k, _ = bottleneck.keys.shape
        started = time.perf_counter()
        if run.ranks.main:  # k-means over thousands of keys takes minutes at the DKVB scale: say so first
            print(
                f"{name}: k-means++ keys ({h} heads x {k} keys) on up to {cfg.kmeans_samples} vectors ...", flush=True
            )
        init_keys(run, model, train)
        if run.ranks.main:
            print(f"{name}: keys initialised in {time.perf_counter() - started:.0f} s", flush=True)
        key_passes(run, bottleneck, train)
    if bottleneck is not None:
        bottleneck.freeze_keys()
    fit(
        run,
        Stage(
            name,
            model,
            [p for p in model.parameters() if p.requires_grad],
            cfg.bottleneck_epochs,
            cfg.bottleneck_lr,
            train,
            collate_features,
            token_loss,
            evaluator(run, model, val, collate_features),
        ),
    )
    if bottleneck is not None:
        bottleneck.unfreeze_keys()


@torch.no_grad()
def key_passes(run: Run, bottleneck, train: FeatureDataset) -> None:
    """EMA passes over the cached outputs. Data-parallel ranks each take a chunk of every global batch (an
    empty one too) and sum the codebook statistics before each step, as one process on the global batch."""
    bottleneck.train()
    size = run.cfg.eval_batch_size * run.ranks.world
    empty = {
        "hidden": train.features[0].new_zeros(0, 1, train.features[0].shape[-1]),
        "attention_mask": torch.zeros(0, 1, dtype=torch.long, device=run.device),
    }
    for p in range(run.cfg.key_passes):
        order = key_pass_batches(train.lengths(), size, run.cfg.seed, p)
        for global_batch in progress_bar(order, desc=f"key EMA pass {p + 1}/{run.cfg.key_passes}", unit="batch"):
            mine = distributed.chunk(global_batch, run.ranks)
            batch = next(batches_on(run.device, train, collate_features, [mine]))[1] if mine else empty
            bottleneck(batch["hidden"], batch["attention_mask"])


def key_pass_batches(lengths: list[int], size: int, seed: int, key_pass: int) -> list[list[int]]:
    """The batches of one EMA pass. The EMA weighs its last batches most, so they must not be the longest
    examples, as length-sorted batches would end (mean pooling: one vector per token): shuffled batches of
    like lengths, the same on every rank. One vector per example (cls pooling): the dataset's own order."""
    if len(set(lengths)) <= 1:
        return eval_batches(lengths, size)
    return length_bucketed_batches(lengths, size, seed, key_pass)


def init_keys(run: Run, model, features: FeatureDataset) -> None:
    """k-means keys from a seeded sample of encoder outputs (at most kmeans_samples vectors).

    The generator lives on the CPU whatever the device: the same seed then gives the same keys on a CPU and
    a GPU, and the k-means draws take a generator on any device (bottleneck.kmeans_plus_plus)."""
    generator = torch.Generator().manual_seed(run.cfg.seed)
    vectors = torch.cat(features.features)
    sample = torch.randperm(len(vectors), generator=generator)[: run.cfg.kmeans_samples].to(vectors.device)
    model.bottleneck.init_keys_(
        model.bottleneck.project(vectors[sample]), generator=generator.manual_seed(run.cfg.seed)
    )
    distributed.broadcast_codebooks(model)  # every rank ran k-means on the same vectors; make sure they agree
