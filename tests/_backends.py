"""Backend and device parameters for tests that run on every backend and device."""

import pytest

from torch_matgrad import dispatch

# Every backend the op may run on ("auto" is one of these, chosen per tensor).
BACKENDS = [name for name in dispatch.BACKENDS if name != "auto"]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test with ``use_backend(name)`` forced; yields the name."""
    with dispatch.use_backend(request.param):
        yield request.param
