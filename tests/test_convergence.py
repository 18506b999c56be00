"""Train the example's tiny transformer with nn.Linear and with the swapped + fused
layers from the same initialisation: per-step losses and final parameters agree.

The model and loop come from ``examples/swap_into_transformer.py`` (loaded by path), so
the example is exercised here too and cannot drift from what is tested.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import torch_matgrad as tm
from _util import REL_TOL, rel_err

_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "swap_into_transformer.py"
_spec = importlib.util.spec_from_file_location("swap_into_transformer", _EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

STEPS = 20

# (device, dtype) -> (per-step loss tolerance, final-parameter tolerance), relative.
# CPU fp32: the CPU path runs the same kernels as nn.Linear (F.linear forward, mm
#   backward), so the runs agree to rounding (seen: bit equal); 1e-5 as REL_TOL.
# bf16 autocast: each GEMM rounds to bf16 (2^-8), and Adam divides by the gradient's
#   running RMS, so an ulp-level gradient difference in a near-zero entry can flip that
#   entry's update: 1e-2 over a whole tensor bounds what rounding can do in 20 steps at
#   lr 1e-2, while a wrong formula moves parameters by O(1). Losses: 2^-7, two bf16 ulps.
# CUDA, tested on both "auto" (cuBLAS) and "triton": Triton tiles sum K in another order
#   than cuBLAS, so the runs differ by rounding from the first step on, and AdamW turns rounding noise in a gradient that is zero in
#   exact arithmetic (the attention's key bias: softmax ignores it) into full lr-sized
#   steps (seen on an H100: 1e-2 to 0.7 relative in in_proj_bias after 20 steps). So on
#   CUDA the parameters are not compared after training; instead every parameter's
#   gradient at the first step (same weights, same batch) must agree to the GEMMs'
#   rounding, and the losses of all 20 steps as on the CPU.
TOL = {
    ("cpu", torch.float32): (1e-5, REL_TOL[torch.float32]),
    ("cpu", torch.bfloat16): (2**-7, 1e-2),
    ("cuda", torch.float32): (1e-4, REL_TOL[torch.float32]),
    ("cuda", torch.bfloat16): (2**-7, REL_TOL[torch.bfloat16]),
    ("cuda", torch.float16): (2**-9, REL_TOL[torch.float16]),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # The model's GEMMs are tiny (32 x 128): with two intra-op threads on a loaded
    # 2-core CI machine a step took ~400 ms instead of ~5 ms (threads waiting on each
    # other), so these tests run single-threaded and restore the setting after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _first_step_gradients(models, batch, autocast_dtype):
    """Each model's parameter gradients of the loss on ``batch``, from the same weights."""
    grads = []
    for model in models:
        model.zero_grad(set_to_none=True)
        x, y = batch
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = example.loss_fn(model(x), y)
        loss.backward()
        grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    return grads


def _check(device, autocast_dtype):
    loss_tol, param_tol = TOL[device, autocast_dtype or torch.float32]
    original, swapped, n_replaced, n_fused = example.make_pair(device=device)
    # Every nn.Linear outside attention is swapped: 2 blocks x 2 MLP layers + the head.
    assert (n_replaced, n_fused) == (5, 2)
    assert sum(isinstance(m, tm.LinearAct) and m.activation == "gelu" for m in swapped.modules()) == 2
    batches = example.make_batches(STEPS, device=device)
    if device == "cuda":
        ref_grads, grads = _first_step_gradients([original, swapped], batches[0], autocast_dtype)
        for name, g in grads.items():
            err = rel_err(g, ref_grads[name])
            assert err <= param_tol, f"{name}.grad: relative difference {err:.1e} > {param_tol:.0e}"
    (ref_losses, losses), _ = example.train([original, swapped], batches, autocast_dtype)
    assert ref_losses[-1] < ref_losses[0] - 0.1, "the toy task should be learning"
    for step, (a, b) in enumerate(zip(ref_losses, losses)):
        assert abs(a - b) <= loss_tol * abs(a), f"step {step}: loss {b} vs nn.Linear {a}"
    if device == "cuda":
        return
    ref_params = dict(original.named_parameters())
    for name, p in swapped.named_parameters():
        assert p.dtype == torch.float32
        err = rel_err(p.detach(), ref_params[name].detach())
        assert err <= param_tol, f"{name}: relative difference {err:.1e} > {param_tol:.0e}"


def test_fp32_training_matches_nn_linear():
    _check("cpu", None)


def test_bf16_autocast_training_matches_nn_linear():
    _check("cpu", torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_training_matches_nn_linear(autocast_dtype, backend, monkeypatch):
    # TF32 in nn.Linear's cuBLAS GEMMs would be a 1e-3 difference unrelated to the layer.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with tm.use_backend(backend):  # "auto" is cuBLAS on CUDA; the kernels when asked for
        _check("cuda", autocast_dtype)
