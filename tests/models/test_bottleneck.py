"""DiscreteKeyBottleneck: lookup and pooling against a float64 oracle, EMA state, key management, gradients."""

import pytest
import torch

from keydistill import ops
from keydistill.bottleneck import (
    BottleneckConfig,
    DiscreteKeyBottleneck,
    assignment_counts,
    codebook_usage,
    feature_loss,
)
from keydistill.ops import reference

DIM = 24


def make(**fields) -> DiscreteKeyBottleneck:
    config = BottleneckConfig(**{"num_heads": 4, "num_keys": 13, **fields})
    return DiscreteKeyBottleneck(DIM, config)


def batch(b=5, length=7):
    """Hidden states with ragged padding (row 0 full, later rows shorter, never empty)."""
    hidden = torch.randn(b, length, DIM)
    lengths = torch.randint(1, length + 1, (b,))
    lengths[0] = length
    mask = torch.arange(length) < lengths.unsqueeze(1)
    return hidden, mask.long()


def buffers(module):
    return {name: t.clone() for name, t in module.named_buffers()}


def expected_queries(bn, hidden, mask):
    """Queries of the kept positions, computed independently of the module's forward."""
    kept = hidden[:, :1].reshape(-1, DIM) if bn.config.pooling == "cls" else hidden[mask.bool()]
    if bn.projection is None:
        return kept.view(kept.shape[0], bn.config.num_heads, bn.key_dim)
    return torch.einsum("ni,hid->nhd", kept.double(), bn.projection.double()).float()


def mean_per_row(vectors, positions):
    """The oracle for pooling over tokens: average the kept positions of each row, one row at a time."""
    rows = positions.nonzero()[:, 0]
    return torch.stack([vectors[rows == r].mean(0) for r in range(positions.shape[0])])


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("projection", ["split", "random", "learned"])
def test_output_is_lookup_from_indices_float64(seed, pooling, projection):
    bn = make(pooling=pooling, projection=projection).eval()
    hidden, mask = batch()
    out = bn(hidden, mask)
    queries = expected_queries(bn, hidden, mask)
    torch.testing.assert_close(out.queries, queries, rtol=1e-5, atol=1e-5)
    index = reference.nearest_key_exact(queries, bn.keys).argmin(-1)
    assert torch.equal(out.key_indices, index)
    head_values = bn.values.double()[torch.arange(4), index].mean(1)  # [N, value_dim]
    pooled = mean_per_row(head_values, out.positions)
    torch.testing.assert_close(out.pooled.double(), pooled, rtol=1e-6, atol=1e-6)
    assigned = bn.keys.double()[torch.arange(4), index]
    torch.testing.assert_close(
        out.commitment_loss.double(), (queries.double() - assigned).pow(2).mean(), rtol=1e-5, atol=1e-6
    )
    assert out.aux_loss.item() == pytest.approx(0.25 * out.commitment_loss.item())


def test_cls_pooling_ignores_other_tokens(seed):
    bn = make(pooling="cls").eval()
    hidden, mask = batch()
    changed = hidden.clone()
    changed[:, 1:] = torch.randn_like(changed[:, 1:])
    assert torch.equal(bn(hidden, mask).pooled, bn(changed, mask).pooled)


def test_mean_pooling_ignores_padding(seed):
    bn = make(pooling="mean").eval()
    hidden, mask = batch()
    mask[1, 3:] = 0
    changed = hidden.clone()
    changed[~mask.bool()] = 100 * torch.randn_like(changed[~mask.bool()])
    assert torch.equal(bn(hidden, mask).pooled, bn(changed, mask).pooled)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_eval_mode_never_mutates(seed, pooling):
    bn = make(pooling=pooling, dead_key_threshold=0.5).eval()
    before = buffers(bn)
    for _ in range(3):
        bn(*batch())
    for name, t in bn.named_buffers():
        assert torch.equal(t, before[name]), name


def test_frozen_keys_never_mutate_in_training(seed):
    bn = make(pooling="mean", dead_key_threshold=0.5).train()
    bn.freeze_keys()
    before = buffers(bn)
    bn(*batch())
    assert all(torch.equal(t, before[n]) for n, t in bn.named_buffers())
    bn.unfreeze_keys()
    bn(*batch())
    assert not torch.equal(bn.keys, before["keys"])


@pytest.mark.parametrize("projection", ["split", "random"])
def test_module_step_equals_manual_ema_step_on_non_padding_rows(seed, projection):
    bn = make(pooling="mean", projection=projection, dead_key_threshold=0.0, decay=0.9).train()
    state = {name: getattr(bn, name).clone() for name in ("keys", "cluster_size", "embed_sum")}
    hidden, mask = batch()
    queries = expected_queries(bn, hidden, mask)  # padding rows excluded by construction
    index, _ = ops.nearest_key(queries, state["keys"])
    ops.ema_update_(
        state["keys"], state["cluster_size"], state["embed_sum"], queries, index, decay=0.9, eps=bn.config.eps
    )
    out = bn(hidden, mask)
    assert torch.equal(out.key_indices, index)
    for name, expected in state.items():
        torch.testing.assert_close(getattr(bn, name), expected, rtol=1e-6, atol=1e-6, msg=name)


def test_no_gradient_reaches_the_keys(seed):
    bn = make(projection="learned", soft_temperature=1.0).train()
    assert "keys" not in dict(bn.named_parameters()) and not bn.keys.requires_grad
    hidden, mask = batch()
    out = bn(hidden.requires_grad_(), mask)
    (out.pooled.sum() + out.aux_loss).backward()
    assert bn.keys.grad is None and not bn.keys.requires_grad


def test_dead_keys_restart_from_recent_inputs(seed):
    bn = make(pooling="mean", dead_key_threshold=0.1).train()
    dead = torch.zeros(4, 13, dtype=torch.bool)
    dead[0, 3] = dead[2, [1, 7]] = True
    with torch.no_grad():
        bn.cluster_size.masked_fill_(dead, 1e-4)  # far below 0.1 x the mean count (about 1)
    state = {name: getattr(bn, name).clone() for name in ("keys", "cluster_size", "embed_sum")}
    hidden, mask = batch()
    out = bn(hidden, mask)
    ops.ema_update_(
        state["keys"],
        state["cluster_size"],
        state["embed_sum"],
        out.queries.detach(),
        out.key_indices,
        decay=bn.config.decay,
        eps=bn.config.eps,
    )
    for h, k in dead.nonzero().tolist():
        distances = (out.queries[:, h] - bn.keys[h, k]).pow(2).sum(-1)
        assert distances.min() == 0, f"key ({h}, {k}) was not restarted onto a recent input"
        assert bn.cluster_size[h, k] == state["cluster_size"][h].mean()
    assert not bn.dead_keys().any()
    torch.testing.assert_close(bn.keys[~dead], state["keys"][~dead])  # live keys: the plain EMA step
    smoothed = reference.smoothed_cluster_size(bn.cluster_size, bn.config.eps)
    torch.testing.assert_close(bn.embed_sum, bn.keys * smoothed.unsqueeze(-1))  # EMA state stays consistent


def test_kmeans_init_beats_random_init(seed):
    bn = make(num_keys=16)
    h, k, d = bn.keys.shape
    centers = 4 * torch.randn(h, k, d)
    members = torch.randint(k, (600, h))
    data = centers[torch.arange(h), members] + 0.3 * torch.randn(600, h, d)
    random_keys = data[torch.randperm(600)[:k]].transpose(0, 1).contiguous()  # random data points as keys
    bn.init_keys_(data, iters=5)
    kmeans_error = ops.nearest_key(data, bn.keys)[1].mean()
    random_error = ops.nearest_key(data, random_keys)[1].mean()
    assert kmeans_error < random_error, (kmeans_error, random_error)
    assert bn.cluster_size.sum(-1).eq(600).all()
    smoothed = reference.smoothed_cluster_size(bn.cluster_size, bn.config.eps)
    torch.testing.assert_close(bn.embed_sum / smoothed.unsqueeze(-1), bn.keys)


def test_init_keys_rejects_too_few_vectors():
    with pytest.raises(ValueError, match="at least num_keys"):
        make().init_keys_(torch.randn(5, 4, 6))


def test_hard_assignment_gives_the_encoder_gradient_through_commitment_only(seed):
    bn = make(soft_temperature=None).train()
    hidden, mask = batch()
    hidden.requires_grad_()
    bn(hidden, mask).pooled.sum().backward()
    assert hidden.grad is None  # the discrete lookup alone passes no gradient
    bn(hidden, mask).aux_loss.backward()
    assert hidden.grad[:, 0].abs().sum() > 0


def test_soft_assignment_gives_the_encoder_task_gradient_and_is_hard_in_eval(seed):
    bn = make(soft_temperature=2.0, projection="learned", commitment_weight=0.0)
    hidden, mask = batch()
    hidden.requires_grad_()
    bn.train()(hidden, mask).pooled.sum().backward()
    assert hidden.grad[:, 0].abs().sum() > 0 and bn.projection.grad.abs().sum() > 0
    bn.eval()
    out = bn(hidden, mask)
    hard = bn.values[torch.arange(4), out.key_indices].mean(1)
    torch.testing.assert_close(out.pooled, hard)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_soft_assignment_matches_float64_softmax_over_distances(seed, pooling):
    bn = make(pooling=pooling, soft_temperature=0.7).train()
    bn.freeze_keys()
    hidden, mask = batch()
    out = bn(hidden, mask)
    weights = torch.softmax(-reference.nearest_key_exact(expected_queries(bn, hidden, mask), bn.keys) / 0.7, dim=-1)
    head_values = torch.einsum("nhk,hkv->nv", weights, bn.values.double()) / 4
    pooled = mean_per_row(head_values, out.positions)
    torch.testing.assert_close(out.pooled.double(), pooled, rtol=1e-5, atol=1e-6)


def test_feature_loss_pulls_student_queries_toward_teacher(seed):
    student, teacher = torch.randn(6, 4, 5, requires_grad=True), torch.randn(6, 4, 5)
    loss = feature_loss(student, teacher)
    loss.backward()
    torch.testing.assert_close(loss, (student - teacher).pow(2).mean())
    torch.testing.assert_close(student.grad, 2 * (student - teacher).detach() / student.numel())


def test_usage_statistics():
    counts = torch.tensor([[5.0, 5.0, 5.0, 5.0], [20.0, 0.0, 0.0, 0.0], [9.0, 9.0, 1e-3, 0.0]])
    usage = codebook_usage(counts, dead_key_threshold=0.01)
    torch.testing.assert_close(usage["perplexity"][:2], torch.tensor([4.0, 1.0]))
    assert 2.0 < usage["perplexity"][2] < 2.01  # two equal keys plus a trace of a third
    torch.testing.assert_close(usage["live_fraction"], torch.tensor([1.0, 0.25, 0.5]))
    index = torch.tensor([[0, 2], [0, 2], [3, 2]])
    torch.testing.assert_close(assignment_counts(index, 4), torch.tensor([[2.0, 0, 0, 1], [0, 0, 3, 0]]))
    assert set(make().usage()) == {"perplexity", "live_fraction"}


def test_straight_through_is_hard_forward_with_soft_query_gradient(seed):
    tau = 1.5
    st = make(soft_temperature=tau, straight_through=True, projection="learned", commitment_weight=0.0).train()
    st.freeze_keys()
    hidden, mask = batch()
    hidden.requires_grad_()
    out = st(hidden, mask)
    hard = st.values[torch.arange(4), out.key_indices].mean(1)
    torch.testing.assert_close(out.pooled, hard)  # the forward pass is exactly the hard lookup, in training too
    upstream = torch.randn_like(out.pooled)
    out.pooled.backward(upstream)
    # Values: the exact gradient of the hard lookup (one-hot rows), not the soft mixture's.
    values = st.values.detach().clone().requires_grad_()
    values[torch.arange(4), out.key_indices].mean(1).backward(upstream)
    torch.testing.assert_close(st.values.grad, values.grad)
    # Queries: the gradient of the soft assignment, in float64.
    queries = expected_queries(st, hidden, mask).double().detach().requires_grad_()
    weights = torch.softmax(-(queries.unsqueeze(2) - st.keys.double().unsqueeze(0)).pow(2).sum(-1) / tau, dim=-1)
    torch.einsum("nhk,hkv->nv", weights, st.values.double().detach()).div(4).backward(upstream.double())
    expected = torch.einsum("nhd,hid->ni", queries.grad, st.projection.double().detach())
    torch.testing.assert_close(hidden.grad[:, 0].double(), expected, rtol=1e-4, atol=1e-6)
    assert hidden.grad[:, 1:].abs().sum() == 0  # cls pooling reads the first token only


def test_straight_through_needs_a_soft_temperature():
    with pytest.raises(ValueError, match="straight_through"):
        BottleneckConfig(straight_through=True)


def test_kmeans_draws_happen_on_the_generator_device(monkeypatch, seed):
    """A generator works with data on any device: every draw is made on the generator's own device and only
    the drawn numbers move to the data (torch.multinomial would need both on one device)."""
    import keydistill.bottleneck as module

    seen = []

    def recording(draw):
        def wrapped(*args, generator=None, device=None, **kwargs):
            seen.append((device, generator.device if generator is not None else None))
            return draw(*args, generator=generator, device=device, **kwargs)

        return wrapped

    monkeypatch.setattr(module.torch, "rand", recording(torch.rand))
    monkeypatch.setattr(module.torch, "randint", recording(torch.randint))
    monkeypatch.setattr(module.torch, "multinomial", None)  # never used: it needs the generator on the data's device
    data = torch.randn(50, 4, 6)
    generator = torch.Generator().manual_seed(seed)
    centers = module.kmeans_plus_plus(data, 13, generator=generator)
    assert len(seen) == 13 and all(device == gen_device for device, gen_device in seen)
    monkeypatch.undo()
    again = module.kmeans_plus_plus(data, 13, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(centers, again)  # the same seed gives the same keys


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_kmeans_with_a_cpu_generator_on_any_device_gives_the_cpu_keys(device, seed):
    data = torch.randn(64, 2, 5)
    on_cpu = DiscreteKeyBottleneck(10, BottleneckConfig(num_heads=2, num_keys=7))
    on_device = DiscreteKeyBottleneck(10, BottleneckConfig(num_heads=2, num_keys=7)).to(device)
    on_cpu.init_keys_(data, iters=0, generator=torch.Generator().manual_seed(seed))
    on_device.init_keys_(data.to(device), iters=0, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(on_device.keys.cpu(), on_cpu.keys)


def test_proportional_draws_follow_the_weights(seed):
    from keydistill.bottleneck import _draw_proportional

    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0, 4.0], [2.0, 0.0, 0.0, 2.0, 0.0]]).repeat(2000, 1)
    drawn = _draw_proportional(weights, torch.Generator().manual_seed(seed)).view(2000, 2)
    share = torch.stack([torch.bincount(drawn[:, h], minlength=5) for h in range(2)]).float() / 2000
    expected = weights[:2] / weights[:2].sum(-1, keepdim=True)
    assert (share[expected == 0] == 0).all()  # a zero weight is never drawn
    torch.testing.assert_close(share, expected, atol=0.04, rtol=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"projection": "pca"}, "projection"),
        ({"pooling": "max"}, "pooling"),
        ({"decay": 1.0}, "decay"),
        ({"num_keys": 0}, "num_keys"),
        ({"soft_temperature": 0.0}, "soft_temperature"),
        ({"soft_temperature": float("inf")}, "soft_temperature"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**fields)


def test_split_projection_needs_heads_to_divide_dim():
    with pytest.raises(ValueError, match="split"):
        DiscreteKeyBottleneck(DIM, BottleneckConfig(num_heads=5))
    assert DiscreteKeyBottleneck(DIM, BottleneckConfig(num_heads=5, projection="random")).key_dim == DIM // 5


def test_key_passes_do_not_end_on_the_longest_examples():
    """The EMA weighs its last batches most: with one vector per token the pass's batches are shuffled (of like
    lengths, each example once), not sorted so that the longest examples come last; with one vector per
    example (cls pooling) the dataset's own order stays."""
    from keydistill.train.teacher import key_pass_batches

    lengths = [1 + (7 * i) % 40 for i in range(400)]
    batches = key_pass_batches(lengths, 16, seed=3, key_pass=0)
    assert sorted(i for b in batches for i in b) == list(range(400))
    last = [lengths[i] for b in batches[-5:] for i in b]
    assert sum(last) / len(last) < max(lengths) - 5  # length-sorted, the last 80 would average 38.5
    assert batches != key_pass_batches(lengths, 16, seed=3, key_pass=1)  # each pass its own order
    assert key_pass_batches([1] * 40, 16, seed=3, key_pass=0) == [
        list(range(16)),
        list(range(16, 32)),
        list(range(32, 40)),
    ]
