"""What every predictor shares, without PyTorch: the Prediction record, the accepted inputs, and the
length-sorted batching (inputs sorted by token count, each batch padded only to its longest member)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

Text = Union[str, Sequence[str]]  # one text, or a (first, second) pair
Row = tuple[list[int], list[int]]  # one tokenised input: (token ids, token type ids)


@dataclass
class Prediction:
    label: str | None  # the class name (the model's config.id2label); None for a regression model
    score: float  # the probability of that class, or the regression output
    label_id: int | None  # the class index; None for a regression model
    key_indices: list[list[int]] | None = None  # [kept positions][heads]: with return_key_indices=True


class LengthOrderedPredictor:
    """What a predictor shares: predict() over its _encode (columns of texts -> rows) and _predict_batch."""

    def predict(
        self, inputs: Text | Iterable[Text], *, batch_size: int = 32, return_key_indices: bool = False
    ) -> list[Prediction]:
        """One Prediction per input, in input order. inputs: a text, or an iterable of texts and
        (first, second) pairs, which may be mixed."""
        return predict_in_length_order(
            inputs, batch_size, self._encode, lambda rows: self._predict_batch(rows, return_key_indices)
        )

    def _encode(self, columns: list[list[str]]) -> list[Row]:
        raise NotImplementedError

    def _predict_batch(self, rows: list[Row], return_key_indices: bool) -> list[Prediction]:
        raise NotImplementedError


def predict_in_length_order(
    inputs: Text | Iterable[Text],
    batch_size: int,
    encode: Callable[[list[list[str]]], list[Row]],
    run: Callable[[list[Row]], list[Prediction]],
) -> list[Prediction]:
    """One Prediction per input, in input order. encode tokenises columns of texts (one column for single
    texts, two for pairs) into rows; run predicts a batch of rows."""
    texts = [as_texts(item, i) for i, item in enumerate([inputs] if isinstance(inputs, str) else inputs)]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[Prediction | None] = [None] * len(texts)
    for arity in (1, 2):  # tokenizers take single texts and pairs in separate calls
        where = [i for i, t in enumerate(texts) if len(t) == arity]
        if not where:
            continue
        rows = encode([[texts[i][c] for i in where] for c in range(arity)])
        order = sorted(range(len(where)), key=lambda j: len(rows[j][0]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for j, prediction in zip(chunk, run([rows[j] for j in chunk])):
                results[where[j]] = prediction
    return results


def padded(rows: list[Row], pad_id: int) -> dict[str, list[list[int]]]:
    """The rows padded on the right to their longest: input_ids, attention_mask, token_type_ids."""
    width = max(len(ids) for ids, _ in rows)
    return {
        "input_ids": [ids + [pad_id] * (width - len(ids)) for ids, _ in rows],
        "attention_mask": [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows],
        "token_type_ids": [types + [0] * (width - len(types)) for _, types in rows],
    }


def as_texts(item, position: int) -> tuple[str, ...]:
    if isinstance(item, str):
        return (item,)
    if isinstance(item, (tuple, list)) and len(item) in (1, 2) and all(isinstance(t, str) for t in item):
        return tuple(item)
    raise TypeError(f"input {position}: expected a text or a (first, second) pair of texts, got {item!r}")
