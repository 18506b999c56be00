"""The language-model head and its loss (``bench --lm-head``):
:func:`torch_matgrad.linear_cross_entropy` against the eager head and loss
(``F.linear`` + ``F.cross_entropy``) and ``torch.compile`` of it.

Providers (``N`` tokens, hidden size ``H``, vocabulary ``V``; no bias, as LM heads):

``eager``
    ``F.cross_entropy(F.linear(x, W), target)``: the baseline.
``torch_matgrad``
    The op (mean), whose forward computes the gradients chunk by chunk: on CUDA "auto"
    runs the Triton backend's ``"chunked"`` strategy (cuBLAS products, each chunk's loss
    and ``G_z`` in one fused kernel), on a CPU torch ops.
``matgrad_recompute``
    The op under ``reduction="none"``, averaged by the caller: its backward recomputes
    each chunk's logits (CCE's way; what the mean would cost without the gradients in
    the forward), one product more than ``torch_matgrad``.
``matgrad_triton``, ``matgrad_kernels``
    The op with the Triton backend asked for: its chunk products in the fused GEMM as
    well (``"gemm"``), or the cross-entropy kernels
    (:func:`torch_matgrad.dispatch.cross_entropy_strategy` ``"kernels"``).
``compile``
    ``torch.compile`` of the eager head and loss.
``compile_matgrad``
    ``torch.compile`` of the op (mean): what a compiling user gets from it.

For each shape one training step (forward, backward into ``x`` and ``W``) is timed per
provider, by the linear bench's timers, after its loss and gradients are compared with
eager's. The memory columns per provider:

``peak_mib``, ``peak_min_mib``, ``peak_max_mib``
    The peak memory of one step above the inputs and parameters: the median, lowest
    and highest of :data:`PEAK_RUNS` runs.
``peak_vs_eager``, ``worst_vs_eager``
    The median over eager's median, and the highest over eager's lowest: the ratio that
    every pair of runs meets.
``working_mib``
    The median peak less the bytes of the gradients the step returns (``grad_x`` and
    ``grad_W``: the same for every provider, which must hold them at the end): the peak
    working memory above inputs, parameters and gradients, Cut Cross-Entropy's
    accounting. A provider whose peak comes before its gradients exist (eager's, in its
    loss) is credited with them too.

Each run measures a peak in a fresh child process, after a warm-up step (compiling
included): on CUDA ``max_memory_allocated``; on a CPU the resident set's high-water mark
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` once the warm-up's freed
memory is handed back with ``malloc_trim``). The resident set sees every byte the step
touches, torch's allocations and its libraries' (oneDNN) alike, where torch's CPU
allocator keeps no peak counter; a fresh process keeps one provider's leftovers from
another's figure. The resident set also depends on where glibc places each allocation,
which differs from process to process: hence the runs. Rows go to ``lm_head.csv`` and
``lm_head.md``.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

from .. import dispatch
from ..cross_entropy import linear_cross_entropy
from .measure import peak_mem_mib
from .plans import DTYPES
from .report import format_table, heading

#: ``(N, H, V)`` per device: Llama-2's vocabulary (32000) at two token counts; on CUDA
#: also Llama-3's (128256).
SHAPES = {
    "cpu": [(1024, 1024, 32000), (4096, 1024, 32000)],
    "cuda": [(4096, 2048, 32000), (8192, 4096, 128256)],
}
PROVIDERS = ("eager", "torch_matgrad", "matgrad_recompute", "matgrad_triton", "matgrad_kernels", "compile",
             "compile_matgrad")
#: Fresh processes per provider and shape measuring the peak: on a CPU the resident set
#: varies from run to run; CUDA's allocator counts tensors, the same in every run.
PEAK_RUNS = {"cpu": 10, "cuda": 1}
#: The Triton backend's providers and their strategy.
TRITON = {"matgrad_triton": "gemm", "matgrad_kernels": "kernels"}
COLUMNS = ("date", "commit", "device", "device_name", "torch", "triton", "clock", "N", "H", "V", "dtype",
           "provider", "median_ms", "p20_ms", "p80_ms", "time_vs_eager", "peak_runs", "peak_mib", "peak_min_mib",
           "peak_max_mib", "peak_vs_eager", "worst_vs_eager", "working_mib", "working_vs_eager",
           "max_rel_diff_vs_eager")


def eager(x, w, t):
    return F.cross_entropy(F.linear(x, w), t)


def recompute(x, w, t):
    loss = linear_cross_entropy(x, w, t, reduction="none")
    return loss.sum() / (t != -100).sum()


def loss_fn(provider: str) -> Callable:
    """The ``fn(x, w, target)`` a provider runs; built afresh for every case."""
    if provider in ("compile", "compile_matgrad"):
        torch._dynamo.reset()
        return torch.compile(eager if provider == "compile" else linear_cross_entropy, dynamic=False)
    return {"eager": eager, "matgrad_recompute": recompute}.get(provider, linear_cross_entropy)


def inputs(n: int, h: int, v: int, device: str, dtype: torch.dtype):
    """``(x, W, target)``: hidden states and a head scaled like ``nn.Linear``'s init."""
    torch.manual_seed(0)
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    w = torch.nn.Parameter((torch.randn(v, h, device=device) * h**-0.5).to(dtype))
    return x, w, torch.randint(0, v, (n,), device=device)


def _context(provider: str) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    if provider in TRITON:
        stack.enter_context(dispatch.use_backend("triton"))
        stack.enter_context(dispatch.cross_entropy_strategy(TRITON[provider]))
    return stack


def step_of(provider: str, x, w, t) -> Callable[[], tuple]:
    """One training step of ``provider``: the loss and the gradients of ``x`` and ``W``."""
    fn = loss_fn(provider)

    def step():
        with _context(provider):
            loss = fn(x, w, t)
            return (loss.detach(), *torch.autograd.grad(loss, (x, w)))

    return step


def _rel_diff(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item() for a, e in zip(got, want))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_step_mib(provider: str, n: int, h: int, v: int, device: str, dtype_name: str) -> float:
    """The peak memory of one step of ``provider`` above its inputs and parameters, in
    this process (the module docstring says how): run it in a fresh one."""
    x, w, t = inputs(n, h, v, device, DTYPES[dtype_name])
    step = step_of(provider, x, w, t)
    step()  # warm-up: compiling, first-call allocations
    if device == "cuda":
        return peak_mem_mib(step)
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # glibc: return the warm-up's freed memory
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step()
    return (_status_kib("VmHWM") - base) / 1024


def _peak_in_child(provider: str, n: int, h: int, v: int, device: str, dtype_name: str) -> float:
    args = json.dumps([provider, n, h, v, device, dtype_name, torch.get_num_threads()])
    done = subprocess.run([sys.executable, "-m", __name__, args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench --lm-head: the {provider} memory child failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def run(device: str, env: Dict[str, str], out: Path, dtype_name: str, providers: Sequence[str],
        timer: Callable) -> List[dict]:
    """Check, time and measure every case; write ``lm_head.csv`` and ``lm_head.md``."""
    rows = []
    with open(out / "lm_head.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for n, h, v in SHAPES[device]:
            x, w, t = inputs(n, h, v, device, DTYPES[dtype_name])
            steps = {name: step_of(name, x, w, t) for name in providers}
            want = steps["eager"]()
            diffs = {name: _rel_diff(step(), want) for name, step in steps.items()}
            del want
            timed = timer(steps)
            del steps
            runs = PEAK_RUNS[device]
            peaks = {name: [_peak_in_child(name, n, h, v, device, dtype_name) for _ in range(runs)]
                     for name in providers}
            median = {name: statistics.median(p) for name, p in peaks.items()}
            grads_mib = (x.numel() + w.numel()) * x.element_size() / 2**20  # grad_x, grad_W
            working = {name: peak - grads_mib for name, peak in median.items()}
            base_t, base_m, base_w = timed["eager"][0], median["eager"], working["eager"]
            for name in providers:
                time_ms, p20, p80 = timed[name]
                row = {**env, "N": n, "H": h, "V": v, "dtype": dtype_name, "provider": name,
                       "median_ms": f"{time_ms:.1f}", "p20_ms": f"{p20:.1f}", "p80_ms": f"{p80:.1f}",
                       "time_vs_eager": f"{time_ms / base_t:.3f}", "peak_runs": runs,
                       "peak_mib": f"{median[name]:.1f}", "peak_min_mib": f"{min(peaks[name]):.1f}",
                       "peak_max_mib": f"{max(peaks[name]):.1f}", "peak_vs_eager": f"{median[name] / base_m:.3f}",
                       "worst_vs_eager": f"{max(peaks[name]) / min(peaks['eager']):.3f}",
                       "working_mib": f"{working[name]:.1f}", "working_vs_eager": f"{working[name] / base_w:.3f}",
                       "max_rel_diff_vs_eager": f"{diffs[name]:.1e}"}
                writer.writerow(row)
                rows.append(row)
            f.flush()
    (out / "lm_head.md").write_text(report(rows, markdown=True))
    return rows


def report(rows: Sequence[dict], markdown: bool = False) -> str:
    header = ["N x H x V", "dtype", "provider", "step ms", "time / eager", "peak MiB", "lowest-highest",
              "peak / eager", "worst / eager", "working MiB", "working / eager", "max rel diff vs eager"]
    lines = [[f"{r['N']} x {r['H']} x {r['V']}", r["dtype"], r["provider"], r["median_ms"], r["time_vs_eager"],
              r["peak_mib"], f"{r['peak_min_mib']}-{r['peak_max_mib']}", r["peak_vs_eager"], r["worst_vs_eager"],
              r["working_mib"], r["working_vs_eager"], r["max_rel_diff_vs_eager"]]
             for r in rows]
    note = (f"Peak: one training step's memory above the inputs and parameters, in {rows[0]['peak_runs']} fresh "
            "processes per provider (CPU: resident-set high-water mark; CUDA: max_memory_allocated): their median, "
            "lowest and highest; peak / eager is of the medians, worst / eager the highest over eager's lowest. "
            "Working: the median peak less the gradients the step returns (grad_x, grad_W; the same for every "
            "provider), Cut Cross-Entropy's accounting.")
    return heading(rows[0], markdown) + "\n\n" + format_table(header, lines, markdown) + "\n\n" + note + "\n"


if __name__ == "__main__":  # the memory child of _peak_in_child
    provider, n, h, v, device, dtype_name, threads = json.loads(sys.argv[1])
    torch.set_num_threads(threads)
    print(peak_step_mib(provider, n, h, v, device, dtype_name))
