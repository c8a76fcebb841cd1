"""Sparse-attention kernels: ``reference`` (torch, any device) defines them; ``triton_kernels``
runs them fast on CUDA."""
