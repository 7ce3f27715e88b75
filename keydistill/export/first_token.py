"""The encoder's output at the first position only, for graphs that read nothing else.

With cls pooling (and for a plain head) the exported output depends on the last layer's first position
alone: the other positions' queries, attention outputs and feed-forward blocks of that layer are dead work,
about five sixths of the layer. first_token_hidden runs every layer but the last as the model does, then the
last one for the first position only, with the layer's own modules (its keys and values still read every
position). A student of 3 layers does 28% fewer multiply-adds per example; a 6-layer teacher 14%.

Layers are matched by their transformers layout (BERT's BertLayer, DistilBERT's TransformerBlock); any other
encoder returns None, and the export keeps the whole graph.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def first_token_hidden(model, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor | None:
    """The encoder's last hidden state at position 0, [B, 1, D], or None when the layout is not one this
    module knows. Equal to model._encode(...)[:, :1] up to float rounding."""
    stack = _layer_stack(model.encoder)
    if stack is None or len(getattr(*stack)) == 0:
        return None
    owner, name = stack
    last = getattr(owner, name)[-1]
    run_last = _first_position_runner(last)
    if run_last is None:
        return None
    with _without_last_layer(owner, name):
        hidden = model._encode(input_ids, attention_mask, token_type_ids)
    return run_last(last, hidden, attention_mask)


def _layer_stack(encoder: nn.Module) -> tuple[nn.Module, str] | None:
    """(module, attribute) of the encoder's nn.ModuleList of layers."""
    for path in ("encoder", "transformer"):  # BertModel.encoder.layer, DistilBertModel.transformer.layer
        owner = getattr(encoder, path, None)
        if isinstance(getattr(owner, "layer", None), nn.ModuleList):
            return owner, "layer"
    return None


@contextmanager
def _without_last_layer(owner: nn.Module, name: str):
    layers = getattr(owner, name)
    setattr(owner, name, layers[:-1])
    try:
        yield
    finally:
        setattr(owner, name, layers)


def _first_position_runner(layer: nn.Module):
    if all(hasattr(layer, a) for a in ("attention", "intermediate", "output")) and hasattr(layer.attention, "self"):
        return _bert_layer
    if all(hasattr(layer, a) for a in ("attention", "sa_layer_norm", "ffn", "output_layer_norm")):
        return _distilbert_layer
    return None


def _attend(query: nn.Linear, key: nn.Linear, value: nn.Linear, heads: int, hidden, attention_mask):
    """Multi-head attention of position 0 over every unmasked position: [B, 1, D] before the output
    projection, as the layer computes it (scaled dot products, padding masked to the dtype's minimum)."""
    batch, length, _ = hidden.shape
    q = query(hidden[:, :1])
    size = q.shape[-1] // heads
    q = q.view(batch, 1, heads, size).transpose(1, 2)
    k = key(hidden).view(batch, length, heads, size).transpose(1, 2)
    v = value(hidden).view(batch, length, heads, size).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * size**-0.5
    padding = (attention_mask == 0)[:, None, None, :]
    scores = scores.masked_fill(padding, torch.finfo(scores.dtype).min)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, 1, heads * size)


def _bert_layer(layer: nn.Module, hidden, attention_mask):
    attention = layer.attention
    heads = attention.self.num_attention_heads
    context = _attend(attention.self.query, attention.self.key, attention.self.value, heads, hidden, attention_mask)
    attended = attention.output(context, hidden[:, :1])
    return layer.output(layer.intermediate(attended), attended)


def _distilbert_layer(layer: nn.Module, hidden, attention_mask):
    attention = layer.attention
    context = _attend(attention.q_lin, attention.k_lin, attention.v_lin, attention.n_heads, hidden, attention_mask)
    attended = layer.sa_layer_norm(attention.out_lin(context) + hidden[:, :1])
    return layer.output_layer_norm(layer.ffn(attended) + attended)
