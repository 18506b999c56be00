"""Training step of a small transformer: stock PyTorch against the same model after
``replace_linear`` and ``fuse_mlps`` (attention left as is), from one initialisation.

Pre-norm blocks of ``nn.MultiheadAttention`` and an MLP ``nn.Sequential(Linear, GELU,
Linear)`` (which ``fuse_mlps`` turns into one ``FusedMLP``), a tied-free LM head, AdamW;
each step is forward, cross-entropy, backward and the optimizer step on a fresh batch.
The variants run round by round in turns (the order reversed every other round), each
sample the median of a few steps, synchronised on CUDA. Printed: ms per step, and speed
relative to the stock model (above 1: faster), per variant: ``torch_matgrad`` with the
default backend (``"auto"``) and, on CUDA, ``triton`` (the kernels asked for).

Usage: python benchmarks/train_step.py [--device cuda|cpu] [--steps N] [--rounds N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import torch_matgrad


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def model(vocab: int, d: int, heads: int, layers: int) -> nn.Module:
    return nn.Sequential(nn.Embedding(vocab, d), *(Block(d, heads) for _ in range(layers)), nn.LayerNorm(d),
                         nn.Linear(d, vocab))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="steps per sample (default 5)")
    parser.add_argument("--rounds", type=int, default=7, help="samples per variant (default 7)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    # GPT-2-small widths on CUDA (bf16 autocast); a few hundred thousand parameters on a CPU.
    vocab, d, heads, layers, batch, seq = (8192, 768, 12, 4, 8, 512) if cuda else (512, 64, 4, 2, 4, 32)
    torch.manual_seed(0)
    stock = model(vocab, d, heads, layers).to(args.device)
    swapped = copy.deepcopy(stock)
    torch_matgrad.replace_linear(swapped, exclude=["*attn"])
    fused = torch_matgrad.fuse_mlps(swapped)
    variants = {"nn.Linear": (stock, "auto"), "torch_matgrad": (swapped, "auto")}
    if cuda:
        variants["triton"] = (swapped, "triton")
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in variants.items()}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda)

    def step(name):
        net, backend = variants[name]
        tokens = torch.randint(vocab, (batch, seq + 1), device=args.device)
        with torch_matgrad.use_backend(backend), autocast:
            logits = net(tokens[:, :-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    for name in variants:  # warm-up: allocator, autotuning, kernel compilation
        for _ in range(3):
            step(name)
    sync()
    samples = {name: [] for name in variants}
    for rnd in range(args.rounds):
        for name in list(variants)[:: 1 if rnd % 2 == 0 else -1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            sync()
            samples[name].append((time.perf_counter() - start) / args.steps * 1e3)
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}; {layers} blocks of d={d}, "
          f"batch {batch} x {seq} tokens{', bf16 autocast' if cuda else ''}; fuse_mlps fused {fused} MLPs")
    base = statistics.median(samples["nn.Linear"])
    print(f"{'variant':>14} {'ms/step':>9} {'speed vs nn.Linear':>19}")
    for name, times in samples.items():
        ms = statistics.median(times)
        print(f"{name:>14} {ms:9.2f} {base / ms:19.3f}")


if __name__ == "__main__":
    main()
