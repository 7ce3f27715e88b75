"""Every backend of the three ops against the float64 reference, on fresh random inputs.

The same tests run for cpp, triton (under the interpreter when there is no GPU), cuda (when there is a GPU)
and the torch fallback. The oracle is keydistill.ops.reference evaluated in float64 on the very values the
backend saw (low-precision inputs are widened exactly), so the only error measured is the backend's own.
"""

import pytest
import torch

from keydistill import ops
from keydistill.ops import reference
from tests.helpers.backends import backend_device

LOW_PRECISION = (torch.float16, torch.bfloat16)
EPS32 = torch.finfo(torch.float32).eps
# The compiled ops, for opcheck (it checks registrations, so only backends that register torch.ops count).
COMPILED_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as t, in a non-contiguous layout (every other element of a twice-as-long last dim)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


# ---- nearest_key -------------------------------------------------------------------------------------------


def exact_nearest(x, keys, index, chunk=256):
    """float64 over N chunks: (distance of the chosen key, smallest distance, second smallest), each [N, H]."""
    chosen, best, second = [], [], []
    for start in range(0, x.shape[0], chunk):
        dist = reference.nearest_key_exact(x[start : start + chunk].cpu(), keys.cpu())  # [c, H, K]
        chosen.append(dist.gather(-1, index[start : start + chunk].cpu().unsqueeze(-1)).squeeze(-1))
        two = dist.topk(min(2, dist.shape[-1]), dim=-1, largest=False).values
        best.append(two[..., 0])
        second.append(two[..., -1] if dist.shape[-1] > 1 else torch.full_like(two[..., 0], float("inf")))
    return torch.cat(chosen), torch.cat(best), torch.cat(second)


def check_nearest(x, keys, index, sqdist):
    """The chosen key is a nearest one up to fp32 ranking error; sqdist is its distance to fp32 accuracy;
    indices equal the float64 argmin wherever that minimum is unique by more than the ranking error."""
    n, h, d = x.shape
    assert index.shape == (n, h) and index.dtype == torch.int64
    assert sqdist.shape == (n, h) and sqdist.dtype == torch.float32
    chosen, best, second = exact_nearest(x, keys, index)
    # Ranking by ||k||^2 - 2 x.k in fp32 errs by a few eps times |x|^2 + |k|^2.
    scale = x.double().pow(2).sum(-1).cpu() + keys.double().pow(2).sum(-1).amax(-1).cpu()
    rank_tol = 8 * EPS32 * scale + 1e-30
    assert (chosen - best <= rank_tol).all(), f"chosen keys farther than the nearest by {(chosen - best).max():.3g}"
    torch.testing.assert_close(sqdist.double().cpu(), chosen, rtol=max(4, d) * EPS32, atol=1e-30)
    unique = second - best > 2 * rank_tol
    assert torch.equal(index.cpu()[unique], exact_argmin(x, keys)[unique])


def exact_argmin(x, keys, chunk=256):
    return torch.cat(
        [
            reference.nearest_key_exact(x[s : s + chunk].cpu(), keys.cpu()).argmin(-1)
            for s in range(0, x.shape[0], chunk)
        ]
    )


@pytest.mark.parametrize(
    "n,h,k,d",
    [(37, 3, 1001, 13), (37, 3, 1001, 1), (37, 3, 1001, 12), (37, 3, 1001, 64), (37, 3, 1001, 256), (5, 2, 3, 12)],
)
def test_nearest_key_matches_float64(backend, seed, n, h, k, d):
    device = backend_device(backend)
    x, keys = torch.randn(n, h, d, device=device), torch.randn(h, k, d, device=device)
    check_nearest(x, keys, *ops.nearest_key(x, keys, backend=backend))


@pytest.mark.parametrize("backend_name", ["cpp", "torch"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("d", [12, 96])
def test_nearest_key_many_query_tiles(backend_name, seed, d):
    """Many query blocks and key panels of either CPU tiling (queries in lanes for small d, keys in lanes for
    large d), with ragged ends; keys close to the data, as after k-means."""
    device = backend_device(backend_name)
    keys = torch.randn(1, 1001, d, device=device)
    x = keys[:, torch.randint(0, 1001, (4500,), device=device)].transpose(0, 1) + 0.1 * torch.randn(
        4500, 1, d, device=device
    )
    check_nearest(x, keys, *ops.nearest_key(x, keys, backend=backend_name))


@pytest.mark.parametrize("d", [1, 12, 64, 256])
def test_nearest_key_exact_ties_go_to_lowest_index(backend, seed, d):
    """Small-integer data make every score exact in fp32, so equal distances are exact ties: duplicate keys,
    and queries equidistant from several keys, must resolve to the lowest k, as the float64 argmin does."""
    device = backend_device(backend)
    keys = torch.randint(-2, 3, (2, 61, d), device=device).float()
    keys[:, 40:] = keys[:, :21]  # exact duplicates at higher indices
    x = torch.randint(-2, 3, (29, 2, d), device=device).float()
    index, sqdist = ops.nearest_key(x, keys, backend=backend)
    dist = reference.nearest_key_exact(x.cpu(), keys.cpu())
    assert torch.equal(index.cpu(), dist.argmin(-1))  # argmin returns the first minimum
    assert torch.equal(sqdist.double().cpu(), dist.amin(-1))


def test_nearest_key_all_keys_equal(backend):
    device = backend_device(backend)
    keys = torch.randn(1, 1, 12, device=device).expand(3, 21, 12).contiguous()
    index, _ = ops.nearest_key(torch.randn(19, 3, 12, device=device), keys, backend=backend)
    assert (index == 0).all()


def test_nearest_key_ignores_autocast(backend, seed):
    """Under bfloat16 autocast (a --bf16 run) the choice is still float32's: torch's fallback would otherwise
    score 257 keys in bfloat16 and flip close ones."""
    device = backend_device(backend)
    x, keys = torch.randn(301, 3, 48, device=device), torch.randn(3, 257, 48, device=device)
    want = ops.nearest_key(x, keys, backend=backend)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = ops.nearest_key(x, keys, backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("d", [12, 96])
def test_nearest_key_non_contiguous(backend, seed, d):
    device = backend_device(backend)
    x = strided(torch.randn(3, 37, d, device=device)).transpose(0, 1)  # [N, H, d], strided in every dim
    keys = torch.randn(1001, 3, d, device=device).transpose(0, 1)  # [H, K, d], head stride smaller than key stride
    assert not x.is_contiguous() and not keys.is_contiguous()
    check_nearest(x, keys, *ops.nearest_key(x, keys, backend=backend))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("keys_fp32", [False, True])
@pytest.mark.parametrize("d", [13, 96])
def test_nearest_key_low_precision(backend, seed, dtype, keys_fp32, d):
    """fp16/bf16 inputs are ranked in fp32: the result is the fp32-accurate answer for the rounded values."""
    device = backend_device(backend)
    x = torch.randn(37, 3, d, device=device).to(dtype)
    keys = torch.randn(3, 1001, d, device=device)
    keys = keys if keys_fp32 else keys.to(dtype)
    check_nearest(x, keys, *ops.nearest_key(x, keys, backend=backend))


# ---- ema_update_ -------------------------------------------------------------------------------------------


def random_state(h, k, d, device):
    keys = torch.randn(h, k, d, device=device)
    cluster_size = torch.rand(h, k, device=device) + 0.5
    return keys, cluster_size, keys * cluster_size.unsqueeze(-1)  # embed_sum consistent with the keys


def assert_state_close(state, state64, rtol=2e-5):
    for name, got, want in zip(("keys", "cluster_size", "embed_sum"), state, state64):
        scale = want.abs().max().item() + 1e-30
        torch.testing.assert_close(
            got.double().cpu(), want.cpu(), rtol=rtol, atol=rtol * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize(
    "n,h,k,d", [(37, 3, 1001, 13), (200, 2, 17, 1), (300, 3, 33, 12), (64, 2, 9, 256), (0, 2, 5, 12)]
)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_ema_update_several_steps_match_float64(backend, seed, n, h, k, d, index_dtype):
    """Three EMA steps in which the upper third of the keys receive nothing (they only decay)."""
    device = backend_device(backend)
    state = random_state(h, k, d, device)
    state64 = [t.double() for t in state]
    decay = 0.9
    for _ in range(3):
        x = torch.randn(n, h, d, device=device)
        index = torch.randint(0, max(1, 2 * k // 3), (n, h), device=device)
        ops.ema_update_(*state, x, index.to(index_dtype), decay=decay, backend=backend)
        reference.ema_update_(*state64, x.double(), index, decay=decay)
    assert_state_close(state, state64)


def test_ema_update_counts_and_sums_are_exact(backend, seed):
    """decay=0 leaves exactly this batch's counts and sums; many rows per key make lost updates visible."""
    device = backend_device(backend)
    n, h, k, d = 3000, 2, 7, 5
    keys, cluster_size, embed_sum = random_state(h, k, d, device)
    x = torch.randint(-8, 9, (n, h, d), device=device).float()  # integer sums: exact in any order
    index = torch.randint(0, k, (n, h), device=device)
    ops.ema_update_(keys, cluster_size, embed_sum, x, index, decay=0.0, backend=backend)
    counts, sums = reference.cluster_stats(x.double(), index, k)
    assert torch.equal(cluster_size.double(), counts)
    assert torch.equal(embed_sum.double(), sums)


def test_ema_update_deterministic_mode_is_reproducible(backend, seed):
    device = backend_device(backend)
    x = torch.randn(500, 2, 12, device=device)
    index = torch.randint(0, 5, (500, 2), device=device)
    start = random_state(2, 5, 12, device)
    results = []
    for _ in range(2):
        state = [t.clone() for t in start]
        ops.ema_update_(*state, x, index, decay=0.5, deterministic=True, backend=backend)
        results.append(state)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_ema_update_cpp_same_bits_for_any_thread_count(seed):
    """The C++ kernel sums each key in row order whatever the threads, so results are bit-identical."""
    x = torch.randn(2000, 1, 64)
    index = torch.randint(0, 9, (2000, 1))
    start = random_state(1, 9, 64, torch.device("cpu"))
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            state = [t.clone() for t in start]
            ops.ema_update_(*state, x, index, decay=0.8, backend="cpp")
            results.append(state)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_ema_update_low_precision_and_strided_input(backend, seed, dtype):
    device = backend_device(backend)
    state = random_state(3, 41, 13, device)
    state64 = [t.double() for t in state]
    x = strided(torch.randn(37, 3, 13, device=device).to(dtype))
    index = strided(torch.randint(0, 41, (37, 3), device=device))
    ops.ema_update_(*state, x, index, decay=0.95, backend=backend)
    reference.ema_update_(*state64, x.double(), index.contiguous(), decay=0.95)
    assert_state_close(state, state64)


# ---- kd_loss -----------------------------------------------------------------------------------------------


def kd_reference(student, teacher, temperature, mask, reduction, dtype=torch.float64):
    """Loss and gradient of reference.kd_loss in `dtype`, for the weighted sum used by the tests."""
    s = student.detach().to(dtype).requires_grad_()
    loss = reference.kd_loss(s, teacher.to(dtype), temperature=temperature, mask=mask, reduction=reduction)
    return loss, s


def backward_weights(loss):
    """Upstream gradients: random per row for reduction='none', so every row's gradient scale is checked."""
    return torch.rand_like(loss) + 0.5 if loss.dim() else torch.ones_like(loss)


def assert_within_torch_error(got, want64, torch32, atol):
    """max |got - float64| <= 2 max |torch fp32 - float64| + atol: no worse than PyTorch's own fp32 error
    (the flash-attention rule, over the whole tensor since per-element errors are noise)."""
    err = (got.double().cpu() - want64.cpu()).abs().max().item()
    bound = 2 * (torch32.double().cpu() - want64.cpu()).abs().max().item() + atol
    assert err <= bound, f"max error {err:.3g} exceeds {bound:.3g}"


def kd_cancellation_scale(student, teacher, temperature, mask, reduction):
    """The loss's size before cancellation, T^2 * sum p_t (|log p_t| + |log p_s|) per row, reduced like the
    loss: fp32 rounds the log-probabilities, not their small difference, so the loss's error scales with this
    (at T=4 a KL of 0.02 is summed from terms 50x larger), not with the loss itself."""
    log_t = torch.log_softmax(teacher.double() / temperature, -1)
    log_s = torch.log_softmax(student.double() / temperature, -1)
    rows = temperature**2 * (log_t.exp() * (log_t.abs() + log_s.abs())).nan_to_num().sum(-1)
    if mask is not None:
        rows = rows * mask
    count = int(mask.sum()) if mask is not None else rows.numel()
    return {"none": rows.max(), "sum": rows.sum(), "batchmean": rows.sum() / max(count, 1)}[reduction].item()


def check_kd(backend, student, teacher, temperature, mask, reduction, grad_dtype=torch.float32):
    s = student.detach().clone().requires_grad_()
    loss = ops.kd_loss(s, teacher, temperature=temperature, mask=mask, reduction=reduction, backend=backend)
    weights = backward_weights(loss)
    (loss * weights).sum().backward()
    loss64, s64 = kd_reference(student, teacher, temperature, mask, reduction)
    (loss64 * weights.double()).sum().backward()
    loss32, s32 = kd_reference(student, teacher, temperature, mask, reduction, torch.float32)
    (loss32 * weights).sum().backward()
    scale = max(loss64.abs().max().item(), kd_cancellation_scale(student, teacher, temperature, mask, reduction))
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    assert_within_torch_error(loss.detach(), loss64.detach(), loss32.detach(), atol=4 * EPS32 * max(scale, 1.0))
    assert s.grad.dtype == student.dtype
    # Each gradient entry is T * (p_s - p_t) * weight with probabilities of relative error ~eps: its fp32 error
    # is a few eps * T * weight. Stored in the student's dtype, it may also round one unit in the last place
    # (that dtype's eps at the largest entry) away from the correctly rounded value.
    grad_scale = s64.grad.abs().max().item()
    ulp = torch.finfo(grad_dtype).eps * grad_scale if grad_dtype != torch.float32 else 0.0
    if backend == "triton" and student.device.type == "cpu":
        ulp *= 2  # Triton's CPU interpreter truncates fp32 -> bf16/fp16 stores (a GPU rounds to nearest even)
    atol = ulp + 8 * EPS32 * temperature * weights.max().item()
    assert_within_torch_error(s.grad, s64.grad, s32.grad, atol=atol)
    if mask is not None:
        assert (s.grad[~mask] == 0).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n,v", [(37, 1001), (5, 2)])
def test_kd_loss_matches_float64(backend, seed, temperature, reduction, masked, n, v):
    device = backend_device(backend)
    student, teacher = 3 * torch.randn(n, v, device=device), 3 * torch.randn(n, v, device=device)
    mask = (torch.rand(n, device=device) < 0.6) if masked else None
    check_kd(backend, student, teacher, temperature, mask, reduction)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kd_loss_extreme_logits(backend, seed, temperature):
    """Logits of ±1e4: many probabilities underflow to exactly 0; losses and gradients stay finite and exact."""
    device = backend_device(backend)
    student = 1e4 * torch.randn(13, 517, device=device).sign()
    teacher = 1e4 * torch.randn(13, 517, device=device).clamp(-1, 1)
    check_kd(backend, student, teacher, temperature, None, "none")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_kd_loss_low_precision(backend, seed, dtype):
    device = backend_device(backend)
    student = (3 * torch.randn(37, 1001, device=device)).to(dtype)
    teacher = (3 * torch.randn(37, 1001, device=device)).to(dtype)
    check_kd(backend, student, teacher, 2.0, None, "none", grad_dtype=dtype)


def test_kd_loss_non_contiguous_and_mixed_dtype_teacher(backend, seed):
    device = backend_device(backend)
    student = strided(3 * torch.randn(37, 1001, device=device))
    teacher = (3 * torch.randn(1001, 37, device=device)).t()  # column-major
    check_kd(backend, student, teacher, 1.0, None, "batchmean")
    check_kd(backend, student.to(torch.bfloat16), teacher, 1.0, None, "sum", grad_dtype=torch.bfloat16)


def test_kd_loss_without_grad_and_all_masked(backend, seed):
    device = backend_device(backend)
    student, teacher = torch.randn(9, 33, device=device), torch.randn(9, 33, device=device)
    rows = ops.kd_loss(student, teacher, temperature=2.0, reduction="none", backend=backend)
    torch.testing.assert_close(
        rows.double().cpu(), kd_reference(student, teacher, 2.0, None, "none")[0].detach().cpu(), rtol=1e-5, atol=1e-6
    )
    none = torch.zeros(9, dtype=torch.bool, device=device)
    s = student.clone().requires_grad_()
    loss = ops.kd_loss(s, teacher, mask=none, backend=backend)
    loss.backward()
    assert loss.item() == 0 and (s.grad == 0).all()


# ---- opcheck: the registered ops compose with autograd, fake tensors and torch.compile ---------------------


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_opcheck_nearest_key(device):
    from keydistill.ops import _library  # noqa: F401  (registers fake kernels and autograd)

    x, keys = torch.randn(37, 3, 13, device=device), torch.randn(3, 101, 13, device=device)
    torch.library.opcheck(torch.ops.keydistill.nearest_key.default, (x, keys))
    torch.library.opcheck(torch.ops.keydistill.nearest_key.default, (x.half(), keys))


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_opcheck_ema_update(device):
    from keydistill.ops import _library  # noqa: F401

    keys, cluster_size, embed_sum = random_state(3, 11, 13, torch.device(device))
    x, index = torch.randn(37, 3, 13, device=device), torch.randint(0, 11, (37, 3), device=device)
    torch.library.opcheck(
        torch.ops.keydistill.ema_update_.default, (keys, cluster_size, embed_sum, x, index, 0.9, 1e-5, True)
    )


# kd_loss_fwd (per-row losses + fused gradient, Python autograd) and kd_loss (reduced, C++ autograd); the last
# argument of each, for a student that does / does not require a gradient.
KD_OPS = [("kd_loss_fwd", lambda grad: grad)] + [("kd_loss", lambda grad, r=r: r) for r in ("batchmean", "sum", "none")]


@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("op,last_arg", KD_OPS, ids=["kd_loss_fwd", "kd_loss-batchmean", "kd_loss-sum", "kd_loss-none"])
def test_opcheck_kd_ops(device, masked, op, last_arg):
    from keydistill.ops import _library  # noqa: F401

    student = torch.randn(7, 129, device=device, requires_grad=True)
    teacher = torch.randn(7, 129, device=device)
    mask = torch.rand(7, device=device) < 0.5 if masked else None
    overload = getattr(torch.ops.keydistill, op).default
    torch.library.opcheck(overload, (student, teacher, 2.0, mask, last_arg(True)))
    torch.library.opcheck(overload, (student.detach(), teacher, 2.0, mask, last_arg(False)))


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_kd_loss_fwd_gradient_buffer_is_consumed_by_backward(device):
    """Backward scales the fused gradient in place (one [N, V] buffer in all), so it hands that very buffer
    to student.grad, and a second backward through the same graph fails loudly instead of using it twice."""
    from keydistill.ops import _library  # noqa: F401

    student = torch.randn(6, 50, device=device, requires_grad=True)
    rows, grad = torch.ops.keydistill.kd_loss_fwd(student, torch.randn(6, 50, device=device), 2.0, None, True)
    buffer = grad.data_ptr()
    del grad
    rows.sum().backward(retain_graph=True)
    assert student.grad.data_ptr() == buffer
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        rows.sum().backward()


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_kd_loss_op_consumes_its_gradient_and_ignores_the_teacher(device):
    """ops.kd_loss on a compiled backend: one fused gradient buffer, scaled in place by backward (so a second
    backward through the graph fails loudly), and no gradient ever reaches a teacher that requires one."""
    student = torch.randn(6, 50, device=device, requires_grad=True)
    teacher = torch.randn(6, 50, device=device, requires_grad=True)
    loss = ops.kd_loss(student, teacher, temperature=2.0, backend="cpp" if device == "cpu" else "cuda")
    loss.backward(retain_graph=True)
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss.backward()
