"""The curves a run draws: validation points within a short stage (--curve-points) that keep no weights, and
TensorBoard events written while the run trains."""

import json

import pytest
from safetensors.torch import load_file

from keydistill.train import parse_config, run_all
from keydistill.train.loop import curve_points
from tests.helpers.train_fixtures import tiny_args


def test_curve_points_spread_over_the_steps_of_short_stages_only():
    assert curve_points(4, 100, epochs=1, examples=5000, val_rows=500) == {25, 50, 75}
    assert curve_points(4, 9, epochs=2, examples=5000, val_rows=100) == {2, 4, 7}  # 2.25, 4.5, 6.75 rounded
    assert curve_points(4, 600, epochs=4, examples=5000, val_rows=100) == set()  # epoch ends suffice
    assert curve_points(4, 100, epochs=1, examples=4999, val_rows=500) == set()  # validation would cost too much
    assert curve_points(0, 100, epochs=1, examples=5000, val_rows=10) == set()
    assert curve_points(1, 100, epochs=1, examples=5000, val_rows=10) == set()


def tiny_run(tiny, out, *extra):
    return run_all(parse_config(tiny_args(tiny, out, "--epochs", "1", "--val-size", "4", *extra)))


@pytest.fixture(scope="module")
def with_and_without(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    return {n: (root / n, tiny_run(tiny, root / n, "--curve-points", n)) for n in ("4", "0")}


def test_curve_points_are_drawn_and_choose_no_weights(with_and_without):
    (drawn, metrics), (plain, reference) = with_and_without["4"], with_and_without["0"]
    for stage in ("teacher_finetune", "student"):
        points = metrics["validations"][stage]
        assert [p["chooses"] for p in points] == [False, False, False, True]  # 3 within the epoch, then its end
        assert [p["step"] for p in points] == sorted(p["step"] for p in points)
        assert [p for p in reference["validations"][stage] if not p["chooses"]] == []
    # The kept weights, the test figures and the best step are those of the run without curve points.
    for model in ("teacher", "student"):
        ours, theirs = (load_file(folder / model / "model.safetensors") for folder in (drawn, plain))
        assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
        assert metrics[model]["test"] == reference[model]["test"]
    assert metrics["steps_to_best_val"] == reference["steps_to_best_val"]
    assert json.loads((drawn / "metrics.json").read_text())["validations"] == metrics["validations"]
    assert (drawn / "training_curves.png").stat().st_size > 0


def test_tensorboard_events_are_written_while_the_run_trains(tiny, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Without the end-of-run rewrite, whatever the folder holds was written live, stage by stage.
    monkeypatch.setattr("keydistill.report.write_tensorboard", lambda metrics, folder: None)
    metrics = tiny_run(tiny, tmp_path, "--report-to", "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    offset = metrics["curves"]["teacher_finetune"][-1][0] + metrics["curves"]["teacher_bottleneck"][-1][0]
    losses = events.Scalars("student/loss")
    assert [e.value for e in losses] == pytest.approx([loss for _, loss in metrics["curves"]["student"]])
    assert [e.step for e in losses] == [offset + step for step, _ in metrics["curves"]["student"]]
    validations = events.Scalars("student/val_accuracy")
    assert [e.value for e in validations] == pytest.approx(
        [p["val"]["accuracy"] for p in metrics["validations"]["student"]]
    )
