"""Gradcheck every backend available on this machine and print a table.

For each backend, activation and bias/no-bias it runs ``torch.autograd.gradcheck``
and ``gradgradcheck`` in float64 on ragged random shapes, and compares the float32
output and gradients with a float64 ``torch.nn.functional`` reference. Each op's
backward runs the backend its forward ran (the row's); the last column shows what
ran each half, counted by :func:`torch_matgrad.dispatch.recording`. Triton's
interpreter rows come from a child process that switches it on.
"""

from __future__ import annotations

import argparse
from typing import Iterator

import torch
import torch.nn.functional as F

from . import dispatch
from .cli import INTERPRETER, Table, activation_name, planned_backends, rows_on_every_backend
from .cross_entropy import linear_cross_entropy
from .formulas import ACTIVATIONS, activate
from .function import linear

_COLUMNS = ("backend", "device", "activation", "bias", "gradcheck", "gradgradcheck", "max rel err fp32", "ran fwd/bwd")
_WIDEST = (6, 4, 12, 3, 4, 4, 7, 13)  # activation: "lm-head mean", the LM head's rows

# A float32 result 1e-4 away from float64 (relative, over the whole tensor) means a
# wrong formula, not rounding: fp32 GEMMs of these sizes land near 1e-7.
FP32_TOLERANCE = 1e-4


#: Rough seconds per row. On a 2-core Intel Xeon (torch 2.13, Triton 3.9, 2026-12-06) the
#: 13 rows took 3 s on torch ops and 38 s of CPU time under Triton's interpreter, which runs
#: each kernel program in Python (63 s of wall time while other work shared the machine);
#: on a GPU after the kernels are compiled (a first run compiles them: a minute or more).
_ROW_SECONDS = {"torch": 0.25, "triton": 3.0, "cuda": 1.0}
_LM_HEAD_REDUCTIONS = ("mean", "sum", "none")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-interpreter", action="store_true",
                        help="leave out the rows of Triton's interpreter on the CPU (the slow part: "
                        f"about {_ROW_SECONDS['triton']:.0f} s a row on 2 cores)")


def _plan(pairs) -> str:
    """What the check will run, and roughly how long, said before it starts."""
    rows = 2 * len(ACTIVATIONS) + len(_LM_HEAD_REDUCTIONS)
    parts = []
    for backend, device in pairs:
        seconds = rows * _ROW_SECONDS["cuda" if device == "cuda" else backend]
        where = "under Triton's interpreter" if (backend, device) == INTERPRETER else f"on {device}"
        parts.append(f"{rows} rows of {backend} {where} (~{seconds / 60:.0f} min)" if seconds >= 90
                     else f"{rows} rows of {backend} {where} (~{seconds:.0f} s)")
    skip = "; --no-interpreter leaves the interpreter's rows out" if INTERPRETER in pairs else ""
    return "check: " + ", then ".join(parts) + skip


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


def _ran(counts) -> str:
    """``forward/backward`` implementations in ``counts`` (from dispatch.recording)."""
    return "/".join("+".join(sorted({impl for h, impl in counts if h == half})) or "-" for half in ("forward", "backward"))


def check_backend(backend: str, device: str, seed: int = 0) -> Iterator[tuple]:
    """Rows of the table for one backend on one device, one per activation and bias."""
    generator = torch.Generator().manual_seed(seed)
    for activation in ACTIVATIONS:
        for bias in (True, False):
            inputs = _inputs(device, torch.float64, bias, generator)

            def fn(*ts):
                with dispatch.use_backend(backend):  # the forward only: the op keeps it
                    return linear(*ts, activation=activation)

            with dispatch.recording() as ran:
                ok1 = torch.autograd.gradcheck(fn, inputs, raise_exception=False)
                err = _max_rel_err(backend, device, activation, bias, generator)
            # gradgradcheck differentiates the backward: it runs under create_graph,
            # which is torch ops on every backend (dispatch's documented fallback).
            ok2 = torch.autograd.gradgradcheck(fn, inputs, raise_exception=False)
            yield (backend, device, activation_name(activation), "yes" if bias else "no", ok1, ok2, err, _ran(ran))


def lm_head_reference(x, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                      z_loss=0.0, softcap=None):
    """The eager LM head and loss from ``torch.nn.functional`` alone: ``F.linear``, the
    soft cap, ``F.cross_entropy`` and the z-loss (``z_loss * lse^2``, reduced like the loss)."""
    z = F.linear(x, weight, bias)
    s = z if softcap is None else softcap * torch.tanh(z / softcap)
    s, t = s.reshape(-1, s.shape[-1]), target.reshape(-1)
    loss = F.cross_entropy(s, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    kept = t != ignore_index
    loss = loss + z_loss * torch.where(kept, torch.logsumexp(s, -1).square(), 0)
    if reduction == "none":
        return loss.view(target.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / kept.sum()


_LM_HEAD_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, chunk_size=4)  # two chunks and more


def check_lm_head(backend: str, device: str, seed: int = 0) -> Iterator[tuple]:
    """Rows of ``linear_cross_entropy`` (smoothing, z-loss, soft cap, ignored rows; the
    activation column names the reduction) for one backend on one device, as
    :func:`check_backend`'s."""
    generator = torch.Generator().manual_seed(seed)
    for reduction in _LM_HEAD_REDUCTIONS:
        x, w, b = _inputs(device, torch.float64, True, generator)
        target = torch.randint(0, w.shape[0], (x.shape[0],), generator=generator).to(device)
        target[1] = -100

        def fn(*ts, target=target):
            with dispatch.use_backend(backend):
                return linear_cross_entropy(ts[0], ts[1], target, ts[2], reduction=reduction, **_LM_HEAD_OPTIONS)

        with dispatch.recording() as ran:
            # fast_mode (u^T J v for random u, v) keeps the interpreter's rows to seconds;
            # tests/test_cross_entropy.py runs the full gradcheck.
            ok1 = torch.autograd.gradcheck(fn, (x, w, b), raise_exception=False, fast_mode=True)
            ref_in = _inputs("cpu", torch.float64, True, generator, shape=(33, 17, 41))
            ref_target = torch.randint(0, 41, (33,), generator=generator)
            ref = lm_head_reference(*ref_in[:2], ref_target, ref_in[2], reduction=reduction,
                                    **{k: v for k, v in _LM_HEAD_OPTIONS.items() if k != "chunk_size"})
            test_in = [t.detach().to(device, torch.float32).requires_grad_() for t in ref_in]
            out = fn(*test_in, target=ref_target.to(device))
            grad = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
            got = [out, *torch.autograd.grad(out, test_in, grad.to(device, torch.float32))]
            want = [ref, *torch.autograd.grad(ref, ref_in, grad)]
            err = max(((g.double().cpu() - r).norm() / r.norm().clamp_min(1e-30)).item() for g, r in zip(got, want))
        ok2 = torch.autograd.gradgradcheck(fn, (x, w, b), raise_exception=False, fast_mode=True)
        yield (backend, device, f"lm-head {reduction}", "yes", ok1, ok2, err, _ran(ran))


def all_rows(backend: str, device: str, seed: int = 0) -> Iterator[tuple]:
    """The table's rows for one backend on one device: the linear op's, then the LM head's."""
    yield from check_backend(backend, device, seed)
    yield from check_lm_head(backend, device, seed)


def passed(row: tuple) -> bool:
    backend, _, _, _, ok1, ok2, err, ran = row
    return ok1 and ok2 and err < FP32_TOLERANCE and ran == f"{backend}/{backend}"


def run(args) -> int:
    interpreter = not args.no_interpreter
    print(_plan(planned_backends(interpreter)), flush=True)
    table = Table(_COLUMNS, _WIDEST)
    total = failed = 0
    for row in rows_on_every_backend(all_rows, args.seed, interpreter=interpreter):
        ok1, ok2, err = row[4:7]
        table.row((*row[:4], "pass" if ok1 else "FAIL", "pass" if ok2 else "FAIL", f"{err:.1e}", row[7]))
        total += 1
        failed += not passed(row)
    print(f"\n{total - failed} passed, {failed} failed (a row fails unless both halves ran its backend)")
    return 1 if failed else 0
