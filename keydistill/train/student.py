"""Stage 2, the student: built from the teacher, its decoder made by the variant's rule, then distilled.

The three --keys variants differ only in the codebook, and each starts from a decoder fitted to its own
routing, so the ablation compares like with like:
- carry: the teacher's keys with the teacher's values and head (fitted by the teacher on these keys);
- fresh: k-means keys on the student's own outputs, values and head re-initialised and fitted on them by the
  teacher's recipe (stages.teacher.fit_decoder): values are indexed by key ids, so the teacher's would be
  a meaningless permutation;
- none: no bottleneck; a new head fitted the same way on the student's first-token outputs.
And each gets the same gradient paths into the encoder: the feature loss always; the soft and task losses
only when the lookup passes them (--soft-temperature), so under the hard lookup the no-bottleneck head
reads a detached encoder output too. The commitment loss exists only where there are keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from keydistill.data import Collator
from keydistill.losses import DistillationWeights, distillation_loss, sentence_features
from keydistill.models import student_from_teacher
from keydistill.train import distributed
from keydistill.train.evaluate import evaluator
from keydistill.train.features import FeatureDataset, encode
from keydistill.train.loop import fit, trainable
from keydistill.train.state import Stage
from keydistill.train.targets import LayerMatch, transfer_set
from keydistill.train.teacher import fit_decoder, save_model

if TYPE_CHECKING:
    from keydistill.train.context import Run


def student_stage(run: Run, teacher, teacher_train: FeatureDataset):
    cfg = run.cfg
    torch.manual_seed(cfg.seed + 1)
    student = student_from_teacher(
        teacher,
        cfg.layers(teacher.config.num_hidden_layers),
        carry=cfg.keys == "carry",
        with_bottleneck=cfg.keys != "none",
        bottleneck_overrides=cfg.student_training(),
    )
    distributed.attach_codebook_sync(student, run.ranks)
    if cfg.keys != "carry":
        fit_own_decoder(run, student)
    if student.bottleneck is not None and not cfg.student_ema:
        # Carried keys chasing the untrained student's outputs would forget the teacher's codebook.
        student.bottleneck.freeze_keys()
    # The teacher's soft targets and features, once per training example, without gradients.
    transfer, teacher_logits, teacher_features = transfer_set(run, teacher, teacher_train)
    weights = DistillationWeights(cfg.alpha, cfg.temperature, cfg.feature_weight)
    # Under the hard lookup the soft and task losses stop at the values; a head without keys must stop there too.
    detach_head = student.bottleneck is None and cfg.soft_temperature is None

    layer_weights = cfg.layer_weights()
    matched = tuple(term for term, weight in layer_weights.items() if weight > 0)
    layers = (
        LayerMatch(student, teacher, cfg.layers(teacher.config.num_hidden_layers), matched).cache(run, transfer)
        if matched
        else None
    )

    def loss(trainer, batch):
        out = trainer(batch, detach_head=detach_head)
        features = sentence_features(out.hidden_states, batch["attention_mask"], run.pooling)
        index = batch["index"]
        terms = distillation_loss(out, teacher_logits[index], teacher_features[index], features, weights)
        if layers is not None:
            for name, term in layers.losses(batch).items():
                terms[name] = term
                terms["total"] = terms["total"] + layer_weights[name] * term
        return terms

    collate = Collator(run.tokenizer.pad_token_id)
    result = fit(
        run,
        Stage(
            "student",
            student,
            trainable(student, cfg),
            cfg.epochs,
            cfg.lr,
            transfer,
            collate,
            loss,
            evaluator(run, student, run.val, collate),
            average=cfg.weight_average,
        ),
    )
    save_model(run, student, cfg.out / "student")
    return student, result


def fit_own_decoder(run: Run, student) -> None:
    """A fresh or key-less student's decoder: re-initialised, then fitted on its own cached outputs."""
    if "student_decoder" not in run.progress:
        with torch.no_grad():
            student.head.reset_parameters()
            if student.bottleneck is not None:
                student.bottleneck.values.normal_(0.0, 0.02)
    encoder_trains = [p.requires_grad for p in student.encoder.parameters()]
    student.encoder.requires_grad_(False)  # fixed while its outputs are cached
    fit_decoder(
        run,
        student,
        "student_decoder",
        encode(run, student, run.train, "student outputs"),
        encode(run, student, run.val, "student val outputs"),
    )
    for p, trains in zip(student.encoder.parameters(), encoder_trains):
        p.requires_grad_(trains)
