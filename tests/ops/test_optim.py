"""ops.sparse_adamw_ and keydistill.optim.LazyAdamW against float64 dense AdamW, at odd shapes on fresh inputs.

The semantics under test (keydistill/optim.py): dense gradients get torch.optim.AdamW; a row-sparse gradient
updates the rows it holds exactly as dense AdamW would, with the parameter's step count for the bias
correction, and leaves every other row untouched (lazy). So rows that get a gradient every step follow dense
AdamW; rows that get none stay put where dense AdamW would decay them and move them by leftover momentum.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from keydistill import ops, value_lookup
from keydistill.checkpoint import load_checkpoint, save_checkpoint
from keydistill.ops import reference
from keydistill.optim import LazyAdamW, clip_grad_norm_, make_optimizer

BACKENDS = ["cpp", "torch"]
H, K, V = 3, 11, 5  # the table [H, K, V]: 33 rows of 5
HYPER = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def sparse_grad(dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The row-sparse COO gradient (sparse dims head, key) holding `rows` (into H*K) of dense [H, K, V]."""
    rows = rows.unique()
    indices = torch.stack([rows // K, rows % K])
    return torch.sparse_coo_tensor(indices, dense.reshape(H * K, V)[rows], (H, K, V), check_invariants=True).coalesce()


def lazy_oracle(start, grads, touched, *, lr, betas, eps, weight_decay):
    """Per-row lazy AdamW in float64, written independently: a row updates only in the steps it is touched,
    with the global step count t in the bias correction."""
    p, m, v = (
        start.double().clone(),
        torch.zeros_like(start, dtype=torch.float64),
        torch.zeros_like(start, dtype=torch.float64),
    )
    b1, b2 = betas
    for t, (g, rows) in enumerate(zip(grads, touched), start=1):
        for r in rows.unique().tolist():
            h, k = divmod(r, K)
            m[h, k] = b1 * m[h, k] + (1 - b1) * g[h, k]
            v[h, k] = b2 * v[h, k] + (1 - b2) * g[h, k] ** 2
            p[h, k] = p[h, k] * (1 - lr * weight_decay) - lr / (1 - b1**t) * m[h, k] / (
                v[h, k].sqrt() / math.sqrt(1 - b2**t) + eps
            )
    return p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_op_matches_float64_reference_and_leaves_other_rows(backend, dtype, seed):
    r, d = 37, 13
    rows = torch.randperm(r)[:17].sort().values
    param, m = torch.randn(r, d, dtype=dtype), torch.randn(r, d, dtype=dtype) * 0.1
    v, grad = torch.rand(r, d, dtype=dtype) * 0.1, torch.randn(17, d, dtype=dtype)
    want = [t.double().clone() for t in (param, m, v)]
    scalars = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, step=7, maximize=False)
    reference.sparse_adamw_(*want, rows, grad.double(), **scalars)
    got = [t.clone() for t in (param, m, v)]
    ops.sparse_adamw_(*got, rows, grad, **scalars, backend=backend)
    others = torch.ones(r, dtype=torch.bool)
    others[rows] = False
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]  # a few units of the last place
    for before, g, w in zip((param, m, v), got, want):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)
        assert torch.equal(g[others], before[others])


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_maximize_and_bias_correction_at_step_one(backend, seed):
    """At step 1 from zero moments the bias correction makes AdamW move each coordinate by lr * g / (|g| + eps)."""
    param, grad = torch.randn(4, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    rows = torch.tensor([1, 3])
    for maximize in (False, True):
        p, m, v = param.clone(), torch.zeros_like(param), torch.zeros_like(param)
        ops.sparse_adamw_(
            p,
            m,
            v,
            rows,
            grad,
            lr=0.1,
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            weight_decay=0.0,
            step=1,
            maximize=maximize,
            backend=backend,
        )
        sign = -1 if maximize else 1
        want = param[rows] - sign * 0.1 * grad / (grad.abs() + 1e-8)
        torch.testing.assert_close(p[rows], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(rows=torch.tensor([2, 1])), "strictly increasing"),
        (dict(rows=torch.tensor([1, 1])), "strictly increasing"),
        (dict(rows=torch.tensor([0, 9])), r"\[0, R=4\)"),
        (dict(grad=torch.randn(3, 6)), "grad must have shape"),
        (dict(step=0), "step"),
        (dict(beta1=1.0), "beta1"),
    ],
)
def test_op_rejects_bad_input_before_touching_anything(backend, bad, message):
    args = dict(rows=torch.tensor([0, 2]), grad=torch.randn(2, 6), step=1, beta1=0.9)
    args.update(bad)
    param = torch.randn(4, 6)
    before = param.clone()
    with pytest.raises((ValueError, TypeError), match=message):
        ops.sparse_adamw_(
            param,
            torch.zeros(4, 6),
            torch.zeros(4, 6),
            args["rows"],
            args["grad"],
            lr=0.1,
            beta1=args["beta1"],
            step=args["step"],
            backend=backend,
        )
    assert torch.equal(param, before)


def test_portable_kernel_matches_float64():
    """The kernel's plain C++ path (non-AVX2 CPUs), run in a child process with KEYDISTILL_DISABLE_AVX2=1."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "cpp and op_"],
        env={**os.environ, "KEYDISTILL_DISABLE_AVX2": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "deselected" in result.stdout


def test_opcheck_sparse_adamw():
    """The registered op's schema (in-place on three tensors), fake kernel and torch.compile tracing."""
    param, m, v = torch.randn(37, 13), torch.randn(37, 13), torch.rand(37, 13)
    rows = torch.tensor([0, 5, 6, 36])
    torch.library.opcheck(
        torch.ops.keydistill.sparse_adamw_.default,
        (param, m, v, rows, torch.randn(4, 13), 0.01, 0.9, 0.999, 1e-8, 0.01, 3.0, False),
    )


def test_cpp_kernel_checks_rows_itself():
    """Direct torch.ops callers skip the Python checks: the kernel validates the rows before any update."""
    param = torch.randn(4, 6)
    before = param.clone()
    with pytest.raises(RuntimeError, match="strictly increasing"):
        torch.ops.keydistill.sparse_adamw_(
            param,
            torch.zeros(4, 6),
            torch.zeros(4, 6),
            torch.tensor([0, 3, 2]),
            torch.randn(3, 6),
            0.1,
            0.9,
            0.999,
            1e-8,
            0.0,
            1.0,
            False,
        )
    assert torch.equal(param, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lazy_adamw_equals_float64_adamw_on_rows_touched_every_step(backend, seed):
    """Rows 0..4 get a gradient every step, others now and then, row 32 never; a dense parameter rides along."""
    table0, bias0 = torch.randn(H, K, V, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    lazy_table, lazy_bias = torch.nn.Parameter(table0.clone()), torch.nn.Parameter(bias0.clone())
    dense_table, dense_bias = torch.nn.Parameter(table0.clone()), torch.nn.Parameter(bias0.clone())
    lazy = LazyAdamW([lazy_table, lazy_bias], **HYPER, backend=backend)
    dense = torch.optim.AdamW([dense_table, dense_bias], **HYPER)
    always = torch.arange(5)
    grads, touched = [], []
    for _ in range(6):
        rows = torch.cat([always, torch.randint(5, H * K - 1, (6,))])
        g, gb = torch.randn(H, K, V, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
        mask = torch.zeros(H * K, dtype=torch.bool)
        mask[rows] = True
        g = g * mask.view(H, K, 1)  # what the dense lookup's gradient would be: zero on unselected rows
        lazy_table.grad, lazy_bias.grad = sparse_grad(g, rows), gb.clone()
        dense_table.grad, dense_bias.grad = g.clone(), gb.clone()
        lazy.step()
        dense.step()
        grads.append(g)
        touched.append(rows)
    flat_lazy, flat_dense = lazy_table.detach().view(H * K, V), dense_table.detach().view(H * K, V)
    torch.testing.assert_close(flat_lazy[always], flat_dense[always], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lazy_bias, dense_bias, rtol=0, atol=0)  # the same AdamW code
    torch.testing.assert_close(
        lazy_table.detach(), lazy_oracle(table0, grads, touched, **HYPER), rtol=1e-12, atol=1e-12
    )
    assert torch.equal(flat_lazy[-1], table0.view(H * K, V)[-1])  # never touched: never moved
    assert not torch.allclose(flat_dense[-1], table0.view(H * K, V)[-1])  # dense AdamW decays it
    assert float(lazy.state[lazy_table]["step"]) == 6


def test_lazy_adamw_coalesces_accumulated_micro_batches(seed):
    """Micro-batches accumulate sparse gradients (a row may then appear twice, unsorted): the step must equal the
    step on their sum."""
    table0 = torch.randn(H, K, V)
    a, b = torch.nn.Parameter(table0.clone()), torch.nn.Parameter(table0.clone())
    first, second = (
        sparse_grad(torch.randn(H, K, V), torch.tensor([0, 4, 9])),
        sparse_grad(torch.randn(H, K, V), torch.tensor([4, 9, 20])),
    )
    a.grad = torch.sparse_coo_tensor(
        torch.cat([second.indices(), first.indices()], 1),
        torch.cat([second.values(), first.values()]),
        (H, K, V),
        check_invariants=True,
    )
    assert not a.grad.is_coalesced()
    b.grad = (first + second).coalesce()
    LazyAdamW([a], **HYPER).step()
    LazyAdamW([b], **HYPER).step()
    assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("fused", [False, True])
def test_a_parameter_may_switch_between_sparse_and_dense_gradients(fused, seed):
    """Soft assignment gives the values a dense gradient, the hard lookup a sparse one: one shared state (also
    with torch's fused kernel for the dense steps, which keeps the step count on the parameter's device)."""
    table0 = torch.randn(H, K, V, dtype=torch.float64)
    lazy, dense = torch.nn.Parameter(table0.clone()), torch.nn.Parameter(table0.clone())
    opt_lazy, opt_dense = LazyAdamW([lazy], **HYPER, fused=fused), torch.optim.AdamW([dense], **HYPER)
    for step in range(4):
        g = torch.randn(H, K, V, dtype=torch.float64)
        lazy.grad = sparse_grad(g, torch.arange(H * K)) if step % 2 else g.clone()  # every row: same as dense
        dense.grad = g.clone()
        opt_lazy.step()
        opt_dense.step()
    torch.testing.assert_close(lazy.detach(), dense.detach(), rtol=1e-12, atol=1e-12)
    assert set(opt_lazy.state[lazy]) == set(opt_dense.state[dense]) == {"step", "exp_avg", "exp_avg_sq"}


def test_make_optimizer_takes_the_fused_dense_kernel_where_torch_has_one(seed):
    weight0 = torch.randn(7, 5)
    ours, theirs = torch.nn.Parameter(weight0.clone()), torch.nn.Parameter(weight0.clone())
    opt = make_optimizer([{"params": [ours], "weight_decay": 0.1}], lr=0.01)
    reference = torch.optim.AdamW([{"params": [theirs], "weight_decay": 0.1}], lr=0.01)
    assert opt.param_groups[0]["fused"]
    for _ in range(3):
        g = torch.randn(7, 5)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_step_hooks_run_once():
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # makes torch wrap AdamW.step with the hook runner
    p = torch.nn.Parameter(torch.zeros(H, K, V))
    opt = make_optimizer([{"params": [p], "weight_decay": 0.0}], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))
    p.grad = sparse_grad(torch.randn(H, K, V), torch.tensor([3]))
    opt.step()
    assert calls == ["pre", "post"]


def test_amsgrad_is_refused_for_sparse_gradients():
    p = torch.nn.Parameter(torch.zeros(H, K, V))
    p.grad = sparse_grad(torch.randn(H, K, V), torch.tensor([3]))
    with pytest.raises(RuntimeError, match="amsgrad"):
        LazyAdamW([p], amsgrad=True).step()


@pytest.mark.parametrize("clip", [clip_grad_norm_, torch.nn.utils.clip_grad_norm_], ids=["keydistill", "torch"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_counts_sparse_rows_once(clip, max_norm, seed):
    """The loop clips before stepping: the norm of an accumulated sparse gradient (a row twice, unsorted) is
    that of its sum, and clipping scales it like the dense gradient it stands for."""
    p, q = torch.nn.Parameter(torch.zeros(H, K, V)), torch.nn.Parameter(torch.zeros(4))
    first, second = (
        sparse_grad(torch.randn(H, K, V), torch.tensor([1, 2])),
        sparse_grad(torch.randn(H, K, V), torch.tensor([2, 7])),
    )
    p.grad = torch.sparse_coo_tensor(
        torch.cat([second.indices(), first.indices()], 1),
        torch.cat([second.values(), first.values()]),
        (H, K, V),
        check_invariants=True,
    )
    q.grad = torch.randn(4)
    dense = torch.cat([p.grad.to_dense().reshape(-1), q.grad])
    norm = clip([p, q], max_norm)
    torch.testing.assert_close(norm, dense.norm())
    scale = min(1.0, max_norm / (dense.norm().item() + 1e-6))
    torch.testing.assert_close(torch.cat([p.grad.to_dense().reshape(-1), q.grad]), dense * scale)


def test_clip_grad_norm_scales_a_lookup_gradient_in_place(seed):
    """keydistill.value_lookup's gradient (rows in order, though not flagged coalesced) is scaled where it is."""
    values = torch.nn.Parameter(torch.randn(H, K, V))
    index = torch.randint(0, K, (9, H))
    value_lookup.pooled_values(values, index, torch.ones(3, 3, dtype=torch.bool)).pow(2).sum().backward()
    stored, dense = values.grad._values(), values.grad.to_dense()
    norm = clip_grad_norm_([values], 1e-3)
    assert values.grad._values() is stored or values.grad._values().data_ptr() == stored.data_ptr()
    torch.testing.assert_close(norm, dense.norm())
    torch.testing.assert_close(values.grad.to_dense(), dense * 1e-3 / (dense.norm() + 1e-6))


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path, seed):
    """keydistill.checkpoint saves optimizer slots by name: resuming continues bit for bit."""

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.values, model.head = torch.nn.Parameter(torch.randn(H, K, V)), torch.nn.Linear(V, 2)
        return model, make_optimizer(
            [
                {"params": [model.values, model.head.weight], "weight_decay": 0.1},
                {"params": [model.head.bias], "weight_decay": 0.0},
            ],
            lr=0.01,
        )

    def train_step(model, opt, step):
        g = torch.Generator().manual_seed(step)
        model.values.grad = sparse_grad(torch.randn(H, K, V, generator=g), torch.randint(0, H * K, (5,), generator=g))
        model.head.weight.grad, model.head.bias.grad = torch.randn(2, V, generator=g), torch.randn(2, generator=g)
        opt.step()

    model, opt = model_and_optimizer()
    for step in range(3):
        train_step(model, opt, step)
    save_checkpoint(tmp_path / "ckpt.safetensors", model, {"step": 3}, opt)
    resumed, resumed_opt = model_and_optimizer()
    load_checkpoint(tmp_path / "ckpt.safetensors", resumed, resumed_opt)
    for step in (3, 4):
        train_step(model, opt, step)
        train_step(resumed, resumed_opt, step)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
