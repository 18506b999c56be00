"""Triton GEMM kernels of torch_matgrad, installed as ``torch_matgrad.triton_kernels``.

``fused_gemm`` holds the kernel (one strided GEMM with an activation-gradient prologue
and a bias/activation epilogue); ``ops`` its launch wrapper. The op's forward and
backward built from them are :mod:`torch_matgrad.triton_backend`.
"""
