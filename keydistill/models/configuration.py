"""transformers configs of the keydistill classifiers: the encoder's own config plus the bottleneck.

KeyBottleneckBertConfig is a BertConfig (model_type "keydistill_bert"), KeyBottleneckDistilBertConfig a
DistilBertConfig (model_type "keydistill_distilbert"): every encoder attribute reads as before
(`teacher.config.num_hidden_layers`, `student.config.n_layers`), and they add

- bottleneck: the BottleneckConfig as a dict, or None for a plain head;
- the standard num_labels / id2label / label2id / problem_type ("regression" when num_labels == 1), which
  transformers' pipelines read.

Saved as config.json; `import keydistill` registers both model types with AutoConfig, so
AutoConfig / AutoModelForSequenceClassification / pipeline recognise the folders.
"""

from __future__ import annotations

from typing import Sequence

from transformers import BertConfig, DistilBertConfig

from keydistill.bottleneck import BottleneckConfig

# Config keys that belong to the classifier, not to the encoder inside it.
CLASSIFIER_KEYS = (
    "bottleneck",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "architectures",
    "model_type",
    "transformers_version",
    "auto_map",
    "dtype",
    "torch_dtype",
)


class KeyBottleneckConfigMixin:
    """What the teacher's and the student's configs share."""

    encoder_config_class: type

    @classmethod
    def from_encoder_config(
        cls,
        encoder_config,
        bottleneck: BottleneckConfig | None,
        num_labels: int,
        label_names: Sequence[str] | None = None,
    ):
        """A classifier config from an encoder config (plain or already a classifier's, which is copied)."""
        fields = {k: v for k, v in encoder_config.to_dict().items() if k not in CLASSIFIER_KEYS}
        return cls(
            **fields,
            bottleneck=bottleneck.to_dict() if bottleneck is not None else None,
            **label_fields(num_labels, label_names),
        )

    def encoder_config(self):
        """The plain BertConfig / DistilBertConfig the encoder is built from."""
        fields = {k: v for k, v in self.to_dict().items() if k not in CLASSIFIER_KEYS}
        return self.encoder_config_class(**fields)

    def bottleneck_config(self) -> BottleneckConfig | None:
        return BottleneckConfig.from_dict(self.bottleneck) if self.bottleneck is not None else None

    @property
    def label_names(self) -> tuple[str, ...]:
        """The class names in index order (transformers' LABEL_0, LABEL_1, ... when none were set)."""
        return tuple(self.id2label[i] for i in range(self.num_labels))


class KeyBottleneckBertConfig(KeyBottleneckConfigMixin, BertConfig):
    model_type = "keydistill_bert"
    encoder_config_class = BertConfig
    bottleneck: dict | None = None


class KeyBottleneckDistilBertConfig(KeyBottleneckConfigMixin, DistilBertConfig):
    model_type = "keydistill_distilbert"
    encoder_config_class = DistilBertConfig
    bottleneck: dict | None = None


def label_fields(num_labels: int, label_names: Sequence[str] | None) -> dict:
    """num_labels, id2label, label2id and problem_type for a head of num_labels outputs (1: regression)."""
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise ValueError(f"num_labels must be an integer >= 1 (1 means regression), got {num_labels!r}")
    names = check_label_names(num_labels, label_names) or tuple(f"LABEL_{i}" for i in range(num_labels))
    return {
        "num_labels": num_labels,
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
        "problem_type": "regression" if num_labels == 1 else "single_label_classification",
    }


def check_label_names(num_labels: int, label_names: Sequence[str] | None) -> tuple[str, ...]:
    """The names as a tuple (empty: none given); ValueError unless they are num_labels distinct, non-empty
    strings. A regression head (num_labels == 1) takes no names."""
    names = tuple(label_names or ())
    if not names:
        return names
    if num_labels == 1:
        raise ValueError(f"a regression model (num_labels=1) has no label names, got {list(names)}")
    if len(names) != num_labels or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"label names must be {num_labels} distinct non-empty strings, one per class, got {list(names)}"
        )
    return names
