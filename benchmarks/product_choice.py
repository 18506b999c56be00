"""Which product of the Triton backend's linear op is faster where: the fused kernel or
cuBLAS. Its table is what ``dispatch.CUBLAS_PRODUCTS`` cites.

For each shape (``M`` rows, ``K`` in-features, ``N`` out-features; decoding, narrow and
wide layers: ``dispatch.shape_class``), bf16, and each activation (none, GELU-tanh),
times each product both ways (``dispatch.products_on_cublas``), replayed from a CUDA
graph (``bench.measure.graph_ms``: the GPU's time, the host out of the way):

* ``forward``: ``triton_backend.forward`` with ``z`` stored (the training forward);
  on cuBLAS, torch's GEMM and the activation after it;
* ``grad_x``: the backward asked for ``grad_x`` alone: the ``G_z`` pass, then ``G_z W``;
* ``grad_w``: asked for ``grad_W`` and ``grad_b``: on the kernel the pass and one launch
  that sums ``grad_b``; on cuBLAS the pass writing ``grad_b`` beside ``G_z``, then the GEMM.

Each result is first checked against a float32 torch reference. A shape class's product
goes to cuBLAS where cuBLAS's geometric-mean time over the class's cases is below
``MARGIN`` of the kernel's (a tie keeps the kernel, and its fused elementwise work).
Writes ``product_choice.csv`` (every case, with device, versions and commit) and
``product_choice.md`` (per case both times and the ratio; per class and product the
geometric mean and the choice; the ``CUBLAS_PRODUCTS`` entry for the card, and whether
``dispatch`` holds it) into ``--out``.

Usage: python benchmarks/product_choice.py --out DIR [--replays 20] [--warm]
``--warm`` runs each case once, untimed, writing nothing. Without a GPU it is a dry run
under Triton's interpreter on tiny shapes (the tooling only: no time is measured).
Exit status 1 if a result does not match the reference.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter must be on before the kernels are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch_matgrad import dispatch, formulas, triton_backend  # noqa: E402
from torch_matgrad.bench.environment import environment  # noqa: E402
from torch_matgrad.bench.measure import graph_ms  # noqa: E402
from torch_matgrad.bench.report import format_table  # noqa: E402

#: ``(M, K, N)`` per class: decoding rows through Llama-sized projections, narrow layers
#: (GPT-2/BERT-sized and 2048-wide), and the wide quick shapes.
SHAPES = [
    (1, 4096, 4096), (16, 4096, 4096), (1, 4096, 14336), (1, 14336, 4096), (16, 4096, 14336),
    (8192, 768, 3072), (8192, 3072, 768), (4096, 1024, 4096), (4096, 2048, 8192),
    (4096, 4096, 4096), (2048, 4096, 11008), (2048, 11008, 4096), (8192, 4096, 14336),
]
DRY_RUN_SHAPES = [(3, 40, 24), (40, 24, 33)]
ACTIVATIONS = (None, "gelu_tanh")
#: cuBLAS takes a product where its time is below this share of the kernel's.
MARGIN = 0.98
#: bf16 result against a float32 reference on the same inputs: one rounding is ~2^-9.
TOLERANCE = 2e-2
COLUMNS = (
    "date", "commit", "device_name", "torch", "triton", "M", "K", "N", "class", "activation", "product",
    "kernel_ms", "cublas_ms", "cublas_over_kernel", "rel_err_kernel", "rel_err_cublas",
)


def _operands(m, k, n, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # x and W at 1/sqrt(K) keep z near unit scale, where act' varies.
    return randn(m, k), randn(n, k, scale=k ** -0.5), randn(n), randn(m, n)


def _calls(product, activation, x, w, b, grad):
    """``(call, reference)``: ``call()`` computes the product's outputs on the backend;
    ``reference`` is what they should be, in float32."""
    if product == "forward":
        def call():
            out, z_ = triton_backend.forward(x, w, b, activation, dispatch.cublas_products(x.device, *x.shape))
            return [out] if z_ is None else [out, z_]
        ref_out, ref_z = formulas.forward(x.float(), w.float(), b.float(), activation)
        return call, [ref_out] if ref_z is None else [ref_out, ref_z]
    needs = (True, False, False) if product == "grad_x" else (False, True, True)
    z = None if activation is None else formulas.forward(x, w, b, None)[0]  # what the backward saves

    def call():
        on = dispatch.cublas_products(x.device, x.shape[0], x.shape[1])
        return [t for t in triton_backend.backward(grad, None, x, w, z, activation, needs, on) if t is not None]
    want = formulas.backward(grad.float(), None, x.float(), w.float(), None if z is None else z.float(), activation,
                             needs)
    return call, [t for t in want if t is not None]


def _rel_err(got, want) -> float:
    return max(((g.float() - r).norm() / r.norm().clamp_min(1e-30)).item() for g, r in zip(got, want))


def measure(shapes, device, replays, warm_only=False):
    env = {c: v for c, v in environment(device).items() if c in COLUMNS}
    rows = []
    for m, k, n in shapes:
        x, w, b, grad = _operands(m, k, n, device, torch.bfloat16)
        for activation in ACTIVATIONS:
            for product in dispatch.PRODUCTS:
                row = {**env, "M": m, "K": k, "N": n, "class": dispatch.shape_class(m, k),
                       "activation": activation or "none", "product": product}
                for side, chosen in (("kernel", ()), ("cublas", (product,))):
                    with dispatch.products_on_cublas(chosen):
                        call, want = _calls(product, activation, x, w, b, grad)
                        got = call()
                        if warm_only:
                            continue
                        row[f"rel_err_{side}"] = f"{_rel_err(got, want):.2e}"
                        # The GPU's time per call, 10 calls to a graph (decoding products take
                        # microseconds); no time without a GPU.
                        row[f"{side}_ms"] = graph_ms(call, calls=10, replays=replays) if device == "cuda" else math.nan
                if not warm_only:
                    row["cublas_over_kernel"] = row["cublas_ms"] / row["kernel_ms"]
                    rows.append(row)
    return rows


def _geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def choice(rows):
    """``{class: {product: geomean cuBLAS / kernel}}`` over the measured cases."""
    ratios = {}
    for r in rows:
        if r["cublas_over_kernel"] == r["cublas_over_kernel"]:
            ratios.setdefault(r["class"], {}).setdefault(r["product"], []).append(r["cublas_over_kernel"])
    return {cls: {p: _geomean(v) for p, v in by_product.items()} for cls, by_product in ratios.items()}


def rule_entry(means) -> dict:
    """The ``CUBLAS_PRODUCTS`` entry of the card: per class, the products cuBLAS wins."""
    entry = {}
    for cls in dispatch.SHAPE_CLASSES:
        won = frozenset(p for p, ratio in means.get(cls, {}).items() if ratio < MARGIN)
        if won:
            entry[cls] = won
    return entry


def _fmt(v, digits=4):
    return "-" if v != v else f"{v:.{digits}f}"


def report(rows, card: str) -> str:
    header = ["M x K x N", "class", "activation", "product", "kernel ms", "cuBLAS ms", "cuBLAS / kernel"]
    lines = [[f"{r['M']} x {r['K']} x {r['N']}", r["class"], r["activation"], r["product"], _fmt(r["kernel_ms"]),
              _fmt(r["cublas_ms"]), _fmt(r["cublas_over_kernel"], 3)] for r in rows]
    means = choice(rows)
    summary = [[cls, p, _fmt(ratio, 3), "cuBLAS" if ratio < MARGIN else "kernel"]
               for cls, by_product in means.items() for p, ratio in by_product.items()]
    entry = rule_entry(means)
    literal = "{" + ", ".join(f"{cls!r}: frozenset({sorted(ps)!r})" for cls, ps in entry.items()) + "}"
    held = dispatch.CUBLAS_PRODUCTS.get(card, {})
    agrees = "holds this entry" if held == entry else f"holds {held!r}: update it"
    return "\n\n".join([
        format_table(header, lines, markdown=True),
        f"Geometric mean of cuBLAS / kernel time per shape class (cuBLAS below {MARGIN}: it takes the product):",
        format_table(["class", "product", "geomean", "runs on"], summary, markdown=True),
        f"`dispatch.CUBLAS_PRODUCTS[{card!r}] = {literal}`; `dispatch` {agrees}.",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for product_choice.csv and product_choice.md")
    parser.add_argument("--replays", type=int, default=20, help="graph replays per case (the median is kept)")
    parser.add_argument("--warm", action="store_true", help="run each case once untimed and write nothing")
    args = parser.parse_args(argv)
    if not args.warm and args.out is None:
        parser.error("--out is required unless --warm")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("No CUDA GPU: DRY RUN under Triton's interpreter (no time is measured)")
    rows = measure(SHAPES if device == "cuda" else DRY_RUN_SHAPES, device, args.replays, warm_only=args.warm)
    if args.warm:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "product_choice.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    env = environment(device)
    card = dispatch.card(torch.device(device, 0) if device == "cuda" else torch.device(device))
    title = (f"**{env['device_name']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; "
             f"{env['date']}; bf16; each time the median of CUDA-graph replays of 10 calls**")
    text = f"{title}\n\n{report(rows, card)}\n"
    (args.out / "product_choice.md").write_text(text)
    print(text)
    wrong = [r for r in rows if max(float(r["rel_err_kernel"]), float(r["rel_err_cublas"])) > TOLERANCE]
    for r in wrong:
        print(f"MISMATCH: {r['M']} x {r['K']} x {r['N']} {r['product']} ({r['activation']}): relative error "
              f"kernel {r['rel_err_kernel']}, cuBLAS {r['rel_err_cublas']} > {TOLERANCE}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
