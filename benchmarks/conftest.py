"""Timing and memory helpers for the op benchmarks, and the table printed at the end of `pytest benchmarks/`.

Time: wall clock (torch.cuda.synchronize around each call on a GPU); one warm-up call, then `repeats`
(at least MIN_SAMPLES = 5) timed samples, interleaved across the providers of one shape (round after round),
so that a change in the machine's load hits baselines and backends alike; the table shows the median and
the min-max spread.
Ratios are baseline median / backend median, both measured in the same rounds.

Peak extra memory, the most memory the call held at once beyond what existed before it:
- CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the call (exact, caching allocator).
- CPU: the peak resident set size of the process during the call minus the resident size before it. Linux
  lets a process reset its peak (write 5 to /proc/self/clear_refs, then read VmHWM from /proc/self/status);
  free heap memory is handed back first (malloc_trim) so that reused pages do not hide an allocation. Pages
  count once touched, which is what physically costs memory. Allocations much under a page-granular MiB are
  below this method's resolution, so memory targets are only asserted where the baseline uses > 16 MiB.
It is measured on the warm-up call, so it never disturbs the timed calls.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass

import pytest
import torch

ROWS: list["Row"] = []
NOTES: list[str] = []  # printed under the table: baselines skipped, and why
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MIN_SAMPLES = 5  # a median of fewer samples is one unlucky sample away from a wrong ratio


@dataclass
class Row:
    op: str
    shape: str
    provider: str
    median_s: float
    spread_s: tuple[float, float]
    peak_bytes: int | None
    ratio: float | None = None  # baseline median / this median (> 1: faster than the baseline)
    target: str = ""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _cpu_peak_extra(fn) -> int | None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except OSError:  # not Linux, or no permission: report no figure rather than a wrong one
        fn()
        return None
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def _cuda_peak_extra(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _timed(fn, cuda: bool, number: int = 1) -> float:
    """Seconds per call, over a block of `number` back-to-back calls."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / number


def available_memory_bytes() -> int:
    """Memory a new allocation can take now: free GPU memory, or the kernel's MemAvailable estimate."""
    if DEVICE.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    return _meminfo_kib("MemAvailable") * 1024


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def skip_note(what: str, reason: str) -> None:
    """Record (and print, under -s) a baseline that was not timed."""
    NOTES.append(f"{what}: skipped, {reason}")
    print(f"\n{what}: skipped, {reason}")


def measure_group(op: str, shape: str, providers: dict, repeats: int = MIN_SAMPLES, number: int = 1) -> dict[str, Row]:
    """Time every provider on the same inputs and record a row each.

    Each provider gets one warm-up call that also measures its peak memory; then the timed samples run in
    rounds, one sample of every provider per round, so a change in the machine's load hits all alike. A
    sample is a block of `number` calls (timeit's method): microsecond-scale calls need blocks, or the
    timer's resolution and a cold cache after the other providers' turn dominate what is measured.
    """
    if repeats < MIN_SAMPLES:
        raise ValueError(f"timed medians need at least {MIN_SAMPLES} samples, got repeats={repeats}")
    cuda = DEVICE.type == "cuda"
    peaks = {name: _cuda_peak_extra(fn) if cuda else _cpu_peak_extra(fn) for name, fn in providers.items()}
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            times[name].append(_timed(fn, cuda, number))
    rows = {}
    for name, ts in times.items():
        rows[name] = Row(op, shape, name, statistics.median(ts), (min(ts), max(ts)), peaks[name])
        ROWS.append(rows[name])
    return rows


def measure(op: str, shape: str, provider: str, fn, repeats: int = MIN_SAMPLES) -> Row:
    """measure_group for a single provider."""
    return measure_group(op, shape, {provider: fn}, repeats)[provider]


def compare(rows: list[Row], baseline: Row) -> None:
    for row in rows:
        row.ratio = baseline.median_s / row.median_s


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _fmt_bytes(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    header = ("op", "shape", "provider", "median", "spread (min-max)", "vs baseline", "peak extra mem", "target")
    lines = [header] + [
        (
            r.op,
            r.shape,
            r.provider,
            _fmt_time(r.median_s),
            f"{_fmt_time(r.spread_s[0])} - {_fmt_time(r.spread_s[1])}",
            "" if r.ratio is None else f"{r.ratio:.2f}x",
            _fmt_bytes(r.peak_bytes),
            r.target,
        )
        for r in ROWS
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    terminalreporter.section(f"keydistill op benchmarks on {DEVICE.type} ({torch.get_num_threads()} threads)")
    for i, line in enumerate(lines):
        terminalreporter.write_line("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
        if i == 0:
            terminalreporter.write_line("  ".join("-" * w for w in widths))
    for note in NOTES:
        terminalreporter.write_line(note)


@pytest.fixture
def device():
    return DEVICE
