"""The fused kd_loss kernels fold the reduction's 1/N into their gradient: backward makes no pass over the
[N, V] gradient when the incoming gradient is 1 (loss.backward()), and scales it right when it is not."""

import pytest
import torch

from keydistill import ops
from keydistill.ops import reference
from tests.helpers.backends import backend_device

# What autograd itself does with the finished gradient (no pass over it).
HANDING_ON = {"torch::autograd::AccumulateGrad", "aten::detach", "detach"}


def ops_over_the_gradient(backend, reduction, upstream=None):
    """The ATen ops that backward runs with an [N, V] input (the profiler, unlike a dispatch mode, leaves the
    C++ op on its eager path)."""
    device = backend_device(backend)
    student = torch.randn(6, 50, device=device, requires_grad=True)
    teacher = torch.randn(6, 50, device=device)
    loss = ops.kd_loss(student, teacher, temperature=2.0, reduction=reduction, backend=backend)
    if upstream is not None:
        loss = loss * upstream
    with torch.profiler.profile(record_shapes=True) as profile:
        loss.backward()
    found = {e.name for e in profile.events() if any(list(shape) == [6, 50] for shape in e.input_shapes)}
    return found - HANDING_ON


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_backward_of_a_unit_gradient_makes_no_pass_over_the_gradient(kernel_backend, reduction):
    assert ops_over_the_gradient("torch", reduction), "the profiler sees the torch backend's passes"
    found = ops_over_the_gradient(kernel_backend, reduction)
    assert not found, f"{kernel_backend}: backward ran {found} over the [N, V] gradient"
    if kernel_backend == "triton":  # a gradient of 3 is scaled, on the device (one pass)
        assert ops_over_the_gradient(kernel_backend, reduction, upstream=3.0) == {"aten::mul_"}


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_the_folded_scale_gives_the_reference_gradient(backend, reduction, masked, upstream, seed):
    device = backend_device(backend)
    student, teacher = 3 * torch.randn(9, 70, device=device), 3 * torch.randn(9, 70, device=device)
    mask = (torch.rand(9, device=device) < 0.6) if masked else None
    s = student.clone().requires_grad_()
    (ops.kd_loss(s, teacher, temperature=1.5, mask=mask, reduction=reduction, backend=backend) * upstream).backward()
    s64 = student.double().cpu().requires_grad_()
    cpu_mask = mask.cpu() if masked else None
    loss64 = reference.kd_loss(s64, teacher.double().cpu(), temperature=1.5, mask=cpu_mask, reduction=reduction)
    (loss64 * upstream).backward()
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-5, atol=1e-6 * upstream)
