"""Predictor: a keydistill model folder's predictions on raw text, with PyTorch.

    from keydistill.predict import Predictor
    predictor = Predictor.from_pretrained("runs/sst2/student")
    predictor.predict(["a gripping film", ("a premise", "a hypothesis")], batch_size=32)

tokenises with the folder's tokenizer, pads each batch only to its longest member (inputs are sorted by
length, so batches waste little), runs the model without gradients (ops backend "auto"), and returns one
Prediction per input, in input order: the label name and its probability, or the score of a regression
model; with return_key_indices=True also the key each bottleneck head chose.
"""

from __future__ import annotations

import os

import torch

from keydistill.devices import check_device
from keydistill.models import KeyBottleneckClassifier, load_model
from keydistill.models.classifiers import has_tokenizer
from keydistill.predict.base import LengthOrderedPredictor, Prediction, Row, padded


class Predictor(LengthOrderedPredictor):
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

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.model.label_names

    @property
    def is_regression(self) -> bool:
        return self.model.is_regression

    @property
    def max_positions(self) -> int:
        """The longest max_length the model takes (its position embeddings)."""
        return self.model.config.max_position_embeddings

    def _encode(self, columns: list[list[str]]) -> list[Row]:
        encoded = self.tokenizer(*columns, truncation=True, max_length=self.max_length)
        ids = encoded["input_ids"]
        types = encoded["token_type_ids"] if "token_type_ids" in encoded else [[0] * len(x) for x in ids]
        return list(zip(ids, types))

    @torch.inference_mode()
    def _predict_batch(self, rows: list[Row], with_keys: bool) -> list[Prediction]:
        batch = padded(rows, self.tokenizer.pad_token_id or 0)
        device = self.model.device
        out = self.model(**{k: torch.tensor(v, device=device) for k, v in batch.items()})
        logits = out.logits.float().cpu()
        keys = _keys_per_row(out) if with_keys else [None] * len(logits)
        if self.model.is_regression:
            return [Prediction(None, float(row[0]), None, k) for row, k in zip(logits, keys)]
        probs, ids = logits.softmax(-1).max(-1)
        names = self.model.label_names
        return [Prediction(names[int(i)], float(p), int(i), k) for p, i, k in zip(probs, ids, keys)]


def _keys_per_row(out) -> list[list[list[int]] | None]:
    """The key indices [N, H] of a batch split by row: [kept positions of the row][heads]."""
    if out.key_indices is None:  # a plain head: no keys
        return [None] * len(out.logits)
    counts = out.positions.sum(1).tolist()
    return [rows.tolist() for rows in out.key_indices.cpu().split(counts)]


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
