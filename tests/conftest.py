"""Shared test set-up.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched
on before any kernel module is imported (``@triton.jit`` reads it at decoration time).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random data per test, reproducible per test.
    torch.manual_seed(0x5EED)


@pytest.fixture
def backend_env(monkeypatch):
    """``backend_env(value)`` sets ``$TORCH_MATGRAD_BACKEND`` (None: unsets it) and makes
    the dispatcher read it again (it reads it once, on import)."""
    from torch_matgrad import dispatch

    def set_env(value):
        if value is None:
            monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(dispatch.ENV_VAR, value)
        dispatch.read_env()

    yield set_env
    monkeypatch.undo()
    dispatch.read_env()
