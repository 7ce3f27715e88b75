"""A larger transfer set for small tasks: perturbed copies of the training examples, labelled by the teacher.

On a task of a few thousand rows the student sees the teacher's answers on those rows only, and the teacher
has nearly memorised them. Asking the teacher about nearby inputs as well ("function matching": Beyer et al.,
2022; TinyBERT's task augmentation: Jiao et al., 2020) shows the student where the teacher's decisions change,
which is what an acceptability task such as CoLA is about: most word-level edits of a sentence make it
ungrammatical, and the teacher's soft labels say how much.

Edits act on whitespace-separated words of each text (so any tokenizer fits), one to three per copy:
delete a word, swap two neighbouring words, repeat a word, or put a word of another training text in its place.
The copies carry no label of their own: the student stage labels them with the teacher's predictions.
"""

from __future__ import annotations

import random
from typing import Sequence

from keydistill.data import Example

EDITS = ("delete", "swap", "repeat", "replace")
EDIT_SHARE = 0.15  # edits per word of a text, at least one and at most three


def perturbed_copies(examples: Sequence[Example], copies: int, seed: int) -> list[tuple[str, ...]]:
    """The texts of `copies` edited versions of every example, in example order; the same on every call (and
    every data-parallel rank) for the same seed."""
    rng = random.Random(seed)
    vocabulary = sorted({w for e in examples for text in e.texts for w in text.split()})
    out = []
    for example in examples:
        for _ in range(copies):
            out.append(tuple(perturbed(text, rng, vocabulary) for text in example.texts))
    return out


def perturbed(text: str, rng: random.Random, vocabulary: Sequence[str]) -> str:
    """text with a few random word edits; a text of one word can only be repeated or replaced."""
    words = text.split()
    if not words:
        return text
    for _ in range(min(3, max(1, round(EDIT_SHARE * len(words))))):
        words = edited(words, rng.choice(EDITS), rng, vocabulary)
    return " ".join(words)


def edited(words: list[str], edit: str, rng: random.Random, vocabulary: Sequence[str]) -> list[str]:
    i = rng.randrange(len(words))
    if edit == "delete" and len(words) > 1:
        return words[:i] + words[i + 1 :]
    if edit == "swap" and len(words) > 1:
        i = min(i, len(words) - 2)
        return words[:i] + [words[i + 1], words[i]] + words[i + 2 :]
    if edit == "repeat" or not vocabulary:
        return words[: i + 1] + words[i:]
    return words[:i] + [rng.choice(vocabulary)] + words[i + 1 :]
