"""pytest plugin (``-p force_jit_plugin``, this folder on ``PYTHONPATH``): every cached
launch goes through Triton's ``JITFunction.run`` with the cached configuration instead of
the compiled kernel's launcher (``launch.direct_launches(False)`` for the whole session)."""

from torch_matgrad.triton_kernels import launch


def pytest_configure(config):
    launch._direct = False
