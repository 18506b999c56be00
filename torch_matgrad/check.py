"""Gradcheck every backend available on this machine and print a table.

For each backend, activation and bias/no-bias it runs ``torch.autograd.gradcheck``
and ``gradgradcheck`` in float64 on ragged random shapes, and compares the float32
output and gradients with a float64 ``torch.nn.functional`` reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from typing import List, Sequence

import torch
import torch.nn.functional as F

from . import dispatch
from .formulas import ACTIVATIONS, activate
from .function import linear

_COLUMNS = ("backend", "device", "activation", "bias", "gradcheck", "gradgradcheck", "max rel err fp32")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _inputs(device, dtype, bias, generator, shape=(7, 5, 3)):
    m, k, n = shape
    x = torch.randn(m, k, generator=generator, dtype=torch.float64).to(device, dtype)
    w = torch.randn(n, k, generator=generator, dtype=torch.float64).to(device, dtype)
    b = torch.randn(n, generator=generator, dtype=torch.float64).to(device, dtype) if bias else None
    return [t.requires_grad_() for t in (x, w, b) if t is not None]


def _max_rel_err(backend: str, device: str, activation, bias: bool, generator) -> float:
    """Output and all gradients in float32 through ``backend`` against float64 F.linear."""
    ref_in = _inputs("cpu", torch.float64, bias, generator, shape=(33, 17, 9))
    test_in = [t.detach().to(device, torch.float32).requires_grad_() for t in ref_in]
    grad = torch.randn(33, 9, generator=generator, dtype=torch.float64)
    with dispatch.use_backend(backend):
        out = linear(*test_in, activation=activation)
    ref = activate(F.linear(*ref_in), activation)
    got = [out, *torch.autograd.grad(out, test_in, grad.to(device, torch.float32))]
    want = [ref, *torch.autograd.grad(ref, ref_in, grad)]
    return max(((g.double().cpu() - w).norm() / w.norm().clamp_min(1e-30)).item() for g, w in zip(got, want))


def check_backend(backend: str, device: str, seed: int = 0) -> List[tuple]:
    """Rows of the table for one backend on one device."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for activation in ACTIVATIONS:
        for bias in (True, False):
            inputs = _inputs(device, torch.float64, bias, generator)

            def fn(*ts):
                with dispatch.use_backend(backend):
                    return linear(*ts, activation=activation)

            ok1 = torch.autograd.gradcheck(fn, inputs, raise_exception=False)
            ok2 = torch.autograd.gradgradcheck(fn, inputs, raise_exception=False)
            err = _max_rel_err(backend, device, activation, bias, generator)
            rows.append((backend, device, str(activation), "yes" if bias else "no", ok1, ok2, err))
    return rows


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def available_backends() -> Sequence[tuple]:
    """``(backend, device)`` pairs this process can run. ``("triton", "cpu")`` is
    Triton's interpreter, listed only when ``TRITON_INTERPRET=1`` is set (it must be on
    before the kernels are imported)."""
    pairs = [("torch", "cpu")]
    if _has_triton() and os.environ.get("TRITON_INTERPRET") == "1":
        pairs.append(("triton", "cpu"))
    if torch.cuda.is_available():
        pairs += [("torch", "cuda")] + ([("triton", "cuda")] if _has_triton() else [])
    return pairs


def _interpreter_rows(seed: int) -> List[tuple]:
    """The Triton interpreter's rows, from a child process that switches it on."""
    code = (
        "import json, sys; from torch_matgrad.check import check_backend; "
        "print(json.dumps(check_backend('triton', 'cpu', int(sys.argv[1]))))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(seed)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, check=True,
    )
    return [tuple(row) for row in json.loads(child.stdout.strip().splitlines()[-1])]


def format_table(rows: Sequence[tuple]) -> str:
    cells = [_COLUMNS] + [
        (*r[:4], "pass" if r[4] else "FAIL", "pass" if r[5] else "FAIL", f"{r[6]:.1e}") for r in rows
    ]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(_COLUMNS))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# A float32 result 1e-4 away from float64 (relative, over the whole tensor) means a
# wrong formula, not rounding: fp32 GEMMs of these sizes land near 1e-7.
FP32_TOLERANCE = 1e-4


def run(args) -> int:
    pairs = available_backends()
    rows = [row for backend, device in pairs for row in check_backend(backend, device, args.seed)]
    if _has_triton() and ("triton", "cpu") not in pairs:
        rows += _interpreter_rows(args.seed)
    print(format_table(rows))
    failed = [r for r in rows if not (r[4] and r[5] and r[6] < FP32_TOLERANCE)]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
