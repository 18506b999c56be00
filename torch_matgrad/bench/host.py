"""Host overhead (``bench --host``): the time of one layer call where the GEMM is short,
``torch_matgrad.Linear`` against ``nn.Linear`` followed by its activation module.

At tiny and decoding shapes a call is mostly Python and dispatch, not arithmetic, so
this mode times whole module calls the way a model makes them: ``inference`` is a
forward under ``torch.no_grad``, ``training`` a forward and a backward into the
parameters and the input. The two layers share their Parameters and run one after the
other, round by round (the order reversed every other round), each sample the mean of
a batch of calls long enough for the clock to resolve; the report gives medians and the
ratio to ``nn.Linear`` in the same run. On CUDA each batch ends with a synchronize, so
a sample is what the caller waits for: host time where the host is the bottleneck,
GPU time where the GPU is.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..cli import activation
from ..modules import Linear
from .report import format_table, heading

#: ``(M, K, N)`` per device: one token through a tiny layer, a small batch, a mid-size
#: training step (arithmetic dominates: the ratio must be ~1), and decoding rows.
SHAPES = {
    "cpu": [(1, 64, 64), (8, 256, 256), (256, 1024, 1024), (1, 4096, 4096)],
    "cuda": [(1, 64, 64), (1, 4096, 4096), (16, 4096, 4096), (256, 1024, 1024)],
}
MODES = ("inference", "training")
#: The bench's ``--mode`` names for these modes.
FROM_BENCH_MODE = {"forward": "inference", "full": "training"}
PROVIDERS = ("nn.Linear", "torch_matgrad")
COLUMNS = ("date", "commit", "device", "device_name", "torch", "triton", "clock", "M", "K", "N", "dtype",
           "activation", "mode", "provider", "median_us", "p20_us", "p80_us", "ratio_vs_nn_linear")
_ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}
_SAMPLE_S = 2e-3  # each sample: a batch of calls lasting about this long


def layers(k: int, n: int, activation, device: str, dtype: torch.dtype) -> Dict[str, nn.Module]:
    """``nn.Linear`` (+ the activation module) and the torch_matgrad layer on the same Parameters."""
    ref = nn.Linear(k, n, device=device, dtype=dtype)
    ours = Linear.from_linear(ref, activation=activation)
    if activation is not None:
        ref = nn.Sequential(ref, _ACT_MODULES[activation]())
    return {"nn.Linear": ref, "torch_matgrad": ours}


def step(layer: nn.Module, mode: str, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One call of ``layer`` in ``mode`` (training: forward, backward, gradients dropped)."""
    params = list(layer.parameters())
    if mode == "inference":
        def infer():
            with torch.no_grad():
                layer(x)
        return infer

    def train():
        layer(x).backward(grad)
        x.grad = None
        for p in params:
            p.grad = None
    return train


def time_interleaved(steps: Dict[str, Callable[[], None]], rounds: int, clock: Callable[[], float],
                     sync: Callable[[], None]) -> Dict[str, Tuple[float, float, float]]:
    """Median, 20th and 80th percentile of microseconds per call, per step."""
    for fn in steps.values():  # warm-up: allocator, oneDNN primitives, autotuning
        for _ in range(3):
            fn()
    sync()
    fastest = min(steps.values(), key=lambda fn: _once(fn, sync))
    calls = max(1, int(_SAMPLE_S / max(_once(fastest, sync), 1e-7)))
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    names = list(steps)
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else reversed(names):
            fn = steps[name]
            start = clock()
            for _ in range(calls):
                fn()
            sync()
            samples[name].append((clock() - start) / calls * 1e6)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=10, method="inclusive")
        out[name] = (statistics.median(s), q[1], q[7])
    return out


def _once(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def cases(device: str, dtype_names: Sequence[str], activations: Sequence[str], modes: Sequence[str]):
    return [(m, k, n, d, a, mode) for (m, k, n) in SHAPES[device] for d in dtype_names
            for a in activations for mode in modes]


def run(device: str, env: Dict[str, str], out: Path, dtypes: Dict[str, torch.dtype], activations: Sequence[str],
        modes: Sequence[str], clock: Callable[[], float], rounds: int) -> List[dict]:
    """Time every case, write ``host.csv`` and ``host.md`` into ``out``, return the rows."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    with open(out / "host.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for m, k, n, dname, act_name, mode in cases(device, list(dtypes), activations, modes):
            act = activation(act_name)
            torch.manual_seed(0)
            x = torch.randn(m, k, device=device, dtype=dtypes[dname], requires_grad=mode == "training")
            grad = torch.randn(m, n, device=device, dtype=dtypes[dname])
            steps = {name: step(layer, mode, x, grad) for name, layer in layers(k, n, act, device, dtypes[dname]).items()}
            timed = time_interleaved(steps, rounds, clock, sync)
            base = timed["nn.Linear"][0]
            for provider in PROVIDERS:
                median, p20, p80 = timed[provider]
                row = {**env, "M": m, "K": k, "N": n, "dtype": dname, "activation": act_name, "mode": mode,
                       "provider": provider, "median_us": f"{median:.2f}", "p20_us": f"{p20:.2f}",
                       "p80_us": f"{p80:.2f}", "ratio_vs_nn_linear": f"{median / base:.3f}"}
                writer.writerow(row)
                rows.append(row)
            f.flush()
    (out / "host.md").write_text(report(rows, markdown=True))
    return rows


def report(rows: Sequence[dict], markdown: bool = False) -> str:
    header = ["M x K x N", "dtype", "act", "mode", "nn.Linear us", "torch_matgrad us", "ratio"]
    lines = []
    for i in range(0, len(rows), len(PROVIDERS)):
        ref, ours = rows[i:i + len(PROVIDERS)]
        lines.append([f"{ref['M']} x {ref['K']} x {ref['N']}", ref["dtype"], ref["activation"], ref["mode"],
                      ref["median_us"], ours["median_us"], ours["ratio_vs_nn_linear"]])
    return heading(rows[0], markdown) + "\n\n" + format_table(header, lines, markdown) + "\n"
