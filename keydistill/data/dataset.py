"""Examples as model inputs: `CustomDataset` (tokenised once), dynamic padding, and the batch orders of
training (length-bucketed, seeded) and evaluation (sorted by length)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from keydistill.data.examples import Example


class CustomDataset(torch.utils.data.Dataset):
    """Tokenised examples: single sentences or pairs, truncated to max_length, tokenised once up front.

    examples: `Example`s (what keydistill.data.load_files and load_task return), or plain (text, label) and
    ((first, second), label) rows; a label is a class index, or a score with regression=True. Each item is a
    dict of input_ids, token_type_ids, labels and index (the example's position, which keys caches such as the
    teacher's logits); `Collator` pads a batch of items for the models.

        rows = [("a gripping film", 1), ("dull and long", 0)]
        dataset = CustomDataset(rows, tokenizer, max_length=64)
        loader = DataLoader(dataset, batch_size=32, collate_fn=Collator(tokenizer.pad_token_id))
    """

    def __init__(self, examples: Sequence, tokenizer, max_length: int, regression: bool = False):
        examples = [as_example(row, i) for i, row in enumerate(examples)]
        if not examples:
            raise ValueError("CustomDataset needs at least one example")
        widths = {len(e.texts) for e in examples}
        if len(widths) > 1:  # zip would silently drop the second sentence of the pairs
            first_pair = next(i for i, e in enumerate(examples) if len(e.texts) != len(examples[0].texts))
            raise ValueError(
                f"CustomDataset: example {first_pair} has {len(examples[first_pair].texts)} text(s) and example 0 "
                f"{len(examples[0].texts)}: give single sentences or pairs, not both"
            )
        columns = [list(c) for c in zip(*(e.texts for e in examples))]
        encoded = tokenizer(*columns, truncation=True, max_length=max_length)
        self.input_ids = encoded["input_ids"]
        self.truncated = count_truncated(tokenizer, columns, self.input_ids, max_length)
        self.token_type_ids = encoded.get("token_type_ids") or [[0] * len(ids) for ids in self.input_ids]
        self.labels = torch.tensor([e.label for e in examples], dtype=torch.float32 if regression else torch.long)
        self.pad_token_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.input_ids[i],
            "token_type_ids": self.token_type_ids[i],
            "labels": self.labels[i],
            "index": i,
        }

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    @classmethod
    def concatenated(cls, parts: Sequence["CustomDataset"]) -> "CustomDataset":
        """One dataset of the parts' examples, in order (indices continue across parts)."""
        whole = cls.__new__(cls)
        whole.input_ids = [ids for part in parts for ids in part.input_ids]
        whole.token_type_ids = [ids for part in parts for ids in part.token_type_ids]
        whole.labels = torch.cat([part.labels for part in parts])
        whole.truncated = sum(part.truncated for part in parts)
        whole.pad_token_id = parts[0].pad_token_id
        return whole


def as_example(row, position: int = 0) -> Example:
    """An Example from an Example, a (text, label) row or a ((first, second), label) row."""
    if isinstance(row, Example):
        return row
    try:
        texts, label = row
    except (TypeError, ValueError):
        raise TypeError(
            f"example {position}: expected (text, label) or ((first, second), label), got {row!r}"
        ) from None
    texts = (texts,) if isinstance(texts, str) else tuple(texts)
    if len(texts) not in (1, 2) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"example {position}: expected one text or a pair of texts, got {texts!r}")
    return Example(texts, label)


def count_truncated(tokenizer, columns: list[list[str]], input_ids: list[list[int]], max_length: int) -> int:
    """How many examples lost tokens to max_length: only those that came out exactly max_length long can
    have, so only they are tokenised again without truncation."""
    full = [i for i, ids in enumerate(input_ids) if len(ids) == max_length]
    if not full:
        return 0
    again = tokenizer(*[[column[i] for i in full] for column in columns], truncation=False, verbose=False)["input_ids"]
    return sum(len(ids) > max_length for ids in again)


@dataclass
class Collator:
    """Pads a batch to its longest sequence (dynamic padding) and adds the attention mask."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([it[key] + [value] * (width - len(it[key])) for it in items])

        input_ids = pad("input_ids", self.pad_token_id)
        lengths = torch.tensor([len(it["input_ids"]) for it in items])
        return {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(width) < lengths.unsqueeze(1)).long(),
            "token_type_ids": pad("token_type_ids", 0),
            "labels": torch.stack([it["labels"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
        }


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket_batches: int = 50
) -> list[list[int]]:
    """One epoch's batches of example indices, shuffled yet grouped by length to minimise padding.

    Shuffle, cut into buckets of bucket_batches batches, sort each bucket by length, batch, shuffle the
    batches. The order depends only on (seed, epoch), so a resumed run replays it exactly.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), span):
        bucket = sorted(order[start : start + span], key=lengths.__getitem__)
        batches += [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches for evaluation: sorted by length (least padding), order irrelevant to the metrics."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
