"""python -m keydistill.glue on tiny data: every task found runs, a broken one is reported and skipped, the
table is written in three forms, and a re-run reuses finished tasks."""

import json
import os

import pytest

from keydistill import glue
from keydistill.data import TASKS
from tests.helpers.tiny_models import SHARED_GLUE as _SHARED_GLUE
from tests.helpers.train_fixtures import tiny_args

SHARED_GLUE = str(_SHARED_GLUE)


@pytest.fixture(scope="module")
def table(tiny, tmp_path_factory):
    """SST-2 and STS-B as in the fixture, and an RTE folder whose train file lacks a column."""
    out = tmp_path_factory.mktemp("glue")
    (tiny / "glue" / "RTE").mkdir(exist_ok=True)
    (tiny / "glue" / "RTE" / "train.tsv").write_text("sentence1\tlabel\nhello\tentailment\n")
    (tiny / "glue" / "RTE" / "dev.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\tentailment\n")
    argv = tiny_args(tiny, out, "--epochs", "1")
    code = glue.main(argv)
    return out, argv, code


def test_every_found_task_runs_and_a_broken_one_is_skipped(table, capsys):
    out, _, code = table
    assert code == 1  # RTE failed
    summary = json.loads((out / "glue.json").read_text())
    assert [r["task"] for r in summary["tasks"]] == ["sst2", "stsb"]  # DistilBERT's column order
    assert "RTE/train.tsv:1: missing column(s) ['sentence2']" in summary["failed"]["rte"]
    assert set(summary["not_run"]) == {"cola", "mnli", "mrpc", "qnli", "qqp", "wnli"}
    for row in summary["tasks"]:
        assert (out / row["task"] / "metrics.json").exists() and (out / row["task"] / "config.json").exists()
        assert row["settings"]["task"] == row["task"] and row["settings"]["epochs"] == 1  # the flag beat the recipe
        assert row["inference_examples_per_s"]["student"] > 0
    stsb = summary["tasks"][1]
    assert stsb["settings"]["max_length"] == 128  # STS-B's recipe: pairs get room
    metrics = json.loads((out / "stsb" / "metrics.json").read_text())
    assert stsb["teacher_score"] == pytest.approx(
        50 * (metrics["teacher"]["test"]["pearson"] + metrics["teacher"]["test"]["spearman"])
    )
    assert stsb["majority"] is None and summary["tasks"][0]["majority"]["test"]["accuracy"] > 0


def test_the_table_has_teacher_student_and_share_rows(table):
    out = table[0]
    text = (out / "glue.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {
        "teacher",
        "student",
        "student / teacher",
        "student fidelity",
        "majority class (train's)",
        "majority class (test's)",
    } <= set(rows)
    fidelity = [r["fidelity"] for r in json.loads((out / "glue.json").read_text())["tasks"]]
    assert rows["student fidelity"].split("|")[3:5] == [f" {f:.1%} " for f in fidelity]
    assert "SST-2" in text and "STS-B (pearson/spearman)" in text and "published" in text
    summary = json.loads((out / "glue.json").read_text())["summary"]
    assert summary["share"] == pytest.approx(summary["student"] / summary["teacher"])
    assert f"{summary['share']:.2%}" in rows["student / teacher"]  # 96.98% is not shown as 97.0%
    sst2 = json.loads((out / "glue.json").read_text())["tasks"][0]
    # the test split's own majority is the best constant: never below the train majority's accuracy
    assert sst2["test_majority"]["test"]["accuracy"] >= sst2["majority"]["test"]["accuracy"]
    assert (out / "glue.png").stat().st_size > 10_000


def test_a_rerun_reuses_finished_tasks(table, capsys):
    out, argv, _ = table
    before = json.loads((out / "glue.json").read_text())["tasks"]
    # a run written before a setting existed matches that setting's default (it behaved so)
    config = json.loads((out / "sst2" / "config.json").read_text())
    del config["augment"]
    (out / "sst2" / "config.json").write_text(json.dumps(config))
    assert glue.main([*argv, "--tasks", "sst2,stsb"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the finished run") == 2
    minutes = json.loads((out / "glue.json").read_text())["summary"]["minutes"]
    assert minutes > 0 and f"the tasks' own runs took {minutes:.1f} min in all" in printed  # not this call's 0.0
    after = json.loads((out / "glue.json").read_text())["tasks"]
    assert [(r["teacher"], r["student"]) for r in after] == [(r["teacher"], r["student"]) for r in before]


def test_unknown_task_is_one_line(capsys, tmp_path):
    assert glue.main(["--tasks", "cola,sst3", "--output-dir", str(tmp_path)]) == 2
    assert "unknown task(s) ['sst3']" in capsys.readouterr().err


def test_a_failed_collective_stops_the_table(monkeypatch, capsys, tmp_path):
    """Under torchrun a failed collective leaves the process group unusable: that task fails and the later
    ones are reported as not started instead of each failing on the broken group."""
    from keydistill.train import RunError, distributed

    started = []

    def collective_fails(cfg):
        started.append(cfg.task)
        monkeypatch.setattr(distributed, "_failed_collectives", ["codebook statistics"])
        raise RunError("rank 0: the collective 'codebook statistics' failed")

    monkeypatch.setattr(glue, "run_all", collective_fails)
    assert glue.main(["--tasks", "cola,rte,sst2", "--output-dir", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert started == ["cola"]
    assert "FAILED: cola: rank 0: the collective" in printed
    assert "not run: rte: not started: cola failed on a collective" in printed and "not run: sst2" in printed


def test_recipes_name_only_train_settings():
    from keydistill.train import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    for task in TASKS.values():
        assert {k for k, _ in task.recipe} <= fields, task.name


def test_task_scores_follow_glue():
    assert glue.task_score("cola", {"test": {"mcc": 0.4, "accuracy": 0.8}}) == pytest.approx(40.0)  # MCC alone
    assert glue.task_score("mrpc", {"test": {"f1": 0.9, "accuracy": 0.8}}) == pytest.approx(85.0)
    mnli = {"test": {"accuracy": 0.7}, "test_matched": {"accuracy": 0.7}, "test_mismatched": {"accuracy": 0.6}}
    assert glue.task_score("mnli", mnli) == pytest.approx(65.0)  # matched and mismatched, the alias not twice
    assert glue.cell("cola", {"test": {"mcc": 0.4, "accuracy": 0.8}}) == "40.0"


@pytest.mark.skipif(not os.path.isdir(SHARED_GLUE), reason="the shared GLUE folder is not next to this checkout")
def test_wnli_reports_both_majority_baselines():
    """WNLI's dev set is adversarial: train's majority class scores 43.7 on it, dev's own majority 56.3 (the
    figure GLUE quotes); the table shows both."""
    from keydistill.train import TrainConfig

    of_train, of_test = glue.majority_baselines(TrainConfig(task="wnli", data_dir=SHARED_GLUE))
    assert round(100 * of_train["test"]["accuracy"], 1) == 43.7
    assert round(100 * of_test["test"]["accuracy"], 1) == 56.3
    assert glue.majority_baselines(TrainConfig(task="stsb", data_dir=SHARED_GLUE)) == (None, None)


def fake_metrics(teacher: dict, student: dict) -> dict:
    return {
        "teacher": {"test": teacher},
        "student": {"test": student},
        "teacher_params": 10,
        "student_params": 5,
        "seconds": 1.0,
        "inference_examples_per_s": {"teacher": 1.0, "student": 2.0},
        "fidelity": 0.9,
    }


def test_a_teacher_scoring_zero_does_not_stop_the_table(monkeypatch, capsys, tmp_path):
    """A CoLA teacher that predicts one class has MCC 0: its share is n/a, and the table is still written."""
    monkeypatch.setattr(
        glue, "run_all", lambda cfg: fake_metrics({"mcc": 0.0, "accuracy": 0.7}, {"mcc": 0.1, "accuracy": 0.7})
    )
    monkeypatch.setattr(glue, "majority_baselines", lambda cfg: (None, None))
    assert glue.main(["--tasks", "cola", "--output-dir", str(tmp_path)]) == 0
    assert "(n/a of the teacher)" in capsys.readouterr().out
    assert (tmp_path / "glue.md").exists()


def test_task_singular_is_one_line_not_ignored(monkeypatch, capsys, tmp_path):
    """--task is a keydistill.train flag each task overrides: the runner refuses it rather than run every task."""
    started = []
    monkeypatch.setattr(glue, "run_all", lambda cfg: started.append(cfg.task))
    assert glue.main(["--task", "cola", "--output-dir", str(tmp_path)]) == 2
    assert "takes --tasks" in capsys.readouterr().err and started == []
    assert glue.main(["--task=cola", "--output-dir", str(tmp_path)]) == 2


def test_resume_starts_afresh_a_task_whose_old_run_had_other_settings(monkeypatch, tmp_path):
    """--resume continues an interrupted task of the same settings only; one of other settings (e.g. from
    before a recipe change) is not resumed (the runner then refuses its folder, naming the settings)."""
    import dataclasses

    old = glue.task_config(["--output-dir", str(tmp_path), "--epochs", "1"], "rte")
    old.out.mkdir(parents=True)
    (old.out / "config.json").write_text(json.dumps(dataclasses.asdict(old)))
    assert not glue.task_config(["--output-dir", str(tmp_path), "--epochs", "2", "--resume"], "rte").resume
    assert glue.task_config(["--output-dir", str(tmp_path), "--epochs", "1", "--resume"], "rte").resume
    assert not glue.task_config(["--output-dir", str(tmp_path), "--epochs", "1"], "rte").resume


def test_majority_baselines_read_the_rows_the_run_read(tmp_path):
    """A task run with --skip-bad-rows: its baselines load the data the same way (they failed on the bad row,
    and the finished task was reported as skipped), from the training rows the run used (--max-train-samples)."""
    from keydistill.train import TrainConfig

    folder = tmp_path / "SST-2"
    folder.mkdir()
    rows = [f"good movie {i}\t1" for i in range(30)] + [f"bad film {i}\t0" for i in range(40)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join([*rows, "no label here"]) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\n")
    cfg = TrainConfig(task="sst2", data_dir=str(tmp_path), val_size=2, skip_bad_rows=True, max_train_samples=None)
    of_train, of_test = glue.majority_baselines(cfg)
    assert of_train["test"]["accuracy"] == pytest.approx(1 / 3)  # train's majority: 0
    assert of_test["test"]["accuracy"] == pytest.approx(2 / 3)
