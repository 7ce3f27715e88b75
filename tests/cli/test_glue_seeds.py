"""python -m keydistill.glue --seeds N: each task run N times, the table in mean ± sd, every seed in the JSON."""

import dataclasses
import json

import numpy as np
import pytest

from keydistill import glue
from keydistill.checkpoint import write_json
from keydistill.data import TASKS
from tests.helpers.train_fixtures import tiny_args


def fake_metrics(cfg) -> dict:
    """What run_all returns, with figures that differ by task, seed and model."""

    def results(model_shift):
        value = 0.6 + 0.05 * cfg.seed + model_shift
        return {
            split: {m: value + 0.01 * k for k, m in enumerate(TASKS[cfg.task].metrics)} for split in ("val", "test")
        }

    return {
        "teacher": results(0.1),
        "student": results(0.0),
        "fidelity": 0.9 - 0.01 * cfg.seed,
        "teacher_params": 2000,
        "student_params": 1000,
        "inference_examples_per_s": {"teacher": 10.0, "student": 20.0},
        "rows": {"train": 56},
        "seconds": 6.0,
    }


@pytest.fixture
def fake_runs(monkeypatch):
    calls = []

    def run_all(cfg):  # writes what a finished run leaves for the runner to find
        calls.append(cfg)
        cfg.out.mkdir(parents=True, exist_ok=True)
        write_json(cfg.out / "config.json", dataclasses.asdict(cfg))
        write_json(cfg.out / "metrics.json", fake_metrics(cfg))
        return fake_metrics(cfg)

    monkeypatch.setattr(glue, "run_all", run_all)
    return calls


def test_each_task_runs_once_per_seed_and_the_table_shows_mean_and_sd(tiny, tmp_path, fake_runs):
    argv = tiny_args(tiny, tmp_path, "--tasks", "sst2,stsb", "--seed", "3", "--seeds", "3")
    assert glue.main(argv) == 0
    assert [(c.task, c.seed) for c in fake_runs] == [(t, s) for t in ("sst2", "stsb") for s in (3, 4, 5)]
    assert all(c.out == tmp_path / c.task / f"seed_{c.seed}" for c in fake_runs)
    saved = json.loads((tmp_path / "glue.json").read_text())
    for row in saved["tasks"]:
        scores = [glue.task_score(row["task"], fake_metrics(c)["student"]) for c in fake_runs if c.task == row["task"]]
        assert [s["student_score"] for s in row["seeds"]] == scores
        assert row["student_score"] == pytest.approx(np.mean(scores))
        assert row["student_score_sd"] == pytest.approx(np.std(scores, ddof=1))
        assert row["student"]["test"][TASKS[row["task"]].metrics[0]] == pytest.approx(0.80)
        assert row["seconds"] == pytest.approx(sum(s["seconds"] for s in row["seeds"]))
    by_seed = [np.mean([r["seeds"][i]["teacher_score"] for r in saved["tasks"]]) for i in range(3)]
    assert saved["summary"]["teacher_sd"] == pytest.approx(np.std(by_seed, ddof=1))
    table = (tmp_path / "glue.md").read_text()
    student = next(line for line in table.splitlines() if line.startswith("| student |"))
    assert f"{saved['summary']['student']:.1f} ± {saved['summary']['student_sd']:.1f}" in student
    assert "| 80.0 ± 5.0 |" in student  # sst2 accuracy over seeds 3, 4, 5: 0.60 + 0.05 * seed
    assert "over 3 seeds; each seed trains its own teacher" in table


def test_a_teacher_per_task_is_shared_by_the_seeds(tiny, tmp_path, fake_runs, monkeypatch):
    monkeypatch.setattr(glue, "resolve_teacher", lambda cfg: None)  # the teachers' folders are not made here
    pattern = str(tmp_path / "teachers" / "{task}")
    argv = tiny_args(tiny, tmp_path / "out", "--tasks", "sst2,stsb", "--seeds", "2", "--teacher-checkpoint", pattern)
    assert glue.main(argv) == 0
    assert [c.teacher_checkpoint for c in fake_runs] == [str(tmp_path / "teachers" / t) for t in ("sst2",) * 2] + [
        str(tmp_path / "teachers" / "stsb")
    ] * 2
    assert "the teacher is fixed per task" in (tmp_path / "out" / "glue.md").read_text()


def test_one_seed_keeps_the_plain_layout(tiny, tmp_path, fake_runs):
    assert glue.main(tiny_args(tiny, tmp_path, "--tasks", "sst2")) == 0
    assert fake_runs[0].out == tmp_path / "sst2"
    assert " ± " not in (tmp_path / "glue.md").read_text()


@pytest.mark.parametrize("seeds", ["0", "two"])
def test_seeds_must_be_a_positive_count(tiny, tmp_path, fake_runs, capsys, seeds):
    assert glue.main(tiny_args(tiny, tmp_path / "out", "--seeds", seeds)) == 2
    assert "--seeds: must be a whole number > 0" in capsys.readouterr().err
    assert fake_runs == [] and not (tmp_path / "out").exists()


def test_own_data_flags_are_a_usage_error_before_any_task(tiny, tmp_path, fake_runs, capsys):
    assert glue.main(tiny_args(tiny, tmp_path / "out", "--tasks", "sst2", "--train-file", "x.csv")) == 2
    assert "--train-file: the GLUE runner runs GLUE tasks" in capsys.readouterr().err
    assert fake_runs == [] and not (tmp_path / "out").exists()


def test_no_test_is_a_usage_error_before_any_task(tiny, tmp_path, fake_runs, capsys):
    assert glue.main(tiny_args(tiny, tmp_path / "out", "--tasks", "sst2", "--no-test")) == 2
    assert "--test/--no-test: the GLUE table is of test figures" in capsys.readouterr().err
    assert fake_runs == [] and not (tmp_path / "out").exists()


def test_resume_into_a_run_of_other_settings_names_them_before_any_task(tiny, tmp_path, fake_runs, capsys):
    """--resume continues runs of the same settings; a task folder holding one of other settings is refused
    with the settings that differ (not told to pass the --resume it was given)."""
    assert glue.main(tiny_args(tiny, tmp_path, "--tasks", "sst2", "--epochs", "1")) == 0
    assert glue.main(tiny_args(tiny, tmp_path, "--tasks", "sst2", "--epochs", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "holds a finished run whose settings differ (epochs: 1 -> 2)" in err and "with --resume" not in err
    assert len(fake_runs) == 1


def test_a_moved_run_folder_is_the_same_run(tiny, tmp_path, fake_runs):
    """Where the folder lies is not a setting: a finished task moved elsewhere is reused there."""
    assert glue.main(tiny_args(tiny, tmp_path / "first", "--tasks", "sst2")) == 0
    (tmp_path / "first").rename(tmp_path / "moved")
    assert glue.main(tiny_args(tiny, tmp_path / "moved", "--tasks", "sst2")) == 0
    assert len(fake_runs) == 1
