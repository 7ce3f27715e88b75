"""Guards, on the CPU, for the bug classes a first GPU run meets: tensors created on the CPU inside code that
runs every step (then mixed with CUDA tensors), and host reads that make every step wait for the GPU."""

from __future__ import annotations

import ast
import pathlib

import pytest

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


def test_the_per_step_modules_exist():
    names = {p.relative_to(ROOT).as_posix() for p in per_step_files()}
    assert {"keydistill/losses.py", "keydistill/ops/reference.py", "keydistill/train/loop.py"} <= names


@pytest.mark.parametrize("path", per_step_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_tensor_factory_in_per_step_code_names_its_device(path):
    found = factories_without_device(path.read_text())
    assert not found, "\n".join(f"{path.relative_to(ROOT)}:{line}: {call}(...) without device=" for line, call in found)
