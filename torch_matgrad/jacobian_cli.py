"""Print the block structure of the notes' Jacobians and check notes = backward = autograd.

For a small random example (``W``: ``m x n``, ``X``: ``n x b``) it prints each Jacobian of
``docs/MATH.md`` items 5-8 and of ``out = act(x W^T + b)`` as a grid of named blocks
(``X^T``, ``W``, ``w_ik I``, ``0``, ...), recognised in the dense matrix itself. Then, for
every backend on this machine and every activation, the gradients ``vec(G)^T J`` from the
Jacobians against the op's backward and against autograd of ``torch.nn.functional``
(float64, max abs error). Exit code 1 on any mismatch.
"""

from __future__ import annotations

import argparse
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, formulas, jacobian
from .cli import ACTIVATION_NAMES, Table, activation, activation_name, rows_on_every_backend
from .function import linear

# float64 products of a few dozen O(1) terms round at ~1e-15; an error of 1e-10 is a wrong
# formula, not rounding.
TOLERANCE = 1e-10

_COLUMNS = ("backend", "device", "activation", "notes vs backward", "notes vs autograd", "status")
_WIDEST = (6, 4, 9, 7, 7, 8)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--m", type=int, default=2, help="rows of W, out_features (default 2)")
    parser.add_argument("--n", type=int, default=3, help="columns of W, in_features (default 3)")
    parser.add_argument("--b", type=int, default=2, help="samples: columns of X, rows of x (default 2)")
    parser.add_argument(
        "--activation",
        default="gelu",
        type=str.lower,
        choices=ACTIVATION_NAMES,
        help=f"activation for the nn.Linear-convention maps: {', '.join(ACTIVATION_NAMES)} (default gelu)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


# Blocks are products of the example's float64 entries, so a match is exact up to rounding.
_RTOL = 1e-12

# Block maps are for reading: past this size a grid no longer fits a terminal.
MAX_MAP_SIZE = 16


def _label(block: Tensor, names: Dict[str, Tensor], scalars: Dict[str, float]) -> str:
    """The name of ``block``: ``0``, a named matrix, or a named scalar times one; else ``?``."""
    if not block.any():
        return "0"
    for name, mat in names.items():
        if mat.shape != block.shape or not mat.any():
            continue
        if torch.allclose(block, mat, rtol=_RTOL, atol=0):
            return name
        k = mat.reshape(-1).abs().argmax()
        ratio = (block.reshape(-1)[k] / mat.reshape(-1)[k]).item()
        if torch.allclose(block, ratio * mat, rtol=_RTOL, atol=0):
            for sname, s in scalars.items():
                if abs(s - ratio) <= _RTOL * abs(s):
                    return f"{sname} {name}"
    return "?"


def _ij(i: int, j: int) -> str:
    """1-based subscript ``ij``, with a comma once an index has two digits."""
    return f"{i + 1}{j + 1}" if max(i, j) < 9 else f"{i + 1},{j + 1}"


def block_map(
    dense: Tensor, block: Tuple[int, int], names: Dict[str, Tensor], scalars: Optional[Dict[str, float]] = None
) -> List[List[str]]:
    """The grid of labels of ``dense`` cut into ``block``-shaped blocks."""
    r, c = block
    scalars = scalars or {}
    return [
        [_label(dense[i : i + r, j : j + c], names, scalars) for j in range(0, dense.shape[1], c)]
        for i in range(0, dense.shape[0], r)
    ]


def _format_grid(grid: Sequence[Sequence[str]]) -> str:
    width = max(len(s) for row in grid for s in row)
    return "\n".join("  [ " + "  ".join(s.ljust(width) for s in row) + " ]" for row in grid)


def _maps(m: int, n: int, b: int, activation, generator) -> List[Tuple[str, Tensor, Tuple[int, int], dict, dict]]:
    """``(title, dense Jacobian, block shape, matrix names, scalar names)`` for each map."""
    W = torch.randn(m, n, generator=generator, dtype=torch.float64)
    X = torch.randn(n, b, generator=generator, dtype=torch.float64)
    bias = torch.randn(m, generator=generator, dtype=torch.float64)
    x = X[:, 0]
    w_ik = {f"w{_ij(i, k)}": W[i, k].item() for i in range(m) for k in range(n)}
    maps = [
        ("item 5: dy/dW~ = I_m (x) x^T, y = W x (x = X[:, 0])", jacobian.dy_dW(x, m), (1, n), {"x^T": x[None]}, {}),
        ("item 6: dY~/dW~ = I_m (x) X^T, Y = W X", jacobian.dY_dW(X, m), (b, n), {"X^T": X.T}, {}),
        ("item 7: d(Y^T)~/d(X^T)~ = I_b (x) W", jacobian.dYT_dXT(W, b), (m, n), {"W": W}, {}),
        ("item 8: dY~/dX~ = W (x) I_b", jacobian.dY_dX(W, b), (b, b), {"I": torch.eye(b, dtype=W.dtype)}, w_ik),
    ]
    # PyTorch's rows: x = X^T (b x n); out = act(x W^T + bias). D_r = diag(act'(z_r)) for row r.
    rows = X.T
    jac = jacobian.linear_jacobians(rows, W, bias, activation)
    d = jacobian.activation_derivative(formulas.preactivation(rows, W, bias), activation)
    act = "" if activation is None else "D "
    if d is None:
        diag = {"I": torch.eye(m, dtype=W.dtype)}
        per_row_w = {"W": W}
        d_ri = {}
    else:
        diag = {f"D{r + 1}": torch.diag(d[r]) for r in range(b)}
        per_row_w = {f"D{r + 1} W": torch.diag(d[r]) @ W for r in range(b)}
        d_ri = {f"d{_ij(r, i)}": d[r, i].item() for r in range(b) for i in range(m)}
    conv = f"out = {activation or 'identity'}(x W^T + b), x = X^T"
    maps += [
        (f"rows: d out~/dx~ = {act}(I_B (x) W), {conv}", jac.input, (m, n), per_row_w, {}),
        (
            f"rows: d out~/dW~ = {act}(x (x) I_m) P, one row per output",
            jac.weight,
            (1, n),
            {f"x{r + 1}^T": rows[r : r + 1] for r in range(b)},
            d_ri,
        ),
        (f"rows: d out~/db = {act}(1_B (x) I_m)", jac.bias, (m, m), diag, {}),
    ]
    return [(title, j.dense(), block, names, scalars) for title, j, block, names, scalars in maps]


def three_way(backend: str, device: str, activation, m: int, n: int, b: int, generator) -> Tuple[float, float]:
    """Max abs differences (notes vs the op's backward, notes vs autograd) of
    ``(grad_x, grad_W, grad_b)`` for random float64 data and a random ``G``."""
    x, weight, bias, grad = (
        torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)
        for shape in ((b, n), (m, n), (m,), (b, m))
    )
    notes = jacobian.linear_vjp(grad, x, weight, bias, activation)
    inputs = [t.detach().requires_grad_() for t in (x, weight, bias)]
    with dispatch.use_backend(backend):  # the op's backward runs the backend of its forward
        out = linear(*inputs, activation=activation)
    backward = torch.autograd.grad(out, inputs, grad)
    autograd = torch.autograd.grad(formulas.activate(F.linear(*inputs), activation), inputs, grad)
    return tuple(
        max((a - o).abs().max().item() for a, o in zip(notes, other) if a.numel()) for other in (backward, autograd)
    )


def three_way_rows(backend: str, device: str, m: int, n: int, b: int, seed: int) -> Iterator[tuple]:
    """``(backend, device, activation, notes vs backward, notes vs autograd)`` per activation."""
    generator = torch.Generator().manual_seed(seed)
    for act in formulas.ACTIVATIONS:
        yield (backend, device, activation_name(act), *three_way(backend, device, act, m, n, b, generator))


def run(args) -> int:
    if min(args.m, args.n, args.b) < 1:
        raise SystemExit(f"torch_matgrad jacobian: --m, --n and --b must be positive, got {args.m}, {args.n}, {args.b}")
    act = activation(args.activation)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"W: {args.m} x {args.n}, X: {args.n} x {args.b} (float64, seed {args.seed}); ~ is the row-major vec")
    if act is not None:
        print(f"D = diag({act}'(z~)), Dr its block for row r of x, drk = {act}'(z_rk)")
    print("P permutes W~ into (W^T)~; blocks of 0 are zero\n")
    unknown = 0
    if max(args.m, args.n, args.b) > MAX_MAP_SIZE:
        print(f"(block maps are printed for --m, --n, --b up to {MAX_MAP_SIZE})\n")
    else:
        for title, dense, block, names, scalars in _maps(args.m, args.n, args.b, act, generator):
            grid = block_map(dense, block, names, scalars)
            unknown += sum(s == "?" for row in grid for s in row)
            print(f"{title}\n  {dense.shape[0]} x {dense.shape[1]}, blocks of {block[0]} x {block[1]}")
            print(_format_grid(grid) + "\n")
    print("vec(G)^T J (the notes) vs the op's backward vs autograd, float64, max abs error:")
    table = Table(_COLUMNS, _WIDEST)
    total = failed = 0
    for row in rows_on_every_backend(three_way_rows, args.m, args.n, args.b, args.seed):
        ok = max(row[3], row[4]) <= TOLERANCE
        table.row((*row[:3], f"{row[3]:.1e}", f"{row[4]:.1e}", "ok" if ok else "MISMATCH"))
        total += 1
        failed += not ok
    summary = f"\n{total - failed} agree, {failed} mismatch"
    print(summary + (f"; {unknown} unrecognised blocks" if unknown else ""))
    return 1 if failed or unknown else 0
