"""keydistill.train end to end on a tiny random BERT: every stage, every output, resume after kill -9."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError

from keydistill import checkpoint
from keydistill.models import BertWithKeyBottleneck, DistilBertWithKeyBottleneck, load_model, student_from_teacher
from keydistill.report import summary_table
from keydistill.train import RunError, TrainConfig, build_parser, parse_config, run_all
from keydistill.train.config import changed_settings
from tests.helpers.train_fixtures import REPO, tiny_args


@pytest.fixture(scope="module")
def sst2_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sst2_run")
    metrics = run_all(parse_config(tiny_args(tiny, out)))
    return out, metrics


def test_every_config_field_is_a_flag():
    flags = set(build_parser().dests) - {"print_config"}
    assert flags == {f for f in TrainConfig.__dataclass_fields__}
    cfg = parse_config(["--task", "stsb", "--max-train-samples", "none", "--bf16", "--student-layers", "0,2"])
    assert (cfg.task, cfg.max_train_samples, cfg.bf16, cfg.layers(4)) == ("stsb", None, True, [0, 2])
    assert TrainConfig().layers(6) == [1, 3, 5] and TrainConfig().layers(5) == [0, 2, 4]


def test_end_to_end_outputs(sst2_run, capsys):
    out, metrics = sst2_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"] == "sst2"
    for model in ("teacher", "student"):
        assert set(saved[model]) == {"val", "test"}
        assert 0.0 <= saved[model]["test"]["accuracy"] <= 1.0
    stages = [e["stage"] for e in saved["history"]]
    assert stages == ["teacher_finetune", "teacher_bottleneck", "teacher_bottleneck", "student", "student"]
    student_epochs = [e for e in saved["history"] if e["stage"] == "student"]
    assert set(student_epochs[0]["loss"]) == {"total", "soft", "task", "feature", "aux"}
    assert all(e["examples_per_s"] > 0 and "accuracy" in e["val"] for e in saved["history"])
    assert 0.0 <= saved["fidelity"] <= 1.0
    table = summary_table(saved, ("accuracy",))
    assert f"(same prediction): {saved['fidelity']:.1%}" in table
    share = saved["student"]["test"]["accuracy"] / saved["teacher"]["test"]["accuracy"]
    assert f"student / teacher test accuracy: {share:.2%}\n" in table  # 92.96% must not read as 93.0%
    codebook = saved["codebook"]
    assert 0.0 <= codebook["key_agreement"] <= 1.0
    assert 1.0 <= codebook["student"]["test_perplexity"] <= 8.0 + 1e-4
    assert json.loads((out / "config.json").read_text())["num_keys"] == 8
    assert (out / "training_curves.png").stat().st_size > 10_000
    teacher, student = load_model(out / "teacher"), load_model(out / "student")
    assert isinstance(teacher, BertWithKeyBottleneck) and teacher.config.num_hidden_layers == 4
    assert isinstance(student, DistilBertWithKeyBottleneck) and student.config.n_layers == 2
    assert tuple(teacher.label_names) == tuple(student.label_names) == ("negative", "positive")
    # Carried keys stay the teacher's (student_ema is off); the student's encoder moved toward them.
    assert torch.equal(student.bottleneck.keys, teacher.bottleneck.keys)
    fresh_student = student_from_teacher(teacher, TrainConfig().layers(4))
    moved = [not torch.equal(a, b) for a, b in zip(student.encoder.parameters(), fresh_student.encoder.parameters())]
    assert sum(moved) > len(moved) // 2
    assert (
        checkpoint.read_record(out / "checkpoints" / "student.best.safetensors")["step"] == saved["steps_to_best_val"]
    )


def test_stsb_regression_reports_correlations_under_bf16(tiny, tmp_path):
    metrics = run_all(parse_config(tiny_args(tiny, tmp_path, "--task", "stsb", "--epochs", "1", "--bf16")))
    for model in ("teacher", "student"):
        assert set(metrics[model]["test"]) == {"pearson", "spearman"}
        assert -1.0 <= metrics[model]["test"]["pearson"] <= 1.0


def test_no_test_validates_only_and_says_so(tiny, tmp_path, capsys):
    """--no-test: settings are chosen without the test split; the job reports validation in its place."""
    metrics = run_all(parse_config(tiny_args(tiny, tmp_path, "--epochs", "1", "--no-test")))
    printed = capsys.readouterr().out
    assert printed.count("--no-test: no test stage, validation is reported") == 1
    assert "test is GLUE dev" not in printed and "test accuracy" not in printed
    for model in ("teacher", "student"):
        assert set(metrics[model]) == {"val"}
    assert set(metrics["rows"]) == {"train", "val"}


def test_key_ablation_refuses_keys(monkeypatch, capsys, tmp_path):
    """--keys would be overridden by every variant: a usage error, not a silent run of all three."""
    import keydistill.ablation as ablation

    started = []
    monkeypatch.setattr(ablation, "run_all", lambda cfg: started.append(cfg.keys))
    for flag in (["--keys", "fresh"], ["--keys=none"]):
        assert ablation.main([*flag, "--output-dir", str(tmp_path)]) == 2
        assert "the ablation runs every choice" in capsys.readouterr().err
    assert started == []


def test_key_ablation_table_from_a_saved_teacher(sst2_run, tiny, tmp_path):
    from keydistill.ablation import main

    teacher_dir = sst2_run[0] / "teacher"
    assert main(tiny_args(tiny, tmp_path, "--teacher-checkpoint", str(teacher_dir), "--epochs", "1")) == 0
    rows = json.loads((tmp_path / "ablation.json").read_text())["cells"]
    assert [r["keys"] for r in rows] == ["carry", "fresh", "none"]
    assert [r["key agreement"] is None for r in rows] == [False, False, True]
    assert all(r["teacher test accuracy"] == sst2_run[1]["teacher"]["test"]["accuracy"] for r in rows)
    for keys in ("carry", "fresh", "none"):  # the teacher was reused, not retrained
        history = json.loads((tmp_path / f"keys_{keys}" / "metrics.json").read_text())["history"]
        # a fresh or key-less student first fits its own decoder (2 bottleneck epochs), a carried one does not
        assert [e["stage"] for e in history] == ["student_decoder"] * 2 * (keys != "carry") + ["student"]
    assert [r["agreement measured"] for r in rows] == [
        "same key ids",
        "after matching keys by assignment",
        "n/a (no student bottleneck)",
    ]
    assert "| carry |" in (tmp_path / "ablation.md").read_text()
    assert "| fresh | k-means on the student's own outputs |" in (tmp_path / "ablation.md").read_text()
    teacher = load_model(teacher_dir)
    fresh = load_model(tmp_path / "keys_fresh" / "student")
    assert not torch.equal(fresh.bottleneck.keys, teacher.bottleneck.keys)  # its own codebook...
    assert not torch.equal(fresh.bottleneck.values, teacher.bottleneck.values)  # ...with its own values
    assert torch.equal(load_model(tmp_path / "keys_carry" / "student").bottleneck.keys, teacher.bottleneck.keys)


def test_matched_key_agreement_sees_through_a_permutation_of_key_ids(seed):
    from keydistill.train.evaluate import key_agreement

    teacher = torch.randint(6, (500, 3))
    permutation = torch.randperm(6)
    student = permutation[teacher]  # the same partition of the data under other key ids
    assert key_agreement(teacher, student, match=True) == 1.0
    assert key_agreement(teacher, student, match=False) == (permutation[teacher] == teacher).float().mean().item()
    noisy = torch.where(torch.rand(500, 3) < 0.2, torch.randint(6, (500, 3)), student)
    assert 0.75 < key_agreement(teacher, noisy, match=True) < 1.0


def test_resume_after_kill_9_matches_an_uninterrupted_run(sst2_run, tiny, tmp_path):
    teacher_dir = str(sst2_run[0] / "teacher")
    args = ["--teacher-checkpoint", teacher_dir, "--epochs", "3", "--checkpoint-every", "2"]
    whole = run_all(parse_config(tiny_args(tiny, tmp_path / "whole", *args)))

    out = tmp_path / "killed"
    latest = out / "checkpoints" / "student.latest.safetensors"
    command = [sys.executable, "-m", "keydistill.train", *tiny_args(tiny, out, *args)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.exists() and not (out / "metrics.json").exists(), "the run must be killed mid-way"
    record = checkpoint.read_record(latest)["state"]
    assert (record["epoch"], record["batch"]) != (3, 0)

    resumed = run_all(parse_config(tiny_args(tiny, out, *args, "--resume")))
    for model in ("teacher", "student"):
        assert resumed[model] == whole[model]
    assert resumed["codebook"]["key_agreement"] == whole["codebook"]["key_agreement"]
    assert len(resumed["history"]) == len(whole["history"])
    for got, want in zip(resumed["history"], whole["history"]):
        assert got["loss"] == pytest.approx(want["loss"])


def test_resume_refuses_changed_settings(sst2_run, tiny, capsys):
    from keydistill.train import main

    assert main(tiny_args(tiny, sst2_run[0], "--resume", "--lr", "0.5")) == 2
    err = capsys.readouterr().err
    assert "whose settings differ (lr: " in err and "-> 0.5)" in err and "--overwrite-output-dir" in err


def test_fidelity_is_the_share_of_same_predictions_or_the_score_correlation(seed):
    from scipy.stats import pearsonr

    from keydistill.data import get_task
    from keydistill.train.evaluate import fidelity

    teacher, student = torch.randn(50, 2), torch.randn(50, 2)
    same = (teacher.argmax(-1) == student.argmax(-1)).sum().item()
    assert fidelity(get_task("sst2"), teacher, student) == pytest.approx(same / 50)
    assert fidelity(get_task("sst2"), teacher, 3 * teacher + 1) == 1.0
    scores, other = torch.randn(50, 1), torch.randn(50, 1)
    expected = pearsonr(scores.squeeze(-1).numpy(), (scores + other).squeeze(-1).numpy())[0]
    assert fidelity(get_task("stsb"), scores, scores + other) == pytest.approx(expected, abs=1e-6)


def test_a_setting_added_after_a_run_is_unchanged_only_at_its_default():
    cfg = parse_config([])
    saved = dataclasses.asdict(cfg)
    del saved["augment"]  # a config.json written before --augment existed
    assert changed_settings(saved, cfg) == {}
    assert changed_settings(saved, dataclasses.replace(cfg, augment=2)) == {"augment": (None, 2)}
    assert changed_settings({**saved, "lr": 1.0}, cfg) == {"lr": (1.0, cfg.lr)}


def test_how_a_run_is_conducted_is_not_a_changed_setting():
    """Checkpoint cadence and the collective timeout decide how a run is carried out, not what it computes:
    --resume, and the GLUE runner's reuse of a finished task, accept runs that differ in them."""
    cfg = parse_config([])
    saved = {
        **dataclasses.asdict(cfg),
        "checkpoint_every": 50,
        "checkpoint_seconds": 5.0,
        "dist_timeout": 1.0,
        "resume": True,
        "output_dir": "a/folder/since/moved",
    }
    assert changed_settings(saved, cfg) == {}
    assert changed_settings({**saved, "eval_every": 3}, cfg) == {"eval_every": (3, 0)}  # it picks the best


FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.mark.parametrize(
    "failure, raised, message",
    [
        (KeyboardInterrupt(), KeyboardInterrupt, None),  # killed mid-write
        (SafetensorError(FULL_DISK), RunError, "cannot write .*latest.safetensors: .*No space left.*--resume"),
    ],
)
def test_a_checkpoint_write_that_fails_leaves_the_old_one(tmp_path, monkeypatch, failure, raised, message):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "latest.safetensors"
    checkpoint.save_checkpoint(path, model, {"step": 1})

    def torn_write(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise failure

    monkeypatch.setattr(checkpoint, "save_file", torn_write)
    with pytest.raises(raised, match=message):
        checkpoint.save_checkpoint(path, torch.nn.Linear(3, 2), {"step": 2})
    restored = torch.nn.Linear(3, 2)
    assert checkpoint.load_checkpoint(path, restored)["step"] == 1
    assert torch.equal(restored.weight, model.weight)
    if raised is RunError:  # a full disk: the torn temporary file is removed
        assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.safetensors"]


def test_a_json_write_that_fails_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(RunError, match="cannot write .*metrics.json: No such file or directory"):
        checkpoint.write_json(tmp_path / "gone" / "metrics.json", {})
