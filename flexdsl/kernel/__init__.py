"""Execution: the chunked PyTorch path for CPUs and the Triton kernels for GPUs."""
