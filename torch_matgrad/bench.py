"""Benchmark torch_matgrad against the layers users would otherwise pick.

Providers (all run in one process, on the same device, in the same run):

``torch_matgrad``
    The public :func:`torch_matgrad.linear` with the default dispatch (``"auto"``);
    the ``backend`` column records what the dispatcher chose (forward and backward run it).
``eager``
    ``F.linear`` followed by the ``torch.nn.functional`` activation: what
    ``nn.Linear`` + activation runs (cuBLAS on CUDA, oneDNN/MKL on CPU). The baseline.
``compile``
    ``torch.compile(mode="max-autotune")`` of that same eager block. On by default
    on CUDA only: on a CPU it takes minutes per shape and measures Inductor's CPU
    GEMM templates, not anything this project ships.
``matgrad_torch``, ``matgrad_triton``
    ``torch_matgrad.linear`` with the backend forced (forward and backward): what
    ``"auto"`` chooses between.
``matgrad_gz_prologue``, ``matgrad_gz_pass``
    The Triton backend with ``G_z = G * act'(z)`` fused into the backward GEMMs'
    prologue, or formed in one elementwise pass before them
    (:func:`torch_matgrad.triton_backend.gz_strategy`).

Modes: ``forward`` is inference (``torch.no_grad``, 2MNK flops); ``backward`` times
``torch.autograd.grad`` of a prebuilt graph into x, W and b (grad_x and grad_W: 4MNK);
``full`` is the training step, forward then that backward (6MNK). Activation and bias
flops are not counted: they are O(MN), under 0.1% of the GEMMs for K >= 1000.

Timing: CUDA uses ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
call) and median / 20th / 80th percentiles; CPU uses a loop that interleaves the
providers round by round, so that load from other processes hits all of them alike,
timed by wall clock or (``--clock cpu``, with ``--threads 1``) by this process's CPU
time, which such load does not inflate at all. Either way the activations (x and the
output gradient) rotate among several sets whose total exceeds the last-level cache,
so a provider never reads inputs that the previous call left in cache. Peak memory (CUDA only: torch's CPU allocator keeps no peak
counter) is ``max_memory_allocated`` during one full step, less what the inputs
already held.

Every CSV row carries the device name, torch and triton versions, the git commit and
the date. Outputs: a table on stdout, ``bench.csv`` (appended case by case, so a run
cut short keeps what it measured), ``bench.md``, and with matplotlib one
``tflops_<set>.png`` per shape set (TFLOP/s against shape, one line per provider).
Before timing, every provider's output and gradients are compared with the eager
baseline's; a mismatch, or a provider that raises (its row then carries the error and
the other providers are still timed), is reported and makes the command exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import itertools
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import dispatch
from .cli import ACTIVATION_NAMES, activation
from .formulas import activate
from .function import linear

# Transformer projections (in_features, out_features): attention 4096x4096, the MLP of
# 11008 (LLaMA-7B) and 14336 (Mistral-7B) wide, both directions.
_TRANSFORMER_KN = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))

#: Shape sets, each a list of ``(M, K, N)``: M rows (tokens), K = in_features, N = out_features.
SHAPE_SETS: Dict[str, List[Tuple[int, int, int]]] = {
    "transformer": [(m, k, n) for m in (512, 2048, 8192, 16384) for k, n in _TRANSFORMER_KN],
    "square": [(s, s, s) for s in (1024, 2048, 3072, 4096, 6144, 8192)],
    # Decoding: one to 64 tokens through the same projections (memory-bound on the weight).
    "decode": [(m, k, n) for m in (1, 2, 4, 8, 16, 32, 64) for k, n in _TRANSFORMER_KN[:3]],
    # Sizes that are not multiples of any tile: masking and tails.
    "odd": [(4095, 4095, 4095), (1000, 1000, 1000), (33, 4096, 4096), (4097, 1000, 33), (1000, 4095, 11008)],
    "gpu_quick": [(4096, 4096, 4096), (2048, 4096, 11008), (2048, 11008, 4096), (8192, 4096, 14336)],
    # The CPU target's shapes: moderate sizes a 2-core machine times in seconds.
    "cpu": [(m, k, n) for m in (256, 1024) for k, n in ((512, 512), (1024, 4096), (4096, 1024))],
    # Seconds in total anywhere: tests and dry runs of the tooling.
    "tiny": [(7, 33, 17), (64, 128, 96)],
}
_ALL_SETS = ("transformer", "square", "decode", "odd")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: The activations of a run that names none (every one of ``cli.ACTIVATION_NAMES`` may be
#: named): the bare GEMM and the two that transformers use.
DEFAULT_ACTIVATIONS = ("none", "gelu_tanh", "silu")
MODES = ("forward", "backward", "full")
PROVIDERS = (
    "torch_matgrad", "eager", "compile", "matgrad_torch", "matgrad_triton", "matgrad_gz_prologue", "matgrad_gz_pass",
)
DEFAULT_PROVIDERS = ("torch_matgrad", "eager", "compile")
BASELINE = "eager"
_FLOPS_PER_MNK = {"forward": 2, "backward": 4, "full": 6}

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
_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

CSV_COLUMNS = (
    "date", "commit", "device", "device_name", "torch", "triton", "clock", "shape_set", "M", "K", "N", "dtype",
    "activation", "mode", "provider", "backend", "median_ms", "p20_ms", "p80_ms", "tflops", "peak_mem_mib",
    "time_vs_eager", "max_rel_diff_vs_eager", "error",
)


# --------------------------------------------------------------------------- options


def configure(parser: argparse.ArgumentParser) -> None:
    def listed(choices):
        def parse(text):
            items = [s.strip() for s in text.split(",") if s.strip()]
            bad = [s for s in items if s not in choices]
            if bad or not items:
                raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
            return items

        return parse

    parser.add_argument("--quick", action="store_true",
                        help="the quick set: on CUDA bf16, four shapes, forward/backward without activation "
                        "and full steps with gelu_tanh and silu; on CPU the 'cpu' shapes, fp32 and bf16, "
                        "full steps with the default activations")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto, cpu or cuda (default auto: cuda when available)")
    parser.add_argument("--dtype", type=listed(tuple(DTYPES)),
                        help=f"comma list of {', '.join(DTYPES)} (default all)")
    parser.add_argument("--activation", type=listed(ACTIVATION_NAMES),
                        help=f"comma list of {', '.join(ACTIVATION_NAMES)} (default {','.join(DEFAULT_ACTIVATIONS)})")
    parser.add_argument("--mode", type=listed(MODES), help=f"comma list of {', '.join(MODES)} (default all)")
    parser.add_argument("--shapes", type=listed(tuple(SHAPE_SETS) + ("all",)),
                        help=f"comma list of shape sets: {', '.join(SHAPE_SETS)}, all "
                        f"(= {', '.join(_ALL_SETS)}; default: all on CUDA, cpu on CPU)")
    parser.add_argument("--providers", type=listed(PROVIDERS),
                        help=f"comma list of {', '.join(PROVIDERS)} (default {','.join(DEFAULT_PROVIDERS)} "
                        "on CUDA; torch_matgrad,eager on CPU)")
    parser.add_argument("--out", type=Path,
                        help=f"output folder (default: a new {DEFAULT_OUT}/<device>-<UTC time>, ignored by git; "
                        "the committed results are rewritten only when named here)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's own choice); one thread keeps CPU "
                        "figures steady on a machine that other work shares")
    parser.add_argument("--clock", choices=tuple(_CLOCKS), default="wall",
                        help="CPU only: wall (default) or cpu, this process's CPU time, which other "
                        "processes on a shared machine do not inflate; meaningful with --threads 1 "
                        "(with more threads it adds up their time, spinning included)")
    parser.add_argument("--rep-ms", type=float,
                        help="timing budget: per provider and case on CUDA (default 100), "
                        "per case for all providers together on CPU (default 1000)")


@dataclass(frozen=True)
class Case:
    shape_set: str
    m: int
    k: int
    n: int
    dtype: str
    activation: str
    mode: str


def plan(args, device: str) -> List[Case]:
    """The cases to run: per shape set, shape and dtype, every (activation, mode) pair."""
    cuda = device == "cuda"
    if args.quick:
        sets, dtypes = (["gpu_quick"], ["bf16"]) if cuda else (["cpu"], ["fp32", "bf16"])
    else:
        sets, dtypes = (list(_ALL_SETS) if cuda else ["cpu"]), list(DTYPES)
    sets = list(dict.fromkeys(itertools.chain.from_iterable(
        _ALL_SETS if s == "all" else (s,) for s in (args.shapes or sets))))
    if args.quick and cuda and not (args.activation or args.mode):
        # The bare GEMMs both ways, then the fused training steps.
        pairs = [("none", "forward"), ("none", "backward"), ("gelu_tanh", "full"), ("silu", "full")]
    else:
        modes = args.mode or (["full"] if args.quick else list(MODES))
        pairs = list(itertools.product(args.activation or DEFAULT_ACTIVATIONS, modes))
    cases = []
    for name in sets:
        for (m, k, n), dtype in itertools.product(SHAPE_SETS[name], args.dtype or dtypes):
            cases += [Case(name, m, k, n, dtype, act, mode) for act, mode in pairs]
    return cases


# --------------------------------------------------------------------------- providers


def _eager(x, w, b, act):
    return activate(F.linear(x, w, b), act)


def _matgrad(x, w, b, act):
    return linear(x, w, b, activation=act)


def backend_ran(x, w, b) -> str:
    """What ``torch_matgrad.linear`` runs for these tensors: the backend asked for, then
    the implementation the dispatcher picks for the forward (``torch`` or a kernel
    backend), e.g. ``auto->torch``."""
    return f"{dispatch.requested_backend()}->{dispatch.chosen_backend(x, w, b)}"


# Providers that run torch_matgrad.linear with a forced backend (and G_z strategy).
_FORCED = {
    "matgrad_torch": ("torch", None),
    "matgrad_triton": ("triton", None),
    "matgrad_gz_prologue": ("triton", "prologue"),
    "matgrad_gz_pass": ("triton", "pass"),
}


def _provider_context(name: str) -> contextlib.AbstractContextManager:
    """The context every call of a provider runs in: its forced backend and strategy."""
    stack = contextlib.ExitStack()
    if name in _FORCED:
        backend, gz = _FORCED[name]
        stack.enter_context(dispatch.use_backend(backend))
        if gz is not None:
            from . import triton_backend

            stack.enter_context(triton_backend.gz_strategy(gz))
    return stack


def _in_context(name: str, step: Callable[[], object]) -> Callable[[], object]:
    """``step`` run inside the provider's context (a few microseconds per call)."""
    if name not in _FORCED:
        return step

    def stepped():
        with _provider_context(name):
            return step()

    return stepped


def _backend_of(name: str, tensors) -> str:
    if name == "torch_matgrad" or name in _FORCED:
        with _provider_context(name):
            try:
                return backend_ran(*tensors)
            except RuntimeError:  # a forced backend that cannot run here: the row has the error
                return f"{dispatch.requested_backend()}->unavailable"
    return name


def _provider_fn(name: str) -> Callable:
    """The ``fn(x, w, b, act)`` a provider runs; built afresh for every case."""
    if name == "torch_matgrad" or name in _FORCED:
        return _matgrad
    if name == "eager":
        return _eager
    # dynamic=False: one static graph per shape, as max-autotune tunes for. Resetting
    # Dynamo per case keeps its cache small: across cases, shapes would add up to its
    # recompile limit (8), past which it silently runs eager. Inductor's own caches
    # still spare the autotuning of a graph already seen.
    torch._dynamo.reset()
    return torch.compile(_eager, mode="max-autotune", dynamic=False)


def _compile_config(mode: str):
    """The backward mode replays one graph (``retain_graph=True``), which a compiled
    backward that reuses ("donates") its saved buffers refuses (torch >= 2.6): switch
    donation off, for that mode only, both when the graphs compile and when they run."""
    from torch._functorch import config

    if mode != "backward" or not hasattr(config, "donated_buffer"):
        return contextlib.nullcontext()
    return config.patch(donated_buffer=False)


# --------------------------------------------------------------------------- inputs


def _input_sets(case: Case, device: str) -> List[tuple]:
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


def _time_cuda(steps: Dict[str, Callable], rep_ms: float) -> Dict[str, Tuple[float, float, float]]:
    """``do_bench`` per provider: CUDA events, the L2 cache flushed before each call."""
    from triton.testing import do_bench

    return {name: tuple(do_bench(step, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])) for name, step in steps.items()}


def _time_cpu(
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


def _peak_mem_mib(step: Callable) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# --------------------------------------------------------------------------- environment


def environment(device: str) -> Dict[str, str]:
    """The columns every row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{_cpu_model()}, {os.cpu_count()} cores, torch using {torch.get_num_threads()} threads"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _commit(),
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    """``$TORCH_MATGRAD_COMMIT`` (for a tree copied without ``.git``), else the commit of
    the source tree this module was loaded from (``-dirty`` with uncommitted changes to
    tracked files), else "unknown"."""
    if os.environ.get("TORCH_MATGRAD_COMMIT"):
        return os.environ["TORCH_MATGRAD_COMMIT"]

    def git(*args):
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if changes else "")) if head else "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


#: Where a run without ``--out`` writes (``.gitignore`` lists it): a run never rewrites
#: the committed results in ``benchmarks/results/`` unless ``--out`` names them.
DEFAULT_OUT = Path("benchmarks", "out")


def default_out(device: str, env: Dict[str, str]) -> Path:
    """A new folder under ``DEFAULT_OUT`` named by the device and the run's UTC time."""
    name = "cpu" if device == "cpu" else _slug(env["device_name"])
    stamp = env["date"].replace(":", "").replace("-", "")
    out, n = DEFAULT_OUT / f"{name}-{stamp}", 1
    while out.exists():
        n += 1
        out = DEFAULT_OUT / f"{name}-{stamp}-{n}"
    return out


# --------------------------------------------------------------------------- running


def run_case(case: Case, device: str, providers: Sequence[str], timer: Callable, env: Dict[str, str]) -> List[dict]:
    """One row per provider for ``case``; ``timer(steps)`` gives each step's quantiles.

    A provider that raises on this case gets a row with its error and no timing; the
    others are still timed (one failing kernel or graph must not cost the whole run).
    """
    act = activation(case.activation)
    sets = _input_sets(case, device)
    # The baseline is always computed for the check, even when it is not timed.
    want = _results(_eager, act, case.mode, sets[0])
    diffs: Dict[str, float] = {}
    errors: Dict[str, str] = {}
    steps: Dict[str, Callable] = {}
    for p in providers:
        try:
            fn = _provider_fn(p)
            with _provider_context(p):
                diffs[p] = _max_rel_diff(_results(fn, act, case.mode, sets[0]), want)
                step = _in_context(p, _step(fn, act, case.mode, sets))
            step()
            step()  # replays must work too (CUDA graphs, retained autograd graphs)
            steps[p] = step
        except Exception as e:  # noqa: BLE001 -- reported in the row and the exit status
            errors[p] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    del want
    timings = timer(steps) if steps else {}
    base = timings.get(BASELINE)
    flops = _FLOPS_PER_MNK[case.mode] * case.m * case.n * case.k
    rows = []
    for p in providers:
        row = {
            **env, "shape_set": case.shape_set, "M": case.m, "K": case.k, "N": case.n, "dtype": case.dtype,
            "activation": case.activation, "mode": case.mode, "provider": p,
            "backend": _backend_of(p, sets[0][:3]),
            "median_ms": "", "p20_ms": "", "p80_ms": "", "tflops": "", "peak_mem_mib": "", "time_vs_eager": "",
            "max_rel_diff_vs_eager": f"{diffs[p]:.2e}" if p in diffs else "", "error": errors.get(p, ""),
        }
        if p in timings:
            median, p20, p80 = timings[p]
            row.update(median_ms=f"{median:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}",
                       tflops=f"{flops / (median * 1e-3) / 1e12:.4g}",
                       time_vs_eager=f"{median / base[0]:.3f}" if base else "")
            if device == "cuda" and case.mode == "full":
                row["peak_mem_mib"] = f"{_peak_mem_mib(steps[p]):.4g}"
        rows.append(row)
    return rows


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


class _Progress:
    """tqdm when installed, otherwise one rewritten line on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, unit="case", file=sys.stderr)
        self.total, self.done = total, 0

    def step(self, label: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update()
        else:
            print(f"\r[{self.done}/{self.total}] {label:<60}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


# --------------------------------------------------------------------------- reports


def _case_key(r: dict) -> tuple:
    return (r["shape_set"], int(r["M"]), int(r["K"]), int(r["N"]), r["dtype"], r["activation"], r["mode"])


def pivot(rows: Sequence[dict]) -> Tuple[List[str], List[List[str]]]:
    """One line per case: time and TFLOP/s per provider, time relative to eager."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    header = ["set", "M x K x N", "dtype", "act", "mode"]
    for p in providers:
        header += [f"{p} ms", f"{p} TFLOP/s"] + ([f"{p}/eager"] if p != BASELINE else [])
    lines = []
    for key, group in itertools.groupby(rows, key=_case_key):
        by = {r["provider"]: r for r in group}
        line = [key[0], f"{key[1]} x {key[2]} x {key[3]}", *key[4:]]
        for p in providers:
            r = by.get(p)
            line += ([r["median_ms"] or "error", r["tflops"]]) if r else ["", ""]
            if p != BASELINE:
                line.append(r["time_vs_eager"] if r else "")
        lines.append(line)
    return header, lines


def summary(rows: Sequence[dict]) -> List[Tuple[str, str, str, float, int]]:
    """``(provider, mode, dtype, geometric mean of time/eager, cases)`` over all shapes
    and activations: below 1 is faster than eager."""
    groups: Dict[tuple, List[float]] = {}
    for r in rows:
        if r["provider"] != BASELINE and r["time_vs_eager"]:
            groups.setdefault((r["provider"], r["mode"], r["dtype"]), []).append(float(r["time_vs_eager"]))
    return [(*k, math.exp(sum(map(math.log, v)) / len(v)), len(v)) for k, v in groups.items()]


def format_table(header: Sequence[str], lines: Sequence[Sequence[str]], markdown: bool = False) -> str:
    if markdown:
        rows = [header, ["---"] * len(header), *lines]
        return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows)
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    text = [" ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header, *lines]]
    text.insert(1, " ".join("-" * w for w in widths))
    return "\n".join(text)


def report(rows: Sequence[dict], markdown: bool = False) -> str:
    """The environment, the per-case table and the geometric means, as text or Markdown."""
    env = rows[0]
    head = (f"{env['device_name']} ({env['device']}); torch {env['torch']}, triton {env['triton']}; "
            f"commit {env['commit']}; {env['date']}; timed by {env['clock']}")
    means = [("provider", "mode", "dtype", "geomean time / eager", "cases")] + [
        (p, m, d, f"{g:.3f}", str(c)) for p, m, d, g, c in summary(rows)
    ]
    parts = [
        ("**" + head + "**") if markdown else head,
        format_table(*pivot(rows), markdown=markdown),
        "Geometric mean over the cases of time relative to eager (below 1: faster):",
        format_table(means[0], means[1:], markdown=markdown),
    ]
    return "\n\n".join(parts) + "\n"


def plot(rows: Sequence[dict], out: Path) -> List[Path]:
    """``tflops_<set>.png`` per shape set in ``triton.testing.perf_report``'s style:
    TFLOP/s against shape, one line per provider, a panel per (mode, dtype, activation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for shape_set in dict.fromkeys(r["shape_set"] for r in rows if r["tflops"]):
        mine = [r for r in rows if r["shape_set"] == shape_set and r["tflops"]]
        panels = list(dict.fromkeys((r["mode"], r["dtype"], r["activation"]) for r in mine))
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.2 * nrows), squeeze=False)
        for ax, (mode, dtype, act) in zip(axes.flat, panels):
            sel = [r for r in mine if (r["mode"], r["dtype"], r["activation"]) == (mode, dtype, act)]
            shapes = sorted({(int(r["M"]), int(r["K"]), int(r["N"])) for r in sel}, key=lambda s: (s[0] * s[1] * s[2], s))
            for p in dict.fromkeys(r["provider"] for r in sel):
                tf = {(int(r["M"]), int(r["K"]), int(r["N"])): float(r["tflops"]) for r in sel if r["provider"] == p}
                ax.plot(range(len(shapes)), [tf.get(s, math.nan) for s in shapes], marker="o", label=p)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{m}x{k}x{n}" for m, k, n in shapes], rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{mode}, {dtype}, act={act}", fontsize=10)
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{shape_set} (M x K x N): {mine[0]['device_name']}, torch {mine[0]['torch']}", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
        path = out / f"tflops_{shape_set}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def run(args) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = args.providers or (list(DEFAULT_PROVIDERS) if device == "cuda" else ["torch_matgrad", "eager"])
    if device == "cuda":
        timer, clock = functools.partial(_time_cuda, rep_ms=args.rep_ms or 100.0), "cuda events"
    else:
        timer = functools.partial(_time_cpu, rep_ms=args.rep_ms or 1000.0, clock=_CLOCKS[args.clock])
        clock = f"{args.clock} time"
    env = {**environment(device), "clock": clock}
    out = args.out or default_out(device, env)
    out.mkdir(parents=True, exist_ok=True)
    cases = plan(args, device)
    started = time.perf_counter()
    print(f"bench: {len(cases)} cases x {len(providers)} providers on {env['device_name']}; writing {out}/",
          file=sys.stderr)

    rows: List[dict] = []
    progress = _Progress(len(cases))
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for case in cases:
            with _compile_config(case.mode):
                new = run_case(case, device, providers, timer, env)
            writer.writerows(new)
            f.flush()
            rows += new
            progress.step(f"{case.m}x{case.k}x{case.n} {case.dtype} {case.activation} {case.mode}")
    progress.close()

    (out / "bench.md").write_text(report(rows, markdown=True))
    print(report(rows))
    if not args.no_plot:
        try:
            written = plot(rows, out)
        except ImportError:
            print("bench: matplotlib is not installed (pip install torch-matgrad[bench]); no plots", file=sys.stderr)
        else:
            print("plots: " + ", ".join(map(str, written)))
    bad = failures(rows)
    for line in bad:
        print(line, file=sys.stderr)
    print(f"bench: {len(cases)} cases in {time.perf_counter() - started:.0f} s; results in {out}/", file=sys.stderr)
    return 1 if bad else 0
