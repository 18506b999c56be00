"""The peak memory of one training step, as the modes that compare memory measure it.

On CUDA: ``max_memory_allocated`` above what the step started with (the allocator's
own counter; the kernels' scratch included). On a CPU torch's allocator keeps no peak,
and a compiled graph's buffers are no aten ops that a trace could count, so the step
runs in a fresh child process and the resident set's high-water mark is read (Linux
``VmHWM``, reset through ``/proc/self/clear_refs`` once the warm-up's freed memory is
handed back with ``malloc_trim``). The resident set sees every byte the step touches,
torch's and its libraries' (oneDNN) alike. Where glibc puts each freed block changes
from run to run, so a figure is the spread of several fresh processes, not one sample.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import subprocess
import sys
from typing import Callable, Dict, List, Sequence

import torch

from .measure import peak_mem_mib

#: Fresh processes per provider: one on CUDA (its counter is exact), several on a CPU.
RUNS = {"cpu": 10, "cuda": 1}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def step_peak_mib(step: Callable[[], object], device: str) -> float:
    """The peak memory of ``step()`` above what it starts with, in MiB, after one warm-up
    call (compiling, first-call allocations). On a CPU call it in a fresh process
    (:func:`in_children`): earlier work's freed blocks change the figure."""
    step()
    if device == "cuda":
        return peak_mem_mib(step)
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # glibc: return the warm-up's freed memory
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step()
    return (_status_kib("VmHWM") - base) / 1024


def in_children(module: str, args: Sequence, runs: int) -> List[float]:
    """``runs`` fresh processes of ``python -m module '<args as JSON>'``, each printing
    one peak (:func:`step_peak_mib`) last; the peaks. The children use this process's
    thread count, which the module's entry point is handed as its last argument."""
    payload = json.dumps([*args, torch.get_num_threads()])
    peaks = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-m", module, payload], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"bench: the memory child {module} {payload} failed:\n{done.stderr[-2000:]}")
        peaks.append(float(done.stdout.split()[-1]))
    return peaks


def child_args() -> list:
    """In a child of :func:`in_children`: its arguments, the thread count applied."""
    *args, threads = json.loads(sys.argv[1])
    torch.set_num_threads(threads)
    return args


def spread(peaks: Dict[str, List[float]], base: str = "eager") -> Dict[str, Dict[str, str]]:
    """Per provider the peak columns: the median, lowest and highest of its runs, the
    median over ``base``'s median, and the worst (its highest over ``base``'s lowest);
    a ratio is "" where ``base``'s figure is 0 (a step too small to grow the resident set)."""
    median = {name: statistics.median(p) for name, p in peaks.items()}

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}" if b > 0 else ""

    return {name: {"peak_mib": f"{median[name]:.1f}", "peak_min_mib": f"{min(p):.1f}",
                   "peak_max_mib": f"{max(p):.1f}", "peak_vs_eager": ratio(median[name], median[base]),
                   "worst_vs_eager": ratio(max(p), min(peaks[base]))}
            for name, p in peaks.items()}
