"""Triton kernels, one family per file, each beside a plain PyTorch reference and a switch to use it."""
