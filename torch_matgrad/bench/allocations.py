"""Peak memory and op count of a step on any device, as CUDA's caching allocator counts.

``torch.cuda.max_memory_allocated`` counts the blocks that tensor storages hold: each
request rounded up to 512 bytes (the allocator's ``kMinBlockSize``), a storage held
until the last tensor, view or autograd-saved copy of it dies. The CPU allocator keeps
no such counter, and the profiler's memory timeline (what ``bench --mlp`` used before)
took seconds to build per step and counts the CPU kernels' own scratch, which a GPU
kernel does not allocate. :class:`AllocationTracker`, a ``TorchDispatchMode``, counts
every storage that an aten op creates (after autograd and composite decompositions: the
ops that reach a device's kernels), from the op's return until a weak reference to
the storage fires, that is when the storage is freed. The figures are shape-exact and
device-independent: on ``meta`` tensors a step at full size costs milliseconds.

What it leaves out, against the CUDA counter: scratch that a kernel allocates inside
itself (cuBLAS's workspace, which PyTorch holds per handle and stream and so already
before a step; reductions' staging buffers, KiBs), and the slack of a cached block
reused without a split (under 1 MiB a block, when the allocator's cache holds a block
at most 1 MiB larger than the request). Storages that existed before the step and die
in it are not subtracted (the step's callers keep their inputs alive).
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Tuple

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: CUDA's caching allocator rounds every request up to a multiple of this (kMinBlockSize).
BLOCK = 512


def block_bytes(nbytes: int) -> int:
    """The bytes CUDA's allocator counts for a request of ``nbytes`` (0 allocates nothing)."""
    return -(-nbytes // BLOCK) * BLOCK


class AllocationTracker(TorchDispatchMode):
    """Counts, while active, the bytes of live storages created by aten ops
    (:func:`block_bytes` each), their peak, and the aten ops run (``ops``).

    A storage is new when an op returns it and none of the op's tensor arguments holds
    it (in-place ops, ``out=`` forms and views return an argument's storage). The
    dispatch mode follows the autograd engine into the backward, custom Functions'
    backwards included.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = self.ops = 0
        self._live: Dict[int, Tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        given = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in given and key not in self._live and storage.nbytes():
                    self._allocated(key, storage)
        return out

    def _allocated(self, key: int, storage) -> None:
        size = block_bytes(storage.nbytes())
        self._live[key] = (weakref.ref(storage, lambda _, key=key: self._freed(key)), size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key)[1]


def step_allocations(step: Callable[[], object]) -> Tuple[int, int]:
    """``(peak, ops)`` of one call of ``step``: the peak bytes of the storages it
    allocated (:class:`AllocationTracker`) and the aten ops it ran."""
    with AllocationTracker() as tracker:
        step()
    return tracker.peak, tracker.ops
