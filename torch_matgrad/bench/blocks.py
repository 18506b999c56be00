"""MLP blocks (``bench --mlp``): :class:`torch_matgrad.FusedMLP` against the eager block
(``nn.Linear`` layers around the activation) and ``torch.compile`` of it.

For each shape (tokens ``M``, width ``d``, hidden width ``H``) and each kind (plain
GELU as in GPT-2, gated SiLU as in Llama) one training step (forward, backward into the
input and every parameter) is timed per provider, by the linear bench's timers, and
the bytes the forward saves for backward are counted (``saved_tensors_hooks``: distinct
storages, Parameters left out). For the providers that run aten ops (the eager block
and the fused one on torch ops) one step is also traced (:mod:`.allocations`): the
peak of the tensor storages it allocates, as CUDA's allocator counts them, and its aten
ops, a proxy for host time. Peak memory: on CUDA the allocator's peak, which also counts
the kernels' own scratch; on a CPU the traced peak. The compiled eager block shows what
AOTAutograd's partitioner already recomputes; the compiled fused block is recorded
beside it. Rows go to ``mlp.csv`` and ``mlp.md``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

from ..mlp import FusedMLP, saved_bytes
from .allocations import step_allocations
from .measure import peak_mem_mib
from .providers import in_context, provider_context
from .report import format_table, heading

#: ``(M, d, H)`` per device: GPT-2-small and Llama-like widths, scaled to what the
#: device times in seconds.
SHAPES = {
    "cpu": [(256, 256, 1024), (512, 512, 1376)],
    "cuda": [(4096, 1024, 4096), (4096, 4096, 11008)],
}
KINDS = {"plain_gelu": (False, "gelu"), "gated_silu": (True, "silu")}
#: ``matgrad_triton``: the fused block with the Triton backend asked for (its fused
#: launches); ``torch_matgrad`` runs what "auto" chooses.
PROVIDERS = ("eager", "torch_matgrad", "matgrad_triton", "compile", "compile_matgrad")
COLUMNS = ("date", "commit", "device", "device_name", "torch", "triton", "clock", "M", "d", "H", "dtype", "kind",
           "provider", "median_ms", "p20_ms", "p80_ms", "time_vs_eager", "saved_mib", "saved_vs_eager", "peak_mem_mib",
           "tensor_peak_mib", "aten_ops")
#: The providers whose step the allocation trace sees whole: the Triton kernels' launches
#: and a compiled graph's kernels are no aten ops (a compiled step ran uncompiled under it).
TRACED = ("eager", "torch_matgrad")
_ACT = {"gelu": nn.GELU, "silu": nn.SiLU}


class EagerMLP(nn.Module):
    """The eager block on the Parameters of a :class:`FusedMLP` (its sub-layers)."""

    def __init__(self, fused: FusedMLP):
        super().__init__()
        self.fused = fused
        self.act = _ACT[fused.activation]()

    def forward(self, x):
        f = self.fused
        u = f.up(x)
        return f.down(self.act(u) if not f.gated else self.act(f.gate(x)) * u)


def blocks(d: int, hidden: int, kind: str, device: str, dtype: torch.dtype, providers: Sequence[str]):
    gated, activation = KINDS[kind]
    fused = FusedMLP(d, hidden, activation=activation, gated=gated, device=device, dtype=dtype)
    made = {"eager": EagerMLP(fused), "torch_matgrad": fused, "matgrad_triton": fused}
    if "compile" in providers:
        made["compile"] = torch.compile(made["eager"])
    if "compile_matgrad" in providers:
        made["compile_matgrad"] = torch.compile(fused)
    return {name: made[name] for name in providers}


def step_memory(step: Callable[[], object], device: str, provider: str) -> Dict[str, str]:
    """The ``peak_mem_mib``, ``tensor_peak_mib`` and ``aten_ops`` columns of one ``step``:
    the peak is CUDA's allocator's above what the step started with, or on a CPU the
    traced tensors' (the CPU allocator keeps no peak); "" where not measured (:data:`TRACED`)."""
    traced = provider in TRACED
    tensors, ops = step_allocations(step) if traced else (None, None)
    if device == "cuda":
        peak = f"{peak_mem_mib(step):.4g}"
    else:
        peak = f"{tensors / 2**20:.4g}" if traced else ""
    return {"peak_mem_mib": peak, "tensor_peak_mib": f"{tensors / 2**20:.4g}" if traced else "",
            "aten_ops": str(ops) if traced else ""}


def run(device: str, env: Dict[str, str], out: Path, dtype_name: str, dtype: torch.dtype,
        providers: Sequence[str], timer: Callable) -> List[dict]:
    """Time and measure every case; write ``mlp.csv`` and ``mlp.md`` into ``out``."""
    rows = []
    with open(out / "mlp.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for m, d, hidden in SHAPES[device]:
            for kind in KINDS:
                torch.manual_seed(0)
                torch._dynamo.reset()
                models = blocks(d, hidden, kind, device, dtype, providers)
                params = list(models["eager"].parameters())
                x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
                grad = torch.randn(m, d, device=device, dtype=dtype)

                def step(model):
                    def run_step():
                        torch.autograd.grad(model(x), [x, *params], grad)
                    return run_step

                steps = {name: in_context(name, step(model)) for name, model in models.items()}
                saved = {}
                for name, model in models.items():
                    with provider_context(name):
                        saved[name] = saved_bytes(model, x, params=params)[1]
                timed = timer(steps)
                base_t, base_s = timed["eager"][0], saved["eager"]
                for name in models:
                    median, p20, p80 = timed[name]
                    row = {**env, "M": m, "d": d, "H": hidden, "dtype": dtype_name, "kind": kind, "provider": name,
                           "median_ms": f"{median:.4f}", "p20_ms": f"{p20:.4f}", "p80_ms": f"{p80:.4f}",
                           "time_vs_eager": f"{median / base_t:.3f}", "saved_mib": f"{saved[name] / 2**20:.3f}",
                           "saved_vs_eager": f"{saved[name] / base_s:.3f}", **step_memory(steps[name], device, name)}
                    writer.writerow(row)
                    rows.append(row)
                f.flush()
    (out / "mlp.md").write_text(report(rows, markdown=True))
    return rows


def report(rows: Sequence[dict], markdown: bool = False) -> str:
    header = ["M x d x H", "dtype", "kind", "provider", "step ms", "time / eager", "saved MiB", "saved / eager",
              "peak MiB", "tensors MiB", "aten ops"]
    lines = [[f"{r['M']} x {r['d']} x {r['H']}", r["dtype"], r["kind"], r["provider"], r["median_ms"],
              r["time_vs_eager"], r["saved_mib"], r["saved_vs_eager"], r["peak_mem_mib"] or "-",
              r["tensor_peak_mib"] or "-", r["aten_ops"] or "-"] for r in rows]
    note = ("Peak: one training step's memory above its inputs and parameters (CUDA: max_memory_allocated, "
            "the kernels' scratch included; CPU: tensors). Tensors: the peak of the live storages the step's aten "
            "ops allocate, each rounded up to 512 bytes as CUDA's caching allocator counts them (the "
            "bench.allocations trace: the same figure on every device). Aten ops: dispatched per step, forward and "
            "backward, a proxy for host time. '-': not traced (Triton launches and compiled kernels are no aten ops).")
    return heading(rows[0], markdown) + "\n\n" + format_table(header, lines, markdown) + "\n\n" + note + "\n"
