"""Triton kernels against the float64 reference, at small odd shapes chosen to hit every tiling edge.

On a machine without a GPU these run under the Triton interpreter (TRITON_INTERPRET=1, set in conftest),
which executes the same kernels with numpy: exact but slow, hence the small shapes. On a GPU they run the
compiled kernels. The shared op contract (errors, every backend) lives in test_ops_kernels.py; this file
covers what is particular to the Triton kernels: several key tiles and d chunks in nearest_key, atomics
and the deterministic segment sums in ema_update_, several V chunks and packed rows in kd_loss.
"""

import os
import subprocess
import sys

import pytest
import torch

from keydistill import ops
from keydistill.ops import reference
from keydistill.ops.triton import kd_loss_kernel
from tests.helpers.backends import backend_device

DEVICE = backend_device("triton")


def eps(dtype):
    return torch.finfo(dtype).eps


# ---- nearest_key -------------------------------------------------------------------------------------------


def check_nearest(x, keys, index, sqdist):
    """The chosen key is (within fp32 ranking error) a nearest one; sqdist is its exact distance; indices
    agree with the float64 argmin wherever the minimum is unique by more than that error. Everything is
    compared on the CPU, whatever device the kernel ran on."""
    x, keys, index, sqdist = x.cpu(), keys.cpu(), index.cpu(), sqdist.cpu()
    dist = reference.nearest_key_exact(x, keys)  # [N, H, K] float64
    chosen = dist.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    scale = x.double().pow(2).sum(-1) + keys.double().pow(2).sum(-1).amax(-1)  # |x|^2 + max |k|^2 per (n, h)
    rank_tol = 8 * eps(torch.float32) * scale + 1e-30
    best2 = dist.topk(min(2, dist.shape[-1]), dim=-1, largest=False).values
    assert (chosen - best2[..., 0] <= rank_tol).all()
    torch.testing.assert_close(sqdist.double(), chosen, rtol=4 * eps(torch.float32), atol=1e-30)
    if dist.shape[-1] > 1:
        unique = best2[..., 1] - best2[..., 0] > 2 * rank_tol
        assert torch.equal(index[unique], dist.argmin(-1)[unique])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 12, 13, 70])  # below the 16-wide dot, padded, and two d chunks
def test_nearest_key_matches_float64(seed, dtype, d):
    x = torch.randn(37, 3, d, device=DEVICE).to(dtype)
    keys = torch.randn(3, 150, d, device=DEVICE).to(dtype)  # 150 keys: three key tiles, the last partial
    index, sqdist = ops.nearest_key(x, keys, backend="triton")
    assert index.dtype == torch.int64 and sqdist.dtype == torch.float32 and index.shape == (37, 3)
    check_nearest(x, keys, index, sqdist)


def test_nearest_key_mixed_dtype_and_strided(seed):
    """fp16 queries against fp32 keys, both non-contiguous."""
    x = torch.randn(3, 41, 24, device=DEVICE).to(torch.float16).transpose(0, 1)[:, :, ::2]  # [41, 3, 12]
    keys = torch.randn(130, 3, 12, device=DEVICE).transpose(0, 1)  # [3, 130, 12]
    assert not x.is_contiguous() and not keys.is_contiguous()
    check_nearest(x, keys, *ops.nearest_key(x, keys, backend="triton"))


def test_nearest_key_ties_go_to_lowest_key(seed):
    """Duplicate keys within one tile and across tiles; integer data makes every score exact."""
    h, k, d = 2, 140, 12
    keys = torch.randint(-3, 4, (h, k, d), device=DEVICE).float()
    keys[:, 100] = keys[:, 5]  # duplicate in a later tile
    keys[:, 7] = keys[:, 5]  # duplicate in the same tile, after the original
    x = keys[:, [5, 100, 7, 139]].transpose(0, 1).contiguous()  # queries sitting on keys
    index, sqdist = ops.nearest_key(x, keys, backend="triton")
    dist = reference.nearest_key_exact(x.cpu(), keys.cpu())
    first_min = (dist == dist.amin(-1, keepdim=True)).int().argmax(-1)  # lowest k among the minima
    assert torch.equal(index.cpu(), first_min)
    assert index[0].tolist() == [5, 5] and index[1].tolist() == [5, 5]
    assert (sqdist == 0).all()


def test_nearest_key_empty_and_single_key(seed):
    index, sqdist = ops.nearest_key(
        torch.randn(0, 2, 5, device=DEVICE), torch.randn(2, 9, 5, device=DEVICE), backend="triton"
    )
    assert index.shape == (0, 2) and sqdist.shape == (0, 2)
    x, keys = torch.randn(9, 2, 5, device=DEVICE), torch.randn(2, 1, 5, device=DEVICE)
    index, sqdist = ops.nearest_key(x, keys, backend="triton")
    assert (index == 0).all()
    torch.testing.assert_close(sqdist, (x - keys.transpose(0, 1)).pow(2).sum(-1))


# ---- ema_update_ -------------------------------------------------------------------------------------------


def ema_states(h, k, d):
    keys = torch.randn(h, k, d, device=DEVICE)
    cluster_size = torch.rand(h, k, device=DEVICE) * 3
    return keys, cluster_size, keys * cluster_size.unsqueeze(-1)


@pytest.mark.parametrize("deterministic", [False, True])
def test_ema_update_steps_match_float64(seed, deterministic):
    """Several steps; a third of the keys never receive a row; repeated keys hit the atomics hard."""
    h, k, d, n = 3, 37, 13, 45
    state = ema_states(h, k, d)
    ref_state = tuple(t.double().cpu() for t in state)
    for step in range(3):
        x = torch.randn(n, h, d, device=DEVICE).to(torch.float16 if step == 1 else torch.float32)
        index = torch.randint(0, 2 * k // 3, (n, h), device=DEVICE, dtype=torch.int32 if step == 2 else torch.int64)
        ops.ema_update_(*state, x, index, decay=0.8, eps=1e-3, deterministic=deterministic, backend="triton")
        reference.ema_update_(*ref_state, x.double().cpu(), index.long().cpu(), decay=0.8, eps=1e-3)
        for got, want in zip(state, ref_state):
            torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_ema_update_strided_input_and_determinism(seed):
    h, k, d, n = 2, 11, 6, 70
    x = torch.randn(h, n, 2 * d, device=DEVICE).transpose(0, 1)[:, :, ::2]  # [n, h, d], non-contiguous
    index = torch.randint(0, k, (h, n), device=DEVICE).t()
    start = ema_states(h, k, d)
    runs = []
    for _ in range(2):
        state = tuple(t.clone() for t in start)
        ops.ema_update_(*state, x, index, decay=0.5, deterministic=True, backend="triton")
        runs.append(state)
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # bit-identical
    ref_state = tuple(t.double().cpu() for t in start)
    reference.ema_update_(*ref_state, x.double().cpu(), index.cpu(), decay=0.5)
    for got, want in zip(runs[0], ref_state):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_ema_update_without_rows_only_decays(seed, deterministic):
    state = ema_states(2, 5, 3)
    ref_state = tuple(t.double().cpu() for t in state)
    x, index = torch.randn(0, 2, 3, device=DEVICE), torch.zeros(0, 2, dtype=torch.int64, device=DEVICE)
    ops.ema_update_(*state, x, index, decay=0.9, deterministic=deterministic, backend="triton")
    reference.ema_update_(*ref_state, x.double().cpu(), index.cpu(), decay=0.9)
    for got, want in zip(state, ref_state):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)


# ---- kd_loss ---------------------------------------------------------------------------------------------


def kd_check(student, teacher, temperature, mask=None, reduction="batchmean"):
    """Loss and gradient of the triton backend against float64, with tolerances from the input dtype."""
    s = student.clone().requires_grad_(True)
    loss = ops.kd_loss(s, teacher, temperature=temperature, mask=mask, reduction=reduction, backend="triton")
    upstream = torch.rand_like(loss) + 0.5  # per-row for "none", scalar otherwise
    loss.backward(upstream)
    s64 = student.double().cpu().requires_grad_(True)
    want = reference.kd_loss(
        s64,
        teacher.double().cpu(),
        temperature=temperature,
        mask=None if mask is None else mask.cpu(),
        reduction=reduction,
    )
    want.backward(upstream.double().cpu())
    # fp32 maths on logits of magnitude L/T: log-probabilities carry ~ eps32 * L/T absolute error.
    logit_scale = max(student.abs().max().item(), teacher.abs().max().item(), 1.0) / temperature
    loss_tol = 16 * eps(torch.float32) * logit_scale * temperature**2
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=1e-5, atol=loss_tol)
    # Probabilities exp(log p) turn that absolute error into a relative one; the gradient is then rounded
    # to the student's dtype.
    grad_rtol = 2 * eps(student.dtype) + 16 * eps(torch.float32) * logit_scale
    assert s.grad.dtype == student.dtype
    torch.testing.assert_close(
        s.grad.double().cpu(), s64.grad, rtol=grad_rtol, atol=grad_rtol * s64.grad.abs().max().item() + 1e-30
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [2, 37, kd_loss_kernel.MAX_BLOCK_V + 3])  # packed rows; one chunk; two chunks
def test_kd_loss_matches_float64(seed, dtype, vocab):
    n = 5 if vocab > 100 else 21
    student = (torch.randn(n, vocab, device=DEVICE) * 3).to(dtype)
    teacher = (torch.randn(n, vocab, device=DEVICE) * 3).to(dtype)
    kd_check(student, teacher, temperature=2.0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kd_loss_temperatures_masks_reductions(seed, temperature, reduction):
    student = torch.randn(19, 301, device=DEVICE) * 4
    teacher = torch.randn(19, 301, device=DEVICE) * 4
    mask = torch.rand(19, device=DEVICE) > 0.4
    mask[0] = False
    kd_check(student, teacher, temperature, mask=mask, reduction=reduction)


def test_kd_loss_extreme_logits(seed):
    """Logits of +-1e4: teacher probabilities underflow to exact zeros, which contribute nothing."""
    student = torch.randn(7, 53, device=DEVICE).sign() * 1e4
    teacher = torch.randn(7, 53, device=DEVICE).sign() * 1e4
    for temperature in (0.5, 4.0):
        kd_check(student, teacher, temperature)


def test_kd_loss_strided_and_masked_rows_are_zero(seed):
    big_s = torch.randn(2 * 13, 2 * 150, device=DEVICE)
    student, teacher = big_s[::2, ::2], torch.randn(150, 13, device=DEVICE).t()  # column stride 2; transposed
    mask = torch.rand(13, device=DEVICE) > 0.5
    kd_check(student, teacher, 1.5, mask=mask, reduction="none")
    s = student.clone().requires_grad_(True)
    ops.kd_loss(s, teacher, mask=mask, reduction="sum", backend="triton").backward()
    assert (s.grad[~mask] == 0).all()


def test_kd_loss_gradient_is_the_only_extra_buffer(seed):
    """backward scales the forward's gradient in place (no second [N, V] buffer) and so runs once."""
    student = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    loss = ops.kd_loss(student, torch.randn(6, 40, device=DEVICE), backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_kd_loss_without_grad_and_empty(seed):
    student, teacher = torch.randn(4, 9, device=DEVICE), torch.randn(4, 9, device=DEVICE)
    with torch.no_grad():
        rows = ops.kd_loss(student, teacher, reduction="none", backend="triton")
    want = reference.kd_loss(student.double().cpu(), teacher.double().cpu(), reduction="none")
    torch.testing.assert_close(rows.double().cpu(), want, rtol=1e-5, atol=1e-6)
    empty = torch.randn(0, 9, device=DEVICE, requires_grad=True)
    loss = ops.kd_loss(empty, torch.randn(0, 9, device=DEVICE), backend="triton")
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == (0, 9)


# ---- every launcher runs on its tensors' device -------------------------------------------------------------


def test_device_of_enters_the_tensors_own_gpu():
    """Triton launches on torch's current device: the launchers must enter their tensors' device first."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from keydistill.ops.triton._device import device_of

    with FakeTensorMode():  # CUDA tensors without a GPU: metadata only
        on_gpu1 = torch.empty(3, device="cuda:1")
    guard = device_of(on_gpu1)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_of(torch.empty(3)), torch.cuda.device)  # the interpreter: nothing to enter


def test_every_launcher_enters_its_tensors_device(monkeypatch):
    """Each op's launcher takes its device from its own tensors (checked by recording what it enters)."""
    import contextlib

    from keydistill.ops.triton import ema_update_kernel, kd_loss_kernel, nearest_key_kernel

    entered = []

    def recording_device_of(tensor):
        entered.append(tensor.device)
        return contextlib.nullcontext()

    for module in (ema_update_kernel, kd_loss_kernel, nearest_key_kernel):
        monkeypatch.setattr(module, "device_of", recording_device_of)
    ops.nearest_key(torch.randn(5, 2, 3, device=DEVICE), torch.randn(2, 4, 3, device=DEVICE), backend="triton")
    state = ema_states(2, 4, 3)
    ops.ema_update_(
        *state,
        torch.randn(5, 2, 3, device=DEVICE),
        torch.randint(0, 4, (5, 2), device=DEVICE),
        decay=0.5,
        backend="triton",
    )
    ops.kd_loss(torch.randn(3, 9, device=DEVICE), torch.randn(3, 9, device=DEVICE), backend="triton")
    assert [d.type for d in entered] == [DEVICE.type] * 3


# ---- the same kernels, lowered for a real GPU ---------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the tests above compile and run the kernels")
def test_kernels_compile_for_sm90():
    """The interpreter never lowers kernels to PTX: compile each one for sm_90 (H100/H200) to catch what only
    the GPU compiler rejects. Runs in a subprocess because this process has TRITON_INTERPRET=1."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "keydistill.ops.triton.compile_check", "--arch", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "spill" in done.stdout and "FAILED" not in done.stdout
