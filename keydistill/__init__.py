"""keydistill: knowledge distillation through a discrete key bottleneck."""

__version__ = "0.1.0"

# After `import keydistill`, transformers' AutoConfig, AutoModelForSequenceClassification and
# pipeline("text-classification") load the teacher and student folders that keydistill saves.
from keydistill.models import register_with_transformers as _register  # noqa: E402

_register()
