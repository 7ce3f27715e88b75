"""The training state and its checkpoints: TrainState is the latest checkpoint's record (a JSON round trip
gives it back, records written before it existed still load), and the Checkpointer restores what it saved."""

import json

import pytest
import torch

from keydistill.bottleneck import BottleneckConfig
from keydistill.checkpoint import read_record, save_checkpoint
from keydistill.data import get_task
from keydistill.optim import make_optimizer
from keydistill.train import RunError, parse_config
from keydistill.train.averaging import WeightAverage
from keydistill.train.checkpointer import Checkpointer
from keydistill.train.context import Run
from keydistill.train.state import Stage, TrainState

# A latest checkpoint's "state" as the loop wrote it before TrainState: an 11-key dict, in its key order
TODAYS_RECORD = {
    "epoch": 1,
    "batch": 3,
    "step": 7,
    "history": [
        {
            "stage": "student",
            "epoch": 1,
            "step": 5,
            "loss": {"total": 0.5, "task": 0.25},
            "val": {"accuracy": 0.75},
            "examples_per_s": 100.0,
            "seconds": 0.4,
        }
    ],
    "curve": [[1, 0.75], [2, 0.5], [3, 0.625], [4, 0.5], [5, 0.375], [6, 0.5], [7, 0.25]],
    "best_val": {"accuracy": 0.75},
    "best_step": 5,
    "sums": {"total": 6.0, "task": 3.0},
    "count": 16,
    "seconds": 0.125,
    "global_batch": 8,
}


def trained_state() -> TrainState:
    state = TrainState(global_batch=8)
    state.add_step({"total": 6.0, "task": 2.0}, 8, next_batch=1)
    state.add_step({"total": 3.0, "task": 1.0}, 4, next_batch=2)
    state.seconds = 0.5
    state.end_epoch("student", {"accuracy": 0.5})
    state.add_step({"total": 2.0, "task": 1.0}, 8, next_batch=1)
    state.best_val, state.best_step = {"accuracy": 0.5}, 2
    return state


def test_the_state_survives_its_checkpoint_record():
    state = trained_state()
    record = json.loads(json.dumps(state.to_dict()))  # as the checkpoint's JSON metadata holds it
    assert TrainState.from_dict(record, global_batch=16) == state  # its own global batch, not the run's
    assert TrainState.from_dict(TrainState(4).to_dict(), 4) == TrainState(4)


def test_steps_and_epochs_are_counted_as_the_loop_counted_them():
    state = trained_state()
    assert state.curve == [[1, 6.0 / 8], [2, 3.0 / 4], [3, 2.0 / 8]]
    (epoch,) = state.history
    assert epoch["loss"] == {"total": 9.0 / 12, "task": 3.0 / 12}
    assert (epoch["epoch"], epoch["step"], epoch["examples_per_s"], epoch["seconds"]) == (1, 2, 12 / 0.5, 0.5)
    assert (state.epoch, state.batch, state.step, state.count, state.seconds) == (1, 1, 3, 8, 0.0)
    assert state.sums == {"total": 2.0, "task": 1.0}  # the new epoch's only


def test_a_record_in_todays_format_loads_and_is_written_back_unchanged():
    state = TrainState.from_dict(json.loads(json.dumps(TODAYS_RECORD)), global_batch=8)
    assert (state.epoch, state.batch, state.step, state.count) == (1, 3, 7, 16)
    assert state.best_val == {"accuracy": 0.75} and state.best_step == 5
    assert state.history == TODAYS_RECORD["history"] and state.curve == TODAYS_RECORD["curve"]
    assert state.to_dict() == {**TODAYS_RECORD, "validations": []}  # validations: kept since (--curve-points)


def test_a_record_from_before_the_global_batch_was_kept_takes_the_runs():
    older = {k: v for k, v in TODAYS_RECORD.items() if k != "global_batch"}
    assert TrainState.from_dict(older, global_batch=32).global_batch == 32
    written = {**TODAYS_RECORD, "global_batch": 32, "validations": []}
    assert TrainState.from_dict(older, global_batch=32).to_dict() == written


def make_run(tmp_path, *flags) -> Run:
    cfg = parse_config(["--output-dir", str(tmp_path), *flags])
    return Run(
        cfg=cfg,
        task=get_task("sst2"),
        device=torch.device("cpu"),
        tokenizer=None,
        teacher_bottleneck=BottleneckConfig(),
        train=None,
        val=None,
        tests={},
        progress={},
    )


def make_stage(seed: int, validate=lambda: {"accuracy": 0.5}) -> Stage:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return Stage("student", model, list(model.parameters()), 2, 1e-2, None, None, None, validate)


def trained_checkpointer(run: Run, stage: Stage) -> Checkpointer:
    """A checkpointer whose optimizer has stepped once (so it has state to save) and whose average moved."""
    optimizer = make_optimizer([{"params": stage.params, "weight_decay": 0.0}], lr=stage.lr)
    average = WeightAverage(stage.params, 0.5)
    stage.model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    average.update()
    return Checkpointer(run, stage, optimizer, average)


def fresh_checkpointer(run: Run, stage: Stage) -> Checkpointer:
    optimizer = make_optimizer([{"params": stage.params, "weight_decay": 0.0}], lr=stage.lr)
    return Checkpointer(run, stage, optimizer, WeightAverage(stage.params, 0.5))


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    a, b = a.state_dict(), b.state_dict()
    assert json.dumps(a["param_groups"]) == json.dumps(b["param_groups"])  # (tuples come back as JSON lists)
    assert a["state"].keys() == b["state"].keys()
    for index, slots in a["state"].items():
        assert slots.keys() == b["state"][index].keys() and len(slots) > 0
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][name])), (index, name)


def test_the_checkpointer_restores_what_it_saved(tmp_path):
    saved = trained_checkpointer(make_run(tmp_path), make_stage(0))
    state = trained_state()
    saved.save_latest(state)
    resumed = fresh_checkpointer(make_run(tmp_path, "--resume"), make_stage(1))
    restored = resumed.restore(TrainState(global_batch=8))
    assert restored == state
    for a, b in zip(resumed.stage.params, saved.stage.params):
        assert torch.equal(a, b)
    for a, b in zip(resumed.average.average, saved.average.average):
        assert torch.equal(a, b)
    assert_same_optimizer_state(resumed.optimizer, saved.optimizer)
    fresh = fresh_checkpointer(make_run(tmp_path), make_stage(1))  # no --resume: a fresh start
    assert fresh.restore(TrainState(global_batch=8)) == TrainState(global_batch=8)


def test_the_best_checkpoint_is_the_truth_about_the_best_on_resume(tmp_path):
    """Validation improves after the latest checkpoint was written: the best checkpoint's score and step win."""
    scores = iter([{"accuracy": 0.25}, {"accuracy": 0.75}])
    saved = trained_checkpointer(make_run(tmp_path), make_stage(0, validate=lambda: next(scores)))
    state = TrainState(global_batch=8, step=2)
    saved.validate(state)
    saved.save_latest(state)
    state.step = 3
    saved.validate(state)
    assert read_record(saved.best) == {"step": 3, "val": {"accuracy": 0.75}}
    restored = fresh_checkpointer(make_run(tmp_path, "--resume"), make_stage(1)).restore(TrainState(8))
    assert (restored.step, restored.best_step, restored.best_val) == (2, 3, {"accuracy": 0.75})


def test_a_checkpoint_written_before_train_state_resumes(tmp_path):
    """A latest checkpoint whose record is the loop's old dict, without the global batch as older ones were."""
    saved = trained_checkpointer(make_run(tmp_path), make_stage(0))
    older = {k: v for k, v in TODAYS_RECORD.items() if k != "global_batch"}
    save_checkpoint(saved.latest, saved.stage.model, {"state": older}, saved.optimizer, saved.average.tensors())
    restored = fresh_checkpointer(make_run(tmp_path, "--resume"), make_stage(1)).restore(TrainState(8))
    assert restored.to_dict() == {**TODAYS_RECORD, "validations": []}


def test_resuming_with_another_global_batch_is_refused(tmp_path):
    saved = trained_checkpointer(make_run(tmp_path), make_stage(0))
    saved.save_latest(TrainState(global_batch=16))
    resumed = fresh_checkpointer(make_run(tmp_path, "--resume"), make_stage(1))
    with pytest.raises(RunError, match="written by a run of 16 examples per batch .* resumed with 8"):
        resumed.restore(TrainState(global_batch=8))
