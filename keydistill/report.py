"""What a run shows a person: the one-screen summary table, the training-curves PNG and TensorBoard events."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from keydistill.board import tensorboard_writer  # noqa: E402


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


def stage_offsets(metrics: dict) -> dict[str, int]:
    """Where each stage starts on one optimizer-step axis: the stages laid end to end, in the order they ran."""
    offsets, start = {}, 0
    for stage, curve in metrics["curves"].items():
        offsets[stage] = start
        start += curve[-1][0] if curve else 0
    return offsets


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with its start-up bias removed (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def validation_points(metrics: dict, stage: str) -> list[dict]:
    """A stage's validations in order, {"step", "val", "chooses"}: every one (metrics["validations"]), or for a
    run written before they were kept, its epoch ends."""
    kept = metrics.get("validations", {}).get(stage)
    if kept:
        return kept
    return [
        {"step": e.get("step", e["epoch"]), "val": e["val"], "chooses": True}
        for e in metrics["history"]
        if e["stage"] == stage
    ]


def plot_run(metrics: dict, path: str | Path) -> None:
    """Loss and validation over optimizer steps (the stages end to end, the loss smoothed with its raw trace
    faint behind), and sorted key usage of teacher and student on test."""
    fig, (loss_ax, val_ax, usage_ax) = plt.subplots(1, 3, figsize=(15, 4))
    offsets = stage_offsets(metrics)
    colors = {stage: f"C{i}" for i, stage in enumerate(offsets)}
    for stage, curve in metrics["curves"].items():
        if curve:
            steps = [offsets[stage] + step for step, _ in curve]
            losses = [loss for _, loss in curve]
            loss_ax.plot(steps, losses, color=colors[stage], alpha=0.2, linewidth=0.6)
            loss_ax.plot(steps, smoothed(losses), color=colors[stage], linewidth=1.5, label=stage)
    loss_ax.set(title="training loss (smoothed)", xlabel="optimizer step (stages end to end)", yscale="log")
    loss_ax.legend()
    for stage in offsets:
        points = validation_points(metrics, stage)
        if not points:
            continue
        name = next(iter(points[0]["val"]))
        steps = [offsets[stage] + p["step"] for p in points]
        val_ax.plot(steps, [p["val"][name] for p in points], color=colors[stage], label=f"{stage} {name}")
        chose = [p.get("chooses", True) for p in points]  # hollow: a curve point, which keeps no weights
        for filled in (True, False):
            xs = [x for x, c in zip(steps, chose) if c == filled]
            ys = [p["val"][name] for p, c in zip(points, chose) if c == filled]
            val_ax.scatter(xs, ys, color=colors[stage], facecolors=None if filled else "none", zorder=3)
    val_ax.set(title="validation (hollow: curve points)", xlabel="optimizer step (stages end to end)")
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


def write_tensorboard(metrics: dict, folder: str | Path) -> None:
    """The run's curves as TensorBoard events in folder: each stage's loss per optimizer step, and its
    validation metrics at the steps they were measured (the stages end to end, as in the PNG)."""
    offsets = stage_offsets(metrics)
    shutil.rmtree(folder, ignore_errors=True)  # written whole from the metrics: a resumed run's old file would repeat
    with tensorboard_writer()(log_dir=str(folder)) as writer:
        for stage, curve in metrics["curves"].items():
            for step, loss in curve:
                writer.add_scalar(f"{stage}/loss", loss, offsets[stage] + step)
        for stage, offset in offsets.items():
            for point in validation_points(metrics, stage):
                for name, value in point["val"].items():
                    writer.add_scalar(f"{stage}/val_{name}", value, offset + point["step"])
