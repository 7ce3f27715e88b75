"""The CUDA half of keydistill._C is built wherever it can be, and the extension loads where there is no GPU.

CI machines have nvcc and a CUDA build of torch but no GPU. There the CUDA sources must have compiled (for
sm_80 and sm_90), and the installed extension must carry a CUDA kernel for every op: a build that silently
dropped them fails here rather than skipping. Whether the kernels compute the right thing is checked on a GPU
by the shared backend tests, which benchmarks/gpu_check.py runs; its own logic is tested at the end.
"""

import ast
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from keydistill.ops import _library

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _truthy(name: str) -> bool:  # as setup.py reads its switches
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def setup_find_cuda_home():
    """setup.py's own find_cuda_home (PATH, CUDA_HOME, /usr/local/cuda*), run without running setup()."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    (function,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "find_cuda_home"]
    namespace = {"glob": glob, "os": os, "shutil": shutil}
    exec(compile(ast.Module([function], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace["find_cuda_home"]()


# setup.py builds the CUDA kernels exactly when torch is a CUDA build, it finds a toolkit and nobody opted
# out; KEYDISTILL_REQUIRE_CUDA=1 (CI) expects them whatever this machine has, so a CPU-only torch fails
# instead of skipping.
REQUIRE_CUDA = _truthy("KEYDISTILL_REQUIRE_CUDA")
CUDA_EXPECTED = REQUIRE_CUDA or (
    torch.version.cuda is not None and setup_find_cuda_home() is not None and not _truthy("KEYDISTILL_SKIP_CUDA")
)
needs_cuda_build = pytest.mark.skipif(
    not CUDA_EXPECTED, reason="no CUDA build expected: torch without CUDA, no nvcc, or KEYDISTILL_SKIP_CUDA=1"
)


def test_the_toolkit_is_found_where_setup_py_finds_it(tmp_path, monkeypatch):
    """A toolkit outside the PATH (a fresh image's /usr/local/cuda) counts as setup.py counts it."""
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert shutil.which("nvcc") is None and setup_find_cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    assert setup_find_cuda_home() in (None, "/usr/local/cuda") or setup_find_cuda_home().startswith("/usr/local/cuda-")


def test_extension_loads_without_a_gpu():
    """Loading _C (CUDA kernels included) needs the CUDA runtime library, never a device."""
    probe = (
        "import torch; from keydistill.ops import _library as L; assert not torch.cuda.is_available(); "
        "print(all(L.has_kernel(op, 'CPU') for op in L.OPS), L.has_cuda_kernels())"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cpu_kernels, cuda_kernels = result.stdout.split()
    assert cpu_kernels == "True", "an op lacks its CPU kernel"
    assert cuda_kernels == str(CUDA_EXPECTED), f"CUDA kernels present: {cuda_kernels}, expected: {CUDA_EXPECTED}"


@pytest.mark.gpu
@needs_cuda_build
def test_every_op_has_a_cuda_kernel():
    assert torch.version.cuda is not None, "KEYDISTILL_REQUIRE_CUDA=1 but torch is a CPU-only build"
    missing = [op for op in _library.OPS if not _library.has_kernel(op, "CUDA")]
    assert not missing, (
        f"keydistill._C ({_library._C.__file__}) has no CUDA kernel for {missing}: reinstall with "
        "nvcc on the PATH and KEYDISTILL_REQUIRE_EXT=1 to see why the CUDA sources did not build"
    )


def _cuobjdump():
    """cuobjdump from the PATH, a CUDA toolkit, or the copy Triton ships; None if there is none."""
    triton_spec = importlib.util.find_spec("triton")
    candidates = [shutil.which("cuobjdump")] + sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))
    if triton_spec and triton_spec.submodule_search_locations:
        candidates += [
            os.path.join(p, "backends", "nvidia", "bin", "cuobjdump") for p in triton_spec.submodule_search_locations
        ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _expected_architectures() -> set:
    """What setup.py compiles for: TORCH_CUDA_ARCH_LIST if set, else this GPU's, else its default 8.0;9.0."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        return {"sm_" + a.replace("+PTX", "").replace(".", "") for a in re.split(r"[;\s]+", arch_list.strip()) if a}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return {f"sm_{major}{minor}"}
    return {"sm_80", "sm_90"}


@pytest.mark.gpu
@needs_cuda_build
def test_cuda_code_is_built_for_the_target_architectures():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to list the extension's device code")
    listing = subprocess.run([tool, "--list-elf", _library._C.__file__], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    built = set(re.findall(r"\.(sm_\d+a?)\.cubin", listing.stdout))
    expected = _expected_architectures()
    assert expected <= built, f"device code for {sorted(built)}, expected {sorted(expected)}"


def test_ci_runs_the_readme_test_command_in_a_fresh_environment_and_requires_cuda():
    """.ci/run tests what a newcomer's install gets: a new virtual environment, the README's test command
    verbatim, and a build that must carry its CUDA kernels."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme_command = next(line.strip() for line in f if "python -m pytest tests/" in line and "pip install" in line)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        script = f.read()
    assert readme_command in script.splitlines()
    assert "export KEYDISTILL_REQUIRE_EXT=1" in script and "export KEYDISTILL_REQUIRE_CUDA=1" in script
    assert re.search(r"-m venv ", script) and re.search(r"source .*/bin/activate", script)


def _function_body(text: str, name: str) -> str:
    start = text.index("{", re.search(rf"\b{name}\(", text).start())
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    raise ValueError(name)


def test_cuda_sources_check_every_launch_and_validate_every_entry_point():
    """What a read-through of csrc/cuda looks for, checked without a GPU: every kernel launch is followed by
    C10_CUDA_KERNEL_LAUNCH_CHECK (a bad launch configuration raises at its call, not at some later sync), and
    every op entry point runs the shared argument checks of csrc/checks.h, then takes a CUDAGuard on its
    tensors' device, before it allocates or launches anything."""
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert sources
    for path in sources:
        with open(path) as f:
            text = f.read()
        for launch in re.finditer(r">>>\(", text):
            after = text[text.index(";", launch.end()) + 1 :].lstrip()
            assert after.startswith("C10_CUDA_KERNEL_LAUNCH_CHECK();"), (
                f"{path}: unchecked launch at offset {launch.start()}"
            )
        for entry in re.findall(r"m\.impl\(\"\w+\", &keydistill::cuda::(\w+)\)", text):
            body = _function_body(text, entry)
            guard = body.index("CUDAGuard")
            assert "checks::" in body[:guard], f"{path}: {entry} takes its device guard before the shared checks"
            assert "at::empty" not in body[:guard] and "<<<" not in body[:guard], (
                f"{path}: {entry} works before its guard"
            )


# ---- benchmarks/gpu_check.py, as far as a CPU can check it -----------------------------------------------
def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_plans_build_tests_benchmarks_and_smoke_within_budget(tmp_path):
    command = [sys.executable, os.path.join("benchmarks", "gpu_check.py"), "--dry-run", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split("]")[0].lstrip("["): line for line in result.stdout.splitlines() if line.startswith("[")}
    assert list(lines) == ["build", "device", "tests-kernels", "tests-gpu", "benchmarks", "smoke"]
    assert "KEYDISTILL_REQUIRE_EXT=1" in lines["build"] and "build_ext --inplace" in lines["build"]
    assert "tests/ops/test_triton.py" in lines["build"]  # the Triton cache is warmed beside the build
    assert "has_cuda_kernels()" in lines["device"]
    assert "pytest" in lines["tests-kernels"] and " tests/ops -m gpu " in lines["tests-kernels"]
    assert " tests -m gpu --ignore=tests/ops " in lines["tests-gpu"]
    assert (
        "pytest" in lines["benchmarks"]
        and "-s benchmarks/test_bench_ops.py benchmarks/test_bench_e2e.py" in lines["benchmarks"]
    )
    assert "-m keydistill.train " in lines["smoke"] and "--max-train-samples 2000" in lines["smoke"]
    assert "--device cuda" in lines["smoke"] and "--overwrite-output-dir" in lines["smoke"]
    module = _gpu_check()
    limits = [step.limit_s for step in module.steps(str(tmp_path))]
    assert sum(limits) + module.GRACE_S < module.BUDGET_S < 8 * 60  # every step can use its whole limit
    assert f"steps' limits {sum(limits)} s, within the overall budget of {module.BUDGET_S} s" in result.stdout
    assert not list(tmp_path.iterdir()), "a dry run must not write anything"


def test_gpu_check_dry_run_fails_a_plan_over_budget(tmp_path, monkeypatch, capsys):
    module = _gpu_check()
    monkeypatch.setattr(module, "BUDGET_S", 100)
    assert module.main(["--dry-run", "--out", str(tmp_path)]) == 1
    assert "OVER the overall budget of 100 s" in capsys.readouterr().out


GPU_MARKED_FILES = ("tests/ops/test_ops_kernels.py", "tests/ops/test_triton.py", "tests/ops/test_device_guards.py")


def test_the_gpu_marker_selects_the_tests_that_touch_the_gpu(request):
    """Tests with a cuda or triton parameter, and test_triton.py's, carry the `gpu` marker gpu_check runs."""
    config = request.config
    assert any(line.startswith("gpu:") for line in config.getini("markers"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", *GPU_MARKED_FILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert ids and all("[" in i or "test_triton.py" in i or "test_cuda_build.py" in i for i in ids), ids[:5]
    assert any("test_triton.py::" in i for i in ids) and any("-triton" in i or "[triton" in i for i in ids)
    assert not any("-torch]" in i or "[torch]" in i or "-cpp]" in i or "[cpp]" in i for i in ids)


def test_gpu_check_steps_report_pass_fail_and_timeout(tmp_path, monkeypatch):
    module = _gpu_check()
    monkeypatch.setattr(module, "MIN_STEP_S", 0.5)

    def run(name, code, seconds_left=30):
        return module.run_step(module.Step(name, [sys.executable, "-c", code], 30), str(tmp_path), seconds_left)

    assert run("ok", "print('hi')")[0] == "ok"
    assert run("bad", "raise SystemExit(3)")[0] == "failed (rc=3)"
    status, seconds = run("slow", "import time; time.sleep(60)", seconds_left=1)
    assert status == "timed out (1 s)" and seconds < 30
    assert run("late", "print()", seconds_left=0.1)[0] == "no time"
    assert (tmp_path / "ok.log").read_text() == "hi\n"


def test_gpu_check_summary_counts_tests_per_backend(tmp_path):
    cases = [
        ("test_nearest_key[cuda-float32]", ""),
        ("test_nearest_key[cuda-bfloat16]", "<failure message='x'/>"),
        ("test_kd_loss[triton-4.0]", "<skipped message='y'/>"),
        ("test_ema[cpp]", "<error message='z'/>"),
        ("test_readme", ""),
        ("test_cudagraph[torch]", ""),
    ]  # the last: 'cuda' in the name, not a parameter
    body = "".join(f'<testcase classname="tests.t" name="{name}">{extra}</testcase>' for name, extra in cases)
    (tmp_path / "tests-kernels.xml").write_text(f"<testsuites><testsuite>{body}</testsuite></testsuites>")
    more = '<testcase classname="tests.m" name="test_model[cuda]"/>'
    (tmp_path / "tests-gpu.xml").write_text(f"<testsuites><testsuite>{more}</testsuite></testsuites>")
    module = _gpu_check()
    counts = module.tests_by_backend(str(tmp_path / "tests-kernels.xml"))
    assert counts["cuda"] == {"passed": 1, "failure": 1}
    assert counts["triton"] == {"skipped": 1} and counts["cpp"] == {"error": 1}
    assert counts["torch"] == {"passed": 1} and counts["other"] == {"passed": 1}
    text = module.summary(str(tmp_path), [("build", "ok", 61.0), ("tests", "failed (rc=1)", 90.0)])
    assert re.search(r"^cuda\s+2\s+1\s+0\s+0$", text, re.M), text  # both reports counted
    assert re.search(r"^build\s+ok\s+61$", text, re.M), text


def test_gpu_check_benchmarks_are_the_gpu_side_ones_kernels_first():
    """The benchmarks step runs the op benchmarks first (they time the kernels this check is for) and leaves
    out test_bench_inference.py: CPU models on one thread, with SST-2 from outside the repository, which a lent
    GPU machine lacks (it would fail the step, and its minute or more would come out of the op benchmarks' time)."""
    module = _gpu_check()
    assert module.GPU_BENCHMARKS[0] == "benchmarks/test_bench_ops.py"
    found = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "benchmarks", "test_*.py"))}
    assert set(module.GPU_BENCHMARKS) <= found
    assert found - set(module.GPU_BENCHMARKS) == {"benchmarks/test_bench_inference.py"}
    with open(os.path.join(ROOT, "benchmarks", "test_bench_inference.py")) as f:
        assert "DEVICE" not in f.read(), "the inference benchmark now uses the GPU: add it to GPU_BENCHMARKS"
    (step,) = [s for s in module.steps("/nonexistent") if s.name == "benchmarks"]
    assert step.argv[-len(module.GPU_BENCHMARKS) :] == list(module.GPU_BENCHMARKS)
