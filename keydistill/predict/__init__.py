"""Predictions on raw text: `Predictor` in Python, `python -m keydistill.predict` on the command line.

    from keydistill.predict import Predictor
    predictor = Predictor.from_pretrained("runs/sst2/student")
    predictor.predict(["a gripping film", ("a premise", "a hypothesis")], batch_size=32)

tokenises with the folder's tokenizer, pads each batch only to its longest member (inputs are sorted by
length, so batches waste little), runs the model without gradients (ops backend "auto"), and returns one
Prediction per input, in input order: the label name and its probability, or the score of a regression
model; with return_key_indices=True also the key each bottleneck head chose.

The command line (keydistill.predict.cli) reads its input files with keydistill.predict.inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import torch

from keydistill.devices import check_device
from keydistill.models import KeyBottleneckClassifier, load_model
from keydistill.models.classifiers import has_tokenizer

Text = Union[str, Sequence[str]]  # one text, or a (first, second) pair


@dataclass
class Prediction:
    label: str | None  # the class name (the model's config.id2label); None for a regression model
    score: float  # the probability of that class, or the regression output
    label_id: int | None  # the class index; None for a regression model
    key_indices: list[list[int]] | None = None  # [kept positions][heads]: with return_key_indices=True


class Predictor:
    """A model, its tokenizer and a truncation length: predictions on raw text."""

    def __init__(self, model: KeyBottleneckClassifier, tokenizer, *, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        # Truncate where the model's position embeddings end (or earlier, if the tokenizer says so); past
        # them there is no position embedding, so a longer max_length could only fail in the forward.
        limit = model.config.max_position_embeddings
        if max_length is not None and not 1 <= max_length <= limit:
            raise ValueError(
                f"max_length must be between 1 and the model's max_position_embeddings ({limit}), got {max_length}"
            )
        if max_length is None:
            max_length = min(limit, getattr(tokenizer, "model_max_length", None) or limit)
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, device: str | torch.device | None = None, max_length: int | None = None
    ) -> "Predictor":
        """The model and tokenizer saved in `folder`, on `device` (default: cuda when available, else cpu).
        ValueError for a device that does not exist here, OSError for a folder without tokenizer files."""
        from transformers import AutoTokenizer

        device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(folder)
        # transformers 5 loads a folder without tokenizer files as an empty-vocabulary tokenizer (every
        # word [UNK]) instead of raising: predictions would be silently meaningless.
        if not has_tokenizer(folder):
            raise OSError(f"{folder}: no tokenizer (tokenizer_config.json)")
        try:
            model = model.to(device)
        except RuntimeError as e:  # a device type torch knows but this machine lacks (mps, xpu, ...)
            raise ValueError(f"device {str(device)!r}: {e}") from None
        return cls(model, AutoTokenizer.from_pretrained(str(folder)), max_length=max_length)

    def predict(
        self, inputs: Text | Iterable[Text], *, batch_size: int = 32, return_key_indices: bool = False
    ) -> list[Prediction]:
        """One Prediction per input, in input order. inputs: a text, or an iterable of texts and
        (first, second) pairs, which may be mixed."""
        texts = [_as_texts(item, i) for i, item in enumerate([inputs] if isinstance(inputs, str) else inputs)]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results: list[Prediction | None] = [None] * len(texts)
        for arity in (1, 2):  # the tokenizer takes single texts and pairs in separate calls
            where = [i for i, t in enumerate(texts) if len(t) == arity]
            if not where:
                continue
            columns = [[texts[i][c] for i in where] for c in range(arity)]
            encoded = self.tokenizer(*columns, truncation=True, max_length=self.max_length)
            order = sorted(range(len(where)), key=lambda j: len(encoded["input_ids"][j]))
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = self._padded(encoded, chunk)
                for j, prediction in zip(chunk, self._predict_batch(batch, return_key_indices)):
                    results[where[j]] = prediction
        return results

    def _padded(self, encoded, rows: list[int]) -> dict[str, torch.Tensor]:
        """The rows' token ids padded on the right to their longest, with attention mask and token types."""
        ids = [encoded["input_ids"][j] for j in rows]
        types = (
            [encoded["token_type_ids"][j] for j in rows] if "token_type_ids" in encoded else [[0] * len(x) for x in ids]
        )
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        return {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "token_type_ids": torch.tensor([t + [0] * (width - len(t)) for t in types]),
        }

    @torch.inference_mode()
    def _predict_batch(self, batch: dict[str, torch.Tensor], with_keys: bool) -> list[Prediction]:
        device = self.model.device
        out = self.model(**{k: v.to(device) for k, v in batch.items()})
        logits = out.logits.float().cpu()
        keys = _keys_per_row(out) if with_keys else [None] * len(logits)
        if self.model.is_regression:
            return [Prediction(None, float(row[0]), None, k) for row, k in zip(logits, keys)]
        probs, ids = logits.softmax(-1).max(-1)
        names = self.model.label_names
        return [Prediction(names[int(i)], float(p), int(i), k) for p, i, k in zip(probs, ids, keys)]


def _as_texts(item, position: int) -> tuple[str, ...]:
    if isinstance(item, str):
        return (item,)
    if isinstance(item, (tuple, list)) and len(item) in (1, 2) and all(isinstance(t, str) for t in item):
        return tuple(item)
    raise TypeError(f"input {position}: expected a text or a (first, second) pair of texts, got {item!r}")


def _keys_per_row(out) -> list[list[list[int]] | None]:
    """The key indices [N, H] of a batch split by row: [kept positions of the row][heads]."""
    if out.key_indices is None:  # a plain head: no keys
        return [None] * len(out.logits)
    counts = out.positions.sum(1).tolist()
    return [rows.tolist() for rows in out.key_indices.cpu().split(counts)]


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
