"""Row-sparse value gradients (keydistill.value_lookup, BottleneckConfig.sparse_values) against float64 dense
references at odd shapes, and the dkvb-nlp preset's fields."""

import json

import pytest
import torch

from keydistill import value_lookup
from keydistill.bottleneck import TRAINING_FIELDS, BottleneckConfig, DiscreteKeyBottleneck
from keydistill.train.config import BOTTLENECK_PRESETS, TrainConfig

H, K, V = 5, 37, 13


def ragged_positions(b=6, length=9):
    """Kept positions [B, T] with ragged lengths, one full row and one empty row."""
    lengths = torch.randint(1, length + 1, (b,))
    lengths[0], lengths[-1] = length, 0
    return torch.arange(length) < lengths.unsqueeze(1)


def dense_pooled(values, index, positions):
    """The float64 oracle: each position's head mean, then each row's mean over its kept positions (0 if none)."""
    heads = torch.arange(values.shape[0])
    per_position = values[heads, index].mean(1)
    rows = positions.nonzero()[:, 0]
    return torch.stack(
        [
            per_position[rows == r].mean(0) if (rows == r).any() else values.new_zeros(values.shape[-1])
            for r in range(positions.shape[0])
        ]
    )


def assert_row_sparse(grad, index):
    """A sparse COO gradient of the table with sparse dims (head, key), each selected row once, sorted (the
    coalesced layout, though autograd's copy into .grad drops the flag that says so)."""
    assert grad.is_sparse and grad.sparse_dim() == 2 and grad.shape == (H, K, V)
    rows = grad._indices()[0] * K + grad._indices()[1]
    assert bool((rows[1:] > rows[:-1]).all())
    assert set(map(tuple, grad._indices().t().tolist())) == selected_rows(index)


def selected_rows(index):
    heads = torch.arange(index.shape[1]).expand_as(index)
    return set(zip(heads.reshape(-1).tolist(), index.reshape(-1).tolist()))


def test_pooled_values_and_gradient_match_float64_dense(seed):
    positions = ragged_positions()
    n = int(positions.sum())
    index = torch.randint(0, K, (n, H))
    index[:3] = index[0]  # repeated rows: their gradients must add up
    values = torch.randn(H, K, V, requires_grad=True)
    upstream = torch.randn(positions.shape[0], V, dtype=torch.float64)
    out = value_lookup.pooled_values(values, index, positions)
    (out.double() * upstream).sum().backward()

    reference = values.detach().double().requires_grad_()
    want = dense_pooled(reference, index, positions)
    (want * upstream).sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    assert_row_sparse(values.grad, index)
    torch.testing.assert_close(values.grad.to_dense().double(), reference.grad, rtol=1e-6, atol=1e-7)


def test_head_values_and_gradient_match_float64_dense(seed):
    index = torch.randint(0, K, (11, H))
    values = torch.randn(H, K, V, requires_grad=True)
    upstream = torch.randn(11, H, V, dtype=torch.float64)
    out = value_lookup.head_values(values, index)
    (out.double() * upstream).sum().backward()
    reference = values.detach().double().requires_grad_()
    want = reference[torch.arange(H), index]
    (want * upstream).sum().backward()
    assert torch.equal(out.double(), want)  # a pure gather: exact
    assert_row_sparse(values.grad, index)
    torch.testing.assert_close(values.grad.to_dense().double(), reference.grad, rtol=1e-6, atol=1e-7)


def test_micro_batches_accumulate_into_one_sparse_gradient(seed):
    values = torch.randn(H, K, V, requires_grad=True)
    reference = values.detach().clone().requires_grad_()
    for _ in range(2):  # two micro-batches, as the training loop accumulates them
        positions = ragged_positions()
        index = torch.randint(0, K, (int(positions.sum()), H))
        upstream = torch.randn(positions.shape[0], V)
        (value_lookup.pooled_values(values, index, positions) * upstream).sum().backward()
        (dense_pooled(reference, index, positions) * upstream).sum().backward()
    assert values.grad.is_sparse
    torch.testing.assert_close(values.grad.to_dense(), reference.grad, rtol=1e-5, atol=1e-6)


def twin_bottlenecks(**fields):
    """A dense-values bottleneck and a sparse-values copy with the same weights and codebook."""
    config = BottleneckConfig(num_heads=4, num_keys=13, pooling="mean", **fields)
    dense = DiscreteKeyBottleneck(24, config)
    sparse = DiscreteKeyBottleneck(24, BottleneckConfig(**{**config.to_dict(), "sparse_values": True}))
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("mode", ["hard", "straight_through", "soft"])
def test_sparse_values_bottleneck_equals_dense_one(seed, mode):
    """Same forward and the same values gradient as the dense lookup (train mode, keys frozen), on every path:
    row-sparse where the lookup is hard (hard, straight-through), dense where the soft mixture reads every key."""
    fields = {
        "hard": {},
        "straight_through": {"soft_temperature": 0.5, "straight_through": True},
        "soft": {"soft_temperature": 0.5},
    }[mode]
    dense, sparse = twin_bottlenecks(**fields)
    hidden = torch.randn(6, 9, 24)
    mask = ragged_positions().long()
    mask[-1, 0] = 1  # a row of padding only would have no position at all; keep one
    upstream = torch.randn(6, 24)
    outs = []
    for bn in (dense, sparse):
        bn.train().freeze_keys()
        h = hidden.clone().requires_grad_()
        out = bn(h, mask)
        ((out.pooled * upstream).sum() + out.aux_loss).backward()
        outs.append((out, h.grad))
    (d_out, d_hidden_grad), (s_out, s_hidden_grad) = outs
    torch.testing.assert_close(s_out.pooled, d_out.pooled, rtol=1e-5, atol=1e-6)
    assert torch.equal(s_out.key_indices, d_out.key_indices)
    assert sparse.values.grad.is_sparse == (mode != "soft")
    torch.testing.assert_close(
        sparse.values.grad.to_dense() if mode != "soft" else sparse.values.grad, dense.values.grad, rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(s_hidden_grad, d_hidden_grad, rtol=1e-5, atol=1e-7)


def test_eval_mode_uses_the_fused_lookup_without_gradient_state(seed):
    dense, sparse = twin_bottlenecks()
    hidden, mask = torch.randn(3, 5, 24), torch.ones(3, 5, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(
            sparse.eval()(hidden, mask).pooled, dense.eval()(hidden, mask).pooled, rtol=1e-5, atol=1e-6
        )


def test_sparse_values_is_a_training_field_saved_as_json():
    config = BottleneckConfig(sparse_values=True)
    assert "sparse_values" in TRAINING_FIELDS and "sparse_values" not in config.codebook()
    assert BottleneckConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    old = {k: v for k, v in BottleneckConfig().to_dict().items() if k != "sparse_values"}  # a checkpoint from before
    assert BottleneckConfig.from_dict(old).sparse_values is False
    with pytest.raises(ValueError, match="sparse_values"):
        BottleneckConfig(sparse_values=1)


@pytest.mark.parametrize("width,heads", [(384, 32), (768, 64)])
def test_dkvb_nlp_preset_has_one_head_per_12_dims(width, heads):
    fields = TrainConfig(bottleneck="dkvb-nlp").bottleneck_fields(width)
    config = BottleneckConfig(**fields)
    assert (config.num_heads, config.key_dim_for(width), config.num_keys) == (heads, 12, 4096)
    assert config.pooling == "mean" and config.projection == "split" and config.sparse_values
    assert DiscreteKeyBottleneck(width, config).values.shape == (heads, 4096, width)


def test_preset_heads_yield_to_an_explicit_flag_and_the_default_preset_is_unchanged():
    assert TrainConfig(bottleneck="dkvb-nlp", num_heads=16).bottleneck_fields(384)["num_heads"] == 16
    assert (
        TrainConfig().bottleneck_fields(384)
        == TrainConfig().bottleneck_fields()
        == {"num_heads": 8, "num_keys": 256, "pooling": "cls", "projection": "split"}
    )
    assert set(BOTTLENECK_PRESETS["dkvb-nlp"]) <= set(BottleneckConfig().to_dict())
