"""Triton kernels with pure-PyTorch references (Triton is an optional extra)."""
