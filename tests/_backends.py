"""Backend and device parameters for tests that run on every backend and device."""

import pytest

from torch_matgrad import dispatch

# Every backend the op may run on; one not registered in this tree is skipped, not dropped.
BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name not in dispatch.BACKENDS, reason=f"backend {name!r} is not in torch_matgrad.dispatch.BACKENDS"
        ),
    )
    for name in ("torch", "triton")
]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test with ``use_backend(name)`` forced; yields the name."""
    with dispatch.use_backend(request.param):
        yield request.param
