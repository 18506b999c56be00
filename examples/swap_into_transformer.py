"""Swap torch_matgrad into a small transformer and train it next to the original.

Two copies of one tiny transformer start from the same initialisation: one keeps its
``nn.Linear`` layers, the other gets ``torch_matgrad.replace_linear`` and
``torch_matgrad.fuse_activations`` (each MLP's ``Linear -> GELU`` becomes one fused
layer). Both train on the same batches; the script prints the two loss curves side by
side and the time per step of each.

    python examples/swap_into_transformer.py                 # CPU, or CUDA when present
    python examples/swap_into_transformer.py --autocast bf16 --steps 50
    python examples/swap_into_transformer.py --threads 1     # tiny GEMMs: 1 CPU thread is fastest

The test suite imports this file (tests/test_convergence.py), so the model and the
training loop here are the ones whose losses are checked step by step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

import torch_matgrad

VOCAB, DIM, HEADS, LAYERS, SEQ, BATCH = 16, 32, 4, 2, 12, 16


class Block(nn.Module):
    """Pre-norm transformer block; the MLP is an ``nn.Sequential`` so it can be fused."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = DIM, heads: int = HEADS, layers: int = LAYERS) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(SEQ, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_pair(seed: int = 0, device: str = "cpu") -> Tuple[nn.Module, nn.Module, int, int]:
    """``(original, swapped, n_replaced, n_fused)``: two models with the same weights."""
    torch.manual_seed(seed)
    original = TinyTransformer().to(device)
    swapped = copy.deepcopy(original)
    # The attention's out_proj is used by F.multi_head_attention_forward without its
    # forward being called; excluding it says so instead of warning about it.
    n_replaced = torch_matgrad.replace_linear(swapped, exclude="*.attn")
    n_fused = torch_matgrad.fuse_activations(swapped)
    return original, swapped, n_replaced, n_fused


def make_batches(steps: int, seed: int = 1, device: str = "cpu") -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """A learnable toy task: output the input sequence reversed."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        batches.append((tokens.to(device), tokens.flip(1).to(device)))
    return batches


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, in fp32 whatever the autocast dtype."""
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())


def train(
    models: Sequence[nn.Module], batches, autocast_dtype: Optional[torch.dtype] = None, lr: float = 1e-2
) -> Tuple[List[List[float]], List[float]]:
    """AdamW on each model over the same ``batches``, one step of each model in turn (so
    that load on the machine hits both timings alike). Returns each model's per-step
    losses and its median ms per step."""
    device_type = next(models[0].parameters()).device.type
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m in models]
    losses: List[List[float]] = [[] for _ in models]
    times: List[List[float]] = [[] for _ in models]
    for tokens, target in batches:
        for model, opt, model_losses, model_times in zip(models, opts, losses, times):
            model.train()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(tokens)
            loss = loss_fn(logits, target)
            loss.backward()
            opt.step()
            model_losses.append(loss.item())  # .item() synchronises: the time is complete
            model_times.append(time.perf_counter() - start)
    return losses, [1e3 * statistics.median(t) for t in times]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps, one batch each (default 30)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                        help="train both models under torch.autocast in this dtype: none, bf16 or fp16 (default none)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda, but this torch {torch.__version__} sees no CUDA device")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]

    original, swapped, n_replaced, n_fused = make_pair(device=args.device)
    print(f"device {args.device}, autocast {args.autocast}, backend {torch_matgrad.dispatch.requested_backend()}")
    print(f"replace_linear swapped {n_replaced} layers, fuse_activations fused {n_fused} Linear+GELU pairs")
    batches = make_batches(args.steps, device=args.device)
    (ref_losses, new_losses), (ref_ms, new_ms) = train([original, swapped], batches, dtype)

    print(f"\n{'step':>4}  {'nn.Linear':>10}  {'torch_matgrad':>13}  {'rel diff':>9}")
    for step, (a, b) in enumerate(zip(ref_losses, new_losses)):
        print(f"{step:>4}  {a:>10.6f}  {b:>13.6f}  {abs(a - b) / abs(a):>9.1e}")
    print(f"\nms/step (median): nn.Linear {ref_ms:.2f}, torch_matgrad {new_ms:.2f}")


if __name__ == "__main__":
    main()
