"""Teacher (BERT) and student (DistilBERT) classifiers that carry a discrete key bottleneck.

- BertWithKeyBottleneck / DistilBertWithKeyBottleneck: forward, save_pretrained, from_pretrained.
- transfer_weights, carry_keys, student_from_teacher, student_config_from_teacher: building a student.
"""
from keydistill.bottleneck import BottleneckConfig
from keydistill.models.classifiers import BertWithKeyBottleneck, DistilBertWithKeyBottleneck, KeyBottleneckOutput, load_model
from keydistill.models.transfer import carry_keys, student_config_from_teacher, student_from_teacher, transfer_weights

__all__ = [
    "BottleneckConfig", "BertWithKeyBottleneck", "DistilBertWithKeyBottleneck", "KeyBottleneckOutput", "load_model",
    "transfer_weights", "carry_keys", "student_from_teacher", "student_config_from_teacher",
]
