"""`python -m keydistill.ablation`: the student's keys carried, fresh, or absent, side by side.

Runs keydistill.train once per --keys choice with every other setting shared. The first run of each cell
trains the teacher (unless --teacher-checkpoint is given); the other two reuse it, so the three students
distil from the same teacher. Any keydistill.train flag may follow, e.g.

    python -m keydistill.ablation --data-dir ../shared/data/glue --output-dir runs/ablation --eval-every 25
    python -m keydistill.ablation --data-dir ../shared/data/glue --task rte --train-sizes 500,2000,all --seeds 3
    python -m keydistill.ablation --train-file train.csv --test-file test.csv    # your own data

--train-sizes and --seeds make a grid: one cell per training size and seed (teacher and students trained on
the same rows), in <output-dir>/rows_<n>/seed_<s>/keys_<variant>. A finished cell is reused on a re-run and an
interrupted one continues, as in the GLUE runner.

Writes <output-dir>/ablation.md, ablation.json and ablation.png: per training size, each variant's test metric
(mean ± sd over the seeds, each seed's figure in the JSON), the teacher's, and teacher-student key agreement.
The metric is the task's first; own data without a test file reports validation.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from keydistill.checkpoint import write_json
from keydistill.cli import Parser, explicit_flags, paragraphs, run_command, wrote
from keydistill.data.settings import load_data
from keydistill.errors import ConfigError, UsageError
from keydistill.glue import continued, finished, positive_count
from keydistill.seeds import aggregate, shown
from keydistill.train import TrainConfig, build_parser, parse_config, run_all, validate
from keydistill.train.config import defaults_for, settings_json
from keydistill.train.context import check_output_dir

VARIANTS = ("carry", "fresh", "none")

# What each variant shares with the others and what it does not (student.py holds the rules).
VARIANT_NOTES = """\
All three students distil from the same teacher with the same settings: the same encoder initialisation
(the teacher's embeddings and layers), the same losses and the same gradient paths into the encoder (the
feature loss always; the soft and task losses only when the lookup passes them, so under the hard lookup the
key-less head also reads a detached encoder output), and each starts from a decoder fitted to its own routing.

| variant | keys | values and head at the start | commitment loss | key agreement |
|---|---|---|---|---|
| carry | the teacher's, carried before the first forward | the teacher's (fitted on these keys) | yes | same key ids |
| fresh | k-means on the student's own outputs | re-initialised, fitted on the student's cached outputs by the teacher's recipe | yes | after matching keys one to one by co-assignment (Hungarian) |
| none | no bottleneck | a new head, fitted the same way on the student's first-token outputs | no | n/a |
"""


# ----------------------------------------------------------------------------------------------------------
# The grid: training sizes x seeds, three variants in each cell
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    rows: int | None  # training rows (--max-train-samples); None: every row
    seed: int

    def folder(self, root: Path, grid: bool) -> Path:
        """Where the cell's three runs go: the output folder itself for a single cell, else one per cell."""
        return root / f"rows_{self.rows or 'all'}" / f"seed_{self.seed}" if grid else root


def parse_sizes(text: str) -> list[int | None]:
    """--train-sizes: comma-separated row counts and/or "all", in increasing order (None for all)."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() == "all":
            sizes.append(None)
        elif part.isdigit() and int(part) > 0:
            sizes.append(int(part))
        else:
            raise ConfigError(f"--train-sizes: {part!r} is not a row count > 0 or 'all' (e.g. 500,2000,all)")
    return sorted(set(sizes), key=lambda n: float("inf") if n is None else n)


def check_sizes(base: TrainConfig, sizes: list[int | None]) -> None:
    """A size above the training rows the task has (after its validation slice), or one too small for k-means
    to fit the keys of a new cls-pooled teacher (one vector per row), is an error before any work."""
    counted = [n for n in sizes if n is not None]
    if not counted:
        return
    keys = base.bottleneck_fields()
    too_small = [n for n in counted if keys["pooling"] == "cls" and n < keys["num_keys"]]
    if too_small and not base.teacher_checkpoint:
        raise ConfigError(
            f"--train-sizes: {', '.join(map(str, too_small))} is fewer rows than the {keys['num_keys']} keys k-means "
            "fits one vector per row to (use at least that many rows, or lower --num-keys)"
        )
    data = load_data(dataclasses.replace(base, max_train_samples=None))
    too_large = [n for n in counted if n > len(data.train)]
    if too_large:
        raise ConfigError(
            f"--train-sizes: {', '.join(map(str, too_large))} is more than the {len(data.train)} training rows "
            f"{data.task.name} has after its validation slice (use 'all' for every row)"
        )


def cell_configs(base: TrainConfig, cell: Cell, folder: Path, grid: bool) -> list[TrainConfig]:
    """The cell's three runs, carry first: it trains the teacher the other two reuse (unless one is given)."""
    rows = cell.rows if grid else base.max_train_samples
    teacher = base.teacher_checkpoint or str(folder / "keys_carry" / "teacher")
    return [
        continued(
            dataclasses.replace(
                base,
                keys=keys,
                seed=cell.seed,
                max_train_samples=rows,
                teacher_checkpoint=base.teacher_checkpoint if keys == "carry" else teacher,
                output_dir=str(folder / f"keys_{keys}"),
            )
        )
        for keys in VARIANTS
    ]


def reported(metrics: dict) -> str:
    """The figure a run is judged by: "<split> <metric>", the task's first metric on test (validation for own
    data without a test file)."""
    split = "test" if "test" in metrics["student"] else "val"
    return f"{split} {next(iter(metrics['student'][split]))}"


def ablation_row(keys: str, metrics: dict) -> dict:
    figure = reported(metrics)
    split, metric = figure.split(" ", 1)
    best_val = max((e["val"][metric] for e in metrics["history"] if e["stage"] == "student"), default=None)
    return {
        "keys": keys,
        figure: metrics["student"][split][metric],
        f"best val {metric}": best_val,
        "steps to best val": metrics["steps_to_best_val"],
        "key agreement": metrics["codebook"]["key_agreement"],
        "agreement measured": metrics["codebook"]["key_agreement_kind"],
        f"teacher {figure}": metrics["teacher"][split][metric],
        "train rows": metrics["rows"]["train"],
    }


def reported_of(rows: list[dict]) -> str:
    """The figure the rows report (ablation_row's first key after "keys")."""
    return list(rows[0])[1]


def run_cell(cfgs: list[TrainConfig], label: str) -> list[dict]:
    rows = []
    for cfg in cfgs:
        metrics = finished(cfg)
        if metrics is not None:
            print(f"{label} keys={cfg.keys}: reusing the finished run in {cfg.out}", flush=True)
        else:
            resumed = " (resumed)" if cfg.resume else ""
            print(f"{label} keys={cfg.keys}: teacher -> student -> test in {cfg.out}{resumed}", flush=True)
            metrics = run_all(cfg)
        rows.append({**ablation_row(cfg.keys, metrics), "seed": cfg.seed, "size": cfg.max_train_samples})
    return rows


# ----------------------------------------------------------------------------------------------------------
# The result: mean ± sd per size and variant, as markdown, JSON and a plot
# ----------------------------------------------------------------------------------------------------------


def summarise(cells: list[dict], figure: str) -> list[dict]:
    """One entry per training size and variant: the test metric, the teacher's and the key agreement,
    aggregated over the seeds."""
    out = []
    for size in dict.fromkeys(row["size"] for row in cells):
        for keys in VARIANTS:
            runs = [row for row in cells if row["size"] == size and row["keys"] == keys]
            stats = aggregate(runs, (figure, f"teacher {figure}", "key agreement", "train rows"))
            out.append({"size": size, "keys": keys, "seeds": [row["seed"] for row in runs], **stats})
    return out


PAIRS = (("carry", "fresh"), ("carry", "none"))  # what carrying the keys is measured against


def differences(cells: list[dict], figure: str) -> list[dict]:
    """Per training size, carry's figure minus fresh's and minus none's, seed by seed (a seed's three
    students share its teacher and rows, so the difference cancels what they share): mean, sd, each seed's."""
    out = []
    for size in dict.fromkeys(row["size"] for row in cells):
        by = {(row["keys"], row["seed"]): row[figure] for row in cells if row["size"] == size}
        entry: dict = {"size": size}
        for a, b in PAIRS:
            per_seed = [{"d": by[a, seed] - by[b, seed]} for (keys, seed) in by if keys == a and (b, seed) in by]
            entry[f"{a} - {b}"] = aggregate(per_seed, ("d",))["d"] if per_seed else None
        out.append(entry)
    return out


def markdown(summary: list[dict], diffs: list[dict], figure: str, what_varies: str) -> str:
    pairs = [f"{a} - {b}" for a, b in PAIRS]
    lines = [
        f"| training rows | teacher {figure} | "
        + " | ".join(f"{k} {figure}" for k in VARIANTS)
        + " | "
        + " | ".join(pairs)
        + " | key agreement carry | key agreement fresh |",
        "|" + "---|" * (len(VARIANTS) + len(pairs) + 4),
    ]
    for size, diff in zip(dict.fromkeys(s["size"] for s in summary), diffs):
        by_keys = {s["keys"]: s for s in summary if s["size"] == size}
        rows = by_keys["carry"]["train rows"]["mean"]
        lines.append(
            f"| {rows:.0f} | {shown(by_keys['carry'][f'teacher {figure}'])} | "
            + " | ".join(shown(by_keys[k][figure]) for k in VARIANTS)
            + " | "
            + " | ".join(shown(diff[p]) for p in pairs)
            + f" | {shown(by_keys['carry']['key agreement'])} | {shown(by_keys['fresh']['key agreement'])} |"
        )
    return "\n".join(lines) + (
        "\n\nFigures in points: the mean ± the standard deviation over seeds; carry - fresh and carry - none are "
        f"taken seed by seed (the three students of a seed share its teacher). {what_varies}\n"
    )


def cell_table(cells: list[dict]) -> str:
    def cell(key, value):
        if value is None:  # a size of None is --train-sizes all; elsewhere None is a figure the run has not
            return "all" if key == "size" else "n/a"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    header = list(cells[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(k, row[k]) for k in header) + " |" for row in cells]
    return "\n".join(lines)


def plot(summary: list[dict], figure: str, path: Path) -> None:
    from keydistill.report import plt

    fig, (score, agreement) = plt.subplots(1, 2, figsize=(11, 4))
    for keys in VARIANTS:
        points = [s for s in summary if s["keys"] == keys]
        x = [s["train rows"]["mean"] for s in points]
        for ax, name, scale in ((score, figure, 100), (agreement, "key agreement", 100)):
            if all(s[name] for s in points):
                y = [scale * s[name]["mean"] for s in points]
                ax.errorbar(x, y, yerr=[scale * s[name]["sd"] for s in points], marker="o", capsize=3, label=keys)
    teacher = [s for s in summary if s["keys"] == "carry"]
    score.errorbar(
        [s["train rows"]["mean"] for s in teacher],
        [100 * s[f"teacher {figure}"]["mean"] for s in teacher],
        yerr=[100 * s[f"teacher {figure}"]["sd"] for s in teacher],
        color="black",
        linestyle="--",
        capsize=3,
        label="teacher",
    )
    score.set(xscale="log", xlabel="training rows", ylabel=f"{figure} (points)", title="student by its keys")
    agreement.set(xscale="log", xlabel="training rows", ylabel="key agreement (%)", title="keys the student shares")
    sizes = sorted({s["train rows"]["mean"] for s in summary})
    for ax in (score, agreement):
        ax.legend(fontsize=8)
        ax.set_xticks(sizes)  # the grid's own sizes, not log-scale decades
        ax.set_xticklabels([f"{n:,.0f}" for n in sizes])
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def plan(base: TrainConfig, sizes: list[int | None] | None, seeds: int) -> list[tuple[str, list[TrainConfig]]]:
    """(progress label, the cell's three runs) for each cell, in the order they run."""
    grid = sizes is not None or seeds > 1
    cells = [Cell(size, base.seed + i) for size in (sizes or [base.max_train_samples]) for i in range(seeds)]
    return [
        (
            f"[{i}/{len(cells)}] rows={cell.rows or 'all'} seed={cell.seed}",
            cell_configs(base, cell, cell.folder(base.out, grid), grid),
        )
        for i, cell in enumerate(cells, start=1)
    ]


def run_ablation(base: TrainConfig, cells: list[tuple[str, list[TrainConfig]]]) -> dict:
    root, rows = base.out, []
    for label, cfgs in cells:
        rows += run_cell(cfgs, label)
    figure = reported_of(rows)
    summary = summarise(rows, figure)
    diffs = differences(rows, figure)
    what_varies = (
        "The teacher is fixed (--teacher-checkpoint): the seeds vary the students only."
        if base.teacher_checkpoint
        else "Each seed trains its own teacher (shared by its three students) on its own validation slice."
    )
    table = markdown(summary, diffs, figure, what_varies)
    (root / "ablation.md").write_text(table + "\n" + cell_table(rows) + "\n\n" + VARIANT_NOTES)
    result = {"figure": figure, "what_varies": what_varies, "cells": rows, "summary": summary, "differences": diffs}
    write_json(root / "ablation.json", result)
    plot(summary, figure, root / "ablation.png")
    print(table)
    return {"cells": rows, "summary": summary, "differences": diffs}


DESCRIPTION = (
    "Distil one task three times from the same teacher, with the student's keys carried, fresh, or absent "
    "(with --train-sizes and --seeds: at each training size and seed), and write the table side by side: "
    "<output-dir>/ablation.md, ablation.json and ablation.png."
)


def build_ablation_parser(argv: list[str]) -> Parser:
    """keydistill.train's flags with the task's defaults, runs/ablation_{task} as the output folder, and the
    grid's --train-sizes and --seeds."""
    epilog = (
        "Every keydistill.train flag but --keys applies to all three runs (<output-dir>/keys_carry, keys_fresh, "
        "keys_none; a grid's cells in <output-dir>/rows_<n>/seed_<s>/); the defaults shown are the task's, its "
        "recipe applied (--print-config prints them all)."
    )
    parser = build_parser(
        {**defaults_for(argv), "output_dir": "runs/ablation_{task}"},
        prog="python -m keydistill.ablation",
        description=DESCRIPTION,
        epilog=paragraphs(epilog),
    )
    parser.add_argument("--train-sizes", default=None, help="training rows of each cell, e.g. 500,2000,all")
    parser.add_argument("--seeds", type=positive_count, default=1, help="runs of each training size, seeds --seed on")
    return parser


def ablation_command(argv: list[str]) -> int:
    parser = build_ablation_parser(argv)
    if "keys" in explicit_flags(parser, argv):  # each variant sets its own
        raise UsageError(f"--keys: the ablation runs every choice ({', '.join(VARIANTS)}); leave it out")
    args = parser.parse_args(argv)
    cfg = parse_config(argv, parser)
    validate(cfg)
    if args.print_config:
        print(settings_json(cfg))
        return 0
    sizes = None if args.train_sizes is None else parse_sizes(args.train_sizes)
    if sizes:
        check_sizes(cfg, sizes)
    cells = plan(cfg, sizes, args.seeds)
    for run in (run for _, cfgs in cells for run in cfgs):  # every run's folder, before the first run starts
        if finished(run) is None:
            check_output_dir(run)
    run_ablation(cfg, cells)
    folders = sorted({run.out.relative_to(cfg.out).parts[0] + "/" for _, cfgs in cells for run in cfgs})
    print(wrote(cfg.out, ["ablation.md", "ablation.json", "ablation.png", *folders]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(lambda: ablation_command(argv), interrupted="run the same command with --resume to continue")


if __name__ == "__main__":
    sys.exit(main())
