"""Latency measured on a device: here (CPU, CUDA GPU) or through a TVM RPC tracker, timed
in worker processes apart from PyTorch."""
