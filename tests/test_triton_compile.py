"""Every specialisation of the fused GEMM kernels compiles for real GPU targets.

The interpreter accepts code that the compiler rejects (non-constexpr globals, ops on
dtypes without a lowering), so CI also compiles each specialisation the Triton backend
launches for sm_80 (Ampere) and sm_90 (Hopper): the pointer kernel for both, and for
sm_90 also the descriptor kernel (``tma_gemm.py``), whose PTX must hold TMA bulk tensor
copies (``cp.async.bulk.tensor``) and ``wgmma``. No GPU is needed: ``triton.compile``
with a ``GPUTarget`` runs the whole pipeline to a cubin. It must run without
``TRITON_INTERPRET`` (the kernel must be a real JITFunction), so each target compiles
in a subprocess running this file as a script; they run side by side (the MLP block's
flag sets in bf16 only unless ``TORCH_MATGRAD_COMPILE_ALL=1``, see ``EXPECTED_CI``). A
third one, on request (``TORCH_MATGRAD_REGISTER_REPORT=1``, before a GPU run: a minute
of compiles CI does not spend), compiles the descriptor kernel in the tiles of its
autotune configurations and prints the registers and spilled bytes that ptxas reports
for each (the compiled kernel's ``n_regs``/``n_spills`` exist only once loaded on a GPU).
The split-K launches (the pointer kernel's ``SPLIT_K`` and the sum of its slices), the
``G_z`` pass with ``grad_b`` and the cross-entropy kernels compile in tests of their own.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys

import pytest
import torch

from _util import float32_matmul_precision

TARGETS = (80, 90)  # compute capabilities: A100, H100/H200
# 24 distinct flag sets of the linear layer (5 activations x 5 kinds of launch, with
# "forward without bias, no activation" the same kernel as "grad_x, no activation") and
# 39 of the MLP block (_mlp_launches: the two-half product with and without biases, 2;
# gated h with and without bias, with the column sums, and the gated epilogue, 4 x 5
# activations; plain ones, 4 x 4; column sums alone, 1) for each of fp16, bf16, fp32 with
# IEEE products, fp32 with TF32 and fp64.
EXPECTED = 5 * (24 + 39)
# CI compiles the MLP's flag sets in bf16 only (each compile costs ~0.6 s of its two
# cores; the other dtypes change only the operand type of the same code, which the
# linear flag sets compile in every dtype): 159 per target. The whole matrix on request
# (TORCH_MATGRAD_COMPILE_ALL=1): run it before a GPU run.
COMPILE_ALL = bool(os.environ.get("TORCH_MATGRAD_COMPILE_ALL"))
EXPECTED_CI = 5 * 24 + 39
# Small tiles keep each compile near 0.6 s (64 x 64 x 32 with 3 stages: 1 s, 120 x 2
# times); 64 rows for 4 warps is the smallest tile that still takes Hopper's wgmma path.
_META = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, GROUP_M=8)
_OPTIONS = dict(num_warps=4, num_stages=2)
_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

# The descriptor kernel (sm_90 only): the flag sets above in fp16 and bf16 that it
# runs (not those with the act' prologue, without a product or of the MLP block: they
# take the pointer kernel), each in the operand layouts the backend gives it for
# contiguous tensors (A_T, B_T: which descriptor holds a transpose); "grad_x / grad_W"
# is both a plain and a transposed launch. Then all 4 layouts on one flag set that uses
# every operand. Small tiles with the split epilogue keep each compile near 0.5 s; the
# configurations' own tiles are compiled by the register report.
_TMA_LAYOUTS = {
    "forward": [(False, True)],
    "forward, no bias": [(False, True)],
    "grad_x / grad_W": [(False, False), (True, False)],
    "grad_W + grad_b": [(True, False)],
}
# Per dtype: the forward with and without bias for each of 5 activations, grad_x / grad_W
# and grad_W + grad_b without act' (the backward's G_z from the pass).
EXPECTED_TMA = 2 * (2 * 5 + 2 + 1) + 4
_TMA_META = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, EPILOGUE_SPLIT=2)
_TMA_SMS = 132  # an H100 SXM's; NUM_SMS is a constexpr
_H100_SHARED = 227 * 1024  # shared memory per block on an H100 (the autotuner prunes by it)
# The register report: each autotune configuration, on the forward and the launches of
# the backward (G_z by a pass: the descriptor kernel has no prologue).
_REPORT_FLAGS = {
    "forward bias+gelu_tanh+z": dict(has_bias=True, activation="gelu_tanh", store_z=True),
    "grad_x": dict(),
    "grad_W + grad_b": dict(rowsum=True),
}
_REPORT_LAYOUTS = {"forward bias+gelu_tanh+z": (False, True), "grad_x": (False, False), "grad_W + grad_b": (True, False)}


def _mlp_launches(act):
    """The MLP block's launches with activation ``act`` (``triton_backend.mlp_forward`` and
    ``mlp_backward``) that the linear layer's do not cover: ``specialisation`` keywords."""
    gated = dict(gated=True, mlp_activation=act)
    launches = {
        "mlp [g | u]": dict(has_bias=True, dual=True),
        "mlp [g | u], no bias": dict(dual=True),
        "mlp out, gated h": dict(has_bias=True, hidden=True, **gated),
        "mlp out / grad_Wd, gated h": dict(hidden=True, **gated),  # out without bias; grad_Wd without grad_bd
        "mlp grad_Wd + grad_bd, gated h": dict(hidden=True, colsum=True, **gated),
        "mlp grad_h, gated epilogue": dict(grad_hidden=True, **gated),
    }
    if act is None:  # h = u and G_u = grad_h: the linear layer's launches, plus grad_bd's column sums
        launches["mlp grad_Wd + grad_bd"] = dict(colsum=True)
        return launches
    plain = dict(mlp_activation=act)
    launches.update({
        "mlp out, plain h": dict(has_bias=True, hidden=True, **plain),
        "mlp out / grad_Wd, plain h": dict(hidden=True, **plain),
        "mlp grad_Wd + grad_bd, plain h": dict(hidden=True, colsum=True, **plain),
        "mlp grad_h, plain epilogue": dict(grad_hidden=True, **plain),
    })
    return launches


def _launches():
    """``(what, label, dtype, flags)`` for every launch the backend makes, repeats included."""
    from torch_matgrad.formulas import ACTIVATIONS, NEEDS_PREACTIVATION
    from torch_matgrad.triton_kernels.ops import specialisation

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
                    **_mlp_launches(act),
                }
                for what, kwargs in launches.items():
                    with float32_matmul_precision(precision):
                        flags = specialisation(dtype, **kwargs)
                    yield what, f"{_TYPE[dtype]} {flags['INPUT_PRECISION']} {what} act={act}", dtype, flags


def _distinct(variants):
    """``(label, dtype, flags)`` without repeated ``(dtype, flags)``: the first label stays."""
    seen = {}
    for label, dtype, flags in variants:
        seen.setdefault((dtype, tuple(sorted((k, str(v)) for k, v in flags.items()))), (label, dtype, flags))
    return list(seen.values())


def specialisations():
    """``(label, dtype, flags)`` for every launch the backend makes, without repeats."""
    return _distinct((label, dtype, flags) for _, label, dtype, flags in _launches())


def _with_layout(flags, layout):
    """The descriptor kernel's flags: ``flags`` without the pointer kernel's own
    (``PRO_ACT`` and the MLP ones, all off), with the operand layout and the persistent
    grid."""
    from torch_matgrad.triton_kernels.ops import POINTER_ONLY_FLAGS

    assert not any(flags[name] for name in POINTER_ONLY_FLAGS), flags
    kept = {name: value for name, value in flags.items() if name not in POINTER_ONLY_FLAGS}
    return {**kept, **dict(zip(("A_T", "B_T"), layout)), "NUM_SMS": _TMA_SMS}


def tma_specialisations():
    """``(label, dtype, flags)`` for every launch of the descriptor kernel, layouts included."""
    from torch_matgrad.formulas import ACTIVATIONS
    from torch_matgrad.triton_kernels.ops import TMA_DTYPES, specialisation

    variants = [
        (f"{label} layout={layout}", dtype, _with_layout(flags, layout))
        for what, label, dtype, flags in _launches()
        # The MLP's launches, the prologue's and those without a product take the pointer kernel.
        if dtype in TMA_DTYPES and flags["HAS_C"] and not flags["PRO_ACT"] and what in _TMA_LAYOUTS
        for layout in _TMA_LAYOUTS[what]
    ]
    every = specialisation(torch.bfloat16, rowsum=True, has_bias=True, activation=ACTIVATIONS[-1], store_z=True)
    for layout in itertools.product((False, True), repeat=2):
        variants.append((f"bf16 every operand layout={layout}", torch.bfloat16, _with_layout(every, layout)))
    return _distinct(variants)


def _tma_signature(kernel, dtype, flags, meta):
    """The descriptor kernel's argument types: descriptors as ``tensordesc<type[block]>``
    with the block shapes that ``configs._set_block_shapes`` gives them."""
    from torch_matgrad.triton_kernels.configs import _set_block_shapes

    class Block:  # stands in for a TensorDescriptor: only its block shape is read
        block_shape = None

    descs = {"a_desc": True, "b_desc": True, "c_desc": True, "z_desc": flags["STORE_Z"]}
    nargs = {**flags, **meta, **{name: Block() if present else None for name, present in descs.items()}}
    _set_block_shapes(nargs)
    constexprs = {**flags, **meta}
    signature = {}
    for name in kernel.arg_names:
        if name in descs:
            if nargs[name] is None:
                constexprs[name] = None
                signature[name] = "constexpr"
            else:
                signature[name] = f"tensordesc<{_TYPE[dtype]}[{', '.join(map(str, nargs[name].block_shape))}]>"
        elif name in ("bias_ptr", "rowsum_ptr"):
            present = flags["HAS_BIAS"] if name == "bias_ptr" else flags["ROWSUM"]
            signature[name] = "*" + _TYPE[dtype] if present else "constexpr"
            if not present:
                constexprs[name] = None
        else:
            signature[name] = "constexpr" if name in constexprs else "i32"
    return signature, constexprs


def _compile_tma(target, dtype, flags, meta, options):
    """The descriptor kernel compiled; raises unless its PTX holds TMA copies and wgmma."""
    import triton

    from torch_matgrad.triton_kernels.tma_gemm import tma_gemm_kernel

    signature, constexprs = _tma_signature(tma_gemm_kernel, dtype, flags, meta)
    src = triton.compiler.ASTSource(fn=tma_gemm_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=target, options=options)
    ptx = compiled.asm["ptx"]
    missing = [op for op in ("cp.async.bulk.tensor", "wgmma") if op not in ptx]
    assert not missing, f"no {' and no '.join(missing)} in the PTX"
    assert compiled.asm.get("cubin"), "no cubin"
    return compiled


def _signature(kernel, dtype, flags, meta=_META, unit_strides=None):
    """Argument types and constexprs; absent tensors are constexpr None, as at launch.
    With ``unit_strides`` (the stride arguments that are 1), also the attributes that a
    launch on aligned tensors gets: those strides constexpr 1, every pointer and every
    other integer divisible by 16 (as for large contiguous operands)."""
    absent = {
        "b_ptr": not flags["HAS_C"], "c_ptr": not flags["HAS_C"],
        "s_ptr": flags["PRO_ACT"] == 0 and flags["HIDDEN"] != 2,
        "bias_ptr": not flags["HAS_BIAS"], "z_ptr": not flags["STORE_Z"], "rowsum_ptr": not flags["ROWSUM"],
        "b2_ptr": not flags["DUAL"], "bias2_ptr": not (flags["DUAL"] and flags["HAS_BIAS"]),
        "e_ptr": flags["EPI_GRAD"] == 0, "e2_ptr": flags["EPI_GRAD"] != 2, "colsum_ptr": not flags["COLSUM"],
    }
    constexprs = {**flags, **meta, **{name: None for name, none in absent.items() if none}}
    if unit_strides is not None:
        constexprs.update({name: 1 for name in unit_strides})
    signature = {
        name: "constexpr" if name in constexprs else ("*" + _TYPE[dtype] if name.endswith("_ptr") else "i32")
        for name in kernel.arg_names
    }
    attrs = {} if unit_strides is None else {
        (i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if signature[name] != "constexpr"
    }
    return signature, constexprs, attrs


def _cubin(kernel, signature, constexprs, attrs, target, options):
    """``kernel`` compiled for ``target`` down to a cubin."""
    import triton

    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=target, options=options)
    assert compiled.asm.get("cubin"), "no cubin"
    return compiled


def _compile_pointer(target, dtype, flags, meta, options, unit_strides=None):
    """The pointer kernel compiled to a cubin (``unit_strides``: see :func:`_signature`)."""
    from torch_matgrad.triton_kernels.fused_gemm import fused_gemm_kernel

    return _cubin(fused_gemm_kernel, *_signature(fused_gemm_kernel, dtype, flags, meta, unit_strides), target, options)


def compile_all(capability: int) -> int:
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    failures = 0
    variants = specialisations()
    if not COMPILE_ALL:
        variants = [v for v in variants if " mlp " not in v[0] or v[1] == torch.bfloat16]
    print(f"compiling {len(variants)} specialisations")
    for label, dtype, flags in variants:
        try:
            _compile_pointer(target, dtype, flags, _META, _OPTIONS)
        except Exception as e:  # report every failing variant, not just the first
            failures += 1
            print(f"sm_{capability} {label}: {type(e).__name__}: {str(e)[-2000:]}")
    if capability < 90:
        return failures
    variants = tma_specialisations()
    print(f"compiling {len(variants)} descriptor-kernel specialisations")
    for label, dtype, flags in variants:
        try:
            _compile_tma(target, dtype, flags, _TMA_META, _OPTIONS)
        except Exception as e:
            failures += 1
            print(f"sm_{capability} descriptor kernel, {label}: {type(e).__name__}: {str(e)[-2000:]}")
    return failures


def _report(cases) -> int:
    """Compiles each ``(configuration name, launch, compile)`` case and prints a table row
    with the registers and spilled bytes from ptxas's report (``TRITON_DUMP_PTXAS_LOG=1``
    and ``TRITON_ALWAYS_COMPILE=1``) and the shared memory. Returns the failures."""
    import contextlib
    import io
    import re

    failures = 0
    print("| configuration | launch | registers | spilled bytes (stores) | shared memory (bytes) |")
    print("| --- | --- | --- | --- | --- |")
    for name, what, compile_ in cases:
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                compiled = compile_()
        except Exception as e:
            failures += 1
            print(f"| {name} | {what} | FAILED: {type(e).__name__}: {str(e)[-500:]} | | |")
            continue
        regs = re.search(r"Used (\d+) registers", log.getvalue())
        spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
        print(f"| {name} | {what} | {regs.group(1) if regs else '?'} | {spills.group(1) if spills else '?'} "
              f"| {compiled.metadata.shared} |")
    return failures


def _options(cfg):
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def register_report() -> int:
    """Each descriptor-kernel configuration compiled for sm_90 in bf16 (``python
    test_triton_compile.py 90 report``): one row per launch (:func:`_report`)."""
    from triton.backends.compiler import GPUTarget

    from torch_matgrad.triton_kernels import ops

    target = GPUTarget("cuda", 90, 32)
    cases = []
    for cfg, name in zip(ops.TMA_CONFIGS, ops.TMA_CONFIG_NAMES):
        for what, kwargs in _REPORT_FLAGS.items():
            flags = _with_layout(ops.specialisation(torch.bfloat16, **kwargs), _REPORT_LAYOUTS[what])
            assert ops.tma_config_fits(cfg, elem=2, limit=_H100_SHARED), name  # what the autotuner runs on an H100
            cases.append((name, what, functools.partial(_compile_tma, target, torch.bfloat16, flags, cfg.kwargs,
                                                        _options(cfg))))
    return _report(cases)


# The MLP block's launches (the pointer kernel's) for the register report at real tiles,
# with the strides that are 1 when every tensor is contiguous (x, the weights, G; u and g
# halves of [g | u]), and the linear layer's forward beside them as the baseline.
_FORWARD_UNITS = ("stride_ak", "stride_bk", "stride_cn", "stride_bias")  # x, W^T, C, bias
_GRAD_H_UNITS = ("stride_ak", "stride_bn", "stride_cn", "stride_en", "stride_e2n")  # G, Wd, C, u, g
_MLP_REPORT_FLAGS = {
    "linear forward, bias (baseline)": (dict(has_bias=True), _FORWARD_UNITS),
    "[g | u]": (dict(has_bias=True, dual=True), _FORWARD_UNITS),
    "out, plain gelu_tanh h": (dict(has_bias=True, hidden=True, mlp_activation="gelu_tanh"), _FORWARD_UNITS),
    "out, gated silu h": (dict(has_bias=True, hidden=True, gated=True, mlp_activation="silu"),
                          _FORWARD_UNITS + ("stride_sk",)),
    # A = u^T, S = g^T, B = G, C = grad_Wd^T (stored transposed)
    "grad_Wd + grad_bd, gated silu h": (dict(hidden=True, gated=True, colsum=True, mlp_activation="silu"),
                                        ("stride_am", "stride_sm", "stride_bn", "stride_cm", "stride_colsum")),
    "grad_h, plain gelu_tanh epilogue": (dict(grad_hidden=True, mlp_activation="gelu_tanh"), _GRAD_H_UNITS),
    "grad_h, gated silu epilogue": (dict(grad_hidden=True, gated=True, mlp_activation="silu"), _GRAD_H_UNITS),
}


def mlp_register_report() -> int:
    """The MLP block's launches compiled for sm_90 in bf16 in each pointer-kernel
    configuration that the autotuner keeps for them on an H100 (``python
    test_triton_compile.py 90 mlp-report``; not a test: ~60 compiles at real tiles)."""
    from triton.backends.compiler import GPUTarget

    from torch_matgrad.triton_kernels import configs, ops

    configs._shared_memory_limit = lambda device: _H100_SHARED  # the pruning, without a GPU
    target = GPUTarget("cuda", 90, 32)
    a = torch.empty(1, 1, dtype=torch.bfloat16)
    cases = []
    for cfg, name in zip(ops.CONFIGS, ops.CONFIG_NAMES):
        for what, (kwargs, units) in _MLP_REPORT_FLAGS.items():
            flags = ops.specialisation(torch.bfloat16, **kwargs)
            m_bucket = 4096 if cfg.kwargs["BLOCK_M"] >= ops.SMALL_M else 16  # the side of SMALL_M it serves
            if configs._fits([cfg], {"a_ptr": a, "M_BUCKET": m_bucket}, **flags) != [cfg]:
                continue
            cases.append((name, what, functools.partial(_compile_pointer, target, torch.bfloat16, flags, cfg.kwargs,
                                                        _options(cfg), units)))
    return _report(cases)


def _compiler(*args, env=()):
    """This file as a script in a child process, without the interpreter."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **dict(env)}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    return subprocess.Popen(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _compile_each(capability: int, what: str, variants) -> int:
    """Compiles each ``(label, compile)`` of ``variants`` (``compile(target)``) for
    ``sm_<capability>``, after printing how many; prints each failure; returns their count."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    print(f"compiling {len(variants)} {what} specialisations")
    failures = 0
    for label, compile_one in variants:
        try:
            compile_one(target)
        except Exception as e:  # report every failing variant, not just the first
            failures += 1
            print(f"sm_{capability} {label}: {type(e).__name__}: {str(e)[-2000:]}")
    return failures


def _assert_both_targets_compile(mode: str, what: str, expected: int) -> None:
    """This file's ``mode`` for sm_80 and sm_90 side by side, each :func:`_compile_each`'s
    ``expected`` variants without a failure."""
    pytest.importorskip("triton.backends.nvidia")
    procs = [_compiler(str(cc), mode) for cc in TARGETS]
    for cc, p in zip(TARGETS, procs):
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, f"sm_{cc}:\n{out[-6000:]}"
        assert f"compiling {expected} {what} specialisations" in out, out


@pytest.mark.slow
def test_every_specialisation_compiles_for_sm80_and_sm90():
    # sm_80: the pointer kernel; sm_90: both kernels (the descriptor kernel's PTX
    # checked for bulk tensor copies and wgmma).
    pytest.importorskip("triton.backends.nvidia")
    procs = [_compiler(str(cc)) for cc in TARGETS]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for cc, p, out in zip(TARGETS, procs, outputs):
        assert p.returncode == 0, f"sm_{cc}:\n{out[-6000:]}"
        assert f"compiling {EXPECTED if COMPILE_ALL else EXPECTED_CI} specialisations" in out, out[-2000:]
    assert f"compiling {EXPECTED_TMA} descriptor-kernel specialisations" in outputs[TARGETS.index(90)]


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("TORCH_MATGRAD_REGISTER_REPORT"),
    reason="a report to read before a GPU run (~1 min of compiles): TORCH_MATGRAD_REGISTER_REPORT=1",
)
def test_descriptor_kernel_registers_at_real_tiles():
    # The tiles the GPU runs (128 x 256 and the rest), compiled for sm_90: every
    # configuration compiles with TMA copies and wgmma for the forward and both
    # products of the default backward; the registers and spills of each are printed
    # (pytest -rP shows them).
    pytest.importorskip("triton.backends.nvidia")
    from torch_matgrad.triton_kernels.ops import TMA_CONFIG_NAMES

    # ptxas's log is printed only when it runs: compile past Triton's cache.
    proc = _compiler("90", "report", env={"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"})
    out = proc.communicate(timeout=600)[0]
    table = [line for line in out.splitlines() if line.startswith("|")]
    print("\n".join(table))
    assert proc.returncode == 0, out[-6000:]
    assert all("?" not in row for row in table), "ptxas reported no registers or spills"
    for name in TMA_CONFIG_NAMES:
        launches = [row.split(" | ")[1] for row in table if row.startswith(f"| {name} |")]
        assert {"forward bias+gelu_tanh+z", "grad_x", "grad_W + grad_b"} <= set(launches), (name, table)


# ------------------------------------------------------------- split-K launches
# A decoding product split along K (``ops.split_k``): the pointer kernel with ``SPLIT_K``
# (the plain product into the workspace; one flag set per dtype and fp32 precision, 5)
# and ``split_k_reduce_kernel`` (the sum and the forward's epilogue): in bf16 each
# forward flag set (bias or not, 5 activations, z where the backward needs it: 10), in
# the other output dtypes the one with every flag on (bias, GELU-tanh, z): 13; the whole
# matrix (40) with TORCH_MATGRAD_COMPILE_ALL=1.
EXPECTED_SPLIT_K, EXPECTED_SPLIT_K_CI = 5 + 40, 5 + 13
_REDUCE_META = dict(BLOCK_M=16, BLOCK_N=32)


def split_k_specialisations(every: bool = COMPILE_ALL):
    """``(kernel, label, dtype, flags)``: ``"pointer"`` with ``SPLIT_K``, ``"reduce"``
    with the epilogue's flags (``ops._split_flags``)."""
    from torch_matgrad.formulas import ACTIVATIONS, NEEDS_PREACTIVATION
    from torch_matgrad.triton_kernels.ops import _split_flags, specialisation

    variants = []
    for precision in ("highest", "high"):
        for dtype in _TYPE:
            if precision == "high" and dtype != torch.float32:
                continue
            with float32_matmul_precision(precision):
                flags = specialisation(dtype, split_k=True)
            variants.append(("pointer", f"{_TYPE[dtype]} {flags['INPUT_PRECISION']} split-K product", dtype, flags))
    for dtype in _TYPE:
        for act in ACTIVATIONS:
            for bias in (True, False):
                if not (every or dtype == torch.bfloat16 or (bias and act == "gelu_tanh")):
                    continue
                store_z = act in NEEDS_PREACTIVATION
                forward = specialisation(dtype, has_bias=bias, activation=act, store_z=store_z)
                label = f"{_TYPE[dtype]} split-K sum bias={bias} act={act} z={store_z}"
                variants.append(("reduce", label, dtype, _split_flags(tuple(forward.items()))[2]))
    return variants


def _compile_reduce(target, dtype, flags, meta, options, unit_strides=None):
    """``split_k_reduce_kernel`` compiled to a cubin (``unit_strides``: see :func:`_signature`)."""
    from torch_matgrad.triton_kernels.fused_gemm import split_k_reduce_kernel

    kernel = split_k_reduce_kernel
    absent = {"bias_ptr": not flags["HAS_BIAS"], "z_ptr": not flags["STORE_Z"]}
    constexprs = {**flags, **meta, **{name: None for name, none in absent.items() if none}}
    constexprs.update({name: 1 for name in unit_strides or ()})
    accumulator = "fp64" if dtype == torch.float64 else "fp32"
    signature = {
        name: "constexpr" if name in constexprs else (
            ("*" + (accumulator if name == "ws_ptr" else _TYPE[dtype])) if name.endswith("_ptr") else "i32")
        for name in kernel.arg_names
    }
    attrs = {} if unit_strides is None else {
        (i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
        if signature[name] != "constexpr" and name != "splits"
    }
    return _cubin(kernel, signature, constexprs, attrs, target, options)


def compile_split_k(capability: int) -> int:
    """:func:`split_k_specialisations` compiled for ``sm_<capability>``; returns the failures."""
    return _compile_each(capability, "split-K", [
        (label, functools.partial(_compile_pointer, dtype=dtype, flags=flags, meta=_META, options=_OPTIONS)
         if kernel == "pointer" else
         functools.partial(_compile_reduce, dtype=dtype, flags=flags, meta=_REDUCE_META, options=_OPTIONS))
        for kernel, label, dtype, flags in split_k_specialisations()])


def split_k_register_report() -> int:
    """The split-K launches at their GPU tiles, bf16, contiguous operands (x, ``W^T``,
    the workspace), for sm_90 and sm_80 (``python test_triton_compile.py 90
    split-k-report``): the pointer kernel with ``SPLIT_K`` in each configuration the
    autotuner keeps for it on an H100, and the sum with every flag on (a :func:`_report`
    table)."""
    from triton.backends.compiler import GPUTarget

    from torch_matgrad.triton_kernels import configs, ops

    configs._shared_memory_limit = lambda device: _H100_SHARED  # the pruning, without a GPU
    product = ops.specialisation(torch.bfloat16, split_k=True)
    kept = configs._fits(ops.CONFIGS, {"a_ptr": torch.empty(1, 1, dtype=torch.bfloat16), "M_BUCKET": 1}, **product)
    every = ops._split_flags(tuple(ops.specialisation(torch.bfloat16, has_bias=True, activation="gelu_tanh",
                                                      store_z=True).items()))[2]
    reduce_cfg = configs.REDUCE_CONFIG
    cases = []
    for capability in (90, 80):
        target = GPUTarget("cuda", capability, 32)
        for cfg in kept:
            cases.append((f"sm_{capability} {ops.config_name(cfg)}", "split-K product", functools.partial(
                _compile_pointer, target, torch.bfloat16, product, cfg.kwargs, _options(cfg),
                ("stride_ak", "stride_bk", "stride_cn"))))
        cases.append((f"sm_{capability} {reduce_cfg.kwargs}", "split-K sum, bias+gelu_tanh+z", functools.partial(
            _compile_reduce, target, torch.bfloat16, every, reduce_cfg.kwargs, _options(reduce_cfg),
            ("stride_wn", "stride_cn", "stride_bias"))))
    return _report(cases)


@pytest.mark.slow
def test_split_k_kernels_compile_for_sm80_and_sm90():
    _assert_both_targets_compile("split-k", "split-K", EXPECTED_SPLIT_K if COMPILE_ALL else EXPECTED_SPLIT_K_CI)


# ------------------------------------------------------------ the G_z pass
# ``triton_kernels/gz_pass.py`` (the backward's G_z with grad_b summed beside it, for a
# grad_W on cuBLAS), at its GPU tiles: every activation in bf16 and GELU-tanh in the
# other dtypes, 8 per target; all 20 with TORCH_MATGRAD_COMPILE_ALL=1.
EXPECTED_GZ, EXPECTED_GZ_CI = 4 * 5, 5 + 3


def gz_pass_specialisations(every: bool = COMPILE_ALL):
    """``(dtype, activation)`` of each compiled pass."""
    from torch_matgrad.triton_kernels.fused_gemm import ACT_CODES

    return [(dtype, act) for dtype in _TYPE for act in ACT_CODES
            if every or dtype == torch.bfloat16 or act == "gelu_tanh"]


def _compile_gz_pass(target, dtype, act):
    import triton.language as tl

    from torch_matgrad.triton_kernels import gz_pass
    from torch_matgrad.triton_kernels.fused_gemm import ACT_CODES

    kernel = gz_pass.gz_bias_kernel
    wide = dtype == torch.float64  # the partial sums' type: fp64 for fp64, else fp32
    constexprs = dict(ACT=ACT_CODES[act], ACC_DTYPE=tl.float64 if wide else tl.float32, **gz_pass._META)
    signature = {
        name: "constexpr" if name in constexprs else
        ("*fp64" if wide else "*fp32") if name == "part_ptr" else
        "*" + _TYPE[dtype] if name.endswith("_ptr") else "i32"
        for name in kernel.arg_names
    }
    return _cubin(kernel, signature, constexprs, {}, target, dict(num_warps=4))


def compile_gz_pass(capability: int) -> int:
    """:func:`gz_pass_specialisations` compiled for ``sm_<capability>``; returns the failures."""
    return _compile_each(capability, "G_z pass", [
        (f"G_z pass {_TYPE[dtype]} {act}", functools.partial(_compile_gz_pass, dtype=dtype, act=act))
        for dtype, act in gz_pass_specialisations()])


@pytest.mark.slow
def test_gz_pass_compiles_for_sm80_and_sm90():
    _assert_both_targets_compile("gz-pass", "G_z pass", EXPECTED_GZ if COMPILE_ALL else EXPECTED_GZ_CI)


# ------------------------------------------------- linear cross-entropy kernels
# ``triton_kernels/cross_entropy.py``: the forward (its four flags), the combining kernel,
# the backward (its three loss flags and the gradients needed; grad_b only with a bias)
# and the logits kernel of the chunked op (its three flags; no product, so fp32 once). CI
# compiles each flag both ways in bf16 (every flag on, then each one off, plus each
# gradient alone) and the other dtypes with every flag on: 28 per target. The whole
# matrix with TORCH_MATGRAD_COMPILE_ALL=1 (249).
_CE_POINTER_TYPES = {
    "target_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "part_ptr": "*fp32", "d_ptr": "*fp32",
    "grad_x_ptr": "*fp32", "grad_w_ptr": "*fp32", "grad_b_ptr": "*fp32", "weight_ptr": "*fp32",
}
_CE_FLOATS = ("smoothing", "z_loss", "softcap", "filter_eps")
_CE_FLAGS = {
    "lce_forward_kernel": ("HAS_BIAS", "SOFTCAP", "SMOOTHING", "SPLIT"),
    "lce_backward_kernel": ("HAS_BIAS", "SOFTCAP", "SMOOTHING", "NEED_X", "NEED_W", "NEED_B"),
    "ce_logits_kernel": ("SOFTCAP", "SMOOTHING", "WRITE_GRAD"),
}
_CE_NO_PRODUCT = ("ce_logits_kernel",)  # no tl.dot: no INPUT_PRECISION, UPCAST
EXPECTED_CE, EXPECTED_CE_CI = 249, 28
_CE_META = {  # small tiles (64 rows for 4 warps still takes Hopper's wgmma path)
    "lce_forward_kernel": dict(BLOCK_M=64, BLOCK_V=32, BLOCK_K=16),
    "lce_backward_kernel": dict(BLOCK_M=64, BLOCK_V=32, BLOCK_K=16, GROUP_M=8),
    "lce_combine_kernel": dict(BLOCK_N=128),
    "ce_logits_kernel": dict(BLOCK_V=1024),
}


def _ce_valid(kernel, flags):
    """The backward needs some gradient, and grad_b a bias."""
    if kernel != "lce_backward_kernel":
        return True
    return (flags["NEED_X"] or flags["NEED_W"] or flags["NEED_B"]) and (flags["HAS_BIAS"] or not flags["NEED_B"])


def ce_specialisations(every: bool = COMPILE_ALL):
    """``(kernel name, label, dtype, flags)`` of the cross-entropy kernels' launches."""
    from torch_matgrad.triton_kernels.ops import input_precision

    dtypes = []  # (dtype, the precision setting of fp32 products): bf16 first
    for precision, dtype in (("highest", torch.bfloat16), ("highest", torch.float16), ("highest", torch.float32),
                             ("high", torch.float32)):
        with float32_matmul_precision(precision):
            dtypes.append((dtype, input_precision(dtype)))
    variants = [("lce_combine_kernel", "combine", torch.bfloat16, {})]  # no operand: any dtype
    for kernel, names in _CE_FLAGS.items():
        every_on = dict.fromkeys(names, True)
        if every:
            sets = [dict(zip(names, values)) for values in itertools.product((False, True), repeat=len(names))]
        else:
            sets = [every_on] + [{**every_on, name: False} for name in names]
            if kernel == "lce_backward_kernel":
                sets.append({**every_on, "HAS_BIAS": False, "NEED_B": False})
                sets += [{**every_on, **{n: n == need for n in ("NEED_X", "NEED_W", "NEED_B")}}
                         for need in ("NEED_X", "NEED_W", "NEED_B")]
        for i, (dtype, precision) in enumerate(dtypes):
            if kernel in _CE_NO_PRODUCT and precision == "tf32":
                continue  # no product: the same kernel as fp32's
            for flags in sets if every or i == 0 else [every_on]:
                if _ce_valid(kernel, flags):
                    if kernel not in _CE_NO_PRODUCT:
                        flags = {**flags, "INPUT_PRECISION": precision, "UPCAST": False}
                    on = ",".join(name for name in names if flags[name]) or "-"
                    variants.append((kernel, f"{_TYPE[dtype]} {precision} {kernel} {on}", dtype, flags))
    return variants


def _compile_ce(target, kernel_name, dtype, flags, meta, options, unit_strides=None):
    """One cross-entropy kernel compiled to a cubin; absent tensors are constexpr None,
    as at launch (``unit_strides``: see :func:`_signature`)."""
    from torch_matgrad.triton_kernels import cross_entropy

    kernel = getattr(cross_entropy, kernel_name)
    absent = {
        "bias_ptr": not flags.get("HAS_BIAS", True), "part_ptr": not flags.get("SPLIT", True),
        "grad_x_ptr": not flags.get("NEED_X", True), "grad_w_ptr": not flags.get("NEED_W", True),
        "grad_b_ptr": not flags.get("NEED_B", True), "weight_ptr": not flags.get("WRITE_GRAD", True),
    }
    constexprs = {**flags, **meta, **{name: None for name, none in absent.items() if none}}
    constexprs.update({name: 1 for name in unit_strides or ()})
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = _CE_POINTER_TYPES.get(name, "*" + _TYPE[dtype])
        else:
            signature[name] = "fp32" if name in _CE_FLOATS else "i32"
    attrs = {} if unit_strides is None else {
        (i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
        if signature[name] not in ("constexpr", "fp32") and name not in ("ignore_index", "TILES_PER_SPLIT")
    }
    return _cubin(kernel, signature, constexprs, attrs, target, options)


def compile_cross_entropy(capability: int) -> int:
    """:func:`ce_specialisations` compiled for ``sm_<capability>``; returns the failures."""
    return _compile_each(capability, "cross-entropy", [
        (label, functools.partial(_compile_ce, kernel_name=kernel, dtype=dtype, flags=flags, meta=_CE_META[kernel],
                                  options=_OPTIONS))
        for kernel, label, dtype, flags in ce_specialisations()])


def ce_register_report() -> int:
    """The cross-entropy kernels at their GPU tiles (``cross_entropy.FORWARD_META``,
    ``BACKWARD_META``), bf16 with every flag on and contiguous operands, for sm_90 and
    sm_80 (``python test_triton_compile.py 90 ce-report``): a :func:`_report` table."""
    from triton.backends.compiler import GPUTarget

    from torch_matgrad.triton_kernels import cross_entropy

    units = ("stride_xh", "stride_wh", "stride_bias", "stride_target", "stride_loss", "stride_lse", "stride_d",
             "stride_gxh", "stride_gwh", "stride_gb", "stride_weight")
    cases = []
    for capability in (90, 80):
        target = GPUTarget("cuda", capability, 32)
        for kernel, label, dtype, flags in ce_specialisations(every=False):
            if dtype != torch.bfloat16 or not all(flags.get(name, True) for name in _CE_FLAGS.get(kernel, ())):
                continue
            meta = dict(getattr(cross_entropy, {"lce_forward_kernel": "FORWARD_META", "lce_combine_kernel": "COMBINE_META",
                                                "ce_logits_kernel": "LOGITS_META"}.get(kernel, "BACKWARD_META")))
            options = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
            kernel_units = [u for u in units if u in getattr(cross_entropy, kernel).arg_names]
            cases.append((f"sm_{capability}", label, functools.partial(_compile_ce, target, kernel, dtype, flags, meta,
                                                                        options, kernel_units)))
    return _report(cases)


@pytest.mark.slow
def test_cross_entropy_kernels_compile_for_sm80_and_sm90():
    _assert_both_targets_compile("cross-entropy", "cross-entropy", EXPECTED_CE if COMPILE_ALL else EXPECTED_CE_CI)


if __name__ == "__main__":
    if sys.argv[2:] == ["report"]:
        sys.exit(1 if register_report() else 0)
    if sys.argv[2:] == ["mlp-report"]:
        sys.exit(1 if mlp_register_report() else 0)
    if sys.argv[2:] == ["cross-entropy"]:
        sys.exit(1 if compile_cross_entropy(int(sys.argv[1])) else 0)
    if sys.argv[2:] == ["gz-pass"]:
        sys.exit(1 if compile_gz_pass(int(sys.argv[1])) else 0)
    if sys.argv[2:] == ["split-k"]:
        sys.exit(1 if compile_split_k(int(sys.argv[1])) else 0)
    if sys.argv[2:] == ["split-k-report"]:
        sys.exit(1 if split_k_register_report() else 0)
    if sys.argv[2:] == ["ce-report"]:
        sys.exit(1 if ce_register_report() else 0)
    sys.exit(1 if compile_all(int(sys.argv[1])) else 0)
