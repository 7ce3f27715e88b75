"""Tiny random BERT teachers without a tokenizer, and token batches for them (the model tests)."""

import torch
from transformers import BertConfig

from keydistill.bottleneck import BottleneckConfig
from keydistill.models import BertWithKeyBottleneck

VOCAB = 101


def tiny_config(**fields) -> BertConfig:
    # layer_norm_eps differs from DistilBERT's hard-coded 1e-12, so the eps transfer is exercised.
    return BertConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 24,
            "num_hidden_layers": 4,
            "num_attention_heads": 3,
            "intermediate_size": 40,
            "max_position_embeddings": 32,
            "layer_norm_eps": 1e-5,
            **fields,
        }
    )


def tiny_teacher(num_labels=3, **bottleneck) -> BertWithKeyBottleneck:
    config = BottleneckConfig(**{"num_heads": 4, "num_keys": 16, "pooling": "mean", **bottleneck})
    return BertWithKeyBottleneck(tiny_config(), config, num_labels)


def tokens(b=6, length=11):
    ids = torch.randint(1, VOCAB, (b, length))
    lengths = torch.randint(2, length + 1, (b,))
    lengths[0] = length
    mask = (torch.arange(length) < lengths.unsqueeze(1)).long()
    return ids * mask, mask
