"""The cached launch (``launch.CachedKernel``) on a CPU, the compiled kernel and the
autotuner stood in for: what a first launch stores, and which binary each later launch
calls. The binaries themselves run on a GPU (``test_triton_gpu.py``)."""

from __future__ import annotations

import threading

import pytest
import torch

pytestmark = pytest.mark.kernels
pytest.importorskip("triton")

from torch_matgrad import triton_backend  # noqa: E402
from torch_matgrad.triton_kernels import configs, launch, ops  # noqa: E402


class _Binary:
    """A compiled kernel as the cache uses it: its launcher records each call (with the
    device current then) and its function handle names the device it was loaded on."""

    packed_metadata = "metadata"

    def __init__(self, config, device):
        self.config, self.function, self.launched = config, f"function on cuda:{device}", []

    def run(self, *args):
        self.launched.append((_current["index"], args))

    def launch_metadata(self, *args):
        return None


# The device current in these tests (the stand-in of torch.cuda.current_device).
_current = {"index": 0}


class _Autotuner:
    """Triton's autotuner as the cache sees it: each call chooses the next of ``choices``
    (the last one from then on) and tells it through ``best_config`` as the call begins,
    runs ``during`` (where Triton compiles, other threads running), then hands back the
    binary of that configuration, loaded on the current device."""

    def __init__(self, *choices, during=lambda: None):
        self.configs = [*choices, choices[-1]]  # several: no single-configuration rule
        self.choices, self.during, self.binaries = list(choices), during, []

    def __getitem__(self, grid):
        def run(*args, **constexprs):
            config = self.best_config = self.choices.pop(0) if len(self.choices) > 1 else self.choices[0]
            self.during()
            self.binaries.append(_Binary(config, _current["index"]))
            return self.binaries[-1]

        return run


def _cached(kernel, tuner):
    fn, first = (launch.TMA.fn, "ROWSUM") if kernel == "tma" else (launch.POINTER.fn, "PRO_ACT")
    return launch.CachedKernel(fn, tuner, first_constexpr=first)


@pytest.fixture
def stubbed(monkeypatch):
    """``stubbed(kernel, tuner)``: the cache of ``kernel`` ("pointer" or "tma") through
    ``tuner``, the launcher's stream a name; returns the cache."""
    monkeypatch.setattr(launch, "_current_stream", lambda: "stream")
    monkeypatch.setitem(_current, "index", 0)

    def install(kernel, tuner):
        cached = _cached(kernel, tuner)
        monkeypatch.setattr(launch, kernel.upper(), cached)
        return cached

    return install


def _grid(config, m, n):
    return -(-m // config.kwargs["BLOCK_M"]) * -(-n // config.kwargs["BLOCK_N"])


def test_racing_first_launches_keep_their_own_configuration(stubbed):
    # Two first launches at once (the autograd engine's device thread beside another):
    # the first chooses 128 x 128 tiles and compiles, the second chooses 64 x 64 tiles
    # meanwhile. Each entry keeps the configuration of its own binary, so the grid of
    # every later launch is the one that binary tiles.
    wide, narrow = configs.CONFIGS[1], configs.CONFIGS[5]
    inside, other_chose = threading.Event(), threading.Event()

    def during():
        if not inside.is_set():  # the first launch: wait, compiling, for the other's choice
            inside.set()
            other_chose.wait(timeout=1)  # the cache lets it in only after this one: times out
        else:
            other_chose.set()

    tuner = _Autotuner(wide, narrow, during=during)
    cached = stubbed("pointer", tuner)
    w = torch.randn(96, 32, dtype=torch.bfloat16)
    xs = {m: torch.randn(m, 32, dtype=torch.bfloat16) for m in (200, 40)}  # two buckets: two keys
    failed = []

    def forward(m):
        try:
            with ops.gemm_kernel("pointer"):
                triton_backend.forward(xs[m], w, None, None)
        except BaseException as e:  # noqa: BLE001 -- reported by the main thread
            failed.append(e)

    first = threading.Thread(target=forward, args=(200,))
    first.start()
    assert inside.wait(timeout=10)
    second = threading.Thread(target=forward, args=(40,))
    second.start()
    first.join()
    second.join()
    assert not failed, failed
    assert len(cached.entries) == 2 and len(tuner.binaries) == 2
    for entry in cached.entries.values():
        assert entry.meta == entry.kernel.config.kwargs
    with ops.gemm_kernel("pointer"):
        for m in xs:
            triton_backend.forward(xs[m], w, None, None)
    for binary, m in zip(tuner.binaries, xs):
        ((_, args),) = binary.launched
        assert args[0] == _grid(binary.config, m, 96), m
