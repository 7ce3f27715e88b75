"""Guards, on the CPU, for the bug classes a first GPU run meets: tensors created on the CPU inside code that
runs every step (then mixed with CUDA tensors), and host reads that make every step wait for the GPU."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from keydistill.bottleneck import BottleneckConfig, DiscreteKeyBottleneck
from keydistill.losses import DistillationWeights, distillation_loss
from keydistill.ops import _checks, reference

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The code that runs on every training step or op call (model construction, data loading and export build
# on the CPU and move whole modules or batches, so they are not listed).
PER_STEP_MODULES = (
    "keydistill/losses.py",
    "keydistill/bottleneck.py",
    "keydistill/value_lookup.py",
    "keydistill/optim.py",
    "keydistill/ops/*.py",
    "keydistill/ops/triton/*.py",
    "keydistill/train/loop.py",
    "keydistill/train/targets.py",
    "keydistill/train/student.py",
    "keydistill/train/distributed.py",
)
# torch.<name>(...) calls that allocate: each must say device=..., else it lands on the CPU whatever the
# inputs' device. new_*(...) and *_like(...) follow their tensor and are never flagged.
FACTORIES = {
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "tensor",
    "as_tensor",
    "rand",
    "randn",
    "randint",
    "randperm",
    "linspace",
    "eye",
    "scalar_tensor",
}
CONSTRUCTION = {"__init__", "reset_parameters"}  # runs once, before the module moves to its device


def per_step_files() -> list[pathlib.Path]:
    return sorted(p for pattern in PER_STEP_MODULES for p in ROOT.glob(pattern))


def factories_without_device(source: str) -> list[tuple[int, str]]:
    """(line, call) of every torch.<factory>(...) without a device= keyword outside construction code."""
    tree = ast.parse(source)
    skipped = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name in CONSTRUCTION
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        if isinstance(owner, ast.Name) and owner.id == "torch" and node.func.attr in FACTORIES:
            if not any(k.arg == "device" for k in node.keywords):
                found.append((node.lineno, f"torch.{node.func.attr}"))
    return sorted(found)


def host_copies(source: str) -> list[tuple[int, str]]:
    """(line, call) of every .new_tensor(...): host data copied to the device per call."""
    tree = ast.parse(source)
    return [
        (node.lineno, "new_tensor")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "new_tensor"
    ]


@pytest.mark.parametrize("path", per_step_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_per_step_code_copies_no_host_values_to_the_device(path):
    assert not host_copies(path.read_text()), f"{path.relative_to(ROOT)}: {host_copies(path.read_text())}"


def test_the_guard_sees_a_factory_without_a_device():
    source = (
        "import torch\n"
        "class M:\n"
        "    def __init__(self):\n"
        "        self.w = torch.randn(3)\n"  # construction: allowed
        "def loss(x):\n"
        "    a = torch.zeros(())\n"  # flagged
        "    b = torch.zeros((), device=x.device)\n"
        "    return x.new_zeros(()) + torch.zeros_like(x) + a + b\n"
    )
    assert factories_without_device(source) == [(6, "torch.zeros")]
    assert host_copies("def f(rows):\n    return rows.new_tensor(float(rows.shape[0]))\n") == [(2, "new_tensor")]


def test_the_per_step_modules_exist():
    names = {p.relative_to(ROOT).as_posix() for p in per_step_files()}
    assert {"keydistill/losses.py", "keydistill/ops/reference.py", "keydistill/train/loop.py"} <= names


@pytest.mark.parametrize("path", per_step_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_tensor_factory_in_per_step_code_names_its_device(path):
    found = factories_without_device(path.read_text())
    assert not found, "\n".join(f"{path.relative_to(ROOT)}:{line}: {call}(...) without device=" for line, call in found)


# ---- host reads: on a device, per-step code never waits for the device to answer the host ----------------
class HostReads(TorchDispatchMode):
    """Fails at the first read of a tensor's value on the host (.item(), bool(t), int(t), .tolist()). Run on
    meta tensors, which stand for a GPU's: code that is free to read on the CPU must take its device path
    there. (Host values copied to the device, as new_tensor does, pass no dispatch mode: the source guard
    below catches those.)"""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a tensor's value is read on the host")
        return func(*args, **(kwargs or {}))


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_the_host_read_guard_sees_reads_and_copies():
    x = meta(3)
    with HostReads(), pytest.raises(AssertionError, match="read on the host"):
        bool(x.sum() > 0)
    with HostReads():
        (x * 2).sum() / 3  # plain device maths passes


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_kd_loss_and_its_chunked_linear_form_read_nothing_on_the_host(reduction, masked):
    n, h, v = 6, 4, 5
    mask = meta(n, dtype=torch.bool) if masked else None
    student = meta(n, v).requires_grad_()
    hidden, weight = meta(n, h).requires_grad_(), meta(v, h).requires_grad_()
    with HostReads():
        reference.kd_loss(student, meta(n, v), temperature=2.0, mask=mask, reduction=reduction).sum().backward()
        loss = reference.kd_loss_linear(hidden, weight, meta(n, v), mask=mask, reduction=reduction, chunk_size=4)
        loss.sum().backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


def test_sparse_adamw_checks_read_nothing_on_the_host():
    param, rows = meta(8, 3), torch.empty(4, dtype=torch.int64, device="meta")
    with HostReads():
        _checks.check_sparse_adamw(param, meta(8, 3), meta(8, 3), rows, meta(4, 3), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
        _checks.check_ema_update(
            meta(2, 4, 3), meta(2, 4), meta(2, 4, 3), meta(5, 2, 3), rows.new_empty(5, 2), 0.99, 1e-5
        )


def test_the_dead_key_restart_reads_nothing_on_the_host():
    bottleneck = DiscreteKeyBottleneck(8, BottleneckConfig(num_heads=2, num_keys=4)).to("meta")
    with HostReads(), torch.no_grad():
        bottleneck._restart_dead_keys(meta(5, 2, 4))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_every_loss_term_lives_on_the_logits_device(device):
    """Without a bottleneck (--keys none) the aux term is a zero the loop stacks with the others."""

    class Output:
        logits = torch.randn(4, 3, device=device)
        task_loss = torch.tensor(0.5, device=device)
        aux_loss = None

    features = torch.randn(4, 8, device=device)
    terms = distillation_loss(
        Output, torch.randn(4, 3, device=device), features, features + 1, DistillationWeights(0.5, 2.0, 1.0)
    )
    assert {t.device.type for t in terms.values()} == {torch.device(device).type}
    torch.stack(list(terms.values()))  # what the training loop does with them
