"""Shared test setup: which backends to test, and on which device.

Every backend that should exist on this machine is tested, and a missing one fails its tests rather
than skipping: cpp always (the build must produce keydistill._C), triton always (on the CPU through the
interpreter, at small shapes), cuda whenever a GPU is present.
"""

import os

import pytest
import torch

from tests.helpers.backends import KERNEL_BACKENDS

GPU_PARAMETERS = ("cuda", "triton")  # backend or device parameters that put a test's tensors on a GPU
GPU_FILES = ("test_triton.py",)  # on its GPU wherever there is one (tests.helpers.backends)


def pytest_collection_modifyitems(items):
    """Mark `gpu` every test that touches the GPU where there is one, so benchmarks/gpu_check.py can run just
    those (`-m gpu`) rather than the whole, mostly CPU-bound, suite."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.path.name in GPU_FILES or any(value in GPU_PARAMETERS for value in params.values()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(params=KERNEL_BACKENDS + ["torch"])
def backend(request):
    """Every backend, the torch fallback included."""
    return request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """Every compiled/JIT backend (not the torch fallback)."""
    return request.param


@pytest.fixture
def seed():
    """A fresh seed per test, printed so a failure can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BERT with its tokenizer, and tiny GLUE folders (the training-job tests)."""
    from tests.helpers.train_fixtures import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))
