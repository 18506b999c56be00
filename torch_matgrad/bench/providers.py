"""The providers: what each one runs, in which context, and which backend it ran.

``compile`` is ``torch.compile(mode="max-autotune")`` of the eager layer (minutes of
autotuning per shape on a GPU), ``compile_default`` the same in the default mode (what
most users run; seconds). Both compile on their first call, which the rows' ``first_call_s``
states and the timing leaves out."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from .. import dispatch
from ..formulas import activate
from ..function import linear

PROVIDERS = (
    "torch_matgrad", "eager", "compile", "compile_default", "matgrad_torch", "matgrad_triton", "matgrad_gz_prologue",
    "matgrad_gz_pass",
)
DEFAULT_PROVIDERS = ("torch_matgrad", "eager", "compile")
BASELINE = "eager"

def eager(x, w, b, act):
    return activate(F.linear(x, w, b), act)


def matgrad(x, w, b, act):
    return linear(x, w, b, activation=act)


def backend_ran(x, w, b) -> str:
    """What ``torch_matgrad.linear`` runs for these tensors: the backend asked for, then
    the implementation the dispatcher picks for the forward (``torch`` or a kernel
    backend), e.g. ``auto->torch``."""
    return f"{dispatch.requested_backend()}->{dispatch.chosen_backend(x, w, b)}"


# Providers that run torch_matgrad.linear with a forced backend (and G_z strategy).
_FORCED = {
    "matgrad_torch": ("torch", None),
    "matgrad_triton": ("triton", None),
    "matgrad_gz_prologue": ("triton", "prologue"),
    "matgrad_gz_pass": ("triton", "pass"),
}


def provider_context(name: str) -> contextlib.AbstractContextManager:
    """The context every call of a provider runs in: its forced backend and strategy."""
    stack = contextlib.ExitStack()
    if name in _FORCED:
        backend, gz = _FORCED[name]
        stack.enter_context(dispatch.use_backend(backend))
        if gz is not None:
            from .. import triton_backend

            stack.enter_context(triton_backend.gz_strategy(gz))
    return stack


def in_context(name: str, step: Callable[[], object]) -> Callable[[], object]:
    """``step`` run inside the provider's context (a few microseconds per call)."""
    if name not in _FORCED:
        return step

    def stepped():
        with provider_context(name):
            return step()

    return stepped


def backend_of(name: str, tensors) -> str:
    if name == "torch_matgrad" or name in _FORCED:
        with provider_context(name):
            try:
                return backend_ran(*tensors)
            except RuntimeError:  # a forced backend that cannot run here: the row has the error
                return f"{dispatch.requested_backend()}->unavailable"
    return name


def provider_fn(name: str) -> Callable:
    """The ``fn(x, w, b, act)`` a provider runs; built afresh for every case."""
    if name == "torch_matgrad" or name in _FORCED:
        return matgrad
    if name == "eager":
        return eager
    # dynamic=False: one static graph per shape, as max-autotune tunes for. Resetting
    # Dynamo per case keeps its cache small: across cases, shapes would add up to its
    # recompile limit (8), past which it silently runs eager. Inductor's own caches
    # still spare the autotuning of a graph already seen.
    torch._dynamo.reset()
    if name == "compile_default":
        return torch.compile(eager, dynamic=False)
    return torch.compile(eager, mode="max-autotune", dynamic=False)


def compile_config(mode: str):
    """The backward mode replays one graph (``retain_graph=True``), which a compiled
    backward that reuses ("donates") its saved buffers refuses (torch >= 2.6): switch
    donation off, for that mode only, both when the graphs compile and when they run."""
    from torch._functorch import config

    if mode != "backward" or not hasattr(config, "donated_buffer"):
        return contextlib.nullcontext()
    return config.patch(donated_buffer=False)
