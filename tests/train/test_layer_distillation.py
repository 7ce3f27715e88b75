"""--hidden-weight and --attention-weight: the student's layers against the teacher layers they were copied
from, by output and by attention, over real tokens."""

import math

import pytest
import torch

from keydistill.losses import hidden_state_loss, relation_loss
from keydistill.models import student_from_teacher
from keydistill.train.config import TrainConfig, config_problems
from keydistill.train.targets import LayerMatch
from tests.helpers.bare_models import tiny_teacher, tokens


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
    with torch.no_grad():
        for p in teacher.encoder.encoder.parameters():
            p.normal_(0, 0.3)  # at the initial 0.02 attention is near uniform in every layer
    student = student_from_teacher(teacher, layers=layers).eval()
    match = LayerMatch(student, teacher, layers, ("hidden", "attention", "value_relation"))
    ids, mask = tokens()
    student(ids, mask)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    losses = match.losses(batch)
    assert set(losses) == {"hidden", "attention", "value_relation"}
    for loss in losses.values():
        assert (loss.item() < 1e-12) if zero else (loss.item() > 1e-4)
    assert not teacher.training  # the teacher is a fixed target: no dropout


def test_the_student_encoder_learns_from_the_hidden_state_loss_alone(seed):
    teacher = tiny_teacher().eval()
    student = student_from_teacher(teacher, layers=[1, 3])
    match = LayerMatch(student, teacher, [1, 3])
    ids, mask = tokens()
    student(ids, mask)
    match.losses({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})[
        "hidden"
    ].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.encoder.transformer.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # ... so it is a learning path of its own: no other loss needs to reach the encoder
    assert config_problems(TrainConfig(feature_weight=0.0, hidden_weight=1.0)) == []
    assert config_problems(TrainConfig(feature_weight=0.0, attention_weight=1.0)) == []
    assert config_problems(TrainConfig(feature_weight=0.0, value_relation_weight=1.0)) == []
    assert config_problems(TrainConfig(feature_weight=0.0)) != []


def test_cached_teacher_outputs_give_the_loss_the_running_teacher_gives(tiny, tmp_path):
    """The teacher's layer outputs computed once before training (float16) and the teacher run on each batch
    give the same loss, to float16 rounding, on a real run's batches."""
    from keydistill.data import Collator
    from keydistill.train import parse_config
    from keydistill.train.context import setup
    from keydistill.train.features import batches_on
    from tests.helpers.train_fixtures import tiny_args

    run = setup(parse_config(tiny_args(tiny, tmp_path)))
    torch.manual_seed(0)
    teacher = tiny_teacher_for(run)
    student = student_from_teacher(teacher, layers=[1, 3]).eval()
    running = LayerMatch(student, teacher, [1, 3], ("hidden", "attention", "value_relation"))
    cached = LayerMatch(student, teacher, [1, 3], ("hidden", "attention", "value_relation")).cache(run, run.train)
    assert running.cached is None and len(cached.cached) == len(run.train)
    assert {(t.device.type, t.dtype) for t in cached.cached} == {("cpu", torch.float16)}
    assert [len(t) for t in cached.cached] == run.train.lengths()  # each example's real tokens, no padding
    for _, batch in batches_on(run.device, run.train, Collator(run.tokenizer.pad_token_id), [[0, 5, 9], [3, 1]]):
        student(batch["input_ids"], batch["attention_mask"])
        expected = running.losses(batch)
        assert set(expected) == {"hidden", "attention", "value_relation"}
        for name, loss in cached.losses(batch).items():
            torch.testing.assert_close(loss, expected[name], rtol=5e-3, atol=1e-6)


def test_outputs_too_large_to_cache_are_announced_and_computed_per_batch(tiny, tmp_path, monkeypatch, capsys):
    from keydistill.train import parse_config
    from keydistill.train.context import setup
    from tests.helpers.train_fixtures import tiny_args

    run = setup(parse_config(tiny_args(tiny, tmp_path)))
    teacher = tiny_teacher_for(run)
    monkeypatch.setattr(LayerMatch, "CACHE_BYTES", 1)
    match = LayerMatch(student_from_teacher(teacher, layers=[1, 3]), teacher, [1, 3]).cache(run, run.train)
    assert match.cached is None
    assert "the teacher runs beside the student on every batch" in capsys.readouterr().out


def reference_attention_kl(student, teacher, mask, heads):
    """Per example, layer and head, the float64 softmax over that example's real tokens only, and the mean KL
    over its real query tokens: no masking tricks, nothing shared with relation_loss."""
    kls = []
    for (s_query, s_key), (t_query, t_key) in zip(student, teacher):
        for row, n in enumerate(mask.sum(1).tolist()):
            for h in range(heads):

                def distribution(query, key, row=row, n=n, h=h):
                    width = query.shape[-1] // heads
                    q, k = (x[row, :n, h * width : (h + 1) * width].double() for x in (query, key))
                    return torch.softmax(q @ k.T / math.sqrt(width), dim=-1)

                p, r = distribution(t_query, t_key), distribution(s_query, s_key)
                kls.append((p * (p.log() - r.log())).sum(-1))  # one KL per real query token
    return torch.cat(kls).mean()


def test_relation_loss_is_the_mean_kl_of_the_real_tokens_distributions(seed):
    b, length, heads, width = 5, 9, 3, 5
    mask = (torch.arange(length) < torch.randint(1, length + 1, (b,)).unsqueeze(1)).long()
    mask[0] = 1
    student = [
        tuple(torch.randn(b, length, heads * width, dtype=torch.float64, requires_grad=True) for _ in "qk")
        for _ in range(2)
    ]
    teacher = [tuple(torch.randn(b, length, heads * width, dtype=torch.float64) for _ in "qk") for _ in range(2)]
    loss = relation_loss([(q.float(), k.float()) for q, k in student], teacher, mask, heads)
    expected = reference_attention_kl(student, teacher, mask, heads)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)
    leaves = [x for pair in student for x in pair]
    for g, e in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(g.double(), e, atol=1e-6, rtol=1e-4)
        assert not g[~mask.bool()].any()  # padding never pulls
    assert torch.isfinite(loss)
    # what sits in the padding of either side changes nothing
    junk = [tuple(torch.where(mask.bool().unsqueeze(-1), x, 1e4) for x in pair) for pair in teacher]
    torch.testing.assert_close(relation_loss(student, junk, mask, heads).double(), loss.double(), atol=1e-6, rtol=1e-6)
    same = relation_loss(teacher, teacher, mask, heads)
    assert same.abs().item() < 1e-6


def test_matched_attention_is_what_each_model_computes(seed):
    """The hooks sit where the models' own attention reads its projections: the distributions relation_loss
    builds from query and key are the ones the teacher (BERT) and student (DistilBERT) report, real tokens
    only, and the value part is each layer's value projection of that layer's input."""
    from keydistill.losses import relation_log_probs

    teacher = tiny_teacher().eval()
    student = student_from_teacher(teacher, layers=[1, 3]).eval()
    for model in (teacher.encoder, student.encoder):
        model.set_attn_implementation("eager")  # the models report attention maps only when computed eagerly
    match = LayerMatch(student, teacher, [1, 3], ("value_relation", "attention"))
    assert match.parts == ("query", "key", "value")
    ids, mask = tokens()
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    student_out = student.encoder(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    teacher_out = teacher.encoder(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    hooks = sum(len(module._forward_hooks) for module in teacher.modules())
    query, key, value = match.teacher_states(batch).chunk(3, dim=-1)
    keep, heads = mask.bool(), teacher.config.num_attention_heads
    real = keep[:, None, :, None] & keep[:, None, None, :]
    for j, i in enumerate([1, 3]):
        ours = relation_log_probs(match.outputs["query", j], match.outputs["key", j], keep, heads).exp()
        torch.testing.assert_close(ours[real.expand_as(ours)], student_out.attentions[j][real.expand_as(ours)])
        ours = relation_log_probs(query[:, :, j], key[:, :, j], keep, heads).exp()
        torch.testing.assert_close(ours[real.expand_as(ours)], teacher_out.attentions[i][real.expand_as(ours)])
        layer_input = student_out.hidden_states[j]
        torch.testing.assert_close(
            match.outputs["value", j], student.encoder.transformer.layer[j].attention.v_lin(layer_input)
        )
        layer_input = teacher_out.hidden_states[i]
        torch.testing.assert_close(value[:, :, j], teacher.encoder.encoder.layer[i].attention.self.value(layer_input))
    assert sum(len(module._forward_hooks) for module in teacher.modules()) == hooks  # LayerMatch's are removed


def test_the_training_tests_models_live_where_the_run_sends_its_batches(tiny, tmp_path):
    """The tests build their models on the CPU; tiny_args pins the run there too, also on a GPU machine,
    where `--device auto` would send the batches to CUDA."""
    from keydistill.train import parse_config
    from keydistill.train.context import setup
    from tests.helpers.train_fixtures import tiny_args

    cfg = parse_config(tiny_args(tiny, tmp_path))
    assert cfg.device == "cpu"
    run = setup(cfg)
    assert {p.device for p in tiny_teacher_for(run).parameters()} == {run.device}


def tiny_teacher_for(run):
    """A random teacher on the run's tokenizer (the tiny BERT of the fixture), scaled so layers differ."""
    from keydistill.models import BertWithKeyBottleneck

    teacher = BertWithKeyBottleneck.from_pretrained(run.cfg.teacher, bottleneck=run.teacher_bottleneck, num_labels=2)
    with torch.no_grad():
        for p in teacher.encoder.encoder.parameters():
            p.normal_(0, 0.3)
    return teacher.eval()


def test_attention_matching_needs_the_teachers_heads():
    teacher = tiny_teacher()
    student = student_from_teacher(teacher, layers=[1, 3])
    student.config.n_heads = 1  # as a student built elsewhere, with other heads, would have
    LayerMatch(student, teacher, [1, 3])  # layer outputs alone do not care
    with pytest.raises(ValueError, match=r"student's heads \(1\) to be the teacher's \(3\)"):
        LayerMatch(student, teacher, [1, 3], ("attention",))


def test_the_value_relation_term_sees_values_the_attention_term_does_not(seed):
    """A student whose attention maps are the teacher's but whose value projections are not: no attention
    term, a value-relation term (MiniLM's softmax(V V^T / sqrt(d)))."""
    teacher = tiny_teacher().eval()
    student = student_from_teacher(teacher, layers=[0, 1]).eval()
    match = LayerMatch(student, teacher, [0, 1], ("attention", "value_relation"))
    ids, mask = tokens()
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    student(ids, mask)
    assert max(loss.item() for loss in match.losses(batch).values()) < 1e-12
    with torch.no_grad():
        student.encoder.transformer.layer[1].attention.v_lin.weight.normal_(0, 0.3)  # layer 1's attention maps stay
    student(ids, mask)
    losses = match.losses(batch)
    assert losses["attention"].item() < 1e-12 and losses["value_relation"].item() > 1e-4
