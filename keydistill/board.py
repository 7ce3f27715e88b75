"""--report-to tensorboard, live: each stage's loss per optimizer step and its validations as they happen,
on one step axis with the stages end to end (as training_curves.png draws them).

Events are flushed every FLUSH_SECONDS, so `tensorboard --logdir <output-dir>/tensorboard` follows a run
while it trains. At the run's end keydistill.report.write_tensorboard writes the folder whole again from
metrics.json, so that the steps a resumed run repeats do not show twice.
"""

from __future__ import annotations

from pathlib import Path

from keydistill.errors import ConfigError

FLUSH_SECONDS = 10


def tensorboard_writer():
    """TensorBoard's SummaryWriter class; ConfigError when the optional extra is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--report-to tensorboard needs the tensorboard package: pip install keydistill[tensorboard]"
        ) from None
    return SummaryWriter


class Board:
    """Writes only when given a folder (the main rank of a --report-to tensorboard run); a no-op otherwise.
    progress: the run's finished stages in the order they ran (Run.progress), which place a stage's steps."""

    def __init__(self, folder: str | Path | None = None, progress: dict | None = None) -> None:
        self.progress = {} if progress is None else progress
        self.writer = tensorboard_writer()(log_dir=str(folder), flush_secs=FLUSH_SECONDS) if folder else None

    def loss(self, stage: str, step: int, value: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar(f"{stage}/loss", value, self._offset(stage) + step)

    def validation(self, stage: str, step: int, val: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in val.items():
                self.writer.add_scalar(f"{stage}/val_{name}", value, self._offset(stage) + step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _offset(self, stage: str) -> int:
        """The steps of the stages that finished before this one."""
        return sum(int(r["curve"][-1][0]) for name, r in self.progress.items() if name != stage and r.get("curve"))
