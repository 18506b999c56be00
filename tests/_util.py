"""Per-dtype tolerances and reference helpers shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Relative error of a whole tensor (Frobenius norm) against a float64 reference.
# fp32: GEMMs with K <= a few hundred land near 1e-7; TF32 would need ~1e-3 and is
#       switched off for these comparisons. bf16/fp16: one rounding of the inputs plus
#       the output (2^-8 / 2^-11 unit roundoff) bounds what a correct kernel can reach.
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    if want.numel() == 0:
        assert got.shape == want.shape
        return 0.0
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_rel_close(got, want, dtype, what=""):
    err = rel_err(got, want)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.2e} > {REL_TOL[dtype]:.0e} for {dtype}"


def activate_ref(z, activation):
    """The activation from ``torch.nn.functional`` alone."""
    if activation is None:
        return z
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return getattr(F, activation)(z)


def reference(x, weight, bias, activation):
    """``act(F.linear(x, W, b))`` with ``torch.nn.functional`` alone."""
    return activate_ref(F.linear(x, weight, bias), activation)
