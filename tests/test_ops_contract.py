"""The public contract of keydistill.ops around the maths: input errors, empty batches, backend selection.

Every bad input must raise TypeError (wrong type, dtype or device) or ValueError (wrong shape or value)
whose message names the argument, before any backend runs; N = 0 must work on every backend.
"""
import pytest
import torch

from conftest import backend_device
from keydistill import ops
from keydistill.ops import _backends, reference


def nearest_inputs(n=5, h=3, k=7, d=4, **overrides):
    args = {"x": torch.randn(n, h, d), "keys": torch.randn(h, k, d)}
    args.update(overrides)
    return args


def ema_inputs(n=5, h=3, k=7, d=4, **overrides):
    args = {"keys": torch.randn(h, k, d), "cluster_size": torch.rand(h, k) + 0.5, "embed_sum": torch.randn(h, k, d),
            "x": torch.randn(n, h, d), "index": torch.randint(0, k, (n, h)), "decay": 0.9}
    args.update(overrides)
    return args


def kd_inputs(n=5, v=11, **overrides):
    args = {"student_logits": torch.randn(n, v), "teacher_logits": torch.randn(n, v)}
    args.update(overrides)
    return args


def call_nearest(args):
    return ops.nearest_key(args.pop("x"), args.pop("keys"), **args)


def call_ema(args):
    tensors = [args.pop(name) for name in ("keys", "cluster_size", "embed_sum", "x", "index")]
    return ops.ema_update_(*tensors, **args)


def call_kd(args):
    return ops.kd_loss(args.pop("student_logits"), args.pop("teacher_logits"), **args)


META = torch.device("meta")  # a second device that exists on every machine, for device-mismatch errors

BAD_INPUTS = [
    # (call, arguments, error type, words the message must contain)
    (call_nearest, nearest_inputs(x=[[1.0]]), TypeError, "x"),
    (call_nearest, nearest_inputs(x=torch.randn(5, 12)), ValueError, "x must have 3 dimensions"),
    (call_nearest, nearest_inputs(keys=torch.randn(7, 4)), ValueError, "keys must have 3 dimensions"),
    (call_nearest, nearest_inputs(x=torch.randn(5, 3, 4).double()), TypeError, "x must have dtype"),
    (call_nearest, nearest_inputs(x=torch.randint(0, 3, (5, 3, 4))), TypeError, "x must have dtype"),
    (call_nearest, nearest_inputs(x=torch.randn(5, 3, 4).half(), keys=torch.randn(3, 7, 4).bfloat16()), TypeError, "keys"),
    (call_nearest, nearest_inputs(keys=torch.randn(2, 7, 4)), ValueError, "H="),
    (call_nearest, nearest_inputs(keys=torch.randn(3, 7, 5)), ValueError, "d="),
    (call_nearest, nearest_inputs(keys=torch.randn(3, 0, 4)), ValueError, "K"),
    (call_nearest, nearest_inputs(keys=torch.randn(3, 7, 4, device=META)), TypeError, "keys is on meta"),
    (call_ema, ema_inputs(keys=torch.randn(3, 7, 4).half()), TypeError, "keys must have dtype"),
    (call_ema, ema_inputs(cluster_size=torch.rand(3, 6)), ValueError, "cluster_size"),
    (call_ema, ema_inputs(embed_sum=torch.randn(3, 7, 5)), ValueError, "embed_sum"),
    (call_ema, ema_inputs(x=torch.randn(5, 2, 4)), ValueError, "x must have shape"),
    (call_ema, ema_inputs(x=torch.randn(5, 3, 4).double()), TypeError, "x must have dtype"),
    (call_ema, ema_inputs(index=torch.randint(0, 7, (4, 3))), ValueError, "index must have shape"),
    (call_ema, ema_inputs(index=torch.rand(5, 3)), TypeError, "index must have dtype"),
    (call_ema, ema_inputs(index=torch.full((5, 3), 7)), ValueError, "index"),
    (call_ema, ema_inputs(index=torch.full((5, 3), -1)), ValueError, "index"),
    (call_ema, ema_inputs(decay=1.0), ValueError, "decay"),
    (call_ema, ema_inputs(decay=-0.1), ValueError, "decay"),
    (call_ema, ema_inputs(decay=float("nan")), ValueError, "decay"),
    (call_ema, ema_inputs(eps=0.0), ValueError, "eps"),
    (call_ema, ema_inputs(embed_sum=torch.randn(3, 4, 7).transpose(1, 2)), ValueError, "embed_sum"),
    (call_ema, ema_inputs(x=torch.randn(5, 3, 4, device=META)), TypeError, "x is on meta"),
    (call_kd, kd_inputs(student_logits=torch.randn(5, 11, 2)), ValueError, "student_logits must have 2 dimensions"),
    (call_kd, kd_inputs(teacher_logits=torch.randn(5, 12)), ValueError, "teacher_logits"),
    (call_kd, kd_inputs(student_logits=torch.randint(0, 3, (5, 11))), TypeError, "student_logits must have dtype"),
    (call_kd, kd_inputs(temperature=0.0), ValueError, "temperature"),
    (call_kd, kd_inputs(temperature=-1.0), ValueError, "temperature"),
    (call_kd, kd_inputs(temperature=float("inf")), ValueError, "temperature"),
    (call_kd, kd_inputs(temperature=float("nan")), ValueError, "temperature"),
    (call_kd, kd_inputs(temperature="2"), TypeError, "temperature"),
    (call_kd, kd_inputs(mask=torch.ones(5)), TypeError, "mask must have dtype"),
    (call_kd, kd_inputs(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask must have shape"),
    (call_kd, kd_inputs(reduction="mean"), ValueError, "reduction"),
    (call_kd, kd_inputs(teacher_logits=torch.randn(5, 11, device=META)), TypeError, "teacher_logits is on meta"),
]


@pytest.mark.parametrize("call,args,error,words", BAD_INPUTS, ids=[f"{c.__name__}-{w}" for c, _, _, w in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_bad_input_raises_naming_the_argument(call, args, error, words, backend):
    with pytest.raises(error, match=words):
        call({**args, "backend": backend})


def test_compiled_ops_reject_bad_input_without_crashing():
    """Called directly (bypassing the checks), the C++ kernels raise instead of reading out of bounds."""
    from keydistill.ops import _library  # noqa: F401  (loads torch.ops.keydistill)
    keys, size, esum = torch.randn(2, 5, 3), torch.ones(2, 5), torch.zeros(2, 5, 3)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.keydistill.ema_update_(keys, size, esum, torch.randn(4, 2, 3), torch.full((4, 2), 5), 0.9, 1e-5, True)
    with pytest.raises(RuntimeError, match="disagree"):
        torch.ops.keydistill.nearest_key(torch.randn(4, 2, 3), torch.randn(3, 5, 3))


# ---- N = 0 -------------------------------------------------------------------------------------------------

def test_empty_batch(backend):
    device = backend_device(backend)
    index, sqdist = ops.nearest_key(torch.randn(0, 3, 12, device=device), torch.randn(3, 5, 12, device=device), backend=backend)
    assert index.shape == (0, 3) and index.dtype == torch.int64 and sqdist.shape == (0, 3) and sqdist.dtype == torch.float32

    state = [torch.randn(3, 5, 12, device=device), torch.rand(3, 5, device=device) + 0.5, torch.randn(3, 5, 12, device=device)]
    expected = [t.double().cpu() for t in state]
    empty_x, empty_index = torch.randn(0, 3, 12, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)
    ops.ema_update_(*state, empty_x, empty_index, decay=0.9, backend=backend)
    reference.ema_update_(*expected, empty_x.double().cpu(), empty_index.cpu(), decay=0.9)  # the state only decays
    for got, want in zip(state, expected):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)

    student = torch.randn(0, 7, device=device, requires_grad=True)
    for reduction, shape in (("none", (0,)), ("sum", ()), ("batchmean", ())):
        loss = ops.kd_loss(student, torch.randn(0, 7, device=device), reduction=reduction, backend=backend)
        assert loss.shape == shape and (loss == 0).all()
        loss.sum().backward()
        assert student.grad.shape == (0, 7)


# ---- backend selection -------------------------------------------------------------------------------------

def test_backends_lists_what_runs_here():
    available = ops.backends()
    assert "torch" in available and "cpp" in available  # the build must produce keydistill._C
    assert ("cuda" in available) == torch.cuda.is_available()
    assert list(available) == [b for b in _backends.ALL if b in available]  # fastest first


def test_auto_prefers_the_compiled_cpu_kernels():
    for op in ("nearest_key", "ema_update_", "kd_loss"):
        assert _backends.resolve(op, "auto", torch.device("cpu")) == "cpp"


def test_explicit_unavailable_backend_says_why_and_how():
    if not torch.cuda.is_available():
        assert "CUDA" in _backends.why_unavailable("cuda")  # no device, or a build without CUDA kernels
        with pytest.raises(ops.BackendUnavailable, match="'cuda' runs on cuda tensors, not cpu"):
            ops.nearest_key(torch.randn(2, 1, 3), torch.randn(1, 4, 3), backend="cuda")
    with pytest.raises(ops.BackendUnavailable, match="cpp.*runs on cpu tensors, not meta"):
        ops.kd_loss(torch.randn(2, 3, device=META), torch.randn(2, 3, device=META), backend="cpp")
    with pytest.raises(ops.BackendUnavailable, match="unknown backend 'fast'"):
        ops.nearest_key(torch.randn(2, 1, 3), torch.randn(1, 4, 3), backend="fast")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailable, match="TRITON_INTERPRET=1"):
        ops.kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="triton")


def test_without_the_extension_auto_falls_back_and_cpp_explains(monkeypatch):
    """A machine whose install could not compile _C still runs every op on the torch backend."""
    monkeypatch.setattr(_backends, "_extension", lambda: (None, "keydistill._C could not be loaded (simulated)"))
    _backends._resolve.cache_clear()  # resolution is cached per process; this test changes what is installed
    monkeypatch.setattr(_backends, "_resolve", _backends._resolve.__wrapped__)
    x, keys = torch.randn(6, 2, 3), torch.randn(2, 4, 3)
    assert _backends.resolve("nearest_key", "auto", x.device) == "torch"
    assert torch.equal(ops.nearest_key(x, keys)[0], reference.nearest_key(x, keys)[0])
    with pytest.raises(ops.BackendUnavailable, match="simulated"):
        ops.nearest_key(x, keys, backend="cpp")


@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_public_ops_compile_into_one_graph(backend):
    """torch.compile(fullgraph=True) traces the public ops (validation, backend choice and the op itself)
    without a graph break, and the compiled step gives eager's losses, gradients, keys and EMA state."""
    torch.manual_seed(0)
    mask = torch.rand(9) < 0.7

    def step(x, keys, cluster_size, embed_sum, student, teacher):
        index, sqdist = ops.nearest_key(x, keys, backend=backend)
        ops.ema_update_(keys, cluster_size, embed_sum, x, index, decay=0.9, backend=backend)
        return index, sqdist, ops.kd_loss(student, teacher, temperature=2.0, mask=mask, backend=backend) * 3

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    inputs = [torch.randn(9, 2, 5), torch.randn(2, 13, 5), torch.rand(2, 13) + 0.5, torch.randn(2, 13, 5),
              torch.randn(9, 4), torch.randn(9, 4)]
    results = []
    for fn in (step, compiled):
        x, keys, cluster_size, embed_sum, student, teacher = [t.clone() for t in inputs]
        student.requires_grad_()
        index, sqdist, loss = fn(x, keys, cluster_size, embed_sum, student, teacher)
        loss.backward()
        results.append((index, sqdist, loss.detach(), student.grad, keys, cluster_size, embed_sum))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


def test_compiled_ema_update_still_rejects_an_out_of_range_index():
    """Inside a compiled graph the index range check is an in-graph assertion (no host sync), not skipped."""
    keys, cluster_size, embed_sum = torch.randn(2, 13, 5), torch.rand(2, 13) + 0.5, torch.randn(2, 13, 5)

    def update(x, index):
        ops.ema_update_(keys, cluster_size, embed_sum, x, index, decay=0.9)

    compiled = torch.compile(update, backend="aot_eager", fullgraph=True)
    compiled(torch.randn(4, 2, 5), torch.randint(0, 13, (4, 2)))  # in range: fine
    with pytest.raises(RuntimeError, match="outside"):
        compiled(torch.randn(4, 2, 5), torch.full((4, 2), 13))
