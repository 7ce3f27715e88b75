"""The float32 ONNX graph of a keydistill model, and its check against PyTorch.

The exported graph takes input_ids and attention_mask [batch, sequence] (and token_type_ids for a BERT
teacher), both axes dynamic, and returns logits [batch, num_labels] and, with a bottleneck, key_indices
[batch, positions, heads] (positions: 1 for cls pooling; the sequence for mean pooling, -1 at padding).
The file's metadata (metadata_props) carries what serving it needs without PyTorch or the model folder
(keydistill.predict.onnx_predictor): the label names, problem type, bottleneck settings, truncation length,
and the tokenizer (its tokenizer.json).

Export mode: the model's own lookup goes through keydistill.ops.nearest_key, a custom op ONNX has no
counterpart for, and pools with data-dependent shapes. ExportableClassifier runs the same eval-mode path in
plain tensor ops instead: the nearest key as argmin_k ||k||^2 - 2 q.k (||q||^2 is the same for every k;
ties go to the lowest k, as in nearest_key), then the values, the mean over heads and the masked mean over
positions. Where the output reads position 0 alone (cls pooling), the last layer runs for that position only
(keydistill.export.first_token). The lookup's nodes are named under LOOKUP_SCOPE, so that int8 quantization
can leave them in float32 (keydistill.export.quantize). check_onnx compares the exported file in onnxruntime
against the PyTorch model.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from keydistill.bottleneck import DiscreteKeyBottleneck
from keydistill.export.first_token import first_token_hidden
from keydistill.models import BertWithKeyBottleneck, KeyBottleneckClassifier

DEFAULT_OPSET = 17
LOOKUP_SCOPE = "/lookup/"  # the exported node names of the bottleneck's lookup start so (LookupScope)
HEAD_SCOPE = "/head/"  # and those of the classification head hold this
# Sentences of varied length for the export trace (a padded batch, so that the traced graph keeps the
# attention mask) and for the post-export check.
SAMPLE_TEXTS = (
    "a gripping, beautifully acted film",
    "dull",
    "the plot is thin , but the performances carry it through to a satisfying end .",
    "i would not watch it again",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .",
    "ok",
)


class ExportableClassifier(nn.Module):
    """A classifier's eval-mode forward (encoder -> bottleneck -> head) in ops the ONNX exporter knows.

    Returns (logits,) for a plain head, or (logits, key_indices [B, T, H]) with a bottleneck.
    """

    def __init__(self, model: KeyBottleneckClassifier, first_token: bool = True):
        super().__init__()
        self.model = model
        # The output reads the last layer at position 0 only (cls pooling, or a plain head): with
        # first_token, that layer runs for that position alone (keydistill.export.first_token).
        self.first_token = first_token and (model.bottleneck is None or model.bottleneck.config.pooling == "cls")
        # The exporter traces in eval mode, then restores the wrapper's mode, and with it the model's: a
        # wrapper left in training mode would hand back a model whose next forward updates its keys.
        self.eval()
        self.lookup = LookupScope()

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"]
        return names + ["token_type_ids"] if isinstance(self.model, BertWithKeyBottleneck) else names

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + (["key_indices"] if self.model.bottleneck is not None else [])

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ):
        model = self.model
        hidden = first_token_hidden(model, input_ids, attention_mask, token_type_ids) if self.first_token else None
        if hidden is None:
            hidden = model._encode(input_ids, attention_mask, token_type_ids)
        if model.bottleneck is None:
            return (model.head(hidden[:, 0]),)
        pooled, key_indices = self.lookup(model.bottleneck, hidden, attention_mask)
        return model.head(pooled), key_indices


class LookupScope(nn.Module):
    """exportable_lookup called as a submodule: the exporter names its nodes LOOKUP_SCOPE..., so that
    quantization can find and skip them. It holds no weights (the bottleneck stays the model's)."""

    def forward(self, bottleneck: DiscreteKeyBottleneck, hidden: torch.Tensor, attention_mask: torch.Tensor):
        return exportable_lookup(bottleneck, hidden, attention_mask)


def exportable_lookup(bottleneck: DiscreteKeyBottleneck, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """The bottleneck's eval-mode output with dense, exportable ops: (pooled [B, value_dim], key indices
    [B, T, H]), T = 1 for cls pooling, else the sequence length with -1 at padding."""
    cls_pooling = bottleneck.config.pooling == "cls"
    tokens = hidden[:, :1] if cls_pooling else hidden
    queries = bottleneck.project(tokens).float()  # [B, T, H, d]
    keys = bottleneck.keys  # [H, K, d]
    scores = keys.pow(2).sum(-1) - 2 * torch.einsum("bthd,hkd->bthk", queries, keys)
    index = scores.argmin(-1)  # [B, T, H]
    heads = torch.arange(keys.shape[0], device=index.device)
    values = bottleneck.values[heads, index].mean(-2)  # [B, T, value_dim]: the mean over heads
    if cls_pooling:
        return values[:, 0], index
    kept = attention_mask.unsqueeze(-1).to(values.dtype)  # [B, T, 1]
    pooled = (values * kept).sum(1) / kept.sum(1).clamp_min(1)
    return pooled, index.masked_fill(kept == 0, -1)


def sample_batch(model: KeyBottleneckClassifier, tokenizer=None, texts: Sequence[str] = SAMPLE_TEXTS) -> dict:
    """A padded batch of `texts` (random token ids of the same lengths when there is no tokenizer)."""
    if tokenizer is not None:
        batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    else:
        generator = torch.Generator().manual_seed(0)
        lengths = torch.tensor([min(len(t.split()) + 2, model.config.max_position_embeddings) for t in texts])
        width = int(lengths.max())
        mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
        ids = torch.randint(1, model.config.vocab_size, (len(texts), width), generator=generator) * mask
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {name: batch[name] for name in ExportableClassifier(model).input_names}


def export_onnx(
    model: KeyBottleneckClassifier, path: str | os.PathLike, *, tokenizer=None, opset: int = DEFAULT_OPSET
) -> Path:
    """Write `model` as an ONNX file with dynamic batch and sequence axes; returns the path. The export
    traces a float32 copy on the CPU when the model lives elsewhere; `model` keeps its train/eval mode."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        model = copy.deepcopy(model).cpu().float()
    training = model.training
    try:
        return _export(ExportableClassifier(model), path, tokenizer, opset)
    finally:
        model.train(training)


def _export(wrapper: ExportableClassifier, path: str | os.PathLike, tokenizer, opset: int) -> Path:
    model = wrapper.model
    inputs = sample_batch(model, tokenizer)
    if bool(inputs["attention_mask"].all()):
        raise ValueError("the export trace needs a padded batch (texts of different lengths)")
    axes = {name: {0: "batch", 1: "sequence"} for name in wrapper.input_names}
    axes["logits"] = {0: "batch"}
    if "key_indices" in wrapper.output_names:
        axes["key_indices"] = {0: "batch", 1: "positions"}
    options = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the tracer's notes on Python-side shape arithmetic of transformers
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                tuple(inputs.values()),
                str(path),
                input_names=wrapper.input_names,
                output_names=wrapper.output_names,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                **options,
            )
    write_metadata(path, serving_metadata(model, tokenizer))
    return path


def serving_metadata(model: KeyBottleneckClassifier, tokenizer=None) -> dict[str, str]:
    """What a file needs to be served alone: labels, problem type, bottleneck, truncation and tokenizer.
    max_length is keydistill.predict.Predictor's default: the position embeddings, or the tokenizer's limit."""
    limit = model.config.max_position_embeddings
    bottleneck = model.bottleneck.config.to_dict() if model.bottleneck is not None else None
    meta = {
        "model_class": type(model).__name__,
        "id2label": json.dumps(dict(enumerate(model.label_names))),
        "problem_type": model.config.problem_type,
        "bottleneck": json.dumps(bottleneck),
        "max_length": str(min(limit, getattr(tokenizer, "model_max_length", None) or limit)),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast (Rust) tokenizers only
    if backend is not None:
        meta["tokenizer"] = backend.to_str()
        meta["pad_token_id"] = str(tokenizer.pad_token_id or 0)
    return meta


def write_metadata(path: str | os.PathLike, meta: dict[str, str]) -> None:
    """Set the file's metadata_props (replacing keys it already has)."""
    import onnx

    graph = onnx.load(str(path))
    kept = [(p.key, p.value) for p in graph.metadata_props if p.key not in meta]
    del graph.metadata_props[:]
    for key, value in kept + list(meta.items()):
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


LABEL_TIE = 1e-5  # logits closer than this are a tie that float rounding may break either way
# Key distances (||k||^2 - 2 q.k) closer than this share of their scale are a tie the custom op and the
# export's argmin may break differently.
KEY_TIE = 1e-5


def check_onnx(
    model: KeyBottleneckClassifier, path: str | os.PathLike, batches: Sequence[dict], threads: int | None = None
) -> dict:
    """Run the ONNX file in onnxruntime on `batches` (dicts of int64 tensors) and compare with PyTorch.

    Returns max_abs_diff (logits), labels_equal (argmax, or all for regression), keys_equal (the key
    indices, where PyTorch's nearest key is not a float-rounding tie) and examples.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]
    worst, labels_equal, keys_equal, examples = 0.0, True, True, 0
    if model.device.type != "cpu" or model.dtype != torch.float32:
        model = copy.deepcopy(model).cpu().float()
    model.eval()
    for batch in batches:
        outputs = session.run(None, {name: batch[name].numpy() for name in wanted})
        with torch.no_grad():
            reference = model(**{k: v for k, v in batch.items() if k in wanted})
        logits = torch.from_numpy(outputs[0])
        worst = max(worst, float((logits - reference.logits).abs().max()))
        if model.num_labels > 1:
            # Where PyTorch's two best logits tie to within rounding, either label is right: compare the rest.
            top2 = reference.logits.topk(2, dim=-1).values
            decided = (top2[:, 0] - top2[:, 1]) > LABEL_TIE
            labels_equal &= bool(torch.equal(logits.argmax(-1)[decided], reference.logits.argmax(-1)[decided]))
        if model.bottleneck is not None:
            exported = torch.from_numpy(outputs[1])
            exported = exported[exported >= 0].view(-1, exported.shape[-1])  # [N, H] like the reference's
            decided = _decided_keys(model.bottleneck.keys, reference.queries)
            keys_equal &= bool(torch.equal(exported[decided], reference.key_indices[decided]))
        examples += len(logits)
    return {"max_abs_diff": worst, "labels_equal": labels_equal, "keys_equal": keys_equal, "examples": examples}


def _decided_keys(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """[N, H] bool: where a query's nearest key beats the runner-up by more than a rounding tie (KEY_TIE)."""
    scores = keys.float().pow(2).sum(-1) - 2 * torch.einsum("nhd,hkd->nhk", queries.float(), keys.float())
    if scores.shape[-1] < 2:
        return torch.ones(scores.shape[:2], dtype=torch.bool)
    best2 = scores.topk(2, dim=-1, largest=False).values
    scale = scores.abs().amax(-1).clamp_min(1.0)
    return (best2[..., 1] - best2[..., 0]) > KEY_TIE * scale
