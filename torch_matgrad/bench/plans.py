"""What a run measures: shape sets, dtypes, activations, modes, and the cases of a run."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

# Transformer projections (in_features, out_features): attention 4096x4096, the MLP of
# 11008 (LLaMA-7B) and 14336 (Mistral-7B) wide, both directions.
_TRANSFORMER_KN = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))

#: Shape sets, each a list of ``(M, K, N)``: M rows (tokens), K = in_features, N = out_features.
SHAPE_SETS: Dict[str, List[Tuple[int, int, int]]] = {
    "transformer": [(m, k, n) for m in (512, 2048, 8192, 16384) for k, n in _TRANSFORMER_KN],
    "square": [(s, s, s) for s in (1024, 2048, 3072, 4096, 6144, 8192)],
    # Decoding: one to 64 tokens through the same projections (memory-bound on the weight).
    "decode": [(m, k, n) for m in (1, 2, 4, 8, 16, 32, 64) for k, n in _TRANSFORMER_KN[:3]],
    # Sizes that are not multiples of any tile: masking and tails.
    "odd": [(4095, 4095, 4095), (1000, 1000, 1000), (33, 4096, 4096), (4097, 1000, 33), (1000, 4095, 11008)],
    "gpu_quick": [(4096, 4096, 4096), (2048, 4096, 11008), (2048, 11008, 4096), (8192, 4096, 14336)],
    # The CPU target's shapes: moderate sizes a 2-core machine times in seconds.
    "cpu": [(m, k, n) for m in (256, 1024) for k, n in ((512, 512), (1024, 4096), (4096, 1024))],
    # --quick on a CPU: the 256-row half of "cpu", a full step 0.01-0.2 s in fp32 on 2 cores.
    "cpu_quick": [(256, 512, 512), (256, 1024, 4096), (256, 4096, 1024)],
    # Seconds in total anywhere: tests and dry runs of the tooling.
    "tiny": [(7, 33, 17), (64, 128, 96)],
    # Two transformer projections, for what costs minutes per shape (torch.compile's max-autotune).
    "transformer_pair": [(2048, 4096, 11008), (2048, 11008, 4096)],
}
ALL_SETS = ("transformer", "square", "decode", "odd")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: What a run that names no dtype measures. A CPU without native bf16/fp16 arithmetic
#: (AVX2) runs a 256 x 4096 x 1024 bf16 step ~45x slower than fp32 (18.4 s against 0.4 s
#: on 2 cores): half precision on a CPU only when asked for.
DEFAULT_DTYPES = {"cuda": list(DTYPES), "cpu": ["fp32"]}
#: The activations of a run that names none (every one of ``cli.ACTIVATION_NAMES`` may be
#: named): the bare GEMM and the two that transformers use.
DEFAULT_ACTIVATIONS = ("none", "gelu_tanh", "silu")
MODES = ("forward", "backward", "full")
FLOPS_PER_MNK = {"forward": 2, "backward": 4, "full": 6}


@dataclass(frozen=True)
class Case:
    shape_set: str
    m: int
    k: int
    n: int
    dtype: str
    activation: str
    mode: str


def plan(args, device: str) -> List[Case]:
    """The cases to run: per shape set, shape and dtype, every (activation, mode) pair."""
    cuda = device == "cuda"
    if args.quick:
        sets, dtypes = (["gpu_quick"], ["bf16"]) if cuda else (["cpu_quick"], ["fp32"])
    else:
        sets, dtypes = (list(ALL_SETS) if cuda else ["cpu"]), DEFAULT_DTYPES[device]
    sets = list(dict.fromkeys(itertools.chain.from_iterable(
        ALL_SETS if s == "all" else (s,) for s in (args.shapes or sets))))
    if args.quick and cuda and not (args.activation or args.mode):
        # The bare GEMMs both ways, then the fused training steps.
        pairs = [("none", "forward"), ("none", "backward"), ("gelu_tanh", "full"), ("silu", "full")]
    else:
        modes = args.mode or (["full"] if args.quick else list(MODES))
        pairs = list(itertools.product(args.activation or DEFAULT_ACTIVATIONS, modes))
    cases = []
    for name in sets:
        for (m, k, n), dtype in itertools.product(SHAPE_SETS[name], args.dtype or dtypes):
            cases += [Case(name, m, k, n, dtype, act, mode) for act, mode in pairs]
    return cases
