"""The public contract of keydistill.ops around the maths: input errors, empty batches, backend selection.

Every bad input must raise TypeError (wrong type, dtype or device) or ValueError (wrong shape or value)
whose message names the argument, before any backend runs; N = 0 must work on every backend.
"""

import pytest
import torch

from keydistill import ops
from keydistill.ops import _backends, reference
from tests.helpers.backends import backend_device


def nearest_inputs(n=5, h=3, k=7, d=4, **overrides):
    args = {"x": torch.randn(n, h, d), "keys": torch.randn(h, k, d)}
    args.update(overrides)
    return args


def ema_inputs(n=5, h=3, k=7, d=4, **overrides):
    args = {
        "keys": torch.randn(h, k, d),
        "cluster_size": torch.rand(h, k) + 0.5,
        "embed_sum": torch.randn(h, k, d),
        "x": torch.randn(n, h, d),
        "index": torch.randint(0, k, (n, h)),
        "decay": 0.9,
    }
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


def big(*shape, dtype=torch.float32):
    """A tensor of `shape` holding one element (stride 0): sizes past the int32 limits, without the memory."""
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(*shape)


META = torch.device("meta")  # a second device that exists on every machine, for device-mismatch errors

BAD_INPUTS = [
    # (call, arguments, error type, words the message must contain)
    (call_nearest, nearest_inputs(x=[[1.0]]), TypeError, "x"),
    (call_nearest, nearest_inputs(x=torch.randn(5, 12)), ValueError, "x must have 3 dimensions"),
    (call_nearest, nearest_inputs(keys=torch.randn(7, 4)), ValueError, "keys must have 3 dimensions"),
    (call_nearest, nearest_inputs(x=torch.randn(5, 3, 4).double()), TypeError, "x must have dtype"),
    (call_nearest, nearest_inputs(x=torch.randint(0, 3, (5, 3, 4))), TypeError, "x must have dtype"),
    (
        call_nearest,
        nearest_inputs(x=torch.randn(5, 3, 4).half(), keys=torch.randn(3, 7, 4).bfloat16()),
        TypeError,
        "keys",
    ),
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
    # the int32 limits of csrc/checks.h, for every backend (zero-stride tensors: the sizes without the memory)
    (call_nearest, nearest_inputs(x=big(1, 2, 1), keys=big(2, 2**31 - 64, 1)), ValueError, "K = 2147483584 exceeds"),
    (call_nearest, nearest_inputs(x=big(1, 65536, 1), keys=big(65536, 1, 1)), ValueError, "H = 65536 exceeds"),
    (
        call_ema,
        ema_inputs(x=big(2**31, 3, 4), index=big(2**31, 3, dtype=torch.long)),
        ValueError,
        "N = 2147483648 exceeds",
    ),
    (call_ema, ema_inputs(n=1, h=65536, k=1, d=1), ValueError, "H = 65536 exceeds"),  # 65536 x 1 key: small
    (
        call_kd,
        kd_inputs(student_logits=big(2**31, 1), teacher_logits=big(2**31, 1)),
        ValueError,
        "N = 2147483648 exceeds",
    ),
]


@pytest.mark.parametrize("call,args,error,words", BAD_INPUTS, ids=[f"{c.__name__}-{w}" for c, _, _, w in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_bad_input_raises_naming_the_argument(call, args, error, words, backend):
    with pytest.raises(error, match=words):
        call({**args, "backend": backend})


# ---- the compiled ops called directly: csrc/checks.h, shared by the CPU and CUDA entry points ---------------


def op_nearest(x=None, keys=None):
    return torch.ops.keydistill.nearest_key(
        torch.randn(4, 2, 3) if x is None else x, torch.randn(2, 5, 3) if keys is None else keys
    )


def op_ema(**change):
    args = dict(
        keys=torch.randn(2, 5, 3),
        cluster_size=torch.ones(2, 5),
        embed_sum=torch.zeros(2, 5, 3),
        x=torch.randn(4, 2, 3),
        index=torch.randint(0, 5, (4, 2)),
        decay=0.9,
        eps=1e-5,
        deterministic=True,
    )
    args.update(change)
    return torch.ops.keydistill.ema_update_(*args.values())


def op_kd(**change):
    args = dict(student=torch.randn(4, 7), teacher=torch.randn(4, 7), temperature=2.0, mask=None, compute_grad=True)
    args.update(change)
    return torch.ops.keydistill.kd_loss_fwd(*args.values())


def op_kd_reduced(**change):
    args = dict(student=torch.randn(4, 7), teacher=torch.randn(4, 7), temperature=2.0, mask=None, reduction="batchmean")
    args.update(change)
    return torch.ops.keydistill.kd_loss(*args.values())


DIRECT_BAD_ARGS = [  # (call, the message it must raise with)
    (lambda: op_nearest(x=torch.randn(4, 6)), r"x must be \[N, H, d\]"),
    (lambda: op_nearest(keys=torch.randn(5, 3)), r"keys must be \[H, K, d\]"),
    (lambda: op_nearest(x=torch.randn(4, 2, 3).double()), "x must be float32, float16 or bfloat16, got Double"),
    (
        lambda: op_nearest(x=torch.randn(4, 2, 3).half(), keys=torch.randn(2, 5, 3).bfloat16()),
        "keys must be float32 or x's dtype",
    ),
    (lambda: op_nearest(keys=torch.randn(3, 5, 3)), "disagree on H or d"),
    (lambda: op_nearest(keys=torch.randn(2, 5, 4)), "disagree on H or d"),
    (lambda: op_nearest(keys=torch.randn(2, 0, 3)), "K >= 1"),
    (
        lambda: op_nearest(x=big(1, 2, 1), keys=big(2, 2**31 - 64, 1)),
        "K = 2147483584 exceeds the kernels' limit of 2147483583",
    ),
    (lambda: op_nearest(x=big(1, 65536, 1), keys=big(65536, 1, 1)), "H = 65536 exceeds"),
    (lambda: op_ema(keys=torch.randn(2, 5)), r"keys must be \[H, K, d\]"),
    (lambda: op_ema(cluster_size=torch.ones(2, 5, 1)), r"cluster_size must be \[H, K\]"),
    (lambda: op_ema(index=torch.zeros(4, dtype=torch.long)), r"index must be \[N, H\]"),
    (lambda: op_ema(cluster_size=torch.ones(2, 4)), "disagree"),
    (lambda: op_ema(x=torch.randn(4, 3, 3)), "disagree"),
    (lambda: op_ema(index=torch.zeros(3, 2, dtype=torch.long)), "disagree"),
    (lambda: op_ema(cluster_size=torch.ones(2, 5, dtype=torch.float64)), "cluster_size must be float32, got Double"),
    (lambda: op_ema(keys=torch.randn(2, 5, 3).half()), "keys must be float32, got Half"),
    (
        lambda: op_ema(embed_sum=torch.zeros(2, 3, 5).transpose(1, 2)),
        "embed_sum is updated in place and must be contiguous",
    ),
    (lambda: op_ema(x=torch.randn(4, 2, 3).double()), "x must be float32, float16 or bfloat16"),
    (lambda: op_ema(index=torch.zeros(4, 2)), "index must be int64 or int32, got Float"),
    (lambda: op_ema(index=torch.full((4, 2), 5)), r"index value 5 is outside \[0, K=5\)"),
    (lambda: op_ema(index=torch.full((4, 2), -1, dtype=torch.int32)), r"index value -1 is outside \[0, K=5\)"),
    (lambda: op_ema(decay=1.0), r"decay must be in \[0, 1\)"),
    (lambda: op_ema(decay=float("nan")), "decay"),
    (lambda: op_ema(eps=0.0), "eps must be finite and > 0"),
    (
        lambda: op_ema(
            keys=big(2**16, 2**15, 1),
            cluster_size=big(2**16, 2**15),
            embed_sum=big(2**16, 2**15, 1),
            x=big(1, 2**16, 1),
            index=big(1, 2**16, dtype=torch.long),
        ),
        "H \\* K = 2147483648 exceeds",
    ),
    (lambda: op_ema(x=big(2**31, 2, 3), index=big(2**31, 2, dtype=torch.long)), "N = 2147483648 exceeds"),
    (
        lambda: op_ema(**{k: v for k, v in ema_inputs(n=1, h=65536, k=1, d=1).items() if k != "decay"}),
        "H = 65536 exceeds the kernels' limit of 65535",
    ),
    (lambda: op_kd(student=torch.randn(4, 7, 1)), r"student must be \[N, V\]"),
    (lambda: op_kd(teacher=torch.randn(4, 8)), "must have one shape"),
    (lambda: op_kd(student=torch.randn(4, 7).double()), "student must be float32, float16 or bfloat16, got Double"),
    (lambda: op_kd(teacher=torch.randint(0, 3, (4, 7))), "teacher must be float32, float16 or bfloat16, got Long"),
    (lambda: op_kd(temperature=0.0), "temperature must be finite and > 0"),
    (lambda: op_kd(temperature=float("inf")), "temperature must be finite and > 0"),
    (lambda: op_kd(mask=torch.ones(4, dtype=torch.uint8)), "mask must be bool, got Byte"),
    (lambda: op_kd(mask=torch.ones(5, dtype=torch.bool)), r"mask must be \[N=4\]"),
    (lambda: op_kd(student=big(2**31, 1), teacher=big(2**31, 1)), "N = 2147483648 exceeds"),
    (lambda: op_kd(student=big(1, 2**31), teacher=big(1, 2**31)), "V = 2147483648 exceeds"),
    # the reduced op validates through the same kernel entry point before it reads the mask
    (lambda: op_kd_reduced(mask=torch.ones(4)), "mask must be bool, got Float"),
    (lambda: op_kd_reduced(reduction="mean"), "reduction must be"),
]


@pytest.mark.parametrize("call,message", DIRECT_BAD_ARGS, ids=[m[:40] for _, m in DIRECT_BAD_ARGS])
def test_direct_op_calls_reject_bad_arguments(call, message):
    """torch.ops.keydistill.* bypass keydistill.ops' Python checks: the C++ entry points raise the shared
    checks' message instead of reading or writing out of bounds (the CUDA entry points run the same code)."""
    from keydistill.ops import _library  # noqa: F401  (loads torch.ops.keydistill)

    with pytest.raises(RuntimeError, match=message):
        call()


def test_direct_op_calls_leave_the_state_alone_on_a_bad_index():
    """The CPU kernel meets an out-of-range index while accumulating: the state must not be half-updated."""
    from keydistill.ops import _library  # noqa: F401

    keys, size, esum = torch.randn(2, 5, 3), torch.ones(2, 5), torch.zeros(2, 5, 3)
    before = [t.clone() for t in (keys, size, esum)]
    index = torch.randint(0, 5, (40, 2))
    index[37, 1] = 5
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.keydistill.ema_update_(keys, size, esum, torch.randn(40, 2, 3), index, 0.9, 1e-5, False)
    assert all(torch.equal(a, b) for a, b in zip(before, (keys, size, esum)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mix needs a second device with kernels: a GPU")
def test_direct_op_calls_reject_a_device_mix():
    """The dispatcher sends a CPU/CUDA mix to the CUDA kernel, which must refuse it before taking a guard."""
    from keydistill.ops import _library  # noqa: F401

    with pytest.raises(RuntimeError, match="keys is on cpu but x is on cuda"):
        torch.ops.keydistill.nearest_key(torch.randn(4, 2, 3, device="cuda"), torch.randn(2, 5, 3))
    with pytest.raises(RuntimeError, match="index is on cpu but keys is on cuda"):
        op_ema(
            keys=torch.randn(2, 5, 3, device="cuda"),
            cluster_size=torch.ones(2, 5, device="cuda"),
            embed_sum=torch.zeros(2, 5, 3, device="cuda"),
            x=torch.randn(4, 2, 3, device="cuda"),
        )
    with pytest.raises(RuntimeError, match="mask is on cpu but student is on cuda"):
        op_kd(
            student=torch.randn(4, 7, device="cuda"),
            teacher=torch.randn(4, 7, device="cuda"),
            mask=torch.ones(4, dtype=torch.bool),
        )


# ---- N = 0 -------------------------------------------------------------------------------------------------


def test_empty_batch(backend):
    device = backend_device(backend)
    index, sqdist = ops.nearest_key(
        torch.randn(0, 3, 12, device=device), torch.randn(3, 5, 12, device=device), backend=backend
    )
    assert (
        index.shape == (0, 3)
        and index.dtype == torch.int64
        and sqdist.shape == (0, 3)
        and sqdist.dtype == torch.float32
    )

    state = [
        torch.randn(3, 5, 12, device=device),
        torch.rand(3, 5, device=device) + 0.5,
        torch.randn(3, 5, 12, device=device),
    ]
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


def test_backends_per_device(monkeypatch):
    """ops.backends(device) lists only backends that run on that device's tensors: on a GPU machine "cpp" is
    available but must not be given CUDA tensors (the benchmarks once did, and every GPU benchmark raised)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a GPU machine reports
    on_cuda = ops.backends("cuda")
    assert "cpp" not in on_cuda and "torch" in on_cuda and "triton" in on_cuda
    assert ("cuda" in on_cuda) == _backends._extension()[0].has_cuda_kernels()
    assert "cuda" not in ops.backends(torch.device("cpu")) and "cpp" in ops.backends("cpu")
    assert set(ops.backends()) >= set(on_cuda) | {"cpp"}


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
    inputs = [
        torch.randn(9, 2, 5),
        torch.randn(2, 13, 5),
        torch.rand(2, 13) + 0.5,
        torch.randn(2, 13, 5),
        torch.randn(9, 4),
        torch.randn(9, 4),
    ]
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
