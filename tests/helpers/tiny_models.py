"""Tiny random teacher/student folders with a real tokenizer, for the predict, pipeline and export tests."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
from transformers import BertConfig, BertTokenizerFast

from keydistill.bottleneck import BottleneckConfig
from keydistill.models import BertWithKeyBottleneck, student_from_teacher

WORDS = "good bad great awful fine movie film plot acting boring fun dull superb poor nice terrible".split()
SENTENCES = [
    "good movie",
    "boring plot and awful acting",
    "fun",
    "a superb film with great acting",
    "dull dull dull",
    "nice plot but poor acting",
    "terrible",
    "fine film , fine acting , fine plot",
]
REPO = Path(__file__).resolve().parents[2]


def tokenizer_in(folder: Path) -> BertTokenizerFast:
    """A word-level BERT tokenizer over WORDS, saved into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *WORDS]
    vocab.write_text("\n".join(tokens) + "\n")
    tokenizer = vocab_tokenizer(vocab, len(tokens))
    tokenizer.save_pretrained(folder)
    return tokenizer


def vocab_tokenizer(vocab: Path, size: int) -> BertTokenizerFast:
    """A BERT tokenizer over the vocab file. The path goes positionally: transformers 5.x ignores the
    vocab_file keyword of 4.x and builds a 5-token tokenizer that maps every word to [UNK]."""
    tokenizer = BertTokenizerFast(str(vocab))
    assert len(tokenizer) == size, f"the tokenizer has {len(tokenizer)} tokens, {vocab} has {size}"
    return tokenizer


def tiny_teacher(num_labels: int = 2, with_bottleneck: bool = True, **bottleneck) -> BertWithKeyBottleneck:
    config = BertConfig(
        vocab_size=len(WORDS) + 6,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        layer_norm_eps=1e-5,
        initializer_range=0.3,
    )  # large weights: outputs that differ from sentence to sentence
    settings = BottleneckConfig(**{"num_heads": 4, "num_keys": 8, "pooling": "cls", **bottleneck})
    return BertWithKeyBottleneck(config, settings if with_bottleneck else None, num_labels)


def random_sentences(count: int = 64, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 8))) for _ in range(count)]


def fit_keys(model, tokenizer, texts=None) -> None:
    """k-means keys on the model's own queries of many distinct texts (so that no two keys nearly
    coincide), so that different texts pick different keys."""
    batch = tokenizer(list(texts or random_sentences()), padding=True, return_tensors="pt")
    with torch.no_grad():
        queries = model.eval()(batch["input_ids"], batch["attention_mask"]).queries
    model.bottleneck.init_keys_(queries, iters=3, generator=torch.Generator().manual_seed(0))


def write_folders(
    root: Path,
    num_labels: int = 2,
    label_names=("negative", "positive"),
    seed: int = 0,
    with_bottleneck: bool = True,
    **bottleneck,
) -> tuple[Path, Path]:
    """(teacher folder, student folder) as the training job writes them: model, label names, tokenizer."""
    torch.manual_seed(seed)
    tokenizer = tokenizer_in(root / "tokenizer")
    teacher = tiny_teacher(num_labels, with_bottleneck, **bottleneck)
    if teacher.bottleneck is not None:
        fit_keys(teacher, tokenizer)
        with torch.no_grad():  # values far apart, so that different keys give clearly different predictions
            teacher.bottleneck.values.normal_()
    student = student_from_teacher(
        teacher, layers=[1, 3], carry=teacher.bottleneck is not None, with_bottleneck=teacher.bottleneck is not None
    )
    folders = root / "teacher", root / "student"
    for model, folder in zip((teacher, student), folders):
        center_head(model, tokenizer)
        model.set_label_names(label_names if num_labels > 1 else ())
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folders


def center_head(model, tokenizer) -> None:
    """Shift the head's bias so that each class wins on some random texts, and no text ties."""
    batch = tokenizer(random_sentences(seed=1), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**batch).logits
        if logits.shape[1] != 2:
            model.head.bias -= logits.median(0).values
            return
        # Many texts pick the same keys, hence the very same logits: a cut at the median margin would make
        # them all ties (argmax: class 0). Cut between two distinct margins, as near half the texts as can be.
        margins = logits[:, 1] - logits[:, 0]
        distinct = margins.unique()
        cuts = (distinct[:-1] + distinct[1:]) / 2
        below = (margins.unsqueeze(0) < cuts.unsqueeze(1)).sum(1)
        model.head.bias[1] -= cuts[(below - len(margins) / 2).abs().argmin()]


# The real GLUE data: $KEYDISTILL_GLUE_DIR, or shared/data/glue beside the repository.
SHARED_GLUE = Path(os.environ.get("KEYDISTILL_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


def glue_dir() -> Path:
    """SHARED_GLUE, checked to hold the data."""
    folder = SHARED_GLUE
    if not (folder / "SST-2" / "dev.tsv").is_file():
        raise FileNotFoundError(f"no GLUE data at {folder} (expected SST-2/dev.tsv); set KEYDISTILL_GLUE_DIR")
    return folder


def sst2_dev_sentences(limit: int | None = None) -> list[str]:
    lines = (glue_dir() / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0] for line in lines][:limit]
