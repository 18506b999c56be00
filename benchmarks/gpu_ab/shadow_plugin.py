"""pytest plugin (``-p shadow_plugin``, this folder on ``PYTHONPATH``; GPU only): every
launch the direct path serves is checked twice. Triton is asked which binary it would pick
for the same arguments (a compile or a lookup, no launch): another binary than the entry's
means the cache key is too coarse. Then the launch runs a second time through Triton's
``JITFunction.run`` (``launch.direct_launches(False)``, same entry) into NaN-refilled
outputs, and the two results must be equal bit for bit (the GEMM kernels have no atomics).
A mismatch fails the test with the launch's key; ``SHADOW_LOG`` names a JSON-lines file to
append each mismatch to."""

import json
import os

import torch

from torch_matgrad.triton_kernels import launch

_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _outputs(fn_name, packed):
    """The output tensors among a launch's packed runtime arguments."""
    if fn_name == "fused_gemm_kernel":  # c (a split-K product's workspace), z, row sums, column sums
        picks = [packed[i] for i in (2, 5, 6, 11)]
    elif fn_name == "split_k_reduce_kernel":  # c, z
        picks = [packed[1], packed[3]]
    else:  # tma_gemm_kernel: c_desc, z_desc (their tensors), row sums
        picks = [None if packed[i] is None else packed[i].base for i in (2, 3)] + [packed[5]]
    return [t for t in picks if t is not None]


def pytest_configure(config):
    direct_call = launch.CachedKernel.__call__

    def shadow(self, key, grid, args, constexprs):
        entry = self.entries.get(key)
        if entry is None or entry.run is None or not launch._direct or torch.cuda.is_current_stream_capturing():
            return direct_call(self, key, grid, args, constexprs)
        packed = args(entry.meta) if callable(args) else args
        picked = self.fn.run(*packed, *entry.tail, grid=(grid(entry.meta),), warmup=True, **entry.options)
        picked = picked.result() if hasattr(picked, "result") else picked
        if picked.hash != entry.kernel.hash:
            raise AssertionError(f"key too coarse: {self.fn.__name__} {key!r}: Triton picks {picked.hash}, "
                                 f"the entry holds {entry.kernel.hash}")
        direct_call(self, key, grid, packed, constexprs)
        outs = _outputs(self.fn.__name__, packed)
        direct = [t.clone() for t in outs]
        for t in outs:
            t.fill_(float("nan"))
        with launch.direct_launches(False):
            direct_call(self, key, grid, packed, constexprs)
        bad = [i for i, (d, t) in enumerate(zip(direct, outs))
               if not torch.equal(d.view(_INTS[d.element_size()]), t.view(_INTS[t.element_size()]))]
        if bad:
            note = {"test": os.environ.get("PYTEST_CURRENT_TEST"), "kernel": self.fn.__name__,
                    "key": repr(key), "outputs": bad, "meta": entry.meta}
            if os.environ.get("SHADOW_LOG"):
                with open(os.environ["SHADOW_LOG"], "a") as f:
                    f.write(json.dumps(note, default=str) + "\n")
            raise AssertionError(f"direct launch differs from JITFunction.run: {note}")

    launch.CachedKernel.__call__ = shadow
