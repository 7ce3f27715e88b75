"""Running keydistill in a fresh interpreter where PyTorch looks uninstalled, as on a machine that serves an
.onnx file without it: a sitecustomize.py (run at interpreter start) wraps every import finder so that torch
and its submodules are not found. `import torch` raises ModuleNotFoundError and importlib.util.find_spec("torch")
is None, as without the package (libraries such as datasets probe for torch with find_spec)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BLOCK_TORCH = """
import sys
class HideTorch:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)
sys.meta_path[:] = [HideTorch(finder) for finder in sys.meta_path]
"""


def torchless_env(folder: Path) -> dict[str, str]:
    """The environment of an interpreter that cannot import torch: the blocker is written to `folder`, which
    comes first on PYTHONPATH (then this checkout, for keydistill)."""
    (folder / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {"PYTHONPATH": f"{folder}:{REPO}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError: No module named 'torch'" in check.stderr, check.stderr  # the blocker works
    return env


def run_without_torch(args: list[str], folder: Path, *, stdin: str | None = None, timeout: float = 120):
    """`python ARGS` where importing torch fails; the CompletedProcess (text stdout and stderr)."""
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        env=torchless_env(folder),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=folder,
    )
