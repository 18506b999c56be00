"""MLP blocks (``bench --mlp``): :class:`torch_matgrad.FusedMLP` against the eager block
(``nn.Linear`` layers around the activation) and ``torch.compile`` of it.

For each shape (tokens ``M``, width ``d``, hidden width ``H``, a stack of ``depth``
blocks) and each kind (plain GELU as in GPT-2, gated SiLU as in Llama) one training
step (forward, backward into the input and every parameter) is timed per provider, by
the linear bench's timers, and the bytes the forward saves for backward are counted
(``saved_tensors_hooks``: distinct storages, Parameters left out). Peak memory per
provider (:mod:`.peak`): on CUDA the allocator's peak, which also counts the kernels'
own scratch; on a CPU the resident set's, in several fresh processes (their median,
lowest and highest), compiled providers included. For the providers that run aten ops
(the eager block and the fused one on torch ops) one step is also traced
(:mod:`.allocations`): the peak of the tensor storages it allocates, as CUDA's
allocator counts them, and its aten ops, a proxy for host time. The compiled eager
block shows what AOTAutograd's partitioner saves by itself; the compiled fused block,
one op the compiler does not look inside, is recorded beside it. Rows go to
``mlp.csv`` and ``mlp.md``.
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

from ..mlp import FusedMLP, saved_bytes
from . import peak
from .allocations import step_allocations
from .plans import DTYPES
from .providers import in_context, provider_context
from .report import format_table, heading

#: ``(M, d, H, depth)`` per device: GPT-2-small and Llama-like widths, scaled to what the
#: device times in seconds; on a CPU also four blocks at 8192 tokens, where a step's
#: saved activations dominate its resident set.
SHAPES = {
    "cpu": [(256, 256, 1024, 1), (512, 512, 1376, 1), (8192, 512, 2048, 4)],
    "cuda": [(4096, 1024, 4096, 1), (4096, 4096, 11008, 1)],
}
KINDS = {"plain_gelu": (False, "gelu"), "gated_silu": (True, "silu")}
#: ``bench --lora``: ``(M, d, H, depth, r)``, Llama's gated SiLU blocks with PEFT's LoRA
#: (rank ``r``, alpha ``2r``, no dropout: PEFT's default) on gate, up and down, base
#: weights frozen: the compile and LoRA issues' CPU workload, and Llama-8B's MLP on CUDA.
LORA_SHAPES = {
    "cpu": [(512, 256, 704, 2, 8), (8192, 512, 1408, 4, 16)],
    "cuda": [(8192, 4096, 14336, 1, 16)],
}
#: ``matgrad_triton``: the fused block with the Triton backend asked for (its fused
#: launches); ``torch_matgrad`` runs what "auto" chooses.
PROVIDERS = ("eager", "torch_matgrad", "matgrad_triton", "compile", "compile_matgrad")
COLUMNS = ("date", "commit", "device", "device_name", "torch", "triton", "clock", "M", "d", "H", "depth", "rank", "dtype",
           "kind", "provider", "median_ms", "p20_ms", "p80_ms", "time_vs_eager", "saved_mib", "saved_vs_eager",
           "peak_runs", "peak_mib", "peak_min_mib", "peak_max_mib", "peak_vs_eager", "worst_vs_eager",
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


def blocks(d: int, hidden: int, depth: int, kind: str, device: str, dtype: torch.dtype, providers: Sequence[str]):
    """Each provider's model: ``depth`` blocks in a row, all providers on the same Parameters."""
    gated, activation = KINDS[kind]
    fused = nn.Sequential(*[FusedMLP(d, hidden, activation=activation, gated=gated, device=device, dtype=dtype)
                            for _ in range(depth)])
    return _providers(nn.Sequential(*[EagerMLP(block) for block in fused]), fused, providers)


def lora_blocks(d: int, hidden: int, depth: int, rank: int, device: str, dtype: torch.dtype,
                providers: Sequence[str]):
    """Each provider's model for ``bench --lora``: ``eager`` is PEFT's LoRA on
    transformers' ``LlamaMLP`` blocks, ``torch_matgrad`` a copy through ``fuse_mlps``."""
    import peft
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from ..surgery import fuse_mlps

    config = LlamaConfig(hidden_size=d, intermediate_size=hidden, hidden_act="silu", num_attention_heads=1,
                         num_key_value_heads=1)  # the MLP alone: any width
    stock = nn.Sequential(*[LlamaMLP(config) for _ in range(depth)]).to(device, dtype)
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["gate_proj", "up_proj", "down_proj"])
    stock = peft.inject_adapter_in_model(lora, stock)
    for name, p in stock.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:  # PEFT starts B at zero; a trained adapter is not
            nn.init.normal_(p, std=0.02)
    fused = copy.deepcopy(stock)
    if fuse_mlps(fused) != depth:
        raise RuntimeError(f"bench --lora: fuse_mlps fused fewer than the {depth} PEFT blocks")
    return _providers(stock, fused, providers)


def _providers(eager: nn.Module, fused: nn.Module, providers: Sequence[str]) -> Dict[str, nn.Module]:
    made = {"eager": eager, "torch_matgrad": fused, "matgrad_triton": fused}
    if "compile" in providers:
        made["compile"] = torch.compile(eager)
    if "compile_matgrad" in providers:
        made["compile_matgrad"] = torch.compile(fused)
    return {name: made[name] for name in providers}


def _steps(m: int, d: int, hidden: int, depth: int, rank: int, kind: str, device: str, dtype: torch.dtype,
           providers: Sequence[str]):
    """``(models, {provider: its trainable Parameters}, x, {provider: one training step})``,
    seeded alike in every process; ``rank`` > 0: the LoRA blocks."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    models = (lora_blocks(d, hidden, depth, rank, device, dtype, providers) if rank
              else blocks(d, hidden, depth, kind, device, dtype, providers))
    params = {name: [p for p in model.parameters() if p.requires_grad] for name, model in models.items()}
    x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(m, d, device=device, dtype=dtype)

    def step(model, trained):
        def run_step():
            torch.autograd.grad(model(x), [x, *trained], grad)
        return run_step

    return models, params, x, {name: in_context(name, step(model, params[name])) for name, model in models.items()}


def step_tensors(step: Callable[[], object], provider: str) -> Dict[str, str]:
    """The ``tensor_peak_mib`` and ``aten_ops`` columns of one ``step``; "" where the
    trace does not see the step whole (:data:`TRACED`)."""
    if provider not in TRACED:
        return {"tensor_peak_mib": "", "aten_ops": ""}
    tensors, ops = step_allocations(step)
    return {"tensor_peak_mib": f"{tensors / 2**20:.4g}", "aten_ops": str(ops)}


def run(device: str, env: Dict[str, str], out: Path, dtype_name: str, dtype: torch.dtype,
        providers: Sequence[str], timer: Callable, lora: bool = False) -> List[dict]:
    """Time and measure every case; write ``mlp.csv`` and ``mlp.md`` into ``out``
    (``lora``: the LoRA blocks of :data:`LORA_SHAPES`, into ``lora.csv``, ``lora.md``)."""
    cases = ([(m, d, h, depth, rank, "gated_silu_lora") for m, d, h, depth, rank in LORA_SHAPES[device]] if lora
             else [(m, d, h, depth, 0, kind) for m, d, h, depth in SHAPES[device] for kind in KINDS])
    name = "lora" if lora else "mlp"
    rows = []
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for case in cases:
            m, d, hidden, depth, rank, kind = case
            models, params, x, steps = _steps(*case[:5], kind, device, dtype, providers)
            saved = {}
            for provider, model in models.items():
                with provider_context(provider):
                    saved[provider] = saved_bytes(model, x, params=list(model.parameters()))[1]
            timed = timer(steps)
            tensors = {provider: step_tensors(steps[provider], provider) for provider in models}
            del models, steps
            runs = peak.RUNS[device]
            peaks = peak.spread({provider: peak.in_children(__name__, [*case, device, dtype_name, provider], runs)
                                 for provider in providers})
            base_t, base_s = timed["eager"][0], saved["eager"]
            for provider in providers:
                median, p20, p80 = timed[provider]
                row = {**env, "M": m, "d": d, "H": hidden, "depth": depth, "rank": rank, "dtype": dtype_name,
                       "kind": kind, "provider": provider, "median_ms": f"{median:.4f}", "p20_ms": f"{p20:.4f}",
                       "p80_ms": f"{p80:.4f}", "time_vs_eager": f"{median / base_t:.3f}",
                       "saved_mib": f"{saved[provider] / 2**20:.3f}",
                       "saved_vs_eager": f"{saved[provider] / base_s:.3f}", "peak_runs": runs, **peaks[provider],
                       **tensors[provider]}
                writer.writerow(row)
                rows.append(row)
            f.flush()
    (out / f"{name}.md").write_text(report(rows, markdown=True))
    return rows


def report(rows: Sequence[dict], markdown: bool = False) -> str:
    header = ["M x d x H", "blocks", "rank", "dtype", "kind", "provider", "step ms", "time / eager", "saved MiB",
              "saved / eager", "peak MiB", "lowest-highest", "peak / eager", "worst / eager", "tensors MiB",
              "aten ops"]
    lines = [[f"{r['M']} x {r['d']} x {r['H']}", str(r["depth"]), str(r["rank"]), r["dtype"], r["kind"], r["provider"],
              r["median_ms"], r["time_vs_eager"], r["saved_mib"], r["saved_vs_eager"], r["peak_mib"],
              f"{r['peak_min_mib']}-{r['peak_max_mib']}", r["peak_vs_eager"] or "-", r["worst_vs_eager"] or "-",
              r["tensor_peak_mib"] or "-", r["aten_ops"] or "-"] for r in rows]
    baseline = ("Eager: PEFT's LoRA layers on transformers' LlamaMLP (base weights frozen; the step's gradients: the "
                "input and the adapters). " if rows[0]["kind"].endswith("_lora") else "")
    note = baseline + (f"Peak: one training step's memory above its inputs and parameters, in {rows[0]['peak_runs']} fresh "
            "processes per provider (CUDA: max_memory_allocated, the kernels' scratch included; CPU: the resident "
            "set's high-water mark): their median, lowest and highest; peak / eager is of the medians, worst / eager "
            "the highest over eager's lowest. Tensors: the peak of the live storages the step's aten ops allocate, "
            "each rounded up to 512 bytes as CUDA's caching allocator counts them (the bench.allocations trace: the "
            "same figure on every device). Aten ops: dispatched per step, forward and backward, a proxy for host "
            "time. '-': not traced (Triton launches and compiled kernels are no aten ops).")
    return heading(rows[0], markdown) + "\n\n" + format_table(header, lines, markdown) + "\n\n" + note + "\n"


if __name__ == "__main__":  # a memory child of peak.in_children
    m, d, hidden, depth, rank, kind, device, dtype_name, provider = peak.child_args()
    _, _, _, steps = _steps(m, d, hidden, depth, rank, kind, device, DTYPES[dtype_name], [provider])
    print(peak.step_peak_mib(steps[provider], device))
