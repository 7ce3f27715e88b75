"""The whole job: teacher -> student -> test, then metrics.json, the curves PNG and the summary; and the
command line, `python -m keydistill.train`, through the commands' shared runner (keydistill.cli)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch

from keydistill.checkpoint import write_json
from keydistill.cli import run_command, wrote
from keydistill.data import Collator
from keydistill.train import distributed
from keydistill.train.config import TrainConfig, build_parser, defaults_for, parse_config, settings_json, validate
from keydistill.train.context import Run, setup
from keydistill.train.evaluate import codebook_report, fidelity, predict, score
from keydistill.train.student import student_stage
from keydistill.train.teacher import teacher_stage

STAGES = ("teacher_finetune", "teacher_bottleneck", "student_decoder", "student")


def test_stage(run: Run, teacher, student) -> tuple[dict, dict, dict]:
    """Metrics of both models on val and every test split, the student's fidelity to the teacher and the
    codebook report on the first test split, and each model's inference speed there (examples/s at the
    evaluation batch size)."""
    collate = Collator(run.tokenizer.pad_token_id)
    results, primary, speed = {}, {}, {}
    for name, model in (("teacher", teacher), ("student", student)):
        started = time.perf_counter()
        val = predict(run, model, run.val, collate)
        results[name] = {"val": score(run.task, val.logits, run.val.labels)}
        if not run.tests:  # --no-test, or own data without a test file: validation stands in for the test split
            speed[name], primary[name] = len(run.val) / (time.perf_counter() - started), val
        for split, dataset in run.tests.items():
            started = time.perf_counter()
            pred = predict(run, model, dataset, collate)
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)  # the kernels queued by predict are part of its time
            if name not in primary:
                speed[name] = len(dataset) / (time.perf_counter() - started)
                primary[name] = pred
            results[name][split] = score(run.task, pred.logits, dataset.labels)
        if run.tests and "test" not in results[name]:  # mnli: the matched split is "test"
            results[name]["test"] = results[name][next(iter(run.tests))]
    results["fidelity"] = fidelity(run.task, primary["teacher"].logits, primary["student"].logits)
    return results, codebook_report(teacher, student, primary["teacher"], primary["student"], run.cfg.keys), speed


def run_all(cfg: TrainConfig) -> dict:
    """Every stage, then metrics.json, the curves PNG and the summary. Returns the metrics."""
    from keydistill.report import plot_run, summary_table, write_tensorboard

    started = time.perf_counter()
    run = setup(cfg)
    teacher, teacher_train = teacher_stage(run)
    student, student_result = student_stage(run, teacher, teacher_train)
    results, codebook, speed = test_stage(run, teacher, student)
    history = [entry for name in STAGES for entry in run.progress.get(name, {}).get("history", [])]
    metrics = {
        "task": run.task.name,
        "teacher": results["teacher"],
        "student": results["student"],
        "fidelity": results["fidelity"],
        "history": history,
        "codebook": codebook,
        "steps_to_best_val": student_result["best_step"],
        "curves": {name: run.progress[name]["curve"] for name in STAGES if name in run.progress},
        "validations": {name: run.progress[name].get("validations", []) for name in STAGES if name in run.progress},
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "inference_examples_per_s": speed,
        "rows": {"train": len(run.train), "val": len(run.val), **{k: len(v) for k, v in run.tests.items()}},
        "seconds": time.perf_counter() - started,
    }
    if run.ranks.main:
        write_json(cfg.out / "metrics.json", metrics)
        plot_run(metrics, cfg.out / "training_curves.png")
        run.board.close()
        if cfg.report_to == "tensorboard":
            write_tensorboard(metrics, cfg.out / "tensorboard")
        print(summary_table(metrics, run.task.metrics))
        print(wrote(cfg.out, run_outputs(cfg.out)))
    return metrics


def run_outputs(folder: Path) -> list[str]:
    """What a run left in its folder, in the order a reader looks for it."""
    order = ("student", "teacher", "metrics.json", "training_curves.png", "tensorboard", "config.json", "progress.json")
    found = {p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()}
    return [f for name in order for f in (name + "/", name) if f in found] + sorted(
        f for f in found if f.rstrip("/") not in order
    )


def run_cli(run: Callable[[TrainConfig], object], cfg: TrainConfig) -> int:
    """Run `run(cfg)` for a command line (keydistill.cli.run_command): bad data or settings print one line (no
    traceback) and exit 2; an interruption says how to continue and exits 130."""

    def work() -> None:  # run's result is for Python callers: the exit status is run_command's
        run(cfg)

    return run_command(
        work, interrupted=f"continue with the same command and --resume (checkpoints in {cfg.output_dir})"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    status = 1  # an error run_command does not expect (a bug) leaves with its traceback and status 1
    try:
        status = run_command(lambda: train_command(argv))
    finally:
        status = distributed.shutdown(status)
    return status


def train_command(argv: list[str]) -> int:
    parser = build_parser(defaults_for(argv))
    cfg = parse_config(argv, parser)
    if parser.parse_args(argv).print_config:
        validate(cfg)
        print(settings_json(cfg))
        return 0
    return run_cli(run_all, cfg)
