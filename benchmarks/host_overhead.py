"""Host overhead and kernel time of one inference call at decoding shapes.

For each shape and provider (``eager``: ``F.linear`` + activation; ``torch``/``triton``:
``torch_matgrad.linear`` with that backend forced; ``triton_jit``: the Triton backend with
every launch through Triton's own ``JITFunction.run``, the cached launcher's direct call
switched off, ``launch.direct_launches(False)``), under ``torch.no_grad``:

* ``host us``: wall time per call of a loop of calls that never waits for the GPU. When
  this exceeds the kernel time, the GPU idles between calls and the host is the limit.
* ``graph us``: time per call of a CUDA graph holding 20 calls, replayed (CUDA events):
  the GPU work alone, with no host in the way (what an inference server that captures
  graphs pays).

Then, on a GPU, the Triton backend's host path layer by layer at a shape whose kernel
takes a few microseconds (1 x 256 -> 256, so the loop of calls stays ahead of the GPU):
the compiled kernel's launcher alone with the arguments our last launch gave it (Triton's
own floor), ``launch.run_pointer_kernel``, ``fused_matmul``, ``triton_backend.forward``
and the op, beside ``F.linear`` and the two output allocations: each difference is one
layer's share (``ops.split_k("off")``: one launch each); then ``fused_matmul`` at 1 x 1024
-> 256 split into 4 slices along K, the host cost of a split product's two launches and
workspace. Beside them the descriptor kernel's launcher alone (in one configuration;
on a GPU without TMA, not measured), whose excess over the pointer kernel's is Triton's
per-call encoding of the four descriptors, one ``launch.describe``, and the current
device and stream as the launch asks for them against ``torch.cuda.current_stream()``.
Then a profile of the slowest provider's host path (top functions by own
and by cumulative time).

``--wrapper`` (any machine; on a CPU under ``TRITON_INTERPRET=1``) measures instead the
host time of the launch wrapper alone, per launch: ``triton_backend.forward`` and the
``grad_W + grad_b`` launch, each kernel forced, with the compiled kernel replaced by a
stand-in whose launcher does nothing, so every line from the op's call to the binary's
launcher runs (the direct path of ``launch.CachedKernel``) and nothing of the GPU does.
Process CPU time, best of 7 rounds of 2000 calls.

Usage: python benchmarks/host_overhead.py [--device cuda|cpu] [--calls N] [--wrapper]
On a CPU only ``host us`` is measured (the tiny shapes of the CPU set).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

import torch_matgrad
from torch_matgrad.bench.measure import graph_ms
from torch_matgrad.formulas import activate

SHAPES = {
    "cuda": [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 11008), (64, 11008, 4096), (512, 4096, 4096)],
    "cpu": [(1, 64, 32), (8, 256, 256)],
}
PROVIDERS = ("eager", "torch", "triton", "triton_jit")
GRAPH_CALLS = 20


def _fn(provider, act):
    if provider == "eager":
        return lambda x, w, b: activate(F.linear(x, w, b), act)

    from torch_matgrad.triton_kernels import launch

    backend, direct = ("triton", False) if provider == "triton_jit" else (provider, True)

    def run(x, w, b):
        with torch_matgrad.use_backend(backend), launch.direct_launches(direct):
            return torch_matgrad.linear(x, w, b, activation=act)

    return run


def _host_us(fn, args, calls, sync):
    for _ in range(10):
        fn(*args)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    host = (time.perf_counter() - start) / calls * 1e6
    sync()
    return host


class _Binary:
    """A stand-in for a compiled kernel: its launcher returns at once."""

    function = packed_metadata = None

    def run(self, *args):
        pass

    def launch_metadata(self, *args):
        return None


class _Tuner:
    """A stand-in for the autotuner: chooses ``config`` and hands the stand-in binary."""

    def __init__(self, config):
        self.configs, self.best_config = [config, config], config

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _Binary()


def wrapper_us(rounds: int = 7, calls: int = 2000) -> dict:
    """Host microseconds per launch of the wrapper alone (``--wrapper``; see above)."""
    from torch_matgrad import triton_backend
    from torch_matgrad.triton_kernels import configs, launch, ops

    launch._current_stream = lambda: 0
    launch.POINTER = launch.CachedKernel(launch.POINTER.fn, _Tuner(configs.CONFIGS[1]), first_constexpr="PRO_ACT")
    launch.TMA = launch.CachedKernel(launch.TMA.fn, _Tuner(configs.TMA_CONFIGS[2]), first_constexpr="ROWSUM")
    launch.REDUCE = launch.CachedKernel(launch.REDUCE.fn, _Tuner(configs.REDUCE_CONFIG), first_constexpr="HAS_BIAS")
    x, w, b, g = (torch.randn(*s, dtype=torch.bfloat16) for s in ((256, 512), (1024, 512), (1024,), (256, 1024)))
    cases = {
        "descriptor kernel, forward + bias + GELU-tanh + z": ("tma", lambda: triton_backend.forward(x, w, b, "gelu_tanh")),
        "descriptor kernel, grad_W + grad_b": (
            "tma", lambda: triton_backend.backward(g, None, x, w, None, None, (False, True, True))),
        "pointer kernel, forward + bias": ("pointer", lambda: triton_backend.forward(x, w, b, None)),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):  # interleaved: load from other processes hits every case alike
        for name, (kernel, fn) in cases.items():
            with ops.gemm_kernel(kernel):
                fn()
                start = time.process_time()
                for _ in range(calls):
                    fn()
                best[name] = min(best[name], (time.process_time() - start) / calls * 1e6)
    return best


def _recorded_launch(cached, fn):
    """The launcher and the arguments it gets: the entry of ``fn``'s one kind of launch
    through ``cached``, and a call of it recorded by a stand-in for its launcher."""
    cached.entries.clear()  # this launch's entry alone
    fn()
    ((key, entry),) = cached.entries.items()
    recorded = []
    cached.entries[key] = entry._replace(run=lambda *args: recorded.append(args))
    fn()
    cached.entries[key] = entry
    (args,) = recorded
    return entry.run, args


def breakdown_us(calls: int, device: str = "cuda") -> dict:
    """Host microseconds per call of each layer of the Triton backend's inference path
    (bf16, 1 x 256 -> 256, GELU-tanh with z; pointer kernel), and of the launch's parts
    named in the module's docstring. On a GPU; with ``--wrapper`` also on the CPU, where the
    binary is the stand-in (the dry run of this code)."""
    from torch_matgrad import triton_backend
    from torch_matgrad.triton_kernels import launch, ops

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x, w, b = (torch.randn(*s, device=device, dtype=torch.bfloat16) for s in ((1, 256), (256, 256), (256,)))
    forward = lambda: triton_backend.forward(x, w, b, "gelu_tanh")  # noqa: E731
    # One launch per layer (a row this short would split K on a GPU: timed apart, last).
    with torch_matgrad.use_backend("triton"), torch.no_grad(), ops.split_k("off"):
        with ops.gemm_kernel("pointer"):
            run, args = _recorded_launch(launch.POINTER, forward)
        layers = {"compiled kernel's launcher alone": lambda: run(*args)}
        tma = launch.TMA
        if tma is not None and device == "cuda":  # one configuration to compile (the tests stage's), not every one
            launch.TMA = launch.tma_kernel([ops.TMA_CONFIGS[ops.TMA_CONFIG_NAMES.index("tma_64x128x64_s4_w4")]])
        try:
            with ops.gemm_kernel("tma"):
                if launch.TMA is not None and ops.gemm_kernel_for(x, w.t(), None, (x,)) == "tma":
                    tma_run, tma_args = _recorded_launch(launch.TMA, forward)
                    layers["descriptor kernel's launcher alone"] = lambda: tma_run(*tma_args)
        finally:
            launch.TMA = tma
        out, z, _ = ops.fused_matmul(x, w.t(), bias=b, activation="gelu_tanh", store_z=True, check=False)
        flags, flags_key = ops._flags(torch.bfloat16, "ieee", None, False, True, True, "gelu_tanh", True, False, False,
                                      False, False, False, None)
        layers.update({
            "F.linear + gelu_tanh (eager)": lambda: activate(F.linear(x, w, b), "gelu_tanh"),
            "torch.empty x 2 (the outputs)": lambda: (torch.empty(1, 256, device=device, dtype=torch.bfloat16),
                                                     torch.empty(1, 256, device=device, dtype=torch.bfloat16)),
            "launch.describe (one descriptor)": lambda: launch.describe(x, [64, 64]),
            "launch.run_pointer_kernel": lambda: launch.run_pointer_kernel(
                x, w.t(), out, None, b, z, None, flags, flags_key, ops._NO_MLP),
            "ops.fused_matmul (check=False)": lambda: ops.fused_matmul(
                x, w.t(), bias=b, activation="gelu_tanh", store_z=True, check=False),
            "triton_backend.forward": forward,
            "torch_matgrad.linear (triton backend)": lambda: torch_matgrad.linear(x, w, b, activation="gelu_tanh"),
        })
        if device == "cuda":
            layers.update({
                "launch._current_stream() (current device, then its raw stream)": launch._current_stream,
                "torch.cuda.current_device()": torch.cuda.current_device,
                "torch.cuda.current_stream() (not on the launch path)": torch.cuda.current_stream,
            })
        best = dict.fromkeys(layers, float("inf"))
        # K long enough for 4 slices of the GPU's 256-element granules.
        split = "ops.fused_matmul, 1 x 1024 -> 256 split-K in 4 slices (two launches)"
        x4, w4 = (torch.randn(*s, device=device, dtype=torch.bfloat16) for s in ((1, 1024), (256, 1024)))
        best[split] = float("inf")
        with ops.gemm_kernel("pointer"):
            for _ in range(5):  # rounds interleaved, the best of each: other load hits every layer alike
                for name, fn in layers.items():
                    best[name] = min(best[name], _host_us(fn, (), calls, sync))
                with ops.split_k(4):
                    best[split] = min(best[split], _host_us(lambda: ops.fused_matmul(
                        x4, w4.t(), bias=b, activation="gelu_tanh", store_z=True, check=False), (), calls, sync))
        return best


def _print_breakdown(calls: int, device: str) -> None:
    print(f"\nthe Triton backend's host path by layer ({device}), 1 x 256 -> 256 bf16 GELU-tanh + z, us per call:")
    for name, us in breakdown_us(calls, device).items():
        print(f"{us:8.1f}  {name}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=300, help="calls per host timing (default 300)")
    parser.add_argument("--activation", default="gelu_tanh", choices=("none", "gelu_tanh", "silu"))
    parser.add_argument("--wrapper", action="store_true", help="the launch wrapper's own host time (see above)")
    args = parser.parse_args(argv)
    if args.wrapper:
        torch.set_num_threads(1)
        print(f"launch wrapper, host us per launch (binary stubbed; torch {torch.__version__}):")
        for name, us in wrapper_us().items():
            print(f"{us:8.1f}  {name}")
        _print_breakdown(args.calls, "cpu")
        return
    cuda = args.device == "cuda"
    act = None if args.activation == "none" else args.activation
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    providers = [p for p in PROVIDERS if cuda or not p.startswith("triton")]
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}; activation {args.activation}")
    print(f"{'M x K x N':>18} {'provider':>8} {'host us':>9} {'graph us':>9}")
    slowest = (0.0, None)
    for m, k, n in SHAPES[args.device]:
        x = torch.randn(m, k, device=args.device, dtype=dtype)
        w = torch.randn(n, k, device=args.device, dtype=dtype) * k**-0.5
        b = torch.randn(n, device=args.device, dtype=dtype)
        with torch.no_grad():
            for p in providers:
                fn = _fn(p, act)
                host = _host_us(fn, (x, w, b), args.calls, sync)
                graph = graph_ms(lambda: fn(x, w, b), calls=GRAPH_CALLS) * 1e3 if cuda else float("nan")
                print(f"{f'{m} x {k} x {n}':>18} {p:>8} {host:9.1f} {graph:9.1f}", flush=True)
                if host > slowest[0]:
                    slowest = (host, (p, fn, (x, w, b)))
    if cuda:
        _print_breakdown(args.calls, "cuda")
    p, fn, fargs = slowest[1]
    profile = cProfile.Profile()
    with torch.no_grad():
        profile.runcall(lambda: [fn(*fargs) for _ in range(args.calls)])
    sync()
    for order in ("tottime", "cumulative"):  # where the time is spent, and under which call
        text = io.StringIO()
        pstats.Stats(profile, stream=text).strip_dirs().sort_stats(order).print_stats(14)
        print(f"\nhost profile of {p} ({args.calls} calls), by {order}:")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-2400:])


if __name__ == "__main__":
    main()
