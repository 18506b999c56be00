"""Triton GEMM kernels of torch_matgrad, installed as ``torch_matgrad.triton_kernels``."""
