"""DDP, FSDP2 and tensor parallelism on CPU with gloo, 2 processes: gradients and
parameters after a few SGD steps equal a single-process nn.Linear run.

Each test spawns two workers (``torch.multiprocessing``, spawn start method, a file
store in ``tmp_path``); a worker that fails raises in the test with its traceback, and a
worker that hangs is killed after ``TIMEOUT_S``.
"""

import copy
import importlib
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torch_matgrad as tm
from _backends import BACKENDS
from _util import assert_rel_close

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
]

WORLD, STEPS, BATCH, LR = 2, 3, 8, 0.1
TIMEOUT_S = 120  # a healthy run takes a few seconds per test; only a hang gets near this


def _models():
    """(nn.Linear reference, the same weights swapped and fused); every activation, one
    layer without bias. Fused slots 0/2/4/6 are the Linears (1/3/5/7 are Identity)."""
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Linear(12, 20), nn.GELU(),
        nn.Linear(20, 12), nn.SiLU(),
        nn.Linear(12, 20), nn.ReLU(),
        nn.Linear(20, 6, bias=False), nn.GELU(approximate="tanh"),
    )
    model = copy.deepcopy(ref)
    assert tm.replace_linear(model) == 4 and tm.fuse_activations(model) == 4
    return ref, model


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 12, generator=g), torch.randn(BATCH, 6, generator=g)) for _ in range(STEPS)]


def _full(t):
    """A DTensor's global value; plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(model, batches, check=None):
    """SGD on mean-squared error; ``check(step, grads)`` sees each step's gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        if check is not None:
            check(step, [_full(p.grad) for p in model.parameters()])
        opt.step()
    return [_full(p.detach()) for p in model.parameters()]


def _compare_with_single_process(model, local_batches):
    """Train ``model`` on this rank's batches and check every step's gradients and the
    final parameters against the nn.Linear reference trained on the full batches."""
    ref, _ = _models()
    ref_grads = []
    ref_params = _train(ref, _batches(), lambda step, grads: ref_grads.append([g.clone() for g in grads]))

    def check(step, grads):
        assert len(grads) == len(ref_grads[step])
        for i, (g, want) in enumerate(zip(grads, ref_grads[step])):
            assert_rel_close(g, want, torch.float32, what=f"rank {dist.get_rank()} step {step} grad #{i}")

    params = _train(model, local_batches, check)
    for i, (p, want) in enumerate(zip(params, ref_params)):
        assert_rel_close(p, want, torch.float32, what=f"rank {dist.get_rank()} param #{i}")


def _data_shard(rank):
    """Each rank's half of every batch: the mean over ranks of the per-rank mean losses'
    gradients is the full batch's gradient (equal halves)."""
    rows = BATCH // WORLD
    return [(x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]) for x, y in _batches()]


def _ddp(rank):
    from torch.nn.parallel import DistributedDataParallel

    _, model = _models()
    _compare_with_single_process(DistributedDataParallel(model), _data_shard(rank))


def _fsdp2(rank):
    from torch.distributed.fsdp import fully_shard

    _, model = _models()
    for layer in model:
        if isinstance(layer, (tm.Linear, tm.LinearAct)):
            fully_shard(layer)
    fully_shard(model)
    assert type(model[0].weight).__name__ == "DTensor"  # really sharded
    _compare_with_single_process(model, _data_shard(rank))


def _tensor_parallel(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    _, model = _models()
    mesh = init_device_mesh("cpu", (WORLD,))
    # The styles shard nn.Linear (and nn.Embedding) only: a fused layer, which is not an
    # nn.Linear, is refused rather than sharded as if it were a linear map.
    for style in (ColwiseParallel(), RowwiseParallel()):
        try:
            parallelize_module(copy.deepcopy(model), mesh, {"0": style})
        except NotImplementedError as e:
            assert "nn.Linear" in str(e), e
        else:
            raise AssertionError(f"{type(style).__name__} sharded a LinearAct")
    # restore_linear puts the activations back in their slots (1/3/5/7); swapped again,
    # the Linears are torch_matgrad's and the activations run after the reduction. The
    # rowwise layers 2 and 6 are followed by one: their local products are partial sums,
    # and the activation must see the reduced sum, not each rank's part.
    assert tm.restore_linear(model) == 4 and tm.replace_linear(model) == 4
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel(), "4": ColwiseParallel(), "6": RowwiseParallel()}
    parallelize_module(model, mesh, plan)
    assert type(model[0].weight).__name__ == "DTensor"
    _compare_with_single_process(model, _batches())  # every rank sees the whole batch


SCENARIOS = {"ddp": _ddp, "fsdp2": _fsdp2, "tp": _tensor_parallel}


def _worker(rank, scenario, backend, store):
    torch.set_num_threads(1)  # two workers on two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        with tm.use_backend(backend):
            SCENARIOS[scenario](rank)
        # Tear down only once both ranks are done: a rank destroying gloo's process
        # group while its peer still talks to it can abort the peer ("terminate called
        # without an active exception", seen under load). The barrier is gloo's own, so
        # a rank may leave it while its peer still reads; the file store says when both
        # have left it.
        dist.barrier()
        done = dist.distributed_c10d._get_default_store()
        done.set(f"done{rank}", "1")
        done.wait([f"done{r}" for r in range(WORLD)])
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's finalisation, where gloo's threads have
    # also aborted a worker (pytorch#179291). A failure raises above, for spawn to report.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(scenario, backend, tmp_path):
    ctx = mp.start_processes(
        _worker, args=(scenario, backend, tmp_path / "store"), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):  # raises a worker's error
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{scenario} workers did not finish in {TIMEOUT_S} s")


def _needs(module, name):
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"{module}.{name} is not available in torch {torch.__version__}: {e}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_matches_single_process(backend, tmp_path):
    _spawn("ddp", backend, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_matches_single_process(backend, tmp_path):
    _needs("torch.distributed.fsdp", "fully_shard")  # torch >= 2.6
    _spawn("fsdp2", backend, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_matches_single_process(backend, tmp_path):
    _needs("torch.distributed.tensor.parallel", "parallelize_module")
    _spawn("tp", backend, tmp_path)
