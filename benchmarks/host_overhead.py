"""Host overhead and kernel time of one inference call at decoding shapes.

For each shape and provider (``eager``: ``F.linear`` + activation; ``torch``/``triton``:
``torch_matgrad.linear`` with that backend forced), under ``torch.no_grad``:

* ``host us``: wall time per call of a loop of calls that never waits for the GPU. When
  this exceeds the kernel time, the GPU idles between calls and the host is the limit.
* ``graph us``: time per call of a CUDA graph holding 20 calls, replayed (CUDA events):
  the GPU work alone, with no host in the way (what an inference server that captures
  graphs pays).

Then a profile of the slowest provider's host path (top functions by own and by cumulative time).

Usage: python benchmarks/host_overhead.py [--device cuda|cpu] [--calls N]
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
from torch_matgrad.formulas import activate

SHAPES = {
    "cuda": [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 11008), (64, 11008, 4096), (512, 4096, 4096)],
    "cpu": [(1, 64, 32), (8, 256, 256)],
}
PROVIDERS = ("eager", "torch", "triton")
GRAPH_CALLS = 20


def _fn(provider, act):
    if provider == "eager":
        return lambda x, w, b: activate(F.linear(x, w, b), act)

    def run(x, w, b):
        with torch_matgrad.use_backend(provider):
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


def _graph_us(fn, args):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / GRAPH_CALLS)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=300, help="calls per host timing (default 300)")
    parser.add_argument("--activation", default="gelu_tanh", choices=("none", "gelu_tanh", "silu"))
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    act = None if args.activation == "none" else args.activation
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    providers = [p for p in PROVIDERS if cuda or p != "triton"]
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
                graph = _graph_us(fn, (x, w, b)) if cuda else float("nan")
                print(f"{f'{m} x {k} x {n}':>18} {p:>8} {host:9.1f} {graph:9.1f}", flush=True)
                if host > slowest[0]:
                    slowest = (host, (p, fn, (x, w, b)))
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
