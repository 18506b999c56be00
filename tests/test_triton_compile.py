"""Every specialisation of the fused GEMM kernel compiles for real GPU targets.

The interpreter accepts code that the compiler rejects (non-constexpr globals, ops on
dtypes without a lowering), so CI also compiles each specialisation the Triton backend
launches for sm_80 (Ampere) and sm_90 (Hopper). No GPU is needed: ``triton.compile``
with a ``GPUTarget`` runs the whole pipeline to a cubin. It must run without
``TRITON_INTERPRET`` (the kernel must be a real JITFunction), so each target compiles
in a subprocess running this file as a script; the two run side by side.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _util import float32_matmul_precision

TARGETS = (80, 90)  # compute capabilities: A100, H100/H200
# 24 distinct flag sets (5 activations x 5 kinds of launch, with "forward without bias,
# no activation" the same kernel as "grad_x, no activation") for each of fp16, bf16,
# fp32 with IEEE products, fp32 with TF32 and fp64.
EXPECTED = 5 * 24
# Small tiles keep each compile near 0.6 s (64 x 64 x 32 with 3 stages: 1 s, 120 x 2
# times); 64 rows for 4 warps is the smallest tile that still takes Hopper's wgmma path.
_META = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, GROUP_M=8)
_OPTIONS = dict(num_warps=4, num_stages=2)
_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def specialisations():
    """``(label, dtype, flags)`` for every launch the backend makes, without repeats."""
    from torch_matgrad.formulas import ACTIVATIONS, NEEDS_PREACTIVATION
    from torch_matgrad.triton_kernels.ops import specialisation

    seen = {}
    for precision in ("highest", "high"):  # fp32: IEEE products, then TF32
        for dtype in _TYPE:
            if precision == "high" and dtype != torch.float32:
                continue
            for act in ACTIVATIONS:
                launches = {
                    "forward": dict(has_bias=True, activation=act, store_z=act in NEEDS_PREACTIVATION),
                    "forward, no bias": dict(activation=act, store_z=act in NEEDS_PREACTIVATION),
                    "grad_x / grad_W": dict(grad_activation=act),
                    "grad_W + grad_b": dict(grad_activation=act, rowsum=True),
                    "grad_b alone": dict(grad_activation=act, rowsum=True, has_c=False),
                }
                for what, kwargs in launches.items():
                    with float32_matmul_precision(precision):
                        flags = specialisation(dtype, **kwargs)
                    key = (dtype, tuple(sorted((k, str(v)) for k, v in flags.items())))
                    seen.setdefault(key, (f"{_TYPE[dtype]} {flags['INPUT_PRECISION']} {what} act={act}", dtype, flags))
    return list(seen.values())


def _signature(kernel, dtype, flags):
    """Argument types and constexprs; absent tensors are constexpr None, as at launch."""
    absent = {
        "b_ptr": not flags["HAS_C"], "c_ptr": not flags["HAS_C"], "s_ptr": flags["PRO_ACT"] == 0,
        "bias_ptr": not flags["HAS_BIAS"], "z_ptr": not flags["STORE_Z"], "rowsum_ptr": not flags["ROWSUM"],
    }
    constexprs = {**flags, **_META, **{name: None for name, none in absent.items() if none}}
    signature = {
        name: "constexpr" if name in constexprs else ("*" + _TYPE[dtype] if name.endswith("_ptr") else "i32")
        for name in kernel.arg_names
    }
    return signature, constexprs


def compile_all(capability: int) -> int:
    import triton
    from triton.backends.compiler import GPUTarget

    from torch_matgrad.triton_kernels.fused_gemm import fused_gemm_kernel

    target = GPUTarget("cuda", capability, 32)
    failures = 0
    variants = specialisations()
    print(f"compiling {len(variants)} specialisations")
    for label, dtype, flags in variants:
        signature, constexprs = _signature(fused_gemm_kernel, dtype, flags)
        try:
            src = triton.compiler.ASTSource(fn=fused_gemm_kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=target, options=_OPTIONS)
            assert compiled.asm.get("cubin"), "no cubin"
        except Exception as e:  # report every failing variant, not just the first
            failures += 1
            print(f"sm_{capability} {label}: {type(e).__name__}: {str(e)[-2000:]}")
    return failures


@pytest.mark.slow
def test_every_specialisation_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(cc)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cc in TARGETS
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for cc, p, out in zip(TARGETS, procs, outputs):
        assert p.returncode == 0, f"sm_{cc}:\n{out[-6000:]}"
        assert f"compiling {EXPECTED} specialisations" in out, out[-2000:]


if __name__ == "__main__":
    sys.exit(1 if compile_all(int(sys.argv[1])) else 0)
