"""Teacher (BERT) and student (DistilBERT) classifiers that carry a discrete key bottleneck.

- BertWithKeyBottleneck / DistilBertWithKeyBottleneck: forward, save_pretrained, from_pretrained,
  set_label_names; transformers PreTrainedModels with their own configs.
- transfer_weights, carry_keys, student_from_teacher, student_config_from_teacher: building a student.
- register_with_transformers: AutoConfig / AutoModelForSequenceClassification know both model types
  (done on import; `import keydistill` imports this module once transformers is imported).
"""

from keydistill.bottleneck import BottleneckConfig
from keydistill.models.classifiers import (
    BertWithKeyBottleneck,
    DistilBertWithKeyBottleneck,
    KeyBottleneckClassifier,
    KeyBottleneckOutput,
    is_checkpoint,
    load_model,
)
from keydistill.models.configuration import KeyBottleneckBertConfig, KeyBottleneckDistilBertConfig
from keydistill.models.transfer import carry_keys, student_config_from_teacher, student_from_teacher, transfer_weights

__all__ = [
    "BottleneckConfig",
    "BertWithKeyBottleneck",
    "DistilBertWithKeyBottleneck",
    "KeyBottleneckClassifier",
    "KeyBottleneckOutput",
    "KeyBottleneckBertConfig",
    "KeyBottleneckDistilBertConfig",
    "is_checkpoint",
    "load_model",
    "transfer_weights",
    "carry_keys",
    "student_from_teacher",
    "student_config_from_teacher",
    "register_with_transformers",
]


def register_with_transformers() -> None:
    """Make AutoConfig, AutoModelForSequenceClassification and pipeline("text-classification") load
    keydistill folders: the documented registration of a custom config and model type. The BERT tokenizer
    is registered too, as the pipelines of transformers 4.x load a tokenizer only for model types they know
    one for (a folder's own tokenizer_config.json still decides which tokenizer loads)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertTokenizerFast

    for model_class in (BertWithKeyBottleneck, DistilBertWithKeyBottleneck):
        AutoConfig.register(model_class.config_class.model_type, model_class.config_class, exist_ok=True)
        AutoModelForSequenceClassification.register(model_class.config_class, model_class, exist_ok=True)
        AutoTokenizer.register(model_class.config_class, fast_tokenizer_class=BertTokenizerFast, exist_ok=True)


register_with_transformers()  # so `import keydistill` registers as soon as transformers is imported
