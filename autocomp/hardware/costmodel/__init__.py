"""Latency without the device, or before compiling: the per-op cost model and its fit, the
kernels of a compiled model, the latency table, and per-layer breakdowns."""
