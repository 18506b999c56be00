"""Benchmark torch_matgrad against the layers users would otherwise pick.

Providers (all run in one process, on the same device, in the same run):

``torch_matgrad``
    The public :func:`torch_matgrad.linear` with the default dispatch (``"auto"``);
    the ``backend`` column records what the dispatcher chose (forward and backward run it).
``eager``
    ``F.linear`` followed by the ``torch.nn.functional`` activation: what
    ``nn.Linear`` + activation runs (cuBLAS on CUDA, oneDNN/MKL on CPU). The baseline.
``compile``
    ``torch.compile(mode="max-autotune")`` of that same eager block. On by default
    on CUDA only: on a CPU it takes minutes per shape and measures Inductor's CPU
    GEMM templates, not anything this project ships.
``matgrad_torch``, ``matgrad_triton``
    ``torch_matgrad.linear`` with the backend forced (forward and backward): what
    ``"auto"`` chooses between.
``matgrad_gz_prologue``, ``matgrad_gz_pass``
    The Triton backend with ``G_z = G * act'(z)`` fused into the backward GEMMs'
    prologue, or formed in one elementwise pass before them
    (:func:`torch_matgrad.triton_backend.gz_strategy`).

Modes: ``forward`` is inference (``torch.no_grad``, 2MNK flops); ``backward`` times
``torch.autograd.grad`` of a prebuilt graph into x, W and b (grad_x and grad_W: 4MNK);
``full`` is the training step, forward then that backward (6MNK). Activation and bias
flops are not counted: they are O(MN), under 0.1% of the GEMMs for K >= 1000.

Timing: CUDA uses ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
call) and median / 20th / 80th percentiles; CPU uses a loop that interleaves the
providers round by round, so that load from other processes hits all of them alike,
timed by wall clock or (``--clock cpu``, with ``--threads 1``) by this process's CPU
time, which such load does not inflate at all. Either way the activations (x and the
output gradient) rotate among several sets whose total exceeds the last-level cache,
so a provider never reads inputs that the previous call left in cache. Peak memory (CUDA only: torch's CPU allocator keeps no peak
counter) is ``max_memory_allocated`` during one full step, less what the inputs
already held.

Every CSV row carries the device name, torch and triton versions, the git commit and
the date. Outputs: a table on stdout, ``bench.csv`` (appended case by case, so a run
cut short keeps what it measured), ``bench.md``, and with matplotlib one
``tflops_<set>.png`` per shape set (TFLOP/s against shape, one line per provider).
Before timing, every provider's output and gradients are compared with the eager
baseline's; a mismatch, or a provider that raises (its row then carries the error and
the other providers are still timed), is reported and makes the command exit 1.
"""

from .cli import configure, run

__all__ = ["configure", "run"]
