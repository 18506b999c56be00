"""Where a training step's device time goes: the kernels of one full step, per provider.

For each activation, bf16 on CUDA, one shape (default 4096^3), runs the bench's full step
(forward, then ``torch.autograd.grad`` into x, W and b) of ``torch_matgrad`` ("auto"),
``matgrad_triton`` (the Triton backend asked for; CUDA only) and ``eager`` under
``torch.profiler`` and prints, per provider, the device time of each
kernel per step and their sum, beside the step's wall time. A step whose wall time
exceeds its kernels' sum by much waits on the host (launch overhead, synchronisation);
a kernel the provider should not launch (a copy, a fallback GEMM) shows by name.
``--mlp`` does the same for the MLP blocks of ``bench --mlp`` (``FusedMLP`` against the
eager block, plain GELU and gated SiLU, ``M x d x H`` from ``--shape``, default
4096 x 1024 x 4096): the step is forward and backward into the input and every parameter.

Usage: python benchmarks/profile_step.py [--mlp] [--shape M,K,N] [--activation none,gelu_tanh]
                                         [--steps 10] [--device cuda|cpu]
Without a GPU it runs on the CPU on a small shape (CPU operator times; the tooling only).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from torch_matgrad.bench import blocks
from torch_matgrad.bench.providers import in_context, provider_fn


def _providers(device):
    """The bench's providers profiled: the kernels' own only where they run compiled."""
    return ("torch_matgrad", "matgrad_triton", "eager") if device == "cuda" else ("torch_matgrad", "eager")


def _inputs(m, k, n, device, dtype):
    w = torch.nn.Parameter(torch.randn(n, k, device=device, dtype=dtype) * k**-0.5)
    b = torch.nn.Parameter(torch.randn(n, device=device, dtype=dtype) * k**-0.5)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    return x, w, b, torch.randn(m, n, device=device, dtype=dtype)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def profile_step(step, steps, device):
    """(wall ms per ``step()``, [(kernel, device ms per step, calls per step)] by time)."""
    for _ in range(3):  # autotuning and first-call work stay out of the profile
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    wall = (time.perf_counter() - t0) * 1e3 / steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    rows = []
    for e in prof.key_averages():
        us = e.device_time_total if device == "cuda" else e.self_cpu_time_total
        if us > 0 and (device != "cuda" or e.device_type.name == "CUDA"):
            rows.append((e.key, us / 1e3 / steps, e.count / steps))
    return wall, sorted(rows, key=lambda r: -r[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, help="M,K,N (default 4096,4096,4096 on CUDA, 64,128,96 on CPU)")
    p.add_argument("--activation", default="none,gelu_tanh", help="comma list of activation names")
    p.add_argument("--steps", type=int, default=10, help="profiled steps per provider (default 10)")
    p.add_argument("--mlp", action="store_true", help="profile the MLP blocks instead (--shape is M,d,H)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    default = ("4096,1024,4096" if cuda else "64,32,96") if args.mlp else ("4096,4096,4096" if cuda else "64,128,96")
    m, k, n = (int(s) for s in (args.shape or default).split(","))
    dtype = torch.bfloat16 if cuda else torch.float32
    for label, steps in (_mlp_steps if args.mlp else _linear_steps)(m, k, n, args.activation, args.device, dtype):
        wall, rows = profile_step(steps, args.steps, args.device)
        total = sum(r[1] for r in rows) if cuda else None
        print(f"\n{label}: wall {wall:.3f} ms/step" + (f", kernels {total:.3f} ms/step" if cuda else ""))
        for key, ms, calls in rows[:12]:
            print(f"  {ms:9.4f} ms  x{calls:4.1f}  {key[:110]}")
    return 0


def _linear_steps(m, k, n, activations, device, dtype):
    """(label, full step) of each provider and activation."""
    x, w, b, g = _inputs(m, k, n, device, dtype)
    for act in activations.split(","):
        for name in _providers(device):
            fn = provider_fn(name)
            yield (f"{name}, {m} x {k} x {n} {dtype}, {act}", in_context(
                name, lambda fn=fn, act=None if act == "none" else act: torch.autograd.grad(fn(x, w, b, act), (x, w, b), g)
            ))


def _mlp_steps(m, d, hidden, _activations, device, dtype):
    """(label, training step) of each MLP block kind and provider of ``bench --mlp``."""
    for kind in blocks.KINDS:
        made = blocks.blocks(d, hidden, kind, device, dtype, _providers(device))
        x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(m, d, device=device, dtype=dtype)
        for name, block in made.items():
            params = (x, *block.parameters())
            yield (f"{name} MLP {kind}, {m} x {d} x {hidden} {dtype}",
                   in_context(name, lambda block=block, params=params: torch.autograd.grad(block(x), params, g)))


if __name__ == "__main__":
    raise SystemExit(main())
