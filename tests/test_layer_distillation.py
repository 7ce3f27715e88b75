"""--hidden-weight: the student's layers against the teacher layers they were copied from, over real tokens."""
import pytest
import torch

from keydistill.losses import hidden_state_loss
from keydistill.models import student_from_teacher
from keydistill.train.config import TrainConfig, config_problems
from keydistill.train.targets import LayerMatch
from test_models import tiny_teacher, tokens


def test_hidden_state_loss_is_the_masked_mean_squared_error(seed):
    b, length, dim = 5, 9, 7
    mask = (torch.arange(length) < torch.randint(1, length + 1, (b,)).unsqueeze(1)).long()
    student = [torch.randn(b, length, dim, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(b, length, dim, dtype=torch.float64) for _ in range(3)]
    loss = hidden_state_loss([s.float() for s in student], [t.float() for t in teacher], mask)
    real = mask.bool()
    expected = torch.stack([((s - t)[real] ** 2).mean() for s, t in zip(student, teacher)]).mean()
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)
    grads = torch.autograd.grad(loss, student)
    expected_grads = torch.autograd.grad(expected, student)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, atol=1e-7, rtol=1e-5)
        assert not g[~real].any()  # padding never pulls
    padded = [t.clone() for t in teacher]
    for t in padded:
        t[~real] = 1e6
    torch.testing.assert_close(hidden_state_loss(student, padded, mask).double(), loss.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layers, zero", [([0, 1], True), ([1, 3], False)])
def test_each_student_layer_meets_the_teacher_layer_it_was_copied_from(seed, layers, zero):
    """A student of the teacher's first layers computes exactly what they compute: no loss at all; one of
    other layers starts apart. An off-by-one in the layer map (embeddings are hidden_states[0]) fails both."""
    teacher = tiny_teacher().eval()
    student = student_from_teacher(teacher, layers=layers).eval()
    match = LayerMatch(student, teacher, layers)
    ids, mask = tokens()
    student(ids, mask)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    loss = match.loss(batch)
    assert (loss.item() < 1e-12) if zero else (loss.item() > 1e-6)  # random layers differ slightly
    assert not teacher.training  # the teacher is a fixed target: no dropout


def test_the_student_encoder_learns_from_the_hidden_state_loss_alone(seed):
    teacher = tiny_teacher().eval()
    student = student_from_teacher(teacher, layers=[1, 3])
    match = LayerMatch(student, teacher, [1, 3])
    ids, mask = tokens()
    student(ids, mask)
    match.loss({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.encoder.transformer.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # ... so it is a learning path of its own: no other loss needs to reach the encoder
    assert config_problems(TrainConfig(feature_weight=0.0, hidden_weight=1.0)) == []
    assert config_problems(TrainConfig(feature_weight=0.0)) != []


def test_cached_teacher_outputs_give_the_loss_the_running_teacher_gives(tiny, tmp_path):
    """The teacher's layer outputs computed once before training (float16) and the teacher run on each batch
    give the same loss, to float16 rounding, on a real run's batches."""
    from keydistill.data import Collator
    from keydistill.train import parse_config
    from keydistill.train.context import setup
    from keydistill.train.features import batches_on
    from train_fixtures import tiny_args
    run = setup(parse_config(tiny_args(tiny, tmp_path)))
    torch.manual_seed(0)
    teacher = tiny_teacher_for(run)
    student = student_from_teacher(teacher, layers=[1, 3]).eval()
    running, cached = LayerMatch(student, teacher, [1, 3]), LayerMatch(student, teacher, [1, 3]).cache(run, run.train)
    assert running.cached is None and len(cached.cached) == len(run.train)
    assert {(t.device.type, t.dtype) for t in cached.cached} == {("cpu", torch.float16)}
    assert [len(t) for t in cached.cached] == run.train.lengths()  # each example's real tokens, no padding
    for _, batch in batches_on(run.device, run.train, Collator(run.tokenizer.pad_token_id), [[0, 5, 9], [3, 1]]):
        student(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(cached.loss(batch), running.loss(batch), rtol=2e-3, atol=1e-6)


def test_outputs_too_large_to_cache_are_announced_and_computed_per_batch(tiny, tmp_path, monkeypatch, capsys):
    from keydistill.train import parse_config
    from keydistill.train.context import setup
    from train_fixtures import tiny_args
    run = setup(parse_config(tiny_args(tiny, tmp_path)))
    teacher = tiny_teacher_for(run)
    monkeypatch.setattr(LayerMatch, "CACHE_BYTES", 1)
    match = LayerMatch(student_from_teacher(teacher, layers=[1, 3]), teacher, [1, 3]).cache(run, run.train)
    assert match.cached is None
    assert "the teacher runs beside the student on every batch" in capsys.readouterr().out


def tiny_teacher_for(run):
    """A random teacher on the run's tokenizer (the tiny BERT of the fixture), scaled so layers differ."""
    from keydistill.models import BertWithKeyBottleneck
    teacher = BertWithKeyBottleneck.from_pretrained(run.cfg.teacher, bottleneck=run.teacher_bottleneck, num_labels=2)
    with torch.no_grad():
        for p in teacher.encoder.encoder.parameters():
            p.normal_(0, 0.3)
    return teacher.eval()
