"""Batches on the device, and cached encoder outputs: a dataset of the vectors a bottleneck reads.

Once an encoder is fixed, its outputs can be computed once and the bottleneck and head trained on them
(the teacher's bottleneck fit; a fresh student's decoder fit), which costs a fraction of a full forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from keydistill.data import Collator, CustomDataset, eval_batches
from keydistill.train import distributed

if TYPE_CHECKING:
    from keydistill.train.context import Run


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

    def pooled(self) -> torch.Tensor:
        """[N, dim]: each example's sentence feature (the first token, or the mean of its tokens)."""
        return torch.stack([f.mean(0) for f in self.features])


def collate_features(items: list[dict]) -> dict[str, torch.Tensor]:
    hidden = torch.nn.utils.rnn.pad_sequence([it["hidden"] for it in items], batch_first=True)
    lengths = torch.tensor([len(it["hidden"]) for it in items])
    return {
        "hidden": hidden,
        "attention_mask": (torch.arange(hidden.shape[1]) < lengths.unsqueeze(1)).long(),
        "labels": torch.stack([it["labels"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }


def forward(model, batch: dict, with_labels: bool = True):
    """Run a model on a token batch, or only what follows its encoder on a cached-feature batch."""
    labels = batch["labels"] if with_labels else None
    if "hidden" in batch:
        return model.forward_hidden(batch["hidden"], batch["attention_mask"], labels=labels)
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=labels)


def batches_on(device: torch.device, dataset, collate, batch_indices):
    """(indices, batch moved to device) per batch of example indices."""
    for indices in batch_indices:
        batch = collate([dataset[i] for i in indices])
        yield indices, {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def pooling_of(model) -> str:
    """What a model's head reads: its bottleneck's pooling, or the first token without a bottleneck."""
    return model.bottleneck.config.pooling if model.bottleneck is not None else "cls"


def progress_bar(iterable=None, **kwargs):
    """tqdm on rank 0 only (data-parallel ranks would print the same bar N times)."""
    return tqdm(iterable, mininterval=2, disable=not distributed.is_main(), **kwargs)


def sharded(run: Run, dataset, collate, batch_size: int, desc: str | None = None):
    """(indices, batch on the device) for this rank's share of evaluation batches of dataset."""
    batches = distributed.round_robin(eval_batches(dataset.lengths(), batch_size), run.ranks)
    items = batches_on(run.device, dataset, collate, batches)
    return progress_bar(items, total=len(batches), desc=desc, unit="batch") if desc else items


def gathered(run: Run, per_example: dict, size: int, name: str, store: torch.device | None = None) -> list:
    """{example index: value} from this rank -> [value per example] from every rank, in dataset order; other
    ranks' values land on store (default the run's device)."""
    if run.ranks.active:
        merged = {}
        for part in distributed.all_gather_objects({i: v.cpu() for i, v in per_example.items()}, name):
            merged.update(part)
        per_example = {i: v.to(store or run.device) for i, v in merged.items()}
    return [per_example[i] for i in range(size)]


@torch.no_grad()
def per_example(run: Run, dataset: CustomDataset, outputs, kept, desc: str, store: torch.device | None = None) -> list:
    """[kept(outputs(batch), row, i, batch) for each example i], in dataset order: outputs runs (under autocast)
    on this rank's share of evaluation batches, kept takes example i (batch row `row`) from them, and the
    ranks' shares are gathered on each. store: where kept tensors live (default the run's device)."""
    values = {}
    for indices, batch in sharded(run, dataset, Collator(run.tokenizer.pad_token_id), run.cfg.eval_batch_size, desc):
        with run.autocast():
            out = outputs(batch)
        for row, i in enumerate(indices):
            values[i] = kept(out, row, i, batch).clone()  # a copy: a view would keep the whole batch alive
    return gathered(run, values, len(dataset), f"gather {desc}", store)


def encode(run: Run, model, dataset: CustomDataset, desc: str) -> FeatureDataset:
    """The model's encoder outputs at its bottleneck's kept positions, per example, in dataset order
    (computed in shares by the data-parallel ranks, then gathered on each)."""
    model.eval()
    cls_only = pooling_of(model) == "cls"

    def hidden_states(batch):
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).hidden_states

    def kept(hidden, row, i, batch):
        return (hidden[row, :1] if cls_only else hidden[row][batch["attention_mask"][row].bool()]).float()

    return FeatureDataset(per_example(run, dataset, hidden_states, kept, desc), dataset.labels.to(run.device))
