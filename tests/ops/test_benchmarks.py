"""What a CPU can check of the benchmarks' own logic (benchmarks/ are not tests: they time and assert ratios)."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name: str):
    """benchmarks/<name>.py with benchmarks/conftest.py as its `conftest` (tests/ has its own)."""
    saved = sys.modules.get("conftest")
    spec = importlib.util.spec_from_file_location("bench_conftest", os.path.join(BENCH, "conftest.py"))
    conftest = sys.modules["bench_conftest"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(conftest)
    sys.modules["conftest"] = conftest
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("conftest", None)
        else:
            sys.modules["conftest"] = saved
    return module


@pytest.fixture(scope="module")
def bench_ops():
    return _load("test_bench_ops")


def test_op_benchmarks_fail_without_the_backend_their_targets_are_for(bench_ops, monkeypatch):
    """With keydistill._C missing, the CPU op benchmarks timed the torch backend alone and asserted nothing."""
    assert bench_ops.missing_target_backends(["cuda", "triton", "cpp", "torch"]) == []
    assert [m.split(" ")[0] for m in bench_ops.missing_target_backends(["torch"])] == list(bench_ops.TARGET_BACKENDS)
    monkeypatch.setattr(bench_ops, "BACKENDS", ["torch"])
    with pytest.raises(AssertionError, match="no target backend"):
        bench_ops.require_target_backends()


def test_nearest_key_benchmark_without_faiss_keeps_its_other_baselines(bench_ops, monkeypatch):
    """A missing faiss skipped the whole nearest_key benchmark, and with it the cpp backend's 10x targets
    against cdist and baddbmm; now only the faiss baseline is left out, with a note under the table."""
    import torch

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    x, keys = torch.randn(8, 2, 4), torch.randn(2, 16, 4)
    baselines, labels = bench_ops.nearest_baselines(x, keys, "tiny")
    assert set(baselines) == set(labels) == {bench_ops.CDIST, bench_ops.BADDBMM}
    assert baselines[bench_ops.CDIST]().shape == (2, 8)
    assert (
        "nearest_key tiny faiss.knn: skipped, faiss is not installed (pip install faiss-cpu)"
        in sys.modules["bench_conftest"].NOTES
    )
