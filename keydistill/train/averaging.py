"""--weight-average: the student validated and kept as an exponential moving average of its weights.

On a task of a few thousand rows the trained weights swing from step to step, and so does the validation
score the best epoch is picked by; their average over the last few hundred steps (Polyak averaging) swings
far less. Training itself is unchanged: the optimizer steps the trained weights, and the average follows
them after every step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

PREFIX = "average."  # checkpoint tensor names of the averaged weights


class WeightAverage:
    """average <- decay * average + (1 - decay) * weights after every optimizer step, per trained parameter."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.average = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for average, p in zip(self.average, self.params):
            average.lerp_(p, 1.0 - self.decay)

    @contextmanager
    def swapped_in(self):
        """The averaged weights in the model while the block runs (validation, saving the best); the trained
        weights back afterwards, bit for bit, also when the block raises."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for p, average in zip(self.params, self.average):
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, weights in zip(self.params, trained):
                    p.copy_(weights)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averages, named for a checkpoint (so a resumed run continues the same average: load)."""
        return {f"{PREFIX}{i}": average for i, average in enumerate(self.average)}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, average in enumerate(self.average):
            average.copy_(tensors[f"{PREFIX}{i}"])
