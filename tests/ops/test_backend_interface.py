"""One op interface: every backend module answers the same calls, and the public ops never ask which."""

import ast
import inspect
import pathlib

import pytest
import torch

from keydistill import ops
from keydistill.ops import _backends

ROOT = pathlib.Path(__file__).resolve().parents[2]


def interface_parameters(op: str) -> list[str]:
    return list(inspect.signature(getattr(_backends.Backend, op)).parameters)[1:]  # without self


@pytest.mark.parametrize("backend", _backends.ALL)
def test_each_backend_module_has_every_op_it_does_not_lack_with_one_signature(backend):
    module = _backends._load(backend)
    assert _backends.OPS == ("nearest_key", "ema_update_", "kd_loss", "kd_loss_rows", "sparse_adamw_")
    for op in _backends.OPS:
        if op in _backends.LACKS.get(backend, ()):
            continue
        assert callable(getattr(module, op, None)), f"backend {backend!r} ({module.__name__}) has no {op}"
        assert list(inspect.signature(getattr(module, op)).parameters) == interface_parameters(op), (
            f"{module.__name__}.{op} takes {inspect.signature(getattr(module, op))}, the interface "
            f"{inspect.signature(getattr(_backends.Backend, op))}"
        )


def test_lacks_names_only_real_backends_and_ops():
    assert set(_backends.LACKS) <= set(_backends.ALL)
    assert all(set(lacked) <= set(_backends.OPS) for lacked in _backends.LACKS.values())
    assert not _backends.LACKS.get("torch"), "the torch backend runs every op: auto's last resort"


def test_the_public_ops_never_branch_on_a_backends_name():
    """check -> resolve -> call: no comparison with a backend's name in keydistill/ops/__init__.py."""
    tree = ast.parse((ROOT / "keydistill" / "ops" / "__init__.py").read_text())
    names = set(_backends.ALL)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            constants = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
            assert not constants & names, f"line {node.lineno} compares with a backend name"


def test_an_op_a_backend_lacks_is_refused_on_request_and_skipped_by_auto(monkeypatch):
    p, m, v = torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2)
    rows, grad = torch.tensor([1, 3]), torch.ones(2, 2)
    scalars = dict(lr=0.1, step=1)
    monkeypatch.setitem(_backends.LACKS, "cpp", ("sparse_adamw_",))
    _backends._resolve.cache_clear()
    try:
        with pytest.raises(ops.BackendUnavailable, match="sparse_adamw_ has torch backends only"):
            ops.sparse_adamw_(p, m, v, rows, grad, **scalars, backend="cpp")
        assert _backends.resolve("sparse_adamw_", "auto", p.device) == "torch"
        ops.sparse_adamw_(p, m, v, rows, grad, **scalars)
        assert p[1].abs().sum() > 0 and p[0].abs().sum() == 0
    finally:
        _backends._resolve.cache_clear()


def test_triton_lacks_sparse_adamw_and_says_which_backends_have_it():
    with pytest.raises(ops.BackendUnavailable, match="sparse_adamw_ has cpp and torch backends only"):
        _backends.resolve("sparse_adamw_", "triton", torch.device("cpu"))
