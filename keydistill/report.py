"""What a run shows a person: the one-screen summary table and the training-curves PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def summary_table(metrics: dict, metric_names: tuple[str, ...]) -> str:
    """Teacher and student on val and test, the student/teacher ratio, the codebook, the time taken."""
    splits = [split for split in ("val", "test") if split in metrics["teacher"]]  # own data may have no test
    columns = [f"{split} {name}" for split in splits for name in metric_names]
    lines = [
        f"== keydistill {metrics['task']}: {metrics['seconds'] / 60:.1f} min ==",
        f"{'model':<8} {'params':>8}  " + "  ".join(f"{c:>14}" for c in columns) + f"  {'inference ex/s':>14}",
    ]
    for model in ("teacher", "student"):
        values = [metrics[model][split][name] for split in splits for name in metric_names]
        speed = metrics.get("inference_examples_per_s", {}).get(model, float("nan"))
        lines.append(
            f"{model:<8} {metrics[model + '_params'] / 1e6:>7.1f}M  "
            + "  ".join(f"{v:>14.4f}" for v in values)
            + f"  {speed:>14.0f}"
        )
    primary, split = metric_names[0], splits[-1]
    teacher_test = metrics["teacher"][split][primary]
    if teacher_test:
        # two decimals: the targets sit at whole percents (93%, 97%), and 92.96% must not print as 93.0%
        lines.append(f"student / teacher {split} {primary}: {metrics['student'][split][primary] / teacher_test:.2%}")
    if "fidelity" in metrics:  # runs before it was measured lack it
        what = "score correlation" if "pearson" in metric_names else "same prediction"
        lines.append(f"student fidelity to the teacher on {split} ({what}): {metrics['fidelity']:.1%}")
    codebook = metrics["codebook"]
    for model in ("teacher", "student"):
        usage = codebook[model]
        if usage is not None:
            lines.append(
                f"{model} codebook on {split}: perplexity {usage['test_perplexity']:.1f} of {usage['num_keys']} keys, "
                f"{usage['test_live_fraction']:.0%} keys used ({usage['num_heads']} heads)"
            )
    if codebook["key_agreement"] is not None:
        lines.append(f"teacher-student key agreement on {split}: {codebook['key_agreement']:.1%}")
    lines.append(f"student best val at step {metrics['steps_to_best_val']}")
    for entry in metrics["history"]:
        val = ", ".join(f"{k} {v:.4f}" for k, v in entry["val"].items())
        lines.append(
            f"  {entry['stage']:<18} epoch {entry['epoch']}: loss {entry['loss']['total']:.4f}, val {val}, "
            f"{entry['examples_per_s']:.0f} ex/s, {entry['seconds']:.0f} s"
        )
    return "\n".join(lines)


def plot_run(metrics: dict, path: str | Path) -> None:
    """Loss curves per stage, validation per epoch, and sorted key usage of teacher and student on test."""
    fig, (loss_ax, val_ax, usage_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for stage, curve in metrics["curves"].items():
        if curve:
            steps, losses = zip(*curve)
            loss_ax.plot(steps, losses, label=stage, linewidth=0.8)
    loss_ax.set(title="training loss", xlabel="optimizer step", yscale="log")
    loss_ax.legend()
    stages = sorted({e["stage"] for e in metrics["history"]})
    for stage in stages:
        entries = [e for e in metrics["history"] if e["stage"] == stage]
        name = next(iter(entries[0]["val"]))
        val_ax.plot(
            [e["epoch"] for e in entries], [e["val"][name] for e in entries], marker="o", label=f"{stage} {name}"
        )
    val_ax.set(title="validation", xlabel="epoch")
    val_ax.legend()
    for model in ("teacher", "student"):
        usage = metrics["codebook"][model]
        if usage is not None:
            counts = sorted((c for head in usage["key_counts"] for c in head), reverse=True)
            total = sum(counts) or 1
            usage_ax.plot([c / total for c in counts], label=model)
    usage_ax.set(
        title="key usage on test (all heads, sorted)", xlabel="key rank", ylabel="share of lookups", yscale="log"
    )
    usage_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
