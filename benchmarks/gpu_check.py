"""The prepared GPU check: one call of at most 8 minutes on one H100 or H200 (16 CPU cores).

Steps, each with its own time limit, the limits adding up to less than the overall budget:
  build          keydistill._C with its CUDA kernels, for this GPU alone; the Triton kernels are compiled
                 (their cache warmed) by a run of tests/ops/test_triton.py beside it, which loads no _C
  device         the GPU, torch, Triton and the backends CUDA tensors get
  tests-kernels  the op tests on the CUDA and Triton backends (tests/ops, marker `gpu`)
  tests-gpu      the other tests that touch the GPU (marker `gpu`; the rest of the suite is CPU work)
  benchmarks     the GPU-side benchmarks, the kernels' first
  smoke          the main job on the GPU for about two minutes (--max-train-samples 2000)
One summary line per step, then the tests per backend and the benchmarks' tables. From the repository root:

    python3 benchmarks/gpu_check.py             # logs and the table under $OUT (else /tmp/keydistill_gpu_check)
    python3 benchmarks/gpu_check.py --dry-run   # print the plan and run nothing (works without a GPU)

The smoke run reads GLUE from $KEYDISTILL_GLUE_DIR, else ../shared/data/glue or shared/data/glue.
Exit status 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 465  # the whole check, build included; the limit of one call is 8 minutes = 480 s
MIN_STEP_S = 10  # a step is not started with less time than this left
GRACE_S = 5  # a timed-out step's time to report after Ctrl-C (inside the 15 s the budget leaves)
BACKENDS = ("cuda", "triton", "cpp", "torch")
JUNIT_FILES = ("tests-kernels.xml", "tests-gpu.xml")
GPU_BENCHMARKS = ("benchmarks/test_bench_ops.py", "benchmarks/test_bench_e2e.py")  # in this order
SMOKE_SAMPLES = 2000


@dataclasses.dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: int
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def glue_dir() -> str:
    candidates = [os.environ.get("KEYDISTILL_GLUE_DIR"), os.path.join(ROOT, "..", "shared", "data", "glue")]
    candidates.append(os.path.join(ROOT, "shared", "data", "glue"))
    return next((os.path.normpath(c) for c in candidates if c and os.path.isdir(c)), os.path.normpath(candidates[1]))


def build_with_triton_warmup(py: str, out: str) -> list[str]:
    """setup.py build_ext beside a Triton test run that compiles the Triton kernels into the cache; the
    build's status is the step's (the Triton tests' outcome is tests-kernels' to report)."""
    warm = f"{py} -m pytest -q -p no:cacheprovider tests/ops/test_triton.py > {os.path.join(out, 'triton-warm.log')}"
    script = f"{warm} 2>&1 & warm=$!; {py} setup.py build_ext --inplace; rc=$?; wait $warm; exit $rc"
    return ["bash", "-c", script]


def steps(out: str) -> list[Step]:
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    junit = [f"--junitxml={os.path.join(out, name)}" for name in JUNIT_FILES]
    probe = (
        "import torch, triton; from keydistill.ops import _library, backends; "
        "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', "
        "triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability()); "
        "assert _library.has_cuda_kernels(), 'no CUDA kernels in keydistill._C'; "
        "print('backends for CUDA tensors:', backends('cuda'))"
    )
    smoke = [py, "-m", "keydistill.train", "--data-dir", glue_dir(), "--device", "cuda"]
    smoke += ["--max-train-samples", str(SMOKE_SAMPLES), "--output-dir", os.path.join(out, "smoke")]
    smoke += ["--overwrite-output-dir"]  # a second check on a warm machine replaces the first one's run
    return [
        # In place, so tests and benchmarks import the fresh build from the repository root. With a GPU present
        # and TORCH_CUDA_ARCH_LIST unset, torch builds for that GPU's architecture alone (the quickest build).
        Step(
            "build",
            build_with_triton_warmup(py, out),
            120,
            {"MAX_JOBS": "16", "KEYDISTILL_REQUIRE_EXT": "1", "KEYDISTILL_PTXAS_VERBOSE": "1"},
        ),
        Step("device", [py, "-c", probe], 15),
        Step("tests-kernels", pytest + ["tests/ops", "-m", "gpu", junit[0]], 90),
        Step("tests-gpu", pytest + ["tests", "-m", "gpu", "--ignore=tests/ops", junit[1]], 30),
        # The GPU-side benchmarks only, the kernels' first: test_bench_inference.py times CPU models (one thread,
        # ONNX Runtime) and reads SST-2 from outside the repository, which a lent machine does not have.
        Step("benchmarks", pytest + ["-s", *GPU_BENCHMARKS], 90),
        Step("smoke", smoke, 110),
    ]


def run_step(step: Step, out: str, seconds_left: float) -> tuple[str, float]:
    """Run one step with its output in OUT/<name>.log; (status, seconds)."""
    limit = min(step.limit_s, seconds_left)
    if limit < MIN_STEP_S:
        return "no time", 0.0
    python_path = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path, **step.env}
    start = time.monotonic()
    with open(os.path.join(out, f"{step.name}.log"), "w") as log:
        # A session of its own: a step's children (the build's Triton warm-up) are stopped with it.
        process = subprocess.Popen(
            step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = process.wait(timeout=limit)
            status = "ok" if rc == 0 else f"failed (rc={rc})"
        except subprocess.TimeoutExpired:
            # Ctrl-C first: pytest then still reports what ran (and writes its JUnit file); kill if it lingers.
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            status = f"timed out ({limit:.0f} s)"
    return status, time.monotonic() - start


def tests_by_backend(junit_xml: str) -> dict[str, collections.Counter]:
    """Outcome counts per backend (from the test id's parameters) in a pytest JUnit XML report."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        params = re.search(r"\[(.*)\]$", case.get("name", ""))
        backend = next((b for b in BACKENDS if params and re.search(rf"(^|-){b}(-|$)", params.group(1))), "other")
        outcome = next((tag for tag in ("failure", "error", "skipped") if case.find(tag) is not None), "passed")
        counts[backend][outcome] += 1
    return counts


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(out: str, results: list[tuple[str, str, float]]) -> str:
    parts = [table([["step", "status", "seconds"]] + [[n, s, f"{t:.0f}"] for n, s, t in results])]
    reports = [os.path.join(out, name) for name in JUNIT_FILES if os.path.exists(os.path.join(out, name))]
    if reports:
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for report in reports:
            for backend, outcome_counts in tests_by_backend(report).items():
                counts[backend].update(outcome_counts)
        outcomes = ("passed", "failure", "error", "skipped")
        rows = [[b, *(str(counts[b][o]) for o in outcomes)] for b in (*BACKENDS, "other") if b in counts]
        parts.append(table([["tests", *outcomes]] + rows))
    bench_log = os.path.join(out, "benchmarks.log")
    if os.path.exists(bench_log):  # the benchmarks print their own tables: keep their last lines
        with open(bench_log) as f:
            parts.append("benchmarks (tail of benchmarks.log):\n" + "".join(f.readlines()[-60:]).rstrip())
    return "\n\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    default_out = os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "keydistill_gpu_check")
    parser.add_argument("--out", default=default_out, help=f"folder for logs and the table (default: {default_out})")
    args = parser.parse_args(argv)
    plan = steps(args.out)
    if args.dry_run:
        for step in plan:
            env = " ".join(f"{k}={v}" for k, v in step.env.items())
            print(f"[{step.name}] limit {step.limit_s} s: {env + ' ' if env else ''}{' '.join(step.argv)}")
        total = sum(step.limit_s for step in plan)
        verdict = "within" if total < BUDGET_S else "OVER"
        print(f"steps' limits {total} s, {verdict} the overall budget of {BUDGET_S} s; logs to {args.out}")
        return 0 if total < BUDGET_S else 1
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S
    results = []
    for step in plan:
        status, seconds = run_step(step, args.out, deadline - time.monotonic())
        results.append((step.name, status, seconds))
        print(f"[{step.name}] {status} in {seconds:.0f} s (limit {step.limit_s} s)", flush=True)
        if status != "ok":
            with open(os.path.join(args.out, f"{step.name}.log")) as f:
                print("".join(f.readlines()[-25:]), flush=True)
            if step.name in ("build", "device"):  # nothing after these can run without them
                break
    text = summary(args.out, results)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print("\n" + text + f"\n\nlogs: {args.out}")
    return 0 if len(results) == len(plan) and all(s == "ok" for _, s, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
