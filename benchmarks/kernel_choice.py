"""Which GEMM kernel wins where: the pointer kernel against the descriptor (TMA) kernel.

For each shape of a set (default: the bench's ``gpu_quick``), bf16, and each product the
Triton backend launches, times ``ops.fused_matmul`` with each kernel forced
(``ops.gemm_kernel``), after checking both against a float32 torch reference:

* ``forward``: ``x W^T + b``, no activation; ``forward gelu_tanh``: with the activation
  and the store of ``z`` (the training forward);
* ``grad_x``: ``G_z W``; ``grad_W + grad_b``: ``G_z^T x`` with the row sums (the backward's
  default, ``G_z`` from the elementwise pass, so no prologue).

Each time is ``triton.testing.do_bench`` (CUDA events, L2 flushed; median and 20th/80th
percentiles) of the kernel as autotuned (``$TORCH_MATGRAD_TRITON_CONFIGS`` narrows both
kernels' configurations). Writes ``kernel_choice.csv`` (every row, with the device,
versions and commit) and ``kernel_choice.md`` (per case: both times, the configuration
each autotuner chose, descriptor / pointer time, the winner; then the geometric mean per
product) into ``--out``; ``ops.gemm_kernel_for`` is where a shape class that the pointer
kernel wins would be sent back to it.

Decoding rows (``--shapes decode``, M <= 16) split K where the grid leaves SMs idle
(``ops.split_k``); ``--split-k off`` (or a number of slices) times them otherwise, so two
runs into two folders compare the split with the plain product.

Usage: python benchmarks/kernel_choice.py --out DIR [--shapes gpu_quick] [--rep-ms 50] [--warm] [--split-k auto]
``--warm`` runs each case once, untimed, writing nothing: ``gpu_check.sh`` fills the Triton
cache this way, one process per configuration. Without a GPU it is a dry run under
Triton's interpreter on two small shapes (the tooling only: no figure means anything).
Exit status 1 if a kernel's result does not match the reference.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

DEVICE_ARG = "--device"


def _device() -> str:
    args = sys.argv[1:]
    if DEVICE_ARG in args:
        return args[args.index(DEVICE_ARG) + 1]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# The interpreter must be on before the kernels are imported.
if _device() == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from torch_matgrad.bench.environment import environment  # noqa: E402
from torch_matgrad.bench.plans import SHAPE_SETS  # noqa: E402
from torch_matgrad.bench.report import format_table  # noqa: E402
from torch_matgrad.formulas import grad_bias  # noqa: E402
from torch_matgrad.triton_kernels import launch, ops  # noqa: E402

KERNELS = ("pointer", "tma")
PRODUCTS = ("forward", "forward gelu_tanh", "grad_x", "grad_W + grad_b")
# Relative error (Frobenius) of a bf16 result against the float32 reference on the same
# inputs: one rounding of the output is ~2^-9; a wrong tile is far above this.
TOLERANCE = 2e-2
# The dry run's shapes: multiples of 8, so that the descriptor kernel is valid, and
# several of the interpreter's 32 x 32 tiles.
DRY_RUN_SHAPES = [(104, 40, 48), (72, 64, 40)]
COLUMNS = (
    "date", "commit", "device_name", "torch", "triton", "M", "K", "N", "product", "kernel", "ran", "split_k",
    "config", "ms", "ms_p20", "ms_p80", "tflops", "rel_err",
)


def _operands(m, k, n, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    return randn(m, k), randn(n, k), randn(n), randn(m, n)


def _product(name, x, w, b, gz):
    """``(kwargs-free call, operands the choice looks at, float32 reference)``."""
    if name == "forward":
        call = lambda: ops.fused_matmul(x, w.t(), bias=b)  # noqa: E731
        ref = [x.float() @ w.float().t() + b.float()]
        chosen = (x, w.t(), None, x.new_empty(x.shape[0], w.shape[0]))
    elif name == "forward gelu_tanh":
        call = lambda: ops.fused_matmul(x, w.t(), bias=b, activation="gelu_tanh", store_z=True)  # noqa: E731
        z = x.float() @ w.float().t() + b.float()
        ref = [torch.nn.functional.gelu(z, approximate="tanh"), z]
        chosen = (x, w.t(), None, x.new_empty(x.shape[0], w.shape[0]))
    elif name == "grad_x":
        call = lambda: ops.fused_matmul(gz, w)  # noqa: E731
        ref = [gz.float() @ w.float()]
        chosen = (gz, w, None, x.new_empty(x.shape))
    else:
        call = lambda: ops.fused_matmul(gz.t(), x, rowsum=True)  # noqa: E731
        ref = [gz.float().t() @ x.float(), None, grad_bias(gz.float())]
        chosen = (gz.t(), x, None, w.new_empty(w.shape))
    return call, chosen, ref


def _rel_errs(got, ref) -> str:
    """Each checked output's relative error, ``/``-separated in the outputs' order (C, z
    or the row sums): a mismatch then says which output is off."""
    return "/".join(
        f"{((g.float() - r).norm() / r.norm().clamp_min(1e-30)).item():.2e}" for g, r in zip(got, ref) if r is not None
    )


def _time(call, device, rep_ms):
    if device != "cuda":
        return (float("nan"),) * 3  # the interpreter's time says nothing
    from triton.testing import do_bench

    return tuple(do_bench(call, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))


def _best_config(kernel: str) -> str:
    cached = launch.TMA if kernel == "tma" else launch.POINTER
    best = getattr(cached.tuner, "best_config", None)  # the autotuner's choice at the key's first launch
    return ops.config_name(best) if best is not None else "interpreter"


def measure(shapes, device, rep_ms, warm_only=False, split_k="auto"):
    env = {c: v for c, v in environment(device).items() if c in COLUMNS}
    # Warming up, a process whose $TORCH_MATGRAD_TRITON_CONFIGS names configurations of
    # one kernel only runs that kernel (the other would compile its fallback for nothing).
    kernels = [k for k in KERNELS if not warm_only or (launch.TMA if k == "tma" else ops.selected_configs())]
    rows = []
    for m, k, n in shapes:
        x, w, b, gz = _operands(m, k, n, device)
        for product in PRODUCTS:
            call, (a, bb, saved, out), ref = _product(product, x, w, b, gz)
            for kernel in kernels:
                with ops.gemm_kernel(kernel), ops.split_k(split_k):
                    ran = ops.gemm_kernel_for(a, bb, saved, (out,))
                    got = call()
                    if warm_only:
                        continue
                    err = _rel_errs(got, ref)
                    config = _best_config(ran)
                    ms, p20, p80 = _time(call, device, rep_ms)
                rows.append({
                    **env, "M": m, "K": k, "N": n, "product": product, "kernel": kernel, "ran": ran, "split_k": split_k,
                    "config": config,
                    "ms": ms, "ms_p20": p20, "ms_p80": p80, "tflops": 2 * m * n * k / ms / 1e9, "rel_err": err,
                })
    return rows


def _fmt(v, digits=4):
    return "-" if v != v else f"{v:.{digits}f}"


def report(rows) -> str:
    """Markdown: one line per case, then the geometric mean of descriptor / pointer per product."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["M"], r["K"], r["N"], r["product"]), {})[r["kernel"]] = r
    header = ["M x K x N", "product", "pointer ms (config)", "descriptor ms (config)", "descriptor / pointer", "winner"]
    lines, ratios = [], {}
    for (m, k, n, product), pair in by_case.items():
        p, t = pair.get("pointer"), pair.get("tma")
        if p is None or t is None:
            continue
        ratio = t["ms"] / p["ms"] if p["ms"] == p["ms"] and t["ms"] == t["ms"] else float("nan")
        if t["ran"] != "tma":
            winner = "pointer (descriptor kernel not valid here)"
        elif ratio != ratio:
            winner = "-"
        else:
            winner = "descriptor" if ratio < 1 else "pointer"
            ratios.setdefault(product, []).append(ratio)
        lines.append([
            f"{m} x {k} x {n}", product, f"{_fmt(p['ms'])} ({p['config']})", f"{_fmt(t['ms'])} ({t['config']})",
            _fmt(ratio, 3), winner,
        ])
    text = format_table(header, lines, markdown=True)
    if ratios:
        summary = [[product, _fmt(math.exp(sum(map(math.log, rs)) / len(rs)), 3), str(len(rs))]
                   for product, rs in ratios.items()]
        text += "\n\nGeometric mean of descriptor / pointer time (below 1: the descriptor kernel is faster):\n\n"
        text += format_table(["product", "geomean", "cases"], summary, markdown=True)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for kernel_choice.csv and kernel_choice.md")
    parser.add_argument("--shapes", default=None, help="a torch_matgrad.bench shape set (default gpu_quick)")
    parser.add_argument("--rep-ms", type=float, default=50.0, help="do_bench's repetition time per case")
    parser.add_argument("--warm", action="store_true", help="run each case once untimed and write nothing")
    parser.add_argument("--split-k", default="auto", help="ops.split_k's mode: auto, off or a number of slices")
    parser.add_argument(DEVICE_ARG, choices=("cuda", "cpu"), default=_device())
    args = parser.parse_args(argv)
    if not args.warm and args.out is None:
        parser.error("--out is required unless --warm")
    if args.device == "cuda":
        shapes = SHAPE_SETS[args.shapes or "gpu_quick"]
    else:
        shapes = SHAPE_SETS[args.shapes] if args.shapes else DRY_RUN_SHAPES
        print("No CUDA GPU: DRY RUN under Triton's interpreter (no time means anything)")
    rows = measure(shapes, args.device, args.rep_ms, warm_only=args.warm, split_k=args.split_k)
    if args.warm:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "kernel_choice.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    env = environment(args.device)
    title = (f"**{env['device_name']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; "
             f"{env['date']}; bf16; split-K {args.split_k}; "
             f"timed by {'cuda events' if args.device == 'cuda' else 'nothing (dry run)'}**")
    text = f"{title}\n\n{report(rows)}\n"
    (args.out / "kernel_choice.md").write_text(text)
    print(text)
    wrong = [r for r in rows if not all(float(e) <= TOLERANCE for e in r["rel_err"].split("/"))]
    for r in wrong:
        print(f"MISMATCH: {r['M']} x {r['K']} x {r['N']} {r['product']}, {r['kernel']} kernel ({r['ran']} ran, "
              f"{r['config']}): relative error {r['rel_err']} > {TOLERANCE}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
