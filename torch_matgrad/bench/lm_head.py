"""The language-model head and its loss (``bench --lm-head``):
:func:`torch_matgrad.linear_cross_entropy` against the eager head and loss
(``F.linear`` + ``F.cross_entropy``) and ``torch.compile`` of it.

Providers (``N`` tokens, hidden size ``H``, vocabulary ``V``; no bias, as LM heads):

``eager``
    ``F.cross_entropy(F.linear(x, W), target)``: the baseline.
``torch_matgrad``
    The op (mean), whose forward computes the gradients chunk by chunk: on CUDA "auto"
    runs the Triton backend's ``"chunked"`` strategy (cuBLAS products, each chunk's loss
    and ``G_z`` in one fused kernel), on a CPU torch ops.
``matgrad_recompute``
    The op under ``reduction="none"``, averaged by the caller: its backward recomputes
    each chunk's logits (CCE's way; what the mean would cost without the gradients in
    the forward), one product more than ``torch_matgrad``.
``matgrad_triton``, ``matgrad_kernels``
    The op with the Triton backend asked for: its chunk products in the fused GEMM as
    well (``"gemm"``), or the cross-entropy kernels
    (:func:`torch_matgrad.dispatch.cross_entropy_strategy` ``"kernels"``).
``compile``
    ``torch.compile`` of the eager head and loss.
``compile_matgrad``
    ``torch.compile`` of the op (mean): what a compiling user gets from it.

Then a causal LM's training step (:data:`MODEL_SHAPES`, a small Llama whose head and
loss hold most of its memory; with transformers installed): ``llama``, the model as it
comes, ``llama_fused`` after :func:`torch_matgrad.fuse_lm_head_loss`, and with the
compiled providers ``llama_compile`` and ``llama_compile_fused``, ``torch.compile`` of
each; every ratio against ``llama``. Its rows give ``N`` as the tokens of a batch.

For each shape one training step (forward, backward into ``x`` and ``W``) is timed per
provider, by the linear bench's timers, after its loss and gradients are compared with
eager's. The memory columns per provider:

``peak_mib``, ``peak_min_mib``, ``peak_max_mib``
    The peak memory of one step above the inputs and parameters: the median, lowest
    and highest of its runs (:mod:`.peak`: ``RUNS`` fresh processes, 10 on a CPU).
``peak_vs_eager``, ``worst_vs_eager``
    The median over eager's median, and the highest over eager's lowest: the ratio that
    every pair of runs meets.
``working_mib``
    The median peak less the bytes of the gradients the step returns (``grad_x`` and
    ``grad_W``: the same for every provider, which must hold them at the end): the peak
    working memory above inputs, parameters and gradients, Cut Cross-Entropy's
    accounting. A provider whose peak comes before its gradients exist (eager's, in its
    loss) is credited with them too. Empty in the model's rows.

Each run measures a peak in a fresh child process, after a warm-up step (compiling
included), as :mod:`.peak` says: on CUDA ``max_memory_allocated``; on a CPU the resident
set's high-water mark, which sees every byte the step touches and where glibc puts each
block, different from process to process: hence the runs. Rows go to ``lm_head.csv``
and ``lm_head.md``.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import dispatch
from ..cross_entropy import linear_cross_entropy
from ..surgery.lm_head import fuse_lm_head_loss
from . import peak
from .plans import DTYPES
from .report import format_table, heading

#: ``(N, H, V)`` per device: Llama-2's vocabulary (32000) at two token counts; on CUDA
#: also Llama-3's (128256).
SHAPES = {
    "cpu": [(1024, 1024, 32000), (4096, 1024, 32000)],
    "cuda": [(4096, 2048, 32000), (8192, 4096, 128256)],
}
PROVIDERS = ("eager", "torch_matgrad", "matgrad_recompute", "matgrad_triton", "matgrad_kernels", "compile",
             "compile_matgrad")
#: The causal LM of the model rows per device: ``(batch, sequence, hidden, layers,
#: vocab)``, two Llama layers under Llama-2's vocabulary (its logits 500 MiB in fp32).
MODEL_SHAPES = {"cpu": [(4, 1024, 256, 2, 32000)], "cuda": [(4, 1024, 256, 2, 32000)]}
#: The model's providers; the last two only with the compiled ones.
MODEL_PROVIDERS = ("llama", "llama_fused", "llama_compile", "llama_compile_fused")
#: The Triton backend's providers and their strategy.
TRITON = {"matgrad_triton": "gemm", "matgrad_kernels": "kernels"}
COLUMNS = ("date", "commit", "device", "device_name", "torch", "triton", "clock", "N", "H", "V", "dtype",
           "provider", "median_ms", "p20_ms", "p80_ms", "time_vs_eager", "peak_runs", "peak_mib", "peak_min_mib",
           "peak_max_mib", "peak_vs_eager", "worst_vs_eager", "working_mib", "working_vs_eager",
           "max_rel_diff_vs_eager")


def eager(x, w, t):
    return F.cross_entropy(F.linear(x, w), t)


def recompute(x, w, t):
    loss = linear_cross_entropy(x, w, t, reduction="none")
    return loss.sum() / (t != -100).sum()


def loss_fn(provider: str) -> Callable:
    """The ``fn(x, w, target)`` a provider runs; built afresh for every case."""
    if provider in ("compile", "compile_matgrad"):
        torch._dynamo.reset()
        return torch.compile(eager if provider == "compile" else linear_cross_entropy, dynamic=False)
    return {"eager": eager, "matgrad_recompute": recompute}.get(provider, linear_cross_entropy)


def inputs(n: int, h: int, v: int, device: str, dtype: torch.dtype):
    """``(x, W, target)``: hidden states and a head scaled like ``nn.Linear``'s init."""
    torch.manual_seed(0)
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    w = torch.nn.Parameter((torch.randn(v, h, device=device) * h**-0.5).to(dtype))
    return x, w, torch.randint(0, v, (n,), device=device)


def _context(provider: str) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    if provider in TRITON:
        stack.enter_context(dispatch.use_backend("triton"))
        stack.enter_context(dispatch.cross_entropy_strategy(TRITON[provider]))
    return stack


def step_of(provider: str, x, w, t) -> Callable[[], tuple]:
    """One training step of ``provider``: the loss and the gradients of ``x`` and ``W``."""
    fn = loss_fn(provider)

    def step():
        with _context(provider):
            loss = fn(x, w, t)
            return (loss.detach(), *torch.autograd.grad(loss, (x, w)))

    return step


def model_step(provider: str, shape: tuple, device: str, dtype: torch.dtype) -> Callable[[], tuple]:
    """One training step of the causal LM of ``shape`` (:data:`MODEL_SHAPES`) as
    ``provider`` runs it: the loss and every Parameter's gradient; one initialisation
    for every provider."""
    import transformers

    batch, seq, hidden, layers, vocab = shape
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=seq)
    model = transformers.LlamaForCausalLM(config).to(device, dtype)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    if provider.endswith("fused"):
        fuse_lm_head_loss(model)
    fn = model
    if "compile" in provider:
        torch._dynamo.reset()
        fn = torch.compile(model)
    params = list(model.parameters())

    def step():
        loss = fn(input_ids=ids, labels=ids).loss
        return (loss.detach(), *torch.autograd.grad(loss, params))

    return step


def _rel_diff(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item() for a, e in zip(got, want))


def _measured(steps: Dict[str, Callable], child: list, device: str, timer: Callable,
              grads_mib: Optional[float]) -> List[dict]:
    """The columns of each provider of ``steps``, the first the baseline: its loss and
    gradients against the baseline's, its step timed by ``timer``, its peak in fresh
    children of this module (``child``: their arguments before the provider), and with
    ``grads_mib`` (the returned gradients' MiB) the working memory."""
    base = next(iter(steps))
    want = steps[base]()
    diffs = {name: _rel_diff(step(), want) for name, step in steps.items()}
    del want
    timed = timer(steps)
    runs = peak.RUNS[device]
    columns = peak.spread({name: peak.in_children(__name__, [*child, name], runs) for name in steps}, base)
    working = {name: float(columns[name]["peak_mib"]) - (grads_mib or 0) for name in steps}
    rows = []
    for name in steps:
        median, p20, p80 = timed[name]
        rows.append({"provider": name, "median_ms": f"{median:.1f}", "p20_ms": f"{p20:.1f}", "p80_ms": f"{p80:.1f}",
                     "time_vs_eager": f"{median / timed[base][0]:.3f}", "peak_runs": runs, **columns[name],
                     "working_mib": "" if grads_mib is None else f"{working[name]:.1f}",
                     "working_vs_eager": "" if grads_mib is None else f"{working[name] / working[base]:.3f}",
                     "max_rel_diff_vs_eager": f"{diffs[name]:.1e}"})
    return rows


def run(device: str, env: Dict[str, str], out: Path, dtype_name: str, providers: Sequence[str],
        timer: Callable) -> List[dict]:
    """Check, time and measure every case; write ``lm_head.csv`` and ``lm_head.md``."""
    dtype = DTYPES[dtype_name]
    cases = []  # (N, H, V, steps, child arguments, returned gradients' MiB)
    for n, h, v in SHAPES[device]:
        x, w, t = inputs(n, h, v, device, dtype)
        cases.append((n, h, v, lambda x=x, w=w, t=t: {name: step_of(name, x, w, t) for name in providers},
                      ["head", n, h, v, device, dtype_name], (n * h + v * h) * dtype.itemsize / 2**20))
    if importlib.util.find_spec("transformers"):
        names = [p for p in MODEL_PROVIDERS if "compile" in providers or "compile" not in p]
        for shape in MODEL_SHAPES[device]:
            batch, seq, hidden, _, vocab = shape
            cases.append((batch * seq, hidden, vocab,
                          lambda shape=shape: {name: model_step(name, shape, device, dtype) for name in names},
                          ["model", list(shape), device, dtype_name], None))
    rows = []
    with open(out / "lm_head.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for n, h, v, steps, child, grads_mib in cases:
            for measured in _measured(steps(), child, device, timer, grads_mib):
                row = {**env, "N": n, "H": h, "V": v, "dtype": dtype_name, **measured}
                writer.writerow(row)
                rows.append(row)
            f.flush()
    (out / "lm_head.md").write_text(report(rows, markdown=True))
    return rows


def report(rows: Sequence[dict], markdown: bool = False) -> str:
    header = ["N x H x V", "dtype", "provider", "step ms", "time / eager", "peak MiB", "lowest-highest",
              "peak / eager", "worst / eager", "working MiB", "working / eager", "max rel diff vs eager"]
    lines = [[f"{r['N']} x {r['H']} x {r['V']}", r["dtype"], r["provider"], r["median_ms"], r["time_vs_eager"],
              r["peak_mib"], f"{r['peak_min_mib']}-{r['peak_max_mib']}", r["peak_vs_eager"] or "-",
              r["worst_vs_eager"] or "-", r["working_mib"] or "-", r["working_vs_eager"] or "-",
              r["max_rel_diff_vs_eager"]]
             for r in rows]
    note = (f"Peak: one training step's memory above the inputs and parameters, in {rows[0]['peak_runs']} fresh "
            "processes per provider (CPU: resident-set high-water mark; CUDA: max_memory_allocated): their median, "
            "lowest and highest; peak / eager is of the medians, worst / eager the highest over eager's lowest. "
            "Working: the median peak less the gradients the step returns (grad_x, grad_W; the same for every "
            "provider), Cut Cross-Entropy's accounting. llama: a causal LM's training step (N: its batch's "
            "tokens), as it comes, after fuse_lm_head_loss (fused) and compiled, against the first.")
    return heading(rows[0], markdown) + "\n\n" + format_table(header, lines, markdown) + "\n\n" + note + "\n"


if __name__ == "__main__":  # a memory child of peak.in_children
    kind, *args, provider = peak.child_args()
    if kind == "model":
        shape, device, dtype_name = args
        step = model_step(provider, tuple(shape), device, DTYPES[dtype_name])
    else:
        n, h, v, device, dtype_name = args
        step = step_of(provider, *inputs(n, h, v, device, DTYPES[dtype_name]))
    print(peak.step_peak_mib(step, device))
