"""`python -m keydistill.glue`: distil and test every GLUE task found, and write the table DistilBERT shows.

    python -m keydistill.glue --data-dir ../shared/data/glue                 # every task with a folder there
    python -m keydistill.glue --data-dir ../shared/data/glue --tasks cola,rte
    python -m keydistill.glue --data-dir ../shared/data/glue --resume        # continue an interrupted table
    python -m keydistill.glue --data-dir ../shared/data/glue --tasks rte --seeds 3   # mean ± sd over seeds

Each task runs keydistill.train (teacher -> student -> test) with its recipe from the task table
(keydistill.data.TASKS) in <output-dir>/<task>/, where its settings (config.json) sit beside its results
(metrics.json). Any keydistill.train flag may follow and applies to every task. A finished task whose settings
are unchanged is reused on a re-run; with --resume an interrupted one continues. A task whose data is missing
or malformed is reported and skipped, the others still run, and the exit status is 1.

Writes <output-dir>/glue.md, glue.json and glue.png: one row per model with each task's GLUE metric, the
macro score, parameters and inference examples/s, and the student's share of the teacher per task. With
--seeds N each task runs N times (seeds --seed, --seed + 1, ... in <output-dir>/<task>/seed_<s>/) and the
table shows each figure's mean ± standard deviation; glue.json keeps every seed's. A --teacher-checkpoint
holding {task} (e.g. runs/glue/{task}/teacher) fixes each task's teacher, so the seeds vary the student only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

from keydistill.checkpoint import write_json
from keydistill.cli import Parser, explicit_flags, paragraphs, run_command, wrote
from keydistill.data import TASKS, compute_metrics, get_task, load_task
from keydistill.errors import ConfigError, KeydistillError, UsageError
from keydistill.seeds import mean_sd
from keydistill.train import TrainConfig, build_parser, distributed, parse_config, run_all
from keydistill.train.config import OWN_DATA, changed_settings, config_problems, default_settings, flag_of
from keydistill.train.context import check_output_dir, resolve_teacher

ORDER = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")  # DistilBERT's Table 1 columns
LOCAL_TASKS = ("cola", "mrpc", "rte", "sst2", "stsb", "wnli")  # the six in ../shared/data/glue
# Published dev-set scores of small BERTs of the teacher's class (DistilBERT paper, Table 1; MiniLM-L6-H384
# reports), as (low, high) in points; the table reports the teacher's gap to them.
PUBLISHED = {
    "sst2": (91.3, 91.5),
    "cola": (47.5, 51.3),
    "mrpc": (87.5, 87.5),
    "rte": (59.9, 59.9),
    "stsb": (86.9, 86.9),
}


# ----------------------------------------------------------------------------------------------------------
# Which tasks, with which settings
# ----------------------------------------------------------------------------------------------------------


DESCRIPTION = (
    "Distil and test several GLUE tasks, one keydistill.train run each in <output-dir>/<task>/, and write the "
    "table DistilBERT shows: <output-dir>/glue.md, glue.json and glue.png."
)
EPILOG = (
    "Every keydistill.train flag applies to every task, on top of each task's recipe (the defaults shown are "
    "before any recipe; --print-config prints each task's resolved settings). A finished task with the same "
    "settings is reused; --resume continues an interrupted one; a task folder holding a run with other settings "
    "is refused unless --overwrite-output-dir. Without --data-dir (or GLUE_DIR) the data comes from the hub."
)


def build_glue_parser() -> Parser:
    """Every keydistill.train flag (applied to every task), --tasks, and runs/glue as the output folder."""
    parser = train_parser(prog="python -m keydistill.glue", description=DESCRIPTION, epilog=paragraphs(EPILOG))
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated tasks (e.g. cola,mrpc); default: every task with a folder in --data-dir "
        "(all nine from the hub without --data-dir)",
    )
    parser.add_argument("--seeds", type=positive_count, default=1, help="runs per task, seeds --seed on")
    return parser


def positive_count(text: str) -> int:
    if not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text!r}")
    return int(text)


def train_parser(**kwargs) -> Parser:
    """keydistill.train's flags with runs/glue as the output folder (each task gets its own folder in it)."""
    helps = {"output_dir": "where the table goes; each task runs in <output-dir>/<task>"}
    return build_parser({**default_settings(), "output_dir": "runs/glue"}, helps=helps, **kwargs)


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--tasks, the keydistill.train flags)."""
    parser = Parser(add_help=False)  # no abbreviations: never mistake --task for --tasks
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--seeds", default=None)
    known, rest = parser.parse_known_args(argv)
    explicit = explicit_flags(train_parser(), rest)
    if "task" in explicit:  # each task sets its own: it would do nothing
        raise UsageError("--task names one task of keydistill.train; the GLUE runner takes --tasks (e.g. --tasks cola)")
    own = [flag_of(name) for name in ("train_file", "label_column", *OWN_DATA) if name in explicit]
    if own:
        raise UsageError(f"{', '.join(own)}: the GLUE runner runs GLUE tasks; your own data runs with keydistill.train")
    if "test" in explicit:  # the table is of test figures
        raise UsageError(
            "--test/--no-test: the GLUE table is of test figures; keydistill.train --no-test validates only"
        )
    return known.tasks, rest


def chosen_tasks(tasks: str | None, data_dir: str | None) -> tuple[list[str], dict[str, str]]:
    """(tasks to run in table order, {task: why not run} for the rest that were looked for)."""
    if tasks:
        names = [t.strip().lower() for t in tasks.split(",") if t.strip()]
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise UsageError(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(ORDER)}")
        return [t for t in ORDER if t in names], {}
    if not data_dir:
        return list(ORDER), {}
    found = [t for t in ORDER if (Path(data_dir) / TASKS[t].folder).is_dir()]
    missing = {t: f"no folder {Path(data_dir) / TASKS[t].folder}" for t in ORDER if t not in found}
    return found, missing


def task_config(train_argv: list[str], task: str, seed: int | None = None) -> TrainConfig:
    """The task's settings: defaults, its recipe, then the user's flags; in <output-dir>/<task> (one of
    several seeds: <output-dir>/<task>/seed_<seed>). --resume continues an interrupted task and starts the
    others afresh (a folder without a run, or one whose run had other settings)."""
    cfg = parse_config([*train_argv, "--task", task], parser=train_parser())
    out = Path(cfg.output_dir) / task
    if seed is not None:
        cfg, out = dataclasses.replace(cfg, seed=seed), out / f"seed_{seed}"
    teacher = cfg.teacher_checkpoint and cfg.teacher_checkpoint.replace("{task}", task)
    return continued(dataclasses.replace(cfg, output_dir=str(out), teacher_checkpoint=teacher))


def continued(cfg: TrainConfig) -> TrainConfig:
    """With --resume, an interrupted run of the same settings continues; any other starts afresh."""
    saved = cfg.out / "config.json"
    same = saved.exists() and not changed_settings(json.loads(saved.read_text()), cfg)
    return dataclasses.replace(cfg, resume=cfg.resume and same)


def finished(cfg: TrainConfig) -> dict | None:
    """The metrics of a finished run with exactly these settings, else None."""
    config, metrics = cfg.out / "config.json", cfg.out / "metrics.json"
    if not (config.exists() and metrics.exists()):
        return None
    return None if changed_settings(json.loads(config.read_text()), cfg) else json.loads(metrics.read_text())


# ----------------------------------------------------------------------------------------------------------
# Scores: GLUE's per-task score and macro average
# ----------------------------------------------------------------------------------------------------------

# GLUE scores a task by the mean of the metrics the task table reports for it, except CoLA: MCC alone, although
# the job also reports its accuracy.
GLUE_SCORED_BY = {"cola": ("mcc",)}


def glue_metrics(task: str) -> tuple[str, ...]:
    return GLUE_SCORED_BY.get(task, TASKS[task].metrics)


def task_score(task: str, results: dict) -> float:
    """A task's GLUE score in points: the mean of its GLUE metrics (MRPC F1/accuracy, STS-B Pearson/Spearman,
    CoLA MCC; MNLI matched/mismatched accuracy)."""
    splits = [s for s in results if s.startswith("test_")] or ["test"]
    return 100 * float(np.mean([results[s][m] for s in splits for m in glue_metrics(task)]))


# The constant predictors the table shows under the models: (row key, label, plot colour). Each row of the
# table's JSON holds <key> (the test metrics) and <key>_score (its GLUE score), None for regression.
BASELINES = (
    ("majority", "majority class (train's)", "black"),  # train's most frequent label: learnt nothing
    ("test_majority", "majority class (test's)", "grey"),
)  # the split's own: the best constant


def majority_baselines(cfg: TrainConfig) -> tuple[dict | None, dict | None]:
    """The test metrics of always predicting one class (None for regression), in BASELINES' order: the most
    frequent training label, and each test split's own most frequent label (on WNLI's adversarial dev set the
    two differ, 43.7 against 56.3)."""
    task = get_task(cfg.task)
    if task.is_regression:
        return None, None
    data = load_task(
        task,
        cfg.data_dir,
        val_size=cfg.val_size,
        seed=cfg.seed,
        max_train_samples=cfg.max_train_samples,
        max_eval_samples=cfg.max_eval_samples,
        skip_bad_rows=cfg.skip_bad_rows,
    )  # the run's own rows
    train_label = most_frequent(e.label for e in data.train)
    of_train, of_test = {}, {}
    for split, rows in data.test.items():
        labels = np.array([e.label for e in rows])
        of_train[split] = compute_metrics(task, np.full_like(labels, train_label), labels)
        of_test[split] = compute_metrics(task, np.full_like(labels, most_frequent(labels)), labels)
    return of_train, of_test


def most_frequent(labels) -> int:
    return Counter(int(label) for label in labels).most_common(1)[0][0]


def task_row(name: str, cfg: TrainConfig, metrics: dict, seconds: float | None) -> dict:
    teacher, student = task_score(name, metrics["teacher"]), task_score(name, metrics["student"])
    baselines = {}
    for (key, _, _), results in zip(BASELINES, majority_baselines(cfg)):
        baselines |= {key: results, f"{key}_score": task_score(name, results) if results else None}
    return {
        "task": name,
        "teacher": metrics["teacher"],
        "student": metrics["student"],
        "teacher_score": teacher,
        "student_score": student,
        "student_share": student / teacher if teacher else None,
        "fidelity": metrics.get("fidelity"),
        **baselines,
        "teacher_params": metrics["teacher_params"],
        "student_params": metrics["student_params"],
        "inference_examples_per_s": metrics.get("inference_examples_per_s", {}),
        "rows": metrics.get("rows"),
        "seconds": seconds if seconds is not None else metrics["seconds"],
        "settings": dataclasses.asdict(cfg),
        "published": PUBLISHED.get(name),
    }


def combine_seeds(rows: list[dict]) -> dict:
    """One task's row over its seeds: each figure the seeds' mean, with its sample sd beside it (<model>_sd,
    <model>_score_sd) and every seed's own figures under "seeds". Baselines and sizes are the first seed's."""
    combined = dict(rows[0])
    for model in ("teacher", "student"):
        combined[model], combined[f"{model}_sd"] = nested_mean_sd([r[model] for r in rows])
        combined[f"{model}_score"], combined[f"{model}_score_sd"] = mean_sd(r[f"{model}_score"] for r in rows)
    teacher = combined["teacher_score"]
    fidelity = [r["fidelity"] for r in rows]
    return combined | {
        "student_share": combined["student_score"] / teacher if teacher else None,
        "fidelity": None if None in fidelity else mean_sd(fidelity)[0],
        "seconds": sum(r["seconds"] for r in rows),
        "seeds": [
            {"seed": r["settings"]["seed"], **{k: r[k] for k in SEED_FIGURES}, "settings": r["settings"]} for r in rows
        ],
    }


SEED_FIGURES = ("teacher", "student", "teacher_score", "student_score", "student_share", "fidelity", "seconds")


def nested_mean_sd(results: list[dict]) -> tuple[dict, dict]:
    """({split: {metric: mean}}, {split: {metric: sd}}) over several runs' {split: {metric: value}}."""
    stats = {
        split: {metric: mean_sd(r[split][metric] for r in results) for metric in results[0][split]}
        for split in results[0]
    }
    return (
        {split: {m: v[0] for m, v in metrics.items()} for split, metrics in stats.items()},
        {split: {m: v[1] for m, v in metrics.items()} for split, metrics in stats.items()},
    )


# ----------------------------------------------------------------------------------------------------------
# The table: markdown, JSON, plot
# ----------------------------------------------------------------------------------------------------------


def cell(task: str, results: dict, sd: dict | None = None) -> str:
    """One task's GLUE metrics as DistilBERT prints them: F1/acc for MRPC, Pearson/Spearman for STS-B, MCC for
    CoLA, m/mm for MNLI; each with " ± sd" over seeds when sd is given."""
    splits = [s for s in results if s.startswith("test_")] or ["test"]
    spread = (lambda s, m: f" ± {100 * sd[s][m]:.1f}") if sd else (lambda s, m: "")
    return "/".join(f"{100 * results[s][m]:.1f}{spread(s, m)}" for s in splits for m in glue_metrics(task))


def score_cell(summary: dict, model: str) -> str:
    sd = summary.get(f"{model}_sd")
    return f"{summary[model]:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")


def markdown(rows: list[dict], summary: dict) -> str:
    tasks = [r["task"] for r in rows]
    names = [f"{TASKS[t].folder} ({'/'.join(glue_metrics(t))})" for t in tasks]
    header = "| model | score | " + " | ".join(names) + " | params | inference ex/s (mean) |"
    lines = [header, "|" + "---|" * (len(tasks) + 4)]
    for model in ("teacher", "student"):
        speed = np.mean([r["inference_examples_per_s"].get(model, np.nan) for r in rows])
        params = rows[0][f"{model}_params"] / 1e6
        lines.append(
            f"| {model} | {score_cell(summary, model)} | "
            + " | ".join(cell(r["task"], r[model], r.get(f"{model}_sd")) for r in rows)
            + f" | {params:.1f}M | {speed:.0f} |"
        )
    lines.append(
        f"| student / teacher | {summary['share']:.2%} | "
        + " | ".join(f"{r['student_share']:.1%}" if r["student_share"] is not None else "n/a" for r in rows)
        + f" | {rows[0]['student_params'] / rows[0]['teacher_params']:.0%} | "
        f"{summary['speedup']:.2f}x |"
    )
    lines.append(
        "| student fidelity | | "
        + " | ".join("n/a" if r.get("fidelity") is None else f"{r['fidelity']:.1%}" for r in rows)
        + " | | |"
    )
    for key, label, _ in BASELINES:
        lines.append(
            f"| {label} | "
            + (f"{summary[key]:.1f}" if summary[key] is not None else "n/a")
            + " | "
            + " | ".join(cell(r["task"], r[key]) if r[key] else "n/a" for r in rows)
            + " | | |"
        )
    lines += [
        "",
        "Score: the macro average of the task scores (each the mean of its metrics, in points). "
        "Test is GLUE's labelled dev split; validation was held out of train. "
        "Fidelity: the share of test examples where the student predicts the teacher's class (STS-B: the "
        "correlation of their scores). Majority class: always predicting the most frequent label of train "
        "(a model that learnt nothing) or of the test split itself (the best constant).",
        *(["", summary["seeds_note"]] if summary.get("seeds_note") else []),
        "",
        "| task | teacher | published (DistilBERT Table 1 / MiniLM-L6-H384) | gap | minutes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        published = r["published"]
        if published:
            low, high = published
            shown = f"{low:.1f}" if low == high else f"{low:.1f}-{high:.1f}"
            gap = f"{r['teacher_score'] - high:+.1f}" + ("" if low == high else f" to {r['teacher_score'] - low:+.1f}")
        else:
            shown = gap = "n/a"
        lines.append(f"| {r['task']} | {r['teacher_score']:.1f} | {shown} | {gap} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict]) -> dict:
    teacher = float(np.mean([r["teacher_score"] for r in rows]))
    student = float(np.mean([r["student_score"] for r in rows]))
    baselines = {key: [r[f"{key}_score"] for r in rows] for key, _, _ in BASELINES}
    speeds = [r["inference_examples_per_s"] for r in rows if r["inference_examples_per_s"]]
    speedup = float(np.mean([s["student"] / s["teacher"] for s in speeds])) if speeds else float("nan")
    return {
        "teacher": teacher,
        "student": student,
        **seed_spread(rows),
        "share": student / teacher if teacher else float("nan"),
        **{key: float(np.mean(scores)) if None not in scores else None for key, scores in baselines.items()},
        "speedup": speedup,
        "minutes": sum(r["seconds"] for r in rows) / 60,
    }


def seed_spread(rows: list[dict]) -> dict:
    """The macro score's sd over seeds (the i-th seed of every task makes the i-th table), and what varies."""
    counts = {len(r.get("seeds", [])) for r in rows}
    if counts == {0} or len(counts) > 1:
        return {}
    fixed, seeds = all(r["settings"]["teacher_checkpoint"] for r in rows), counts.pop()
    spread = {
        f"{model}_sd": mean_sd(np.mean([r["seeds"][i][f"{model}_score"] for r in rows]) for i in range(seeds))[1]
        for model in ("teacher", "student")
    }
    varies = (
        "the teacher is fixed per task (--teacher-checkpoint): the seeds vary the student only"
        if fixed
        else "each seed trains its own teacher and student (and draws its own validation slice)"
    )
    return spread | {"seeds_note": f"Mean ± sample standard deviation over {seeds} seeds; {varies}."}


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    from keydistill.report import plt

    labels = [TASKS[r["task"]].folder for r in rows] + ["score"]
    teacher = [r["teacher_score"] for r in rows] + [summary["teacher"]]
    student = [r["student_score"] for r in rows] + [summary["student"]]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 4))
    ax.bar(x - 0.2, teacher, 0.4, label="teacher")
    ax.bar(x + 0.2, student, 0.4, label="student")
    for i, (t, s) in enumerate(zip(teacher, student)):
        ax.annotate(f"{s / t:.0%}" if t else "n/a", (x[i] + 0.2, max(s, 0)), ha="center", va="bottom", fontsize=8)
    for key, label, color in BASELINES:
        majority = [r[f"{key}_score"] for r in rows]
        ax.scatter(
            [x[i] for i, m in enumerate(majority) if m is not None],
            [m for m in majority if m is not None],
            marker="_",
            s=400,
            color=color,
            label=label,
        )
    ax.set(
        xticks=x,
        xticklabels=labels,
        ylabel="GLUE score (points)",
        title=f"keydistill on GLUE: the student keeps {summary['share']:.2%} of the teacher's score",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: the bars fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def run_glue(argv: list[str]) -> int:
    args = build_glue_parser().parse_args(argv)  # --help, and every flag checked once up front
    root = Path(args.output_dir)
    train_argv = split_argv(argv)[1]
    tasks, not_run = chosen_tasks(args.tasks, args.data_dir)
    seeds = [None] if args.seeds == 1 else [args.seed + k for k in range(args.seeds)]
    configs = {name: [task_config(train_argv, name, seed) for seed in seeds] for name in tasks}
    if args.print_config:
        print(json.dumps({name: dataclasses.asdict(cfgs[0]) for name, cfgs in configs.items()}, indent=2))
        return 0
    check_before_any_task([cfg for cfgs in configs.values() for cfg in cfgs])
    failed: dict[str, str] = {}
    rows = []
    started = time.perf_counter()
    for i, (name, cfgs) in enumerate(configs.items(), start=1):
        try:
            runs = [
                task_run(name, cfg, f"[{i}/{len(tasks)}] {name}" + (f" seed {cfg.seed}" * (len(cfgs) > 1)))
                for cfg in cfgs
            ]
            row = runs[0] if len(runs) == 1 else combine_seeds(runs)
        except KeydistillError as e:
            failed[name] = str(e)
            print(f"[{i}/{len(tasks)}] {name}: skipped: {e}", flush=True)
            if distributed.broken():  # under torchrun, a failed collective leaves no process group to go on with
                not_run |= {t: f"not started: {name} failed on a collective" for t in tasks[i:]}
                break
            continue
        except Exception as e:  # a bug: the other tasks still run, and the traceback says where
            traceback.print_exc()
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        rows.append(row)
        print(
            f"[{i}/{len(tasks)}] {name} done in {row['seconds'] / 60:.1f} min: teacher {row['teacher_score']:.1f}, "
            f"student {row['student_score']:.1f} ("
            + ("n/a" if row["student_share"] is None else f"{row['student_share']:.1%}")
            + " of the teacher)",
            flush=True,
        )
    return write_table(root, rows, failed, not_run, time.perf_counter() - started)


def task_run(name: str, cfg: TrainConfig, label: str) -> dict:
    """One run of a task (one of several seeds): reused when finished, else run."""
    metrics, seconds = finished(cfg), None
    if metrics is not None:
        print(f"{label}: reusing the finished run in {cfg.out}", flush=True)
    else:
        print(f"{label}: teacher -> student -> test in {cfg.out}" + (" (resumed)" if cfg.resume else ""), flush=True)
        started = time.perf_counter()
        metrics = run_all(cfg)
        seconds = time.perf_counter() - started
    return task_row(name, cfg, metrics, seconds)


def check_before_any_task(configs: list[TrainConfig]) -> None:
    """Every task's settings, its teacher and its output folder, checked before the first task starts: a bad
    setting is exit status 2 with no task folder made (the data is each task's own: a task whose data is
    missing is skipped when its turn comes)."""
    problems = []
    for cfg in configs:
        problems += [f"{cfg.task}: {p}" for p in config_problems(cfg)]
        if problems:
            continue
        try:
            resolve_teacher(cfg)
            if finished(cfg) is None:
                check_output_dir(cfg)
        except ConfigError as e:
            problems.append(f"{cfg.task}: {e}")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))


def write_table(root: Path, rows: list[dict], failed: dict, not_run: dict, seconds: float) -> int:
    root.mkdir(parents=True, exist_ok=True)
    print(f"\n== keydistill GLUE: {len(rows)} task(s) in {seconds / 60:.1f} min ==")
    if rows:
        summary = summarise(rows)
        print(
            f"the tasks' own runs took {summary['minutes']:.1f} min in all (a reused task counts the minutes of "
            f"its run)"
        )
        table = markdown(rows, summary)
        (root / "glue.md").write_text(table)
        write_json(
            root / "glue.json",
            {"summary": summary, "tasks": rows, "failed": failed, "not_run": not_run, "seconds": seconds},
        )
        plot(rows, summary, root / "glue.png")
        print(table)
    for name, why in not_run.items():
        print(f"not run: {name}: {why}")
    for name, why in failed.items():
        print(f"FAILED: {name}: {why}")
    tables = ["glue.md", "glue.json", "glue.png"] if rows else []
    print(wrote(root, tables + [f"{r['task']}/" for r in rows]))
    return 1 if failed or not rows else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    status = 1  # an error run_command does not expect (a bug) leaves with its traceback and status 1
    try:
        status = run_command(lambda: run_glue(argv), interrupted="run the same command with --resume to continue")
    finally:
        status = distributed.shutdown(status)  # under torchrun: leave the process group
    return status


if __name__ == "__main__":
    sys.exit(main())
