"""Shared by the training-job tests: a tiny random BERT with its tokenizer, and tiny GLUE folders."""

import os
import random

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

WORDS = "good bad great awful fine movie film plot acting boring fun dull superb poor nice terrible".split()
POSITIVE = {"good", "great", "fine", "fun", "superb", "nice"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_glue(root, rng: random.Random, task: str) -> None:
    """Tiny SST-2 (single sentences) or STS-B (pairs, scores) files whose labels follow the words."""
    for split, n in (("train", 72), ("dev", 24)):
        if task == "sst2":
            lines = ["sentence\tlabel"]
            for _ in range(n):
                words = rng.choices(WORDS, k=rng.randint(2, 7))
                lines.append(f"{' '.join(words)}\t{int(2 * sum(w in POSITIVE for w in words) >= len(words))}")
            folder = root / "SST-2"
        else:
            lines = ["sentence1\tsentence2\tscore"]
            for _ in range(n):
                a, b = rng.choices(WORDS, k=rng.randint(2, 5)), rng.choices(WORDS, k=rng.randint(2, 5))
                lines.append(f"{' '.join(a)}\t{' '.join(b)}\t{5 * len(set(a) & set(b)) / len(set(a) | set(b)):.2f}")
            folder = root / "STS-B"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def make_tiny(root):
    """A tiny random BERT with its tokenizer in root/model, and tiny GLUE folders in root/glue (the `tiny`
    fixture of conftest.py)."""
    model_dir = root / "model"
    model_dir.mkdir()
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (model_dir / "vocab.txt").write_text("\n".join(tokens) + "\n")
    # The path goes positionally: transformers 5.x ignores 4.x's vocab_file keyword (every word -> [UNK]).
    tokenizer = BertTokenizerFast(str(model_dir / "vocab.txt"))
    assert len(tokenizer) == len(tokens), f"the tokenizer has {len(tokenizer)} tokens, the vocab {len(tokens)}"
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(model_dir)
    rng = random.Random(0)
    for task in ("sst2", "stsb"):
        write_glue(root / "glue", rng, task)
    return root


def tiny_settings(tiny, out, *extra, epochs: int = 2) -> list[str]:
    """A tiny training job's arguments without its data: the tiny model, a small bottleneck, short stages. On the
    CPU unless extra says otherwise: the tests build and read models on the CPU, and `--device auto` would send
    their batches to a GPU where there is one."""
    return [
        "--device",
        "cpu",
        "--teacher",
        str(tiny / "model"),
        "--output-dir",
        str(out),
        *("--num-heads", "4", "--num-keys", "8", "--kmeans-samples", "64"),
        *("--batch-size", "8", "--eval-batch-size", "16"),
        *("--teacher-epochs", "1", "--bottleneck-epochs", str(epochs), "--epochs", str(epochs)),
        *("--teacher-lr", "1e-3", "--lr", "1e-3"),
        *extra,
    ]


def tiny_args(tiny, out, *extra):
    """tiny_settings on the tiny GLUE folders (SST-2 by default)."""
    return tiny_settings(tiny, out, "--data-dir", str(tiny / "glue"), "--val-size", "16", *extra)
