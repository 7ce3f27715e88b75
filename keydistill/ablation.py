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
from keydistill.cli import Parser, explicit_flags, paragraphs, run_command, wrote
from keydistill.data import get_task
from keydistill.errors import UsageError
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


def ablation_row(keys: str, metrics: dict, metric: str) -> dict:
    best_val = max((e["val"][metric] for e in metrics["history"] if e["stage"] == "student"), default=None)
    return {
        "keys": keys,
        f"test {metric}": metrics["student"]["test"][metric],
        f"best val {metric}": best_val,
        "steps to best val": metrics["steps_to_best_val"],
        "key agreement": metrics["codebook"]["key_agreement"],
        "agreement measured": metrics["codebook"]["key_agreement_kind"],
        f"teacher test {metric}": metrics["teacher"]["test"][metric],
    }


def markdown_table(rows: list[dict]) -> str:
    def cell(value):
        return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

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
    (root / "ablation.md").write_text(table + "\n\n" + VARIANT_NOTES)
    write_json(root / "ablation.json", rows)
    print(table)
    return rows


DESCRIPTION = (
    "Distil one GLUE task three times from the same teacher, with the student's keys carried, fresh, or absent, "
    "and write the table side by side: <output-dir>/ablation.md and ablation.json."
)


def build_ablation_parser(argv: list[str]) -> Parser:
    """keydistill.train's flags with the task's defaults, runs/ablation_{task} as the output folder."""
    epilog = (
        "Every keydistill.train flag but --keys applies to all three runs (<output-dir>/keys_carry, keys_fresh, "
        "keys_none); the defaults shown are the task's, its recipe applied (--print-config prints them all)."
    )
    return build_parser(
        {**defaults_for(argv), "output_dir": "runs/ablation_{task}"},
        prog="python -m keydistill.ablation",
        description=DESCRIPTION,
        epilog=paragraphs(epilog),
    )


def ablation_command(argv: list[str]) -> int:
    parser = build_ablation_parser(argv)
    if "keys" in explicit_flags(parser, argv):  # each variant sets its own
        raise UsageError(f"--keys: the ablation runs every choice ({', '.join(VARIANTS)}); leave it out")
    cfg = parse_config(argv, parser)
    if parser.parse_args(argv).print_config:
        validate(cfg)
        print(settings_json(cfg))
        return 0
    validate(cfg)
    for keys in VARIANTS:  # every run's folder, before the first run starts
        check_output_dir(dataclasses.replace(cfg, output_dir=str(cfg.out / f"keys_{keys}")))
    run_ablation(cfg)
    print(wrote(cfg.out, ["ablation.md", "ablation.json", *(f"keys_{keys}/" for keys in VARIANTS)]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(lambda: ablation_command(argv), interrupted="run the same command with --resume to continue")


if __name__ == "__main__":
    sys.exit(main())
