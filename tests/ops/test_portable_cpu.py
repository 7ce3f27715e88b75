"""The portable (non-AVX2) paths of the C++ CPU kernels, checked on this AVX2 machine.

KEYDISTILL_DISABLE_AVX2=1 makes the kernels take their plain C++ paths (what an ARM or pre-AVX2 x86 machine
runs). The choice is made once per process, so the shared kernel tests run again in a child process with
the variable set, on the cpp backend only. Like every cpp test, these fail (never skip) without keydistill._C.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).parent


def run_child(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_the_switch_selects_the_portable_paths():
    code = "import keydistill.ops._library, torch; print(torch.ops.keydistill.cpu_simd())"
    assert run_child(code, {"KEYDISTILL_DISABLE_AVX2": "1"}).stdout.strip() == "portable"
    expected = "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "portable"
    assert run_child(code, {"KEYDISTILL_DISABLE_AVX2": "0"}).stdout.strip() == expected


def test_portable_kernels_match_float64():
    # Both nearest_key tilings (small and large d), exact ties, both kd_loss row paths, fp16 widening, and the
    # non-finite logits (the AVX2 and portable paths handle -inf, NaN and +inf apart).
    selection = (
        "cpp and (nearest_key_matches or exact_ties or many_query_tiles or nearest_key_low_precision "
        "or kd_loss_matches or kd_loss_extreme or kd_loss_low_precision or minus_inf or nan_and_plus_inf "
        "or issue_example)"
    )
    files = [str(TESTS / "test_ops_kernels.py"), str(TESTS / "test_ops_nonfinite.py")]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", selection],
        env={**os.environ, "KEYDISTILL_DISABLE_AVX2": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        cwd=TESTS.parents[1],
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "deselected" in result.stdout
