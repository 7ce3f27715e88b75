"""python -m keydistill.ablation as a grid: training sizes x seeds x the three key variants, aggregated over
seeds, resumable, and a bad --train-sizes refused before any work."""

import dataclasses
import json

import numpy as np
import pytest

import keydistill.ablation as ablation
from keydistill.seeds import aggregate, mean_sd, shown
from tests.helpers.train_fixtures import tiny_args


def test_seeds_aggregate_to_numpys_mean_and_sample_sd():
    per_seed = [{"acc": 0.81, "agree": 0.5, "na": None}, {"acc": 0.84, "agree": 0.7, "na": None}, {"acc": 0.78}]
    per_seed[2] |= {"agree": 0.65, "na": None}
    stats = aggregate(per_seed, ("acc", "agree", "na"))
    for key in ("acc", "agree"):
        values = np.array([r[key] for r in per_seed])
        assert stats[key]["mean"] == pytest.approx(values.mean(), abs=1e-15)
        assert stats[key]["sd"] == pytest.approx(values.std(ddof=1), abs=1e-15)
        assert stats[key]["seeds"] == list(values)
    assert stats["na"] is None
    assert mean_sd([0.7]) == (0.7, 0.0)
    assert (
        shown(stats["acc"])
        == f"{100 * np.mean([0.81, 0.84, 0.78]):.1f} ± {100 * np.std([0.81, 0.84, 0.78], ddof=1):.1f}"
    )
    assert shown(aggregate([{"acc": 0.5}], ("acc",))["acc"]) == "50.0" and shown(None) == "n/a"


def test_carry_is_compared_seed_by_seed_with_fresh_and_none():
    scores = {("carry", 0): 0.80, ("fresh", 0): 0.78, ("none", 0): 0.81, ("carry", 1): 0.70, ("fresh", 1): 0.71}
    cells = [{"size": 500, "keys": k, "seed": s, "test accuracy": v} for (k, s), v in scores.items()]
    (diff,) = ablation.differences(cells, "test accuracy")
    paired = np.array([0.80 - 0.78, 0.70 - 0.71])  # seed by seed, not the difference of the means' spreads
    assert diff["carry - fresh"]["mean"] == pytest.approx(paired.mean())
    assert diff["carry - fresh"]["sd"] == pytest.approx(paired.std(ddof=1))
    assert diff["carry - none"]["seeds"] == pytest.approx([0.80 - 0.81])  # seed 1 has no none run
    assert diff["size"] == 500


def fake_metrics(cfg) -> dict:
    """What run_all returns, with figures that tell the runs apart."""
    score = 0.5 + 0.01 * cfg.seed + (cfg.max_train_samples or 100) / 1000 + 0.001 * ablation.VARIANTS.index(cfg.keys)
    return {
        "student": {"test": {"accuracy": score}},
        "teacher": {"test": {"accuracy": 0.9}},
        "history": [{"stage": "student", "val": {"accuracy": score}}],
        "steps_to_best_val": 3,
        "codebook": {
            "key_agreement": None if cfg.keys == "none" else 0.5,
            "key_agreement_kind": "n/a" if cfg.keys == "none" else "same key ids",
        },
        "rows": {"train": cfg.max_train_samples or 56},
    }


class Interrupted(Exception):
    pass


def recording_run_all(calls, stop_at=None):
    """A stand-in for run_all that writes a run's config.json first and metrics.json last, as the job does."""

    def run_all(cfg):
        calls.append(cfg)
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        if len(calls) == stop_at:
            raise Interrupted
        metrics = fake_metrics(cfg)
        (cfg.out / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    return run_all


def test_the_grid_runs_each_size_seed_and_variant_once_with_one_teacher_per_cell(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablation, "run_all", recording_run_all(calls))
    args = tiny_args(tiny, tmp_path, "--seed", "4", "--train-sizes", "20,all,10", "--seeds", "2")
    assert ablation.main(args) == 0
    cells = [(c.max_train_samples, c.seed, c.keys) for c in calls]
    assert cells == [(n, s, k) for n in (10, 20, None) for s in (4, 5) for k in ("carry", "fresh", "none")]
    for cfg in calls:
        cell = tmp_path / f"rows_{cfg.max_train_samples or 'all'}" / f"seed_{cfg.seed}"
        assert cfg.out == cell / f"keys_{cfg.keys}"
        # the carried run trains the teacher; the other two of the same cell load it
        assert cfg.teacher_checkpoint == (None if cfg.keys == "carry" else str(cell / "keys_carry" / "teacher"))
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert len(result["cells"]) == 18 and len(result["summary"]) == 9
    carry_10 = next(s for s in result["summary"] if s["size"] == 10 and s["keys"] == "carry")
    want = [fake_metrics(c)["student"]["test"]["accuracy"] for c in calls if c.max_train_samples == 10][::3]
    assert carry_10["test accuracy"]["seeds"] == want
    assert carry_10["test accuracy"]["sd"] == pytest.approx(np.std(want, ddof=1))
    table = (tmp_path / "ablation.md").read_text()
    assert "| 10 |" in table and "| 56 |" in table and " ± " in table and "carry - fresh" in table
    lines = table.splitlines()
    runs = lines[lines.index(next(line for line in lines if line.startswith("| keys |"))) + 2 :][:18]
    assert [run.split(" | ")[-1] for run in runs] == [f"{n} |" for n in (10, 20, "all") for _ in range(6)]
    assert [d["carry - none"]["mean"] for d in result["differences"]] == pytest.approx([-0.002] * 3)
    assert (tmp_path / "ablation.png").stat().st_size > 0


def test_a_given_teacher_is_shared_by_every_cell(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablation, "run_all", recording_run_all(calls))
    teacher = str(tmp_path / "some_teacher")
    assert ablation.main(tiny_args(tiny, tmp_path / "out", "--teacher-checkpoint", teacher, "--seeds", "2")) == 0
    assert {c.teacher_checkpoint for c in calls} == {teacher} and len(calls) == 6
    assert "fixed (--teacher-checkpoint)" in json.loads((tmp_path / "out" / "ablation.json").read_text())["what_varies"]


def test_an_interrupted_grid_resumes_where_it_stopped(tiny, tmp_path, monkeypatch):
    args = tiny_args(tiny, tmp_path, "--train-sizes", "10,20", "--seeds", "1")
    calls = []
    monkeypatch.setattr(ablation, "run_all", recording_run_all(calls, stop_at=5))
    with pytest.raises(Interrupted):
        ablation.main(args)
    again = []
    monkeypatch.setattr(ablation, "run_all", recording_run_all(again))
    assert ablation.main([*args, "--resume"]) == 0
    # the four finished runs are reused; the fifth continues from its checkpoints; the sixth starts
    assert [(c.max_train_samples, c.keys, c.resume) for c in again] == [(20, "fresh", True), (20, "none", False)]
    assert len(json.loads((tmp_path / "ablation.json").read_text())["cells"]) == 6


@pytest.mark.parametrize(
    "sizes, message",
    [
        ("0,500", "'0' is not a row count > 0"),
        ("500,lots", "'lots' is not a row count > 0"),
        ("20,5000", "5000 is more than the 56 training rows"),
        ("4,20", "4 is fewer rows than the 8 keys k-means fits"),  # tiny_args: --num-keys 8
    ],
)
def test_a_bad_train_sizes_is_one_line_before_any_work(tiny, tmp_path, monkeypatch, capsys, sizes, message):
    calls = []
    monkeypatch.setattr(ablation, "run_all", recording_run_all(calls))
    assert ablation.main(tiny_args(tiny, tmp_path / "out", "--train-sizes", sizes)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("seeds", ["0", "two"])
def test_seeds_must_be_a_positive_count(tiny, tmp_path, monkeypatch, capsys, seeds):
    calls = []
    monkeypatch.setattr(ablation, "run_all", recording_run_all(calls))
    assert ablation.main(tiny_args(tiny, tmp_path / "out", "--seeds", seeds)) == 2
    assert "--seeds: must be a whole number > 0" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "out").exists()
