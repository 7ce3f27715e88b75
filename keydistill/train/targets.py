"""What the student learns from: the transfer set and the teacher's targets on it.

- transfer_set: the training rows and, with --augment N, N teacher-labelled perturbed copies of each
  (keydistill.augment), with the teacher's logits and sentence features for every one;
- LayerMatch (--hidden-weight, --attention-weight, --value-relation-weight): the teacher's layer outputs
  and self-attention, matched against the student layers copied from them.
All are computed once, before training, without gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from keydistill.augment import perturbed_copies
from keydistill.data import CustomDataset, Example
from keydistill.losses import hidden_state_loss, relation_loss
from keydistill.models.transfer import LAYER_NAME_MAP
from keydistill.train.evaluate import predict
from keydistill.train.features import FeatureDataset, collate_features, encode, per_example

if TYPE_CHECKING:
    from keydistill.train.context import Run

# Where each matched tensor comes from inside one layer ("": the layer's own output).
TEACHER_PARTS = {
    "output": "",
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
}
STUDENT_PARTS = {part: LAYER_NAME_MAP.get(name, "") for part, name in TEACHER_PARTS.items()}
# The tensors each loss term reads.
TERMS = {"hidden": ("output",), "attention": ("query", "key"), "value_relation": ("value",)}


class LayerMatch:
    """--hidden-weight, --attention-weight, --value-relation-weight: each student layer against the teacher
    layer it was copied from, by its output (MSE over tokens) and by its self-attention (MiniLM: per head and
    token, the KL of the attention distributions, from the layers' query and key projections, and of the
    value relations, softmax(V V^T / sqrt(d))), the terms named in `terms`. Forward hooks keep the student's
    per-layer tensors of the last forward. The teacher's, fixed, are computed once per example before
    training (float16, in evaluation batches, so a resumed run sees the same targets) when they fit in
    CACHE_BYTES; otherwise the teacher runs beside the student on every batch. Per token and layer they are
    [output | query | key | value] (those the terms read), so the cache grows with tokens, not with their
    square as attention maps would."""

    CACHE_BYTES = 2 << 30

    def __init__(self, student, teacher, teacher_layers: list[int], terms: tuple[str, ...] = ("hidden",)):
        self.teacher, self.teacher_layers, self.cached = teacher.eval(), teacher_layers, None
        self.parts = tuple(part for term in TERMS if term in terms for part in TERMS[term])
        self.num_heads = teacher.config.num_attention_heads
        if set(terms) - {"hidden"} and student.config.n_heads != self.num_heads:
            raise ValueError(
                f"attention matching needs the student's heads ({student.config.n_heads}) to be the "
                f"teacher's ({self.num_heads})"
            )
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        for j, block in enumerate(student.encoder.transformer.layer):
            for part, module in zip(self.parts, self._modules(block, STUDENT_PARTS)):
                module.register_forward_hook(self._keep(self.outputs, (part, j)))

    def _modules(self, block, names: dict) -> list:
        return [block.get_submodule(names[part]) for part in self.parts]  # "" is the block itself

    @staticmethod
    def _keep(store: dict, name):
        def hook(module, inputs, output):
            store[name] = output[0] if isinstance(output, tuple) else output  # a tuple in older transformers

        return hook

    def cache(self, run: Run, dataset) -> "LayerMatch":
        """Compute the teacher's layer tensors on every example of dataset now, if they fit in CACHE_BYTES."""
        size = sum(dataset.lengths()) * len(self.teacher_layers) * len(self.parts) * self.teacher.hidden_size * 2
        if size <= self.CACHE_BYTES:
            self.cached = self.teacher_outputs(run, dataset)
        elif run.ranks.main:
            print(
                f"layer matching: the teacher's layer tensors would take {size / 2**30:.1f} GiB (cache limit "
                f"{self.CACHE_BYTES / 2**30:.0f} GiB): the teacher runs beside the student on every batch"
            )
        return self

    def teacher_states(self, batch: dict) -> torch.Tensor:
        """[B, L, len(teacher_layers), len(parts) * dim]: the teacher layers' tensors on a token batch."""
        kept, hooks = {}, []
        layers = self.teacher.encoder.encoder.layer
        for i in self.teacher_layers:
            for part, module in zip(self.parts, self._modules(layers[i], TEACHER_PARTS)):
                hooks.append(module.register_forward_hook(self._keep(kept, (part, i))))
        try:
            with torch.no_grad():
                self.teacher.encoder(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"],
                )
        finally:
            for hook in hooks:
                hook.remove()
        # float: under autocast the projections come in its dtype, the layer outputs (after LayerNorm) in float32
        return torch.stack(
            [torch.cat([kept[part, i].float() for part in self.parts], -1) for i in self.teacher_layers], dim=2
        )

    def teacher_outputs(self, run: Run, dataset) -> list[torch.Tensor]:
        """Per example, [its tokens, len(teacher_layers), len(parts) * dim] in float16 on the CPU (so up to
        CACHE_BYTES of them never sit on an accelerator)."""
        lengths = dataset.lengths()
        return per_example(
            run,
            dataset,
            lambda batch: self.teacher_states(batch).half().cpu(),
            lambda states, row, i, batch: states[row, : lengths[i]],
            "teacher layer outputs",
            store=torch.device("cpu"),
        )

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """{term: loss} for the terms asked for (of "hidden", "attention", "value_relation"), on the student's
        last forward."""
        if self.cached is None:
            teacher = self.teacher_states(batch)
        else:
            teacher = torch.nn.utils.rnn.pad_sequence(
                [self.cached[i] for i in batch["index"].tolist()], batch_first=True
            ).to(batch["input_ids"].device)
        teacher = dict(zip(self.parts, teacher.chunk(len(self.parts), dim=-1)))
        student = {part: [self.outputs[part, j] for j in range(len(self.teacher_layers))] for part in self.parts}
        mask, scale = batch["attention_mask"], batch.get("token_scale", 1.0)
        terms = {}
        if "output" in self.parts:
            terms["hidden"] = hidden_state_loss(student["output"], teacher["output"].unbind(2), mask, scale)
        # MiniLM's two relations: how each token attends (query-key) and how the values relate (value-value)
        for term, (a, b) in (("attention", ("query", "key")), ("value_relation", ("value", "value"))):
            if a in self.parts:
                terms[term] = relation_loss(
                    list(zip(student[a], student[b])),
                    list(zip(teacher[a].unbind(2), teacher[b].unbind(2))),
                    mask,
                    self.num_heads,
                    scale,
                )
        return terms


def transfer_set(run: Run, teacher, teacher_train: FeatureDataset) -> tuple[CustomDataset, torch.Tensor, torch.Tensor]:
    """What the student learns from: the training rows and, with --augment N, N perturbed copies of each
    (keydistill.augment); with the teacher's logits and sentence features for every one. A copy's hard label
    is the teacher's prediction (its class, or its score for regression)."""
    logits, features = predict(run, teacher, teacher_train, collate_features).logits, teacher_train.pooled()
    if not run.cfg.augment:
        return run.train, logits, features
    regression = run.task.is_regression
    texts = perturbed_copies(run.train_examples, run.cfg.augment, run.cfg.seed)
    copies = CustomDataset(
        [Example(t, 0.0 if regression else 0) for t in texts], run.tokenizer, run.cfg.max_length, regression=regression
    )
    copy_features = encode(run, teacher, copies, "teacher outputs on augmented copies")
    copy_logits = predict(run, teacher, copy_features, collate_features).logits
    copies.labels = (copy_logits.squeeze(-1) if regression else copy_logits.argmax(-1)).cpu().to(copies.labels.dtype)
    if run.ranks.main:
        print(
            f"--augment {run.cfg.augment}: {len(copies)} perturbed copies of {len(run.train)} training rows, "
            f"labelled by the teacher"
        )
    return (
        CustomDataset.concatenated([run.train, copies]),
        torch.cat([logits, copy_logits]),
        torch.cat([features, copy_features.pooled()]),
    )
