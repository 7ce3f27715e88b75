"""`python -m keydistill.ablation`: the student's keys carried, fresh, or absent, side by side.

Runs keydistill.train once per --keys choice with every other setting shared. The first run trains the
teacher (unless --teacher-checkpoint is given); the others reuse it, so the three students distil from the
same teacher. Any keydistill.train flag may follow, e.g.

    python -m keydistill.ablation --data-dir ../shared/data/glue --output-dir runs/ablation --eval-every 25

Writes <output-dir>/ablation.md and ablation.json and prints the table: test metric, best validation
metric, optimizer steps to the best validation, and teacher-student key agreement on test.
"""
from __future__ import annotations

import dataclasses
import sys

from keydistill.checkpoint import write_json
from keydistill.data import get_task
from keydistill.train import TrainConfig, build_parser, run_all, run_cli

VARIANTS = ("carry", "fresh", "none")


def ablation_row(keys: str, metrics: dict, metric: str) -> dict:
    best_val = max((e["val"][metric] for e in metrics["history"] if e["stage"] == "student"), default=None)
    return {"keys": keys, f"test {metric}": metrics["student"]["test"][metric], f"best val {metric}": best_val,
            "steps to best val": metrics["steps_to_best_val"], "key agreement": metrics["codebook"]["key_agreement"],
            f"teacher test {metric}": metrics["teacher"]["test"][metric]}


def markdown_table(rows: list[dict]) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines)


def run_ablation(base: TrainConfig) -> list[dict]:
    metric = get_task(base.task).metrics[0]
    root = base.out
    rows, teacher = [], base.teacher_checkpoint
    for keys in VARIANTS:
        cfg = dataclasses.replace(base, keys=keys, teacher_checkpoint=teacher, output_dir=str(root / f"keys_{keys}"))
        metrics = run_all(cfg)
        teacher = teacher or str(cfg.out / "teacher")
        rows.append(ablation_row(keys, metrics, metric))
    table = markdown_table(rows)
    (root / "ablation.md").write_text(table + "\n")
    write_json(root / "ablation.json", rows)
    print(table)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "python -m keydistill.ablation"
    parser.set_defaults(output_dir="runs/ablation_{task}")
    return run_cli(run_ablation, TrainConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
