"""The export's last layer at the first position only: equal to the whole layer there, used where the
output reads nothing else (cls pooling, a plain head), and the whole graph everywhere else."""

import pytest
import torch
from torch import nn

from keydistill.export import ExportableClassifier, export_onnx
from keydistill.export.first_token import first_token_hidden
from keydistill.models import student_from_teacher
from tests.helpers.tiny_models import random_sentences, tiny_teacher, tokenizer_in


def pairs_batch(tokenizer, count=7):
    """Sentence pairs of uneven lengths (an odd batch, padding in most rows, token types 0 and 1)."""
    texts = random_sentences(2 * count, seed=3)
    return dict(tokenizer(texts[::2], texts[1::2], padding=True, return_tensors="pt"))


def models(layers):
    torch.manual_seed(0)
    teacher = tiny_teacher(3).eval()
    return {"teacher": teacher, "student": student_from_teacher(teacher, layers=layers).eval()}


@pytest.mark.parametrize("layers", [[0, 3], [2]], ids=["2-layer student", "1-layer student"])
def test_first_position_equals_the_whole_last_layer(tmp_path, layers):
    batch = pairs_batch(tokenizer_in(tmp_path))
    for name, model in models(layers).items():
        with torch.no_grad():
            whole = model._encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            first = first_token_hidden(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        assert first.shape == (len(whole), 1, whole.shape[-1]), name
        torch.testing.assert_close(first, whole[:, :1], rtol=0, atol=1e-5, msg=name)
        assert len(model.encoder.encoder.layer if name == "teacher" else model.encoder.transformer.layer) == (
            4 if name == "teacher" else len(layers)
        )  # the layer list is restored


def last_feed_forward(model) -> nn.Linear:
    layer = (
        model.encoder.encoder.layer[-1] if hasattr(model.encoder, "encoder") else model.encoder.transformer.layer[-1]
    )
    return layer.intermediate.dense if hasattr(layer, "intermediate") else layer.ffn.lin1


def positions_traced(model, tokenizer, path) -> set[int]:
    """The sequence lengths the last layer's feed-forward saw while the export traced the model."""
    seen = set()
    hook = last_feed_forward(model).register_forward_hook(lambda _m, args, _out: seen.add(int(args[0].shape[1])))
    try:
        export_onnx(model, path, tokenizer=tokenizer)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_export_runs_the_last_layer_at_one_position_only_where_the_output_reads_no_other(tmp_path, pooling):
    tokenizer = tokenizer_in(tmp_path)
    torch.manual_seed(0)
    teacher = tiny_teacher(2, pooling=pooling)
    for model in (teacher, student_from_teacher(teacher, layers=[1, 3])):
        seen = positions_traced(model.eval(), tokenizer, tmp_path / "m.onnx")
        if pooling == "cls":
            assert seen == {1}
        else:  # every position of the padded trace batch
            assert len(seen) == 1 and min(seen) > 1
    plain = tiny_teacher(2, with_bottleneck=False).eval()
    assert positions_traced(plain, tokenizer, tmp_path / "plain.onnx") == {1}


class Wrapped(nn.Module):
    """A layer of a layout first_token does not know."""

    def __init__(self, layer):
        super().__init__()
        self.inner = layer

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_an_unknown_layer_layout_keeps_the_whole_graph(tmp_path):
    batch = pairs_batch(tokenizer_in(tmp_path))
    student = models([0, 3])["student"]
    student.encoder.transformer.layer[-1] = Wrapped(student.encoder.transformer.layer[-1])
    assert first_token_hidden(student, batch["input_ids"], batch["attention_mask"]) is None
    with torch.no_grad():
        logits = ExportableClassifier(student)(batch["input_ids"], batch["attention_mask"])[0]
        reference = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
