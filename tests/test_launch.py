"""The cached launch (``launch.CachedKernel``) on a CPU, the compiled kernel and the
autotuner stood in for: what a first launch stores, and which binary each later launch
calls. The binaries themselves run on a GPU (``test_triton_gpu.py``)."""

from __future__ import annotations

import importlib.util
import pathlib
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
            triton_backend.forward(xs[m], w, None, None)
        except BaseException as e:  # noqa: BLE001 -- reported by the main thread
            failed.append(e)

    # The kernel is forced for the process (as around a backward on CUDA's autograd thread).
    with ops.gemm_kernel("pointer"):
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


# Every input of a launch with the dtype of its own (b, bias, and so on), not the first
# operand's: fused_matmul's keywords giving it, each operand shaped for a (m, k) = (40, 32)
# product with n = 24 columns.
_INPUTS = {
    "b": lambda t: dict(b=t((32, 24))),
    "bias": lambda t: dict(bias=t((24,))),
    "saved": lambda t: dict(grad_activation="gelu", saved=t((40, 32))),
    "gate": lambda t: dict(hidden=True, gate=t((40, 32)), mlp_activation="silu"),
    "b2": lambda t: dict(b2=t((32, 24))),
    "bias2": lambda t: dict(b2=t((32, 24), torch.bfloat16), bias=t((24,), torch.bfloat16), bias2=t((24,))),
    "grad_hidden's u": lambda t: dict(grad_hidden=(t((40, 24)), None), mlp_activation="silu"),
    "grad_hidden's g": lambda t: dict(grad_hidden=(t((40, 24), torch.bfloat16), t((40, 24))), mlp_activation="silu"),
}
_TMA_INPUTS = ("b", "bias")


@pytest.mark.parametrize(
    "kernel, operand", [("pointer", name) for name in _INPUTS] + [("tma", name) for name in _TMA_INPUTS]
)
def test_each_input_dtype_is_its_own_kind_of_launch(stubbed, kernel, operand):
    # The backend's launches skip fused_matmul's checks (check=False), and Triton compiles
    # a binary per pointer type: a launch with one input in another dtype is another kind
    # of launch, never a call of the one-dtype launch's binary.
    if kernel == "tma" and not ops.TMA_AVAILABLE:
        pytest.skip("no tensor descriptors in this Triton")
    tuner = _Autotuner(configs.TMA_CONFIGS[2] if kernel == "tma" else configs.CONFIGS[5])
    cached = stubbed(kernel, tuner)
    a = torch.randn(40, 32, dtype=torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16, torch.float16):

        def tensor(shape, dtype_=dtype):
            return torch.randn(*shape).to(dtype_)

        kwargs = {"b": tensor((32, 24), torch.bfloat16), **_INPUTS[operand](tensor)}
        with ops.gemm_kernel(kernel):
            ops.fused_matmul(a, kwargs.pop("b"), **kwargs, check=False)
    # Two kinds, each through the autotuner once; the repeat called the fp16 one's binary.
    assert len(cached.entries) == 2 and len(tuner.binaries) == 2
    assert [len(binary.launched) for binary in tuner.binaries] == [0, 1]


class _OnDevice(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:<INDEX>``, and so do its views."""

    INDEX = 0

    @property
    def device(self):
        return torch.device("cuda", self.INDEX)


_ON = {i: type(f"_OnCuda{i}", (_OnDevice,), {"INDEX": i}) for i in (0, 1)}


class _Switch:
    """``torch.cuda.device`` on the stand-in current device."""

    def __init__(self, device):
        self.index = torch.device(device).index

    def __enter__(self):
        self.previous, _current["index"] = _current["index"], self.index

    def __exit__(self, *exc):
        _current["index"] = self.previous


@pytest.mark.parametrize("kernel", ["pointer", "tma"])
def test_a_launch_calls_the_binary_of_its_tensors_device(monkeypatch, stubbed, kernel):
    # cuda:0 current, launches on cuda:0's tensors and then on cuda:1's: each device's
    # first launch goes through the autotuner with that device current (Triton loads the
    # binary there), and every later launch calls the function of its tensors' device
    # with that device current, never cuda:0's on cuda:1.
    if kernel == "tma" and not ops.TMA_AVAILABLE:
        pytest.skip("no tensor descriptors in this Triton")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: _current["index"])
    monkeypatch.setattr(torch.cuda, "device", _Switch)
    monkeypatch.setattr(ops, "_empty", lambda shape, dtype, device: torch.empty(shape, dtype=dtype).as_subclass(
        _ON[device.index]))
    monkeypatch.setattr(launch, "num_sms", lambda device: 4)
    for i in _ON:
        monkeypatch.setitem(ops._TMA_GPUS, i, True)
    tuner = _Autotuner(configs.TMA_CONFIGS[2] if kernel == "tma" else configs.CONFIGS[5])
    cached = stubbed(kernel, tuner)
    for i, on in _ON.items():
        x, w, b = (torch.randn(*s, dtype=torch.bfloat16).as_subclass(on) for s in ((100, 32), (48, 32), (48,)))
        with ops.gemm_kernel(kernel):
            for _ in range(2):
                triton_backend.forward(x, w, b, None)
        assert _current["index"] == 0
    assert len(cached.entries) == 2
    assert [binary.function for binary in tuner.binaries] == ["function on cuda:0", "function on cuda:1"]
    for i, binary in enumerate(tuner.binaries):
        ((current, args),) = binary.launched
        assert (current, args[4]) == (i, f"function on cuda:{i}")


def test_flags_key_is_the_flags_items():
    # The cached hash is the plain tuple's: a key built from tuple(flags.items()) (as
    # gemm_kernel_for's) finds what the launch's own key stored, and the other way round.
    flags, key = ops._flags(torch.bfloat16, "ieee", None, True, True, True, "silu", True, False, False, False, False,
                            False, None)
    plain = tuple(flags.items())
    assert key == plain and hash(key) == hash(plain) and {key: 1}[plain] == 1 and {plain: 1}[key] == 1


def test_gpu_ab_plugins_find_what_they_patch(monkeypatch):
    # gpu_check's launch-ab stage runs them on a GPU only: a renamed name would show there.
    monkeypatch.setattr(launch, "_direct", True)
    monkeypatch.setattr(launch.CachedKernel, "__call__", launch.CachedKernel.__call__)
    shadowed = launch.CachedKernel.__call__
    folder = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_ab"
    for name in ("shadow_plugin", "force_jit_plugin"):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        plugin = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plugin)
        plugin.pytest_configure(None)
    assert launch._direct is False and launch.CachedKernel.__call__ is not shadowed
    assert {"run", "meta", "tail", "options", "kernel"} <= set(launch.Entry._fields)
