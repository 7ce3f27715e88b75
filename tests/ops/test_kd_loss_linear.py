"""kd_loss_linear (chunked linear head + distillation loss) on every backend against the unfused float64
reference: loss and gradients w.r.t. hidden states, weight and bias; teacher as logits or as a linear head;
validation; and the point of it all, peak memory far below the unfused computation."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from keydistill import ops
from keydistill.ops import reference
from tests.helpers.backends import backend_device


def student_head(n, h, vocab, device, dtype=torch.float32):
    hidden = torch.randn(n, h, device=device).to(dtype)
    weight = (torch.randn(vocab, h, device=device) / h**0.5).to(dtype)
    bias = torch.randn(vocab, device=device).to(dtype)
    return hidden, weight, bias


def grads_of(fn, tensors, upstream=None):
    """(value, gradients of `fn()` w.r.t. `tensors`) for a given upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    upstream = torch.rand_like(out) + 0.5 if upstream is None else upstream
    return out.detach(), torch.autograd.grad(out, leaves, upstream), upstream


def unfused64(hidden, weight, bias, teacher, **kw):
    return reference.kd_loss(F.linear(hidden.double(), weight.double(), bias.double()), teacher.double(), **kw)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_unfused_float64(backend, seed, reduction):
    device = backend_device(backend)
    n, h, vocab = 37, 13, 101
    head = student_head(n, h, vocab, device)
    teacher = torch.randn(n, vocab, device=device) * 2
    mask = torch.rand(n, device=device) > 0.3
    kw = dict(temperature=2.0, mask=mask, reduction=reduction)
    got, got_grads, upstream = grads_of(
        lambda x, w, b: ops.kd_loss_linear(x, w, teacher, student_bias=b, chunk_size=8, backend=backend, **kw), head
    )
    want, want_grads, _ = grads_of(
        lambda x, w, b: unfused64(x, w, b, teacher, **kw), [t.double() for t in head], upstream.double()
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
    assert (got_grads[0][~mask] == 0).all()  # masked rows get no gradient


def test_under_autocast_the_heads_run_in_its_dtype(seed):
    """Under bfloat16 autocast, float32 hidden states and head run in bfloat16 as F.linear would (no dtype
    clash in the chunked matmuls), with float32 gradients for the float32 inputs; against float64, at
    bfloat16's precision."""
    n, h, vocab = 23, 16, 41
    head = student_head(n, h, vocab, "cpu")
    teacher = torch.randn(n, vocab) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads, upstream = grads_of(
            lambda x, w, b: ops.kd_loss_linear(x, w, teacher, student_bias=b, temperature=2.0, chunk_size=8), head
        )
    want, want_grads, _ = grads_of(
        lambda x, w, b: unfused64(x, w, b, teacher, temperature=2.0), [t.double() for t in head], upstream.double()
    )
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=5e-2, atol=2e-2)


def test_teacher_as_linear_head_and_default_chunks(backend, seed):
    device = backend_device(backend)
    n, h, vocab = 29, 16, 77
    hidden, weight, bias = student_head(n, h, vocab, device)
    t_hidden, t_weight, t_bias = student_head(n, 24, vocab, device)
    loss = ops.kd_loss_linear(
        hidden,
        weight,
        teacher_hidden=t_hidden,
        teacher_weight=t_weight,
        teacher_bias=t_bias,
        temperature=1.5,
        student_bias=bias,
        backend=backend,
    )
    want = unfused64(
        hidden, weight, bias, F.linear(t_hidden.double(), t_weight.double(), t_bias.double()), temperature=1.5
    )
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(backend, seed, dtype):
    """A 16-bit head is no further from float64 than the same unfused computation done by PyTorch in that
    dtype: 2x its loss error, 3x its gradient errors (the weight gradient accumulates chunk by chunk in
    the weight's dtype, one rounding per chunk, where PyTorch rounds once)."""
    device = backend_device(backend)
    n, h, vocab = 24, 16, 64
    head = student_head(n, h, vocab, device, dtype)
    teacher = torch.randn(n, vocab, device=device).to(dtype) * 2
    got, got_grads, upstream = grads_of(
        lambda x, w, b: ops.kd_loss_linear(x, w, teacher, student_bias=b, chunk_size=8, backend=backend), head
    )
    want, want_grads, _ = grads_of(lambda x, w, b: unfused64(x, w, b, teacher), head, upstream.double())
    torch_lp, torch_grads, _ = grads_of(lambda x, w, b: reference.kd_loss(F.linear(x, w, b), teacher), head, upstream)
    scale = max(want.abs().item(), 1e-3)
    assert (got.double() - want).abs().item() <= 2 * (torch_lp.double() - want).abs().item() + 1e-3 * scale
    for g, w, t in zip(got_grads, want_grads, torch_grads):
        torch_err = (t.double() - w).abs().max().item()
        assert (g.double() - w).abs().max().item() <= 3 * torch_err + torch.finfo(dtype).eps * w.abs().max().item()


def test_default_chunk_rows():
    # Liger's rule: a chunk of logits about as large as the hidden states, as a power of two.
    assert reference.kd_loss_linear_chunk_rows(8192, 30522, 768) == 256
    assert reference.kd_loss_linear_chunk_rows(5, 2, 768) == 8
    assert reference.kd_loss_linear_chunk_rows(0, 100, 10) == 1


def test_empty_and_no_grad(seed):
    hidden, weight, bias = student_head(0, 8, 11, "cpu")
    hidden.requires_grad_(True)
    loss = ops.kd_loss_linear(hidden, weight, torch.randn(0, 11), backend="torch")
    loss.backward()
    assert loss.item() == 0 and hidden.grad.shape == (0, 8)
    hidden, weight, bias = student_head(5, 8, 11, "cpu")
    with torch.no_grad():
        loss = ops.kd_loss_linear(hidden, weight, torch.randn(5, 11), backend="torch", reduction="none")
    assert loss.shape == (5,) and not loss.requires_grad


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(student_weight=torch.randn(11, 7)), ValueError, "student_weight must have shape"),
        (dict(student_weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "student_weight must have dtype"),
        (dict(student_bias=torch.randn(10)), ValueError, "student_bias must have shape"),
        (dict(teacher_logits=torch.randn(5, 12)), ValueError, "teacher_logits must have shape"),
        (dict(teacher_logits=None), ValueError, "give the teacher"),
        (dict(teacher_hidden=torch.randn(5, 3)), ValueError, "give the teacher"),
        (dict(teacher_logits=None, teacher_hidden=torch.randn(5, 3)), ValueError, "given together"),
        (
            dict(teacher_logits=None, teacher_hidden=torch.randn(5, 3), teacher_weight=torch.randn(12, 3)),
            ValueError,
            "V=11 rows",
        ),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask must have shape"),
        (dict(reduction="mean"), ValueError, "reduction"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backend="nope"), Exception, "unknown backend"),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    kwargs = dict(
        student_hidden=torch.randn(5, 8), student_weight=torch.randn(11, 8), teacher_logits=torch.randn(5, 11)
    )
    kwargs.update(change)
    with pytest.raises(error, match=match):
        ops.kd_loss_linear(**kwargs)


def peak_cpu_bytes(fn) -> int:
    """Peak of live CPU tensor memory allocated while fn runs, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_peak_memory_is_a_fraction_of_unfused(seed):
    """Forward + backward at N=512, h=64, V=2048 (fp32, torch backend, default chunks of 16 rows): the
    fused loss must stay under the 25% target the GPU version has against the unfused computation."""
    n, h, vocab = 512, 64, 2048
    hidden, weight, bias = (t.requires_grad_(True) for t in student_head(n, h, vocab, "cpu"))
    teacher = torch.randn(n, vocab)

    def unfused():
        ops.kd_loss(F.linear(hidden, weight, bias), teacher, backend="torch").backward()

    def fused():
        ops.kd_loss_linear(hidden, weight, teacher, student_bias=bias, backend="torch").backward()

    unfused_peak, fused_peak = peak_cpu_bytes(unfused), peak_cpu_bytes(fused)
    print(f"peak extra memory: unfused {unfused_peak / 2**20:.2f} MiB, fused {fused_peak / 2**20:.2f} MiB")
    assert unfused_peak >= 2 * n * vocab * 4  # sanity: the unfused logits and their gradient were seen
    assert fused_peak <= 0.25 * unfused_peak


def test_second_backward_is_refused(seed):
    """The gradients are scaled in place by backward, so a second backward would be wrong: it raises."""
    hidden, weight, _ = (t.requires_grad_(True) for t in student_head(6, 8, 11, "cpu"))
    loss = ops.kd_loss_linear(hidden, weight, torch.randn(6, 11), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
