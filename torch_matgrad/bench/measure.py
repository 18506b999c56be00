"""Measuring one case: input sets that rotate past the cache, the check against the
baseline, the timers (CUDA events, or interleaved CPU rounds; on CUDA also the step
replayed from a CUDA graph, which leaves the host out: kernel time apart from host
time), and the rows."""

from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..cli import activation
from .plans import DTYPES, FLOPS_PER_MNK, Case
from .providers import BASELINE, backend_of, eager, in_context, provider_context, provider_fn

# Largest relative difference (Frobenius norm, output and each gradient) from the eager
# baseline in the same dtype. bf16/fp16: both sides round their output (2^-8, 2^-11) and
# may sum in different orders; fp32: 1e-3 admits TF32 tensor-core dots (~3e-4 on each
# side), which cuBLAS, Inductor and the kernels all use once torch's float32 matmul
# precision allows them (the kernels follow that setting: ops.input_precision).
MATCH_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-3}

# Inputs of all rotating sets together exceed this many times the last-level cache.
_CACHE_MULTIPLE = 2
_CPU_CACHE_BYTES = 32 << 20  # no portable way to read L3; 32 MB covers server parts
_MAX_SETS = 8
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def input_sets(case: Case, device: str) -> List[tuple]:
    """``(x, w, b, grad_out)`` sets: x and grad_out fresh in each set, enough sets for them
    to exceed the last-level cache twice; w and b one pair of ``nn.Parameter`` shared by
    all sets, as a layer's weights are from step to step. (Parameters are also what
    ``torch.compile`` treats as static inputs of its CUDA graphs; fresh weight tensors
    would be copied into the graph on every call, a cost no model pays. On CUDA
    ``do_bench`` flushes the L2 before every call, so the weights do not come from cache.)"""
    dtype = DTYPES[case.dtype]
    set_bytes = (case.m * case.k + case.m * case.n) * dtype.itemsize
    if device == "cuda":
        cache = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    else:
        cache = _CPU_CACHE_BYTES
    count = max(1, min(_MAX_SETS, math.ceil(_CACHE_MULTIPLE * cache / set_bytes)))
    # Scaled like nn.Linear's init so that activations see realistic pre-activations.
    scale = case.k ** -0.5
    w = torch.nn.Parameter((torch.randn(case.n, case.k, device=device) * scale).to(dtype))
    b = torch.nn.Parameter((torch.randn(case.n, device=device) * scale).to(dtype))
    sets = []
    for _ in range(count):
        x = torch.randn(case.m, case.k, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(case.m, case.n, device=device, dtype=dtype)
        sets.append((x, w, b, g))
    return sets


def _step(fn: Callable, act: Optional[str], mode: str, sets: List[tuple]) -> Callable[[], object]:
    """A no-argument callable doing one ``mode`` step on the next input set in turn."""
    turn = itertools.cycle(range(len(sets)))
    if mode == "forward":
        def forward():
            x, w, b, _ = sets[next(turn)]
            with torch.no_grad():
                return fn(x, w, b, act)
        return forward
    if mode == "full":
        def full():
            x, w, b, g = sets[next(turn)]
            return torch.autograd.grad(fn(x, w, b, act), (x, w, b), g)
        return full
    outs = [fn(x, w, b, act) for x, w, b, _ in sets]  # the graphs the backward replays

    def backward():
        i = next(turn)
        x, w, b, g = sets[i]
        return torch.autograd.grad(outs[i], (x, w, b), g, retain_graph=True)
    return backward


def _results(fn: Callable, act: Optional[str], mode: str, inputs: tuple) -> List[torch.Tensor]:
    """Output (and for backward/full the three gradients) on one input set."""
    x, w, b, g = inputs
    if mode == "forward":
        with torch.no_grad():
            return [fn(x, w, b, act)]
    out = fn(x, w, b, act)
    return [out.detach(), *torch.autograd.grad(out, (x, w, b), g)]


def _max_rel_diff(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(
        ((a.float() - e.float()).norm() / e.float().norm().clamp_min(1e-30)).item() if e.numel() else 0.0
        for a, e in zip(got, want)
    )


# --------------------------------------------------------------------------- timing


def _quantiles(samples_ms: List[float]) -> Tuple[float, float, float]:
    q = statistics.quantiles(samples_ms, n=10, method="inclusive") if len(samples_ms) > 1 else samples_ms * 9
    return statistics.median(samples_ms), q[1], q[7]


def time_cuda(steps: Dict[str, Callable], rep_ms: float) -> Dict[str, Tuple[float, float, float]]:
    """``do_bench`` per provider: CUDA events, the L2 cache flushed before each call."""
    from triton.testing import do_bench

    return {name: tuple(do_bench(step, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])) for name, step in steps.items()}


def time_cpu(
    steps: Dict[str, Callable], rep_ms: float, clock: Callable[[], float] = time.perf_counter
) -> Dict[str, Tuple[float, float, float]]:
    """Rounds of one call per provider, the order reversed every other round, until the
    budget of wall time is spent (at least 5 rounds, at most 200); each call is timed
    with ``clock``."""
    names = list(steps)
    for name in names:  # warm-up: first-call allocations, oneDNN primitive creation
        steps[name]()
        steps[name]()
    samples: Dict[str, List[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for rnd in range(200):
        for name in names if rnd % 2 == 0 else reversed(names):
            t0 = clock()
            steps[name]()
            samples[name].append((clock() - t0) * 1e3)
        if rnd >= 4 and (time.perf_counter() - start) * 1e3 > rep_ms:
            break
    return {name: _quantiles(s) for name, s in samples.items()}


def graph_ms(step: Callable[[], object], calls: int = 1, replays: int = 20) -> float:
    """Median milliseconds per call of ``step`` replayed from a CUDA graph holding
    ``calls`` calls of it: the GPU's time with no host in the way. The step runs twice
    on the capture stream first (autotuning, compilation and allocations stay out of
    the graph); each replay is timed with CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def peak_mem_mib(step: Callable) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_case(case: Case, device: str, providers: Sequence[str], timer: Callable, env: Dict[str, str]) -> List[dict]:
    """One row per provider for ``case``; ``timer(steps)`` gives each step's quantiles.

    A provider that raises on this case gets a row with its error and no timing; the
    others are still timed (one failing kernel or graph must not cost the whole run).
    """
    act = activation(case.activation)
    sets = input_sets(case, device)
    # The baseline is always computed for the check, even when it is not timed.
    want = _results(eager, act, case.mode, sets[0])
    diffs: Dict[str, float] = {}
    errors: Dict[str, str] = {}
    steps: Dict[str, Callable] = {}
    first_call: Dict[str, float] = {}
    for p in providers:
        try:
            fn = provider_fn(p)
            with provider_context(p):
                started = time.perf_counter()  # the first call: compilation and autotuning
                diffs[p] = _max_rel_diff(_results(fn, act, case.mode, sets[0]), want)
                first_call[p] = time.perf_counter() - started
                step = in_context(p, _step(fn, act, case.mode, sets))
            step()
            step()  # replays must work too (CUDA graphs, retained autograd graphs)
            steps[p] = step
        except Exception as e:  # noqa: BLE001 -- reported in the row and the exit status
            errors[p] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    del want
    timings = timer(steps) if steps else {}
    base = timings.get(BASELINE)
    graphs = _graph_times(steps) if device == "cuda" else {}
    base_graph = graphs.get(BASELINE)
    flops = FLOPS_PER_MNK[case.mode] * case.m * case.n * case.k
    rows = []
    for p in providers:
        row = {
            **env, "shape_set": case.shape_set, "M": case.m, "K": case.k, "N": case.n, "dtype": case.dtype,
            "activation": case.activation, "mode": case.mode, "provider": p,
            "backend": backend_of(p, sets[0][:3]),
            "median_ms": "", "p20_ms": "", "p80_ms": "", "tflops": "", "peak_mem_mib": "", "time_vs_eager": "",
            "graph_ms": "", "graph_vs_eager": "", "first_call_s": f"{first_call[p]:.2f}" if p in first_call else "",
            "max_rel_diff_vs_eager": f"{diffs[p]:.2e}" if p in diffs else "", "error": errors.get(p, ""),
        }
        if p in graphs:
            row.update(graph_ms=f"{graphs[p]:.4f}", graph_vs_eager=f"{graphs[p] / base_graph:.3f}" if base_graph else "")
        if p in timings:
            median, p20, p80 = timings[p]
            row.update(median_ms=f"{median:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}",
                       tflops=f"{flops / (median * 1e-3) / 1e12:.4g}",
                       time_vs_eager=f"{median / base[0]:.3f}" if base else "")
            if device == "cuda" and case.mode == "full":
                row["peak_mem_mib"] = f"{peak_mem_mib(steps[p]):.4g}"
        rows.append(row)
    return rows


def _graph_times(steps: Dict[str, Callable]) -> Dict[str, float]:
    """:func:`graph_ms` per provider; a step that cannot be captured has none (its row
    keeps the CUDA-event timing, and the graph columns stay empty)."""
    times: Dict[str, float] = {}
    for name, step in steps.items():
        try:
            times[name] = graph_ms(step)
        except Exception:  # noqa: BLE001 -- some steps cannot be captured; the others still are
            torch.cuda.synchronize()
    return times


def failures(rows: Sequence[dict]) -> List[str]:
    """One line per row that failed: an error, or results further from the eager
    baseline than ``MATCH_TOL``."""
    tol = {name: MATCH_TOL[dtype] for name, dtype in DTYPES.items()}
    lines = []
    for r in rows:
        where = f"{r['provider']} ({r['backend']}) at {r['M']}x{r['K']}x{r['N']} {r['dtype']} {r['activation']} {r['mode']}"
        if r["error"]:
            lines.append(f"ERROR: {where}: {r['error']}")
        elif float(r["max_rel_diff_vs_eager"]) > tol[r["dtype"]]:
            lines.append(f"MISMATCH: {where} differs from eager by {r['max_rel_diff_vs_eager']}")
    return lines
