"""What the student learns from: the transfer set and the teacher's targets on it.

- transfer_set: the training rows and, with --augment N, N teacher-labelled perturbed copies of each
  (keydistill.augment), with the teacher's logits and sentence features for every one;
- LayerMatch (--hidden-weight): the teacher's layer outputs, matched against the student layers copied
  from them.
All are computed once, before training, without gradients.
"""
from __future__ import annotations

import torch

from keydistill.augment import perturbed_copies
from keydistill.data import CustomDataset, Example
from keydistill.losses import hidden_state_loss
from keydistill.train.evaluate import predict
from keydistill.train.features import FeatureDataset, collate_features, encode, per_example


class LayerMatch:
    """--hidden-weight: each student layer's output against the output of the teacher layer it was copied
    from. Forward hooks keep the student's layer outputs of the last forward. The teacher's, fixed, are
    computed once per example before training (float16, in evaluation batches, so a resumed run sees the same
    targets) when they fit in CACHE_BYTES; otherwise the teacher runs beside the student on every batch."""

    CACHE_BYTES = 2 << 30

    def __init__(self, student, teacher, teacher_layers: list[int]):
        self.teacher, self.teacher_layers, self.outputs, self.cached = teacher.eval(), teacher_layers, {}, None
        for j, block in enumerate(student.encoder.transformer.layer):
            block.register_forward_hook(self.keep(j))

    def cache(self, run, dataset) -> "LayerMatch":
        """Compute the teacher's layer outputs on every example of dataset now, if they fit in CACHE_BYTES."""
        size = sum(dataset.lengths()) * len(self.teacher_layers) * self.teacher.hidden_size * 2
        if size <= self.CACHE_BYTES:
            self.cached = self.teacher_outputs(run, dataset)
        elif run.ranks.main:
            print(f"--hidden-weight: the teacher's layer outputs would take {size / 2**30:.1f} GiB (cache limit "
                  f"{self.CACHE_BYTES / 2**30:.0f} GiB): the teacher runs beside the student on every batch")
        return self

    def keep(self, j: int):
        def hook(module, inputs, output):
            self.outputs[j] = output[0] if isinstance(output, tuple) else output  # a tuple in older transformers
        return hook

    def teacher_states(self, batch: dict) -> torch.Tensor:
        """[B, L, len(teacher_layers), dim]: the teacher layers' outputs on a token batch."""
        with torch.no_grad():
            states = self.teacher.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          token_type_ids=batch["token_type_ids"], output_hidden_states=True).hidden_states
        return torch.stack([states[i + 1] for i in self.teacher_layers], dim=2)  # [0] is the embeddings

    def teacher_outputs(self, run, dataset) -> list[torch.Tensor]:
        """Per example, [its tokens, len(teacher_layers), dim] in float16 on the CPU (so up to CACHE_BYTES of
        them never sit on an accelerator)."""
        lengths = dataset.lengths()
        return per_example(run, dataset, lambda batch: self.teacher_states(batch).half().cpu(),
                           lambda states, row, i, batch: states[row, :lengths[i]], "teacher layer outputs",
                           store=torch.device("cpu"))

    def loss(self, batch: dict) -> torch.Tensor:
        if self.cached is None:
            teacher = self.teacher_states(batch)
        else:
            teacher = torch.nn.utils.rnn.pad_sequence([self.cached[i] for i in batch["index"].tolist()],
                                                      batch_first=True).to(batch["input_ids"].device)
        student = [self.outputs[j] for j in range(len(self.teacher_layers))]
        return hidden_state_loss(student, teacher.unbind(2), batch["attention_mask"], batch.get("token_scale", 1.0))


def transfer_set(run, teacher, teacher_train: FeatureDataset) -> tuple[CustomDataset, torch.Tensor, torch.Tensor]:
    """What the student learns from: the training rows and, with --augment N, N perturbed copies of each
    (keydistill.augment); with the teacher's logits and sentence features for every one. A copy's hard label
    is the teacher's prediction (its class, or its score for regression)."""
    logits, features = predict(run, teacher, teacher_train, collate_features).logits, teacher_train.pooled()
    if not run.cfg.augment:
        return run.train, logits, features
    regression = run.task.is_regression
    texts = perturbed_copies(run.train_examples, run.cfg.augment, run.cfg.seed)
    copies = CustomDataset([Example(t, 0.0 if regression else 0) for t in texts], run.tokenizer,
                           run.cfg.max_length, regression=regression)
    copy_features = encode(run, teacher, copies, "teacher outputs on augmented copies")
    copy_logits = predict(run, teacher, copy_features, collate_features).logits
    copies.labels = (copy_logits.squeeze(-1) if regression else copy_logits.argmax(-1)).cpu().to(copies.labels.dtype)
    if run.ranks.main:
        print(f"--augment {run.cfg.augment}: {len(copies)} perturbed copies of {len(run.train)} training rows, "
              f"labelled by the teacher")
    return (CustomDataset.concatenated([run.train, copies]), torch.cat([logits, copy_logits]),
            torch.cat([features, copy_features.pooled()]))
