"""`python -m keydistill.ablation`: the student's keys carried, fresh, or absent, side by side.

Runs keydistill.train once per --keys choice with every other setting shared. The first run trains the
teacher (unless --teacher-checkpoint is given); the others reuse it, so the three students distil from the
same teacher. Any keydistill.train flag may follow, e.g.

    python -m keydistill.ablation --data-dir ../shared/data/glue --output-dir runs/ablation --eval-every 25
    python -m keydistill.ablation --train-file train.csv --test-file test.csv    # your own data

Writes <output-dir>/ablation.md and ablation.json and prints the table: test metric, best validation
metric, optimizer steps to the best validation, and teacher-student key agreement on test.
"""

from __future__ import annotations

import dataclasses
import sys

from keydistill.checkpoint import write_json
from keydistill.train import TrainConfig, build_parser, parse_config, run_all, run_cli
from keydistill.train.config import explicit_flags

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


def ablation_row(keys: str, metrics: dict) -> dict:
    """One variant's row. The metric is the task's first (the order of the run's scores); the split is test,
    or val for own data without a test file."""
    split = "test" if "test" in metrics["student"] else "val"
    metric = next(iter(metrics["student"][split]))
    best_val = max((e["val"][metric] for e in metrics["history"] if e["stage"] == "student"), default=None)
    return {
        "keys": keys,
        f"{split} {metric}": metrics["student"][split][metric],
        f"best val {metric}": best_val,
        "steps to best val": metrics["steps_to_best_val"],
        "key agreement": metrics["codebook"]["key_agreement"],
        "agreement measured": metrics["codebook"]["key_agreement_kind"],
        f"teacher {split} {metric}": metrics["teacher"][split][metric],
    }


def markdown_table(rows: list[dict]) -> str:
    def cell(value):
        return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines)


def run_ablation(base: TrainConfig) -> list[dict]:
    root = base.out
    rows, teacher = [], base.teacher_checkpoint
    for keys in VARIANTS:
        cfg = dataclasses.replace(base, keys=keys, teacher_checkpoint=teacher, output_dir=str(root / f"keys_{keys}"))
        metrics = run_all(cfg)
        teacher = teacher or str(cfg.out / "teacher")
        rows.append(ablation_row(keys, metrics))
    table = markdown_table(rows)
    (root / "ablation.md").write_text(table + "\n\n" + VARIANT_NOTES)
    write_json(root / "ablation.json", rows)
    print(table)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "python -m keydistill.ablation"
    parser.set_defaults(output_dir="runs/ablation_{task}")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "keys" in explicit_flags(parser, argv):  # each variant sets its own
        parser.error(f"--keys: the ablation runs every choice ({', '.join(VARIANTS)}); leave it out")
    return run_cli(run_ablation, parse_config(argv, parser))


if __name__ == "__main__":
    sys.exit(main())
